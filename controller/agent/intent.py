"""What this POP is asked to do with each VIP: the agent's *plan*.

Until a central controller serves plans, the plan comes from the agent's own config
(``plan_from_config``). The controller's plan has exactly this shape, so the decision
code does not care where it came from.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config.model import AdminState, AgentConfig, Vip
from ..wire import PlanReason


class PlanSource(enum.StrEnum):
    """Where the plan the agent follows came from (the ``plan_source`` of anycast_agent_info)."""

    LOCAL_CONFIG = "local-config"  # standalone: the agent's own config
    CONTROLLER = "controller"
    CACHED_PLAN = "cached-plan"  # the controller's last plan, from disk (the controller is unreachable)
    NONE = "none"  # controller mode, no plan yet


class LocalReason(enum.StrEnum):
    """The reasons a local plan gives (from the VIP's admin state)."""

    ADMIN_DOWN = "admin_down"
    ADMIN_DRAIN = "admin_drain"


IntentReason = PlanReason | LocalReason


@dataclass(frozen=True)
class VipIntent:
    """The plan for one VIP at this POP."""

    vip: str
    wanted: bool  # publish it here at all
    active_origin: str  # the origin region traffic is sent to
    drain: bool = False  # announce with the "draining" attributes (less preferred)
    reason: IntentReason | None = None  # why not wanted / why draining
    # The controller asks this POP to keep announcing even though its own check says the
    # active origin is down: withdrawing would break a global safety rule (e.g. the checks
    # fail everywhere at once, which more likely means the checks are broken).
    safety_hold: bool = False
    # The controller is confirming another POP's withdrawal of this VIP: report this VIP's
    # checks at once and after the next check of each backend (``agent/evidence.py``).
    evidence: bool = False
    # Traffic steering: (region, weight) to split traffic across (the controller's effective
    # weights); (): everything to ``active_origin``.
    weights: tuple[tuple[str, int], ...] = ()
    # With ``evidence``: the origins whose checks are asked; (): ``active_origin``.
    evidence_origins: tuple[str, ...] = ()

    @property
    def asked(self) -> tuple[str, ...]:
        """The origins whose checks the controller asks for (none without ``evidence``)."""
        return (self.evidence_origins or (self.active_origin,)) if self.evidence else ()


@dataclass(frozen=True)
class Plan:
    source: PlanSource
    generation: int
    revision: str
    vips: Mapping[str, VipIntent] = field(default_factory=dict)
    # The VIP definitions to follow: None means the agent's own config (standalone mode);
    # from a controller, the plan carries them (one source of truth, in the controller's git).
    specs: tuple[Vip, ...] | None = None

    @property
    def ready(self) -> bool:
        """False until a controller-mode agent has any plan: then nothing is withdrawn for
        being absent from the plan (a restart while the controller is down keeps routes)."""
        return self.source != PlanSource.NONE


NO_PLAN = Plan(source=PlanSource.NONE, generation=0, revision="", specs=())


def plan_from_config(config: AgentConfig, generation: int = 0) -> Plan:
    """The local plan: every configured VIP wanted unless its admin state says otherwise,
    with its first origin region active."""
    intents: dict[str, VipIntent] = {}
    for vip in config.vips:
        intents[vip.name] = VipIntent(
            vip=vip.name,
            wanted=vip.admin != AdminState.DOWN,
            active_origin=vip.origins[0].region,
            drain=vip.admin == AdminState.DRAIN,
            reason=_LOCAL_REASONS.get(vip.admin),
        )
    return Plan(source=PlanSource.LOCAL_CONFIG, generation=generation, revision=config.source, vips=intents)


_LOCAL_REASONS = {AdminState.DOWN: LocalReason.ADMIN_DOWN, AdminState.DRAIN: LocalReason.ADMIN_DRAIN}
