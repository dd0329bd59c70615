"""The lab's scenarios: each breaks something while clients send requests, asserts what a
user would notice, and returns its timings for the JSON report.

Every scenario starts from, and leaves, the steady state: every POP announces the VIP,
every client enters at its nearest POP, traffic reaches the primary origin. Times are
wall-clock (unix) seconds; "FIB change" is when the client's transit router starts
sending the VIP elsewhere (its BGP best path, polled every 20 ms through bgpd's vty).

Add one: write ``def my_case(f: Fleet) -> dict`` below (break, ``measure``, assert,
restore, ``steady``), append it to SCENARIOS, and it runs in ``make test`` and the report.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .fleet import CONTROLLER_PORT, Fleet
from .netns import LabError
from .nodes import ROOT
from .poll import wait_for

VIP = "198.51.100.10"  # game-global: published at every POP, origins us-west then eu-central
NAME = "game-global"
OPERATOR_TOKEN = ROOT / "configs" / "controller" / "lab-tokens" / "operator.token"


def lab_controller_config(config_dir: Path) -> None:
    """The example controller config with the lab's timers: scenarios break and heal the
    same POPs every few seconds, which the example's dampening (3 changes a minute) and
    withdrawal rate limit (2 a minute) would rightly hold down; both have unit tests. A
    3 s drain and a 5 s failback hold-down keep the run short."""
    import yaml

    path = config_dir / "controller.yaml"
    data = yaml.safe_load(path.read_text())
    pol = data["policy"]
    pol["dampening"]["flaps"] = 1000
    pol["safety"]["withdraw_rate"] = {"max": 1000, "window": 60}
    pol["drain"]["drain_time"] = 3
    pol["failover"]["failback_hold_down"] = 5
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# --- observing ------------------------------------------------------------------------------
class IngressWatch:
    """Polls each client's transit for the POP it sends the VIP to; records every change."""

    def __init__(self, f: Fleet, vip: str = VIP) -> None:
        self.f, self.vip = f, vip
        self.changes: list[tuple[float, str, str | None]] = []  # (t, client, pop)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last: dict[str, str | None] = {}
        while not self._stop.is_set():
            for c in self.f.topo.clients:
                try:
                    pop = self.f.ingress(c, self.vip)
                except (LabError, OSError):
                    continue
                if c.node not in last or last[c.node] != pop:
                    last[c.node] = pop
                    self.changes.append((time.time(), c.node, pop))
            self._stop.wait(0.02)

    def first_change(self, client: str, since: float) -> tuple[float, str | None] | None:
        """The first time after ``since`` the client's transit sends it somewhere else."""
        before = [p for t, c, p in self.changes if c == client and t < since]
        return next(((t, p) for t, c, p in self.changes
                     if c == client and t >= since and (not before or p != before[-1])), None)

    def __enter__(self) -> IngressWatch:
        self._thread.start()
        wait_for(lambda: {c for _, c, _ in self.changes} == {c.node for c in self.f.topo.clients}, 10,
                 interval=0.01, desc="a first sample of every transit")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def client_stats(f: Fleet, client: str, since: float, until: float) -> dict[str, Any]:
    """Requests, failures, the outage window (first failure to the first success after the
    last failure) and where the requests went."""
    rs = [r for r in f.requests(client, since) if r["t"] <= until]
    failed = [r for r in rs if not r["ok"]]
    out: dict[str, Any] = {"requests": len(rs), "failed": len(failed), "outage_s": 0.0,
                           "served_by": sorted({f"{r['pop']}/{r['origin']}" for r in rs if r["ok"]})}
    if failed:
        after = next((r for r in rs if r["ok"] and r["t"] > failed[-1]["t"]), None)
        end = after["t"] if after else until
        out["outage_s"] = round(end - failed[0]["t"], 3)
    return out


def first_success_via(f: Fleet, client: str, since: float, pops: set[str]) -> float | None:
    return next((r["t"] for r in f.requests(client, since) if r["ok"] and r["pop"] in pops), None)


def steady(f: Fleet, timeout: float = 60.0, origin: str = "us-west") -> None:
    """Every POP announces, every client's last requests succeed via its nearest POP and
    reach ``origin``."""
    f.wait_converged(VIP, timeout)

    def ok() -> bool:
        now = time.time()
        for c in f.topo.clients:
            last = f.requests(c.node, now - 0.5)
            if not last or not all(r["ok"] and r["pop"] == f.nearest(c) and r["origin"] == origin for r in last):
                return False
        return True

    wait_for(ok, timeout, interval=0.25, desc=f"every client served via its nearest POP by {origin}")


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


# --- the scenarios -----------------------------------------------------------------------------
def s1_steady_state(f: Fleet) -> dict[str, Any]:
    """Each client goes through its nearest POP; every POP announces; the active origin serves."""
    steady(f)
    t0 = time.time()
    time.sleep(2)
    stats = {c.node: client_stats(f, c.node, t0, time.time()) for c in f.topo.clients}
    for c in f.topo.clients:
        s = stats[c.node]
        assert s["failed"] == 0 and s["served_by"] == [f"{f.nearest(c)}/us-west"], f"{c.node}: {s}"
    assert all(f.announced(p.name, VIP) for p in f.topo.pops)
    return {"clients": stats}


def _pop_leaves(f: Fleet, pop: str, client: str, t_break: float, watch: IngressWatch,
                timeout: float = 15.0) -> dict[str, Any]:
    """Wait until ``client`` is served via another POP; the timings of the move."""
    others = {p.name for p in f.topo.pops} - {pop}
    wait_for(lambda: first_success_via(f, client, t_break, others) is not None, timeout,
             desc=f"{client} served via another POP than {pop}")
    fib = watch.first_change(client, t_break)
    moved = first_success_via(f, client, t_break, others)
    return {"fib_change_ms": ms(t_break, fib[0] if fib else None), "new_pop": fib[1] if fib else None,
            "first_success_via_new_pop_ms": ms(t_break, moved)}


def s2_backend_failure_seen_by_one_pop(f: Fleet) -> dict[str, Any]:
    """sjc's checks fail (its backbone path to the backends' check ports is cut): sjc
    withdraws after the controller confirms; c-na moves to the next POP; nobody else moves."""
    steady(f)
    with IngressWatch(f) as watch:
        t0 = time.time()
        with nft_drop(f, f.topo.pop("sjc").agent, CUT_CHECKS):
            moved = _pop_leaves(f, "sjc", "c-na", t0, watch)
            wait_for(lambda: not f.announced("sjc", VIP), 10, desc="sjc withdrew")
            t1 = time.time()
            time.sleep(0.5)
        stats = {c.node: client_stats(f, c.node, t0, t1) for c in f.topo.clients}
        steady(f)
    assert all(stats[c]["failed"] == 0 for c in ("c-eu", "c-ap")), f"clients of other POPs failed: {stats}"
    assert "reason backend_down" in f.agents["sjc"].log()
    return {**moved, "clients": stats}


def s3_pop_crash(f: Fleet) -> dict[str, Any]:
    """fra's ExaBGP and agent are killed: the BGP session drops, fra's router withdraws."""
    steady(f)
    agent = f.agents["fra"]
    with IngressWatch(f) as watch:
        t0 = time.time()
        agent_pid = agent.agent_pid()
        if agent.proc is not None:
            agent.proc.send_signal(signal.SIGKILL)  # ExaBGP (launch exec'd into it)
            agent.proc.wait(5)
        if agent_pid is not None:
            try:
                os.kill(agent_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        moved = _pop_leaves(f, "fra", "c-eu", t0, watch)
        time.sleep(0.5)
        stats = client_stats(f, "c-eu", t0, time.time())
        f.start_agent("fra")
        steady(f)
    return {**moved, "c-eu": stats}


def s3b_silent_pop_failure(f: Fleet) -> dict[str, Any]:
    """fra's router goes silent (nftables drops everything, no reset): its transit's BFD
    (100 ms x 3) takes the session down and the routes with it."""
    steady(f)
    with IngressWatch(f) as watch:
        t0 = time.time()
        with nft_drop(f, f.topo.pop("fra").router, SILENT):
            moved = _pop_leaves(f, "fra", "c-eu", t0, watch)
            time.sleep(0.5)
            stats = client_stats(f, "c-eu", t0, time.time())
        steady(f)
    assert moved["fib_change_ms"] is not None and moved["fib_change_ms"] < 2000, \
        f"the transit took {moved['fib_change_ms']} ms: BFD should have caught it"
    return {**moved, "c-eu": stats}


def s4_origin_failover(f: Fleet) -> dict[str, Any]:
    """us-west's backends stop for every POP: the controller moves the VIP to eu-central;
    clients keep being served (by eu-central) after a short outage. Failback after the
    primary stays healthy for the hold-down."""
    steady(f)
    t0 = time.time()
    f.stop_backends("usw")
    served = {c.node: None for c in f.topo.clients}

    def all_on_euc() -> bool:
        for c in f.topo.clients:
            served[c.node] = served[c.node] or next(
                (r["t"] for r in f.requests(c.node, t0) if r["ok"] and r["origin"] == "eu-central"), None)
        return all(served.values())

    wait_for(all_on_euc, 20, desc="every client served by eu-central")
    time.sleep(0.5)
    stats = {c.node: client_stats(f, c.node, t0, time.time()) for c in f.topo.clients}
    assert all(f.announced(p.name, VIP) for p in f.topo.pops), "a POP withdrew instead of moving the VIP"
    assert "moved from us-west to eu-central" in f.controller_log()
    t_back = time.time()
    f.start_backends("usw")
    steady(f, timeout=60)  # failback after the hold-down (5 s in the lab)
    return {"first_success_on_eu_central_ms": {c: ms(t0, t) for c, t in served.items()}, "clients": stats,
            "failback_after_restart_s": round(time.time() - t_back, 2)}


def s5_controller_down(f: Fleet) -> dict[str, Any]:
    """The controller stops: agents keep their plans (nothing moves); a backend failure at
    sjc is still withdrawn locally, without waiting for a controller that is not there."""
    steady(f)
    f.stop_controller()
    try:
        wait_for(lambda: "anycast_controller_reachable 0.0" in f.agent_metrics("sjc"), 40,
                 desc="sjc's agent noticed the controller is gone")
        assert all(f.announced(p.name, VIP) for p in f.topo.pops), "an agent withdrew when the controller stopped"
        with IngressWatch(f) as watch:
            t0 = time.time()
            with nft_drop(f, f.topo.pop("sjc").agent, CUT_CHECKS):
                moved = _pop_leaves(f, "sjc", "c-na", t0, watch)
                time.sleep(0.5)
                stats = client_stats(f, "c-na", t0, time.time())
    finally:
        f.start_controller()
    for p in f.topo.pops:
        wait_for(lambda: "anycast_controller_reachable 1.0" in f.agent_metrics(p.name), 40,
                 desc=f"{p.name} reconnected to the controller")
    steady(f)
    return {**moved, "c-na": stats}


def s6_safety_checks_down_everywhere(f: Fleet) -> dict[str, Any]:
    """Every health check fails at once (their port is cut at every agent host) while client
    traffic still flows: the VIP stays announced everywhere, the controller's alarm and the
    Prometheus alert (ops/prometheus/alerts.yml) fire, no client fails."""
    steady(f)
    t0 = time.time()
    with nft_drop(f, f.topo.pop("sjc").agent, CUT_CHECKS), nft_drop(f, f.topo.pop("fra").agent, CUT_CHECKS), \
            nft_drop(f, f.topo.pop("sin").agent, CUT_CHECKS):
        missing: list[str] = []
        alarm_at = firing_at = None
        while time.time() - t0 < 8:
            missing += [p.name for p in f.topo.pops if not f.announced(p.name, VIP)]
            if alarm_at is None and f'anycast_controller_alarm{{kind="checks_down_everywhere",vip="{NAME}"}} 1.0' \
                    in f.controller_metrics():
                alarm_at = time.time()
            if f.prometheus and firing_at is None and f.prometheus_query(
                    'ALERTS{alertname="AnycastChecksDownEverywhere",alertstate="firing"}'):
                firing_at = time.time()
            time.sleep(0.05)
        t1 = time.time()
    stats = {c.node: client_stats(f, c.node, t0, t1) for c in f.topo.clients}
    assert not missing, f"withdrawn at {sorted(set(missing))} although only the checks failed"
    assert alarm_at is not None, "the checks_down_everywhere alarm did not fire"
    assert all(s["failed"] == 0 for s in stats.values()), f"clients failed: {stats}"
    if f.prometheus:
        assert firing_at is not None, "the lab's Prometheus did not fire AnycastChecksDownEverywhere"
    steady(f)
    return {"alarm_after_ms": ms(t0, alarm_at), "alert_firing_after_ms": ms(t0, firing_at), "clients": stats}


def s7_publish_domain_change(f: Fleet) -> dict[str, Any]:
    """A commit removes sin from the VIP's publish domains: sin withdraws, c-ap moves, and
    sjc and fra never stop announcing. The revert brings sin back."""
    steady(f)

    def publish(pops: list[str]) -> Callable[[Any], None]:
        def edit(data: Any) -> None:
            next(v for v in data["vips"] if v["name"] == NAME)["publish"] = pops
        return edit

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
        assert stats["c-na"]["failed"] == 0 and stats["c-eu"]["failed"] == 0, stats
        f.edit_controller_yaml("vips.yaml", publish(["sjc", "fra", "sin"]))
        f.commit(f"{NAME}: back at sin")
        steady(f)
    return {"commit_to_withdrawn_ms": ms(t0, withdrawn), **moved, "clients": stats}


def _anycastctl(f: Fleet, *args: str) -> str:
    exe = str(Path(sys.executable).parent / "anycastctl")
    url = f"http://{f.topo.controller_address}:{CONTROLLER_PORT}"
    r = f.nodes[f.topo.controller_node].run([exe, *args, "--url", url, "--token-file", str(OPERATOR_TOKEN)],
                                             check=False, timeout=15)
    if r.returncode != 0:
        raise LabError(f"anycastctl {' '.join(args)} failed: {r.stdout}{r.stderr}")
    return r.stdout


def s8_drain(f: Fleet) -> dict[str, Any]:
    """``anycastctl drain fra``: fra announces less preferred (MED, AS-path prepend), its
    clients leave, then (3 s later in the lab) it withdraws. No request fails."""
    steady(f)
    with IngressWatch(f) as watch:
        t0 = time.time()
        _anycastctl(f, "drain", "fra")
        try:
            moved = _pop_leaves(f, "fra", "c-eu", t0, watch)
            wait_for(lambda: not f.announced("fra", VIP), 15, desc="fra withdrawn after the drain time")
            withdrawn = time.time()
            time.sleep(0.5)
            stats = {c.node: client_stats(f, c.node, t0, time.time()) for c in f.topo.clients}
        finally:
            _anycastctl(f, "undrain", "fra")
        steady(f)
    fib = watch.first_change("c-eu", t0)
    assert fib is not None and fib[0] < withdrawn, "traffic left fra only when the route was withdrawn"
    assert all(s["failed"] == 0 for s in stats.values()), f"requests failed during the drain: {stats}"
    return {**moved, "withdrawn_ms": ms(t0, withdrawn), "clients": stats}


SCENARIOS: list[Callable[[Fleet], dict[str, Any]]] = [
    s1_steady_state, s2_backend_failure_seen_by_one_pop, s3_pop_crash, s3b_silent_pop_failure,
    s4_origin_failover, s5_controller_down, s6_safety_checks_down_everywhere, s7_publish_domain_change, s8_drain,
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
