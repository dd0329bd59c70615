"""Runs every target's probe on its own interval, many at once, and reports each result.

Design: one loop and one heap of (due time, sequence, entry), not one sleeping task per
target. The loop starts every probe that is due, then sleeps until the next due time or
until ``set_targets`` or a finished probe wakes it. A probe runs as its own task; its done
callback hands the result to ``on_result``. So 10,000 targets cost one heap entry each
plus the probes actually running.

Rules:
- The set of targets is level-based: ``set_targets`` gets the whole set each time. A
  target whose key and spec are unchanged keeps its schedule and its running probe (a
  new interval only brings its next check forward if needed); a removed target, or one
  whose spec changed, is cancelled and a result still in flight for it is dropped,
  never reported.
- A new target's first check comes soon, spread over ``min(interval, first_window)``, so
  a freshly started agent reaches verdicts quickly without firing everything at once.
  From its second check on it runs at a random phase of its interval, so targets with
  long intervals spread out too.
- Each next check is due one interval after the previous due time (so lateness does
  not accumulate), plus or minus ``jitter`` times the interval.
- A target never has two probes at once: when it is due while its probe still runs, that
  check is skipped (counted) and the next one scheduled.
- At most ``max_concurrency`` probes run; beyond that, due checks wait in the heap, and
  the wait shows up as lateness.
- Targets with the same probe (spec, interval, and watch settings) share it: one probe
  per interval however many targets (VIPs) check that backend that way, and every one of
  their keys gets every result, in the order ``set_targets`` listed them. (200 VIPs on one
  backend were 200 connections a second.) Counters count results per key (``checks``)
  and probes run (``probes``).
- Watch (``Target.watch``): one idle connection per backend endpoint (``health.watcher``,
  shared by every check of that host, port and source). When it is lost, the probe runs at
  once and, while it fails, again right after, up to ``Target.fall`` confirmation probes
  in a row, so the state machine can reach ``fall`` failures in milliseconds. One success
  ends the confirmation. A confirmation never runs beside another probe of the target: if
  one is in flight, the confirmation starts when it ends (its result is not counted as
  one, it may predate the loss). Confirmations come before due checks for the
  ``max_concurrency`` slots and do not move the periodic schedule. A successful probe of a
  watched endpoint tells the watcher, so a backend back from a crash is watched again at
  once (``health.watch``).
- ``check_now(keys)``: one probe of those targets at once, out of their schedule (the
  controller asks this POP for fresh evidence: a check that completes after another POP's
  first failure). A probe in flight already serves; the periodic schedule does not move.
  It takes a free ``max_concurrency`` slot or does not run (the next due check serves).
- Lateness (start time minus due time) is sampled into a bounded ring for metrics and
  benchmarks (periodic checks only: a confirmation has no due time). A check more than an
  interval late (after a suspended VM, or under overload) is not run: its target is
  rescheduled like a new one, so a stall ends with fresh checks spread over a second
  rather than a burst of stale ones.

Time and sleep are injected (``clock``, ``sleep``): unit tests drive a virtual clock.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import random
import resource
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from .probes import Check, Done, Poller, ProbeResult, ProbeSpec, probe, start
from .watcher import Endpoint, WatchPool, WatchStats

log = logging.getLogger("controller.health")

OnResult = Callable[[Hashable, ProbeResult, float], None]
ProbeFn = Callable[[ProbeSpec], Awaitable[ProbeResult]]


class Watcher(Protocol):
    """What the scheduler needs of a watch pool (``WatchPool``; a fake in unit tests)."""

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None: ...
    def probe_succeeded(self, endpoint: Endpoint) -> None: ...
    def start(self) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> WatchStats: ...


WatcherFactory = Callable[[Callable[[Endpoint, str], None]], Watcher]

MIN_SLEEP = 0.001  # coalesce wake-ups: at most ~1000 loop passes a second, ~1 ms lateness
LATENESS_SAMPLES = 10_000
# File descriptors kept connections (check.reuse_connection) leave free beyond the checks in
# flight and the watch connections: ExaBGP's pipes, the metrics server, logs, the plan client.
FD_RESERVE = 256


def kept_budget_for(max_concurrency: int, watched: int) -> int:
    """How many kept connections may sit idle: the open-file limit (soft) less a descriptor
    for each check in flight, each watch connection and ``FD_RESERVE``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(0, soft - max_concurrency - watched - FD_RESERVE)


@dataclass(frozen=True)
class Target:
    """One thing to check: `key` identifies it to the caller's callback."""

    key: Hashable
    spec: ProbeSpec
    interval: float  # seconds between checks
    watch: bool = False  # keep a watch connection; its loss triggers confirmation probes
    fall: int = 1  # confirmation probes in a row at most (the state machine's `fall`)

    @property
    def group(self) -> tuple[ProbeSpec, float, bool, int]:
        """Targets with the same group share one probe."""
        watched = self.watch and endpoint_of(self.spec) is not None
        return (self.spec, self.interval, watched, self.fall if watched else 0)


def endpoint_of(spec: ProbeSpec) -> Endpoint | None:
    """Where a watch connection for this spec goes; None for a scoped IPv6 address
    ('fe80::1%eth0'), which a bare socket cannot take without a lookup."""
    return None if "%" in spec.host else (spec.host, spec.port, spec.source)


@dataclass(frozen=True)
class SchedulerStats:
    """Counters since start, and the most recent lateness samples (oldest first)."""

    targets: int
    in_flight: int
    checks: int  # results handed to on_result (one per key of a shared probe)
    skipped: int  # due checks not run: the previous probe still ran, or more than an interval late
    dropped: int  # results discarded: their target was removed or changed meanwhile
    probe_errors: int  # the probe function raised (reported as failed results)
    lateness: tuple[float, ...]  # seconds between due time and actual start
    probes: int = 0  # probes finished (shared: one for all the keys it answers)
    groups: int = 0  # distinct probes (targets that share one count once)
    watch_losses: int = 0  # watch connections lost: each started a confirmation
    confirmations: int = 0  # confirmation probes run
    asked: int = 0  # probes started out of schedule by check_now
    watch: WatchStats | None = None  # the watch pool's own counts
    kept_idle: int = 0  # kept HTTP connections (reuse_connection) waiting for their next check
    kept_used: int = 0  # checks that ran on a kept connection
    kept_retried: int = 0  # of those, run again on a fresh connection (closed by the server, or a 408)
    kept_over_budget: int = 0  # connections closed, not kept: the descriptor budget was full
    kept_evicted: int = 0  # idle kept connections closed for a check out of descriptors

    def lateness_quantile(self, q: float) -> float:
        """The q-quantile (0..1) of the lateness samples; 0.0 without samples."""
        if not self.lateness:
            return 0.0
        ordered = sorted(self.lateness)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Entry:
    """The scheduler's mutable record of one live probe, shared by the targets in ``keys``."""

    __slots__ = ("alive", "anchor", "confirm_left", "confirming", "due", "keys", "on_done", "queued", "seq", "target",
                 "task", "watched")

    def __init__(self, target: Target, keys: tuple[Hashable, ...]) -> None:
        self.target = target  # the first of the group: its spec, interval, watch and fall are all's
        self.keys = keys
        self.confirm_left = 0  # confirmation probes still to run (0: none wanted)
        self.confirming = False  # the running task is a confirmation probe
        self.queued = False  # waiting in the urgent queue for a free slot
        self.watched: Endpoint | None = None  # the watch connection this probe listens to
        self.due = 0.0
        self.seq = -1  # the heap item carrying this seq is the live one; others are stale
        self.task: asyncio.Task[ProbeResult] | Check | None = None  # the probe running
        self.alive = True
        # Until the first check starts: the phase the steady schedule counts from.
        self.anchor: float | None = None
        self.on_done: Done | None = None  # the callback path's done, made once


class CheckScheduler:
    """Probes every target on its interval and calls ``on_result(key, result, finished_at)``.

    ``finished_at`` is read from ``clock`` (monotonic by default). ``on_result`` runs on the
    event loop and must not block; an exception from it is logged and the checks go on.
    """

    def __init__(
        self,
        on_result: OnResult,
        *,
        probe_fn: ProbeFn = probe,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        jitter: float = 0.1,
        max_concurrency: int = 1000,
        first_window: float = 1.0,
        watcher_factory: WatcherFactory = WatchPool,
    ) -> None:
        if not 0.0 <= jitter <= 0.5:
            raise ValueError(f"jitter must be within 0..0.5 of the interval, got {jitter}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if first_window < 0:
            raise ValueError(f"first_window must not be negative, got {first_window}")
        self._on_result = on_result
        self._probe_fn = probe_fn
        # The agent's own probes run as loop callbacks, not tasks (probes.start): no task,
        # coroutine or future per check. A probe function of the caller's runs as a task.
        self._start: Callable[[ProbeSpec, Done, Poller], Check | None] | None = start if probe_fn is probe else None
        self._poller: Poller | None = None  # the checks' epoll set (probes.Poller), while any may run
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._jitter = jitter
        self._max_concurrency = max_concurrency
        self._first_window = first_window
        self._entries: dict[tuple[ProbeSpec, float, bool, int], _Entry] = {}  # by Target.group
        self._keys = 0
        self._by_endpoint: dict[Endpoint, list[_Entry]] = {}  # the watched entries
        self._urgent: deque[_Entry] = deque()  # confirmations waiting for a free slot
        self._watcher = watcher_factory(self._on_watch_loss)
        self._heap: list[tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[ProbeResult] | Check] = set()  # the probes running
        self._wake: asyncio.Future[None] | None = None
        self._running = False
        self._stopping = False
        self._checks = 0
        self._skipped = 0
        self._dropped = 0
        self._probe_errors = 0
        self._probes = 0
        self._watch_losses = 0
        self._confirmations = 0
        self._asked = 0
        self._lateness: deque[float] = deque(maxlen=LATENESS_SAMPLES)

    # --- the set of targets ------------------------------------------------------------
    def set_targets(self, targets: Iterable[Target]) -> None:
        """Replace the whole set (see the module docstring for what is kept)."""
        seen: set[Hashable] = set()
        groups: dict[tuple[ProbeSpec, float, bool, int], list[Target]] = {}
        for t in targets:
            if t.key in seen:
                raise ValueError(f"duplicate target key {t.key!r}")
            if not t.interval > 0:
                raise ValueError(f"target {t.key!r}: interval must be positive, got {t.interval}")
            if t.fall < 1:
                raise ValueError(f"target {t.key!r}: fall must be at least 1, got {t.fall}")
            seen.add(t.key)
            groups.setdefault(t.group, []).append(t)
        now = self._clock()
        # A probe whose group is gone but whose spec lives on in a new group (a new interval,
        # watch switched) keeps its schedule and its running probe.
        leaving: dict[ProbeSpec, _Entry] = {}
        for gk in [g for g in self._entries if g not in groups]:
            entry = self._entries.pop(gk)
            if entry.target.spec in leaving:
                self._retire(leaving[entry.target.spec])
            leaving[entry.target.spec] = entry
        for gk, members in groups.items():
            first, keys = members[0], tuple(t.key for t in members)
            kept = self._entries.get(gk)
            if kept is not None:
                kept.target, kept.keys = first, keys
                continue
            reused = leaving.pop(first.spec, None)
            if reused is None:
                self._entries[gk] = self._new_entry(first, keys, now)
                continue
            entry = reused
            old = entry.target
            entry.target, entry.keys = first, keys
            if not first.watch or first.fall < entry.confirm_left:
                entry.confirm_left = min(entry.confirm_left, first.fall) if first.watch else 0
            if old.interval != first.interval:
                # Same check, new pace: the next check comes no later than one new interval.
                if entry.anchor is not None:
                    entry.anchor = min(entry.anchor, now + first.interval)
                self._push(entry, min(entry.due, now + first.interval))
            self._entries[gk] = entry
        for entry in leaving.values():
            self._retire(entry)
        self._keys = len(seen)
        self._by_endpoint = {}
        for gk, entry in self._entries.items():
            entry.watched = endpoint_of(entry.target.spec) if gk[2] else None
            if entry.watched is not None:
                self._by_endpoint.setdefault(entry.watched, []).append(entry)
        self._watcher.set_endpoints(self._by_endpoint)
        if self._poller is not None:  # kept connections (probes' reuse_connection) of removed checks close
            self._poller.retain(e.target.spec for e in self._entries.values())
            self._poller.kept_budget = kept_budget_for(self._max_concurrency, len(self._by_endpoint))
        if len(self._heap) > 2 * len(self._entries) + 64:
            # Many removals or reschedules left stale heap items behind; drop them.
            self._heap = [item for item in self._heap if item[2].alive and item[2].seq == item[1]]
            heapq.heapify(self._heap)
        self._wakeup()

    def _new_entry(self, target: Target, keys: tuple[Hashable, ...], now: float) -> _Entry:
        entry = _Entry(target, keys)
        self._schedule_fresh(entry, now)
        return entry

    def _schedule_fresh(self, entry: _Entry, now: float) -> None:
        """Schedule a target with no verdict to speak of: new, or stalled past an interval."""
        interval = entry.target.interval
        window = min(interval, self._first_window)
        first = now + self._rng.uniform(0.0, window)
        # Short intervals: the first check already sits at a random phase. Long ones: the
        # first check comes early for a quick verdict, the steady schedule at a random
        # phase of the whole interval, so that long-interval targets spread out too.
        entry.anchor = first if interval <= window else now + self._rng.uniform(0.0, interval)
        self._push(entry, first)

    def _retire(self, entry: _Entry) -> None:
        entry.alive = False
        entry.confirm_left = 0
        running = entry.task
        if running is not None:
            self._dropped += 1
            running.cancel()  # a task's done callback sees alive=False and reports nothing
            if isinstance(running, Check):  # a check reports nothing once cancelled: its slot is free now
                self._complete(entry, running, None)

    def _push(self, entry: _Entry, due: float) -> None:
        entry.due = due
        entry.seq = next(self._seq)
        heapq.heappush(self._heap, (due, entry.seq, entry))

    # --- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """Run checks until stop(); in-flight probes are cancelled on the way out."""
        if self._running:
            raise RuntimeError("CheckScheduler.run() is already running")
        self._running = True
        loop = asyncio.get_running_loop()
        try:
            if not self._stopping:
                self._watcher.start()
            while not self._stopping:
                if self._poller is not None:
                    self._poller.poll()  # results first: they free slots
                self._start_due()
                self._wake = loop.create_future()
                delay = self._next_delay()
                if delay is None:
                    await self._wake
                elif self._sleep is asyncio.sleep:
                    # The real clock: a timer that wakes us, not a sleeping task and a wait
                    # on two futures per pass (up to a thousand passes a second).
                    timer = loop.call_later(max(delay, MIN_SLEEP), self._wakeup)
                    try:
                        await self._wake
                    finally:
                        timer.cancel()
                else:
                    sleeper = asyncio.ensure_future(self._sleep(max(delay, MIN_SLEEP)))
                    try:
                        await asyncio.wait((sleeper, self._wake), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        sleeper.cancel()
                self._wake = None
        finally:
            self._watcher.close()
            self._wake = None
            self._running = False
            running = list(self._tasks)
            for task in running:
                task.cancel()  # a check's socket closes now
            self._tasks.difference_update(r for r in running if isinstance(r, Check))
            if self._poller is not None:
                self._poller.close()
                self._poller = None
            # Let cancelled probes close their sockets before we return.
            await asyncio.gather(*(r for r in running if not isinstance(r, Check)), return_exceptions=True)

    def stop(self) -> None:
        """Make run() return. Final: a stopped scheduler stays stopped."""
        self._stopping = True
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _next_delay(self) -> float | None:
        """Seconds until the next due check; None: nothing to do until woken."""
        if not self._heap or len(self._tasks) >= self._max_concurrency:
            return None  # set_targets or a finished probe wakes us
        return self._heap[0][0] - self._clock()

    def _start_due(self) -> None:
        while self._urgent and len(self._tasks) < self._max_concurrency:
            entry = self._urgent.popleft()
            entry.queued = False
            if entry.alive and entry.task is None and entry.confirm_left > 0:
                self._launch(entry, None)
        now = self._clock()
        heap = self._heap
        while heap and heap[0][0] <= now and len(self._tasks) < self._max_concurrency:
            due, seq, entry = heapq.heappop(heap)
            if not entry.alive or entry.seq != seq:
                continue  # stale: the target was removed or rescheduled
            interval = entry.target.interval
            if due + interval < now:
                # More than an interval late (a suspended VM, overload): the result would
                # be stale and firing every such check at once is a burst. Start afresh.
                self._skipped += 1
                self._schedule_fresh(entry, now)
                continue
            base = due if entry.anchor is None else entry.anchor
            entry.anchor = None
            # From the previous due time, not from now: lateness does not accumulate.
            self._push(entry, base + interval * (1.0 + self._rng.uniform(-self._jitter, self._jitter)))
            if entry.task is not None:
                self._skipped += 1  # never two probes of one target at once
                continue
            if entry.confirm_left > 0:
                # A loss was seen while no slot was free: confirm now, this check is one.
                if entry.queued:
                    self._urgent.remove(entry)
                    entry.queued = False
                self._launch(entry, None)
                continue
            self._launch(entry, due)

    def _launch(self, entry: _Entry, due: float | None, confirming: bool = True) -> None:
        """Start a probe: a periodic check (``due``), a confirmation (None) or an asked
        check (None, not ``confirming``)."""
        entry.confirming = due is None and confirming
        if entry.confirming:
            self._confirmations += 1
        if self._start is not None:
            if due is not None:
                self._lateness.append(self._clock() - due)  # the probe starts here, in start()
            poller = self._poller
            if poller is None or poller.closed:
                poller = self._poller = Poller(asyncio.get_running_loop())
                poller.kept_budget = kept_budget_for(self._max_concurrency, len(self._by_endpoint))
            if entry.on_done is None:
                entry.on_done = functools.partial(self._checked, entry)
            check = self._start(entry.target.spec, entry.on_done, poller)
            if check is not None:
                entry.task = check
                self._tasks.add(check)
                return
            if due is not None:
                self._lateness.pop()  # measured again in _check, when the task starts
        task = asyncio.ensure_future(self._check(entry.target, due))
        entry.task = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, entry))

    # --- watch -------------------------------------------------------------------------
    def _on_watch_loss(self, endpoint: Endpoint, detail: str) -> None:
        """The watch connection to ``endpoint`` was lost: confirm every probe that watches it."""
        entries = self._by_endpoint.get(endpoint, ())
        if entries:
            # Debug: servers that close idle connections make this routine; a confirmed
            # failure shows as the backend's transition, with the probe's detail.
            log.debug("%s of %s:%d: confirming with %d probe(s) now", detail, endpoint[0], endpoint[1],
                      len(entries))
        for entry in entries:
            if not entry.alive:
                continue
            self._watch_losses += 1
            entry.confirm_left = entry.target.fall
            if entry.task is None:
                self._confirm_next(entry)
            # else: the probe in flight may predate the loss; the confirmation follows it.

    def check_now(self, keys: Iterable[Hashable]) -> bool:
        """Probe the targets with these keys now (see the module docstring); True when
        every one of them has a probe running (started now or already in flight)."""
        wanted = set(keys)
        if not wanted:
            return True
        found: set[Hashable] = set()
        every = True
        for entry in self._entries.values():
            if not entry.alive or wanted.isdisjoint(entry.keys):
                continue
            found.update(wanted.intersection(entry.keys))
            if entry.task is None:
                if self._stopping or len(self._tasks) >= self._max_concurrency:
                    every = False
                    continue
                self._asked += 1
                self._launch(entry, None, confirming=False)
        return every and found == wanted

    def _confirm_next(self, entry: _Entry) -> None:
        if self._stopping:
            return
        if len(self._tasks) < self._max_concurrency:
            self._launch(entry, None)
        elif not entry.queued:
            entry.queued = True
            self._urgent.append(entry)
            # _finished wakes the loop when a slot frees up.

    async def _check(self, target: Target, due: float | None) -> ProbeResult:
        started = self._clock()
        if due is not None:
            # Measured here, when the probe really starts, not when the loop decided to start it.
            self._lateness.append(started - due)
        try:
            return await self._probe_fn(target.spec)
        except Exception as exc:  # noqa: BLE001 - see below
            # A bug in the probe, not a network failure (probes turn those into results):
            # report a failed check so the state still moves, and log it loudly.
            self._probe_errors += 1
            log.error("probe of %r raised", target.key, exc_info=exc)
            return ProbeResult(False, self._clock() - started, f"probe error: {type(exc).__name__}: {exc}")

    def _checked(self, entry: _Entry, check: Check, outcome: ProbeResult | Exception) -> None:
        """A check's ``done`` (the callback path)."""
        if isinstance(outcome, Exception):
            # A bug in the probe, as in _check: a failed result, logged loudly.
            self._probe_errors += 1
            log.error("probe of %r raised", entry.target.key, exc_info=outcome)
            outcome = ProbeResult(False, check.elapsed(), f"probe error: {type(outcome).__name__}: {outcome}")
        self._complete(entry, check, outcome)

    def _finished(self, entry: _Entry, task: asyncio.Task[ProbeResult]) -> None:
        """A task's done callback (a probe function of the caller's)."""
        self._complete(entry, task, None if task.cancelled() else task.result())

    def _complete(self, entry: _Entry, running: asyncio.Task[ProbeResult] | Check, result: ProbeResult | None) -> None:
        """The probe ``running`` ended with ``result`` (None: cancelled)."""
        self._tasks.discard(running)
        confirming = entry.confirming
        if entry.task is running:
            entry.task = None
            entry.confirming = False
        if len(self._tasks) == self._max_concurrency - 1 or self._urgent:
            self._wakeup()  # the loop may be waiting for a free slot
        if result is None or not entry.alive or self._stopping:
            return
        self._probes += 1
        now = self._clock()
        for key in entry.keys:
            self._checks += 1
            try:
                self._on_result(key, result, now)
            except Exception:  # noqa: BLE001 - one bad callback must not stop the checks
                log.exception("on_result failed for %r", key)
        if result.ok and entry.watched is not None:
            # A backend back from a crash is watched again now, not after its backoff.
            self._watcher.probe_succeeded(entry.watched)
        if entry.confirm_left > 0:
            if confirming:
                # One success ends it (the backend answers); a failure counts toward fall.
                entry.confirm_left = 0 if result.ok else entry.confirm_left - 1
            if entry.confirm_left > 0 and entry.task is None:
                self._confirm_next(entry)

    def stats(self, lateness: bool = True) -> SchedulerStats:
        """A snapshot for metrics and benchmarks (without the lateness samples: `lateness`)."""
        return SchedulerStats(
            targets=self._keys, in_flight=len(self._tasks), checks=self._checks,
            skipped=self._skipped, dropped=self._dropped, probe_errors=self._probe_errors,
            lateness=tuple(self._lateness) if lateness else (), probes=self._probes, groups=len(self._entries),
            watch_losses=self._watch_losses, confirmations=self._confirmations,
            asked=self._asked,
            watch=self._watcher.stats(),
            **self._kept_stats(),
        )

    def _kept_stats(self) -> dict[str, int]:
        p = self._poller
        if p is None:
            return {}
        return {"kept_idle": p.idle, "kept_used": p.kept_used, "kept_retried": p.kept_retried,
                "kept_over_budget": p.kept_over_budget, "kept_evicted": p.kept_evicted}
