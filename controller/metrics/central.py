"""Every metric the central controller exports. Prefix ``anycast_controller_``.

Plans, alarms and report ages are read at scrape time, as one ``ControllerSnapshot``: this
module owns that type and the ``ControllerView`` it comes from, and the server implements
the view (``Controller.metrics_snapshot``), so metrics import nothing of the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .process import register_process_metrics

PERSISTENCE_OPERATIONS = ("load", "append", "compact", "desired")  # controller.server.store.StoreOp
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


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry, controller: Callable[[], ControllerView]) -> None:
        registry.register(_ControllerCollector(controller))
        register_process_metrics(registry)
        self.reconciles = Counter("anycast_controller_reconcile", "Planning passes, by result.", ["result"],
                                  registry=registry)
        self.reconcile_duration = Histogram("anycast_controller_reconcile_duration_seconds",
                                            "Time for one planning pass.", registry=registry)
        self.config_reloads = Counter("anycast_controller_config_reloads", "Config loads, by result.", ["result"],
                                      registry=registry)
        self.requests = Counter("anycast_controller_requests", "API requests, by endpoint and status.",
                                ["endpoint", "status"], registry=registry)
        for result in ("success", "error"):
            self.reconciles.labels(result)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
