"""The JSON the controller and the agents exchange: plans (controller -> agent) and health
reports (agent -> controller), as typed values with their codecs. Both directions validate
what they receive and name the field that is wrong; nothing invalid is ever half-applied.

This module depends on nothing else of ours: the agent and the controller depend on it, and
each converts between these wire values and its own types in its own package
(``agent/plan_wire.py``; ``server/``). A VIP's ``spec`` is its definition in the config
format: here it is only carried; the agent reads it with its config reader.

Plan::

    {"pop": "sjc", "generation": 7, "revision": "3f2a9c1e0b7d",
     "vips": [{"name": "game-global", "spec": {...a VIP in the config format...},
               "wanted": true, "active_origin": "us-west", "drain": false,
               "reason": "healthy", "safety_hold": false, "explanation": "..."}]}

Report::

    {"plan_generation": 7,
     "origins": {"game-global": {"us-west": true, "eu-central": null}},
     "announced": {"game-global": true}}
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

MAX_REPORT_BYTES = 1 << 20


class WireError(ValueError):
    """Invalid data received; ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


# --- plans -------------------------------------------------------------------------------------
class PlanReason(enum.StrEnum):
    """Why the controller plans a VIP as it does at a POP (controller/policy/planner.py).

    A closed vocabulary: a plan with any other word is refused, so a peer cannot choose the
    agent's metric label values (the agent withdraws an unwanted VIP with the plan's reason)."""

    HEALTHY = "healthy"
    HEALTH_UNKNOWN = "health_unknown"  # the POP has no verdict on the active origin yet
    REPORT_STALE = "report_stale"  # no recent report: left to the agent's own checks
    DRAINING = "draining"  # the POP is draining: announced less preferred
    DRAINED = "drained"  # the drain time has passed: withdrawn
    DRAIN_BLOCKED = "drain_blocked"  # drained, but kept announced (less preferred) by the safety limits
    CONFIRMING = "confirming"  # the POP sees the origin down; the settle window runs
    BACKEND_DOWN = "backend_down"  # the POP sees the origin down: its agent withdraws
    DAMPENED = "dampened"  # the POP flapped: held down
    SAFETY_HOLD = "safety_hold"  # a withdrawal held back by a global safety rule
    DISABLED = "disabled"  # the VIP is disabled in the config: withdrawn everywhere


class PlanEntry(Protocol):
    """What a plan says about one VIP at one POP (the planner's PlanItem is one, PlanVip another)."""

    @property
    def vip(self) -> str: ...  # the VIP's name
    @property
    def wanted(self) -> bool: ...
    @property
    def active_origin(self) -> str: ...
    @property
    def drain(self) -> bool: ...
    @property
    def reason(self) -> PlanReason: ...
    @property
    def safety_hold(self) -> bool: ...
    @property
    def explanation(self) -> str: ...


@dataclass(frozen=True)
class PlanVip:
    """One VIP of a received plan. ``spec`` is the JSON value received (the agent's config
    reader validates it, against the agent's allowed prefixes)."""

    vip: str  # "name" on the wire
    spec: Any
    wanted: bool
    active_origin: str
    drain: bool
    reason: PlanReason
    safety_hold: bool
    explanation: str = ""


@dataclass(frozen=True)
class WirePlan:
    pop: str
    generation: int
    revision: str
    vips: tuple[PlanVip, ...]


def encode_plan(pop: str, generation: int, revision: str,
                vips: Iterable[tuple[PlanEntry, Any]]) -> dict[str, Any]:
    """``vips``: (entry, the VIP's spec) pairs; the controller passes cached spec dicts and
    its PlanItems as they are (no copy per VIP: a fleet's plans have 500,000 of them)."""
    return {
        "pop": pop, "generation": generation, "revision": revision,
        "vips": [{"name": i.vip, "spec": spec, "wanted": i.wanted, "active_origin": i.active_origin,
                  "drain": i.drain, "reason": i.reason, "safety_hold": i.safety_hold,
                  "explanation": i.explanation} for i, spec in vips],
    }


def decode_plan(data: Any, pop: str) -> WirePlan:
    """Validate the shape of a plan for ``pop`` (each VIP's spec is left to the agent)."""
    obj = _mapping(data, "")
    if obj.get("pop") != pop:
        raise WireError("pop", f"plan is for {obj.get('pop')!r}, this agent is {pop!r}")
    generation = _int(obj.get("generation"), "generation")
    revision = obj.get("revision")
    if not isinstance(revision, str):
        raise WireError("revision", "expected a string")
    vips = obj.get("vips")
    if not isinstance(vips, list):
        raise WireError("vips", "expected a list")
    entries = []
    for i, e in enumerate(vips):
        # One test for the whole entry, the field's name only when it fails: a plan has
        # 10,000 entries and almost always every one is right.
        if not isinstance(e, dict):
            raise WireError(f"vips[{i}]", "expected a JSON object")
        name, active, reason = e.get("name"), e.get("active_origin"), e.get("reason")
        wanted, drain, hold = e.get("wanted"), e.get("drain"), e.get("safety_hold")
        explanation = e.get("explanation", "")
        known = _PLAN_REASONS.get(reason) if isinstance(reason, str) else None
        if not (isinstance(name, str) and isinstance(active, str) and known is not None
                and isinstance(wanted, bool) and isinstance(drain, bool) and isinstance(hold, bool)
                and isinstance(explanation, str)):
            _refuse(e, f"vips[{i}]")
        entries.append(PlanVip(name, e.get("spec"), wanted, active, drain, known, hold, explanation))
    return WirePlan(pop, generation, revision, tuple(entries))


def _refuse(e: dict[str, Any], where: str) -> NoReturn:
    """Raise the WireError for the first bad field of a plan entry."""
    if not isinstance(e.get("name"), str):
        raise WireError(f"{where}.name", "expected a string")
    active = e.get("active_origin")
    if not isinstance(active, str):
        raise WireError(f"{where}.active_origin", f"{active!r} is not one of the VIP's origin regions")
    for flag in ("wanted", "drain", "safety_hold"):
        _bool(e.get(flag), f"{where}.{flag}")
    reason = e.get("reason")
    if not isinstance(reason, str) or reason not in _PLAN_REASONS:
        raise WireError(f"{where}.reason", f"{reason!r} is not a plan reason ({', '.join(_PLAN_REASONS)})")
    raise WireError(f"{where}.explanation", "expected a string")


_PLAN_REASONS = {r.value: r for r in PlanReason}


# --- reports -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WireReport:
    plan_generation: int
    origins: Mapping[str, Mapping[str, bool | None]]  # vip -> origin region -> verdict (None: none yet)
    announced: Mapping[str, bool]  # vip -> announced by the POP now


def encode_report(report: WireReport) -> dict[str, Any]:
    return {"plan_generation": report.plan_generation,
            "origins": {v: dict(r) for v, r in report.origins.items()}, "announced": dict(report.announced)}


def decode_report(data: Any, published: Mapping[str, Collection[str]]) -> WireReport:
    """Validate a POP's report against the VIPs it publishes (name -> origin regions)."""
    obj = _mapping(data, "")
    unknown = set(obj) - {"plan_generation", "origins", "announced"}
    if unknown:
        raise WireError(sorted(unknown)[0], "unknown field")
    generation = _int(obj.get("plan_generation", 0), "plan_generation")
    origins: dict[str, dict[str, bool | None]] = {}
    for vip_name, regions in _mapping(obj.get("origins", {}), "origins").items():
        known = published.get(vip_name)
        if known is None:
            raise WireError(f"origins.{vip_name}", "this POP does not publish that VIP")
        verdicts: dict[str, bool | None] = {}
        for region, verdict in _mapping(regions, f"origins.{vip_name}").items():
            if region not in known:
                raise WireError(f"origins.{vip_name}.{region}", "not an origin region of this VIP")
            if verdict is not None and not isinstance(verdict, bool):
                raise WireError(f"origins.{vip_name}.{region}", "expected true, false or null")
            verdicts[region] = verdict
        origins[vip_name] = verdicts
    announced: dict[str, bool] = {}
    for vip_name, flag in _mapping(obj.get("announced", {}), "announced").items():
        if vip_name not in published:
            raise WireError(f"announced.{vip_name}", "this POP does not publish that VIP")
        announced[vip_name] = _bool(flag, f"announced.{vip_name}")
    return WireReport(generation, origins, announced)


# --- helpers -----------------------------------------------------------------------------------
def _mapping(v: Any, field: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise WireError(field, "expected a JSON object")
    return v


def _int(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < -1:
        raise WireError(field, "expected a non-negative integer")
    return v


def _bool(v: Any, field: str) -> bool:
    if not isinstance(v, bool):
        raise WireError(field, "expected true or false")
    return v
