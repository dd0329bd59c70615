"""The incremental engine against the from-scratch oracle (``planner.full_plan``).

Long random event sequences (reports that change or repeat, carry check times or not, say
a VIP is not announced, POPs that fall silent, drains
and undrains, commits that change a VIP's definition, publish list or policy, add or
remove it, and time passing, sometimes exactly to the next wake-up) go through both; after
every step the plans (items with their sentences), notes, alarms, memory and wake-ups must
be identical. The engine plans only the VIPs it marks; the oracle plans every VIP on the
long path (no shortcut for steady or silent POPs).
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from controller.config.desired_model import DesiredState, FleetVip, PopSpec
from controller.policy.engine import Engine, compact_report
from controller.policy.model import PlannerState, PopReport
from controller.policy.planner import plan_all, result_of
from tests.helpers.oracle import assert_same_as_oracle, assert_same_as_oracle_but_for_countdowns
from tests.helpers.random_fleet import BASE, POPS, World, random_commit, random_vip

STEPS = 2500


def _run(seed: int, steer: bool = False, refresh_after: float = 0.0) -> tuple[dict[str, int], set[str]]:
    """``refresh_after``: the engine re-renders the countdowns of VIPs planned that long ago
    (0: every pass, as the oracle does: identical sentences too)."""
    rng = random.Random(seed)
    vips = tuple(random_vip(i, rng, steer) for i in range(14))
    desired = dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS), vips=vips)
    world = World(rng)
    engine = Engine(PlannerState.initial())
    oracle = PlannerState.initial()
    reports: dict[str, PopReport] = {}
    drains: dict[str, float] = {}
    spare: list[FleetVip] = []
    now = 1000.0
    stats = {"engine_planned": 0, "oracle_planned": 0, "reasons": 0}
    reasons: set[str] = set()
    for step in range(STEPS):
        wake = engine.next_wake()
        if wake is not None and rng.random() < 0.15:
            now = max(now, wake)  # exactly at a deadline: where rounding bites
        else:
            now += rng.choice((0.05, 0.2, 0.5, 1.0, 1.0, 2.0, 4.0))
        for pop in POPS:
            if rng.random() < world.chatty[pop] * 0.4:
                reports[pop] = compact_report(world.report(pop, desired, now), reports.get(pop))
        if rng.random() < 0.03:
            pop = rng.choice(POPS)
            if pop in drains:
                del drains[pop]
            else:
                drains[pop] = now
        if rng.random() < 0.04:
            desired = random_commit(desired, rng, spare, step)

        changes = engine.run(desired, reports, drains, now, refresh_after=refresh_after)
        plans = plan_all(desired, reports, drains, now, oracle, shortcuts=False)
        full = result_of(desired, plans)
        oracle = full.state
        stats["engine_planned"] += len(changes.planned)
        stats["oracle_planned"] += len(plans)
        where = f"seed {seed}, step {step}, t={now}"
        if refresh_after:
            assert_same_as_oracle_but_for_countdowns(engine, full, plans, where, now, refresh_after)
        else:
            assert_same_as_oracle(engine, full, plans, where)
        reasons |= {i.reason for items in full.pops.values() for i in items.values()}
        reasons |= {a.kind for a in full.alarms}
        reasons |= {vp.outcome for vp in plans}
        # (an origin failover on fresh proof, or after its window: both paths of origins.py)
        reasons |= {"failover_on_proof" if "fresh checks prove" in vp.note else "failover_after_window"
                    for vp in plans if vp.outcome == "origin_failover"}
    stats["reasons"] = len(reasons)
    return stats, reasons


@pytest.mark.parametrize("seed, steer", [(1, False), (2, False), (3, False), (1, True), (3, True)])
def test_incremental_planning_equals_planning_from_scratch(seed: int, steer: bool) -> None:
    """``steer``: some VIPs with traffic steering (per-POP preference, weights, dials)."""
    stats, reasons = _run(seed, steer)
    # The sequence went through the policy's corners (these seeds do; not every seed does)...
    assert {"healthy", "confirming", "backend_down", "report_stale", "draining", "drained", "disabled"} <= reasons
    assert reasons & {"dampened"} and reasons & {"safety_hold", "min_pops_hold", "withdraw_rate_limited"}
    # The origin failover's states: pending, moved on fresh proof, moved after the window.
    assert {"failover_pending", "failover_on_proof", "failover_after_window", "all_origins_down"} <= reasons, reasons
    # ...and the engine did not simply plan everything every time (a busy world: verdicts
    # change at every step somewhere, and drained POPs' countdowns are re-rendered each step).
    assert stats["engine_planned"] < 0.8 * stats["oracle_planned"], stats


@pytest.mark.parametrize("seed, steer", [(2, False), (1, True)])
def test_countdowns_re_rendered_once_a_second_keep_every_decision_of_the_oracle(seed: int, steer: bool) -> None:
    """The background passes re-render a countdown's sentence once its plan is a second old
    (core.COUNTDOWN_REFRESH_S), not at every pass (10,000 VIPs per pass during an incident):
    every decision, memory, alarm and wake-up is still the oracle's at every step, a sentence
    lags by less than the second, and fewer VIPs are planned than with every pass."""
    every, _ = _run(seed, steer)
    stats, reasons = _run(seed, steer, refresh_after=1.0)
    assert {"confirming", "draining", "drained", "dampened", "failover_pending"} <= reasons  # (countdowns there)
    assert stats["engine_planned"] < 0.9 * every["engine_planned"], (stats, every)


# Seeds the clock-seeded test found diverging: a POP's report_stale_after group that
# emptied and came back (a VIP's policy or publish list changed) kept the freshness it had
# when it emptied, so the engine missed its report going stale (or fresh) for that group.
# 10235: the planner listed held withdrawals' alarms in an order that its own pass changed
# (previously withdrawn first), so planning again with nothing changed reordered them.
@pytest.mark.parametrize("seed", [5012, 5026, 5030, 10235])
def test_incremental_planning_equals_planning_from_scratch_where_it_once_diverged(seed: int) -> None:
    _run(seed)


def test_incremental_planning_equals_planning_from_scratch_with_a_seed_from_the_clock() -> None:
    # Equality only: a seed may not reach every corner of the policy (the fixed seeds do).
    seed = time.time_ns() % 2**32
    try:
        _run(seed)
        _run(seed, refresh_after=1.0)
    except AssertionError as exc:
        raise AssertionError(f"with seed {seed} (rerun: _run({seed})): {exc}") from exc


def _fleet(n: int) -> DesiredState:
    template = BASE.vip("game-global")
    assert template is not None
    vips = tuple(FleetVip(dataclasses.replace(template.vip, name=f"v{i}"), POPS, True, template.policy)
                 for i in range(n))
    return dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS), vips=vips)


def _healthy(pop: str, desired: DesiredState, now: float, down: str = "") -> PopReport:
    return PopReport(pop, now, 1, {fv.name: {"us-west": fv.name != down, "eu-central": True} for fv in desired.vips})


def test_the_steady_state_plans_nothing_and_a_changed_verdict_plans_its_vip_only() -> None:
    desired = _fleet(50)
    engine = Engine()
    reports = {p: _healthy(p, desired, 0.0) for p in POPS}
    assert len(engine.run(desired, reports, {}, 0.0).planned) == 50  # the first pass plans everything
    for t in (2.0, 4.0, 6.0):  # the same verdicts again and again: nothing to plan
        reports = {p: compact_report(_healthy(p, desired, t), reports[p]) for p in POPS}
        changes = engine.run(desired, reports, {}, t)
        assert changes.planned == () and changes.pops == frozenset() and engine.next_wake() is not None
    reports["fra"] = compact_report(_healthy("fra", desired, 7.0, down="v7"), reports["fra"])
    changes = engine.run(desired, reports, {}, 7.0)
    assert changes.planned == ("v7",) and changes.pops == {"fra"}
    assert engine.items["fra"]["v7"].reason == "confirming"


def test_a_commit_plans_the_vips_it_changed_and_a_drain_those_of_its_pop() -> None:
    desired = _fleet(20)
    engine = Engine()
    reports = {p: _healthy(p, desired, 0.0) for p in POPS}
    engine.run(desired, reports, {}, 0.0)
    v3 = desired.vips[3]
    changed = dataclasses.replace(desired, revision="rev2",
                                  vips=tuple(dataclasses.replace(v, publish=POPS[:2]) if v is v3 else v
                                             for v in desired.vips))
    changes = engine.run(changed, reports, {}, 1.0)
    assert changes.planned == ("v3",) and changes.pops == set(POPS[2:]) and "v3" not in engine.items["sin"]
    smaller = dataclasses.replace(changed, vips=changed.vips[:10])
    changes = engine.run(smaller, reports, {}, 2.0)
    assert changes.planned == () and changes.removed == {f"v{i}" for i in range(10, 20)}
    assert set(engine.items["sjc"]) == {f"v{i}" for i in range(10)} and set(engine.state().vips) == set(engine.items["sjc"])
    changes = engine.run(smaller, reports, {"gru": 2.5}, 2.5)
    assert "v3" not in changes.planned and len(changes.planned) == 9 and changes.pops == {"gru"}  # v3 is not at gru
    assert engine.items["gru"]["v0"].reason == "draining"


def test_the_steady_state_keeps_no_memory_per_pair_and_shares_items() -> None:
    desired = _fleet(30)
    engine = Engine()
    reports = {p: _healthy(p, desired, 0.0) for p in POPS}
    engine.run(desired, reports, {}, 0.0)
    assert all(not vp.pop_memory for vp in engine.plans.values())
    healthy = {id(item) for items in engine.items.values() for item in items.values()}
    assert len(healthy) == 30  # one item per VIP, shared by all its POPs
    compacted = [compact_report(_healthy(p, desired, 1.0), None) for p in POPS]
    assert len({id(v) for r in compacted for v in r.origins.values()}) == 1  # one verdict mapping for all
