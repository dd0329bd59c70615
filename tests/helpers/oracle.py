"""The engine against the per-POP oracle, after one step of a randomized differential test."""

from __future__ import annotations

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
