"""Counters and a histogram with many label sets (one per VIP), cheap per event.

prometheus_client builds a child object per label set (its own lock and value per bucket,
label validation on every ``labels()`` call): a cold start with 10,000 VIPs created 70,000
of them, a quarter of the agent's CPU for that pass. Here an event is a dict update on the
event loop; the exposition (the same names, types, labels and samples, ``_created``
included) is built from copies when Prometheus scrapes, in the metrics thread.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client import utils

# How prometheus_client writes a bucket's ``le`` (untyped there).
_le: Callable[[float], str] = utils.floatToGoString


class LabelledCounter(Collector):
    """A counter ``NAME_total`` by ``labelnames``; a label set exists from its first ``inc``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._values: dict[tuple[str, ...], list[float]] = {}  # labels -> [value, created]
        registry.register(self)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        cell = self._values.get(labels)
        if cell is None:
            self._values[labels] = [amount, time.time()]
        else:
            cell[0] += amount

    def value(self, *labels: str) -> float:
        cell = self._values.get(labels)
        return 0.0 if cell is None else cell[0]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (value, created) in self._values.copy().items():  # (copy: the loop adds label sets)
            family.add_metric(list(labels), value, created=created)
        yield family


class LabelledHistogram(Collector):
    """A histogram ``NAME`` by ``labelnames`` with fixed ``buckets`` (+Inf added)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry,
                 buckets: Sequence[float]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds = sorted(float(b) for b in buckets)
        # labels -> per-bucket counts (non-cumulative, the last one +Inf), then sum, then created
        self._values: dict[tuple[str, ...], list[float]] = {}
        registry.register(self)

    def observe(self, amount: float, *labels: str) -> None:
        cell = self._values.get(labels)
        n = len(self.bounds)
        if cell is None:
            cell = self._values[labels] = [0.0] * (n + 1) + [0.0, time.time()]
        cell[bisect.bisect_left(self.bounds, amount)] += 1  # le: the first bound >= amount
        cell[n + 1] += amount

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        n = len(self.bounds)
        names = [_le(b) for b in self.bounds] + ["+Inf"]
        for labels, cell in self._values.copy().items():
            counts, total, created = cell[: n + 1], cell[n + 1], cell[n + 2]
            cumulative, buckets = 0.0, []
            for le, c in zip(names, counts, strict=True):
                cumulative += c
                buckets.append((le, cumulative))
            family.add_metric(list(labels), buckets, total)
            family.add_sample(f"{self.name}_created", dict(zip(self.labelnames, labels, strict=True)), created)
        yield family
