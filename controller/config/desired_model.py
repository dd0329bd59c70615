"""The central controller's desired state: typed, frozen, built by ``desired.load_desired``."""

from __future__ import annotations

from dataclasses import dataclass

from .model import IPNetwork, Vip


@dataclass(frozen=True)
class FailoverPolicy:
    quorum: float = 0.5  # fraction of reporting POPs that must see an origin down
    min_reporting_pops: int = 1  # fewer verdicts than this: no failover on so little evidence
    failback_hold_down: float = 60.0  # a better origin must be healthy this long before moving back


@dataclass(frozen=True)
class SafetyPolicy:
    max_withdraw_fraction: float = 0.5  # of a VIP's publish domains, withdrawn at once
    min_announcing_pops: int = 1
    withdraw_rate_max: int = 2  # new health-induced withdrawals per VIP...
    withdraw_rate_window: float = 60.0  # ...per this many seconds
    report_stale_after: float = 15.0
    settle: float = 1.0  # a new health withdrawal waits this long for the other POPs' reports
    # ...or less: until a quorum of the other POPs report fresh healthy checks of the origin
    settle_on_evidence: bool = True


@dataclass(frozen=True)
class DrainPolicy:
    drain_time: float = 30.0  # announce less preferred this long, then withdraw


@dataclass(frozen=True)
class DampeningPolicy:
    flaps: int = 3  # verdict changes within `window` that hold a POP down
    window: float = 60.0
    hold_down: float = 30.0  # doubled on each repeat...
    max_hold_down: float = 600.0  # ...up to this


@dataclass(frozen=True)
class Policy:
    failover: FailoverPolicy = FailoverPolicy()
    safety: SafetyPolicy = SafetyPolicy()
    drain: DrainPolicy = DrainPolicy()
    dampening: DampeningPolicy = DampeningPolicy()


@dataclass(frozen=True)
class PopSpec:
    name: str
    token_sha256: str  # the agent's bearer token, hashed: the token itself never goes in git
    description: str = ""


@dataclass(frozen=True)
class FleetVip:
    vip: Vip  # the same definition an agent uses (origins, check, attributes)
    publish: tuple[str, ...]  # publish domains: the POPs that announce it
    enabled: bool  # False: deliberately withdrawn everywhere (no safety minimum)
    policy: Policy

    @property
    def name(self) -> str:
        return self.vip.name


@dataclass(frozen=True)
class DesiredState:
    revision: str
    directory: str
    listen: tuple[str, int]
    metrics_listen: tuple[str, int] | None
    state_dir: str
    operator_token_sha256: str | None
    allowed_prefixes: tuple[IPNetwork, ...]
    pops: tuple[PopSpec, ...]
    vips: tuple[FleetVip, ...]
    policy: Policy

    def pop(self, name: str) -> PopSpec | None:
        return next((p for p in self.pops if p.name == name), None)

    def vip(self, name: str) -> FleetVip | None:
        return next((v for v in self.vips if v.name == name), None)

    def published_at(self, pop: str) -> tuple[FleetVip, ...]:
        return tuple(v for v in self.vips if pop in v.publish)
