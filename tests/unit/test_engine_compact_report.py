"""engine.compact_report's verdicts interned per distinct object (``_interned_values``)
against the per-VIP loop it replaced (the reference below): the same mapping, in the same
order, every value the one interned object of its verdicts, over random reports (objects
shared as the wire's decoder shares them, equal ones in new dicts, read-only views)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from types import MappingProxyType

import pytest

from controller.policy import engine
from controller.policy.engine import compact_report
from controller.policy.model import PopReport
from tests.helpers.seeds import with_clock_seed

REGIONS = ("us-west", "us-east", "eu-central")


def _reference(received: Mapping[str, Mapping[str, bool | None]],
               before: Mapping[str, Mapping[str, bool | None]]) -> dict[str, Mapping[str, bool | None]]:
    """The per-VIP loop compact_report had: the previous report's object where equal, else
    one interned object per distinct set."""
    origins: dict[str, Mapping[str, bool | None]] = {}
    for vip, verdicts in received.items():
        old = before.get(vip)
        if old is not None and (old is verdicts or old == verdicts):
            origins[vip] = old
            continue
        origins[vip] = engine._intern(verdicts)
    return origins


def _verdicts(rng: random.Random) -> dict[str, bool | None]:
    return {r: rng.choice((True, True, False, None)) for r in rng.sample(REGIONS, rng.randint(0, 3))}


def _run(seed: int) -> None:
    rng = random.Random(seed)
    previous: dict[str, PopReport | None] = {"sjc": None, "fra": None}
    for step in range(400):
        pop = rng.choice(("sjc", "fra"))
        shared = [_verdicts(rng) for _ in range(rng.randint(1, 4))]
        origins: dict[str, Mapping[str, bool | None]] = {}
        for i in range(rng.randint(0, 100)):
            v = rng.choice(shared)
            kind = rng.random()
            origins[f"v{rng.randrange(200):03d}"] = (v if kind < 0.6 else dict(v) if kind < 0.8
                                                    else MappingProxyType(dict(v)) if kind < 0.9 else _verdicts(rng))
        if rng.random() < 0.01:
            engine._INTERNED.clear()  # (the bound's clear: the previous report's objects are no longer the interned ones)
        before = previous[pop]
        want = _reference(origins, before.origins if before is not None else {})
        got = compact_report(PopReport(pop, float(step), 1, origins), before)
        where = (seed, step)
        assert list(got.origins.items()) == list(want.items()) or (
            before is not None and got.origins is before.origins and before.origins == origins), where
        for v in got.origins.values():
            assert v is engine._INTERNED.get(tuple(v.items()), v) or before is not None, where
        assert type(got.origins) is dict or got.origins is (before.origins if before else None), where
        previous[pop] = got


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compact_report_keeps_what_the_per_vip_loop_kept(seed: int) -> None:
    _run(seed)


def test_compact_report_keeps_what_the_per_vip_loop_kept_seed_from_the_clock() -> None:
    with_clock_seed(_run)


def test_a_report_of_shared_verdicts_is_interned_by_its_objects_alone() -> None:
    """The decoder's shared objects become the interned ones: the next POP's report with the
    same objects needs no new dict values (each value the same object as before)."""
    up, down = {"us-west": True, "eu-central": True}, {"us-west": False, "eu-central": True}
    a = compact_report(PopReport("sjc", 0.0, 1, {f"v{i}": (down if i % 7 == 0 else up) for i in range(100)}), None)
    b = compact_report(PopReport("fra", 0.0, 1, {f"v{i}": (down if i % 5 == 0 else up) for i in range(100)}), None)
    assert a.origins["v1"] is b.origins["v1"] and a.origins["v0"] is b.origins["v0"]
    assert a.origins["v7"] == down and b.origins["v5"] == down and b.origins["v7"] == up
