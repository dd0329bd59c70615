"""The engine's stale timers in a steady fleet (results 3ad): every report used to push an
entry onto the heap of report deadlines, and every entry that came due pushed another, so at
50 POPs reporting every 2 s the heap grew by 25 entries a second for good, all of them
cycling through ``_due`` (memory and CPU growing with the uptime). One live entry per POP
now; a POP that falls silent still goes stale at its deadline."""

from __future__ import annotations

import dataclasses
import random

from controller.config.desired_model import DesiredState, PopSpec
from controller.policy.engine import Engine, compact_report
from controller.policy.model import PlannerState, PopReport
from tests.helpers.random_fleet import BASE, POPS, World, random_vip


def _fleet() -> tuple[Engine, DesiredState, dict[str, PopReport]]:
    rng = random.Random(7)
    vips = tuple(random_vip(i, rng, False) for i in range(8))
    desired = dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS), vips=vips)
    world = World(rng)
    return Engine(PlannerState.initial()), desired, {p: world.report(p, desired, 1000.0) for p in POPS}


def test_steady_reports_keep_one_stale_entry_per_pop_and_a_silent_pop_still_goes_stale() -> None:
    engine, desired, base = _fleet()
    reports: dict[str, PopReport] = {}
    now = 1000.0
    for step in range(2000):  # every POP reports every 2 s, unchanged, for 2000 s
        now += 1.0
        for i, pop in enumerate(POPS):
            if (step + i) % 2 == 0:
                reports[pop] = compact_report(dataclasses.replace(base[pop], received_at=now), reports.get(pop))
        engine.mark(desired, reports, {}, now)
        engine.commit(p) if (p := engine.begin(now)) and engine.compute(p) else None
    assert len(engine._stale_heap) <= 2 * len(POPS), len(engine._stale_heap)  # (3000 entries before)

    silent = POPS[0]
    last = reports[silent].received_at
    assert all(engine._fresh[silent].values())
    longest = max(engine._fresh[silent])  # (report_stale_after of each group of its VIPs)
    while now < last + longest + 1.0:  # the others keep reporting; ``silent`` sends nothing more
        now += 1.0
        for pop in POPS[1:]:
            reports[pop] = compact_report(dataclasses.replace(base[pop], received_at=now), reports.get(pop))
        engine.mark(desired, reports, {}, now)
        # each group goes stale exactly when its report_stale_after has passed
        assert engine._fresh[silent] == {s: now - last <= s for s in engine._fresh[silent]}, now - last
        engine.commit(p) if (p := engine.begin(now)) and engine.compute(p) else None
    assert not any(engine._fresh[silent].values())
    assert all(all(engine._fresh[pop].values()) for pop in POPS[1:])
