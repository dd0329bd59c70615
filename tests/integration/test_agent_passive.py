"""``passive: true`` really listens: the agent's ExaBGP never connects out, FRR connects to it.

Before, the neighbour rendered ``passive true;`` alone, and ExaBGP 5 opens no listening
socket for that: the session never came up. It now also renders ``listen 179;``, which
binds local-address:179 for that peer. Real ExaBGP (``anycast-agent launch``) and FRR in
namespaces (lab/single_pop.py); assertions read FRR's JSON and /proc/net/tcp.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from lab.poll import wait_for
from lab.single_pop import AGENT_CONFIG, VIP, SinglePop, serving

pytestmark = pytest.mark.lab
AGENT_ADDR = "100.64.1.2"


@pytest.fixture(scope="module")
def pop(lab_preflight: None) -> Iterator[SinglePop]:
    data = yaml.safe_load(AGENT_CONFIG.read_text())
    data["bgp"]["neighbors"][0]["passive"] = True
    with serving("t-passive-", yaml.safe_dump(data)) as topo:
        yield topo


def listening_on_179(pop: SinglePop) -> set[str]:
    """Local addresses with a TCP socket in LISTEN on port 179 in the POP namespace."""
    out = pop.nodes["pop"].run(["cat", "/proc/net/tcp"]).stdout.splitlines()[1:]
    found = set()
    for line in out:
        local, state = line.split()[1], line.split()[3]
        addr_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == 179:
            found.add(".".join(str(int(addr_hex[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_passive_neighbour_listens_and_frr_connects_to_it(pop: SinglePop) -> None:
    wait_for(lambda: AGENT_ADDR in listening_on_179(pop), 60, desc="ExaBGP listening on 100.64.1.2:179")
    wait_for(lambda: pop.router.neighbor_state(AGENT_ADDR) == "Established", 60, desc="session established")
    info = pop.router.vtysh_json(f"show bgp neighbors {AGENT_ADDR} json")[AGENT_ADDR]
    assert info["portForeign"] == 179  # FRR made the connection, to ExaBGP's listener
    assert info["portLocal"] != 179
    wait_for(lambda: pop.router.bgp_route(f"{VIP}/32") is not None, 60, desc="the VIP announced over it")
