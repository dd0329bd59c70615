"""The ExaBGP boundary against REAL ExaBGP 5 and REAL FRR bgpd, in network namespaces.

Topology (two namespaces, one veth pair, dual stack, one BGP session per family):

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

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from controller.bgp.exabgp_api import (
    NeighborState,
    RouteAttributes,
    Shutdown,
    announce_line,
    parse_line,
    withdraw_line,
)
from controller.bgp.exabgp_config import NeighborSpec, exabgp_environment, render_exabgp_config

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "unit" / "golden"
FRR_BIN = Path("/usr/lib/frr")
EXABGP = Path(sys.executable).with_name("exabgp")

LOCAL_AS, PEER_AS = 65101, 65000
FRR_V4, EXA_V4 = "100.64.1.1", "100.64.1.2"
FRR_V6, EXA_V6 = "fd00:64:1::1", "fd00:64:1::2"
# '#' starts a comment in ExaBGP's config unless quoted; FRR 8.4 takes no spaces here.
MD5_PASSWORD = "s3cret!p#ss"

T = TypeVar("T")

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


def poll(fn: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Call `fn` until it returns something other than None; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {fn.__doc__ or fn}")
        time.sleep(interval)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class Lab:
    """FRR in one namespace, ExaBGP in another; everything started is torn down by PID."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns_router = f"t-bgp-{tag}-r"
        self.ns_agent = f"t-bgp-{tag}-a"
        # Not pytest's tmp_path: FRR drops to user frr, which cannot enter /tmp/pytest-of-root.
        self.dir = Path(tempfile.mkdtemp(prefix="t-bgp-"))
        self.dir.chmod(0o755)
        self.frr_dir = self.dir / "frr"
        self.out = self.dir / "out"
        self.fifo = self.dir / "commands.fifo"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.exabgp: subprocess.Popen[bytes] | None = None
        self.logs: list[IO[bytes]] = []

    # ---- set-up

    def start(self) -> None:
        for ns in (self.ns_router, self.ns_agent):
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        # Created inside the namespaces, so no interface ever appears in the host's.
        run("ip", "-n", self.ns_router, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.ns_agent)
        for ns, v4, v6 in ((self.ns_router, FRR_V4, FRR_V6), (self.ns_agent, EXA_V4, EXA_V6)):
            run("ip", "-n", ns, "addr", "add", f"{v4}/30", "dev", "eth0")
            run("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
        self._start_frr()
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
        (self.dir / "exabgp.conf").write_text(render_exabgp_config(neighbors, "agent", argv))
        self.start_exabgp()

    def _start_frr(self) -> None:
        d = self.frr_dir
        for sub in ("etc", "run", "log"):
            (d / sub).mkdir(parents=True)
        (d / "etc" / "zebra.conf").write_text("hostname r1\n")
        (d / "etc" / "bgpd.conf").write_text(
            f"""hostname r1
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
        )
        shutil.chown(d, "frr", "frr")
        for path in d.rglob("*"):
            shutil.chown(path, "frr", "frr")
        for daemon in ("zebra", "bgpd"):
            conf = d / "etc" / f"{daemon}.conf"
            log = open(d / "log" / f"{daemon}.out", "wb")
            self.logs.append(log)
            # Foreground (no -d) so the PID we hold is the daemon's: `ip netns exec` execs.
            self.procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", self.ns_router, str(FRR_BIN / daemon),
                     "-f", str(conf), "-i", str(d / "run" / f"{daemon}.pid"),
                     "-z", str(d / "run" / "zserv.api"), "--vty_socket", str(d / "run"), "-P", "0"],
                    stdout=log, stderr=subprocess.STDOUT,
                )
            )
            # bgpd needs zebra's socket; zebra needs a moment to create it.
            if daemon == "zebra":
                poll(lambda: True if (d / "run" / "zserv.api").exists() else None, timeout=5)
        poll(lambda: True if (d / "run" / "bgpd.vty").exists() else None, timeout=5)

    def start_exabgp(self) -> None:
        env = {
            **os.environ,
            **exabgp_environment(str(self.dir / "exabgp.log")),
            "PYTHONPATH": str(REPO),
        }
        log = open(self.dir / "exabgp.out", "ab")
        self.logs.append(log)
        self.exabgp = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_agent, str(EXABGP), "server", str(self.dir / "exabgp.conf")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(self.exabgp)

    # ---- tear-down

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        # Anything still inside our namespaces (the helper, if ExaBGP died hard) is ours.
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

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
            """the helper reports a result for the command"""
            for result in self.results()[seen:]:
                if result["line"] == line:
                    return result
            return None

        return poll(find)

    def vtysh(self, command: str) -> Any:
        out = run("vtysh", "--vty_socket", str(self.frr_dir / "run"), "-c", command)
        return json.loads(out)

    def route(self, prefix: str) -> dict[str, Any] | None:
        """FRR's best path for `prefix`, or None."""
        afi = "ipv4" if ipaddress.ip_network(prefix).version == 4 else "ipv6"
        shown = self.vtysh(f"show bgp {afi} unicast {prefix} json")
        for path in shown.get("paths", []):
            if path.get("bestpath", {}).get("overall"):
                return dict(path)
        return None

    def wait_sessions_up(self, since: int = 0) -> None:
        """Wait until both sessions are reported up after the first `since` stdin lines."""

        def both_up() -> bool | None:
            """ExaBGP reports both sessions up to the helper"""
            up = {
                e.peer
                for e in map(parse_line, self.stdin_lines()[since:])
                if isinstance(e, NeighborState) and e.state == "up"
            }
            return True if {FRR_V4, FRR_V6} <= up else None

        poll(both_up, timeout=20)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


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
def lab() -> Iterator[Lab]:
    """One lab for the module (about 2 s to bring up); torn down even if a test fails.

    Shadows the harness's `lab` fixture from conftest.py on purpose: this module is
    self-contained. Missing prerequisites fail the tests, like the harness does: CI
    must run them, not skip them.
    """
    problems = [] if os.geteuid() == 0 else ["must run as root (network namespaces, FRR)"]
    problems += [f"{p} is missing" for p in (FRR_BIN / "bgpd", FRR_BIN / "zebra", EXABGP) if not p.exists()]
    if problems:
        pytest.fail("ExaBGP integration tests cannot run here: " + "; ".join(problems), pytrace=False)
    lab = Lab()
    try:
        lab.start()
        lab.wait_sessions_up()
        yield lab
    finally:
        lab.stop()


def test_sessions_come_up_and_the_up_message_parses(lab: Lab) -> None:
    states = [e for e in map(parse_line, lab.stdin_lines()) if isinstance(e, NeighborState)]
    assert NeighborState(peer=FRR_V4, local=EXA_V4, state="up") in states
    assert NeighborState(peer=FRR_V6, local=EXA_V6, state="up") in states
    # The speaker dispatched the same messages to on_event.
    assert {"event": "NeighborState", "peer": FRR_V4, "local": EXA_V4, "state": "up", "reason": ""} in lab.events()
    # connect_stdio moved stdout away from ExaBGP: the helper's print() never became a
    # command (it would have been answered "error" and logged by ExaBGP).
    assert "stdout now goes to stderr" in (lab.dir / "exabgp.out").read_text()
    assert "stdout now goes to stderr" not in (lab.dir / "exabgp.log").read_text()


def test_ipv4_vip_with_med_prepend_and_communities_reaches_frr_then_withdraws(lab: Lab) -> None:
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

    path = poll(lambda: lab.route(str(prefix)))
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
    poll(lambda: True if lab.route(str(prefix)) is None else None)
    withdraw_ms = (time.monotonic() - started) * 1000
    print(f"\nFIFO->speaker->ExaBGP->FRR RIB: announce {announce_ms:.0f} ms, withdraw {withdraw_ms:.0f} ms")


def test_ipv6_vip_over_the_ipv6_session(lab: Lab) -> None:
    prefix = ipaddress.ip_network("2001:db8::10/128")
    attrs = RouteAttributes(med=50, as_path_prepend=3, local_as=LOCAL_AS, communities=("65000:300",))
    seen = len(lab.results())
    lab.command(announce_line(prefix, attrs))
    assert lab.result_for(announce_line(prefix, attrs), seen)["ok"] is True

    path = poll(lambda: lab.route(str(prefix)))
    assert path["aspath"]["string"] == " ".join([str(LOCAL_AS)] * 4)
    assert path["metric"] == 50
    assert path["community"]["list"] == ["65000:300"]
    assert EXA_V6 in [nh["ip"] for nh in path["nexthops"]]

    def reflected() -> dict[str, Any] | None:
        """FRR's re-advertisement of the IPv6 VIP reaches the helper as an Update"""
        for event in lab.events():
            if event["event"] == "Update" and event["peer"] == FRR_V6 and str(prefix) in event["announced"]:
                return event
        return None

    # ExaBGP lists the prefix under both of FRR's next hops (global and link-local);
    # the parsed Update names it once.
    assert poll(reflected)["announced"] == [str(prefix)]

    seen = len(lab.results())
    lab.command(withdraw_line(prefix))
    assert lab.result_for(withdraw_line(prefix), seen)["ok"] is True
    poll(lambda: True if lab.route(str(prefix)) is None else None)


def test_rejected_command_acks_false_and_later_acks_stay_matched(lab: Lab) -> None:
    # MED beyond 32 bits passes ExaBGP's parser but fails encoding: it answers "error".
    bad = "announce route 203.0.113.52/32 next-hop self med 4294967296"
    good = announce_line(ipaddress.ip_network("203.0.113.53/32"), RouteAttributes(med=7))
    seen = len(lab.results())
    lab.command(bad)
    lab.command(good)
    assert lab.result_for(bad, seen)["ok"] is False
    assert lab.result_for(good, seen)["ok"] is True
    assert poll(lambda: lab.route("203.0.113.53/32"))["metric"] == 7
    assert lab.route("203.0.113.52/32") is None


def test_routes_reflected_by_frr_arrive_as_parsed_updates(lab: Lab) -> None:
    prefix = ipaddress.ip_network("198.51.100.20/32")
    lab.command(announce_line(prefix, RouteAttributes()))

    def reflected() -> dict[str, Any] | None:
        """FRR's re-advertisement of our route reaches the helper as an Update"""
        for event in lab.events():
            if event["event"] == "Update" and str(prefix) in event["announced"]:
                return event
        return None

    # eBGP: FRR advertises the route back to us with its AS prepended.
    update = poll(reflected)
    assert update["peer"] == FRR_V4
    assert f'"value": [{PEER_AS}, {LOCAL_AS}]' in update["raw"]


def test_exabgp_shutdown_notifies_the_helper_and_frr_drops_the_routes(lab: Lab) -> None:
    prefix = ipaddress.ip_network("198.51.100.30/32")
    seen = len(lab.results())
    lab.command(announce_line(prefix, RouteAttributes()))
    assert lab.result_for(announce_line(prefix, RouteAttributes()), seen)["ok"] is True
    poll(lambda: lab.route(str(prefix)))
    assert lab.exabgp is not None
    try:
        lab.exabgp.send_signal(signal.SIGTERM)
        lab.exabgp.wait(timeout=10)

        def notified() -> bool | None:
            """the helper saw ExaBGP's shutdown notification"""
            return True if any(e["event"] == "Shutdown" for e in lab.events()) else None

        poll(notified, timeout=2)
        shutdown_lines = [line for line in lab.stdin_lines() if isinstance(parse_line(line), Shutdown)]
        assert len(shutdown_lines) == 1
        poll(lambda: True if lab.route(str(prefix)) is None else None)
        _maybe_update_golden(lab)
    finally:
        # Leave the module's lab as we found it for any test that runs after this one.
        since = len(lab.stdin_lines())
        lab.start_exabgp()
        lab.wait_sessions_up(since)


def _maybe_update_golden(lab: Lab) -> None:
    if os.environ.get("ANYCAST_UPDATE_GOLDEN") != "1":
        return
    GOLDEN.mkdir(parents=True, exist_ok=True)
    (GOLDEN / "exabgp_stdin_capture.txt").write_text("\n".join(lab.stdin_lines()) + "\n")


def test_every_well_known_community_a_config_accepts_reaches_frr(lab: Lab) -> None:
    """Through the agent's own path: the config reader, daemon.exabgp_attributes, announce_line."""
    import yaml

    from controller.agent.daemon import exabgp_attributes
    from controller.bgp_values import WELL_KNOWN_COMMUNITIES
    from controller.config.agent import parse_agent_config

    d = yaml.safe_load((REPO / "configs" / "agent-sjc.yaml").read_text())
    d["bgp"]["attributes"]["up"]["communities"] = [*WELL_KNOWN_COMMUNITIES, "65101:100"]
    d["bgp"]["attributes"]["up"]["large_communities"] = ["65101:4294967295:0"]
    config = parse_agent_config(yaml.safe_dump(d), "well-known.yaml")
    vip = config.vips[0]
    line = announce_line(vip.prefix, exabgp_attributes(vip.attributes.up, LOCAL_AS))
    seen = len(lab.results())
    lab.command(line)
    assert lab.result_for(line, seen)["ok"] is True
    path = poll(lambda: lab.route(str(vip.prefix)))
    # FRR names the well-known ones; compare as numbers.
    frr_names = {"gracefulShutdown": 0, "acceptown": 1, "llgrStale": 6, "noLlgr": 7, "blackhole": 666,
                 "noExport": 0xFF01, "noAdvertise": 0xFF02, "localAs": 0xFF03, "noPeer": 0xFF04}
    got = {(65535, frr_names[c]) if c in frr_names else tuple(int(x) for x in c.split(":"))
           for c in path["community"]["list"]}
    assert got == {*WELL_KNOWN_COMMUNITIES.values(), (65101, 100)}
    assert path["largeCommunity"]["list"] == ["65101:4294967295:0"]
    seen = len(lab.results())
    lab.command(withdraw_line(vip.prefix))
    assert lab.result_for(withdraw_line(vip.prefix), seen)["ok"] is True
    poll(lambda: True if lab.route(str(vip.prefix)) is None else None)


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
    assert poll(lambda: lab.route(str(v4)))["metric"] == 7
    assert poll(lambda: lab.route(str(v6)))["metric"] == 7
    for prefix, peer in ((v4, FRR_V4), (v6, FRR_V6)):
        line = withdraw_line(prefix, [peer])
        seen = len(lab.results())
        lab.command(line)
        assert lab.result_for(line, seen)["ok"] is True, line
        poll(lambda: True if lab.route(str(prefix)) is None else None)  # noqa: B023 - polled at once
