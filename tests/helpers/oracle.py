"""The engine against the per-POP oracle, after one step of a randomized differential test."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from controller.policy.engine import Engine
from controller.policy.model import PlanResult
from controller.policy.planner import VipPlan


def assert_same_as_oracle(engine: Engine, full: PlanResult, plans: Sequence[VipPlan], where: str) -> None:
    """The plans (items with their sentences), notes, alarms, memory and wake-ups are identical."""
    assert engine.items == full.pops, where
    assert engine.notes == full.notes, where
    assert engine.alarms() == full.alarms, where
    assert engine.state() == full.state, where
    assert engine.settle_at() == full.wake_at, where
    assert {n: vp.wake_at for n, vp in engine.plans.items()} == {vp.name: vp.wake_at for vp in plans}, where


def assert_same_as_oracle_but_for_countdowns(engine: Engine, full: PlanResult, plans: Sequence[VipPlan], where: str,
                                             now: float, refresh_after: float) -> None:
    """As ``assert_same_as_oracle``, for an engine that re-renders the sentences counting down
    of VIPs planned at least ``refresh_after`` ago only: the decisions (every field of every
    item but its explanation), memory, alarms and wake-ups are identical; a sentence or note
    that differs is of a VIP counting down, planned less than ``refresh_after`` ago; none
    counting down was planned longer ago than that."""
    counting = engine._countdown
    assert all(now - at < refresh_after for at in counting.values()), where
    if engine.items != full.pops:
        assert engine.items.keys() == full.pops.keys(), where
        for pop, items in full.pops.items():
            mine = engine.items[pop]
            assert mine.keys() == items.keys(), where
            for name, item in items.items():
                if mine[name] != item:
                    assert dataclasses.replace(mine[name], explanation="") == dataclasses.replace(
                        item, explanation=""), f"{where}: {pop} {name}: {mine[name]} != {item}"
                    assert name in counting, f"{where}: {pop} {name}'s sentence differs and it does not count down"
    for name, note in full.notes.items():
        if engine.notes.get(name) != note:
            assert name in counting, f"{where}: {name}'s note differs and it does not count down"
    assert engine.notes.keys() == full.notes.keys(), where
    assert engine.alarms() == full.alarms, where
    assert engine.state() == full.state, where
    assert engine.settle_at() == full.wake_at, where
    assert {n: vp.wake_at for n, vp in engine.plans.items()} == {vp.name: vp.wake_at for vp in plans}, where
