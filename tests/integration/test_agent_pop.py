"""The POP agent end to end, with real parts only: FRR bgpd+zebra as the POP router, ExaBGP
running the agent (started the way systemd starts it: ``anycast-agent launch``), real HTTP
backends in two origin namespaces, and the kernel's FIB in each namespace.

One lab for the module (bring-up costs ~1 s); each test first puts the lab back into the
state it needs. The agent runs configs/agent-sjc.yaml (copied, so tests can edit it).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.checks import json_cmp
from lab.metrics import Scrape, parse
from lab.poll import wait_for
from lab.single_pop import AGENT_CONFIG, VIP, SinglePop, serving

PREFIX = f"{VIP}/32"
GAME = "game-global"
# What the agent records for the VIP announced with configs/agent-sjc.yaml's "up" attributes.
UP_RECORD = {"med": 100, "as_path_prepend": 0, "communities": ["65101:100"]}
pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def pop(lab_preflight: None) -> Iterator[SinglePop]:
    with serving("t-agent-") as topo:
        yield topo


# --- observations ----------------------------------------------------------------------------
def in_bgp(pop: SinglePop) -> bool:
    return pop.router.bgp_route(PREFIX) is not None


def in_fib(pop: SinglePop) -> bool:
    return bool(pop.router.fib_has(PREFIX))


def scrape(pop: SinglePop) -> Scrape:
    """The agent's metrics, parsed (empty while no agent answers)."""
    return parse(pop.metrics())


def metric(pop: SinglePop, name: str, **labels: str) -> float | None:
    return scrape(pop).value(name, **labels)


def changes(pop: SinglePop, action: str, reason: str | None = None, vip: str = GAME) -> float:
    """anycast_announcement_changes_total of the running agent process (counters start at
    0 in each process: a respawned agent counts only what it sent itself)."""
    labels = {"vip": vip, "action": action} | ({"reason": reason} if reason else {})
    return scrape(pop).total("anycast_announcement_changes_total", **labels)


def transitions(pop: SinglePop, to: str, origin: str = "us-west") -> float:
    return scrape(pop).total("anycast_health_transitions_total", vip=GAME, origin=origin, to=to)


def recorded(pop: SinglePop) -> dict[str, Any] | None:
    """STATE_DIR/announced.json's prefixes: what the agent told ExaBGP to hold, as it
    recorded it for its successor (None before the first write)."""
    path = pop.workdir("pop") / "state" / "announced.json"
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-rename
        return None
    announced: dict[str, Any] = data["announced"]
    return announced


def kernel_routes(pop: SinglePop) -> list[dict[str, Any]]:
    """The POP host's routes installed by the agent (``proto 99``), as iproute2's JSON."""
    out = pop.nodes["pop"].run(["ip", "-j", "-4", "route", "show", "proto", "99"]).stdout
    routes: list[dict[str, Any]] = json.loads(out or "[]")
    return routes


def wait_announced(pop: SinglePop, timeout: float = 60.0) -> None:
    wait_for(lambda: in_bgp(pop) and in_fib(pop), timeout, desc=f"{PREFIX} in FRR's BGP table and FIB")


def wait_withdrawn(pop: SinglePop, timeout: float = 60.0) -> None:
    wait_for(lambda: not in_bgp(pop) and not in_fib(pop), timeout,
             desc=f"{PREFIX} gone from FRR's BGP table and FIB")


def records_the_vip(pop: SinglePop) -> bool:
    """announced.json lists exactly the VIP, with its "up" attributes."""
    r = recorded(pop)
    return r is not None and set(r) == {PREFIX} and json_cmp(r[PREFIX], UP_RECORD) == []


def served_by(body: str | None) -> dict[str, str]:
    """lab.backend's answer, ``served-by origin=NAME backend=ADDR peer=ADDR``, as a dict."""
    return dict(kv.split("=", 1) for kv in (body or "").split() if "=" in kv)


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
    assert json_cmp(kernel_routes(pop), [{"dst": VIP, "gateway": "100.64.10.1"}]) == []
    # A client request from the router's side reaches the VIP and is served by us-west.
    served = wait_for(pop.request_vip, 60, desc="HTTP through the VIP")
    assert served_by(served)["origin"] == "us-west", served
    assert metric(pop, "anycast_vip_announced", vip=GAME) == 1
    assert metric(pop, "anycast_vip_state", vip=GAME, state="up") == 1
    # (A session can flap once at start-up when both sides connect at the same moment.)
    wait_for(lambda: metric(pop, "anycast_bgp_neighbor_up", neighbor="100.64.1.1") == 1, 60,
             desc="anycast_bgp_neighbor_up is 1")
    assert metric(pop, "anycast_backend_healthy", vip=GAME, origin="eu-central",
                  backend="100.64.20.1:8080") == 1  # standby origins are checked too
    # What the agent records for a successor is what FRR received.
    assert records_the_vip(pop), recorded(pop)


def test_backend_down_withdraws_then_returns_after_rise(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    withdrawn = changes(pop, "withdraw", "backend_down")
    pop.stop_backends("usw")
    wait_withdrawn(pop)
    wait_for(lambda: not any(r.get("dst") == VIP for r in kernel_routes(pop)), 60, desc="kernel route removed")
    assert pop.request_vip(timeout=0.5) is None  # FRR no longer routes the VIP anywhere
    after = scrape(pop)
    assert after.value("anycast_vip_reason", vip=GAME, reason="backend_down", origin="us-west") == 1
    assert after.value("anycast_vip_state", vip=GAME, state="withdrawn") == 1
    assert after.total("anycast_announcement_changes_total", vip=GAME, action="withdraw",
                       reason="backend_down") == withdrawn + 1
    assert recorded(pop) == {}  # and it told its successor: nothing to take over

    rising, up = transitions(pop, "rising"), transitions(pop, "up")
    announced = changes(pop, "announce", "healthy")
    pop.start_backends("usw")
    # rise=2: a backend goes down -> rising (1st success) -> up (2nd), and only then the
    # announce (one healthy backend of the two is enough: min_healthy 1). Every scrape is
    # one consistent snapshot of the agent: none may show the VIP announced while no
    # us-west backend is up yet.
    early: list[dict[str, str]] = []

    def back() -> bool:
        s = scrape(pop)
        is_up = s.value("anycast_vip_announced", vip=GAME) == 1
        phases = {smp.labels["backend"]: smp.labels["phase"] for smp in s.find(
            "anycast_backend_phase", vip=GAME, origin="us-west") if smp.value == 1}
        if is_up and "up" not in phases.values():
            early.append(phases)
        return is_up and in_bgp(pop) and in_fib(pop)

    wait_for(back, 60, interval=0.02, desc=f"{PREFIX} announced again, in FRR's BGP table and FIB")
    assert early == [], f"announced while no us-west backend was up: {early}"
    s = scrape(pop)
    assert s.total("anycast_health_transitions_total", vip=GAME, origin="us-west", to="rising") > rising
    assert s.total("anycast_health_transitions_total", vip=GAME, origin="us-west", to="up") > up
    assert s.total("anycast_announcement_changes_total", vip=GAME, action="announce",
                   reason="healthy") == announced + 1
    assert s.value("anycast_vip_reason", vip=GAME, reason="healthy", origin="us-west") == 1


def test_killed_agent_is_respawned_and_keeps_the_route_without_a_flap(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    # The interface between the two processes: the state file lists what ExaBGP holds.
    wait_for(lambda: records_the_vip(pop), 60, desc=f"announced.json lists {PREFIX}")
    old = pop.signal_agent(signal.SIGKILL)
    absent = 0
    deadline = time.monotonic() + 60  # a hang guard: under load a respawn is slower, not wrong
    new = None
    while time.monotonic() < deadline:
        absent += 0 if in_bgp(pop) else 1
        new = pop.agent_pid()
        if new and new != old and metric(pop, "anycast_vip_state", vip=GAME, state="up") == 1:
            break
        time.sleep(0.02)
    assert new and new != old, "ExaBGP did not respawn the agent"
    assert absent == 0, f"route was missing from FRR in {absent} samples during the restart"
    for _ in range(25):  # and it stays, after the new agent's verdict
        assert in_bgp(pop)
        time.sleep(0.02)
    # Counted by the new process alone: it took the route over and never withdrew it (a
    # withdraw and re-announce between two of the samples above would show here).
    s = scrape(pop)
    assert s.value("anycast_vip_state", vip=GAME, state="up") == 1
    assert s.total("anycast_announcement_changes_total", vip=GAME, action="withdraw") == 0
    assert records_the_vip(pop), recorded(pop)


def test_respawned_agent_withdraws_what_should_go(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    restart_service(pop)
    wait_announced(pop)
    old = pop.signal_agent(signal.SIGKILL)
    pop.stop_backends("usw")  # fails while no agent runs: ExaBGP still announces the VIP
    wait_withdrawn(pop)
    # The respawned process withdrew it, for the right reason (its counters are its own).
    wait_for(lambda: pop.agent_pid() not in (None, old) and changes(pop, "withdraw", "backend_down") == 1, 60,
             desc="the respawned agent counts one withdrawal, reason backend_down")
    assert metric(pop, "anycast_vip_reason", vip=GAME, reason="backend_down", origin="us-west") == 1
    assert recorded(pop) == {}
    pop.start_backends("usw")
    wait_announced(pop)


def test_vip_removed_from_config_while_agent_was_down_is_withdrawn(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    restart_service(pop)
    wait_announced(pop)
    wait_for(lambda: records_the_vip(pop), 60, desc=f"announced.json lists {PREFIX}")
    try:
        write_config(pop, lambda d: d.__setitem__("vips", []))
        old = pop.signal_agent(signal.SIGKILL)
        wait_withdrawn(pop)
        # Only the state file knew the prefix: the new process withdrew it as not in its
        # config (a VIP it has no name for is labelled with its address).
        wait_for(lambda: pop.agent_pid() not in (None, old) and changes(pop, "withdraw", "not_in_config", vip=VIP) == 1,
                 60, desc="the respawned agent counts one withdrawal, reason not_in_config")
        assert changes(pop, "withdraw", vip=VIP) == 1
        assert recorded(pop) == {}
    finally:
        write_config(pop)
    pop.signal_agent(signal.SIGKILL)
    wait_announced(pop)


def test_bad_config_on_reload_keeps_last_good_config_and_announcements(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    before = scrape(pop)
    failures = before.total("anycast_config_reloads_total", result="failure")
    admin_down = before.total("anycast_announcement_changes_total", vip=GAME, action="withdraw", reason="admin_down")
    write_config(pop, lambda d: d["vips"][0]["check"].__setitem__("rise", 0))
    try:
        pop.signal_agent(signal.SIGHUP)
        # (Which field was wrong, "vips[0].check.rise: must be >= 1", is only in the log.)
        wait_for(lambda: metric(pop, "anycast_config_reloads_total", result="failure") == failures + 1, 60,
                 desc="the reload counted as a failure")
        assert metric(pop, "anycast_config_last_reload_successful") == 0
        checks = scrape(pop).total("anycast_checks_total", vip=GAME, result="ok")
        for _ in range(30):  # still announced, and checks still running on the old config
            assert in_bgp(pop) and in_fib(pop)
            time.sleep(0.05)
        wait_for(lambda: scrape(pop).total("anycast_checks_total", vip=GAME, result="ok") > checks, 60,
                 desc="checks still passing on the last good config")
        assert metric(pop, "anycast_vip_state", vip=GAME, state="up") == 1
        # A good config with admin: down is applied: withdrawn with that reason.
        write_config(pop, lambda d: d["vips"][0].__setitem__("admin", "down"))
        pop.signal_agent(signal.SIGHUP)
        wait_withdrawn(pop)
        s = scrape(pop)
        assert s.value("anycast_vip_reason", vip=GAME, reason="admin_down") == 1
        assert s.total("anycast_announcement_changes_total", vip=GAME, action="withdraw",
                       reason="admin_down") == admin_down + 1
        assert s.value("anycast_config_last_reload_successful") == 1
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
        assert metric(pop, "anycast_vip_state", vip=GAME, state="draining") == 1
    finally:
        write_config(pop)
        pop.signal_agent(signal.SIGHUP)
    wait_for(lambda: (pop.router.bgp_route(PREFIX) or {}).get("paths", [{}])[0].get("metric") == 100, 60,
             desc="back to MED 100")


def test_sigterm_withdraws_everything(pop: SinglePop) -> None:
    ensure_healthy_and_announced(pop)
    restart_service(pop)
    wait_announced(pop)
    wait_for(lambda: records_the_vip(pop), 60, desc=f"announced.json lists {PREFIX}")
    pop.signal_agent(signal.SIGTERM)
    # The stopping agent withdrew everything itself and recorded it for its successor
    # (the reason, shutdown, is counted by a process that is gone: the state file and
    # ExaBGP still running are what is left to see). The successor only re-announces
    # after rise, so the empty file is visible until then.
    wait_for(lambda: recorded(pop) == {}, 60, interval=0.01, desc="announced.json empty after SIGTERM")
    wait_withdrawn(pop)
    assert pop.agent_proc is not None and pop.agent_proc.poll() is None, "ExaBGP exited: not the agent's withdrawal"
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
