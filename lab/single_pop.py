"""One POP, for the agent's integration tests and the first demo.

    rtr (FRR, AS 65001)  100.64.1.1/30 ---- 100.64.1.2/30  pop (ExaBGP + anycast-agent, AS 65101)
                                                      |  100.64.10.2/30 ---- 100.64.10.1/30  usw (origin us-west)
                                                      |  100.64.20.2/30 ---- 100.64.20.1/30  euc (origin eu-central)

The addresses match configs/agent-sjc.yaml, which the agent runs unchanged. Each origin
holds the VIP on its loopback (it is the CLB) and runs lab.backend on the backend
addresses the config lists and on port 80 for client traffic to the VIP. ``rtr`` plays the
client side: a request from it to the VIP follows FRR's FIB to the POP, then the POP's
kernel route (installed by the agent) to the active origin.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netns import Lab, Netns, add_addr, add_route, children_of, veth

ROOT = Path(__file__).resolve().parents[1]
AGENT_CONFIG = ROOT / "configs" / "agent-sjc.yaml"
VIP = "198.51.100.10"
METRICS_PORT = 9701

FRR_BGPD = """\
hostname rtr
log file {log}/bgpd.log
router bgp 65001
 bgp router-id 100.64.1.1
 no bgp ebgp-requires-policy
 no bgp network import-check
 neighbor 100.64.1.2 remote-as 65101
 neighbor 100.64.1.2 timers 1 3
 neighbor 100.64.1.2 timers connect 1
 address-family ipv4 unicast
  neighbor 100.64.1.2 route-map NONE-OUT out
 exit-address-family
!
route-map NONE-OUT deny 10
!
"""

ORIGINS = {
    # node: (region, address of its end of the backbone link, backend ports)
    "usw": ("us-west", "100.64.10.1", (8080, 8081)),
    "euc": ("eu-central", "100.64.20.1", (8080,)),
}


@dataclass
class SinglePop:
    lab: Lab
    agent_config: Path = AGENT_CONFIG
    nodes: dict[str, Netns] = field(default_factory=dict)
    router: Any = None
    agent_proc: subprocess.Popen[Any] | None = None
    backends: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)

    # --- bring-up ----------------------------------------------------------------------
    def up(self) -> SinglePop:
        from .frr import FrrRouter

        for node in ("rtr", "pop", *ORIGINS):
            self.nodes[node] = self.lab.netns(node)
        rtr, pop = self.nodes["rtr"], self.nodes["pop"]
        veth(rtr, "eth-pop", pop, "eth-rtr")
        add_addr(rtr, "eth-pop", "100.64.1.1/30")
        add_addr(pop, "eth-rtr", "100.64.1.2/30")
        for i, (node, (_, addr, _)) in enumerate(ORIGINS.items()):
            ns = self.nodes[node]
            veth(pop, f"eth-{node}", ns, "eth-pop")
            base = addr.rsplit(".", 1)[0]
            add_addr(ns, "eth-pop", f"{addr}/30")
            add_addr(pop, f"eth-{node}", f"{base}.2/30")
            add_addr(ns, "lo", f"{VIP}/32")  # the origin's CLB holds the VIP
            add_route(ns, "default", f"{base}.2")
        workdir = self.lab.workdir("rtr")
        self.router = FrrRouter(rtr, workdir, {"bgpd": FRR_BGPD.format(log=workdir / "log")}).start()
        return self

    def workdir(self, node: str) -> Path:
        return self.lab.workdir(node)

    # --- backends ----------------------------------------------------------------------
    def start_backends(self, node: str) -> None:
        region, addr, ports = ORIGINS[node]
        listens = [f"{addr}:{p}" for p in ports] + ["0.0.0.0:80"]
        argv = [sys.executable, "-m", "lab.backend", "--origin", region]
        for listen in listens:
            argv += ["--listen", listen]
        log = open(self.workdir(node) / "backend.log", "ab")  # noqa: SIM115 - owned by the process
        self.backends[node] = self.nodes[node].popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                     cwd=str(ROOT), env=_env())

    def stop_backends(self, node: str) -> None:
        proc = self.backends.pop(node, None)
        if proc is not None:
            self.nodes[node].terminate(proc.pid)

    # --- the agent -----------------------------------------------------------------------
    def start_agent(self, config: Path | None = None) -> subprocess.Popen[Any]:
        """Start the agent the way systemd does: ``anycast-agent launch`` execs ExaBGP."""
        cfg = config or self.agent_config
        state = self.workdir("pop") / "state"
        exe = os.path.join(os.path.dirname(sys.executable), "anycast-agent")
        argv = [exe, "launch", "--config", str(cfg), "--state-dir", str(state),
                "--metrics-listen", f"0.0.0.0:{METRICS_PORT}", "--log-level", "INFO",
                "--exabgp-log", str(self.workdir("pop") / "exabgp.log")]
        log = open(self.agent_log_path, "ab")  # noqa: SIM115 - owned by the process
        self.agent_proc = self.nodes["pop"].popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env())
        return self.agent_proc

    @property
    def agent_log_path(self) -> Path:
        return self.workdir("pop") / "agent.log"

    def agent_log(self) -> str:
        return self.agent_log_path.read_text(errors="replace")

    def agent_pid(self) -> int | None:
        """The API process (anycast-agent run) under ExaBGP, if one is running."""
        if self.agent_proc is None:
            return None
        for pid in children_of(self.agent_proc.pid):
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
            raise RuntimeError("no agent process is running")
        os.kill(pid, sig)
        return pid

    def stop_exabgp(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal ExaBGP (the service's main process) and wait for it to exit.

        Through our own Popen, not Netns.terminate: ``launch`` exec'd into ExaBGP, so the
        command line no longer matches the record, and the harness (rightly) refuses to
        kill a PID whose command line changed. An unreaped Popen child cannot be reused.
        """
        if self.agent_proc is None or self.agent_proc.poll() is not None:
            return
        self.agent_proc.send_signal(sig)
        try:
            self.agent_proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.agent_proc.kill()
            self.agent_proc.wait(5)

    # --- observations ----------------------------------------------------------------------
    def metrics(self) -> str:
        """Scrape the agent's metrics from inside the POP namespace."""
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        code = f"import urllib.request,sys;sys.stdout.write(urllib.request.urlopen({url!r},timeout=2).read().decode())"
        r = self.nodes["pop"].run([sys.executable, "-c", code], check=False, timeout=5)
        return r.stdout if r.returncode == 0 else ""

    def request_vip(self, path: str = "/", timeout: float = 1.0) -> str | None:
        """One HTTP request from the router's side to the VIP: who served it, or None."""
        url = f"http://{VIP}{urllib.parse.quote(path)}"
        code = (f"import urllib.request,sys\ntry:\n sys.stdout.write(urllib.request.urlopen({url!r},"
                f"timeout={timeout}).read().decode())\nexcept Exception as e:\n sys.stdout.write('')")
        r = self.nodes["rtr"].run([sys.executable, "-c", code], check=False, timeout=timeout + 5)
        return r.stdout.strip() or None

    def pop_kernel_routes(self) -> str:
        return self.nodes["pop"].run(["ip", "route", "show", "proto", "99"]).stdout


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env
