"""The agent's loop with a recording announcer, a fake kernel and injected check results.

No ExaBGP, no sleeping: results are fed to the agent as the scheduler would, and each
reconcile pass is awaited directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.helpers.agent_fakes import IdleScheduler
from controller.agent import state_file
from controller.agent.daemon import Agent
from controller.config.agent import load_agent_config
from controller.config.errors import ConfigError, ConfigIssue
from controller.config.model import AgentConfig
from controller.health.probes import ProbeResult
from controller.kernel.diff import KernelRoute
from controller.metrics.agent import AgentMetrics

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "agent-sjc.yaml"
P = ipaddress.ip_network("198.51.100.10/32")
ANNOUNCE_UP = "announce route 198.51.100.10/32 next-hop self med 100 community [ 65101:100 ]"
WITHDRAW = "withdraw route 198.51.100.10/32"


class RecordingAnnouncer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.fail: set[str] = set()

    async def send(self, line: str) -> bool:
        self.lines.append(line)
        return line not in self.fail


class FakeKernel:
    def __init__(self) -> None:
        self.routes: set[KernelRoute] = set()
        self.addresses: set = set()
        self.broken = False

    def read_routes(self) -> set[KernelRoute]:
        return set(self.routes)

    def sync_routes(self, desired: Iterable[KernelRoute]) -> None:
        if self.broken:
            raise OSError("netlink said no")
        self.routes = set(desired)

    def read_addresses(self) -> set:
        return set(self.addresses)

    def sync_addresses(self, desired: Iterable) -> None:
        self.addresses = set(desired)

    def close(self) -> None:
        pass


def config(tmp_path: Path, **changes: object) -> AgentConfig:
    c = load_agent_config(str(EXAMPLE))
    return dataclasses.replace(c, state_dir=str(tmp_path / "state"), **changes)


def make_agent(cfg: AgentConfig, loader: Callable[[], AgentConfig] | None = None) -> tuple[Agent, RecordingAnnouncer, FakeKernel, CollectorRegistry]:
    registry = CollectorRegistry()
    announcer, kernel = RecordingAnnouncer(), FakeKernel()
    agent = Agent(cfg, loader or (lambda: cfg), announcer, kernel=kernel,
                  metrics=lambda snap: AgentMetrics(registry, snap), clock=lambda: 1000.0,
                  scheduler_factory=IdleScheduler)
    return agent, announcer, kernel, registry


def feed(agent: Agent, region: str, ok: bool, times: int = 1) -> None:
    """Every backend of ``region`` answers ``ok`` (``times`` rounds)."""
    for _ in range(times):
        for key in list(agent.health):
            if key[1] == region:
                agent._on_result(key, ProbeResult(ok, 0.001, "ok" if ok else "connect refused"), 0.0)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_fresh_agent_announces_only_after_rise_successes(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, kernel, _ = make_agent(config(tmp_path))
        await agent.reconcile_once()
        assert bgp.lines == []  # no verdict yet: hold, neither announce nor withdraw
        feed(agent, "us-west", True)  # 1 of rise=2
        await agent.reconcile_once()
        assert bgp.lines == []
        feed(agent, "us-west", True)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP]
        assert kernel.routes == {KernelRoute(P, ipaddress.ip_address("100.64.10.1"))}
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP]  # level-based: nothing new to send
        assert state_file.load(agent.config.state_dir) == {P: agent.config.vips[0].attributes.up}

    run(scenario())


def test_withdraw_after_fall_failures_with_reason(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, kernel, registry = make_agent(config(tmp_path))
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        feed(agent, "us-west", False)  # fall=2: one failure keeps it (falling)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP]
        feed(agent, "us-west", False)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP, WITHDRAW]
        assert kernel.routes == set()
        assert registry.get_sample_value("anycast_announcement_changes_total",
                                         {"vip": "game-global", "action": "withdraw", "reason": "backend_down"}) == 1
        assert registry.get_sample_value("anycast_vip_reason",
                                         {"vip": "game-global", "reason": "backend_down", "origin": "us-west"}) == 1
        assert registry.get_sample_value("anycast_vip_announced", {"vip": "game-global", "prefix": str(P)}) == 0
        backend = {"vip": "game-global", "origin": "us-west", "backend": "100.64.10.1:8080"}
        assert registry.get_sample_value("anycast_backend_healthy", backend) == 0
        assert registry.get_sample_value("anycast_backend_last_check_ok", backend) == 0
        assert registry.get_sample_value("anycast_backend_last_check_duration_seconds", backend) == 0.001
        assert registry.get_sample_value("anycast_checks_total",
                                         {"vip": "game-global", "origin": "us-west", "result": "fail"}) == 4

    run(scenario())


def test_restarted_agent_keeps_a_route_exabgp_kept_until_checks_decide(tmp_path: Path) -> None:
    """ExaBGP respawned us and still announces P: no withdraw while the checks have no
    verdict, no flap when they confirm it, a withdraw only after fall failures."""
    cfg = config(tmp_path)
    state_file.save(cfg.state_dir, {P: cfg.vips[0].attributes.up})

    async def scenario() -> None:
        agent, bgp, kernel, _ = make_agent(cfg)
        kernel.routes = {KernelRoute(P, ipaddress.ip_address("100.64.10.1"))}
        await agent.reconcile_once()
        feed(agent, "us-west", False)  # one failure: still no verdict (fall=2)
        await agent.reconcile_once()
        assert bgp.lines == []
        assert kernel.routes  # the kernel route stays while held
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        # Sent once, identical to what ExaBGP holds: BGP sees no change, no withdraw ever.
        assert bgp.lines == [ANNOUNCE_UP]

    run(scenario())


def test_restarted_agent_withdraws_prefix_no_longer_configured(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    gone = ipaddress.ip_network("198.51.100.99/32")
    state_file.save(cfg.state_dir, {P: cfg.vips[0].attributes.up, gone: cfg.vips[0].attributes.up})

    async def scenario() -> None:
        agent, bgp, _, registry = make_agent(cfg)
        await agent.reconcile_once()
        assert bgp.lines == ["withdraw route 198.51.100.99/32"]  # P is held, gone is withdrawn
        assert registry.get_sample_value("anycast_announcement_changes_total",
                                         {"vip": "198.51.100.99", "action": "withdraw",
                                          "reason": "not_in_config"}) == 1

    run(scenario())


def test_bad_reload_keeps_config_and_announcements(tmp_path: Path) -> None:
    good = config(tmp_path)
    loads: list[AgentConfig | ConfigError] = []

    def loader() -> AgentConfig:
        item = loads.pop(0)
        if isinstance(item, ConfigError):
            raise item
        return item

    async def scenario() -> None:
        agent, bgp, _, registry = make_agent(good, loader)
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        loads.append(ConfigError("agent.yaml", [ConfigIssue("vips[0].check.rise", "must be >= 1, got 0")]))
        assert agent.reload() is False
        await agent.reconcile_once()
        assert agent.config is good
        assert bgp.lines == [ANNOUNCE_UP]
        assert registry.get_sample_value("anycast_config_last_reload_successful") == 0
        assert registry.get_sample_value("anycast_config_reloads_total", {"result": "failure"}) == 1
        # A good reload that takes the VIP down: withdrawn, with the admin reason.
        loads.append(dataclasses.replace(good, vips=(dataclasses.replace(good.vips[0], admin="down"),)))
        assert agent.reload() is True
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP, WITHDRAW]
        assert agent.decisions["game-global"].reason == "admin_down"
        assert registry.get_sample_value("anycast_config_last_reload_successful") == 1

    run(scenario())


def test_exabgp_error_is_retried_on_the_next_pass(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, _, registry = make_agent(config(tmp_path))
        bgp.fail.add(ANNOUNCE_UP)
        feed(agent, "us-west", True, 2)
        assert await agent.reconcile_once() is False
        bgp.fail.clear()
        assert await agent.reconcile_once() is True
        assert bgp.lines == [ANNOUNCE_UP, ANNOUNCE_UP]
        assert registry.get_sample_value("anycast_exabgp_command_errors_total") == 1

    run(scenario())


def test_kernel_failure_does_not_stop_bgp(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, kernel, registry = make_agent(config(tmp_path))
        kernel.broken = True
        feed(agent, "us-west", True, 2)
        assert await agent.reconcile_once() is False
        assert bgp.lines == [ANNOUNCE_UP]
        assert registry.get_sample_value("anycast_kernel_sync_errors_total") >= 1

    run(scenario())


@pytest.mark.parametrize("mode, expected", [("withdraw", [ANNOUNCE_UP, WITHDRAW]), ("keep", [ANNOUNCE_UP])])
def test_shutdown_withdraws_or_keeps(tmp_path: Path, mode: str, expected: list[str]) -> None:
    async def scenario() -> None:
        agent, bgp, kernel, _ = make_agent(config(tmp_path, shutdown=mode))
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        agent.stop("SIGTERM")
        await agent.shutdown()
        assert bgp.lines == expected
        assert bool(kernel.routes) is (mode == "keep")

    run(scenario())


def test_standby_origin_health_does_not_change_the_decision(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, _, _ = make_agent(config(tmp_path))
        feed(agent, "us-west", True, 2)
        feed(agent, "eu-central", False, 2)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP]

    run(scenario())


def test_systemd_readiness_and_watchdog_pings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """READY=1 after the first reconcile, then WATCHDOG=1 at least every WatchdogSec/2."""
    import socket

    from controller.sdnotify import Notifier

    sock_path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    server.settimeout(60)  # a hang guard: pings are due every 50 ms
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # WatchdogSec=0.1 s -> ping every 50 ms

    async def scenario() -> list[str]:
        registry = CollectorRegistry()
        cfg = config(tmp_path)
        agent = Agent(cfg, lambda: cfg, RecordingAnnouncer(), kernel=None,
                      metrics=lambda snap: AgentMetrics(registry, snap), notifier=Notifier(sock_path),
                      scheduler_factory=IdleScheduler)
        task = asyncio.create_task(agent.run())
        messages: list[str] = []
        loop = asyncio.get_running_loop()
        # Until two pings: under load a ping can be skipped (the probe's answer older than the
        # 50 ms interval), never withheld for good.
        while sum(m.startswith("WATCHDOG=1") for m in messages) < 2:
            messages.append((await loop.run_in_executor(None, server.recv, 4096)).decode())
        agent.stop("test")
        assert await task == 0
        return messages

    try:
        messages = run(scenario())
    finally:
        server.close()
    assert messages[0].startswith("READY=1\nSTATUS=0/1 VIPs announced; config ok")
    assert all(m.startswith("WATCHDOG=1") for m in messages[1:])


class SilentExaBGP(RecordingAnnouncer):
    """Acks routes but never answers the liveness probe: a wedged ExaBGP reactor."""

    async def send(self, line: str) -> bool:
        if line == "enable-ack":
            await asyncio.Event().wait()
        return await super().send(line)


@pytest.mark.parametrize("answers", [True, False])
def test_watchdog_pings_only_while_exabgp_answers_the_probe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: bool) -> None:
    """WATCHDOG=1 needs a ``done`` to the probe within the interval; a silent ExaBGP gets none."""
    import socket

    from controller.sdnotify import Notifier

    sock_path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    server.settimeout(60)  # a hang guard: messages are due every 50 ms
    monkeypatch.setenv("WATCHDOG_USEC", "100000")

    async def scenario() -> tuple[list[str], list[str]]:
        registry = CollectorRegistry()
        cfg = config(tmp_path)
        bgp = RecordingAnnouncer() if answers else SilentExaBGP()
        agent = Agent(cfg, lambda: cfg, bgp, kernel=None,
                      metrics=lambda snap: AgentMetrics(registry, snap), notifier=Notifier(sock_path),
                      scheduler_factory=IdleScheduler)
        task = asyncio.create_task(agent.run())
        messages: list[str] = []
        loop = asyncio.get_running_loop()
        # Answering: until a ping (under load one can be skipped). Silent: four messages.
        while (not any(m.startswith("WATCHDOG=1") for m in messages)) if answers else len(messages) < 4:
            messages.append((await loop.run_in_executor(None, server.recv, 4096)).decode())
        agent.stop("test")
        assert await task == 0
        return messages, bgp.lines

    try:
        messages, lines = run(scenario())
    finally:
        server.close()
    assert messages[0].startswith("READY=1")
    if answers:
        assert "enable-ack" in lines
    else:
        assert "enable-ack" not in lines
        assert not any("WATCHDOG=1" in m for m in messages)
        assert all(m.endswith("; ExaBGP not answering") for m in messages[1:])


# --- controller mode ---------------------------------------------------------------------------
from controller.agent.controller_link import (  # noqa: E402
    ControllerUnavailable, HealthReport, follow_plans, health_report, report_health,
)
from controller.agent.intent import Plan, VipIntent  # noqa: E402
from controller.config.model import ControllerLink  # noqa: E402


def controller_config(tmp_path: Path) -> AgentConfig:
    c = config(tmp_path)
    return dataclasses.replace(c, vips=(), controller=ControllerLink("http://127.0.0.1:1", str(tmp_path / "tok")))


def controller_plan(gen: int, wanted: bool = True, drain: bool = False, safety_hold: bool = False) -> Plan:
    vip = load_agent_config(str(EXAMPLE)).vips[0]
    return Plan("controller", gen, "abc123",
                {vip.name: VipIntent(vip.name, wanted, "us-west", drain, "" if wanted else "not_in_plan",
                                     safety_hold)}, specs=(vip,))


def test_controller_mode_without_a_plan_withdraws_nothing(tmp_path: Path) -> None:
    """Restarted while the controller is down and with no cached plan: keep what ExaBGP has."""
    cfg = controller_config(tmp_path)
    state_file.save(cfg.state_dir, {P: load_agent_config(str(EXAMPLE)).vips[0].attributes.up})

    async def scenario() -> None:
        agent, bgp, _, _ = make_agent(cfg)
        assert agent.plan.source == "none" and agent.vips == ()
        await agent.reconcile_once()
        assert bgp.lines == []

    run(scenario())


def test_controller_plan_brings_vip_specs_and_removal_withdraws_not_in_plan(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, _, registry = make_agent(controller_config(tmp_path))
        agent.apply_plan(controller_plan(1))
        assert {k[1] for k in agent.health} == {"us-west", "eu-central"}  # checks come from the plan
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP]
        agent.apply_plan(Plan("controller", 2, "def456", {}, specs=()))  # publish domain changed
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP, WITHDRAW]
        assert registry.get_sample_value("anycast_announcement_changes_total",
                                         {"vip": "198.51.100.10", "action": "withdraw", "reason": "not_in_plan"}) == 1
        assert registry.get_sample_value("anycast_plan_generation") == 2

    run(scenario())


def test_new_plan_generations_do_not_repeat_a_withdrawal_already_made(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, _, _ = make_agent(controller_config(tmp_path))
        agent.apply_plan(controller_plan(1))
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        agent.apply_plan(controller_plan(2, wanted=False))
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP, WITHDRAW]
        agent.apply_plan(controller_plan(3, wanted=False))  # e.g. a dampening hold-down goes on
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP, WITHDRAW]
        agent.apply_plan(controller_plan(4))
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP, WITHDRAW, ANNOUNCE_UP]

    run(scenario())


def test_safety_hold_from_the_controller_keeps_a_locally_down_vip(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, _, _ = make_agent(controller_config(tmp_path))
        agent.apply_plan(controller_plan(1, safety_hold=True))
        feed(agent, "us-west", False, 2)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP]
        assert agent.decisions["game-global"].reason == "safety_hold"

    run(scenario())


class FakePort:
    def __init__(self, answers: list) -> None:
        self.answers = answers
        self.reports: list[HealthReport] = []
        self.afters: list[int] = []

    async def fetch_plan(self, after: int, wait: float) -> Plan | None:
        self.afters.append(after)
        if not self.answers:
            await asyncio.Event().wait()
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def report(self, report: HealthReport) -> None:
        self.reports.append(report)


@pytest.mark.parametrize("failures", [
    (ControllerUnavailable("connection refused"), ControllerUnavailable("connection refused")),
    # Errors nobody foresaw (a RecursionError from a hostile plan) used to end the task
    # silently while reports kept flowing: the controller saw a healthy POP that no longer
    # obeyed it.
    (RecursionError("maximum recursion depth exceeded"), KeyError("vips")),
], ids=["outage", "unforeseen errors"])
def test_plans_are_followed_through_controller_outages(tmp_path: Path, failures: tuple[Exception, ...]) -> None:
    from tenacity import wait_none

    async def scenario() -> None:
        agent, _, _, registry = make_agent(controller_config(tmp_path))
        states: list[bool] = []
        port = FakePort([controller_plan(1), *failures, controller_plan(2, drain=True)])
        task = asyncio.create_task(follow_plans(agent, port, 30, states.append, backoff=wait_none()))
        for _ in range(100):
            await asyncio.sleep(0)
            if agent.plan.generation == 2:
                break
        assert not task.done()
        task.cancel()
        assert agent.plan.generation == 2 and agent.plan.vips["game-global"].drain
        assert states == [True, False, False, True]  # the agent kept plan 1 during the outage
        assert port.afters == [-1, 1, 1, 1, 2]  # long-polls for anything newer than what it has

    run(scenario())


def test_a_report_that_gets_through_ends_the_plan_fetch_backoff(tmp_path: Path) -> None:
    """The controller is back (a health report got through): fetch the plan now, not after
    the backoff, because a withdrawal may be waiting for the answer that comes with it."""
    from tenacity import wait_fixed

    async def scenario() -> None:
        agent, _, _, _ = make_agent(controller_config(tmp_path))
        port = FakePort([ControllerUnavailable("connection refused"), controller_plan(1)])
        reached = asyncio.Event()
        task = asyncio.create_task(follow_plans(agent, port, 30, backoff=wait_fixed(3600), retry_now=reached))
        for _ in range(20):
            await asyncio.sleep(0)
        assert port.afters == [-1] and agent.plan.generation == 0  # backing off for an hour
        reports = FakePort([])
        reporter = asyncio.create_task(report_health(agent, reports, 30, reached=reached))
        await asyncio.wait_for(_until(lambda: agent.plan.generation == 1), 60)  # well before the backoff ends
        task.cancel()
        reporter.cancel()
        assert port.afters[:2] == [-1, -1] and len(reports.reports) == 1

    run(scenario())


async def _until(done: Callable[[], bool]) -> None:
    while not done():
        await asyncio.sleep(0.001)


def test_health_report_gives_per_origin_verdicts_and_announcements(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, _, _, _ = make_agent(controller_config(tmp_path))
        agent.apply_plan(controller_plan(3))
        feed(agent, "us-west", True, 2)
        feed(agent, "eu-central", False, 2)
        await agent.reconcile_once()
        report = health_report(agent)
        assert report == HealthReport("sjc", 3, {"game-global": {"us-west": True, "eu-central": False}},
                                      {"game-global": True})
        port = FakePort([])
        task = asyncio.create_task(report_health(agent, port, 0.01))
        await asyncio.wait_for(_until(lambda: bool(port.reports)), 60)
        task.cancel()
        assert port.reports and port.reports[0] == report

    run(scenario())


def test_report_health_keeps_reporting_after_an_unexpected_error(tmp_path: Path) -> None:
    """An exception nobody foresaw (not ControllerUnavailable) in one report does not end the
    reporting task: the next report is still sent (a dead task leaves the controller with a
    stale report, and this POP's withdrawals unconfirmed, until the agent restarts)."""
    async def scenario() -> None:
        agent, _, _, _ = make_agent(controller_config(tmp_path))
        agent.apply_plan(controller_plan(3))
        sent: list[HealthReport] = []
        calls = [0]

        class Flaky(FakePort):
            async def report(self, report: HealthReport) -> None:
                calls[0] += 1
                if calls[0] == 1:
                    raise RuntimeError("Session is closed")
                sent.append(report)

        task = asyncio.create_task(report_health(agent, Flaky([]), 0.01))
        await asyncio.wait_for(_until(lambda: bool(sent)), 60)
        assert not task.done()
        task.cancel()
        assert calls[0] >= 2 and sent[0].pop == "sjc"

    run(scenario())


def test_withdrawal_waits_for_the_controller_which_confirms_or_holds(tmp_path: Path) -> None:
    """With a reachable controller, a local failure is reported at once and the withdrawal
    waits (a few seconds at most) for the controller's verdict."""
    now = [1000.0]

    async def scenario() -> None:
        registry = CollectorRegistry()
        bgp = RecordingAnnouncer()
        cfg = controller_config(tmp_path)
        agent = Agent(cfg, lambda: cfg, bgp, kernel=FakeKernel(), metrics=lambda snap: AgentMetrics(registry, snap),
                      clock=lambda: now[0], scheduler_factory=IdleScheduler, controller=FakePort([]))
        agent.controller_ok = True
        agent.apply_plan(controller_plan(1))
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP]
        agent.report_now.clear()
        feed(agent, "us-west", False, 2)
        assert agent.report_now.is_set()  # the report goes out now, not at the next interval
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP]  # held while the controller looks at it
        assert agent.decisions["game-global"].reason == "awaiting_controller"
        # The controller says: every POP sees this, hold it (safety valve).
        agent.apply_plan(controller_plan(2, safety_hold=True))
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP] and agent.decisions["game-global"].reason == "safety_hold"
        # Long after: the hold lifts but the controller is still settling (not yet "go").
        # The hold was an answer: the agent waits again instead of going on its own at once.
        now[0] += 30
        await agent.reconcile_once()
        agent.apply_plan(controller_plan(3))
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP] and agent.decisions["game-global"].reason == "awaiting_controller"
        # Later it confirms the withdrawal for this POP.
        plan4 = controller_plan(4)
        plan4 = dataclasses.replace(plan4, vips={"game-global": dataclasses.replace(
            plan4.vips["game-global"], reason="backend_down")})
        agent.apply_plan(plan4)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP, WITHDRAW]

    run(scenario())


@pytest.mark.parametrize("controller_ok, waited, withdrawn", [
    (True, 0.5, False),   # within confirm_timeout (2 s): hold
    (True, 2.5, True),    # the controller did not answer in time: withdraw on our own
    (False, 0.0, True),   # controller unreachable: no waiting at all (static stability)
])
def test_withdrawal_does_not_wait_forever(tmp_path: Path, controller_ok: bool, waited: float,
                                          withdrawn: bool) -> None:
    now = [1000.0]

    async def scenario() -> None:
        registry = CollectorRegistry()
        bgp = RecordingAnnouncer()
        cfg = controller_config(tmp_path)
        agent = Agent(cfg, lambda: cfg, bgp, kernel=FakeKernel(), metrics=lambda snap: AgentMetrics(registry, snap),
                      clock=lambda: now[0], scheduler_factory=IdleScheduler, controller=FakePort([]))
        agent.controller_ok = controller_ok
        agent.apply_plan(controller_plan(1))
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        feed(agent, "us-west", False, 2)
        await agent.reconcile_once()
        now[0] += waited
        await agent.reconcile_once()
        assert (WITHDRAW in bgp.lines) is withdrawn

    run(scenario())


class FakeTimer:
    def __init__(self, delay: float, callback: Callable[[], object]) -> None:
        self.delay, self.callback = delay, callback
        self.done = False  # cancelled, or fired

    def cancel(self) -> None:
        self.done = True

    def fire(self) -> None:
        self.done = True
        self.callback()


class TimerSpy:
    """Stands in for the loop's call_later: records the agent's timers and never runs them
    on its own (a test fires one when it wants), so a slow machine changes nothing."""

    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []

    def __call__(self, delay: float, callback: Callable[[], object]) -> FakeTimer:
        self.timers.append(FakeTimer(delay, callback))
        return self.timers[-1]

    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.done]


def two_vip_plan(gen: int) -> Plan:
    a = load_agent_config(str(EXAMPLE)).vips[0]
    b = dataclasses.replace(a, name="game-b", prefix=ipaddress.ip_network("198.51.100.11/32"))
    return Plan("controller", gen, "abc123", {v.name: VipIntent(v.name, True, "us-west") for v in (a, b)},
                specs=(a, b))


def feed_vip(agent: Agent, vip: str, ok: bool, times: int) -> None:
    for _ in range(times):
        for key in [k for k in agent.health if k[0] == vip]:
            agent._on_result(key, ProbeResult(ok, 0.001, "ok" if ok else "connect refused"), 0.0)


def test_many_passes_while_awaiting_the_controller_arm_one_timer_at_the_earliest_deadline(tmp_path: Path) -> None:
    """The loop is woken once, at the first deadline of all waiting VIPs; passes in between
    neither pile up timers nor move it; when nothing waits any more no timer is left."""
    now = [1000.0]

    async def scenario() -> None:
        spy = TimerSpy()
        asyncio.get_running_loop().call_later = spy  # type: ignore[method-assign, assignment]
        registry = CollectorRegistry()
        bgp = RecordingAnnouncer()
        cfg = controller_config(tmp_path)
        agent = Agent(cfg, lambda: cfg, bgp, kernel=FakeKernel(), metrics=lambda snap: AgentMetrics(registry, snap),
                      clock=lambda: now[0], scheduler_factory=IdleScheduler, controller=FakePort([]))
        agent.controller_ok = True
        agent.apply_plan(two_vip_plan(1))
        feed_vip(agent, "game-global", True, 2)
        feed_vip(agent, "game-b", True, 2)
        await agent.reconcile_once()
        assert spy.live() == []  # nothing waits: no timer
        feed_vip(agent, "game-global", False, 2)  # down at 1000: deadline 1002
        for _ in range(50):
            await agent.reconcile_once()
        assert [t.delay for t in spy.live()] == [2.0]
        now[0] += 0.5
        feed_vip(agent, "game-b", False, 2)  # down at 1000.5: deadline 1002.5, later than game-global's
        for _ in range(50):
            await agent.reconcile_once()
            now[0] += 0.01
        assert len(spy.timers) == 1 and [t.delay for t in spy.live()] == [2.0]  # the same timer throughout
        assert {d.vip: d.reason for d in agent.decisions.values()} == {
            "game-global": "awaiting_controller", "game-b": "awaiting_controller"}
        # game-global's deadline passes: it goes, and the one timer moves to game-b's deadline.
        now[0] = 1002.0
        await agent.reconcile_once()
        assert agent.decisions["game-global"].reason == "backend_down"
        assert [t.delay for t in spy.live()] == [pytest.approx(0.5)]
        # The timer's only job is to wake the loop for the pass that lets the withdrawal go.
        agent._dirty.clear()
        spy.live()[0].fire()
        assert agent._dirty.is_set()
        await agent.reconcile_once()  # game-b still waits: a timer again, for what is left
        assert [t.delay for t in spy.live()] == [pytest.approx(0.5)] and len(spy.timers) == 3
        # The controller confirms game-b: nothing waits any more, and no timer is left.
        plan = two_vip_plan(2)
        agent.apply_plan(dataclasses.replace(plan, vips={**plan.vips, "game-b": dataclasses.replace(
            plan.vips["game-b"], reason="backend_down")}))
        await agent.reconcile_once()
        assert agent.decisions["game-b"].reason == "backend_down"
        assert spy.live() == []

    run(scenario())


class CountingVips(tuple):  # type: ignore[type-arg]
    """A plan's VIP specs that count how often someone walks through them."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        CountingVips.walks += 1
        return super().__iter__()


def test_a_probe_result_finds_its_vip_by_name_without_scanning_the_vips(tmp_path: Path) -> None:
    """On every probe result the agent looks its VIP up by name: indexed once per plan, not a
    walk through every VIP per result; a new plan's VIP definitions are the ones found."""
    base = load_agent_config(str(EXAMPLE)).vips[0]
    many = [dataclasses.replace(base, name=f"vip-{i}", prefix=ipaddress.ip_network(f"198.51.100.{i}/32"))
            for i in range(100, 200)]

    def plan(gen: int, fall: int) -> Plan:
        vips = [dataclasses.replace(v, check=dataclasses.replace(v.check, rise=1, fall=fall)) for v in many]
        return Plan("controller", gen, "abc", {v.name: VipIntent(v.name, True, "us-west") for v in vips},
                    specs=CountingVips(vips))

    agent, _, _, _ = make_agent(controller_config(tmp_path))
    agent.apply_plan(plan(1, fall=3))
    CountingVips.walks = 0
    keys = list(agent.health)
    for _ in range(3):
        for key in keys:
            agent._on_result(key, ProbeResult(True, 0.001, "ok"), 0.0)
    assert len(keys) >= 100 and CountingVips.walks <= 1  # 3 results per backend, one index build
    assert all(s.healthy for s in agent.health.values())  # rise=1, from the plan's definitions
    key = next(k for k in keys if k[0] == "vip-150")
    agent._on_result(key, ProbeResult(False, 0.001, "refused"), 0.0)
    assert agent.health[key].phase.value == "falling"  # fall=3
    agent.apply_plan(plan(2, fall=1))
    agent._on_result(key, ProbeResult(False, 0.001, "refused"), 0.0)
    assert agent.health[key].phase.value == "down"  # fall=1: the new plan's definition was found
    assert agent.vip("vip-150") is agent.plan.specs[50]  # type: ignore[index]
    assert agent.vip("nope") is None


def test_check_targets_carry_the_watch_and_fall_and_vips_on_one_backend_share_a_probe(tmp_path: Path) -> None:
    from controller.agent.daemon import check_targets

    cfg = config(tmp_path)
    vip = cfg.vips[0]
    twin = dataclasses.replace(vip, name="twin", prefix=ipaddress.ip_network("198.51.100.99/32"))
    quiet = dataclasses.replace(vip, name="quiet", prefix=ipaddress.ip_network("198.51.100.98/32"),
                                check=dataclasses.replace(vip.check, watch=False))
    targets = check_targets([vip, twin, quiet])
    assert all(t.watch == (t.key[0] != "quiet") and t.fall == vip.check.fall for t in targets.values())
    # vip and twin check each backend the same way: one probe per backend for both (the
    # scheduler groups by Target.group); quiet does not watch, so it has its own.
    backends = {b for o in vip.origins for b in o.backends}
    assert len({t.group for t in targets.values()}) == 2 * len(backends)
    assert len(targets) == 3 * len(backends)


# --- one VIP's failure is contained (issue 14: a crash loop would withdraw every VIP) -------
def poisoned_config(tmp_path: Path) -> AgentConfig:
    """game-global plus a VIP whose attributes ExaBGP's encoder refuses (as a reader bug would let through)."""
    from controller.config.model import Attributes, StateAttributes

    c = config(tmp_path)
    good = c.vips[0]
    bad = dataclasses.replace(good, name="poisoned", prefix=ipaddress.ip_network("198.51.100.11/32"),
                              attributes=StateAttributes(Attributes(med=1, communities=("bogus",)),
                                                         good.attributes.draining))
    return dataclasses.replace(c, vips=(good, bad))


def test_a_vip_whose_command_cannot_be_built_is_refused_and_the_others_announce(tmp_path: Path) -> None:
    cfg = poisoned_config(tmp_path)
    bad_prefix = ipaddress.ip_network("198.51.100.11/32")
    # A previous agent announced it: it must now be withdrawn, not left with stale attributes.
    state_file.save(cfg.state_dir, {bad_prefix: cfg.vips[0].attributes.up})

    async def scenario() -> None:
        agent, bgp, kernel, registry = make_agent(cfg)
        feed(agent, "us-west", True, 2)
        assert await agent.reconcile_once() is True
        assert bgp.lines == [ANNOUNCE_UP, "withdraw route 198.51.100.11/32"]
        assert kernel.routes == {KernelRoute(P, ipaddress.ip_address("100.64.10.1"))}  # none for the refused one
        assert registry.get_sample_value("anycast_vip_refused_total", {"vip": "poisoned", "stage": "encode"}) == 1
        assert registry.get_sample_value("anycast_vip_reason",
                                         {"vip": "poisoned", "reason": "refused", "origin": ""}) == 1
        assert agent.decisions["poisoned"].detail.startswith("encode failed: communities:")
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP, "withdraw route 198.51.100.11/32"]  # level-based: nothing new
        assert registry.get_sample_value("anycast_vip_refused_total",
                                         {"vip": "poisoned", "stage": "encode"}) == 1  # counted once

    run(scenario())


def test_vips_sharing_unbuildable_attributes_are_each_refused_and_those_sharing_good_ones_announce(
        tmp_path: Path) -> None:
    """The encode check runs once per attribute set (a cold start's 10,000 VIPs share a few),
    never once for all: a refusal is not remembered, so every VIP with the bad attributes is
    refused under its own name, and a good set checked once lets every VIP with it announce."""
    c = poisoned_config(tmp_path)
    good, bad = c.vips
    more = [dataclasses.replace(good, name=f"good{i}", prefix=ipaddress.ip_network(f"198.51.100.{20 + i}/32"))
            for i in range(2)]
    worse = dataclasses.replace(bad, name="poisoned2", prefix=ipaddress.ip_network("198.51.100.12/32"))
    cfg = dataclasses.replace(c, vips=(good, bad, *more, worse))

    async def scenario() -> None:
        agent, bgp, _kernel, registry = make_agent(cfg)
        for _ in range(2):
            for key in list(agent.health):
                agent._on_result(key, ProbeResult(True, 0.001, "ok"), 0.0)
        assert await agent.reconcile_once() is True
        for name in ("poisoned", "poisoned2"):
            assert agent.decisions[name].reason == "refused"
            assert agent.decisions[name].detail.startswith("encode failed: communities:")
            assert registry.get_sample_value("anycast_vip_refused_total", {"vip": name, "stage": "encode"}) == 1
        for name in ("game-global", "good0", "good1"):
            assert agent.decisions[name].action.value == "announce"
        assert set(agent.announced) == {good.prefix, *(v.prefix for v in more)}
        assert not any("198.51.100.11/32" in line or "198.51.100.12/32" in line for line in bgp.lines
                       if line.startswith("announce"))

    run(scenario())


def test_a_vip_whose_decision_raises_is_refused_and_the_others_announce(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.agent import daemon

    cfg = poisoned_config(tmp_path)
    cfg = dataclasses.replace(cfg, vips=(cfg.vips[0], dataclasses.replace(cfg.vips[1], attributes=cfg.vips[0].attributes)))
    real = daemon.decide

    def decide(vip, *args, **kwargs):  # type: ignore[no-untyped-def]
        if vip.name == "poisoned":
            raise KeyError("a bug")
        return real(vip, *args, **kwargs)

    monkeypatch.setattr(daemon, "decide", decide)

    async def scenario() -> None:
        agent, bgp, _, registry = make_agent(cfg)
        feed(agent, "us-west", True, 2)
        assert await agent.reconcile_once() is True
        assert bgp.lines == [ANNOUNCE_UP, "withdraw route 198.51.100.11/32"]  # unsure at start: withdrawn
        assert registry.get_sample_value("anycast_vip_refused_total", {"vip": "poisoned", "stage": "decide"}) == 1

    run(scenario())


def test_a_reconcile_pass_that_raises_does_not_end_the_agent(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, _, registry = make_agent(config(tmp_path))
        passes = 0
        real = agent.reconcile_once

        async def flaky() -> bool:
            nonlocal passes
            passes += 1
            if passes == 1:
                agent._dirty.set()  # the next pass at once, not after the 5 s resync
                raise RuntimeError("a bug in one pass")
            agent.stop("test")
            return await real()

        agent.reconcile_once = flaky  # type: ignore[method-assign]
        agent._dirty.set()
        assert await agent.run() == 0
        assert passes == 2
        assert registry.get_sample_value("anycast_reconcile_crashes_total") == 1

    run(scenario())


# --- clean stops: the kernel state goes whatever ExaBGP does (issue 14) -----------------------
class HangingAnnouncer(RecordingAnnouncer):
    """ExaBGP that stopped answering (it does once it is shutting down): sends never return."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = False

    async def send(self, line: str) -> bool:
        self.lines.append(line)
        if self.hang:
            await asyncio.Event().wait()
        return True


def loopback_config(tmp_path: Path) -> AgentConfig:
    c = config(tmp_path)
    return dataclasses.replace(c, vips=(dataclasses.replace(c.vips[0], loopback=True),))


def announced_agent(cfg: AgentConfig) -> tuple[Agent, HangingAnnouncer, FakeKernel]:
    announcer, kernel = HangingAnnouncer(), FakeKernel()
    agent = Agent(cfg, lambda: cfg, announcer, kernel=kernel,
                  metrics=lambda snap: AgentMetrics(CollectorRegistry(), snap), clock=lambda: 1000.0,
                  scheduler_factory=IdleScheduler)
    return agent, announcer, kernel


@pytest.mark.parametrize("why", ["exabgp_shutdown", "exabgp_gone"])
def test_a_stop_because_exabgp_stops_or_died_still_removes_routes_and_addresses(tmp_path: Path, why: str) -> None:
    async def scenario() -> None:
        agent, bgp, kernel = announced_agent(loopback_config(tmp_path))
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        assert kernel.routes and {str(a) for a in kernel.addresses} == {"198.51.100.10/32"}
        agent.stop(why)
        await agent.shutdown()
        assert bgp.lines == [ANNOUNCE_UP]  # no commands to an ExaBGP that takes none
        assert kernel.routes == set() and kernel.addresses == set()

    run(scenario())


@pytest.mark.parametrize("order", ["agent_first", "exabgp_first"])
def test_sigterm_to_both_in_either_order_removes_the_kernel_state(tmp_path: Path, order: str) -> None:
    """systemd's stop: SIGTERM to the agent, and ExaBGP's shutdown notification, in either
    order, while ExaBGP no longer acknowledges anything."""
    async def scenario() -> None:
        agent, bgp, kernel = announced_agent(loopback_config(tmp_path))
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        bgp.hang = True
        from controller.bgp.exabgp_api import Shutdown

        if order == "exabgp_first":
            agent.on_event(Shutdown())
            agent.stop("SIGTERM")
        else:
            agent.stop("SIGTERM")
        stopping = asyncio.ensure_future(agent.shutdown())
        await asyncio.sleep(0)
        if order == "agent_first":
            assert not stopping.done()  # withdrawing, waiting for an ack that never comes
            agent.on_event(Shutdown())
        await stopping  # no 10 s wait: the notification ends it
        assert kernel.routes == set() and kernel.addresses == set()
        assert bgp.lines[-1:] == ([WITHDRAW] if order == "agent_first" else [ANNOUNCE_UP])

    run(scenario())


def test_a_stop_during_a_pass_blocked_on_acks_cuts_it_short_and_cleans_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, kernel = announced_agent(loopback_config(tmp_path))
        feed(agent, "us-west", True, 2)
        bgp.hang = True  # the pass's announce is never acknowledged
        running = asyncio.ensure_future(agent.run())
        for _ in range(100):
            await asyncio.sleep(0)
        assert bgp.lines == [ANNOUNCE_UP] and kernel.routes  # kernel first, then BGP (hung)
        agent.stop("SIGTERM")
        agent.stop("exabgp_shutdown")
        assert await running == 0
        assert kernel.routes == set() and kernel.addresses == set()

    run(scenario())


# --- graceful restart and graceful shutdown ----------------------------------------------------
def test_with_graceful_restart_end_of_rib_follows_the_first_verdicts_and_each_session_up(tmp_path: Path) -> None:
    from controller.bgp.exabgp_api import NeighborState

    async def scenario() -> None:
        agent, bgp, _, _ = make_agent(config(tmp_path, graceful_restart=120))
        await agent.reconcile_once()
        await agent._maybe_send_eor()
        assert bgp.lines == []  # no verdict yet: an End-of-RIB now would drop the router's stale path
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        await agent._maybe_send_eor()
        assert bgp.lines == [ANNOUNCE_UP, "announce eor ipv4 unicast"]
        await agent._maybe_send_eor()
        assert bgp.lines[-1] == "announce eor ipv4 unicast" and len(bgp.lines) == 2  # once
        agent.on_event(NeighborState("100.64.1.1", "100.64.1.2", "up"))
        await agent.reconcile_once()
        await agent._maybe_send_eor()
        assert bgp.lines[2:] == ["announce eor ipv4 unicast"]  # again after the session came back

    run(scenario())


def test_without_graceful_restart_no_end_of_rib_is_sent(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent, bgp, _, _ = make_agent(config(tmp_path))
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        await agent._maybe_send_eor()
        assert bgp.lines == [ANNOUNCE_UP]  # ExaBGP sends End-of-RIB itself

    run(scenario())


def test_graceful_shutdown_reannounces_with_65535_0_and_draining_attributes_then_withdraws(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def no_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def scenario() -> None:
        agent, bgp, kernel, _ = make_agent(config(tmp_path, graceful_shutdown=5.0))
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        monkeypatch.setattr(asyncio, "sleep", no_sleep)
        agent.stop("SIGTERM")
        await agent.shutdown()
        assert bgp.lines == [
            ANNOUNCE_UP,
            "announce route 198.51.100.10/32 next-hop self med 1000 as-path [ 65101 65101 65101 65101 ]"
            " community [ 65101:666 65535:0 ]",
            WITHDRAW,
        ]
        assert slept == [5.0]
        assert kernel.routes == set()

    run(scenario())


def test_dual_stack_agent_sends_each_command_to_its_familys_sessions(tmp_path: Path) -> None:
    from controller.config.agent import parse_agent_config

    d = yaml.safe_load(EXAMPLE.read_text())
    d["state_dir"] = str(tmp_path / "state")
    d["bgp"]["neighbors"].append({"address": "fd00:64:1::1", "local_address": "fd00:64:1::2",
                                  "router_id": "100.64.1.2", "peer_as": 65001})
    v6 = dict(d["vips"][0], name="game-v6", address="2001:db8:51::10/128")
    v6["origins"] = [{"region": "us-west", "next_hop": "fd00:64:10::1", "backends": ["[fd00:64:10::1]:8080"]}]
    d["vips"].append(v6)
    cfg = parse_agent_config(yaml.safe_dump(d), "dual.yaml")

    async def scenario() -> None:
        agent, bgp, kernel, _ = make_agent(cfg)
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        assert bgp.lines == [
            f"neighbor 100.64.1.1 {ANNOUNCE_UP}",
            "neighbor fd00:64:1::1 announce route 2001:db8:51::10/128 next-hop self med 100 community [ 65101:100 ]",
        ]
        assert len(kernel.routes) == 2
        agent.stop("SIGTERM")
        await agent.shutdown()
        assert bgp.lines[2:] == ["neighbor 100.64.1.1 withdraw route 198.51.100.10/32",
                                 "neighbor fd00:64:1::1 withdraw route 2001:db8:51::10/128"]

    run(scenario())


@pytest.mark.parametrize("graceful_shutdown", [5.0, 0.0])
def test_a_drain_carries_65535_0_when_graceful_shutdown_is_set(tmp_path: Path, graceful_shutdown: float) -> None:
    """bgp.graceful_shutdown on: a drained VIP's announcement adds GRACEFUL_SHUTDOWN to its
    draining attributes (RFC 8326 routers then prefer other POPs even across AS borders)."""
    from controller.config.model import AdminState

    c = config(tmp_path, graceful_shutdown=graceful_shutdown)
    cfg = dataclasses.replace(c, vips=(dataclasses.replace(c.vips[0], admin=AdminState.DRAIN),))

    async def scenario() -> None:
        agent, bgp, _, _ = make_agent(cfg)
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        community = "[ 65101:666 65535:0 ]" if graceful_shutdown else "[ 65101:666 ]"
        assert bgp.lines == [
            "announce route 198.51.100.10/32 next-hop self med 1000 as-path [ 65101 65101 65101 65101 ]"
            f" community {community}",
        ]
        await agent.reconcile_once()  # the marked attributes are what ExaBGP holds: nothing new
        assert len(bgp.lines) == 1

    run(scenario())


# --- batched announcements (issue 13): one failing route is attributed to that route ------
def three_vips(tmp_path: Path) -> AgentConfig:
    c = config(tmp_path)
    good = c.vips[0]
    return dataclasses.replace(c, vips=tuple(
        dataclasses.replace(good, name=f"vip-{i}", prefix=ipaddress.ip_network(f"198.51.100.{i}/32"))
        for i in (10, 11, 12)))


class PickyExaBGP(RecordingAnnouncer):
    """ExaBGP refusing any command that carries one given prefix (alone or in a batch)."""

    def __init__(self, poison: str) -> None:
        super().__init__()
        self.poison = poison

    async def send(self, line: str) -> bool:
        self.lines.append(line)
        return self.poison not in line.split()


def test_a_batch_with_one_failing_route_fails_that_route_alone(tmp_path: Path) -> None:
    cfg = three_vips(tmp_path)

    async def scenario() -> None:
        registry = CollectorRegistry()
        bgp = PickyExaBGP("198.51.100.11/32")
        agent = Agent(cfg, lambda: cfg, bgp, kernel=FakeKernel(), metrics=lambda snap: AgentMetrics(registry, snap),
                      clock=lambda: 1000.0, scheduler_factory=IdleScheduler)
        feed(agent, "us-west", True, 2)
        assert await agent.reconcile_once() is False
        up = " next-hop self med 100 community [ 65101:100 ]"
        assert bgp.lines == [
            f"announce attributes{up} nlri 198.51.100.10/32 198.51.100.11/32 198.51.100.12/32",
            *(f"announce route 198.51.100.{i}/32{up}" for i in (10, 11, 12)),  # resent one by one
        ]
        assert set(agent.announced) == {ipaddress.ip_network("198.51.100.10/32"),
                                        ipaddress.ip_network("198.51.100.12/32")}
        assert registry.get_sample_value("anycast_exabgp_command_errors_total") == 1
        assert registry.get_sample_value("anycast_vip_announced", {"vip": "vip-11", "prefix": "198.51.100.11/32"}) == 0
        assert registry.get_sample_value("anycast_vip_announced", {"vip": "vip-12", "prefix": "198.51.100.12/32"}) == 1
        assert state_file.load(cfg.state_dir).keys() == agent.announced.keys()
        # The next pass retries only the refused route.
        bgp.poison = "nothing"
        assert await agent.reconcile_once() is True
        assert bgp.lines[-1] == f"announce route 198.51.100.11/32{up}"
        assert len(agent.announced) == 3 and not agent.unsure

    run(scenario())


def test_a_stop_that_cuts_a_batch_short_withdraws_what_was_in_flight(tmp_path: Path) -> None:
    """ExaBGP may hold a route whose ack never came: a cut pass leaves it unsure, and the
    stop withdraws it (a withdraw of a route ExaBGP never took is answered done)."""
    cfg = three_vips(tmp_path)
    gate = asyncio.Event()

    class SlowExaBGP(RecordingAnnouncer):
        async def send(self, line: str) -> bool:
            self.lines.append(line)
            await gate.wait()
            return True

    async def scenario() -> None:
        registry = CollectorRegistry()
        bgp = SlowExaBGP()
        agent = Agent(cfg, lambda: cfg, bgp, kernel=FakeKernel(), metrics=lambda snap: AgentMetrics(registry, snap),
                      clock=lambda: 1000.0, scheduler_factory=IdleScheduler)
        agent.unsure.clear()  # as after a first pass: nothing unknown
        feed(agent, "us-west", True, 2)
        cut = asyncio.ensure_future(agent.reconcile_once())
        for _ in range(5):
            await asyncio.sleep(0)
        assert bgp.lines and bgp.lines[0].startswith("announce attributes")
        cut.cancel()
        await asyncio.gather(cut, return_exceptions=True)
        assert agent.announced == {}
        assert agent.unsure == {v.prefix for v in cfg.vips}
        gate.set()
        await agent.shutdown()
        assert bgp.lines[-1] == "withdraw attributes next-hop self nlri 198.51.100.10/32 198.51.100.11/32 198.51.100.12/32"

    run(scenario())


def test_the_kernel_route_comes_before_an_announcement_and_goes_after_a_withdrawal_read_after_it(
        tmp_path: Path) -> None:
    """A pass without an announcement sends its withdrawals before touching the kernel (the
    first kernel step could only add, and a withdrawal would wait for its netlink dumps)."""
    async def scenario() -> None:
        agent, bgp, kernel, _ = make_agent(config(tmp_path))
        reads: list[int] = []  # BGP lines sent when the kernel was read
        read = kernel.read_routes

        def recording_read() -> set[KernelRoute]:
            reads.append(len(bgp.lines))
            return read()

        kernel.read_routes = recording_read  # type: ignore[method-assign]
        feed(agent, "us-west", True, 2)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP] and reads == [0, 1]  # installed before the announcement
        reads.clear()
        feed(agent, "us-west", False, 2)
        await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP, WITHDRAW] and reads == [2]  # read once, after the withdrawal
        assert kernel.routes == set()

    run(scenario())


def test_the_resilient_group_fallback_is_exported_with_its_reason(tmp_path: Path) -> None:
    """A kernel that refused a resilient group (KernelAdapter.split_fallback) shows as
    anycast_kernel_split_fallback{reason} = 1; every reason is exported, 0 until then."""
    from controller.kernel.nexthop import SplitFallback

    agent, _, kernel, registry = make_agent(config(tmp_path))
    reasons = [r.value for r in SplitFallback]
    assert reasons == ["not_supported", "invalid", "family_not_supported"]
    assert [registry.get_sample_value("anycast_kernel_split_fallback", {"reason": r}) for r in reasons] == [0, 0, 0]
    kernel.split_fallback = SplitFallback.INVALID  # what the adapter sets on EINVAL
    assert [registry.get_sample_value("anycast_kernel_split_fallback", {"reason": r}) for r in reasons] == [0, 1, 0]
    assert agent.snapshot().kernel_split_fallback is SplitFallback.INVALID


class CachingPort(FakePort):
    """A port with a plan cache (PlanClient's cache_plan): records, at each write, the thread
    it ran in and the plan the agent was acting on by then."""

    def __init__(self, answers: list, agent: Agent) -> None:
        super().__init__(answers)
        self.agent = agent
        self.writes: list[tuple[bool, int]] = []

    def cache_plan(self) -> None:
        import threading

        self.writes.append((threading.current_thread() is threading.main_thread(), self.agent.plan.generation))


def test_a_plan_is_applied_before_it_is_cached_and_the_cache_is_written_off_the_event_loop(tmp_path: Path) -> None:
    """The cache's fsync (a busy disk: up to ~0.2 s) no longer stands between the controller's
    answer and the agent acting on it, nor holds the loop: each plan is applied, then cached
    in a worker thread, in order, before the next fetch."""
    async def scenario() -> None:
        agent, _, _, _ = make_agent(controller_config(tmp_path))
        port = CachingPort([controller_plan(1), controller_plan(2, drain=True)], agent)
        task = asyncio.create_task(follow_plans(agent, port, 30))
        await asyncio.wait_for(_until(lambda: len(port.writes) == 2), 60)
        task.cancel()
        assert port.writes == [(False, 1), (False, 2)]  # worker threads; each after its plan was applied
        assert agent.plan.vips["game-global"].drain  # the plan is kept
        assert port.afters == [-1, 1, 2]

    run(scenario())


def test_the_state_file_is_written_off_the_event_loop_and_never_rolled_back(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pass that changed what ExaBGP holds writes the state file in a worker thread; two
    writes never overlap, and an older one that comes late (a cancelled pass's) is dropped."""
    import threading

    written: list[tuple[bool, int]] = []
    real = state_file.save

    def save(state_dir: str, announced: dict) -> None:
        written.append((threading.current_thread() is threading.main_thread(), len(announced)))
        real(state_dir, announced)

    monkeypatch.setattr(state_file, "save", save)

    async def scenario() -> None:
        agent, bgp, _, _ = make_agent(controller_config(tmp_path))
        agent.apply_plan(controller_plan(1))
        feed(agent, "us-west", True, 2)
        assert await agent.reconcile_once()
        assert bgp.lines == [ANNOUNCE_UP] and written == [(False, 1)]
        assert state_file.load(agent.config.state_dir) == agent.announced != {}  # what ExaBGP holds is kept
        # A write queued behind a newer one that finished first: skipped, the newer stays.
        agent._state_seq = agent._state_written = 7
        stale = agent._save_state_file(agent.config.state_dir, {})
        agent._state_seq = 6  # (as if this write had been numbered before the one on disk)
        agent._state_written = 8
        await stale
        assert state_file.load(agent.config.state_dir) == agent.announced and written == [(False, 1)]

    run(scenario())
