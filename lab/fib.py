"""A namespace's kernel FIB, watched as it changes (`ip -o monitor route` inside the node).

Used by the benchmarks to time when a route leaves a router's FIB, to within the pipe's
latency instead of a polling period.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time
from collections.abc import Callable

from .netns import Netns

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

    def close(self) -> None:
        """Stop ``ip monitor`` (by PID, through the node: recorded and reaped) and the reader."""
        if self.proc.poll() is None:
            self.ns.terminate(self.proc.pid)
        self._thread.join(5)

    def __enter__(self) -> RouteWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
