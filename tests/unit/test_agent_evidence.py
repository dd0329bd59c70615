"""The agent's side of the evidence-based settle: check times per backend and origin
(``agent/evidence.py``, pure), and when the agent reports them (at its own first failed
check; when the plan asks; once more after a full round of checks since the ask)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.helpers.agent_fakes import IdleScheduler
from controller.agent import evidence as ev
from controller.agent.controller_link import health_report
from controller.agent.daemon import Agent
from controller.agent.intent import Plan, PlanSource, VipIntent
from controller.config.agent import load_agent_config
from controller.config.model import AgentConfig, ControllerLink
from controller.health.probes import ProbeResult
from controller.metrics.agent import AgentMetrics
from controller.wire import WireError, decode_plan_answer, decode_report, encode_report, entry_hash, entry_json
from controller.wire import WireReport, report_delta

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "agent-sjc.yaml"


# --- pure: times ------------------------------------------------------------------------------
def test_a_backend_keeps_its_last_success_and_the_start_of_its_failure_run() -> None:
    t = ev.observe(None, True, 1.0)
    assert t == ev.Times(1.0, 1.0, None)
    t = ev.observe(t, False, 2.0)
    assert t == ev.Times(2.0, 1.0, 2.0)
    t = ev.observe(t, False, 3.0)  # still the run that began at 2.0
    assert t == ev.Times(3.0, 1.0, 2.0)
    assert ev.observe(t, True, 4.0) == ev.Times(4.0, 4.0, None)


def test_an_origin_is_ok_since_its_min_healthy_th_latest_success_and_failing_when_below() -> None:
    a, b, c = ev.Times(5.0, 5.0, None), ev.Times(4.0, 4.0, None), ev.Times(6.0, 3.0, 6.0)
    assert ev.of_origin([a, b, c], 1) == ev.OriginTimes(5.0, None, 4.0)
    assert ev.of_origin([a, b, c], 2) == ev.OriginTimes(4.0, None, 4.0)
    # min_healthy 3 with c failing: the origin is failing since c's run began
    assert ev.of_origin([a, b, c], 3) == ev.OriginTimes(None, 6.0, 4.0)
    # two failing runs: the later start (the failure that took it below min_healthy began no earlier)
    d = ev.Times(7.0, 1.0, 5.5)
    assert ev.of_origin([c, d], 1) == ev.OriginTimes(None, 6.0, 6.0)
    assert ev.of_origin([a, None], 1).checked_at is None  # a backend never checked
    assert ev.ages(ev.OriginTimes(9.5, 9.0, None), 10.0) == (0.5, 1.0)


def test_asks_owe_one_report_after_a_full_round_and_forget_when_lifted() -> None:
    asks = ev.Asks()
    assert asks.update(["v1"], 10.0) is True and asks.update(["v1"], 11.0) is False
    assert not asks.round_done("v1", 9.9)  # a round from before the ask
    assert asks.round_done("v1", 10.2) and not asks.round_done("v1", 10.5)  # once
    assert asks.update([], 12.0) is False and asks.since == {} and asks.owed == set()


# --- wire ------------------------------------------------------------------------------------
PUBLISHED = {"game-global": frozenset({"us-west", "eu-central"})}


def test_report_checks_round_trip_and_are_carried_whole_by_a_delta() -> None:
    full = WireReport(3, {"game-global": {"us-west": True}}, {"game-global": True}, 7,
                      checks={"game-global": {"us-west": (0.04, None)}})
    assert decode_report(encode_report(full), PUBLISHED) == full
    again = dataclasses.replace(full, seq=8, checks={"game-global": {"us-west": (0.01, 0.002)}})
    delta = report_delta(full, again)
    assert delta.origins == {} and delta.checks == again.checks
    assert decode_report(encode_report(delta), PUBLISHED).checks == again.checks
    assert "checks" not in encode_report(dataclasses.replace(full, checks={}))


def test_bad_report_checks_are_refused_by_name() -> None:
    body = encode_report(WireReport(3, {}, {}, 1))
    for checks, where in [({"other": {"us-west": {"ok": 1}}}, "checks.other"),
                          ({"game-global": {"mars": {"ok": 1}}}, "checks.game-global.mars"),
                          ({"game-global": {"us-west": {"ok": -1}}}, "checks.game-global.us-west.ok"),
                          ({"game-global": {"us-west": {"failing": True}}}, "checks.game-global.us-west.failing"),
                          ({"game-global": {"us-west": {"ok": 1, "x": 1}}}, "checks.game-global.us-west.x")]:
        try:
            decode_report({**body, "checks": checks}, PUBLISHED)
        except WireError as exc:
            assert exc.field == where, (checks, exc.field)
        else:
            raise AssertionError(f"accepted {checks}")


def test_a_plan_entry_asks_for_evidence_only_when_set_and_hashes_as_before_otherwise() -> None:
    from controller.policy.model import PlanItem

    item = PlanItem("game-global", True, "us-west", explanation="e")
    plain = entry_json(item, "h" * 32, None)
    assert "evidence" not in plain
    asked = entry_json(dataclasses.replace(item, evidence=True), "h" * 32, None)
    assert '"evidence":true' in asked
    before = entry_hash("game-global", "h" * 32, True, "us-west", False, "healthy", False, "e")
    assert entry_hash("game-global", "h" * 32, True, "us-west", False, "healthy", False, "e", False) == before
    assert entry_hash("game-global", "h" * 32, True, "us-west", False, "healthy", False, "e", True) != before
    import json
    delta = {"pop": "sjc", "generation": 2, "after": 1, "revision": "r", "digest": "", "removed": [], "specs": {},
             "vips": [json.loads(asked)]}
    answer = decode_plan_answer(delta, "sjc")
    assert answer.vips[0].evidence is True


# --- the agent -------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class NoPort:
    async def fetch_plan(self, after: int, wait: float) -> Plan | None:
        await asyncio.Event().wait()
        return None

    async def report(self, report: object) -> None:
        pass


def controlled(tmp_path: Path, clock: Clock) -> Agent:
    c = load_agent_config(str(EXAMPLE))
    cfg: AgentConfig = dataclasses.replace(c, state_dir=str(tmp_path / "state"), vips=(),
                                           controller=ControllerLink("http://127.0.0.1:1", str(tmp_path / "tok")))
    registry = CollectorRegistry()

    class Announcer:
        async def send(self, line: str) -> bool:
            return True

    return Agent(cfg, lambda: cfg, Announcer(), kernel=None, metrics=lambda snap: AgentMetrics(registry, snap),
                 clock=clock, scheduler_factory=IdleScheduler, controller=NoPort())


def plan(gen: int, *, evidence: bool = False) -> Plan:
    vip = load_agent_config(str(EXAMPLE)).vips[0]
    return Plan(PlanSource.CONTROLLER, gen, "abc",
                {vip.name: VipIntent(vip.name, True, "us-west", evidence=evidence)}, specs=(vip,))


def result(agent: Agent, clock: Clock, region: str, ok: bool, dt: float = 0.1) -> None:
    clock.t += dt
    for key in [k for k in agent.health if k[1] == region]:
        agent._on_result(key, ProbeResult(ok, 0.001, "ok" if ok else "connect refused"), clock.t)


def healthy(tmp_path: Path, clock: Clock, *regions: str) -> Agent:
    """An agent following plan 1, its backends of ``regions`` checked healthy three times."""
    agent = controlled(tmp_path, clock)
    agent.apply_plan(plan(1))
    for _ in range(3):
        for region in regions:
            result(agent, clock, region, True)
    agent.report_now.clear()
    return agent


def test_the_first_failed_check_of_the_active_origin_is_reported_at_once_with_its_age(tmp_path: Path) -> None:
    clock = Clock()
    agent = healthy(tmp_path, clock, "us-west", "eu-central")
    assert health_report(agent).checks == {}  # nothing failing, nothing asked: no check times
    result(agent, clock, "eu-central", False)  # a standby origin failing asks nobody
    assert not agent.report_now.is_set()
    result(agent, clock, "us-west", False)  # fall 2: still healthy (falling), but reported now
    first = clock.t
    assert agent.report_now.is_set()
    clock.t += 0.05
    report = health_report(agent)
    assert report.origins["game-global"]["us-west"] is True
    ok_age, failing_age = report.checks["game-global"]["us-west"]
    assert ok_age is None and abs(failing_age - (clock.t - first)) < 1e-9
    agent.report_now.clear()
    result(agent, clock, "us-west", False)  # the second failure: down, reported for the verdict
    assert agent.report_now.is_set() and health_report(agent).origins["game-global"]["us-west"] is False
    assert abs(health_report(agent).checks["game-global"]["us-west"][1] - (clock.t - first)) < 1e-9


def test_an_active_origin_rising_again_still_carries_its_times_with_no_failure_running(tmp_path: Path) -> None:
    """Down, its checks succeeding again (rising, short of rise): the report keeps the origin's
    times, first failed check None, so the controller knows this POP's failure is ending (it
    took its window's start for the failure's, and let it go on the others' checks)."""
    clock = Clock()
    agent = healthy(tmp_path, clock, "us-west", "eu-central")
    for _ in range(3):
        result(agent, clock, "us-west", False)  # down
    assert health_report(agent).checks["game-global"]["us-west"][1] is not None
    result(agent, clock, "us-west", True)  # one success: rising (rise > 1 in the example)
    report = health_report(agent)
    assert report.origins["game-global"]["us-west"] is False
    assert "us-west" in report.checks["game-global"] and report.checks["game-global"]["us-west"][1] is None
    for _ in range(3):
        result(agent, clock, "us-west", True)  # up: nothing failing, nothing asked
    assert health_report(agent).checks == {}


def test_an_ask_is_answered_at_once_and_after_the_next_round_of_checks(tmp_path: Path) -> None:
    clock = Clock()
    agent = healthy(tmp_path, clock, "us-west")
    last_ok = clock.t
    clock.t += 0.03
    agent.apply_plan(plan(2, evidence=True))
    assert agent.report_now.is_set()  # at once: the latest checks may already be recent enough
    report = health_report(agent)
    assert report.checks == {"game-global": {"us-west": (clock.t - last_ok, None)}}
    agent.report_now.clear()
    # us-west has two backends in the example: the round is complete when both were checked since
    key = next(k for k in agent.health if k[1] == "us-west")
    clock.t += 0.05
    agent._on_result(key, ProbeResult(True, 0.001, "ok"), clock.t)
    others = [k for k in agent.health if k[1] == "us-west" and k != key]
    if others:
        assert not agent.report_now.is_set()
        clock.t += 0.01
        for k in others:
            agent._on_result(k, ProbeResult(True, 0.001, "ok"), clock.t)
    assert agent.report_now.is_set()
    agent.report_now.clear()
    result(agent, clock, "us-west", True)  # owed once only: later rounds go at the usual interval
    assert not agent.report_now.is_set()
    assert "game-global" in health_report(agent).checks  # ...but every report carries them while asked
    agent.apply_plan(plan(3))
    assert health_report(agent).checks == {}


class ProbingScheduler(IdleScheduler):
    """Starts the probes the agent asks for at once (as CheckScheduler.check_now does
    with free slots); the test hands their results in."""

    def check_now(self, keys: object) -> bool:
        super().check_now(keys)  # type: ignore[arg-type]
        return True


def test_an_ask_probes_the_active_origin_at_once_and_reports_when_those_checks_are_in(tmp_path: Path) -> None:
    clock = Clock()
    agent = healthy(tmp_path, clock, "us-west")
    probing = ProbingScheduler(agent._on_result)
    probing.set_targets(agent.scheduler.targets)  # type: ignore[attr-defined]
    agent.scheduler = probing  # type: ignore[assignment]
    clock.t += 0.03
    agent.apply_plan(plan(2, evidence=True))
    us_west = {k for k in agent.health if k[1] == "us-west"}
    assert [set(keys) for keys in probing.asked] == [us_west]  # the active origin only, once
    # No report of the older checks first: the fresh ones come within a probe's time.
    assert not agent.report_now.is_set()
    result(agent, clock, "us-west", True, dt=0.002)
    assert agent.report_now.is_set()
    assert health_report(agent).checks == {"game-global": {"us-west": (0.0, None)}}
    agent.report_now.clear()
    agent.apply_plan(plan(3, evidence=True))  # the same ask again: no new probes, no report
    assert len(probing.asked) == 1 and not agent.report_now.is_set()


def test_a_failing_active_origin_carries_the_other_origins_ages_and_their_proof_is_reported(tmp_path: Path) -> None:
    """The proof an origin failover waits for (policy/origins.py): while us-west fails here
    the report carries eu-central's check ages too, and eu-central's first success after
    us-west's failure began is reported at once (once: the next success waits its turn)."""
    clock = Clock()
    agent = healthy(tmp_path, clock, "us-west", "eu-central")
    result(agent, clock, "us-west", False)
    first = clock.t
    agent.report_now.clear()
    clock.t += 0.01
    checks = health_report(agent).checks["game-global"]
    eu_ok, eu_failing = checks["eu-central"]
    assert eu_failing is None and eu_ok is not None and eu_ok > clock.t - first  # older than the failure: no proof
    result(agent, clock, "eu-central", True)  # checked after the failure began: the proof
    assert agent.report_now.is_set()
    checks = health_report(agent).checks["game-global"]
    assert checks["eu-central"][0] == 0.0 and checks["eu-central"][0] < checks["us-west"][1]
    agent.report_now.clear()
    result(agent, clock, "eu-central", True)
    assert not agent.report_now.is_set()
    result(agent, clock, "us-west", True)  # us-west recovers: no check ages at all again
    result(agent, clock, "us-west", True)
    assert health_report(agent).checks == {}


# --- asks that name their origins (traffic steering) --------------------------------------------
def test_asks_by_origin_are_new_again_when_their_origins_change() -> None:
    asks = ev.Asks()
    assert asks.update({"v1": ("eu-central",)}, 10.0) and asks.new == {"v1"}
    assert not asks.update({"v1": ("eu-central",)}, 10.5)
    assert asks.update({"v1": ("us-west", "eu-central")}, 11.0) and asks.since == {"v1": 11.0}
    assert not asks.round_done("v1", 10.9) and asks.round_done("v1", 11.1)
    assert ev.checked_at([ev.OriginTimes(None, None, 5.0), ev.OriginTimes(None, None, 4.0)]) == 4.0
    assert ev.checked_at([ev.OriginTimes(None, None, 5.0), ev.OriginTimes(None, None, None)]) is None


def test_an_ask_about_another_origin_probes_that_origin_and_reports_when_its_checks_are_in(tmp_path: Path) -> None:
    """The POP being confirmed judges eu-central (its own preference); this POP's active
    origin is us-west. It probes eu-central at once and reports eu-central's fresh age."""
    clock = Clock()
    agent = healthy(tmp_path, clock, "us-west", "eu-central")
    probing = ProbingScheduler(agent._on_result)
    probing.set_targets(agent.scheduler.targets)  # type: ignore[attr-defined]
    agent.scheduler = probing  # type: ignore[assignment]
    clock.t += 0.03
    asked = plan(2, evidence=True)
    asked = dataclasses.replace(asked, vips={n: dataclasses.replace(i, evidence_origins=("eu-central",))
                                             for n, i in asked.vips.items()})
    agent.apply_plan(asked)
    assert [set(keys) for keys in probing.asked] == [{k for k in agent.health if k[1] == "eu-central"}]
    assert not agent.report_now.is_set()
    result(agent, clock, "us-west", True, dt=0.002)  # (not the origin asked about)
    assert not agent.report_now.is_set()
    result(agent, clock, "eu-central", True, dt=0.002)
    assert agent.report_now.is_set()
    assert health_report(agent).checks["game-global"]["eu-central"] == (0.0, None)


def _entry(**extra: object) -> dict:
    from controller.config.serialize import vip_to_dict

    vip = load_agent_config(str(EXAMPLE)).vips[0]
    return {"name": vip.name, "spec": vip_to_dict(vip), "wanted": True, "active_origin": "us-west", "drain": False,
            "reason": "healthy", "safety_hold": False, "explanation": "", **extra}


def test_evidence_origins_travel_outside_the_digest_and_absent_means_the_active_origin() -> None:
    """A controller one version older sends no ``evidence_origins``: the agent asks about its
    active origin, as before. One that names them: an agent one version older ignores them,
    and the digest is the same for both (its plan still checks)."""
    from controller.agent.plan_wire import PlanBook
    from controller.policy.model import PlanItem
    from controller.wire import vip_entry_hash

    old = decode_plan_answer({"pop": "sjc", "generation": 1, "revision": "r", "vips": [_entry(evidence=True)]}, "sjc")
    new = decode_plan_answer({"pop": "sjc", "generation": 1, "revision": "r",
                              "vips": [_entry(evidence=True, evidence_origins=["eu-central"])]}, "sjc")
    assert old.vips[0].evidence_origins == () and new.vips[0].evidence_origins == ("eu-central",)
    assert vip_entry_hash(old.vips[0]) == vip_entry_hash(new.vips[0])
    book = PlanBook("sjc", load_agent_config(str(EXAMPLE)).allowed_prefixes)
    assert book.apply(old).vips["game-global"].asked == ("us-west",)
    assert book.apply(new).vips["game-global"].asked == ("eu-central",)
    item = PlanItem("game-global", True, "us-west", evidence=True, evidence_origins=("eu-central",))
    assert '"evidence_origins":["eu-central"]' in entry_json(item, "h" * 32, None)
    assert "evidence_origins" not in entry_json(dataclasses.replace(item, evidence_origins=()), "h" * 32, None)


def test_a_change_of_the_origins_asked_alone_is_a_new_plan() -> None:
    from controller.config.serialize import vip_to_dict
    from controller.policy.model import PlanItem
    from controller.server.plans import PlanStore

    vip = load_agent_config(str(EXAMPLE)).vips[0]
    store, specs = PlanStore(), {vip.name: vip_to_dict(vip)}
    item = PlanItem(vip.name, True, "us-west", evidence=True)
    g1 = store.serve("sjc", {vip.name: item}, specs, "r", 0)
    g2 = store.serve("sjc", {vip.name: dataclasses.replace(item, evidence_origins=("eu-central",))}, specs, "r", 0)
    assert g1 is not None and g2 is not None and g2 > g1


@pytest.mark.parametrize("extra, field", [
    ({"evidence_origins": ["eu-central"]}, "vips[0].evidence_origins"),  # without evidence
    ({"evidence": True, "evidence_origins": []}, "vips[0].evidence_origins"),
    ({"evidence": True, "evidence_origins": "eu-central"}, "vips[0].evidence_origins"),
    ({"evidence": True, "evidence_origins": ["eu-central", 3]}, "vips[0].evidence_origins[1]"),
    ({"evidence": True, "evidence_origins": ["eu-central", "eu-central"]}, "vips[0].evidence_origins[1]"),
])
def test_bad_evidence_origins_are_refused_by_name(extra: dict, field: str) -> None:
    with pytest.raises(WireError) as info:
        decode_plan_answer({"pop": "sjc", "generation": 1, "revision": "r", "vips": [_entry(**extra)]}, "sjc")
    assert info.value.field == field


def test_an_asked_origin_the_vip_does_not_have_is_refused_by_name() -> None:
    from controller.agent.plan_wire import PlanBook

    answer = decode_plan_answer({"pop": "sjc", "generation": 1, "revision": "r",
                                 "vips": [_entry(evidence=True, evidence_origins=["mars"])]}, "sjc")
    with pytest.raises(WireError) as info:
        PlanBook("sjc", load_agent_config(str(EXAMPLE)).allowed_prefixes).apply(answer)
    assert info.value.field == "vips[0].evidence_origins[0]" and "mars" in str(info.value)
