"""One POP, for the agent's integration tests and the first demo.

    rtr (FRR, AS 65001)  100.64.1.1/30 ---- 100.64.1.2/30  pop (ExaBGP + anycast-agent, AS 65101)
                                                      |  100.64.10.2/30 ---- 100.64.10.1/30  usw (origin us-west)
                                                      |  100.64.20.2/30 ---- 100.64.20.1/30  euc (origin eu-central)

The addresses match configs/agent-sjc.yaml, which the agent runs unchanged. Each origin
holds the VIP on its loopback (it is the CLB) and runs lab.backend on the backend
addresses the config lists and on port 80 for client traffic to the VIP. ``rtr`` plays the
client side: a request from it to the VIP follows FRR's FIB to the POP, then the POP's
kernel route (installed by the agent) to the active origin.

With ``ipv6=True`` every link is dual-stack (fd00:64:1::/64 rtr--pop, fd00:64:10::/64 and
fd00:64:20::/64 toward the origins, each origin's end ::1, pop's ::2), rtr has a second BGP
session over IPv6 (fd00:64:1::1 -- fd00:64:1::2, IPv6 unicast only) and each origin holds
VIP6 (2001:db8:51::10/128, inside the example config's allowed_prefixes) on loopback too.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .frr import FrrRouter
from .netns import Lab, Netns, add_addr, add_route, veth
from .nodes import AgentNode, scrape, start_backend

ROOT = Path(__file__).resolve().parents[1]
AGENT_CONFIG = ROOT / "configs" / "agent-sjc.yaml"
VIP = "198.51.100.10"
VIP6 = "2001:db8:51::10"
RTR6, POP6 = "fd00:64:1::1", "fd00:64:1::2"
ORIGIN6 = {"usw": "fd00:64:10::1", "euc": "fd00:64:20::1"}  # node: its end of the link; pop is ::2
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
# The IPv6 session of the dual-stack lab: its own family only (FRR would also activate IPv4
# unicast on it by default, and the agent sends each family to its own sessions).
FRR_BGPD_V6_NEIGHBOR = f"""\
 neighbor {POP6} remote-as 65101
 neighbor {POP6} timers 1 3
 neighbor {POP6} timers connect 1
"""
FRR_BGPD_V6_AF = f"""\
 address-family ipv4 unicast
  no neighbor {POP6} activate
 exit-address-family
 address-family ipv6 unicast
  neighbor {POP6} activate
  neighbor {POP6} route-map NONE-OUT out
 exit-address-family
"""

ORIGINS = {
    # node: (region, address of its end of the backbone link, backend ports)
    "usw": ("us-west", "100.64.10.1", (8080, 8081)),
    "euc": ("eu-central", "100.64.20.1", (8080,)),
}


def build(lab: Lab, origins: Mapping[str, str], *, vip: str | None = VIP,
          ipv6: bool = False) -> tuple[dict[str, Netns], FrrRouter]:
    """The nodes of the picture above: rtr (FRR started) -- pop, and one node per origin.

    `origins` maps an origin node's name to its address on its /30 toward pop (pop takes
    .2, the origin routes via it); with `vip`, each origin holds it on loopback. `ipv6`: the
    dual-stack variant (module docstring; origins named as in `ORIGIN6`).
    """
    nodes = {node: lab.netns(node) for node in ("rtr", "pop", *origins)}
    rtr, pop = nodes["rtr"], nodes["pop"]
    veth(rtr, "eth-pop", pop, "eth-rtr")
    add_addr(rtr, "eth-pop", "100.64.1.1/30")
    add_addr(pop, "eth-rtr", "100.64.1.2/30")
    for node, addr in origins.items():
        ns = nodes[node]
        veth(pop, f"eth-{node}", ns, "eth-pop")
        base = addr.rsplit(".", 1)[0]
        add_addr(ns, "eth-pop", f"{addr}/30")
        add_addr(pop, f"eth-{node}", f"{base}.2/30")
        if vip is not None:
            add_addr(ns, "lo", f"{vip}/32")  # the origin's CLB holds the VIP
        add_route(ns, "default", f"{base}.2")
        if ipv6:
            mine = ORIGIN6[node]
            add_addr(ns, "eth-pop", f"{mine}/64")
            add_addr(pop, f"eth-{node}", f"{mine.removesuffix('1')}2/64")
            add_addr(ns, "lo", f"{VIP6}/128")
            add_route(ns, "default", f"{mine.removesuffix('1')}2")
    workdir = lab.workdir("rtr")
    bgpd = FRR_BGPD.format(log=workdir / "log")
    if ipv6:
        add_addr(rtr, "eth-pop", f"{RTR6}/64")
        add_addr(pop, "eth-rtr", f"{POP6}/64")
        bgpd = bgpd.replace(" address-family ipv4 unicast\n", FRR_BGPD_V6_NEIGHBOR + " address-family ipv4 unicast\n", 1)
        bgpd = bgpd.replace("!\nroute-map", FRR_BGPD_V6_AF + "!\nroute-map", 1)
    router = FrrRouter(rtr, workdir, {"bgpd": bgpd}).start()
    return nodes, router


@dataclass
class SinglePop:
    lab: Lab
    agent_config: Path = AGENT_CONFIG
    nodes: dict[str, Netns] = field(default_factory=dict)
    router: Any = None  # the FrrRouter on rtr, once up
    agent: AgentNode | None = None
    backends: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    ipv6: bool = False

    # --- bring-up ----------------------------------------------------------------------
    def up(self) -> SinglePop:
        origins = {node: addr for node, (_, addr, _) in ORIGINS.items()}
        self.nodes, self.router = build(self.lab, origins, vip=VIP, ipv6=self.ipv6)
        return self

    def workdir(self, node: str) -> Path:
        return self.lab.workdir(node)

    # --- backends ----------------------------------------------------------------------
    def start_backends(self, node: str) -> None:
        region, addr, ports = ORIGINS[node]
        listens = [f"{addr}:{p}" for p in ports] + ["0.0.0.0:80"]
        if self.ipv6:
            listens += [f"[{ORIGIN6[node]}]:{p}" for p in ports] + ["[::]:80"]
        self.backends[node] = start_backend(self.nodes[node], self.workdir(node), region, listens)

    def stop_backends(self, node: str) -> None:
        proc = self.backends.pop(node, None)
        if proc is not None:
            self.nodes[node].terminate(proc.pid)

    # --- the agent -----------------------------------------------------------------------
    def start_agent(self) -> subprocess.Popen[Any]:
        """Start the agent the way systemd does: ``anycast-agent launch`` execs ExaBGP."""
        self.agent = AgentNode(self.nodes["pop"], self.workdir("pop"), self.agent_config, METRICS_PORT)
        return self.agent.start()

    @property
    def agent_proc(self) -> subprocess.Popen[Any] | None:
        return self.agent.proc if self.agent else None

    @property
    def agent_log_path(self) -> Path:
        return self.workdir("pop") / "agent.log"

    def agent_log(self) -> str:
        return self.agent.log() if self.agent else ""

    def agent_pid(self) -> int | None:
        return self.agent.agent_pid() if self.agent else None

    def signal_agent(self, sig: int) -> int:
        if self.agent is None:
            raise RuntimeError("no agent was started")
        return self.agent.signal_agent(sig)

    def stop_exabgp(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.agent is not None:
            self.agent.stop_exabgp(sig, timeout)

    # --- observations ----------------------------------------------------------------------
    def metrics(self) -> str:
        """Scrape the agent's metrics from inside the POP namespace."""
        return scrape(self.nodes["pop"], METRICS_PORT)

    def request_vip(self, path: str = "/", timeout: float = 1.0, *, vip: str = VIP) -> str | None:
        """One HTTP request from the router's side to the VIP (or `vip`, VIP6 say): who
        served it, or None."""
        host = f"[{vip}]" if ":" in vip else vip
        return http_get(self.nodes["rtr"], f"http://{host}{urllib.parse.quote(path)}", timeout)

    def pop_kernel_routes(self) -> str:
        return self.nodes["pop"].run(["ip", "route", "show", "proto", "99"]).stdout


@contextmanager
def serving(prefix: str, config: str | None = None, *, agent: bool = True, ipv6: bool = False) -> Iterator[SinglePop]:
    """The single-POP lab as most agent tests want it: up, both origins' backends serving,
    the agent config (``config`` YAML text, else configs/agent-sjc.yaml) in the POP's work dir,
    the agent started unless ``agent=False``; dual-stack with `ipv6`. Everything is torn down
    on exit, pass or fail."""
    lab = Lab(prefix)
    try:
        topo = SinglePop(lab, ipv6=ipv6).up()
        topo.agent_config = topo.workdir("pop") / "agent.yaml"
        topo.agent_config.write_text(AGENT_CONFIG.read_text() if config is None else config)
        for node in ("usw", "euc"):
            topo.start_backends(node)
        if agent:
            topo.start_agent()
        yield topo
    finally:
        lab.teardown()


def http_get(ns: Netns, url: str, timeout: float = 1.0) -> str | None:
    """One HTTP GET from inside ``ns``: the body, or None if it failed."""
    code = (f"import urllib.request,sys\ntry:\n sys.stdout.write(urllib.request.urlopen({url!r},"
            f"timeout={timeout}).read().decode())\nexcept Exception as e:\n sys.stdout.write('')")
    # (the run's own bound is a hang guard: a Python start on a loaded machine takes seconds)
    r = ns.run([sys.executable, "-c", code], check=False, timeout=timeout + 30)
    return r.stdout.strip() or None
