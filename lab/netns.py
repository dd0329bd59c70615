"""Lab nodes as containers without an image, and a registry (`Lab`) that tears them all down.

Theory of operation
-------------------
A lab node is a named network namespace (`ip netns add`, so `ip -n NODE ...` and veth
pairs work as before) plus a *node init*: a `sh` that is PID 1 of the node's own PID,
mount, UTS and IPC namespaces, started as

    ip netns exec NS unshare --mount --uts --ipc --pid --fork --mount-proc --propagation slave sh -c INIT

INIT sets the hostname to the node's name and bind-mounts per-node directories (under
the node's `fs` dir in the lab root) over /run, /tmp, /etc/frr, /var/tmp/frr and
/etc/hosts, so a node has private sockets, pid files, temporary files and FRR config,
and stock tools (`vtysh`, `ps`) work inside it unchanged. It then waits, reaping the
orphans the kernel hands it. Killing it makes the kernel SIGKILL every process left in
the node's PID namespace, so one kill tears down everything inside.

Processes enter a node without an intermediate process: the starting thread switches its
PID namespace *for children* to the node's (setns(CLONE_NEWPID) is per thread and
reversible), forks, and the child execs `nsenter --net --mount --uts --ipc -- ARGV`,
which joins the other namespaces and execs ARGV in place. So the PID Popen returns is
the daemon's PID as the host sees it, and our child: callers can signal and wait for
it. PIDs inside a node (`ps`, FRR's pid files in the node's /run/frr) are node-local.

Every process a `Netns` starts is recorded with its start time (field 22 of
/proc/PID/stat), which tells a live process apart from a later one that reused the PID.
The records, the node init and the node's directories are mirrored to a state file,
STATE_DIR/<netns>.json, rewritten atomically on each change; each `Lab` also records its
prefix in STATE_DIR/labs/, so `python -m lab.cleanup` can finish the job after a crash.

Teardown order matters: SIGTERM recorded PIDs (short grace, SIGKILL), then SIGKILL each
node's init (the kernel kills what is left in the node, e.g. ExaBGP's API helper), then
any other PID still in the network namespace (started with plain `ip netns exec`), and
only then delete the namespace: `ip netns del` on a namespace that still has processes
merely unmounts its name and leaves the processes running in an anonymous namespace.
A node's mounts live only in its own mount namespace, which dies with its last process.

Veth pairs need no bookkeeping: both ends live in lab namespaces and the kernel
destroys them with the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_DIR = Path("/run/anycast-lab")
# Lab roots live here, not under /tmp or /run: those are private in every node, and the
# nodes' processes must see their work dirs (configs, logs) at the same paths as the host.
LAB_ROOT = Path("/var/tmp/anycast-lab")
DEFAULT_PREFIX = "acl-"
DEFAULT_GRACE = 2.0
# After a crash, orphans belong to the host's PID 1, which may reap them only every few
# seconds; a node init waits in the kernel until its namespace's zombies are reaped.
INIT_EXIT_WAIT = 30.0

# Host paths a node sees its own copy of: bind mounts of <fs>/<path> (see NODE_INIT).
PRIVATE_DIRS = ("run", "tmp", "etc/frr", "var/tmp/frr")
FRR_USER = "frr"

# PID 1 of a node (written to <fs>/init.sh). $1 = hostname, $2 = the node's fs dir, then the host
# paths the node must still see although they lie under its private /tmp or /run
# (`shared_host_paths`): each is held at <fs>/keep/N before the private dirs go over it, and
# put back at its own path after. The /run/netns mounts the node
# inherited are dropped first: a private copy of them would keep other labs' namespaces
# alive after `ip netns del`. `wait` reaps any child, so orphans never pile up as zombies;
# SIGTERM (which PID 1 only gets with a handler) stops the node.
NODE_INIT = """\
set -e
hostname "$1"
fs="$2"
shift 2
umount -R -l /run/netns 2>/dev/null || true
i=0; for p in "$@"; do mkdir -p "$fs/keep/$i"; mount --bind "$p" "$fs/keep/$i"; i=$((i+1)); done
for d in run tmp etc/frr var/tmp/frr; do mkdir -p "/$d"; mount --bind "$fs/$d" "/$d"; done
mount --bind "$fs/etc/hosts" /etc/hosts
i=0; for p in "$@"; do mkdir -p "$p"; mount --bind "$fs/keep/$i" "$p"; i=$((i+1)); done
echo ready
exec </dev/null >/dev/null 2>&1
trap 'exit 0' TERM
while :; do sleep 2147483647 & wait $! || true; done
"""
_KEEPER = ("sleep", "2147483647")  # the init's own child, not one of the node's processes

CLONE_NEWPID = 0x20000000
_libc = ctypes.CDLL(None, use_errno=True)


def shared_host_paths() -> list[Path]:
    """Host paths every node must see as they are, although they lie under a directory the
    node replaces (/tmp, /run): this checkout and the Python running it. A CI job that
    clones the repository under /tmp would otherwise start daemons whose executable does not
    exist inside the node. Nested paths are covered by their outermost one."""
    replaced = [Path("/") / d for d in PRIVATE_DIRS]
    candidates = {Path(__file__).resolve().parents[1], Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                  Path(sys.executable).resolve().parent}
    hidden = sorted(p for p in candidates if any(p == r or r in p.parents for r in replaced))
    return [p for p in hidden if not any(q in p.parents for q in hidden)]


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


def node_local_pid(pid: int) -> int | None:
    """The PID a process has inside its node (what its pid file says), from the host's PID."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


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
    kill_wait: float = 2.0,
    reap_strays: bool = False,
) -> list[ProcRecord]:
    """Send `sig` to every still-matching record, SIGKILL what outlives `grace`; return survivors.

    `children` are our own Popen objects: polled so they do not linger as zombies (a
    node's init cannot finish dying while a zombie of its namespace is unreaped).
    """
    kids = children or {}
    records = list(records)
    live = [r for r in records if is_same_process(r)]
    for rec in live:
        _signal(rec.pid, sig)
    live = _wait_gone(live, grace, kids, reap_strays)
    for rec in live:
        _signal(rec.pid, signal.SIGKILL)
    return _wait_gone(live, kill_wait, kids, reap_strays)


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
    live: list[ProcRecord], timeout: float, kids: Mapping[int, subprocess.Popen[Any]], reap_strays: bool = False
) -> list[ProcRecord]:
    deadline = time.monotonic() + timeout
    while live:
        _reap(kids)
        if reap_strays:
            _reap_node_zombies()
        live = [r for r in live if proc_starttime(r.pid) == r.starttime]
        if not live or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    return live


def _nested_children(state: str | None = None) -> list[tuple[int, str, str]]:
    """Our own children living in a nested PID namespace (a lab node's), as (PID, state,
    cmdline); only those in ``state`` ("Z") if given. A node's init cannot finish dying
    while one of them is an unreaped zombie: the kernel frees a PID namespace only once
    every PID in it is released, and ours are released only by our wait()."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        st = status.get("State", "").split()[:1]
        if int(status.get("PPid", "0")) != me or len(status.get("NSpid", "").split()) < 2:
            continue
        if state is None or st == [state]:
            found.append((int(entry.name), st[0] if st else "?", " ".join(proc_cmdline(int(entry.name)) or [])))
    return found


def _reap_node_zombies() -> None:
    """Reap every zombie child of ours in a lab node, also those no node's Popen tracks (a
    process started and never waited for): they would hold their node's init for good. A
    Popen whose child is reaped here reads ECHILD later and takes exit code 0 (subprocess
    handles that)."""
    for pid, _, _ in _nested_children("Z"):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


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


def lab_state_path(state_dir: Path, prefix: str) -> Path:
    """Where a Lab records its prefix, so a sweep finds namespaces it has no file for."""
    return state_dir / "labs" / f"{prefix}.json"


@contextlib.contextmanager
def _children_in_pid_ns(init_pid: int) -> Iterator[None]:
    """Within the block, processes this thread forks are born in init_pid's PID namespace.

    setns(CLONE_NEWPID) changes only the calling thread's namespace *for children*; the
    thread itself stays where it is, and switching back to our own namespace is allowed.
    """
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/proc/{init_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(own)
        raise LabError(f"node init {init_pid} is gone: {exc}") from None
    try:
        if _libc.setns(target, CLONE_NEWPID) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns into the PID namespace of {init_pid}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWPID) != 0:  # never leave this thread's forks in a node
                err = ctypes.get_errno()
                raise LabError(f"setns back to our own PID namespace: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(own)


class Netns:
    """A lab node (a container without an image) that records what it starts."""

    def __init__(
        self,
        name: str,
        *,
        state_dir: Path = STATE_DIR,
        records: Iterable[ProcRecord] = (),
        notes: Mapping[str, str] | None = None,
        hostname: str | None = None,
        fs: Path | None = None,
        init: ProcRecord | None = None,
        launcher: ProcRecord | None = None,
    ) -> None:
        """Wrap a namespace name (Netns.create and Lab.netns make a new node).

        `records`, `notes`, `init` and `launcher` adopt what an earlier owner recorded
        (lab.cleanup does; `Netns.attach` reads them from the state file). `fs` is the
        directory whose run/, tmp/, etc/frr/, var/tmp/frr/ the node sees as its own.
        """
        self.name = name
        self.state_dir = state_dir
        self.hostname = hostname or name
        self.fs = fs
        self._records: dict[int, ProcRecord] = {r.pid: r for r in records}
        self._children: dict[int, subprocess.Popen[Any]] = {}
        self._notes: dict[str, str] = dict(notes or {})
        self._init = init  # PID 1 of the node's PID namespace, as the host sees it
        self._launcher = launcher  # `unshare`, the init's parent, outside the node

    @classmethod
    def create(
        cls,
        name: str,
        *,
        forwarding: bool = True,
        sysctls: Mapping[str, str] | None = None,
        state_dir: Path = STATE_DIR,
        hostname: str | None = None,
        fs: Path | None = None,
    ) -> Netns:
        """Create the node: namespaces, private dirs (default under LAB_ROOT), `lo` up, sysctls."""
        ns = cls(name, state_dir=state_dir, hostname=hostname, fs=fs or LAB_ROOT / "nodes" / name)
        ns._create(forwarding, sysctls)
        return ns

    @classmethod
    def attach(cls, name: str, *, state_dir: Path = STATE_DIR) -> Netns:
        """A handle on a node another process created, from its state file."""
        try:
            raw = json.loads(state_path(state_dir, name).read_text())
        except (OSError, ValueError) as exc:
            raise LabError(f"no readable state for node {name} in {state_dir}: {exc}") from None
        return cls.from_state(raw, state_dir)

    @classmethod
    def from_state(cls, raw: Mapping[str, Any], state_dir: Path) -> Netns:
        """Rebuild a handle from a parsed state file (raises KeyError/TypeError/ValueError)."""
        def rec(key: str) -> ProcRecord | None:
            return ProcRecord.from_json(raw[key]) if raw.get(key) else None

        return cls(
            str(raw["netns"]),
            state_dir=state_dir,
            records=tuple(ProcRecord.from_json(p) for p in raw.get("procs", [])),
            notes={str(k): str(v) for k, v in (raw.get("notes") or {}).items()},
            hostname=raw.get("hostname"),
            fs=Path(raw["fs"]) if raw.get("fs") else None,
            init=rec("init"),
            launcher=rec("launcher"),
        )

    def _create(self, forwarding: bool, sysctls: Mapping[str, str] | None) -> None:
        # State file first, so a crash right after `ip netns add` still gets swept.
        self._save_state()
        _ip("netns", "add", self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")
        self._start_init()
        # No duplicate address detection: lab links are point-to-point, and DAD keeps
        # new IPv6 addresses, link-locals included, tentative for ~2 s; FRR bgpd will
        # not bring up an IPv6 session until the interface has a usable link-local.
        wanted = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}
        if forwarding:
            wanted |= {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        wanted |= dict(sysctls or {})
        if wanted:
            self.sysctl(wanted)

    def _make_fs(self) -> Path:
        """The node's private directories: FRR's owned by user frr, /tmp sticky like the host's."""
        if self.fs is None:
            raise LabError(f"[{self.name}] a node needs a directory for its private files")
        fs = self.fs
        for parent in [fs, *fs.parents]:
            if parent in (Path("/tmp"), Path("/run")):
                raise LabError(f"[{self.name}] node dir {fs} is under {parent}, which every node replaces")
        frr = pwd.getpwnam(FRR_USER) if _has_user(FRR_USER) else None
        for sub in PRIVATE_DIRS:
            (fs / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
        (fs / "tmp").chmod(0o1777)
        (fs / "run" / "frr").mkdir(mode=0o755, exist_ok=True)
        if frr is not None:
            for sub in ("run/frr", "var/tmp/frr", "etc/frr"):
                os.chown(fs / sub, frr.pw_uid, frr.pw_gid)
        # The node's own name resolves locally: code that looks up its hostname must not
        # wait for a DNS server no node can reach.
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        (fs / "etc" / "hosts").write_text(hosts.rstrip("\n") + f"\n127.0.1.1 {self.hostname}\n")
        (fs / "init.sh").write_text(NODE_INIT)
        return fs

    def _start_init(self, timeout: float = 60.0) -> None:
        fs = self._make_fs()
        argv = ["ip", "netns", "exec", self.name, "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork",
                "--mount-proc", "--propagation", "slave", "--", "sh", str(fs / "init.sh"), self.hostname, str(fs),
                *map(str, shared_host_paths())]
        launcher = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        self._children[launcher.pid] = launcher
        try:
            self._launcher = record_of(launcher.pid, ["unshare"])
            self._save_state()
            assert launcher.stdout is not None and launcher.stderr is not None
            # A bound on a hung mount, not a timing assertion: ready comes in milliseconds.
            ready, _, _ = select.select([launcher.stdout], [], [], timeout)
            line = launcher.stdout.readline() if ready else b""
            if line.strip() != b"ready":
                launcher.kill()
                err = launcher.stderr.read().decode(errors="replace").strip()
                raise LabError(f"[{self.name}] node init did not start: {err or 'no ready signal'}")
            inits = [pid for pid in children_of(launcher.pid)]
            if len(inits) != 1:
                raise LabError(f"[{self.name}] expected one node init under {launcher.pid}, found {inits}")
            self._init = record_of(inits[0], ["sh"])
            self._save_state()
        finally:
            for pipe in (launcher.stdout, launcher.stderr):
                if pipe is not None:
                    pipe.close()

    def sysctl(self, values: Mapping[str, str]) -> None:
        """Set sysctls inside the namespace (net.* ones are per namespace)."""
        self.run(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    def note(self, key: str, value: str) -> None:
        """Store a fact in the state file (e.g. a node's work dir) for humans and cleanup."""
        self._notes[key] = value
        self._save_state()

    @property
    def init_pid(self) -> int | None:
        """PID 1 of the node as the host sees it (None for a bare network namespace)."""
        return self._init.pid if self._init else None

    def host_path(self, path: str) -> Path:
        """Where the host sees a path of the node's private dirs, e.g. /run/frr/bgpd.vty."""
        rel = Path(path).relative_to("/")
        if self.fs is None or not any(rel == Path(d) or Path(d) in rel.parents for d in PRIVATE_DIRS):
            raise LabError(f"[{self.name}] {path} is not in a node-private directory ({', '.join(PRIVATE_DIRS)})")
        return self.fs / rel

    def _live_init(self) -> int | None:
        if self._init is None:
            return None
        if not is_same_process(self._init):
            raise LabError(f"[{self.name}] the node's init (PID {self._init.pid}) is gone")
        return self._init.pid

    def exec_argv(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """An argv that runs `argv` in all of the node's namespaces, from any process.

        (nsenter forks once inside, so its own PID is not the command's: for processes
        the lab must track, use popen.) A bare network namespace gets `ip netns exec`.
        """
        init = self._live_init()
        if init is None:
            return ["ip", "netns", "exec", self.name, *argv]
        return ["nsenter", "-t", str(init), "--net", "--mount", "--uts", "--ipc", "--pid",
                f"--wd={cwd or os.getcwd()}", "--", *argv]

    @contextlib.contextmanager
    def _entered(self, argv: Sequence[str], cwd: str | None) -> Iterator[list[str]]:
        """The argv for a child of this thread that is the node's process itself (no fork in between)."""
        init = self._live_init()
        if init is None:
            yield ["ip", "netns", "exec", self.name, *argv]
            return
        # nsenter joins the node's other namespaces and execs argv in place (no --pid:
        # the child is born in the node's PID namespace). Joining the mount namespace
        # resets the working directory, hence --wd (opened before joining: lab paths
        # are the same inside and out).
        full = ["nsenter", "-t", str(init), "--net", "--mount", "--uts", "--ipc",
                f"--wd={cwd or os.getcwd()}", "--", *argv]
        with _children_in_pid_ns(init):
            yield full

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in the node without recording it (the caller waits for it)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        cwd = kwargs.pop("cwd", None)
        with self._entered(argv, None if cwd is None else str(cwd)) as full:
            child: subprocess.Popen[Any] = subprocess.Popen(full, **kwargs)
        return child

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
        """Run a command inside the node and wait for it (raises LabError if check)."""
        with self._entered(argv, None) as full:
            proc = subprocess.run(
                full,
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
        """Start a process inside the node and record its PID for teardown.

        The returned Popen's pid is the process's own (host) PID. stdin defaults to
        /dev/null so a daemon never holds the test's terminal.
        """
        child = self.spawn(argv, **kwargs)
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

    @property
    def node_records(self) -> tuple[ProcRecord, ...]:
        """The node's init and its launcher: killed after the processes, to end the node."""
        return tuple(r for r in (self._init, self._launcher) if r is not None)

    def pids(self) -> list[int]:
        """Every PID currently inside the namespace, recorded or not (the node's init too)."""
        return netns_pids(self.name)

    def node_pids(self) -> list[int]:
        """The node's processes (what `ps` inside shows) as host PIDs, minus its init and the init's sleep."""
        if self._init is None or not is_same_process(self._init):
            return []
        try:
            mine = os.readlink(f"/proc/{self._init.pid}/ns/pid")
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self._init.pid:
                try:
                    pid = int(entry.name)
                    fields = _stat_fields(pid)
                    if os.readlink(f"/proc/{pid}/ns/pid") != mine or fields is None or fields[0] in ("Z", "X"):
                        continue
                    if int(fields[1]) == self._init.pid and proc_cmdline(pid) == _KEEPER:
                        continue
                    found.append(pid)
                except OSError:
                    continue
        return sorted(found)

    def exists(self) -> bool:
        """True while the named namespace exists."""
        return (Path("/run/netns") / self.name).exists()

    def delete(self, grace: float = DEFAULT_GRACE) -> list[str]:
        """Kill everything inside and delete the namespace; return problems (empty = clean)."""
        return teardown_all([self], grace)

    def _remove(self, grace: float) -> list[str]:
        # The node's init is gone by now: kill stragglers that joined only the network
        # namespace (`ip netns exec`), then delete it and its state.
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
            "hostname": self.hostname,
            "fs": None if self.fs is None else str(self.fs),
            "owner": {"pid": me, "starttime": proc_starttime(me)},
            "init": self._init.to_json() if self._init else None,
            "launcher": self._launcher.to_json() if self._launcher else None,
            "procs": [r.to_json() for r in self._records.values()],
            "notes": self._notes,
        }
        path = state_path(self.state_dir, self.name)
        tmp = path.with_suffix(f".tmp{me}")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def teardown_all(nodes: Sequence[Netns], grace: float = DEFAULT_GRACE, init_wait: float = INIT_EXIT_WAIT) -> list[str]:
    """Stop recorded PIDs of all nodes at once, then the nodes' inits, then strays; delete the namespaces.

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
    # SIGKILL each init: the kernel then kills every process left in its PID namespace.
    # Its launcher (unshare) reaps it and exits by itself; killing both at once would
    # leave the init a zombie of the host's PID 1 for a while.
    launchers = [r for ns in nodes if (r := ns._launcher) is not None and is_same_process(r)]
    # A zombie of ours in a node holds its init: reap those while waiting (reap_strays).
    stuck = kill_records([r for ns in nodes if (r := ns._init) is not None], 0.0, kids, signal.SIGKILL,
                         kill_wait=init_wait, reap_strays=True)
    stuck += kill_records(_wait_gone(launchers, init_wait, kids), 0.0, kids, signal.SIGKILL)
    if stuck:
        held = [f"{pid} {st} {cmd}" for pid, st, cmd in _nested_children()]
        problems += [f"node process {r.pid} ({' '.join(r.argv)}) did not exit" for r in stuck]
        problems += [f"our children still in a node: {'; '.join(held)}"] if held else []
    for ns in nodes:
        for pid in list(ns._children):
            ns._children.pop(pid).poll()
        if not any(r in stuck for r in ns.node_records):
            ns._init = ns._launcher = None
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
    crashed runs, the random token keeps two concurrent runs of one test apart. The
    prefix is recorded in STATE_DIR/labs/ while the lab exists, so a sweep without
    --prefix finds every lab, whatever its prefix.
    """

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        *,
        root: Path | None = None,
        state_dir: Path = STATE_DIR,
        unique: bool = True,
    ) -> None:
        """`root` holds per-node work dirs (default: a fresh dir under LAB_ROOT)."""
        if not prefix:
            raise LabError("a lab needs a non-empty namespace prefix (cleanup sweeps by prefix)")
        self.prefix = prefix + (secrets.token_hex(2) + "-" if unique else "")
        self.state_dir = state_dir
        default_root = root is None
        if root is None:
            root = LAB_ROOT / self.prefix.rstrip("-")
        self.root = root
        # A root we chose is ours to delete; set keep_files to leave logs for a post-mortem.
        self.keep_files = not default_root
        self._nodes: dict[str, Netns] = {}

    def _register(self) -> None:
        path = lab_state_path(self.state_dir, self.prefix)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        me = os.getpid()
        record = {"prefix": self.prefix, "root": str(self.root), "owner": {"pid": me, "starttime": proc_starttime(me)}}
        tmp = path.with_suffix(f".tmp{me}")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    def netns(
        self, node: str, *, forwarding: bool = True, sysctls: Mapping[str, str] | None = None
    ) -> Netns:
        """Create a node (namespace name: prefix + node; hostname: node)."""
        if node in self._nodes:
            raise LabError(f"node {node!r} already exists in this lab")
        if not self._nodes:
            self._register()
        ns = Netns(self.prefix + node, state_dir=self.state_dir, hostname=node, fs=self.workdir(node) / "fs")
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
        for d in (*reversed(self.root.parents[: len(self.root.parents) - 1]), self.root):
            if not d.exists():
                d.mkdir(mode=0o755)
                d.chmod(0o755)
        self.root.chmod(0o755)
        path = self.root / node
        path.mkdir(mode=0o755, exist_ok=True)
        return path

    def teardown(self, grace: float = DEFAULT_GRACE) -> None:
        """Stop all processes (in parallel across nodes), then end every node and delete its namespace.

        Raises LabTeardownError after doing everything it can if anything survived.
        """
        problems = teardown_all(list(self._nodes.values()), grace)
        self._nodes.clear()
        if not problems:
            lab_state_path(self.state_dir, self.prefix).unlink(missing_ok=True)
            if not self.keep_files:
                shutil.rmtree(self.root, ignore_errors=True)
        if problems:
            raise LabTeardownError("lab teardown left things behind:\n  " + "\n  ".join(problems))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()
