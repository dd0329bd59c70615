"""Traffic steering between a VIP's origin regions, per POP: preference, weights, dials. Pure.

Theory of operation
-------------------
Every POP of a VIP follows one *origin order*: its preference's (``steering.preference``),
or the VIP's own list of origins (the default, and all there was before steering). The POPs
that share an order share one *route*: an active origin chosen by ``origins.select_origin``
over that order (quorum failover, hold-down failback: each order keeps its own active origin
and since-when; the default order's is ``VipMemory.active`` as before, the others' are in
``VipMemory.routes``), and, for a VIP with weights, the effective weight of each origin.

Dials: a region dialed to 0 leaves every order (the active origin moves off it at once, no
quorum needed: it is an operator's decision, not evidence); back above 0 it is a better
origin again and returns after the failback hold-down like any other. If every region of a
VIP is dialed to 0 the dials are ignored for it (a dial never withdraws a VIP; the note
says so). A dial between 1 and 99 scales the region's weight (VIPs without weights have a
single active origin, so only 0 changes anything for them).

Weights: an origin's effective weight is ``weight * dial`` (then divided by the weights'
greatest common divisor), or 0 while a quorum of POPs sees it down or it is dialed to 0.
An origin a quorum saw down gets its weight back only after it has been healthy for the
failback hold-down (``VipMemory.weight_out`` holds the regions waiting), so a flapping
origin does not pull flows back and forth. When no weighted origin is left, the route is
single-path to the active origin, and the planner's withdrawal and safety logic applies
exactly as without weights. The plan's ``active_origin`` of a weighted route is the first
origin of the order that has weight, so an agent that predates weights (which ignores them)
still sends everything to a healthy origin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..config.desired_model import FailoverPolicy, FleetVip
from .model import VipMemory
from .origins import DOWN, UP, OriginView, Outcome, Proof, no_proof, select_origin

Weights = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Route:
    """Where the POPs that share an origin order send the VIP."""

    active: str  # the plan's active origin
    weights: Weights  # (region, effective weight > 0), in the order's order; (): single path
    outcome: Outcome
    note: str  # where it goes and why
    order: tuple[str, ...]  # the origin order it follows (the VIP's, or a preference's)
    preferred: bool = False  # a preference's route (not the VIP's own order)

    def split(self) -> str:
        """``eu-central 3 / us-west 1`` (empty for a single path)."""
        return " / ".join(f"{r} {w}" for r, w in self.weights)


def steered(fv: FleetVip) -> bool:
    """Whether any steering applies (else the planner's single-route path, unchanged)."""
    return bool(fv.steering.preferences or fv.steering.weights or fv.dials)


def route_vip(fv: FleetVip, views: Mapping[str, OriginView], memory: VipMemory | None,
              now: float, proof: Proof = no_proof) -> tuple[VipMemory, Route, dict[tuple[str, ...], Route]]:
    """The default order's route and every preference's (by order), and the memory after."""
    policy = fv.policy.failover
    default_order = tuple(o.region for o in fv.vip.origins)
    live = tuple(r for r in default_order if fv.dial(r) > 0)
    dials_ignored = not live
    vmem, outcome, note = _select(fv, default_order, dials_ignored, views, memory, policy, now, proof)
    weight_out = _weight_out(fv, views, vmem, memory.weight_out if memory is not None else frozenset(), policy, now)
    by_order: dict[tuple[str, ...], Route] = {}
    new_routes: dict[str, tuple[str, float]] = {}
    for pref in fv.steering.preferences:
        order = pref.origins
        if order in by_order or order == default_order:
            continue
        key = ",".join(order)
        held = (memory.routes.get(key) if memory is not None else None)
        own = (VipMemory(held[0], held[1], vmem.healthy_since, down_since=vmem.down_since)
               if held is not None else None)
        gmem, gout, gnote = _select(fv, order, dials_ignored, views, own, policy, now, proof)
        new_routes[key] = (gmem.active, gmem.active_since)
        by_order[order] = _route(fv, order, gmem.active, gout, gnote, pref.weights, weight_out, views,
                                 dials_ignored, preferred=True)
    vmem = replace(vmem, routes=new_routes, weight_out=weight_out)
    default = _route(fv, default_order, vmem.active, outcome, note, None, weight_out, views, dials_ignored)
    return vmem, default, by_order


def route_of(fv: FleetVip, default: Route, by_order: Mapping[tuple[str, ...], Route], pop: str) -> Route:
    pref = fv.steering.preference(pop)
    if pref is None:
        return default
    return by_order.get(pref.origins, default)


def _select(fv: FleetVip, order: tuple[str, ...], dials_ignored: bool, views: Mapping[str, OriginView],
            memory: VipMemory | None, policy: FailoverPolicy, now: float,
            proof: Proof) -> tuple[VipMemory, Outcome, str]:
    """``select_origin`` over ``order`` without the regions dialed to 0."""
    window = fv.policy.safety.settle
    regions = order if dials_ignored else tuple(r for r in order if fv.dial(r) > 0)
    by_region = {o.region: o for o in fv.vip.origins}
    vip = replace(fv.vip, origins=tuple(by_region[r] for r in regions))
    if memory is not None and memory.active not in regions and memory.active in by_region:
        # Dialed to 0 (an operator's decision, not evidence): off it at once, to the first
        # region of the order that a quorum does not see down.
        target = next((r for r in regions if views[r].status != DOWN), regions[0])
        moved = VipMemory(target, now, memory.healthy_since, memory.withdrawals, down_since=memory.down_since)
        mem, outcome, note = select_origin(vip, views, moved, policy, now, window, proof)
        return mem, outcome, f"{note} (moved off {memory.active}: its traffic dial is 0)"
    mem, outcome, note = select_origin(vip, views, memory, policy, now, window, proof)
    if dials_ignored:
        note += " (every origin region is dialed to 0: dials ignored, a dial never withdraws)"
    return mem, outcome, note


def _weight_out(fv: FleetVip, views: Mapping[str, OriginView], vmem: VipMemory, before: frozenset[str],
                policy: FailoverPolicy, now: float) -> frozenset[str]:
    """The weighted regions a quorum saw down that have not yet been healthy for the hold-down."""
    weighted = {r for r, _ in fv.steering.weights} | {r for p in fv.steering.preferences for r, _ in p.weights or ()}
    out = set()
    for r in weighted:
        status = views[r].status if r in views else None
        since = vmem.healthy_since.get(r)
        if status == DOWN:
            out.add(r)
        elif r in before and not (status == UP and since is not None
                                           and now - since >= policy.failback_hold_down):
            out.add(r)
    return frozenset(out)


def _route(fv: FleetVip, order: tuple[str, ...], active: str, outcome: Outcome, note: str,
           own: Weights | None, weight_out: frozenset[str], views: Mapping[str, OriginView],
           dials_ignored: bool, preferred: bool = False) -> Route:
    weights = fv.steering.weights if own is None else own
    if not weights:
        return Route(active, (), outcome, note, order, preferred)
    given = dict(weights)
    raw = [(r, given[r] * (100 if dials_ignored else fv.dial(r))) for r in order
           if given.get(r, 0) > 0 and r not in weight_out and views[r].status != DOWN
           and (dials_ignored or fv.dial(r) > 0)]
    raw = [(r, w) for r, w in raw if w > 0]
    if not raw:
        return Route(active, (), outcome, f"{note}; no weighted origin is available: single path to {active}", order,
                     preferred)
    if len(raw) == 1:  # one origin with weight: a single path to it, as a plan without weights
        return Route(raw[0][0], (), outcome, f"{note}; split: all to {raw[0][0]}, the only weighted origin available",
                     order, preferred)
    g = math.gcd(*(w for _, w in raw))
    eff = tuple((r, w // g) for r, w in raw)
    first = eff[0][0]
    held = sorted(r for r in weight_out if r in given)
    why = f" ({', '.join(held)} out until healthy for the hold-down)" if held else ""
    return Route(first, eff, outcome, f"{note}; split {' / '.join(f'{r} {w}' for r, w in eff)}{why}", order,
                 preferred)


def wake_at(fv: FleetVip, vmem: VipMemory, now: float) -> float | None:
    """When a region waiting in ``weight_out`` may get its weight back (the planner's wake-up),
    and when a preference order's failback hold-down ends."""
    hold = fv.policy.failover.failback_hold_down
    wakes = [since + hold for r in vmem.weight_out if (since := vmem.healthy_since.get(r)) is not None]
    for key, (active, _) in vmem.routes.items():
        order = key.split(",")
        if active in order:
            wakes += [since + hold for r in order[: order.index(active)]
                      if (since := vmem.healthy_since.get(r)) is not None]
    return min((w if w > now else math.nextafter(now, math.inf) for w in wakes), default=None)
