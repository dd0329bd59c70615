"""What a change of desired state would do, per POP: announce, withdraw, move. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .model import PlanResult


@dataclass(frozen=True)
class Change:
    pop: str
    vip: str
    action: str  # announce | withdraw | move | drain | undrain
    detail: str


def diff_plans(current: Mapping[str, Mapping[str, Mapping[str, Any]]], proposed: PlanResult) -> list[Change]:
    """``current``: pop -> vip -> {wanted, active_origin, drain, reason} as served now."""
    changes: list[Change] = []
    pops = sorted(set(current) | set(proposed.pops))
    for pop in pops:
        old = current.get(pop, {})
        new = proposed.pops.get(pop, {})
        for vip in sorted(set(old) | set(new)):
            before, after = old.get(vip), new.get(vip)
            if after is None:
                if before is not None and before["wanted"]:
                    changes.append(Change(pop, vip, "withdraw", "no longer published at this POP"))
                continue
            if before is None or not before["wanted"]:
                if after.wanted:
                    why = "" if after.reason in ("report_stale", "healthy") else f" ({after.reason})"
                    changes.append(Change(pop, vip, "announce",
                                          f"{'newly published' if before is None else 'wanted again'}, "
                                          f"toward {after.active_origin}{why}"))
                continue
            if not after.wanted:
                changes.append(Change(pop, vip, "withdraw", f"{after.reason}: {after.explanation}"))
                continue
            if before["active_origin"] != after.active_origin:
                changes.append(Change(pop, vip, "move", f"from {before['active_origin']} to {after.active_origin}"))
            if bool(before.get("drain")) != after.drain:
                changes.append(Change(pop, vip, "drain" if after.drain else "undrain", after.reason))
    return changes
