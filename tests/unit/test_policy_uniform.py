"""VIPs planned once for all their POPs (``planner._plan_uniform``: every POP fresh with equal
verdicts, STEADY or NEW memory everywhere, nothing drained) against the per-POP oracle
(``planner.full_plan``'s long path), in a fleet that mixes them with VIPs that are not
uniform: a world where most failures are a VIP's origin failing at every POP at once (which
keeps the VIP uniform through its failover), and a few are one POP's (which makes it
non-uniform until it heals), POPs that fall silent, drains, check times, commits, and
controller restarts from the persisted memory. After every step the plans (items and their
sentences), notes, alarms, memory and wake-ups must be identical; and the uniform path must
have planned most VIPs (else the test would prove nothing)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest

from controller.config.desired_model import DesiredState, FleetVip, PopSpec
from controller.policy import planner
from controller.policy.engine import Engine, compact_report
from controller.policy.model import OriginChecks, PlannerState, PopReport, UniformItems
from controller.policy.planner import VipPlan, plan_all, result_of
from controller.server.store import planner_from_json, planner_to_json
from tests.helpers.oracle import assert_same_as_oracle
from tests.helpers.random_fleet import BASE, random_policy, random_steering
from tests.helpers.seeds import with_clock_seed

POPS12 = tuple(f"p{i:02d}" for i in range(12))  # >= 8: UniformItems, the engine's merged commit
STEPS = 700


def _vip(i: int, rng: random.Random) -> FleetVip:
    template = BASE.vips[i % len(BASE.vips)]
    kind = rng.random()
    publish = (POPS12 if kind < 0.6 else
               tuple(sorted(rng.sample(POPS12, rng.randint(8, 11)), key=POPS12.index)) if kind < 0.85 else
               tuple(sorted(rng.sample(POPS12, rng.randint(1, 7)), key=POPS12.index)))
    fv = random_policy(FleetVip(dataclasses.replace(template.vip, name=f"u{i:02d}"), publish, rng.random() > 0.05,
                                template.policy), rng)
    return random_steering(fv, rng) if rng.random() < 0.15 else fv


class _World:
    """Origins that fail everywhere at once (mostly) or at one POP (a few)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.down: set[tuple[str, str]] = set()  # (vip, region) down at every POP
        self.local: dict[tuple[str, str, str], bool | None] = {}  # (pop, vip, region) -> its own verdict
        self.silent: set[str] = set()

    def step(self, desired: DesiredState) -> None:
        rng = self.rng
        fv = rng.choice(desired.vips)
        region = rng.choice(fv.vip.origins).region
        if rng.random() < 0.1:
            self.down ^= {(fv.name, region)}
        if rng.random() < 0.04:
            pop = rng.choice(fv.publish)
            self.local[(pop, fv.name, region)] = rng.choice((False, False, None, True))
        if self.local and rng.random() < 0.1:
            del self.local[rng.choice(sorted(self.local))]
        if rng.random() < 0.01:
            self.silent.add(rng.choice(POPS12))
        if self.silent and rng.random() < 0.15:
            self.silent.discard(rng.choice(sorted(self.silent)))

    def report(self, pop: str, desired: DesiredState, now: float) -> PopReport:
        origins: dict[str, dict[str, bool | None]] = {}
        checks: dict[str, dict[str, OriginChecks]] = {}
        for fv in desired.vips:
            if pop not in fv.publish:
                continue
            origins[fv.name] = {o.region: self.local.get((pop, fv.name, o.region), (fv.name, o.region) not in self.down)
                                for o in fv.vip.origins}
            if self.rng.random() < 0.02:  # check times, failing now and then (fall not reached yet)
                failing = now - 0.1 if self.rng.random() < 0.5 else None
                checks[fv.name] = {o.region: OriginChecks(now - 0.2, failing) for o in fv.vip.origins}
        return PopReport(pop, now, 1, origins, {name: True for name in origins}, checks)


def _commit(desired: DesiredState, rng: random.Random, serial: int) -> DesiredState:
    vips = list(desired.vips)
    k = rng.randrange(len(vips))
    fv = vips[k]
    change = rng.choice(("publish", "policy", "enabled", "origins"))
    if change == "publish":
        pop = rng.choice(POPS12)
        publish = tuple(p for p in POPS12 if (p in fv.publish) != (p == pop))
        vips[k] = dataclasses.replace(fv, publish=publish) if publish else fv
    elif change == "policy":
        vips[k] = random_policy(fv, rng)
    elif change == "enabled":
        vips[k] = dataclasses.replace(fv, enabled=not fv.enabled)
    elif len(fv.vip.origins) > 1:
        vips[k] = dataclasses.replace(fv, vip=dataclasses.replace(fv.vip, origins=fv.vip.origins[::-1]))
    return dataclasses.replace(desired, revision=f"rev{serial}", vips=tuple(vips))


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many plans the uniform path made (and how many times it declined)."""
    counts = {"uniform": 0, "declined": 0}
    real: Callable[..., VipPlan | None] = planner._plan_uniform

    def counted(*args: object) -> VipPlan | None:
        vp = real(*args)
        counts["uniform" if vp is not None else "declined"] += 1
        return vp
    monkeypatch.setattr(planner, "_plan_uniform", counted)
    return counts


def _run(seed: int, counts: dict[str, int], quiet: int = 0, restarts_quiet: int = 0) -> dict[str, int]:
    """``quiet``: the first steps hear from no POP; ``restarts_quiet``: a restart forgets the
    reports (a controller's restart from saved state) and hears from no POP for that many steps."""
    rng = random.Random(seed)
    desired = dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS12),
                                  vips=tuple(_vip(i, rng) for i in range(40)))
    world = _World(rng)
    engine = Engine(PlannerState.initial())
    oracle = PlannerState.initial()
    reports: dict[str, PopReport] = {}
    drains: dict[str, float] = {}
    now = 1000.0
    stats = {"restarts": 0, "uniform_items": 0, "planned": 0, "uniform_after_restart": 0}
    deaf_until = quiet
    for step in range(STEPS):
        wake = engine.next_wake()
        now = max(now, wake) if wake is not None and rng.random() < 0.2 else now + rng.choice((0.2, 0.5, 1.0, 2.0))
        world.step(desired)
        for pop in POPS12 if step >= deaf_until else ():  # (``quiet``: the first steps hear from no POP)
            if pop not in world.silent and rng.random() < 0.7:
                report = world.report(pop, desired, now)
                # (mostly interned, as the controller's reports are: equal verdicts, one object)
                reports[pop] = compact_report(report, reports.get(pop)) if rng.random() < 0.9 else report
        if rng.random() < 0.01:
            drains.setdefault(rng.choice(POPS12), now)
        if drains and rng.random() < 0.1:
            del drains[rng.choice(sorted(drains))]
        if rng.random() < 0.03:
            desired = _commit(desired, rng, step)
        before = counts["uniform"]
        restart = rng.random() < 0.01
        if restart:
            # A controller restart: a new engine on the memory as the store persists it
            # (steady pairs load as the STEADY object), its first pass over every VIP.
            engine = Engine(planner_from_json(planner_to_json(oracle)))
            stats["restarts"] += 1
            if restarts_quiet:
                reports = {}
                deaf_until = step + 1 + restarts_quiet
        changes = engine.run(desired, reports, drains, now, refresh_after=0.0)
        stats["planned"] += len(changes.planned)
        stats["uniform_after_restart"] += counts["uniform"] - before if restart else 0
        plans = plan_all(desired, reports, drains, now, oracle, shortcuts=False)
        full = result_of(desired, plans)
        oracle = full.state
        where = f"seed {seed}, step {step}, t={now}"
        assert_same_as_oracle(engine, full, plans, where)
        stats["uniform_items"] += sum(isinstance(vp.items, UniformItems) for vp in engine.plans.values())
    return stats


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_uniform_vips_planned_once_equal_planning_every_pop(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = _counting(monkeypatch)
    stats = _run(seed, counts)
    # Both paths ran, the uniform one for most of the VIPs planned (the steady fleet), and
    # restarts planned from the loaded memory.
    assert counts["uniform"] > 0.1 * stats["planned"] and counts["declined"] > 0.05 * stats["planned"], (counts, stats)
    assert stats["uniform_after_restart"] and stats["uniform_items"] > 0.3 * STEPS * 40, stats


def test_uniform_vips_equal_planning_every_pop_with_a_seed_from_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = _counting(monkeypatch)
    with_clock_seed(lambda seed: _run(seed, counts))


def test_vips_no_pop_has_reported_about_planned_once_equal_planning_every_pop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first passes after a start with no state, before any report (``_plan_silent``: NEW
    at every POP, no fresh report), drains and steered or disabled VIPs among them, then the
    reports: the same as the oracle at every step, and the silent path planned most VIPs of
    the quiet steps."""
    counts = _counting(monkeypatch)
    silent = {"planned": 0}
    real: Callable[..., VipPlan | None] = planner._plan_silent

    def counted(*args: object) -> VipPlan | None:
        vp = real(*args)
        silent["planned"] += vp is not None
        return vp
    monkeypatch.setattr(planner, "_plan_silent", counted)
    for seed in (11, 12, 13):
        _run(seed, counts, quiet=30)
    assert silent["planned"] > 3 * 30, silent


def test_restart_from_saved_state_before_any_report_planned_once_equal_planning_every_pop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart from saved state (healthy pairs load as STEADY), its reports forgotten and
    none heard for a few steps: the VIPs STEADY at every POP are planned once for all their
    POPs (``_plan_silent`` with STEADY memory; before, POP by POP), the same as the oracle
    at every step (items and sentences, memory, alarms, wake-ups), drains and steered or
    disabled VIPs among them; and the silent path did plan steady VIPs."""
    counts = _counting(monkeypatch)
    silent = {"steady": 0}
    real: Callable[..., VipPlan | None] = planner._plan_silent

    def counted(*args: object) -> VipPlan | None:
        vp = real(*args)
        silent["steady"] += vp is not None and vp.default is planner.STEADY
        return vp
    monkeypatch.setattr(planner, "_plan_silent", counted)
    restarts = 0
    for seed in (21, 22, 23, 24):
        restarts += _run(seed, counts, restarts_quiet=5)["restarts"]
    assert restarts and silent["steady"] > 10 * restarts, (silent, restarts)
