"""Where the cold path's wall time goes: a timeline for ``controller_scale cold --trace``.

A sampler thread reads, every ``period`` s, each of this process's threads' CPU (utime + stime
from /proc/self/task/*/stat) and the machine's busy CPU (/proc/stat), so each second of the
run says how much of it the event loop's thread ran, the journal's thread ran, and what the
machine's other processes took (the wall a phase waits is then split into "this process was
off the CPU while others ran" and "nobody ran": sleeping or waiting for the disk). Events from
the controller (the report hold ending, each sliced pass's start and end and its VIP count,
each journal write and its fsync, each snapshot written) are wrapped around the controller's
own methods (no change to them), so the same trace runs against another tree's code.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def _threads() -> dict[str, tuple[str, float]]:
    out: dict[str, tuple[str, float]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def _machine() -> tuple[float, float]:
    """(busy, iowait) CPU seconds of the whole machine so far."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (cpu + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / TICK, iowait / TICK


class Trace:
    def __init__(self, out: Path, period: float = 0.5) -> None:
        self.out = out
        self.period = period
        self.t0 = time.perf_counter()
        self.phase = "-"
        self.events: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._main = str(threading.get_native_id())
        self._profiler: Any = None  # (cProfile.Profile while the phase of $COLD_PROFILE runs)
        self._thread = threading.Thread(target=self._run, name="trace", daemon=True)
        self._thread.start()

    def profile(self, phase: str | None) -> None:
        """cProfile over the phase named in $COLD_PROFILE (its stats to ``out``.PHASE.pstats)."""
        want = os.environ.get("COLD_PROFILE")
        if phase is not None and phase == want:
            import cProfile
            self._profiler = cProfile.Profile()
            self._profiler.enable()
        elif phase is None and self._profiler is not None:
            self._profiler.disable()
            self._profiler.dump_stats(f"{self.out}.{want}.pstats".replace(" ", "_"))
            self._profiler = None

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def event(self, what: str, **info: Any) -> None:
        self.events.append({"t": self.now(), "phase": self.phase, "what": what, **info})

    def _run(self) -> None:
        me = str(threading.get_native_id())
        last_t, last_threads, last_machine = time.perf_counter(), _threads(), _machine()
        while not self._stop.wait(self.period):
            t, threads, machine = time.perf_counter(), _threads(), _machine()
            main = threads.get(self._main, ("", 0.0))[1] - last_threads.get(self._main, ("", 0.0))[1]
            others = sum(c - last_threads.get(tid, (n, 0.0))[1] for tid, (n, c) in threads.items()
                         if tid not in (self._main, me))
            own = sum(c - last_threads.get(tid, (n, 0.0))[1] for tid, (n, c) in threads.items())
            busy = machine[0] - last_machine[0]
            self.samples.append({"t": round(t - self.t0, 3), "phase": self.phase, "dt": round(t - last_t, 3),
                                 "main_cpu": round(main, 3), "threads_cpu": round(others, 3),
                                 "machine_busy": round(busy, 3), "others_busy": round(busy - own, 3),
                                 "iowait": round(machine[1] - last_machine[1], 3)})
            last_t, last_threads, last_machine = t, threads, machine

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase: wall, the loop thread's CPU, the other threads', what the machine's other
        processes ran, and iowait (all in s)."""
        out: dict[str, dict[str, float]] = {}
        for s in self.samples:
            row = out.setdefault(s["phase"], {"wall": 0.0, "main_cpu": 0.0, "threads_cpu": 0.0,
                                              "others_busy": 0.0, "iowait": 0.0})
            row["wall"] += s["dt"]
            for k in ("main_cpu", "threads_cpu", "others_busy", "iowait"):
                row[k] += s[k]
        return {p: {k: round(v, 2) for k, v in r.items()} for p, r in out.items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.out.write_text(json.dumps({"summary": self.summary(), "events": self.events,
                                        "samples": self.samples}, indent=0) + "\n")


def instrument(trace: Trace) -> Callable[[], None]:
    """Wrap the controller's methods with events; returns the undo."""
    from controller.server import core, store

    undo: list[Callable[[], None]] = []

    def wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        setattr(owner, name, make(original))
        undo.append(lambda: setattr(owner, name, original))

    def planned_reports(f: Any) -> Any:
        def inner(self: Any) -> Any:
            holding = self._holding()
            if not holding and self._pending is not None:
                trace.event("hold ends", reports=len(self.reports), incoming=self._incoming)
            return f(self)
        return inner
    wrap(core.Controller, "_planned_reports", planned_reports)

    def sliced(f: Any) -> Any:
        async def inner(self: Any, engine: Any, now: float) -> Any:
            trace.event("sliced pass begins", dirty=engine.dirty(), reports=len(self.reports))
            try:
                return await f(self, engine, now)
            finally:
                trace.event("sliced pass ends")
        return inner
    wrap(core.Controller, "_sliced", sliced)

    def replan(f: Any) -> Any:
        def inner(self: Any, *args: Any, **kwargs: Any) -> Any:  # (refresh_after=, now=: _drive's)
            t = time.perf_counter()
            try:
                return f(self, *args, **kwargs)
            finally:
                trace.event("replan", s=round(time.perf_counter() - t, 3))
        return inner
    wrap(core.Controller, "replan", replan)

    def append_text(f: Any) -> Any:
        def inner(self: Any, body: str, expect: int) -> Any:
            t = time.perf_counter()
            try:
                return f(self, body, expect)
            finally:
                trace.event("journal line written", bytes=len(body), s=round(time.perf_counter() - t, 3))
        return inner
    wrap(store.FileJournal, "append_text", append_text)

    def compact(f: Any) -> Any:
        def inner(self: Any, state: Any, seq: int) -> Any:
            before = self._compacting
            f(self, state, seq)
            if self._compacting is not None and self._compacting is not before:
                trace.event("snapshot begins (thread)", seq=seq)
                future = self._compacting[2]
                t = time.perf_counter()
                future.add_done_callback(lambda _: trace.event("snapshot written",
                                                               s=round(time.perf_counter() - t, 3)))
        return inner
    wrap(store.FileJournal, "compact", compact)

    def restore() -> None:
        for u in reversed(undo):
            u()
    return restore
