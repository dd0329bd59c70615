"""Full plan bodies made of pieces shared by the POPs (plans.PlanStore._full, gzipjoin): the
JSON is byte for byte wire.full_body's, the gzip member is one ordinary member, POPs whose
entries are the same share the deflated runs (built once), and a change makes only the runs
it touched again; a GET after a change gets the new body."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import random
import zlib
from typing import Any

import pytest

from controller.policy.model import PlanItem
from controller.server.gzipjoin import Piece, crc32_combine, crc_shift, member
from controller.server import plans
from controller.server.plans import PlanStore, _with_spec
from controller.wire import PlanReason, full_body

from tests.helpers.plan_specs import SPEC

POPS = ("ams", "fra", "sjc")


def fleet(n: int) -> tuple[PlanStore, dict[str, PlanItem], dict[str, dict[str, Any]]]:
    store = PlanStore()
    names = [f"vip-{i:05d}" for i in range(n)]
    specs = {name: {**SPEC, "name": name, "address": f"198.51.{i // 250}.{i % 250}/32"} for i, name in enumerate(names)}
    items = {name: PlanItem(name, True, "us-west", explanation="sees us-west healthy") for name in names}
    return store, items, specs


def serve_all(store: PlanStore, items: dict[str, PlanItem], specs: dict[str, dict[str, Any]],
              pops: tuple[str, ...] = POPS, rev: str = "rev1") -> None:
    for pop in pops:
        pp = store.pops.get(pop)
        store.serve(pop, items, specs, rev, pp.generation if pp else 0)


def one_compressor(store: PlanStore, pop: str) -> bytes:
    """The POP's full plan JSON as wire.full_body makes it from the store's entries."""
    pp = store.pops[pop]
    return full_body(pop, pp.generation, pp.revision, store._digest(pp),
                     (_with_spec(e, store._texts[e.spec_hash]) for _, e in sorted(pp.entries.items())))


def gunzip_strict(body: bytes) -> bytes:
    """One gzip member, as a streaming client reads it (aiohttp: wbits 31): all of it, no rest."""
    d = zlib.decompressobj(31)
    out = d.decompress(body)
    assert d.eof and d.unused_data == b""
    return out


def test_crc32_combine_is_zlibs() -> None:
    rng = random.Random(7)
    for _ in range(300):
        a, b = rng.randbytes(rng.randint(0, 5000)), rng.randbytes(rng.randint(0, 5000))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), crc_shift(len(b))) == zlib.crc32(a + b)


def test_pieces_make_one_gzip_member_of_their_concatenation() -> None:
    rng = random.Random(3)
    raws = [rng.randbytes(rng.randint(0, 300)) + b"entry," * rng.randint(0, 3000) for _ in range(12)]
    body = b"".join(member([*(Piece(r) for r in raws[:-1]), Piece(raws[-1], final=True)]))
    assert gunzip_strict(body) == gzip.decompress(body) == b"".join(raws)


def test_a_full_body_is_full_bodys_json_byte_for_byte() -> None:
    store, items, specs = fleet(3000)
    serve_all(store, items, specs, ("sjc",))
    body, gzipped = store.answer("sjc", None)
    # Runs end after each name whose str hash has the low bits clear: the hash is the process's
    # own (PYTHONHASHSEED), so the count is worked out here, not assumed (about 3000 / 256 runs: about
    # one process in 40 made 10 parts or fewer, PYTHONHASHSEED=1 makes 8, and the test asserted more).
    names = sorted(items)
    cuts = sum(1 for n in names[:-1] if not hash(n) & plans._CUT)
    # (around the runs: gzip's header, the plan's head, its tail, gzip's trailer)
    assert gzipped and len(body.parts) == 4 + cuts + 1
    assert gunzip_strict(bytes(body)) == one_compressor(store, "sjc")
    assert len(body) == len(bytes(body))
    empty = PlanStore()
    empty.serve("sjc", {}, {}, "rev1", 0)
    empty.serve("sjc", {}, {}, "rev2", 0)  # (an empty plan is served once something changes)
    assert json.loads(empty.body("sjc", None))["vips"] == []


def test_pops_with_equal_plans_share_the_pieces_built_once() -> None:
    store, items, specs = fleet(3000)
    serve_all(store, items, specs)
    first, _ = store.answer("ams", None)
    made = store.chunks_made
    bodies = [store.answer(pop, None)[0] for pop in POPS[1:]]
    assert store.chunks_made == made  # no run deflated again
    for body in bodies:
        # the same bytes objects but the POP's own head and the trailer (which has no name in it)
        assert [a is b for a, b in zip(first.parts, body.parts)][2:-2] == [True] * (len(first.parts) - 4)
    for pop in POPS:
        assert gunzip_strict(bytes(store.answer(pop, None)[0])) == one_compressor(store, pop)
        assert json.loads(store.body(pop, None))["pop"] == pop


def test_one_vip_changed_or_missing_at_one_pop_makes_one_run_there() -> None:
    store, items, specs = fleet(3000)
    serve_all(store, items, specs)
    for pop in POPS:
        store.answer(pop, None)
    made = store.chunks_made
    moved = dict(items)
    moved["vip-01234"] = PlanItem("vip-01234", True, "eu-central", reason=PlanReason.BACKEND_DOWN,
                                  explanation="sjc sees us-west down: eu-central")
    store.serve("sjc", moved, specs, "rev1", store.pops["sjc"].generation)
    fewer = {name: item for name, item in items.items() if name != "vip-00042"}
    store.serve("fra", fewer, specs, "rev1", store.pops["fra"].generation)
    for pop in POPS:
        assert gunzip_strict(bytes(store.answer(pop, None)[0])) == one_compressor(store, pop)
    assert store.chunks_made == made + 2
    assert json.loads(store.body("fra", None))["vips"][42]["name"] == "vip-00043"


def test_a_full_get_after_a_change_gets_the_new_body() -> None:
    store, items, specs = fleet(600)
    serve_all(store, items, specs)
    before = {pop: store.answer(pop, None)[0] for pop in POPS}
    assert store.answer("sjc", None)[0] is before["sjc"]  # (once per generation)
    specs = dict(specs)
    specs["vip-00007"] = dict(specs["vip-00007"], admin="drain")
    items = dict(items)
    items["vip-00008"] = dataclasses.replace(items["vip-00008"], drain=True, reason=PlanReason.DRAINING)
    serve_all(store, items, specs, rev="rev2")
    for pop in POPS:
        body, _ = store.answer(pop, None)
        assert body is not before[pop]
        plan = json.loads(gunzip_strict(bytes(body)))
        by_name = {v["name"]: v for v in plan["vips"]}
        assert plan["revision"] == "rev2" and plan["generation"] == store.pops[pop].generation
        assert by_name["vip-00007"]["spec"]["admin"] == "drain" and by_name["vip-00008"]["drain"] is True
        assert gunzip_strict(bytes(body)) == one_compressor(store, pop)


def test_pieces_no_body_holds_are_forgotten() -> None:
    store, items, specs = fleet(2000)
    serve_all(store, items, specs, ("sjc",))
    store.answer("sjc", None)
    held = len(store._chunks)
    for k in range(3):
        items = {name: dataclasses.replace(item, explanation=f"pass {k}") for name, item in items.items()}
        serve_all(store, items, specs, ("sjc",))
        store.answer("sjc", None)
    assert len(store._chunks) == held  # (the pieces of older generations' bodies: gone)


@pytest.mark.parametrize("seed", [1, 2, int.from_bytes(os.urandom(4), "big")])
def test_random_plans_gzip_to_full_bodys_json(seed: int) -> None:
    rng = random.Random(seed)
    store, items, specs = fleet(1500)
    for _ in range(30):
        for pop in POPS:
            mine = {name: item if rng.random() > 0.01 else dataclasses.replace(item, explanation=f"{pop} {rng.random()}")
                    for name, item in items.items() if rng.random() > 0.002}
            pp = store.pops.get(pop)
            store.serve(pop, mine, specs, "rev", pp.generation if pp else 0)
            if rng.random() < 0.5:
                assert gunzip_strict(bytes(store.answer(pop, None)[0])) == one_compressor(store, pop), seed


class CountingView(collections.ChainMap):  # type: ignore[type-arg]
    """A held POP's spec view (the controller's ChainMap of the base's few definitions over
    the spec dict), counting its lookups."""

    lookups = 0

    def __getitem__(self, key: str) -> Any:
        CountingView.lookups += 1
        return super().__getitem__(key)


def test_a_held_pop_served_after_a_one_vip_change_looks_at_that_vip_not_every_one() -> None:
    store, items, specs = fleet(2000)
    serve_all(store, items, specs)
    old = specs["vip-00001"]
    new_specs = dict(specs)
    new_specs["vip-00001"] = dict(old, admin="drain")
    new_specs["vip-00002"] = dict(specs["vip-00002"], admin="drain")
    # sjc's wave has not come: vip-00001 stays as the base defines it there; vip-00002 moves
    held = CountingView({"vip-00001": old}, new_specs)
    CountingView.lookups = 0
    store.serve("sjc", items, held, "rev2", store.pops["sjc"].generation)
    assert CountingView.lookups < 10  # (main: every VIP, 2000)
    plan = {v["name"]: v for v in json.loads(store.body("sjc", None))["vips"]}
    assert "admin" not in plan["vip-00001"]["spec"] or plan["vip-00001"]["spec"]["admin"] != "drain"
    assert plan["vip-00002"]["spec"]["admin"] == "drain"
    # the wave comes: the plain dict again, vip-00001's new definition served
    store.serve("sjc", items, new_specs, "rev2", store.pops["sjc"].generation)
    plan = {v["name"]: v for v in json.loads(store.body("sjc", None))["vips"]}
    assert plan["vip-00001"]["spec"]["admin"] == "drain"
    # and served again from a new view over the same dict: nothing moves
    assert store.serve("sjc", items, CountingView({}, new_specs), "rev2", store.pops["sjc"].generation) is None
