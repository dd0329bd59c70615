"""Plan deltas end to end without HTTP: the controller's PlanStore builds the bodies, the
agent's PlanBook applies them, whole or not at all; reports as deltas; and the sizes."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from controller.agent.plan_client import PlanClient
from controller.agent.plan_wire import NeedFullPlan, PlanBook, decode_plan
from controller.config.desired import load_desired
from controller.config.serialize import vip_to_dict
from controller.policy.model import PlanItem
from controller.server.plans import LOG_DEPTH, PlanStore
from controller.wire import (PlanReason, WireError, WireReport, apply_report_delta, canonical_json, decode_plan_answer,
                             decode_report, encode_report, parse_counter, report_delta, report_limit, spec_hash)

from tests.helpers.plan_specs import PlanSide

DESIRED = load_desired(str(Path(__file__).resolve().parents[2] / "configs" / "controller"), "rev")
ALLOWED = DESIRED.allowed_prefixes
GAME = vip_to_dict(DESIRED.vip("game-global").vip)  # type: ignore[union-attr]
API = vip_to_dict(DESIRED.vip("api-eu").vip)  # type: ignore[union-attr]


def spec_like(base: dict[str, Any], name: str, address: str) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    spec["name"], spec["address"] = name, address
    return spec


class Fleet(PlanSide):
    """A controller side for one POP: specs, items, and the store serving them."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.specs = {"game-global": GAME, "api-eu": API}
        for i in range(n - 2):
            self.specs[f"vip-{i}"] = spec_like(GAME, f"vip-{i}", f"198.51.100.{20 + i}/32")
        self.items = {name: PlanItem(name, True, "us-west" if name != "api-eu" else "eu-central")
                      for name in self.specs}


def held(book: PlanBook) -> tuple[Any, ...]:
    """Everything a book holds, to show a refused delta changed nothing."""
    return (book.generation, book.revision, dict(book.entries), dict(book.specs), book.digest)


def synced() -> tuple[Fleet, PlanBook]:
    fleet = Fleet()
    fleet.serve()
    book = PlanBook("sjc", ALLOWED)
    book.apply(decode_plan_answer(fleet.body(None), "sjc"))
    return fleet, book


def test_a_delta_carries_the_changed_entries_and_only_the_specs_the_agent_lacks() -> None:
    fleet, book = synced()
    base = fleet.generation
    fleet.items["game-global"] = PlanItem("game-global", True, "eu-central", reason=PlanReason.BACKEND_DOWN)
    fleet.serve()
    delta = fleet.body(base)
    assert (delta["after"], delta["generation"]) == (base, base + 1)
    assert [v["name"] for v in delta["vips"]] == ["game-global"] and delta["removed"] == []
    assert delta["specs"] == {}  # the spec did not change: the agent holds it by hash
    plan = book.apply(decode_plan_answer(delta, "sjc"))
    assert plan.vips["game-global"].active_origin == "eu-central" and plan.generation == base + 1

    # A changed spec travels once, under its hash; a removed VIP is named.
    fleet.specs["vip-0"] = dict(fleet.specs["vip-0"], address="198.51.100.99/32")
    del fleet.specs["api-eu"], fleet.items["api-eu"]
    fleet.serve()
    delta = fleet.body(base + 1)
    h = spec_hash(canonical_json(fleet.specs["vip-0"]))
    assert list(delta["specs"]) == [h] and delta["removed"] == ["api-eu"]
    plan = book.apply(decode_plan_answer(delta, "sjc"))
    # The plan built from deltas is the plan a full fetch gives, to the byte.
    assert plan == PlanBook("sjc", ALLOWED).apply(decode_plan_answer(fleet.body(None), "sjc"))
    assert book.full_json() == fleet.store.body("sjc", None)
    assert str(plan.specs[-1].prefix) == "198.51.100.99/32"


def test_an_explanation_or_revision_alone_is_no_new_generation() -> None:
    fleet = Fleet()
    fleet.serve()
    fleet.items["game-global"] = dataclasses.replace(fleet.items["game-global"], explanation="1.5s more")
    assert fleet.serve() is None
    assert fleet.body(fleet.generation) == {"pop": "sjc", "generation": fleet.generation, "after": fleet.generation,
                                            "revision": "rev0", "digest": fleet.body(None)["digest"],
                                            "removed": [], "specs": {}, "vips": []}


def test_a_body_is_built_once_per_generation_and_base_not_per_request() -> None:
    fleet = Fleet()
    fleet.serve()
    fleet.items["api-eu"] = dataclasses.replace(fleet.items["api-eu"], drain=True, reason=PlanReason.DRAINING)
    fleet.serve()
    g = fleet.generation
    assert fleet.store.answer("sjc", None)[0] is fleet.store.answer("sjc", None)[0]
    assert fleet.store.answer("sjc", g - 1)[0] is fleet.store.answer("sjc", g - 1)[0]
    fleet.items["api-eu"] = dataclasses.replace(fleet.items["api-eu"], drain=False, reason=PlanReason.HEALTHY)
    fleet.serve()
    assert json.loads(fleet.store.body("sjc", g))["generation"] == g + 1  # a new generation: a new body


def test_unknown_too_old_or_future_generations_get_the_full_plan() -> None:
    fleet = Fleet()
    fleet.serve()
    first = fleet.generation
    for i in range(LOG_DEPTH + 1):
        fleet.items["game-global"] = PlanItem("game-global", i % 2 == 1, "us-west")
        fleet.serve()
    assert "after" not in fleet.body(first)  # older than the log
    assert "after" not in fleet.body(fleet.generation + 5)  # a generation this controller never made
    assert fleet.body(fleet.generation - 1)["after"] == fleet.generation - 1
    # Many small changes that together touch most of the plan: the full plan is smaller.
    fleet = Fleet(100)
    fleet.serve()
    base = fleet.generation
    for name in list(fleet.items)[:80]:
        fleet.items[name] = dataclasses.replace(fleet.items[name], wanted=False, reason=PlanReason.DISABLED)
        fleet.serve()
    assert "after" not in fleet.body(base) and fleet.body(fleet.generation - 2)["after"] == fleet.generation - 2


def test_a_restarted_controller_serves_a_higher_generation_and_a_full_plan_to_old_bases() -> None:
    fleet, book = synced()
    before = fleet.generation
    restarted = PlanStore()  # a new process: no log; the persisted generation carries on
    g = restarted.serve("sjc", fleet.items, fleet.specs, "rev9", before)
    assert g is not None and g > before
    answer = json.loads(restarted.body("sjc", before))
    assert "after" not in answer and answer["generation"] == g
    assert book.apply(decode_plan_answer(answer, "sjc")).generation == g


@pytest.mark.parametrize("tamper, words", [
    (lambda d: d.__setitem__("after", d["after"] - 1), "holds plan"),  # a gap
    (lambda d: d["vips"][0].__setitem__("spec_hash", "0" * 32), "does not hold"),  # unknown hash
    (lambda d: d["specs"][next(iter(d["specs"]))].__setitem__("admin", "drain"), "another hash"),  # mismatch
    (lambda d: d["vips"][0].__setitem__("wanted", not d["vips"][0]["wanted"]), "would sum to"),  # digest
    (lambda d: d["removed"].append("game-global"), "would sum to"),
], ids=["gap", "unknown-hash", "hash-mismatch", "entry-altered", "extra-removal"])
def test_a_delta_that_does_not_fit_is_not_applied_at_all(tamper: Any, words: str) -> None:
    fleet, book = synced()
    base = fleet.generation
    fleet.specs["vip-0"] = dict(fleet.specs["vip-0"], address="198.51.100.77/32")
    fleet.items["api-eu"] = dataclasses.replace(fleet.items["api-eu"], wanted=False, reason=PlanReason.DISABLED)
    fleet.serve()
    delta = fleet.body(base)
    before = held(book)
    tamper(delta)
    with pytest.raises(NeedFullPlan, match=words):
        book.apply(decode_plan_answer(delta, "sjc"))
    assert held(book) == before  # the agent still holds plan ``base``, whole
    assert book.apply(decode_plan_answer(fleet.body(None), "sjc")).generation == fleet.generation


def test_a_vip_outside_the_allowed_prefixes_is_refused_alone_and_keeps_its_last_good_spec() -> None:
    """The rest of the plan applies (api-eu's change, in the same delta); vip-0 keeps what the
    agent had for it (its old address, still announced: never withdrawn for the controller's
    mistake), and an agent that never had it good leaves it out."""
    fleet, book = synced()
    base = fleet.generation
    old = book.apply(decode_plan_answer(fleet.body(None), "sjc"))
    fleet.items["api-eu"] = dataclasses.replace(fleet.items["api-eu"], wanted=False, reason=PlanReason.DISABLED)
    fleet.specs["vip-0"] = dict(fleet.specs["vip-0"], address="203.0.113.5/32")  # outside 198.51.100.0/24
    fleet.serve()
    plan = book.apply(decode_plan_answer(fleet.body(base), "sjc"))
    assert not plan.vips["api-eu"].wanted  # the legitimate change beside it applied
    assert plan.vips["vip-0"] == old.vips["vip-0"]  # kept as it was
    kept = next(v for v in plan.specs if v.name == "vip-0")
    assert kept == next(v for v in old.specs if v.name == "vip-0")
    assert list(book.refused) == ["vip-0"] and "outside the allowed anycast prefixes" in book.refused["vip-0"]
    assert book.generation == fleet.generation  # the book follows the controller: later deltas apply
    again = book.apply(decode_plan_answer(fleet.body(None), "sjc"))  # the full plan: the same
    assert again.vips == plan.vips and list(book.refused) == ["vip-0"]
    fresh = PlanBook("sjc", ALLOWED).apply(decode_plan_answer(fleet.body(None), "sjc"))
    assert "vip-0" not in fresh.vips and "vip-0" not in {v.name for v in fresh.specs}
    assert set(fresh.vips) == set(plan.vips) - {"vip-0"}
    fleet.specs["vip-0"] = dict(fleet.specs["vip-0"], address="198.51.100.77/32")  # fixed by the operator
    fleet.serve()
    fixed = book.apply(decode_plan_answer(fleet.body(fleet.generation - 1), "sjc"))
    assert str(next(v for v in fixed.specs if v.name == "vip-0").prefix) == "198.51.100.77/32" and not book.refused


def test_a_spec_with_any_other_fault_refuses_the_plan_whole() -> None:
    fleet, book = synced()
    base = fleet.generation
    fleet.items["api-eu"] = dataclasses.replace(fleet.items["api-eu"], wanted=False, reason=PlanReason.DISABLED)
    fleet.specs["vip-0"] = dict(fleet.specs["vip-0"], address="203.0.113.5/32", admin="sideways")
    fleet.serve()
    before = held(book)
    with pytest.raises(WireError):
        book.apply(decode_plan_answer(fleet.body(base), "sjc"))
    assert held(book) == before  # api-eu's change, in the same delta, was not applied either


def test_a_full_plan_whose_hash_or_digest_is_wrong_is_refused() -> None:
    fleet = Fleet()
    fleet.serve()
    for tamper, field in [(lambda d: d["vips"][0]["spec"].__setitem__("admin", "drain"), "vips[0].spec_hash"),
                          (lambda d: d.__setitem__("digest", "0" * 16), "digest")]:
        body = fleet.body(None)
        tamper(body)
        with pytest.raises(WireError) as info:
            PlanBook("sjc", ALLOWED).apply(decode_plan_answer(body, "sjc"))
        assert info.value.field == field


def test_a_full_plan_from_a_controller_before_deltas_is_still_read() -> None:
    """Agents upgrade first: an old controller's plan has no hashes and no digest."""
    old = {"pop": "sjc", "generation": 3, "revision": "r", "vips": [
        {"name": "game-global", "spec": GAME, "wanted": True, "active_origin": "us-west", "drain": False,
         "reason": "healthy", "safety_hold": False, "explanation": ""}]}
    book = PlanBook("sjc", ALLOWED)
    assert book.apply(decode_plan_answer(old, "sjc")).generation == 3
    assert decode_plan(old, "sjc", ALLOWED).vips == book.apply(decode_plan_answer(old, "sjc")).vips


def test_an_agent_restarts_from_its_cache_and_a_corrupted_cache_is_ignored(tmp_path: Path) -> None:
    fleet, _ = synced()
    client = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    client.book.apply(decode_plan_answer(fleet.body(None), "sjc"))
    client.save_cached()
    again = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    cached = again.load_cached()
    assert cached is not None and cached.source == "cached-plan" and cached.generation == fleet.generation
    assert again.book.generation == fleet.generation  # deltas go onto the cached plan
    assert set(cached.vips) == set(fleet.items)

    cache = tmp_path / "plan.json"
    good = cache.read_bytes()
    for corrupt in (good.replace(b'"198.51.100.10/32"', b'"198.51.100.11/32"'),  # still JSON, other content
                    good.replace(b'"wanted":true', b'"wanted":false', 1),  # an entry altered: digest
                    good[: len(good) // 2],  # a torn write
                    b"\xff\xfe garbage"):
        assert corrupt != good
        cache.write_bytes(corrupt)
        fresh = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
        assert fresh.load_cached() is None and fresh.book.generation is None  # fetches a full plan


def _cached_by(token: str, tmp_path: Path) -> PlanClient:
    fleet, _ = synced()
    client = PlanClient("http://127.0.0.1:1", "sjc", token, str(tmp_path), ALLOWED)
    client.book.apply(decode_plan_answer(fleet.body(None), "sjc"))
    client.save_cached()
    return client


def test_a_cache_the_agent_did_not_seal_is_refused_and_counted(tmp_path: Path) -> None:
    """A valid plan with a valid digest, written by someone without this POP's token (or
    with the MAC removed, or an address edited and the digest recomputed), is not followed."""
    forger = _cached_by("someone-else", tmp_path)
    cache = tmp_path / "plan.json"
    agent = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    assert agent.load_cached() is None and agent.book.generation is None
    unsealed = json.loads(cache.read_bytes())
    del unsealed["cache_mac"]
    cache.write_text(json.dumps(unsealed))
    assert agent.load_cached() is None
    _cached_by("x", tmp_path)  # sealed by the agent itself, then an in-range address edited in
    edited = PlanBook("sjc", ALLOWED)
    plan = json.loads(cache.read_bytes())
    mac = plan.pop("cache_mac")
    plan["vips"][0]["spec"]["address"] = "198.51.100.99"
    plan["vips"][0]["spec_hash"] = plan["digest"] = ""  # no hash, no digest: nothing else to check
    edited.apply(decode_plan_answer(plan, "sjc"), verify=True)  # a plan the agent would follow...
    cache.write_bytes(edited.full_json()[:-1] + b',"cache_mac":"' + mac.encode() + b'"}')
    assert agent.load_cached() is None  # ...but not from the cache: the MAC is over what it says
    assert agent.refusals == {"cache_mac": 3} and forger.refusals == {}
    assert _cached_by("x", tmp_path).load_cached() is not None  # its own cache, as before


@pytest.mark.parametrize("hostile", ["fifo", "symlink to /dev/zero", "nested", "a directory"])
def test_a_hostile_cache_file_is_refused_at_once(tmp_path: Path, hostile: str) -> None:
    cache = tmp_path / "plan.json"
    if hostile == "fifo":
        os.mkfifo(cache)
    elif hostile == "symlink to /dev/zero":
        os.symlink("/dev/zero", cache)
    elif hostile == "nested":
        cache.write_text("[" * 100_000 + "]" * 100_000)
    else:
        cache.mkdir()
    agent = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    assert agent.load_cached() is None and agent.refusals == {"cache_invalid": 1}


def test_an_ancient_cache_is_followed_and_says_how_old_it_is(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    _cached_by("x", tmp_path)
    five_years_ago = time.time() - 5 * 365 * 86400
    os.utime(tmp_path / "plan.json", (five_years_ago, five_years_ago))
    agent = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    assert agent.load_cached(max_age=86400) is not None  # static stability: never withdrawn for its age
    assert agent.confirmed_at == pytest.approx(five_years_ago)  # anycast_plan_confirmed_timestamp_seconds
    assert [r.reason for r in caplog.records if hasattr(r, "reason")] == ["plan_old"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("text", ["-1", "abc", "", "1.5", "1e3", "99999999999999999999", "9223372036854775808",
                                  "\u0661"])
def test_a_generation_in_a_query_must_be_a_plain_counter(text: str) -> None:
    with pytest.raises(WireError) as info:
        parse_counter(text, "after")
    assert info.value.field == "after"
    assert parse_counter("9223372036854775807", "after") == 2**63 - 1


# --- reports -----------------------------------------------------------------------------------
PUBLISHED = {"game-global": {"us-west", "eu-central"}, "api-eu": {"eu-central"}}


def test_a_delta_report_applies_onto_the_last_one_and_round_trips() -> None:
    first = WireReport(3, {"game-global": {"us-west": True, "eu-central": True}, "api-eu": {"eu-central": None}},
                       {"game-global": True, "api-eu": False}, seq=1)
    second = WireReport(4, {"game-global": {"us-west": False, "eu-central": True}}, {"game-global": True}, seq=2)
    delta = report_delta(first, second)
    assert delta == WireReport(4, {"game-global": {"us-west": False, "eu-central": True}}, {}, 2, 1, ("api-eu",))
    back = decode_report(json.loads(json.dumps(encode_report(delta))), PUBLISHED)
    assert back == delta
    origins, announced = apply_report_delta(first.origins, first.announced, back, PUBLISHED)
    assert (origins, announced) == (second.origins, second.announced)
    # A VIP the POP no longer publishes drops out of the verdict set.
    origins, _ = apply_report_delta(first.origins, first.announced, dataclasses.replace(back, removed=()),
                                    {"game-global": {"us-west", "eu-central"}})
    assert set(origins) == {"game-global"}


@pytest.mark.parametrize("body, field", [
    ({"seq": -1}, "seq"), ({"seq": "7"}, "seq"), ({"seq": 2**63}, "seq"), ({"seq": True}, "seq"),
    ({"seq": 2, "base": "x"}, "base"), ({"base": 1}, "seq"), ({"seq": 2, "removed": ["a"]}, "removed"),
    ({"seq": 2, "base": 1, "removed": [1]}, "removed"), ({"seq": 2, "base": 1, "removed": "api-eu"}, "removed"),
])
def test_bad_report_counters_are_refused_by_name(body: dict[str, Any], field: str) -> None:
    with pytest.raises(WireError) as info:
        decode_report(body, PUBLISHED)
    assert info.value.field == field


# --- sizes (issue 10's targets; printed for the record) ------------------------------------------
def test_sizes_at_10000_vips_and_a_100000_vip_report(capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet(2)
    for i in range(10_000):
        name = f"vip-{i:05d}"
        fleet.specs[name] = spec_like(GAME, name, f"2001:db8:51::{i:x}/128")
        fleet.items[name] = PlanItem(name, True, "us-west", explanation="sees us-west healthy")
    fleet.serve()
    full = len(fleet.store.body("sjc", None))
    full_gzipped = len(fleet.store.answer("sjc", None)[0])
    base = fleet.generation
    fleet.items["vip-04242"] = PlanItem("vip-04242", True, "eu-central", reason=PlanReason.BACKEND_DOWN,
                                        explanation="sjc sees us-west down: eu-central")
    fleet.serve()
    one_vip = len(fleet.store.body("sjc", base))
    base = fleet.generation
    fleet.specs["vip-00007"] = dict(fleet.specs["vip-00007"], admin="drain")
    fleet.serve()
    one_spec = len(fleet.store.body("sjc", base))
    old_full = len(json.dumps({"pop": "sjc", "generation": 1, "revision": "rev0", "vips": [
        {"name": n, "spec": fleet.specs[n], "wanted": i.wanted, "active_origin": i.active_origin, "drain": i.drain,
         "reason": i.reason, "safety_hold": i.safety_hold, "explanation": i.explanation}
        for n, i in sorted(fleet.items.items())]}))

    vips = {f"vip-{i:06d}": ("us-west", "eu-central") for i in range(100_000)}
    full_report = WireReport(7, {v: {r: True for r in rs} for v, rs in vips.items()}, {v: True for v in vips}, seq=1)
    changed = dict(full_report.origins, **{"vip-000042": {"us-west": False, "eu-central": True}})
    report_bytes = len(json.dumps(encode_report(full_report)))
    delta_bytes = len(json.dumps(encode_report(report_delta(
        full_report, dataclasses.replace(full_report, origins=changed, seq=2)))))
    limit = report_limit(sum(len(r) for r in vips.values()))
    # The controller reads both, and the delta applied onto the full one is the changed full set.
    published = {v: set(rs) for v, rs in vips.items()}
    got = decode_report(json.loads(json.dumps(encode_report(full_report))), published)
    one = decode_report(json.loads(json.dumps(encode_report(report_delta(
        full_report, dataclasses.replace(full_report, origins=changed, seq=2))))), published)
    assert apply_report_delta(got.origins, got.announced, one, published) == (changed, full_report.announced)
    with capsys.disabled():
        print(f"\n10,000 VIPs: full plan {full} B, gzipped {full_gzipped} B (before: {old_full} B); one-VIP delta {one_vip} B; "
              f"one-spec delta {one_spec} B\n100,000-VIP report: full {report_bytes} B (limit {limit} B); "
              f"one-verdict delta {delta_bytes} B")
    assert one_vip <= 2048 and one_spec <= 2048
    assert report_bytes < limit and delta_bytes < 512


def test_an_agent_on_its_cached_plan_asks_for_the_changes_since_it() -> None:
    """follow_plans passes the cached plan's generation as the base (not -1: a full plan)."""
    import asyncio

    from tenacity import wait_none

    from controller.agent.controller_link import follow_plans
    from controller.agent.intent import Plan, PlanSource

    class Stub:
        def __init__(self) -> None:
            self.plan = Plan(PlanSource.CACHED_PLAN, 7, "r")

        def apply_plan(self, plan: Plan) -> None:
            self.plan = plan

    class Port:
        def __init__(self) -> None:
            self.afters: list[int] = []

        async def fetch_plan(self, after: int, wait: float) -> Plan | None:
            self.afters.append(after)
            if len(self.afters) > 2:
                await asyncio.Event().wait()
            return Plan(PlanSource.CONTROLLER, 7 + len(self.afters) - 1, "r")

        async def report(self, report: object) -> None:
            pass

    async def scenario() -> list[int]:
        agent, port = Stub(), Port()
        task = asyncio.create_task(follow_plans(agent, port, 30, backoff=wait_none()))  # type: ignore[arg-type]
        for _ in range(50):
            await asyncio.sleep(0)
        task.cancel()
        return port.afters

    assert asyncio.run(scenario()) == [7, 7, 8]  # confirmed at 7 (now from the controller), then 8


def test_a_vip_swapped_for_another_in_the_same_pass_is_removed_and_added() -> None:
    """Same count of items, same desired state: the shortcuts must still see the removal."""
    fleet, book = synced()
    token = object()
    assert fleet.serve(token) is None  # nothing changed
    base = fleet.generation
    assert book.generation == base
    fleet.specs["vip-x"] = spec_like(GAME, "vip-x", "198.51.100.50/32")
    del fleet.items["vip-0"]
    fleet.items["vip-x"] = PlanItem("vip-x", True, "us-west")
    assert fleet.serve(token) == base + 1
    delta = fleet.body(base)
    assert delta["removed"] == ["vip-0"] and [v["name"] for v in delta["vips"]] == ["vip-x"]
    book.apply(decode_plan_answer(delta, "sjc"))
    assert set(book.entries) == set(fleet.items)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_agent_following_random_changes_through_deltas_holds_the_controllers_plan(seed: int) -> None:
    """Random changes (flags, origins, specs, VIPs added and removed), some generations
    skipped by the agent: after every step its plan is the controller's full plan, byte
    for byte, reached by a delta when one fits and by a full plan otherwise."""
    import random
    rng = random.Random(seed)
    fleet = Fleet(12)
    fleet.serve()
    book = PlanBook("sjc", ALLOWED)
    book.apply(decode_plan_answer(fleet.body(None), "sjc"))
    kinds = {"delta": 0, "full": 0}
    for step in range(300):
        name = rng.choice(sorted(fleet.items))
        roll = rng.random()
        if roll < 0.4:
            fleet.items[name] = dataclasses.replace(fleet.items[name], wanted=not fleet.items[name].wanted,
                                                    explanation=f"step {step}")
        elif roll < 0.6 and name != "api-eu":
            fleet.items[name] = dataclasses.replace(
                fleet.items[name], active_origin=rng.choice(["us-west", "eu-central"]))
        elif roll < 0.75:
            fleet.specs[name] = dict(fleet.specs[name], admin=rng.choice(["up", "drain"]))
        elif roll < 0.85 and len(fleet.items) > 3:
            del fleet.items[name], fleet.specs[name]
        else:
            new = f"vip-n{step}"
            fleet.specs[new] = spec_like(GAME, new, f"198.51.100.{100 + step % 150}/32")
            fleet.items[new] = PlanItem(new, True, "us-west")
        fleet.serve(object() if rng.random() < 0.5 else None)
        if rng.random() < 0.2:
            continue  # the agent misses this generation
        assert book.generation is not None
        answer = decode_plan_answer(fleet.body(book.generation), "sjc")
        try:
            book.apply(answer)
        except NeedFullPlan:
            pytest.fail(f"seed {seed} step {step}: a delta from the controller did not fit")
        kinds["delta" if hasattr(answer, "after") else "full"] += 1
        assert book.full_json() == fleet.store.body("sjc", None), f"seed {seed} step {step}"
    assert kinds["delta"] > 100


def _served_by(fleet: Fleet, client: PlanClient) -> None:
    """The client's requests answered from ``fleet`` (no socket: the unit layer)."""
    async def request(method: str, path: str, timeout: float, body: Any = None,
                      accept: tuple[int, ...] = (200,), signed: bool = False) -> tuple[int, Any]:
        after = int(path.split("after=")[1].split("&")[0]) if "after=" in path else None
        return 200, fleet.body(after)
    client._request = request  # type: ignore[method-assign]


def test_the_agent_caches_a_delta_by_appending_it_and_restarts_on_the_latest_plan(tmp_path: Path) -> None:
    """A change is one line added to plan.deltas, not a rewrite of plan.json; a restart reads
    the whole plan plus its deltas; any damaged delta line voids the cache (a full fetch)."""
    import asyncio

    fleet = Fleet(6)
    fleet.serve()
    client = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    _served_by(fleet, client)
    first = asyncio.run(client.fetch_plan(-1, 0))
    assert first is not None and (tmp_path / "plan.json").exists() and not (tmp_path / "plan.deltas").exists()
    whole = (tmp_path / "plan.json").read_bytes()
    for reason in (PlanReason.BACKEND_DOWN, PlanReason.HEALTHY, PlanReason.CONFIRMING):
        fleet.items["vip-1"] = PlanItem("vip-1", True, "us-west", reason=reason)
        fleet.serve()
        plan = asyncio.run(client.fetch_plan(client.book.generation or 0, 0))
        assert plan is not None and plan.generation == fleet.generation
    assert client.answers["delta"] == 3
    assert (tmp_path / "plan.json").read_bytes() == whole  # never rewritten for a delta
    assert len((tmp_path / "plan.deltas").read_bytes().splitlines()) == 3

    again = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    cached = again.load_cached()
    assert cached is not None and cached.generation == fleet.generation
    assert cached.vips["vip-1"].reason == PlanReason.CONFIRMING and held(again.book) == held(client.book)

    deltas = (tmp_path / "plan.deltas").read_bytes()
    lines = deltas.splitlines(keepends=True)
    for damaged in (deltas[:-5],  # a torn last append
                    lines[0] + lines[2],  # a line lost: the third does not fit
                    deltas.replace(b'"confirming"', b'"healthy"'),  # content altered: the checksum
                    deltas + b"junk\n"):
        (tmp_path / "plan.deltas").write_bytes(damaged)
        fresh = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
        assert fresh.load_cached() is None and fresh.book.generation is None  # fetches a full plan
    # A delta line sealed by someone without this POP's token (a well-formed line, the wrong
    # MAC: what a hand-appended change would be) is refused too, and counted as such.
    forged = b"".join(b"%s %s\n" % (hashlib.sha256(body).hexdigest().encode(), body)
                      for body in (line.rstrip(b"\n").partition(b" ")[2] for line in lines))
    (tmp_path / "plan.deltas").write_bytes(forged)
    fresh = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    assert fresh.load_cached() is None and fresh.refusals["cache_mac"] == 1

    # A full plan (here: a new agent) writes plan.json again and drops the deltas.
    (tmp_path / "plan.deltas").write_bytes(deltas)
    newcomer = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    _served_by(fleet, newcomer)
    assert asyncio.run(newcomer.fetch_plan(-1, 0)) is not None
    assert not (tmp_path / "plan.deltas").exists()
    assert PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED).load_cached() is not None


def test_an_empty_report_delta_keeps_the_last_verdicts_themselves_unless_a_vip_left_the_pop() -> None:
    """The steady state costs no O(VIPs) copy per report; a VIP no longer published still drops out."""
    origins = {"game-global": {"us-west": True}, "api-eu": {"eu-central": True}}
    announced = {"game-global": True, "api-eu": True}
    empty = WireReport(1, {}, {}, 8, 7)
    published = {"game-global": frozenset({"us-west"}), "api-eu": frozenset({"eu-central"})}
    got = apply_report_delta(origins, announced, empty, published)
    assert got[0] is origins and got[1] is announced
    fewer = {"game-global": frozenset({"us-west"})}
    got = apply_report_delta(origins, announced, empty, fewer)
    assert got == ({"game-global": {"us-west": True}}, {"game-global": True})


def test_with_cache_later_a_plan_is_cached_by_cache_plan_only_and_a_restart_finds_the_latest(tmp_path: Path) -> None:
    """The agent's client (``cache_later``): fetch_plan writes nothing, cache_plan writes what
    it returned (a delta as one line, as before). Until then a restart finds the plan before:
    the last one written, whole, never a mix."""
    import asyncio

    fleet = Fleet(6)
    fleet.serve()
    client = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    client.cache_later = True
    _served_by(fleet, client)
    first = asyncio.run(client.fetch_plan(-1, 0))
    assert first is not None and not (tmp_path / "plan.json").exists()
    client.cache_plan()
    assert (tmp_path / "plan.json").exists()
    fleet.items["vip-1"] = PlanItem("vip-1", True, "us-west", reason=PlanReason.BACKEND_DOWN)
    fleet.serve()
    plan = asyncio.run(client.fetch_plan(client.book.generation or 0, 0))
    assert plan is not None and plan.vips["vip-1"].reason == PlanReason.BACKEND_DOWN
    before = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED).load_cached()
    assert before is not None and before.generation == first.generation  # not written yet: the plan before
    client.cache_plan()
    client.cache_plan()  # nothing new: no second line
    assert len((tmp_path / "plan.deltas").read_bytes().splitlines()) == 1
    restarted = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    after = restarted.load_cached()
    assert after is not None and after.generation == plan.generation
    assert after.vips["vip-1"].reason == PlanReason.BACKEND_DOWN and held(restarted.book) == held(client.book)
    # Two answers before one write: the whole plan held now (the first delta was never written).
    for reason in (PlanReason.HEALTHY, PlanReason.CONFIRMING):
        fleet.items["vip-1"] = PlanItem("vip-1", True, "us-west", reason=reason)
        fleet.serve()
        assert asyncio.run(client.fetch_plan(client.book.generation or 0, 0)) is not None
    client.cache_plan()
    latest = PlanClient("http://127.0.0.1:1", "sjc", "x", str(tmp_path), ALLOWED)
    cached = latest.load_cached()
    assert cached is not None and cached.generation == fleet.generation
    assert cached.vips["vip-1"].reason == PlanReason.CONFIRMING and held(latest.book) == held(client.book)
