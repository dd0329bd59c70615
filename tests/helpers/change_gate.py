"""A controller on the example config with a 10 s bake and a fake clock, and agents that
report healthy about their current plans: for the tests of the config-change gate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from controller.config.desired import load_desired
from controller.config.desired_model import DesiredState
from controller.policy.model import PopReport
from controller.server.core import Controller

ROOT = Path(__file__).resolve().parents[2]
BASE = load_desired(str(ROOT / "configs" / "controller"), "rev1")


def controller(tmp_path: Path, now: list[float], base: DesiredState = BASE, **kw: object) -> Controller:
    desired = dataclasses.replace(base, state_dir=str(tmp_path),
                                  change=dataclasses.replace(base.change, bake=10.0))
    return Controller(desired, clock=lambda: now[0], **kw)  # type: ignore[arg-type]


def healthy(ctl: Controller, at: float, pops: tuple[str, ...] = ("sjc", "fra", "sin"), down: str = "") -> None:
    """Every POP reports, about its current plan, what it publishes healthy and announced
    (``down``: a POP whose checks see every origin down)."""
    for pop in pops:
        published = {fv.name: fv for fv in ctl.desired.published_at(pop)}
        ok = pop != down
        ctl.add_report(PopReport(pop, at, ctl.served[pop].generation,
                                 {v: {o.region: ok for o in fv.vip.origins} for v, fv in published.items()},
                                 {v: True for v in published}))
