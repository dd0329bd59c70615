"""ExaBGP 5 as a lab process: `exabgp server CONFIG` inside a namespace.

Settings go in through environment variables (LAB-NOTES): run as root without dropping
privileges (a respawned API helper would otherwise run as `nobody`), no CLI pipes (they
would clash between instances), log to a file in the work dir.

ExaBGP starts its API helpers with subprocess.Popen, so they are its direct children;
this kernel has no /proc/PID/task/*/children, so `api_pids()` scans /proc for them and
keeps those whose command line is one of the config's `run` lines: ExaBGP has other,
short-lived children (at start-up platform.uname() runs `uname -p`). A test can kill one
helper and watch ExaBGP respawn it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lab.netns import DEFAULT_GRACE, LabError, Netns, children_of, cmdline_matches, proc_cmdline
from lab.poll import wait_for

BASE_ENV = {
    "exabgp.daemon.user": "root",
    "exabgp.daemon.drop": "false",
    "exabgp.daemon.daemonize": "false",
    "exabgp.api.cli": "false",
}


_RUN_LINE = re.compile(r"\brun\s+([^;]+);")


class ExaBGPError(LabError):
    """ExaBGP failed to start or died; the message carries its log."""


def exabgp_bin() -> Path:
    """The exabgp entry point of the running interpreter's environment (the venv)."""
    return Path(sys.executable).parent / "exabgp"


class ExaBGPProcess:
    """One ExaBGP instance with its config, log and output under `workdir`."""

    def __init__(
        self,
        netns: Netns,
        workdir: Path,
        config: str,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`env` adds or overrides exabgp.* settings (e.g. {"exabgp.api.respawn": "false"})."""
        self.netns = netns
        self.workdir = Path(workdir)
        self.config = config
        self.config_path = self.workdir / "exabgp.conf"
        self.log_path = self.workdir / "exabgp.log"
        self.out_path = self.workdir / "exabgp.out"
        self.extra_env = dict(env or {})
        self._proc: subprocess.Popen[Any] | None = None

    def start(self) -> ExaBGPProcess:
        """Write the config and start ExaBGP; returns at once (see wait_api_started)."""
        if self._proc is not None and self._proc.poll() is None:
            raise ExaBGPError(f"[{self.netns.name}] ExaBGP already runs as PID {self._proc.pid}")
        self.workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.config_path.write_text(self.config)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            **BASE_ENV,
            "exabgp.log.destination": str(self.log_path),
            **self.extra_env,
        }
        argv = [str(exabgp_bin()), "server", str(self.config_path)]
        self.netns.note("exabgp_workdir", str(self.workdir))
        with open(self.out_path, "ab") as out:
            self._proc = self.netns.popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def pid(self) -> int:
        """PID of the ExaBGP daemon."""
        if self._proc is None:
            raise ExaBGPError("ExaBGP was not started")
        return self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def run_lines(self) -> list[list[str]]:
        """argv of each API process in the config (ExaBGP splits `run` on blanks)."""
        return [m.group(1).split() for m in _RUN_LINE.finditer(self.config)]

    def api_pids(self) -> list[int]:
        """PIDs of ExaBGP's live API helper processes (children running a `run` line)."""
        if not self.running():
            return []
        runs = self.run_lines
        found = []
        for pid in children_of(self.pid):
            actual = proc_cmdline(pid)
            if actual and any(cmdline_matches(run, actual) for run in runs):
                found.append(pid)
        return found

    def wait_api_started(self, count: int = 1, timeout: float = 10.0) -> list[int]:
        """Wait until `count` API helpers run; raise with the log if ExaBGP dies first."""

        def probe() -> list[int]:
            if not self.running():
                raise ExaBGPError(
                    f"[{self.netns.name}] ExaBGP exited with {self.returncode}:\n{self.log_text()[-3000:]}"
                )
            pids = self.api_pids()
            return pids if len(pids) >= count else []

        return wait_for(probe, timeout, 0.02, f"{count} ExaBGP API helper(s) in {self.netns.name}")

    def wait_respawn(self, old_pid: int, timeout: float = 10.0) -> int:
        """After helper `old_pid` died, wait for ExaBGP to start a new one; return its PID."""
        pids = wait_for(
            lambda: [p for p in self.api_pids() if p != old_pid],
            timeout,
            0.02,
            f"ExaBGP in {self.netns.name} to respawn its API helper (old PID {old_pid})",
        )
        return pids[0]

    def stop(self, sig: int = signal.SIGTERM, grace: float = DEFAULT_GRACE) -> int | None:
        """Send `sig` (SIGKILL after grace) and reap; returns the exit code.

        SIGTERM makes ExaBGP close its sessions cleanly and stop its helpers; SIGKILL
        leaves the helpers orphaned, the lab teardown still finds them in the namespace.
        """
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self.netns.terminate(self._proc.pid, grace, sig)
        return self._proc.poll()

    def log_text(self) -> str:
        """ExaBGP's log file plus anything it printed."""
        parts = []
        for path in (self.log_path, self.out_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

