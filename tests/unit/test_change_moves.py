"""Config changes that only move traffic (origin order, next hops, BGP attributes, steering)
roll out in waves like withdrawals (policy/change.py), and a wave's gate judges only what the
wave did: pure tables, then inside the controller with a fake clock. What each test KEEPS:
the POPs whose wave has not come keep the base's routing and definition."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from controller.config.desired import load_desired
from controller.config.desired_model import ChangePolicy, DesiredState, FleetVip, Preference, Steering
from controller.config.model import Attributes
from controller.policy import change
from controller.policy.change import GateResult, NewRevision, Phase, Rollout, Verdict, step
from controller.policy.model import PlanItem, PopReport
from controller.server.core import Controller
from tests.helpers.change_gate import controller, healthy

ROOT = Path(__file__).resolve().parents[2]
BASE = load_desired(str(ROOT / "configs" / "controller"), "rev1")
POLICY = ChangePolicy(bake=10.0)
GAME_POPS = {"sjc", "fra", "sin"}


def vip(d: DesiredState, name: str) -> FleetVip:
    fv = d.vip(name)
    assert fv is not None
    return fv


def revised(d: DesiredState, revision: str, name: str, **kw: object) -> DesiredState:
    """``d`` with VIP ``name`` replaced by ``kw`` (FleetVip fields; ``vip_fields``: Vip fields)."""
    vip_fields = kw.pop("vip_fields", {})
    assert isinstance(vip_fields, dict)
    fv = vip(d, name)
    new = dataclasses.replace(fv, vip=dataclasses.replace(fv.vip, **vip_fields), **kw)  # type: ignore[arg-type]
    return dataclasses.replace(d, revision=revision, vips=tuple(new if v.name == name else v for v in d.vips))


def reordered(d: DesiredState, revision: str = "rev2") -> DesiredState:
    """game-global's origins the other way round: eu-central first."""
    return revised(d, revision, "game-global", vip_fields={"origins": tuple(reversed(vip(d, "game-global").vip.origins))})


def with_med(d: DesiredState, med: int, revision: str = "rev2") -> DesiredState:
    fv = vip(d, "game-global")
    attrs = dataclasses.replace(fv.vip.attributes, up=dataclasses.replace(fv.vip.attributes.up, med=med))
    return revised(d, revision, "game-global", vip_fields={"attributes": attrs})


def radius_of(old: DesiredState, new: DesiredState) -> change.BlastRadius:
    announced = change.pairs(old)
    return change.blast_radius(announced, announced, new, before=old.vips)


# --- which changes move traffic -------------------------------------------------------------------
def test_what_counts_as_moving_traffic_and_what_goes_at_once() -> None:
    game = {("game-global", p) for p in GAME_POPS}
    assert set(radius_of(BASE, reordered(BASE)).moved) == game  # origin order
    assert set(radius_of(BASE, with_med(BASE, 50)).moved) == game  # an attribute
    origins = vip(BASE, "game-global").vip.origins
    hop = (dataclasses.replace(origins[0], next_hop=origins[1].next_hop), origins[1])
    assert set(radius_of(BASE, revised(BASE, "r", "game-global", vip_fields={"origins": hop})).moved) == game
    weights = Steering(weights=(("us-west", 3), ("eu-central", 1)))
    assert set(radius_of(BASE, revised(BASE, "r", "game-global", steering=weights)).moved) == game
    # Trivially safe, applied at once: a new VIP, a POP added to a publish list, planner policy alone.
    new_vip = dataclasses.replace(vip(BASE, "api-eu"), vip=dataclasses.replace(vip(BASE, "api-eu").vip, name="api-2"))
    added = dataclasses.replace(BASE, revision="r", vips=BASE.vips + (new_vip,))
    more = revised(BASE, "r", "api-eu", publish=("fra", "sjc", "sin"))
    policy = revised(BASE, "r", "api-eu", policy=dataclasses.replace(
        vip(BASE, "api-eu").policy, failover=dataclasses.replace(vip(BASE, "api-eu").policy.failover, quorum=0.9)))
    for safe in (added, more, policy):
        r = radius_of(BASE, safe)
        assert (r.moved, r.withdrawn) == ((), ())
        s, effects = step(Rollout(base="rev1", target="rev1"), NewRevision("r", r, ()), 1.0, POLICY)
        assert (s.phase, s.base) == (Phase.STEADY, "r") and effects[0].kind is change.EffectKind.APPLIED


def test_a_move_rolls_out_in_waves_and_is_never_held_by_the_withdraw_budget() -> None:
    r = radius_of(BASE, reordered(BASE))  # 3 of 5 pairs moved: 60 % > 25 %, but nothing withdrawn
    s, effects = step(Rollout(base="rev1", target="rev1"), NewRevision("rev2", r, (("sin",), ("fra",), ("sjc",))),
                      1.0, POLICY)
    assert (s.phase, set(s.rolled()), s.move) == (Phase.ROLLING, {"sin"}, ("game-global",))
    assert effects[0].kind is change.EffectKind.WAVE and "rolls out at sin" in effects[0].text
    assert "moves the traffic of 3" in s.detail
    assert change.from_json(json.loads(json.dumps(change.to_json(s)))) == s


def test_pops_whose_wave_has_not_come_keep_the_base_routing_and_definition() -> None:
    target = reordered(BASE)
    s, _ = step(Rollout(base="rev1", target="rev1"),
                NewRevision("rev2", radius_of(BASE, target), (("sin",), ("fra",), ("sjc",))), 1.0, POLICY)
    staged = vip(change.effective(BASE, target, s), "game-global")
    assert staged.vip == vip(target, "game-global").vip  # the target's definition, planned...
    pref = staged.steering.preference("fra")
    assert pref is not None and pref.origins == ("us-west", "eu-central")  # ...with fra and sjc routed as before
    assert staged.steering.preference("sjc") == pref and staged.steering.preference("sin") is None
    held = change.held_specs(BASE, s)
    assert set(held) == {"fra", "sjc"} and held["fra"]["game-global"] == vip(BASE, "game-global").vip
    done = dataclasses.replace(s, wave=2)
    assert vip(change.effective(BASE, target, done), "game-global") is vip(target, "game-global")
    assert change.held_specs(BASE, done) == {}


def test_a_weight_change_on_an_order_it_keeps_moves_with_the_last_wave() -> None:
    """Steering keys a route by its origin order: two weight sets on one order cannot be
    planned side by side, so such a VIP keeps the base's definition while any POP is held."""
    old = revised(BASE, "rev1", "game-global", steering=Steering(weights=(("us-west", 1), ("eu-central", 1))))
    new = revised(old, "rev2", "game-global", steering=Steering(weights=(("us-west", 3), ("eu-central", 1))))
    staged = change.staged_vip(vip(old, "game-global"), vip(new, "game-global"), frozenset({"fra"}))
    assert staged.steering == vip(old, "game-global").steering and staged.vip == vip(old, "game-global").vip
    # With its own preferences: a held POP keeps its preference's order and weights.
    pref = Preference(("sin",), ("eu-central", "us-west"), (("eu-central", 2), ("us-west", 1)))
    old = revised(BASE, "rev1", "game-global", steering=Steering(preferences=(pref,)))
    new = revised(old, "rev2", "game-global", steering=Steering())
    staged = change.staged_vip(vip(old, "game-global"), vip(new, "game-global"), frozenset({"sin"}))
    assert staged.steering.preferences == (pref,)
    assert change.staged_vip(vip(old, "game-global"), vip(new, "game-global"), frozenset({"fra"})).steering == Steering()


# --- the gate judges what the wave did (pure) -------------------------------------------------------
def report(pop: str, at: float, generation: int, origins: Mapping[str, Mapping[str, bool]],
           announced: Mapping[str, bool] | None = None) -> PopReport:
    return PopReport(pop, at, generation, origins, announced if announced is not None else {v: True for v in origins})


def test_a_vip_unhealthy_at_the_wave_pop_before_the_wave_fails_no_gate() -> None:
    s, _ = step(Rollout(base="rev1", target="rev1"),
                NewRevision("rev2", radius_of(BASE, reordered(BASE)), (("fra",), ("sin", "sjc"))), 0.0, POLICY)
    down = {"api-eu": {"eu-central": False, "us-west": False}, "game-global": {"us-west": True, "eu-central": True}}
    items = {("fra", "api-eu"): PlanItem("api-eu", True, "eu-central"),
             ("fra", "game-global"): PlanItem("game-global", True, "us-west")}

    def item(pop: str, name: str) -> PlanItem | None:
        return items.get((pop, name))

    before = {"fra": report("fra", 0.0, 1, down)}
    excused = change.excused(s, BASE, before, item, 0.0, 15.0)
    assert excused == (("api-eu", "fra"),)  # game-global was healthy there: not excused
    after = {"fra": report("fra", 5.0, 2, down)}
    blind = change.gate(s, POLICY, 5.0, BASE, after, {"fra": 2}, 15.0, item)
    assert blind.verdict is Verdict.FAIL and "every origin of api-eu down" in blind.detail  # without the baseline
    judged = dataclasses.replace(s, excused=excused)
    assert change.gate(judged, POLICY, 5.0, BASE, after, {"fra": 2}, 15.0, item).verdict is Verdict.WAIT
    after = {"fra": report("fra", 10.5, 2, down)}
    assert change.gate(judged, POLICY, 10.5, BASE, after, {"fra": 2}, 15.0, item).verdict is Verdict.PASS
    # What the wave did is still judged: game-global's new active origin down at fra fails at once.
    items[("fra", "game-global")] = PlanItem("game-global", True, "eu-central")
    broken = {"fra": report("fra", 6.0, 2, {**down, "game-global": {"us-west": True, "eu-central": False}})}
    failed = change.gate(judged, POLICY, 6.0, BASE, broken, {"fra": 2}, 15.0, item)
    assert failed.verdict is Verdict.FAIL and "game-global's new active origin eu-central down" in failed.detail
    # ...from a report sent before the wave's plan reached fra too (agents check every origin).
    assert change.gate(judged, POLICY, 6.0, BASE, broken, {"fra": 3}, 15.0, item).verdict is Verdict.FAIL


def test_after_the_bake_a_moved_vip_must_still_be_announced_at_the_wave_pop() -> None:
    s, _ = step(Rollout(base="rev1", target="rev1"),
                NewRevision("rev2", radius_of(BASE, reordered(BASE)), (("sin",), ("fra", "sjc"))), 0.0, POLICY)
    ok = {"game-global": {"us-west": True, "eu-central": True}}

    def item(pop: str, name: str) -> PlanItem | None:
        return PlanItem(name, True, "eu-central")

    lost = {"sin": report("sin", 11.0, 2, ok, {"game-global": False})}
    assert change.gate(s, POLICY, 11.0, BASE, lost, {"sin": 2}, 15.0, item).verdict is Verdict.WAIT
    result = change.gate(s, POLICY, 26.0, BASE, {"sin": report("sin", 26.0, 2, ok, {"game-global": False})},
                         {"sin": 2}, 15.0, item)
    assert result.verdict is Verdict.FAIL and "sin no longer announces game-global" in result.detail
    assert change.gate(s, POLICY, 11.0, BASE, {"sin": report("sin", 11.0, 2, ok)}, {"sin": 2}, 15.0,
                       item).verdict is Verdict.PASS


# --- inside the controller ------------------------------------------------------------------------
def active(ctl: Controller) -> dict[str, str]:
    """game-global's active origin per POP, as served."""
    out = {}
    for pop in GAME_POPS:
        item = ctl.item(pop, "game-global")
        assert item is not None and item.wanted
        out[pop] = item.active_origin
    return out


def served_spec(ctl: Controller, pop: str, name: str = "game-global") -> dict[str, object]:
    body = ctl.plan_body(pop)
    spec = next(v["spec"] for v in body["vips"] if v["name"] == name)
    assert isinstance(spec, dict)
    return spec


def settled(tmp_path: Path, now: list[float]) -> Controller:
    """Healthy since 100 s, 100 s ago: past every failback hold-down (a reorder moves at once)."""
    ctl = controller(tmp_path, now)
    healthy(ctl, now[0])
    now[0] = 200.0
    healthy(ctl, now[0])
    return ctl


def test_a_commit_reordering_origins_moves_one_wave_at_a_time(tmp_path: Path) -> None:
    now = [100.0]
    ctl = settled(tmp_path, now)
    assert active(ctl) == {"sjc": "us-west", "fra": "us-west", "sin": "us-west"}
    ctl.apply_config(reordered(ctl.desired))
    assert ctl.rollout.phase is Phase.ROLLING and ctl.rollout.waves == (("sin",), ("fra",), ("sjc",))
    assert active(ctl) == {"sin": "eu-central", "fra": "us-west", "sjc": "us-west"}  # wave 1: sin only

    def first(pop: str) -> object:
        return served_spec(ctl, pop)["origins"][0]["region"]  # type: ignore[index]
    assert (first("sin"), first("fra"), first("sjc")) == ("eu-central", "us-west", "us-west")
    now[0] = 205.0
    healthy(ctl, now[0])
    assert ctl.rollout.wave == 0 and active(ctl)["fra"] == "us-west"  # baking
    now[0] = 210.5
    healthy(ctl, now[0])
    assert ctl.rollout.wave == 1 and active(ctl) == {"sin": "eu-central", "fra": "eu-central", "sjc": "us-west"}
    assert first("fra") == "eu-central" and first("sjc") == "us-west"
    now[0] = 221.0
    healthy(ctl, now[0])
    assert ctl.rollout.wave == 2 and set(active(ctl).values()) == {"eu-central"}
    now[0] = 231.5
    healthy(ctl, now[0])
    assert (ctl.rollout.phase, ctl.base.revision) == (Phase.STEADY, "rev2")
    assert set(active(ctl).values()) == {"eu-central"} and not vip(ctl.desired, "game-global").steering.preferences


def test_a_reorder_whose_new_origin_fails_at_the_wave_pop_is_rolled_back(tmp_path: Path) -> None:
    now = [100.0]
    ctl = settled(tmp_path, now)
    ctl.apply_config(reordered(ctl.desired))
    assert active(ctl)["sin"] == "eu-central"
    untouched = {pop: ctl.served[pop].generation for pop in ("fra", "sjc")}
    now[0] = 203.0
    # sin's checks see its new active origin (eu-central) down; us-west is fine there.
    healthy(ctl, now[0], pops=("sjc", "fra"))
    ctl.add_report(PopReport("sin", now[0], ctl.served["sin"].generation,
                             {"game-global": {"us-west": True, "eu-central": False}}, {"game-global": True}))
    assert ctl.rollout.phase is Phase.ROLLED_BACK
    assert "sin reports game-global's new active origin eu-central down" in ctl.rollout.detail
    alarm = ctl.change_alarm()
    assert alarm is not None and alarm["kind"] == "rollout_rolled_back"
    assert active(ctl) == {"sin": "us-west", "fra": "us-west", "sjc": "us-west"}  # back, everywhere
    assert served_spec(ctl, "sin")["origins"][0]["region"] == "us-west"  # type: ignore[index]
    assert {pop: ctl.served[pop].generation for pop in ("fra", "sjc")} == untouched  # no further POP touched


def test_an_attribute_change_reaches_each_pop_with_its_wave(tmp_path: Path) -> None:
    now = [100.0]
    ctl = settled(tmp_path, now)
    ctl.apply_config(with_med(ctl.desired, 50))

    def med(pop: str) -> object:
        return served_spec(ctl, pop)["attributes"]["up"]["med"]  # type: ignore[index]
    assert (med("sin"), med("fra"), med("sjc")) == (50, 100, 100)
    generation = ctl.served["fra"].generation
    now[0] = 210.5
    healthy(ctl, now[0])
    assert ctl.rollout.wave == 1 and (med("fra"), med("sjc")) == (50, 100)
    assert ctl.served["fra"].generation > generation  # a new plan: the agent is woken for it
    now[0] = 221.0
    healthy(ctl, now[0])
    now[0] = 231.5
    healthy(ctl, now[0])
    assert ctl.rollout.phase is Phase.STEADY and {med(p) for p in GAME_POPS} == {50}
    assert Attributes(med=50, communities=("65101:100",)) == vip(ctl.desired, "game-global").vip.attributes.up


def test_a_restart_mid_move_keeps_the_held_pops_on_the_base(tmp_path: Path) -> None:
    now = [100.0]
    ctl = settled(tmp_path, now)
    ctl.apply_config(reordered(ctl.desired))
    target, base = ctl.target, ctl.base
    ctl.close()
    again = Controller(target, clock=lambda: now[0], applied=base)
    healthy(again, now[0])
    assert again.rollout.phase is Phase.ROLLING and again.rollout.move == ("game-global",)
    assert active(again) == {"sin": "eu-central", "fra": "us-west", "sjc": "us-west"}
    assert served_spec(again, "fra")["origins"][0]["region"] == "us-west"  # type: ignore[index]


def test_a_vip_already_failing_at_the_wave_pop_does_not_fail_its_gate(tmp_path: Path) -> None:
    """api-eu's origins are down at fra before the reorder of game-global reaches fra: fra's
    wave passes (api-eu was not the change's doing); game-global stays judged."""
    now = [100.0]
    ctl = settled(tmp_path, now)

    def reports(at: float) -> None:
        healthy(ctl, at, pops=("sjc", "sin"))
        ctl.add_report(PopReport("fra", at, ctl.served["fra"].generation,
                                 {"game-global": {"us-west": True, "eu-central": True},
                                  "api-eu": {"eu-central": False, "us-west": False}},
                                 {"game-global": True, "api-eu": True}))

    reports(now[0])
    ctl.apply_config(reordered(ctl.desired))
    now[0] = 210.5
    reports(now[0])
    assert ctl.rollout.wave == 1 and ctl.rollout.rolled() == {"sin", "fra"}
    assert ("api-eu", "fra") in ctl.rollout.excused
    now[0] = 215.0
    reports(now[0])
    assert ctl.rollout.phase is Phase.ROLLING  # api-eu down at fra all along: no rollback
    now[0] = 221.0
    reports(now[0])
    assert ctl.rollout.wave == 2
    # Without the baseline the same reports would have failed fra's gate at once.
    assert change.gate(dataclasses.replace(ctl.rollout, wave=1, excused=()), ctl.base.change, now[0], ctl.desired,
                       ctl.reports, ctl.persisted.generations, 15.0, ctl.item).verdict is Verdict.FAIL


def test_a_revert_during_a_move_takes_the_pops_it_reached_back_at_once(tmp_path: Path) -> None:
    """A newer revision replaces a rollout; the revert of a reorder is itself a move, judged
    against what is served: sin (reached by the first wave) is back on us-west at once, the
    POPs whose wave never came never left it."""
    now = [100.0]
    ctl = settled(tmp_path, now)
    base = ctl.desired
    ctl.apply_config(reordered(base))
    assert active(ctl) == {"sin": "eu-central", "fra": "us-west", "sjc": "us-west"}
    now[0] = 203.0
    healthy(ctl, now[0])
    ctl.apply_config(dataclasses.replace(base, revision="rev3"))
    assert ctl.rollout.target == "rev3" and ctl.base.revision == "rev1"
    assert active(ctl) == {"sin": "us-west", "fra": "us-west", "sjc": "us-west"}
    for t in (213.5, 224.0, 234.5):
        now[0] = t
        healthy(ctl, t)
        assert set(active(ctl).values()) == {"us-west"}
    assert (ctl.rollout.phase, ctl.base.revision) == (Phase.STEADY, "rev3")


def test_a_definition_change_reaches_each_wave_inside_the_event_loop(tmp_path: Path) -> None:
    """The daemon's path: passes run as event-loop tasks and the agents resend unchanged
    reports (stored, no pass of their own). A wave that changes only definitions (a MED)
    re-plans no VIP, yet its POPs must be served the new definition when it begins, and
    every POP when the rollout ends; the POPs whose wave has not come keep the base's."""
    import asyncio

    now = [100.0]
    ctl = settled(tmp_path, now)

    def med(pop: str) -> object:
        return served_spec(ctl, pop)["attributes"]["up"]["med"]  # type: ignore[index]

    def resend(at: float) -> None:  # what every agent sends again: the same verdicts
        for pop in GAME_POPS:
            published = ctl.desired.published_at(pop)
            ctl.accept_report(PopReport(pop, at, ctl.served[pop].generation,
                                        {fv.name: {o.region: True for o in fv.vip.origins} for fv in published},
                                        {fv.name: True for fv in published}))

    async def passes_done() -> None:
        for _ in range(100):
            await asyncio.sleep(0.02)  # (REPORT_BATCH: the stored reports' pass, if any)
            driver = ctl._driver
            if driver is None or driver.done():
                return

    async def main() -> list[tuple[object, ...]]:
        seen = []
        ctl.apply_config(with_med(ctl.desired, 50))
        await passes_done()
        seen.append((ctl.rollout.wave, med("sin"), med("fra"), med("sjc")))
        for t in (210.5, 221.0, 231.5):  # each wave's bake over: the gate's timer runs plan_soon
            now[0] = t
            resend(t)
            ctl.plan_soon()
            await passes_done()
            seen.append((ctl.rollout.wave if ctl.rollout.phase is Phase.ROLLING else str(ctl.rollout.phase),
                         med("sin"), med("fra"), med("sjc")))
        return seen

    assert asyncio.run(main()) == [(0, 50, 100, 100), (1, 50, 50, 100), (2, 50, 50, 50), ("steady", 50, 50, 50)]
    assert ctl.base.revision == "rev2"


def test_a_waves_excused_pairs_are_those_the_per_pair_definition_finds() -> None:
    """``change.excused`` skips the call of ``_unhealthy`` for a VIP planned wanted, announced
    and with no origin reported down, and takes the items from a mapping when given one: on
    random reports (verdicts down, unknown, missing; VIPs not announced; stale reports) and
    plans (withdrawn, weighted, missing items), it finds exactly the pairs the definition,
    ``_unhealthy`` for every published pair, finds (what a wave's gate forgives must not change)."""
    import random

    rng = random.Random(7)
    pops = ("sjc", "fra", "sin", "ams")
    for trial in range(300):
        names = [f"v{i}" for i in range(rng.randint(0, 12))]
        regions = ("us-west", "eu-central", "ap-south")
        items: dict[str, dict[str, PlanItem]] = {}
        reports: dict[str, PopReport] = {}
        for pop in pops:
            items[pop] = {}
            for n in names:
                if rng.random() < 0.9:
                    weights = tuple((r, rng.randint(1, 3)) for r in rng.sample(regions, 2)) if rng.random() < 0.2 else ()
                    items[pop][n] = PlanItem(n, rng.random() < 0.85, rng.choice(regions), weights=weights)
            if rng.random() < 0.9:
                origins = {n: {r: rng.choice((True, True, True, False, None)) for r in rng.sample(regions, rng.randint(0, 3))}
                           for n in names if rng.random() < 0.9}
                announced = {n: rng.random() < 0.9 for n in names if rng.random() < 0.9}
                reports[pop] = PopReport(pop, rng.choice((90.0, 99.0, 10.0)), 1, origins, announced)
        wave = tuple(rng.sample(pops, rng.randint(1, len(pops))))
        state = Rollout(phase=Phase.ROLLING, base="a", target="b", waves=(wave,), wave=0, wave_started=100.0)
        published = {pop: [n for n in names if rng.random() < 0.8] for pop in pops}

        def item(pop: str, name: str) -> PlanItem | None:
            return items.get(pop, {}).get(name)

        expected = []
        for pop in wave:
            r = reports.get(pop)
            fresh = r if r is not None and 100.0 - r.received_at <= 15.0 else None
            expected += [(n, pop) for n in published[pop] if change._unhealthy(fresh, n, item(pop, n))]
        for given in (None, items):
            got = change.excused(state, BASE, reports, item, 100.0, 15.0, published, given)
            assert got == tuple(sorted(expected)), (trial, given is None)
