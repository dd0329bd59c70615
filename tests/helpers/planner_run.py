"""The planner driven through a sequence of moments with a fake clock (shared by planner tests)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from controller.config.desired import load_desired
from controller.config.desired_model import DesiredState, FleetVip, PopSpec
from controller.policy.model import PlannerState, PlanResult, PopReport
from controller.policy.planner import plan

ROOT = Path(__file__).resolve().parents[2]
BASE = load_desired(str(ROOT / "configs" / "controller"), "rev1")
GAME = BASE.vip("game-global")
assert GAME is not None
UP, DOWN, UNK = True, False, None


def fleet(pops: tuple[str, ...] = ("sjc", "fra", "sin"), **policy: dict) -> DesiredState:
    """The example's game-global VIP published at ``pops`` with policy sections overridden."""
    p = GAME.policy
    for section, values in policy.items():
        p = dataclasses.replace(p, **{section: dataclasses.replace(getattr(p, section), **values)})
    vip = FleetVip(GAME.vip, pops, True, p)
    specs = tuple(PopSpec(n, "0" * 64) for n in pops)
    return dataclasses.replace(BASE, pops=specs, vips=(vip,))


def report(pop: str, usw: bool | None, euc: bool | None = UP, at: float = 0.0) -> PopReport:
    return PopReport(pop, at, 1, {"game-global": {"us-west": usw, "eu-central": euc}}, {"game-global": True})


def reports(at: float, **verdicts: tuple[bool | None, bool | None] | bool | None) -> dict[str, PopReport]:
    out = {}
    for pop, v in verdicts.items():
        usw, euc = v if isinstance(v, tuple) else (v, UP)
        out[pop] = report(pop, usw, euc, at)
    return out


class Run:
    """Feeds the planner a sequence of moments, carrying its state like the daemon does."""

    def __init__(self, desired: DesiredState) -> None:
        self.desired = desired
        self.state = PlannerState.initial()
        self.drains: dict[str, float] = {}

    def at(self, now: float, **verdicts: tuple[bool | None, bool | None] | bool | None) -> PlanResult:
        result = plan(self.desired, reports(now, **verdicts), self.drains, now, self.state)
        self.state = result.state
        return result

    def settled(self, now: float, **verdicts: tuple[bool | None, bool | None] | bool | None) -> PlanResult:
        """The same reports at ``now`` and again once the settle window has passed."""
        self.at(now, **verdicts)
        return self.at(now + GAME.policy.safety.settle, **verdicts)
