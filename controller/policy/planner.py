"""The central controller's planner: desired state + health reports -> a plan per POP. Pure.

Theory of operation
-------------------
``plan(desired, reports, drains, now, previous)`` recomputes everything from its inputs
(level-based); ``previous`` only carries what needs memory (the active origin and its
failback timers, flap history, rate-limit timestamps). For each VIP:

1. **Fresh reports.** Reports older than ``report_stale_after`` are ignored: a silent POP
   is *unknown*, not down. It neither votes nor gets withdrawn by the controller.
2. **Origin.** Each origin's status from the fresh verdicts (``origins.py``): down when at
   least ``quorum`` of the POPs with a verdict see it down. The active origin moves to the
   first healthy one when a quorum sees it down, and back to a better one only after that
   one has been healthy for ``failback_hold_down``.
3. **Per POP proposal.** disabled VIP: withdraw everywhere (deliberate, no safety valve).
   Drained POP: ``draining`` (announced, less preferred) for ``drain_time``, then
   ``drained`` (withdrawn). Flapping POP: ``dampened`` (withdrawn, exponential backoff).
   POP sees the active origin down: first ``confirming`` for ``settle`` seconds (the agent
   keeps announcing while it waits for the controller's answer), then ``backend_down``,
   which its agent withdraws on its own (the plan keeps ``wanted`` so the agent
   re-announces as soon as its checks recover, without waiting for the controller). The
   settle window exists because broken checks fail at every POP within a few check
   intervals, not at the same instant: without it the first POP to notice would be let go
   before the others' reports show that the failure is everywhere.
4. **Global safety** over the proposed withdrawals: if every fresh POP sees every origin
   down, the checks are more likely broken than the whole service: hold everything
   (``safety_hold``) and raise ``checks_down_everywhere``. Otherwise at most
   ``max_withdraw_fraction`` of the publish domains may be withdrawn, at least
   ``min_announcing_pops`` must announce, and at most ``withdraw_rate`` new health
   withdrawals happen per window; the rest are held (POPs already withdrawn are kept
   withdrawn first, then by name, so the choice is deterministic and does not flap).

Every PlanItem carries a reason code and a sentence; every alarm a detail.

One VIP at a time
-----------------
A VIP's plan depends on nothing but its own inputs (its definition and policy, the fresh
verdicts about it, the drains of its POPs, its memory and the clock): ``plan_vip`` is that
function, in named steps (fresh verdicts, origin, proposals, safety, finish) with a typed
result (``VipPlan``). Besides the plan it says when, at the latest, the same inputs would
plan differently (``wake_at``: a settle window, a drain, a hold-down, a rate-limit window
or a failback hold-down ends, or a flap is forgotten), which is what lets ``engine.py``
re-plan only the VIPs whose inputs changed or whose time came. ``plan()`` plans every VIP;
``full_plan()`` does too without the two shortcuts below, as the oracle that the engine's
differential test compares with.

Most VIPs, most of the time, have the same inputs at every POP (every POP fresh with equal
verdicts, STEADY or NEW memory, nothing drained): ``_plan_uniform`` plans such a VIP once for
all its POPs (one shared item, ``UniformItems``), and declines for any other, which is then
planned POP by POP. The oracle never takes it (tests/unit/test_policy_uniform.py).
"""

from __future__ import annotations

import collections
import itertools
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from ..config.desired_model import DesiredState, FleetVip
from ..wire import PlanReason as R
from . import dampening, steering
from .model import (NEW, STEADY, Alarm, AlarmKind, OriginChecks, PlanItem, PlannerState, PlanResult, PopReport,
                    PopVipMemory, UniformItems, VipMemory)
from .origins import Outcome, Proof, down_needed, no_proof, origin_views, select_origin
from .steering import Route

# Proposal kinds that withdraw the VIP at a POP, and so count against the safety limits.
WITHDRAWING = (R.BACKEND_DOWN, R.DAMPENED, R.DRAINED)
HEALTH_KINDS = (R.BACKEND_DOWN, R.DAMPENED)  # rate-limited; drains are deliberate
# Kinds whose sentence counts down with the clock (the plan itself changes only at wake_at).
COUNTDOWN = frozenset({R.CONFIRMING, R.DRAINING, R.DRAINED, R.DAMPENED})

PopMemory = Callable[[str], PopVipMemory]  # pop -> the VIP's memory there (NEW if none)


def no_memory(pop: str) -> PopVipMemory:
    """The PopMemory of a VIP never planned: NEW everywhere (recognized, so a cold start does
    not call it once per pair)."""
    return NEW


@dataclass(frozen=True, slots=True)
class VipPlan:
    """One VIP's plan and memory after a run of ``plan_vip``."""

    name: str
    items: Mapping[str, PlanItem]  # pop -> item, for every POP the VIP is published at
    memory: VipMemory
    # The per-POP memory, compact: ``default`` for every POP not in ``pop_memory`` (the
    # steady state of a large fleet keeps no per-pair entry at all).
    default: PopVipMemory
    pop_memory: Mapping[str, PopVipMemory]
    note: str
    outcome: Outcome
    alarms: tuple[Alarm, ...]
    shared: Mapping[R, PlanItem]  # the items that are the same at every POP (reused next run)
    settle_at: float | None  # the first of its settle windows ends (None: none running)
    wake_at: float | None  # the same inputs plan differently from then on (None: never)
    countdown: bool  # a sentence (explanation or note) counts down with the clock

    def memory_at(self, pop: str) -> PopVipMemory:
        """The memory at ``pop`` (NEW at a POP the VIP was not published at)."""
        m = self.pop_memory.get(pop)
        if m is not None:
            return m
        return self.default if pop in self.items else NEW


@dataclass(frozen=True, slots=True)
class _Proposal:
    pop: str
    kind: R  # healthy | health_unknown | report_stale | draining | confirming | backend_down | dampened | drained
    sentence: str
    previously_withdrawn: bool
    route: Route  # where this POP sends the VIP (its origin order's route)


class _Routes:
    """Each POP's route and the shared items of each route (the default route's are the
    VIP's ``shared``, kept between runs; a preference's are made anew each run)."""

    def __init__(self, fv: FleetVip, default: Route, by_order: Mapping[tuple[str, ...], Route],
                 shared: dict[R, PlanItem]) -> None:
        self.fv, self.default, self.by_order, self.shared = fv, default, by_order, shared
        self._own: dict[tuple[str, ...], dict[R, PlanItem]] = {}

    def of(self, pop: str) -> Route:
        return steering.route_of(self.fv, self.default, self.by_order, pop) if self.by_order else self.default

    def shared_for(self, route: Route) -> dict[R, PlanItem]:
        return self.shared if route is self.default else self._own.setdefault(route.order, {})


def plan(desired: DesiredState, reports: Mapping[str, PopReport], drains: Mapping[str, float],
         now: float, previous: PlannerState, *, shortcuts: bool = True) -> PlanResult:
    """Every VIP planned from its inputs (the whole fleet: a cold start, the CLI, tests)."""
    return result_of(desired, plan_all(desired, reports, drains, now, previous, shortcuts=shortcuts))


def plan_all(desired: DesiredState, reports: Mapping[str, PopReport], drains: Mapping[str, float],
             now: float, previous: PlannerState, *, shortcuts: bool = True) -> list[VipPlan]:
    """Each VIP's plan, in the desired state's order."""
    return [plan_vip(fv, reports, drains, now, previous.vips.get(fv.name), _flat_memory(previous, fv.name),
                     previous.shared_items.get(fv.name, {}), shortcuts=shortcuts) for fv in desired.vips]


def full_plan(desired: DesiredState, reports: Mapping[str, PopReport], drains: Mapping[str, float],
              now: float, previous: PlannerState) -> PlanResult:
    """The oracle: every VIP, every POP on the long path (no shortcut for steady or silent
    POPs, no VIP planned once for all its POPs). What the incremental engine must equal."""
    return plan(desired, reports, drains, now, previous, shortcuts=False)


def result_of(desired: DesiredState, plans: list[VipPlan]) -> PlanResult:
    """The fleet's PlanResult from each VIP's plan (in the desired state's VIP order)."""
    pops: dict[str, dict[str, PlanItem]] = {p.name: {} for p in desired.pops}
    pop_memory: dict[tuple[str, str], PopVipMemory] = {}
    alarms: list[Alarm] = []
    settles = [vp.settle_at for vp in plans if vp.settle_at is not None]
    for vp in plans:
        name = vp.name
        for pop, item in vp.items.items():
            pops.setdefault(pop, {})[name] = item
            pop_memory[(pop, name)] = vp.memory_at(pop)
        alarms += vp.alarms
    state = PlannerState({vp.name: vp.memory for vp in plans}, pop_memory,
                         {vp.name: vp.shared for vp in plans if vp.shared})
    return PlanResult(state, pops, {vp.name: vp.note for vp in plans}, tuple(alarms), wake_at=min(settles, default=None))


def _flat_memory(previous: PlannerState, name: str) -> PopMemory:
    pop_vips = previous.pop_vips
    return lambda pop: pop_vips.get((pop, name), NEW)


Verdicts = Mapping[str, bool | None]


class FreshSet:
    """Step 1's fresh reports of one (publish list, report_stale_after), computed once per
    pass for every VIP that has both, and (``common``) the VIPs whose verdicts they all share."""

    __slots__ = ("reports", "origins", "checked", "_uses", "_common")

    def __init__(self, reports: Mapping[str, PopReport]) -> None:
        self.reports = reports  # pop -> its fresh report, in publish-list order
        self.origins = tuple(r.origins for r in reports.values())  # their verdict mappings, same order
        self.checked = tuple(r for r in reports.values() if r.checks)  # those with check times (mostly none)
        self._uses = 0
        self._common: _CommonVerdicts | None = None

    def common(self, name: str) -> Verdicts | None:
        """The verdicts about ``name`` when every fresh report has equal ones (else None).
        Looked up per report for the first VIPs of a pass; a pass that asks for many (a
        cold start) gets them for every VIP at once, column by column in C: 30 million
        lookups in as many hash tables were ~0.45 us each at 100,000 VIPs x 300 POPs."""
        origins = self.origins
        if not origins:
            return None
        if self._common is None:
            self._uses += 1
            if self._uses * 16 < len(origins[0]) or len(origins) < 4:
                seen = list(map(operator.methodcaller("get", name), origins))
                v = seen[0]
                return v if v is not None and seen.count(v) == len(seen) else None
            self._common = _CommonVerdicts(origins)
        return self._common.get(name)


class _CommonVerdicts:
    """VIP -> its verdicts, for the VIPs every one of ``origins`` has equal verdicts about,
    worked out a chunk of VIPs at a time, the chunk of the VIP asked for when first asked
    (a bounded transient: 300 reports x a chunk, not x 100,000). A pass plans its VIPs in
    the reports' order, so each chunk falls in one of its slices: all of them at once were
    ~20 ms of one slice after a burst of 50 full reports at 10,000 VIPs (results 3z)."""

    __slots__ = ("origins", "names", "at", "out", "done", "reads")

    STEP = 1024

    def __init__(self, origins: tuple[Mapping[str, Verdicts], ...]) -> None:
        self.origins = origins
        self.names = list(origins[0])
        self.at = dict(zip(self.names, range(len(self.names))))  # (in C)
        self.out: dict[str, Verdicts] = {}
        self.done: set[int] = set()
        # Per report, its keys and values read in order, kept between chunks (_Reading): each
        # chunk read with islice from the start stepped through every earlier VIP of every
        # report: quadratic (100,000 VIPs x 300 reports: 17.6 s for all chunks, 0.86 s in one
        # pass). A report whose chunk is not in the first one's order is read by name for that
        # chunk only, and in order again from the next chunk found there (before, by name for
        # good: one VIP out of order made the rest ~6x slower, results 3al).
        self.reads = [_Reading(o) for o in origins]

    def get(self, name: str) -> Verdicts | None:
        i = self.at.get(name)
        if i is None:
            return None  # (not in the first report: not common)
        chunk = i // self.STEP
        if chunk not in self.done:
            self.done.add(chunk)
            self._work_out(chunk)
        return self.out.get(name)

    def _work_out(self, at: int) -> None:
        origins, step = self.origins, self.STEP
        n, names = len(origins), self.names
        start = at * step
        chunk = names[start:start + step]
        columns: list[list[Verdicts | None]] = []
        for o, reading in zip(origins, self.reads):
            column: list[Verdicts | None] | None = reading.column(chunk, start)
            # (by name: map in C, ~2x a comprehension's o.get; at 20,000 x 300 nearly every
            # column, as a compact report's groups come in the order of its own first VIPs)
            columns.append(column if column is not None else list(map(o.get, chunk)))
        self.out.update((name, row[0]) for name, row in zip(chunk, zip(*columns))
                        if row[0] is not None and row.count(row[0]) == n)


class _Reading:
    """One report's keys and values read in order, a window of them kept (``keys``,
    ``values``; ``pos``: the report's index of the window's first): a chunk of the first
    report's VIPs is found in the window where the report has it in the same order, the
    window read on up to it (a chunk skipped: stepped over), its column then a slice of the
    values (in C). ``shift``: the report's index of a VIP less the first report's, as last
    found (a VIP the report has elsewhere, or lacks, shifts the rest)."""

    __slots__ = ("kit", "vit", "keys", "values", "pos", "shift")

    SLACK = 256  # the VIPs a report may have moved or lack before a chunk (found by index in C)

    def __init__(self, report: Mapping[str, Verdicts]) -> None:
        self.kit: Iterator[str] | None = iter(report)
        self.vit: Iterator[Verdicts | None] = iter(report.values())
        self.keys: list[str] = []
        self.values: list[Verdicts | None] = []
        self.pos = 0
        self.shift = 0

    def column(self, chunk: list[str], start: int) -> list[Verdicts | None] | None:
        """The report's verdicts about ``chunk`` (the first report's VIPs ``start`` on), if it
        has them in that order within reach, else None (read by name)."""
        kit = self.kit
        if kit is None:
            return None
        step, slack = len(chunk), self.SLACK
        keys, values = self.keys, self.values
        want = start + self.shift - slack  # (the window from here: the slack before kept)
        try:
            if want > self.pos + len(keys):  # (chunks asked for later, or not at all: stepped over)
                skip = want - self.pos - len(keys)
                collections.deque(itertools.islice(kit, skip), maxlen=0)
                collections.deque(itertools.islice(self.vit, skip), maxlen=0)
                keys.clear()
                values.clear()
                self.pos = want
            elif want > self.pos:
                del keys[:want - self.pos]
                del values[:want - self.pos]
                self.pos = want
            more = want + 2 * slack + step - self.pos - len(keys)  # (the slack after too)
            if more > 0:
                keys += itertools.islice(kit, more)
                values += itertools.islice(self.vit, more)
        except RuntimeError:  # (a report changed meanwhile: never, but then by name)
            self.kit = None
            return None
        j = start + self.shift - self.pos
        if not (0 <= j < len(keys) and keys[j] == chunk[0]):
            try:
                j = keys.index(chunk[0])
            except ValueError:
                return None
        if keys[j:j + step] != chunk:
            return None
        self.shift = self.pos + j - start
        return values[j:j + step]


FreshMemo = dict[tuple[tuple[str, ...], float], FreshSet]


def plan_vip(fv: FleetVip, reports: Mapping[str, PopReport], drains: Mapping[str, float], now: float,
             memory: VipMemory | None, pop_memory: PopMemory, shared_before: Mapping[R, PlanItem], *,
             shortcuts: bool = True, fresh: FreshMemo | None = None, steady: bool = False,
             everywhere: PopVipMemory | None = None) -> VipPlan:
    """One VIP's plan: a pure function of its definition, the reports and drains of its
    POPs, its memory (``memory``, ``pop_memory``) and ``now``. ``shared_before``: last run's
    shared items (reused when equal, so that an unchanged plan is made of the same objects).
    ``fresh``: a memo of step 1's fresh reports by (publish list, report_stale_after), for
    many VIPs planned with the same ``reports`` and ``now`` (the engine's pass).
    ``steady``: the caller knows that ``pop_memory`` is STEADY or NEW (the objects) at every
    POP, which lets a uniform VIP be planned once for all its POPs (``_plan_uniform``).
    ``everywhere``: the caller knows that ``pop_memory`` is this very object (STEADY or NEW) at
    every POP the VIP is published at (``no_memory``: NEW), which lets a VIP no POP has a fresh
    report about be planned once for all its POPs too (``_plan_silent``: the pass of a restart
    from saved state, before the reports)."""
    fs = _fresh_set(fv, reports, now, fresh)
    if pop_memory is no_memory:
        everywhere = NEW
    if shortcuts and fv.enabled and (steady or pop_memory is no_memory):
        planned = _plan_uniform(fv, reports, fs, drains, now, memory, shared_before)
        if planned is None and (everywhere is NEW or everywhere is STEADY) and not fs.reports:
            planned = _plan_silent(fv, reports, fs, drains, now, memory, shared_before, everywhere)
        if planned is not None:
            return planned
    name = fv.name
    verdicts = {p: o for p, r in fs.reports.items() if (o := r.origins.get(name)) is not None}
    return _plan_rest(fv, reports, fs.reports, verdicts, drains, now, memory, pop_memory, shared_before, shortcuts)


def _plan_uniform(fv: FleetVip, reports: Mapping[str, PopReport], fs: FreshSet, drains: Mapping[str, float],
                  now: float, memory: VipMemory | None, shared_before: Mapping[R, PlanItem]) -> VipPlan | None:
    """The plan of a VIP whose inputs are the same at every POP, computed once for all of
    them, or None when they are not (then ``_plan_rest`` plans it POP by POP). The case of
    most VIPs most of the time (a cold start, the pass after a restart: 99 % of 30 million
    pairs at 100,000 VIPs x 300 POPs), and exactly what ``_plan_rest`` would compute:
    every POP fresh with equal verdicts, none drained, none with check times about it, its
    memory STEADY or NEW everywhere (the caller's ``steady``), not steered, enabled, and the
    active origin (chosen from those verdicts) seen healthy. Then every POP takes
    ``_propose_all``'s first shortcut: the VIP's shared healthy item and STEADY memory
    everywhere, no proposal, so nothing for the safety limits to hold and no settle window.
    (tests/unit/test_policy_engine.py compares it with the per-POP oracle, ``full_plan``.)"""
    publish, name = fv.publish, fv.name
    n = len(publish)
    if not n or len(fs.reports) != n or steering.steered(fv) or (drains and not drains.keys().isdisjoint(publish)):
        return None
    v = fs.common(name)
    if v is None or any(name in r.checks for r in fs.checked):
        return None
    first = next(iter(fs.reports))
    views = origin_views(fv.vip, {first: v}, fv.policy.failover, n, weight=n)

    def proof(active: str, target: str) -> bool:  # (the verdicts per POP only when a move asks)
        return _proof(fv, fs.reports, dict.fromkeys(fs.reports, v))(active, target)
    vmem, outcome, note = select_origin(fv.vip, views, memory, fv.policy.failover, now, fv.policy.safety.settle,
                                        proof if fv.policy.safety.settle_on_evidence else no_proof)
    if v.get(vmem.active) is not True:
        return None
    default = Route(vmem.active, (), outcome, note, ())
    healthy, vmem, alarms, shared, routes = _one_route(fv, default, shared_before, R.HEALTHY, fs, reports, vmem, now)
    # (drains: none at its POPs, so none of them counts for the wake-up)
    return _result(fv, UniformItems.over(publish, healthy), vmem, STEADY, {}, note, outcome, alarms, shared, None,
                   fs.reports, {}, now, outcome in _PENDING, routes)


def _one_route(fv: FleetVip, default: Route, shared_before: Mapping[R, PlanItem], kind: R, fs: FreshSet,
               reports: Mapping[str, PopReport], vmem: VipMemory, now: float
               ) -> tuple[PlanItem, VipMemory, list[Alarm], dict[R, PlanItem], _Routes]:
    """What a VIP planned once for all its POPs (uniform, silent) has: its one item (``kind``,
    shared with the VIPs before it when equal), its memory after the safety step (no proposal,
    so nothing to hold), its alarms, the shared items and its routes."""
    alarms: list[Alarm] = []
    if default.outcome == Outcome.ALL_ORIGINS_DOWN:
        alarms.append(Alarm(AlarmKind.ALL_ORIGINS_DOWN, fv.name, default.note))
    shared = {k: i for k, i in shared_before.items()
              if i.active_origin == default.active and i.weights == default.weights}
    routes = _Routes(fv, default, {}, shared)
    item = _shared(shared, fv.name, default, kind)
    _, _, vmem, safety_alarms = _safety(fv, [], fs.reports, reports, routes, vmem, now)  # (no proposal: no hold)
    return item, vmem, alarms + safety_alarms, shared, routes


def _plan_silent(fv: FleetVip, reports: Mapping[str, PopReport], fs: FreshSet, drains: Mapping[str, float],
                 now: float, memory: VipMemory | None, shared_before: Mapping[R, PlanItem],
                 everywhere: PopVipMemory = NEW) -> VipPlan | None:
    """The plan of a VIP whose memory is ``everywhere`` at every POP (NEW: never planned;
    STEADY: healthy when last planned, as a restart from saved state loads most pairs) that no
    POP of it has a fresh report about (a controller's first pass after a start, before any
    report), once for all its POPs, or None when another path must plan it: what
    ``_plan_rest`` computes then, when it is enabled, not steered and none of its POPs is
    drained: every POP takes ``_propose_all``'s silent shortcut (the VIP's shared
    report_stale item, its memory kept: neither NEW nor STEADY is down or withdrawn), no
    proposal, so nothing for the safety limits to hold and no settle window. The start's
    pass at 100,000 VIPs x 300 POPs went POP by POP (30 million pairs, ~50 s).
    (tests/unit/test_policy_uniform.py compares it with the per-POP oracle.)"""
    publish = fv.publish
    if not publish or fs.reports or steering.steered(fv) or (drains and not drains.keys().isdisjoint(publish)):
        return None
    vmem, default, _ = _choose_origin(fv, fs.reports, {}, memory, now)
    outcome, note = default.outcome, default.note
    stale, vmem, alarms, shared, routes = _one_route(fv, default, shared_before, R.REPORT_STALE, fs, reports, vmem,
                                                     now)
    # (what _finish makes of the silent POPs' items: UniformItems.of, without its walk when no POP repeats)
    at = dict.fromkeys(publish, stale)
    items = UniformItems.over(publish, stale) if len(at) == len(publish) else UniformItems.of(at)
    return _result(fv, items, vmem, everywhere, {}, note, outcome, alarms, shared, None, fs.reports, drains, now,
                   outcome in _PENDING, routes)


def _plan_rest(fv: FleetVip, reports: Mapping[str, PopReport], fresh: Mapping[str, PopReport],
               verdicts: Mapping[str, Mapping[str, bool | None]],
               drains: Mapping[str, float], now: float, memory: VipMemory | None, pop_memory: PopMemory,
               shared_before: Mapping[R, PlanItem], shortcuts: bool) -> VipPlan:
    vmem, default, by_order = _choose_origin(fv, fresh, verdicts, memory, now)
    outcome, note = default.outcome, default.note
    alarms: list[Alarm] = []
    if outcome == Outcome.ALL_ORIGINS_DOWN:
        alarms.append(Alarm(AlarmKind.ALL_ORIGINS_DOWN, fv.name, note))
    shared = {kind: i for kind, i in shared_before.items()
              if i.active_origin == default.active and i.weights == default.weights}
    routes = _Routes(fv, default, by_order, shared)
    items, memories, proposals = _propose_all(fv, fresh, verdicts, drains, now, routes, pop_memory,
                                              shortcuts and fv.enabled)
    if not fv.enabled:  # (no POP took a shortcut)
        items = {p.pop: PlanItem(fv.name, False, p.route.active, reason=R.DISABLED,
                                 explanation="the VIP is disabled in the config: withdrawn everywhere")
                 for p in proposals}
        memories = {pop: m if not m.withdrawn else replace(m, withdrawn=False) for pop, m in memories.items()}
        return _finish(fv, items, vmem, memories, "disabled: " + note, outcome, alarms, {}, None, fresh, drains, now,
                       (), routes)  # (disabled items never count down)
    held, allowed, vmem, safety_alarms = _safety(fv, proposals, fresh, reports, routes, vmem, now)
    alarms += safety_alarms
    settle_at = _apply_safety(fv, proposals, held, allowed, memories, items, routes,
                              any(a.kind == AlarmKind.CHECKS_DOWN_EVERYWHERE for a in safety_alarms))
    if fv.policy.safety.settle > 0 and fv.policy.safety.settle_on_evidence:
        failing = _failing(fv.name, fresh, memories, routes)
        if failing:
            _ask_for_evidence(items, failing, [o.region for o in fv.vip.origins])
    # Only the proposals' items can count down (the shortcuts give healthy or report_stale).
    return _finish(fv, items, vmem, memories, note, outcome, alarms, shared, settle_at, fresh, drains, now,
                   [items[p.pop] for p in proposals], routes)


def _fresh_set(fv: FleetVip, reports: Mapping[str, PopReport], now: float, memo: FreshMemo | None) -> FreshSet:
    """Step 1: the reports of its POPs that are fresh (the verdicts about this VIP are
    taken from them by the caller)."""
    stale_after = fv.policy.safety.report_stale_after
    key = (fv.publish, stale_after)
    fs = memo.get(key) if memo is not None else None
    if fs is None:
        fs = FreshSet({p: r for p in fv.publish
                       if (r := reports.get(p)) is not None and now - r.received_at <= stale_after})
        if memo is not None:
            memo[key] = fs
    return fs


def _choose_origin(fv: FleetVip, fresh: Mapping[str, PopReport], verdicts: Mapping[str, Mapping[str, bool | None]],
                   memory: VipMemory | None, now: float) -> tuple[VipMemory, Route, Mapping[tuple[str, ...], Route]]:
    """Step 2: each origin's status from the verdicts, and the active origin (of each origin
    order, with the origins' weights, when the VIP has traffic steering)."""
    views = origin_views(fv.vip, verdicts, fv.policy.failover, len(fv.publish))
    proof = _proof(fv, fresh, verdicts) if fv.policy.safety.settle_on_evidence else no_proof
    if steering.steered(fv):
        vmem, default, by_order = steering.route_vip(fv, views, memory, now, proof)
        # Every origin's verdict per POP, for a restart to presume (the same object when
        # unchanged: the journal compares memories).
        kept: Mapping[str, Mapping[str, bool | None]] = dict(verdicts)
        if memory is not None and memory.verdicts == kept:
            kept = memory.verdicts
        return replace(vmem, verdicts=kept), default, by_order
    vmem, outcome, note = select_origin(fv.vip, views, memory, fv.policy.failover, now, fv.policy.safety.settle, proof)
    return vmem, Route(vmem.active, (), outcome, note, ()), {}


def _proof(fv: FleetVip, fresh: Mapping[str, PopReport], verdicts: Mapping[str, Mapping[str, bool | None]]) -> Proof:
    """``origins.Proof`` from the fresh reports: enough of the POPs that see the active origin
    down to make it down (quorum, ``min_down_pops``) see the target healthy on checks that
    succeeded after the active's failure began there (both times from one report: one
    agent's clock). A POP that sends no check ages proves nothing (an older agent)."""
    name = fv.name

    def proof(active: str, target: str) -> bool:
        seen = [v.get(active) for v in verdicts.values()]
        need = down_needed(fv.policy.failover, len(fv.publish), sum(x is not None for x in seen))
        proven = 0
        for pop, v in verdicts.items():
            if v.get(active) is not False or v.get(target) is not True:
                continue
            a, t = _checks(fresh.get(pop), name, active), _checks(fresh.get(pop), name, target)
            if (a is not None and t is not None and a.failing_since is not None and t.ok_at is not None
                    and t.ok_at > a.failing_since):
                proven += 1
        return proven >= need
    return proof


def _verdict(v: Mapping[str, bool | None] | None, route: Route) -> bool | None:
    """A POP's verdict on its route: on the active origin, or (weighted) healthy if it sees
    any weighted origin healthy, down if it sees every one down."""
    if v is None:
        return None
    if not route.weights:
        return v.get(route.active)
    seen = [v.get(r) for r, _ in route.weights]
    return True if True in seen else False if all(x is False for x in seen) else None


def _propose_all(fv: FleetVip, fresh: Mapping[str, PopReport], verdicts: Mapping[str, Mapping[str, bool | None]],
                 drains: Mapping[str, float], now: float, routes: _Routes, pop_memory: PopMemory, shortcuts: bool,
                 ) -> tuple[dict[str, PlanItem], dict[str, PopVipMemory], list[_Proposal]]:
    """Step 3: what each POP would do on its own. Steady and silent POPs get their item at
    once (shortcuts); the others a proposal for the safety step."""
    name = fv.name
    policy = fv.policy
    memories: dict[str, PopVipMemory] = {}
    proposals: list[_Proposal] = []
    items: dict[str, PlanItem] = {}
    default = routes.default
    shared = routes.shared
    healthy = shared.get(R.HEALTHY)
    cold = pop_memory is no_memory
    for pop in fv.publish:
        mem = NEW if cold else pop_memory(pop)
        route = routes.of(pop)
        verdict = _verdict(verdicts.get(pop), route)
        if shortcuts and (mem is STEADY or mem is NEW) and verdict is True and pop not in drains:
            # The common case, at most POPs for most VIPs most of the time: healthy before
            # (or never heard of: a cold start), healthy now, no flap history, not drained.
            # The long path would make the memory STEADY and announce; the same PlanItem
            # object serves every such POP (and the next run), so comparing plans stays cheap.
            memories[pop] = STEADY
            if route is default:
                items[pop] = healthy = healthy or _shared(shared, name, route, R.HEALTHY)
            else:
                items[pop] = _shared(routes.shared_for(route), name, route, R.HEALTHY)
            continue
        if shortcuts and pop not in fresh and pop not in drains and mem.down_since is None and not mem.withdrawn:
            # A silent POP (the second common case: a POP that cannot reach the controller, or
            # before the first reports): the long path keeps its memory and leaves it to its checks.
            memories[pop] = mem
            items[pop] = _shared(routes.shared_for(route), name, route, R.REPORT_STALE)
            continue
        report = fresh.get(pop)
        if report is not None:
            mem = dampening.observe(mem, verdict, policy.dampening, now)
        down = verdict is False and report is not None
        # A POP withdrawn already (a hold-down, a drain) that now sees the origin down has
        # nothing to settle: it counts as down since before the window (2 x settle ago: no
        # rounding can leave a sliver of window). Else the safety limits holding it back
        # (announcing again) would restart a window the next pass, on the same inputs.
        fresh_down = now - 2 * policy.safety.settle if mem.withdrawn else now
        down_since = (mem.down_since if mem.down_since is not None else fresh_down) if down else None
        if down_since != mem.down_since:  # replace() is slow: only when something changes
            mem = replace(mem, down_since=down_since)
        memories[pop] = _canonical(mem)
        proposals.append(_Proposal(pop, *_propose(pop, report, verdict, mem, drains.get(pop), route, fv, now,
                                                  fresh),
                                   previously_withdrawn=mem.withdrawn, route=route))
    return items, memories, proposals


def _apply_safety(fv: FleetVip, proposals: list[_Proposal], held: Mapping[str, str], allowed: set[str],
                  memories: dict[str, PopVipMemory], items: dict[str, PlanItem], routes: _Routes,
                  everywhere: bool) -> float | None:
    """Step 4: the proposals' items after the safety limits; the withdrawn flags. Returns
    when the first settle window ends."""
    name = fv.name
    if everywhere:
        # While everything is held, nothing settles: when the checks start to recover (at
        # each POP at its own moment) a POP still seeing the origin down waits a full settle
        # window again instead of being let go the instant the hold lifts.
        for pop, m in memories.items():
            if m.down_since is not None:
                memories[pop] = _canonical(replace(m, down_since=None))
    settling: list[float] = []
    for p in proposals:
        why_held = held.get(p.pop)
        if p.kind in _SHARED and why_held is None:
            item = items[p.pop] = _shared(routes.shared_for(p.route), name, p.route, p.kind)
        else:
            item = items[p.pop] = _item(name, p, why_held)
        mem = memories[p.pop]
        if mem.withdrawn != (p.pop in allowed):
            mem = memories[p.pop] = _canonical(replace(mem, withdrawn=p.pop in allowed))
        # Only the long path proposes "confirming" (the shortcuts give healthy or report_stale).
        if item.reason == R.CONFIRMING and mem.down_since is not None:
            settling.append(mem.down_since)
    return min(settling) + fv.policy.safety.settle if settling else None


def _finish(fv: FleetVip, items: dict[str, PlanItem], vmem: VipMemory, memories: dict[str, PopVipMemory],
            note: str, outcome: Outcome, alarms: list[Alarm], shared: Mapping[R, PlanItem], settle_at: float | None,
            fresh: Mapping[str, PopReport], drains: Mapping[str, float], now: float,
            may_count_down: Iterable[PlanItem], routes: _Routes) -> VipPlan:
    """Step 5: the typed result, its compact memory and its next wake-up. (Once per VIP,
    over all its POPs: counted by identity in C where it can, 300 POPs x 100,000 VIPs.)"""
    counts = collections.Counter(map(id, memories.values()))
    steady = counts[id(STEADY)]
    default = STEADY if 2 * steady >= len(memories) else NEW
    if counts[id(default)] == len(memories):
        sparse: dict[str, PopVipMemory] = {}
    else:
        sparse = {pop: m for pop, m in memories.items() if m is not default}
    countdown = (outcome in _PENDING or any(r.outcome in _PENDING for r in routes.by_order.values())
                 or any(i.reason in COUNTDOWN for i in may_count_down))
    return _result(fv, UniformItems.of(items), vmem, default, sparse, note, outcome, alarms, shared, settle_at,
                   fresh, drains, now, countdown, routes)


def _result(fv: FleetVip, items: Mapping[str, PlanItem], vmem: VipMemory, default: PopVipMemory,
            sparse: Mapping[str, PopVipMemory], note: str, outcome: Outcome, alarms: list[Alarm],
            shared: Mapping[R, PlanItem], settle_at: float | None, fresh: Mapping[str, PopReport],
            drains: Mapping[str, float], now: float, countdown: bool, routes: _Routes) -> VipPlan:
    """The VipPlan with its next wake-up, from the items and the compact memory."""
    others = routes.by_order.values()
    wake = _wake_at(fv, vmem, sparse, fresh, drains, settle_at, now)
    if vmem.routes or vmem.weight_out:
        steer_wake = steering.wake_at(fv, vmem, now)
        if steer_wake is not None and (wake is None or steer_wake < wake):
            wake = steer_wake
    if outcome in (Outcome.FAILOVER, Outcome.FAILBACK) or any(
            r.outcome in (Outcome.FAILOVER, Outcome.FAILBACK) for r in others):
        # The move is this run's news: the next run, from the new active origin, says "on ..."
        wake = math.nextafter(now, math.inf)
    return VipPlan(fv.name, items, vmem, default, sparse, note, outcome, tuple(alarms), shared, settle_at, wake,
                   countdown)


_PENDING = (Outcome.FAILBACK_PENDING, Outcome.FAILOVER_PENDING)  # their notes count down


def _wake_at(fv: FleetVip, vmem: VipMemory, sparse: Mapping[str, PopVipMemory], fresh: Mapping[str, PopReport],
             drains: Mapping[str, float], settle_at: float | None, now: float) -> float | None:
    """The earliest time from which the same inputs would plan this VIP differently: every
    comparison with the clock in the steps above, as a deadline. (Reports going stale are
    the engine's business: they are per POP, and move with every report.) A deadline the
    arithmetic above has not yet seen pass, although it is not later than ``now`` (float
    rounding), counts as "at the next instant"."""
    policy = fv.policy
    wakes: list[float] = [] if settle_at is None else [settle_at]

    def pending(deadline: float) -> None:
        wakes.append(deadline if deadline > now else math.nextafter(now, math.inf))

    if fv.enabled:
        s = policy.safety
        for t in vmem.withdrawals:  # `now - t < window` keeps them
            pending(t + s.withdraw_rate_window)
            break  # the first is the oldest
    regions = [o.region for o in fv.vip.origins]
    if vmem.active in regions:
        hold = policy.failover.failback_hold_down
        for r in regions[: regions.index(vmem.active)]:
            since = vmem.healthy_since.get(r)
            if since is not None:
                pending(since + hold)  # `now - since >= hold` moves back
    if vmem.down_since:
        # A pending failover's window (origins.select_origin): from a region down, or from
        # its target up, whichever came last (for every route: a superset, which is harmless).
        window = policy.safety.settle
        for since in (*vmem.down_since.values(), *vmem.healthy_since.values()):
            if now - since < window:
                pending(since + window)
    drain_time = policy.drain.drain_time
    for pop in fv.publish if drains else ():
        start = drains.get(pop)
        if start is not None and now - start < drain_time:
            pending(start + drain_time)
    d = policy.dampening
    # Only memories that are neither STEADY nor NEW have timers, and those are all in
    # ``sparse`` (the VIP's default is one of the two).
    for pop, m in sparse.items():
        if m is STEADY or m is NEW or pop not in fresh:  # dampening.observe runs only with a fresh report
            continue
        if m.flaps:
            pending(m.flaps[0] + d.window)  # `now - t <= window` keeps a flap
        if now < m.dampened_until:
            pending(m.dampened_until)
        if m.penalty:
            pending(max(m.quiet_since, m.dampened_until) + d.max_hold_down)
    return min(wakes, default=None)


_NEW = NEW


# Proposals whose item is the same at every POP (no POP name, no timer in the sentence).
_SHARED = {R.HEALTHY: "sees {active} healthy: announced",
           R.REPORT_STALE: "has not reported recently: unknown, left to its own checks"}


def _shared(shared: dict[R, PlanItem], vip: str, route: Route, kind: R) -> PlanItem:
    """The VIP's item for ``kind`` from ``shared`` (made and kept there the first time)."""
    item = shared.get(kind)
    if item is None:
        item = shared[kind] = PlanItem(vip, True, route.active, reason=kind, weights=route.weights,
                                       explanation=_SHARED[kind].format(active=_origins(route)) + _steer(route))
    return item


def _origins(route: Route) -> str:
    """What a POP's verdict is about: the active origin, or (weighted) the weighted origins."""
    return route.active if not route.weights else " or ".join(r for r, _ in route.weights)


def _steer(route: Route) -> str:
    """Where traffic goes, when steering makes it more than "the active origin": the split,
    and the origin order of a POP with its own preference."""
    parts = []
    if route.preferred:
        parts.append(f"preference {' > '.join(route.order)}: {route.note}")
    elif route.weights:
        parts.append(f"split {route.split()}")
    return f" ({'; '.join(parts)})" if parts else ""


def _canonical(mem: PopVipMemory) -> PopVipMemory:
    """The shared STEADY object for a memory equal to it (the fast path tests identity)."""
    if (mem.verdict is True and not mem.flaps and not mem.penalty and not mem.dampened_until
            and not mem.quiet_since and not mem.withdrawn and mem.down_since is None):
        return STEADY
    return mem


def _propose(pop: str, report: PopReport | None, verdict: bool | None, mem: PopVipMemory,
             drain_start: float | None, route: Route, fv: FleetVip, now: float,
             fresh: Mapping[str, PopReport]) -> tuple[R, str]:
    kind, sentence = _propose_kind(pop, report, verdict, mem, drain_start, _origins(route), _judged(route), fv, now,
                                   fresh)
    return kind, sentence + _steer(route) if kind not in _SHARED else sentence


def _judged(route: Route) -> tuple[str, ...]:
    """The origins a POP's verdict on its route is about: its active one, or (weighted) each
    weighted one (the route is down there when every one of them is)."""
    return (route.active,) if not route.weights else tuple(r for r, _ in route.weights)


def _propose_kind(pop: str, report: PopReport | None, verdict: bool | None, mem: PopVipMemory,
                  drain_start: float | None, active: str, judged: tuple[str, ...], fv: FleetVip, now: float,
                  fresh: Mapping[str, PopReport]) -> tuple[R, str]:
    """``active``: what the verdict is about, in words (the route's active origin, or its
    weighted origins "a or b"); ``judged``: the same origins (``_judged``)."""
    if drain_start is not None:
        elapsed = now - drain_start
        if elapsed < fv.policy.drain.drain_time:
            return R.DRAINING, (f"{pop} is draining: announced less preferred for "
                                f"{fv.policy.drain.drain_time - elapsed:.0f}s more, then withdrawn")
        return R.DRAINED, f"{pop} is drained: withdrawn {elapsed - fv.policy.drain.drain_time:.0f}s ago"
    if report is None:
        return R.REPORT_STALE, _SHARED[R.REPORT_STALE]
    if dampening.dampened(mem, now):
        return R.DAMPENED, (f"{pop} flapped: held down until +{mem.dampened_until - now:.0f}s "
                            f"(hold-down #{mem.penalty})")
    if verdict is False:
        settle_left = (mem.down_since if mem.down_since is not None else now) + fv.policy.safety.settle - now
        if not mem.withdrawn and settle_left > 0 and not _not_everywhere(fv, pop, report, mem, judged, fresh):
            return R.CONFIRMING, (f"{pop} sees {active} down: confirming for {settle_left:.1f}s more whether "
                                  f"the other POPs see it too (its agent keeps announcing meanwhile)")
        return R.BACKEND_DOWN, f"{pop} sees {active} down: its agent withdraws the VIP"
    if verdict is None:
        return R.HEALTH_UNKNOWN, f"{pop} has no verdict on {active} yet"
    return R.HEALTHY, _SHARED[R.HEALTHY].format(active=active)


def _safety(fv: FleetVip, proposals: list[_Proposal], fresh: Mapping[str, PopReport],
            reports: Mapping[str, PopReport], routes: _Routes, vmem: VipMemory,
            now: float) -> tuple[dict[str, str], set[str], VipMemory, list[Alarm]]:
    """Which proposed withdrawals to hold back. Returns (pop -> why held, pops allowed to
    withdraw, memory, alarms).

    It reasons from what each POP is presumed to announce, not only from the fresh reports
    (static stability: a POP whose reports are stale keeps its last plan and its own checks):

    - "Down everywhere" (hold every health withdrawal) needs fresh evidence: every fresh POP
      sees every origin down, and they are a quorum (``failover.quorum``) of the VIP's
      publish domains, or more than one of them (several POPs failing together with nobody
      fresh to say otherwise looks like broken checks, as it always did).
    - With less evidence (a single fresh POP sees every origin down, the rest are stale), that
      is one POP's failure: it is withdrawn like any other, within the limits below.
    - The limits (fraction, minimum) count the POPs presumed announcing: a stale POP counts
      only if its last report said it announced the VIP and did not see its route down (the
      active origin of the order it follows, or every weighted origin: else its agent, on its
      own checks, has likely withdrawn); a POP never heard from
      counts as announcing (unknown, as before).
    """
    s = fv.policy.safety
    name = fv.name
    held: dict[str, str] = {}
    alarms: list[Alarm] = []
    withdrawing = [p for p in proposals if p.kind in WITHDRAWING]
    health = [p for p in proposals if p.kind in HEALTH_KINDS or p.kind == R.CONFIRMING]
    n = len(fv.publish)

    everywhere = bool(fresh) and all(_all_down(r.origins.get(name, {})) for r in fresh.values())
    if everywhere and health and (len(fresh) > 1 or len(fresh) >= fv.policy.failover.quorum * n):
        stale = n - len(fresh)
        for p in health:
            held[p.pop] = (f"every reporting POP ({len(fresh)}) sees every origin down: the checks are "
                           f"more likely broken than the service, so {p.pop} keeps announcing")
        alarms.append(Alarm(AlarmKind.CHECKS_DOWN_EVERYWHERE, name,
                            f"all {len(fresh)} reporting POP(s) see every origin of {name} down"
                            + (f" ({stale} of {n} not reporting)" if stale else "")
                            + f"; holding {len(health)} withdrawal(s)"))
        withdrawing = [p for p in withdrawing if p.pop not in held]

    # Stale POPs presumed not announcing count as withdrawn already (looked up only when
    # something would withdraw: the steady state pays nothing).
    dark = _presumed_dark(fv, fresh, reports, {p.pop for p in withdrawing}, routes) if withdrawing else []
    limit = max(0, min(math.floor(s.max_withdraw_fraction * n) - len(dark), n - len(dark) - s.min_announcing_pops))
    # POPs already withdrawn stay withdrawn first (no flapping between POPs), then by name.
    ordered = sorted(withdrawing, key=lambda p: (not p.previously_withdrawn, p.pop))
    allowed = ordered[:limit]
    unknown = (f"; {len(dark)} not reporting and presumed not announcing: {', '.join(dark)}" if dark else "")
    # (The held ones by name: which were withdrawn before is memory this very pass changes,
    # and the alarms of the same inputs must not depend on it.)
    for p in sorted(ordered[limit:], key=lambda p: p.pop):
        held[p.pop] = (f"withdrawing {p.pop} too would leave {max(0, n - len(dark) - len(allowed) - 1)} "
                       f"of {n} POPs announcing (limits: at most {s.max_withdraw_fraction:.0%} withdrawn, "
                       f"at least {s.min_announcing_pops} announcing{unknown})")
        alarms.append(Alarm(AlarmKind.DRAIN_BLOCKED if p.kind == R.DRAINED else AlarmKind.MIN_POPS_HOLD, name,
                            f"{p.pop}: {p.kind} held back by the safety limits"))

    recent = tuple(t for t in vmem.withdrawals if now - t < s.withdraw_rate_window)
    budget = s.withdraw_rate_max - len(recent)
    final: set[str] = set()
    for p in allowed:
        new = not p.previously_withdrawn and p.kind in HEALTH_KINDS
        if new and budget <= 0:
            held[p.pop] = (f"{p.pop} would be the withdrawal number {len(recent) + 1} of {name} within "
                           f"{s.withdraw_rate_window:.0f}s (limit {s.withdraw_rate_max}): held")
            alarms.append(Alarm(AlarmKind.WITHDRAW_RATE_LIMITED, name, f"{p.pop}: {p.kind} held by the rate limit"))
            continue
        if new:
            budget -= 1
            recent += (now,)
        final.add(p.pop)
    return held, final, replace(vmem, withdrawals=recent) if recent != vmem.withdrawals else vmem, alarms


def _item(vip: str, p: _Proposal, held: str | None) -> PlanItem:
    active, weights = p.route.active, p.route.weights
    if held is not None:
        if p.kind == R.DRAINED:
            return PlanItem(vip, True, active, drain=True, reason=R.DRAIN_BLOCKED, explanation=held, weights=weights)
        return PlanItem(vip, True, active, reason=R.SAFETY_HOLD, safety_hold=True, explanation=held, weights=weights)
    if p.kind in (R.DRAINED, R.DAMPENED):
        return PlanItem(vip, False, active, reason=p.kind, explanation=p.sentence)
    return PlanItem(vip, True, active, drain=p.kind == R.DRAINING, reason=p.kind, explanation=p.sentence,
                    weights=weights)


def _all_down(verdicts: Mapping[str, bool | None]) -> bool:
    """Every origin down in one POP's verdicts (none healthy, at least one seen down)."""
    return all(v is not True for v in verdicts.values()) and any(v is False for v in verdicts.values())


def _presumed_dark(fv: FleetVip, fresh: Mapping[str, PopReport], reports: Mapping[str, PopReport],
                   withdrawing: set[str], routes: _Routes) -> list[str]:
    """The POPs whose reports are stale that are presumed not to announce the VIP: the last
    report said it was not announced, or saw the POP's own route down (its agent acts on its
    own checks while the controller cannot reach it; a POP with its own origin preference
    judges its own active origin, a split route is down only when every weighted origin is,
    as ``_verdict`` says for a fresh POP). A POP never heard from (no report
    since the controller started, none presumed) is unknown and counts as announcing, as it
    always did: most likely an agent on its cached plan, and nothing says otherwise."""
    name = fv.name
    dark = []
    for pop in fv.publish:
        if pop in fresh or pop in withdrawing:
            continue
        r = reports.get(pop)
        if r is not None and (r.announced.get(name) is not True
                              or _verdict(r.origins.get(name, {}), routes.of(pop)) is False):
            dark.append(pop)
    return dark


def _checks(report: PopReport | None, vip: str, region: str) -> OriginChecks | None:
    return report.checks.get(vip, {}).get(region) if report is not None and report.checks else None


def _not_everywhere(fv: FleetVip, pop: str, report: PopReport | None, mem: PopVipMemory,
                    judged: tuple[str, ...], fresh: Mapping[str, PopReport]) -> tuple[str, ...]:
    """The evidence that ends ``pop``'s settle window early (when ``pop`` still sees some
    origin up): the POPs, a quorum of the VIP's
    other publish domains, whose fresh reports see an origin ``pop`` judged down (``judged``:
    its route's active origin, or each weighted one) healthy on checks that succeeded after
    ``pop``'s first failed check of that same origin (a POP reporting older checks proves
    nothing: broken checks fail at every POP within an interval or two; nor does a POP's
    check of another origin: with traffic steering the others may follow other routes).
    Empty: not (yet) enough, the settle window runs on. The first failed check is the agent's
    (sent as an age) or, from an agent that does not send it, the moment the controller heard
    of the failure (later: stricter)."""
    name = fv.name
    if not fv.policy.safety.settle_on_evidence or report is None or _all_down(report.origins.get(name, {})):
        # A POP that sees every origin down shows the broken-checks signature (its checks'
        # path cut, as in Meta's 2021 outage), the case the window exists for: it waits
        # the whole window, so that the valve sees the other POPs' checks fail too, if they do.
        return ()
    others = len(fv.publish) - 1
    if others <= 0:
        return ()
    need = max(1, math.ceil(fv.policy.failover.quorum * others - 1e-9))
    check = fv.vip.check
    older = check.fall * (check.interval + check.timeout) + fv.policy.safety.settle
    own = report.origins.get(name, {})
    for origin in judged:
        if own.get(origin) is not False:
            continue  # (weighted: every one is down, else the route is not)
        mine = _checks(report, name, origin)
        if mine is not None and mine.failing_since is None:
            # Its own checks of that origin succeed again (rising, short of ``rise``): its
            # failure is ending here, and when it began is no longer sent. The window's start
            # is no stand-in for it then: a hold everywhere that lifted restarted the window,
            # and the POPs whose checks recovered first would count as evidence against this
            # one's recovery (it was withdrawn for a moment on the way back). It waits its window.
            continue
        t0 = mine.failing_since if mine is not None else mem.down_since
        if t0 is None:
            continue
        if mem.down_since is not None and mem.down_since - t0 > older:
            # A failure older than its own confirmation (fall checks and the window) began before
            # this window did: the window started again when a hold everywhere lifted (the checks
            # recovering, each POP at its own moment). Another POP's checks recovering first prove
            # nothing about this one's: it waits the whole window, as the hold's comment says.
            continue
        seen = tuple(q for q, r in fresh.items()
                     if q != pop and (c := _checks(r, name, origin)) is not None and c.ok_at is not None
                     and c.ok_at > t0 and r.origins.get(name, {}).get(origin) is True)
        if len(seen) >= need:
            return seen
    return ()


def _failing(name: str, fresh: Mapping[str, PopReport], memories: Mapping[str, PopVipMemory],
             routes: _Routes) -> dict[str, tuple[str, ...]]:
    """The fresh POPs not withdrawn that say their checks of their route are failing (of its
    active origin, or of every weighted one: down, or ``fall`` not reached yet: the agent
    reports its first failed check at once), with those origins: their withdrawals are or
    soon will be settling, and the other POPs' fresh checks of the same origins are what can
    end that early. (An agent that sends no check times is not among them: its withdrawal
    settles for the whole window, as before.)"""
    out: dict[str, tuple[str, ...]] = {}
    for pop, r in fresh.items():
        m = memories.get(pop)
        if m is not None and m.withdrawn or not r.checks or name not in r.checks:
            continue
        judged = _judged(routes.of(pop))
        if all((c := _checks(r, name, o)) is not None and c.failing_since is not None for o in judged):
            out[pop] = judged
    return out


def _ask_for_evidence(items: dict[str, PlanItem], failing: Mapping[str, tuple[str, ...]], order: list[str]) -> None:
    """Every other POP's item with ``evidence`` set, about the origins failing anywhere (in the
    VIP's order; named on the wire only when that is not just the item's active origin),
    one copy per distinct item: POPs that share an item share its copy. The failing POPs send
    their check times anyway: a new plan would only cost them a pass while they confirm their
    own failure."""
    asked = {o for origins in failing.values() for o in origins}
    wanted = tuple(r for r in order if r in asked)
    copies: dict[int, PlanItem] = {}
    for pop, item in items.items():
        if pop in failing:
            continue
        c = copies.get(id(item))
        if c is None:
            named = () if wanted == (item.active_origin,) else wanted
            c = copies[id(item)] = replace(item, evidence=True, evidence_origins=named)
        items[pop] = c
