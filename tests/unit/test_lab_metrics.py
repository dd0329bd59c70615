"""lab.metrics: a scrape parsed by prometheus_client's parser, looked up by name and labels."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from lab.metrics import parse


def scrape() -> str:
    r = CollectorRegistry()
    g = Gauge("anycast_vip_announced", "h", ["vip", "prefix"], registry=r)
    g.labels("game-global", "198.51.100.10/32").set(1)
    g.labels("api-eu", "198.51.100.20/32").set(0)
    Gauge("anycast_controller_reachable", "h", registry=r).set(0)
    c = Counter("anycast_announcement_changes", "h", ["vip", "action", "reason"], registry=r)
    c.labels("game-global", "withdraw", "backend_down").inc(2)
    c.labels("game-global", "withdraw", "drain").inc()
    Histogram("anycast_check_duration_seconds", "h", ["vip"], registry=r)  # no sample yet
    Counter("anycast_checks", "h", ["vip"], registry=r)  # no sample yet
    Info("anycast_agent", "h", registry=r).info({"pop": "sjc"})
    return generate_latest(r).decode()


def test_value_by_name_and_a_subset_of_the_labels() -> None:
    m = parse(scrape())
    assert m.value("anycast_vip_announced", vip="game-global") == 1.0
    assert m.value("anycast_vip_announced", vip="api-eu", prefix="198.51.100.20/32") == 0.0
    assert m.value("anycast_controller_reachable") == 0.0  # 0.0 is a value, not "missing"
    assert m.value("anycast_vip_announced", vip="nope") is None
    assert m.value("anycast_nothing") is None
    assert m.value("anycast_announcement_changes_total", reason="backend_down") == 2.0
    assert m.value("anycast_agent_info", pop="sjc") == 1.0


def test_an_ambiguous_lookup_raises_and_total_sums() -> None:
    m = parse(scrape())
    with pytest.raises(LookupError, match="2 samples"):
        m.value("anycast_announcement_changes_total", vip="game-global")
    assert m.total("anycast_announcement_changes_total", vip="game-global", action="withdraw") == 3.0
    assert m.total("anycast_announcement_changes_total", reason="gone") == 0.0


def test_names_include_the_series_of_families_without_samples() -> None:
    names = parse(scrape()).names()
    assert {"anycast_check_duration_seconds_bucket", "anycast_check_duration_seconds_sum",
            "anycast_check_duration_seconds_count", "anycast_checks_total", "anycast_vip_announced",
            "anycast_announcement_changes_total", "anycast_agent_info"} <= names
    assert "anycast_check_duration_seconds" not in names  # a histogram is queried by its series
    assert "anycast_checks" not in names


def test_an_empty_scrape_answers_not_there() -> None:
    m = parse("")  # the daemon did not answer
    assert m.value("anycast_vip_announced") is None and m.names() == frozenset()
