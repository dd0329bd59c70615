"""What this POP's checks prove, and when: the agent's side of the evidence-based settle.
No I/O; time comes in as an argument.

Theory of operation
-------------------
When one POP sees a VIP's active origin fail, the controller holds its withdrawal for
``settle`` seconds unless it learns sooner that the failure is not everywhere: a quorum of
the VIP's other POPs seeing the origin healthy on checks that succeeded *after* the failing
POP's first failed check (broken checks fail at every POP within an interval or two, so an
older success proves nothing). Two things travel for that, as ages in the report's
``checks`` (``wire.py``), only for the few VIPs concerned:

- the failing POP's ``failing``: since its first failed check of the failure now running. It
  reports at once on that first failure (``fall`` not reached yet), so the controller can
  ask the others while this POP is still confirming its own failure;
- the others' ``ok``: since at least ``min_healthy`` backends last succeeded with nothing
  failed after. A plan entry with ``evidence`` asks for it, about the origins it names
  (``evidence_origins``; none named: its active origin): the agent reports at once, and once
  more when every backend of each asked origin has been checked since the ask (its previous
  checks may predate the failure). Named, because with traffic steering the POP being
  confirmed may judge another origin than this POP's active one (its own preference).

Per backend the agent keeps ``Times`` (``observe`` after each result); ``of_origin`` sums an
origin's up; ``ages`` is what a report carries; ``Asks`` tracks the asks of the plan and which are still owed a report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Times:
    """One backend's check times (the agent's clock)."""

    last_at: float  # the last check completed (ok or not)
    ok_at: float | None  # the last successful check
    failing_since: float | None  # first failure of the run of failures now going on (None: last check ok)


def observe(t: Times | None, ok: bool, now: float) -> Times:
    """The times after one check result."""
    if ok:
        return Times(now, now, None)
    return Times(now, t.ok_at if t is not None else None,
                 t.failing_since if t is not None and t.failing_since is not None else now)


@dataclass(frozen=True, slots=True)
class OriginTimes:
    ok_at: float | None  # at least min_healthy backends' last checks succeeded at or after this
    failing_since: float | None  # fewer than that: since the failure began (the latest run start)
    checked_at: float | None  # every backend has completed a check at or after this (None: one never has)


def of_origin(times: Iterable[Times | None], min_healthy: int) -> OriginTimes:
    """An origin's times from its backends'. ``failing_since`` is the start of the latest
    failure run among the failing backends: the failure that took the origin below
    ``min_healthy`` began no earlier (later is the safe side: it asks fresher evidence)."""
    ts = list(times)
    oks = sorted((t.ok_at for t in ts if t is not None and t.failing_since is None and t.ok_at is not None),
                 reverse=True)
    ok_at = oks[min_healthy - 1] if 0 < min_healthy <= len(oks) else None
    failing = [t.failing_since for t in ts if t is not None and t.failing_since is not None]
    failing_since = max(failing) if failing and ok_at is None else None
    checked_at = None if not ts or any(t is None for t in ts) else min(t.last_at for t in ts if t is not None)
    return OriginTimes(ok_at, failing_since, checked_at)


def checked_at(origins: Iterable[OriginTimes]) -> float | None:
    """Every backend of every one of ``origins`` has completed a check at or after this."""
    times = [o.checked_at for o in origins]
    return None if not times or any(t is None for t in times) else min(t for t in times if t is not None)


def ages(o: OriginTimes, now: float) -> tuple[float | None, float | None]:
    """What a report carries: (seconds since ``ok_at``, seconds since ``failing_since``)."""
    return (None if o.ok_at is None else max(0.0, now - o.ok_at),
            None if o.failing_since is None else max(0.0, now - o.failing_since))


class Asks:
    """The VIPs the plan asks evidence for, about which origins, and since when; which still
    owe a report after a full round of checks."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}  # vip -> when the ask arrived
        self.origins: dict[str, tuple[str, ...]] = {}  # vip -> the origins asked (() : not named)
        self.owed: set[str] = set()  # asked, and not yet reported after every backend was checked again
        self.new: set[str] = set()  # the last update's new asks

    def update(self, asked: Iterable[str] | Mapping[str, tuple[str, ...]], now: float) -> bool:
        """The plan's asks now (VIP names, or VIP -> the origins asked); True if one is new,
        or asks about other origins than before (report at once; which: ``new``)."""
        by_name = dict(asked) if isinstance(asked, Mapping) else dict.fromkeys(asked, ())
        new = {n for n, o in by_name.items() if n not in self.since or self.origins.get(n) != o}
        for name in list(self.since):
            if name not in by_name:
                del self.since[name]
                self.origins.pop(name, None)
                self.owed.discard(name)
        for name in new:
            self.since[name] = now
            self.origins[name] = by_name[name]
            self.owed.add(name)
        self.new = new
        return bool(new)

    def round_done(self, name: str, checked_at: float | None) -> bool:
        """After a result for ``name``: True once (report now) when every backend of its
        origin has been checked since the ask."""
        since = self.since.get(name)
        if name not in self.owed or since is None or checked_at is None or checked_at < since:
            return False
        self.owed.discard(name)
        return True
