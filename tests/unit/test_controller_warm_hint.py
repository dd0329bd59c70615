"""A sliced pass's warm-up (``Controller._warm_unserved``) of a POP served since the last
large change: only the VIPs touched since are looked at (the serve's own hint), not the POP's
every item; the POPs' plans are those of a controller whose serves walk every VIP (no hint).
A guard: the walk the hint saves is in C and not observed here, so this passes on the code
before too; what it holds is that warming from the hint misses nothing the plans need."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from controller.config.desired_model import DesiredState, FleetVip, PopSpec
from controller.policy.model import PopReport
from controller.server import core
from controller.server.core import Controller
from tests.helpers.sliced_fleet import ALL_AT_ONCE, BASE, POPS

VIPS = 3000  # touched VIPs (300) above SMALL_PASS and under an eighth of a POP's items
DOWN = frozenset(f"v{i:04d}" for i in range(0, VIPS, 10))


def _desired(tmp_path: Path) -> DesiredState:
    template = BASE.vip("game-global")
    assert template is not None
    vips = tuple(FleetVip(dataclasses.replace(template.vip, name=f"v{i:04d}"), POPS, True, template.policy)
                 for i in range(VIPS))
    return dataclasses.replace(BASE, state_dir=str(tmp_path), pops=tuple(PopSpec(p, "0" * 64) for p in POPS),
                               vips=vips, change=ALL_AT_ONCE)


def _report(pop: str, at: float, down: frozenset[str] = frozenset()) -> PopReport:
    return PopReport(pop, at, 1, {f"v{i:04d}": {"us-west": f"v{i:04d}" not in down, "eu-central": True}
                                  for i in range(VIPS)})


def test_the_warm_up_of_a_pop_served_since_looks_at_the_vips_touched_since(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]

    def run(hints: bool) -> tuple[dict[str, object], list[set[str]]]:
        ctl = Controller(_desired(tmp_path / str(hints)), clock=lambda: now[0])
        ctl.hints = hints
        ctl.reports.update({p: _report(p, now[0]) for p in POPS})
        ctl.replan()  # (every POP served: the hints start here)
        warmed: list[set[str]] = []
        real = ctl.plans.warm

        def spy(names: list[str], *args: object) -> int:
            warmed.append(set(names))
            return real(names, *args)  # type: ignore[arg-type]
        monkeypatch.setattr(ctl.plans, "warm", spy)

        async def scenario() -> None:
            ctl.accept_report(_report(POPS[0], now[0], DOWN))  # (verdicts changed: planned at once)
            while (driver := ctl.planning()) is None or not driver.done():
                await asyncio.sleep(0)
        asyncio.run(scenario())
        try:
            return {p: ctl.plan_body(p) for p in POPS}, warmed
        finally:
            ctl.close()

    hinted, warmed = run(True)
    walked, _ = run(False)
    assert hinted == walked  # the same plans as serves that walk every VIP
    assert warmed and all(names <= DOWN for names in warmed), [len(n - DOWN) for n in warmed]
    assert core.SMALL_PASS < len(DOWN) < VIPS // 8
