"""Every metric the central controller exports. Prefix ``anycast_controller_``.

Plans, alarms and report ages are read at scrape time, as one ``ControllerSnapshot``: this
module owns that type and the ``ControllerView`` it comes from, and the server implements
the view (``Controller.metrics_snapshot``), so metrics import nothing of the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .process import register_process_metrics

EVENT_LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SHED_REASONS = ("evicted",)  # controller.server.guard.Shed
PERSISTENCE_OPERATIONS = ("load", "append", "compact", "desired")  # controller.server.store.StoreOp
CHANGE_PHASES = ("steady", "held", "rolling", "rolled_back")  # controller.policy.change.Phase
ALARM_KINDS = ("checks_down_everywhere", "min_pops_hold", "withdraw_rate_limited", "all_origins_down",
               "drain_blocked")


@dataclass(frozen=True)
class PopSnapshot:
    pop: str
    plan_generation: int
    vips_planned: int  # VIPs the plan wants announced there
    safety_holds: int  # VIPs kept announced there by a safety hold
    report_age: float  # seconds since its last report; +Inf: never
    drained: bool


@dataclass(frozen=True)
class ActiveOrigin:
    vip: str
    origin: str
    primary: bool  # the VIP's first origin region


@dataclass(frozen=True)
class OriginWeight:
    """Traffic steering: one origin's effective weight in a VIP's plan at a POP (single path:
    1 for the active origin, 0 for the others), and the region's effective dial for the VIP."""

    vip: str
    pop: str
    origin: str
    weight: int
    dial: int


@dataclass(frozen=True)
class ControllerSnapshot:
    pops: tuple[PopSnapshot, ...]
    vips: tuple[str, ...]  # every VIP of the desired state (alarm label sets exist for each)
    alarms: frozenset[tuple[str, str]]  # (kind, vip) raised now
    active_origins: tuple[ActiveOrigin, ...]  # VIPs planned at some POP
    config_ok: bool  # False while the newest config revision is rejected
    config_loaded_at: float
    persistence_ok: bool = True  # False from a failed state write until the next one works
    persistence_errors: Mapping[str, int] = field(default_factory=dict)  # operation -> failures so far
    # Only VIPs with traffic steering (preference, weights or a dial): the others have one
    # active origin, in anycast_controller_active_origin (and 10,000 VIPs x 50 POPs x 2 origins
    # would be a million series).
    origin_weights: tuple[OriginWeight, ...] = ()
    change_phase: str = "steady"  # the config change's phase (CHANGE_PHASES)
    change_withdraw_pairs: int = 0  # (VIP, POP) pairs the held or rolling change withdraws


class ControllerView(Protocol):
    """What the collector reads at scrape time (the server's Controller is one)."""

    def metrics_snapshot(self) -> ControllerSnapshot: ...


class _ControllerCollector(Collector):
    def __init__(self, controller: Callable[[], ControllerView]) -> None:
        self._controller = controller

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._controller().metrics_snapshot()
        generation = GaugeMetricFamily("anycast_controller_plan_generation", "Plan generation served to each POP.",
                                       labels=["pop"])
        wanted = GaugeMetricFamily("anycast_controller_vips_planned",
                                   "VIPs the plan wants announced at each POP.", labels=["pop"])
        holds = GaugeMetricFamily("anycast_controller_safety_holds",
                                  "VIPs kept announced at each POP by a safety hold.", labels=["pop"])
        age = GaugeMetricFamily("anycast_controller_report_age_seconds",
                                "Seconds since each POP's last health report (+Inf: never).", labels=["pop"])
        drained = GaugeMetricFamily("anycast_controller_pop_drained", "1 while a POP is drained.", labels=["pop"])
        for pop in s.pops:
            generation.add_metric([pop.pop], float(pop.plan_generation))
            wanted.add_metric([pop.pop], float(pop.vips_planned))
            holds.add_metric([pop.pop], float(pop.safety_holds))
            age.add_metric([pop.pop], pop.report_age)
            drained.add_metric([pop.pop], 1.0 if pop.drained else 0.0)
        yield from (generation, wanted, holds, age, drained)

        alarms = GaugeMetricFamily("anycast_controller_alarm", "1 while an alarm is raised for a VIP.",
                                   labels=["kind", "vip"])
        for vip in s.vips:
            for kind in ALARM_KINDS:
                alarms.add_metric([kind, vip], 1.0 if (kind, vip) in s.alarms else 0.0)
        yield alarms

        origin = GaugeMetricFamily("anycast_controller_active_origin", "1 for each VIP's active origin region.",
                                   labels=["vip", "origin", "primary"])
        for a in s.active_origins:
            origin.add_metric([a.vip, a.origin, "true" if a.primary else "false"], 1.0)
        yield origin

        weight = GaugeMetricFamily("anycast_controller_origin_weight",
                                   "Traffic steering: each origin's effective weight in a VIP's plan at a POP "
                                   "(weight x dial, 0 while unavailable; single path: 1 for the active origin).",
                                   labels=["vip", "pop", "origin"])
        dial = GaugeMetricFamily("anycast_controller_origin_dial",
                                 "Traffic steering: each origin region's effective traffic dial for a VIP (0-100).",
                                 labels=["vip", "origin"])
        dials_seen: set[tuple[str, str]] = set()
        for w in s.origin_weights:
            weight.add_metric([w.vip, w.pop, w.origin], float(w.weight))
            if (w.vip, w.origin) not in dials_seen:
                dials_seen.add((w.vip, w.origin))
                dial.add_metric([w.vip, w.origin], float(w.dial))
        yield from (weight, dial)

        yield GaugeMetricFamily("anycast_controller_config_last_reload_successful",
                                "0 while the newest config revision is rejected (the last good one is served).",
                                value=1.0 if s.config_ok else 0.0)
        yield GaugeMetricFamily("anycast_controller_config_loaded_timestamp_seconds",
                                "When the config being served was loaded.", value=s.config_loaded_at)
        yield GaugeMetricFamily("anycast_controller_persistence_ok",
                                "0 while the controller cannot save its state (operator actions are refused).",
                                value=1.0 if s.persistence_ok else 0.0)
        errors = CounterMetricFamily("anycast_controller_persistence_errors",
                                     "State reads and writes that failed, by operation.", labels=["operation"])
        for op in PERSISTENCE_OPERATIONS:
            errors.add_metric([op], float(s.persistence_errors.get(op, 0)))
        yield errors
        phase = GaugeMetricFamily("anycast_controller_change_phase",
                                  "1 for the phase the newest config revision is in: steady (applied), held (over "
                                  "the blast-radius budget, waiting for a confirm), rolling, rolled_back.",
                                  labels=["phase"])
        for p in CHANGE_PHASES:
            phase.add_metric([p], 1.0 if s.change_phase == p else 0.0)
        yield phase
        yield GaugeMetricFamily("anycast_controller_change_withdraw_pairs",
                                "(VIP, POP) pairs the held, rolling or rolled-back config change withdraws.",
                                value=float(s.change_withdraw_pairs))


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry, controller: Callable[[], ControllerView]) -> None:
        registry.register(_ControllerCollector(controller))
        register_process_metrics(registry)
        self.reconciles = Counter("anycast_controller_reconcile", "Planning passes, by result.", ["result"],
                                  registry=registry)
        self.reconcile_duration = Histogram("anycast_controller_reconcile_duration_seconds",
                                            "Time for one planning pass.", registry=registry)
        # controller.server.looplag: a timer's lateness, every LAG_EVERY s (a stall of S s shows as
        # one sample between S - LAG_EVERY and S).
        self.event_loop_lag = Histogram("anycast_controller_event_loop_lag_seconds",
                                        "How late the event loop ran a timer that was due (sampled every "
                                        "--loop-lag-every s): how long requests waited behind other work.",
                                        buckets=EVENT_LOOP_LAG_BUCKETS, registry=registry)
        self.config_reloads = Counter("anycast_controller_config_reloads", "Config loads, by result.", ["result"],
                                      registry=registry)
        self.requests = Counter("anycast_controller_requests", "API requests, by endpoint and status.",
                                ["endpoint", "status"], registry=registry)
        # The API's defences (controller.server.guard, controller.server.tls).
        self.connections_shed = Counter(
            "anycast_controller_connections_shed",
            "Unauthenticated API connections closed to keep room for agents (evicted: the oldest, for a "
            "newcomer past api.max_unauthenticated_connections).", ["reason"], registry=registry)
        self.accept_errors = Counter("anycast_controller_accept_errors",
                                     "API connections that could not be accepted (no file descriptors or memory "
                                     "left); logged at most once per 10 s.", registry=registry)
        self.api_tls = Gauge("anycast_controller_api_tls", "1 when the API serves HTTPS, 0 for plain HTTP.",
                             registry=registry)
        self.api_insecure_http = Gauge("anycast_controller_api_insecure_http",
                                       "1 when the API serves plain HTTP beyond loopback (api.insecure_plain_http): "
                                       "tokens and plans in clear.", registry=registry)
        for reason in SHED_REASONS:
            self.connections_shed.labels(reason)
        for result in ("success", "error"):
            self.reconciles.labels(result)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)


# --- HA (controller.server.ha): leadership and etcd ---------------------------------------------
# Exported by HA controllers only (a single controller has no leadership): the lab checks
# them on lab.ha's fleet (tests/integration/test_lab_ha.py), the others on the plain one.
HA_METRICS = ("anycast_controller_leader", "anycast_controller_leader_known",
              "anycast_controller_leadership_acquired_total", "anycast_controller_ha_members",
              "anycast_controller_etcd_up", "anycast_controller_etcd_errors_total")
ETCD_OPERATIONS = ("load", "append", "compact", "keepalive", "campaign", "members", "alive", "resign", "read")


@dataclass(frozen=True)
class HaSnapshot:
    leader: bool  # this controller acts as the leader now
    leader_known: bool  # some controller holds the leader key (as last seen)
    became_leader: int  # times this controller became leader
    members: int  # controllers registered in etcd (as last seen)
    endpoints: Mapping[str, bool | None]  # etcd endpoint -> answered last time (None: not tried)
    etcd_errors: Mapping[str, int]  # operation -> calls that no endpoint answered


class HaView(Protocol):
    def ha_snapshot(self) -> HaSnapshot: ...


class _HaCollector(Collector):
    def __init__(self, view: HaView, term: Callable[[], CollectorRegistry | None]) -> None:
        self._view, self._term = view, term

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._view.ha_snapshot()
        yield GaugeMetricFamily("anycast_controller_leader", "1 while this controller is the HA leader.",
                                value=1.0 if s.leader else 0.0)
        yield GaugeMetricFamily("anycast_controller_leader_known",
                                "1 while some controller holds the leader key (as this one last saw it).",
                                value=1.0 if s.leader_known else 0.0)
        yield CounterMetricFamily("anycast_controller_leadership_acquired",
                                  "Times this controller became the leader.", value=float(s.became_leader))
        yield GaugeMetricFamily("anycast_controller_ha_members", "Controllers registered in etcd.",
                                value=float(s.members))
        up = GaugeMetricFamily("anycast_controller_etcd_up", "1 if the etcd endpoint answered the last request.",
                               labels=["endpoint"])
        for endpoint, ok in s.endpoints.items():
            up.add_metric([endpoint], 1.0 if ok else 0.0)
        yield up
        errors = CounterMetricFamily("anycast_controller_etcd_errors",
                                     "etcd calls that no endpoint answered, by operation.", labels=["operation"])
        for op in ETCD_OPERATIONS:
            errors.add_metric([op], float(s.etcd_errors.get(op, 0)))
        yield errors
        term = self._term()
        if term is not None:  # the leader's plans, reports, persistence (ControllerMetrics)
            yield from term.collect()  # type: ignore[misc]


def register_ha_metrics(registry: CollectorRegistry, view: HaView,
                        term: Callable[[], CollectorRegistry | None]) -> None:
    """The HA shell's metrics, and those of the current leader term's registry when leading."""
    registry.register(_HaCollector(view, term))
