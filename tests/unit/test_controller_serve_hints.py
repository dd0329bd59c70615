"""Serving with hints (PlanStore.serve looks at the VIPs the passes since a POP's last serve
changed, not at every VIP of the POP) serves exactly what serving without them does: two
controllers fed the same random sequence of reports, commits (withdrawals and moves that roll
out in waves, held views), drains and time, one with ``hints`` off, hold the same plans at
every POP after every step: entries, generations, digests."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from controller.config.desired_model import FleetVip, PopSpec
from controller.config.serialize import vip_to_dict
from controller.server.core import Controller
from controller.server.plans import as_spec_json
from tests.helpers.random_fleet import BASE, POPS, World, random_commit, random_vip
from tests.helpers.seeds import with_clock_seed

STEPS = 400


def _served(ctl: Controller) -> dict[str, object]:
    return {pop: (pp.generation, pp.digest, pp.wanted,
                  {name: (e.item, e.spec_hash) for name, e in pp.entries.items()})
            for pop, pp in ctl.served.items()}


def _run(seed: int, tmp: Path) -> int:
    rng = random.Random(seed)
    vips = tuple(random_vip(i, rng) for i in range(14))
    change = dataclasses.replace(BASE.change, bake=rng.choice((0.0, 3.0)), max_withdraw_fraction=1.0,
                                 max_removed_vips=20)
    desired = dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS), vips=vips, change=change)
    now = [1000.0]
    ctls = [Controller(dataclasses.replace(desired, state_dir=str(tmp / f"{seed}-{hints}")), clock=lambda: now[0],
                       hints=hints) for hints in (True, False)]
    world = World(rng)
    spare: list[FleetVip] = []
    hinted = 0
    for step in range(STEPS):
        now[0] += rng.choice((0.05, 0.2, 0.5, 1.0, 2.0, 4.0))
        for pop in POPS:
            if rng.random() < world.chatty[pop] * 0.4:
                report = world.report(pop, ctls[0].desired, now[0])
                for ctl in ctls:
                    ctl.reports[pop] = report
        if rng.random() < 0.02:
            pop = rng.choice(POPS)
            for ctl in ctls:
                if pop in ctl.persisted.drains:
                    ctl.undrain(pop)
                else:
                    ctl.drain(pop)
        if rng.random() < 0.12:
            desired = random_commit(desired, rng, spare, step)
            if rng.random() < 0.1:  # another order of the same VIPs (short common head and tail)
                desired = dataclasses.replace(desired, vips=tuple(rng.sample(desired.vips, len(desired.vips))))
            for ctl in ctls:
                ctl.apply_config(dataclasses.replace(desired, state_dir=ctl.desired.state_dir))
        for ctl in ctls:
            ctl.replan()
        assert _served(ctls[0]) == _served(ctls[1]), f"seed {seed}, step {step}"
        # the spec dicts, updated at the VIPs a commit changed, are those made from scratch
        assert ctls[0]._spec_dicts[0] is ctls[0].desired
        assert ctls[0]._spec_dicts[1] == {fv.name: as_spec_json(vip_to_dict(fv.vip)) for fv in ctls[0].desired.vips}, (
            f"seed {seed}, step {step}")
        hinted += bool(ctls[0]._since_served)
    for ctl in ctls:
        ctl.close()
    return hinted


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_serving_with_hints_serves_what_serving_without_them_does(seed: int, tmp_path: Path) -> None:
    assert _run(seed, tmp_path) > STEPS // 2  # (the hints were there to be used)


def test_serving_with_hints_serves_what_serving_without_them_does_seed_from_the_clock(tmp_path: Path) -> None:
    with_clock_seed(lambda seed: _run(seed, tmp_path))
