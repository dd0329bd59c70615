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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..config.desired_model import DesiredState, FleetVip
from ..wire import PlanReason as R
from . import dampening
from .model import STEADY, Alarm, AlarmKind, PlanItem, PlannerState, PlanResult, PopReport, PopVipMemory, VipMemory
from .origins import origin_views, select_origin

# The two shortcuts in _plan_vip (steady and silent POPs). They give exactly the plan of the
# full path (a test plans with both and compares); off only in that test.
SHORTCUTS = True

# Proposal kinds that withdraw the VIP at a POP, and so count against the safety limits.
WITHDRAWING = (R.BACKEND_DOWN, R.DAMPENED, R.DRAINED)
HEALTH_KINDS = (R.BACKEND_DOWN, R.DAMPENED)  # rate-limited; drains are deliberate


@dataclass(frozen=True)
class _Proposal:
    pop: str
    kind: R  # healthy | health_unknown | report_stale | draining | confirming | backend_down | dampened | drained
    sentence: str
    previously_withdrawn: bool


def plan(desired: DesiredState, reports: Mapping[str, PopReport], drains: Mapping[str, float],
         now: float, previous: PlannerState) -> PlanResult:
    vip_memory: dict[str, VipMemory] = {}
    wakes: list[float] = []
    pop_memory: dict[tuple[str, str], PopVipMemory] = {}
    pops: dict[str, dict[str, PlanItem]] = {p.name: {} for p in desired.pops}
    notes: dict[str, str] = {}
    alarms: list[Alarm] = []
    shared_items: dict[str, dict[str, PlanItem]] = {}
    for fv in desired.vips:
        name = fv.name
        items, vmem, pmems, note, vip_alarms, shared, wake = _plan_vip(fv, reports, drains, now, previous)
        if shared:
            shared_items[name] = shared
        if wake is not None:
            wakes.append(wake)
        vip_memory[name] = vmem
        pop_memory.update(pmems)
        notes[name] = note
        alarms += vip_alarms
        for pop, item in items.items():
            pops.setdefault(pop, {})[name] = item
    return PlanResult(PlannerState(vip_memory, pop_memory, shared_items), pops, notes, tuple(alarms),
                      wake_at=min(wakes, default=None))


def _plan_vip(fv: FleetVip, reports: Mapping[str, PopReport], drains: Mapping[str, float], now: float,
              previous: PlannerState) -> tuple[dict[str, PlanItem], VipMemory, dict[tuple[str, str], PopVipMemory],
                                                 str, list[Alarm], dict[str, PlanItem], float | None]:
    """The VIP's items per POP, its memories, note and alarms, its shared items, and when
    the first of its settle windows ends (None: none running)."""
    policy = fv.policy
    name = fv.name
    fresh = {p: r for p in fv.publish if (r := reports.get(p)) is not None
             and now - r.received_at <= policy.safety.report_stale_after}
    verdicts = {p: o for p, r in fresh.items() if (o := r.origins.get(name)) is not None}
    views = origin_views(fv.vip, verdicts, policy.failover)
    vmem, code, note = select_origin(fv.vip, views, previous.vips.get(name), policy.failover, now)
    alarms: list[Alarm] = []
    if code == "all_origins_down":
        alarms.append(Alarm(AlarmKind.ALL_ORIGINS_DOWN, name, note))
    active = vmem.active

    # 3. what each POP would do on its own
    memories: dict[tuple[str, str], PopVipMemory] = {}
    proposals: list[_Proposal] = []
    items: dict[str, PlanItem] = {}
    shared = {kind: i for kind, i in previous.shared_items.get(name, {}).items() if i.active_origin == active}
    healthy = shared.get(R.HEALTHY)
    pop_vips = previous.pop_vips
    shortcuts = SHORTCUTS and fv.enabled
    for pop in fv.publish:
        key = (pop, name)
        mem = pop_vips.get(key, _NEW)
        verdict = v.get(active) if (v := verdicts.get(pop)) is not None else None
        if shortcuts and mem is STEADY and verdict is True and pop not in drains:
            # The common case, at most POPs for most VIPs most of the time: healthy before,
            # healthy now, no flap history, not drained. Steps 3-4 below would keep the memory
            # as it is and announce; the same PlanItem object serves every such POP (and the
            # next run), so comparing plans stays cheap at 10,000 VIPs x 50 POPs.
            memories[key] = STEADY
            items[pop] = healthy = healthy or _shared(shared, name, active, R.HEALTHY)
            continue
        if shortcuts and pop not in fresh and pop not in drains and mem.down_since is None and not mem.withdrawn:
            # A silent POP (the second common case: a POP that cannot reach the controller, or
            # before the first reports): steps 3-4 keep its memory and leave it to its checks.
            memories[key] = mem
            items[pop] = _shared(shared, name, active, R.REPORT_STALE)
            continue
        report = fresh.get(pop)
        if report is not None:
            mem = dampening.observe(mem, verdict, policy.dampening, now)
        down = verdict is False and report is not None
        down_since = (mem.down_since if mem.down_since is not None else now) if down else None
        if down_since != mem.down_since:  # replace() is slow: only when something changes
            mem = replace(mem, down_since=down_since)
        memories[key] = _canonical(mem)
        proposals.append(_Proposal(pop, *_propose(pop, report, verdict, mem, drains.get(pop), active, fv, now),
                                   previously_withdrawn=mem.withdrawn))

    if not fv.enabled:  # (no POP took the fast path)
        items = {p.pop: PlanItem(name, False, active, reason=R.DISABLED,
                                 explanation="the VIP is disabled in the config: withdrawn everywhere")
                 for p in proposals}
        memories = {k: replace(m, withdrawn=False) for k, m in memories.items()}
        return items, vmem, memories, "disabled: " + note, alarms, {}, None

    # 4. global safety
    held, allowed, vmem, safety_alarms = _safety(fv, proposals, fresh, active, vmem, now)
    alarms += safety_alarms
    if any(a.kind == AlarmKind.CHECKS_DOWN_EVERYWHERE for a in safety_alarms):
        # While everything is held, nothing settles: when the checks start to recover (at
        # each POP at its own moment) a POP still seeing the origin down waits a full settle
        # window again instead of being let go the instant the hold lifts.
        memories = {k: m if m.down_since is None else _canonical(replace(m, down_since=None))
                    for k, m in memories.items()}
    for p in proposals:
        why_held = held.get(p.pop)
        if p.kind in _SHARED and why_held is None:
            items[p.pop] = _shared(shared, name, active, p.kind)
        else:
            items[p.pop] = _item(name, active, p, why_held)
        if memories[(p.pop, name)].withdrawn != (p.pop in allowed):
            memories[(p.pop, name)] = _canonical(replace(memories[(p.pop, name)], withdrawn=p.pop in allowed))
    # Only the full path proposes "confirming" (the shortcuts give healthy or report_stale).
    settling = [m.down_since for p in proposals if items[p.pop].reason == R.CONFIRMING
                and (m := memories[(p.pop, name)]).down_since is not None]
    wake = min(settling) + policy.safety.settle if settling else None
    return items, vmem, memories, note, alarms, shared, wake


_NEW = PopVipMemory()


# Proposals whose item is the same at every POP (no POP name, no timer in the sentence).
_SHARED = {R.HEALTHY: "sees {active} healthy: announced",
           R.REPORT_STALE: "has not reported recently: unknown, left to its own checks"}


def _shared(shared: dict[str, PlanItem], vip: str, active: str, kind: R) -> PlanItem:
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
    for p in ordered[limit:]:
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
