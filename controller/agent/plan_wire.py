"""A plan received from the controller, from the wire's values to the agent's own ``Plan``.

``controller.wire`` checks the plan's shape; here every VIP spec goes through the config's
own reader, with the agent's allowed prefixes (a VIP outside them is refused, by name), and
the active origin must be one of the VIP's origin regions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..config.agent import DEFAULT_CHECK, DEFAULT_DRAINING, DEFAULT_UP, read_vip
from ..config.model import IPNetwork, StateAttributes, Vip
from ..config.reader import Issues, Node
from ..wire import WireError, WirePlan
from ..wire import decode_plan as decode_wire_plan
from .intent import Plan, PlanSource, VipIntent

# VIP name -> (its spec as received, the allowed prefixes it was checked against, the result)
SpecCache = dict[str, tuple[Any, tuple[IPNetwork, ...], Vip]]


def decode_plan(data: Any, pop: str, allowed: Iterable[IPNetwork], cache: SpecCache | None = None) -> Plan:
    """Validate a plan's JSON for ``pop`` and make it the agent's Plan (raises WireError)."""
    return plan_from_wire(decode_wire_plan(data, pop), allowed, cache)


def plan_from_wire(wire: WirePlan, allowed: Iterable[IPNetwork], cache: SpecCache | None = None) -> Plan:
    """``cache`` (kept by the caller between plans) skips the reader for a spec equal to one
    that already passed it: most of a new plan is the previous one (10,000 VIPs: 0.8 s ->
    0.1 s). It is replaced only when the whole plan is valid."""
    allowed = tuple(allowed)
    previous: SpecCache = cache if cache is not None else {}
    checked: SpecCache = {}
    specs: list[Vip] = []
    intents: dict[str, VipIntent] = {}
    for i, entry in enumerate(wire.vips):
        raw = entry.spec
        name = raw.get("name") if isinstance(raw, dict) else None
        hit = previous.get(name) if isinstance(name, str) else None
        if hit is not None and hit[1] == allowed and hit[0] == raw:
            vip = hit[2]
        else:
            issues = Issues()
            read = read_vip(Node(raw, f"vips[{i}].spec", issues), allowed, dict(DEFAULT_CHECK),
                            StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))
            if issues.items or read is None:
                first = issues.items[0] if issues.items else None
                raise WireError(first.path if first else f"vips[{i}].spec",
                                first.message if first else "invalid VIP")
            vip = read
        checked[vip.name] = (raw, allowed, vip)
        if vip.name in intents:
            raise WireError(f"vips[{i}].spec.name", f"VIP {vip.name!r} listed twice")
        if entry.vip != vip.name:
            raise WireError(f"vips[{i}].name", f"{entry.vip!r} is not the name in its spec ({vip.name!r})")
        if vip.origin(entry.active_origin) is None:
            raise WireError(f"vips[{i}].active_origin",
                            f"{entry.active_origin!r} is not one of the VIP's origin regions")
        specs.append(vip)
        intents[vip.name] = VipIntent(vip.name, entry.wanted, entry.active_origin, entry.drain, entry.reason,
                                      entry.safety_hold)
    if cache is not None:
        cache.clear()
        cache.update(checked)
    return Plan(PlanSource.CONTROLLER, wire.generation, wire.revision, intents, specs=tuple(specs))
