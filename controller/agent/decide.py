"""Decide, per VIP, whether this POP announces it: pure, and always with a reason.

Theory of operation
-------------------
Inputs: the VIP's config, the plan's intent for it, and the health verdict of every
backend (True healthy, False unhealthy, None no verdict yet). Output: a Decision with an
action and a reason code. The rules, in order:

1. The VIP must lie in the allowed anycast ranges, or it is never announced
   (``not_allowed``), whatever the plan says.
2. Not wanted by the plan -> withdraw with the plan's reason (``not_in_plan``,
   ``admin_down``, ``drained``, ...).
3. The active origin region is unhealthy (fewer than ``min_healthy`` healthy backends and
   every backend has a verdict) -> withdraw (``backend_down``), unless the controller's
   plan sets ``safety_hold``: then keep announcing (``safety_hold``), because withdrawing
   would break a global safety rule. With a reachable controller that has not yet seen
   this failure, hold for a moment (``awaiting_controller``): the agent reports at once,
   and the controller either confirms (``backend_down``) or holds (``safety_hold``). This
   is what keeps a check failure seen everywhere at once (a backbone cut) from
   withdrawing the VIP everywhere before anyone can stop it.
4. No verdict yet for the active origin -> HOLD: do nothing, keep whatever ExaBGP holds.
   This is what lets a restarted agent take over routes that ExaBGP kept without
   flapping them, and what keeps a fresh agent from announcing before checks ran.
5. Draining -> announce with the "draining" attributes (``draining``), plus 65535:0 with
   ``bgp.graceful_shutdown`` set.
6. Otherwise announce with the "up" attributes (``healthy``).

With weights in the plan (traffic steering), rule 3's "the active origin" becomes "every
weighted origin": while this POP sees at least one of them healthy it announces, and its
kernel route splits traffic across the healthy ones by their weights (one it sees down gets
weight 0 here at once, before the controller's quorum agrees). Only when it sees none
healthy do rules 3 and 4 apply, to the active origin, exactly as without weights.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .. import bgp_values

from ..config.model import Attributes, Backend, IPAddress, IPNetwork, Origin, Vip
from ..wire import PlanReason
from .intent import IntentReason, VipIntent


class Action(enum.Enum):
    ANNOUNCE = "announce"
    WITHDRAW = "withdraw"
    HOLD = "hold"


class Reason(enum.StrEnum):
    """The agent's own reason codes: in log lines, metric labels and the CLI's explanation.
    A VIP the plan does not want is withdrawn with the plan's reason instead (a PlanReason
    from the controller, a LocalReason from the agent's config): see DecisionReason."""

    HEALTHY = "healthy"
    DRAINING = "draining"
    BACKEND_DOWN = "backend_down"
    HEALTH_UNKNOWN = "health_unknown"
    NOT_IN_PLAN = "not_in_plan"
    NOT_ALLOWED = "not_allowed"
    NOT_IN_CONFIG = "not_in_config"
    UNKNOWN_ORIGIN = "unknown_origin"
    SHUTDOWN = "shutdown"
    SAFETY_HOLD = "safety_hold"
    AWAITING_CONTROLLER = "awaiting_controller"
    # The agent failed handling this one VIP (deciding, or building its ExaBGP command):
    # it is withdrawn, the others carry on (a crash would withdraw every VIP at the POP).
    REFUSED = "refused"


# Every word a decision's reason can be: all closed vocabularies, so metric labels are too.
DecisionReason = Reason | IntentReason


@dataclass(frozen=True)
class Decision:
    vip: str
    prefix: IPNetwork
    action: Action
    reason: DecisionReason
    detail: str = ""
    attributes: Attributes | None = None  # set when announcing
    origin: str | None = None  # the active origin region
    next_hop: IPAddress | None = None  # where the kernel route points
    # Traffic steering: (next hop, weight) of each weighted origin this POP sees healthy
    # (two or more: the kernel route is split across them); (): a single path to next_hop.
    next_hops: tuple[tuple[IPAddress, int], ...] = ()

    @property
    def status(self) -> str:
        """One word for humans and the vip state metric."""
        if self.action is Action.ANNOUNCE:
            return "draining" if self.reason == Reason.DRAINING else "up"
        if self.action is Action.HOLD:
            return "pending"
        return "withdrawn"


BackendKey = tuple[str, str, Backend]  # (vip name, origin region, backend)


def origin_health(origin: Origin, verdicts: Iterable[bool | None]) -> tuple[bool | None, str]:
    """Is an origin region healthy enough to send traffic to? Returns (verdict, detail)."""
    values = list(verdicts)
    healthy = values.count(True)
    unknown = values.count(None)
    detail = f"{healthy}/{len(values)} backends healthy in {origin.region} (need {origin.min_healthy})"
    verdict = _verdict(origin, healthy, unknown)
    if verdict is None:
        return None, detail + f", {unknown} without a verdict yet"
    return verdict, detail


def origin_verdict(origin: Origin, verdicts: Iterable[bool | None]) -> bool | None:
    """`origin_health`'s verdict alone, without spelling out its detail (the agent asks it of
    every VIP on every pass)."""
    values = list(verdicts)
    return _verdict(origin, values.count(True), values.count(None))


def _verdict(origin: Origin, healthy: int, unknown: int) -> bool | None:
    if healthy >= origin.min_healthy:
        return True
    if healthy + unknown >= origin.min_healthy and unknown:
        return None
    return False


def within(prefix: IPNetwork, allowed: IPNetwork) -> bool:
    """``prefix.subnet_of(allowed)`` for two networks of any families (False across them),
    on the integers: ipaddress's own builds each network's broadcast address, a third of
    `decide`'s CPU at a cold start's 10,000 VIPs."""
    if prefix.version != allowed.version or prefix.prefixlen < allowed.prefixlen:
        return False
    shift = prefix.max_prefixlen - allowed.prefixlen
    return int(prefix.network_address) >> shift == int(allowed.network_address) >> shift


def graceful_shutdown_attributes(attrs: Attributes) -> Attributes:
    """`attrs` with RFC 8326's GRACEFUL_SHUTDOWN community added (once, in canonical order)."""
    return dataclasses.replace(attrs, communities=bgp_values.canonical_communities(
        (*attrs.communities, bgp_values.GRACEFUL_SHUTDOWN)))


def decide(
    vip: Vip,
    intent: VipIntent | None,
    health: Mapping[BackendKey, bool | None],
    allowed: Iterable[IPNetwork],
    confirm_pending: bool = False,
    graceful_shutdown: bool = False,
) -> Decision:
    """The one function that decides whether this POP announces ``vip``.

    ``confirm_pending``: a controller is reachable and has not yet answered this POP's
    report of the failure (and the confirmation timeout has not passed).
    ``graceful_shutdown``: ``bgp.graceful_shutdown`` is set, so a drain also carries
    GRACEFUL_SHUTDOWN (65535:0): routers that honour it lower the path's preference."""

    def withdraw(reason: DecisionReason, detail: str = "", origin: Origin | None = None) -> Decision:
        return Decision(vip.name, vip.prefix, Action.WITHDRAW, reason, detail,
                        origin=origin.region if origin else None)

    if not any(within(vip.prefix, a) for a in allowed):
        return withdraw(Reason.NOT_ALLOWED, f"{vip.prefix} is outside the allowed anycast prefixes")
    if intent is None:
        return withdraw(Reason.NOT_IN_PLAN, "the plan does not mention this VIP")
    if not intent.wanted:
        return withdraw(intent.reason or Reason.NOT_IN_PLAN, "the plan does not want it at this POP")
    origin = vip.origin(intent.active_origin)
    if origin is None:
        return withdraw(Reason.UNKNOWN_ORIGIN, f"active origin {intent.active_origin!r} is not configured")
    verdict, detail = origin_health(origin, (health.get((vip.name, origin.region, b)) for b in origin.backends))
    hop: IPAddress = origin.next_hop
    hops: tuple[tuple[IPAddress, int], ...] = ()
    split = healthy_split(vip, intent, health) if intent.weights else []
    if split:
        verdict, hop = True, split[0][0].next_hop  # (the active origin first, when healthy here)
        hops = tuple((o.next_hop, w) for o, w in split) if len(split) > 1 else ()
        detail = (f"split {' / '.join(f'{o.region} {w}' for o, w in split)} "
                  f"({len(split)} of {len(intent.weights)} weighted origins healthy here)")
    if verdict is False and intent.safety_hold:
        return Decision(vip.name, vip.prefix, Action.ANNOUNCE, Reason.SAFETY_HOLD,
                        f"{detail}; kept announced on the controller's safety hold",
                        vip.attributes.up, origin.region, origin.next_hop)
    if verdict is False and confirm_pending and intent.reason != PlanReason.BACKEND_DOWN:
        return Decision(vip.name, vip.prefix, Action.HOLD, Reason.AWAITING_CONTROLLER,
                        f"{detail}; reported, waiting for the controller to confirm the withdrawal",
                        origin=origin.region, next_hop=origin.next_hop)
    if verdict is False:
        return withdraw(Reason.BACKEND_DOWN, detail, origin)
    if verdict is None:
        return Decision(vip.name, vip.prefix, Action.HOLD, Reason.HEALTH_UNKNOWN, detail,
                        origin=origin.region, next_hop=origin.next_hop)
    if intent.drain:
        return Decision(vip.name, vip.prefix, Action.ANNOUNCE, Reason.DRAINING,
                        intent.reason or "drain requested",
                        graceful_shutdown_attributes(vip.attributes.draining) if graceful_shutdown
                        else vip.attributes.draining,
                        origin.region, hop, hops)
    return Decision(vip.name, vip.prefix, Action.ANNOUNCE, Reason.HEALTHY, detail,
                    vip.attributes.up, origin.region, hop, hops)


def healthy_split(vip: Vip, intent: VipIntent, health: Mapping[BackendKey, bool | None]) -> list[tuple[Origin, int]]:
    """The plan's weighted origins that this POP sees healthy, the active one first."""
    out: list[tuple[Origin, int]] = []
    for region, weight in sorted(intent.weights, key=lambda rw: rw[0] != intent.active_origin):
        o = vip.origin(region)
        if o is not None and weight > 0 and origin_verdict(
                o, (health.get((vip.name, region, b)) for b in o.backends)) is True:
            out.append((o, weight))
    return out
