"""The per-VIP counters and histogram (controller/metrics/labelled.py) expose what
prometheus_client's Counter and Histogram expose for the same events, ``_created`` aside."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from controller.agent.log_budget import LineBudget
from controller.metrics.labelled import LabelledCounter, LabelledHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def exposition(registry: CollectorRegistry) -> list[str]:
    return sorted(line for line in generate_latest(registry).decode().splitlines() if "_created" not in line)


def test_the_same_events_give_the_same_exposition() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    c1 = LabelledCounter("anycast_checks", "Health checks run, by result.", ["vip", "origin", "result"], ours)
    c2 = Counter("anycast_checks", "Health checks run, by result.", ["vip", "origin", "result"], registry=theirs)
    h1 = LabelledHistogram("anycast_check_duration_seconds", "Latency.", ["vip", "origin"], ours, buckets=BUCKETS)
    h2 = Histogram("anycast_check_duration_seconds", "Latency.", ["vip", "origin"], registry=theirs, buckets=BUCKETS)
    events = [("web", "us-west", "ok", 0.0005), ("web", "us-west", "fail", 0.01), ("web", "us-west", "ok", 0.01),
              ("api", "eu", "ok", 0.5), ("api", "eu", "ok", 7.0)]
    for vip, origin, result, latency in events:
        c1.inc(vip, origin, result)
        c2.labels(vip, origin, result).inc()
        h1.observe(latency, vip, origin)
        h2.labels(vip, origin).observe(latency)
    assert exposition(ours) == exposition(theirs)
    assert ours.get_sample_value("anycast_checks_total", {"vip": "web", "origin": "us-west", "result": "ok"}) == 2
    assert ours.get_sample_value("anycast_check_duration_seconds_bucket",
                                 {"vip": "web", "origin": "us-west", "le": "0.01"}) == 3  # le: inclusive
    assert ours.get_sample_value("anycast_check_duration_seconds_created", {"vip": "api", "origin": "eu"}) > 0
    assert c1.value("api", "eu", "ok") == 2 and c1.value("api", "eu", "fail") == 0


def test_a_burst_logs_its_first_lines_and_sums_up_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.burst")
    budget = LineBudget(logger, "VIP decisions", limit=3)
    with caplog.at_level(logging.INFO, logger="test.burst"):
        for i in range(7):
            budget.info("announce (healthy)" if i % 2 else "withdraw (backend_down)", "VIP v%d changed", i)
        budget.flush()
        budget.info("announce (healthy)", "VIP v%d changed", 99)  # a new burst: the budget again
        budget.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "VIP v0 changed", "VIP v1 changed", "VIP v2 changed",
        "VIP decisions: 4 more not logged one by one (DEBUG shows each): "
        "announce (healthy) x2, withdraw (backend_down) x2",
        "VIP v99 changed"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="test.burst"):
        for i in range(5):
            budget.info("k", "VIP v%d changed", i)
        budget.flush()
    assert [r.levelno for r in caplog.records] == [logging.INFO] * 3 + [logging.DEBUG] * 2 + [logging.INFO]
