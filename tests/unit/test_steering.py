"""Traffic steering: per-POP origin preference, weights, dials. Config, planner, wire, agent, kernel diff."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest

from controller.agent.decide import Action, decide
from controller.agent.intent import VipIntent
from controller.agent.kernel_plan import desired_routes
from controller.agent.plan_wire import PlanBook
from controller.config.desired import load_desired
from controller.config.serialize import vip_to_dict
from controller.config.desired_model import FleetVip, Preference, Steering, with_dials
from controller.kernel.diff import KernelRoute, multipath, plan_routes
from controller.policy.model import PlannerState
from controller.server.plans import PlanStore
from controller.server.store import _vip_from_json, _vip_to_json
from controller.wire import WireError, decode_plan, decode_plan_answer, vip_entry_hash

from tests.helpers.config_dirs import EXAMPLE, copy, edit, errors
from tests.helpers.planner_run import BASE, GAME, UP, DOWN, Run, fleet

EU, US = "eu-central", "us-west"
FRA_PREFERS_EU = Steering(preferences=(Preference(("fra",), (EU, US)),))


def steered(steering: Steering, dials: dict[str, int] | None = None, **policy: dict) -> Run:
    d = fleet(**policy)
    fv = dataclasses.replace(d.vips[0], steering=steering)
    return Run(with_dials(dataclasses.replace(d, vips=(fv,), dials=tuple((dials or {}).items())), {}))


def active(result, pop: str) -> str:
    return result.item(pop, "game-global").active_origin


def weights(result, pop: str) -> dict[str, int]:
    return dict(result.item(pop, "game-global").weights)


# --- per-POP preference --------------------------------------------------------------------------
def test_without_steering_nothing_changes() -> None:
    r = Run(fleet()).at(0, sjc=UP, fra=UP, sin=UP)
    assert {active(r, p) for p in ("sjc", "fra", "sin")} == {US}
    assert all(not i.weights for items in r.pops.values() for i in items.values())
    assert not r.state.vips["game-global"].routes


def test_each_pop_follows_its_own_preference_with_both_healthy() -> None:
    r = steered(FRA_PREFERS_EU).at(0, sjc=UP, fra=UP, sin=UP)
    assert (active(r, "fra"), active(r, "sjc"), active(r, "sin")) == (EU, US, US)
    assert "preference eu-central > us-west" in r.item("fra", "game-global").explanation


def test_a_preference_fails_over_by_quorum_and_fails_back_after_the_hold_down() -> None:
    run = steered(FRA_PREFERS_EU, failover={"failback_hold_down": 60.0})
    run.at(0, sjc=UP, fra=UP, sin=UP)
    # One POP of three sees eu-central down: below the quorum, fra stays.
    r = run.at(1, sjc=UP, fra=(UP, DOWN), sin=UP)
    assert active(r, "fra") == EU
    r = run.settled(2, sjc=(UP, DOWN), fra=(UP, DOWN), sin=(UP, DOWN))  # (no check ages: after the window)
    assert active(r, "fra") == US and active(r, "sjc") == US
    assert run.state.vips["game-global"].routes["eu-central,us-west"][0] == US
    r = run.at(10, sjc=UP, fra=UP, sin=UP)
    assert active(r, "fra") == US  # healthy again, hold-down running
    r = run.at(70, sjc=UP, fra=UP, sin=UP)
    assert active(r, "fra") == EU


def test_a_preference_survives_the_journal() -> None:
    run = steered(FRA_PREFERS_EU)
    run.at(0, sjc=UP, fra=UP, sin=UP)
    run.at(2, sjc=(UP, DOWN), fra=(UP, DOWN), sin=(UP, DOWN))
    mem = run.state.vips["game-global"]
    assert _vip_from_json(_vip_to_json(mem)) == mem
    plain = Run(fleet()).at(0, sjc=UP).state.vips["game-global"]
    assert "routes" not in _vip_to_json(plain)  # files without steering are as before


# --- weights -------------------------------------------------------------------------------------
WEIGHTED = Steering(weights=((US, 3), (EU, 1)))


def test_weights_split_and_an_unhealthy_origin_drops_to_zero() -> None:
    run = steered(WEIGHTED, failover={"failback_hold_down": 60.0})
    r = run.at(0, sjc=UP, fra=UP, sin=UP)
    assert weights(r, "sjc") == {US: 3, EU: 1} and active(r, "sjc") == US
    r = run.at(1, sjc=(UP, DOWN), fra=(UP, DOWN), sin=(UP, DOWN))
    assert weights(r, "sjc") == {} and active(r, "sjc") == US  # one left: single path
    r = run.settled(2, sjc=(DOWN, UP), fra=(DOWN, UP), sin=(DOWN, UP))  # (no check ages: after the window)
    # us-west down, eu-central healthy again but within its hold-down: still announced, single path
    assert all(r.item(p, "game-global").wanted for p in ("sjc", "fra", "sin"))
    assert active(r, "sjc") == EU
    r = run.at(70, sjc=UP, fra=UP, sin=UP)
    # eu-central healthy since 2 (68 s >= 60): back; us-west healthy only since 70: still out
    assert run.state.vips["game-global"].weight_out == {US} and active(r, "sjc") == EU


def test_a_returning_origin_gets_its_weight_back_only_after_the_hold_down() -> None:
    run = steered(WEIGHTED, failover={"failback_hold_down": 60.0})
    run.at(0, sjc=UP, fra=UP, sin=UP)
    run.at(1, sjc=(UP, DOWN), fra=(UP, DOWN), sin=(UP, DOWN))
    r = run.at(5, sjc=UP, fra=UP, sin=UP)
    assert weights(r, "sjc") == {}  # eu-central healthy again, not for 60 s yet
    assert run.state.vips["game-global"].weight_out == {EU}
    r = run.at(66, sjc=UP, fra=UP, sin=UP)
    assert weights(r, "sjc") == {US: 3, EU: 1}
    assert not run.state.vips["game-global"].weight_out


def test_all_weighted_origins_down_is_todays_logic() -> None:
    """Every origin down everywhere: the safety hold keeps every POP announcing, as without weights."""
    with_w = steered(WEIGHTED).settled(0, sjc=(DOWN, DOWN), fra=(DOWN, DOWN), sin=(DOWN, DOWN))
    without = Run(fleet()).settled(0, sjc=(DOWN, DOWN), fra=(DOWN, DOWN), sin=(DOWN, DOWN))
    strip = lambda res: {p: (i.wanted, i.reason, i.safety_hold, i.active_origin)  # noqa: E731
                         for p, items in res.pops.items() for i in items.values()}
    assert strip(with_w) == strip(without)
    assert all(i.safety_hold for items in with_w.pops.values() for i in items.values())


def test_a_pop_that_sees_one_weighted_origin_down_keeps_announcing() -> None:
    r = steered(WEIGHTED).settled(0, sjc=(DOWN, UP), fra=UP, sin=UP)
    assert r.item("sjc", "game-global").wanted and r.item("sjc", "game-global").reason == "healthy"


# --- dials ---------------------------------------------------------------------------------------
def test_a_dial_scales_a_weight() -> None:
    r = steered(WEIGHTED, dials={US: 10}).at(0, sjc=UP, fra=UP, sin=UP)
    assert weights(r, "sjc") == {US: 3, EU: 10}  # 3x10 : 1x100


def test_the_pairs_a_dial_moves() -> None:
    """change.dial_radius: what the dial gate counts against the change budget."""
    from controller.policy.change import dial_radius
    pops = ("sjc", "fra", "sin")
    run = steered(WEIGHTED)
    weighted = run.at(0, sjc=UP, fra=UP, sin=UP)

    def moved(r, before, operator: dict[str, int], region: str):  # type: ignore[no-untyped-def]
        return dial_radius(region, before, with_dials(before, operator), r.item)
    # Weighted: lowering a weighted region moves every POP sending to it; raising one too.
    assert moved(weighted, run.desired, {EU: 50}, EU) == tuple(sorted(("game-global", p) for p in pops))
    lowered = with_dials(run.desired, {EU: 50})
    assert len(moved(weighted, lowered, {}, EU)) == 3  # back up to 100
    # Single path (no weights): only 0 moves the POPs on the region, only from 0 back.
    single = steered(Steering())
    on_us = single.at(0, sjc=UP, fra=UP, sin=UP)
    assert moved(on_us, single.desired, {US: 50}, US) == ()
    assert moved(on_us, single.desired, {EU: 0}, EU) == ()  # no POP sends there
    assert len(moved(on_us, single.desired, {US: 0}, US)) == 3
    assert len(moved(on_us, with_dials(single.desired, {US: 0}), {}, US)) == 3  # from 0: it may be active again
    # A preference with its own weights: fra weights eu-central only, the others the VIP's.
    pref = Steering(preferences=(Preference(("fra",), (EU, US), ((EU, 1),)),), weights=((US, 1),))
    prun = steered(pref)
    r = prun.at(0, sjc=UP, fra=UP, sin=UP)
    assert moved(r, with_dials(prun.desired, {EU: 0}), {}, EU) == (("game-global", "fra"),)


def test_a_dial_of_zero_moves_the_active_origin_at_once_without_withdrawing() -> None:
    run = steered(Steering())
    run.at(0, sjc=UP, fra=UP, sin=UP)
    run.desired = with_dials(run.desired, {US: 0})
    r = run.at(1, sjc=UP, fra=UP, sin=UP)
    assert {active(r, p) for p in ("sjc", "fra", "sin")} == {EU}
    assert all(r.item(p, "game-global").wanted for p in ("sjc", "fra", "sin"))
    assert "traffic dial is 0" in r.notes["game-global"]


def test_every_region_dialed_to_zero_is_ignored() -> None:
    r = steered(WEIGHTED, dials={US: 0, EU: 0}).at(0, sjc=UP, fra=UP, sin=UP)
    assert weights(r, "sjc") == {US: 3, EU: 1}
    assert "dials ignored" in r.notes["game-global"]


def test_dials_keep_the_vips_they_do_not_touch() -> None:
    d = fleet()
    assert with_dials(d, {}) is d
    assert with_dials(d, {"ap-south": 0}) is d  # no VIP of this fleet has it


# --- config --------------------------------------------------------------------------------------
def test_config_reads_steering_and_dials(tmp_path: Path) -> None:
    d = copy(tmp_path)

    def steer(data: dict) -> None:
        data["vips"][0]["steering"] = {"weights": {US: 3, EU: 1},
                                       "preference": [{"pops": ["fra"], "origins": [EU]}]}
    edit(d, "vips.yaml", steer)
    edit(d, "controller.yaml", lambda c: c.update(dials={EU: 50}))
    s = load_desired(str(d))
    game = s.vip("game-global")
    assert game is not None
    assert dict(game.steering.weights) == {US: 3, EU: 1}
    assert game.steering.preference("fra") == Preference(("fra",), (EU, US))
    assert game.dials == ((EU, 50),) and s.dials == ((EU, 50),)


@pytest.mark.parametrize("steering, message", [
    ({"weights": {US: 256}}, "vips[0].steering.weights.us-west: must be <= 255"),
    ({"weights": {US: -1}}, "vips[0].steering.weights.us-west: must be >= 0"),
    ({"weights": {US: 0, EU: 0}}, "vips[0].steering.weights: every weight is 0"),
    ({"weights": {"mars": 1}}, "vips[0].steering.weights.mars: unknown origin region 'mars'"),
    ({"preference": [{"pops": ["lhr"], "origins": [EU]}]}, "vips[0].steering.preference[0].pops[0]: unknown POP 'lhr'"),
    ({"preference": [{"pops": ["fra"], "origins": ["mars"]}]},
     "vips[0].steering.preference[0].origins[0]: unknown origin region 'mars'"),
    ({"preference": [{"pops": ["fra"], "origins": [EU]}, {"pops": ["fra"], "origins": [US]}]},
     "vips[0].steering.preference[1].pops[0]: POP 'fra' already has a preference"),
    ({"colour": "red"}, "vips[0].steering.colour: unknown key"),
])
def test_bad_steering_names_its_path(tmp_path: Path, steering: dict, message: str) -> None:
    d = copy(tmp_path)
    edit(d, "vips.yaml", lambda data: data["vips"][0].update(steering=steering))
    assert any(message in e for e in errors(d)), errors(d)


@pytest.mark.parametrize("dials, message", [
    ({US: 101}, "dials.us-west: must be <= 100"),
    ({US: -5}, "dials.us-west: must be >= 0"),
    ({"mars": 50}, "dials.mars: unknown origin region 'mars'"),
])
def test_bad_dials_name_their_path(tmp_path: Path, dials: dict, message: str) -> None:
    d = copy(tmp_path)
    edit(d, "controller.yaml", lambda c: c.update(dials=dials))
    assert any(message in e for e in errors(d)), errors(d)


# --- wire ----------------------------------------------------------------------------------------
def _spec() -> dict:
    return vip_to_dict(GAME.vip)


def test_weights_travel_to_the_agent_and_change_the_generation() -> None:
    r = steered(WEIGHTED).at(0, sjc=UP, fra=UP, sin=UP)
    item = r.item("sjc", "game-global")
    store = PlanStore()
    specs = {"game-global": _spec()}
    g1 = store.serve("sjc", {"game-global": item}, specs, "rev", 0)
    g2 = store.serve("sjc", {"game-global": dataclasses.replace(item, weights=((US, 1), (EU, 1)))}, specs, "rev", 0)
    assert g1 is not None and g2 is not None and g2 > g1  # a weights-only change is a new plan
    body = json.loads(store.body("sjc", None))
    book = PlanBook("sjc", BASE.allowed_prefixes)
    plan = book.apply(decode_plan_answer(body, "sjc"))
    assert plan.vips["game-global"].weights == ((US, 1), (EU, 1))


def test_an_agent_before_weights_reads_the_same_plan_without_them() -> None:
    """The digest leaves weights out: an old agent's check passes, and it routes to active_origin."""
    entry = {"name": "game-global", "spec": _spec(), "wanted": True, "active_origin": US, "drain": False,
             "reason": "healthy", "safety_hold": False, "explanation": ""}
    plain = decode_plan({"pop": "sjc", "generation": 1, "revision": "r", "vips": [entry]}, "sjc")
    weighted = decode_plan({"pop": "sjc", "generation": 1, "revision": "r",
                            "vips": [{**entry, "weights": [[US, 3], [EU, 1]]}]}, "sjc")
    assert vip_entry_hash(plain.vips[0]) == vip_entry_hash(weighted.vips[0])
    assert weighted.vips[0].weights == ((US, 3), (EU, 1))


@pytest.mark.parametrize("weights, field", [
    ([[US, 0]], "vips[0].weights[0]"), ([[US, 70000]], "vips[0].weights[0]"), ([US], "vips[0].weights[0]"),
    ([[US, 1], [US, 2]], "vips[0].weights[1]"), ([[EU, 1]], "vips[0].weights"), ("x", "vips[0].weights"),
])
def test_bad_weights_on_the_wire_are_refused_by_name(weights: object, field: str) -> None:
    entry = {"name": "game-global", "spec": {}, "wanted": True, "active_origin": US, "drain": False,
             "reason": "healthy", "safety_hold": False, "weights": weights}
    with pytest.raises(WireError) as info:
        decode_plan({"pop": "sjc", "generation": 1, "revision": "r", "vips": [entry]}, "sjc")
    assert info.value.field == field


# --- agent ---------------------------------------------------------------------------------------
def _health(us: bool | None, eu: bool | None) -> dict:
    out = {}
    for o in GAME.vip.origins:
        for b in o.backends:
            out[("game-global", o.region, b)] = us if o.region == US else eu
    return out


ALLOWED = BASE.allowed_prefixes


@pytest.mark.parametrize("us, eu, action, hops", [
    (True, True, Action.ANNOUNCE, 2),  # split across both
    (True, False, Action.ANNOUNCE, 0),  # eu-central down here: weight 0 at once, single path to us-west
    (False, True, Action.ANNOUNCE, 0),  # the active one down here, the other carries it
    (False, False, Action.WITHDRAW, 0),  # none: today's logic (backend_down)
    (None, None, Action.HOLD, 0),  # no verdict: today's logic (hold)
])
def test_the_agent_splits_across_the_weighted_origins_it_sees_healthy(us, eu, action, hops) -> None:
    intent = VipIntent("game-global", True, US, weights=((US, 3), (EU, 1)))
    d = decide(GAME.vip, intent, _health(us, eu), ALLOWED)
    assert d.action is action and len(d.next_hops) == hops
    if action is Action.ANNOUNCE:
        healthy = US if us else EU
        assert d.next_hop == GAME.vip.origin(healthy).next_hop


def test_the_kernel_route_of_a_split() -> None:
    intent = VipIntent("game-global", True, US, weights=((US, 3), (EU, 1)))
    d = decide(GAME.vip, intent, _health(True, True), ALLOWED)
    (route,) = desired_routes([d], [])
    assert route.group == ((ipaddress.ip_address("100.64.10.1"), 3), (ipaddress.ip_address("100.64.20.1"), 1))


def test_multipath_is_canonical_and_scaled_into_the_kernels_range() -> None:
    net = ipaddress.ip_network("198.51.100.10/32")
    a, b = ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("10.0.0.3")
    assert multipath(net, [(b, 1), (a, 3)]) == multipath(net, [(a, 3), (b, 1)])
    assert multipath(net, [(a, 300), (b, 2700)]).group == ((a, 28), (b, 255))
    assert multipath(net, [(a, 1), (a, 2)]) == KernelRoute(net, a)  # one next hop: a plain route
    # A weight change is one replace of the route (netlink.py replaces the group in place).
    diff = plan_routes([multipath(net, [(a, 1), (b, 1)])], [multipath(net, [(a, 3), (b, 1)])])
    assert len(diff.replace) == 1 and not diff.add and not diff.remove


# --- the operator's dial -------------------------------------------------------------------------
def _controller(tmp_path: Path, now: list[float]):  # type: ignore[no-untyped-def]
    from controller.server.core import Controller
    desired = dataclasses.replace(load_desired(str(EXAMPLE), "rev1"), state_dir=str(tmp_path))
    return Controller(desired, clock=lambda: now[0])


def _healthy(ctl, at: float) -> None:  # type: ignore[no-untyped-def]
    from controller.policy.model import PopReport
    for pop in ("sjc", "fra", "sin"):
        ctl.add_report(PopReport(pop, at, 1, {v.name: {o.region: True for o in v.vip.origins}
                                             for v in ctl.desired.published_at(pop)},
                                 {v.name: True for v in ctl.desired.published_at(pop)}))


def test_a_dial_of_zero_moves_every_vip_off_the_region_is_recorded_and_survives_a_restart(tmp_path: Path) -> None:
    from controller.server import store
    now = [10.0]
    ctl = _controller(tmp_path, now)
    _healthy(ctl, now[0])
    ctl.replan()
    assert ctl.item("fra", "game-global").active_origin == US
    wanted = {(p, v): i.wanted for p, items in ctl.result.pops.items() for v, i in items.items()}
    assert ctl.dial(US, 0, "alice", "move traffic to eu for the us-west maintenance", force=True)
    assert not ctl.dial(US, 0, "alice", "again")  # no change: nothing journaled (and no gate)
    r = ctl.result
    assert {i.active_origin for items in r.pops.values() for i in items.values()} == {EU}
    # A dial moves traffic between origins only: every announcement stays as it was.
    assert {(p, v): i.wanted for p, items in r.pops.items() for v, i in items.items()} == wanted
    d = store.load(str(tmp_path)).dials[US]
    assert (d.pct, d.by, d.why, d.at) == (0, "alice", "move traffic to eu for the us-west maintenance", 10.0)
    ctl.close()
    restarted = _controller(tmp_path, now)
    assert restarted.desired.vip("game-global").dial(US) == 0
    restarted.dial(US, None, "alice", "maintenance over", force=True)  # back to the config's dial
    assert restarted.desired.vip("game-global").dial(US) == 100
    assert US not in store.load(str(tmp_path)).dials
    restarted.close()


def test_a_gate_can_refuse_a_dial_and_nothing_changes(tmp_path: Path) -> None:
    from controller.server.core import ActionRefused, DialChange
    from controller.server import store
    now = [10.0]
    ctl = _controller(tmp_path, now)
    seen: list[DialChange] = []

    def gate(change: DialChange) -> str | None:
        seen.append(change)
        return "would move 2 VIPs at once: confirm in waves"
    ctl.dial_gate = gate
    with pytest.raises(ActionRefused, match="confirm in waves"):
        ctl.dial(US, 0, "bob", "test")
    assert seen[0].region == US and seen[0].after.vip("game-global").dial(US) == 0
    assert ctl.desired.vip("game-global").dial(US) == 100 and not store.load(str(tmp_path)).dials
    with pytest.raises(KeyError):
        ctl.dial("mars", 0, "bob", "no such region")
    ctl.close()


def test_a_dial_moving_more_than_the_change_budget_is_refused_naming_what_it_moves_unless_forced(
        tmp_path: Path) -> None:
    from controller.server.core import ActionRefused
    from controller.server import store
    now = [10.0]
    ctl = _controller(tmp_path, now)
    _healthy(ctl, now[0])
    ctl.replan()
    announced = {(v, p) for p, items in ctl.result.pops.items() for v, i in items.items() if i.wanted}
    on_us = sorted((v, p) for v, p in announced if ctl.item(p, v).active_origin == US)
    assert len(on_us) / len(announced) > ctl.base.change.max_withdraw_fraction  # 3 of 5
    # 50 % of a region no VIP weights moves nothing (single paths change only at 0): passes.
    assert ctl.dial(US, 50, "alice", "halve us-west")
    with pytest.raises(ActionRefused) as refused:
        ctl.dial(US, 0, "alice", "move everything off us-west")
    text = str(refused.value)
    assert f"moves the traffic of {len(on_us)} of {len(announced)} announced" in text
    assert all(f"{v}@{p}" in text for v, p in on_us) and "--force" in text
    assert ctl.desired.vip("game-global").dial(US) == 50 and store.load(str(tmp_path)).dials[US].pct == 50
    assert {ctl.item(p, v).active_origin for v, p in on_us} == {US}  # nothing moved
    assert ctl.dial(US, 0, "alice", "move everything off us-west", force=True)
    assert {ctl.item(p, v).active_origin for v, p in on_us} == {EU}
    assert {(v, p) for p, items in ctl.result.pops.items() for v, i in items.items() if i.wanted} == announced
    ctl.close()


def test_a_dial_within_a_looser_change_budget_passes_the_gate(tmp_path: Path) -> None:
    from controller.server.core import Controller
    now = [10.0]
    loaded = load_desired(str(EXAMPLE), "rev1")
    desired = dataclasses.replace(loaded, state_dir=str(tmp_path),
                                  change=dataclasses.replace(loaded.change, max_withdraw_fraction=0.75))
    ctl = Controller(desired, clock=lambda: now[0])
    _healthy(ctl, now[0])
    ctl.replan()
    assert ctl.dial(US, 0, "alice", "3 of 5 pairs move: within 75 %")
    assert ctl.item("fra", "game-global").active_origin == EU
    ctl.close()


def test_operator_dials_apply_over_what_the_config_change_serves(tmp_path: Path) -> None:
    """A held revision serves the base with the operator's dials over it; a revision's own
    ``dials:`` go through the change gate (they withdraw nothing: applied at once) and the
    operator's dial stays over them; the gate judges revisions without the operator's dials."""
    from controller.policy.change import Phase
    now = [10.0]
    ctl = _controller(tmp_path, now)
    _healthy(ctl, now[0])
    ctl.replan()
    ctl.dial(US, 0, "alice", "us-west maintenance", force=True)
    assert ctl.item("fra", "game-global").active_origin == EU
    # A revision removing game-global withdraws 3 of 5 pairs: held, the base served, dialed.
    ctl.apply_config(dataclasses.replace(ctl.target, revision="rev2",
                                         vips=tuple(v for v in ctl.target.vips if v.name != "game-global")))
    assert ctl.rollout.phase is Phase.HELD
    game = ctl.desired.vip("game-global")
    assert game is not None and game.dial(US) == 0 and ctl.item("fra", "game-global").active_origin == EU
    # The same revision as served, under a new name: nothing touched, nothing withdrawn.
    radius, waves = ctl.blast_radius(dataclasses.replace(ctl.base, revision="rev3"))
    assert not radius.withdrawn and not waves
    # A revision whose only change is its dials: applied at once, the operator's dial over it.
    d = copy(tmp_path)
    edit(d, "controller.yaml", lambda c: c.__setitem__("dials", {EU: 50}))
    ctl.apply_config(dataclasses.replace(load_desired(str(d), "rev4"), state_dir=str(tmp_path)))
    assert ctl.rollout.phase is Phase.STEADY and ctl.base.revision == "rev4"
    game = ctl.desired.vip("game-global")
    assert game is not None and (game.dial(US), game.dial(EU)) == (0, 50)
    assert ctl.desired.dials == ((EU, 50),) and ctl.target.vip("game-global").dial(US) == 100
    ctl.close()


def test_metrics_export_each_origins_effective_weight_and_dial(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry
    from controller.metrics.central import ControllerMetrics
    now = [10.0]
    ctl = _controller(tmp_path, now)
    _healthy(ctl, now[0])
    ctl.replan()
    registry = CollectorRegistry()
    ControllerMetrics(registry, lambda: ctl)
    get = registry.get_sample_value
    assert get("anycast_controller_origin_weight", {"vip": "game-global", "pop": "fra", "origin": US}) is None
    ctl.dial(EU, 0, "alice", "drain eu-central", force=True)
    assert get("anycast_controller_origin_weight", {"vip": "api-eu", "pop": "fra", "origin": US}) == 1.0
    assert get("anycast_controller_origin_weight", {"vip": "api-eu", "pop": "fra", "origin": EU}) == 0.0
    assert get("anycast_controller_origin_dial", {"vip": "api-eu", "origin": EU}) == 0.0
    assert get("anycast_controller_origin_dial", {"vip": "api-eu", "origin": US}) == 100.0
    ctl.close()


def test_a_stale_pop_with_its_own_preference_is_presumed_dark_by_its_own_active_origin() -> None:
    """fra prefers eu-central; its last report (now stale) saw eu-central down and us-west up:
    its agent, on its own checks, has likely withdrawn (its route is on eu-central). sjc and
    sin then see every origin down and withdraw; syd sees both healthy. With fra presumed
    dark the safety limit (at most half of the 4 POPs withdrawn) lets only one of sjc and
    sin go. Judged by the default route's active origin (us-west, which fra saw up), fra
    would count as announcing and both would go: syd alone left announcing."""
    from controller.policy.model import PopReport
    from controller.policy.planner import plan

    pops = ("sjc", "fra", "sin", "syd")
    d = fleet(pops)
    fv = dataclasses.replace(d.vips[0], steering=FRA_PREFERS_EU)
    d = dataclasses.replace(d, vips=(fv,))

    def rep(pop: str, usw: bool, euc: bool, at: float) -> PopReport:
        return PopReport(pop, at, 1, {"game-global": {US: usw, EU: euc}}, {"game-global": True})

    fra_last = rep("fra", True, False, 0.0)
    r = plan(d, {"fra": fra_last, **{p: rep(p, True, True, 0.0) for p in ("sjc", "sin", "syd")}}, {}, 0.0,
             PlannerState.initial())
    assert r.item("fra", "game-global").active_origin == EU and r.item("sjc", "game-global").active_origin == US
    stale_at = 0.0 + d.vips[0].policy.safety.report_stale_after + 5
    now = {"fra": fra_last, "sjc": rep("sjc", False, False, stale_at), "sin": rep("sin", False, False, stale_at),
           "syd": rep("syd", True, True, stale_at)}
    r = plan(d, now, {}, stale_at, r.state)
    r = plan(d, {**now, **{p: dataclasses.replace(now[p], received_at=stale_at + 2) for p in ("sjc", "sin", "syd")}},
             {}, stale_at + 2, r.state)  # after the settle window
    reasons = {p: r.item(p, "game-global").reason for p in pops}
    assert reasons == {"sjc": "safety_hold", "fra": "report_stale", "sin": "backend_down", "syd": "healthy"}, reasons
    assert r.item("sjc", "game-global").safety_hold
    assert "1 not reporting and presumed not announcing: fra" in r.item("sjc", "game-global").explanation


@pytest.mark.parametrize(("fra_saw", "sjc_reason"), [
    ((False, True), "backend_down"),  # its agent splits to eu-central: announcing, both may go
    ((False, False), "safety_hold"),  # every weighted origin down: presumed dark, sjc is kept
])
def test_a_stale_pop_of_a_split_vip_is_presumed_dark_only_if_it_saw_every_weighted_origin_down(
        fra_saw: tuple[bool, bool], sjc_reason: str) -> None:
    """Weights 3:1 at 6 POPs, at most 2 withdrawn (max_withdraw_fraction 0.34); fra's last
    report (stale now) saw us-west down. sjc and sin see every origin down (2 of 5 fresh: the
    weights stay), the rest both healthy. fra still announcing (via eu-central) leaves room
    for sjc and sin; fra presumed dark (it saw both down) keeps sjc announcing."""
    from controller.policy.model import PopReport
    from controller.policy.planner import plan

    pops = ("sjc", "fra", "sin", "syd", "lhr", "ams")
    d = fleet(pops, safety={"max_withdraw_fraction": 0.34})
    d = dataclasses.replace(d, vips=(dataclasses.replace(d.vips[0], steering=WEIGHTED),))

    def rep(pop: str, usw: bool, euc: bool, at: float) -> PopReport:
        return PopReport(pop, at, 1, {"game-global": {US: usw, EU: euc}}, {"game-global": True})

    healthy = ("syd", "lhr", "ams")
    fra_last = rep("fra", *fra_saw, 0.0)
    r = plan(d, {"fra": fra_last, **{p: rep(p, True, True, 0.0) for p in ("sjc", "sin", *healthy)}}, {}, 0.0,
             PlannerState.initial())
    t = d.vips[0].policy.safety.report_stale_after + 5
    for at in (t, t + 2):  # the second after the settle window
        r = plan(d, {"fra": fra_last, "sjc": rep("sjc", False, False, at), "sin": rep("sin", False, False, at),
                     **{p: rep(p, True, True, at) for p in healthy}}, {}, at, r.state)
    assert weights(r, "syd") == {US: 3, EU: 1}
    reasons = {p: r.item(p, "game-global").reason for p in pops}
    assert reasons == {"sjc": sjc_reason, "fra": "report_stale", "sin": "backend_down",
                       **{p: "healthy" for p in healthy}}, reasons


def test_a_reload_without_dials_gives_vips_without_dials_after_a_load_with_them(tmp_path: Path) -> None:
    # The loader skips with_dials when controller.yaml has no dials: safe only while the VIPs
    # it reuses from its cache never carry the dials of the load before.
    from controller.config.desired import LoadCache
    d = copy(tmp_path)
    cache = LoadCache()
    edit(d, "controller.yaml", lambda c: c.update(dials={EU: 50}))
    dialed = load_desired(str(d), "r1", cache)
    assert dialed.vip("game-global").dials == ((EU, 50),)
    edit(d, "controller.yaml", lambda c: c.pop("dials"))
    plain = load_desired(str(d), "r2", cache)
    assert plain.dials == () and all(v.dials == () for v in plain.vips)
    assert plain.vips == load_desired(str(d), "r3").vips  # as a load from scratch
