"""A controller on the example config with a fake clock, and the reports the state tests send."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from controller.config.desired import load_desired
from controller.policy.model import PopReport
from controller.server.core import Controller

ROOT = Path(__file__).resolve().parents[2]
DESIRED = load_desired(str(ROOT / "configs" / "controller"), "rev1")


def controller(state_dir: Path, now: list[float], **kw: object) -> Controller:
    desired = dataclasses.replace(DESIRED, state_dir=str(state_dir))
    return Controller(desired, clock=lambda: now[0], **kw)  # type: ignore[arg-type]


def report(pop: str, usw: bool | None, at: float) -> PopReport:
    return PopReport(pop, at, 1, {"game-global": {"us-west": usw, "eu-central": True},
                                  "api-eu": {"eu-central": True, "us-west": True}},
                     {"game-global": True, "api-eu": True})


def reports(ctl: Controller, usw: bool | None, at: float) -> None:
    for pop in ("sjc", "fra", "sin"):
        ctl.add_report(report(pop, usw, at))
