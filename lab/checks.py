"""Judgements on what the lab's daemons answer, as pure functions of their JSON.

Each returns a list of problems (empty: as expected), so a bounded poll can wait for
"no problems" and, on timeout, say which ones were left. The inputs are what the lab
reads: ``vtysh ... json`` (compared as a JSON *subset*, as FRR's topotests do), the
controller's ``/v1/status`` and ``/v1/explain/{vip}``, a parsed scrape (lab.metrics) and
``nft -j list ruleset``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .metrics import Scrape


def json_cmp(actual: Any, expected: Any, where: str = "") -> list[str]:
    """Where ``actual`` does not contain ``expected``: every key of an expected object must
    be in the actual one with a matching value; every item of an expected list must match
    a different item of the actual list (in any order); scalars compare equal."""
    here = where or "."
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            return [f"{here}: expected an object, got {actual!r}"]
        out: list[str] = []
        for key, want in expected.items():
            if key not in actual:
                out.append(f"{where}.{key}: missing")
            else:
                out += json_cmp(actual[key], want, f"{where}.{key}")
        return out
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{here}: expected a list, got {actual!r}"]
        free = list(range(len(actual)))
        out = []
        for i, want in enumerate(expected):
            match = next((j for j in free if not json_cmp(actual[j], want)), None)
            if match is None:
                out.append(f"{where}[{i}]: no item matches {want!r}")
            else:
                free.remove(match)
        return out
    return [] if actual == expected else [f"{here}: {actual!r} != {expected!r}"]


# --- BGP paths ----------------------------------------------------------------------------------
def aspath(*asns: int) -> str:
    """FRR's ``aspath.string`` for a sequence of ASNs."""
    return " ".join(str(a) for a in asns)


def path_subset(peer: str, asns: Sequence[int], communities: Sequence[str] = (),
                med: int | None = None) -> dict[str, Any]:
    """A ``show bgp ... json`` entry holding a path from ``peer`` with these attributes
    (MED only if given: it does not cross an AS boundary)."""
    path: dict[str, Any] = {"peer": {"peerId": peer}, "aspath": {"string": aspath(*asns)}}
    if communities:
        path["community"] = {"string": " ".join(communities)}
    if med is not None:
        path["metric"] = med
    return {"paths": [path]}


def prepended(asn: int, attributes: Mapping[str, Any]) -> list[int]:
    """The AS path an agent in ``asn`` sends with ``attributes`` (a VIP's ``up`` or
    ``draining`` from its spec): its own AS plus ``as_path_prepend`` more."""
    return [asn] * (1 + int(attributes.get("as_path_prepend", 0)))


def has_path_from(entry: Mapping[str, Any] | None, peer: str) -> bool:
    return bool(entry) and any(p.get("peer", {}).get("peerId") == peer for p in (entry or {}).get("paths", []))


# --- the controller -----------------------------------------------------------------------------
def status_problems(status: Mapping[str, Any] | None, base_revision: str, stale_after: float) -> list[str]:
    """/v1/status of a clean controller: the base config, no reload error, no drain, no
    alarm, every POP's report fresh and about the plan it is served."""
    if status is None:
        return ["the controller does not answer /v1/status"]
    out = []
    cfg = status["config"]
    if cfg["revision"] != base_revision:
        out.append(f"config revision {cfg['revision']}, not the base {base_revision}")
    if cfg["last_error"]:
        out.append(f"config error at {cfg['last_error_revision']}: {cfg['last_error']}")
    for p in status["pops"]:
        if p["drained_since"] is not None:
            out.append(f"{p['pop']} drained since {p['drained_since']}")
        if p["report_age"] is None or p["report_age"] >= stale_after:
            out.append(f"{p['pop']}: report age {p['report_age']} (stale after {stale_after} s)")
        if p["reported_plan_generation"] != p["plan_generation"]:
            out.append(f"{p['pop']} reports about plan {p['reported_plan_generation']}, "
                       f"is served {p['plan_generation']}")
    out += [f"alarm {a['kind']} for {a['vip']}" for a in status["alarms"]]
    return out


def explain_problems(explain: Mapping[str, Any] | None, pops: Sequence[str], origin: str) -> list[str]:
    """/v1/explain/{vip}: every POP of ``pops`` is planned to announce, healthy, not
    drained, not held, from ``origin``, and reports it announced."""
    if explain is None:
        return ["the controller does not answer /v1/explain"]
    want = {"wanted": True, "drain": False, "reason": "healthy", "safety_hold": False,
            "active_origin": origin, "announced": True}
    seen = {p["pop"]: p for p in explain["pops"]}
    out = [f"{pop}: not in the VIP's plan" for pop in pops if pop not in seen]
    for pop in pops:
        if pop in seen:
            out += [f"{pop}: {m}" for m in json_cmp(seen[pop], want)]
    return out


# --- the agents ---------------------------------------------------------------------------------
def agent_problems(pop: str, scrape: Scrape, vip: str, neighbor: str) -> list[str]:
    """An agent's scrape: it announces ``vip`` (state up), its BGP session is up and it
    reaches the controller."""
    expect = [("anycast_vip_announced", {"vip": vip}, 1.0), ("anycast_vip_state", {"vip": vip, "state": "up"}, 1.0),
              ("anycast_bgp_neighbor_up", {"neighbor": neighbor}, 1.0), ("anycast_controller_reachable", {}, 1.0)]
    out = []
    for name, labels, value in expect:
        got = scrape.value(name, **labels)
        if got != value:
            out.append(f"{pop}: {name}{labels} = {got}, expected {value}")
    return out


# --- nftables -----------------------------------------------------------------------------------
def drop_rules(ruleset: Mapping[str, Any]) -> list[str]:
    """The rules and chain policies that drop packets in ``nft -j list ruleset``'s answer
    (a scenario's cut that was not undone)."""
    out = []
    for item in ruleset.get("nftables", []):
        if "rule" in item:
            r = item["rule"]
            if any("drop" in e for e in r.get("expr", [])):
                out.append(f"{r['family']} {r['table']} {r['chain']}: rule {r.get('handle')} drops")
        elif "chain" in item and item["chain"].get("policy") == "drop":
            c = item["chain"]
            out.append(f"{c['family']} {c['table']} {c['name']}: policy drop")
    return out


# --- clients ------------------------------------------------------------------------------------
def client_problems(client: str, last: Sequence[Mapping[str, Any]], pop: str, origin: str) -> list[str]:
    """A client's last requests: there are some and each was served via ``pop`` by ``origin``."""
    if not last:
        return [f"{client}: no requests lately"]
    bad = [r for r in last if not (r["ok"] and r["pop"] == pop and r["origin"] == origin)]
    if not bad:
        return []
    r = bad[-1]
    return [f"{client}: {len(bad)}/{len(last)} recent requests not served via {pop} by {origin} "
            f"(last: ok={r['ok']} pop={r['pop']} origin={r.get('origin')})"]


def move_failures(client: str, requests: Sequence[Mapping[str, Any]], moves: int, moved_at: float) -> list[str]:
    """The failed requests of a client whose ingress moved ``moves`` times (its transit
    switched POPs) that the moves do not explain, given it was first served via its new
    POP at ``moved_at``. A request in flight when the path switches can be reset: its
    TCP connection arrives at another POP, whose NAT the origin does not know. The client
    sends one request at a time, so that is at most one per move, and none once the new
    POP serves; anything more is traffic lost to a blackhole."""
    failed = [r for r in requests if not r["ok"]]
    late = [r for r in failed if r["t"] > moved_at]
    if len(failed) <= moves and not late:
        return []
    return [f"{client}: {len(failed)} failed request(s) for {moves} ingress move(s), {len(late)} after it was "
            f"served via the new POP: {[(r['t'], r.get('error')) for r in failed]}"]
