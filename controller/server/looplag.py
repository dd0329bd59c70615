"""The event loop's lag, measured by the daemon itself: a timer that measures its own lateness.

Every ``every`` seconds (``LAG_EVERY``, 100 ms by default) a callback is due on the loop
(``loop.call_at``); when it runs, how late it runs (the loop's clock now, less the time it was
due) is one sample: how long the loop kept a callback that was ready waiting. The next is due
``every`` after it ran (a stall is one late sample, not a burst of catch-up ones). That is
what the benchmark's external probe (``bench/controller_scale.py``, ``_Probe``: an HTTP request
every 10 ms) measures, without the request: a stall of S >= ``every`` seconds shows as a
sample of at least S - ``every`` (a due time falls inside it), at most S; a shorter one is
caught only if a due time falls inside it (with probability S / ``every``), as anything from
0 to S. So at the default 0.1 s the samples tell stalls of a tenth of a second and more; the
issue-10 figures (p99 <= 20 ms) need ``--loop-lag-every 0.02`` or less, or the probe. A sample also holds up to ~1 ms of the loop's own wake-up
(epoll's timeout is in whole milliseconds, rounded up), so lags under 1 ms mean "on time".

Its cost: one timer callback per ``every`` (a ``call_at``, a histogram observation, an
append): 10 wake-ups a second of an idle loop at 0.1 s (50 at 0.02), against the probe's 100 requests a second
through aiohttp (results 3x). No thread, no monkeypatching of the loop, no debug mode
(asyncio's ``slow_callback_duration`` accounting needs ``loop.set_debug``, which costs far
more than it measures).

Exported as ``anycast_controller_event_loop_lag_seconds`` (a histogram, controller/metrics/)
and in ``/v1/status``'s ``event_loop`` (``status()``: the samples over the last
``WINDOW_S``: p50, p99, max; and since the start).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import Any

LAG_EVERY = 0.1  # seconds between samples (anycast-controller --loop-lag-every; 0: off)
MIN_EVERY = 0.005  # below it the timer is due all the time: the loop spinning, a minute's samples without bound
WINDOW_S = 60.0  # /v1/status's recent summary: the samples of the last minute


class LoopLag:
    """The lag sampler on one event loop (``start``, ``stop``). ``observe`` gets each sample
    (the metric's histogram); ``status()`` summarises them."""

    def __init__(self, every: float = LAG_EVERY, observe: Callable[[float], None] | None = None,
                 window_s: float = WINDOW_S) -> None:
        if every < MIN_EVERY:
            raise ValueError(f"every must be at least {MIN_EVERY} s, got {every}")
        self.every = every
        self.window_s = window_s
        self.samples = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self._observe = observe
        # (ran at, lag) of the last window_s (at one sample per ``every``, a bounded deque)
        self._recent: deque[tuple[float, float]] = deque(maxlen=int(window_s / every) + 16)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._due = self._loop.time() + self.every
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.record(now, max(0.0, now - self._due))
        self._due = now + self.every
        self._handle = loop.call_at(self._due, self._tick)

    def record(self, now: float, lag: float) -> None:
        """One sample: ``lag`` seconds late, at ``now`` (the loop's clock)."""
        self.samples += 1
        self.total_s += lag
        if lag > self.max_s:
            self.max_s = lag
        self._recent.append((now, lag))
        if self._observe is not None:
            self._observe(lag)

    def status(self, now: float | None = None) -> dict[str, Any]:
        """``/v1/status``'s ``event_loop``: the sampling, the last ``window_s``'s summary and
        the totals since the start (seconds)."""
        if now is None:
            now = self._loop.time() if self._loop is not None else 0.0
        since = now - self.window_s
        lags = sorted(lag for at, lag in self._recent if at >= since)
        return {"lag_every_s": self.every, "window_s": self.window_s, "samples": len(lags),
                "lag_p50_s": _quantile(lags, 0.5), "lag_p99_s": _quantile(lags, 0.99),
                "lag_max_s": lags[-1] if lags else None,
                "total": {"samples": self.samples, "lag_sum_s": round(self.total_s, 6), "lag_max_s": self.max_s}}


def _quantile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank quantile (None: no sample)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]
