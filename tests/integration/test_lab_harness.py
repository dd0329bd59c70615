"""The lab harness, proven with real parts: namespaces, veth, FRR, ExaBGP, the kernel FIB.

Two nodes: `r1` runs FRR (zebra + bgpd), `e1` runs ExaBGP whose API helper announces
198.51.100.10/32 over an IPv4 session and 2001:db8:100::10/128 over an IPv6 one.
Timings go to stdout (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.exabgp import ExaBGPProcess
from lab.frr import FrrError, FrrRouter
from lab.netns import (
    LAB_ROOT,
    STATE_DIR,
    Lab,
    Netns,
    ProcRecord,
    add_addr,
    list_netns,
    node_local_pid,
    proc_cmdline,
    proc_starttime,
    veth,
)
from lab.poll import wait_for, wait_for_equal

VIP = "198.51.100.10/32"
VIP6 = "2001:db8:100::10/128"
HANG = 60.0  # the bound of every wait here: fails a hung harness, never a slow (loaded) one

BGPD_CONF = """\
router bgp 65000
 bgp router-id 100.64.1.1
 no bgp ebgp-requires-policy
 neighbor 100.64.1.2 remote-as 65101
 neighbor 100.64.1.2 timers 1 3
 neighbor 2001:db8:1::2 remote-as 65101
 neighbor 2001:db8:1::2 timers 1 3
 address-family ipv6 unicast
  neighbor 2001:db8:1::2 activate
 exit-address-family
"""

# The helper logs each start (PID, time) so the test can see a respawn and time it.
HELPER = """\
import os, sys, time
with open(sys.argv[1], "a") as log:
    log.write(f"{os.getpid()} {time.time()}\\n")
# Name the neighbor: an unqualified announce goes to every session, and ExaBGP
# rejects the whole command when `next-hop self` meets a session of the other family.
for line in ("neighbor 100.64.1.1 announce route 198.51.100.10/32 next-hop self",
             "neighbor 2001:db8:1::1 announce route 2001:db8:100::10/128 next-hop self"):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
for _line in sys.stdin:  # acks and JSON messages; EOF when ExaBGP goes away
    pass
"""


def exabgp_conf(helper: Path, starts: Path) -> str:
    return f"""\
process agent {{ run {sys.executable} {helper} {starts}; encoder json; }}
neighbor 100.64.1.1 {{
  router-id 100.64.1.2; local-address 100.64.1.2; local-as 65101; peer-as 65000; hold-time 3;
  api {{ processes [ agent ]; receive {{ parsed; update; }} neighbor-changes; }}
}}
neighbor 2001:db8:1::1 {{
  router-id 100.64.1.2; local-address 2001:db8:1::2; local-as 65101; peer-as 65000; hold-time 3;
  family {{ ipv6 unicast; }}
  api {{ processes [ agent ]; }}
}}
"""


def helper_starts(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    return [(int(p), float(t)) for p, t in (line.split() for line in path.read_text().splitlines())]


def without_last_update(entry: Any) -> Any:
    """A BGP route entry minus the per-path lastUpdate timestamps."""
    if isinstance(entry, dict) and "paths" in entry:
        return {**entry, "paths": [{k: v for k, v in p.items() if k != "lastUpdate"} for p in entry["paths"]]}
    return entry


def alive(rec: ProcRecord) -> bool:
    return proc_starttime(rec.pid) == rec.starttime


def procs_mentioning(text: str) -> list[int]:
    """Live PIDs whose command line mentions `text` (for asserting, never for killing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            argv = proc_cmdline(int(entry.name))
            if argv and proc_starttime(int(entry.name)) is not None and any(text in a for a in argv):
                found.append(int(entry.name))
    return found


@pytest.mark.lab
def test_frr_learns_exabgp_route_survives_helper_respawn_and_teardown_is_complete(lab: Lab) -> None:
    t0 = time.monotonic()
    r1, e1 = lab.netns("r1"), lab.netns("e1")
    veth(r1, "eth0", e1, "eth0")
    add_addr(r1, "eth0", "100.64.1.1/30")
    add_addr(e1, "eth0", "100.64.1.2/30")
    add_addr(r1, "eth0", "2001:db8:1::1/64")
    add_addr(e1, "eth0", "2001:db8:1::2/64")
    frr = FrrRouter(r1, lab.workdir("r1"), {"bgpd": BGPD_CONF}).start()
    t_frr_up = time.monotonic()

    work = lab.workdir("e1")
    helper, starts = work / "helper.py", work / "helper-starts.log"
    helper.write_text(HELPER)
    exa = ExaBGPProcess(e1, work, exabgp_conf(helper, starts)).start()
    first_helper = exa.wait_api_started(timeout=HANG)[0]

    route = wait_for(lambda: frr.bgp_route(VIP), HANG, desc=f"{VIP} in r1's BGP table")
    wall_route = time.time()
    wait_for(lambda: frr.fib_has(VIP), HANG, desc=f"{VIP} in r1's kernel FIB")
    wall_fib, t_fib = time.time(), time.monotonic()
    route6 = wait_for(lambda: frr.bgp_route(VIP6), HANG, desc=f"{VIP6} in r1's BGP table")
    wait_for(lambda: frr.fib_has(VIP6), HANG, desc=f"{VIP6} in r1's kernel FIB")
    wall_fib6 = time.time()
    helper_started_at = helper_starts(starts)[0][1]  # wall clock: it is another process's

    # FRR learned it from ExaBGP, and zebra put it in r1's kernel toward e1.
    assert frr.neighbor_state("100.64.1.2") == "Established"
    path = route["paths"][0]
    assert path["aspath"]["string"] == "65101"
    assert path["nexthops"][0]["ip"] == "100.64.1.2"
    [fib] = frr.fib_routes(VIP)
    assert (fib["gateway"], fib["dev"], fib["protocol"]) == ("100.64.1.2", "eth0", "bgp")
    assert frr.neighbor_state("2001:db8:1::2") == "Established"
    assert route6["paths"][0]["nexthops"][0]["ip"] == "2001:db8:1::2"
    [fib6] = frr.fib_routes(VIP6)
    assert (fib6["gateway"], fib6["dev"], fib6["protocol"]) == ("2001:db8:1::2", "eth0", "bgp")

    # The fast vty path and vtysh give the same answer. Polled, because the entry can
    # still change between the two reads (advertisedTo appears once the update group
    # has run); lastUpdate is dropped since FRR derives its epoch from an uptime and it
    # jitters by a second between calls.
    cmd = f"show bgp ipv4 unicast {VIP} json"
    timings: dict[str, list[float]] = {"fast": [], "vtysh": []}

    def timed(kind: str, read: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = read()
        timings[kind].append((time.perf_counter() - t) * 1000)
        return without_last_update(value)

    def agreed() -> Any:
        fast = timed("fast", lambda: frr.vtysh_json(cmd))
        slow = timed("vtysh", lambda: json.loads(frr.vtysh(cmd)))
        return fast if fast == slow else None

    fast = wait_for(agreed, HANG, desc="fast path and vtysh to agree")
    # Inside the node, stock vtysh finds the node's own bgpd (private /run/frr), and the
    # daemons' pid files there hold node-local PIDs.
    inside = json.loads(r1.run(["vtysh", "-c", cmd]).stdout)
    assert without_last_update(inside)["paths"][0]["nexthops"] == fast["paths"][0]["nexthops"]
    bgpd_pid = frr.pids["bgpd"]
    assert int(r1.run(["cat", "/run/frr/bgpd.pid"]).stdout) == node_local_pid(bgpd_pid) != bgpd_pid
    assert fast["paths"][0]["bestpath"]["overall"] is True
    fast_ms, slow_ms = min(timings["fast"]), min(timings["vtysh"])

    # Kill only the API helper: ExaBGP starts a new one and FRR keeps the route: its
    # table version does not move, so it was never withdrawn and re-learned.
    records_before = [r for ns in lab.namespaces for r in ns.records]
    versions_before = (frr.bgp_route(VIP) or {}).get("version"), (frr.bgp_route(VIP6) or {}).get("version")
    first_rec = ProcRecord(first_helper, proc_starttime(first_helper) or -1, ("python",))
    # The helpers log their PIDs as the node sees them (as a pid file would hold them).
    first_local = node_local_pid(first_helper)
    assert first_local is not None and first_local != first_helper
    os.kill(first_helper, signal.SIGKILL)
    second_helper = exa.wait_respawn(first_helper, HANG)
    assert second_helper != first_helper
    second_local = node_local_pid(second_helper)
    wait_for_equal(lambda: [pid for pid, _ in helper_starts(starts)], [first_local, second_local], HANG)
    wait_for(lambda: exa.log_text().count("route added to neighbor") >= 4, HANG, desc="the new helper's announces")
    assert exa.running()
    after = frr.bgp_route(VIP), frr.bgp_route(VIP6)
    assert after[0] is not None and after[1] is not None
    assert (after[0]["version"], after[1]["version"]) == versions_before
    assert frr.fib_has(VIP) and frr.fib_has(VIP6)
    assert frr.neighbor_state("100.64.1.2") == "Established"
    second_rec = ProcRecord(second_helper, proc_starttime(second_helper) or -1, ("python",))

    # Teardown removes every namespace, process and state file it made.
    names = [ns.name for ns in lab.namespaces]
    t_down = time.monotonic()
    lab.teardown()
    teardown_s = time.monotonic() - t_down
    assert not [n for n in list_netns() if n.startswith(lab.prefix)]
    assert not [r.pid for r in [*records_before, first_rec, second_rec] if alive(r)]
    assert not procs_mentioning(str(lab.root)), "a lab process escaped its namespace"
    assert not [n for n in names if (lab.state_dir / f"{n}.json").exists()]
    assert not lab.root.exists()

    print(
        f"\nlab timings: netns+veth+FRR up {t_frr_up - t0:.3f}s; "
        f"helper start -> r1 BGP table {wall_route - helper_started_at:.3f}s, "
        f"-> r1 FIB {wall_fib - helper_started_at:.3f}s (IPv6 /128: {wall_fib6 - helper_started_at:.3f}s); "
        f"whole bring-up to FIB {t_fib - t0:.3f}s; teardown {teardown_s:.3f}s; "
        f"query fast path {fast_ms:.2f} ms vs vtysh {slow_ms:.2f} ms"
    )


def ps_args(ns: Netns) -> list[str]:
    """The command lines `ps` shows inside a node."""
    return ns.run(["ps", "-e", "-o", "args="]).stdout.splitlines()


def namespace_ids(pid: int) -> dict[str, str]:
    """The namespaces of a live process, e.g. {"pid": "pid:[4026532481]", ...}."""
    return {kind: os.readlink(f"/proc/{pid}/ns/{kind}") for kind in ("net", "mnt", "pid", "uts")}


def procs_in_namespaces(ids: set[str]) -> list[int]:
    """Live PIDs on the host that are in any of the given namespaces."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            for kind in ("net", "mnt", "pid", "uts"):
                try:
                    if os.readlink(f"/proc/{entry.name}/ns/{kind}") in ids:
                        found.append(int(entry.name))
                        break
                except OSError:
                    continue
    return found


def mounts_mentioning(*texts: str) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if any(t in line for t in texts)]


@pytest.mark.lab
def test_a_node_is_a_container_and_teardown_leaves_no_namespace_process_or_mount(lab: Lab) -> None:
    a, b = lab.netns("a"), lab.netns("b")
    # Hostname = node name, in the node's own UTS namespace.
    assert a.run(["hostname"]).stdout.strip() == "a"
    assert b.run(["hostname"]).stdout.strip() == "b"
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() not in ("a", "b")

    # A process in a is visible in a's /proc (under its node-local PID) and not in b's.
    sleeper = a.popen(["sleep", "1000"])
    local = node_local_pid(sleeper.pid)
    assert local is not None and local != sleeper.pid
    # popen's PID is the process itself (once nsenter, in the same PID, has exec'd it).
    wait_for_equal(lambda: proc_cmdline(sleeper.pid), ("sleep", "1000"), HANG)
    assert a.run(["cat", f"/proc/{local}/cmdline"]).stdout.split("\0")[:2] == ["sleep", "1000"]
    assert "sleep 1000" in ps_args(a)
    assert "sleep 1000" not in ps_args(b)
    assert a.node_pids() == [sleeper.pid] and b.node_pids() == []
    assert namespace_ids(sleeper.pid) == namespace_ids(a.init_pid or -1)

    # /tmp (and /run) written in one node are not seen in another node or on the host.
    token = secrets.token_hex(4)
    a.run(["sh", "-c", f"echo {token} > /tmp/only-a-{token}; echo {token} > /run/only-a-{token}"])
    assert a.run(["cat", f"/tmp/only-a-{token}"]).stdout.strip() == token
    assert b.run(["test", "-e", f"/tmp/only-a-{token}"], check=False).returncode == 1
    assert b.run(["test", "-e", f"/run/only-a-{token}"], check=False).returncode == 1
    assert not Path(f"/tmp/only-a-{token}").exists() and not Path(f"/run/only-a-{token}").exists()
    assert a.host_path(f"/tmp/only-a-{token}").read_text().strip() == token  # the host's view of it
    # The node's name resolves without DNS (nothing in a lab can reach a resolver).
    assert a.run(["getent", "hosts", "a"]).stdout.split()[0] == "127.0.1.1"

    # An orphan (its parent killed) is reaped inside the node, not left as a zombie.
    parent = a.popen(["sh", "-c", "sleep 1000 & echo $! > /tmp/orphan; wait"])
    orphan = wait_for(lambda: a.run(["cat", "/tmp/orphan"], check=False).stdout.strip(), HANG, desc="orphan PID")
    a.terminate(parent.pid, sig=signal.SIGKILL)
    a.run(["kill", orphan])
    wait_for(lambda: a.run(["test", "-e", f"/proc/{orphan}"], check=False).returncode != 0, HANG,
             desc="the orphan reaped by the node's init")

    ids = {i for pid in (a.init_pid or -1, b.init_pid or -1) for i in namespace_ids(pid).values()}
    started = [*(r for ns in lab.namespaces for r in ns.node_records), *a.records]
    assert [r.pid for r in started if alive(r)] == [r.pid for r in started]
    names = [ns.name for ns in lab.namespaces]
    lab.teardown()
    assert not [n for n in list_netns() if n in names]
    assert not [r.pid for r in started if alive(r)]
    assert procs_in_namespaces(ids) == []
    assert mounts_mentioning(str(lab.root), *(f"/run/netns/{n}" for n in names)) == []
    assert not lab.root.exists()


@pytest.mark.lab
def test_a_process_started_in_a_node_and_never_waited_for_does_not_hold_its_teardown(lab: Lab) -> None:
    """The kernel frees a node's PID namespace only once every PID in it is released; a
    child of ours killed with the node stays a zombie until we wait() for it. Teardown reaps
    such strays, so the node's init exits (CI once saw "node process N (sh) did not exit")."""
    a = lab.netns("a")
    stray = a.spawn(["sleep", "1000"])  # not recorded: teardown knows nothing of it
    wait_for_equal(lambda: proc_cmdline(stray.pid), ("sleep", "1000"), 10)
    init = a.init_pid
    lab.teardown()  # raises LabTeardownError if the init did not exit
    assert init is not None and not Path(f"/proc/{init}").exists()
    assert not Path(f"/proc/{stray.pid}").exists() or proc_cmdline(stray.pid) != ("sleep", "1000")
    assert a.name not in list_netns()


def test_a_node_sees_this_checkout_and_its_python_wherever_they_live(lab: Lab) -> None:
    """A checkout (or venv) under /tmp or /run, as a CI job's clone may be, stays visible in
    every node although the node's /tmp and /run are its own: the daemons the lab starts run
    from it. Its own /tmp stays private all the same."""
    a = lab.netns("a")
    checkout = Path(__file__).resolve().parents[2]
    for path in (sys.executable, str(checkout / "lab" / "netns.py"), str(checkout / "controller" / "__init__.py")):
        assert a.run(["test", "-e", path], check=False).returncode == 0, f"{path} is not visible in node a"
    assert a.run([sys.executable, "-c", "import lab.netns, controller"], check=False, timeout=60,
                 env={"PYTHONPATH": str(checkout)}).returncode == 0
    token = secrets.token_hex(4)
    a.run(["sh", "-c", f"echo {token} > /tmp/mine-{token}"])
    assert not Path(f"/tmp/mine-{token}").exists()


def test_frr_refuses_to_start_on_a_config_typo(lab: Lab) -> None:
    r1 = lab.netns("r1")
    typo = BGPD_CONF + " neighbr 100.64.1.6 remote-as 65102\n"
    with pytest.raises(FrrError, match=r"bgpd: .*No such command on config line 11"):
        FrrRouter(r1, lab.workdir("r1"), {"bgpd": typo}).start()
    assert r1.records == () and r1.node_pids() == [], "a daemon was started on a broken config"


ABANDON = """\
import json, os, subprocess, sys
from lab.netns import Lab
lab = Lab(sys.argv[1], unique=False)
ns = lab.netns("crashed")
child = ns.popen(["sleep", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"netns": ns.name, "pid": child.pid}), flush=True)
os._exit(3)  # die like a crashed test run: no teardown
"""


@pytest.mark.lab
def test_cleanup_sweeps_a_crashed_run_and_spares_live_labs_and_reused_pids(lab_preflight: None) -> None:
    prefix = f"t-lab-cu{secrets.token_hex(2)}-"
    state_dir = STATE_DIR
    innocent = subprocess.Popen(["sleep", "1000"])  # in the host namespace, not ours
    bare_sleeper: subprocess.Popen[bytes] | None = None
    try:
        # 1. A run that crashed after starting a process in its namespace.
        out = subprocess.run(
            [sys.executable, "-c", ABANDON, prefix], capture_output=True, text=True, timeout=30,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        assert out.returncode == 3, out.stderr
        crashed = json.loads(out.stdout)
        assert crashed["netns"] in list_netns()

        # 2. A namespace under the prefix with no state file and a process inside.
        bare = Netns(prefix + "bare", state_dir=state_dir)
        subprocess.run(["ip", "netns", "add", bare.name], check=True)
        bare_sleeper = sleeper = subprocess.Popen(bare.exec_argv(["sleep", "1000"]))
        wait_for(bare.pids, HANG, desc="sleeper inside the bare namespace")

        # 3. A state file whose recorded PID now belongs to someone else (PID reuse).
        ghost = {
            "netns": prefix + "ghost",
            "owner": {"pid": 1, "starttime": -1},
            "procs": [{"pid": innocent.pid, "starttime": (proc_starttime(innocent.pid) or 0) + 1, "argv": ["sleep", "1000"]}],
            "notes": {},
        }
        (state_dir / f"{prefix}ghost.json").write_text(json.dumps(ghost))

        # 4. A lab whose owner (this test) is alive: another run's, to be left alone.
        with Lab(prefix, unique=False) as live:
            live_ns = live.netns("live")
            live_sleeper = live_ns.popen(["sleep", "1000"])

            swept = subprocess.run(
                [sys.executable, "-m", "lab.cleanup", "--prefix", prefix], capture_output=True, text=True,
                timeout=60, cwd=Path(__file__).resolve().parents[2],
            )  # fmt: skip
            assert swept.returncode == 0, swept.stdout + swept.stderr
            assert f"deleted namespace {crashed['netns']}" in swept.stdout
            assert f"deleted namespace {bare.name}" in swept.stdout
            assert f"skipped {live_ns.name}" in swept.stdout

            remaining = [n for n in list_netns() if n.startswith(prefix)]
            assert remaining == [live_ns.name]
            assert proc_starttime(crashed["pid"]) is None, "the crashed run's sleeper survived"
            assert sleeper.poll() is not None, "the sleeper in the bare namespace survived"
            assert innocent.poll() is None, "cleanup killed a process that merely reused a recorded PID"
            assert live_sleeper.poll() is None
            assert sorted(p.name for p in state_dir.glob(f"{prefix}*.json")) == [f"{live_ns.name}.json"]
        assert not [n for n in list_netns() if n.startswith(prefix)]
    finally:
        innocent.kill()
        innocent.wait()
        if bare_sleeper is not None:
            bare_sleeper.kill()
            bare_sleeper.wait()
        # Whatever the assertions said, leave nothing under this prefix behind.
        subprocess.run([sys.executable, "-m", "lab.cleanup", "--prefix", prefix, "--force"],
                       capture_output=True, cwd=Path(__file__).resolve().parents[2], timeout=60)  # fmt: skip
        for leftover in state_dir.glob(f"{prefix}*.json"):
            leftover.unlink()


KILLED_OWNER = """\
import json, subprocess, sys, time
from lab.netns import Lab
lab = Lab(sys.argv[1], unique=False, state_dir=__import__("pathlib").Path(sys.argv[2]))
nodes = [lab.netns("n1"), lab.netns("n2")]
pids = [nodes[0].popen(["sleep", "1000"]).pid, nodes[1].popen(["sh", "-c", "sleep 1001 & wait"]).pid]
print(json.dumps({"root": str(lab.root), "netns": [n.name for n in nodes], "inits": [n.init_pid for n in nodes],
                  "pids": pids}), flush=True)
time.sleep(1000)  # until the test kills us: a crash, no teardown
"""


@pytest.mark.lab
def test_cleanup_without_a_prefix_removes_every_node_of_a_run_whose_owner_was_killed(lab_preflight: None) -> None:
    prefix = f"t-lab-kill{secrets.token_hex(2)}-"
    state_dir = Path(f"/run/anycast-lab-test-{secrets.token_hex(3)}")  # only this run's records
    owner = subprocess.Popen([sys.executable, "-c", KILLED_OWNER, prefix, str(state_dir)], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert owner.stdout is not None
        made = json.loads(owner.stdout.readline())
        ids = {i for pid in made["inits"] for i in namespace_ids(pid).values()}
        procs = [ProcRecord(p, proc_starttime(p) or -1, ()) for p in made["pids"] + made["inits"]]
        assert sorted(p.name for p in (state_dir / "labs").iterdir()) == [f"{prefix}.json"]
        owner.kill()
        owner.wait()

        swept = subprocess.run([sys.executable, "-m", "lab.cleanup", "--state-dir", str(state_dir)],
                               capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
        assert swept.returncode == 0, swept.stdout + swept.stderr
        for name in made["netns"]:
            assert f"deleted namespace {name}" in swept.stdout
        assert not [n for n in list_netns() if n.startswith(prefix)]
        assert not [r.pid for r in procs if alive(r)]
        assert procs_in_namespaces(ids) == []
        assert mounts_mentioning(made["root"], f"/run/netns/{prefix}") == []
        assert list(state_dir.glob("*.json")) == [] and list((state_dir / "labs").iterdir()) == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        subprocess.run([sys.executable, "-m", "lab.cleanup", "--prefix", prefix, "--state-dir", str(state_dir),
                        "--force"], capture_output=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(LAB_ROOT / prefix.rstrip("-"), ignore_errors=True)  # its logs


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_wait_for_returns_the_first_truthy_value() -> None:
    clock = FakeClock()
    answers: Iterator[Any] = iter([None, [], {"state": "up"}])
    got = wait_for(lambda: next(answers), 5, 0.5, clock=clock, sleep=clock.sleep)
    assert got == {"state": "up"}
    assert clock.sleeps == [0.5, 0.5]


def test_wait_for_times_out_naming_what_it_waited_for_and_the_last_value() -> None:
    clock = FakeClock()
    with pytest.raises(TimeoutError, match=r"route in FIB; last value: \[\]"):
        wait_for(lambda: [], 1.0, 0.3, desc="route in FIB", clock=clock, sleep=clock.sleep)
    # It checks once more at the deadline instead of oversleeping it.
    assert clock.now == pytest.approx(101.0)


def test_wait_for_equal_can_wait_for_a_falsy_value() -> None:
    clock = FakeClock()
    answers: Iterator[str | None] = iter(["Established", "Established", None])
    assert wait_for_equal(lambda: next(answers), None, 5, 0.1, clock=clock, sleep=clock.sleep) is None
    with pytest.raises(TimeoutError, match="last value: 'Active'"):
        wait_for_equal(lambda: "Active", "Established", 0.2, 0.1, clock=clock, sleep=clock.sleep)
