"""Lab nodes that run our software: an agent host (ExaBGP + anycast-agent, started the way
systemd starts them) and origin backends. Shared by every topology."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .netns import Netns, children_of

ROOT = Path(__file__).resolve().parents[1]


def lab_env() -> dict[str, str]:
    """Environment for lab processes: our code importable, output unbuffered, and no
    NOTIFY_SOCKET of whatever started the lab."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_backend(ns: Netns, workdir: Path, region: str, listens: list[str]) -> subprocess.Popen[Any]:
    """A CLB backend (lab.backend) answering on every ``ADDRESS:PORT`` in ``listens``."""
    argv = [sys.executable, "-m", "lab.backend", "--origin", region]
    for listen in listens:
        argv += ["--listen", listen]
    log = open(workdir / "backend.log", "ab")  # noqa: SIM115 - owned by the process
    return ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=lab_env())


def scrape(ns: Netns, port: int) -> str:
    """GET http://127.0.0.1:PORT/metrics from inside the namespace ('' if it fails). The
    timeouts are generous: on a loaded machine a Python start plus an answer can take
    seconds, and a slow scrape is not a daemon that stopped answering."""
    url = f"http://127.0.0.1:{port}/metrics"
    code = f"import urllib.request,sys;sys.stdout.write(urllib.request.urlopen({url!r},timeout=10).read().decode())"
    r = ns.run([sys.executable, "-c", code], check=False, timeout=30)
    return r.stdout if r.returncode == 0 else ""


class AgentNode:
    """ExaBGP + anycast-agent in one namespace: ``anycast-agent launch`` execs ExaBGP."""

    def __init__(self, ns: Netns, workdir: Path, config: Path, metrics_port: int = 9701) -> None:
        self.ns = ns
        self.workdir = workdir
        self.config = config
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> subprocess.Popen[Any]:
        exe = os.path.join(os.path.dirname(sys.executable), "anycast-agent")
        argv = [exe, "launch", "--config", str(self.config), "--state-dir", str(self.workdir / "state"),
                "--metrics-listen", f"0.0.0.0:{self.metrics_port}", "--log-level", "INFO",
                "--exabgp-log", str(self.workdir / "exabgp.log")]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = self.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT, env=lab_env())
        return self.proc

    def agent_pid(self) -> int | None:
        """The API process (anycast-agent run) under ExaBGP, if one is running."""
        if self.proc is None:
            return None
        for pid in children_of(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"controller.cli.agent_main" in cmd and b"run" in cmd:
                return pid
        return None

    def signal_agent(self, sig: int) -> int:
        pid = self.agent_pid()
        if pid is None:
            raise RuntimeError(f"[{self.ns.name}] no agent process is running")
        os.kill(pid, sig)
        return pid

    def stop_exabgp(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal ExaBGP (the service's main process) and wait for it to exit.

        Through our own Popen, not Netns.terminate: ``launch`` exec'd into ExaBGP, so the
        command line no longer matches the record, and the harness (rightly) refuses to
        kill a PID whose command line changed. An unreaped Popen child cannot be reused.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def metrics(self) -> str:
        return scrape(self.ns, self.metrics_port)
