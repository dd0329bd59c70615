"""The planner's policy, table by table, with a fake clock (``now`` is just a number)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controller.config.desired import load_desired
from controller.config.desired_model import DesiredState, FleetVip, PopSpec
from controller.policy.model import STEADY, PlannerState, PlanResult, PopReport
from controller.policy import planner
from controller.policy.planner import plan

from tests.helpers.planner_run import BASE, DOWN, GAME, UNK, UP, Run, fleet, report, reports  # noqa: F401


def summary(result: PlanResult, vip: str = "game-global") -> dict[str, tuple[bool, str]]:
    return {pop: (item.wanted, item.reason) for pop, items in result.pops.items()
            for v, item in items.items() if v == vip}


def test_steady_state_every_pop_announces_toward_the_primary() -> None:
    r = Run(fleet()).at(0, sjc=UP, fra=UP, sin=UP)
    assert summary(r) == {"sjc": (True, "healthy"), "fra": (True, "healthy"), "sin": (True, "healthy")}
    assert {i.active_origin for items in r.pops.values() for i in items.values()} == {"us-west"}
    assert r.alarms == ()


@pytest.mark.parametrize("down_pops, active", [
    ((), "us-west"),
    (("sjc",), "us-west"),  # 1 of 3 is below the quorum (0.5): a local problem, no failover
    (("sjc", "fra"), "eu-central"),  # 2 of 3: the origin is down
    (("sjc", "fra", "sin"), "eu-central"),
])
def test_quorum_failover(down_pops: tuple[str, ...], active: str) -> None:
    verdicts = {p: (DOWN if p in down_pops else UP) for p in ("sjc", "fra", "sin")}
    r = Run(fleet()).settled(0, **verdicts)  # (reports without check ages: the move waits the window)
    assert r.item("sin", "game-global").active_origin == active
    if active == "eu-central":
        assert "moved from us-west to eu-central" in r.notes["game-global"]


def test_failback_only_after_the_hold_down_and_a_blip_restarts_it() -> None:
    run = Run(fleet(failover={"failback_hold_down": 60}))
    assert run.settled(0, sjc=DOWN, fra=DOWN, sin=DOWN).item("sjc", "game-global").active_origin == "eu-central"
    run.at(10, sjc=UP, fra=UP, sin=UP)  # us-west healthy again from t=10
    assert run.at(50, sjc=UP, fra=UP, sin=UP).item("sjc", "game-global").active_origin == "eu-central"
    run.at(55, sjc=DOWN, fra=DOWN, sin=UP)  # a blip: the hold-down starts over
    run.at(56, sjc=UP, fra=UP, sin=UP)
    assert run.at(100, sjc=UP, fra=UP, sin=UP).item("sjc", "game-global").active_origin == "eu-central"
    r = run.at(116, sjc=UP, fra=UP, sin=UP)  # 60 s after t=56
    assert r.item("sjc", "game-global").active_origin == "us-west"
    assert "moved back from eu-central to us-west" in r.notes["game-global"]


def test_a_pop_that_cannot_reach_the_active_origin_withdraws_while_others_announce() -> None:
    r = Run(fleet()).settled(0, sjc=DOWN, fra=UP, sin=UP)
    assert summary(r) == {"sjc": (True, "backend_down"), "fra": (True, "healthy"), "sin": (True, "healthy")}
    # wanted stays True: the agent withdraws on its own checks and comes back without waiting for us
    assert not r.item("sjc", "game-global").safety_hold


def test_a_new_withdrawal_is_confirmed_only_after_the_settle_window() -> None:
    run = Run(fleet())
    r = run.at(10, sjc=DOWN, fra=UP, sin=UP)
    assert summary(r)["sjc"] == (True, "confirming")  # its agent keeps announcing while it waits
    assert not r.item("sjc", "game-global").safety_hold
    assert r.wake_at == 10 + GAME.policy.safety.settle  # the daemon plans again right then
    assert summary(run.at(10.5, sjc=DOWN, fra=UP, sin=UP))["sjc"] == (True, "confirming")
    r = run.at(11, sjc=DOWN, fra=UP, sin=UP)
    assert summary(r)["sjc"] == (True, "backend_down") and r.wake_at is None
    assert summary(run.at(12, sjc=DOWN, fra=UP, sin=UP))["sjc"] == (True, "backend_down")  # no new wait


def test_checks_failing_everywhere_a_few_intervals_apart_never_let_a_pop_withdraw() -> None:
    """Broken checks fail at each POP at its own moment: the first POP to notice must not be
    let go before the others' reports show the failure is everywhere."""
    run = Run(fleet())
    seen = [run.at(0.0, sjc=(DOWN, DOWN), fra=UP, sin=UP),
            run.at(0.4, sjc=(DOWN, DOWN), fra=(DOWN, DOWN), sin=UP),
            run.at(0.8, sjc=(DOWN, DOWN), fra=(DOWN, DOWN), sin=(DOWN, DOWN)),
            run.at(5.0, sjc=(DOWN, DOWN), fra=(DOWN, DOWN), sin=(DOWN, DOWN))]
    assert all(wanted and reason != "backend_down" for r in seen for wanted, reason in summary(r).values())
    assert summary(seen[-1]) == {p: (True, "safety_hold") for p in ("sjc", "fra", "sin")}
    assert any(a.kind == "checks_down_everywhere" for a in seen[2].alarms)


def test_checks_recovering_one_pop_at_a_time_after_a_hold_do_not_let_the_others_go() -> None:
    run = Run(fleet())
    everywhere = {p: (DOWN, DOWN) for p in ("sjc", "fra", "sin")}
    run.at(0, **everywhere)
    assert summary(run.at(10, **everywhere)) == {p: (True, "safety_hold") for p in ("sjc", "fra", "sin")}
    # sin's checks recover first: the hold lifts, but sjc and fra must settle again first
    r = run.at(10.3, sjc=(DOWN, DOWN), fra=(DOWN, DOWN), sin=UP)
    assert all(wanted and reason != "backend_down" for wanted, reason in summary(r).values())
    r = run.at(10.6, sjc=UP, fra=UP, sin=UP)
    assert summary(r) == {p: (True, "healthy") for p in ("sjc", "fra", "sin")}


def test_a_failure_that_heals_within_the_settle_window_costs_no_withdrawal() -> None:
    run = Run(fleet(safety={"withdraw_rate_max": 1}))
    run.at(0, sjc=DOWN, fra=UP, sin=UP)
    assert summary(run.at(0.5, sjc=UP, fra=UP, sin=UP))["sjc"] == (True, "healthy")
    # the rate-limit budget (1) is intact: fra's real failure later is let through
    r = run.settled(10, sjc=UP, fra=DOWN, sin=UP)
    assert summary(r)["fra"] == (True, "backend_down")


def test_checks_down_everywhere_holds_every_announcement_and_raises_the_alarm() -> None:
    r = Run(fleet()).at(0, sjc=(DOWN, DOWN), fra=(DOWN, DOWN), sin=(DOWN, DOWN))
    assert summary(r) == {p: (True, "safety_hold") for p in ("sjc", "fra", "sin")}
    assert all(r.item(p, "game-global").safety_hold for p in ("sjc", "fra", "sin"))
    kinds = {a.kind for a in r.alarms}
    assert "checks_down_everywhere" in kinds and "all_origins_down" in kinds


def test_max_withdraw_fraction_holds_the_rest() -> None:
    # 4 POPs, at most 50% withdrawn: 3 see both origins down, 1 sees us-west up (no failover).
    pops = ("sjc", "fra", "sin", "lhr")
    r = Run(fleet(pops, safety={"max_withdraw_fraction": 0.5})).settled(
        0, sjc=(DOWN, DOWN), fra=(DOWN, DOWN), sin=(DOWN, DOWN), lhr=(UP, DOWN))
    s = summary(r)
    assert s["lhr"] == (True, "healthy")
    assert [p for p in pops if s[p] == (True, "backend_down")] == ["fra", "sin"]  # 2 of 4, by name
    assert s["sjc"] == (True, "safety_hold") and r.item("sjc", "game-global").safety_hold
    assert any(a.kind == "min_pops_hold" for a in r.alarms)


def test_min_announcing_pops() -> None:
    r = Run(fleet(("sjc", "fra"), safety={"max_withdraw_fraction": 1.0, "min_announcing_pops": 2},
                  failover={"quorum": 0.9})).settled(
        0, sjc=(DOWN, UP), fra=(UP, UP))
    assert summary(r) == {"sjc": (True, "safety_hold"), "fra": (True, "healthy")}


def test_withdrawal_rate_limit_holds_the_third_and_releases_it_after_the_window() -> None:
    pops = ("a1", "a2", "a3", "a4", "a5")
    run = Run(fleet(pops, safety={"max_withdraw_fraction": 1.0, "min_announcing_pops": 1,
                                  "withdraw_rate_max": 2, "withdraw_rate_window": 60},
                    failover={"quorum": 0.9}))
    r = run.settled(0, a1=DOWN, a2=DOWN, a3=DOWN, a4=UP, a5=UP)
    s = summary(r)
    assert (s["a1"], s["a2"], s["a3"]) == ((True, "backend_down"), (True, "backend_down"), (True, "safety_hold"))
    assert any(a.kind == "withdraw_rate_limited" for a in r.alarms)
    r = run.at(30, a1=DOWN, a2=DOWN, a3=DOWN, a4=UP, a5=UP)
    assert summary(r)["a3"] == (True, "safety_hold")  # still within the window; a1, a2 stay withdrawn
    assert summary(r)["a1"] == (True, "backend_down")
    r = run.at(61, a1=DOWN, a2=DOWN, a3=DOWN, a4=UP, a5=UP)
    assert summary(r)["a3"] == (True, "backend_down")


def test_drain_sequencing_then_undrain() -> None:
    run = Run(fleet(drain={"drain_time": 30}))
    run.drains["fra"] = 100.0
    r = run.at(110, sjc=UP, fra=UP, sin=UP)
    item = r.item("fra", "game-global")
    assert (item.wanted, item.drain, item.reason) == (True, True, "draining")
    r = run.at(131, sjc=UP, fra=UP, sin=UP)
    assert summary(r)["fra"] == (False, "drained")
    del run.drains["fra"]
    r = run.at(140, sjc=UP, fra=UP, sin=UP)
    assert summary(r)["fra"] == (True, "healthy") and not r.item("fra", "game-global").drain


def test_a_drain_that_would_go_below_the_minimum_stays_in_the_draining_stage() -> None:
    run = Run(fleet(("sjc", "fra"), drain={"drain_time": 0}, safety={"min_announcing_pops": 2,
                                                                     "max_withdraw_fraction": 1.0}))
    run.drains["fra"] = 0.0
    r = run.at(5, sjc=UP, fra=UP)
    item = r.item("fra", "game-global")
    assert (item.wanted, item.drain, item.reason) == (True, True, "drain_blocked")
    assert any(a.kind == "drain_blocked" for a in r.alarms)


def test_flapping_pop_is_dampened_with_exponential_backoff() -> None:
    run = Run(fleet(dampening={"flaps": 3, "window": 60, "hold_down": 30, "max_hold_down": 600},
                    safety={"withdraw_rate_max": 10}))
    seq = [UP, DOWN, UP, DOWN]  # three changes
    for t, v in enumerate(seq):
        r = run.at(t, sjc=v, fra=UP, sin=UP)
    assert summary(r)["sjc"] == (False, "dampened")
    assert summary(run.at(20, sjc=UP, fra=UP, sin=UP))["sjc"] == (False, "dampened")  # held until t=33
    assert summary(run.at(34, sjc=UP, fra=UP, sin=UP))["sjc"] == (True, "healthy")
    for t, v in zip((35, 36, 37), (DOWN, UP, DOWN)):  # flaps again: the second hold-down is 60 s
        r = run.at(t, sjc=v, fra=UP, sin=UP)
    assert summary(r)["sjc"] == (False, "dampened")
    assert summary(run.at(90, sjc=UP, fra=UP, sin=UP))["sjc"] == (False, "dampened")
    assert summary(run.at(98, sjc=UP, fra=UP, sin=UP))["sjc"] == (True, "healthy")


def test_a_silent_pop_is_unknown_not_down() -> None:
    desired = fleet()
    state = PlannerState.initial()
    old = report("sjc", DOWN, DOWN, at=0)  # sjc's last word, long ago
    now = 100.0
    fresh = {"sjc": old, "fra": report("fra", UP, at=now), "sin": report("sin", UP, at=now)}
    r = plan(desired, fresh, {}, now, state)
    assert summary(r)["sjc"] == (True, "report_stale")
    assert r.item("fra", "game-global").active_origin == "us-west"  # the stale vote did not count
    assert r.alarms == ()


def test_disabled_vip_is_withdrawn_everywhere_without_a_safety_hold() -> None:
    desired = fleet()
    desired = dataclasses.replace(desired, vips=(dataclasses.replace(desired.vips[0], enabled=False),))
    r = Run(desired).at(0, sjc=UP, fra=UP, sin=UP)
    assert summary(r) == {p: (False, "disabled") for p in ("sjc", "fra", "sin")}
    assert not any(i.safety_hold for items in r.pops.values() for i in items.values())


def test_only_published_vips_reach_a_pop_and_every_item_explains_itself() -> None:
    r = plan(BASE, {}, {}, 0.0, PlannerState.initial())
    assert set(r.pops["sin"]) == {"game-global"}
    assert set(r.pops["fra"]) == {"game-global", "api-eu"}
    assert r.item("fra", "api-eu").active_origin == "eu-central"
    assert all(i.explanation for items in r.pops.values() for i in items.values())


def test_same_inputs_same_plan() -> None:
    desired = fleet()
    rs = reports(5, sjc=DOWN, fra=UP, sin=(UP, DOWN))
    a = plan(desired, rs, {"sin": 1.0}, 5, PlannerState.initial())
    b = plan(desired, rs, {"sin": 1.0}, 5, PlannerState.initial())
    assert a == b


@pytest.mark.parametrize("seed", range(12))
def test_the_shortcuts_for_steady_and_silent_pops_plan_exactly_what_the_full_path_plans(seed: int) -> None:
    """Random verdicts (mostly healthy, sometimes down or unknown, sometimes silent), drains
    and undrains over 80 moments: planning with the steady-POP shortcut and without it gives
    the same items (reason, explanation, holds), the same memory, alarms and wake-up time.
    A POP that stops being healthy after a long healthy stretch is the case that matters."""
    import random

    rng = random.Random(seed)
    pops = ("sjc", "fra", "sin", "iad", "nrt")
    desired = fleet(pops, dampening={"flaps": 3, "window": 20.0})
    fast, slow = PlannerState.initial(), PlannerState.initial()
    drains: dict[str, float] = {}
    now = 0.0
    reasons: set[str] = set()
    primary = {pop: True for pop in pops}
    left_steady = 0  # pairs that were on the fast path and then were not
    for _ in range(80):
        now += rng.choice((0.2, 0.5, 1.0, 3.0))
        if rng.random() < 0.05:
            pop = rng.choice(pops)
            drains.pop(pop, None) if pop in drains else drains.__setitem__(pop, now)
        verdicts: dict[str, tuple[bool | None, bool | None]] = {}
        for pop in pops:
            if rng.random() < 0.15:
                primary[pop] = not primary[pop]  # failures and recoveries that last a while
            if rng.random() < 0.05:
                continue  # silent this time
            usw = UNK if rng.random() < 0.03 else primary[pop]
            verdicts[pop] = (usw, rng.choices((UP, DOWN), weights=(95, 5))[0])
        rep = reports(now, **verdicts)
        a = plan(desired, rep, drains, now, fast)
        b = planner.full_plan(desired, rep, drains, now, slow)  # no shortcuts
        assert a.pops == b.pops and a.notes == b.notes and a.alarms == b.alarms and a.wake_at == b.wake_at
        assert a.state == b.state
        left_steady += sum(1 for k, m in a.state.pop_vips.items()
                           if fast.pop_vips.get(k) is STEADY and m is not STEADY)
        reasons |= {i.reason for items in a.pops.values() for i in items.values()}
        fast, slow = a.state, b.state
    assert left_steady > 0 and {"healthy", "confirming", "report_stale"} <= reasons
    assert reasons & {"backend_down", "dampened", "min_pops_hold", "safety_hold"}


def test_a_pop_that_was_steady_for_long_counts_its_first_failure_as_a_flap() -> None:
    """The steady shortcut skips the flap bookkeeping while nothing changes; the first
    change after it must still count (dampening would otherwise never trigger)."""
    r = Run(fleet(dampening={"flaps": 2, "window": 60.0}))
    for t in range(10):
        r.at(t, sjc=UP, fra=UP, sin=UP)
    r.at(10, sjc=DOWN, fra=UP, sin=UP)
    result = r.at(11, sjc=UP, fra=UP, sin=UP)  # two changes within the window: dampened
    assert summary(result)["sjc"] == (False, "dampened")
    assert summary(result)["fra"] == (True, "healthy")
