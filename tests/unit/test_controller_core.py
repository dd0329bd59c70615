"""The controller's core with a fake clock: when a POP's plan is new, and what it says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from controller.config.desired import load_desired
from controller.policy.model import PopReport
from controller.server.core import Controller

ROOT = Path(__file__).resolve().parents[2]


def controller(tmp_path: Path, now: list[float]) -> Controller:
    desired = dataclasses.replace(load_desired(str(ROOT / "configs" / "controller"), "rev1"), state_dir=str(tmp_path))
    return Controller(desired, clock=lambda: now[0])


def report(pop: str, usw: bool, at: float) -> PopReport:
    return PopReport(pop, at, 1, {"game-global": {"us-west": usw, "eu-central": True}}, {"game-global": True})


def test_a_countdown_in_the_explanation_is_not_a_new_plan_but_a_new_decision_is(tmp_path: Path) -> None:
    now = [100.0]
    ctl = controller(tmp_path, now)
    for pop in ("sjc", "fra", "sin"):
        ctl.add_report(report(pop, True, now[0]))
    ctl.add_report(report("sjc", False, now[0]))
    first = ctl.served["sjc"].generation
    assert ctl.item("sjc", "game-global").reason == "confirming"  # type: ignore[union-attr]
    now[0] = 100.5
    ctl.replan()
    assert "0.5s more" in ctl.item("sjc", "game-global").explanation  # type: ignore[union-attr]
    assert ctl.served["sjc"].generation == first  # agents are not woken for a countdown
    now[0] = 101.1
    ctl.replan()
    assert ctl.item("sjc", "game-global").reason == "backend_down"  # type: ignore[union-attr]
    assert ctl.served["sjc"].generation == first + 1
    assert ctl.served["fra"].generation == ctl.served["sin"].generation  # the others did not change


def test_the_plan_asks_to_be_recomputed_when_the_settle_window_ends(tmp_path: Path) -> None:
    now = [50.0]
    ctl = controller(tmp_path, now)
    for pop in ("fra", "sin"):
        ctl.add_report(report(pop, True, now[0]))
    ctl.add_report(report("sjc", False, now[0]))
    assert ctl.result is not None and ctl.result.wake_at == 50.0 + ctl.desired.policy.safety.settle
