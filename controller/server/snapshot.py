"""Everything needed to re-run the planner elsewhere (``anycastctl diff``), as JSON."""

from __future__ import annotations

from typing import Any

from ..policy.model import PopReport
from .core import Controller
from .store import planner_to_json


def snapshot(ctl: Controller) -> dict[str, Any]:
    return {
        "now": ctl.clock(),
        "revision": ctl.desired.revision,
        "reports": [{"pop": r.pop, "received_at": r.received_at, "plan_generation": r.plan_generation,
                     "origins": {v: dict(o) for v, o in r.origins.items()}, "announced": dict(r.announced)}
                    for r in ctl.reports.values()],
        "drains": dict(ctl.persisted.drains),
        "dials": {region: d.pct for region, d in ctl.persisted.dials.items()},  # the operator's (anycastctl dial)
        "planner": planner_to_json(ctl.persisted.planner),
        "plans": {pop: {name: {"wanted": e.item.wanted, "reason": e.item.reason, "active_origin": e.item.active_origin,
                               "drain": e.item.drain, "safety_hold": e.item.safety_hold}
                        for name, e in sorted(served.entries.items())}
                  for pop, served in ctl.served.items()},
    }


def reports_from_snapshot(data: dict[str, Any]) -> dict[str, PopReport]:
    return {r["pop"]: PopReport(r["pop"], float(r["received_at"]), int(r["plan_generation"]),
                                r["origins"], r["announced"]) for r in data["reports"]}


def persistence_status(ctl: Controller) -> dict[str, Any]:
    """``/v1/status``'s persistence section: is the state being saved, what failed."""
    p = ctl.persistence
    return {"ok": p.ok, "state_dir": p.state_dir, "last_error": p.last_error, "last_error_at": p.last_error_at or None,
            "errors": {str(op): n for op, n in p.errors.items()}, "recovered_without": list(p.recovered)}
