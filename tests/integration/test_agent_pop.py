"""The POP agent end to end, with real parts only: FRR bgpd+zebra as the POP router, ExaBGP
running the agent (started the way systemd starts it: ``anycast-agent launch``), real HTTP
backends in two origin namespaces, and the kernel's FIB in each namespace.

One lab for the module (bring-up costs ~1 s); each test first puts the lab back into the
state it needs. The agent runs configs/agent-sjc.yaml (copied, so tests can edit it).
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lab.netns import Lab
from lab.poll import wait_for
from lab.single_pop import AGENT_CONFIG, VIP, SinglePop

PREFIX = f"{VIP}/32"
pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def pop(lab_preflight: None) -> Iterator[SinglePop]:
    lab = Lab("t-agent-")
    try:
        topo = SinglePop(lab)
        topo.up()
        config = topo.workdir("pop") / "agent.yaml"
        shutil.copy(AGENT_CONFIG, config)
        topo.agent_config = config
        for node in ("usw", "euc"):
            topo.start_backends(node)
        topo.start_agent()
        yield topo
    finally:
        lab.teardown()


# --- observations ----------------------------------------------------------------------------
def in_bgp(pop: SinglePop) -> bool:
    return pop.router.bgp_route(PREFIX) is not None


def in_fib(pop: SinglePop) -> bool:
    return bool(pop.router.fib_has(PREFIX))


def metric(pop: SinglePop, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(pop.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def wait_announced(pop: SinglePop, timeout: float = 60.0) -> None:
    wait_for(lambda: in_bgp(pop) and in_fib(pop), timeout, desc=f"{PREFIX} in FRR's BGP table and FIB")


def wait_withdrawn(pop: SinglePop, timeout: float = 60.0) -> None:
    wait_for(lambda: not in_bgp(pop) and not in_fib(pop), timeout,
             desc=f"{PREFIX} gone from FRR's BGP table and FIB")


def log_since(pop: SinglePop, mark: int) -> str:
    return pop.agent_log()[mark:]


def write_config(pop: SinglePop, edit: object = None) -> None:
    data = yaml.safe_load(AGENT_CONFIG.read_text())
    if callable(edit):
        edit(data)
    pop.agent_config.write_text(yaml.safe_dump(data))


def restart_service(pop: SinglePop) -> None:
    """Like `systemctl restart`: stop ExaBGP (and with it the agent), start both again.
    Also resets ExaBGP's respawn budget (about 6 helper deaths per minute)."""
    pop.stop_exabgp(signal.SIGTERM)
    wait_for(lambda: pop.agent_pid() is None, 60, desc="agent gone")
    pop.start_agent()
    wait_for(pop.agent_pid, 60, desc="agent started by ExaBGP")


def ensure_healthy_and_announced(pop: SinglePop) -> None:
    for node in ("usw", "euc"):
        if node not in pop.backends:
            pop.start_backends(node)
    if pop.agent_proc is None or pop.agent_proc.poll() is not None:  # ExaBGP not running
        pop.start_agent()
    wait_announced(pop)


# --- tests -----------------------------------------------------------------------------------
def test_vip_announced_with_attributes_routed_to_active_origin(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    path = pop.router.bgp_route(PREFIX)["paths"][0]
    assert path["metric"] == 100  # FRR calls the MED "metric"
    assert path["aspath"]["string"] == "65101"
    assert path["community"]["string"] == "65101:100"
    assert path["peer"]["peerId"] == "100.64.1.2"
    # The POP's kernel sends the VIP to the active origin's backbone next hop, marked as ours.
    assert "198.51.100.10 via 100.64.10.1" in pop.pop_kernel_routes()
    # A client request from the router's side reaches the VIP and is served by us-west.
    served = wait_for(pop.request_vip, 60, desc="HTTP through the VIP")
    assert "origin=us-west" in served
    assert metric(pop, "anycast_vip_announced", vip="game-global") == 1
    assert metric(pop, "anycast_vip_state", vip="game-global", state="up") == 1
    # (A session can flap once at start-up when both sides connect at the same moment.)
    wait_for(lambda: metric(pop, "anycast_bgp_neighbor_up", neighbor="100.64.1.1") == 1, 60,
             desc="anycast_bgp_neighbor_up is 1")
    assert metric(pop, "anycast_backend_healthy", vip="game-global", origin="eu-central",
                  backend="100.64.20.1:8080") == 1  # standby origins are checked too


def test_backend_down_withdraws_then_returns_after_rise(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    mark = len(pop.agent_log())
    pop.stop_backends("usw")
    wait_withdrawn(pop)
    wait_for(lambda: "198.51.100.10" not in pop.pop_kernel_routes(), 60, desc="kernel route removed")
    assert pop.request_vip(timeout=0.5) is None  # FRR no longer routes the VIP anywhere
    log = log_since(pop, mark)
    assert "withdraw 198.51.100.10/32 (VIP game-global), reason backend_down" in log
    assert metric(pop, "anycast_vip_reason", vip="game-global", reason="backend_down", origin="us-west") == 1
    assert metric(pop, "anycast_announcement_changes_total", vip="game-global", action="withdraw",
                  reason="backend_down") >= 1

    mark = len(pop.agent_log())
    pop.start_backends("usw")
    wait_announced(pop)
    log = log_since(pop, mark)
    # rise=2: a backend goes down -> rising (1st success) -> up (2nd), and only then the
    # announce (one healthy backend of the two is enough: min_healthy 1).
    rising = log.index("of game-global/us-west: down -> rising")
    up = log.index("of game-global/us-west: rising -> up")
    announce = log.index("announce 198.51.100.10/32 (VIP game-global), reason healthy")
    assert rising < up < announce, log


def test_killed_agent_is_respawned_and_keeps_the_route_without_a_flap(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    old = pop.signal_agent(signal.SIGKILL)
    absent = 0
    deadline = time.monotonic() + 60  # a hang guard: under load a respawn is slower, not wrong
    new = None
    while time.monotonic() < deadline:
        absent += 0 if in_bgp(pop) else 1
        new = pop.agent_pid()
        if new and new != old and metric(pop, "anycast_vip_state", vip="game-global", state="up") == 1:
            break
        time.sleep(0.02)
    assert new and new != old, "ExaBGP did not respawn the agent"
    assert absent == 0, f"route was missing from FRR in {absent} samples during the restart"
    for _ in range(25):  # and it stays, after the new agent's verdict
        assert in_bgp(pop)
        time.sleep(0.02)
    assert "state file lists 1 prefix(es) a previous agent announced" in pop.agent_log()


def test_respawned_agent_withdraws_what_should_go(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    restart_service(pop)
    wait_announced(pop)
    pop.signal_agent(signal.SIGKILL)
    pop.stop_backends("usw")  # fails while no agent runs: ExaBGP still announces the VIP
    wait_withdrawn(pop)
    assert "reason backend_down" in pop.agent_log()
    pop.start_backends("usw")
    wait_announced(pop)


def test_vip_removed_from_config_while_agent_was_down_is_withdrawn(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    restart_service(pop)
    wait_announced(pop)
    try:
        mark = len(pop.agent_log())
        write_config(pop, lambda d: d.__setitem__("vips", []))
        pop.signal_agent(signal.SIGKILL)
        wait_withdrawn(pop)
        assert "withdraw 198.51.100.10/32 (VIP 198.51.100.10), reason not_in_config" in log_since(pop, mark)
    finally:
        write_config(pop)
    pop.signal_agent(signal.SIGKILL)
    wait_announced(pop)


def test_bad_config_on_reload_keeps_last_good_config_and_announcements(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    mark = len(pop.agent_log())
    write_config(pop, lambda d: d["vips"][0]["check"].__setitem__("rise", 0))
    try:
        pop.signal_agent(signal.SIGHUP)
        wait_for(lambda: "config reload rejected" in log_since(pop, mark), 60, desc="rejection logged")
        log = log_since(pop, mark)
        assert "vips[0].check.rise: must be >= 1, got 0" in log
        assert metric(pop, "anycast_config_last_reload_successful") == 0
        assert metric(pop, "anycast_config_reloads_total", result="failure") >= 1
        for _ in range(30):  # still announced, and checks still running on the old config
            assert in_bgp(pop) and in_fib(pop)
            time.sleep(0.05)
        # A good config with admin: down is applied: withdrawn with that reason.
        write_config(pop, lambda d: d["vips"][0].__setitem__("admin", "down"))
        pop.signal_agent(signal.SIGHUP)
        wait_withdrawn(pop)
        assert "reason admin_down" in log_since(pop, mark)
        assert metric(pop, "anycast_config_last_reload_successful") == 1
    finally:
        write_config(pop)
        pop.signal_agent(signal.SIGHUP)
    wait_announced(pop)


def test_drain_announces_less_preferred(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    try:
        write_config(pop, lambda d: d["vips"][0].__setitem__("admin", "drain"))
        pop.signal_agent(signal.SIGHUP)
        wait_for(lambda: (pop.router.bgp_route(PREFIX) or {}).get("paths", [{}])[0].get("metric") == 1000, 60,
                 desc="draining MED 1000")
        path = pop.router.bgp_route(PREFIX)["paths"][0]
        assert path["aspath"]["string"] == "65101 65101 65101 65101"  # prepended 3 times
        assert path["community"]["string"] == "65101:666"
        assert metric(pop, "anycast_vip_state", vip="game-global", state="draining") == 1
    finally:
        write_config(pop)
        pop.signal_agent(signal.SIGHUP)
    wait_for(lambda: (pop.router.bgp_route(PREFIX) or {}).get("paths", [{}])[0].get("metric") == 100, 60,
             desc="back to MED 100")


def test_sigterm_withdraws_everything(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    restart_service(pop)
    wait_announced(pop)
    mark = len(pop.agent_log())
    pop.signal_agent(signal.SIGTERM)
    wait_withdrawn(pop)
    log = log_since(pop, mark)
    assert "stopping: withdrawing 1 prefix(es)" in log
    assert "withdraw 198.51.100.10/32 (VIP game-global), reason shutdown" in log
    # ExaBGP respawns the agent; with the backends healthy it announces again after rise.
    wait_announced(pop)


def test_agent_exits_when_exabgp_dies(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    agent = pop.agent_pid()
    assert pop.agent_proc is not None
    pop.stop_exabgp(signal.SIGKILL)
    wait_withdrawn(pop)  # the session dropped with ExaBGP
    wait_for(lambda: not Path(f"/proc/{agent}").exists() or "zombie" in _state(agent), 60,
             desc="agent exited after ExaBGP went away")
    pop.start_agent()
    wait_announced(pop)


def _state(pid: int | None) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return ""
