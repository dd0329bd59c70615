"""The controller's compact steady state (issue 10, item 7): the shared forms stand for what
they replace exactly (the same mapping, the same served bodies), and are shared."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from controller.config.desired import load_desired
from controller.config.serialize import vip_to_dict
from controller.policy.model import PlanItem, UniformItems
from controller.server.plans import PlanStore, as_spec_json
from controller.wire import PlanReason

DESIRED = load_desired(str(Path(__file__).resolve().parents[2] / "configs" / "controller"), "rev")
POPS = [f"p{i:02d}" for i in range(12)]


def test_uniform_items_is_the_dict_it_stands_for() -> None:
    item = PlanItem("web", True, "us-west")
    plain = dict.fromkeys(POPS, item)
    compact = UniformItems.of(plain)
    assert isinstance(compact, UniformItems)
    assert compact == plain and plain == compact
    assert list(compact) == POPS and list(compact.items()) == list(plain.items())
    assert compact.keys() == plain.keys() and list(compact.values()) == list(plain.values())
    assert compact.get("p03") is item and compact.get("nowhere") is None and "nowhere" not in compact
    assert len(compact) == len(POPS) and compact["p11"] is item
    # VIPs with the same POPs share one key dict; another item or another list is not equal
    other = UniformItems.of(dict.fromkeys(POPS, PlanItem("api", True, "us-west")))
    assert isinstance(other, UniformItems) and other.pops is compact.pops and other != compact
    assert UniformItems.of(dict.fromkeys(POPS[:-1], item)) != compact


def test_uniform_items_only_when_every_pop_has_the_same_object() -> None:
    item = PlanItem("web", True, "us-west")
    mixed = dict.fromkeys(POPS, item)
    mixed["p05"] = PlanItem("web", False, "us-west", reason=PlanReason.BACKEND_DOWN)
    assert UniformItems.of(mixed) is mixed
    equal_not_same = {pop: dataclasses.replace(item) for pop in POPS}
    assert UniformItems.of(equal_not_same) is equal_not_same
    small = dict.fromkeys(POPS[:3], item)
    assert UniformItems.of(small) is small


def test_spec_json_serves_the_same_plan_as_the_spec_dict() -> None:
    dicts = {fv.name: vip_to_dict(fv.vip) for fv in DESIRED.vips}
    items = {fv.name: PlanItem(fv.name, True, fv.vip.origins[0].region) for fv in DESIRED.vips}
    by_dict, by_json = PlanStore(), PlanStore()
    assert by_dict.serve("sjc", items, dicts, "rev", 0) == by_json.serve(
        "sjc", items, {n: as_spec_json(d) for n, d in dicts.items()}, "rev", 0) == 1
    assert by_dict.body("sjc", None) == by_json.body("sjc", None)
    # a changed definition: the same delta either way
    name = DESIRED.vips[0].name
    changed = json.loads(json.dumps(dicts[name]))
    changed["bgp"] = {**changed.get("bgp", {}), "med": 77}
    dicts2 = {**dicts, name: changed}
    assert by_dict.serve("sjc", items, dicts2, "rev2", 1) == by_json.serve(
        "sjc", items, {n: as_spec_json(d) for n, d in dicts2.items()}, "rev2", 1) == 2
    assert by_dict.body("sjc", 1) == by_json.body("sjc", 1)
    assert by_dict.body("sjc", None) == by_json.body("sjc", None)


def test_publish_lists_are_shared_and_their_names_interned() -> None:
    lists: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for fv in DESIRED.vips:
        lists.setdefault(fv.publish, []).append(fv.publish)
    for same in lists.values():
        assert all(p is same[0] for p in same)
    assert all(name is sys.intern(name) for fv in DESIRED.vips for name in fv.publish)
