"""The check scheduler on a virtual clock with a fake probe: nothing sleeps for real.

`VirtualTime` hands the scheduler its clock and sleep; `advance(s)` moves time forward,
waking sleepers in time order and letting the event loop settle after each wake-up. The
fake probe takes a configurable (virtual) time per target and records what it saw.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from controller.health.probes import ProbeResult, ProbeSpec
from controller.health.scheduler import MIN_SLEEP, CheckScheduler, Target
from controller.health.watcher import WatchStats

T0 = 1000.0
EPS = MIN_SLEEP + 1e-9  # the scheduler may start a check up to one wake-up quantum late


class VirtualTime:
    def __init__(self, start: float = T0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, delay), next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move forward by `seconds`, waking every sleeper due on the way, in order."""
        end = self.now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= end:
            when = self._sleepers[0][0]
            self.now = max(self.now, when)
            while self._sleepers and self._sleepers[0][0] <= self.now:
                _, _, fut = heapq.heappop(self._sleepers)
                if not fut.done():  # a cancelled sleep
                    fut.set_result(None)
            await settle()
        self.now = end
        await settle()

    def jump(self, seconds: float) -> None:
        """Time passes with nobody running (a suspended VM); sleepers wake late."""
        self.now += seconds


async def settle() -> None:
    # Enough loop turns for: sleeper wakes -> run() resumes -> probe tasks start -> a
    # probe finishes -> its done callback reports the result.
    for _ in range(12):
        await asyncio.sleep(0)


@dataclass
class FakeProbe:
    """Probes by port: `duration[port]` virtual seconds, failing ports in `failing`."""

    vt: VirtualTime
    duration: dict[int, float] = field(default_factory=dict)
    failing: set[int] = field(default_factory=set)
    raising: set[int] = field(default_factory=set)
    starts: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    returned: list[tuple[int, str, float]] = field(default_factory=list)  # port, detail, when
    cancelled: list[int] = field(default_factory=list)
    running: Counter[int] = field(default_factory=Counter)
    max_running_per_port: Counter[int] = field(default_factory=Counter)
    max_running: int = 0
    calls: int = 0

    async def __call__(self, spec: ProbeSpec) -> ProbeResult:
        port = spec.port
        self.calls += 1
        n = self.calls
        self.starts[port].append(self.vt.now)
        self.running[port] += 1
        self.max_running_per_port[port] = max(self.max_running_per_port[port], self.running[port])
        self.max_running = max(self.max_running, sum(self.running.values()))
        try:
            took = self.duration.get(port, 0.0)
            if took:
                await self.vt.sleep(took)
        except asyncio.CancelledError:
            self.cancelled.append(port)
            raise
        finally:
            self.running[port] -= 1
        if port in self.raising:
            raise RuntimeError("bug in the probe")
        detail = f"{port}#{n}"
        self.returned.append((port, detail, self.vt.now))
        return ProbeResult(port not in self.failing, took, detail)


def target(port: int, interval: float = 1.0, timeout: float = 0.5) -> Target:
    # Fake probes only: nothing is ever sent to this address.
    return Target(key=f"b{port}", spec=ProbeSpec("tcp", "192.0.2.1", port, timeout), interval=interval)


@dataclass
class Sim:
    vt: VirtualTime
    probe: FakeProbe
    sched: CheckScheduler
    results: list[tuple[Hashable, ProbeResult, float]]

    def starts(self, port: int, after: float = float("-inf"), before: float = float("inf")) -> list[float]:
        return [t - T0 for t in self.probe.starts[port] if after <= t - T0 < before]

    def results_for(self, key: str) -> list[ProbeResult]:
        return [r for k, r, _ in self.results if k == key]


@asynccontextmanager
async def simulation(
    targets: Iterable[Target], *, seed: int = 1, on_result: Callable[..., None] | None = None, **kw: object
) -> AsyncIterator[Sim]:
    vt = VirtualTime()
    fake = FakeProbe(vt)
    results: list[tuple[Hashable, ProbeResult, float]] = []

    def record(key: Hashable, result: ProbeResult, finished_at: float) -> None:
        results.append((key, result, finished_at))
        if on_result is not None:
            on_result(key, result, finished_at)

    sched = CheckScheduler(
        record, probe_fn=fake, clock=vt.clock, sleep=vt.sleep, rng=random.Random(seed), **kw  # type: ignore[arg-type]
    )
    sched.set_targets(targets)
    task = asyncio.create_task(sched.run())
    try:
        yield Sim(vt, fake, sched, results)
    finally:
        sched.stop()
        await asyncio.wait_for(task, 60)  # a hang guard


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


# --- pace ---------------------------------------------------------------------------------


def test_each_target_is_checked_at_its_own_interval() -> None:
    async def scenario() -> None:
        async with simulation([target(1, 0.5), target(2, 1.0), target(3, 5.0)], jitter=0.0) as sim:
            await sim.vt.advance(60.0)
            for port, interval in ((1, 0.5), (2, 1.0), (3, 5.0)):
                starts = sim.starts(port)
                gaps = [b - a for a, b in itertools.pairwise(starts[1:])]  # steady state: from the 2nd check
                assert all(interval - EPS <= g <= interval + EPS for g in gaps), (port, gaps)
                assert 60.0 / interval - 2 <= len(starts) <= 60.0 / interval + 1

    run(scenario)


def test_jitter_varies_the_gaps_within_bounds() -> None:
    async def scenario() -> None:
        async with simulation([target(1, 2.0)], jitter=0.1) as sim:
            await sim.vt.advance(1000.0)
            starts = sim.starts(1)
            gaps = [b - a for a, b in itertools.pairwise(starts[1:])]
            assert all(1.8 - EPS <= g <= 2.2 + EPS for g in gaps)
            # Actually jittered, over the whole band, and still 2 s on average.
            assert min(gaps) < 1.85 and max(gaps) > 2.15
            assert statistics.mean(gaps) == pytest.approx(2.0, abs=0.02)

    run(scenario)


def test_a_fresh_start_checks_everything_within_a_second_but_not_all_at_once() -> None:
    async def scenario() -> None:
        async with simulation([target(p, 10.0) for p in range(1, 1001)]) as sim:
            await sim.vt.advance(1.0 + EPS)
            firsts = [sim.starts(p)[0] for p in range(1, 1001) if sim.starts(p)]
            assert len(firsts) == 1000  # every target had its first check within 1 s
            per_tenth = Counter(int(t * 10) for t in firsts)
            assert max(per_tenth.values()) < 200  # ~100 per 100 ms, not a burst of 1000

    run(scenario)


def test_long_interval_targets_spread_over_their_whole_interval() -> None:
    async def scenario() -> None:
        async with simulation([target(p, 10.0) for p in range(1, 1001)], jitter=0.0) as sim:
            await sim.vt.advance(40.0)
            # In steady state, each second of a 10 s interval gets about a tenth of the checks.
            per_second = Counter(int(t) for p in range(1, 1001) for t in sim.starts(p, after=20.0, before=30.0))
            assert sum(per_second.values()) == 1000
            assert all(50 <= per_second[s] <= 150 for s in range(20, 30)), per_second

    run(scenario)


# --- the set of targets -------------------------------------------------------------------


def test_set_targets_keeps_unchanged_removes_gone_and_adds_new() -> None:
    async def scenario() -> None:
        kept, gone, new = target(1), target(2), target(3)
        async with simulation([kept, gone], jitter=0.0) as sim:
            sim.probe.duration[2] = 0.8  # so that a probe of `gone` is in flight at the change
            await sim.vt.advance(5.0)
            phase = sim.starts(1)[-1] % 1.0
            while sim.probe.running[2] == 0:
                await sim.vt.advance(0.05)
            change = sim.vt.now - T0
            sim.sched.set_targets([kept, new])
            await sim.vt.advance(10.0)

            # kept: same phase, one check per second straight through the change.
            assert all(abs(t % 1.0 - phase) < EPS for t in sim.starts(1))
            assert len(sim.starts(1, after=change, before=change + 10.0)) == 10
            # gone: its in-flight probe was cancelled and reported nothing; no more checks.
            assert sim.probe.cancelled == [2]
            assert sim.starts(2, after=change) == []
            assert not [r for k, r, t in sim.results if k == "b2" and t - T0 > change]
            assert sim.sched.stats().dropped == 1
            # new: first check within a second of being added, then every second.
            assert change <= sim.starts(3)[0] <= change + 1.0
            assert len(sim.results_for("b3")) >= 9
            assert sim.sched.stats().targets == 2

    run(scenario)


def test_a_changed_spec_restarts_the_target_and_drops_the_stale_result() -> None:
    async def scenario() -> None:
        old = target(1)
        async with simulation([old], jitter=0.0) as sim:
            sim.probe.duration[1] = 0.5
            await sim.vt.advance(3.0)
            while sim.probe.running[1] == 0:
                await sim.vt.advance(0.05)
            changed = Target(key="b1", spec=ProbeSpec("tcp", "192.0.2.1", 2, 0.5), interval=1.0)
            reported_before = len(sim.results)
            sim.sched.set_targets([changed])
            await sim.vt.advance(3.0)
            # The old spec's in-flight result never arrives; the new spec is checked.
            assert sim.probe.cancelled == [1]
            assert all(r.detail.startswith("2#") for _, r, _ in sim.results[reported_before:])
            assert len(sim.results) - reported_before >= 2

    run(scenario)


def test_a_new_interval_takes_effect_without_losing_the_target() -> None:
    async def scenario() -> None:
        async with simulation([target(1, 5.0)], jitter=0.0) as sim:
            await sim.vt.advance(11.0)
            sim.sched.set_targets([target(1, 1.0)])
            await sim.vt.advance(10.0)
            assert len(sim.starts(1, after=11.0)) >= 9

    run(scenario)


def test_adding_a_target_wakes_a_scheduler_sleeping_toward_a_far_due_time() -> None:
    async def scenario() -> None:
        async with simulation([target(1, 300.0)], first_window=300.0) as sim:
            await sim.vt.advance(0.5)
            assert sim.starts(1) == [] or sim.starts(1)[0] > 0.5  # the loop sleeps toward it
            sim.sched.set_targets([target(1, 300.0), target(2, 1.0)])
            await sim.vt.advance(1.0 + EPS)
            assert len(sim.starts(2)) == 1 and 0.5 <= sim.starts(2)[0] <= 1.5 + EPS

    run(scenario)


def test_a_target_set_before_run_starts_is_checked() -> None:
    async def scenario() -> None:
        async with simulation([]) as sim:
            sim.sched.set_targets([target(1)])
            await sim.vt.advance(3.0)
            assert len(sim.results_for("b1")) >= 2

    run(scenario)


def test_duplicate_keys_are_rejected_and_the_set_is_unchanged() -> None:
    async def scenario() -> None:
        async with simulation([target(1)]) as sim:
            with pytest.raises(ValueError, match="duplicate target key 'b2'"):
                sim.sched.set_targets([target(2), Target("b2", target(3).spec, 1.0)])
            await sim.vt.advance(3.0)
            assert {k for k, _, _ in sim.results} == {"b1"}

    run(scenario)


# --- slow probes, overlap, concurrency ----------------------------------------------------


def test_a_slow_probe_neither_blocks_others_nor_overlaps_itself() -> None:
    async def scenario() -> None:
        async with simulation([target(1), target(2)], jitter=0.0) as sim:
            sim.probe.duration[1] = 3.5  # hangs far past its interval (timeouts gone wrong)
            await sim.vt.advance(30.0)
            assert len(sim.starts(2)) >= 29  # the fast one, every second regardless
            assert sim.probe.max_running_per_port[1] == 1
            assert 6 <= len(sim.starts(1)) <= 8  # one probe per ~4 s: due ones were skipped
            assert sim.sched.stats().skipped >= 20

    run(scenario)


def test_max_concurrency_bounds_running_probes_and_shows_as_lateness() -> None:
    async def scenario() -> None:
        async with simulation([target(p, 2.0) for p in range(1, 11)], max_concurrency=3) as sim:
            for p in range(1, 11):
                sim.probe.duration[p] = 0.5
            await sim.vt.advance(20.0)
            assert sim.probe.max_running == 3
            assert all(len(sim.starts(p)) >= 5 for p in range(1, 11))  # nobody starves
            assert sim.sched.stats().lateness_quantile(1.0) > 0.1  # the queueing is visible

    run(scenario)


def test_lateness_is_sampled_and_small_when_nothing_is_saturated() -> None:
    async def scenario() -> None:
        async with simulation([target(p) for p in range(1, 101)]) as sim:
            await sim.vt.advance(10.0)
            stats = sim.sched.stats()
            assert len(stats.lateness) == stats.checks >= 900
            assert 0.0 <= stats.lateness_quantile(0.99) <= EPS

    run(scenario)


def test_after_a_stall_targets_are_not_checked_for_every_missed_interval() -> None:
    async def scenario() -> None:
        async with simulation([target(p) for p in range(1, 11)]) as sim:
            await sim.vt.advance(3.0)
            sim.vt.jump(60.0)  # the VM was suspended for a minute
            await sim.vt.advance(1.0)
            # One fresh check each within a second, spread out: no backlog of 60, no burst.
            assert all(len(sim.starts(p, after=63.0)) == 1 for p in range(1, 11))
            assert len({sim.starts(p, after=63.0)[0] for p in range(1, 11)}) == 10
            await sim.vt.advance(5.0)
            assert all(len(sim.starts(p, after=64.0)) >= 4 for p in range(1, 11))

    run(scenario)


# --- results ------------------------------------------------------------------------------


def test_every_result_reaches_the_callback_with_its_finish_time() -> None:
    async def scenario() -> None:
        async with simulation([target(p) for p in range(1, 21)]) as sim:
            for p in range(1, 21):
                sim.probe.duration[p] = 0.05 * p
            sim.probe.failing = {3, 7}
            await sim.vt.advance(10.0)
            sent = sorted((f"b{p}", d, t) for p, d, t in sim.probe.returned)
            got = sorted((k, r.detail, t) for k, r, t in sim.results)
            assert got == sent and len(got) >= 150
            assert {k for k, r, _ in sim.results if not r.ok} == {"b3", "b7"}

    run(scenario)


def test_a_raising_probe_becomes_a_failed_check_and_the_loop_goes_on() -> None:
    async def scenario() -> None:
        async with simulation([target(1), target(2)]) as sim:
            sim.probe.raising = {1}
            await sim.vt.advance(5.0)
            bad = sim.results_for("b1")
            assert len(bad) >= 4 and all(not r.ok and r.detail == "probe error: RuntimeError: bug in the probe"
                                         for r in bad)
            assert len(sim.results_for("b2")) >= 4
            assert sim.sched.stats().probe_errors == len(bad)

    run(scenario)


def test_a_raising_callback_does_not_stop_the_checks() -> None:
    def explode(key: Hashable, result: ProbeResult, finished_at: float) -> None:
        raise KeyError(key)

    async def scenario() -> None:
        async with simulation([target(1)], on_result=explode) as sim:
            await sim.vt.advance(5.0)
            assert len(sim.results) >= 4

    run(scenario)


def test_stop_ends_run_cancels_probes_in_flight_and_reports_nothing_more() -> None:
    async def scenario() -> None:
        async with simulation([target(1)]) as sim:
            sim.probe.duration[1] = 0.9
            while sim.probe.running[1] == 0:
                await sim.vt.advance(0.1)
            reported = len(sim.results)
            sim.sched.stop()
            await sim.vt.advance(5.0)
            assert sim.probe.cancelled == [1]
            assert len(sim.results) == reported
            assert sim.sched.stats().in_flight == 0

    run(scenario)


def test_stop_before_run_makes_run_return_at_once() -> None:
    async def scenario() -> None:
        sched = CheckScheduler(lambda *a: None, probe_fn=FakeProbe(VirtualTime()))
        sched.set_targets([target(1)])
        sched.stop()
        await asyncio.wait_for(sched.run(), 60)  # a hang guard: it returns at once

    run(scenario)


# --- shared probes --------------------------------------------------------------------------


def shared(key: str, port: int = 1, interval: float = 1.0, watch: bool = False, fall: int = 2) -> Target:
    """Many VIPs' targets on one backend: same spec, their own keys."""
    return Target(key=key, spec=ProbeSpec("tcp", "192.0.2.1", port, 0.5), interval=interval, watch=watch,
                  fall=fall)


def test_vips_sharing_a_backend_and_a_check_share_one_probe_and_all_get_every_result() -> None:
    async def scenario() -> None:
        keys = [f"vip{i}" for i in range(200)]
        async with simulation([shared(k) for k in keys], jitter=0.0) as sim:
            sim.probe.failing = {1}
            await sim.vt.advance(10.0)
            starts = sim.starts(1)
            assert 9 <= len(starts) <= 11  # one probe per interval, not 200
            gaps = [b - a for a, b in itertools.pairwise(starts[1:])]
            assert all(1.0 - EPS <= g <= 1.0 + EPS for g in gaps)
            per_key = {k: [r.detail for r in sim.results_for(k)] for k in keys}
            assert all(v == per_key["vip0"] and len(v) == len(starts) for v in per_key.values())
            st = sim.sched.stats()
            assert (st.targets, st.groups, st.probes, st.checks) == (200, 1, len(starts), 200 * len(starts))

    run(scenario)


def test_only_an_identical_check_is_shared() -> None:
    async def scenario() -> None:
        targets = [shared("a"), shared("b"), shared("c", interval=2.0), shared("d", watch=True),
                   shared("e", watch=True, fall=3), shared("f", watch=True), shared("g", port=2)]
        async with simulation(targets, watcher_factory=FakeWatcher) as sim:
            await sim.vt.advance(0.0)
            # a+b share; c (interval), d+f (watch, fall 2), e (fall 3) and g (port) do not.
            assert sim.sched.stats().groups == 5

    run(scenario)


def test_a_vip_leaving_a_shared_probe_gets_no_more_results_and_the_others_keep_their_schedule() -> None:
    async def scenario() -> None:
        async with simulation([shared("a"), shared("b")], jitter=0.0) as sim:
            await sim.vt.advance(5.0)
            phase = sim.starts(1)[-1] % 1.0
            sim.sched.set_targets([shared("a")])
            change = sim.vt.now - T0
            n_b = len(sim.results_for("b"))
            await sim.vt.advance(5.0)
            assert len(sim.results_for("b")) == n_b
            assert all(abs(t % 1.0 - phase) < EPS for t in sim.starts(1))
            assert len(sim.starts(1, after=change)) == 5

    run(scenario)


# --- watch: confirmation probes -----------------------------------------------------------


class FakeWatcher:
    """Records the endpoints it is asked to watch; `lose(endpoint)` plays a lost connection."""

    last: FakeWatcher | None = None

    def __init__(self, on_loss: Callable[[tuple[str, int, str | None], str], None]) -> None:
        self.on_loss = on_loss
        self.endpoints: set[tuple[str, int, str | None]] = set()
        self.started = self.closed = False
        self.succeeded: list[tuple[str, int, str | None]] = []
        FakeWatcher.last = self

    def set_endpoints(self, endpoints: Iterable[tuple[str, int, str | None]]) -> None:
        self.endpoints = set(endpoints)

    def start(self) -> None:
        self.started = True

    def probe_succeeded(self, endpoint: tuple[str, int, str | None]) -> None:
        self.succeeded.append(endpoint)

    def close(self) -> None:
        self.closed = True

    def stats(self) -> WatchStats:
        return WatchStats(len(self.endpoints), len(self.endpoints), 0, 0, len(self.endpoints), 0)

    def lose(self, port: int = 1) -> None:
        self.on_loss(("192.0.2.1", port, None), "watch connection reset: connection reset")


def watcher() -> FakeWatcher:
    assert FakeWatcher.last is not None
    return FakeWatcher.last


def test_one_watch_per_backend_endpoint_only_for_watched_checks() -> None:
    async def scenario() -> None:
        targets = [shared("a", watch=True), shared("b", watch=True, interval=5.0), shared("c", port=2),
                   shared("d", port=3, watch=True)]
        async with simulation(targets, watcher_factory=FakeWatcher) as sim:
            await sim.vt.advance(0.0)
            assert watcher().started
            assert watcher().endpoints == {("192.0.2.1", 1, None), ("192.0.2.1", 3, None)}
            sim.sched.set_targets([shared("c", port=2)])
            assert watcher().endpoints == set()
        assert watcher().closed

    run(scenario)


@pytest.mark.parametrize("fall", [1, 2, 3, 5])
def test_a_lost_watch_runs_fall_confirmation_probes_back_to_back(fall: int) -> None:
    async def scenario() -> None:
        async with simulation([shared("a", watch=True, fall=fall, interval=3600.0)],
                              watcher_factory=FakeWatcher) as sim:
            await sim.vt.advance(1.5)  # the first check (within a second), then an hour to the next
            assert len(sim.starts(1)) == 1
            sim.probe.failing = {1}
            sim.probe.duration[1] = 0.002
            lost_at = sim.vt.now - T0
            watcher().lose()
            await sim.vt.advance(1.0)
            after = sim.starts(1, after=lost_at)
            assert len(after) == fall  # exactly fall, then the schedule goes back to its hour
            assert after[0] == lost_at  # at once
            assert all(b - a == pytest.approx(0.002) for a, b in itertools.pairwise(after))  # back to back
            assert [r.ok for r in sim.results_for("a")] == [True] + [False] * fall
            assert (sim.sched.stats().watch_losses, sim.sched.stats().confirmations) == (1, fall)

    run(scenario)


def test_one_successful_confirmation_ends_it() -> None:
    async def scenario() -> None:
        async with simulation([shared("a", watch=True, fall=3, interval=3600.0)],
                              watcher_factory=FakeWatcher) as sim:
            await sim.vt.advance(1.5)
            lost_at = sim.vt.now - T0
            watcher().lose()  # a reset of a healthy backend: the probe succeeds
            await sim.vt.advance(10.0)
            assert len(sim.starts(1, after=lost_at)) == 1
            assert all(r.ok for r in sim.results_for("a"))

    run(scenario)


def test_a_loss_during_a_probe_confirms_after_it_without_counting_it() -> None:
    async def scenario() -> None:
        async with simulation([shared("a", watch=True, fall=2, interval=1.0)], jitter=0.0,
                              watcher_factory=FakeWatcher) as sim:
            sim.probe.duration[1] = 0.3
            await sim.vt.advance(3.0)
            while sim.probe.running[1] == 0:
                await sim.vt.advance(0.01)
            started = sim.starts(1)[-1]
            watcher().lose()  # the probe in flight succeeds: it began before the loss
            await sim.vt.advance(0.5)
            # The in-flight probe's success did not end the confirmation: one started as it
            # ended, long before the next check was due (started + 1).
            assert sim.starts(1, after=started + 0.1)[0] == pytest.approx(started + 0.3, abs=EPS)
            assert sim.sched.stats().confirmations == 1
            assert not sim.probe.max_running_per_port[1] > 1  # never two at once

    run(scenario)


def test_a_loss_confirms_every_probe_on_that_endpoint_and_feeds_every_vip() -> None:
    async def scenario() -> None:
        targets = [shared(f"v{i}", watch=True, fall=2, interval=3600.0) for i in range(50)]
        other = Target(key="path2", spec=ProbeSpec("http", "192.0.2.1", 1, 0.5, path="/x"), interval=3600.0,
                       watch=True, fall=2)
        async with simulation([*targets, other], watcher_factory=FakeWatcher) as sim:
            await sim.vt.advance(1.5)
            sim.probe.failing = {1}
            watcher().lose()
            await sim.vt.advance(1.0)
            assert sim.sched.stats().confirmations == 4  # two probes (a tcp and an http), fall 2 each
            assert all([r.ok for r in sim.results_for(f"v{i}")] == [True, False, False] for i in range(50))
            assert [r.ok for r in sim.results_for("path2")] == [True, False, False]

    run(scenario)


def test_a_loss_of_an_unwatched_endpoint_changes_nothing() -> None:
    async def scenario() -> None:
        async with simulation([shared("a", watch=True, interval=3600.0), shared("b", port=2, interval=3600.0)],
                              watcher_factory=FakeWatcher) as sim:
            await sim.vt.advance(1.5)
            watcher().lose(port=2)
            watcher().lose(port=9)
            await sim.vt.advance(1.0)
            assert sim.sched.stats().confirmations == 0

    run(scenario)


def test_confirmations_wait_for_a_free_slot_but_come_before_due_checks() -> None:
    async def scenario() -> None:
        busy = [shared(f"busy{p}", port=p, interval=0.5) for p in range(10, 13)]
        async with simulation([shared("a", watch=True, fall=2, interval=3600.0), *busy],
                              watcher_factory=FakeWatcher, max_concurrency=3) as sim:
            await sim.vt.advance(1.5)
            for p in range(10, 13):
                sim.probe.duration[p] = 0.2
            while sum(sim.probe.running.values()) < 3:
                await sim.vt.advance(0.01)
            sim.probe.failing = {1}
            lost_at = sim.vt.now - T0
            watcher().lose()
            await sim.vt.advance(2.0)
            assert sim.probe.max_running == 3
            assert len(sim.starts(1, after=lost_at)) == 2
            assert [r.ok for r in sim.results_for("a")][-2:] == [False, False]

    run(scenario)


def test_a_successful_probe_of_a_watched_endpoint_tells_the_watcher() -> None:
    async def scenario() -> None:
        async with simulation([shared("a", watch=True, interval=1.0), shared("b", port=2, interval=1.0)],
                              watcher_factory=FakeWatcher) as sim:
            await sim.vt.advance(3.5)
            ok = len([r for r in sim.results_for("a") if r.ok])
            assert ok >= 3 and watcher().succeeded == [("192.0.2.1", 1, None)] * ok
            sim.probe.failing = {1}
            await sim.vt.advance(3.0)
            assert len(watcher().succeeded) == ok  # failures say nothing; port 2 is not watched

    run(scenario)


# --- check_now: fresh evidence the controller asks for ----------------------------------


def test_check_now_probes_at_once_and_leaves_the_schedule_alone() -> None:
    async def scenario() -> None:
        async with simulation([shared("a", interval=1.0), shared("b", interval=1.0), shared("c", port=2)],
                              jitter=0.0) as sim:
            await sim.vt.advance(2.5)
            before = sim.starts(1)
            phase = before[-1] % 1.0
            asked_at = sim.vt.now - T0
            assert sim.sched.check_now(["a"])
            await sim.vt.advance(0.0)
            assert sim.starts(1, after=asked_at) == [asked_at]  # one probe, now
            assert sim.starts(2, after=asked_at) == []  # only the asked target's probe
            # Its result goes to every key of the shared probe; no confirmation counted.
            assert {k for k, _, t in sim.results if t - T0 == asked_at} == {"a", "b"}
            assert (sim.sched.stats().asked, sim.sched.stats().confirmations) == (1, 0)
            await sim.vt.advance(5.0)
            later = sim.starts(1, after=asked_at + EPS)
            assert len(later) == 5 and all(abs(t % 1.0 - phase) < EPS for t in later)  # same phase

    run(scenario)


def test_check_now_lets_a_probe_in_flight_serve_and_says_when_it_cannot_start_one() -> None:
    async def scenario() -> None:
        async with simulation([shared("a", interval=1.0), shared("b", port=2, interval=1.0),
                               shared("c", port=3, interval=1.0)], jitter=0.0, max_concurrency=1) as sim:
            for p in (1, 2, 3):
                sim.probe.duration[p] = 0.3
            await sim.vt.advance(2.0)
            while sim.probe.running[1] == 0:
                await sim.vt.advance(0.01)
            n = len(sim.starts(1))
            assert sim.sched.check_now(["a"])  # in flight: it serves, nothing more starts
            assert not sim.sched.check_now(["b"])  # no free slot: not started (its due check will do)
            assert not sim.sched.check_now(["a", "nobody"])  # an unknown key is not being checked
            await sim.vt.advance(0.0)
            assert len(sim.starts(1)) == n
            assert sim.probe.max_running == 1 and sim.sched.stats().asked == 0

    run(scenario)
