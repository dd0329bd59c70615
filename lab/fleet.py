"""The full lab: a topology file (lab/topologies/) instantiated in network namespaces.

Per node, one namespace: transit routers (FRR bgpd + bfdd), POP routers (FRR bgpd + bfdd
+ staticd), agent hosts (ExaBGP + anycast-agent, as systemd starts them), origins (the
VIPs on loopback, lab.backend as CLB backends and on port 80), clients (lab.client), and
``ctl`` (the controller, and Prometheus scraping every daemon).

Traffic: client -> its transit -> (BGP best path) a POP router -> that POP's agent host,
which routes the VIP to the active origin (the agent's kernel route) and NATs to its
backbone address, so an origin's answer names the POP the request came through.

A dual-stack topology (``ipv6:`` in its file) adds IPv6 on every link but the management
network, an IPv6 twin of every BGP session (IPv6 unicast only on it; the IPv4 sessions carry
IPv4 only), the IPv6 VIPs on the origins, IPv6 backends, and the same NAT and fallback
routes in IPv6. Each agent runs one ExaBGP with both sessions to its POP router.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .frr import FrrRouter
from .multi_pop import bridge, bridge_port, git
from .netns import Lab, LabError, Netns, add_addr, veth
from .nodes import ROOT, AgentNode, lab_env, scrape, start_backend
from .tls import TRUST_LAST_ARG, LabTls, lab_tls
from .topology import Client, Pop, Topology

LAB_TOKENS = ROOT / "configs" / "controller" / "lab-tokens"  # operator.token, <pop>.token
AGENT_LINK = ("100.64.1.1", "100.64.1.2")  # POP router, agent host: the same /30 in every POP
AGENT_LINK6 = ("2001:db8:64:1::1", "2001:db8:64:1::2")  # the same in IPv6 (a /64), dual-stack topologies
VIP6_RANGE = "2001:db8:51::/48"  # the IPv6 VIPs (as configs/agent-sjc-controlled.yaml allows)
CONTROLLER_PORT, CONTROLLER_METRICS_PORT, PROMETHEUS_PORT, AGENT_METRICS_PORT = 9800, 9801, 9090, 9701

BFDD = """\
bfd
 profile fast
  transmit-interval 100
  receive-interval 100
  detect-multiplier 3
 !
!
"""


def _bgp_header(name: str, asn: int, router_id: str, log: Path) -> list[str]:
    return [f"hostname {name}", f"log file {log}/bgpd.log", f"router bgp {asn}", f" bgp router-id {router_id}",
            " no bgp ebgp-requires-policy", " no bgp network import-check", " timers bgp 1 3"]


def _neighbor(addr: str, asn: int, bfd: bool) -> list[str]:
    lines = [f" neighbor {addr} remote-as {asn}", f" neighbor {addr} timers connect 1"]
    return lines + ([f" neighbor {addr} bfd profile fast"] if bfd else [])


def _ipv6_twins(sessions: list[tuple[str, int, bool]], ipv4_af: list[str], ipv6_af: list[str]) -> list[str]:
    """The IPv6 sessions (address, ASN, BFD) as neighbor lines; each is taken out of
    ``ipv4_af`` (FRR activates IPv4 unicast on every neighbor) and activated in ``ipv6_af``."""
    lines = [line for addr, asn, bfd in sessions for line in _neighbor(addr, asn, bfd)]
    ipv4_af += [f"  no neighbor {addr} activate" for addr, _, _ in sessions]
    ipv6_af += [f"  neighbor {addr} activate" for addr, _, _ in sessions]
    return lines


def transit_bgpd(topo: Topology, node: str, log: Path) -> str:
    t = topo.transit(node)
    lines = _bgp_header(node, t.asn, _transit_router_id(topo, node), log)
    v6: list[tuple[str, int, bool]] = []  # the IPv6 twins (dual-stack topologies)
    for k, (a, b) in enumerate(topo.transit_links):
        if node in (a, b):
            theirs = topo.transit_link(k)[1 if node == a else 0]
            lines += _neighbor(theirs, topo.transit(b if node == a else a).asn, bfd=False)
            v6.append((topo.transit_link6(k)[1 if node == a else 0], topo.transit(b if node == a else a).asn, False))
    for p in topo.pops:
        if p.transit == node:
            lines += _neighbor(p.uplink[1], p.asn, bfd=True)
            v6.append((p.uplink6[1], p.asn, True))
    ipv4_af = [" address-family ipv4 unicast", "  redistribute connected"]
    ipv6_af = [" address-family ipv6 unicast", "  redistribute connected"]
    if topo.ipv6:
        lines += _ipv6_twins(v6, ipv4_af, ipv6_af)
    lines += [*ipv4_af, " exit-address-family"]
    if topo.ipv6:
        lines += [*ipv6_af, " exit-address-family"]
    lines += ["!"]
    return "\n".join(lines) + "\n"


def _transit_router_id(topo: Topology, node: str) -> str:
    k = next(i for i, link in enumerate(topo.transit_links) if node in link)
    a, b = topo.transit_link(k)
    return a if topo.transit_links[k][0] == node else b


def pop_bgpd(topo: Topology, pop: Pop, log: Path) -> str:
    transit_side, mine = pop.uplink
    lines = _bgp_header(pop.router, pop.asn, mine, log)
    lines += _neighbor(transit_side, topo.transit(pop.transit).asn, bfd=True)
    lines += _neighbor(AGENT_LINK[1], topo.agent_asn, bfd=False)
    ipv4_af = [" address-family ipv4 unicast", f"  neighbor {AGENT_LINK[1]} route-map NONE out",
               f"  neighbor {transit_side} route-map VIPS-ONLY out"]
    ipv6_af = [" address-family ipv6 unicast"]
    if topo.ipv6:
        lines += _ipv6_twins([(pop.uplink6[0], topo.transit(pop.transit).asn, True),
                              (AGENT_LINK6[1], topo.agent_asn, False)], ipv4_af, ipv6_af)
        ipv6_af += [f"  neighbor {AGENT_LINK6[1]} route-map NONE out",
                    f"  neighbor {pop.uplink6[0]} route-map VIPS6-ONLY out"]
    lines += [*ipv4_af, " exit-address-family"]
    if topo.ipv6:
        lines += [*ipv6_af, " exit-address-family"]
    lines += ["!", "ip prefix-list VIPS seq 5 permit 198.51.100.0/24 le 32", "!",
              "route-map VIPS-ONLY permit 10", " match ip address prefix-list VIPS", "!",
              "route-map NONE deny 10", "!"]
    if topo.ipv6:
        lines += [f"ipv6 prefix-list VIPS6 seq 5 permit {VIP6_RANGE} le 128", "!",
                  "route-map VIPS6-ONLY permit 10", " match ipv6 address prefix-list VIPS6", "!"]
    return "\n".join(lines) + "\n"


def pop_staticd(topo: Topology) -> str:
    """A floating VIP route toward the agent host (distance 250): while the upstream has
    not yet switched away after a withdrawal, VIP packets still go to the POP's service
    side instead of looping back upstream (LAB-NOTES: 3-5 failed requests without it)."""
    return "".join(f"ip route {v}/32 {AGENT_LINK[1]} 250\n" for v in topo.vips) + \
        "".join(f"ipv6 route {v}/128 {AGENT_LINK6[1]} 250\n" for v in topo.vips6)


def host_prefix(vip: str) -> str:
    """The VIP's host route: ``A/32``, or ``A/128`` for an IPv6 VIP."""
    return f"{vip}/128" if ":" in vip else f"{vip}/32"


class Fleet:
    """One instantiated topology. ``up()`` builds and starts everything; ``lab.teardown()``
    (or ``python -m lab down``) removes it."""

    def __init__(self, lab: Lab, topo: Topology, *, controller_edit: Callable[[Path], None] | None = None,
                 prometheus: bool = False) -> None:
        self.lab = lab
        self.topo = topo
        self.controller_edit = controller_edit
        self.with_prometheus = prometheus
        self.nodes: dict[str, Netns] = {}
        self.routers: dict[str, FrrRouter] = {}  # by node name: t-na, rtr-sjc, ...
        self.agents: dict[str, AgentNode] = {}  # by POP name
        self.backends: dict[str, subprocess.Popen[Any]] = {}  # by origin node
        self.clients: dict[str, subprocess.Popen[Any]] = {}  # by client node
        self.controller: subprocess.Popen[Any] | None = None
        self.prometheus: subprocess.Popen[Any] | None = None
        self.config_dir = lab.workdir(topo.controller_node) / "desired"
        self._tls: LabTls | None = None

    # --- building -------------------------------------------------------------------------
    def up(self) -> Fleet:
        self.build_network()
        self.start_routers()
        for o in self.topo.origins:
            self.start_backends(o.node)
        self.prepare_controller_config()
        self.start_controller()
        for p in self.topo.pops:
            self.start_agent(p.name)
        if self.with_prometheus:
            self.start_prometheus()
        return self

    def build_network(self) -> None:
        topo = self.topo
        ns = self.nodes
        ctl = ns[topo.controller_node] = self.lab.netns(topo.controller_node)
        bridge(ctl, f"{topo.controller_address}/24")
        for o in topo.origins:
            ns[o.node] = self.lab.netns(o.node)
            bridge(ns[o.node], f"{o.address}/24")
            for vip in topo.vips:
                add_addr(ns[o.node], "lo", f"{vip}/32")
        for t in topo.transits:
            ns[t.node] = self.lab.netns(t.node)
        for k, (a, b) in enumerate(topo.transit_links):
            ia, ib = f"to-{b}", f"to-{a}"
            veth(ns[a], ia, ns[b], ib)
            add_addr(ns[a], ia, topo.transit_link(k)[0] + "/30")
            add_addr(ns[b], ib, topo.transit_link(k)[1] + "/30")
        for p in topo.pops:
            rtr = ns[p.router] = self.lab.netns(p.router)
            host = ns[p.agent] = self.lab.netns(p.agent)
            veth(ns[p.transit], f"to-{p.name}", rtr, "uplink")
            add_addr(ns[p.transit], f"to-{p.name}", p.uplink[0] + "/30")
            add_addr(rtr, "uplink", p.uplink[1] + "/30")
            veth(rtr, "eth-pop", host, "eth-rtr")
            add_addr(rtr, "eth-pop", AGENT_LINK[0] + "/30")
            add_addr(host, "eth-rtr", AGENT_LINK[1] + "/30")
            host.run(["ip", "route", "add", "default", "via", AGENT_LINK[0]])
            bridge_port(host, "eth-mgmt", ctl, f"p-{p.name}", f"{p.mgmt_address}/24")
            for o in topo.origins:
                bridge_port(host, f"eth-{o.node}", ns[o.node], f"p-{p.name}", f"{p.backbone_address(o)}/24")
            # The host's own fallback for VIP traffic that still arrives after the agent
            # withdrew and removed its /32 (the upstream takes ~100 ms to move away): the
            # primary origin, instead of a loop back to the POP router.
            host.run(["ip", "route", "add", "198.51.100.0/24", "via", topo.origins[0].address, "metric", "1000"])
            # Client traffic leaves toward an origin with the host's backbone address: the
            # origin answers on the backbone and tells which POP the request came through.
            ifaces = ", ".join(f'"eth-{o.node}"' for o in topo.origins)
            host.run(["nft", "-f", "-"], input=(
                "table ip lab_nat {\n chain post {\n  type nat hook postrouting priority 100;\n"
                f"  oifname {{ {ifaces} }} masquerade\n }}\n}}\n"))
        for c in topo.clients:
            cl = ns[c.node] = self.lab.netns(c.node, forwarding=False)
            veth(ns[c.transit], f"to-{c.node}", cl, "eth0")
            add_addr(ns[c.transit], f"to-{c.node}", c.link[0] + "/30")
            add_addr(cl, "eth0", c.link[1] + "/30")
            cl.run(["ip", "route", "add", "default", "via", c.link[0]])
        if topo.ipv6:
            self.build_network6()

    def build_network6(self) -> None:
        """The IPv6 half of a dual-stack topology, on the links ``build_network`` made (the
        same picture, the same roles: module docstring)."""
        topo, ns = self.topo, self.nodes
        for o in topo.origins:
            add_addr(ns[o.node], "br0", f"{o.address6}/64")
            for vip in topo.vips6:
                add_addr(ns[o.node], "lo", f"{vip}/128")
        for k, (a, b) in enumerate(topo.transit_links):
            add_addr(ns[a], f"to-{b}", topo.transit_link6(k)[0] + "/64")
            add_addr(ns[b], f"to-{a}", topo.transit_link6(k)[1] + "/64")
        for p in topo.pops:
            rtr, host = ns[p.router], ns[p.agent]
            add_addr(ns[p.transit], f"to-{p.name}", p.uplink6[0] + "/64")
            add_addr(rtr, "uplink", p.uplink6[1] + "/64")
            add_addr(rtr, "eth-pop", AGENT_LINK6[0] + "/64")
            add_addr(host, "eth-rtr", AGENT_LINK6[1] + "/64")
            host.run(["ip", "-6", "route", "add", "default", "via", AGENT_LINK6[0]])
            for o in topo.origins:
                add_addr(host, f"eth-{o.node}", f"{p.backbone_address6(o)}/64")
            host.run(["ip", "-6", "route", "add", VIP6_RANGE, "via", str(topo.origins[0].address6), "metric", "1000"])
            ifaces = ", ".join(f'"eth-{o.node}"' for o in topo.origins)
            host.run(["nft", "-f", "-"], input=(
                "table ip6 lab_nat6 {\n chain post {\n  type nat hook postrouting priority 100;\n"
                f"  oifname {{ {ifaces} }} masquerade\n }}\n}}\n"))
        for c in topo.clients:
            add_addr(ns[c.transit], f"to-{c.node}", c.link6[0] + "/64")
            add_addr(ns[c.node], "eth0", c.link6[1] + "/64")
            ns[c.node].run(["ip", "-6", "route", "add", "default", "via", c.link6[0]])

    def start_routers(self) -> None:
        for t in self.topo.transits:
            wd = self.lab.workdir(t.node)
            self.routers[t.node] = FrrRouter(self.nodes[t.node], wd, {
                "bgpd": transit_bgpd(self.topo, t.node, wd / "log"), "bfdd": BFDD})
        for p in self.topo.pops:
            wd = self.lab.workdir(p.router)
            self.routers[p.router] = FrrRouter(self.nodes[p.router], wd, {
                "bgpd": pop_bgpd(self.topo, p, wd / "log"), "bfdd": BFDD, "staticd": pop_staticd(self.topo)})
        for r in self.routers.values():
            r.start()

    # --- daemons ----------------------------------------------------------------------------
    def start_backends(self, node: str) -> None:
        o = next(o for o in self.topo.origins if o.node == node)
        listens = [f"{o.address}:{p}" for p in o.ports] + ["0.0.0.0:80"]
        if self.topo.ipv6:
            listens += [f"[{o.address6}]:{p}" for p in o.ports] + ["[::]:80"]
        self.backends[node] = start_backend(self.nodes[node], self.lab.workdir(node), o.region, listens)

    def stop_backends(self, node: str) -> None:
        proc = self.backends.pop(node, None)
        if proc is not None:
            self.nodes[node].terminate(proc.pid)

    @property
    def tls(self) -> LabTls:
        """This run's throwaway CA and controller certificate (HTTPS, as in production)."""
        if self._tls is None:
            self._tls = lab_tls(self.lab.workdir("tls"), self.controller_addresses())
        return self._tls

    def controller_addresses(self) -> tuple[str, ...]:
        return (self.topo.controller_address,)

    def prepare_controller_config(self) -> None:
        shutil.rmtree(self.config_dir, ignore_errors=True)  # a checkout from an earlier run
        shutil.copytree(ROOT / "configs" / "controller", self.config_dir, dirs_exist_ok=True)
        self.tls.serve(self.config_dir)
        if self.controller_edit is not None:
            self.controller_edit(self.config_dir)
        git(self.config_dir, "init", "-q")
        git(self.config_dir, "add", "-A")
        git(self.config_dir, "commit", "-qm", "lab: initial desired state")

    def commit(self, message: str) -> None:
        git(self.config_dir, "commit", "-qam", message)

    def edit_controller_yaml(self, name: str, edit: Callable[[Any], None]) -> None:
        path = self.config_dir / name
        data = yaml.safe_load(path.read_text())
        edit(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    def start_controller(self) -> None:
        exe = str(Path(sys.executable).parent / "anycast-controller")
        wd = self.lab.workdir(self.topo.controller_node)
        addr = self.topo.controller_address
        log = open(wd / "controller.log", "ab")  # noqa: SIM115 - owned by the process
        self.controller = self.nodes[self.topo.controller_node].popen(
            [exe, "--config-dir", str(self.config_dir), "--state-dir", str(wd / "state"),
             "--listen", f"{addr}:{CONTROLLER_PORT}", "--metrics-listen", f"{addr}:{CONTROLLER_METRICS_PORT}"],
            stdout=log, stderr=subprocess.STDOUT, env=lab_env())

    def stop_controller(self) -> None:
        if self.controller is not None:
            self.nodes[self.topo.controller_node].terminate(self.controller.pid)
            self.controller = None

    def controller_log(self) -> str:
        path = self.lab.workdir(self.topo.controller_node) / "controller.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def controller_metrics(self) -> str:
        ctl = self.nodes[self.topo.controller_node]
        url = f"http://{self.topo.controller_address}:{CONTROLLER_METRICS_PORT}/metrics"
        code = f"import urllib.request,sys;sys.stdout.write(urllib.request.urlopen({url!r},timeout=10).read().decode())"
        r = ctl.run([sys.executable, "-c", code], check=False, timeout=30)
        return r.stdout if r.returncode == 0 else ""

    def controller_api(self, path: str, token_file: Path) -> Any:
        """GET ``path`` of the controller's API from inside ``ctl``: the parsed JSON, None
        if the controller does not answer (stopped, starting; the timeouts are generous, as
        lab.nodes.scrape's). An HTTP error raises LabError: a wrong token or path is the
        test's bug, not "not yet"."""
        url = f"https://{self.topo.controller_address}:{CONTROLLER_PORT}{path}"
        code = (TRUST_LAST_ARG + "import urllib.request,urllib.error\n"
                "req=urllib.request.Request(sys.argv[1],headers={'Authorization':'Bearer '+open(sys.argv[2]).read().strip()})\n"
                "try: sys.stdout.write(urllib.request.urlopen(req,timeout=10,context=CTX).read().decode())\n"
                "except urllib.error.HTTPError as e: sys.stdout.write(f'{e.code} {e.read().decode()}'); sys.exit(4)\n"
                "except OSError: sys.exit(3)\n")
        r = self.nodes[self.topo.controller_node].run([sys.executable, "-c", code, url, str(token_file),
                                                       str(self.tls.ca)], check=False, timeout=30)
        if r.returncode == 4:
            raise LabError(f"controller GET {path}: HTTP {r.stdout}")
        return json.loads(r.stdout) if r.returncode == 0 else None

    def status(self) -> dict[str, Any] | None:
        """The controller's ``/v1/status`` (None while it does not answer)."""
        body: dict[str, Any] | None = self.controller_api("/v1/status", LAB_TOKENS / "operator.token")
        return body

    def explain(self, vip: str) -> dict[str, Any] | None:
        """The controller's ``/v1/explain/{vip}``: per POP wanted, drain, reason, origin."""
        body: dict[str, Any] | None = self.controller_api(f"/v1/explain/{vip}", LAB_TOKENS / "operator.token")
        return body

    def plan(self, pop: str) -> dict[str, Any] | None:
        """The plan the controller serves ``pop`` (``/v1/plans/{pop}`` with the POP's token)."""
        body: dict[str, Any] | None = self.controller_api(f"/v1/plans/{pop}", LAB_TOKENS / f"{pop}.token")
        return body

    def agent_config(self, pop: Pop) -> Path:
        data = yaml.safe_load((ROOT / "configs" / "agent-sjc-controlled.yaml").read_text())
        data["pop"] = pop.name
        data["bgp"]["neighbors"][0]["peer_as"] = pop.asn
        data["controller"]["token_file"] = str(LAB_TOKENS / f"{pop.name}.token")
        data["controller"]["url"] = f"https://{self.topo.controller_address}:{CONTROLLER_PORT}"
        self.tls.trust(data["controller"])
        if self.topo.ipv6:  # the IPv6 session, in the same agent and ExaBGP as the IPv4 one
            data["bgp"]["neighbors"].append({"address": AGENT_LINK6[0], "local_address": AGENT_LINK6[1],
                                             "router_id": AGENT_LINK[1], "peer_as": pop.asn, "hold_time": 3})
        path = self.lab.workdir(pop.agent) / "agent.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def start_agent(self, pop: str) -> AgentNode:
        p = self.topo.pop(pop)
        node = self.agents.get(pop) or AgentNode(self.nodes[p.agent], self.lab.workdir(p.agent), self.agent_config(p),
                                                 AGENT_METRICS_PORT)
        self.agents[pop] = node
        node.start()
        return node

    def start_prometheus(self) -> None:
        """Debian's Prometheus in ``ctl``, scraping the controller and every agent each
        second, with ops/prometheus/alerts.yml loaded (``for:`` shortened to 2 s)."""
        prom = shutil.which("prometheus")
        if prom is None:
            raise LabError("prometheus is not installed (apt-get install prometheus)")
        wd = self.lab.workdir("prometheus")
        # ops/'s rules as they are, except `for:` (1m and more, for a fleet) shortened to
        # 2s, so alerts fire within the lab's seconds-long scenarios.
        rules = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "2s"
        (wd / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(wd / "alerts.yml")],
            "scrape_configs": [
                {"job_name": "anycast-controller", "static_configs": [
                    {"targets": [f"{self.topo.controller_address}:{CONTROLLER_METRICS_PORT}"]}]},
                {"job_name": "anycast-agent", "static_configs": [
                    {"targets": [f"{p.mgmt_address}:{AGENT_METRICS_PORT}"], "labels": {"pop": p.name}}
                    for p in self.topo.pops]},
            ],
        }
        (wd / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        log = open(wd / "prometheus.log", "ab")  # noqa: SIM115 - owned by the process
        self.prometheus = self.nodes[self.topo.controller_node].popen(
            [prom, f"--config.file={wd / 'prometheus.yml'}", f"--storage.tsdb.path={wd / 'data'}",
             f"--web.listen-address={self.topo.controller_address}:{PROMETHEUS_PORT}"],
            stdout=log, stderr=subprocess.STDOUT)

    def prometheus_query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query against the lab's Prometheus ([] if it does not answer)."""
        ctl = self.nodes[self.topo.controller_node]
        url = f"http://{self.topo.controller_address}:{PROMETHEUS_PORT}/api/v1/query"
        code = ("import urllib.request,urllib.parse,sys;"
                f"sys.stdout.write(urllib.request.urlopen({url!r}+'?'+urllib.parse.urlencode("
                f"{{'query': sys.argv[1]}}),timeout=10).read().decode())")
        r = ctl.run([sys.executable, "-c", code, expr], check=False, timeout=30)
        if r.returncode != 0:
            return []
        result: list[dict[str, Any]] = json.loads(r.stdout).get("data", {}).get("result", [])
        return result

    # --- clients ------------------------------------------------------------------------------
    def client_log_path(self, client: str, family: int = 4) -> Path:
        """The client's request log for its IPv4 VIP, or with ``family=6`` for its IPv6 VIP."""
        return self.lab.workdir(client) / ("requests.jsonl" if family == 4 else "requests6.jsonl")

    def start_clients(self, vip: str, interval: float = 0.02, timeout: float = 0.5) -> None:
        """A client in every client node, sending to ``vip``; an IPv6 VIP's run beside the
        IPv4 ones (keyed ``NODE/6`` in ``clients``, logged apart: ``requests(..., family=6)``)."""
        family = ipaddress.ip_address(vip).version
        for c in self.topo.clients:
            out = self.client_log_path(c.node, family)
            out.unlink(missing_ok=True)
            self.clients[c.node if family == 4 else f"{c.node}/6"] = self.nodes[c.node].popen(
                [sys.executable, "-m", "lab.client", "--vip", vip, "--out", str(out),
                 "--interval", str(interval), "--timeout", str(timeout)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(ROOT), env=lab_env())

    def stop_clients(self) -> None:
        for key, proc in list(self.clients.items()):
            self.nodes[key.removesuffix("/6")].terminate(proc.pid)
        self.clients.clear()

    def requests(self, client: str, since: float = 0.0, family: int = 4) -> list[dict[str, Any]]:
        """The client's requests sent at or after ``since`` (unix time), each with ``pop``
        (to its IPv6 VIP with ``family=6``)."""
        path = self.client_log_path(client, family)
        out = []
        for line in path.read_text().splitlines() if path.exists() else ():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written
            if r["t"] >= since:
                r["pop"] = self.topo.pop_of_backbone_address(r.get("peer", "")) if r.get("ok") else None
                out.append(r)
        return out

    # --- observing ----------------------------------------------------------------------------
    def announced(self, pop: str, vip: str) -> bool:
        """The POP router has the VIP from its agent (the agent announces it; an IPv6 VIP
        over the IPv6 session)."""
        agent = AGENT_LINK6[1] if ":" in vip else AGENT_LINK[1]
        entry = self.routers[self.topo.pop(pop).router].bgp_route(host_prefix(vip))
        return entry is not None and any(p.get("peer", {}).get("peerId") == agent
                                         for p in entry.get("paths", []))

    def ingress(self, client: Client | str, vip: str) -> str | None:
        """The POP a client's transit prefers for the VIP now: its BGP RIB's best path. Zebra
        installs that in the kernel a moment later (longer under load): before measuring
        traffic, wait for ``ingress_fib``, which is what packets follow."""
        c = client if isinstance(client, Client) else next(x for x in self.topo.clients if x.node == client)
        entry = self.routers[c.transit].bgp_route(host_prefix(vip))
        if entry is None:
            return None
        for path in entry.get("paths", []):
            if path.get("bestpath", {}).get("overall"):
                asns = [int(a) for a in str(path.get("aspath", {}).get("string", "")).split() if a.isdigit()]
                return next((p.name for p in self.topo.pops for a in asns if a == p.asn), None)
        return None

    def ingress_fib(self, client: Client | str, vip: str) -> str | None:
        """The POP a client's packets to the VIP reach now, by the kernel FIBs of the transits on
        their way (None: no route, or a multipath one). Read hop by hop from each transit's
        route's interface (``to-POP`` or ``to-TRANSIT``), since an IPv6 next hop may be link-local."""
        c = client if isinstance(client, Client) else next(x for x in self.topo.clients if x.node == client)
        node = c.transit
        for _ in self.topo.transits:  # a path visits each transit at most once
            devs = {r.get("dev") for r in self.routers[node].fib_routes(host_prefix(vip)) if r.get("protocol") == "bgp"}
            if len(devs) != 1:
                return None
            hop = str(devs.pop()).removeprefix("to-")
            if any(p.name == hop and p.transit == node for p in self.topo.pops):
                return hop
            if not any(t.node == hop for t in self.topo.transits):
                return None
            node = hop
        return None

    def nearest(self, client: Client) -> str:
        """The POP on the client's own transit: where ordinary BGP should send it."""
        return next(p.name for p in self.topo.pops if p.transit == client.transit)

    def agent_metrics(self, pop: str) -> str:
        return scrape(self.nodes[self.topo.pop(pop).agent], AGENT_METRICS_PORT)

    def wait_converged(self, vip: str, timeout: float = 60.0) -> None:
        """Every POP that publishes ``vip`` announces it and every client's transit routes it,
        in its kernel FIB, to the client's nearest POP: client traffic can follow at once
        (bgpd's best path alone is not enough: the first SYNs would meet "no route")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.ingress_fib(c, vip) == self.nearest(c) for c in self.topo.clients) and \
                    all(self.announced(p.name, vip) for p in self.topo.pops):
                return
            time.sleep(0.2)
        raise LabError(f"{vip} did not converge within {timeout:.0f}s: " + ", ".join(
            f"{p.name} announces={self.announced(p.name, vip)}" for p in self.topo.pops) + "; " + ", ".join(
            f"{c.node} via {self.ingress_fib(c, vip)} (FIB), {self.ingress(c, vip)} (RIB)" for c in self.topo.clients))

