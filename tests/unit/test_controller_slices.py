"""Planning never blocks serving: while a large pass is computed (in slices, inside the
event loop) long-polls, reports, status and metrics are answered from the previous,
complete plan; the new plan becomes visible all at once. Ordering assertions only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.server import core
from controller.server.core import Controller
from tests.helpers.sliced_fleet import POPS, VIPS
from tests.helpers.sliced_fleet import desired as _desired
from tests.helpers.sliced_fleet import report as _report


def _wanted(ctl: Controller, pop: str) -> int:
    return sum(1 for v in ctl.plan_body(pop)["vips"] if v["wanted"])


def test_long_polls_reports_and_metrics_are_answered_while_a_large_plan_is_computed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A slice is 16 VIPs whatever the machine's speed: the pass yields to the loop ~90 times.
    monkeypatch.setattr(core, "SLICE_S", 0.0)
    now = [100.0]
    ctl = Controller(_desired(tmp_path), clock=lambda: now[0])
    ctl.reports.update({p: _report(p, now[0]) for p in POPS})
    ctl.replan()
    assert _wanted(ctl, "sjc") == VIPS
    events: list[tuple[str, object]] = []

    async def scenario() -> None:
        generation = ctl.served["sjc"].generation

        async def parked() -> None:  # an agent long-polling before the commit
            await ctl.wait_for_change("sjc", generation, 60)
            events.append(("parked long-poll answered", _wanted(ctl, "sjc")))

        async def fresh_poll() -> None:  # an agent that asks during the pass
            await ctl.wait_for_change("sjc", -1, 60)
            events.append(("new long-poll answered", (ctl.plan_body("sjc")["generation"], _wanted(ctl, "sjc"))))

        async def repeat_report() -> None:
            await ctl.take_report(_report("sin", now[0]))
            events.append(("repeated report acknowledged", None))

        async def scrape() -> None:
            snap = ctl.metrics_snapshot()
            events.append(("metrics scraped", {p.pop: p.vips_planned for p in snap.pops}))

        async def changed_report() -> None:
            await ctl.take_report(_report("fra", now[0], down="v0001"))
            item = ctl.item("fra", "v0001")
            events.append(("changed report acknowledged", item.reason if item else None))

        waiting = asyncio.ensure_future(parked())
        await asyncio.sleep(0)  # parked at the controller
        # Every VIP disabled: a commit that changes every VIP's plan at every POP.
        ctl.apply_config(_desired(tmp_path, enabled=False, revision="rev2"))
        await asyncio.gather(waiting, fresh_poll(), repeat_report(), scrape(), changed_report())

    asyncio.run(scenario())
    names = [e[0] for e in events]
    assert names[:3] == ["new long-poll answered", "repeated report acknowledged", "metrics scraped"]
    # after the commit, in either order (both were woken by it)
    assert sorted(names[3:]) == ["changed report acknowledged", "parked long-poll answered"]
    before = dict(events)
    # answered during the pass: the previous plan, whole (not half of the new one)
    assert before["new long-poll answered"] == (ctl.served["sjc"].generation - 1, VIPS)
    assert before["metrics scraped"] == {p: VIPS for p in POPS}
    # and after it, the new plan, whole
    assert before["parked long-poll answered"] == 0
    assert before["changed report acknowledged"] == "disabled"
    assert all(_wanted(ctl, p) == 0 for p in POPS)


def test_a_replan_during_a_sliced_pass_finishes_it_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator action (drain) plans at once: the pass in progress is finished and
    published first, then the drain's, so nothing of either is lost."""
    monkeypatch.setattr(core, "SLICE_S", 0.0)
    now = [100.0]
    ctl = Controller(_desired(tmp_path), clock=lambda: now[0])
    ctl.reports.update({p: _report(p, now[0]) for p in POPS})
    ctl.replan()

    async def scenario() -> None:
        ctl.apply_config(_desired(tmp_path, enabled=False, revision="rev2"))
        await asyncio.sleep(0)  # the sliced pass has begun
        await asyncio.sleep(0)
        assert ctl._staged is not None and _wanted(ctl, "sjc") == VIPS  # still the previous plan
        ctl.drain("gru")
        assert ctl._staged is None and all(_wanted(ctl, p) == 0 for p in POPS)
        assert ctl._driver is not None
        await ctl._driver

    asyncio.run(scenario())
    assert ctl.persisted.drains == {"gru": 100.0}
    assert all(_wanted(ctl, p) == 0 for p in POPS)
