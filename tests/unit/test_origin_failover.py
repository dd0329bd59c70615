"""Origin failover on fresh proof (policy/origins.py), and one POP alone moving nothing.

A move from us-west (A) to eu-central (T) needs the POPs that see A down to show T healthy
on checks that succeeded after A's failure began there; broken checks never do, so the
VIP stays on A. Reports here carry the agent's check times the way the controller keeps
them (``OriginChecks``, on the controller's clock).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config.desired import load_desired
from controller.config.desired_model import DesiredState
from controller.policy.model import OriginChecks, PlannerState, PlanResult, PopReport
from controller.policy.planner import plan
from controller.server.store import _vip_from_json, _vip_to_json

from tests.helpers.config_dirs import copy, edit, errors
from tests.helpers.planner_run import DOWN, GAME, UP, fleet

SETTLE = GAME.policy.safety.settle
NAME = "game-global"
US, EU = "us-west", "eu-central"


def rep(pop: str, at: float, usw: bool | None, euc: bool | None = UP, *, failing: float | None = None,
        eu_ok: float | None = None, eu_failing: float | None = None) -> PopReport:
    """A report at ``at``; ``failing``: us-west failing since (seconds ago), ``eu_ok``:
    eu-central's checks last succeeded (seconds ago). No ages at all: an older agent."""
    checks = {}
    if failing is not None:
        checks = {NAME: {US: OriginChecks(None, at - failing),
                         EU: OriginChecks(None if eu_ok is None else at - eu_ok,
                                          None if eu_failing is None else at - eu_failing)}}
    return PopReport(pop, at, 1, {NAME: {US: usw, EU: euc}}, {NAME: True}, checks)


class Run:
    def __init__(self, desired: DesiredState) -> None:
        self.desired, self.state = desired, PlannerState.initial()

    def at(self, now: float, *reports: PopReport) -> PlanResult:
        result = plan(self.desired, {r.pop: r for r in reports}, {}, now, self.state)
        self.state = result.state
        return result

    def healthy(self, now: float) -> PlanResult:
        return self.at(now, *(rep(p, now, UP) for p in self.desired.vips[0].publish))


def active(r: PlanResult) -> set[str]:
    return {items[NAME].active_origin for items in r.pops.values()}


def test_checks_broken_everywhere_never_move_the_origin() -> None:
    """s6 in the lab: the checks' port cut at every POP. us-west fails first (its checks run
    first), eu-central a moment later: no check of eu-central ever succeeded after
    us-west's failed, so nothing proves it healthy and the VIP stays on us-west."""
    run = Run(fleet())
    run.healthy(0)
    # us-west down at every POP; eu-central still up, but checked last before the cut.
    r = run.at(10, *(rep(p, 10, DOWN, failing=0.3, eu_ok=0.35) for p in ("sjc", "fra", "sin")))
    assert active(r) == {US} and "failover to eu-central pending" in r.notes[NAME]
    assert r.wake_at is not None and r.wake_at <= 10 + SETTLE
    assert run.state.vips[NAME].down_since == {US: 10}
    r = run.at(10.4, *(rep(p, 10.4, DOWN, DOWN, failing=0.7, eu_failing=0.5) for p in ("sjc", "fra", "sin")))
    assert active(r) == {US} and r.notes[NAME].startswith("stays on us-west: no origin is healthy")
    assert {a.kind for a in r.alarms} >= {"all_origins_down", "checks_down_everywhere"}
    r = run.at(12, *(rep(p, 12, DOWN, DOWN, failing=2.3, eu_failing=2.1) for p in ("sjc", "fra", "sin")))
    assert active(r) == {US}  # the window is long over: still nothing to move to
    # The checks come back, eu-central first: it was down during us-west's failure, so fresh
    # checks of it prove nothing; the window starts again, and us-west recovers within it.
    r = run.at(13, *(rep(p, 13, DOWN, UP, failing=3.3, eu_ok=0.05) for p in ("sjc", "fra", "sin")))
    assert active(r) == {US} and "pending" in r.notes[NAME]
    r = run.at(13.3, *(rep(p, 13.3, UP) for p in ("sjc", "fra", "sin")))
    assert active(r) == {US} and run.state.vips[NAME].down_since == {}
    assert active(run.at(20, *(rep(p, 20, UP) for p in ("sjc", "fra", "sin")))) == {US}


def test_a_real_failure_moves_on_the_first_report_with_proof() -> None:
    """us-west dies; the first reports carry eu-central checks older than the failure (no
    proof yet: pending); the next ones, a check interval later, prove it: moved at once,
    well before the window ends."""
    run = Run(fleet())
    run.healthy(0)
    r = run.at(10, *(rep(p, 10, DOWN, failing=0.3, eu_ok=0.35) for p in ("sjc", "fra", "sin")))
    assert active(r) == {US} and "pending" in r.notes[NAME]
    r = run.at(10.1, *(rep(p, 10.1, DOWN, failing=0.4, eu_ok=0.05) for p in ("sjc", "fra", "sin")))
    assert active(r) == {EU} and "fresh checks prove it healthy" in r.notes[NAME]
    assert 10.1 < 10 + SETTLE
    assert run.state.vips[NAME].active_since == 10.1


def test_proof_from_a_quorum_of_the_pops_that_see_it_down_is_enough() -> None:
    """Two of three POPs see us-west down, both prove eu-central: the third (older agent,
    healthy) is not needed. One of the two alone proving it is not enough (2 are needed)."""
    run = Run(fleet())
    run.healthy(0)
    r = run.at(10, rep("sjc", 10, DOWN, failing=0.4, eu_ok=0.05), rep("fra", 10, DOWN), rep("sin", 10, UP))
    assert active(r) == {US} and "pending" in r.notes[NAME]
    r = run.at(10.2, rep("sjc", 10.2, DOWN, failing=0.6, eu_ok=0.05), rep("fra", 10.2, DOWN, failing=0.5, eu_ok=0.1),
               rep("sin", 10.2, UP))
    assert active(r) == {EU}


def test_older_agents_without_check_ages_move_after_the_settle_window() -> None:
    run = Run(fleet())
    run.healthy(0)
    r = run.at(10, *(rep(p, 10, DOWN) for p in ("sjc", "fra", "sin")))
    assert active(r) == {US} and "pending" in r.notes[NAME]
    assert r.wake_at == 10 + SETTLE  # the engine's timer: planned again when the window ends
    assert active(run.at(10 + SETTLE / 2, *(rep(p, 10 + SETTLE / 2, DOWN) for p in ("sjc", "fra", "sin")))) == {US}
    r = run.at(10 + SETTLE, *(rep(p, 10 + SETTLE, DOWN) for p in ("sjc", "fra", "sin")))
    assert active(r) == {EU} and "down for the whole" in r.notes[NAME]


def test_a_window_that_ends_with_the_target_down_stays() -> None:
    run = Run(fleet())
    run.healthy(0)
    run.at(10, *(rep(p, 10, DOWN) for p in ("sjc", "fra", "sin")))
    r = run.at(10 + SETTLE, *(rep(p, 10 + SETTLE, DOWN, DOWN) for p in ("sjc", "fra", "sin")))
    assert active(r) == {US} and "no origin is healthy" in r.notes[NAME]


def test_the_pending_window_survives_a_restart() -> None:
    """The window's start is memory (VipMemory.down_since), persisted like the rest: a
    controller restarted mid-window does not start it over."""
    run = Run(fleet())
    run.healthy(0)
    run.at(10, *(rep(p, 10, DOWN) for p in ("sjc", "fra", "sin")))
    mem = run.state.vips[NAME]
    assert _vip_from_json(_vip_to_json(mem)) == mem and mem.down_since == {US: 10}
    assert "down_since" not in _vip_to_json(Run(fleet()).healthy(0).state.vips[NAME])  # files as before
    restarted = Run(fleet())
    restarted.state = PlannerState({NAME: _vip_from_json(_vip_to_json(mem))})
    assert active(restarted.at(10 + SETTLE, *(rep(p, 10 + SETTLE, DOWN) for p in ("sjc", "fra", "sin")))) == {EU}


def test_one_pop_alone_moves_no_origin() -> None:
    """Item 7: sjc is the only POP reporting (the others stale); it sees us-west down and
    proves eu-central healthy. One POP's reports never move an origin for everyone."""
    run = Run(fleet())
    run.healthy(0)
    for t in (20, 20 + SETTLE, 30):  # (fra's and sin's reports from t=0 are stale from 15 on)
        r = run.at(t, rep("sjc", t, DOWN, failing=0.4, eu_ok=0.05), rep("fra", 0, UP), rep("sin", 0, UP))
        assert active(r) == {US}, r.notes[NAME]
        assert r.notes[NAME].startswith("on us-west: us-west: unknown (1/1 POPs see it down: too few"), r.notes[NAME]


def test_min_down_pops_1_lets_one_pop_move_it() -> None:
    run = Run(fleet(failover={"min_down_pops": 1}))
    run.healthy(0)
    r = run.at(20, rep("sjc", 20, DOWN, failing=0.4, eu_ok=0.05), rep("fra", 0, UP), rep("sin", 0, UP))
    assert active(r) == {EU}


@pytest.mark.parametrize("ages", [True, False])
def test_a_single_pop_vip_still_fails_over(ages: bool) -> None:
    """min_down_pops (2) is capped at the VIP's publish domains (1)."""
    run = Run(fleet(pops=("sjc",)))
    run.healthy(0)
    down = rep("sjc", 10, DOWN, failing=0.4, eu_ok=0.05) if ages else rep("sjc", 10, DOWN)
    r = run.at(10, down)
    if not ages:
        assert active(r) == {US} and "pending" in r.notes[NAME]
        r = run.at(10 + SETTLE, rep("sjc", 10 + SETTLE, DOWN))
    assert active(r) == {EU}


def test_min_down_pops_is_validated_with_its_path(tmp_path: Path) -> None:
    d = copy(tmp_path)
    edit(d, "controller.yaml", lambda c: c["policy"]["failover"].__setitem__("min_down_pops", 0))
    assert any(e.startswith("controller.yaml: policy.failover.min_down_pops: must be >= 1") for e in errors(d))
    d = copy(tmp_path / "b")
    edit(d, "controller.yaml", lambda c: c["policy"]["failover"].__setitem__("min_down_pops", 3))
    assert load_desired(str(d)).policy.failover.min_down_pops == 3
