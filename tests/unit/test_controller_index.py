"""The controller's desired-state index (core.index) updated from the previous one equals the
index built from scratch, over long random sequences of commits (a randomized differential
test: the update looks only at the VIPs whose definition changed and copies only the POP
mappings whose entries change)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from controller.config.desired_model import DesiredState, FleetVip, PopSpec, changed_vips, common_ends
from controller.server.core import index
from tests.helpers.seeds import with_clock_seed
from tests.helpers.random_fleet import BASE, POPS
from tests.helpers.random_fleet import random_commit as engine_commit

STEPS = 1500


def _vip(i: int, rng: random.Random, everywhere: bool = False) -> FleetVip:
    """``everywhere``: published at every POP (the POPs share one mapping until a commit
    makes theirs differ; a VIP added at all of them is one copy shared by all)."""
    template = BASE.vips[i % len(BASE.vips)]
    publish = POPS if everywhere else tuple(rng.sample(POPS, rng.randint(1, len(POPS))))
    return FleetVip(dataclasses.replace(template.vip, name=f"v{i:02d}"), publish, rng.random() > 0.1, template.policy)


def _commit(d: DesiredState, rng: random.Random, spare: list[FleetVip]) -> DesiredState:
    """The engine test's commits (enabled, publish lists, origin order, removals, additions),
    and what the index has besides: fewer regions, an equal re-read, the POP inventory."""
    kind = rng.choice(("engine", "engine", "engine", "regions", "equal", "pops", "stale", "shuffle"))
    if kind == "engine":
        return engine_commit(d, rng, spare, rng.randrange(1_000_000))
    vips = list(d.vips)
    pops = d.pops
    k = rng.randrange(len(vips))
    fv = vips[k]
    if kind == "regions" and len(fv.vip.origins) > 1:  # fewer regions: the entries change
        vips[k] = dataclasses.replace(fv, vip=dataclasses.replace(fv.vip, origins=fv.vip.origins[:-1]))
    elif kind == "stale":  # another report_stale_after (the index keeps the shortest)
        safety = dataclasses.replace(fv.policy.safety, report_stale_after=rng.choice((30.0, 60.0, 120.0, 600.0)))
        vips[k] = dataclasses.replace(fv, policy=dataclasses.replace(fv.policy, safety=safety))
    elif kind == "shuffle":  # another order: the common head and tail are short
        rng.shuffle(vips)
    elif kind == "equal":  # an equal definition in a new object (a reload that re-read the entry)
        vips[k] = dataclasses.replace(fv)
    elif kind == "pops":  # the POP inventory: one POP more or less (its VIPs stay as they are)
        names = [p.name for p in pops]
        pop = rng.choice(POPS)
        names = [n for n in names if n != pop] if pop in names and len(names) > 1 else [*names, pop]
        pops = tuple(PopSpec(n, "0" * 64) for n in names)
    return dataclasses.replace(d, revision=f"r{rng.random()}", pops=pops, vips=tuple(vips))


def _run(seed: int, everywhere: bool = False) -> int:
    rng = random.Random(seed)
    spare: list[FleetVip] = [_vip(100 + i, rng, everywhere) for i in range(4)]
    d = dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS),
                            vips=tuple(_vip(i, rng, everywhere) for i in range(12)))
    ix = index(d)
    kept = 0
    for step in range(STEPS):
        new = _commit(d, rng, spare)
        updated = index(new, ix)
        fresh = index(new)
        where = f"seed {seed}, step {step}"
        assert updated.by_pop == fresh.by_pop, where
        assert (updated.names, updated.fleet, updated.stale_after, updated.all_enabled) == (
            fresh.names, fresh.fleet, fresh.stale_after, fresh.all_enabled), where
        # A POP whose entries are the same keeps its mapping object (the report handler's
        # body limit and validation are keyed on it); a POP whose entries changed gets a new one.
        for pop, mapping in updated.by_pop.items():
            before = ix.by_pop.get(pop)
            if before is not None and before == mapping:
                assert mapping is before, (where, pop)
                kept += 1
            elif before is not None:
                assert mapping is not before, (where, pop)
        d, ix = new, updated
    return kept


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("everywhere", [False, True])
def test_the_index_updated_from_the_previous_one_equals_the_index_built_from_scratch(seed: int,
                                                                                    everywhere: bool) -> None:
    assert _run(seed, everywhere) > STEPS  # (most POPs keep their mapping through most commits)


def test_the_index_updated_from_the_previous_one_equals_the_index_built_from_scratch_seed_from_the_clock() -> None:
    with_clock_seed(lambda seed: _run(seed, seed % 2 == 0))


def test_a_changed_publish_list_copies_the_mapping_of_the_pops_it_changes_only() -> None:
    """One VIP loses one POP: that POP's mapping is new, every other POP keeps its object."""
    d = dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS),
                            vips=tuple(FleetVip(dataclasses.replace(BASE.vips[0].vip, name=f"v{i}"), POPS, True,
                                                BASE.vips[0].policy) for i in range(3)))
    ix = index(d)
    fewer = dataclasses.replace(d.vips[1], publish=POPS[1:])
    after = index(dataclasses.replace(d, vips=(d.vips[0], fewer, d.vips[2])), ix)
    assert "v1" not in after.by_pop[POPS[0]] and "v1" in after.by_pop[POPS[1]]
    assert after.by_pop[POPS[0]] is not ix.by_pop[POPS[0]]
    assert all(after.by_pop[p] is ix.by_pop[p] for p in POPS[1:])


def test_a_vip_added_at_every_pop_is_one_new_mapping_shared_by_them() -> None:
    d = dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS),
                            vips=tuple(_vip(i, random.Random(i), everywhere=True) for i in range(3)))
    ix = index(d)
    assert len({id(m) for m in ix.by_pop.values()}) == 1
    after = index(dataclasses.replace(d, vips=(*d.vips, _vip(7, random.Random(7), everywhere=True))), ix)
    assert len({id(m) for m in after.by_pop.values()}) == 1 and "v07" in after.by_pop[POPS[0]]
    assert after.by_pop == index(after.desired).by_pop


def _changed_by_name(old: tuple[FleetVip, ...], new: tuple[FleetVip, ...]) -> set[str]:
    """What changed_vips says, by two name -> VIP maps (the reference)."""
    before, after = {fv.name: fv for fv in old}, {fv.name: fv for fv in new}
    return {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_changed_vips_says_what_comparing_by_name_says(seed: int) -> None:
    """The blast radius walks only the VIPs changed_vips names: it must miss none (a
    withdrawal it missed would skip the budget and the waves)."""
    rng = random.Random(seed)
    spare: list[FleetVip] = []
    d = dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS),
                            vips=tuple(_vip(i, rng) for i in range(12)))
    for step in range(STEPS):
        new = _commit(d, rng, spare)
        if rng.random() < 0.1:  # a reordered file: the same VIPs elsewhere
            vips = list(new.vips)
            rng.shuffle(vips)
            new = dataclasses.replace(new, vips=tuple(vips))
        assert changed_vips(d.vips, new.vips) == _changed_by_name(d.vips, new.vips), (seed, step)
        # what Controller.blast_radius asks: of the middles between the common head and tail only
        head, tail = common_ends(d.vips, new.vips)
        middles = d.vips[head:len(d.vips) - tail], new.vips[head:len(new.vips) - tail]
        assert changed_vips(*middles) == _changed_by_name(d.vips, new.vips), (seed, step)
        assert {fv.name for fv in d.vips[:head] + d.vips[len(d.vips) - tail:]}.isdisjoint(changed_vips(*middles))
        d = new
