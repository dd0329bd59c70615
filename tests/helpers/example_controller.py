"""The committed example's controller (configs/controller: POPs sjc, fra, sin) on a test's
clock and state directory, and a report of its VIP game-global."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from controller.config.desired import load_desired
from controller.policy.model import PopReport
from controller.server.core import Controller

ROOT = Path(__file__).resolve().parents[2]


def controller(tmp_path: Path, now: list[float], bake: float | None = None) -> Controller:
    """``bake`` 0: a config change applies at every POP at once (no waves)."""
    desired = dataclasses.replace(load_desired(str(ROOT / "configs" / "controller"), "rev1"), state_dir=str(tmp_path))
    if bake is not None:
        desired = dataclasses.replace(desired, change=dataclasses.replace(desired.change, bake=bake))
    return Controller(desired, clock=lambda: now[0])


def report(pop: str, usw: bool, at: float) -> PopReport:
    return PopReport(pop, at, 1, {"game-global": {"us-west": usw, "eu-central": True}}, {"game-global": True})
