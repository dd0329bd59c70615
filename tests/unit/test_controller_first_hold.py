"""The report hold at a start: a burst of the POPs' first reports is planned in one pass, held
past REPORT_HOLD_MAX while they keep coming and some POP has not reported yet (bounded by
REPORT_FIRST_HOLD_MAX), no longer once every POP's report is in; a burst after every POP
was heard from keeps the old bound. Held, nothing is planned: every POP keeps the plan it was
served (no route moves while the hold lasts). Asserted on what the passes planned, with the
bounds set far above or at zero, so no assertion depends on timing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.policy.model import PopReport
from controller.server import core
from controller.server.core import Controller
from tests.helpers.example_controller import controller, report

POPS = ("sjc", "fra", "sin")


def _reason(ctl: Controller, pop: str) -> str:
    item = ctl.item(pop, "game-global")
    assert item is not None
    return str(item.reason)


def _served(ctl: Controller) -> dict[str, tuple[int, bool, str]]:
    """Per POP: the generation served, and game-global's announcement and reason in it."""
    out = {}
    for pop in POPS:
        entry = ctl.served[pop].entries["game-global"]
        out[pop] = (ctl.served[pop].generation, entry.item.wanted, str(entry.item.reason))
    return out


def _burst(ctl: Controller, stored: list[PopReport], arriving: PopReport) -> tuple[bool, dict[str, str]]:
    """``stored`` accepted one after another while ``arriving`` is being received (the API's
    handler: receiving()), REPORT_BATCH and more apart, the daemon's tick between them:
    whether the pass of the stored ones waited for ``arriving`` (held), and what it planned
    (each POP's reason for game-global). While held, every POP's served plan is the one it
    had before the burst."""
    async def run() -> tuple[bool, dict[str, str]]:
        before = _served(ctl)
        ready, received = asyncio.Event(), asyncio.Event()

        async def receiving() -> None:
            with ctl.receiving():
                ready.set()
                await received.wait()  # (the body still on its way)
                ctl.accept_report(arriving)

        task = asyncio.ensure_future(receiving())
        await ready.wait()
        pending = None
        for r in stored:
            pending = ctl.accept_report(r) or pending
            for _ in range(3):
                await asyncio.sleep(0.02)  # past REPORT_BATCH: a pass would have run without the hold
                ctl.plan_soon()  # the daemon's tick: it waits for a held burst too
        assert pending is not None
        held = not pending.done()
        if held:
            assert _served(ctl) == before  # held: no POP's plan moved, every route kept
        received.set()
        await asyncio.shield(pending)
        planned = {pop: _reason(ctl, pop) for pop in POPS}
        await task
        await ctl.settled()
        return held, planned

    try:
        return asyncio.run(run())
    finally:
        ctl.close()


def test_first_reports_held_past_the_bound_while_pops_are_still_to_report(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A start: sjc's and fra's first reports stored while sin's is being received, with
    REPORT_HOLD_MAX at 0 (the intake outlasted it): held, and planned in one pass with sin's
    report in it (sin confirming its us-west down at once, not silent first); past
    REPORT_FIRST_HOLD_MAX (0 too) as before: planned without it (sin still silent)."""
    monkeypatch.setattr(core, "REPORT_HOLD", 3600.0)
    monkeypatch.setattr(core, "REPORT_HOLD_MAX", 0.0)
    monkeypatch.setattr(core, "REPORT_FIRST_GAP", 3600.0)
    now = [10.0]
    ctl = controller(tmp_path / "held", now)
    assert {_reason(ctl, p) for p in POPS} == {"report_stale"}  # the start's plan: left to the agents' checks
    held, planned = _burst(ctl, [report("sjc", True, now[0]), report("fra", True, now[0])], report("sin", False, now[0]))
    assert held and planned == {"sjc": "healthy", "fra": "healthy", "sin": "confirming"}

    monkeypatch.setattr(core, "REPORT_FIRST_HOLD_MAX", 0.0)
    ctl = controller(tmp_path / "bound", now)
    held, planned = _burst(ctl, [report("sjc", True, now[0]), report("fra", True, now[0])], report("sin", False, now[0]))
    assert not held and planned == {"sjc": "healthy", "fra": "healthy", "sin": "report_stale"}


def test_a_burst_after_every_pop_reported_keeps_the_old_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every POP heard from already (their reports stale since: a network's restart): their
    reports are no POP's first, so past REPORT_HOLD_MAX the pass runs without the one still
    arriving, however long REPORT_FIRST_HOLD_MAX is."""
    monkeypatch.setattr(core, "REPORT_HOLD", 3600.0)
    now = [10.0]
    ctl = controller(tmp_path / "again", now)

    async def heard() -> None:
        for pop in POPS:
            pending = ctl.accept_report(report(pop, True, now[0]))
            if pending is not None:
                await asyncio.shield(pending)
    asyncio.run(heard())
    now[0] = 1000.0  # (every report stale)
    ctl.replan()
    assert {_reason(ctl, p) for p in POPS} == {"report_stale"}
    monkeypatch.setattr(core, "REPORT_HOLD_MAX", 0.0)
    held, planned = _burst(ctl, [report("sjc", True, now[0]), report("fra", True, now[0])], report("sin", False, now[0]))
    assert not held and planned == {"sjc": "healthy", "fra": "healthy", "sin": "report_stale"}


def test_the_hold_ends_once_every_pops_report_is_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounds far above: the burst's reports cover every POP (sin's first one too) while sjc's
    next report is still being received: nothing more to wait for, the pass runs without it
    (before, it waited for it, up to REPORT_HOLD_MAX)."""
    monkeypatch.setattr(core, "REPORT_HOLD", 3600.0)
    monkeypatch.setattr(core, "REPORT_HOLD_MAX", 3600.0)
    now = [10.0]
    ctl = controller(tmp_path / "all", now)
    stored = [report("sjc", True, now[0]), report("fra", True, now[0]), report("sin", True, now[0])]
    held, planned = _burst(ctl, stored, report("sjc", False, now[0] + 1))
    assert not held and planned == {"sjc": "healthy", "fra": "healthy", "sin": "healthy"}
    # Two of three in: held as before.
    ctl = controller(tmp_path / "two", now)
    held, planned = _burst(ctl, stored[:2], report("sin", False, now[0]))
    assert held and planned == {"sjc": "healthy", "fra": "healthy", "sin": "confirming"}


def test_a_pop_never_heard_from_does_not_hold_the_first_reports_to_the_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sin dead at the start (it never reports): sjc's and fra's first reports are in, then
    sjc's next ones keep coming while a report is always being received. The burst is planned
    once no POP's first report came for REPORT_FIRST_GAP, with sin silent; it is not held to
    REPORT_FIRST_HOLD_MAX (an hour here) by the reports of the POPs already heard from (found by
    a review: a POP down at a start delayed the first pass 180 s). Fails by the loop's cap, not
    by a bound on how fast it passes."""
    monkeypatch.setattr(core, "REPORT_HOLD", 3600.0)
    monkeypatch.setattr(core, "REPORT_HOLD_MAX", 0.0)
    monkeypatch.setattr(core, "REPORT_FIRST_HOLD_MAX", 3600.0)
    monkeypatch.setattr(core, "REPORT_FIRST_GAP", 0.05)
    now = [10.0]
    ctl = controller(tmp_path / "dead", now)

    async def run() -> bool:
        release = asyncio.Event()

        async def receiving() -> None:
            with ctl.receiving():
                await release.wait()  # (a report always on its way)
        task = asyncio.ensure_future(receiving())
        await asyncio.sleep(0)
        pending = None
        for r in (report("sjc", True, now[0]), report("fra", True, now[0])):
            pending = ctl.accept_report(r) or pending
        assert pending is not None
        for _ in range(1500):  # (30 s and more: the hold of the code before lasted the hour)
            if pending.done():
                break
            ctl.accept_report(report("sjc", True, now[0]))  # (sjc's next: stored, no POP's first)
            ctl.plan_soon()
            await asyncio.sleep(0.02)
        done = pending.done()
        release.set()
        await task
        await ctl.settled()
        return done

    try:
        assert asyncio.run(run())
        assert {pop: _reason(ctl, pop) for pop in POPS} == {"sjc": "healthy", "fra": "healthy", "sin": "report_stale"}
    finally:
        ctl.close()
