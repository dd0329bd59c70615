"""The journal after a cold start: each VIP's default memory at its POPs is written per VIP
(``store.Changes.pop_defaults``), not pair by pair, and what a restart reads back (the
journal replayed, the snapshots) is the engine's memory after every pass. Random reports,
silences, drains and publish-list edits, fixed seeds plus one from the clock."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from bench.controller_scale import generate
from controller.config.desired import load_desired
from controller.config.desired_model import ChangePolicy, DesiredState
from controller.policy.model import PopReport
from controller.server import store
from controller.server.core import Controller
from tests.helpers.seeds import with_clock_seed

VIPS, POPS = 24, 5


def _desired(tmp: Path) -> DesiredState:
    generate(tmp / "desired", VIPS, POPS)
    d = load_desired(str(tmp / "desired"), "rev1")
    return dataclasses.replace(d, state_dir=str(tmp / "state"))


def _lines(state_dir: Path) -> list[dict[str, object]]:
    out = []
    for path in sorted(state_dir.glob("journal-*.jsonl")):
        for line in path.read_bytes().splitlines():
            out.append(json.loads(line.partition(b" ")[2]))
    return out


def _report(desired: DesiredState, pop: str, at: float, rng: random.Random) -> PopReport:
    origins = {}
    for fv in desired.vips:
        regions = [o.region for o in fv.vip.origins]
        origins[fv.name] = {r: (rng.random() > 0.15 if i == 0 else True) for i, r in enumerate(regions)}
    return PopReport(pop, at, 1, origins, {name: True for name in origins})


def test_a_cold_starts_first_lines_hold_each_vips_default_not_one_entry_per_pair(tmp_path: Path) -> None:
    """The start's pass (no reports: NEW at every pair) and the first reports' pass (STEADY
    at every pair) each write the VIPs' defaults by group; no pair is listed on its own."""
    desired = _desired(tmp_path)
    now = [1000.0]
    ctl = Controller(desired, clock=lambda: now[0])
    first = _lines(tmp_path / "state")
    assert len(first) == 1
    doc = first[0]
    assert doc["pop_vips"] == [] and doc["steady"] == {} and doc["unseen"] == {} and doc["removed"] == {}
    assert [(g["memory"], len(g["pops"]), len(g["vips"])) for g in doc["defaults"]] == [  # type: ignore[index, union-attr]
        ("unseen", POPS, VIPS)]
    for pop in desired.pops:  # every POP's first report: every origin healthy
        ctl.reports[pop.name] = PopReport(pop.name, now[0], 1, {fv.name: {o.region: True for o in fv.vip.origins}
                                                                for fv in desired.vips},
                                          {fv.name: True for fv in desired.vips})
    ctl.replan()
    second = _lines(tmp_path / "state")[-1]
    assert second["pop_vips"] == [] and second["steady"] == {} and second["unseen"] == {}
    assert [(g["memory"], len(g["pops"]), len(g["vips"])) for g in second["defaults"]] == [  # type: ignore[index, union-attr]
        ("steady", POPS, VIPS)]
    ctl.close()
    assert store.load(str(tmp_path / "state")).planner == ctl.persisted.planner


def _run(seed: int, tmp: Path, steps: int) -> None:
    rng = random.Random(seed)
    tmp = tmp / str(seed)
    desired = _desired(tmp)
    now = [1000.0]
    journal = store.FileJournal(desired.state_dir, compact_min_bytes=rng.choice((1, 1 << 20)), background=True)
    ctl = Controller(desired, clock=lambda: now[0], state_store=journal)
    ctl.base = dataclasses.replace(ctl.base, change=ChangePolicy(max_withdraw_fraction=1.0, bake=0.0))
    pops = [p.name for p in desired.pops]
    for step in range(steps):
        r = rng.random()
        if r < 0.55:
            for pop in rng.sample(pops, rng.randint(1, len(pops))):
                ctl.add_report(_report(ctl.desired, pop, now[0], rng))
        elif r < 0.65:
            now[0] += rng.choice((5.0, 60.0, 4000.0))  # (4000 s: every report stale)
            ctl.replan()
        elif r < 0.75:
            pop = rng.choice(pops)
            if not ctl.drain(pop):
                ctl.undrain(pop)
        elif r < 0.85:  # a VIP's publish list loses or regains POPs
            i = rng.randrange(len(ctl.desired.vips))
            fv = ctl.desired.vips[i]
            publish = tuple(p for p in pops if rng.random() < 0.7) or (pops[0],)
            vips = ctl.desired.vips[:i] + (dataclasses.replace(fv, publish=publish),) + ctl.desired.vips[i + 1:]
            ctl.apply_config(dataclasses.replace(ctl.desired, revision=f"rev{step + 2}", vips=vips))
        else:
            now[0] += rng.random() * 3
            ctl.replan()
        back = store.load(desired.state_dir)
        assert back.planner == ctl.persisted.planner, f"seed {seed}, step {step}"
        assert back.drains == ctl.persisted.drains, f"seed {seed}, step {step}"
    ctl.close()
    back = store.load(desired.state_dir)
    assert back.planner == ctl.persisted.planner, f"seed {seed}, at the end"


@pytest.mark.parametrize("seed", [1, 2, 3, 20261203])
def test_what_a_restart_reads_back_is_the_memory_after_every_pass(tmp_path: Path, seed: int) -> None:
    _run(seed, tmp_path, 60)


def test_what_a_restart_reads_back_is_the_memory_with_a_seed_from_the_clock(tmp_path: Path) -> None:
    with_clock_seed(lambda seed: _run(seed, tmp_path, 60))
