"""Config changes under a blast-radius budget, rolled out in waves behind health gates. Pure.

Theory of operation. The controller holds two desired states: the *base* (the last revision
applied everywhere; its files are kept in the state directory) and the *target* (the newest
revision loaded). What the planner gets is ``effective(base, target, rollout)``::

                 new revision, withdraws nothing            gate passed, last wave
      +------------------------------------------+   +-----------------------------+
      v                                          |   |                             |
   STEADY --new revision over budget--> HELD --confirm--> ROLLING --gate failed--> ROLLED_BACK
      |                                   ^                ^  |                     |  |
      +--new revision within budget-------+----------------+  +-gate passed: wave+1 |  |
                                          +---------------(a newer revision from any state)
                                                           +-------confirm----------+

- The *blast radius* of a revision: the (VIP, POP) pairs announced now that it would
  withdraw (a VIP removed or disabled, a POP cut from a publish list). Over the budget
  (``change.max_withdraw_fraction`` of the announced pairs, or more than
  ``change.max_removed_vips`` VIPs removed or disabled) it is HELD: the base keeps being
  served, with an alarm naming the revision and what it would withdraw, until an operator
  confirms that very revision or a newer revision replaces it.
- Withdrawals, and changes that move the traffic of pairs kept announced (``moves``: origin
  order, next hops, backends, the check, BGP attributes such as MED, communities and
  prepends, the admin state, steering preferences and weights), roll out in waves of POPs
  (``change.rollout``: the first wave's POPs, then a fraction of those left, then the rest;
  a configured order first, else the POPs with the fewest announced pairs first). Until its
  wave comes a POP keeps announcing what the base had it announce, routed and defined as the
  base has it (``staged_vip``, ``held_specs``). Everything the target announces that the
  base did not (a new VIP, a POP added to a publish list) and a change of planner policy
  alone go at once; a revision with neither withdrawals nor moves is applied at once.
- Each wave bakes ``change.rollout.bake`` seconds behind a gate (``gate``): every POP of the
  wave reports fresh, about its newest plan, sees no VIP it still announces with every
  origin down, and still announces each moved VIP with the new active origin healthy; every
  VIP being withdrawn is still announced by at least its minimum of the POPs whose wave has
  not come. The gate judges what the wave did: what was withdrawn or unhealthy at the
  wave's POPs before it began (``excused``, taken as it begins) fails no gate. A failed
  gate serves the base again (ROLLED_BACK, alarm): no further POP is touched. After the
  last wave the target becomes the base.
- A HELD or ROLLED_BACK state serves the base: the safe direction (it announces more).

``step(state, event, now, policy)`` is the one transition function; the controller holds one
timer, ``wake_at``. The blast radius and the waves come with the events (the caller computes
them from what is announced now), so a state restored after a restart means the same.
"""

from __future__ import annotations

import dataclasses
import functools
import enum
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from ..config.desired_model import ChangePolicy, DesiredState, FleetVip, Preference
from ..config.model import Vip
from .model import PlanItem, PopReport

Pair = tuple[str, str]  # (VIP, POP)


class Phase(enum.StrEnum):
    """Where a config change stands (the ``phase`` label of anycast_controller_change_phase)."""

    STEADY = "steady"  # the newest revision is applied everywhere
    HELD = "held"  # over the budget: waits for ``anycastctl apply --confirm REV``
    ROLLING = "rolling"  # withdrawing wave by wave
    ROLLED_BACK = "rolled_back"  # a wave failed its gate: the base is served again


class Verdict(enum.StrEnum):
    WAIT = "wait"
    PASS = "pass"
    FAIL = "fail"


class ChangeRefused(Exception):
    """An operator's confirm that does not fit the state (nothing changed)."""


@dataclass(frozen=True)
class BlastRadius:
    """What a revision would withdraw of what is announced now."""

    announced: int  # (VIP, POP) pairs announced now
    withdrawn: tuple[Pair, ...]  # of those, the ones the revision no longer publishes (sorted)
    added: tuple[Pair, ...]  # pairs the revision publishes that the current one does not
    removed_vips: tuple[str, ...]  # VIPs announced now that the revision removes or disables
    moved: tuple[Pair, ...] = ()  # announced pairs kept whose traffic the revision moves (see ``moves``)

    @property
    def fraction(self) -> float:
        return len(self.withdrawn) / self.announced if self.announced else 0.0

    def moved_vips(self) -> tuple[str, ...]:
        return tuple(sorted({vip for vip, _ in self.moved}))

    def by_pop(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, pop in self.withdrawn:
            out[pop] = out.get(pop, 0) + 1
        return dict(sorted(out.items()))

    def over_budget(self, policy: ChangePolicy) -> str:
        """Why this change exceeds the budget ("" within it)."""
        why = []
        if self.withdrawn and self.fraction > policy.max_withdraw_fraction:
            why.append(f"withdraws {len(self.withdrawn)} of {self.announced} announced (VIP, POP) pairs "
                       f"({self.fraction:.0%} > change.max_withdraw_fraction {policy.max_withdraw_fraction:.0%})")
        if len(self.removed_vips) > policy.max_removed_vips:
            why.append(f"removes or disables {len(self.removed_vips)} announced VIPs "
                       f"(> change.max_removed_vips {policy.max_removed_vips})")
        return "; ".join(why)

    def summary(self) -> str:
        per_pop = _some(f"{pop} {n}" for pop, n in self.by_pop().items()) or "none"
        vips = _some(self.removed_vips)
        moved = f"; moves the traffic of {len(self.moved)}" if self.moved else ""
        return (f"would withdraw {len(self.withdrawn)} of {self.announced} announced pairs (per POP: {per_pop})"
                + moved + (f"; VIPs removed or disabled: {vips}" if vips else ""))


def _some(items: Iterable[str], limit: int = 10) -> str:
    """The first ``limit`` items, and how many more (a log line, not a list of 10,000 VIPs)."""
    listed = list(items)
    more = f" and {len(listed) - limit} more" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more


def pairs(desired: DesiredState) -> frozenset[Pair]:
    """The (VIP, POP) pairs ``desired`` publishes (enabled VIPs only)."""
    return frozenset((fv.name, pop) for fv in desired.vips if fv.enabled for pop in fv.publish)


def moves(old: FleetVip, new: FleetVip) -> bool:
    """Whether a VIP kept announced changes where its traffic goes or how it is announced: its
    definition as agents get it (origins: their order, next hops, backends; the check; BGP
    attributes: MED, communities, prepends; the admin state) or its steering (preferences,
    weights). The rest (its publish list: withdrawals and additions; its planner policy) is
    not a move: withdrawals roll out on their own, additions and policy apply at once."""
    return old.enabled and new.enabled and (old.vip != new.vip or old.steering != new.steering)


def blast_radius(announced: Iterable[Pair], published: Iterable[Pair], new: DesiredState,
                 announced_total: int | None = None, before: Iterable[FleetVip] = ()) -> BlastRadius:
    """``announced``: the pairs announced now (the controller: planned wanted, of the desired
    state being served); ``published``: the pairs published now (announced or not). Both and
    ``new`` may be cut to the VIPs a change touches (unchanged VIPs withdraw nothing), with
    ``announced_total`` then the count of every pair announced now. ``before``: the VIPs'
    definitions now, to find the pairs whose traffic ``new`` moves."""
    now = frozenset(announced)
    after = pairs(new)
    withdrawn = tuple(sorted(now - after))
    gone = {vip for vip, _ in now} - {fv.name for fv in new.vips if fv.enabled}
    was = {fv.name: fv for fv in before}
    moved = tuple(sorted((fv.name, pop) for fv in new.vips if (old := was.get(fv.name)) is not None
                         and moves(old, fv) for pop in fv.publish if (fv.name, pop) in now))
    return BlastRadius(len(now) if announced_total is None else announced_total, withdrawn,
                       tuple(sorted(after - frozenset(published))), tuple(sorted(gone)), moved)


def waves(withdrawn: Iterable[Pair], load: Mapping[str, int], policy: ChangePolicy) -> tuple[tuple[str, ...], ...]:
    """The POPs of ``withdrawn`` (a revision's withdrawn and moved pairs) in waves: ``policy.order`` first, then the POPs announcing
    the fewest pairs (``load``: POP -> pairs announced; the least traffic we know of) first;
    ``first_wave`` POPs, then ``wave_fraction`` of those left (at least one) per wave."""
    pops = {pop for _, pop in withdrawn}
    rank = {pop: i for i, pop in enumerate(policy.order)}
    ordered = sorted(pops, key=lambda p: (rank.get(p, len(rank)), load.get(p, 0), p))
    out: list[tuple[str, ...]] = []
    size = policy.first_wave
    while ordered:
        out.append(tuple(ordered[:size]))
        ordered = ordered[size:]
        size = max(1, math.ceil(len(ordered) * policy.wave_fraction))
    return tuple(out)


# --- the state machine ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Confirmation:
    revision: str
    by: str
    reason: str
    at: float


@dataclass(frozen=True)
class Rollout:
    phase: Phase = Phase.STEADY
    base: str = ""  # the revision applied everywhere (its desired state is kept)
    target: str = ""  # the newest revision (== base when STEADY)
    withdraw: tuple[Pair, ...] = ()  # what the target withdraws of what was announced when it came
    waves: tuple[tuple[str, ...], ...] = ()
    wave: int = 0  # ROLLING: waves[:wave] passed their gates, waves[wave] bakes since wave_started
    wave_started: float = 0.0
    since: float = 0.0  # when this phase began
    detail: str = ""  # HELD: why and what it would withdraw; ROLLED_BACK: the failed gate
    confirmed: Confirmation | None = None
    # The VIPs whose traffic the target moves (``moves``): names, not pairs (a new community
    # on every VIP of a large fleet is millions of pairs, journaled with each wave).
    move: tuple[str, ...] = ()
    # The pairs of the current wave's POPs already unhealthy when it began (withdrawn, not
    # announced, or their active origin down there): the gate does not blame the change for them.
    excused: tuple[Pair, ...] = ()

    def rolled(self) -> frozenset[str]:
        """The POPs that withdraw as the target says (ROLLING: every wave up to the current one)."""
        if self.phase is not Phase.ROLLING:
            return frozenset()
        return frozenset(p for w in self.waves[:self.wave + 1] for p in w)

    def wake_at(self, policy: ChangePolicy) -> float | None:
        return self.wave_started + policy.bake if self.phase is Phase.ROLLING else None

    def alarm(self) -> str:
        """The alarm's text ("" none)."""
        if self.phase is Phase.HELD:
            return (f"config revision {self.target} HELD: {self.detail}; serving {self.base}. "
                    f"Confirm with `anycastctl apply --confirm {self.target} --reason ...` or commit a fix")
        if self.phase is Phase.ROLLED_BACK:
            return (f"rollout of config revision {self.target} ROLLED BACK to {self.base}: {self.detail}")
        return ""


@dataclass(frozen=True)
class NewRevision:
    revision: str
    radius: BlastRadius
    waves: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Confirm:
    revision: str
    by: str
    reason: str
    radius: BlastRadius  # against what is announced now (the base, served while held)
    waves: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class GateResult:
    verdict: Verdict
    detail: str = ""


Event = NewRevision | Confirm | GateResult


class EffectKind(enum.StrEnum):
    HELD = "held"  # log an ERROR, raise the alarm
    WAVE = "wave"  # a wave starts: its POPs withdraw now
    APPLIED = "applied"  # the target is the base now: keep its desired state
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class Effect:
    kind: EffectKind
    text: str


def step(state: Rollout, event: Event, now: float, policy: ChangePolicy) -> tuple[Rollout, tuple[Effect, ...]]:
    """The next state and what to tell. ChangeRefused (state unchanged) for a confirm that does
    not name the held or rolled-back revision."""
    if isinstance(event, NewRevision):
        if not event.radius.withdrawn and not event.radius.moved:
            return _applied(state, event.revision, now)
        base = Rollout(base=state.base, target=event.revision, since=now)
        if why := event.radius.over_budget(policy):
            held = dataclasses.replace(base, phase=Phase.HELD, withdraw=event.radius.withdrawn, waves=event.waves,
                                       detail=f"{why}; {event.radius.summary()}", move=event.radius.moved_vips())
            return held, (Effect(EffectKind.HELD, held.alarm()),)
        return _start(base, event.radius, event.waves, now, policy, None)
    if isinstance(event, Confirm):
        if state.phase not in (Phase.HELD, Phase.ROLLED_BACK):
            raise ChangeRefused(f"nothing to confirm: revision {state.target or state.base} is "
                                f"{'applied' if state.phase is Phase.STEADY else 'rolling out'} already")
        if not _same_revision(event.revision, state.target):
            raise ChangeRefused(f"revision {event.revision} is not the one waiting: the controller holds "
                                f"{state.target} (newer commits replace a held one; confirm the current one)")
        if not event.reason.strip():
            raise ChangeRefused("a confirm needs a reason (--reason)")
        confirmation = Confirmation(state.target, event.by, event.reason, now)
        base = Rollout(base=state.base, target=state.target, since=now)
        if not event.radius.withdrawn and not event.radius.moved:
            applied, effects = _applied(state, state.target, now)
            return dataclasses.replace(applied, confirmed=confirmation), effects
        return _start(base, event.radius, event.waves, now, policy, confirmation)
    if state.phase is not Phase.ROLLING or event.verdict is Verdict.WAIT:
        return state, ()
    if event.verdict is Verdict.FAIL:
        back = dataclasses.replace(state, phase=Phase.ROLLED_BACK, since=now, detail=event.detail)
        return back, (Effect(EffectKind.ROLLED_BACK, back.alarm()),)
    if state.wave + 1 < len(state.waves):
        nxt = dataclasses.replace(state, wave=state.wave + 1, wave_started=now, excused=())
        return nxt, (_wave_effect(nxt),)
    applied, effects = _applied(state, state.target, now)
    return dataclasses.replace(applied, confirmed=state.confirmed), effects


def _same_revision(given: str, held: str) -> bool:
    """The held revision exactly, or (a clean commit) a prefix of at least 7 hex digits or the
    full commit id; never a dirty working tree's revision by its commit alone."""
    if given == held:
        return True
    if "+" in held or len(given) < 7:
        return False
    return held.startswith(given) or given.startswith(held)


def _applied(state: Rollout, revision: str, now: float) -> tuple[Rollout, tuple[Effect, ...]]:
    return (Rollout(base=revision, target=revision, since=now),
            (Effect(EffectKind.APPLIED, f"config revision {revision} applied at every POP"),))


def _start(base: Rollout, radius: BlastRadius, plan: tuple[tuple[str, ...], ...], now: float,
           policy: ChangePolicy, confirmed: Confirmation | None) -> tuple[Rollout, tuple[Effect, ...]]:
    if policy.bake <= 0:  # no staging asked for: all at once
        applied, effects = _applied(base, base.target, now)
        return dataclasses.replace(applied, confirmed=confirmed), effects
    rolling = dataclasses.replace(base, phase=Phase.ROLLING, withdraw=radius.withdrawn, waves=plan, wave=0,
                                  wave_started=now, confirmed=confirmed, detail=radius.summary(), move=radius.moved_vips())
    return rolling, (_wave_effect(rolling),)


def _wave_effect(r: Rollout) -> Effect:
    return Effect(EffectKind.WAVE, f"config revision {r.target}: wave {r.wave + 1} of {len(r.waves)} rolls out at "
                                   f"{', '.join(r.waves[r.wave])} ({r.detail})")


# --- what the planner gets ------------------------------------------------------------------------
def effective(base: DesiredState, target: DesiredState, state: Rollout) -> DesiredState:
    """The desired state to plan: the base while HELD or ROLLED_BACK; while ROLLING the
    target, plus the pairs it withdraws at POPs whose wave has not come (defined as in the
    base), and with the VIPs whose traffic it moves routed as the base routes them at those
    POPs (``staged_vip``; their spec there is the base's: ``held_specs``); the target when
    STEADY. A pair whose VIP the base does not define (added by an earlier, replaced
    revision) is not kept."""
    if state.phase in (Phase.HELD, Phase.ROLLED_BACK):
        return base
    if state.phase is Phase.STEADY:  # (the target not judged yet, just loaded: the base)
        return target if target.revision == state.target else base
    keep = _not_rolled(state, state.withdraw)
    if not keep and not state.move:
        return target
    rolled, moving = state.rolled(), frozenset(state.move)
    # Only the VIPs it moves or keeps pairs of are looked at (a one-VIP change at 100,000
    # VIPs x 300 POPs walked every VIP's publish list here, 30 million POPs in Python).
    touched = moving | keep.keys()
    base_vips = {name: fv for fv in base.vips if (name := fv.vip.name) in touched}
    vips: list[FleetVip] = list(target.vips)
    for i, fv in enumerate(vips):
        name = fv.vip.name
        if name not in touched:
            continue
        if name in moving and (old := base_vips.get(name)) is not None and (
                pops := frozenset(p for p in fv.publish if p not in rolled)):
            fv = staged_vip(old, fv, pops)
        extra = [p for p in keep.pop(name, []) if name in base_vips]
        if not extra:
            vips[i] = fv
            continue
        publish = tuple(fv.publish) + tuple(p for p in extra if p not in fv.publish) if fv.enabled else tuple(extra)
        vips[i] = dataclasses.replace(fv, publish=publish, enabled=True)
    for name, kept in keep.items():  # removed by the target: kept as the base defines them
        if (was := base_vips.get(name)) is not None:
            vips.append(dataclasses.replace(was, publish=tuple(kept), enabled=True))
    names = {p.name for p in target.pops}
    missing = [p for p in base.pops if p.name not in names]  # (a POP the target removed: most often none)
    specs = target.pops
    if missing:
        needed = set().union(*(fv.publish for fv in vips))
        specs += tuple(p for p in missing if p.name in needed)
    return dataclasses.replace(target, vips=tuple(vips), pops=specs)


def _not_rolled(state: Rollout, of: Iterable[Pair]) -> dict[str, list[str]]:
    """VIP -> the POPs of ``of`` whose wave has not come."""
    rolled = state.rolled()
    out: dict[str, list[str]] = {}
    for vip, pop in of:
        if pop not in rolled:
            out.setdefault(vip, []).append(pop)
    return out


Weights = tuple[tuple[str, int], ...]


def _route_at(fv: FleetVip, pop: str) -> tuple[tuple[str, ...], Weights]:
    """The origin order and weights ``fv`` gives ``pop`` (policy/steering.py)."""
    pref = fv.steering.preference(pop)
    order = pref.origins if pref is not None else tuple(o.region for o in fv.vip.origins)
    return order, pref.weights if pref is not None and pref.weights is not None else fv.steering.weights


def staged_vip(old: FleetVip, new: FleetVip, held: frozenset[str]) -> FleetVip:
    """``new``, with its POPs in ``held`` routed as ``old`` routes them: their origin order and
    weights as steering preferences (controller-only: the spec stays ``new``'s, and the POPs in
    ``held`` are served ``old``'s, see ``held_specs``). Where preferences cannot say it (the
    origin regions differ; two weight sets on one origin order, which steering keys by order),
    ``old`` itself (on ``new``'s publish list) until no POP is held: such a VIP moves with the
    last wave that holds one of its POPs."""
    regions = tuple(o.region for o in new.vip.origins)
    whole_old = dataclasses.replace(old, publish=new.publish, policy=new.policy)
    if set(regions) != {o.region for o in old.vip.origins}:
        return whole_old
    default = (regions, new.steering.weights)
    groups: dict[tuple[str, ...], tuple[Weights, list[str]]] = {}
    for pop in new.publish:
        order, weights = _route_at(old if pop in held else new, pop)
        if (order, weights) == default:
            continue
        w, pops = groups.setdefault(order, (weights, []))
        if order == regions or w != weights:
            return whole_old
        pops.append(pop)
    prefs = tuple(Preference(tuple(pops), order, weights) for order, (weights, pops) in groups.items())
    if prefs == new.steering.preferences:
        return new
    return dataclasses.replace(new, steering=dataclasses.replace(new.steering, preferences=prefs))


def held_specs(base: DesiredState, state: Rollout) -> dict[str, dict[str, Vip]]:
    """POP -> VIP -> the definition it is served while its wave has not come (the base's), for
    the VIPs whose traffic the target moves (ROLLING only)."""
    if state.phase is not Phase.ROLLING or not state.move:
        return {}
    rolled, moving = state.rolled(), frozenset(state.move)
    out: dict[str, dict[str, Vip]] = {}
    for fv in base.vips:
        if fv.name in moving:
            for pop in fv.publish:
                if pop not in rolled:
                    out.setdefault(pop, {})[fv.name] = fv.vip
    return out


# --- the gate -------------------------------------------------------------------------------------
ItemOf = Callable[[str, str], PlanItem | None]  # (POP, VIP) -> the plan served there now


def _unhealthy(r: PopReport | None, vip: str, item: PlanItem | None) -> bool:
    """Whether ``r`` says the POP is not serving ``vip`` well on ``item`` (its plan): not
    announced, every origin down, or the plan's active origin (weighted: every weighted
    origin) down."""
    if item is not None and not item.wanted:
        return True
    if r is None:
        return False
    if r.announced.get(vip) is False:
        return True
    verdicts = r.origins.get(vip, {})
    seen = [v for v in verdicts.values() if v is not None]
    if seen and not any(seen):
        return True
    if item is None:
        return False
    regions = [o for o, _ in item.weights] or [item.active_origin]
    return all(verdicts.get(o) is False for o in regions)


Published = Mapping[str, Collection[str]]  # POP -> the enabled VIPs it publishes


def published_at(desired: DesiredState, pops: Iterable[str]) -> dict[str, list[str]]:
    """Per POP of ``pops``, the enabled VIPs of ``desired`` it publishes, in their order: one
    walk over every (VIP, POP) pair. The controller passes its own index instead (a wave's
    gate ran this walk, 500,000 pairs at 10,000 VIPs x 50 POPs, on every pass of a rollout)."""
    out: dict[str, list[str]] = {pop: [] for pop in pops}
    for spec in desired.vips:
        if spec.enabled:
            for pop in spec.publish:
                if pop in out:
                    out[pop].append(spec.name)
    return out


def excused(state: Rollout, desired: DesiredState, reports: Mapping[str, PopReport], item: ItemOf,
            now: float, stale_after: float, published: Published | None = None,
            items: Mapping[str, Mapping[str, PlanItem]] | None = None) -> tuple[Pair, ...]:
    """The pairs of the current wave's POPs that are unhealthy before it changes anything
    (``desired``, ``item``: what is served before the wave): the wave's gate judges what the
    change does, and a VIP withdrawn or failing there already is not the change's doing.
    ``published``: ``published_at(desired, wave)``, if the caller has it; ``items``: POP ->
    VIP -> what ``item`` says, if the caller has them so (no call per VIP).

    A withdrawal's first wave looks at every VIP of its POPs (10,000 at a POP: ~20 ms in
    calls of _unhealthy); a VIP that is planned wanted, announced and has no origin reported
    down is healthy without the call (_unhealthy needs a False verdict for the rest), so the
    walk is a few dict lookups per VIP."""
    if state.phase is not Phase.ROLLING:
        return ()
    wave = state.waves[state.wave]
    at = published if published is not None else published_at(desired, wave)
    out = []
    none: Mapping[str, bool | None] = {}
    for pop in wave:
        r = reports.get(pop)
        fresh = r if r is not None and now - r.received_at <= stale_after else None
        get_item: Callable[[str], PlanItem | None] = (
            items.get(pop, {}).get if items is not None else functools.partial(item, pop))
        announced = fresh.announced if fresh is not None else none
        origins = fresh.origins if fresh is not None else {}
        for name in at.get(pop, ()):
            i = get_item(name)
            if (i is None or i.wanted) and announced.get(name) is not False and (
                    False not in origins.get(name, none).values()):
                continue  # healthy: what _unhealthy says of it, without the call
            if _unhealthy(fresh, name, i):
                out.append((name, pop))
    return tuple(sorted(out))


def gate(state: Rollout, policy: ChangePolicy, now: float, desired: DesiredState,
         reports: Mapping[str, PopReport], generations: Mapping[str, int], stale_after: float,
         item: ItemOf | None = None, published_vips: Published | None = None) -> GateResult:
    """The current wave's gate. It judges what the wave changed: a pair in ``state.excused``
    (unhealthy there before the wave began) is not held against it.

    FAIL at once if a POP of the wave reports, since the wave began, a VIP it still publishes
    with every origin down, or a VIP whose traffic the change moves with the active origin of
    its plan now (``item``) down (an agent checks every origin whatever its plan, so a report
    sent before the new plan reached it is evidence too). After the bake, PASS if every POP
    of the wave reports fresh about its newest plan (``generations``: the one served), still
    announces each VIP whose traffic moved there, and every VIP being withdrawn is announced
    by at least its minimum (or all, if fewer) of the POPs still keeping it; else WAIT, and
    FAIL once ``stale_after`` more has passed. ``published_vips``: ``published_at(desired,
    wave)``, if the caller has it."""
    if state.phase is not Phase.ROLLING:
        return GateResult(Verdict.WAIT)
    wave = state.waves[state.wave]
    label = f"wave {state.wave + 1} ({', '.join(wave)})"
    excuse, moving = frozenset(state.excused), frozenset(state.move)
    at = published_vips if published_vips is not None else published_at(desired, wave)
    published = {pop: at.get(pop, ()) for pop in wave}
    moved = {(vip, pop) for pop in wave for vip in published[pop] if vip in moving and (vip, pop) not in excuse}
    for pop in wave:
        r = reports.get(pop)
        if r is None or r.received_at < state.wave_started:
            continue
        for vip in published[pop]:
            if (vip, pop) in excuse:
                continue
            verdicts = r.origins.get(vip, {})
            seen = [v for v in verdicts.values() if v is not None]
            if seen and not any(seen):
                return GateResult(Verdict.FAIL, f"{label}: {pop} reports every origin of {vip} down")
            if (vip, pop) in moved and item is not None and (i := item(pop, vip)) is not None:
                regions = [o for o, _ in i.weights] or [i.active_origin]
                if all(verdicts.get(o) is False for o in regions):
                    return GateResult(Verdict.FAIL, f"{label}: {pop} reports {vip}'s new active origin "
                                                    f"{'/'.join(regions)} down")
    if now < state.wave_started + policy.bake:
        return GateResult(Verdict.WAIT)
    problems = []
    for pop in wave:
        r = reports.get(pop)
        if r is None or now - r.received_at > stale_after:
            problems.append(f"{pop} has not reported for {stale_after:.0f}s" if r else f"{pop} never reported")
        elif r.plan_generation < generations.get(pop, 0):
            problems.append(f"{pop} reports about plan {r.plan_generation}, not its plan {generations.get(pop, 0)}")
        else:
            lost = sorted(vip for vip, p in moved if p == pop and not r.announced.get(vip))
            if lost:
                problems.append(f"{pop} no longer announces {_some(lost)}, whose traffic the change moved")
    keeping = _not_rolled(state, state.withdraw)
    by_name = {fv.name: fv for fv in desired.vips} if keeping else {}
    for vip, pops in sorted(keeping.items()):
        fv = by_name.get(vip)
        need = min(fv.policy.safety.min_announcing_pops if fv else 1, len(pops))
        fresh = [p for p in pops if (r := reports.get(p)) is not None and now - r.received_at <= stale_after
                 and r.announced.get(vip)]
        if len(fresh) < need:
            problems.append(f"{vip} is announced at {len(fresh)} of the POPs still keeping it ({', '.join(pops)}), "
                            f"minimum {need}")
    if not problems:
        return GateResult(Verdict.PASS)
    if now < state.wave_started + policy.bake + stale_after:
        return GateResult(Verdict.WAIT, "; ".join(problems))
    return GateResult(Verdict.FAIL, f"{label}: " + "; ".join(problems))


# --- traffic dials ------------------------------------------------------------------------------
def dial_radius(region: str, before: DesiredState, after: DesiredState,
                item: Callable[[str, str], PlanItem | None]) -> tuple[Pair, ...]:
    """The announced (VIP, POP) pairs whose traffic an operator's dial of ``region`` moves
    (``before``/``after``: the desired state without and with it; ``item``: the POP's plan
    for a VIP now). Lowering a dial moves a pair the POP sends to the region (a single path
    only at 0: a dial between 1 and 99 scales weights); raising one moves a pair whose POP
    weights the region (a single path only from 0: the region may become active again). A
    dial withdraws nothing, so this is traffic moved, not announcements: the budget's share
    of the announced pairs bounds it as it bounds a revision's withdrawals."""
    was = {fv.name: fv for fv in before.vips}
    moved = []
    for fv in after.vips:
        old = was.get(fv.name)
        if old is None or old is fv or not fv.enabled or (a := old.dial(region)) == (b := fv.dial(region)):
            continue  # (with_dials keeps a VIP's object when its dials stay: O(1) for the others)
        for pop in fv.publish:
            plan = item(pop, fv.name)
            if plan is None or not plan.wanted:
                continue
            weighted = dict(plan.weights)
            if b < a:
                hit = (plan.active_origin == region or weighted.get(region, 0) > 0) and (bool(weighted) or b == 0)
            else:
                pref = fv.steering.preference(pop)
                configured = dict(pref.weights if pref is not None and pref.weights is not None
                                  else fv.steering.weights)
                hit = configured.get(region, 0) > 0 if configured else a == 0
            if hit:
                moved.append((fv.name, pop))
    return tuple(sorted(moved))


def dial_over_budget(moved: tuple[Pair, ...], announced: int, policy: ChangePolicy) -> str:
    """Why a dial moving ``moved`` exceeds the budget ("" within it)."""
    fraction = len(moved) / announced if announced else 0.0
    if not moved or fraction <= policy.max_withdraw_fraction:
        return ""
    return (f"it moves the traffic of {len(moved)} of {announced} announced (VIP, POP) pairs ({fraction:.0%} > "
            f"change.max_withdraw_fraction {policy.max_withdraw_fraction:.0%}: "
            f"{_some(f'{vip}@{pop}' for vip, pop in moved)})")


# --- JSON (the store keeps the state) --------------------------------------------------------------
def to_json(r: Rollout) -> dict[str, object]:
    return {"phase": str(r.phase), "base": r.base, "target": r.target, "withdraw": [list(p) for p in r.withdraw],
            "waves": [list(w) for w in r.waves], "wave": r.wave, "wave_started": r.wave_started, "since": r.since,
            "detail": r.detail,
            "confirmed": None if r.confirmed is None else dataclasses.asdict(r.confirmed),
            "move": list(r.move), "excused": [list(p) for p in r.excused]}


def from_json(data: Mapping[str, object]) -> Rollout:
    """Raises KeyError/ValueError/TypeError on a malformed document."""
    c = data["confirmed"]
    confirmed = None
    if c is not None:
        assert isinstance(c, dict)
        confirmed = Confirmation(str(c["revision"]), str(c["by"]), str(c["reason"]), float(c["at"]))
    withdraw, plan = data["withdraw"], data["waves"]
    if not isinstance(withdraw, list) or not isinstance(plan, list):
        raise TypeError("withdraw and waves must be lists")
    wave, started, since = data["wave"], data["wave_started"], data["since"]
    if not isinstance(wave, int) or not isinstance(started, (int, float)) or not isinstance(since, (int, float)):
        raise TypeError("wave, wave_started and since must be numbers")
    move, excused = data.get("move", []), data.get("excused", [])  # (absent before moves were staged)
    if not isinstance(move, list) or not isinstance(excused, list):
        raise TypeError("move and excused must be lists")
    return Rollout(Phase(str(data["phase"])), str(data["base"]), str(data["target"]),
                   tuple((str(v), str(p)) for v, p in withdraw), tuple(tuple(str(p) for p in w) for w in plan),
                   wave, float(started), float(since), str(data["detail"]), confirmed,
                   tuple(str(v) for v in move), tuple((str(v), str(p)) for v, p in excused))
