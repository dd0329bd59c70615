"""Values the planner reads and returns. All frozen; the planner never mutates its input."""

from __future__ import annotations

import enum
import itertools
from collections.abc import ItemsView, Iterator, KeysView, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..wire import PlanReason


@dataclass(frozen=True, slots=True)
class OriginChecks:
    """When one POP's checks of one origin last proved something, on the controller's clock
    (the agent sends ages, the controller subtracts them from the report's arrival: no
    clock agreement between hosts is needed). The evidence of the evidence-based settle."""

    ok_at: float | None = None  # at least min_healthy backends' last checks succeeded at or after this
    failing_since: float | None = None  # the first failed check of the failure now running (None: none)


@dataclass(frozen=True, slots=True)
class PopReport:
    """An agent's latest report: its verdict per VIP and origin region, and what it announces."""

    pop: str
    received_at: float
    plan_generation: int
    origins: Mapping[str, Mapping[str, bool | None]]  # vip -> region -> True/False/None
    announced: Mapping[str, bool] = field(default_factory=dict)  # vip -> announced now
    # vip -> region -> its check times, only for the VIPs whose checks the agent was asked
    # for (PlanItem.evidence) or whose active origin is failing there: a handful, not all.
    checks: Mapping[str, Mapping[str, OriginChecks]] = field(default_factory=dict)

    @staticmethod
    def checks_at(ages: Mapping[str, Mapping[str, tuple[float | None, float | None]]],
                  received_at: float) -> dict[str, dict[str, OriginChecks]]:
        """A report's check ages (``wire.WireReport.checks``) as times on the controller's
        clock: the agent's clock never meets ours (the report's transit makes them a few ms
        late, the same for every POP on a LAN)."""
        return {vip: {region: OriginChecks(None if ok is None else received_at - ok,
                                           None if failing is None else received_at - failing)
                      for region, (ok, failing) in regions.items()}
                for vip, regions in ages.items()}


_NO_VERDICTS: Mapping[str, Mapping[str, bool | None]] = MappingProxyType({})  # (one empty map for every VIP)


@dataclass(frozen=True, slots=True)
class VipMemory:
    """What the planner remembers about a VIP between runs."""

    active: str  # the active origin region
    active_since: float
    healthy_since: Mapping[str, float] = field(default_factory=dict)  # region -> quorum-healthy since
    withdrawals: tuple[float, ...] = ()  # when health-induced withdrawals were allowed (rate limit)
    # Traffic steering (policy/steering.py); empty without it. A preference's origin order
    # ("eu-central,us-west") -> its active origin and since when (the VIP's own order is
    # ``active`` above); the weighted regions held at weight 0 until healthy for the hold-down.
    routes: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    weight_out: frozenset[str] = frozenset()
    # region -> since when a quorum has seen it down (origins.py: an origin failover's window
    # runs from then; only the regions down now)
    down_since: Mapping[str, float] = field(default_factory=dict)
    # Traffic steering only (empty without it): each fresh POP's verdict on each origin, as
    # last planned. Its POPs follow different routes, so one origin's verdict per POP is not
    # enough to presume after a restart (server/core.py): the views of the others' origins
    # would change, and with them the active origins and the weights.
    verdicts: Mapping[str, Mapping[str, bool | None]] = field(default_factory=lambda: _NO_VERDICTS)


@dataclass(frozen=True, slots=True)
class PopVipMemory:
    """What the planner remembers about one VIP at one POP."""

    verdict: bool | None = None  # the POP's last verdict on the active origin
    flaps: tuple[float, ...] = ()  # when that verdict changed
    dampened_until: float = 0.0
    penalty: int = 0  # hold-downs so far: the next lasts hold_down * 2**penalty
    quiet_since: float = 0.0  # last flap or hold-down end, for forgetting the penalty
    withdrawn: bool = False  # the last plan let this POP withdraw (for the rate limit)
    down_since: float | None = None  # the POP has seen the active origin down since (settle)


# The memory of a POP that has seen the active origin healthy and never flapped: the planner
# uses this one object for all of them (most of the 500,000 pairs of a large fleet).
STEADY = PopVipMemory(verdict=True)
# The memory of a POP never heard about this VIP (before its first report, or silent since).
NEW = PopVipMemory()


@dataclass(frozen=True)
class PlannerState:
    vips: Mapping[str, VipMemory] = field(default_factory=dict)
    pop_vips: Mapping[tuple[str, str], PopVipMemory] = field(default_factory=dict)  # (pop, vip)
    # Not persisted, only reused: each VIP's shared PlanItems ("healthy", "report_stale": the
    # same for every POP in that case) from the last run, so that an unchanged plan is made of
    # the same objects and comparing two plans is cheap.
    shared_items: Mapping[str, Mapping[PlanReason, PlanItem]] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def initial() -> PlannerState:
        return PlannerState()


@dataclass(frozen=True, slots=True)
class PlanItem:
    """The plan for one VIP at one POP: what the agent gets, and why."""

    vip: str
    wanted: bool
    active_origin: str
    drain: bool = False
    reason: PlanReason = PlanReason.HEALTHY
    safety_hold: bool = False
    explanation: str = ""
    # Another POP's withdrawal of this VIP is being confirmed: report this VIP's checks at
    # once and after the next check of every backend (the evidence-based settle).
    evidence: bool = False
    # (region, weight): split the VIP's traffic across these origins (policy/steering.py);
    # (): everything to ``active_origin``, as before weights.
    weights: tuple[tuple[str, int], ...] = ()
    # With ``evidence``: the origins whose checks are asked, when that is not just
    # ``active_origin`` (a steered VIP: the POP being confirmed follows another route).
    evidence_origins: tuple[str, ...] = ()


class UniformItems(Mapping[str, PlanItem]):
    """A VIP's POP -> item mapping when every POP has the same item (the VIP's shared item:
    healthy everywhere, the steady state of a fleet): its POPs (one key dict per distinct
    list, shared by every VIP with that list) and the one item. A dict of 50 pointers per VIP
    was ~14 MB at 10,000 VIPs x 50 POPs. Read-only; equal to the dict it stands for."""

    __slots__ = ("pops", "item")

    def __init__(self, pops: Mapping[str, None], item: PlanItem) -> None:
        self.pops, self.item = pops, item

    @staticmethod
    def of(items: Mapping[str, PlanItem]) -> Mapping[str, PlanItem]:
        """``items`` as a UniformItems when all its values are one object (else itself)."""
        if len(items) < 8 or isinstance(items, UniformItems):
            return items
        values = iter(items.values())
        first = next(values)
        if any(v is not first for v in values):
            return items
        return UniformItems.over(tuple(items), first)

    @staticmethod
    def over(pops: tuple[str, ...], item: PlanItem) -> Mapping[str, PlanItem]:
        """``item`` at every one of ``pops`` (distinct): what ``of`` makes of that dict."""
        if len(pops) < 8:
            return dict.fromkeys(pops, item)
        keys = _POP_KEYS.get(pops)
        if keys is None:
            if len(_POP_KEYS) > 10_000:  # a bound, not a cache policy: publish lists are few
                _POP_KEYS.clear()
            keys = _POP_KEYS[pops] = dict.fromkeys(pops)
        return UniformItems(keys, item)

    def __getitem__(self, pop: str) -> PlanItem:
        if pop in self.pops:
            return self.item
        raise KeyError(pop)

    def __contains__(self, pop: object) -> bool:
        return pop in self.pops

    def __iter__(self) -> Iterator[str]:
        return iter(self.pops)

    def __len__(self) -> int:
        return len(self.pops)

    def keys(self) -> KeysView[str]:
        return self.pops.keys()

    def items(self) -> ItemsView[str, PlanItem]:
        return _UniformItemsView(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UniformItems):
            return self.item == other.item and self.pops.keys() == other.pops.keys()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"UniformItems({dict(self.items())!r})"


class _UniformItemsView(ItemsView[str, PlanItem]):
    _mapping: UniformItems

    def __iter__(self) -> Iterator[tuple[str, PlanItem]]:
        m = self._mapping
        return zip(m.pops, itertools.repeat(m.item))


_POP_KEYS: dict[tuple[str, ...], dict[str, None]] = {}


class AlarmKind(enum.StrEnum):
    """What an alarm is about (the ``kind`` label of anycast_controller_alarm)."""

    CHECKS_DOWN_EVERYWHERE = "checks_down_everywhere"  # every fresh POP sees every origin down: all held
    MIN_POPS_HOLD = "min_pops_hold"  # a withdrawal held back by the safety limits
    WITHDRAW_RATE_LIMITED = "withdraw_rate_limited"  # a withdrawal held back by the rate limit
    ALL_ORIGINS_DOWN = "all_origins_down"  # no origin region is healthy
    DRAIN_BLOCKED = "drain_blocked"  # a drained POP kept announcing by the safety limits


@dataclass(frozen=True, slots=True)
class Alarm:
    kind: AlarmKind
    vip: str
    detail: str


@dataclass(frozen=True)
class PlanResult:
    state: PlannerState
    pops: Mapping[str, Mapping[str, PlanItem]]  # pop -> vip -> item (only VIPs the POP publishes)
    notes: Mapping[str, str]  # vip -> where it goes and why (active origin)
    alarms: tuple[Alarm, ...]
    wake_at: float | None = None  # plan again at this time: a settle window ends

    def item(self, pop: str, vip: str) -> PlanItem | None:
        return self.pops.get(pop, {}).get(vip)
