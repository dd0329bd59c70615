"""An FRR router as a lab node: zebra + bgpd (+ bfdd, staticd) inside one node.

A node has its own /etc/frr, /run/frr and /var/tmp/frr (lab.netns), so the daemons run
with FRR's stock paths and `python -m lab exec NODE vtysh` works without socket flags;
the host reaches the same files through the node's private dirs:

    /etc/frr/<daemon>.conf   config, written from text by start()   (host: etc_dir)
    /run/frr/                pid files (node-local PIDs), zserv.api, <daemon>.vty (host: run_dir)
    WORKDIR/log/<daemon>.log FRR's log; <daemon>.out is stdout/stderr (crashes)

The daemons run in the foreground (no -d), started through `Netns.popen`, so the PID
we hold is the daemon's and the lab's teardown and crash sweep know it.

Queries: `vty()` writes a NUL-terminated command straight to a daemon's vty socket and
reads the reply up to FRR's 4-byte trailer (3 NULs + status), about 0.1 ms per query,
against ~25 ms for a `vtysh` process; `vtysh_json()` takes that path for `show`
commands whose daemon is known, and goes through vtysh for everything else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lab.netns import DEFAULT_GRACE, LabError, Netns

FRR_DAEMON_DIR = Path("/usr/lib/frr")
VTYSH = "/usr/bin/vtysh"
FRR_USER = "frr"
NODE_ETC, NODE_RUN = "/etc/frr", "/run/frr"  # inside the node: FRR's defaults

# zebra first (the others connect to zserv.api), bgpd last (it uses bfdd's sessions).
_START_ORDER = ("zebra", "bfdd", "staticd", "bgpd")

# Which daemon answers a `show` command, for the direct-socket path; anything not
# listed here goes through vtysh, which knows the full command table.
_FAST_ROUTES = (
    ("show bgp ", "bgpd"),
    ("show ip bgp ", "bgpd"),
    ("show bfd ", "bfdd"),
    ("show ip route", "zebra"),
    ("show ipv6 route", "zebra"),
    ("show interface", "zebra"),
)

_VTY_TRAILER = b"\0\0\0"


class FrrError(LabError):
    """An FRR daemon failed to start or a command failed; the message carries its output."""


def frr_available() -> str | None:
    """None if FRR can run here, else a reason (for the test suite's pre-flight check)."""
    for path in (FRR_DAEMON_DIR / "zebra", FRR_DAEMON_DIR / "bgpd", Path(VTYSH)):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install frr)"
    try:
        pwd.getpwnam(FRR_USER)
    except KeyError:
        return f"user {FRR_USER!r} is missing (the frr package creates it)"
    return None


def vty_query(sock_path: Path, command: str, timeout: float = 10.0) -> tuple[int, str]:
    """Send one command to an FRR daemon's vty socket; return (status, output).

    Status is FRR's CMD_* code: 0 success, 1 warning, 2 unknown command, ...
    Raises OSError if the daemon is not there.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(command.encode() + b"\0")
        buf = bytearray()
        while True:
            # Output is text, so the first NUL starts the trailer.
            end = buf.find(_VTY_TRAILER)
            if end >= 0 and len(buf) >= end + 4:
                return buf[end + 3], buf[:end].decode(errors="replace")
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{sock_path} closed the connection mid-reply to {command!r}")
            buf += chunk


def _check_reachable(path: Path) -> None:
    """FRR drops to user frr before it opens its files: every ancestor must be o+x."""
    for parent in [path, *path.parents]:
        if parent.exists() and not os.stat(parent).st_mode & 0o001:
            raise FrrError(
                f"user {FRR_USER} cannot reach {path}: {parent} is mode "
                f"{oct(os.stat(parent).st_mode & 0o777)} (use a work dir under a 0755 path, "
                "e.g. Lab.workdir(), not pytest's tmp_path)"
            )


def _normalise(prefix: str) -> str:
    return str(ipaddress.ip_network(prefix, strict=False))


class FrrRouter:
    """FRR daemons for one lab node; start() writes the configs and waits for the vtys."""

    def __init__(self, netns: Netns, workdir: Path, configs: Mapping[str, str]) -> None:
        """configs maps daemon name (zebra, bgpd, bfdd, staticd) to config text.

        zebra always runs (with an empty config if none is given).
        """
        unknown = set(configs) - set(_START_ORDER)
        if unknown:
            raise FrrError(f"unsupported FRR daemons {sorted(unknown)}; known: {_START_ORDER}")
        if netns.fs is None:
            raise FrrError(f"[{netns.name}] FRR needs a lab node (with private /etc/frr, /run/frr), "
                           "not a bare network namespace")
        self.netns = netns
        self.workdir = Path(workdir)
        self.configs = {"zebra": "", **configs}
        self.etc_dir = netns.host_path(NODE_ETC)
        self.run_dir = netns.host_path(NODE_RUN)
        self.log_dir = self.workdir / "log"
        self._procs: dict[str, subprocess.Popen[Any]] = {}

    @property
    def daemons(self) -> tuple[str, ...]:
        """The daemons this router runs, in start order."""
        return tuple(d for d in _START_ORDER if d in self.configs)

    @property
    def pids(self) -> dict[str, int]:
        """PID per running daemon."""
        return {d: p.pid for d, p in self._procs.items() if p.poll() is None}

    def start(self, timeout: float = 30.0, check_config: bool = True) -> FrrRouter:
        """Write configs, start the daemons, return once each one's vty answers.

        With check_config, a config line FRR rejects raises FrrError first: a running
        daemon only logs it, and a lab built on a half-applied config misleads.
        """
        if self.pids:
            raise FrrError(f"[{self.netns.name}] FRR already runs: {self.pids}")
        _check_reachable(self.workdir)
        frr = pwd.getpwnam(FRR_USER)
        for d in (self.workdir, self.etc_dir, self.run_dir, self.log_dir):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        for d in (self.run_dir, self.log_dir):
            os.chown(d, frr.pw_uid, frr.pw_gid)
        for daemon, text in self.configs.items():
            conf = self.etc_dir / f"{daemon}.conf"
            conf.write_text(text if text.endswith("\n") or not text else text + "\n")
            conf.chmod(0o644)
        self.netns.note("frr_workdir", str(self.workdir))
        if check_config:
            self.check_config()
        deadline = time.monotonic() + timeout
        self._spawn("zebra")
        self._wait_vty("zebra", deadline)
        rest = [d for d in self.daemons if d != "zebra"]
        for daemon in rest:
            self._spawn(daemon)
        for daemon in rest:
            self._wait_vty(daemon, deadline)
        return self

    def check_config(self) -> None:
        """Dry-run (-C) every daemon on its config file; raise FrrError on rejected lines."""
        runs = []
        for daemon in self.daemons:
            argv = [*self._argv(daemon), "-C", "--log", "stdout"]
            proc = self.netns.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            runs.append((daemon, proc))
        errors = []
        for daemon, proc in runs:
            # A dry run leaves a crash-log dir in the node's /var/tmp/frr: node-local, gone with the lab.
            out, _ = proc.communicate(timeout=30)
            # FRR's dry run exits 0 even on errors; they read "<why> on config line N: ...".
            errors += [f"{daemon}: {line.strip()}" for line in out.splitlines() if " on config line " in line]
        if errors:
            raise FrrError(f"[{self.netns.name}] FRR rejected config lines:\n  " + "\n  ".join(errors))

    def _argv(self, daemon: str) -> list[str]:
        # Paths as the node sees them (FRR's defaults, spelled out).
        argv = [
            str(FRR_DAEMON_DIR / daemon),
            "-f", f"{NODE_ETC}/{daemon}.conf",
            "-i", f"{NODE_RUN}/{daemon}.pid",
            "-z", f"{NODE_RUN}/zserv.api",
            "--vty_socket", NODE_RUN,
            "-P", "0",
        ]  # fmt: skip
        if daemon == "bfdd":
            argv += ["--bfdctl", f"{NODE_RUN}/bfdd.sock"]
        return argv

    def _spawn(self, daemon: str) -> None:
        argv = [*self._argv(daemon), "--log", f"file:{self.log_dir / (daemon + '.log')}"]
        (self.run_dir / f"{daemon}.vty").unlink(missing_ok=True)  # a stale socket would look ready
        with open(self.log_dir / f"{daemon}.out", "ab") as out:
            self._procs[daemon] = self.netns.popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def _wait_vty(self, daemon: str, deadline: float) -> None:
        sock = self.run_dir / f"{daemon}.vty"
        while True:
            proc = self._procs[daemon]
            if proc.poll() is not None:
                raise FrrError(
                    f"[{self.netns.name}] {daemon} exited with {proc.returncode} at start:\n"
                    + self.log_text(daemon)[-2000:]
                )
            try:
                status, _ = vty_query(sock, "show version", timeout=1.0)
                if status == 0:
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise FrrError(
                    f"[{self.netns.name}] {daemon} vty {sock} did not answer in time:\n"
                    + self.log_text(daemon)[-2000:]
                )
            time.sleep(0.01)

    def stop(self, grace: float = DEFAULT_GRACE, sig: int = signal.SIGTERM) -> None:
        """Stop the daemons (bgpd first, zebra last) by PID; SIGKILL after grace."""
        for daemon in reversed(self.daemons):
            proc = self._procs.pop(daemon, None)
            if proc is not None and proc.poll() is None:
                self.netns.terminate(proc.pid, grace, sig)

    def log_text(self, daemon: str = "bgpd") -> str:
        """The daemon's log file plus whatever it wrote on stdout/stderr."""
        parts = []
        for name in (f"{daemon}.log", f"{daemon}.out"):
            path = self.log_dir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    # --- queries -------------------------------------------------------------------

    def vty(self, command: str, daemon: str = "bgpd") -> str:
        """Run a command on one daemon through its vty socket (fast path); raise on error."""
        status, out = vty_query(self.run_dir / f"{daemon}.vty", command)
        if status != 0:
            raise FrrError(f"[{self.netns.name}] {daemon}: {command!r} -> status {status}: {out.strip()}")
        return out

    def vtysh(self, *commands: str, timeout: float = 10.0) -> str:
        """Run commands through vtysh (one `-c` each); raise FrrError on failure."""
        argv = [VTYSH, "--vty_socket", str(self.run_dir)]
        for cmd in commands:
            argv += ["-c", cmd]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise FrrError(
                f"[{self.netns.name}] vtysh {commands!r} failed ({proc.returncode}): "
                f"{(proc.stdout + proc.stderr).strip()}"
            )
        return proc.stdout

    def configure(self, *lines: str) -> str:
        """Apply configuration lines live, as typed after `configure terminal`."""
        return self.vtysh("configure terminal", *lines)

    def vtysh_json(self, command: str) -> Any:
        """Parse the JSON answer of a `show ... json` command.

        Uses the daemon's vty socket when the command's daemon is known and its socket
        answers, and vtysh otherwise.
        """
        daemon = next((d for p, d in _FAST_ROUTES if command.startswith(p)), None)
        if daemon in self.configs:
            try:
                out = self.vty(command, daemon)
            except OSError:
                out = self.vtysh(command)  # daemon restarting or gone: let vtysh say so
        else:
            out = self.vtysh(command)
        try:
            return json.loads(out)
        except json.JSONDecodeError as exc:
            raise FrrError(f"[{self.netns.name}] {command!r} did not answer JSON: {out[:300]!r}") from exc

    def bgp_route(self, prefix: str) -> dict[str, Any] | None:
        """The BGP table entry for exactly `prefix` (paths and all), or None if absent."""
        net = ipaddress.ip_network(prefix, strict=False)
        afi = "ipv4" if net.version == 4 else "ipv6"
        entry = self.vtysh_json(f"show bgp {afi} unicast {net} json")
        if not entry or not entry.get("paths") or _normalise(entry.get("prefix", "")) != str(net):
            return None
        result: dict[str, Any] = entry
        return result

    def fib_routes(self, prefix: str) -> list[dict[str, Any]]:
        """The namespace's kernel routes (main table) for exactly `prefix`."""
        net = ipaddress.ip_network(prefix, strict=False)
        family = "-4" if net.version == 4 else "-6"
        proc = subprocess.run(
            ["ip", "-n", self.netns.name, "-j", family, "route", "show", "exact", str(net)],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if proc.returncode != 0:
            raise FrrError(f"[{self.netns.name}] ip route show {net}: {proc.stderr.strip()}")
        routes: list[dict[str, Any]] = json.loads(proc.stdout or "[]")
        return routes

    def fib_has(self, prefix: str, proto: str | None = "bgp") -> bool:
        """True if the kernel FIB holds `prefix` (installed by `proto`, None = any)."""
        return any(proto is None or r.get("protocol") == proto for r in self.fib_routes(prefix))

    def neighbor_state(self, addr: str) -> str:
        """The BGP FSM state of a configured neighbor ("Established", "Active", ...)."""
        info = self.vtysh_json(f"show bgp neighbors {addr} json")
        if info.get("bgpNoSuchNeighbor") or addr not in info:
            raise FrrError(f"[{self.netns.name}] {addr} is not a configured BGP neighbor")
        state: str = info[addr]["bgpState"]
        return state
