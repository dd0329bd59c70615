"""Network namespaces as lab nodes, and a registry (`Lab`) that tears them all down.

Theory of operation
-------------------
A lab node is a named network namespace (`ip netns add`); processes run inside it via
`ip netns exec`, which execs in place, so the PID we get from Popen *is* the daemon's PID.
Every process a `Netns` starts is recorded with its start time (field 22 of
/proc/PID/stat), which tells a live process apart from a later one that reused the PID.

The records are mirrored to a state file, STATE_DIR/<netns>.json, rewritten atomically
on each change, so `python -m lab.cleanup` can finish the job if the owner crashes.

Teardown order matters: kill recorded PIDs (SIGTERM, short grace, SIGKILL), then any
other PID still in the namespace (children such as ExaBGP's API helper), and only then
delete the namespace: `ip netns del` on a namespace that still has processes merely
unmounts its name and leaves the processes running in an anonymous namespace.

Veth pairs need no bookkeeping: both ends live in lab namespaces and the kernel
destroys them with the namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_DIR = Path("/run/anycast-lab")
DEFAULT_PREFIX = "acl-"
DEFAULT_GRACE = 2.0

# FRR daemons keep a crash-log dir /var/tmp/frr/<daemon>.<pid> that only a clean exit removes.
FRR_TMP_DIR = Path("/var/tmp/frr")


class LabError(RuntimeError):
    """A lab operation failed; the message says what and how to look into it."""


@dataclass(frozen=True)
class ProcRecord:
    """A process the harness started: enough to recognise it again after a crash."""

    pid: int
    starttime: int
    argv: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "starttime": self.starttime, "argv": list(self.argv)}

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> ProcRecord:
        return ProcRecord(int(obj["pid"]), int(obj["starttime"]), tuple(str(a) for a in obj["argv"]))


# --- /proc helpers -----------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; None if the PID is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def proc_starttime(pid: int) -> int | None:
    """Start time in clock ticks since boot, or None if the PID is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_cmdline(pid: int) -> tuple[str, ...] | None:
    """argv of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0")[:-1])


def children_of(pid: int) -> list[int]:
    """Live children of PID, found by scanning /proc (this kernel lacks .../children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def record_of(pid: int, argv: Sequence[str]) -> ProcRecord:
    """Record a just-started process (raises if it is already gone)."""
    start = proc_starttime(pid)
    if start is None:
        raise LabError(f"process {pid} ({' '.join(argv)}) exited at once")
    return ProcRecord(pid, start, tuple(argv))


def is_same_process(rec: ProcRecord) -> bool:
    """True if rec.pid is still the process we started, not a reuse of its PID."""
    if proc_starttime(rec.pid) != rec.starttime:
        return False
    actual = proc_cmdline(rec.pid)
    return actual is not None and cmdline_matches(rec.argv, actual)


def cmdline_matches(argv: Sequence[str], actual: Sequence[str]) -> bool:
    """True if a process whose /proc cmdline is `actual` was started as `argv`.

    Right after fork it may still be `ip netns exec NS argv...`; after exec a script's
    argv is prefixed with its interpreter. Either way `argv` is the tail, and the
    program's name is one of the words.
    """
    rest = tuple(argv[1:])
    if rest and tuple(actual[-len(rest) :]) != rest:
        return False
    name = Path(argv[0]).name
    return any(Path(a).name == name for a in actual)


def _reap(children: Mapping[int, subprocess.Popen[Any]]) -> None:
    for child in children.values():
        child.poll()


def kill_records(
    records: Iterable[ProcRecord],
    grace: float = DEFAULT_GRACE,
    children: Mapping[int, subprocess.Popen[Any]] | None = None,
    sig: int = signal.SIGTERM,
) -> list[ProcRecord]:
    """Send `sig` to every still-matching record, SIGKILL what outlives `grace`; return survivors.

    `children` are our own Popen objects: polled so they do not linger as zombies.
    """
    kids = children or {}
    records = list(records)
    live = [r for r in records if is_same_process(r)]
    for rec in live:
        _signal(rec.pid, sig)
    live = _wait_gone(live, grace, kids)
    for rec in live:
        _signal(rec.pid, signal.SIGKILL)
    live = _wait_gone(live, 2.0, kids)
    for rec in records:
        tmp = FRR_TMP_DIR / f"{Path(rec.argv[0]).name}.{rec.pid}"
        if rec not in live and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    return live


def kill_pids(pids: Iterable[int], grace: float = DEFAULT_GRACE) -> list[int]:
    """Like kill_records for PIDs we know only by number (they were listed just now)."""
    recs = []
    for pid in pids:
        start, argv = proc_starttime(pid), proc_cmdline(pid)
        if start is not None and argv:
            recs.append(ProcRecord(pid, start, argv))
    return [r.pid for r in kill_records(recs, grace)]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(
    live: list[ProcRecord], timeout: float, kids: Mapping[int, subprocess.Popen[Any]]
) -> list[ProcRecord]:
    deadline = time.monotonic() + timeout
    while live:
        _reap(kids)
        live = [r for r in live if proc_starttime(r.pid) == r.starttime]
        if not live or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    return live


# --- namespaces ----------------------------------------------------------------------


def _ip(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return _checked(["ip", *args], timeout)


def _checked(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_netns() -> list[str]:
    """Names of all named network namespaces on the host."""
    out = _ip("-j", "netns", "list").stdout.strip()
    return sorted(entry["name"] for entry in json.loads(out)) if out else []


def netns_pids(name: str) -> list[int]:
    """PIDs of processes inside a namespace (empty if it is gone)."""
    proc = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def state_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


class Netns:
    """A named network namespace that records what it starts, for teardown and cleanup."""

    def __init__(
        self,
        name: str,
        *,
        state_dir: Path = STATE_DIR,
        records: Iterable[ProcRecord] = (),
        notes: Mapping[str, str] | None = None,
    ) -> None:
        """Wrap a namespace name (Netns.create makes a new one).

        `records` and `notes` adopt what an earlier owner recorded (lab.cleanup does).
        """
        self.name = name
        self.state_dir = state_dir
        self._records: dict[int, ProcRecord] = {r.pid: r for r in records}
        self._children: dict[int, subprocess.Popen[Any]] = {}
        self._notes: dict[str, str] = dict(notes or {})

    @classmethod
    def create(
        cls,
        name: str,
        *,
        forwarding: bool = True,
        sysctls: Mapping[str, str] | None = None,
        state_dir: Path = STATE_DIR,
    ) -> Netns:
        """Create the namespace, bring `lo` up and apply sysctls."""
        ns = cls(name, state_dir=state_dir)
        ns._create(forwarding, sysctls)
        return ns

    def _create(self, forwarding: bool, sysctls: Mapping[str, str] | None) -> None:
        # State file first, so a crash right after `ip netns add` still gets swept.
        self._save_state()
        _ip("netns", "add", self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")
        # No duplicate address detection: lab links are point-to-point, and DAD keeps
        # new IPv6 addresses, link-locals included, tentative for ~2 s; FRR bgpd will
        # not bring up an IPv6 session until the interface has a usable link-local.
        wanted = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}
        if forwarding:
            wanted |= {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        wanted |= dict(sysctls or {})
        if wanted:
            self.sysctl(wanted)

    def sysctl(self, values: Mapping[str, str]) -> None:
        """Set sysctls inside the namespace (net.* ones are per namespace)."""
        self.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    def note(self, key: str, value: str) -> None:
        """Store a fact in the state file (e.g. a node's work dir) for humans and cleanup."""
        self._notes[key] = value
        self._save_state()

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        capture: bool = True,
        timeout: float = 10.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it (raises LabError if check)."""
        proc = subprocess.run(
            self.exec_argv(argv),
            capture_output=capture,
            text=True,
            timeout=timeout,
            input=input,
            env=None if env is None else dict(env),
        )
        if check and proc.returncode != 0:
            detail = (proc.stderr or "").strip() if capture else ""
            raise LabError(f"[{self.name}] {' '.join(argv)} failed ({proc.returncode}): {detail}")
        return proc

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the namespace and record its PID for teardown.

        stdin defaults to /dev/null so a daemon never holds the test's terminal.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        child: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(argv), **kwargs)
        try:
            rec = record_of(child.pid, argv)
        except LabError:
            child.wait()
            raise
        self._records[child.pid] = rec
        self._children[child.pid] = child
        self._save_state()
        return child

    def terminate(self, pid: int, grace: float = DEFAULT_GRACE, sig: int = signal.SIGTERM) -> bool:
        """Stop one recorded process with `sig` (then SIGKILL after grace); True if it is gone."""
        rec = self._records.get(pid)
        if rec is None:
            raise LabError(f"[{self.name}] PID {pid} was not started by this namespace")
        survivors = kill_records([rec], grace, self._children, sig)
        if not survivors:
            self._forget(pid)
        return not survivors

    def _forget(self, pid: int) -> None:
        self._records.pop(pid, None)
        child = self._children.pop(pid, None)
        if child is not None:
            child.poll()
        self._save_state()

    @property
    def records(self) -> tuple[ProcRecord, ...]:
        """Processes started here that teardown will stop."""
        return tuple(self._records.values())

    def pids(self) -> list[int]:
        """Every PID currently inside the namespace, recorded or not."""
        return netns_pids(self.name)

    def exists(self) -> bool:
        """True while the named namespace exists."""
        return (Path("/run/netns") / self.name).exists()

    def delete(self, grace: float = DEFAULT_GRACE) -> list[str]:
        """Kill everything inside and delete the namespace; return problems (empty = clean)."""
        return teardown_all([self], grace)

    def _remove(self, grace: float) -> list[str]:
        # Kill stragglers (unrecorded PIDs) in the namespace, then delete it and its state.
        problems = []
        stray = kill_pids(self.pids(), grace)
        if stray:
            problems.append(f"PIDs {stray} in {self.name} survived SIGKILL")
        if self.exists():
            proc = subprocess.run(["ip", "netns", "del", self.name], capture_output=True, text=True)
            if proc.returncode != 0:
                problems.append(f"ip netns del {self.name}: {proc.stderr.strip()}")
        if not problems:
            state_path(self.state_dir, self.name).unlink(missing_ok=True)
        return problems

    def _save_state(self) -> None:
        self.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        me = os.getpid()
        state = {
            "netns": self.name,
            "owner": {"pid": me, "starttime": proc_starttime(me)},
            "procs": [r.to_json() for r in self._records.values()],
            "notes": self._notes,
        }
        path = state_path(self.state_dir, self.name)
        tmp = path.with_suffix(f".tmp{me}")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)


def teardown_all(nodes: Sequence[Netns], grace: float = DEFAULT_GRACE) -> list[str]:
    """Kill recorded PIDs of all nodes at once, then strays, then delete the namespaces.

    Returns what could not be removed (empty = clean). Killing all nodes' processes in
    one pass makes a lab's teardown cost one grace period, not one per node.
    """
    everything = [r for ns in nodes for r in ns.records]
    kids = {pid: c for ns in nodes for pid, c in ns._children.items()}
    survivors = kill_records(everything, grace, kids)
    problems = [f"PID {r.pid} ({' '.join(r.argv)}) survived SIGKILL" for r in survivors]
    for ns in nodes:
        for rec in ns.records:
            if rec not in survivors:
                ns._forget(rec.pid)
    for ns in nodes:
        problems += ns._remove(grace)
    return problems


# --- links, addresses, routes --------------------------------------------------------


def veth(ns_a: Netns, if_a: str, ns_b: Netns, if_b: str, *, mtu: int | None = None) -> None:
    """Connect two namespaces with a veth pair and bring both ends up.

    Both ends are created directly inside their namespaces, so the names never clash
    with interfaces of the host or of other labs.
    """
    _ip("link", "add", if_a, "netns", ns_a.name, "type", "veth", "peer", "name", if_b, "netns", ns_b.name)
    for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
        extra = ["mtu", str(mtu)] if mtu else []
        _ip("-n", ns.name, "link", "set", ifname, *extra, "up")


def add_addr(ns: Netns, ifname: str, cidr: str) -> None:
    """Add an address; IPv6 ones skip duplicate address detection, usable at once."""
    extra = ["nodad"] if ":" in cidr else []
    _ip("-n", ns.name, "addr", "add", cidr, "dev", ifname, *extra)


def add_route(ns: Netns, dst: str, via: str) -> None:
    """Install (or replace) a static kernel route inside the namespace."""
    family = "-6" if ":" in dst or ":" in via else "-4"
    _ip("-n", ns.name, family, "route", "replace", dst, "via", via)


# --- the registry ---------------------------------------------------------------------


class LabTeardownError(LabError):
    """Teardown finished but something survived; the message lists it."""


class Lab:
    """Registry of everything one lab created; teardown() (or `with`) removes it all.

    Namespace names are `<prefix><token>-<node>`: the prefix lets `lab.cleanup` sweep
    crashed runs, the random token keeps two concurrent runs of one test apart.
    """

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        *,
        root: Path | None = None,
        state_dir: Path = STATE_DIR,
        unique: bool = True,
    ) -> None:
        """`root` holds per-node work dirs (default: a fresh dir under /tmp)."""
        if not prefix:
            raise LabError("a lab needs a non-empty namespace prefix (cleanup sweeps by prefix)")
        self.prefix = prefix + (secrets.token_hex(2) + "-" if unique else "")
        self.state_dir = state_dir
        default_root = root is None
        if root is None:
            root = Path("/tmp") / f"anycast-lab-{self.prefix.rstrip('-')}"
        self.root = root
        # A root we chose is ours to delete; set keep_files to leave logs for a post-mortem.
        self.keep_files = not default_root
        self._nodes: dict[str, Netns] = {}

    def netns(
        self, node: str, *, forwarding: bool = True, sysctls: Mapping[str, str] | None = None
    ) -> Netns:
        """Create the namespace for a node (name: prefix + node)."""
        if node in self._nodes:
            raise LabError(f"node {node!r} already exists in this lab")
        ns = Netns(self.prefix + node, state_dir=self.state_dir)
        self._nodes[node] = ns  # registered before create: a half-made node is still torn down
        ns._create(forwarding, sysctls)
        return ns

    def __getitem__(self, node: str) -> Netns:
        return self._nodes[node]

    @property
    def namespaces(self) -> tuple[Netns, ...]:
        return tuple(self._nodes.values())

    def workdir(self, node: str) -> Path:
        """A per-node directory that FRR (user `frr`) can reach: every ancestor is 0755."""
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.root.chmod(0o755)
        path = self.root / node
        path.mkdir(mode=0o755, exist_ok=True)
        return path

    def teardown(self, grace: float = DEFAULT_GRACE) -> None:
        """Stop all processes (in parallel across nodes), then delete every namespace.

        Raises LabTeardownError after doing everything it can if anything survived.
        """
        problems = teardown_all(list(self._nodes.values()), grace)
        self._nodes.clear()
        if not problems and not self.keep_files:
            shutil.rmtree(self.root, ignore_errors=True)
        if problems:
            raise LabTeardownError("lab teardown left things behind:\n  " + "\n  ".join(problems))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()
