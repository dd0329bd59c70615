"""Several POPs following the central controller, for the controller's end-to-end tests.

    mgmt (controller 192.0.2.1, bridge) ---- 192.0.2.1N  pop-X (ExaBGP + agent) ---- rtr-X (FRR)
                                                          |   100.64.1.2/30 -- 100.64.1.1/30
    usw (us-west, bridge 100.64.10.1/24) ---- 100.64.10.1N
    euc (eu-central, bridge 100.64.20.1/24) - 100.64.20.1N

Every POP's agent runs configs/agent-sjc-controlled.yaml with its own pop name and token
file; the controller runs a git checkout of configs/controller/. Each origin holds the
VIPs on its loopback and runs lab.backend on the addresses vips.yaml lists.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .frr import FrrRouter
from .netns import Lab, Netns, add_addr, veth
from .tls import LabTls, lab_tls
from .nodes import ROOT, AgentNode, lab_env, start_backend
from .single_pop import FRR_BGPD

CONTROLLER_IP = "192.0.2.1"
CONTROLLER_PORT = 9800
CONTROLLER_METRICS_PORT = 9801
ORIGINS = {"usw": ("us-west", "100.64.10.1", (8080, 8081)), "euc": ("eu-central", "100.64.20.1", (8080,))}
VIPS = ("198.51.100.10", "198.51.100.20")


def bridge(ns: Netns, cidr: str) -> None:
    ns.run(["ip", "link", "add", "br0", "type", "bridge"])
    ns.run(["ip", "link", "set", "br0", "up"])
    add_addr(ns, "br0", cidr)


def bridge_port(a: Netns, if_a: str, bridge_ns: Netns, port: str, cidr: str) -> None:
    veth(a, if_a, bridge_ns, port)
    bridge_ns.run(["ip", "link", "set", port, "master", "br0"])
    add_addr(a, if_a, cidr)


def git(directory: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(directory), *args], check=True, capture_output=True,
                   env={**lab_env(), "GIT_AUTHOR_NAME": "lab", "GIT_AUTHOR_EMAIL": "lab@example.org",
                        "GIT_COMMITTER_NAME": "lab", "GIT_COMMITTER_EMAIL": "lab@example.org"})


class MultiPop:
    def __init__(self, lab: Lab, pops: tuple[str, ...] = ("sjc", "fra")) -> None:
        self.lab = lab
        self.pops = pops
        self.nodes: dict[str, Netns] = {}
        self.routers: dict[str, FrrRouter] = {}
        self.agents: dict[str, AgentNode] = {}
        self.backends: dict[str, subprocess.Popen[Any]] = {}
        self.controller: subprocess.Popen[Any] | None = None
        self.config_dir = lab.workdir("mgmt") / "desired"
        self._tls: LabTls | None = None

    @property
    def tls(self) -> LabTls:
        """This run's throwaway CA and controller certificate (HTTPS, as in production)."""
        if self._tls is None:
            self._tls = lab_tls(self.lab.workdir("tls"), (CONTROLLER_IP,))
        return self._tls

    def up(self) -> MultiPop:
        mgmt = self.nodes["mgmt"] = self.lab.netns("mgmt")
        bridge(mgmt, f"{CONTROLLER_IP}/24")
        for node, (_, addr, _) in ORIGINS.items():
            ns = self.nodes[node] = self.lab.netns(node)
            bridge(ns, f"{addr}/24")
            for vip in VIPS:
                add_addr(ns, "lo", f"{vip}/32")
        for i, pop in enumerate(self.pops):
            rtr = self.nodes[f"rtr-{pop}"] = self.lab.netns(f"rtr-{pop}")
            agent = self.nodes[f"pop-{pop}"] = self.lab.netns(f"pop-{pop}")
            veth(rtr, "eth-pop", agent, "eth-rtr")
            add_addr(rtr, "eth-pop", "100.64.1.1/30")
            add_addr(agent, "eth-rtr", "100.64.1.2/30")
            bridge_port(agent, "eth-mgmt", mgmt, f"p-{pop}", f"192.0.2.{11 + i}/24")
            for node, (_, addr, _) in ORIGINS.items():
                base = addr.rsplit(".", 1)[0]
                bridge_port(agent, f"eth-{node}", self.nodes[node], f"p-{pop}", f"{base}.{11 + i}/24")
            workdir = self.lab.workdir(f"rtr-{pop}")
            self.routers[pop] = FrrRouter(rtr, workdir, {"bgpd": FRR_BGPD.format(log=workdir / "log")}).start()
        return self

    # --- the controller ----------------------------------------------------------------------
    def prepare_config(self, edit: Any = None) -> Path:
        """A git checkout of configs/controller (optionally edited) for the controller."""
        shutil.copytree(ROOT / "configs" / "controller", self.config_dir, dirs_exist_ok=True)
        self.tls.serve(self.config_dir)
        if edit is not None:
            edit(self.config_dir)
        git(self.config_dir, "init", "-q")
        git(self.config_dir, "add", "-A")
        git(self.config_dir, "commit", "-qm", "lab: initial desired state")
        return self.config_dir

    def commit(self, message: str) -> None:
        git(self.config_dir, "commit", "-qam", message)

    def start_controller(self) -> subprocess.Popen[Any]:
        exe = str(Path(sys.executable).parent / "anycast-controller")
        workdir = self.lab.workdir("mgmt")
        log = open(workdir / "controller.log", "ab")  # noqa: SIM115 - owned by the process
        self.controller = self.nodes["mgmt"].popen(
            [exe, "--config-dir", str(self.config_dir), "--state-dir", str(workdir / "state"),
             "--listen", f"{CONTROLLER_IP}:{CONTROLLER_PORT}",
             "--metrics-listen", f"{CONTROLLER_IP}:{CONTROLLER_METRICS_PORT}"],
            stdout=log, stderr=subprocess.STDOUT, env=lab_env())
        return self.controller

    def stop_controller(self) -> None:
        if self.controller is not None:
            self.nodes["mgmt"].terminate(self.controller.pid)
            self.controller = None

    def controller_log(self) -> str:
        path = self.lab.workdir("mgmt") / "controller.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- agents and backends --------------------------------------------------------------------
    def agent_config(self, pop: str) -> Path:
        data = yaml.safe_load((ROOT / "configs" / "agent-sjc-controlled.yaml").read_text())
        data["pop"] = pop
        data["controller"]["token_file"] = str(ROOT / "configs" / "controller" / "lab-tokens" / f"{pop}.token")
        data["controller"]["url"] = f"https://{CONTROLLER_IP}:{CONTROLLER_PORT}"
        self.tls.trust(data["controller"])
        path = self.lab.workdir(f"pop-{pop}") / "agent.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def start_agent(self, pop: str) -> AgentNode:
        node = self.agents.get(pop) or AgentNode(self.nodes[f"pop-{pop}"], self.lab.workdir(f"pop-{pop}"),
                                                 self.agent_config(pop))
        self.agents[pop] = node
        node.start()
        return node

    def start_backends(self, node: str) -> None:
        region, addr, ports = ORIGINS[node]
        self.backends[node] = start_backend(self.nodes[node], self.lab.workdir(node), region,
                                            [f"{addr}:{p}" for p in ports] + ["0.0.0.0:80"])

    def stop_backends(self, node: str) -> None:
        proc = self.backends.pop(node, None)
        if proc is not None:
            self.nodes[node].terminate(proc.pid)

    def announced(self, pop: str, vip: str) -> bool:
        return self.routers[pop].bgp_route(f"{vip}/32") is not None
