"""The incremental planning engine: re-plan only the VIPs whose inputs changed. Pure (no
asyncio, no I/O, no clock of its own).

Theory of operation
-------------------
A VIP's plan is a pure function of its inputs (``planner.plan_vip``): its definition and
policy, the fresh verdicts of its POPs about it, the drains of its POPs, its memory and the
clock. So the engine keeps every VIP's last ``VipPlan`` and re-plans a VIP only when one of
those inputs changed, which it learns by comparing what it is given with what it saw:

- **config**: a VIP whose ``FleetVip`` (definition, publish list, policy) differs, or that
  is new, is dirty; a removed one is dropped. A POP added or removed shows up as the
  publish lists that name it.
- **drains**: a POP whose drain started or ended makes the VIPs published there dirty.
- **reports**: a POP's new report makes dirty the VIPs whose verdicts in it differ from
  its previous report (all of them when the POP was stale and is fresh again). Freshness
  is tracked per POP and per ``report_stale_after`` value (a handful of policies, not one
  per VIP): a per-POP timer marks the VIPs of a POP whose report went stale.
- **time**: each VIP's plan says when the same inputs would plan it differently
  (``VipPlan.wake_at``: settle, drain, hold-down, rate-limit window, failback, flap
  expiry). A heap holds the earliest wake-up per VIP; a VIP whose time came is dirty.

There is no periodic full pass. ``planner.full_plan`` (every VIP, no shortcut) is the
oracle: tests/unit/test_policy_engine.py drives long random event sequences through both
and requires the same plans, memory, alarms and wake-ups.

A pass is split in three so that a large one (a cold start, a policy change that touches
every VIP) never holds the caller's event loop: ``begin`` takes the inputs and the dirty
set (an immutable snapshot of the pass's inputs), ``compute`` plans up to a budget of VIPs
at a time into a staging area that nothing reads, and ``commit`` publishes all of them at
once. Between two ``compute`` calls the caller answers requests from the previous, still
complete, plan; inputs that arrive meanwhile are marked for the next pass.

Compact by construction: a POP's plan is one dict of VIP -> item whose values are mostly
the VIP's shared items (the same object at every POP); per-pair memory is kept only where
it differs from the VIP's default (STEADY in the steady state: nothing per pair). A VIP with
one item at every POP (``UniformItems``: planned once for all of them, see planner.py) is
merged into its POPs' mappings by one ``dict.update`` per publish list at commit, not pair by
pair (a cold start at 100,000 VIPs x 300 POPs).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import operator
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from ..config.desired_model import DesiredState, FleetVip
from .model import NEW, STEADY, Alarm, PlanItem, PlannerState, PopReport, PopVipMemory, UniformItems, VipMemory
from .planner import FreshMemo, VipPlan, no_memory, plan_vip

Verdicts = Mapping[str, bool | None]
_V = TypeVar("_V")


def compact_report(report: PopReport, previous: PopReport | None) -> PopReport:
    """``report`` with its per-VIP verdict mappings shared: one interned object per distinct
    verdict set (a fleet has a handful: every origin up, the primary down, ...), and the
    previous report's mapping, or a recent POP's, where equal. 50 POPs x 10,000 VIPs of
    verdicts then cost 50 dicts of pointers instead of 500,000 small dicts."""
    if previous is not None and (previous.origins is report.origins or previous.origins == report.origins):
        return replace(report, origins=previous.origins,
                       announced=_shared_mapping(report.announced, _ANNOUNCED, previous.announced))
    announced = _shared_mapping(report.announced, _ANNOUNCED, previous.announced if previous is not None else None)
    # Equal to the last POP's new mapping (a healthy fleet: most POPs' first reports after a
    # restart are equal), that one, whose verdicts are interned already: one comparison in C
    # instead of the dict below (only the last one: a report unlike it pays one comparison).
    if len(report.origins) >= 64 and _ORIGINS and len(_ORIGINS[0]) == len(report.origins) \
            and _ORIGINS[0] == report.origins:
        return replace(report, origins=_ORIGINS[0], announced=announced)
    return replace(report, origins=_shared_mapping(_interned_values(report.origins), _ORIGINS, None),
                   announced=announced)


def _interned_values(received: Mapping[str, Verdicts]) -> dict[str, Verdicts]:
    """``received`` (VIP -> verdicts) as a new dict, in the same order, whose values are the
    interned objects (one per distinct set of verdicts). The wire's decoder already shares
    one object per distinct set, so the work is per distinct object, not per VIP: the objects
    found by identity (in C; they are alive meanwhile, so their ids are distinct), each
    interned once, and the dict made in C (a cold start's 300 reports of 100,000 VIPs were
    ~20 ms each of per-VIP Python). A VIP's verdicts equal to its previous report's are then
    that report's object too: both are the interned one (kept for as long as the table holds
    it: a previous report from before a clear, or a presumed one, has other, equal objects)."""
    values = received.values()
    distinct = dict(zip(map(id, values), values))
    shared = {k: _intern(v) for k, v in distinct.items()}
    if all(map(operator.is_, shared.values(), distinct.values())):
        return dict(received)
    return dict(zip(received, map(shared.__getitem__, map(id, values))))


# A few recent distinct report mappings (VIP -> verdicts, VIP -> announced), shared by the POPs
# whose reports say the same (read-only: a delta makes a copy, wire.apply_report_delta). In a
# healthy fleet most POPs that publish the same VIPs report equal mappings: 50 POPs x 10,000
# VIPs were 50 x 2 dicts of 10,000 pointers (~20 MB), now a few. An equal one is found by one
# comparison in C (~0.3 ms at 10,000 VIPs, a full report or a changed delta only).
_ORIGINS: list[Mapping[str, Verdicts]] = []
_ANNOUNCED: list[Mapping[str, bool]] = []
_SHARED_MAPPINGS = 4


def _shared_mapping(m: Mapping[str, _V], recent: list[Mapping[str, _V]],
                    before: Mapping[str, _V] | None) -> Mapping[str, _V]:
    """``m``, or an equal recent one. ``before``: the POP's previous mapping (if ``m`` is it,
    it was shared already: an unchanged delta costs nothing)."""
    if m is before or len(m) < 64:  # (small ones are cheap as they are)
        return m
    r = _recent(m, recent)
    if r is not None:
        return r
    recent.insert(0, m)
    del recent[_SHARED_MAPPINGS:]
    return m


def _recent(m: Mapping[str, _V], recent: list[Mapping[str, _V]]) -> Mapping[str, _V] | None:
    """The recent mapping equal to ``m`` (moved to the front), or None."""
    for i, r in enumerate(recent):
        if r is m or (len(r) == len(m) and r == m):
            if i:
                recent.insert(0, recent.pop(i))
            return r
    return None


_INTERNED: dict[tuple[tuple[str, bool | None], ...], Verdicts] = {}


def _intern(verdicts: Verdicts) -> Verdicts:
    """The one object for verdicts equal to ``verdicts`` (in the same order): ``verdicts``
    itself the first time when it is a dict (a report hands its objects over, read-only, as
    it hands over its mappings: the wire's decoder shares them already), else a copy."""
    key = tuple(verdicts.items())
    shared = _INTERNED.get(key)
    if shared is None:
        if len(_INTERNED) > 100_000:  # a bound, not a cache policy: distinct sets are few
            _INTERNED.clear()
        shared = _INTERNED[key] = verdicts if type(verdicts) is dict else dict(verdicts)
    return shared


@dataclass(frozen=True, slots=True)
class Pass:
    """The inputs of one planning pass, fixed when it begins."""

    now: float
    desired: DesiredState
    reports: Mapping[str, PopReport]
    drains: Mapping[str, float]
    fleet: Mapping[str, FleetVip]  # name -> definition (the engine replaces it, never changes it)
    names: tuple[str, ...]  # the VIPs to plan, in the desired state's order
    staged: dict[str, VipPlan] = field(default_factory=dict)  # planned so far, not yet visible
    # (publish list, report_stale_after) -> its fresh reports: the same for every VIP with
    # that publish list and policy in this pass (planner.plan_vip's step 1, computed once)
    fresh: FreshMemo = field(default_factory=dict)
    # What commit() changes at each POP, worked out as each VIP is planned (Engine._diff)
    # against the plans as they were then; valid while no other pass commits (``diff_base``:
    # Engine.passes then, [] until the first VIP). A burst's commit walked 500,000 pairs in
    # one piece of the event loop when the POPs' items were not one uniform item (~0.2 s).
    diff: _Diff = field(default_factory=lambda: _Diff())
    diff_base: list[int] = field(default_factory=list)


@dataclass
class _Diff:
    """Per POP the new items (vip -> item), the VIPs merged by list, the VIPs gone."""

    # pop -> the new items (vip -> item); a defaultdict: no empty dict made per pair
    changed: collections.defaultdict[str, dict[str, PlanItem]] = field(
        default_factory=lambda: collections.defaultdict(dict))
    # The VIPs whose one item is new at every POP of an unchanged list of POPs (a cold
    # start, the pass after a restart, a VIP healthy everywhere that moves): by list (its
    # shared key dict), vip -> item, merged into each of those POPs' mappings in C instead
    # of one Python step per pair (30 million at 100,000 VIPs x 300 POPs).
    uniform: dict[int, tuple[Mapping[str, None], dict[str, PlanItem]]] = field(default_factory=dict)
    gone: dict[str, list[str]] = field(default_factory=dict)
    names: int = 0  # the staged VIPs diffed so far (in the pass's order)


@dataclass(frozen=True, slots=True)
class Changes:
    """What a committed pass changed."""

    planned: tuple[str, ...]  # the VIPs planned
    pops: frozenset[str]  # POPs whose VIP -> item mapping is a new object (some item changed)
    memory: frozenset[str]  # VIPs whose memory changed (what a journal appends)
    notes: Mapping[str, tuple[str | None, str]]  # vip -> (old note, new note), changed notes only
    new_alarms: tuple[Alarm, ...]  # alarms whose (kind, VIP) was not raised before
    removed: frozenset[str]  # VIPs no longer in the desired state
    desired_changed: bool


class Engine:
    """Every VIP's last plan, and what makes one dirty. See the module docstring."""

    diff_ahead = True  # False: commit() works out its changes itself (the differential test's reference)

    def __init__(self, memory: PlannerState | None = None) -> None:
        self._boot = memory  # the persisted memory, for VIPs not planned yet
        self.desired: DesiredState | None = None
        self.plans: dict[str, VipPlan] = {}
        self.items: dict[str, dict[str, PlanItem]] = {}  # pop -> vip -> item (replaced, never mutated, on change)
        self.notes: dict[str, str] = {}
        self._alarms: dict[str, tuple[Alarm, ...]] = {}
        self._alarm_tuple: tuple[Alarm, ...] = ()
        self._settling: dict[str, float] = {}  # vip -> settle_at
        # vip -> when its plan was made, for the VIPs whose sentences count down (in the order
        # they were planned: a VIP planned again moves to the end). A pass re-renders only
        # those planned at least ``refresh_after`` ago (``begin``): with refresh=True every
        # pass re-planned each of them, 10,000 VIPs per pass during an incident (results 3al).
        self._countdown: dict[str, float] = {}
        self._dirty: set[str] = set()
        # Every VIP of the desired state is dirty already (its first one: a cold start, a
        # restart): reports mark nothing more (300 reports marked 100,000 VIPs each: 30
        # million set insertions, ~4 CPU s, in the first pass at 100,000 x 300).
        self._everything = False
        self._wake: dict[str, float] = {}  # vip -> its current wake-up (heap entries that differ are stale)
        self._heap: list[tuple[float, str]] = []
        self._reports: dict[str, PopReport] = {}
        self._fresh: dict[str, dict[float, bool]] = {}  # pop -> report_stale_after -> fresh as planned
        self._stale_heap: list[tuple[float, str]] = []
        # pop -> the time of its one live entry in _stale_heap: a report that moves the POP's
        # deadline later pushes nothing (the entry, when it comes, looks again and re-pushes):
        # one entry per report was a heap that grew by 25 entries a second at 50 POPs reporting
        # every 2 s, all of them cycling through _due (results 3ad).
        self._stale_next: dict[str, float] = {}
        self._drains: dict[str, float] = {}
        self._fleet: dict[str, FleetVip] = {}
        self._order: dict[str, int] = {}
        # (publish list, report_stale_after) -> its VIPs, one set shared by the POPs of the list
        # (a set per POP was 25 MB at 10,000 VIPs x 50 POPs); pop -> report_stale_after -> the
        # groups there (publish list -> the shared set). Empty groups are dropped.
        self._groups: dict[tuple[tuple[str, ...], float], set[str]] = {}
        self._at_pop: dict[str, dict[float, dict[tuple[str, ...], set[str]]]] = {}
        self._removed: frozenset[str] = frozenset()  # VIPs dropped since the last commit
        self._desired_changed = False
        self.version = 0  # grows when any memory changes
        self.passes = 0

    # --- inputs ------------------------------------------------------------------------
    def mark(self, desired: DesiredState, reports: Mapping[str, PopReport], drains: Mapping[str, float],
             now: float, budget_s: float | None = None) -> bool:
        """Take the current inputs; mark the VIPs they change (and those whose time came).
        ``budget_s``: stop after about that long of taking reports in (a burst's 50 full
        reports: ~15 ms), False then: call again (the reports taken in are not looked at
        again) until True, before ``begin``."""
        start = time.perf_counter() if budget_s is not None else 0.0
        if desired is not self.desired:
            self._set_desired(desired, now)
        if drains != self._drains:
            for pop in set(drains) | set(self._drains):
                if drains.get(pop) != self._drains.get(pop):
                    self._mark_pop(pop)
            self._drains = dict(drains)
        for pop, report in reports.items():
            if self._reports.get(pop) is not report:
                self._set_report(pop, report, now)
                if budget_s is not None and time.perf_counter() - start >= budget_s:
                    return False
        for pop in [p for p in self._reports if p not in reports]:
            del self._reports[pop]
            self._fresh.pop(pop, None)
            self._mark_pop(pop)  # (a stale report counts too: what the POP is presumed to announce)
        self._due(now)
        return True

    def _mark_pop(self, pop: str) -> None:
        for groups in self._at_pop.get(pop, {}).values():
            for names in groups.values():
                self._dirty.update(names)

    def _set_desired(self, desired: DesiredState, now: float) -> None:
        old = self._fleet
        fleet = {fv.vip.name: fv for fv in desired.vips}
        new = [fv for name, fv in fleet.items() if old.get(name) is not fv]  # (identity: cheap)
        self._dirty.update(fv.vip.name for fv in new if fv != old.get(fv.vip.name))
        self._removed |= frozenset(name for name in old if name not in fleet)
        self._removed -= fleet.keys()
        self._dirty -= self._removed
        self._everything = len(self._dirty) >= len(fleet) and self._dirty.issuperset(fleet)
        self._fleet = fleet
        self._order = dict(zip(fleet, range(len(fleet))))
        # The index POP -> report_stale_after -> VIPs, updated for the VIPs that changed only
        # (a commit of one VIP at 100,000 x 300 must not walk 30 million pairs).
        at_pop, shared = self._at_pop, self._groups
        for gone in [g for name, g in old.items() if fleet.get(name) is not g]:
            shared[(gone.publish, gone.policy.safety.report_stale_after)].discard(gone.vip.name)
        # Grouped by (publish list, report_stale_after): most VIPs share a few publish lists,
        # so each POP's set grows by one C-level update per group instead of a call per pair.
        by_list: dict[tuple[tuple[str, ...], float], list[str]] = {}
        for fv in new:
            by_list.setdefault((fv.publish, fv.policy.safety.report_stale_after), []).append(fv.vip.name)
        for (publish, stale_after), members in by_list.items():
            group = shared.get((publish, stale_after))
            if group is None:
                group = shared[(publish, stale_after)] = set()
                for pop in publish:
                    at_pop.setdefault(pop, {}).setdefault(stale_after, {})[publish] = group
            group.update(members)
        for key in [key for key, group in shared.items() if not group]:
            del shared[key]
            publish, stale_after = key
            for pop in publish:
                del at_pop[pop][stale_after][publish]
        known = {p.name for p in desired.pops}
        for pop in [p for p in at_pop if p not in known and not any(at_pop[p].values())]:
            del at_pop[pop]
            self._fresh.pop(pop, None)
        for pop in known:
            at_pop.setdefault(pop, {})
        for pop, groups in at_pop.items():
            for s in [s for s, names in groups.items() if not names]:
                del groups[s]
                # Forget its freshness too: reports no longer update it, and a VIP that
                # later brings the value back must start from what the report says.
                self._fresh.get(pop, {}).pop(s, None)
        for pop, groups in at_pop.items():  # a new report_stale_after value: fresh as its report says
            report = self._reports.get(pop)
            fresh = self._fresh.setdefault(pop, {})
            # A group that is gone is no longer kept up to date (by reports, by the stale
            # timer): forget it, so that when it comes back it starts from its report.
            for s in [s for s in fresh if s not in groups]:
                del fresh[s]
            for s in groups:
                # (``not fresh.get``, not ``not in``: a group that emptied and now has VIPs again
                # kept its old flag, and a stale flag on a fresh report would never go stale,
                # so its VIPs would miss the moment the report does: found by the differential
                # test once steering changed its VIPs' wake-ups.)
                if not fresh.get(s):
                    fresh[s] = report is not None and now - report.received_at <= s
            self._push_stale(pop, now)
        self.desired = desired
        self._desired_changed = True

    def _set_report(self, pop: str, report: PopReport, now: float) -> None:
        old = self._reports.get(pop)
        self._reports[pop] = report
        fresh = self._fresh.setdefault(pop, {})
        same = old is not None and old.origins is report.origins
        for s, groups in self._at_pop.get(pop, {}).items():
            names = _members(groups)
            was = fresh.get(s, False) and old is not None
            now_fresh = now - report.received_at <= s
            fresh[s] = now_fresh
            if self._everything:
                continue  # (nothing to mark: the freshness above is all that changes)
            if was != now_fresh:
                self._dirty.update(names)
            elif now_fresh and not same:
                assert old is not None
                before, after = old.origins, report.origins
                self._dirty.update(n for n in names if before.get(n) != after.get(n))
            if now_fresh and old is not None and (old.checks or report.checks) and old.checks != report.checks:
                # Check times (the evidence-based settle): only the few VIPs that carry them.
                before_c, after_c = old.checks, report.checks
                self._dirty.update(n for n in (before_c.keys() | after_c.keys())
                                   if any(n in g for g in groups.values()) and before_c.get(n) != after_c.get(n))
        self._push_stale(pop, now)

    def _push_stale(self, pop: str, now: float) -> None:
        """The time the POP's report goes stale for the next of its fresh groups (a
        deadline that rounding keeps fresh at ``now``: the next instant)."""
        report = self._reports.get(pop)
        if report is None:
            return
        deadlines = [report.received_at + s for s, fresh in self._fresh.get(pop, {}).items() if fresh]
        if deadlines:
            at = max(min(deadlines), math.nextafter(now, math.inf))
            current = self._stale_next.get(pop)
            if current is not None and current <= at:
                return  # (its entry comes first: _due looks again then and pushes what is due next)
            self._stale_next[pop] = at
            heapq.heappush(self._stale_heap, (at, pop))

    def _due(self, now: float) -> None:
        """Mark the VIPs whose wake-up came, and those of POPs whose report went stale."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            t, name = heapq.heappop(heap)
            if self._wake.get(name) == t:
                del self._wake[name]
                self._dirty.add(name)
        stale = self._stale_heap
        while stale and stale[0][0] <= now:
            at, pop = heapq.heappop(stale)
            if self._stale_next.get(pop) != at:
                continue  # (an entry an earlier deadline replaced)
            del self._stale_next[pop]
            report = self._reports.get(pop)
            if report is None:
                continue
            fresh = self._fresh.get(pop, {})
            for s, groups in self._at_pop.get(pop, {}).items():
                if fresh.get(s) and not now - report.received_at <= s:
                    fresh[s] = False
                    self._dirty.update(_members(groups))
            self._push_stale(pop, now)

    def dirty(self, now: float = 0.0, refresh_after: float | None = None) -> int:
        """How many VIPs the next pass plans (after ``mark``): ``begin(now, refresh_after)``'s."""
        if refresh_after is None or not self._countdown:
            return len(self._dirty)
        return len(self._dirty.union(self._counting_down(now, refresh_after)))

    def _counting_down(self, now: float, refresh_after: float) -> Iterator[str]:
        """The VIPs whose sentences count down and whose plan is ``refresh_after`` old (or
        older), the oldest first. Their decisions cannot have changed (a plan's ``wake_at`` is
        when the same inputs plan it differently; the heap marks them then): only the numbers
        in their sentences have."""
        if refresh_after <= 0:
            return iter(self._countdown)
        countdown = self._countdown
        if countdown and next(iter(countdown.values())) > now:
            _clamp(countdown, now)  # (the wall clock stepped back: else none came due until it caught up)
        due = now - refresh_after
        return map(operator.itemgetter(0), itertools.takewhile(lambda kv: kv[1] <= due, countdown.items()))

    def next_wake(self) -> float | None:
        """When the next VIP's time comes or a report goes stale (None: nothing waits)."""
        while self._heap and self._wake.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        times = [t for h in (self._heap, self._stale_heap) if h for t in (h[0][0],)]
        return min(times, default=None)

    # --- a pass ------------------------------------------------------------------------
    def begin(self, now: float, *, refresh_after: float | None = None) -> Pass:
        """The next pass: the dirty VIPs (and, with ``refresh_after``, those whose sentences
        count down and were planned at least that long ago, so that their explanations are
        re-rendered: 0 every one of them). Call ``mark`` first."""
        assert self.desired is not None, "mark() gives the engine its first desired state"
        names = self._dirty if refresh_after is None else self._dirty.union(self._counting_down(now, refresh_after))
        self._dirty, self._everything = set(), False
        order = self._order
        ordered = tuple(sorted((n for n in names if n in order), key=order.__getitem__))
        return Pass(now, self.desired, dict(self._reports), dict(self._drains), self._fleet, ordered)

    def compute(self, p: Pass, budget_s: float | None = None) -> bool:
        """Plan the pass's VIPs not planned yet, for about ``budget_s`` seconds (None: all).
        True when every VIP of the pass is planned."""
        staged = p.staged
        start = time.perf_counter() if budget_s is not None else 0.0
        fleet = p.fleet
        if not p.diff_base:
            p.diff_base.append(self.passes)
        for i in range(len(staged), len(p.names)):
            name = p.names[i]
            vp = staged[name] = self._plan(fleet[name], p)
            if self.diff_ahead and p.diff_base[0] == self.passes and p.diff.names == i:
                self._diff(name, vp, p.diff)
            if budget_s is not None and i % 4 == 3 and time.perf_counter() - start >= budget_s:
                return len(staged) == len(p.names)
        return True

    def _diff(self, name: str, vp: VipPlan, d: _Diff) -> None:
        """Into ``d``, what making ``vp`` the VIP's plan changes at its POPs (against its
        current plan): commit's walk, one VIP at a time."""
        changed, uniform, gone = d.changed, d.uniform, d.gone
        d.names += 1
        old = self.plans.get(name)
        new_items = vp.items
        was = old.items if old is not None else None
        # (the same POPs: the very key dict, or an equal one, 50 keys compared in C; a
        # burst of first reports moved 10,000 VIPs from one uniform item to another, and
        # walked the 500,000 pairs here when the two lists were equal, not the same object)
        if isinstance(new_items, UniformItems) and (was is None or isinstance(was, UniformItems) and (
                was.pops is new_items.pops or was.pops.keys() == new_items.pops.keys())):
            if not isinstance(was, UniformItems) or was.item is not new_items.item:
                keys = new_items.pops
                merged = uniform.get(id(keys))
                if merged is None:
                    merged = uniform[id(keys)] = (keys, {})
                merged[1][name] = new_items.item
        elif old is None:
            for pop, item in new_items.items():
                changed[pop][name] = item
        else:
            old_items = old.items
            # (the steady state: the same shared item at the same POPs, nothing to walk)
            if not (isinstance(old_items, UniformItems) and isinstance(new_items, UniformItems)
                    and old_items.item is new_items.item and old_items.pops is new_items.pops):
                if isinstance(old_items, UniformItems):  # (no Python-level get per POP)
                    old_pops, old_item = old_items.pops, old_items.item
                    for pop, item in new_items.items():
                        if item is not old_item or pop not in old_pops:
                            changed[pop][name] = item
                else:
                    get = old_items.get
                    for pop, item in new_items.items():
                        if get(pop) is not item:
                            changed[pop][name] = item
        if old is not None:
            new_pops = new_items.keys()
            for pop in old.items:
                if pop not in new_pops:
                    gone.setdefault(pop, []).append(name)

    def _plan(self, fv: FleetVip, p: Pass) -> VipPlan:
        name = fv.name
        prev = self.plans.get(name)
        if prev is not None:
            # STEADY or NEW at every POP (the planner's uniform VIPs): no per-POP memory, and
            # a default that is one of the two (NEW where it was not published)
            steady = not prev.pop_memory and (prev.default is STEADY or prev.default is NEW)
            # (NEW at every POP, those it was not published at included: as a VIP never planned)
            memory_at = no_memory if steady and prev.default is NEW else prev.memory_at
            return plan_vip(fv, p.reports, p.drains, p.now, prev.memory, memory_at, prev.shared, fresh=p.fresh,
                            steady=steady)
        boot = self._boot
        if boot is None:
            return plan_vip(fv, p.reports, p.drains, p.now, None, no_memory, {}, fresh=p.fresh)
        pop_vips = boot.pop_vips
        # (The pass after a restart: the loaded memories at its POPs looked up in C, compared
        # by identity with the two shared objects the store loads steady pairs as.)
        loaded = set(map(id, map(pop_vips.get, zip(fv.publish, itertools.repeat(name)), itertools.repeat(NEW))))
        if loaded <= _NEW_ONLY:  # (nothing loaded at its POPs: a first start, or a VIP new since)
            return plan_vip(fv, p.reports, p.drains, p.now, boot.vips.get(name), no_memory, {}, fresh=p.fresh)
        # (STEADY at every POP, as a restart loads a healthy fleet: planned once for all its
        # POPs while none of them has reported, not POP by POP: planner._plan_silent)
        return plan_vip(fv, p.reports, p.drains, p.now, boot.vips.get(name),
                        lambda pop: pop_vips.get((pop, name), NEW), {}, fresh=p.fresh,
                        steady=loaded <= _STEADY_OR_NEW, everywhere=STEADY if loaded == _STEADY_ONLY else None)

    def commit(self, p: Pass, retire: list[VipPlan] | None = None) -> Changes:
        """Make the pass's plans the current ones, all at once. ``retire``: the plans replaced
        are appended to it (the caller lets go of them later, a piece at a time), not freed here:
        after a burst at 10,000 VIPs x 50 POPs freeing them was about a third of the commit."""
        assert len(p.staged) == len(p.names), "commit() after compute() returned True"
        removed, self._removed = self._removed, frozenset()
        desired_changed, self._desired_changed = self._desired_changed, False
        # (what compute worked out, if every VIP was and no pass committed since: else now)
        d = p.diff
        if not (p.diff_base and p.diff_base[0] == self.passes and d.names == len(p.names)):
            d = _Diff()
            for name, vp in p.staged.items():
                self._diff(name, vp, d)
        changed, uniform, gone = d.changed, d.uniform, d.gone
        memory: set[str] = set()
        notes: dict[str, tuple[str | None, str]] = {}
        alarms_before = {(a.kind, a.vip) for a in self._alarm_tuple}
        alarms_changed = False
        for name in removed:
            old = self.plans.pop(name, None)
            if old is None:
                continue
            if retire is not None:
                retire.append(old)
            for pop in old.items:
                gone.setdefault(pop, []).append(name)
            self.notes.pop(name, None)
            alarms_changed |= self._alarms.pop(name, None) is not None
            self._settling.pop(name, None)
            self._countdown.pop(name, None)
            self._wake.pop(name, None)
            memory.add(name)
        for name, vp in p.staged.items():
            old = self.plans.get(name)
            self.plans[name] = vp
            if old is not None:
                if retire is not None and old is not vp:
                    retire.append(old)
                if (old.memory != vp.memory or old.default is not vp.default
                        or old.pop_memory != vp.pop_memory or old.items.keys() != vp.items.keys()):
                    memory.add(name)  # (a POP added to or removed from its publish list adds or drops a pair)
            else:
                memory.add(name)
            if old is None or old.note != vp.note:
                notes[name] = (old.note if old is not None else None, vp.note)
                self.notes[name] = vp.note
            if vp.alarms or (old is not None and old.alarms):
                if vp.alarms:
                    self._alarms[name] = vp.alarms
                else:
                    del self._alarms[name]
                alarms_changed |= old is None or old.alarms != vp.alarms
            if vp.settle_at is None:
                self._settling.pop(name, None)
            else:
                self._settling[name] = vp.settle_at
            self._countdown.pop(name, None)  # (planned now: to the end of the order)
            if vp.countdown:
                if self._countdown and next(reversed(self._countdown.values())) > p.now:
                    _clamp(self._countdown, p.now)  # (the clock stepped back: the times stay in order)
                self._countdown[name] = p.now
            if vp.wake_at is None:
                self._wake.pop(name, None)
            elif self._wake.get(name) != vp.wake_at:
                self._wake[name] = vp.wake_at
                heapq.heappush(self._heap, (vp.wake_at, name))
        pops = {pop for pop, new_items in changed.items() if new_items} | set(gone)
        for keys, _ in uniform.values():
            pops.update(keys)
        if desired_changed and self.desired is not None:
            known = {pop.name for pop in self.desired.pops}
            for pop in known - set(self.items):
                self.items[pop] = {}
                pops.add(pop)
            for pop in set(self.items) - known:
                del self.items[pop]
                pops.discard(pop)
        # this commit's distinct mappings (a few kept), each with its POP's own changes
        built: list[tuple[dict[str, PlanItem], Mapping[str, PlanItem]]] = []
        # A POP with no changes of its own, whose mapping was the very one of a POP built
        # before and which is in the same merged lists, gets that POP's new mapping (it would
        # build an equal one: 50 POPs healthy alike built 50 copies of 10,000 items, ~70 ms)
        # (previous mapping, merged lists) -> (previous mapping, kept alive: its id is the key; new mapping)
        alike: dict[tuple[int, tuple[int, ...]], tuple[Mapping[str, PlanItem], dict[str, PlanItem]]] = {}
        for pop in sorted(pops):
            before = self.items.get(pop, {})
            own = changed.get(pop, {})
            key = None
            if not own and pop not in gone:
                key = (id(before), tuple(k for k, (keys, _) in uniform.items() if pop in keys))
                if (hit := alike.get(key)) is not None and hit[0] is before:
                    self.items[pop] = hit[1]
                    continue
            items = dict(before)
            for keys, news in uniform.values():
                if pop in keys:
                    items.update(news)
            items.update(own)
            for name in gone.get(pop, ()):
                items.pop(name, None)
            # POPs whose items are the same objects (a VIP's shared items: healthy everywhere)
            # share one mapping (read-only, replaced on change): 50 POPs x 10,000 VIPs were
            # 50 dicts of 10,000 pointers (~10 MB). One comparison in C each, after a look at
            # the few items that changed at one POP and not at every POP (the merged ones
            # come first in a new mapping, so a difference there was found only at its end:
            # 300 x 2 comparisons of 100,000 entries in a pass that settled 1,000 VIPs).
            same = next((b for b, theirs in built if len(b) == len(items) and _agree(b, own) and _agree(items, theirs)
                         and b == items), None)
            if same is not None:
                items = same
            elif len(built) < 2:
                built.append((items, own))
            self.items[pop] = items
            if key is not None:
                alike[key] = (before, items)
        if alarms_changed:
            order = self._order
            self._alarm_tuple = tuple(a for name in sorted(self._alarms, key=lambda n: order.get(n, math.inf))
                                      for a in self._alarms[name])
        if memory:
            self.version += 1
        if self.desired is not None and len(self.plans) >= len(self.desired.vips):
            self._boot = None  # every VIP has planned once: the persisted memory is in the plans now
        self.passes += 1
        return Changes(p.names, frozenset(pops), frozenset(memory), notes,
                       tuple(a for a in self._alarm_tuple if (a.kind, a.vip) not in alarms_before), removed,
                       desired_changed)

    def run(self, desired: DesiredState, reports: Mapping[str, PopReport], drains: Mapping[str, float],
            now: float, *, refresh_after: float | None = None) -> Changes:
        """mark + begin + compute + commit: one whole pass at once."""
        self.mark(desired, reports, drains, now)
        p = self.begin(now, refresh_after=refresh_after)
        self.compute(p)
        return self.commit(p)

    # --- outputs -----------------------------------------------------------------------
    def alarms(self) -> tuple[Alarm, ...]:
        return self._alarm_tuple

    def settle_at(self) -> float | None:
        """When the first settle window ends (PlanResult.wake_at)."""
        return min(self._settling.values(), default=None)

    def state(self) -> PlannerState:
        """The memory, as the PlannerState the store persists: read-only views over the
        plans (no copy). Live, not a snapshot: an older view reads today's memory too, so
        two views of one engine always compare equal; what a pass changed is in its
        ``Changes.memory`` (the controller journals from it)."""
        return PlannerState(_VipMemoryView(self, self.version), _PairMemoryView(self, self.version))

    def frozen_state(self) -> PlannerState:
        """The memory as of now, unchanged by later passes (for a snapshot written in the
        background): views over a copy of the VIP -> plan mapping, whose plans are immutable
        (O(VIPs) pointers, not O(pairs))."""
        frozen = _Frozen(dict(self.plans))
        return PlannerState(_VipMemoryView(frozen, self.version), _PairMemoryView(frozen, self.version))


_STEADY_OR_NEW = {id(STEADY), id(NEW)}
_STEADY_ONLY = {id(STEADY)}
_NEW_ONLY = {id(NEW)}


def _agree(items: Mapping[str, PlanItem], some: Mapping[str, PlanItem]) -> bool:
    """``items`` has ``some``'s items (equal ones): what ``items == other`` needs, when
    ``other`` has them, at the cost of ``some``'s size."""
    return all((i := items.get(name)) is item or i == item for name, item in some.items())


def _members(groups: Mapping[tuple[str, ...], set[str]]) -> Iterator[str]:
    """The VIPs of a POP's groups (disjoint: a VIP has one publish list and one policy)."""
    return itertools.chain.from_iterable(groups.values())


class _Plans(Protocol):
    @property
    def plans(self) -> Mapping[str, VipPlan]: ...


@dataclass(frozen=True, slots=True)
class _Frozen:
    plans: Mapping[str, VipPlan]


class _VipMemoryView(Mapping[str, VipMemory]):
    __slots__ = ("_engine", "_version")

    def __init__(self, engine: _Plans, version: int) -> None:
        self._engine, self._version = engine, version

    def __getitem__(self, name: str) -> VipMemory:
        return self._engine.plans[name].memory

    def __iter__(self) -> Iterator[str]:
        return iter(self._engine.plans)

    def __len__(self) -> int:
        return len(self._engine.plans)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _VipMemoryView) and other._engine is self._engine:
            return other._version == self._version
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]


class _PairMemoryView(Mapping[tuple[str, str], PopVipMemory]):
    """(pop, vip) -> memory, for every POP each planned VIP is published at."""

    __slots__ = ("_engine", "_version")

    def __init__(self, engine: _Plans, version: int) -> None:
        self._engine, self._version = engine, version

    def __getitem__(self, key: tuple[str, str]) -> PopVipMemory:
        pop, name = key
        vp = self._engine.plans[name]
        if pop not in vp.items:
            raise KeyError(key)
        return vp.memory_at(pop)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for name, vp in self._engine.plans.items():
            for pop in vp.items:
                yield pop, name

    def __len__(self) -> int:
        return sum(len(vp.items) for vp in self._engine.plans.values())

    def compact(self) -> Iterator[tuple[str, PopVipMemory, tuple[str, ...], Mapping[str, PopVipMemory]]]:
        """Per VIP: its default memory, the POPs it is published at, the POPs with a memory of
        their own (what the store writes per VIP, not per pair: store.planner_to_json)."""
        for name, vp in self._engine.plans.items():
            yield name, vp.default, tuple(vp.items), vp.pop_memory

    def items(self) -> Iterator[tuple[tuple[str, str], PopVipMemory]]:  # type: ignore[override]
        for name, vp in self._engine.plans.items():
            memory_at = vp.memory_at
            for pop in vp.items:
                yield (pop, name), memory_at(pop)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _PairMemoryView) and other._engine is self._engine:
            return other._version == self._version
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]


def _clamp(countdown: dict[str, float], now: float) -> None:
    """The countdowns' plan times no later than ``now``: the clock (time.time) stepped back.
    They stay in planning order and non-decreasing (``_counting_down`` reads them in order and
    stops at the first that is not due); each comes due ``refresh_after`` after ``now``."""
    for name, at in countdown.items():
        if at > now:
            countdown[name] = now
