"""Random spec dicts for the plan store's randomized tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from controller.config.desired import load_desired
from controller.config.serialize import vip_to_dict

DESIRED = load_desired(str(Path(__file__).resolve().parents[2] / "configs" / "controller"), "rev")
SPEC = vip_to_dict(DESIRED.vip("game-global").vip)  # type: ignore[union-attr]


def random_specs(rng: random.Random, names: tuple[str, ...],
                 before: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Spec dicts by VIP: mostly the same objects as before, now and then a new one."""
    out = dict(before or {})
    for name in names:
        if name not in out or rng.random() < 0.05:
            out[name] = {**SPEC, "name": name, "address": f"198.51.100.{names.index(name) + rng.choice((1, 100))}/32"}
    return out
