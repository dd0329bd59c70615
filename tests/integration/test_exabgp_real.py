"""The ExaBGP boundary against REAL ExaBGP 5 and REAL FRR bgpd, in network namespaces.

Topology (two lab nodes, one veth pair, dual stack, one BGP session per family), built
with the lab's parts only (lab.netns, lab.frr, lab.exabgp, lab.poll):

    t-bgp-XXXX-r  FRR zebra+bgpd  AS 65000   100.64.1.1  fd00:64:1::1
         | veth
    t-bgp-XXXX-a  ExaBGP          AS 65101   100.64.1.2  fd00:64:1::2
                  └─ API process: a helper that drives ExaBGPSpeaker.connect_stdio()

The test writes commands built by `announce_line`/`withdraw_line` into a FIFO; the
helper sends each through the speaker and logs the ack result, every raw line it read
on stdin and every parsed event. Assertions read FRR's `show ... json`.

Set ANYCAST_UPDATE_GOLDEN=1 to refresh tests/unit/golden/ from the captured lines.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.agent.liveness import PROBE
from controller.bgp.exabgp_api import (
    NeighborState,
    RouteAttributes,
    RouteChange,
    Shutdown,
    announce_line,
    batches,
    parse_line,
    withdraw_line,
)
from controller.bgp.exabgp_config import NeighborSpec, exabgp_environment, render_exabgp_config
from lab.exabgp import ExaBGPProcess
from lab.frr import FrrRouter
from lab.netns import Lab, add_addr, veth
from lab.poll import wait_for, wait_for_equal

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "unit" / "golden"

LOCAL_AS, PEER_AS = 65101, 65000
FRR_V4, EXA_V4 = "100.64.1.1", "100.64.1.2"
FRR_V6, EXA_V6 = "fd00:64:1::1", "fd00:64:1::2"
# '#' starts a comment in ExaBGP's config unless quoted; FRR 8.4 takes no spaces here.
MD5_PASSWORD = "s3cret!p#ss"

HELPER = '''\
"""API process for the ExaBGP integration test: FIFO -> ExaBGPSpeaker -> ExaBGP."""
import asyncio, dataclasses, json, os, sys

from controller.bgp.speaker import ExaBGPSpeaker, SpeakerClosed


async def main(fifo: str, out: str) -> None:
    raw = open(os.path.join(out, "stdin.log"), "a", buffering=1)
    events = open(os.path.join(out, "events.log"), "a", buffering=1)
    results = open(os.path.join(out, "results.log"), "a", buffering=1)

    def on_event(event):
        events.write(json.dumps({"event": type(event).__name__, **dataclasses.asdict(event)}) + "\\n")

    speaker = await ExaBGPSpeaker.connect_stdio(
        on_event=on_event, on_line=lambda line: raw.write(line + "\\n"), ack_timeout=5.0
    )
    print("stdout now goes to stderr, not to ExaBGP")  # must not reach ExaBGP as a command
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    # O_RDWR: the FIFO never reports EOF between two writers.
    fifo_file = os.fdopen(os.open(fifo, os.O_RDWR | os.O_NONBLOCK), "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), fifo_file)

    async def pump() -> None:
        while line := await commands.readline():
            text = line.decode().rstrip("\\n")
            try:
                ok = await speaker.send(text)
            except SpeakerClosed as exc:
                results.write(json.dumps({"line": text, "closed": str(exc)}) + "\\n")
                return
            results.write(json.dumps({"line": text, "ok": ok}) + "\\n")

    tasks = {asyncio.create_task(speaker.run_reader()), asyncio.create_task(pump())}
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    events.write(json.dumps({"event": "EOF"}) + "\\n")


asyncio.run(main(sys.argv[1], sys.argv[2]))
'''


BGPD = f"""hostname r1
router bgp {PEER_AS}
 bgp router-id {FRR_V4}
 no bgp ebgp-requires-policy
 no bgp default ipv4-unicast
 neighbor {EXA_V4} remote-as {LOCAL_AS}
 neighbor {EXA_V4} timers 1 3
 neighbor {EXA_V4} password {MD5_PASSWORD}
 neighbor {EXA_V4} timers connect 1
 neighbor {EXA_V6} remote-as {LOCAL_AS}
 neighbor {EXA_V6} timers 1 3
 neighbor {EXA_V6} timers connect 1
 address-family ipv4 unicast
  neighbor {EXA_V4} activate
 exit-address-family
 address-family ipv6 unicast
  neighbor {EXA_V6} activate
 exit-address-family
"""
# A bound on waiting, never on speed: a loaded machine is slower, not wrong.
TIMEOUT = 30.0


class BgpLab:
    """FRR in node `r`, ExaBGP in node `a`, built from the lab's parts (lab.netns, lab.frr,
    lab.exabgp); the Lab's teardown stops everything by PID and removes the nodes."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.router_ns = lab.netns("r")
        self.agent_ns = lab.netns("a")
        self.dir = lab.workdir("a")  # reachable by user frr, visible at the same path in the nodes
        self.out = self.dir / "out"
        self.fifo = self.dir / "commands.fifo"
        self.frr: FrrRouter | None = None
        self.exa: ExaBGPProcess | None = None

    # ---- set-up

    def start(self) -> None:
        veth(self.router_ns, "eth0", self.agent_ns, "eth0")
        for ns, v4, v6 in ((self.router_ns, FRR_V4, FRR_V6), (self.agent_ns, EXA_V4, EXA_V6)):
            add_addr(ns, "eth0", f"{v4}/30")
            add_addr(ns, "eth0", f"{v6}/64")
        self.frr = FrrRouter(self.router_ns, self.lab.workdir("r"), {"zebra": "hostname r1\n", "bgpd": BGPD}).start()
        self.out.mkdir()
        os.mkfifo(self.fifo)
        (self.dir / "helper.py").write_text(HELPER)
        neighbors = [
            # With a TCP MD5 password: the session only comes up if the quoted
            # md5-password reached the kernel intact.
            NeighborSpec(FRR_V4, EXA_V4, EXA_V4, LOCAL_AS, PEER_AS, hold_time=3, md5_password=MD5_PASSWORD),
            NeighborSpec(FRR_V6, EXA_V6, EXA_V4, LOCAL_AS, PEER_AS, hold_time=3),
        ]
        argv = [sys.executable, str(self.dir / "helper.py"), str(self.fifo), str(self.out)]
        # Unbuffered, so the helper's stray print() reaches exabgp.out while it runs.
        env = {**exabgp_environment(str(self.dir / "exabgp.log")), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.exa = ExaBGPProcess(self.agent_ns, self.dir, render_exabgp_config(neighbors, "agent", argv), env=env)
        self.start_exabgp()

    def start_exabgp(self) -> None:
        assert self.exa is not None
        self.exa.start()

    def stop_exabgp(self) -> int | None:
        """SIGTERM ExaBGP and wait for its clean exit (it gives its helper 2 s)."""
        assert self.exa is not None
        return self.exa.stop(signal.SIGTERM, grace=30)

    # ---- driving and observing

    def command(self, line: str) -> None:
        """Hand one command to the helper (which sends it through ExaBGPSpeaker)."""
        with open(self.fifo, "w") as fifo:
            fifo.write(line + "\n")

    def results(self) -> list[dict[str, Any]]:
        return _jsonl(self.out / "results.log")

    def events(self) -> list[dict[str, Any]]:
        return _jsonl(self.out / "events.log")

    def stdin_lines(self) -> list[str]:
        path = self.out / "stdin.log"
        return path.read_text().splitlines() if path.exists() else []

    def result_for(self, line: str, seen: int) -> dict[str, Any]:
        """The helper's result for `line`, the first after the `seen` earlier results."""

        def find() -> dict[str, Any] | None:
            for result in self.results()[seen:]:
                if result["line"] == line:
                    return result
            return None

        return wait_for(find, TIMEOUT, desc=f"the helper's result for {line!r}")

    def route(self, prefix: str) -> dict[str, Any] | None:
        """FRR's best path for `prefix`, or None."""
        assert self.frr is not None
        afi = "ipv4" if ipaddress.ip_network(prefix).version == 4 else "ipv6"
        shown = self.frr.vtysh_json(f"show bgp {afi} unicast {prefix} json")
        for path in shown.get("paths", []):
            if path.get("bestpath", {}).get("overall"):
                return dict(path)
        return None

    def wait_route(self, prefix: str) -> dict[str, Any]:
        return wait_for(lambda: self.route(prefix), TIMEOUT, desc=f"{prefix} in FRR's BGP table")

    def wait_no_route(self, prefix: str) -> None:
        wait_for_equal(lambda: self.route(prefix), None, TIMEOUT, desc=f"{prefix} gone from FRR's BGP table")

    def wait_sessions_up(self, since: int = 0) -> None:
        """Wait until both sessions are reported up after the first `since` stdin lines."""

        def both_up() -> bool:
            up = {
                e.peer
                for e in map(parse_line, self.stdin_lines()[since:])
                if isinstance(e, NeighborState) and e.state == "up"
            }
            return {FRR_V4, FRR_V6} <= up

        wait_for(both_up, 2 * TIMEOUT, desc="ExaBGP to report both sessions up to the helper")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # The last line may be half-written while we read.
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


@pytest.fixture(scope="module")
def lab(lab_preflight: None) -> Iterator[BgpLab]:
    """One lab for the module (about 2 s to bring up); torn down even if a test fails.

    Shadows the harness's per-test `lab` fixture from conftest.py: the module shares one.
    """
    the_lab = Lab("t-bgp-")
    try:
        bgp = BgpLab(the_lab)
        bgp.start()
        bgp.wait_sessions_up()
        yield bgp
    finally:
        the_lab.teardown()


def test_sessions_come_up_and_the_up_message_parses(lab: BgpLab) -> None:
    states = [e for e in map(parse_line, lab.stdin_lines()) if isinstance(e, NeighborState)]
    assert NeighborState(peer=FRR_V4, local=EXA_V4, state="up") in states
    assert NeighborState(peer=FRR_V6, local=EXA_V6, state="up") in states
    # The speaker dispatched the same messages to on_event.
    assert {"event": "NeighborState", "peer": FRR_V4, "local": EXA_V4, "state": "up", "reason": ""} in lab.events()
    # connect_stdio moved stdout away from ExaBGP: the helper's print() never became a
    # command (it would have been answered "error" and logged by ExaBGP).
    assert "stdout now goes to stderr" in (lab.dir / "exabgp.out").read_text()
    assert "stdout now goes to stderr" not in (lab.dir / "exabgp.log").read_text()


def test_ipv4_vip_with_med_prepend_and_communities_reaches_frr_then_withdraws(lab: BgpLab) -> None:
    prefix = ipaddress.ip_network("198.51.100.10/32")
    attrs = RouteAttributes(
        med=100,
        as_path_prepend=1,
        local_as=LOCAL_AS,
        communities=("65000:200", "65000:100"),
        large_communities=("65000:1:2",),
    )
    seen = len(lab.results())
    started = time.monotonic()
    lab.command(announce_line(prefix, attrs))
    assert lab.result_for(announce_line(prefix, attrs), seen)["ok"] is True

    path = lab.wait_route(str(prefix))
    announce_ms = (time.monotonic() - started) * 1000
    assert path["aspath"]["string"] == f"{LOCAL_AS} {LOCAL_AS}"
    assert path["metric"] == 100
    assert path["community"]["list"] == ["65000:100", "65000:200"]
    assert path["largeCommunity"]["list"] == ["65000:1:2"]
    assert [nh["ip"] for nh in path["nexthops"]] == [EXA_V4]

    seen = len(lab.results())
    started = time.monotonic()
    lab.command(withdraw_line(prefix))
    assert lab.result_for(withdraw_line(prefix), seen)["ok"] is True
    lab.wait_no_route(str(prefix))
    withdraw_ms = (time.monotonic() - started) * 1000
    print(f"\nFIFO->speaker->ExaBGP->FRR RIB: announce {announce_ms:.0f} ms, withdraw {withdraw_ms:.0f} ms")


def test_ipv6_vip_over_the_ipv6_session(lab: BgpLab) -> None:
    prefix = ipaddress.ip_network("2001:db8::10/128")
    attrs = RouteAttributes(med=50, as_path_prepend=3, local_as=LOCAL_AS, communities=("65000:300",))
    seen = len(lab.results())
    lab.command(announce_line(prefix, attrs))
    assert lab.result_for(announce_line(prefix, attrs), seen)["ok"] is True

    path = lab.wait_route(str(prefix))
    assert path["aspath"]["string"] == " ".join([str(LOCAL_AS)] * 4)
    assert path["metric"] == 50
    assert path["community"]["list"] == ["65000:300"]
    assert EXA_V6 in [nh["ip"] for nh in path["nexthops"]]

    def reflected() -> dict[str, Any] | None:
        """FRR's re-advertisement of the IPv6 VIP, as the helper's parsed Update."""
        for event in lab.events():
            if event["event"] == "Update" and event["peer"] == FRR_V6 and str(prefix) in event["announced"]:
                return event
        return None

    # ExaBGP lists the prefix under both of FRR's next hops (global and link-local);
    # the parsed Update names it once.
    assert wait_for(reflected, TIMEOUT, desc="the reflected Update")["announced"] == [str(prefix)]

    seen = len(lab.results())
    lab.command(withdraw_line(prefix))
    assert lab.result_for(withdraw_line(prefix), seen)["ok"] is True
    lab.wait_no_route(str(prefix))


def test_rejected_command_acks_false_and_later_acks_stay_matched(lab: BgpLab) -> None:
    # MED beyond 32 bits passes ExaBGP's parser but fails encoding: it answers "error".
    bad = "announce route 203.0.113.52/32 next-hop self med 4294967296"
    good = announce_line(ipaddress.ip_network("203.0.113.53/32"), RouteAttributes(med=7))
    seen = len(lab.results())
    lab.command(bad)
    lab.command(good)
    assert lab.result_for(bad, seen)["ok"] is False
    assert lab.result_for(good, seen)["ok"] is True
    assert lab.wait_route("203.0.113.53/32")["metric"] == 7
    assert lab.route("203.0.113.52/32") is None


def test_the_watchdog_probe_is_answered_done_and_acks_stay_matched(lab: BgpLab) -> None:
    """The agent's liveness probe (agent.liveness.PROBE) is a real round trip: ExaBGP answers
    ``done``, with exactly one ack, so the route sent after it still gets its own."""
    after = announce_line(ipaddress.ip_network("203.0.113.54/32"), RouteAttributes(med=9))
    seen = len(lab.results())
    for _ in range(3):
        lab.command(PROBE)
    lab.command(after)
    assert lab.result_for(after, seen)["ok"] is True
    probes = [r for r in lab.results()[seen:] if r["line"] == PROBE]
    assert probes == [{"line": PROBE, "ok": True}] * 3
    assert lab.wait_route("203.0.113.54/32")["metric"] == 9
    lab.command(withdraw_line(ipaddress.ip_network("203.0.113.54/32")))
    lab.wait_no_route("203.0.113.54/32")


def test_routes_reflected_by_frr_arrive_as_parsed_updates(lab: BgpLab) -> None:
    prefix = ipaddress.ip_network("198.51.100.20/32")
    lab.command(announce_line(prefix, RouteAttributes()))

    def reflected() -> dict[str, Any] | None:
        """FRR's re-advertisement of our route, as the helper's parsed Update."""
        for event in lab.events():
            if event["event"] == "Update" and str(prefix) in event["announced"]:
                return event
        return None

    # eBGP: FRR advertises the route back to us with its AS prepended.
    update = wait_for(reflected, TIMEOUT, desc="the reflected Update")
    assert update["peer"] == FRR_V4
    assert f'"value": [{PEER_AS}, {LOCAL_AS}]' in update["raw"]


def test_exabgp_shutdown_notifies_the_helper_and_frr_drops_the_routes(lab: BgpLab) -> None:
    prefix = ipaddress.ip_network("198.51.100.30/32")
    seen = len(lab.results())
    lab.command(announce_line(prefix, RouteAttributes()))
    assert lab.result_for(announce_line(prefix, RouteAttributes()), seen)["ok"] is True
    lab.wait_route(str(prefix))
    try:
        assert lab.stop_exabgp() not in (None, -signal.SIGKILL), "ExaBGP did not exit on SIGTERM by itself"

        def notified() -> bool:
            return any(e["event"] == "Shutdown" for e in lab.events())

        wait_for(notified, TIMEOUT, desc="the helper to see ExaBGP's shutdown notification")
        shutdown_lines = [line for line in lab.stdin_lines() if isinstance(parse_line(line), Shutdown)]
        assert len(shutdown_lines) == 1
        lab.wait_no_route(str(prefix))
        _maybe_update_golden(lab)
    finally:
        # Leave the module's lab as we found it for any test that runs after this one.
        since = len(lab.stdin_lines())
        lab.start_exabgp()
        lab.wait_sessions_up(since)


def _maybe_update_golden(lab: BgpLab) -> None:
    if os.environ.get("ANYCAST_UPDATE_GOLDEN") != "1":
        return
    GOLDEN.mkdir(parents=True, exist_ok=True)
    (GOLDEN / "exabgp_stdin_capture.txt").write_text("\n".join(lab.stdin_lines()) + "\n")


def test_every_well_known_community_and_extended_ones_a_config_accepts_reach_frr(lab: Lab) -> None:
    """Through the agent's own path: the config reader, daemon.exabgp_attributes, announce_line."""
    import yaml

    from controller.agent.daemon import exabgp_attributes
    from controller.bgp_values import WELL_KNOWN_COMMUNITIES
    from controller.config.agent import parse_agent_config

    d = yaml.safe_load((REPO / "configs" / "agent-sjc.yaml").read_text())
    d["bgp"]["attributes"]["up"]["communities"] = [*WELL_KNOWN_COMMUNITIES, "65101:100"]
    d["bgp"]["attributes"]["up"]["large_communities"] = ["65101:4294967295:0"]
    d["bgp"]["attributes"]["up"]["extended_communities"] = ["target:65101:4294967295", "origin:192.0.2.1:7"]
    config = parse_agent_config(yaml.safe_dump(d), "well-known.yaml")
    vip = config.vips[0]
    line = announce_line(vip.prefix, exabgp_attributes(vip.attributes.up, LOCAL_AS))
    seen = len(lab.results())
    lab.command(line)
    assert lab.result_for(line, seen)["ok"] is True
    path = lab.wait_route(str(vip.prefix))
    # FRR names the well-known ones; compare as numbers.
    frr_names = {"gracefulShutdown": 0, "acceptown": 1, "llgrStale": 6, "noLlgr": 7, "blackhole": 666,
                 "noExport": 0xFF01, "noAdvertise": 0xFF02, "localAs": 0xFF03, "noPeer": 0xFF04}
    got = {(65535, frr_names[c]) if c in frr_names else tuple(int(x) for x in c.split(":"))
           for c in path["community"]["list"]}
    assert got == {*WELL_KNOWN_COMMUNITIES.values(), (65101, 100)}
    assert path["largeCommunity"]["list"] == ["65101:4294967295:0"]
    # FRR's names: RT (route target), SoO (site of origin, the route origin community).
    assert sorted(path["extendedCommunity"]["string"].split()) == ["RT:65101:4294967295", "SoO:192.0.2.1:7"]
    seen = len(lab.results())
    lab.command(withdraw_line(vip.prefix))
    assert lab.result_for(withdraw_line(vip.prefix), seen)["ok"] is True
    lab.wait_no_route(str(vip.prefix))


def test_dual_stack_commands_with_a_neighbour_selector_reach_only_their_session(lab: Lab) -> None:
    """What a dual-stack agent sends: each command names its family's session."""
    v4 = ipaddress.ip_network("198.51.100.20/32")
    v6 = ipaddress.ip_network("2001:db8::20/128")
    attrs = RouteAttributes(med=7)
    lines = [announce_line(v4, attrs, [FRR_V4]), announce_line(v6, attrs, [FRR_V6])]
    for line in lines:
        seen = len(lab.results())
        lab.command(line)
        assert lab.result_for(line, seen)["ok"] is True, line
    assert lab.wait_route(str(v4))["metric"] == 7
    assert lab.wait_route(str(v6))["metric"] == 7
    for prefix, peer in ((v4, FRR_V4), (v6, FRR_V6)):
        line = withdraw_line(prefix, [peer])
        seen = len(lab.results())
        lab.command(line)
        assert lab.result_for(line, seen)["ok"] is True, line
        lab.wait_no_route(str(prefix))


def test_a_batch_of_each_family_reaches_frr_with_its_attributes_and_withdraws(lab: Lab) -> None:
    """What the agent sends since batching (`exabgp_api.batches`): ``announce attributes
    ... nlri`` and ``withdraw attributes ... nlri``, one command per family and attribute set."""
    v4 = [ipaddress.ip_network(f"198.51.100.{i}/32") for i in (30, 31, 32)]
    v6 = [ipaddress.ip_network(f"2001:db8::{i}/128") for i in (30, 31)]
    attrs = RouteAttributes(med=42, communities=("65000:7",), large_communities=("65000:1:2",))
    changes = [RouteChange(p, attrs, (FRR_V4,)) for p in v4] + [RouteChange(p, attrs, (FRR_V6,)) for p in v6]
    announce = batches(changes)
    assert [len(b.members) for b in announce] == [3, 2]
    for batch in announce:
        seen = len(lab.results())
        lab.command(batch.line)
        assert lab.result_for(batch.line, seen)["ok"] is True, batch.line
    for prefix in (*v4, *v6):
        path = lab.wait_route(str(prefix))
        assert path["metric"] == 42
        assert path["community"]["list"] == ["65000:7"]
        assert path["largeCommunity"]["list"] == ["65000:1:2"]
    for batch in batches([dataclasses.replace(c, attrs=None) for c in changes]):
        assert batch.line.startswith(("neighbor 100.64.1.1 withdraw attributes", "neighbor fd00:64:1::1 withdraw attributes"))
        seen = len(lab.results())
        lab.command(batch.line)
        assert lab.result_for(batch.line, seen)["ok"] is True, batch.line
    for prefix in (*v4, *v6):
        lab.wait_no_route(str(prefix))
