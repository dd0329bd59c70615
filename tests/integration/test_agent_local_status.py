"""``anycastctl agent status`` against a real agent (ExaBGP + anycast-agent, FRR as the POP
router, real backends: lab/single_pop.py), through the installed console script: what it
says agrees with FRR, with the agent's metrics, and follows a backend failure."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.metrics import parse
from lab.poll import wait_for
from lab.single_pop import VIP, SinglePop, serving

PREFIX = f"{VIP}/32"
ANYCASTCTL = Path(sys.executable).parent / "anycastctl"
pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def pop(lab_preflight: None) -> Iterator[SinglePop]:
    with serving("t-ast-") as topo:
        yield topo


def sock(pop: SinglePop) -> str:
    return str(pop.workdir("pop") / "state" / "agent.sock")  # lab.nodes.AgentNode's --state-dir


def ctl(pop: SinglePop, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ANYCASTCTL), "agent", "status", "--socket", sock(pop), *args],
                          capture_output=True, text=True, timeout=60)


def status(pop: SinglePop) -> dict[str, Any]:
    r = ctl(pop, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def vip(doc: dict[str, Any]) -> dict[str, Any]:
    (v,) = doc["vips"]
    return v  # type: ignore[no-any-return]


def announced_in_sync(pop: SinglePop) -> bool:
    try:
        doc = status(pop)
    except AssertionError:
        return False  # the agent is still starting: no socket yet
    v = vip(doc)
    return (v["action"] == "announce" and v["exabgp"]["in_sync"] is True
            and doc["bgp"]["sessions"][0]["state"] == "up" and pop.router.bgp_route(PREFIX) is not None)


def test_status_shows_sessions_decision_attributes_and_what_exabgp_holds(pop: SinglePop) -> None:
    wait_for(lambda: announced_in_sync(pop), 60, desc="agent status: game-global announced, in sync, session up")
    doc = status(pop)
    assert doc["pop"] == "sjc"
    assert doc["plan"]["source"] == "local-config" and doc["controller"] is None
    assert doc["bgp"] == {"local_as": 65101, "sessions": [
        {"neighbor": "100.64.1.1", "peer_as": 65001, "local_address": "100.64.1.2", "state": "up"}]}
    v = vip(doc)
    assert (v["name"], v["prefix"], v["reason"], v["origin"], v["next_hop"]) == (
        "game-global", PREFIX, "healthy", "us-west", "100.64.10.1")
    want = {"med": 100, "as_path_prepend": 0, "communities": ["65101:100"], "large_communities": []}
    assert v["intended"] == want and v["exabgp"] == {"holds": True, "attributes": want, "in_sync": True}
    assert {b["backend"]: b["phase"] for b in v["backends"] if b["origin"] == "us-west"} == {
        "100.64.10.1:8080": "up", "100.64.10.1:8081": "up"}
    # What the router received is what the status says ExaBGP holds.
    path = pop.router.bgp_route(PREFIX)["paths"][0]
    assert (path["metric"], path["community"]["string"]) == (100, "65101:100")
    # And the metrics say the same.
    scrape = parse(pop.metrics())
    assert scrape.value("anycast_vip_announced", vip="game-global") == 1
    assert scrape.value("anycast_vip_reason", vip="game-global", reason="healthy", origin="us-west") == 1
    assert scrape.value("anycast_bgp_neighbor_up", neighbor="100.64.1.1") == 1
    assert scrape.value("anycast_plan_generation") == doc["plan"]["generation"]

    human = ctl(pop)
    assert human.returncode == 0, human.stderr
    row = next(line for line in human.stdout.splitlines() if line.startswith("game-global "))
    assert row.split() == ["game-global", PREFIX, "announce", "healthy", "us-west", "2/2", "announced"]


def test_status_follows_a_backend_failure(pop: SinglePop) -> None:
    wait_for(lambda: announced_in_sync(pop), 60, desc="announced before the failure")
    pop.stop_backends("usw")
    try:
        def withdrawn() -> dict[str, Any] | None:
            doc = status(pop)
            v = vip(doc)
            return doc if v["action"] == "withdraw" and v["exabgp"]["in_sync"] is True else None

        doc = wait_for(withdrawn, 60, desc="agent status: game-global withdrawn, ExaBGP holds nothing")
        v = vip(doc)
        assert v["reason"] == "backend_down" and v["exabgp"] == {"holds": False, "attributes": None,
                                                                  "in_sync": True}
        assert "0/2 backends healthy in us-west" in v["detail"]
        wait_for(lambda: pop.router.bgp_route(PREFIX) is None, 60, desc="FRR has no route either")
        scrape = parse(pop.metrics())
        assert scrape.value("anycast_vip_announced", vip="game-global") == 0
        assert scrape.value("anycast_vip_reason", vip="game-global", reason="backend_down", origin="us-west") == 1
    finally:
        pop.start_backends("usw")
    wait_for(lambda: announced_in_sync(pop), 60, desc="announced again after the backends returned")


def test_the_socket_is_local_read_only_and_owner_only(pop: SinglePop) -> None:
    wait_for(lambda: os.path.exists(sock(pop)), 60, desc="the status socket exists")
    assert stat.S_ISSOCK(os.stat(sock(pop)).st_mode)
    assert stat.S_IMODE(os.stat(sock(pop)).st_mode) == 0o600
    before = status(pop)
    # Something written to it is dropped: the answer is the same document, nothing changes.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sock(pop))
        s.sendall(b'{"drain": true, "withdraw": "game-global"}\n')
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert json.loads(answer)["vips"][0]["action"] == before["vips"][0]["action"] == "announce"
    assert vip(status(pop))["action"] == "announce"
    # No TCP port serves it: the agent's only listening TCP socket in its namespace is metrics.
    listening = pop.nodes["pop"].run(["ss", "-Htln"]).stdout.split("\n")
    ports = sorted({line.split()[3].rsplit(":", 1)[1] for line in listening if line.strip()})
    assert ports == ["9701"], listening


def test_no_agent_is_exit_4_with_one_line(pop: SinglePop, tmp_path: Path) -> None:
    r = subprocess.run([str(ANYCASTCTL), "agent", "status", "--socket", str(tmp_path / "none.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
