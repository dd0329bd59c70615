"""PlanBook builds a delta's Plan from the last one, replacing only the VIPs the delta names
(``_plan``'s ``changed``); checked against a book that builds every Plan from all its entries
(``incremental = False``): the same Plan, VIPs in the same order, the same specs tuple, the
same VIPs refused alone and kept, after every step of random deltas and full plans."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from controller.agent.plan_wire import NeedFullPlan, PlanBook
from controller.agent.intent import Plan
from controller.policy.model import PlanItem
from controller.wire import PlanReason, decode_plan_answer

from controller.config.desired import load_desired
from controller.config.serialize import vip_to_dict
from tests.helpers.plan_specs import PlanSide

DESIRED = load_desired(str(Path(__file__).resolve().parents[2] / "configs" / "controller"), "rev")
ALLOWED = DESIRED.allowed_prefixes
GAME = vip_to_dict(DESIRED.vip("game-global").vip)  # type: ignore[union-attr]


def spec_like(name: str, address: str) -> dict[str, Any]:
    spec = copy.deepcopy(GAME)
    spec["name"], spec["address"] = name, address
    return spec


class Fleet(PlanSide):
    """The controller's side for one POP (test_plan_deltas' Fleet): specs, items, the store."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.specs = {f"vip-{i}": spec_like(f"vip-{i}", f"198.51.100.{20 + i}/32") for i in range(n)}
        self.items = {name: PlanItem(name, True, "us-west") for name in self.specs}


SEEDS = [1, 2, 3, 4, int(time.time())]


class Reference(PlanBook):
    incremental = False


def _same(plan: Plan, ref: Plan, book: PlanBook, rbook: PlanBook) -> None:
    assert plan == ref
    assert list(plan.vips) == list(ref.vips)  # (dict equality ignores the order)
    assert plan.specs == ref.specs and [v.name for v in plan.specs or ()] == list(plan.vips)
    assert book._kept == rbook._kept and book.refused == rbook.refused
    assert book.full_json() == rbook.full_json()


def _step(fleet: Fleet, rng: random.Random, names: list[str]) -> None:
    for _ in range(rng.choice([1, 1, 1, 2, 5])):
        name = rng.choice(names)
        r = rng.random()
        if r < 0.3 and name in fleet.specs:  # gone from this POP's plan
            del fleet.specs[name], fleet.items[name]
        elif r < 0.55:  # (back) with a new or an old address, or one outside the allowed prefixes
            last = rng.choice(["203.0.113.9/32", f"198.51.100.{rng.randrange(20, 200)}/32",
                               f"198.51.100.{20 + names.index(name)}/32"])
            fleet.specs[name] = spec_like(name, last)
            fleet.items.setdefault(name, PlanItem(name, True, "us-west"))
        elif name in fleet.items:  # the intent alone
            fleet.items[name] = dataclasses.replace(
                fleet.items[name], wanted=rng.random() < 0.7, drain=rng.random() < 0.2,
                reason=rng.choice([PlanReason.HEALTHY, PlanReason.DISABLED, PlanReason.DRAINING]))


@pytest.mark.parametrize("seed", SEEDS)
def test_a_delta_plan_is_the_plan_built_from_every_entry(seed: int) -> None:
    rng = random.Random(seed)
    fleet = Fleet(40)
    names = [f"vip-{i}" for i in range(60)]  # some not in the plan yet
    fleet.serve()
    book, rbook = PlanBook("sjc", ALLOWED), Reference("sjc", ALLOWED)
    body = fleet.body(None)
    _same(book.apply(decode_plan_answer(body, "sjc")), rbook.apply(decode_plan_answer(body, "sjc")), book, rbook)
    plans = []
    for step in range(150):
        base = fleet.generation
        _step(fleet, rng, names)
        if fleet.serve() is None:
            continue
        body = fleet.body(None if rng.random() < 0.05 else base)
        try:
            ref = rbook.apply(decode_plan_answer(body, "sjc"))
        except NeedFullPlan:  # (not expected: the books follow every generation)
            raise AssertionError(f"step {step}: seed {seed}") from None
        plan = book.apply(decode_plan_answer(body, "sjc"))
        _same(plan, ref, book, rbook)
        plans.append((plan, list(plan.vips), dict(plan.vips), plan.specs))
    for plan, order, vips, specs in plans:  # a Plan handed out never changed afterwards
        assert list(plan.vips) == order and dict(plan.vips) == vips and plan.specs is specs
    assert len(plans) > 100
