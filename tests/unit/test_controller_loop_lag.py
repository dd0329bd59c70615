"""The daemon's own event-loop lag (controller/server/looplag.py): a step that blocks the loop
shows up in anycast_controller_event_loop_lag_seconds and in /v1/status's event_loop. Asserted
by ordering (what the loop's clock says before and after the blocking step, a fake clock), never
by a wall-clock bound."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp import test_utils  # (make_mocked_request: the handler without a socket)
from prometheus_client import CollectorRegistry

from controller.config.desired import load_desired
from controller.metrics.central import ControllerMetrics
from controller.server.app import LOOP_LAG, get_status, make_app
from controller.server.core import Controller
from controller.server.looplag import LoopLag

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "controller"
OPERATOR = (EXAMPLE / "lab-tokens" / "operator.token").read_text().strip()


class _Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """time() and call_at() only: the test runs the due callback when it wants, at the time it sets."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Callable[[], None], _Handle]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, cb: Callable[[], None]) -> _Handle:
        h = _Handle()
        self.timers.append((when, cb, h))
        return h

    def run_due_at(self, at: float) -> float:
        """The pending timer run at ``at`` (the clock set there): the time it was due."""
        when, cb, h = self.timers.pop(0)
        assert not h.cancelled and at >= when
        self.now = at
        cb()
        return when


def _metrics() -> tuple[ControllerMetrics, Callable[..., Any]]:
    registry = CollectorRegistry()
    m = ControllerMetrics(registry, lambda: None)  # type: ignore[arg-type,return-value]
    # (get_sample_value would collect the controller's snapshot too: read the histogram alone)
    def get(name: str, labels: dict[str, str] | None = None) -> float | None:
        for metric in m.event_loop_lag.collect():
            for s in metric.samples:
                if s.name == name and (labels is None or s.labels == labels):
                    return float(s.value)
        return None
    return m, get


def test_a_late_timer_is_one_sample_of_its_lateness_and_the_next_is_due_after_it_ran() -> None:
    m, get = _metrics()
    loop = FakeLoop()
    lag = LoopLag(0.02, m.event_loop_lag.observe, window_s=1.0)
    lag.start(loop)  # type: ignore[arg-type]
    due = loop.run_due_at(loop.timers[0][0])  # on time
    assert get("anycast_controller_event_loop_lag_seconds_count") == 1.0
    assert get("anycast_controller_event_loop_lag_seconds_sum") == 0.0
    # A step that keeps the loop 0.7 s: the next timer runs that late.
    next_due = loop.timers[0][0]
    assert next_due == due + 0.02
    loop.run_due_at(next_due + 0.7)
    assert get("anycast_controller_event_loop_lag_seconds_count") == 2.0
    assert abs(get("anycast_controller_event_loop_lag_seconds_sum") - 0.7) < 1e-9  # type: ignore[operator]
    assert get("anycast_controller_event_loop_lag_seconds_bucket", {"le": "0.5"}) == 1.0  # the on-time one
    assert get("anycast_controller_event_loop_lag_seconds_bucket", {"le": "1.0"}) == 2.0
    # One late sample, not a catch-up burst: the next is due one interval after the late run.
    assert loop.timers[0][0] == loop.now + 0.02
    s = lag.status()
    assert s["samples"] == 2 and abs(s["lag_max_s"] - 0.7) < 1e-9 and s["lag_p50_s"] == 0.0
    assert s["total"]["samples"] == 2 and abs(s["total"]["lag_max_s"] - 0.7) < 1e-9
    # The window forgets it once it is older than window_s; the totals keep it.
    for _ in range(60):  # 1.2 s of timers on time
        loop.run_due_at(loop.timers[0][0])
    s = lag.status()
    assert 0 < s["samples"] <= 51 and s["lag_max_s"] == 0.0
    assert abs(s["total"]["lag_max_s"] - 0.7) < 1e-9 and s["total"]["samples"] == 62
    lag.stop()
    assert loop.timers[0][2].cancelled


def test_a_blocking_step_on_a_real_loop_is_seen_whole_less_one_interval() -> None:
    """The sample after a step that blocks the loop is at least the step's length (by the
    loop's own clock) less the interval: the stall is not lost between two samples."""
    m, get = _metrics()
    every = 0.005

    async def scenario() -> tuple[float, LoopLag]:
        lag = LoopLag(every, m.event_loop_lag.observe)
        lag.start()
        loop = asyncio.get_running_loop()
        while lag.samples < 3:
            await asyncio.sleep(every)
        before = lag.samples
        t0 = loop.time()
        time.sleep(0.15)  # the blocking step: no callback runs meanwhile
        blocked = loop.time() - t0
        assert lag.samples == before  # nothing sampled while blocked
        while lag.samples == before:
            await asyncio.sleep(0)
        lag.stop()
        return blocked, lag

    blocked, lag = asyncio.run(scenario())
    assert lag.max_s >= blocked - lag.every
    assert lag.status(now=lag._recent[-1][0])["lag_max_s"] == lag.max_s
    count = get("anycast_controller_event_loop_lag_seconds_count")
    assert count == lag.samples
    total = get("anycast_controller_event_loop_lag_seconds_sum")
    assert total is not None and total >= blocked - lag.every


def test_status_shows_the_event_loop_lag_and_null_when_sampling_is_off(tmp_path: Path) -> None:
    desired = dataclasses.replace(load_desired(str(EXAMPLE), "rev1"), state_dir=str(tmp_path))

    async def status(with_lag: bool) -> dict[str, Any]:
        ctl = Controller(desired)
        app = make_app(ctl)
        lag = LoopLag(0.01)
        if with_lag:
            app[LOOP_LAG] = lag
            lag.record(asyncio.get_running_loop().time(), 0.25)  # one stall seen
            lag.start()
        try:
            request = test_utils.make_mocked_request("GET", "/v1/status", headers={"Authorization": f"Bearer {OPERATOR}"},
                                          app=app)
            r = await get_status(request)
            assert r.status == 200 and isinstance(r, web.Response) and r.text is not None
            return json.loads(r.text)["event_loop"]  # type: ignore[no-any-return]
        finally:
            lag.stop()
            ctl.close()

    on = asyncio.run(status(True))
    assert on["lag_every_s"] == 0.01 and on["window_s"] == 60.0
    assert on["samples"] >= 1 and on["lag_max_s"] == 0.25 and on["total"]["lag_max_s"] == 0.25
    assert {"lag_p50_s", "lag_p99_s", "lag_sum_s"} <= {*on, *on["total"]}
    assert asyncio.run(status(False)) is None


def test_a_sampling_interval_too_short_to_be_a_timer_is_refused() -> None:
    """Every 1e-6 s the timer would be due all the time (the loop spinning, the minute's
    samples without bound): refused (anycast-controller --loop-lag-every says so by name)."""
    import pytest

    from controller.server.looplag import MIN_EVERY, LoopLag

    with pytest.raises(ValueError, match="at least"):
        LoopLag(0.000001)
    assert LoopLag(MIN_EVERY).every == MIN_EVERY
