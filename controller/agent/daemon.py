"""The POP agent's main loop: the imperative shell around the pure core.

It runs as ExaBGP's API process. Health-check results feed the state machine
(``health.state``); each reconcile pass decides every VIP (``agent.decide``), diffs the
decisions against what ExaBGP holds (``agent.reconcile``), sends the commands and waits for
ExaBGP's acknowledgements, then puts the kernel in line (``agent.kernel_plan``).

Lifecycle:
- start: load config (a bad one is fatal), read the state file of what a previous agent
  process announced, treat every known prefix as "unsure" (ExaBGP may or may not hold it);
- SIGHUP: reload config; a bad config is logged and counted, the last good one stays;
- SIGTERM/SIGINT: withdraw everything and remove our kernel state (``shutdown: withdraw``)
  or leave it all to ExaBGP (``shutdown: keep``), then exit 0;
- ExaBGP gone (stdin EOF) or ExaBGP's shutdown notification: exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol, cast

from ..bgp.speaker import SpeakerClosed
from ..bgp.exabgp_api import (
    Garbage, NeighborState, RouteAttributes, Shutdown, announce_line, withdraw_line,
)
from ..config.errors import ConfigError
from ..config.model import AgentConfig, Attributes, IPNetwork, Vip
from ..health import state as hs
from ..health.probes import ProbeResult, ProbeSpec
from ..health.scheduler import CheckScheduler, Target
from ..kernel.diff import Kernel
from ..metrics.agent import AgentMetrics, AgentSnapshot, BackendSnapshot, PeerSnapshot, VipSnapshot
from . import confirm, kernel_plan, state_file
from .decide import Action, BackendKey, Decision, Reason, decide, origin_health
from .controller_link import ControllerPort, follow_plans, report_health
from .intent import NO_PLAN, Plan, plan_from_config
from .reconcile import Announce, Command, Withdraw, apply, reconcile
from ..sdnotify import Notifier
from ..wire import PlanReason

log = logging.getLogger("controller.agent")

RESYNC_INTERVAL = 5.0  # a full pass even without events: retries failed commands


class Announcer(Protocol):
    """The BGP side: ExaBGPSpeaker in production, a recorder in tests."""

    async def send(self, line: str) -> bool: ...


def probe_spec(vip: Vip, key: BackendKey) -> ProbeSpec:
    c = vip.check
    backend = key[2]
    return ProbeSpec(
        kind=c.kind, host=str(backend.address), port=c.port or backend.port, timeout=c.timeout,
        path=c.path, expect_status=c.expect_status, expect_body=c.expect_body,
        host_header=c.host_header, tls_verify=c.tls_verify,
    )


def check_targets(vips: Iterable[Vip]) -> dict[BackendKey, Target]:
    """Every backend of every origin of every VIP is checked: the controller needs to know
    the health of standby origins too, before it fails over to them."""
    targets: dict[BackendKey, Target] = {}
    for vip in vips:
        for origin in vip.origins:
            for backend in origin.backends:
                key: BackendKey = (vip.name, origin.region, backend)
                targets[key] = Target(key=key, spec=probe_spec(vip, key), interval=vip.check.interval)
    return targets


def exabgp_attributes(attrs: Attributes, local_as: int) -> RouteAttributes:
    return RouteAttributes(
        med=attrs.med, as_path_prepend=attrs.as_path_prepend, local_as=local_as,
        communities=attrs.communities, large_communities=attrs.large_communities,
    )


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        load_config: Callable[[], AgentConfig],
        announcer: Announcer,
        *,
        kernel: Kernel | None,
        metrics: Callable[[Callable[[], AgentSnapshot]], AgentMetrics],
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        scheduler_factory: Callable[..., CheckScheduler] = CheckScheduler,
        initial_plan: Plan | None = None,
        controller: ControllerPort | None = None,
    ) -> None:
        self.config = config
        self._load_config = load_config
        self.announcer = announcer
        self.kernel = kernel
        self.notifier = notifier or Notifier("")
        self.clock = clock
        self.controller = controller
        self.controller_ok: bool | None = None
        self.report_now = asyncio.Event()
        self.controller_reached = asyncio.Event()  # a report got through: retry the plan now
        # Per VIP: is its withdrawal waiting for the controller (``agent.confirm``)? One
        # timer wakes the loop at the earliest deadline of all those waits.
        self._confirm: dict[str, confirm.ConfirmState] = {}
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at: float | None = None
        # Standalone: the plan is the local config. With a controller: the cached plan until
        # the controller answers (static stability), or no plan at all.
        self.plan: Plan = plan_from_config(config) if config.controller is None else (initial_plan or NO_PLAN)
        self._vip_index: tuple[tuple[Vip, ...], dict[str, Vip]] = ((), {})
        self.health: dict[BackendKey, hs.HealthState] = {}
        self.last_result: dict[BackendKey, ProbeResult] = {}
        self.neighbors: dict[str, bool] = {}
        self.decisions: dict[str, Decision] = {}
        # What ExaBGP holds as far as this process knows, and what it may hold.
        self.announced: dict[IPNetwork, Attributes] = state_file.load(config.state_dir)
        self.unsure: set[IPNetwork] = set(self.announced) | {v.prefix for v in self.vips}
        self.withdrawn: set[IPNetwork] = set()  # withdrawn by this process: known not in ExaBGP
        self.last_reconcile_success = 0.0
        self.config_ok = True
        self.config_time = clock()
        self._dirty = asyncio.Event()
        self._stopping: str | None = None
        self._ready = False
        self.metrics = metrics(self.snapshot)
        self.scheduler = scheduler_factory(self._on_result)
        self._apply_targets()
        self.metrics.config_reloads.labels("success").inc()
        if self.announced:
            log.info("state file lists %d prefix(es) a previous agent announced; they stay until "
                     "the checks have a verdict", len(self.announced))

    @property
    def vips(self) -> tuple[Vip, ...]:
        """The VIPs this agent acts on: from the controller's plan, or its own config."""
        return self.plan.specs if self.plan.specs is not None else self.config.vips

    def vip(self, name: str) -> Vip | None:
        return self._vips_by_name().get(name)

    def _vips_by_name(self) -> dict[str, Vip]:
        """The VIPs by name, for the lookup on every probe result: indexed once per plan or
        config (a new ``vips`` tuple), not scanned per call (10,000 VIPs)."""
        vips = self.vips
        if self._vip_index[0] is not vips:
            index: dict[str, Vip] = {}
            for v in vips:
                index.setdefault(v.name, v)  # names are unique (the config and plan readers check)
            self._vip_index = (vips, index)
        return self._vip_index[1]

    def apply_plan(self, plan: Plan) -> None:
        """Follow a new plan from the controller (already validated by the client)."""
        if plan.generation == self.plan.generation and plan.source == self.plan.source:
            return
        log.info("following plan generation %d from %s (config revision %s): %d VIP(s)",
                 plan.generation, plan.source, plan.revision or "?", len(plan.vips))
        now = self.clock()
        for name, old in self.plan.vips.items():
            if old.safety_hold and name in self._confirm:
                # The controller had answered "keep it". If it now lifts the hold without
                # confirming the withdrawal, a new wait of up to confirm_timeout starts.
                self._confirm[name], _, _ = confirm.step(self._confirm[name], confirm.HoldReplaced(), now)
        self.plan = plan
        self.unsure |= {v.prefix for v in self.vips} - set(self.announced) - self.withdrawn
        self._apply_targets()
        self._dirty.set()

    # --- health ------------------------------------------------------------------------
    def _apply_targets(self) -> None:
        targets = check_targets(self.vips)
        now = self.clock()
        self.health = {k: self.health.get(k) or hs.initial(now) for k in targets}
        self.last_result = {k: v for k, v in self.last_result.items() if k in targets}
        self.scheduler.set_targets(targets.values())

    def _on_result(self, target_key: Hashable, result: ProbeResult, finished_at: float) -> None:
        key = cast(BackendKey, target_key)  # check_targets() builds every key as a BackendKey
        state = self.health.get(key)
        if state is None:  # the target was removed by a reload while its probe ran
            return
        vip_name, region, backend = key
        vip = self.vip(vip_name)
        if vip is None:
            return
        self.metrics.checks.labels(vip_name, region, "ok" if result.ok else "fail").inc()
        self.metrics.check_duration.labels(vip_name, region).observe(result.latency)
        self.last_result[key] = result
        new, transition = hs.step(state, result.ok, vip.check.rise, vip.check.fall, self.clock(), result.detail)
        self.health[key] = new
        if transition is not None:
            self.metrics.health_transitions.labels(vip_name, region, new.phase.value).inc()
            log.info("backend %s of %s/%s: %s -> %s (%s; last check: %s)", backend, vip_name, region,
                     transition.from_phase.value, transition.to_phase.value, transition.reason,
                     result.detail)
            if new.healthy != state.healthy:
                self._dirty.set()
                self.report_now.set()  # the controller should hear about it at once

    def verdicts(self) -> dict[BackendKey, bool | None]:
        return {k: s.healthy for k, s in self.health.items()}

    # --- events from ExaBGP --------------------------------------------------------------
    def on_event(self, event: object) -> None:
        if isinstance(event, NeighborState):
            log.info("BGP neighbour %s is %s%s", event.peer, event.state,
                     f" ({event.reason})" if event.reason else "")
            # "connected" is a TCP connection (maybe a collision while the session is up),
            # not a session state: only "up" and "down" change what we report.
            if event.state in ("up", "down"):
                self.neighbors[event.peer] = event.state == "up"
        elif isinstance(event, Shutdown):
            log.info("ExaBGP is shutting down; exiting without further commands")
            self.stop("exabgp_shutdown")
        elif isinstance(event, Garbage):
            self.metrics.exabgp_garbage.inc()

    # --- control -------------------------------------------------------------------------
    def stop(self, why: str) -> None:
        if self._stopping is None:
            self._stopping = why
        self._dirty.set()

    def reload(self) -> bool:
        """Load the config again; keep the last good one if the new one is bad."""
        self.config_time = self.clock()
        try:
            new = self._load_config()
        except ConfigError as exc:
            self.config_ok = False
            self.metrics.config_reloads.labels("failure").inc()
            log.error("config reload rejected, keeping the last good config and all announcements:\n%s",
                      exc.summary())
            return False
        if new.neighbors != self.config.neighbors or new.metrics_listen != self.config.metrics_listen:
            log.warning("BGP neighbours or the metrics address changed: they take effect at the next "
                        "restart of the service (ExaBGP's config is rendered at start)")
        self.config = new
        if new.controller is None:
            self.plan = plan_from_config(new, generation=self.plan.generation + 1)
        elif self.plan.source == "local-config":
            self.plan = NO_PLAN  # switched to a controller: wait for its plan
        self.unsure |= {v.prefix for v in self.vips} - set(self.announced) - self.withdrawn
        self._apply_targets()
        self.config_ok = True
        self.metrics.config_reloads.labels("success").inc()
        log.info("config reloaded from %s: %d VIP(s)", new.source, len(new.vips))
        self._dirty.set()
        return True

    # --- reconcile -----------------------------------------------------------------------
    def decide_all(self) -> list[Decision]:
        verdicts = self.verdicts()
        now = self.clock()
        waits: dict[str, confirm.ConfirmState] = {}
        wake_ats: list[float] = []
        decisions = []
        for v in self.vips:
            state = self._confirm.get(v.name) or confirm.initial(now)
            waits[v.name], pending, wake_at = confirm.step(state, self._checked(v, verdicts), now)
            if wake_at is not None:
                wake_ats.append(wake_at)
            decisions.append(decide(v, self.plan.vips.get(v.name), verdicts, self.config.allowed_prefixes,
                                    confirm_pending=pending))
        self._confirm = waits  # a VIP the agent no longer acts on forgets its wait
        self._arm_wake(min(wake_ats, default=None))
        return decisions

    def _checked(self, vip: Vip, verdicts: dict[BackendKey, bool | None]) -> confirm.Checked:
        """What this pass sees of the VIP, for its confirm-pending state machine."""
        link = self.config.controller
        intent = self.plan.vips.get(vip.name)
        origin = vip.origin(intent.active_origin) if intent else None
        down = origin is not None and origin_health(
            origin, (verdicts.get((vip.name, origin.region, b)) for b in origin.backends))[0] is False
        return confirm.Checked(
            down=down,
            safety_hold=intent is not None and intent.safety_hold,
            confirmed=intent is not None and intent.reason == PlanReason.BACKEND_DOWN,
            reachable=link is not None and self.controller is not None and bool(self.controller_ok),
            timeout=link.confirm_timeout if link is not None else 0.0,
        )

    def _arm_wake(self, at: float | None) -> None:
        """Keep one timer, for the earliest deadline: re-armed when it moves, never piled up."""
        if at == self._wake_at:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake, self._wake_at = None, at
        if at is not None:
            self._wake = asyncio.get_running_loop().call_later(max(0.0, at - self.clock()), self._on_wake)

    def _on_wake(self) -> None:
        self._wake = self._wake_at = None
        self._dirty.set()

    async def reconcile_once(self) -> bool:
        """One level-based pass. Returns True if everything was applied."""
        started = time.monotonic()
        decisions = self.decide_all()
        for d in decisions:
            previous = self.decisions.get(d.vip)
            if previous is None or (previous.action, previous.reason) != (d.action, d.reason):
                log.info("VIP %s (%s): %s, reason %s%s", d.vip, d.prefix, d.action.value, d.reason,
                         f" ({d.detail})" if d.detail else "")
        self.decisions = {d.vip: d for d in decisions}
        # Kernel first for additions (the route exists before BGP attracts traffic), BGP,
        # then the kernel again for removals (a route goes only after its withdrawal).
        kernel_before = await self._kernel_step(decisions, before=True)
        commands = reconcile(decisions, self.announced, self.unsure, withdraw_undecided=self.plan.ready,
                             undecided_reason=Reason.NOT_IN_CONFIG if self.plan.specs is None else Reason.NOT_IN_PLAN)
        bgp_ok = await self._send(commands)
        kernel_after = await self._kernel_step(decisions, before=False)
        ok = kernel_before and bgp_ok and kernel_after
        self.metrics.reconcile_duration.observe(time.monotonic() - started)
        self.metrics.reconciles.labels("success" if ok else "error").inc()
        if ok:
            self.last_reconcile_success = self.clock()
        return ok

    async def _send(self, commands: list[Command]) -> bool:
        ok = True
        changed = False
        for cmd in commands:
            if isinstance(cmd, Announce):
                line = announce_line(cmd.prefix, exabgp_attributes(cmd.attributes, self.config.local_as))
            else:
                line = withdraw_line(cmd.prefix)
            if await self.announcer.send(line):
                action = "announce" if isinstance(cmd, Announce) else "withdraw"
                detail = f" ({cmd.detail})" if isinstance(cmd, Withdraw) and cmd.detail else ""
                log.info("%s %s (VIP %s), reason %s%s", action, cmd.prefix, cmd.vip, cmd.reason, detail)
                self.metrics.announcement_changes.labels(cmd.vip, action, cmd.reason).inc()
                self.announced = apply(self.announced, cmd)
                self.unsure.discard(cmd.prefix)
                if isinstance(cmd, Withdraw):
                    self.withdrawn.add(cmd.prefix)
                else:
                    self.withdrawn.discard(cmd.prefix)
                changed = True
            else:
                ok = False
                self.metrics.exabgp_errors.inc()
                log.error("ExaBGP answered 'error' to: %s (will retry at the next pass)", line)
        if changed:
            try:
                state_file.save(self.config.state_dir, self.announced)
            except OSError as exc:
                ok = False
                log.error("cannot write the state file in %s: %s", self.config.state_dir, exc)
        return ok

    async def _kernel_step(self, decisions: list[Decision], before: bool) -> bool:
        if self.kernel is None or not self.config.kernel.enabled:
            return True
        try:
            # pyroute2 calls block; keep them off the loop so checks stay on schedule.
            await asyncio.to_thread(self._kernel_sync, decisions, before)
            return True
        except Exception as exc:  # noqa: BLE001 - a kernel failure must not stop BGP decisions
            self.metrics.kernel_errors.inc()
            log.error("kernel sync failed: %s", exc)
            return False

    def _kernel_sync(self, decisions: list[Decision], before: bool) -> None:
        assert self.kernel is not None
        actual_routes = self.kernel.read_routes()
        routes = kernel_plan.desired_routes(decisions, actual_routes)
        actual_addrs = self.kernel.read_addresses()
        addrs = kernel_plan.desired_addresses(decisions, self._vips_by_name(), actual_addrs)
        if before:
            routes = kernel_plan.before_bgp(routes, actual_routes)
            addrs = addrs | actual_addrs
        self.kernel.sync_routes(routes)
        self.kernel.sync_addresses(addrs)

    async def shutdown(self) -> None:
        """On SIGTERM: withdraw everything (or keep it all, if so configured)."""
        if self._stopping in ("exabgp_gone", "exabgp_shutdown"):
            return
        if self.config.shutdown == "keep":
            log.info("stopping with shutdown=keep: ExaBGP keeps announcing %d prefix(es)", len(self.announced))
            return
        names = {v.prefix: v.name for v in self.vips}
        withdrawals = [Decision(names.get(p, str(p.network_address)), p, Action.WITHDRAW, Reason.SHUTDOWN,
                                "agent stopping")
                       for p in unique(set(self.announced) | self.unsure)]
        log.info("stopping: withdrawing %d prefix(es)", len(withdrawals))
        try:
            await self._send(reconcile(withdrawals, self.announced, self.unsure))
        except SpeakerClosed as exc:
            log.warning("could not withdraw, ExaBGP is gone (%s): its sessions are closed anyway", exc)
        await self._kernel_step(withdrawals, before=False)

    def snapshot(self) -> AgentSnapshot:
        """One consistent view for the metrics and `anycastctl agent status` (agent.local_status)."""
        vips = []
        for vip in self.vips:
            d = self.decisions.get(vip.name)
            vips.append(VipSnapshot(
                name=vip.name, prefix=str(vip.prefix),
                status=d.status if d else "pending", reason=d.reason if d else Reason.HEALTH_UNKNOWN,
                announced=vip.prefix in self.announced, origin=(d.origin or "") if d else "",
                action=d.action.value if d else Action.HOLD.value, detail=d.detail if d else "",
                next_hop=str(d.next_hop) if d and d.next_hop else "", intended=d.attributes if d else None,
                held=self.announced.get(vip.prefix), held_unsure=vip.prefix in self.unsure,
            ))
        own = {v.prefix for v in self.vips}
        backends = tuple(
            BackendSnapshot(k[0], k[1], str(k[2]), s.phase,
                            r.ok if (r := self.last_result.get(k)) else None, r.latency if r else None)
            for k, s in self.health.items()
        )
        return AgentSnapshot(
            pop=self.config.pop, vips=tuple(vips), backends=backends, neighbors=dict(self.neighbors),
            last_reconcile_success=self.last_reconcile_success, config_last_reload_ok=self.config_ok,
            config_last_reload_time=self.config_time, plan_source=self.plan.source,
            plan_generation=self.plan.generation, controller_ok=self.controller_ok,
            plan_revision=self.plan.revision,
            controller_url=self.config.controller.url if self.config.controller else "",
            local_as=self.config.local_as,
            peers=tuple(PeerSnapshot(str(n.address), n.peer_as, str(n.local_address)) for n in self.config.neighbors),
            held_elsewhere=tuple(str(p) for p in unique((set(self.announced) | self.unsure) - own)),
        )

    # --- main loop -----------------------------------------------------------------------
    async def run(self) -> int:
        tasks = [asyncio.create_task(self.scheduler.run(), name="health-checks")]
        link = self.config.controller
        if self.controller is not None and link is not None:
            tasks.append(asyncio.create_task(
                follow_plans(self, self.controller, link.poll_wait, self._controller_state,
                             retry_now=self.controller_reached), name="plans"))
            tasks.append(asyncio.create_task(
                report_health(self, self.controller, link.report_interval, self.report_now,
                              self.controller_reached), name="reports"))
        watchdog = self.notifier.watchdog_interval()
        tick = min(RESYNC_INTERVAL, watchdog) if watchdog else RESYNC_INTERVAL
        try:
            while self._stopping is None:
                self._dirty.clear()
                try:
                    await self.reconcile_once()
                except SpeakerClosed as exc:
                    log.warning("ExaBGP is gone (%s); exiting", exc)
                    self.stop("exabgp_gone")
                    break
                self._notify()
                try:
                    await asyncio.wait_for(self._dirty.wait(), timeout=tick)
                except asyncio.TimeoutError:
                    pass
            log.info("stopping (%s)", self._stopping)
            await self.shutdown()
            return 0
        finally:
            self._arm_wake(None)
            self.scheduler.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _controller_state(self, ok: bool) -> None:
        self.controller_ok = ok

    def _notify(self) -> None:
        up = sum(1 for d in self.decisions.values() if d.action is Action.ANNOUNCE)
        status = f"{up}/{len(self.decisions)} VIPs announced; config {'ok' if self.config_ok else 'RELOAD FAILED'}"
        if not self._ready:
            self._ready = True
            self.notifier.notify(ready="1", status=status)
        else:
            self.notifier.notify(watchdog="1", status=status)


def install_signal_handlers(agent: Agent, loop: asyncio.AbstractEventLoop) -> None:
    loop.add_signal_handler(signal.SIGTERM, agent.stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, agent.stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, agent.reload)


def unique(items: Iterable[IPNetwork]) -> list[IPNetwork]:
    return sorted(set(items), key=lambda p: (p.version, int(p.network_address)))
