"""The controller's core and the evidence-based settle, with a fake clock: check ages become
times on the controller's clock, the other POPs are asked (a new plan for them), and the
failing POP's withdrawal is confirmed as soon as their evidence is planned."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from controller.config.desired import load_desired
from controller.policy.model import OriginChecks, PopReport
from controller.server import core
from controller.server.core import Controller

origin_checks = PopReport.checks_at

ROOT = Path(__file__).resolve().parents[2]


def controller(tmp_path: Path, now: list[float]) -> Controller:
    desired = dataclasses.replace(load_desired(str(ROOT / "configs" / "controller"), "rev1"), state_dir=str(tmp_path))
    return Controller(desired, clock=lambda: now[0])


def report(pop: str, usw: bool, at: float, ok: float | None = None, failing: float | None = None) -> PopReport:
    """``ok``/``failing``: ages (seconds before ``at``) as the agent sends them."""
    ages = {"game-global": {"us-west": (ok, failing)}} if ok is not None or failing is not None else {}
    return PopReport(pop, at, 1, {"game-global": {"us-west": usw, "eu-central": True}}, {"game-global": True},
                     origin_checks(ages, at))


def test_ages_become_controller_times() -> None:
    assert origin_checks({"v": {"r": (0.25, None), "s": (None, 1.5)}}, 100.0) == {
        "v": {"r": OriginChecks(99.75, None), "s": OriginChecks(None, 98.5)}}


def test_the_others_are_asked_and_their_evidence_confirms_the_withdrawal_at_once(tmp_path: Path) -> None:
    now = [100.0]
    ctl = controller(tmp_path, now)
    for pop in ("sjc", "fra", "sin"):
        ctl.add_report(report(pop, True, now[0]))
    gens = {pop: s.generation for pop, s in ctl.served.items()}
    now[0] = 100.5
    ctl.add_report(report("sjc", True, now[0], failing=0.0))  # sjc's first failed check, reported at once
    for pop in ("fra", "sin"):
        assert ctl.item(pop, "game-global").evidence  # type: ignore[union-attr]
        assert ctl.served[pop].generation == gens[pop] + 1  # a new plan: the long-poll answers
    now[0] = 100.55
    ctl.add_report(report("fra", True, now[0], ok=0.02))  # a success 0.03 s after sjc's failure
    now[0] = 100.6
    ctl.add_report(report("sjc", False, now[0], failing=0.1))  # fall reached
    item = ctl.item("sjc", "game-global")
    assert item is not None and item.reason == "backend_down" and not item.safety_hold
    assert ctl.result is not None and ctl.result.wake_at is None  # no settle window left to wait for
    assert not ctl.item("fra", "game-global").evidence  # type: ignore[union-attr]


def test_a_report_whose_only_news_is_check_times_is_planned_before_the_answer(tmp_path: Path) -> None:
    now = [10.0]
    ctl = controller(tmp_path, now)

    async def scenario() -> str:
        for pop in ("sjc", "fra", "sin"):
            await ctl.take_report(report(pop, True, now[0]))
        now[0] = 10.2
        await ctl.take_report(report("sjc", False, now[0], failing=0.1))
        assert ctl.item("sjc", "game-global").reason == "confirming"  # type: ignore[union-attr]
        now[0] = 10.3
        await ctl.take_report(report("fra", True, now[0], ok=0.05))  # same verdicts, new check times
        item = ctl.item("sjc", "game-global")
        return str(item.reason) if item else ""

    assert asyncio.run(scenario()) == "backend_down"


def test_a_report_with_check_times_skips_the_batching_delay_and_brings_an_earlier_batch_along(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing POP's report, or evidence asked for, is what a withdrawal waits for: planned in
    the next turn of the loop, and a plain report already waiting for its batch comes along.
    (Plain: sin's first report, as in a burst; one whose verdicts changed is not batched.)"""
    monkeypatch.setattr(core, "REPORT_BATCH", 3600.0)  # a plain report would wait an hour
    now = [10.0]
    ctl = controller(tmp_path, now)

    async def scenario() -> None:
        for pop in ("sjc", "fra"):
            ctl.add_report(report(pop, True, now[0]))
        now[0] = 10.2
        standby_down = dataclasses.replace(report("sin", True, now[0]),
                                           origins={"game-global": {"us-west": True, "eu-central": False}})
        plain = asyncio.ensure_future(ctl.take_report(standby_down))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not plain.done()  # batched: waiting for reports that come with it
        # A hang guard, not a time limit: the other way is an hour.
        await asyncio.wait_for(ctl.take_report(report("sjc", False, now[0], failing=0.1)), 60)
        assert ctl.item("sjc", "game-global").reason == "confirming"  # type: ignore[union-attr]
        await asyncio.wait_for(plain, 60)

    asyncio.run(scenario())


def test_a_failure_older_than_its_window_waits_the_whole_window_whatever_the_others_say(tmp_path: Path) -> None:
    """As when a hold everywhere lifts (the checks recovering, each POP at its own moment):
    sjc's failure began 8 s before its window did, so fra's checks recovering first prove
    nothing about sjc's: sjc is let go only when the whole settle window (1 s) is over."""
    now = [100.0]
    ctl = controller(tmp_path, now)
    for pop in ("sjc", "fra", "sin"):
        ctl.add_report(report(pop, True, now[0]))
    now[0] = 100.5
    ctl.add_report(report("sjc", False, now[0], failing=8.0))  # failing since 92.5, down from now on
    now[0] = 100.55
    for pop in ("fra", "sin"):
        ctl.add_report(report(pop, True, now[0], ok=0.0))  # fresh successes: evidence, for a new failure
    item = ctl.item("sjc", "game-global")
    assert item is not None and item.reason == "confirming" and item.wanted, item
    now[0] = 101.6
    ctl.add_report(report("sjc", False, now[0], failing=9.1))
    item = ctl.item("sjc", "game-global")
    assert item is not None and item.reason == "backend_down", item


def test_a_preferring_pops_withdrawal_asks_the_others_about_its_own_origin_by_name(tmp_path: Path) -> None:
    """fra prefers eu-central (steering). Its first failed check of eu-central makes sjc's and
    sin's plans ask about eu-central by name (their own active origin is us-west); sjc's fresh
    check of eu-central confirms fra's withdrawal at once."""
    from controller.config.desired_model import Preference, Steering

    base = load_desired(str(ROOT / "configs" / "controller"), "rev1")
    steer = Steering(preferences=(Preference(("fra",), ("eu-central", "us-west")),))
    desired = dataclasses.replace(base, state_dir=str(tmp_path), vips=tuple(
        dataclasses.replace(v, steering=steer) if v.name == "game-global" else v for v in base.vips))
    now = [100.0]
    ctl = Controller(desired, clock=lambda: now[0])

    def seen(pop: str, euc: bool, at: float, **ages: tuple[float | None, float | None]) -> PopReport:
        return PopReport(pop, at, 1, {"game-global": {"us-west": True, "eu-central": euc}}, {"game-global": True},
                         origin_checks({"game-global": {r.replace("_", "-"): a for r, a in ages.items()}}
                                       if ages else {}, at))

    for pop in ("sjc", "fra", "sin"):
        ctl.add_report(seen(pop, True, now[0]))
    now[0] = 100.5
    ctl.add_report(seen("fra", True, now[0], eu_central=(None, 0.0)))  # fra's first failed check
    for pop in ("sjc", "sin"):
        entry = next(e for e in ctl.plan_body(pop)["vips"] if e["name"] == "game-global")
        assert entry["evidence"] is True and entry["evidence_origins"] == ["eu-central"]
        assert entry["active_origin"] == "us-west"
    now[0] = 100.55
    ctl.add_report(seen("sjc", True, now[0], us_west=(0.02, None), eu_central=(0.02, None)))
    now[0] = 100.6
    ctl.add_report(seen("fra", False, now[0], eu_central=(None, 0.1)))  # fall reached
    item = ctl.item("fra", "game-global")
    assert item is not None and item.reason == "backend_down" and item.active_origin == "eu-central", item
    ctl.close()
