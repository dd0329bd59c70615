"""The safety valve under partial knowledge (presumed state) and the evidence-based settle,
table by table, with a fake clock (``now`` is just a number).

Presumed state: a POP whose reports are stale is presumed to announce what its last report
said it announced (unless that report saw the active origin down: its agent then acts on its
own checks); a POP never heard from is unknown and counts as announcing, as before. "Down everywhere" needs fresh
evidence from a quorum of the publish domains (or from more than one POP); a single fresh
POP's failure below that is withdrawn within the limits, counted on presumed announcements.

Evidence-based settle: a POP's withdrawal is confirmed before ``settle`` runs out once a
quorum of the VIP's other POPs report the active origin healthy on checks that succeeded
after its first failed check; ``settle`` stays the upper bound.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controller.config.desired import load_desired
from controller.config.desired_model import DesiredState, FleetVip, PopSpec, Preference, Steering
from controller.policy.model import OriginChecks, PlannerState, PlanResult, PopReport
from controller.policy.planner import plan

ROOT = Path(__file__).resolve().parents[2]
BASE = load_desired(str(ROOT / "configs" / "controller"), "rev1")
GAME = BASE.vip("game-global")
assert GAME is not None
UP, DOWN = True, False
SETTLE = GAME.policy.safety.settle  # 1 s in the example
STALE = GAME.policy.safety.report_stale_after  # 15 s


def fleet(pops: tuple[str, ...] = ("sjc", "fra", "sin"), **policy: dict) -> DesiredState:
    p = GAME.policy
    for section, values in policy.items():
        p = dataclasses.replace(p, **{section: dataclasses.replace(getattr(p, section), **values)})
    return dataclasses.replace(BASE, pops=tuple(PopSpec(n, "0" * 64) for n in pops),
                               vips=(FleetVip(GAME.vip, pops, True, p),))


def rep(pop: str, at: float, usw: bool | None, euc: bool | None = UP, *, announced: bool = True,
        ok_at: float | None = None, failing: float | None = None) -> PopReport:
    """A report; ``ok_at``/``failing`` are its check times of us-west (the active origin)."""
    checks = {}
    if ok_at is not None or failing is not None:
        checks = {"game-global": {"us-west": OriginChecks(ok_at, failing)}}
    return PopReport(pop, at, 1, {"game-global": {"us-west": usw, "eu-central": euc}}, {"game-global": announced},
                     checks)


class Run:
    """Feeds the planner moments, carrying its state; reports persist until replaced."""

    def __init__(self, desired: DesiredState) -> None:
        self.desired = desired
        self.state = PlannerState.initial()
        self.reports: dict[str, PopReport] = {}

    def at(self, now: float, *reports: PopReport) -> PlanResult:
        self.reports.update({r.pop: r for r in reports})
        result = plan(self.desired, self.reports, {}, now, self.state)
        self.state = result.state
        return result


def summary(r: PlanResult) -> dict[str, str]:
    return {pop: str(items["game-global"].reason) for pop, items in r.pops.items()}


def kinds(r: PlanResult) -> set[str]:
    return {str(a.kind) for a in r.alarms}


# --- presumed state --------------------------------------------------------------------------
def test_stale_majority_and_a_real_failure_at_the_one_pop_reporting_withdraws_it() -> None:
    """The lab's finding: fra's and sin's management paths cut (their reports stale, both last
    healthy and announcing), a real backbone failure at sjc. sjc's clients must move."""
    run = Run(fleet())
    run.at(0, rep("fra", 0, UP), rep("sin", 0, UP), rep("sjc", 0, UP))
    now = 100.0  # fra's and sin's reports are long stale
    r = run.at(now, rep("sjc", now, DOWN, DOWN))
    assert summary(r) == {"sjc": "confirming", "fra": "report_stale", "sin": "report_stale"}
    r = run.at(now + SETTLE, rep("sjc", now + SETTLE, DOWN, DOWN))
    assert summary(r) == {"sjc": "backend_down", "fra": "report_stale", "sin": "report_stale"}
    assert not r.item("sjc", "game-global").safety_hold
    assert "checks_down_everywhere" not in kinds(r) and "min_pops_hold" not in kinds(r)
    # What it keeps: the stale POPs stay wanted (their agents keep announcing on their own checks).
    assert all(r.item(p, "game-global").wanted for p in ("fra", "sin"))


def test_stale_majority_and_checks_broken_at_every_pop_that_reports_holds() -> None:
    """Five POPs, three stale (last healthy); the two that report see every origin down: as
    likely broken checks as two real failures, and nobody fresh says otherwise: held."""
    pops = ("sjc", "fra", "sin", "iad", "nrt")
    run = Run(fleet(pops))
    run.at(0, *(rep(p, 0, UP) for p in pops))
    now = 100.0
    run.at(now, rep("sjc", now, DOWN, DOWN), rep("fra", now, DOWN, DOWN))
    r = run.at(now + 5, rep("sjc", now + 5, DOWN, DOWN), rep("fra", now + 5, DOWN, DOWN))
    assert summary(r) == {"sjc": "safety_hold", "fra": "safety_hold", "sin": "report_stale",
                          "iad": "report_stale", "nrt": "report_stale"}
    assert "checks_down_everywhere" in kinds(r)
    assert "3 of 5 not reporting" in next(a.detail for a in r.alarms if a.kind == "checks_down_everywhere")


@pytest.mark.parametrize("pops", [("sjc", "fra", "sin"), ("sjc", "fra")])
def test_a_fresh_quorum_seeing_every_origin_down_holds_even_with_a_pop_stale(pops: tuple[str, ...]) -> None:
    """Fresh evidence from a quorum of the publish domains (2 of 3; 1 of 2) is "down everywhere"."""
    run = Run(fleet(pops))
    run.at(0, *(rep(p, 0, UP) for p in pops))
    now = 100.0
    reporting = pops[:2] if len(pops) == 3 else pops[:1]
    run.at(now, *(rep(p, now, DOWN, DOWN) for p in reporting))
    r = run.at(now + 5, *(rep(p, now + 5, DOWN, DOWN) for p in reporting))
    assert all(summary(r)[p] == "safety_hold" for p in reporting)
    assert "checks_down_everywhere" in kinds(r)


def test_everything_stale_withdraws_and_holds_nothing() -> None:
    """Nobody fresh: nothing to decide on. Every POP is left to its own checks under its last
    plan; the controller neither withdraws nor raises an alarm of its own."""
    run = Run(fleet())
    run.at(0, rep("sjc", 0, DOWN, DOWN), rep("fra", 0, UP), rep("sin", 0, DOWN, DOWN))
    r = run.at(100.0)
    assert summary(r) == {p: "report_stale" for p in ("sjc", "fra", "sin")}
    assert all(i.wanted and not i.safety_hold for items in r.pops.values() for i in items.values())
    assert not kinds(r) & {"checks_down_everywhere", "min_pops_hold", "withdraw_rate_limited"}


@pytest.mark.parametrize("fra, sin, min_pops, fraction, held", [
    # fra's last report said it announced nothing, sin's saw us-west down: nobody left
    (dict(usw=UP, announced=False), dict(usw=DOWN), 1, 1.0, True),
    # sin never heard from: unknown, counted as announcing (as before presumed state)
    (dict(usw=DOWN), None, 1, 1.0, False),
    # fra last saw us-west down (its agent withdrew on its own checks), sin announces: 1 left
    (dict(usw=DOWN), dict(usw=UP), 1, 1.0, False),
    (dict(usw=DOWN), dict(usw=UP), 2, 1.0, True),  # ...but the minimum is 2
    (dict(usw=DOWN), dict(usw=UP), 1, 0.5, True),  # ...or 2 of 3 dark is more than half
    (dict(usw=UP), dict(usw=UP), 2, 0.5, False),  # both presumed announcing: 2 left, enough
])
def test_the_minimum_counts_the_pops_presumed_announcing(fra: dict | None, sin: dict | None, min_pops: int,
                                                         fraction: float, held: bool) -> None:
    # (quorum 0.9: fra's last "us-west down" moves nothing, the failover is not the subject)
    run = Run(fleet(safety={"min_announcing_pops": min_pops, "max_withdraw_fraction": fraction},
                    failover={"quorum": 0.9}))
    run.at(0, *(rep(p, 0, v.pop("usw"), **v) for p, v in (("fra", fra), ("sin", sin)) if v is not None))
    now = 100.0
    run.at(now, rep("sjc", now, DOWN, DOWN))
    r = run.at(now + SETTLE, rep("sjc", now + SETTLE, DOWN, DOWN))
    item = r.item("sjc", "game-global")
    if held:
        assert (item.wanted, item.reason, item.safety_hold) == (True, "safety_hold", True)
        assert "min_pops_hold" in kinds(r) and "presumed not announcing" in item.explanation
    else:
        assert item.reason == "backend_down" and "min_pops_hold" not in kinds(r)


# --- evidence-based settle -------------------------------------------------------------------
T0 = 10.0  # sjc's first failed check (fall 2 at 0.1 s: its down report comes 0.1 s later)


def test_evidence_in_early_confirms_at_once() -> None:
    run = Run(fleet())
    run.at(0, *(rep(p, 0, UP) for p in ("sjc", "fra", "sin")))
    # sjc's first failed check: its agent reports at once (still healthy, falling); the
    # other POPs are asked for their checks (evidence).
    r = run.at(T0, rep("sjc", T0, UP, failing=T0))
    assert summary(r) == {p: "healthy" for p in ("sjc", "fra", "sin")}
    assert all(r.item(p, "game-global").evidence for p in ("fra", "sin"))
    assert not r.item("sjc", "game-global").evidence  # (it sends its check times anyway)
    run.at(T0 + 0.05, rep("fra", T0 + 0.05, UP, ok_at=T0 + 0.04))  # fra's check after sjc's failure
    r = run.at(T0 + 0.1, rep("sjc", T0 + 0.1, DOWN, failing=T0))
    assert summary(r)["sjc"] == "backend_down" and r.wake_at is None  # no settle window at all
    assert not r.item("sjc", "game-global").safety_hold
    # Confirmed: nothing is waiting any more, so nobody is asked for checks.
    assert not any(r.item(p, "game-global").evidence for p in ("sjc", "fra", "sin"))
    r = run.at(T0 + 0.3, rep("sjc", T0 + 0.3, DOWN, failing=T0))
    assert summary(r)["sjc"] == "backend_down"  # stays confirmed


def test_evidence_in_late_confirms_when_it_arrives() -> None:
    run = Run(fleet())
    run.at(0, *(rep(p, 0, UP, ok_at=T0 - 0.3) for p in ("fra", "sin")), rep("sjc", 0, UP))
    r = run.at(T0 + 0.1, rep("sjc", T0 + 0.1, DOWN, failing=T0))
    assert summary(r)["sjc"] == "confirming" and r.wake_at == T0 + 0.1 + SETTLE
    assert r.item("fra", "game-global").evidence and r.item("sin", "game-global").evidence
    r = run.at(T0 + 0.3, rep("fra", T0 + 0.3, UP, ok_at=T0 + 0.25))
    assert summary(r)["sjc"] == "backend_down"  # 0.8 s before the settle window would have ended


def test_evidence_never_arriving_confirms_at_the_end_of_the_settle_window() -> None:
    run = Run(fleet())
    run.at(0, *(rep(p, 0, UP) for p in ("sjc", "fra", "sin")))  # agents that send no check times
    r = run.at(T0 + 0.1, rep("sjc", T0 + 0.1, DOWN, failing=T0))
    assert summary(r)["sjc"] == "confirming"
    r = run.at(T0 + 0.5, rep("fra", T0 + 0.5, UP), rep("sin", T0 + 0.5, UP))
    assert summary(r)["sjc"] == "confirming"
    assert summary(run.at(T0 + 0.1 + SETTLE))["sjc"] == "backend_down"  # settle is the upper bound


def test_a_pop_reporting_only_checks_older_than_the_failure_does_not_count() -> None:
    run = Run(fleet())
    run.at(0, rep("sjc", 0, UP))
    for t in (T0 + 0.1, T0 + 0.4, T0 + 0.8):  # fra and sin report, but their checks predate T0
        r = run.at(t, rep("sjc", t, DOWN, failing=T0), rep("fra", t, UP, ok_at=T0 - 0.05),
                   rep("sin", t, UP, ok_at=T0))
        assert summary(r)["sjc"] == "confirming", t


def test_a_stale_pop_does_not_count_and_a_quorum_of_the_others_is_needed() -> None:
    pops = ("sjc", "fra", "sin", "iad", "nrt")  # 4 others, quorum 0.5: 2 of them
    run = Run(fleet(pops))
    run.at(0, *(rep(p, 0, UP) for p in pops))
    now = 100.0  # everything stale by now (sin's and nrt's reports stay so), then:
    run.at(now + 0.1, rep("fra", now + 0.1, UP, ok_at=now + 0.05), rep("iad", now + 0.1, UP))
    r = run.at(now + 0.1, rep("sjc", now + 0.1, DOWN, failing=now))
    assert summary(r)["sjc"] == "confirming"  # one of four others: not a quorum
    r = run.at(now + 0.2, rep("iad", now + 0.2, UP, ok_at=now + 0.15))
    assert summary(r)["sjc"] == "backend_down"


def test_a_pop_whose_own_checks_are_failing_is_no_evidence() -> None:
    """fra still says healthy (falling: one failure, fall 2), but its last check failed: its
    last success predates sjc's failure, so it proves nothing."""
    run = Run(fleet())
    run.at(0, *(rep(p, 0, UP) for p in ("sjc", "fra", "sin")))
    r = run.at(T0 + 0.1, rep("sjc", T0 + 0.1, DOWN, failing=T0), rep("fra", T0 + 0.1, UP, ok_at=T0 - 0.05,
                                                                       failing=T0 + 0.05))
    assert summary(r)["sjc"] == "confirming"


def test_checks_failing_everywhere_still_hold_with_check_times() -> None:
    """Broken checks everywhere, each POP at its own moment, all sending check times: none of
    them has a success after another's first failure, so nothing settles early, and then
    everything is held."""
    run = Run(fleet())
    run.at(0, *(rep(p, 0, UP, ok_at=-0.05) for p in ("sjc", "fra", "sin")))
    seen = [run.at(T0, rep("sjc", T0, DOWN, DOWN, failing=T0 - 0.1),
                   rep("fra", T0, UP, failing=T0 - 0.02, ok_at=T0 - 0.15)),
            run.at(T0 + 0.1, rep("fra", T0 + 0.1, DOWN, DOWN, failing=T0 - 0.02),
                   rep("sin", T0 + 0.1, UP, ok_at=T0 - 0.12, failing=T0 + 0.05)),
            run.at(T0 + 0.2, rep("sin", T0 + 0.2, DOWN, DOWN, failing=T0 + 0.05)),
            run.at(T0 + 3)]
    assert all(reason not in ("backend_down",) for r in seen for reason in summary(r).values())
    assert summary(seen[-1]) == {p: "safety_hold" for p in ("sjc", "fra", "sin")}
    assert "checks_down_everywhere" in kinds(seen[-1])


def test_a_pop_recovering_after_a_hold_everywhere_lifted_is_not_let_go_on_the_others_evidence() -> None:
    """The way back from checks down everywhere (the lab's test_checks_failing_everywhere...):
    fra recovers first and lifts the hold; sjc's checks succeed again too (rising, short of
    ``rise``), so it sends no first failed check any more, and its window restarted when the
    hold lifted. fra's fresh checks were taken as evidence against that restart, and sjc was
    withdrawn for a moment while recovering. Its checks succeeding prove its failure is ending,
    not elsewhere-only: it waits its window (and recovers within it)."""
    run = Run(fleet(("sjc", "fra")))
    run.at(0, rep("sjc", 0, UP, ok_at=-0.05), rep("fra", 0, UP, ok_at=-0.05))
    run.at(T0, rep("sjc", T0, DOWN, DOWN, failing=T0 - 0.1), rep("fra", T0, DOWN, DOWN, failing=T0 - 0.05))
    r = run.at(T0 + 3 * SETTLE, rep("sjc", T0 + 3 * SETTLE, DOWN, DOWN, failing=T0 - 0.1),
               rep("fra", T0 + 3 * SETTLE, DOWN, DOWN, failing=T0 - 0.05))
    assert summary(r) == {"sjc": "safety_hold", "fra": "safety_hold"}
    t1 = T0 + 10  # the checks' path is back: fra's eu-central rises first (the hold lifts)
    r = run.at(t1, rep("fra", t1, DOWN, UP, failing=T0 - 0.05), rep("sjc", t1, DOWN, DOWN, ok_at=t1 - 0.01))
    assert "checks_down_everywhere" not in kinds(r) and summary(r)["sjc"] == "confirming"
    r = run.at(t1 + 0.02, rep("fra", t1 + 0.02, UP, UP, ok_at=t1 + 0.015))  # fra's us-west up
    assert summary(r)["sjc"] == "confirming"
    # sjc's eu-central is up, its us-west rising (its last checks of it succeeded)
    r = run.at(t1 + 0.04, rep("sjc", t1 + 0.04, DOWN, UP, ok_at=t1 + 0.03))
    assert summary(r)["sjc"] == "confirming", "let go on the others' evidence while recovering"
    r = run.at(t1 + 0.06, rep("sjc", t1 + 0.06, UP, UP, ok_at=t1 + 0.05))
    assert summary(r) == {"sjc": "healthy", "fra": "healthy"}


def test_evidence_confirms_only_the_settle_not_the_limits() -> None:
    """Early confirmation ends the wait, not the safety valve: the minimum still holds."""
    run = Run(fleet(("sjc", "fra"), safety={"min_announcing_pops": 2, "max_withdraw_fraction": 1.0},
                    failover={"quorum": 0.9}))
    run.at(0, rep("sjc", 0, UP), rep("fra", 0, UP))
    r = run.at(T0 + 0.1, rep("sjc", T0 + 0.1, DOWN, failing=T0), rep("fra", T0 + 0.1, UP, ok_at=T0 + 0.05))
    assert summary(r) == {"sjc": "safety_hold", "fra": "healthy"}
    assert "min_pops_hold" in kinds(r)


def test_settle_on_evidence_off_is_the_fixed_settle_window() -> None:
    """``policy.safety.settle_on_evidence: false``: nobody is asked, evidence is ignored, the
    withdrawal waits the whole window (the behaviour before the evidence-based settle)."""
    run = Run(fleet(safety={"settle_on_evidence": False}))
    run.at(0, *(rep(p, 0, UP) for p in ("sjc", "fra", "sin")))
    r = run.at(T0, rep("sjc", T0, UP, failing=T0))
    assert not any(r.item(p, "game-global").evidence for p in ("sjc", "fra", "sin"))
    r = run.at(T0 + 0.1, rep("sjc", T0 + 0.1, DOWN, failing=T0), rep("fra", T0 + 0.1, UP, ok_at=T0 + 0.05))
    assert summary(r)["sjc"] == "confirming"
    assert summary(run.at(T0 + 0.1 + SETTLE))["sjc"] == "backend_down"


def test_a_pop_that_sees_every_origin_down_waits_the_whole_window_whatever_the_evidence() -> None:
    """Every origin down at one POP is the broken-checks signature (the checks' own path cut):
    the window it exists for runs in full, evidence or not."""
    run = Run(fleet())
    run.at(0, *(rep(p, 0, UP) for p in ("sjc", "fra", "sin")))
    r = run.at(T0 + 0.1, rep("sjc", T0 + 0.1, DOWN, DOWN, failing=T0), rep("fra", T0 + 0.1, UP, ok_at=T0 + 0.05),
               rep("sin", T0 + 0.1, UP, ok_at=T0 + 0.06))
    assert summary(r)["sjc"] == "confirming"
    assert summary(run.at(T0 + 0.1 + SETTLE))["sjc"] == "backend_down"


# --- the evidence-based settle with traffic steering -----------------------------------------
# A steered VIP's POPs follow different routes, so the evidence that ends a POP's settle early
# is about the origin that POP judged down: other POPs' fresh checks of that same origin (they
# are asked about it by name), never of another.

US, EU, AP = "us-west", "eu-central", "ap-south"


def steered(steering: Steering, *, third: bool = False) -> DesiredState:
    d = fleet()
    vip = d.vips[0].vip
    if third:  # a backup origin outside the weights
        vip = dataclasses.replace(vip, origins=(*vip.origins, dataclasses.replace(
            vip.origins[1], region=AP, backends=vip.origins[1].backends)))
    return dataclasses.replace(d, vips=(dataclasses.replace(d.vips[0], vip=vip, steering=steering),))


def srep(pop: str, at: float, verdicts: dict[str, bool | None], **checks: tuple[float | None, float | None]
         ) -> PopReport:
    """A report; ``checks``: region (``_`` for ``-``) -> (ok_at, failing) on the controller's clock."""
    return PopReport(pop, at, 1, {"game-global": verdicts}, {"game-global": True},
                     {"game-global": {r.replace("_", "-"): OriginChecks(*t) for r, t in checks.items()}}
                     if checks else {})


FRA_PREFERS_EU = Steering(preferences=(Preference(("fra",), (EU, US)),))
BOTH = {US: UP, EU: UP}


def test_a_preferring_pops_settle_ends_on_the_others_fresh_checks_of_its_own_origin() -> None:
    """fra prefers eu-central and sees it fail; sjc and sin follow us-west. They are asked about
    eu-central by name, and sjc's fresh success of eu-central confirms fra at once."""
    run = Run(steered(FRA_PREFERS_EU))
    run.at(0, *(srep(p, 0, BOTH) for p in ("sjc", "fra", "sin")))
    r = run.at(T0, srep("fra", T0, BOTH, eu_central=(None, T0)))  # fra's first failed check of eu-central
    assert summary(r) == {p: "healthy" for p in ("sjc", "fra", "sin")}
    for p in ("sjc", "sin"):
        item = r.item(p, "game-global")
        assert item.evidence and item.evidence_origins == (EU,) and item.active_origin == US
    assert not r.item("fra", "game-global").evidence
    run.at(T0 + 0.05, srep("sjc", T0 + 0.05, BOTH, us_west=(T0 + 0.04, None), eu_central=(T0 + 0.04, None)))
    r = run.at(T0 + 0.1, srep("fra", T0 + 0.1, {US: UP, EU: DOWN}, eu_central=(None, T0)))
    assert summary(r)["fra"] == "backend_down" and r.wake_at is None  # no settle window at all
    assert not any(r.item(p, "game-global").evidence for p in ("sjc", "fra", "sin"))


def test_a_preferring_pops_settle_runs_its_window_on_fresh_checks_of_another_origin_only() -> None:
    """The same, but sjc and sin send fresh successes of us-west only (their eu-central checks
    predate fra's failure): that says nothing about fra's failure, so fra waits the window."""
    run = Run(steered(FRA_PREFERS_EU))
    run.at(0, *(srep(p, 0, BOTH) for p in ("sjc", "fra", "sin")))
    run.at(T0, srep("fra", T0, BOTH, eu_central=(None, T0)))
    for t in (T0 + 0.1, T0 + 0.5, T0 + 0.9):
        r = run.at(t, srep("fra", t, {US: UP, EU: DOWN}, eu_central=(None, T0)),
                   *(srep(p, t, BOTH, us_west=(t - 0.01, None), eu_central=(T0 - 0.05, None)) for p in ("sjc", "sin")))
        assert summary(r)["fra"] == "confirming", t
    assert summary(run.at(T0 + 0.1 + SETTLE))["fra"] == "backend_down"  # settle is the upper bound


WEIGHTED = Steering(weights=((US, 1), (EU, 1)))
ALL3 = {US: UP, EU: UP, AP: UP}
SPLIT_DOWN = {US: DOWN, EU: DOWN, AP: UP}  # both weighted origins down at sjc, the backup up


def test_a_split_pops_settle_ends_on_the_others_fresh_checks_of_a_weighted_origin() -> None:
    """Split 1:1 between us-west and eu-central (ap-south a backup): sjc sees both fail. The
    others are asked about both by name; fra's fresh success of eu-central confirms sjc."""
    run = Run(steered(WEIGHTED, third=True))
    run.at(0, *(srep(p, 0, ALL3) for p in ("sjc", "fra", "sin")))
    r = run.at(T0, srep("sjc", T0, ALL3, us_west=(None, T0), eu_central=(None, T0 + 0.01)))
    for p in ("fra", "sin"):
        item = r.item(p, "game-global")
        assert item.evidence and item.evidence_origins == (US, EU)
    run.at(T0 + 0.05, srep("fra", T0 + 0.05, ALL3, eu_central=(T0 + 0.04, None)))
    r = run.at(T0 + 0.1, srep("sjc", T0 + 0.1, SPLIT_DOWN, us_west=(None, T0), eu_central=(None, T0 + 0.01)))
    assert summary(r)["sjc"] == "backend_down" and r.wake_at is None


def test_a_split_pops_settle_runs_its_window_on_fresh_checks_of_an_origin_outside_its_split_only() -> None:
    run = Run(steered(WEIGHTED, third=True))
    run.at(0, *(srep(p, 0, ALL3) for p in ("sjc", "fra", "sin")))
    run.at(T0, srep("sjc", T0, ALL3, us_west=(None, T0), eu_central=(None, T0 + 0.01)))
    for t in (T0 + 0.1, T0 + 0.5, T0 + 0.9):
        r = run.at(t, srep("sjc", t, SPLIT_DOWN, us_west=(None, T0), eu_central=(None, T0 + 0.01)),
                   *(srep(p, t, ALL3, ap_south=(t - 0.01, None)) for p in ("fra", "sin")))
        assert summary(r)["sjc"] == "confirming", t
    assert summary(run.at(T0 + 0.1 + SETTLE))["sjc"] == "backend_down"
