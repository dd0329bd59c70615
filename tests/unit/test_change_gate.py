"""Config changes under the blast-radius budget and the staged rollout (policy/change.py), as
a pure state machine and inside the controller with a fake clock: what a change that would
withdraw much KEEPS announced while it is held, rolls out, or is rolled back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from controller.config.desired import load_desired
from controller.config.desired_model import ChangePolicy, DesiredState
from controller.metrics.central import CHANGE_PHASES
from controller.policy import change
from controller.policy.change import (
    BlastRadius, Confirm, GateResult, NewRevision, Phase, Rollout, Verdict, effective, step, waves,
)
from controller.server import store
from controller.policy.model import PopReport
from controller.server.core import ChangeRefused, Controller
from tests.helpers.change_gate import controller, healthy

ROOT = Path(__file__).resolve().parents[2]
BASE = load_desired(str(ROOT / "configs" / "controller"), "rev1")
POLICY = ChangePolicy(bake=10.0)
EVERY = {("game-global", "sjc"), ("game-global", "fra"), ("game-global", "sin"), ("api-eu", "fra"), ("api-eu", "sjc")}


def radius(withdrawn: set[tuple[str, str]], announced: int = 5, removed: tuple[str, ...] = ()) -> BlastRadius:
    return BlastRadius(announced, tuple(sorted(withdrawn)), (), removed)


# --- the pure state machine -----------------------------------------------------------------------
def test_the_phase_label_sets_are_the_state_machines_phases() -> None:
    assert CHANGE_PHASES == tuple(str(p) for p in Phase)


def test_a_revision_that_withdraws_nothing_is_applied_at_once() -> None:
    s0 = Rollout(base="r1", target="r1")
    s1, effects = step(s0, NewRevision("r2", radius(set()), ()), 5.0, POLICY)
    assert (s1.phase, s1.base, s1.target) == (Phase.STEADY, "r2", "r2")
    assert [e.kind for e in effects] == [change.EffectKind.APPLIED]


def test_over_the_budget_is_held_and_names_what_it_would_withdraw() -> None:
    s0 = Rollout(base="r1", target="r1")
    s1, effects = step(s0, NewRevision("r2", radius(EVERY, removed=("api-eu", "game-global")), (("sin",),)), 5.0,
                       POLICY)
    assert (s1.phase, s1.base, s1.target) == (Phase.HELD, "r1", "r2")
    assert "withdraws 5 of 5" in s1.detail and "fra 2, sin 1, sjc 2" in s1.detail
    assert "removes or disables 2 announced VIPs" in s1.detail
    assert [e.kind for e in effects] == [change.EffectKind.HELD] and "r2 HELD" in effects[0].text
    # Within the budget (1 of 5 = 20% <= 25%, one VIP at most): rolls out, first wave now.
    s2, effects = step(s0, NewRevision("r3", radius({("game-global", "sin")}), (("sin",),)), 5.0, POLICY)
    assert (s2.phase, s2.rolled(), s2.wake_at(POLICY)) == (Phase.ROLLING, frozenset({"sin"}), 15.0)


def test_a_confirm_must_name_the_held_revision_and_give_a_reason() -> None:
    held, _ = step(Rollout(base="r1", target="r1"), NewRevision("abcdef123456", radius(EVERY), (("sin",), ("fra",))),
                   5.0, POLICY)
    for wrong, words in (("0123456", "is not the one waiting"), ("abc", "is not the one waiting")):
        with pytest.raises(change.ChangeRefused, match=words):
            step(held, Confirm(wrong, "op", "why", radius(EVERY), (("sin",),)), 6.0, POLICY)
    with pytest.raises(change.ChangeRefused, match="reason"):
        step(held, Confirm("abcdef123456", "op", " ", radius(EVERY), (("sin",),)), 6.0, POLICY)
    dirty, _ = step(Rollout(base="r1", target="r1"),
                    NewRevision("abcdef123456+dirty.0f0f0f0f", radius(EVERY), (("sin",),)), 5.0, POLICY)
    with pytest.raises(change.ChangeRefused):  # the commit is not the edited files held
        step(dirty, Confirm("abcdef123456", "op", "why", radius(EVERY), (("sin",),)), 6.0, POLICY)
    rolling, _ = step(held, Confirm("abcdef1", "op", "decommission", radius(EVERY), (("sin",), ("fra",))), 6.0, POLICY)
    assert rolling.phase is Phase.ROLLING and rolling.confirmed == change.Confirmation("abcdef123456", "op",
                                                                                      "decommission", 6.0)
    with pytest.raises(change.ChangeRefused, match="rolling out"):
        step(rolling, Confirm("abcdef123456", "op", "again", radius(EVERY), ()), 7.0, POLICY)


def test_waves_pass_one_by_one_and_a_failed_gate_rolls_back() -> None:
    s, _ = step(Rollout(base="r1", target="r1"), NewRevision("r2", radius({("a", "sin"), ("a", "fra"), ("a", "sjc")},
                                                                               12), (("sin",), ("fra",), ("sjc",))),
                0.0, POLICY)
    assert s.phase is Phase.ROLLING  # 3 of 9 pairs, one VIP: within the budget
    s, _ = step(s, GateResult(Verdict.WAIT), 5.0, POLICY)
    assert s.rolled() == {"sin"}
    s, _ = step(s, GateResult(Verdict.PASS), 10.0, POLICY)
    assert s.rolled() == {"sin", "fra"} and s.wave_started == 10.0
    failed, effects = step(s, GateResult(Verdict.FAIL, "fra reports every origin of b down"), 12.0, POLICY)
    assert (failed.phase, failed.base, failed.rolled()) == (Phase.ROLLED_BACK, "r1", frozenset())
    assert "ROLLED BACK to r1: fra reports" in effects[0].text
    last, _ = step(s, GateResult(Verdict.PASS), 20.0, POLICY)
    assert last.rolled() == {"sin", "fra", "sjc"}
    done, effects = step(last, GateResult(Verdict.PASS), 30.0, POLICY)
    assert (done.phase, done.base) == (Phase.STEADY, "r2") and effects[0].kind is change.EffectKind.APPLIED


def test_waves_go_smallest_first_unless_an_order_is_configured() -> None:
    withdrawn = [("v", p) for p in ("a", "b", "c", "d", "e")]
    announced = {"a": 3, "b": 2, "c": 2, "d": 1, "e": 1}  # pairs announced per POP
    assert waves(withdrawn, announced, ChangePolicy()) == (("d",), ("e", "b"), ("c",), ("a",))
    assert waves(withdrawn, announced, ChangePolicy(order=("a",), first_wave=2, wave_fraction=1.0)) == (
        ("a", "d"), ("e", "b", "c"))


def test_the_rollout_state_reads_back_from_json() -> None:
    s, _ = step(Rollout(base="r1", target="r1"), NewRevision("r2", radius(EVERY), (("sin",), ("fra", "sjc"))), 1.0,
                POLICY)
    s, _ = step(s, Confirm("r2", "op@host", "why", radius(EVERY), (("sin",), ("fra", "sjc"))), 2.0, POLICY)
    assert change.from_json(json.loads(json.dumps(change.to_json(s)))) == s


# --- what the planner gets: what is KEPT announced --------------------------------------------------
def _no_vips(revision: str) -> DesiredState:
    return dataclasses.replace(BASE, revision=revision, vips=())


def test_effective_keeps_the_base_at_pops_whose_wave_has_not_come() -> None:
    target = _no_vips("r2")
    s, _ = step(Rollout(base="rev1", target="rev1"), NewRevision("r2", radius(EVERY), (("sin",), ("fra",), ("sjc",))),
                0.0, dataclasses.replace(POLICY, max_withdraw_fraction=1.0, max_removed_vips=9))
    eff = effective(BASE, target, s)
    assert change.pairs(eff) == EVERY - {("game-global", "sin")}
    held = dataclasses.replace(s, phase=Phase.HELD)
    assert effective(BASE, target, held) is BASE  # held: the base, whole
    # A publish list cut from three POPs to one: the two others keep it until their waves.
    game = BASE.vip("game-global")
    assert game is not None
    cut = dataclasses.replace(BASE, revision="r3", vips=tuple(dataclasses.replace(v, publish=("sjc",))
                                                              if v.name == "game-global" else v for v in BASE.vips))
    s, _ = step(Rollout(base="rev1", target="rev1"),
                NewRevision("r3", radius({("game-global", "fra"), ("game-global", "sin")}), (("sin",), ("fra",))),
                0.0, dataclasses.replace(POLICY, max_withdraw_fraction=1.0))
    eff = effective(BASE, cut, s)
    kept = eff.vip("game-global")
    assert kept is not None and set(kept.publish) == {"sjc", "fra"} and kept.vip == game.vip


# --- inside the controller ------------------------------------------------------------------------
def wanted(ctl: Controller) -> set[tuple[str, str]]:
    return {(vip, pop) for pop, served in ctl.served.items() for vip, e in served.entries.items() if e.item.wanted}


def test_vips_empty_is_held_keeps_everything_announced_and_survives_a_restart(tmp_path: Path) -> None:
    now = [100.0]
    ctl = controller(tmp_path, now)
    healthy(ctl, now[0])
    assert wanted(ctl) == EVERY
    generations = {pop: s.generation for pop, s in ctl.served.items()}
    ctl.apply_config(dataclasses.replace(ctl.desired, revision="rev2", vips=()))
    assert ctl.rollout.phase is Phase.HELD and ctl.rollout.target == "rev2"
    assert wanted(ctl) == EVERY  # nothing withdrawn...
    assert {pop: s.generation for pop, s in ctl.served.items()} == generations  # ...nor any plan changed
    alarm = ctl.change_alarm()
    assert alarm is not None and alarm["kind"] == "change_held" and "rev2" in alarm["detail"]
    assert "withdraws 5 of 5" in alarm["detail"]
    snap = ctl.metrics_snapshot()
    assert (snap.change_phase, snap.change_withdraw_pairs) == ("held", 5)
    # A restart with the held revision checked out and the applied one kept: still held.
    held_target = ctl.target
    ctl.close()
    again = Controller(held_target, clock=lambda: now[0], applied=dataclasses.replace(BASE, state_dir=str(tmp_path),
                                                                                      change=ctl.base.change))
    assert again.rollout.phase is Phase.HELD and again.rollout.target == "rev2"
    assert wanted(again) == EVERY
    # A newer revision that is itself safe replaces the held one: applied, the alarm gone.
    again.apply_config(dataclasses.replace(BASE, revision="rev3", state_dir=str(tmp_path)))
    assert (again.rollout.phase, again.rollout.base) == (Phase.STEADY, "rev3")
    assert again.change_alarm() is None and wanted(again) == EVERY
    with pytest.raises(ChangeRefused, match="nothing to confirm"):
        again.confirm_change("rev2", "op", "too late")


def test_a_change_committed_while_no_controller_ran_is_judged_at_start(tmp_path: Path) -> None:
    now = [100.0]
    first = controller(tmp_path, now)
    healthy(first, now[0])
    first.close()
    ctl = Controller(dataclasses.replace(first.target, revision="rev2", vips=()), clock=lambda: now[0],
                     applied=first.target)
    assert ctl.rollout.phase is Phase.HELD and change.pairs(ctl.desired) == EVERY


def test_confirmed_vips_empty_withdraws_in_waves_and_each_wave_waits_for_its_gate(tmp_path: Path) -> None:
    now = [100.0]
    ctl = controller(tmp_path, now)
    healthy(ctl, now[0])
    ctl.apply_config(dataclasses.replace(ctl.desired, revision="rev2", vips=()))
    with pytest.raises(ChangeRefused, match="not the one waiting"):
        ctl.confirm_change("rev9", "op", "wrong one")
    assert ctl.rollout.phase is Phase.HELD
    ctl.confirm_change("rev2", "op@host", "retiring the lab VIPs")
    assert ctl.rollout.waves == (("sin",), ("fra",), ("sjc",))  # sin announces the least
    assert wanted(ctl) == EVERY - {("game-global", "sin")}  # wave 1: sin only; fra and sjc keep all
    back = store.load(str(tmp_path))
    assert back.rollout is not None and change.from_json(back.rollout).confirmed == change.Confirmation(
        "rev2", "op@host", "retiring the lab VIPs", 100.0)
    now[0] = 105.0
    healthy(ctl, now[0])
    assert ctl.rollout.wave == 0  # baking
    now[0] = 110.5
    healthy(ctl, now[0])
    assert ctl.rollout.wave == 1 and wanted(ctl) == {("game-global", "sjc"), ("api-eu", "sjc")}
    now[0] = 121.0
    healthy(ctl, now[0])
    assert ctl.rollout.wave == 2 and wanted(ctl) == set()
    now[0] = 131.5
    healthy(ctl, now[0])
    assert (ctl.rollout.phase, ctl.base.revision) == (Phase.STEADY, "rev2")


def test_a_wave_whose_pop_fails_its_gate_is_rolled_back_and_no_further_pop_is_touched(tmp_path: Path) -> None:
    now = [100.0]
    kept: list[str] = []
    ctl = controller(tmp_path, now, on_applied=lambda d: kept.append(d.revision))
    healthy(ctl, now[0])
    without_api = dataclasses.replace(ctl.desired, revision="rev2",
                                      vips=tuple(v for v in ctl.desired.vips if v.name != "api-eu"))
    ctl.apply_config(without_api)
    ctl.confirm_change("rev2", "op", "api-eu moves to its own controller")
    assert ctl.rollout.waves == (("fra",), ("sjc",))
    assert wanted(ctl) == EVERY - {("api-eu", "fra")}
    now[0] = 103.0
    healthy(ctl, now[0], down="fra")  # fra's checks see game-global's origins down during the bake
    assert ctl.rollout.phase is Phase.ROLLED_BACK
    assert wanted(ctl) == EVERY - {("game-global", "fra")} or ("api-eu", "fra") in wanted(ctl)
    assert ("api-eu", "fra") in wanted(ctl) and ("api-eu", "sjc") in wanted(ctl)  # back, and sjc never touched
    alarm = ctl.change_alarm()
    assert alarm is not None and alarm["kind"] == "rollout_rolled_back" and "fra reports every origin" in alarm["detail"]
    assert kept == []  # rev2 never became the last good revision
    now[0] = 200.0
    healthy(ctl, now[0])
    assert ctl.rollout.phase is Phase.ROLLED_BACK  # stays until confirmed again or replaced


def test_a_pop_that_never_applies_its_wave_fails_the_gate_after_bake_and_grace(tmp_path: Path) -> None:
    now = [100.0]
    ctl = controller(tmp_path, now)
    healthy(ctl, now[0])
    ctl.apply_config(dataclasses.replace(ctl.desired, revision="rev2",
                                         vips=tuple(v for v in ctl.desired.vips if v.name != "api-eu")))
    ctl.confirm_change("rev2", "op", "why")
    stale = ctl.base.policy.safety.report_stale_after
    for t in (111.0, 110.0 + stale - 1):
        now[0] = t
        healthy(ctl, t, pops=("sjc", "sin"))  # fra is silent (its plan not acknowledged)
        assert ctl.rollout.phase is Phase.ROLLING
    now[0] = 110.0 + stale + 1
    ctl.replan()
    assert ctl.rollout.phase is Phase.ROLLED_BACK and "fra" in ctl.rollout.detail
    assert ("api-eu", "fra") in wanted(ctl)


def test_a_restart_mid_rollout_resumes_the_wave_where_it_was(tmp_path: Path) -> None:
    """The wave and when its bake began are journaled: a controller restarted 4 s into the
    first wave's 10 s bake serves the same plans (sin withdrawn, fra and sjc keeping all) and
    moves on when the original bake ends, not 10 s after the restart."""
    now = [100.0]
    ctl = controller(tmp_path, now)
    healthy(ctl, now[0])
    ctl.apply_config(dataclasses.replace(ctl.desired, revision="rev2", vips=()))
    ctl.confirm_change("rev2", "op", "retire")
    target, base = ctl.target, ctl.base
    ctl.close()
    now[0] = 104.0
    again = Controller(target, clock=lambda: now[0], applied=base)
    assert again.rollout.phase is Phase.ROLLING and again.rollout.wave_started == 100.0
    assert wanted(again) == EVERY - {("game-global", "sin")}
    now[0] = 110.5
    healthy(again, now[0])
    assert again.rollout.wave == 1 and again.rollout.rolled() == {"sin", "fra"}


def test_the_gate_fails_when_the_pops_still_keeping_a_vip_stop_announcing_it(tmp_path: Path) -> None:
    """The POPs whose wave has not come must keep the VIPs being withdrawn announced at their
    minimum: sjc and fra keep game-global while sin's wave bakes; if neither reports it
    announced once the bake and the grace (report_stale_after) are over, the gate fails."""
    now = [100.0]
    ctl = controller(tmp_path, now)
    healthy(ctl, now[0])
    ctl.apply_config(dataclasses.replace(ctl.desired, revision="rev2", vips=()))
    ctl.confirm_change("rev2", "op", "retire")
    stale = ctl.base.policy.safety.report_stale_after
    for t in (111.0, 110.0 + stale + 1):
        now[0] = t
        for pop in ("sjc", "fra"):  # fresh and about their plans, but game-global not announced
            ctl.add_report(PopReport(pop, t, ctl.served[pop].generation,
                                     {"game-global": {"us-west": True, "eu-central": True}},
                                     {"game-global": False, "api-eu": True}))
        healthy(ctl, t, pops=("sin",))
        assert ctl.rollout.wave == 0  # never the next wave
    assert ctl.rollout.phase is Phase.ROLLED_BACK
    assert "game-global is announced at 0 of the POPs still keeping it" in ctl.rollout.detail


def test_a_revert_during_the_rollout_announces_again_at_once(tmp_path: Path) -> None:
    """A newer revision replaces one rolling out; the revert withdraws nothing announced now
    (it announces sin's pair again): applied at once, the rollout over."""
    now = [100.0]
    ctl = controller(tmp_path, now)
    healthy(ctl, now[0])
    ctl.apply_config(dataclasses.replace(ctl.desired, revision="rev2", vips=()))
    ctl.confirm_change("rev2", "op", "retire")
    assert ("game-global", "sin") not in wanted(ctl)
    now[0] = 103.0
    ctl.apply_config(dataclasses.replace(BASE, revision="rev3", state_dir=str(tmp_path)))
    assert (ctl.rollout.phase, ctl.base.revision) == (Phase.STEADY, "rev3")
    assert wanted(ctl) == EVERY and ctl.change_alarm() is None


def test_the_change_section_is_read_with_every_error_named(tmp_path: Path) -> None:
    import shutil

    import yaml

    from controller.config.errors import ConfigError

    shutil.copytree(ROOT / "configs" / "controller", tmp_path / "c")
    path = tmp_path / "c" / "controller.yaml"
    data = yaml.safe_load(path.read_text())
    data["change"] = {"max_withdraw_fraction": 0.1, "max_removed_vips": 0,
                      "rollout": {"bake": 60, "first_wave": 2, "wave_fraction": 0.25, "order": ["sin", "fra"]}}
    path.write_text(yaml.safe_dump(data))
    assert load_desired(str(tmp_path / "c")).change == ChangePolicy(0.1, 0, 60.0, 2, 0.25, ("sin", "fra"))
    data["change"] = {"max_withdraw_fraction": 2, "rollout": {"order": ["lhr"], "bake": -1, "typo": 1}}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_desired(str(tmp_path / "c"))
    paths = {i.path for i in exc.value.issues}
    assert {"controller.yaml: change.max_withdraw_fraction", "controller.yaml: change.rollout.bake",
            "controller.yaml: change.rollout.typo", "controller.yaml: change.rollout.order[0]"} <= paths, paths
