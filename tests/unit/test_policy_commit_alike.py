"""The engine's commit where many POPs share one mapping (a healthy fleet) against the per-POP
oracle (``planner.full_plan``): a fleet of VIPs published at every POP whose verdicts move at
every POP at once (a burst of first reports, an origin down everywhere: uniform VIPs moving
from one shared item to another, merged by list), while now and then one or several POPs in
the same pass see something of their own (changes of their own in a pass where the other POPs
take the mapping an alike POP built), POPs fall silent and come back, publish lists change by
a POP and back (equal lists that are not the same object). After every pass the plans, notes,
alarms, memory and wake-ups are identical to the oracle's."""

from __future__ import annotations

import dataclasses
import random

import pytest

from controller.config.desired_model import DesiredState, FleetVip, PopSpec
from controller.policy.engine import Engine, compact_report
from controller.policy.model import PlannerState, PopReport
from controller.policy.planner import plan_all, result_of
from tests.helpers.oracle import assert_same_as_oracle
from tests.helpers.random_fleet import BASE
from tests.helpers.seeds import with_clock_seed

POPS = tuple(f"p{i:02d}" for i in range(10))
STEPS = 300


def _desired(n: int) -> DesiredState:
    vips = []
    for i in range(n):
        template = BASE.vips[i % len(BASE.vips)]
        vips.append(FleetVip(dataclasses.replace(template.vip, name=f"a{i:02d}"), POPS, True, template.policy))
    return dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS), vips=tuple(vips))


def _run(seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    desired = _desired(30)
    engine = Engine(PlannerState.initial())
    oracle = PlannerState.initial()
    down: set[tuple[str, str]] = set()  # (vip, region) down at every POP
    local: dict[tuple[str, str, str], bool | None] = {}  # (pop, vip, region): a POP's own verdict
    silent: set[str] = set()
    reports: dict[str, PopReport] = {}
    now = 1000.0
    stats = {"shared_passes": 0, "own_at_several": 0}
    for step in range(STEPS):
        now += rng.choice((0.2, 0.5, 1.0, 3.0, 3.0, 40.0 if rng.random() < 0.1 else 1.0))
        r = rng.random()
        if r < 0.12:  # many VIPs move everywhere at once
            for fv in rng.sample(desired.vips, rng.randint(5, len(desired.vips))):
                down ^= {(fv.name, fv.vip.origins[0].region)}
        if rng.random() < 0.25:  # several POPs see something of their own, in the same pass
            for pop in rng.sample(POPS, rng.randint(1, 4)):
                fv = rng.choice(desired.vips)
                local[(pop, fv.name, rng.choice(fv.vip.origins).region)] = rng.choice((False, None, True))
            stats["own_at_several"] += 1
        if local and rng.random() < 0.4:  # (healed: mostly all at once, the fleet alike again)
            for key in rng.sample(sorted(local), len(local) if rng.random() < 0.7 else 1):
                del local[key]
        if rng.random() < 0.03:
            silent.add(rng.choice(POPS))
        if silent and rng.random() < 0.2:
            silent.discard(rng.choice(sorted(silent)))
        if rng.random() < 0.05:  # a VIP's list loses a POP, or gets the whole list back (a new tuple)
            vips = list(desired.vips)
            k = rng.randrange(len(vips))
            publish = tuple(POPS) if len(vips[k].publish) < len(POPS) else tuple(p for p in POPS if p != rng.choice(POPS))
            vips[k] = dataclasses.replace(vips[k], publish=publish)
            desired = dataclasses.replace(desired, revision=f"rev{step}", vips=tuple(vips))
        for pop in POPS:
            if pop in silent or rng.random() < 0.05:
                continue
            origins = {fv.name: {o.region: local.get((pop, fv.name, o.region), (fv.name, o.region) not in down)
                                 for o in fv.vip.origins} for fv in desired.vips if pop in fv.publish}
            reports[pop] = compact_report(PopReport(pop, now, 1, origins, {n: True for n in origins}),
                                          reports.get(pop))
        engine.run(desired, reports, {}, now, refresh_after=0.0)
        plans = plan_all(desired, reports, {}, now, oracle, shortcuts=False)
        full = result_of(desired, plans)
        oracle = full.state
        assert_same_as_oracle(engine, full, plans, f"seed {seed}, step {step}, t={now}")
        stats["shared_passes"] += len({id(m) for m in engine.items.values()}) < len(POPS) // 2
    return stats


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_commit_of_pops_sharing_a_mapping_equals_planning_every_pop(seed: int) -> None:
    stats = _run(seed)
    assert stats["shared_passes"] > STEPS // 20 and stats["own_at_several"] > STEPS // 6, stats


def test_a_commit_of_pops_sharing_a_mapping_with_a_seed_from_the_clock() -> None:
    with_clock_seed(_run)


def _interleaved(seed: int) -> dict[str, int]:
    """Two engines, one working out a commit's changes as it plans (``diff_ahead``), one in
    the commit: passes planned in slices with other passes committed between the slices (the
    changes worked out before then are stale and must not be taken), compared after every
    commit: items, notes, alarms, memory, wake-ups."""
    rng = random.Random(seed)
    desired = _desired(24)
    ahead, reference = Engine(PlannerState.initial()), Engine(PlannerState.initial())
    reference.diff_ahead = False
    down: set[tuple[str, str]] = set()
    local: dict[tuple[str, str, str], bool | None] = {}
    reports: dict[str, PopReport] = {}
    now = 1000.0
    stats = {"interleaved": 0, "taken": 0}
    for step in range(200):
        now += rng.choice((0.2, 1.0, 3.0))
        for fv in rng.sample(desired.vips, rng.randint(0, len(desired.vips))):
            down ^= {(fv.name, fv.vip.origins[0].region)}
        if rng.random() < 0.3:
            fv = rng.choice(desired.vips)
            local[(rng.choice(POPS), fv.name, fv.vip.origins[0].region)] = rng.choice((False, None))
        if local and rng.random() < 0.3:
            local.clear()
        for pop in POPS:
            origins = {fv.name: {o.region: local.get((pop, fv.name, o.region), (fv.name, o.region) not in down)
                                 for o in fv.vip.origins} for fv in desired.vips}
            reports[pop] = compact_report(PopReport(pop, now, 1, origins, {n: True for n in origins}),
                                          reports.get(pop))
        passes = []
        for engine in (ahead, reference):
            engine.mark(desired, reports, {}, now)
            passes.append(engine.begin(now, refresh_after=0.0))
        cut = len(passes[0].names) if rng.random() < 0.5 else rng.randint(0, len(passes[0].names))
        other = rng.random() < 0.4
        # (the other pass sees other verdicts: it commits other plans for some of those VIPs)
        flipped = {fv.name for fv in rng.sample(desired.vips, 6)}
        alt = {pop: compact_report(PopReport(pop, now + 0.1, 1, {
            n: ({r: not v for r, v in verdicts.items()} if n in flipped else verdicts)
            for n, verdicts in r.origins.items()}, dict(r.announced)), r) for pop, r in reports.items()}
        for engine, p in zip((ahead, reference), passes):
            for name in p.names[:cut]:  # (the first slices: planned and diffed one VIP at a time)
                p.staged[name] = engine._plan(p.fleet[name], p)
                if engine.diff_ahead and p.diff_base[:1] in ([], [engine.passes]) and p.diff.names == len(p.staged) - 1:
                    p.diff_base[:] = [engine.passes]
                    engine._diff(name, p.staged[name], p.diff)
            if other:  # another pass commits between the slices
                engine.run(desired, alt, {}, now + 0.1)
                engine.mark(desired, reports, {}, now + 0.1)  # (and back: the next pass plans them again)
        if other:
            stats["interleaved"] += 1
        for engine, p in zip((ahead, reference), passes):
            engine.compute(p)
            stats["taken"] += engine is ahead and p.diff.names == len(p.names) and p.diff_base == [engine.passes]
            engine.commit(p)
        where = f"seed {seed}, step {step}"
        assert ahead.items == reference.items, where
        assert ahead.notes == reference.notes and ahead.alarms() == reference.alarms(), where
        assert dict(ahead.state().pop_vips.items()) == dict(reference.state().pop_vips.items()), where
        assert dict(ahead.state().vips) == dict(reference.state().vips), where
        assert ahead.next_wake() == reference.next_wake(), where
    return stats


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_commit_worked_out_while_planning_equals_one_worked_out_at_the_commit(seed: int) -> None:
    stats = _interleaved(seed)
    assert stats["interleaved"] > 40 and stats["taken"] > 40, stats


def test_a_commit_worked_out_while_planning_with_a_seed_from_the_clock() -> None:
    with_clock_seed(_interleaved)
