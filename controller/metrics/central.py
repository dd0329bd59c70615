"""Every metric the central controller exports. Prefix ``anycast_controller_``.

Plans, alarms and report ages are read from the controller at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..server.core import Controller

ALARM_KINDS = ("checks_down_everywhere", "min_pops_hold", "withdraw_rate_limited", "all_origins_down",
               "drain_blocked")


class _ControllerCollector(Collector):
    def __init__(self, controller: Callable[[], Controller]) -> None:
        self._controller = controller

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ctl = self._controller()
        now = ctl.clock()
        generation = GaugeMetricFamily("anycast_controller_plan_generation", "Plan generation served to each POP.",
                                       labels=["pop"])
        wanted = GaugeMetricFamily("anycast_controller_vips_planned",
                                   "VIPs the plan wants announced at each POP.", labels=["pop"])
        holds = GaugeMetricFamily("anycast_controller_safety_holds",
                                  "VIPs kept announced at each POP by a safety hold.", labels=["pop"])
        age = GaugeMetricFamily("anycast_controller_report_age_seconds",
                                "Seconds since each POP's last health report (+Inf: never).", labels=["pop"])
        drained = GaugeMetricFamily("anycast_controller_pop_drained", "1 while a POP is drained.", labels=["pop"])
        for pop in ctl.desired.pops:
            body = ctl.plan_body(pop.name)
            generation.add_metric([pop.name], float(body["generation"]))
            wanted.add_metric([pop.name], float(sum(1 for v in body["vips"] if v["wanted"])))
            holds.add_metric([pop.name], float(sum(1 for v in body["vips"] if v["safety_hold"])))
            report = ctl.reports.get(pop.name)
            age.add_metric([pop.name], now - report.received_at if report else float("inf"))
            drained.add_metric([pop.name], 1.0 if pop.name in ctl.persisted.drains else 0.0)
        yield from (generation, wanted, holds, age, drained)

        alarms = GaugeMetricFamily("anycast_controller_alarm", "1 while an alarm is raised for a VIP.",
                                   labels=["kind", "vip"])
        active = {(a.kind, a.vip) for a in ctl.alarms()}
        for fv in ctl.desired.vips:
            for kind in ALARM_KINDS:
                alarms.add_metric([kind, fv.name], 1.0 if (kind, fv.name) in active else 0.0)
        yield alarms

        origin = GaugeMetricFamily("anycast_controller_active_origin", "1 for each VIP's active origin region.",
                                   labels=["vip", "origin", "primary"])
        for fv in ctl.desired.vips:
            item = next((ctl.item(p, fv.name) for p in fv.publish if ctl.item(p, fv.name)), None)
            if item is not None:
                origin.add_metric([fv.name, item.active_origin,
                                   "true" if item.active_origin == fv.vip.origins[0].region else "false"], 1.0)
        yield origin

        yield GaugeMetricFamily("anycast_controller_config_last_reload_successful",
                                "0 while the newest config revision is rejected (the last good one is served).",
                                value=0.0 if ctl.config.last_error else 1.0)
        yield GaugeMetricFamily("anycast_controller_config_loaded_timestamp_seconds",
                                "When the config being served was loaded.", value=ctl.config.loaded_at)


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry, controller: Callable[[], Controller]) -> None:
        registry.register(_ControllerCollector(controller))
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
