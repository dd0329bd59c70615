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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ..config.desired_model import DesiredState, FleetVip
from ..wire import PlanReason as R
from . import dampening
from .model import NEW, STEADY, Alarm, AlarmKind, PlanItem, PlannerState, PlanResult, PopReport, PopVipMemory, VipMemory
from .origins import Outcome, origin_views, select_origin

# Proposal kinds that withdraw the VIP at a POP, and so count against the safety limits.
WITHDRAWING = (R.BACKEND_DOWN, R.DAMPENED, R.DRAINED)
HEALTH_KINDS = (R.BACKEND_DOWN, R.DAMPENED)  # rate-limited; drains are deliberate
# Kinds whose sentence counts down with the clock (the plan itself changes only at wake_at).
COUNTDOWN = frozenset({R.CONFIRMING, R.DRAINING, R.DRAINED, R.DAMPENED})

PopMemory = Callable[[str], PopVipMemory]  # pop -> the VIP's memory there (NEW if none)


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
    POPs). What the incremental engine must equal."""
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


def plan_vip(fv: FleetVip, reports: Mapping[str, PopReport], drains: Mapping[str, float], now: float,
             memory: VipMemory | None, pop_memory: PopMemory, shared_before: Mapping[R, PlanItem], *,
             shortcuts: bool = True) -> VipPlan:
    """One VIP's plan: a pure function of its definition, the reports and drains of its
    POPs, its memory (``memory``, ``pop_memory``) and ``now``. ``shared_before``: last run's
    shared items (reused when equal, so that an unchanged plan is made of the same objects)."""
    fresh, verdicts = _fresh_verdicts(fv, reports, now)
    vmem, outcome, note = _choose_origin(fv, verdicts, memory, now)
    alarms: list[Alarm] = []
    if outcome == Outcome.ALL_ORIGINS_DOWN:
        alarms.append(Alarm(AlarmKind.ALL_ORIGINS_DOWN, fv.name, note))
    active = vmem.active
    shared = {kind: i for kind, i in shared_before.items() if i.active_origin == active}
    items, memories, proposals = _propose_all(fv, fresh, verdicts, drains, now, active, pop_memory, shared,
                                              shortcuts and fv.enabled)
    if not fv.enabled:  # (no POP took a shortcut)
        items = {p.pop: PlanItem(fv.name, False, active, reason=R.DISABLED,
                                 explanation="the VIP is disabled in the config: withdrawn everywhere")
                 for p in proposals}
        memories = {pop: m if not m.withdrawn else replace(m, withdrawn=False) for pop, m in memories.items()}
        return _finish(fv, items, vmem, memories, "disabled: " + note, outcome, alarms, {}, None, fresh, drains, now)
    held, allowed, vmem, safety_alarms = _safety(fv, proposals, fresh, active, vmem, now)
    alarms += safety_alarms
    settle_at = _apply_safety(fv, proposals, held, allowed, memories, items, shared, active,
                              any(a.kind == AlarmKind.CHECKS_DOWN_EVERYWHERE for a in safety_alarms))
    return _finish(fv, items, vmem, memories, note, outcome, alarms, shared, settle_at, fresh, drains, now)


def _fresh_verdicts(fv: FleetVip, reports: Mapping[str, PopReport],
                    now: float) -> tuple[dict[str, PopReport], dict[str, Mapping[str, bool | None]]]:
    """Step 1: the reports of its POPs that are fresh, and their verdicts about this VIP."""
    stale_after = fv.policy.safety.report_stale_after
    fresh = {p: r for p in fv.publish if (r := reports.get(p)) is not None and now - r.received_at <= stale_after}
    name = fv.name
    return fresh, {p: o for p, r in fresh.items() if (o := r.origins.get(name)) is not None}


def _choose_origin(fv: FleetVip, verdicts: Mapping[str, Mapping[str, bool | None]], memory: VipMemory | None,
                   now: float) -> tuple[VipMemory, Outcome, str]:
    """Step 2: each origin's status from the verdicts, and the active origin."""
    views = origin_views(fv.vip, verdicts, fv.policy.failover)
    return select_origin(fv.vip, views, memory, fv.policy.failover, now)


def _propose_all(fv: FleetVip, fresh: Mapping[str, PopReport], verdicts: Mapping[str, Mapping[str, bool | None]],
                 drains: Mapping[str, float], now: float, active: str, pop_memory: PopMemory,
                 shared: dict[R, PlanItem], shortcuts: bool,
                 ) -> tuple[dict[str, PlanItem], dict[str, PopVipMemory], list[_Proposal]]:
    """Step 3: what each POP would do on its own. Steady and silent POPs get their item at
    once (shortcuts); the others a proposal for the safety step."""
    name = fv.name
    policy = fv.policy
    memories: dict[str, PopVipMemory] = {}
    proposals: list[_Proposal] = []
    items: dict[str, PlanItem] = {}
    healthy = shared.get(R.HEALTHY)
    for pop in fv.publish:
        mem = pop_memory(pop)
        verdict = v.get(active) if (v := verdicts.get(pop)) is not None else None
        if shortcuts and (mem is STEADY or mem is NEW) and verdict is True and pop not in drains:
            # The common case, at most POPs for most VIPs most of the time: healthy before
            # (or never heard of: a cold start), healthy now, no flap history, not drained.
            # The long path would make the memory STEADY and announce; the same PlanItem
            # object serves every such POP (and the next run), so comparing plans stays cheap.
            memories[pop] = STEADY
            items[pop] = healthy = healthy or _shared(shared, name, active, R.HEALTHY)
            continue
        if shortcuts and pop not in fresh and pop not in drains and mem.down_since is None and not mem.withdrawn:
            # A silent POP (the second common case: a POP that cannot reach the controller, or
            # before the first reports): the long path keeps its memory and leaves it to its checks.
            memories[pop] = mem
            items[pop] = _shared(shared, name, active, R.REPORT_STALE)
            continue
        report = fresh.get(pop)
        if report is not None:
            mem = dampening.observe(mem, verdict, policy.dampening, now)
        down = verdict is False and report is not None
        down_since = (mem.down_since if mem.down_since is not None else now) if down else None
        if down_since != mem.down_since:  # replace() is slow: only when something changes
            mem = replace(mem, down_since=down_since)
        memories[pop] = _canonical(mem)
        proposals.append(_Proposal(pop, *_propose(pop, report, verdict, mem, drains.get(pop), active, fv, now),
                                   previously_withdrawn=mem.withdrawn))
    return items, memories, proposals


def _apply_safety(fv: FleetVip, proposals: list[_Proposal], held: Mapping[str, str], allowed: set[str],
                  memories: dict[str, PopVipMemory], items: dict[str, PlanItem], shared: dict[R, PlanItem],
                  active: str, everywhere: bool) -> float | None:
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
            item = items[p.pop] = _shared(shared, name, active, p.kind)
        else:
            item = items[p.pop] = _item(name, active, p, why_held)
        mem = memories[p.pop]
        if mem.withdrawn != (p.pop in allowed):
            mem = memories[p.pop] = _canonical(replace(mem, withdrawn=p.pop in allowed))
        # Only the long path proposes "confirming" (the shortcuts give healthy or report_stale).
        if item.reason == R.CONFIRMING and mem.down_since is not None:
            settling.append(mem.down_since)
    return min(settling) + fv.policy.safety.settle if settling else None


def _finish(fv: FleetVip, items: dict[str, PlanItem], vmem: VipMemory, memories: dict[str, PopVipMemory],
            note: str, outcome: Outcome, alarms: list[Alarm], shared: Mapping[R, PlanItem], settle_at: float | None,
            fresh: Mapping[str, PopReport], drains: Mapping[str, float], now: float) -> VipPlan:
    """Step 5: the typed result, its compact memory and its next wake-up."""
    steady = sum(1 for m in memories.values() if m is STEADY)
    default = STEADY if 2 * steady >= len(memories) else NEW
    sparse = {pop: m for pop, m in memories.items() if m is not default}
    countdown = outcome == Outcome.FAILBACK_PENDING or any(i.reason in COUNTDOWN for i in items.values())
    wake = _wake_at(fv, vmem, memories, fresh, drains, settle_at, now)
    if outcome in (Outcome.FAILOVER, Outcome.FAILBACK):
        # The move is this run's news: the next run, from the new active origin, says "on ..."
        wake = math.nextafter(now, math.inf)
    return VipPlan(fv.name, items, vmem, default, sparse, note, outcome, tuple(alarms), shared, settle_at, wake,
                   countdown)


def _wake_at(fv: FleetVip, vmem: VipMemory, memories: Mapping[str, PopVipMemory], fresh: Mapping[str, PopReport],
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
    drain_time = policy.drain.drain_time
    for pop in fv.publish:
        start = drains.get(pop)
        if start is not None and now - start < drain_time:
            pending(start + drain_time)
    d = policy.dampening
    for pop in fresh:  # dampening.observe runs only with a fresh report
        m = memories.get(pop)
        if m is None or m is STEADY or m is NEW:
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


def _shared(shared: dict[R, PlanItem], vip: str, active: str, kind: R) -> PlanItem:
    """The VIP's item for ``kind`` from ``shared`` (made and kept there the first time)."""
    item = shared.get(kind)
    if item is None:
        item = shared[kind] = PlanItem(vip, True, active, reason=kind, explanation=_SHARED[kind].format(active=active))
    return item


def _canonical(mem: PopVipMemory) -> PopVipMemory:
    """The shared STEADY object for a memory equal to it (the fast path tests identity)."""
    if (mem.verdict is True and not mem.flaps and not mem.penalty and not mem.dampened_until
            and not mem.quiet_since and not mem.withdrawn and mem.down_since is None):
        return STEADY
    return mem


def _propose(pop: str, report: PopReport | None, verdict: bool | None, mem: PopVipMemory,
             drain_start: float | None, active: str, fv: FleetVip, now: float) -> tuple[R, str]:
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
        if not mem.withdrawn and settle_left > 0:
            return R.CONFIRMING, (f"{pop} sees {active} down: confirming for {settle_left:.1f}s more whether "
                                  f"the other POPs see it too (its agent keeps announcing meanwhile)")
        return R.BACKEND_DOWN, f"{pop} sees {active} down: its agent withdraws the VIP"
    if verdict is None:
        return R.HEALTH_UNKNOWN, f"{pop} has no verdict on {active} yet"
    return R.HEALTHY, _SHARED[R.HEALTHY].format(active=active)


def _safety(fv: FleetVip, proposals: list[_Proposal], fresh: Mapping[str, PopReport], active: str,
            vmem: VipMemory, now: float) -> tuple[dict[str, str], set[str], VipMemory, list[Alarm]]:
    """Which proposed withdrawals to hold back. Returns (pop -> why held, pops allowed to
    withdraw, memory, alarms)."""
    s = fv.policy.safety
    name = fv.name
    held: dict[str, str] = {}
    alarms: list[Alarm] = []
    withdrawing = [p for p in proposals if p.kind in WITHDRAWING]
    health = [p for p in proposals if p.kind in HEALTH_KINDS or p.kind == R.CONFIRMING]

    everywhere = bool(fresh) and all(
        all(v is not True for v in r.origins.get(name, {}).values())
        and any(v is False for v in r.origins.get(name, {}).values())
        for r in fresh.values())
    if everywhere and health:
        for p in health:
            held[p.pop] = (f"every reporting POP ({len(fresh)}) sees every origin down: the checks are "
                           f"more likely broken than the service, so {p.pop} keeps announcing")
        alarms.append(Alarm(AlarmKind.CHECKS_DOWN_EVERYWHERE, name,
                            f"all {len(fresh)} reporting POP(s) see every origin of {name} down; "
                            f"holding {len(health)} withdrawal(s)"))
        withdrawing = [p for p in withdrawing if p.pop not in held]

    n = len(fv.publish)
    limit = max(0, min(math.floor(s.max_withdraw_fraction * n), n - s.min_announcing_pops))
    # POPs already withdrawn stay withdrawn first (no flapping between POPs), then by name.
    ordered = sorted(withdrawing, key=lambda p: (not p.previously_withdrawn, p.pop))
    allowed = ordered[:limit]
    # The held ones by name: in the order above, those withdrawn before come first, but this
    # plan clears their flag, so the next run (nothing else changed) would list them otherwise.
    for p in sorted(ordered[limit:], key=lambda p: p.pop):
        held[p.pop] = (f"withdrawing {p.pop} too would leave {n - len(allowed) - 1} "
                       f"of {n} POPs announcing (limits: at most {s.max_withdraw_fraction:.0%} withdrawn, "
                       f"at least {s.min_announcing_pops} announcing)")
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
    return held, final, VipMemory(vmem.active, vmem.active_since, vmem.healthy_since, recent), alarms


def _item(vip: str, active: str, p: _Proposal, held: str | None) -> PlanItem:
    if held is not None:
        if p.kind == R.DRAINED:
            return PlanItem(vip, True, active, drain=True, reason=R.DRAIN_BLOCKED, explanation=held)
        return PlanItem(vip, True, active, reason=R.SAFETY_HOLD, safety_hold=True, explanation=held)
    if p.kind in (R.DRAINED, R.DAMPENED):
        return PlanItem(vip, False, active, reason=p.kind, explanation=p.sentence)
    return PlanItem(vip, True, active, drain=p.kind == R.DRAINING, reason=p.kind, explanation=p.sentence)
