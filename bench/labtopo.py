"""The small lab the BGP benchmarks share: rtr (FRR) + pop (ExaBGP) (+ org), with a FIB watcher on rtr.

    rtr (FRR bgpd+zebra, AS 65001) 100.64.1.1/30 ---- 100.64.1.2/30 pop (ExaBGP + API process, AS 65101)
                                                                  | 100.64.10.2/30 ---- 100.64.10.1/30 org (origin backend)

Built by lab.single_pop.build (the integration tests' topology, with one origin named
``org`` and no VIP on it), so the agent config renders the same ExaBGP config as in the
integration tests; the FIB watcher is lab.fib's. ``org`` is made only when a backend is
needed. Nodes are named ``t-bench-XXXX-<node>``; Lab.teardown() stops every process by PID.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lab.fib import RouteWatcher
from lab.frr import FrrRouter
from lab.netns import Lab, Netns
from lab.single_pop import build

PREFIX = "t-bench-"
RTR_ADDR, POP_ADDR = "100.64.1.1", "100.64.1.2"
ORIGIN_ADDR, ORIGIN_GW = "100.64.10.1", "100.64.10.2"
LOCAL_AS, PEER_AS = 65101, 65001


@dataclass
class BgpLab:
    """rtr (FRR) + pop (where ExaBGP runs), and optionally org (an origin backend)."""

    lab: Lab
    with_origin: bool = True
    nodes: dict[str, Netns] = field(default_factory=dict)
    router: FrrRouter | None = None
    watcher: RouteWatcher | None = None

    def up(self) -> BgpLab:
        self.nodes, self.router = build(self.lab, {"org": ORIGIN_ADDR} if self.with_origin else {}, vip=None)
        self.watcher = RouteWatcher(self.nodes["rtr"])
        return self

    def __getitem__(self, node: str) -> Netns:
        return self.nodes[node]

    @property
    def rtr(self) -> FrrRouter:
        assert self.router is not None, "up() first"
        return self.router

    def workdir(self, node: str, sub: str | None = None) -> Path:
        path = self.lab.workdir(node)
        if sub:
            path = path / sub
            path.mkdir(mode=0o755, exist_ok=True)
        return path

    def neighbor_established(self) -> bool:
        try:
            return self.rtr.neighbor_state(POP_ADDR) == "Established"
        except Exception:  # noqa: BLE001 - bgpd restarting: not established
            return False


def neighbor_block(hold_time: int = 3, api: str = "") -> str:
    """ExaBGP's neighbor block toward rtr (what controller.bgp.exabgp_config renders)."""
    return (
        f"neighbor {RTR_ADDR} {{\n"
        f"    router-id {POP_ADDR};\n    local-address {POP_ADDR};\n"
        f"    local-as {LOCAL_AS};\n    peer-as {PEER_AS};\n    hold-time {hold_time};\n"
        f"    family {{\n        ipv4 unicast;\n    }}\n{api}}}\n"
    )


def proc_rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MB (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
