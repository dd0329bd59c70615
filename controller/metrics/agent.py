"""Every metric the POP agent exports, in one place. Prefix ``anycast_``.

State (what is announced, health, BGP sessions) is exported by a collector that reads a
snapshot of the agent at scrape time, so there are no ``.set()`` calls scattered through
the code and a scrape never sees half an update. Events (checks, transitions, reloads)
are counters and histograms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..config.model import Attributes
from ..health.scheduler import SchedulerStats
from ..health.state import Phase
from ..health.watch import LossKind
from ..kernel.nexthop import SplitFallback
from .labelled import LabelledCounter, LabelledHistogram
from .process import register_process_metrics

VIP_STATES = ("up", "draining", "withdrawn", "pending")
PLAN_REFUSALS = ("cache_mac", "cache_invalid", "signature", "replay", "outside_allowed")  # controller.agent.plan_client.PlanClient.refusals
HEALTH_PHASES = tuple(Phase)  # init, rising, up, falling, down
# anycast_backend_healthy per phase (the state machine's verdict; -1: none yet)
_HEALTHY = {Phase.UP: 1.0, Phase.FALLING: 1.0, Phase.DOWN: 0.0, Phase.RISING: 0.0, Phase.INIT: -1.0}


@dataclass(frozen=True)
class VipSnapshot:
    name: str
    prefix: str
    status: str  # one of VIP_STATES
    reason: str
    announced: bool
    origin: str
    # What the metrics leave out and `anycastctl agent status` shows: the decision's action
    # and detail, the attributes it wants, and what ExaBGP holds as far as the agent knows
    # (``held``: the attributes last acknowledged; ``held_unsure``: ExaBGP may still hold a
    # route from before this process started, which the agent will correct).
    action: str = "hold"
    detail: str = ""
    next_hop: str = ""
    intended: Attributes | None = None
    held: Attributes | None = None
    held_unsure: bool = False


@dataclass(frozen=True)
class PeerSnapshot:
    """A configured BGP neighbour; its state is in ``AgentSnapshot.neighbors``."""

    address: str
    peer_as: int
    local_address: str


@dataclass(frozen=True)
class BackendSnapshot:
    vip: str
    origin: str
    backend: str
    phase: Phase
    last_ok: bool | None
    last_latency: float | None = None


@dataclass(frozen=True)
class AgentSnapshot:
    pop: str
    vips: tuple[VipSnapshot, ...] = ()
    backends: tuple[BackendSnapshot, ...] = ()
    neighbors: dict[str, bool] = field(default_factory=dict)
    last_reconcile_success: float = 0.0
    config_last_reload_ok: bool = True
    config_last_reload_time: float = 0.0
    plan_source: str = "local-config"
    plan_generation: int = 0
    controller_ok: bool | None = None  # None: no controller configured
    plan_revision: str = ""
    plan_refusals: Mapping[str, int] = field(default_factory=dict)  # reason -> plans refused (PLAN_REFUSALS)
    plan_confirmed_at: float | None = None  # wall time the controller last confirmed the plan followed
    controller_url: str = ""
    controller_insecure_http: bool = False  # a controller URL is plain HTTP beyond loopback (insecure_plain_http)
    local_as: int = 0
    peers: tuple[PeerSnapshot, ...] = ()
    held_elsewhere: tuple[str, ...] = ()  # prefixes ExaBGP holds (or may) that are no VIP's
    checks: SchedulerStats | None = None  # the check scheduler's counts (watches, confirmations)
    kernel_split_fallback: SplitFallback | None = None  # the kernel refused a resilient group: why


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily | CounterMetricFamily]:
        s = self._snapshot()
        info = InfoMetricFamily("anycast_agent", "The POP agent's identity.")
        info.add_metric([], {"pop": s.pop, "version": __version__, "plan_source": s.plan_source})
        yield info

        announced = GaugeMetricFamily("anycast_vip_announced",
                                      "1 if this POP announces the VIP over BGP now.", labels=["vip", "prefix"])
        state = GaugeMetricFamily("anycast_vip_state",
                                  "1 for the VIP's current state at this POP (up, draining, withdrawn, pending).",
                                  labels=["vip", "state"])
        reason = GaugeMetricFamily("anycast_vip_reason",
                                   "1 for the reason code behind the VIP's current decision.",
                                   labels=["vip", "reason", "origin"])
        for v in s.vips:
            announced.add_metric([v.name, v.prefix], 1.0 if v.announced else 0.0)
            for st in VIP_STATES:
                state.add_metric([v.name, st], 1.0 if v.status == st else 0.0)
            reason.add_metric([v.name, v.reason, v.origin], 1.0)
        yield announced
        yield state
        yield reason

        healthy = GaugeMetricFamily("anycast_backend_healthy",
                                    "1 healthy, 0 unhealthy, -1 no verdict yet (after rise/fall).",
                                    labels=["vip", "origin", "backend"])
        phase = GaugeMetricFamily("anycast_backend_phase", "1 for the backend's health phase.",
                                  labels=["vip", "origin", "backend", "phase"])
        last = GaugeMetricFamily("anycast_backend_last_check_ok", "1 if the last check passed.",
                                 labels=["vip", "origin", "backend"])
        latency = GaugeMetricFamily("anycast_backend_last_check_duration_seconds",
                                    "Latency of the backend's last check (per-origin histogram: "
                                    "anycast_check_duration_seconds).", labels=["vip", "origin", "backend"])
        for b in s.backends:
            labels = [b.vip, b.origin, b.backend]
            healthy.add_metric(labels, _HEALTHY[b.phase])
            for p in HEALTH_PHASES:
                phase.add_metric(labels + [p], 1.0 if b.phase == p else 0.0)
            if b.last_ok is not None:
                last.add_metric(labels, 1.0 if b.last_ok else 0.0)
            if b.last_latency is not None:
                latency.add_metric(labels, b.last_latency)
        yield healthy
        yield phase
        yield last
        yield latency

        nb = GaugeMetricFamily("anycast_bgp_neighbor_up", "1 if the BGP session to the neighbour is up.",
                               labels=["neighbor"])
        for addr, up in sorted(s.neighbors.items()):
            nb.add_metric([addr], 1.0 if up else 0.0)
        yield nb

        yield GaugeMetricFamily("anycast_reconcile_last_success_timestamp_seconds",
                                "Unix time of the last reconcile that completed without error.",
                                value=s.last_reconcile_success)
        yield GaugeMetricFamily("anycast_config_last_reload_successful",
                                "1 if the last config load succeeded (a failed reload keeps the last good config).",
                                value=1.0 if s.config_last_reload_ok else 0.0)
        yield GaugeMetricFamily("anycast_config_last_reload_timestamp_seconds",
                                "Unix time of the last config load attempt.", value=s.config_last_reload_time)
        yield GaugeMetricFamily("anycast_plan_generation", "Generation of the plan the agent follows.",
                                value=float(s.plan_generation))
        yield from _check_families(s.checks)
        fallback = GaugeMetricFamily("anycast_kernel_split_fallback",
                                     "1 while the kernel refuses resilient next-hop groups, by reason (not_supported, "
                                     "invalid: Linux < 5.13, family_not_supported): split routes (traffic steering's "
                                     "weights) are installed single-path toward their first next hop.",
                                     labels=["reason"])
        for cause in SplitFallback:
            fallback.add_metric([cause.value], 1.0 if s.kernel_split_fallback == cause else 0.0)
        yield fallback
        if s.controller_ok is not None:
            yield GaugeMetricFamily("anycast_controller_reachable",
                                    "1 if the last plan fetch from the controller worked (else the agent "
                                    "follows its last plan).", value=1.0 if s.controller_ok else 0.0)
            yield GaugeMetricFamily("anycast_agent_controller_insecure_http",
                                    "1 when the agent reaches a controller in plain HTTP beyond loopback "
                                    "(controller.insecure_plain_http): its token and plans cross the network "
                                    "in clear.", value=1.0 if s.controller_insecure_http else 0.0)
            refused = CounterMetricFamily("anycast_plan_refusals",
                                          "Plans refused, by reason (cache_mac: a cache file this agent did not "
                                          "write; cache_invalid: unreadable or not a plan; signature: not signed "
                                          "by a plan key; replay: older than the plan held; outside_allowed: one VIP "
                                          "outside the allowed prefixes, refused alone).", labels=["reason"])
            for why in PLAN_REFUSALS:
                refused.add_metric([why], float(s.plan_refusals.get(why, 0)))
            yield refused
            if s.plan_confirmed_at is not None:
                yield GaugeMetricFamily("anycast_plan_confirmed_timestamp_seconds",
                                        "Unix time the controller last confirmed the plan the agent follows "
                                        "(alert when old: the agent never withdraws because of it).",
                                        value=s.plan_confirmed_at)


def _check_families(checks: SchedulerStats | None) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The watch connections (``check.watch``) and the confirmation probes their losses ran;
    zeros when nothing is watched, so alerts and dashboards see no gaps."""
    watch = checks.watch if checks is not None else None
    yield GaugeMetricFamily("anycast_watch_endpoints", "Backend endpoints with a watch connection (any state).",
                            value=watch.endpoints if watch else 0)
    yield GaugeMetricFamily("anycast_watch_connected", "Watch connections established now.",
                            value=watch.connected if watch else 0)
    yield GaugeMetricFamily("anycast_watch_unwatched",
                            "Endpoints whose check wants a watch but exceeds the watch budget (half the open-file "
                            "limit): polled only.", value=watch.unwatched if watch else 0)
    losses = CounterMetricFamily("anycast_watch_losses", "Established watch connections lost, by how they ended "
                                 "(reset, eof, error): each ran confirmation probes.", labels=["kind"])
    for kind in LossKind:
        losses.add_metric([kind.value], watch.losses_by_kind.get(kind, 0) if watch else 0)
    yield losses
    yield CounterMetricFamily("anycast_watch_connects", "Watch connection attempts.",
                              value=watch.connects if watch else 0)
    yield CounterMetricFamily("anycast_watch_connect_failures", "Watch connection attempts that failed.",
                              value=watch.connect_failures if watch else 0)
    yield CounterMetricFamily("anycast_check_confirmations", "Confirmation probes run after a watch loss "
                              "(up to fall each, back to back).", value=checks.confirmations if checks else 0)
    yield GaugeMetricFamily("anycast_check_kept_connections", "Kept HTTP connections (check.reuse_connection) "
                            "idle between checks.", value=checks.kept_idle if checks else 0)
    yield CounterMetricFamily("anycast_check_kept_retried", "Checks on a kept connection run again on a fresh one "
                              "(the server closed it, or answered 408, as the request came).",
                              value=checks.kept_retried if checks else 0)
    yield CounterMetricFamily("anycast_check_kept_over_budget", "Check connections closed instead of kept: the kept "
                              "connections' file-descriptor budget (below the open-file limit) was full.",
                              value=checks.kept_over_budget if checks else 0)
    yield CounterMetricFamily("anycast_check_kept_evicted", "Idle kept connections closed to give a check a file "
                              "descriptor (the process was out of them).", value=checks.kept_evicted if checks else 0)


class AgentMetrics:
    """The agent's instruments, registered in ``registry`` (tests pass a private one)."""

    def __init__(self, registry: CollectorRegistry, snapshot: Callable[[], AgentSnapshot]) -> None:
        self.registry = registry
        registry.register(_SnapshotCollector(snapshot))
        register_process_metrics(registry)
        # Per VIP: one label set per VIP or more, so the cheap kind (labelled.py).
        self.checks = LabelledCounter("anycast_checks", "Health checks run, by result.",
                                      ["vip", "origin", "result"], registry)
        self.check_duration = LabelledHistogram(
            "anycast_check_duration_seconds", "Health-check latency (connect or full HTTP answer).",
            ["vip", "origin"], registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.health_transitions = LabelledCounter(
            "anycast_health_transitions", "Backend health phase changes.", ["vip", "origin", "to"], registry)
        self.announcement_changes = LabelledCounter(
            "anycast_announcement_changes", "Announce and withdraw commands sent, by reason.",
            ["vip", "action", "reason"], registry)
        self.exabgp_errors = Counter("anycast_exabgp_command_errors",
                                     "Commands ExaBGP answered with 'error'.", registry=registry)
        self.exabgp_garbage = Counter("anycast_exabgp_unparsed_lines",
                                      "Lines from ExaBGP that could not be parsed (logged and ignored).",
                                      registry=registry)
        self.reconciles = Counter("anycast_reconcile", "Reconcile passes, by result.", ["result"],
                                  registry=registry)
        self.reconcile_duration = Histogram("anycast_reconcile_duration_seconds",
                                            "Time for one reconcile pass.", registry=registry)
        self.config_reloads = Counter("anycast_config_reloads", "Config (re)loads, by result.", ["result"],
                                      registry=registry)
        self.vip_refused = Counter(
            "anycast_vip_refused", "VIPs withdrawn because the agent failed handling them (reason refused), "
            "by where it failed.", ["vip", "stage"], registry=registry)
        self.reconcile_crashes = Counter(
            "anycast_reconcile_crashes", "Reconcile passes that raised (logged; the agent carries on).",
            registry=registry)
        self.kernel_errors = Counter("anycast_kernel_sync_errors",
                                     "Kernel routes or addresses that could not be applied.", registry=registry)
        # Label sets that exist from the start, so dashboards and alerts see zeros, not gaps.
        for result in ("success", "error"):
            self.reconciles.labels(result)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)

