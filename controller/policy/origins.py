"""Which origin region a VIP is sent to: quorum failover on fresh proof, hold-down failback. Pure.

A failover from the active origin A to a target T is the most global act the controller
takes (every POP moves at once), so it trusts no single signal. A is down only when a
quorum of the reporting POPs, and at least ``failover.min_down_pops`` distinct POPs (capped
at the VIP's publish domains), see it down: one POP's reports alone move nothing. Then the
move waits for *fresh proof* that T is healthy: the POPs that see A down (enough of them
to make the quorum) show T healthy on checks that succeeded after A's failure began there
(``Proof``, from the reports' check ages). Broken checks fail every origin within an
interval or two, so they never prove T: the move waits (``failover_pending``) until the
window (``safety.settle``) ends, by when T is seen down too and the VIP stays on A
(``all_origins_down``, the valve holds). Agents that send no check ages prove nothing: their
failovers wait the window, then move as before. A target that was itself down during A's
failure (the checks recovering after being broken everywhere) gets no shortcut either: the
window starts again when it is back up, and A recovering within it cancels the move.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ..config.desired_model import FailoverPolicy
from ..config.model import Vip
from .model import VipMemory



class Status(enum.StrEnum):
    """An origin region's status as the fresh verdicts see it."""

    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"


UP, DOWN, UNKNOWN = Status.UP, Status.DOWN, Status.UNKNOWN


class Outcome(enum.StrEnum):
    """What ``select_origin`` did with the active origin this run."""

    ACTIVE = "active"  # stays, nothing better to move back to
    FAILOVER = "origin_failover"  # a quorum saw it down: moved to the first healthy one
    FAILOVER_PENDING = "failover_pending"  # a quorum sees it down: waiting for fresh proof the target is healthy
    FAILBACK = "origin_failback"  # a better one was healthy for the hold-down: moved back
    FAILBACK_PENDING = "failback_pending"  # a better one is healthy, its hold-down runs (a countdown in the note)
    ALL_ORIGINS_DOWN = "all_origins_down"  # no origin is healthy: stays


@dataclass(frozen=True, slots=True)
class OriginView:
    status: Status
    down: int  # POPs that see it down
    verdicts: int  # POPs with a verdict

    def describe(self, region: str) -> str:
        if self.status == UNKNOWN and self.down:
            return (f"{region}: unknown ({self.down}/{self.verdicts} POPs see it down: too few distinct POPs "
                    f"to call it down, policy.failover.min_down_pops or min_reporting_pops)")
        if self.status == UNKNOWN:
            return f"{region}: unknown ({self.verdicts} POP(s) with a verdict)"
        return f"{region}: {self.status} ({self.down}/{self.verdicts} POPs see it down)"


# Proof(active, target): whether the POPs that see ``active`` down show ``target`` healthy on
# checks newer than ``active``'s failure there (the planner builds it from the reports).
Proof = Callable[[str, str], bool]


def no_proof(active: str, target: str) -> bool:
    return False


def min_down(policy: FailoverPolicy, publish_domains: int) -> int:
    """The distinct POPs that must see an origin down before it counts as down (capped at
    the VIP's publish domains, so that a VIP published at one POP still fails over)."""
    return max(1, min(policy.min_down_pops, publish_domains))


def down_needed(policy: FailoverPolicy, publish_domains: int, verdicts: int) -> int:
    """How many of ``verdicts`` POPs must see an origin down for it to be down."""
    return max(min_down(policy, publish_domains), math.ceil(policy.quorum * verdicts - 1e-9))


def origin_views(vip: Vip, verdicts_by_pop: Mapping[str, Mapping[str, bool | None]],
                 policy: FailoverPolicy, publish_domains: int, weight: int = 1) -> dict[str, OriginView]:
    """Each origin's status as the fresh reports of the VIP's publish domains see it
    (``verdicts_by_pop``: POP -> that POP's verdict per origin region of this VIP). A
    quorum seeing it down but fewer than ``min_down`` POPs is unknown: not enough POPs to
    call it down, and those that tell do not call it up. ``weight``: each entry stands for
    that many POPs with the same verdicts (the planner's uniform VIPs: one entry, not 300)."""
    views = {}
    floor = min_down(policy, publish_domains)
    for origin in vip.origins:
        region = origin.region
        verdicts = [v for o in verdicts_by_pop.values() if (v := o.get(region)) is not None]
        seen, down = len(verdicts) * weight, verdicts.count(False) * weight
        if seen < policy.min_reporting_pops:
            status = UNKNOWN
        elif down / seen >= policy.quorum:
            status = DOWN if down >= floor else UNKNOWN
        else:
            status = UP
        views[region] = OriginView(status, down, seen)
    return views


def select_origin(vip: Vip, views: Mapping[str, OriginView], memory: VipMemory | None,
                  policy: FailoverPolicy, now: float, window: float = 0.0,
                  proof: Proof = no_proof) -> tuple[VipMemory, Outcome, str]:
    """The active origin after this run: (new memory, reason code, sentence).

    The active origin changes only when a quorum sees it down (to the first healthy origin
    in priority order, on ``proof`` that it is healthy or once it has been down for
    ``window`` seconds: see the module's docstring) or when a higher-priority origin has
    been healthy for the whole failback hold-down. Unknown never triggers a move.
    """
    regions = [o.region for o in vip.origins]
    if memory is None or memory.active not in regions:
        memory = VipMemory(active=regions[0], active_since=now)
    # A region stays healthy-since while a quorum sees it up *or nobody can tell* (unknown: too
    # few fresh reports, as in the first passes after a controller restart): only a quorum
    # seeing it down restarts its failback hold-down. Failing back still needs it up now.
    healthy_since = {r: since for r in regions
                     if (since := memory.healthy_since.get(r, now) if views[r].status == UP
                         else memory.healthy_since.get(r) if views[r].status == UNKNOWN else None) is not None}
    # Since when a quorum has seen each region down (the failover window's start).
    down_since = {r: memory.down_since.get(r, now) for r in regions if views[r].status == DOWN}
    memory = VipMemory(memory.active, memory.active_since, healthy_since, memory.withdrawals,
                       down_since=down_since)
    active = memory.active
    if views[active].status == DOWN:
        target = next((r for r in regions if views[r].status == UP), None)
        if target is None:
            return memory, Outcome.ALL_ORIGINS_DOWN, (
                f"stays on {active}: no origin is healthy ({'; '.join(views[r].describe(r) for r in regions)})")
        # The window runs from A down and T up, whichever came last; fresh proof ends it
        # early only if T stayed up all along (else it is recovering with A, maybe).
        start = max(down_since[active], healthy_since.get(target, now))
        proven = healthy_since.get(target, now) <= down_since[active] and proof(active, target)
        if proven or now - start >= window:
            why = ("fresh checks prove it healthy" if proven else "no failover window (settle 0)" if window <= 0
                   else f"no fresh proof, {active} down for the whole {window:g}s window")
            return (replace(memory, active=target, active_since=now), Outcome.FAILOVER,
                    f"moved from {active} to {target}: {views[active].describe(active)}; {target}: {why}")
        return memory, Outcome.FAILOVER_PENDING, (
            f"on {active}, failover to {target} pending: {views[active].describe(active)}; waiting "
            f"{start + window - now:.1f}s more for fresh checks proving {target} healthy (without them, "
            f"it moves when the window ends if {target} is still up)")
    for r in regions[: regions.index(active)]:
        since = healthy_since.get(r)
        if since is not None and views[r].status == UP and now - since >= policy.failback_hold_down:
            return (replace(memory, active=r, active_since=now), Outcome.FAILBACK,
                    f"moved back from {active} to {r}: healthy for {now - since:.0f}s "
                    f"(hold-down {policy.failback_hold_down:.0f}s)")
    better = [r for r in regions[: regions.index(active)] if r in healthy_since and views[r].status == UP]
    if better:
        r = better[0]
        return memory, Outcome.FAILBACK_PENDING, (
            f"on {active}; {r} healthy for {now - healthy_since[r]:.0f}s of the "
            f"{policy.failback_hold_down:.0f}s hold-down before moving back")
    return memory, Outcome.ACTIVE, f"on {active}: {views[active].describe(active)}"
