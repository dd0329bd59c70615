"""The JSON the controller and the agents exchange: plans (controller -> agent) and health
reports (agent -> controller). Both directions validate what they receive and name the
field that is wrong; nothing invalid is ever half-applied.

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

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from .agent.intent import Plan, VipIntent
from .config.agent import DEFAULT_CHECK, DEFAULT_DRAINING, DEFAULT_UP, read_vip
from .config.model import IPNetwork, StateAttributes, Vip
from .config.reader import Issues, Node
from .config.serialize import vip_to_dict
from .policy.model import PlanItem

MAX_REPORT_BYTES = 1 << 20


class WireError(ValueError):
    """Invalid data received; ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


# --- plans -------------------------------------------------------------------------------------
def encode_plan(pop: str, generation: int, revision: str, items: Iterable[tuple[Vip, PlanItem]],
                spec: Callable[[Vip], dict[str, Any]] = vip_to_dict) -> dict[str, Any]:
    """``spec`` turns a VIP into its definition (the controller passes a cached one)."""
    return {
        "pop": pop, "generation": generation, "revision": revision,
        "vips": [{"name": vip.name, "spec": spec(vip), "wanted": i.wanted, "active_origin": i.active_origin,
                  "drain": i.drain, "reason": i.reason, "safety_hold": i.safety_hold,
                  "explanation": i.explanation} for vip, i in items],
    }


# VIP name -> (its spec as received, the allowed prefixes it was checked against, the result)
SpecCache = dict[str, tuple[Any, tuple[IPNetwork, ...], Vip]]


def decode_plan(data: Any, pop: str, allowed: Iterable[IPNetwork], cache: SpecCache | None = None) -> Plan:
    """Validate a plan for ``pop``; every VIP spec goes through the config's own reader,
    with the agent's allowed prefixes: a VIP outside them is refused, by name.

    ``cache`` (kept by the caller between plans) skips the reader for a spec equal to one
    that already passed it: most of a new plan is the previous one (10,000 VIPs: 0.8 s ->
    0.1 s). It is replaced only when the whole plan is valid."""
    allowed = tuple(allowed)
    previous: SpecCache = cache if cache is not None else {}
    checked: SpecCache = {}
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
    specs: list[Vip] = []
    intents: dict[str, VipIntent] = {}
    for i, entry in enumerate(vips):
        where = f"vips[{i}]"
        e = _mapping(entry, where)
        raw = e.get("spec")
        name = raw.get("name") if isinstance(raw, dict) else None
        hit = previous.get(name) if isinstance(name, str) else None
        if hit is not None and hit[1] == allowed and hit[0] == raw:
            vip = hit[2]
        else:
            issues = Issues()
            read = read_vip(Node(raw, f"{where}.spec", issues), allowed, dict(DEFAULT_CHECK),
                            StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))
            if issues.items or read is None:
                first = issues.items[0] if issues.items else None
                raise WireError(first.path if first else f"{where}.spec",
                                first.message if first else "invalid VIP")
            vip = read
        checked[vip.name] = (raw, allowed, vip)
        if vip.name in intents:
            raise WireError(f"{where}.spec.name", f"VIP {vip.name!r} listed twice")
        active = e.get("active_origin")
        if not isinstance(active, str) or vip.origin(active) is None:
            raise WireError(f"{where}.active_origin", f"{active!r} is not one of the VIP's origin regions")
        specs.append(vip)
        intents[vip.name] = VipIntent(
            vip=vip.name, wanted=_bool(e.get("wanted"), f"{where}.wanted"), active_origin=active,
            drain=_bool(e.get("drain"), f"{where}.drain"), reason=str(e.get("reason", "")),
            safety_hold=_bool(e.get("safety_hold"), f"{where}.safety_hold"),
        )
    if cache is not None:
        cache.clear()
        cache.update(checked)
    return Plan("controller", generation, revision, intents, specs=tuple(specs))


# --- reports -----------------------------------------------------------------------------------
def encode_report(plan_generation: int, origins: Mapping[str, Mapping[str, bool | None]],
                  announced: Mapping[str, bool]) -> dict[str, Any]:
    return {"plan_generation": plan_generation,
            "origins": {v: dict(r) for v, r in origins.items()}, "announced": dict(announced)}


def decode_report(data: Any, published: Mapping[str, Collection[str]]) -> tuple[
        int, dict[str, dict[str, bool | None]], dict[str, bool]]:
    """Validate a POP's report against the VIPs it publishes (name -> origin regions):
    (generation, origins, announced)."""
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
    return generation, origins, announced


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
