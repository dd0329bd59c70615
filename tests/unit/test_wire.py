"""Plans and reports on the wire; VIP specs round-trip; the controller's memory persists."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from controller.config.agent import DEFAULT_CHECK, DEFAULT_DRAINING, DEFAULT_UP, read_vip
from controller.config.desired import load_desired
from controller.config.model import StateAttributes
from controller.config.reader import Issues, Node
from controller.config.serialize import vip_to_dict
from controller.policy.model import PlanItem, PlannerState
from controller.policy.planner import plan
from controller.policy.model import PopReport
from controller.agent.plan_wire import decode_plan
from controller.config.model import AdminState, Vip
from controller.wire import PlanReason, WireError, WireReport, decode_report
from controller.wire import encode_plan as encode_wire_plan

DESIRED = load_desired(str(Path(__file__).resolve().parents[2] / "configs" / "controller"), "rev")
GAME = DESIRED.vip("game-global").vip  # type: ignore[union-attr]
API = DESIRED.vip("api-eu").vip  # type: ignore[union-attr]


def encode_plan(pop: str, generation: int, revision: str, items: list[tuple[Vip, PlanItem]]) -> dict:
    """A plan's JSON as the controller sends it: each item with its VIP's spec."""
    return encode_wire_plan(pop, generation, revision, [(i, vip_to_dict(vip)) for vip, i in items])


def _with_extended(vip: Vip) -> Vip:
    import dataclasses

    up = dataclasses.replace(vip.attributes.up, extended_communities=("origin:192.0.2.1:7", "target:65000:1"))
    return dataclasses.replace(vip, attributes=dataclasses.replace(vip.attributes, up=up))


@pytest.mark.parametrize("vip", [GAME, API, _with_extended(GAME)], ids=["http", "tcp", "extended-communities"])
def test_vip_spec_round_trips_through_the_config_reader(vip: object) -> None:
    issues = Issues()
    back = read_vip(Node(vip_to_dict(vip), "", issues), DESIRED.allowed_prefixes, dict(DEFAULT_CHECK),  # type: ignore[arg-type]
                    StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))
    assert issues.items == [] and back == vip


def test_plan_round_trip() -> None:
    item = PlanItem("game-global", True, "eu-central", drain=True, reason="draining", safety_hold=False)
    data = encode_plan("sjc", 4, "abc", [(GAME, item)])
    p = decode_plan(data, "sjc", DESIRED.allowed_prefixes)
    assert (p.generation, p.revision, p.source) == (4, "abc", "controller")
    i = p.vips["game-global"]
    assert (i.wanted, i.active_origin, i.drain, i.reason) == (True, "eu-central", True, "draining")
    assert p.specs == (GAME,)


def test_plan_for_a_vip_outside_the_agents_allowed_ranges_is_refused() -> None:
    data = encode_plan("sjc", 1, "abc", [(GAME, PlanItem("game-global", True, "us-west"))])
    with pytest.raises(WireError) as info:
        decode_plan(data, "sjc", [ipaddress.ip_network("203.0.113.0/24")])
    assert info.value.field == "vips[0].spec.address"
    assert "outside the allowed anycast prefixes" in info.value.message


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.__setitem__("pop", "fra"), "pop"),
    (lambda d: d["vips"][0].__setitem__("active_origin", "mars"), "vips[0].active_origin"),
    (lambda d: d["vips"][0]["spec"]["check"].__setitem__("rise", 0), "vips[0].spec.check.rise"),
    (lambda d: d["vips"][0].__setitem__("wanted", "yes"), "vips[0].wanted"),
    (lambda d: d.__setitem__("vips", {}), "vips"),
])
def test_invalid_plans_name_the_field(mutate: object, field: str) -> None:
    data = encode_plan("sjc", 1, "abc", [(GAME, PlanItem("game-global", True, "us-west"))])
    mutate(data)  # type: ignore[operator]
    with pytest.raises(WireError) as info:
        decode_plan(data, "sjc", DESIRED.allowed_prefixes)
    assert info.value.field == field


def test_report_validation() -> None:
    published = {"game-global": {o.region for o in GAME.origins}}
    report = decode_report(
        {"plan_generation": 3, "origins": {"game-global": {"us-west": True, "eu-central": None}},
         "announced": {"game-global": False}}, published)
    assert report == WireReport(3, {"game-global": {"us-west": True, "eu-central": None}}, {"game-global": False})
    for body, field in [({"origins": {"api-eu": {}}}, "origins.api-eu"),
                        ({"origins": {"game-global": {"us-west": "up"}}}, "origins.game-global.us-west"),
                        ({"origins": []}, "origins"), ({"extra": 1}, "extra"),
                        ({"plan_generation": "7"}, "plan_generation")]:
        with pytest.raises(WireError) as info:
            decode_report(body, published)
        assert info.value.field == field


def test_the_agents_spec_cache_never_lets_a_changed_or_refused_spec_through() -> None:
    """The agent skips re-reading a VIP spec equal to one of the last good plan; a spec that
    changed, a narrower allowed range, or a bad plan are read in full as without the cache."""
    import copy
    cache: dict = {}
    items = [(GAME, PlanItem("game-global", True, "us-west")), (API, PlanItem("api-eu", True, "eu-central"))]
    data = encode_plan("sjc", 1, "abc", items)
    first = decode_plan(copy.deepcopy(data), "sjc", DESIRED.allowed_prefixes, cache)
    assert set(cache) == {"game-global", "api-eu"}
    again = decode_plan(copy.deepcopy(data), "sjc", DESIRED.allowed_prefixes, cache)
    assert again.specs == first.specs == (GAME, API)

    changed = copy.deepcopy(data)
    changed["vips"][0]["spec"]["check"]["rise"] = 0  # invalid now: must not come from the cache
    with pytest.raises(WireError) as info:
        decode_plan(changed, "sjc", DESIRED.allowed_prefixes, cache)
    assert info.value.field == "vips[0].spec.check.rise"
    assert set(cache) == {"game-global", "api-eu"}  # a refused plan leaves the cache as it was

    moved = copy.deepcopy(data)
    moved["vips"][1]["spec"]["address"] = "203.0.113.9/32"
    with pytest.raises(WireError) as info:
        decode_plan(moved, "sjc", DESIRED.allowed_prefixes, cache)
    assert info.value.field == "vips[1].spec.address"

    with pytest.raises(WireError) as info:  # same specs, narrower allowed ranges
        decode_plan(copy.deepcopy(data), "sjc", [ipaddress.ip_network("203.0.113.0/24")], cache)
    assert info.value.field == "vips[0].spec.address"

    garbage = copy.deepcopy(data)
    garbage["vips"][0]["spec"]["name"] = ["not", "a", "name"]  # unhashable: still a named error
    with pytest.raises(WireError) as info:
        decode_plan(garbage, "sjc", DESIRED.allowed_prefixes, cache)
    assert info.value.field == "vips[0].spec.name"

    fewer = decode_plan(encode_plan("sjc", 2, "abd", items[:1]), "sjc", DESIRED.allowed_prefixes, cache)
    assert fewer.specs == (GAME,) and set(cache) == {"game-global"}


def test_the_wire_plan_round_trips_without_any_type_of_the_agent_or_the_controller() -> None:
    from controller.wire import PlanVip, WirePlan, decode_plan as decode_wire_plan
    plan = WirePlan("sjc", 3, "abc", (PlanVip("game-global", {"name": "game-global"}, True, "us-west", False,
                                              "healthy", False, "sees us-west healthy"),))
    data = encode_wire_plan(plan.pop, plan.generation, plan.revision, [(v, v.spec) for v in plan.vips])
    assert decode_wire_plan(data, "sjc") == plan


def test_a_plan_entry_whose_name_is_not_its_specs_is_refused() -> None:
    data = encode_plan("sjc", 1, "abc", [(GAME, PlanItem("game-global", True, "us-west"))])
    data["vips"][0]["name"] = "api-eu"
    with pytest.raises(WireError) as info:
        decode_plan(data, "sjc", DESIRED.allowed_prefixes)
    assert info.value.field == "vips[0].name"


def test_report_round_trip() -> None:
    from controller.wire import encode_report
    published = {"game-global": {o.region for o in GAME.origins}}
    report = WireReport(5, {"game-global": {"us-west": False, "eu-central": None}}, {"game-global": True})
    assert decode_report(encode_report(report), published) == report


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["vips"][0].__setitem__("reason", "pwned{label=\"x\"}"), "vips[0].reason"),
    (lambda d: d["vips"][0].__setitem__("reason", 7), "vips[0].reason"),
    (lambda d: d["vips"][0].pop("reason"), "vips[0].reason"),
    (lambda d: d["vips"][0]["spec"].__setitem__("admin", "sideways"), "vips[0].spec.admin"),
], ids=["unknown-reason", "not-a-word", "no-reason", "unknown-admin-state"])
def test_a_word_outside_the_vocabulary_is_refused_by_field_and_changes_nothing(mutate: object, field: str) -> None:
    """A peer cannot choose the agent's metric label values: the plan's reason and the VIP's
    admin state are closed vocabularies, checked where the plan enters."""
    import copy
    cache: dict = {}
    good = encode_plan("sjc", 1, "abc", [(GAME, PlanItem("game-global", False, "us-west", reason=PlanReason.DAMPENED))])
    decode_plan(copy.deepcopy(good), "sjc", DESIRED.allowed_prefixes, cache)
    before = dict(cache)
    bad = copy.deepcopy(good)
    bad["generation"] = 2
    mutate(bad)  # type: ignore[operator]
    with pytest.raises(WireError) as info:
        decode_plan(bad, "sjc", DESIRED.allowed_prefixes, cache)
    assert info.value.field == field
    assert cache == before  # the refused plan left the last good one's specs as they were


def test_every_plan_reason_and_admin_state_round_trips_as_the_same_word() -> None:
    """StrEnums: the JSON, the logs and the metric labels keep the exact strings."""
    import dataclasses
    import json
    for reason in PlanReason:
        data = json.loads(json.dumps(encode_plan("sjc", 1, "abc", [(GAME, PlanItem("game-global", True, "us-west",
                                                                                  reason=reason))])))
        assert data["vips"][0]["reason"] == reason.value
        got = decode_plan(data, "sjc", DESIRED.allowed_prefixes).vips["game-global"].reason
        assert got is reason and f"{got}" == reason.value
    for admin in AdminState:
        vip = dataclasses.replace(GAME, admin=admin)
        spec = json.loads(json.dumps(vip_to_dict(vip)))
        assert spec["admin"] == admin.value
        back = decode_plan(encode_plan("sjc", 1, "abc", [(vip, PlanItem("game-global", True, "us-west"))]), "sjc",
                           DESIRED.allowed_prefixes).specs
        assert back is not None and back[0].admin is admin


def test_a_plan_reason_becomes_the_agents_withdrawal_reason() -> None:
    from controller.agent.decide import Action, decide
    p = decode_plan(encode_plan("sjc", 1, "abc", [(GAME, PlanItem("game-global", False, "us-west",
                                                                  reason=PlanReason.DRAINED))]),
                    "sjc", DESIRED.allowed_prefixes)
    d = decide(GAME, p.vips["game-global"], {}, DESIRED.allowed_prefixes)
    assert (d.action, d.reason) == (Action.WITHDRAW, PlanReason.DRAINED) and d.reason == "drained"


@pytest.mark.parametrize("key, value", [("name", None), ("active_origin", 3), ("wanted", 1), ("drain", "no"),
                                        ("safety_hold", None), ("reason", "Healthy"), ("explanation", ["x"])])
def test_each_field_of_a_plan_entry_is_checked_by_name(key: str, value: object) -> None:
    data = encode_plan("sjc", 1, "abc", [(API, PlanItem("api-eu", True, "eu-central")),
                                         (GAME, PlanItem("game-global", True, "us-west"))])
    data["vips"][1][key] = value
    with pytest.raises(WireError) as info:
        decode_plan(data, "sjc", DESIRED.allowed_prefixes)
    assert info.value.field == f"vips[1].{key}"


@pytest.mark.parametrize("generation", [-1, -5, 2 ** 63, 2 ** 70])
def test_a_report_generation_out_of_range_is_refused_naming_it(generation: int) -> None:
    with pytest.raises(WireError) as info:
        decode_report({"plan_generation": generation, "origins": {}}, {})
    assert info.value.field == "plan_generation"
