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


class PlanSide:
    """The controller's side for one POP (``sjc``) in the plan tests: specs and items, the
    store serving them, the generation last served. Subclasses fill ``specs`` and ``items``."""

    def __init__(self) -> None:
        from controller.server.plans import PlanStore

        self.store = PlanStore()
        self.specs: dict[str, dict[str, Any]] = {}
        self.items: dict[str, Any] = {}
        self.generation = 0

    def serve(self, token: object = None) -> int | None:
        g = self.store.serve("sjc", dict(self.items), dict(self.specs), f"rev{self.generation}", self.generation, token)
        if g is not None:
            self.generation = g
        return g

    def body(self, after: int | None) -> dict[str, Any]:
        import json

        value: dict[str, Any] = json.loads(self.store.body("sjc", after))
        return value
