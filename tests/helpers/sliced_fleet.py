"""A fleet large enough that a pass over it runs in slices (VIPS several times SMALL_PASS):
1,500 copies of the example's game-global at six POPs, and reports about them. Shared by the
tests of passes in slices and of a burst's pass in pieces."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from controller.config.desired import load_desired
from controller.config.desired_model import ChangePolicy, DesiredState, FleetVip, PopSpec
from controller.policy.model import PopReport

ROOT = Path(__file__).resolve().parents[2]
# A commit disabling every VIP is the large pass these tests are about, not the budget for
# config changes (test_change_gate.py): applied at once.
ALL_AT_ONCE = ChangePolicy(max_withdraw_fraction=1.0, max_removed_vips=10**6, bake=0.0)
BASE = load_desired(str(ROOT / "configs" / "controller"), "rev1")
POPS = ("sjc", "fra", "sin", "iad", "nrt", "gru")
VIPS = 1500  # several times SMALL_PASS: the pass runs in slices


def desired(tmp_path: Path, enabled: bool = True, revision: str = "rev1") -> DesiredState:
    template = BASE.vip("game-global")
    assert template is not None
    vips = tuple(FleetVip(dataclasses.replace(template.vip, name=f"v{i:04d}"), POPS, enabled, template.policy)
                 for i in range(VIPS))
    return dataclasses.replace(BASE, revision=revision, state_dir=str(tmp_path),
                               pops=tuple(PopSpec(p, "0" * 64) for p in POPS), vips=vips, change=ALL_AT_ONCE)


def report(pop: str, at: float, down: str = "") -> PopReport:
    """Every VIP healthy in both regions, but ``down``'s us-west."""
    return PopReport(pop, at, 1, {f"v{i:04d}": {"us-west": f"v{i:04d}" != down, "eu-central": True}
                                  for i in range(VIPS)})
