"""The controller's first index (core.index from scratch: POP -> published VIP -> regions),
made per distinct publish list, equals the index the per-pair loop made before it (the
reference below, the code it replaced), key order and all, over random desired states: many
VIPs sharing publish lists, POPs named twice, POPs outside the inventory, a name used twice,
VIPs with fewer regions."""

from __future__ import annotations

import dataclasses
import random

import pytest

from controller.config.desired_model import DesiredState, FleetVip, PopSpec
from controller.server.core import index
from tests.helpers.random_fleet import BASE, POPS
from tests.helpers.seeds import with_clock_seed


def _reference_by_pop(d: DesiredState) -> dict[str, dict[str, frozenset[str]]]:
    """The first index's mappings as the per-pair loop made them (with its sharing step)."""
    by_pop: dict[str, dict[str, frozenset[str]]] = {}
    region_sets: dict[frozenset[str], frozenset[str]] = {}
    for fv in d.vips:
        name = fv.vip.name
        regions = frozenset(o.region for o in fv.vip.origins)
        regions = region_sets.setdefault(regions, regions)
        for pop in fv.publish:
            by_pop.setdefault(pop, {})[name] = regions
    known = {p.name for p in d.pops}
    for pop in known - by_pop.keys():
        by_pop[pop] = {}
    for pop in [p for p in by_pop if p not in known and not by_pop[p]]:
        del by_pop[pop]
    distinct: dict[int, list[dict[str, frozenset[str]]]] = {}
    for pop in by_pop:
        mapping = by_pop[pop]
        same = distinct.setdefault(len(mapping), [])
        by_pop[pop] = next((m for m in same if m is mapping or m == mapping), mapping)
        if by_pop[pop] is mapping and len(same) < 2:
            same.append(mapping)
    return by_pop


def _desired(rng: random.Random) -> DesiredState:
    pops = POPS + ("lhr", "syd", "jnb")
    lists = [tuple(rng.sample(pops, rng.randint(1, len(pops)))) for _ in range(rng.randint(1, 6))]
    vips = []
    for i in range(rng.randint(0, 60)):
        template = BASE.vips[rng.randrange(len(BASE.vips))]
        vip = template.vip
        if len(vip.origins) > 1 and rng.random() < 0.2:
            vip = dataclasses.replace(vip, origins=vip.origins[:-1])
        name = f"v{rng.randrange(i + 1) if rng.random() < 0.05 else i:03d}"  # sometimes a name again
        publish = rng.choice(lists) if rng.random() < 0.8 else tuple(rng.sample(pops, rng.randint(1, len(pops))))
        if rng.random() < 0.05:
            publish = (*publish, publish[0])  # a POP named twice
        vips.append(FleetVip(dataclasses.replace(vip, name=name), publish, rng.random() > 0.1, template.policy))
    inventory = tuple(PopSpec(p, "0" * 64) for p in rng.sample(pops, rng.randint(1, len(pops))))
    return dataclasses.replace(BASE, pops=inventory, vips=tuple(vips))


def _run(seed: int) -> None:
    rng = random.Random(seed)
    for step in range(300):
        d = _desired(rng)
        got, want = index(d).by_pop, _reference_by_pop(d)
        where = f"seed {seed}, step {step}"
        assert list(got) == list(want), where
        for pop, mapping in want.items():
            assert list(got[pop].items()) == list(mapping.items()), (where, pop)
        # POPs that shared a mapping still do (the report handler keys its checks on it)
        for a in want:
            for b in want:
                if want[a] is want[b]:
                    assert got[a] is got[b], (where, a, b)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_first_index_equals_the_per_pair_one(seed: int) -> None:
    _run(seed)


def test_the_first_index_equals_the_per_pair_one_seed_from_the_clock() -> None:
    with_clock_seed(_run)
