"""The small lab the BGP benchmarks share, and a watcher of a namespace's FIB.

    rtr (FRR bgpd+zebra, AS 65001) 100.64.1.1/30 ---- 100.64.1.2/30 pop (ExaBGP + API process, AS 65101)
                                                                  | 100.64.10.2/30 ---- 100.64.10.1/30 org (origin backend)

The addresses and FRR's config are lab.single_pop's, so the agent config renders the same
ExaBGP config as in the integration tests. ``org`` is made only when a backend is needed.
Namespaces are named ``t-bench-XXXX-<node>``; Lab.teardown() stops every process by PID.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.frr import FrrRouter
from lab.netns import Lab, Netns, add_addr, add_route, veth
from lab.single_pop import FRR_BGPD

PREFIX = "t-bench-"
RTR_ADDR, POP_ADDR = "100.64.1.1", "100.64.1.2"
ORIGIN_ADDR, ORIGIN_GW = "100.64.10.1", "100.64.10.2"
LOCAL_AS, PEER_AS = 65101, 65001

# Route types `ip monitor` may print before the destination; only unicast routes matter here.
_ROUTE_TYPES = {"unicast", "local", "broadcast", "anycast", "multicast", "blackhole", "unreachable",
                "prohibit", "throw", "nat"}


def parse_route_event(line: str) -> tuple[bool, str, str] | None:
    """One line of `ip -o monitor route` -> (present, prefix, proto), or None if not a
    main-table unicast route. ``Deleted 198.51.100.10 nhid 18 via ... proto bgp metric 20``."""
    words = line.split()
    present = True
    if words and words[0] == "Deleted":
        present, words = False, words[1:]
    if not words:
        return None
    if words[0] in _ROUTE_TYPES:
        if words[0] != "unicast":
            return None
        words = words[1:]
    if not words or "table" in words:  # `ip` names the table only when it is not main
        return None
    try:
        prefix = str(ipaddress.ip_network(words[0], strict=False))
    except ValueError:
        return None  # "default" and friends
    proto = words[words.index("proto") + 1] if "proto" in words[:-1] else "boot"
    return present, prefix, proto


class RouteWatcher:
    """Timestamps every FIB change in a namespace as it happens (`ip -o monitor route`).

    Event-driven, so the time a route left the FIB is known to within the pipe's latency
    (well under a millisecond), not a polling period. A reader thread stamps each line
    with time.monotonic() on arrival.
    """

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        # ip flushes after every message, so lines arrive as the kernel reports them.
        self.proc = ns.popen(["ip", "-o", "monitor", "route"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, bufsize=0)
        self._cond = threading.Condition()
        self._events: list[tuple[float, bool, str, str]] = []
        self._thread = threading.Thread(target=self._read, name=f"route-watch-{ns.name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            stamp = time.monotonic()
            parsed = parse_route_event(raw.decode(errors="replace"))
            if parsed is not None:
                with self._cond:
                    self._events.append((stamp, *parsed))
                    self._cond.notify_all()

    def mark(self) -> int:
        """A position in the event stream; wait() looks only at events after it."""
        with self._cond:
            return len(self._events)

    def wait_count(self, present: bool, proto: str, count: int, since: int, timeout: float) -> float | None:
        """Monotonic time of the `count`-th add (present) or delete of a `proto` route after
        `since`; None if fewer came within `timeout`."""
        return self._wait(lambda is_present, _, p: is_present == present and p == proto, count, since, timeout)

    def wait(self, prefix: str, present: bool, since: int, timeout: float) -> float | None:
        """Monotonic time of the first event after `since` that adds (present) or deletes
        `prefix`; None if none came within `timeout`."""
        want = str(ipaddress.ip_network(prefix, strict=False))
        return self._wait(lambda is_present, pfx, _: pfx == want and is_present == present, 1, since, timeout)

    def _wait(self, match: Callable[[bool, str, str], bool], count: int, since: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            i = since
            while True:
                while i < len(self._events):
                    stamp, is_present, pfx, proto = self._events[i]
                    i += 1
                    if match(is_present, pfx, proto):
                        seen += 1
                        if seen >= count:
                            return stamp
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

@dataclass
class BgpLab:
    """rtr (FRR) + pop (where ExaBGP runs), and optionally org (an origin backend)."""

    lab: Lab
    with_origin: bool = True
    nodes: dict[str, Netns] = field(default_factory=dict)
    router: FrrRouter | None = None
    watcher: RouteWatcher | None = None

    def up(self) -> BgpLab:
        names = ("rtr", "pop", "org") if self.with_origin else ("rtr", "pop")
        for name in names:
            self.nodes[name] = self.lab.netns(name)
        rtr, pop = self.nodes["rtr"], self.nodes["pop"]
        veth(rtr, "eth-pop", pop, "eth-rtr")
        add_addr(rtr, "eth-pop", f"{RTR_ADDR}/30")
        add_addr(pop, "eth-rtr", f"{POP_ADDR}/30")
        if self.with_origin:
            org = self.nodes["org"]
            veth(pop, "eth-org", org, "eth-pop")
            add_addr(org, "eth-pop", f"{ORIGIN_ADDR}/30")
            add_addr(pop, "eth-org", f"{ORIGIN_GW}/30")
            add_route(org, "default", ORIGIN_GW)
        workdir = self.lab.workdir("rtr")
        self.router = FrrRouter(rtr, workdir, {"bgpd": FRR_BGPD.format(log=workdir / "log")}).start()
        self.watcher = RouteWatcher(rtr)
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
