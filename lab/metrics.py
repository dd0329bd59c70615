"""A Prometheus scrape, parsed (prometheus_client's own parser), for lab assertions.

Tests, benchmarks and the demo ask a scrape questions by metric name and labels
(``parse(text).value("anycast_vip_announced", vip="game-global")``) instead of searching
the exposition text for a line: label order, float formatting and the HELP/TYPE lines are
the client library's business, not the test's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str  # the series name: anycast_checks_total, ..._bucket, ...
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Family:
    name: str  # as the parser names it: a counter without its _total
    kind: str  # counter, gauge, histogram, summary, info, stateset, unknown, ...
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class Scrape:
    """One scrape's families. An empty one (the daemon did not answer) has no samples,
    so every lookup says "not there" rather than raising."""

    families: tuple[Family, ...] = ()
    _by_name: dict[str, tuple[Sample, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, list[Sample]] = {}
        for s in self.samples():
            by_name.setdefault(s.name, []).append(s)
        self._by_name.update({k: tuple(v) for k, v in by_name.items()})

    def samples(self, name: str | None = None) -> Iterator[Sample]:
        """Every sample, or those of the series ``name``."""
        if name is not None:
            yield from self._by_name.get(name, ())
            return
        for fam in self.families:
            yield from fam.samples

    def find(self, name: str, **labels: str) -> list[Sample]:
        """The samples of ``name`` whose labels include ``labels`` (a subset match)."""
        return [s for s in self.samples(name) if all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample of ``name`` with ``labels``; None if there is none.

        Several matches raise LookupError: the question was ambiguous (name more labels).
        """
        found = self.find(name, **labels)
        if len(found) > 1:
            raise LookupError(f"{len(found)} samples of {name} match {labels}: "
                              f"{[dict(s.labels) for s in found]}")
        return found[0].value if found else None

    def total(self, name: str, **labels: str) -> float:
        """The sum over the samples of ``name`` with ``labels`` (0 if none): a counter
        across the label values not named."""
        return sum(s.value for s in self.find(name, **labels))

    def names(self) -> frozenset[str]:
        """Every series name the scrape can return: those of its samples, and for a family
        with no samples yet (a labelled counter or histogram never observed) the series it
        will have, so a check of the names ops/ uses does not depend on traffic."""
        names: set[str] = set(self._by_name)
        for fam in self.families:
            if fam.kind == "histogram":
                names |= {fam.name + "_bucket", fam.name + "_sum", fam.name + "_count"}
            elif fam.kind == "summary":
                names |= {fam.name, fam.name + "_sum", fam.name + "_count"}
            elif fam.kind == "counter":
                names.add(fam.name + "_total")
            elif fam.kind == "info":
                names.add(fam.name + "_info")
            else:
                names.add(fam.name)
        return frozenset(names)


def parse(text: str) -> Scrape:
    """Parse Prometheus text exposition (format 0.0.4, what every daemon here serves).

    Raises ValueError on text that is not exposition (a proxy's error page, say)."""
    families = tuple(
        Family(f.name, f.type, tuple(Sample(s.name, dict(s.labels), float(s.value)) for s in f.samples))
        for f in text_string_to_metric_families(text))
    return Scrape(families)


def names_in_exposition(text: str) -> frozenset[str]:
    """The series names a scrape's text can return (see ``Scrape.names``)."""
    return parse(text).names()
