"""What the controller must not forget across restarts: drains, per-POP plan generations,
and the planner's memory (active origins, failback timers, flap history). One JSON file,
written atomically."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..policy.model import STEADY, PlannerState, PopVipMemory, VipMemory

log = logging.getLogger("controller.server")
FILENAME = "controller-state.json"


@dataclass
class Persisted:
    drains: dict[str, float] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    planner: PlannerState = field(default_factory=PlannerState.initial)


def save(state_dir: str, p: Persisted) -> None:
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, FILENAME)
    data = {"version": 1, "drains": p.drains, "generations": p.generations, **planner_to_json(p.planner)}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, sort_keys=True))  # dumps: C encoder; dump() to a file is pure Python
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(state_dir: str) -> Persisted:
    path = os.path.join(state_dir, FILENAME)
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
        return Persisted({k: float(v) for k, v in data["drains"].items()},
                         {k: int(v) for k, v in data["generations"].items()}, planner_from_json(data))
    except FileNotFoundError:
        return Persisted()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable controller state %s: %s (drains and timers start afresh)", path, exc)
        return Persisted()


def planner_to_json(state: PlannerState) -> dict[str, Any]:
    """Pairs in the steady state (healthy, no history: most of a large fleet) are listed by
    name under ``steady`` (POP -> VIPs), the others in full under ``pop_vips``."""
    steady: dict[str, list[str]] = {}
    others = []
    for (pop, vip), m in state.pop_vips.items():
        if m is STEADY:
            steady.setdefault(pop, []).append(vip)
        else:
            others.append({"pop": pop, "vip": vip, "verdict": m.verdict, "flaps": list(m.flaps),
                           "dampened_until": m.dampened_until, "penalty": m.penalty,
                           "quiet_since": m.quiet_since, "withdrawn": m.withdrawn, "down_since": m.down_since})
    return {
        "vips": {name: {"active": m.active, "active_since": m.active_since,
                        "healthy_since": dict(m.healthy_since), "withdrawals": list(m.withdrawals)}
                 for name, m in state.vips.items()},
        "steady": steady,
        "pop_vips": others,
    }


def planner_from_json(data: dict[str, Any]) -> PlannerState:
    """Raises KeyError/ValueError/TypeError on a malformed document."""
    vips = {name: VipMemory(m["active"], float(m["active_since"]),
                            {r: float(t) for r, t in m["healthy_since"].items()},
                            tuple(float(t) for t in m["withdrawals"]))
            for name, m in data["vips"].items()}
    pop_vips = {(m["pop"], m["vip"]): PopVipMemory(m["verdict"], tuple(float(t) for t in m["flaps"]),
                                                   float(m["dampened_until"]), int(m["penalty"]),
                                                   float(m["quiet_since"]), bool(m["withdrawn"]),
                                                   _optional_float(m.get("down_since")))
                for m in data["pop_vips"]}
    for pop, names in data.get("steady", {}).items():  # absent in files written before it existed
        for vip in names:
            pop_vips[(str(pop), str(vip))] = STEADY
    return PlannerState(vips, pop_vips)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
