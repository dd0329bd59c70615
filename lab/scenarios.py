"""The lab's scenarios: each breaks something while clients send requests, asserts what a
user would notice, and returns its timings for the JSON report.

Every scenario starts by checking, with a bounded poll, that the lab is clean
(``assert_clean``): every POP announces the VIP with its up attributes as the transit
routers see them, no drain, no alarm, every report fresh, the base config revision
served, no nftables drop rule anywhere, every client served via its nearest POP by the
primary origin. Its breakage is undone in a ``finally`` (or a ``with``), so a scenario that
fails leaves no cut, dead daemon or config commit behind for the next one. Assertions read
structured data only: the controller's JSON (/v1/status, /v1/explain, /v1/plans),
``vtysh ... json`` subsets (lab.checks) and scrapes parsed by prometheus_client's parser
(lab.metrics), never log lines.

Times are wall-clock (unix) seconds; "FIB change" is when the client's transit router
starts sending the VIP elsewhere (its BGP best path, polled every 20 ms through bgpd's
vty). Timings are reported, never asserted against a bound.

Add one: write ``def my_case(f: Fleet) -> dict`` below (``assert_clean``, break inside a
``try/finally`` or ``with``, ``measure``, assert, ``assert_clean``), append it to
SCENARIOS, and it runs in ``make test`` and the report.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .checks import (agent_problems, aspath, client_problems, drop_rules, explain_problems, has_path_from, json_cmp,
                     move_failures, path_subset, prepended, status_problems)
from .fleet import AGENT_LINK, AGENT_LINK6, CONTROLLER_PORT, LAB_TOKENS, Fleet, host_prefix
from .fib import RouteWatcher
from .metrics import Scrape, parse
from .multi_pop import git
from .netns import LabError
from .poll import wait_for, wait_for_equal
from .topology import Pop, Topology

VIP = "198.51.100.10"  # game-global: published at every POP, origins us-west then eu-central
NAME = "game-global"
PRIMARY, SECONDARY = "us-west", "eu-central"
OPERATOR_TOKEN = LAB_TOKENS / "operator.token"


def lab_controller_config(config_dir: Path) -> None:
    """The example controller config with the lab's timers: scenarios break and heal the
    same POPs every few seconds, which the example's dampening (3 changes a minute) and
    withdrawal rate limit (2 a minute) would rightly hold down; both have unit tests. A
    3 s drain and a 5 s failback hold-down keep the run short."""
    path = config_dir / "controller.yaml"
    data = yaml.safe_load(path.read_text())
    pol = data["policy"]
    pol["dampening"]["flaps"] = 1000
    pol["safety"]["withdraw_rate"] = {"max": 1000, "window": 60}
    pol["drain"]["drain_time"] = 3
    pol["failover"]["failback_hold_down"] = 5
    # Config changes (s9, s10): 6 s of bake per wave instead of 30.
    data["change"] = {"rollout": {"bake": 6}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# --- the clean state ----------------------------------------------------------------------------
def base_commit(f: Fleet) -> str:
    """The desired-state repository's first commit (Fleet.prepare_controller_config's)."""
    r = subprocess.run(["git", "-C", str(f.config_dir), "rev-list", "--max-parents=0", "HEAD"],
                       capture_output=True, text=True, check=True, timeout=10)
    return r.stdout.split()[0]


def head_commit(f: Fleet) -> str:
    r = subprocess.run(["git", "-C", str(f.config_dir), "rev-parse", "HEAD"],
                       capture_output=True, text=True, check=True, timeout=10)
    return r.stdout.strip()


def report_stale_after(f: Fleet) -> float:
    data = yaml.safe_load((f.config_dir / "controller.yaml").read_text())
    return float(data["policy"]["safety"]["report_stale_after"])


def up_paths(f: Fleet, pop: Pop, attributes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON subsets of the VIP's BGP entry at ``pop``'s transit and at its router when
    the POP's agent announces it with ``attributes`` (the spec's ``up`` or ``draining``)."""
    asns = prepended(f.topo.agent_asn, attributes)
    comms = attributes.get("communities", [])
    return (path_subset(pop.uplink[1], [pop.asn, *asns], comms),
            path_subset(AGENT_LINK[1], asns, comms, attributes.get("med")))


def clean_problems(f: Fleet) -> list[str]:
    """What keeps the lab from the state every scenario starts from (empty: clean)."""
    pops = f.topo.pops
    out = [f"{p.name}: the agent is not running" for p in pops if p.name not in f.agents or not f.agents[p.name].running()]
    if f.controller is None or f.controller.poll() is not None:
        out.append("the controller is not running")
    out += [f"{o.node}: backends stopped" for o in f.topo.origins if o.node not in f.backends]
    out += status_problems(f.status(), base_commit(f)[:12], report_stale_after(f))
    explain = f.explain(NAME)
    out += explain_problems(explain, [p.name for p in pops], PRIMARY)
    up = explain["spec"]["attributes"]["up"] if explain else None
    for p in pops:
        if up is not None:
            at_transit, at_router = up_paths(f, p, up)
            out += [f"{p.transit}, path from {p.name}: {m}"
                    for m in json_cmp(f.routers[p.transit].bgp_route(f"{VIP}/32") or {}, at_transit)]
            out += [f"{p.router}, path from its agent: {m}"
                    for m in json_cmp(f.routers[p.router].bgp_route(f"{VIP}/32") or {}, at_router)]
        out += agent_problems(p.name, parse(f.agent_metrics(p.name)), NAME, AGENT_LINK[0])
    now = time.time()
    for c in f.topo.clients:
        if (pop := f.ingress(c, VIP)) != f.nearest(c):
            out.append(f"{c.transit} sends {c.node} to {pop}, not {f.nearest(c)}")
        out += client_problems(c.node, f.requests(c.node, now - 0.5), f.nearest(c), PRIMARY)
    for name, ns in f.nodes.items():
        r = ns.run(["nft", "-j", "list", "ruleset"], check=False)
        if r.returncode != 0:
            out.append(f"{name}: nft list ruleset failed: {r.stderr.strip()}")
        else:
            out += [f"{name}: {d}" for d in drop_rules(json.loads(r.stdout))]
    return out


def assert_clean(f: Fleet, timeout: float = 60.0) -> None:
    """Wait (bounded) until the lab is clean; a timeout lists what was still wrong."""
    none: list[str] = []
    wait_for_equal(lambda: clean_problems(f), none, timeout, interval=0.25, desc="a clean lab")


def steady(f: Fleet, timeout: float = 60.0) -> None:
    """The steady state every scenario starts from and leaves (kept for the demo's name)."""
    assert_clean(f, timeout)


def answered_status(f: Fleet, timeout: float = 30.0) -> dict[str, Any]:
    """/v1/status once the controller answers: a read asserted on must not take a slow or
    missed answer (None) for an empty one."""
    return wait_for(f.status, timeout, desc="/v1/status answered")


def answered_explain(f: Fleet, vip_name: str, timeout: float = 30.0) -> dict[str, Any]:
    """/v1/explain/{vip} once the controller answers (see answered_status)."""
    return wait_for(lambda: f.explain(vip_name), timeout, desc=f"/v1/explain/{vip_name} answered")


def answered_metrics(f: Fleet, timeout: float = 30.0) -> Scrape:
    """The controller's scrape, parsed, once it answers (an empty one has no samples at all)."""
    def scrape() -> Scrape | None:
        s = parse(f.controller_metrics())
        return s if s.names() else None
    return wait_for(scrape, timeout, desc="the controller's metrics answered")


def pop_item(explain: dict[str, Any] | None, pop: str) -> dict[str, Any] | None:
    """The POP's entry in /v1/explain/{vip} (None if it is not planned there)."""
    return next((p for p in (explain or {}).get("pops", []) if p["pop"] == pop), None)


# --- observing ------------------------------------------------------------------------------
def _slim(entry: dict[str, Any] | None) -> dict[str, Any]:
    """What IngressWatch keeps of a BGP entry: each path's peer, AS path and communities."""
    return {"paths": [{"peer": {"peerId": p.get("peer", {}).get("peerId")},
                       "aspath": {"string": p.get("aspath", {}).get("string", "")},
                       "community": {"string": p.get("community", {}).get("string", "")}}
                      for p in (entry or {}).get("paths", [])]}


def bgp_session_drops(f: Fleet) -> dict[tuple[str, str], tuple[int, str]]:
    """(router, peer) -> (connections dropped so far, the last error code/subcode and
    reason), for every BGP session of the POP routers and transits ({} for a router that
    does not answer)."""
    out: dict[tuple[str, str], tuple[int, str]] = {}
    for node in [p.router for p in f.topo.pops] + [t.node for t in f.topo.transits]:
        try:
            info = f.routers[node].vtysh_json("show bgp neighbors json")
        except (LabError, OSError, ValueError):
            continue
        for peer, nb in info.items():
            if isinstance(nb, dict) and "connectionsDropped" in nb:
                out[(node, peer)] = (int(nb["connectionsDropped"]),
                                     f"{nb.get('lastErrorCodeSubcode', '-')} {nb.get('lastNotificationReason', '')}".strip())
    return out


class IngressWatch:
    """Polls each client's transit for the POP it sends the VIP to, and each transit's
    paths for the VIP; records every change."""

    def __init__(self, f: Fleet, vip: str = VIP) -> None:
        self.f, self.vip = f, vip
        self.changes: list[tuple[float, str, str | None]] = []  # (t, client, pop)
        self.paths: list[tuple[float, str, dict[str, Any]]] = []  # (t, transit, slim entry)
        self.drops: dict[tuple[str, str], tuple[int, str]] = {}  # bgp_session_drops when it began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last: dict[str, str | None] = {}
        last_paths: dict[str, dict[str, Any]] = {}
        while not self._stop.is_set():
            for c in self.f.topo.clients:
                try:
                    pop = self.f.ingress(c, self.vip)
                except (LabError, OSError):
                    continue
                if c.node not in last or last[c.node] != pop:
                    last[c.node] = pop
                    self.changes.append((time.time(), c.node, pop))
            for t in self.f.topo.transits:
                try:
                    slim = _slim(self.f.routers[t.node].bgp_route(host_prefix(self.vip)))
                except (LabError, OSError):
                    continue
                if last_paths.get(t.node) != slim:
                    last_paths[t.node] = slim
                    self.paths.append((time.time(), t.node, slim))
            self._stop.wait(0.02)

    def first_change(self, client: str, since: float) -> tuple[float, str | None] | None:
        """The first time after ``since`` the client's transit sends it somewhere else."""
        before = [p for t, c, p in self.changes if c == client and t < since]
        return next(((t, p) for t, c, p in self.changes
                     if c == client and t >= since and (not before or p != before[-1])), None)

    def first_seen(self, transit: str, subset: dict[str, Any], since: float) -> float | None:
        """When ``transit``'s entry for the VIP first contained ``subset`` after ``since``
        (a change recorded before ``since`` counts from ``since`` if it still held then)."""
        held = [t for t, n, e in self.paths if n == transit and t < since]
        current = next((e for t, n, e in reversed(self.paths) if n == transit and t < since), None)
        if held and current is not None and not json_cmp(current, subset):
            return since
        return next((t for t, n, e in self.paths if n == transit and t >= since and not json_cmp(e, subset)), None)

    def sessions_dropped(self) -> str:
        """The BGP sessions of the POP routers and transits that dropped since the watch
        began (a flap at the transits that a dropped session explains is the lab's, e.g.
        BFD 100 ms x 3 on a starved machine, not the code's), for an assertion's message."""
        now = bgp_session_drops(self.f)
        dropped = [f"{node} <-> {peer}: {n - self.drops.get((node, peer), (0, ''))[0]} drop(s), last error {why}"
                   for (node, peer), (n, why) in sorted(now.items()) if n > self.drops.get((node, peer), (0, ""))[0]]
        return "BGP sessions dropped meanwhile: " + ("; ".join(dropped) if dropped else "none")

    def __enter__(self) -> IngressWatch:
        self.drops = bgp_session_drops(self.f)
        self._thread.start()
        wait_for(lambda: {c for _, c, _ in self.changes} == {c.node for c in self.f.topo.clients}, 10,
                 interval=0.01, desc="a first sample of every transit")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def client_stats(f: Fleet, client: str, since: float, until: float, family: int = 4) -> dict[str, Any]:
    """Requests, failures, the outage window (first failure to the first success after the
    last failure) and where the requests went (to the IPv6 VIP with ``family=6``)."""
    rs = [r for r in f.requests(client, since, family) if r["t"] <= until]
    failed = [r for r in rs if not r["ok"]]
    out: dict[str, Any] = {"requests": len(rs), "failed": len(failed), "outage_s": 0.0,
                           "served_by": sorted({f"{r['pop']}/{r['origin']}" for r in rs if r["ok"]})}
    if failed:
        after = next((r for r in rs if r["ok"] and r["t"] > failed[-1]["t"]), None)
        end = after["t"] if after else until
        out["outage_s"] = round(end - failed[0]["t"], 3)
    return out


def unserved(stats: dict[str, dict[str, Any]], clients: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Of ``client_stats`` per client (``clients``, else all), those that lost a request or
    sent none: an empty window would prove nothing."""
    return {c: s for c, s in stats.items() if (clients is None or c in clients) and (not s["requests"] or s["failed"])}


def first_success_via(f: Fleet, client: str, since: float, pops: set[str], family: int = 4) -> float | None:
    return next((r["t"] for r in f.requests(client, since, family) if r["ok"] and r["pop"] in pops), None)


def ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 1)


@contextmanager
def nft_drop(f: Fleet, node: str, rule_body: str, table: str = "labcut") -> Iterator[None]:
    """A temporary nftables table in ``node`` (dropped on exit, whatever happens)."""
    ns = f.nodes[node]
    ns.run(["nft", "-f", "-"], input=f"table inet {table} {{\n{rule_body}\n}}\n")
    try:
        yield
    finally:
        ns.run(["nft", "delete", "table", "inet", table], check=False)


CUT_CHECKS = " chain out { type filter hook output priority 0; tcp dport { 8080, 8081 } drop; }"
SILENT = "\n".join(f" chain {h} {{ type filter hook {h} priority 0; iifname != \"lo\" drop; }}"
                   if h != "output" else f" chain {h} {{ type filter hook {h} priority 0; oifname != \"lo\" drop; }}"
                   for h in ("input", "forward", "output"))


def agent_value(f: Fleet, pop: str, name: str, **labels: str) -> float | None:
    """One sample of the POP agent's scrape, parsed (None if absent or not answering)."""
    return parse(f.agent_metrics(pop)).value(name, **labels)


ONE: float | None = 1.0  # expected sample values, typed as what agent_value returns
ZERO: float | None = 0.0


# --- the scenarios -----------------------------------------------------------------------------
def s1_steady_state(f: Fleet) -> dict[str, Any]:
    """Each client goes through its nearest POP; every POP announces; the active origin serves."""
    assert_clean(f)
    t0 = time.time()
    time.sleep(2)
    stats = {c.node: client_stats(f, c.node, t0, time.time()) for c in f.topo.clients}
    for c in f.topo.clients:
        s = stats[c.node]
        assert s["failed"] == 0 and s["served_by"] == [f"{f.nearest(c)}/{PRIMARY}"], f"{c.node}: {s}"
    assert all(f.announced(p.name, VIP) for p in f.topo.pops)
    return {"clients": stats}


def _pop_leaves(f: Fleet, pop: str, client: str, t_break: float, watch: IngressWatch,
                timeout: float = 15.0, family: int = 4) -> dict[str, Any]:
    """Wait until ``client`` is served via another POP; the timings of the move."""
    others = {p.name for p in f.topo.pops} - {pop}
    wait_for(lambda: first_success_via(f, client, t_break, others, family) is not None, timeout,
             desc=f"{client} served via another POP than {pop}")
    fib = watch.first_change(client, t_break)
    moved = first_success_via(f, client, t_break, others, family)
    return {"fib_change_ms": ms(t_break, fib[0] if fib else None), "new_pop": fib[1] if fib else None,
            "first_success_via_new_pop_ms": ms(t_break, moved)}


def s2_backend_failure_seen_by_one_pop(f: Fleet) -> dict[str, Any]:
    """sjc's checks fail (its backbone path to the backends' check ports is cut): sjc
    withdraws after the controller confirms (reason ``backend_down`` in the plan and the
    agent's metrics); c-na moves to the next POP; nobody else moves."""
    assert_clean(f)
    withdrawals = {"vip": NAME, "action": "withdraw", "reason": "backend_down"}
    before = parse(f.agent_metrics("sjc")).total("anycast_announcement_changes_total", **withdrawals)
    with IngressWatch(f) as watch:
        t0 = time.time()
        with nft_drop(f, f.topo.pop("sjc").agent, CUT_CHECKS):
            moved = _pop_leaves(f, "sjc", "c-na", t0, watch)
            wait_for(lambda: not f.announced("sjc", VIP), 10, desc="sjc withdrew")
            t1 = time.time()
            # The plan keeps wanting it (sjc's agent withdraws on its own verdict, now confirmed).
            planned = wait_for(lambda: pop_item(f.explain(NAME), "sjc"), 10, desc="sjc in /v1/explain")
            assert not json_cmp(planned, {"reason": "backend_down", "active_origin": PRIMARY}), \
                f"/v1/explain for sjc while its checks fail: {planned}"
            wait_for_equal(lambda: agent_value(f, "sjc", "anycast_vip_reason", vip=NAME, reason="backend_down"),
                           ONE, 10, desc="sjc's agent exports reason backend_down")
            assert agent_value(f, "sjc", "anycast_vip_state", vip=NAME, state="withdrawn") == 1.0
            time.sleep(0.5)
        stats = {c.node: client_stats(f, c.node, t0, t1) for c in f.topo.clients}
    assert_clean(f)
    after = parse(f.agent_metrics("sjc")).total("anycast_announcement_changes_total", **withdrawals)
    assert after > before, f"anycast_announcement_changes_total{withdrawals} went from {before} to {after}"
    assert not unserved(stats, ("c-eu", "c-ap")), f"clients of other POPs failed (or sent nothing): {stats}"
    return {**moved, "clients": stats}


def s3_pop_crash(f: Fleet) -> dict[str, Any]:
    """fra's ExaBGP and agent are killed: the BGP session drops, fra's router withdraws."""
    assert_clean(f)
    agent = f.agents["fra"]
    rtr = f.routers[f.topo.pop("fra").router]
    try:
        with IngressWatch(f) as watch:
            t0 = time.time()
            agent_pid = agent.agent_pid()
            if agent.proc is not None:
                agent.proc.send_signal(signal.SIGKILL)  # ExaBGP (launch exec'd into it)
            if agent_pid is not None:
                try:
                    os.kill(agent_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if agent.proc is not None:
                agent.proc.wait(5)
            moved = _pop_leaves(f, "fra", "c-eu", t0, watch)
            state = wait_for(lambda: (s := rtr.neighbor_state(AGENT_LINK[1])) != "Established" and s, 10,
                             desc="rtr-fra's session to its agent down")
            assert not has_path_from(rtr.bgp_route(f"{VIP}/32"), AGENT_LINK[1]), "rtr-fra still has the agent's path"
            time.sleep(0.5)
            stats = client_stats(f, "c-eu", t0, time.time())
    finally:
        if not agent.running():
            f.start_agent("fra")
    assert_clean(f)
    return {**moved, "session_state": state, "c-eu": stats}


def s3b_silent_pop_failure(f: Fleet) -> dict[str, Any]:
    """fra's router goes silent (nftables drops everything, no reset): its transit's BFD
    (100 ms x 3) takes the session down and the routes with it; the transit's BGP says so
    (NOTIFICATION Cease/BFD Down, RFC 9384: 06/0A), not a hold-timer expiry."""
    assert_clean(f)
    pop = f.topo.pop("fra")
    transit = f.routers[pop.transit]
    peer = pop.uplink[1]

    def neighbor() -> dict[str, Any]:
        info: dict[str, Any] = transit.vtysh_json(f"show bgp neighbors {peer} json")[peer]
        return info

    dropped_before = neighbor()["connectionsDropped"]
    with IngressWatch(f) as watch:
        t0 = time.time()
        with nft_drop(f, pop.router, SILENT):
            moved = _pop_leaves(f, "fra", "c-eu", t0, watch)
            nb = wait_for(lambda: (n := neighbor())["connectionsDropped"] > dropped_before and n, 10,
                          desc=f"{pop.transit}'s session to fra dropped")
            bfd = [p for p in json.loads(transit.vtysh("show bfd peers json")) if p["peer"] == peer]
            time.sleep(0.5)
            stats = client_stats(f, "c-eu", t0, time.time())
    assert_clean(f)
    assert not json_cmp(nb, {"lastErrorCodeSubcode": "060A", "peerBfdInfo": {"status": "Down"}}), \
        f"{pop.transit}'s session to fra went down, but not by BFD: " + json.dumps(
            {k: nb.get(k) for k in ("bgpState", "lastErrorCodeSubcode", "lastNotificationReason", "peerBfdInfo")})
    assert not json_cmp(bfd, [{"status": "down", "diagnostic": "control detection time expired"}]), \
        f"{pop.transit}'s BFD peer {peer} while fra was silent: {bfd}"
    return {**moved, "c-eu": stats}


def s4_origin_failover(f: Fleet) -> dict[str, Any]:
    """us-west's backends stop for every POP: the controller moves the VIP to eu-central;
    clients keep being served (by eu-central) after a short outage. Failback after the
    primary stays healthy for the hold-down."""
    assert_clean(f)
    t0 = time.time()
    served: dict[str, float | None] = {c.node: None for c in f.topo.clients}
    try:
        f.stop_backends("usw")

        def all_on_secondary() -> bool:
            for c in f.topo.clients:
                served[c.node] = served[c.node] or next(
                    (r["t"] for r in f.requests(c.node, t0) if r["ok"] and r["origin"] == SECONDARY), None)
            return all(served.values())

        wait_for(all_on_secondary, 20, desc=f"every client served by {SECONDARY}")
        time.sleep(0.5)
        stats = {c.node: client_stats(f, c.node, t0, time.time()) for c in f.topo.clients}
        wait_for(lambda: (e := f.explain(NAME)) and not json_cmp(
            e["pops"], [{"pop": p.name, "wanted": True, "active_origin": SECONDARY} for p in f.topo.pops]) and e,
            10, desc=f"/v1/explain: every POP announces from {SECONDARY}")
        # Moved, not withdrawn: once planned on eu-central, every POP announces it. (An agent
        # whose controller answers later than its confirm_timeout may rightly withdraw for a
        # moment before, as in s13: an instant check right after the clients moved would take
        # that moment for a withdrawal.)
        wait_for(lambda: all(f.announced(p.name, VIP) for p in f.topo.pops), 10,
                 desc=f"every POP announces {NAME} from {SECONDARY} (a POP withdrew instead of moving it)")
        wait_for_equal(lambda: parse(f.controller_metrics()).value(
            "anycast_controller_active_origin", vip=NAME, origin=SECONDARY), ONE, 10,
            desc=f"anycast_controller_active_origin{{origin={SECONDARY}}} = 1")
    finally:
        t_back = time.time()
        if "usw" not in f.backends:
            f.start_backends("usw")
    assert_clean(f)  # failback after the hold-down (5 s in the lab)
    return {"first_success_on_eu_central_ms": {c: ms(t0, t) for c, t in served.items()}, "clients": stats,
            "failback_after_restart_s": round(time.time() - t_back, 2)}


def s5_controller_down(f: Fleet) -> dict[str, Any]:
    """The controller stops: agents keep their plans (nothing moves); a backend failure at
    sjc is still withdrawn locally, without waiting for a controller that is not there."""
    assert_clean(f)
    f.stop_controller()
    try:
        wait_for_equal(lambda: agent_value(f, "sjc", "anycast_controller_reachable"), ZERO, 40,
                       desc="sjc's agent noticed the controller is gone")
        assert all(f.announced(p.name, VIP) for p in f.topo.pops), "an agent withdrew when the controller stopped"
        with IngressWatch(f) as watch:
            t0 = time.time()
            with nft_drop(f, f.topo.pop("sjc").agent, CUT_CHECKS):
                moved = _pop_leaves(f, "sjc", "c-na", t0, watch)
                wait_for_equal(lambda: agent_value(f, "sjc", "anycast_vip_announced", vip=NAME), ZERO, 10,
                               desc="sjc's agent exports game-global withdrawn")
                reason = [s.labels["reason"] for s in parse(f.agent_metrics("sjc")).find(
                    "anycast_vip_reason", vip=NAME) if s.value == 1.0]
                time.sleep(0.5)
                stats = client_stats(f, "c-na", t0, time.time())
    finally:
        if f.controller is None:
            f.start_controller()
    assert_clean(f)  # includes every agent reaching the controller again
    assert reason == ["backend_down"], f"sjc's agent withdrew alone with reason {reason}"
    return {**moved, "local_reason": reason, "c-na": stats}


def s6_safety_checks_down_everywhere(f: Fleet) -> dict[str, Any]:
    """Every health check fails at once (their port is cut at every agent host) while client
    traffic still flows: the VIP stays announced everywhere and on its primary origin (broken
    checks prove no failover target healthy: policy/origins.py), the controller's alarm (in
    /v1/status and its metrics) and the Prometheus alert (ops/prometheus/alerts.yml) fire,
    no client fails and every client is served by us-west only."""
    assert_clean(f)
    t0 = time.time()
    alarm = {"kind": "checks_down_everywhere", "vip": NAME}
    with nft_drop(f, f.topo.pop("sjc").agent, CUT_CHECKS), nft_drop(f, f.topo.pop("fra").agent, CUT_CHECKS), \
            nft_drop(f, f.topo.pop("sin").agent, CUT_CHECKS):
        missing: list[str] = []
        moved: list[float] = []  # when the controller's active origin was not us-west
        alarm_at = status_alarm_at = firing_at = None

        def watching() -> bool:
            """8 s of nothing withdrawn, and on (bounded: a hung alarm fails, it is not
            timed) until the alarm and the alert have been seen."""
            seen = alarm_at and status_alarm_at and (firing_at or not f.prometheus)
            return time.time() - t0 < 8 or (not seen and time.time() - t0 < 60)

        while watching():
            missing += [p.name for p in f.topo.pops if not f.announced(p.name, VIP)]
            metrics = parse(f.controller_metrics())
            # (an empty scrape is a slow controller, not a move: only an answer counts)
            if metrics.names() and metrics.value("anycast_controller_active_origin", vip=NAME, origin=PRIMARY) != 1.0:
                moved.append(time.time())
            if alarm_at is None and metrics.value("anycast_controller_alarm", **alarm) == 1.0:
                alarm_at = time.time()
            if status_alarm_at is None and not json_cmp((f.status() or {}).get("alarms", []), [alarm]):
                status_alarm_at = time.time()
            if f.prometheus and firing_at is None and f.prometheus_query(
                    'ALERTS{alertname="AnycastChecksDownEverywhere",alertstate="firing"}'):
                firing_at = time.time()
            time.sleep(0.05)
        t1 = time.time()
    stats = {c.node: client_stats(f, c.node, t0, t1) for c in f.topo.clients}
    assert not missing, f"withdrawn at {sorted(set(missing))} although only the checks failed"
    assert alarm_at is not None, "anycast_controller_alarm{kind=checks_down_everywhere} never went to 1"
    assert status_alarm_at is not None, "/v1/status never listed the checks_down_everywhere alarm"
    assert all(s["failed"] == 0 for s in stats.values()), f"clients failed: {stats}"
    # (each client sent requests in the window: an empty window would prove nothing)
    assert all(s["requests"] > 0 and {o.split("/")[1] for o in s["served_by"]} == {PRIMARY}
               for s in stats.values()), f"clients not served by {PRIMARY} only: {stats}"
    assert not moved, f"the active origin left {PRIMARY} {ms(t0, moved[0])} ms into the cut"
    if f.prometheus:
        assert firing_at is not None, "the lab's Prometheus did not fire AnycastChecksDownEverywhere"
    assert_clean(f)
    return {"alarm_after_ms": ms(t0, alarm_at), "status_alarm_after_ms": ms(t0, status_alarm_at),
            "alert_firing_after_ms": ms(t0, firing_at), "clients": stats}


def s7_publish_domain_change(f: Fleet) -> dict[str, Any]:
    """A commit removes sin from the VIP's publish domains: sin withdraws (its plan no
    longer has the VIP), c-ap moves, and sjc and fra never stop announcing. ``git revert``
    brings sin back."""
    assert_clean(f)
    base = base_commit(f)

    def publish(pops: list[str]) -> Callable[[Any], None]:
        def edit(data: Any) -> None:
            next(v for v in data["vips"] if v["name"] == NAME)["publish"] = pops
        return edit

    try:
        with IngressWatch(f) as watch:
            f.edit_controller_yaml("vips.yaml", publish(["sjc", "fra"]))
            t0 = time.time()
            f.commit(f"{NAME}: not at sin")
            kept = True
            deadline = time.monotonic() + 15
            while f.announced("sin", VIP):
                kept = kept and f.announced("sjc", VIP) and f.announced("fra", VIP)
                assert time.monotonic() < deadline, "sin still announces 15 s after the commit"
                time.sleep(0.05)
            withdrawn = time.time()
            moved = _pop_leaves(f, "sin", "c-ap", t0, watch)
            time.sleep(0.5)
            stats = {c.node: client_stats(f, c.node, t0, time.time()) for c in f.topo.clients}
            assert kept and f.announced("sjc", VIP) and f.announced("fra", VIP), "sjc or fra flapped during the change"
            assert not unserved(stats, ("c-na", "c-eu")), stats
            # The controller at the commit, then sin's plan. The plan's own revision is the one
            # it last changed at: the commit's, or the working tree's "+dirty" one when the
            # edit was seen before the commit (same content, so the commit is no new plan).
            revision = head_commit(f)[:12]
            wait_for(lambda: (answered_status(f).get("config") or {}).get("revision") == revision, 10,
                     desc=f"the controller at revision {revision}")
            def without() -> dict[str, Any] | None:
                p = f.plan("sin")
                return p if p is not None and NAME not in {v["name"] for v in p["vips"]} else None
            plan = wait_for(without, 10, desc=f"sin's plan without {NAME}")
            assert plan["revision"] == revision or plan["revision"].startswith(f"{base[:12]}+dirty."), plan["revision"]
            assert pop_item(answered_explain(f, NAME), "sin") is None, "/v1/explain still plans the VIP at sin"
            git(f.config_dir, "revert", "--no-edit", "HEAD")
            wait_for(lambda: f.announced("sin", VIP), 15, desc="sin announces again after the revert")
    finally:
        # Back to the base commit itself (the revert's content, the base's revision), also
        # when the scenario failed between its two commits.
        if head_commit(f) != base:
            git(f.config_dir, "reset", "-q", "--hard", base)
    assert_clean(f)
    return {"commit_to_withdrawn_ms": ms(t0, withdrawn), **moved, "clients": stats}


def _anycastctl(f: Fleet, *args: str) -> str:
    exe = str(Path(sys.executable).parent / "anycastctl")
    url = f"https://{f.topo.controller_address}:{CONTROLLER_PORT}"
    r = f.nodes[f.topo.controller_node].run([exe, *args, "--url", url, "--token-file", str(OPERATOR_TOKEN)],
                                             check=False, timeout=15, env={**os.environ, "SSL_CERT_FILE": str(f.tls.ca)})
    if r.returncode != 0:
        raise LabError(f"anycastctl {' '.join(args)} failed: {r.stdout}{r.stderr}")
    return r.stdout


def s8_drain(f: Fleet) -> dict[str, Any]:
    """``anycastctl drain fra``: fra announces less preferred (MED, AS-path prepend and the
    draining communities, as its transit sees them), its clients leave, then (3 s later in
    the lab) it withdraws. Nothing is blackholed: other clients lose nothing, and c-eu at
    most the one request in flight when its transit switched POPs (lab.checks.move_failures)."""
    assert_clean(f)
    pop = f.topo.pop("fra")
    explain = f.explain(NAME)
    assert explain is not None
    draining_at_transit, _ = up_paths(f, pop, explain["spec"]["attributes"]["draining"])
    with IngressWatch(f) as watch:
        t0 = time.time()
        _anycastctl(f, "drain", "fra")
        try:
            status = answered_status(f)
            drained = [p for p in status.get("pops", []) if p["pop"] == "fra"]
            assert drained and drained[0]["drained_since"] is not None, f"/v1/status after the drain: {drained}"
            moved = _pop_leaves(f, "fra", "c-eu", t0, watch)
            wait_for(lambda: not f.announced("fra", VIP), 15, desc="fra withdrawn after the drain time")
            withdrawn = time.time()
            time.sleep(0.5)
            until = time.time()
            stats = {c.node: client_stats(f, c.node, t0, until) for c in f.topo.clients}
        finally:
            _anycastctl(f, "undrain", "fra")
    assert_clean(f)
    fib = watch.first_change("c-eu", t0)
    assert fib is not None and fib[0] < withdrawn, "traffic left fra only when the route was withdrawn"
    seen = watch.first_seen(pop.transit, draining_at_transit, t0)
    assert seen is not None and seen < withdrawn, \
        f"{pop.transit} never saw fra's path with the draining attributes before the withdrawal: {draining_at_transit}"
    lost = drain_losses(f, watch, "fra", "c-eu", stats, t0, until)
    assert not lost, f"requests lost during the drain: {lost}"
    return {**moved, "draining_attributes_seen_ms": ms(t0, seen), "withdrawn_ms": ms(t0, withdrawn), "clients": stats}


API_VIP, API_NAME = "198.51.100.20", "api-eu"  # published at fra and sjc


def planned_pairs(f: Fleet, revision: str) -> int:
    """The (VIP, POP) pairs the desired state at ``revision`` publishes: all announced when clean."""
    r = subprocess.run(["git", "-C", str(f.config_dir), "show", f"{revision}:vips.yaml"],
                       capture_output=True, text=True, check=True, timeout=10)
    return sum(len(v["publish"]) for v in yaml.safe_load(r.stdout)["vips"] if v.get("enabled", True))


def change_status(f: Fleet) -> dict[str, Any]:
    """/v1/status's config-change section ({} if the controller does not answer)."""
    c = (f.status() or {}).get("change")
    return c if isinstance(c, dict) else {}


def change_phase_metric(f: Fleet, phase: str) -> float | None:
    return parse(f.controller_metrics()).value("anycast_controller_change_phase", phase=phase)


def _back_to_base(f: Fleet, base: str) -> None:
    """The base commit again (a revision that withdraws nothing: applied at once)."""
    if head_commit(f) != base:
        git(f.config_dir, "reset", "-q", "--hard", base)


def s9_everything_removed_is_held_then_confirmed_in_waves(f: Fleet) -> dict[str, Any]:
    """A commit ``vips: []`` is held: every POP keeps announcing, status, metric and alarm
    name the revision. ``anycastctl apply --confirm REV`` rolls it out in waves: sin first (it
    announces the least), then fra, then sjc, each after its bake; while a POP's wave has not
    come it keeps announcing, and until the last wave the clients of the other POPs lose
    nothing. ``git reset`` to the base announces everything again at once."""
    assert_clean(f)
    base = base_commit(f)
    pops = [p.name for p in f.topo.pops]
    na_transit = next(c.transit for c in f.topo.clients if c.node == "c-na")
    try:
        # c-na's transit's FIB, event-stamped: when sjc's wave really took c-na's route (the
        # polled `withdrawn` below lags it, by more under load, and requests sent in between
        # fail for want of a route, not by a blackhole).
        with IngressWatch(f) as watch, RouteWatcher(f.nodes[na_transit]) as fib:
            f.edit_controller_yaml("vips.yaml", lambda d: d.__setitem__("vips", []))
            t0 = time.time()
            f.commit("remove every VIP")
            rev = head_commit(f)[:12]
            # (The target the commit's, not the working tree's "+dirty" one held just before it
            # when the watcher saw the edit first.)
            held = wait_for(lambda: (c := change_status(f)).get("phase") == "held" and c.get("target") == rev and c,
                            30, desc=f"revision {rev} held")
            pairs = planned_pairs(f, base)
            assert held["target"] == rev and f"withdraws {pairs} of {pairs}" in held["detail"], held
            wait_for_equal(lambda: change_phase_metric(f, "held"), ONE, 10, desc="the change_phase metric says held")
            status = answered_status(f)
            assert [a["kind"] for a in status["alarms"]] == ["change_held"], status["alarms"]
            time.sleep(2)  # held, not slow: still announced everywhere a while later
            assert all(f.announced(p, VIP) for p in pops), "a POP withdrew while the change was held"
            t_held = time.time()
            fib_mark = fib.mark()
            _anycastctl(f, "apply", "--confirm", rev, "--reason", "lab: retire every VIP", "--by", "lab")
            t_confirm = time.time()
            withdrawn: dict[str, float] = {}
            announcing_when: dict[str, list[str]] = {}
            deadline = time.monotonic() + 120
            while len(withdrawn) < len(pops):
                now_up = [p for p in pops if f.announced(p, VIP)]
                for p in pops:
                    if p not in now_up and p not in withdrawn:
                        withdrawn[p] = time.time()
                        announcing_when[p] = now_up
                assert time.monotonic() < deadline, f"not every POP withdrew within 120 s: {withdrawn}"
                time.sleep(0.05)
            order = sorted(withdrawn, key=lambda p: withdrawn[p])
            assert order == ["sin", "fra", "sjc"], f"waves in the order {order}"
            assert announcing_when["sin"] == ["sjc", "fra"] or set(announcing_when["sin"]) == {"sjc", "fra"}, \
                announcing_when
            assert announcing_when["fra"] == ["sjc"], announcing_when
            done = wait_for(lambda: (c := change_status(f)).get("phase") == "steady" and c, 60,
                            desc="the rollout finished")
            assert done["base"] == rev and done["confirmed"]["by"] == "lab", done
            gone = fib.wait(host_prefix(VIP), False, fib_mark, 30)
            assert gone is not None, f"{VIP} never left {na_transit}'s FIB although every POP withdrew it"
            # Until just before that (a margin for the stamp's own lag); c-na's last request
            # then may still be the one in flight when its route went.
            until_last = gone + (time.time() - time.monotonic()) - 0.5
            stats = {c.node: client_stats(f, c.node, t0, until_last) for c in f.topo.clients}
            moved = {c: first_success_via(f, c, t_confirm, {"sjc"}) for c in ("c-ap", "c-eu")}
            held_stats = {c.node: client_stats(f, c.node, t0, t_held) for c in f.topo.clients}
            assert not unserved(held_stats), f"requests lost while held: {held_stats}"
            early = [r for r in [r for r in f.requests("c-na", t0) if r["t"] <= until_last][:-1] if not r["ok"]]
            assert not early, f"c-na (sjc, the last wave) lost requests before it: {early}"
            for c in ("c-ap", "c-eu"):  # moved once or twice by the waves, never blackholed
                moves = sum(1 for t, n, _ in watch.changes if n == c and t0 <= t <= until_last)
                at = moved[c]
                assert at is not None, f"{c} never served via sjc after its POP's wave"
                lost = move_failures(c, [r for r in f.requests(c, t0) if r["t"] <= until_last], moves, at)
                assert not lost, lost
    finally:
        _back_to_base(f, base)
    t_reset = time.time()
    wait_for(lambda: all(f.announced(p, VIP) for p in pops), 30, desc="every POP announces again after the reset")
    back = time.time()
    # The whole scenario, with the outage it was asked for (the last wave to the reset).
    whole = {c.node: client_stats(f, c.node, t0, back) for c in f.topo.clients}
    assert_clean(f)
    return {"held_s": round(t_held - t0, 2),
            "wave_withdrawn_ms": {p: ms(t_confirm, t) for p, t in sorted(withdrawn.items(), key=lambda x: x[1])},
            "reset_to_announced_ms": ms(t_reset, back), "clients": stats, "clients_until_reset": whole}


def s10_failed_wave_gate_rolls_back(f: Fleet) -> dict[str, Any]:
    """A commit removes api-eu (2 of 5 pairs: held; confirmed). Its first wave withdraws it at
    fra; during the bake fra's checks fail (its path to the check ports cut): fra's gate fails,
    the controller rolls back (alarm, status, metric), sjc (the next wave) is never touched:
    it announces api-eu throughout, and fra's plan has api-eu again (announced once its checks
    recover)."""
    assert_clean(f)
    base = base_commit(f)
    try:
        with IngressWatch(f) as watch:
            f.edit_controller_yaml("vips.yaml", lambda d: d.__setitem__(
                "vips", [v for v in d["vips"] if v["name"] != API_NAME]))
            t0 = time.time()
            f.commit(f"{API_NAME} moves elsewhere")
            rev = head_commit(f)[:12]
            wait_for(lambda: (c := change_status(f)).get("phase") == "held" and c.get("target") == rev, 30,
                     desc=f"revision {rev} held")
            _anycastctl(f, "apply", "--confirm", rev, "--reason", "lab: api-eu leaves", "--by", "lab")
            rolling = wait_for(lambda: change_status(f), 30, desc="/v1/status's change section answered")
            assert rolling["phase"] == "rolling" and rolling["waves"] == [["fra"], ["sjc"]], rolling
            sjc_kept = True
            with nft_drop(f, f.topo.pop("fra").agent, CUT_CHECKS):
                t_cut = time.time()
                deadline = time.monotonic() + 60
                while change_status(f).get("phase") != "rolled_back":
                    sjc_kept = sjc_kept and f.announced("sjc", API_VIP)
                    assert time.monotonic() < deadline, f"no rollback 60 s after fra's checks failed: {change_status(f)}"
                    time.sleep(0.05)
                t_back = time.time()
                back = change_status(f)
                # game-global, or in the dual-stack lab its IPv6 twin game-global-v6 (the same checks,
                # cut together): whichever fra's report shows down first.
                assert back["target"] == rev and "fra reports every origin of game-global" in back["detail"], back
                status = answered_status(f)
                assert "rollout_rolled_back" in [a["kind"] for a in status["alarms"]], status["alarms"]
                wait_for_equal(lambda: change_phase_metric(f, "rolled_back"), ONE, 10,
                               desc="the change_phase metric says rolled_back")
                plan = wait_for(lambda: (p := f.plan("fra")) and API_NAME in {v["name"] for v in p["vips"]} and p, 10,
                                desc=f"fra's plan has {API_NAME} again")
                assert plan is not None
                time.sleep(1)
                sjc_kept = sjc_kept and f.announced("sjc", API_VIP)
                assert change_status(f)["phase"] == "rolled_back"  # and it stays so: no further wave
            wait_for(lambda: f.announced("fra", API_VIP) and f.announced("fra", VIP), 30,
                     desc=f"fra announces {API_NAME} and {NAME} again once its checks recover")
            t_recovered = time.time()
            assert sjc_kept and f.announced("sjc", API_VIP), "sjc, the next wave, stopped announcing api-eu"
            stats = {c.node: client_stats(f, c.node, t0, t_recovered) for c in f.topo.clients}
            assert not unserved(stats, ("c-na", "c-ap")), stats
            assert watch.first_change("c-na", t0) is None, "c-na (sjc) moved: sjc was touched"
    finally:
        _back_to_base(f, base)
    wait_for(lambda: change_status(f).get("phase") == "steady", 30, desc="the reset to the base applied")
    assert_clean(f)
    return {"cut_to_rolled_back_ms": ms(t_cut, t_back), "rolled_back_to_fra_announcing_ms": ms(t_back, t_recovered),
            "clients": stats}


def drain_losses(f: Fleet, watch: IngressWatch, pop: str, client: str, stats: dict[str, dict[str, Any]], t0: float,
                 until: float) -> list[str]:
    """Requests lost while ``pop`` drained: any at all for the clients not entering there,
    and for ``client`` (which did) more than its ingress moves explain (checks.move_failures)."""
    lost = [f"{c}: {s['failed']} of {s['requests']} failed" for c, s in unserved(stats).items() if c != client]
    moves = sum(1 for t, c, _ in watch.changes if c == client and t0 <= t <= until)
    moved_at = first_success_via(f, client, t0, {p.name for p in f.topo.pops} - {pop})
    if moved_at is None:
        return lost + [f"{client} was never served via another POP than {pop}"]
    return lost + move_failures(client, [r for r in f.requests(client, t0) if r["t"] <= until], moves, moved_at)


SCENARIOS: list[Callable[[Fleet], dict[str, Any]]] = [
    s1_steady_state, s2_backend_failure_seen_by_one_pop, s3_pop_crash, s3b_silent_pop_failure,
    s4_origin_failover, s5_controller_down, s6_safety_checks_down_everywhere, s7_publish_domain_change, s8_drain,
    s9_everything_removed_is_held_then_confirmed_in_waves, s10_failed_wave_gate_rolls_back,
]


def run_all(f: Fleet, report: dict[str, Any], only: list[str] | None = None) -> None:
    """Run the scenarios in order, filling ``report`` (name -> result or error)."""
    for scenario in SCENARIOS:
        name = scenario.__name__
        if only and not any(o in name for o in only):
            continue
        started = time.time()
        try:
            result = scenario(f)
            report[name] = {"ok": True, "took_s": round(time.time() - started, 1), **result}
        except Exception as exc:  # noqa: BLE001 - recorded, then re-raised by the caller's test
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            raise


# --- safety under partial knowledge (issue 12, item 1) ---------------------------------------
CUT_MANAGEMENT = f" chain out {{ type filter hook output priority 0; ip daddr 192.0.2.1 tcp dport {CONTROLLER_PORT} drop; }}"
# sjc's backbone fails for real: its checks (output) and its clients' requests to the VIPs
# (forwarded toward the origins' next hops) are dropped alike.
CUT_BACKBONE = "\n".join(f" chain {h} {{ type filter hook {h} priority 0; "
                         f"ip daddr {{ 100.64.10.0/24, 100.64.20.0/24, 198.51.100.0/24 }} drop; }}"
                         for h in ("output", "forward"))


def s11_stale_majority_real_failure(f: Fleet) -> dict[str, Any]:
    """fra's and sin's management paths to the controller are cut (their reports go stale;
    they keep their plans), then sjc's backbone fails for real (its checks and its clients'
    traffic to every origin): the only fresh POP sees every origin down, which is not "down
    everywhere" without a quorum of fresh POPs. sjc is withdrawn (reason ``backend_down``,
    no safety hold) within detection + settle, c-na moves to a POP presumed announcing,
    fra and sin never stop announcing. The outage window and lost requests are c-na's."""
    assert_clean(f)
    stale_after = report_stale_after(f)
    withdrawals = {"vip": NAME, "action": "withdraw", "reason": "backend_down"}
    before = parse(f.agent_metrics("sjc")).total("anycast_announcement_changes_total", **withdrawals)
    stale = {"fra", "sin"}
    with nft_drop(f, f.topo.pop("fra").agent, CUT_MANAGEMENT), nft_drop(f, f.topo.pop("sin").agent, CUT_MANAGEMENT):
        t_cut = time.time()

        def ages() -> dict[str, float | None]:
            return {p["pop"]: p["report_age"] for p in (f.status() or {}).get("pops", [])}

        wait_for(lambda: all((a := ages().get(p)) is not None and a > stale_after for p in stale),
                 stale_after + 30, desc="fra's and sin's reports stale at the controller")
        stale_after_s = time.time() - t_cut
        with IngressWatch(f) as watch:
            t0 = time.time()
            with nft_drop(f, f.topo.pop("sjc").agent, CUT_BACKBONE):
                kept = True
                deadline = time.monotonic() + 20
                while f.announced("sjc", VIP):
                    kept = kept and all(f.announced(p, VIP) for p in stale)
                    assert time.monotonic() < deadline, "sjc still announces 20 s after its backbone failed"
                    time.sleep(0.02)
                withdrawn = time.time()
                moved = _pop_leaves(f, "sjc", "c-na", t0, watch)
                planned = wait_for(lambda: pop_item(f.explain(NAME), "sjc"), 10, desc="sjc in /v1/explain")
                explain = answered_explain(f, NAME)
                others = {p: pop_item(explain, p) for p in stale}
                # (an unanswered status would be an empty list of alarms: vacuously without the one asked about)
                alarms = [a["kind"] for a in answered_status(f).get("alarms", []) if a["vip"] == NAME]
                time.sleep(0.5)
                t1 = time.time()
                kept = kept and all(f.announced(p, VIP) for p in stale)
            stats = {c.node: client_stats(f, c.node, t0, t1) for c in f.topo.clients}
    assert_clean(f)
    assert not json_cmp(planned, {"reason": "backend_down", "safety_hold": False}), \
        f"/v1/explain for sjc, the only fresh POP, seeing every origin down: {planned}"
    assert all(o is not None and o["reason"] == "report_stale" and o["wanted"] for o in others.values()), others
    # (api-eu, published at fra and sjc only, is held at sjc: 1 fresh POP of 2 is a quorum)
    assert "checks_down_everywhere" not in alarms, f"{NAME}'s alarms while only sjc reports: {alarms}"
    assert kept, "fra or sin stopped announcing while their reports were stale"
    after = parse(f.agent_metrics("sjc")).total("anycast_announcement_changes_total", **withdrawals)
    assert after > before, f"anycast_announcement_changes_total{withdrawals} went from {before} to {after}"
    assert not unserved(stats, ("c-eu", "c-ap")), f"clients of other POPs failed (or sent nothing): {stats}"
    return {"reports_stale_after_s": round(stale_after_s, 1), "withdrawn_ms": ms(t0, withdrawn), **moved,
            "c_na_outage_s": stats["c-na"]["outage_s"], "c_na_lost_requests": stats["c-na"]["failed"],
            "clients": stats}


SCENARIOS.append(s11_stale_majority_real_failure)


# --- IPv6 (issue 14, item 5): the /128 in the same agents, over the IPv6 sessions -----------------
NAME6 = "game-global-v6"  # game-global's IPv6 twin, in the dual-stack lab (dual_stack_controller_config)
PUBLISH6 = ["sjc", "fra"]


def ipv6_vip_config(topo: Topology) -> Callable[[Path], None]:
    """An edit of the controller config adding ``game-global-v6``: the topology's first IPv6
    VIP (a /128) with game-global's checks and attributes, its origins (us-west, then
    eu-central) at their IPv6 addresses and backends. Published at sjc and fra only: the
    change-budget scenarios (s9, s10) hold a change by the share of (VIP, POP) pairs it
    withdraws, and a third POP (8 pairs) would let s10's removal of api-eu (2 of 8, the 25 %
    budget) pass unheld. c-ap then reaches it through t-na or t-eu, whichever its transit chose.
    Its failover quorum is both POPs (1.0): with the example's half, one POP of two that sees
    the primary down is a quorum and moves the VIP everywhere, so a failure seen by one POP
    (s12) would move it instead of withdrawing it there, whenever that POP's report shows the
    primary down before the secondary."""
    def edit(config_dir: Path) -> None:
        path = config_dir / "vips.yaml"
        data = yaml.safe_load(path.read_text())
        v4 = next(v for v in data["vips"] if v["name"] == NAME)
        by_region = {o.region: o for o in topo.origins}
        origins = []
        for o in v4["origins"]:
            origin = by_region[o["region"]]
            origins.append({"region": o["region"], "next_hop": origin.address6,
                            "backends": [f"[{origin.address6}]:{port}" for port in origin.ports]})
        data["vips"].append({**{k: copy.deepcopy(v) for k, v in v4.items() if k in ("check", "attributes")},
                             "name": NAME6, "address": f"{topo.vips6[0]}/128", "publish": PUBLISH6,
                             "policy": {"failover": {"quorum": 1.0}}, "origins": origins})
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return edit


def dual_stack_controller_config(topo: Topology) -> Callable[[Path], None]:
    """``lab_controller_config`` (the lab's timers) plus ``ipv6_vip_config``."""
    def edit(config_dir: Path) -> None:
        lab_controller_config(config_dir)
        ipv6_vip_config(topo)(config_dir)
    return edit


def vip6(f: Fleet) -> str:
    return f.topo.vips6[0]


def ensure_clients6(f: Fleet) -> None:
    """IPv6 clients beside the IPv4 ones (started by the first IPv6 scenario, then kept)."""
    if any(f"{c.node}/6" not in f.clients or f.clients[f"{c.node}/6"].poll() is not None for c in f.topo.clients):
        f.start_clients(vip6(f))


def clean6_problems(f: Fleet) -> list[str]:
    """What keeps the IPv6 VIP from its clean state: planned and announced from the primary at
    PUBLISH6 with its up attributes (as the POP routers and transits see them, over the IPv6
    sessions), every agent's IPv6 session up, and every IPv6 client served via the POP its
    transit picked (its nearest one where that publishes it) by the primary origin."""
    v6, out = vip6(f), []
    explain = f.explain(NAME6)
    out += explain_problems(explain, PUBLISH6, PRIMARY)
    up = explain["spec"]["attributes"]["up"] if explain else None
    for p in f.topo.pops:
        if p.name in PUBLISH6 and up is not None:
            asns = prepended(f.topo.agent_asn, up)
            comms = up.get("communities", [])
            out += [f"{p.transit}, IPv6 path from {p.name}: {m}" for m in json_cmp(
                f.routers[p.transit].bgp_route(host_prefix(v6)) or {}, path_subset(p.uplink6[1], [p.asn, *asns], comms))]
            out += [f"{p.router}, IPv6 path from its agent: {m}" for m in json_cmp(
                f.routers[p.router].bgp_route(host_prefix(v6)) or {},
                path_subset(AGENT_LINK6[1], asns, comms, up.get("med")))]
        scrape = parse(f.agent_metrics(p.name))
        if scrape.value("anycast_bgp_neighbor_up", neighbor=AGENT_LINK6[0]) != 1.0:
            out.append(f"{p.name}: the agent's IPv6 session to {AGENT_LINK6[0]} is not up")
        announced = scrape.value("anycast_vip_announced", vip=NAME6)
        if (announced == 1.0) != (p.name in PUBLISH6):
            out.append(f"{p.name}: anycast_vip_announced{{vip={NAME6}}} = {announced}")
    now = time.time()
    for c in f.topo.clients:
        pop = f.ingress(c, v6)
        if pop not in PUBLISH6 or (f.nearest(c) in PUBLISH6 and pop != f.nearest(c)):
            out.append(f"{c.transit} sends {c.node}'s IPv6 to {pop}")
        elif pop is not None:
            out += client_problems(f"{c.node} (IPv6)", f.requests(c.node, now - 0.5, 6), pop, PRIMARY)
    return out


def assert_clean6(f: Fleet, timeout: float = 60.0) -> None:
    none: list[str] = []
    wait_for_equal(lambda: clean6_problems(f), none, timeout, interval=0.25, desc="a clean IPv6 VIP")


def _ipv4_unaffected(f: Fleet, stats4: dict[str, dict[str, Any]]) -> None:
    """Every IPv4 client was served throughout, via its nearest POP, by the primary origin."""
    for c in f.topo.clients:
        s = stats4[c.node]
        assert s["requests"] and s["failed"] == 0 and s["served_by"] == [f"{f.nearest(c)}/{PRIMARY}"], \
            f"the IPv4 VIP was affected at {c.node}: {s}"


# sjc's IPv6 health checks fail: its IPv6 path to the check ports is cut, IPv4's is not.
CUT_CHECKS6 = " chain out { type filter hook output priority 0; meta nfproto ipv6 tcp dport { 8080, 8081 } drop; }"
# us-west fails for IPv6 (its backends and the VIP's service port), for every POP; IPv4 answers.
CUT_ORIGIN6 = " chain in { type filter hook input priority 0; meta nfproto ipv6 tcp dport { 80, 8080, 8081 } drop; }"


def s12_ipv6_backend_failure_seen_by_one_pop(f: Fleet) -> dict[str, Any]:
    """sjc's IPv6 checks fail (its IPv6 path to the check ports is cut; IPv4's is not): sjc
    withdraws the /128 (reason ``backend_down`` in the plan and its agent's metrics), t-na
    reaches it through fra, the IPv6 clients that entered at sjc move; sjc keeps announcing
    the IPv4 VIP and no IPv4 request is lost or moved."""
    ensure_clients6(f)
    assert_clean(f)
    assert_clean6(f)
    v6, sjc, fra = vip6(f), f.topo.pop("sjc"), f.topo.pop("fra")
    at_sjc = [c.node for c in f.topo.clients if f.ingress(c, v6) == "sjc"]
    with IngressWatch(f, v6) as watch:
        t0 = time.time()
        with nft_drop(f, sjc.agent, CUT_CHECKS6):
            kept4 = True
            deadline = time.monotonic() + 20
            while f.announced("sjc", v6):
                kept4 = kept4 and f.announced("sjc", VIP)
                assert time.monotonic() < deadline, "sjc still announces the /128 20 s after its IPv6 checks failed"
                time.sleep(0.05)
            withdrawn = time.time()
            moved = _pop_leaves(f, "sjc", "c-na", t0, watch, family=6)
            # t-na's best path to the /128 now comes from fra, through t-eu; none from sjc.
            via_fra = aspath(f.topo.transit(fra.transit).asn, fra.asn, f.topo.agent_asn)

            def best_via_fra() -> dict[str, Any] | None:
                e = f.routers[sjc.transit].bgp_route(host_prefix(v6))
                return e if e and not json_cmp(
                    e, {"paths": [{"aspath": {"string": via_fra}, "bestpath": {"overall": True}}]}) else None

            entry = wait_for(best_via_fra, 10, desc=f"{sjc.transit}'s best path to the /128 through fra")
            assert not has_path_from(entry, sjc.uplink6[1]), f"{sjc.transit} still has sjc's path to the /128"
            planned = wait_for(lambda: pop_item(f.explain(NAME6), "sjc"), 10, desc="sjc in /v1/explain")
            assert not json_cmp(planned, {"reason": "backend_down", "active_origin": PRIMARY}), planned
            wait_for_equal(lambda: agent_value(f, "sjc", "anycast_vip_reason", vip=NAME6, reason="backend_down"),
                           ONE, 10, desc="sjc's agent exports reason backend_down for the /128")
            # The IPv4 VIP at sjc: announced by the same agent, still sjc's at t-na.
            assert agent_value(f, "sjc", "anycast_vip_announced", vip=NAME) == 1.0
            assert f.ingress("c-na", VIP) == "sjc"
            time.sleep(0.5)
            kept4 = kept4 and f.announced("sjc", VIP)
            t1 = time.time()
        stats6 = {c.node: client_stats(f, c.node, t0, t1, 6) for c in f.topo.clients}
        stats4 = {c.node: client_stats(f, c.node, t0, t1) for c in f.topo.clients}
        moves = {c: sum(1 for t, n, _ in watch.changes if n == c and t0 <= t <= t1) for c in at_sjc}
    assert_clean6(f)
    assert_clean(f)
    assert kept4, "sjc stopped announcing the IPv4 VIP while only its IPv6 checks failed"
    _ipv4_unaffected(f, stats4)
    for c in f.topo.clients:
        s = stats6[c.node]
        assert s["requests"], f"{c.node} sent no IPv6 request"
        if c.node in at_sjc:  # at most the request in flight when its transit switched POPs
            at = first_success_via(f, c.node, t0, {"fra"}, 6)
            assert at is not None, f"{c.node}'s IPv6 requests were never served via fra"
            lost = move_failures(c.node, [r for r in f.requests(c.node, t0, 6) if r["t"] <= t1], moves[c.node], at)
            assert not lost, lost
        else:
            assert s["failed"] == 0, f"{c.node} (IPv6, not via sjc) lost requests: {s}"
    return {**moved, "withdrawn_ms": ms(t0, withdrawn), "clients6": stats6, "clients": stats4}


def s13_ipv6_origin_failover(f: Fleet) -> dict[str, Any]:
    """us-west fails for IPv6 only (its node drops IPv6 to its backends and the VIP's port),
    for every POP: the controller moves the /128 to eu-central at sjc and fra, which keep
    announcing it; the IPv6 clients are served by eu-central after a short outage; the IPv4
    VIP stays on us-west without losing a request. Failback after the hold-down."""
    ensure_clients6(f)
    assert_clean(f)
    assert_clean6(f)
    v6 = vip6(f)
    t0 = time.time()
    served: dict[str, float | None] = {c.node: None for c in f.topo.clients}
    with nft_drop(f, "usw", CUT_ORIGIN6):
        def all_on_secondary() -> bool:
            for c in f.topo.clients:
                served[c.node] = served[c.node] or next(
                    (r["t"] for r in f.requests(c.node, t0, 6) if r["ok"] and r["origin"] == SECONDARY), None)
            return all(served.values())

        wait_for(all_on_secondary, 20, desc=f"every IPv6 client served by {SECONDARY}")
        planned = wait_for(lambda: (e := f.explain(NAME6)) and not json_cmp(
            e["pops"], [{"pop": p, "wanted": True, "active_origin": SECONDARY} for p in PUBLISH6]) and e,
            10, desc=f"/v1/explain: the /128 from {SECONDARY} at {PUBLISH6}")
        metrics = answered_metrics(f)
        assert metrics.value("anycast_controller_active_origin", vip=NAME6, origin=SECONDARY) == 1.0, planned
        assert metrics.value("anycast_controller_active_origin", vip=NAME, origin=PRIMARY) == 1.0, \
            f"{NAME} left {PRIMARY} when only {PRIMARY}'s IPv6 failed"
        assert explain_problems(answered_explain(f, NAME), [p.name for p in f.topo.pops], PRIMARY) == []
        # Moved, not withdrawn (as in s4, after the move: an agent whose controller is slower
        # than its confirm_timeout to answer may rightly withdraw for a moment before).
        wait_for(lambda: all(f.announced(p, v6) for p in PUBLISH6), 10,
                 desc=f"every POP of {PUBLISH6} announces the /128 (one withdrew it instead of moving it)")
        time.sleep(0.5)
        t1 = time.time()
    t_back = time.time()
    stats6 = {c.node: client_stats(f, c.node, t0, t1, 6) for c in f.topo.clients}
    stats4 = {c.node: client_stats(f, c.node, t0, t1) for c in f.topo.clients}
    assert_clean6(f)  # failback to us-west after the hold-down (5 s in the lab)
    failback = round(time.time() - t_back, 2)
    assert_clean(f)
    _ipv4_unaffected(f, stats4)
    for c in f.topo.clients:  # (all_on_secondary waited for that; the report shows where)
        assert any(s.endswith(f"/{SECONDARY}") for s in stats6[c.node]["served_by"]), stats6[c.node]
    return {"first_success_on_eu_central_ms": {c: ms(t0, t) for c, t in served.items()},
            "failback_after_restore_s": failback, "clients6": stats6, "clients": stats4}


SCENARIOS += [s12_ipv6_backend_failure_seen_by_one_pop, s13_ipv6_origin_failover]


# --- traffic steering (issue 18): its own module, for the helpers above ----------------------
from .steering_scenarios import s14_weighted_split_dial_and_origin_failure  # noqa: E402
from .steering_scenarios import s15_per_pop_preference, s16_dial_drains_a_region_and_split_over_thousands  # noqa: E402

SCENARIOS.append(s14_weighted_split_dial_and_origin_failure)
SCENARIOS += [s15_per_pop_preference, s16_dial_drains_a_region_and_split_over_thousands]
from .steering_scenarios import s17_preferring_pops_settle_ends_on_the_others_fresh_checks  # noqa: E402

SCENARIOS.append(s17_preferring_pops_settle_ends_on_the_others_fresh_checks)
