"""Which origin region a VIP is sent to: quorum failover, hold-down failback. Pure."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

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
    FAILBACK = "origin_failback"  # a better one was healthy for the hold-down: moved back
    FAILBACK_PENDING = "failback_pending"  # a better one is healthy, its hold-down runs (a countdown in the note)
    ALL_ORIGINS_DOWN = "all_origins_down"  # no origin is healthy: stays


@dataclass(frozen=True, slots=True)
class OriginView:
    status: Status
    down: int  # POPs that see it down
    verdicts: int  # POPs with a verdict

    def describe(self, region: str) -> str:
        if self.status == UNKNOWN:
            return f"{region}: unknown ({self.verdicts} POP(s) with a verdict)"
        return f"{region}: {self.status} ({self.down}/{self.verdicts} POPs see it down)"


def origin_views(vip: Vip, verdicts_by_pop: Mapping[str, Mapping[str, bool | None]],
                 policy: FailoverPolicy) -> dict[str, OriginView]:
    """Each origin's status as the fresh reports of the VIP's publish domains see it
    (``verdicts_by_pop``: POP -> that POP's verdict per origin region of this VIP)."""
    views = {}
    for origin in vip.origins:
        region = origin.region
        verdicts = [v for o in verdicts_by_pop.values() if (v := o.get(region)) is not None]
        down = verdicts.count(False)
        if len(verdicts) < policy.min_reporting_pops:
            status = UNKNOWN
        else:
            status = DOWN if down / len(verdicts) >= policy.quorum else UP
        views[region] = OriginView(status, down, len(verdicts))
    return views


def select_origin(vip: Vip, views: Mapping[str, OriginView], memory: VipMemory | None,
                  policy: FailoverPolicy, now: float) -> tuple[VipMemory, Outcome, str]:
    """The active origin after this run: (new memory, reason code, sentence).

    The active origin changes only when a quorum sees it down (to the first healthy origin
    in priority order) or when a higher-priority origin has been healthy for the whole
    failback hold-down. Unknown never triggers a move.
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
    memory = VipMemory(memory.active, memory.active_since, healthy_since, memory.withdrawals)
    active = memory.active
    if views[active].status == DOWN:
        target = next((r for r in regions if views[r].status == UP), None)
        if target is None:
            return memory, Outcome.ALL_ORIGINS_DOWN, (
                f"stays on {active}: no origin is healthy ({'; '.join(views[r].describe(r) for r in regions)})")
        return (VipMemory(target, now, healthy_since, memory.withdrawals), Outcome.FAILOVER,
                f"moved from {active} to {target}: {views[active].describe(active)}")
    for r in regions[: regions.index(active)]:
        since = healthy_since.get(r)
        if since is not None and views[r].status == UP and now - since >= policy.failback_hold_down:
            return (VipMemory(r, now, healthy_since, memory.withdrawals), Outcome.FAILBACK,
                    f"moved back from {active} to {r}: healthy for {now - since:.0f}s "
                    f"(hold-down {policy.failback_hold_down:.0f}s)")
    better = [r for r in regions[: regions.index(active)] if r in healthy_since and views[r].status == UP]
    if better:
        r = better[0]
        return memory, Outcome.FAILBACK_PENDING, (
            f"on {active}; {r} healthy for {now - healthy_since[r]:.0f}s of the "
            f"{policy.failback_hold_down:.0f}s hold-down before moving back")
    return memory, Outcome.ACTIVE, f"on {active}: {views[active].describe(active)}"
