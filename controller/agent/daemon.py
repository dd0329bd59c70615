"""The POP agent's main loop: the imperative shell around the pure core.

It runs as ExaBGP's API process. Health-check results feed the state machine
(``health.state``); each reconcile pass decides every VIP (``agent.decide``), diffs the
decisions against what ExaBGP holds (``agent.reconcile``), sends the commands batched and
pipelined (``speaker.send_changes``) and records each route's own acknowledgement, then puts
the kernel in line (``agent.kernel_plan``).

Lifecycle:
- start: load config (a bad one is fatal), read the state file of what a previous agent
  process announced, treat every known prefix as "unsure" (ExaBGP may or may not hold it);
- SIGHUP: reload config; a bad config is logged and counted, the last good one stays;
- SIGTERM/SIGINT: withdraw everything and remove our kernel state (``shutdown: withdraw``)
  or leave it all as it is (``shutdown: keep``), then exit 0; a pass in flight is cut short;
- ExaBGP gone (stdin EOF) or ExaBGP's shutdown notification: no more commands (ExaBGP takes
  none and its sessions close), but the kernel state is removed all the same, then exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol, cast

from ..bgp.speaker import SpeakerClosed, send_changes
from ..bgp.exabgp_api import (
    Garbage, NeighborState, RouteAttributes, RouteChange, Shutdown, announce_line, eor_line,
)
from ..config.agent import insecure_urls
from ..config.errors import ConfigError
from ..config.model import AgentConfig, Attributes, IPNetwork, Origin, Vip
from ..health import state as hs
from ..health.probes import ProbeResult, ProbeSpec
from ..health.scheduler import CheckScheduler, Target
from ..kernel.diff import Kernel
from ..metrics.agent import AgentMetrics, AgentSnapshot, BackendSnapshot, PeerSnapshot, VipSnapshot
from . import confirm, evidence, kernel_plan, state_file
from .log_budget import LineBudget
from .decide import (
    Action, BackendKey, Decision, Reason, decide, graceful_shutdown_attributes, healthy_split, origin_verdict,
)
from .controller_link import ControllerPort, follow_plans, report_health
from .liveness import PROBE, ExaBGPLiveness
from .intent import NO_PLAN, Plan, plan_from_config
from .reconcile import Announce, Command, Withdraw, reconcile
from ..sdnotify import Notifier
from ..wire import PlanReason

log = logging.getLogger("controller.agent")

RESYNC_INTERVAL = 5.0  # a full pass even without events: retries failed commands
# How long a stop waits for ExaBGP to acknowledge the withdrawals. A stop of the whole unit
# never waits that long: ExaBGP's shutdown notification (or EOF) ends the wait at once,
# because ExaBGP stops reading our commands then and kills us 2.1 s later.
SHUTDOWN_WITHDRAW_LIMIT = 10.0
_EXABGP_GONE = ("exabgp_gone", "exabgp_shutdown")


class Announcer(Protocol):
    """The BGP side: ExaBGPSpeaker in production, a recorder in tests. Sends overlap (up to
    ``speaker.PIPELINE_WINDOW`` at once, written in call order): each call gets its own command's answer."""

    async def send(self, line: str) -> bool: ...


def probe_spec(vip: Vip, key: BackendKey) -> ProbeSpec:
    c = vip.check
    backend = key[2]
    return ProbeSpec(
        kind=c.kind, host=str(backend.address), port=c.port or backend.port, timeout=c.timeout,
        path=c.path, expect_status=c.expect_status, expect_body=c.expect_body,
        host_header=c.host_header, tls_verify=c.tls_verify,
        reuse_connection=c.reuse_connection, fresh_connection_every=c.fresh_connection_every,
    )


def check_targets(vips: Iterable[Vip]) -> dict[BackendKey, Target]:
    """Every backend of every origin of every VIP is checked: the controller needs to know
    the health of standby origins too, before it fails over to them. (VIPs with the same
    check of the same backend share one probe and one watch connection: the scheduler's
    doing; each key still gets every result.)"""
    targets: dict[BackendKey, Target] = {}
    for vip in vips:
        for origin in vip.origins:
            for backend in origin.backends:
                key: BackendKey = (vip.name, origin.region, backend)
                targets[key] = Target(key=key, spec=probe_spec(vip, key), interval=vip.check.interval,
                                      watch=vip.check.watch, fall=vip.check.fall)
    return targets


def exabgp_attributes(attrs: Attributes, local_as: int) -> RouteAttributes:
    return RouteAttributes(
        med=attrs.med, as_path_prepend=attrs.as_path_prepend, local_as=local_as,
        communities=attrs.communities, large_communities=attrs.large_communities,
        extended_communities=attrs.extended_communities,
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
        # Check times per backend and the plan's asks for them (the evidence-based settle).
        self.check_times: dict[BackendKey, evidence.Times] = {}
        self.evidence_asks = evidence.Asks()
        # (vip, region, the active's failing_since): the proofs of a healthy failover target reported
        self._proofs_sent: set[tuple[str, str, float]] = set()
        self.neighbors: dict[str, bool] = {}
        self.decisions: dict[str, Decision] = {}
        # What ExaBGP holds as far as this process knows, and what it may hold.
        self.announced: dict[IPNetwork, Attributes] = state_file.load(config.state_dir)
        self.unsure: set[IPNetwork] = set(self.announced) | {v.prefix for v in self.vips}
        self.withdrawn: set[IPNetwork] = set()  # withdrawn by this process: known not in ExaBGP
        self.last_reconcile_success = 0.0
        self.config_ok = True
        self.config_time = clock()
        self._lines: dict[tuple[IPNetwork, Attributes, int], str] = {}
        self._route_attrs: dict[tuple[Attributes, int], RouteAttributes] = {}
        # The (family, attributes, local AS) whose announcement command was built once: it
        # builds for every prefix of that family (`_vet`).
        self._encodable: set[tuple[int, Attributes, int]] = set()
        # The sessions ExaBGP was started with (a reload does not change them). With both
        # families, each command names its family's sessions: ExaBGP answers ``error`` to a
        # route it cannot send to one of the sessions it would otherwise go to.
        families = {n.address.version for n in config.neighbors}
        self._targets: dict[int, tuple[str, ...]] = {
            version: tuple(str(n.address) for n in config.neighbors if n.address.version == version)
            if len(families) > 1 else ()
            for version in (4, 6)
        }
        self._dirty = asyncio.Event()
        # Per-VIP lines: a cold start changes every VIP at once (log_budget.py).
        self._transition_lines = LineBudget(log, "backend transitions")
        self._decision_lines = LineBudget(log, "VIP decisions")
        self._ack_lines = LineBudget(log, "route changes acknowledged by ExaBGP")
        self._stopping: str | None = None
        # Graceful restart: End-of-RIB is ours to send (manual-eor), once the first verdicts
        # are in, after the start and after every session (re-)establishment.
        self._eor_due = config.graceful_restart > 0
        self._started = clock()
        self._stop_requested = asyncio.Event()  # wakes the loop out of a pass in flight
        self._bgp_gone = asyncio.Event()  # ExaBGP is stopping or gone: it takes no more commands
        # pyroute2 calls run in a worker thread; a stop may start its kernel cleanup while a
        # cancelled pass's thread still runs: one at a time.
        self._kernel_lock = threading.Lock()
        self._state_lock = threading.Lock()  # the state file's writes (_save_state_file)
        self._state_seq = self._state_written = 0
        self._ready = False
        self._liveness: ExaBGPLiveness | None = None  # with systemd's watchdog only
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
        if self.evidence_asks.update({n: i.asked for n, i in plan.vips.items() if i.evidence}, now) and \
                not self._check_asked(self.evidence_asks.new):
            self.report_now.set()  # another POP's withdrawal waits for this POP's checks
        self._dirty.set()

    def _check_asked(self, names: set[str]) -> bool:
        """Probe the asked origins of VIPs the controller asks evidence for now, rather than
        at their next due check (up to an interval later, while another POP's withdrawal
        waits); True when every one has a probe running, whose results report once the round
        is complete (``_evidence_due``), so no report of the older checks is needed first."""
        keys: list[BackendKey] = []
        for name in names:
            vip, intent = self.vip(name), self.plan.vips.get(name)
            if vip is None or intent is None:
                return False
            for region in intent.asked:
                origin = vip.origin(region)
                if origin is None:
                    return False
                keys.extend((name, origin.region, b) for b in origin.backends)
        return self.scheduler.check_now(keys)

    # --- health ------------------------------------------------------------------------
    def _apply_targets(self) -> None:
        targets = check_targets(self.vips)
        now = self.clock()
        self.health = {k: self.health.get(k) or hs.initial(now) for k in targets}
        self.last_result = {k: v for k, v in self.last_result.items() if k in targets}
        self.check_times = {k: v for k, v in self.check_times.items() if k in targets}
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
        self.metrics.checks.inc(vip_name, region, "ok" if result.ok else "fail")
        self.metrics.check_duration.observe(result.latency, vip_name, region)
        self.last_result[key] = result
        now = self.clock()
        before = self.check_times.get(key)
        times = self.check_times[key] = evidence.observe(before, result.ok, now)
        if self.controller is not None:
            self._evidence_due(vip, region, before, times)
        new, transition = hs.step(state, result.ok, vip.check.rise, vip.check.fall, now, result.detail)
        self.health[key] = new
        if transition is not None:
            self.metrics.health_transitions.inc(vip_name, region, new.phase.value)
            self._transition_lines.info(
                f"{transition.from_phase.value} -> {transition.to_phase.value} ({transition.reason})",
                "backend %s of %s/%s: %s -> %s (%s; last check: %s)", backend, vip_name, region,
                transition.from_phase.value, transition.to_phase.value, transition.reason,
                result.detail, extra=self._fields(vip_name, transition.reason))
            if new.healthy != state.healthy:
                self._dirty.set()
                self.report_now.set()  # the controller should hear about it at once

    def _evidence_due(self, vip: Vip, region: str, before: evidence.Times | None, times: evidence.Times) -> None:
        """Report at once when the active origin starts failing here (its first failed
        check: the controller asks the other POPs meanwhile), or when a round of checks the
        controller asked for is complete."""
        intent = self.plan.vips.get(vip.name)
        if intent is None:
            return
        if vip.name in self.evidence_asks.owed and region in intent.asked and self.evidence_asks.round_done(
                vip.name, evidence.checked_at(self.origin_times(vip, r) for r in intent.asked)):
            self.report_now.set()
        if intent.active_origin != region:
            self._proof_due(vip, intent.active_origin, region, times)
            return
        started = times.failing_since is not None and (before is None or before.failing_since is None)
        if started and self.origin_times(vip, region).failing_since is not None:
            self.report_now.set()

    def _proof_due(self, vip: Vip, active: str, region: str, times: evidence.Times) -> None:
        """Report at once when another origin of a VIP whose active origin is failing here
        first shows healthy on checks newer than that failure: the proof an origin failover
        waits for (``policy/origins.py``). Once per failure and origin."""
        if times.failing_since is not None:
            return
        failing = self.origin_times(vip, active).failing_since
        if failing is None:
            return
        key = (vip.name, region, failing)
        if key in self._proofs_sent:
            return
        ok_at = self.origin_times(vip, region).ok_at
        if ok_at is not None and ok_at > failing:
            self._proofs_sent = {k for k in self._proofs_sent if k[0] != vip.name or k[2] == failing} | {key}
            self.report_now.set()

    def origin_times(self, vip: Vip, region: str) -> evidence.OriginTimes:
        origin = vip.origin(region)
        if origin is None:
            return evidence.OriginTimes(None, None, None)
        times = self.check_times
        return evidence.of_origin((times.get((vip.name, region, b)) for b in origin.backends), origin.min_healthy)

    def evidence_checks(self) -> dict[str, dict[str, tuple[float | None, float | None]]]:
        """The report's ``checks``: the check ages of every origin of each VIP the plan asks
        evidence for or whose active origin is failing or down here (the other origins' prove a
        failover target healthy; only those VIPs, so the report stays small)."""
        now = self.clock()
        times = self.check_times
        out: dict[str, dict[str, tuple[float | None, float | None]]] = {}
        for vip in self.vips:
            intent = self.plan.vips.get(vip.name)
            if intent is None:
                continue
            region = intent.active_origin
            origin = vip.origin(region)
            if origin is None:
                continue
            asked = vip.name in self.evidence_asks.since
            if not asked and not any(
                    (t := times.get((vip.name, region, b))) is not None and t.failing_since is not None
                    for b in origin.backends) and not self._origin_down(vip.name, origin):
                continue
            o = self.origin_times(vip, region)
            # (down with no failure running: rising again. Its times say so, first failed check
            # None: without them the controller took its window's start, which a lifted hold
            # everywhere had just reset, for the failure's, and let it go on the others' checks.)
            if asked or o.failing_since is not None or self._origin_down(vip.name, origin):
                out[vip.name] = {region: evidence.ages(o, now)} | {
                    other.region: a for other in vip.origins if other.region != region
                    and (a := evidence.ages(self.origin_times(vip, other.region), now)) != (None, None)}
        return out

    def _origin_down(self, vip: str, origin: Origin) -> bool:
        """Whether this POP's checks judge ``origin`` down for ``vip`` (rising counts: down)."""
        health = self.health
        return origin_verdict(origin, ((s.healthy if (s := health.get((vip, origin.region, b))) is not None else None)
                                       for b in origin.backends)) is False

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
            if event.state == "up" and self.config.graceful_restart > 0:
                self._eor_due = True
                self._dirty.set()
        elif isinstance(event, Shutdown):
            log.info("ExaBGP is shutting down; exiting without further commands")
            self.stop("exabgp_shutdown")
        elif isinstance(event, Garbage):
            self.metrics.exabgp_garbage.inc()

    # --- control -------------------------------------------------------------------------
    def stop(self, why: str) -> None:
        if self._stopping is None:
            self._stopping = why
        if why in _EXABGP_GONE:
            self._bgp_gone.set()  # even if already stopping: a withdrawal in flight is moot now
        self._stop_requested.set()
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
            try:
                state = self._confirm.get(v.name) or confirm.initial(now)
                waits[v.name], pending, wake_at = confirm.step(state, self._checked(v, verdicts), now)
                if wake_at is not None:
                    wake_ats.append(wake_at)
                decision = decide(v, self.plan.vips.get(v.name), verdicts, self.config.allowed_prefixes,
                                  confirm_pending=pending,
                                  graceful_shutdown=self.config.graceful_shutdown > 0)
            except Exception as exc:  # noqa: BLE001 - one VIP's failure must not take the others down
                decision = self._refuse(v.name, v.prefix, "decide", exc)
            decisions.append(self._vet(decision))
        self._confirm = waits  # a VIP the agent no longer acts on forgets its wait
        self._arm_wake(min(wake_ats, default=None))
        return decisions

    def _vet(self, d: Decision) -> Decision:
        """An announcement whose ExaBGP command cannot be built is refused (withdrawn, reason
        ``refused``) here, before the kernel or BGP act on it: the other VIPs carry on. A crash
        instead would make ExaBGP respawn the agent into the same crash, give up after five,
        and withdraw every VIP at the POP."""
        if d.action is not Action.ANNOUNCE or d.attributes is None:
            return d
        # Whether the command builds depends on the family, the attributes, the local AS and
        # the sessions, never on the prefix itself (`announce_line`): one build per attribute
        # set, not one per VIP (a cold start's 10,000 lines, ~0.1 CPU s before its first
        # command). A failure is not memoised: each VIP's refusal names its own prefix.
        key = (d.prefix.version, d.attributes, self.config.local_as)
        if key in self._encodable:
            return d
        try:
            self._announce_line(d.prefix, d.attributes)
        except Exception as exc:  # noqa: BLE001 - see above
            return self._refuse(d.vip, d.prefix, "encode", exc)
        if len(self._encodable) > 2 * len(self.vips) + 64:
            self._encodable.clear()  # stale attribute sets from old configs
        self._encodable.add(key)
        return d

    def _fields(self, vip: str, reason: object) -> dict[str, object]:
        """The journal fields of a log line about `vip` (``controller.logs``)."""
        return {"vip": vip, "pop": self.config.pop, "reason": reason}

    def _refuse(self, name: str, prefix: IPNetwork, stage: str, exc: Exception) -> Decision:
        previous = self.decisions.get(name)
        if previous is None or previous.reason != Reason.REFUSED:
            # Once per refusal, with the traceback: it is a bug or a config the reader let through.
            log.error("VIP %s (%s) refused: %s failed (%s); withdrawing it, the other VIPs carry on",
                      name, prefix, stage, exc, exc_info=exc, extra=self._fields(name, Reason.REFUSED))
            self.metrics.vip_refused.labels(name, stage).inc()
        return Decision(name, prefix, Action.WITHDRAW, Reason.REFUSED, f"{stage} failed: {exc}")

    def _exabgp_attributes(self, attrs: Attributes) -> RouteAttributes:
        """Memoised like `_announce_line`: VIPs share a few attribute sets."""
        key = (attrs, self.config.local_as)
        out = self._route_attrs.get(key)
        if out is None:
            if len(self._route_attrs) > 2 * len(self.vips) + 64:
                self._route_attrs.clear()
            out = self._route_attrs[key] = exabgp_attributes(attrs, self.config.local_as)
        return out

    def _announce_line(self, prefix: IPNetwork, attrs: Attributes) -> str:
        """The ExaBGP command for an announcement, memoised: with 10,000 VIPs every pass would
        otherwise rebuild (and re-validate) every line."""
        key = (prefix, attrs, self.config.local_as)
        line = self._lines.get(key)
        if line is None:
            line = announce_line(prefix, self._exabgp_attributes(attrs), self._targets[prefix.version])
            if len(self._lines) > 2 * len(self.vips) + 64:
                self._lines.clear()  # stale entries from old configs; rebuilt on demand
            self._lines[key] = line
        return line

    def _checked(self, vip: Vip, verdicts: dict[BackendKey, bool | None]) -> confirm.Checked:
        """What this pass sees of the VIP, for its confirm-pending state machine."""
        link = self.config.controller
        intent = self.plan.vips.get(vip.name)
        origin = vip.origin(intent.active_origin) if intent else None
        # (With weights, "down" means no weighted origin is healthy here: decide() announces
        # toward the others meanwhile, so there is nothing for the controller to confirm.)
        down = origin is not None and origin_verdict(
            origin, (verdicts.get((vip.name, origin.region, b)) for b in origin.backends)) is False and not (
            intent is not None and intent.weights and healthy_split(vip, intent, verdicts))
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
        self._transition_lines.flush()  # the results since the last pass
        decisions = self.decide_all()
        for d in decisions:
            previous = self.decisions.get(d.vip)
            if previous is None or (previous.action, previous.reason) != (d.action, d.reason):
                self._decision_lines.info(f"{d.action.value} ({d.reason})", "VIP %s (%s): %s, reason %s%s",
                                          d.vip, d.prefix, d.action.value, d.reason,
                                          f" ({d.detail})" if d.detail else "", extra=self._fields(d.vip, d.reason))
        self._decision_lines.flush()
        self.decisions = {d.vip: d for d in decisions}
        # Kernel first for additions (the route exists before BGP attracts traffic), BGP,
        # then the kernel again for removals (a route goes only after its withdrawal).
        commands = reconcile(decisions, self.announced, self.unsure, withdraw_undecided=self.plan.ready,
                             undecided_reason=Reason.NOT_IN_CONFIG if self.plan.specs is None else Reason.NOT_IN_PLAN)
        # Only an announcement attracts traffic: without one the first kernel step has nothing
        # to do that the last does not (it never removes), and a withdrawal would wait for its
        # netlink dumps (5-20 ms on a loaded host).
        kernel_before = (await self._kernel_step(decisions, before=True)
                         if any(isinstance(c, Announce) for c in commands) else True)
        bgp_ok = await self._send(commands)
        kernel_after = await self._kernel_step(decisions, before=False)
        ok = kernel_before and bgp_ok and kernel_after
        self.metrics.reconcile_duration.observe(time.monotonic() - started)
        self.metrics.reconciles.labels("success" if ok else "error").inc()
        if ok:
            self.last_reconcile_success = self.clock()
        return ok

    async def _send(self, commands: list[Command]) -> bool:
        """Send `commands` batched and pipelined (``speaker.send_changes``); each route's own
        answer decides what is recorded, so one route ExaBGP refuses fails alone."""
        ok = True
        changed = False
        changes = [RouteChange(cmd.prefix, self._exabgp_attributes(cmd.attributes), self._targets[cmd.prefix.version])
                   if isinstance(cmd, Announce) else
                   RouteChange(cmd.prefix, None, self._targets[cmd.prefix.version]) for cmd in commands]
        # In flight until answered: a stop that cuts this pass short withdraws them too
        # (ExaBGP may have taken a command whose ack we never read).
        was_unsure = {cmd.prefix for cmd in commands if cmd.prefix in self.unsure}
        unsure = self.unsure | {cmd.prefix for cmd in commands}
        # New objects once per answer, not per route, and never changed once published:
        # the metrics thread reads them while this runs.
        self.unsure, unsure = unsure, set(unsure)
        announced = dict(self.announced)
        async for members, acked in send_changes(self.announcer.send, changes):
            for i in members:
                cmd = commands[i]
                if cmd.prefix not in was_unsure:
                    unsure.discard(cmd.prefix)
                if acked:
                    action = "announce" if isinstance(cmd, Announce) else "withdraw"
                    detail = f" ({cmd.detail})" if isinstance(cmd, Withdraw) and cmd.detail else ""
                    self._ack_lines.info(f"{action} ({cmd.reason})", "%s %s (VIP %s), reason %s%s", action,
                                         cmd.prefix, cmd.vip, cmd.reason, detail,
                                         extra=self._fields(cmd.vip, cmd.reason))
                    self.metrics.announcement_changes.inc(cmd.vip, action, str(cmd.reason))
                    if isinstance(cmd, Announce):
                        announced[cmd.prefix] = cmd.attributes
                        self.withdrawn.discard(cmd.prefix)
                    else:
                        announced.pop(cmd.prefix, None)
                        self.withdrawn.add(cmd.prefix)
                    unsure.discard(cmd.prefix)
                    changed = True
                else:
                    ok = False
                    self.metrics.exabgp_errors.inc()
                    log.error("ExaBGP answered 'error' to: %s (will retry at the next pass)", changes[i].line(),
                              extra=self._fields(cmd.vip, cmd.reason))
            self.announced, announced = announced, dict(announced)
            self.unsure, unsure = unsure, set(unsure)
        self._ack_lines.flush()
        if changed:
            try:
                await self._save_state_file(self.config.state_dir, self.announced)
            except OSError as exc:
                ok = False
                log.error("cannot write the state file in %s: %s", self.config.state_dir, exc)
        return ok

    async def _save_state_file(self, state_dir: str, announced: dict[IPNetwork, Attributes]) -> None:
        """state_file.save in a worker thread: its fsync (up to ~0.2 s on a busy disk) held the
        event loop, and with it the checks, the reports and the next plan. One write at a
        time; a write that a cancelled pass left running never replaces a newer one."""
        self._state_seq += 1
        seq = self._state_seq

        def write() -> None:
            with self._state_lock:
                if seq > self._state_written:
                    state_file.save(state_dir, announced)
                    self._state_written = seq

        await asyncio.to_thread(write)

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
        with self._kernel_lock:
            self._kernel_sync_locked(decisions, before)

    def _kernel_sync_locked(self, decisions: list[Decision], before: bool) -> None:
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
        """Stop: withdraw everything and remove our kernel routes and loopback addresses
        (``shutdown: withdraw``), or leave it all as it is (``shutdown: keep``).

        The kernel cleanup happens whatever BGP does: after the withdrawals are acknowledged,
        or at once when ExaBGP is stopping too (a systemd stop signals both processes; its
        shutdown notification or EOF ends the wait, since it reads no more commands and
        kills us 2.1 s later) or gone (SIGKILL: EOF).
        """
        if self.config.shutdown == "keep":
            log.info("stopping (%s) with shutdown=keep: ExaBGP keeps announcing %d prefix(es) and the kernel "
                     "keeps the agent's routes", self._stopping, len(self.announced))
            return
        names = {v.prefix: v.name for v in self.vips}
        withdrawals = [Decision(names.get(p, str(p.network_address)), p, Action.WITHDRAW, Reason.SHUTDOWN,
                                "agent stopping")
                       for p in unique(set(self.announced) | self.unsure)]
        if self._bgp_gone.is_set():
            log.info("stopping (%s): ExaBGP's sessions close with it; removing the kernel state", self._stopping)
        else:
            log.info("stopping: withdrawing %d prefix(es)", len(withdrawals))
            await self._withdraw_before_exit(withdrawals)
        ok = await self._kernel_step(withdrawals, before=False)
        log.info("stopped: kernel routes and loopback addresses %s", "removed" if ok else "NOT all removed")

    async def _planned_withdrawal(self, withdrawals: list[Decision]) -> bool:
        """RFC 8326 graceful shutdown first (if configured), then the withdrawals."""
        if self.config.graceful_shutdown > 0 and self.announced:
            vips = {v.prefix: v for v in self.vips}
            gshut: list[Command] = []
            for prefix in unique(self.announced):
                attrs = self.announced[prefix]
                vip = vips.get(prefix)
                base = vip.attributes.draining if vip is not None else attrs
                marked = graceful_shutdown_attributes(base)
                try:
                    self._announce_line(prefix, marked)
                except Exception as exc:  # noqa: BLE001 - withdrawn below all the same
                    log.error("no graceful shutdown for %s: %s", prefix, exc)
                    continue
                gshut.append(Announce(prefix, marked, vip.name if vip else str(prefix.network_address),
                                      Reason.SHUTDOWN))
            log.info("graceful shutdown (RFC 8326): %d prefix(es) re-announced with 65535:0 and the draining "
                     "attributes; withdrawing in %.1f s", len(gshut), self.config.graceful_shutdown)
            await self._send(gshut)
            await asyncio.sleep(self.config.graceful_shutdown)
        return await self._send(reconcile(withdrawals, self.announced, self.unsure))

    async def _withdraw_before_exit(self, withdrawals: list[Decision]) -> None:
        send = asyncio.ensure_future(self._planned_withdrawal(withdrawals))
        gone = asyncio.ensure_future(self._bgp_gone.wait())
        try:
            done, _ = await asyncio.wait({send, gone}, timeout=SHUTDOWN_WITHDRAW_LIMIT + self.config.graceful_shutdown,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if send not in done:
            send.cancel()
            await asyncio.gather(send, return_exceptions=True)
            log.warning("stopped withdrawing: ExaBGP %s; its sessions close with it",
                        "is stopping too" if self._bgp_gone.is_set() else "did not answer in time")
        elif isinstance(send.exception(), SpeakerClosed):
            log.warning("could not withdraw, ExaBGP is gone (%s): its sessions are closed anyway",
                        send.exception())

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
            plan_refusals=dict(getattr(self.controller, "refusals", {})),
            plan_confirmed_at=getattr(self.controller, "confirmed_at", None),
            controller_url=self.config.controller.url if self.config.controller else "",
            controller_insecure_http=bool(self.config.controller and insecure_urls(self.config.controller)),
            local_as=self.config.local_as,
            peers=tuple(PeerSnapshot(str(n.address), n.peer_as, str(n.local_address)) for n in self.config.neighbors),
            held_elsewhere=tuple(str(p) for p in unique((set(self.announced) | self.unsure) - own)),
            checks=self.scheduler.stats(lateness=False),
            kernel_split_fallback=getattr(self.kernel, "split_fallback", None),
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
        if watchdog:
            self._liveness = ExaBGPLiveness(watchdog)
            tasks.append(asyncio.create_task(self._probe_exabgp(self._liveness), name="exabgp-probe"))
        try:
            while self._stopping is None:
                self._dirty.clear()
                try:
                    if not await self._pass_unless_stopped():
                        break  # a stop cut the pass short: shut down now, not after its acks
                except SpeakerClosed as exc:
                    log.warning("ExaBGP is gone (%s); exiting", exc)
                    self.stop("exabgp_gone")
                    break
                except Exception:  # noqa: BLE001 - a bug in one pass must not crash-loop the agent
                    # Exiting would make ExaBGP respawn us into the same bug and, after five
                    # deaths, give up and withdraw every VIP. ExaBGP keeps what it announces.
                    self.metrics.reconcile_crashes.inc()
                    self.metrics.reconciles.labels("error").inc()
                    log.exception("reconcile pass failed; announcements stay as they are, retrying "
                                  "at the next pass")
                await self._maybe_send_eor()
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

    async def _maybe_send_eor(self) -> None:
        """Send End-of-RIB once every VIP has a verdict (so a restart's re-announcements are
        all in before the router drops the stale paths), or at half the restart time."""
        if not self._eor_due or self._stopping is not None:
            return
        waiting = any(d.action is Action.HOLD and d.reason == Reason.HEALTH_UNKNOWN for d in self.decisions.values())
        if waiting and self.clock() - self._started < self.config.graceful_restart / 2:
            self._arm_eor_retry()
            return
        self._eor_due = False
        for version in sorted({n.address.version for n in self.config.neighbors}):
            line = eor_line(version, self._targets[version])
            if await self.announcer.send(line):
                log.info("sent End-of-RIB (IPv%d unicast) after %d VIP decision(s)", version, len(self.decisions))
            else:
                self._eor_due = True
                log.error("ExaBGP answered 'error' to: %s (will retry)", line)

    def _arm_eor_retry(self) -> None:
        asyncio.get_running_loop().call_later(0.5, self._dirty.set)

    async def _pass_unless_stopped(self) -> bool:
        """One reconcile pass, cancelled if a stop comes first (False then). A pass can wait
        for ExaBGP's acks for seconds; ExaBGP stopping stops answering, and kills us soon."""
        if self._stop_requested.is_set():
            return False
        pass_ = asyncio.ensure_future(self.reconcile_once())
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({pass_, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not pass_.done():
            pass_.cancel()
            await asyncio.gather(pass_, return_exceptions=True)
            return False
        pass_.result()  # re-raises what the pass raised
        return True

    async def _probe_exabgp(self, liveness: ExaBGPLiveness) -> None:
        """Round trips through ExaBGP's API for the watchdog (``agent.liveness``)."""
        loop = asyncio.get_running_loop()
        while not self._bgp_gone.is_set():
            try:
                if await self.announcer.send(PROBE):
                    liveness.acked(loop.time())
            except SpeakerClosed:
                return  # the main loop exits on it too
            await asyncio.sleep(liveness.probe_every())

    def _controller_state(self, ok: bool) -> None:
        self.controller_ok = ok

    def _notify(self) -> None:
        up = sum(1 for d in self.decisions.values() if d.action is Action.ANNOUNCE)
        status = f"{up}/{len(self.decisions)} VIPs announced; config {'ok' if self.config_ok else 'RELOAD FAILED'}"
        if not self._ready:
            self._ready = True
            self.notifier.notify(ready="1", status=status)
        elif self._liveness is None or self._liveness.alive(asyncio.get_running_loop().time()):
            self.notifier.notify(watchdog="1", status=status)
        else:
            # No ping: if ExaBGP stays silent, systemd's watchdog restarts the service.
            self.notifier.notify(status=status + "; ExaBGP not answering")


def install_signal_handlers(agent: Agent, loop: asyncio.AbstractEventLoop) -> None:
    loop.add_signal_handler(signal.SIGTERM, agent.stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, agent.stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, agent.reload)


def unique(items: Iterable[IPNetwork]) -> list[IPNetwork]:
    return sorted(set(items), key=lambda p: (p.version, int(p.network_address)))
