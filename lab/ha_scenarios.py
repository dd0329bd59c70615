"""HA scenarios on lab.ha's fleet (three controllers, three etcd members), with clients
sending requests throughout. Same rules as lab.scenarios: each starts and ends clean
(``assert_clean``), undoes its breakage in ``finally``, asserts on JSON (the controllers'
/v1/status, /v1/explain, vtysh json through IngressWatch, parsed scrapes) and reports its
timings, never asserting them against a bound.

"Route flaps" are counted at the transit routers: for each transit and each POP it has a
path from, the path's state over time (up, draining, gone); a change that the scenario's
own action does not explain (anything at all when nothing should change; for a drain,
anything but up -> draining -> gone) is a flap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .checks import json_cmp, move_failures
from .fleet import Fleet
from .ha import CONTROLLERS, ETCD_MEMBERS, LEASE_TTL, HaFleet
from .metrics import parse
from .poll import wait_for
from .scenarios import (NAME, PRIMARY, SECONDARY, VIP, IngressWatch, answered_explain, answered_status, assert_clean,
                        client_stats, drain_losses, lab_controller_config, ms, nft_drop, pop_item, unserved)

DRAIN_TIME = 12.0  # s: long enough for a leader to be killed and replaced before it ends
HOLD_DOWN = 12.0  # s: the failback hold-down, likewise


def ha_controller_config(config_dir: Path) -> None:
    """lab.scenarios' timers, with a drain and a failback hold-down long enough to kill
    the leader in the middle of them."""
    lab_controller_config(config_dir)
    path = config_dir / "controller.yaml"
    data = yaml.safe_load(path.read_text())
    data["policy"]["drain"]["drain_time"] = DRAIN_TIME
    data["policy"]["failover"]["failback_hold_down"] = HOLD_DOWN
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _hf(f: Fleet) -> HaFleet:
    assert isinstance(f, HaFleet), "an HA scenario needs lab.ha.HaFleet"
    return f


def path_states(f: Fleet, watch: IngressWatch, since: float, until: float) -> dict[tuple[str, str], list[str]]:
    """Per (transit, POP): the states of its path to the VIP from ``since`` to ``until``
    ("up", "draining": AS path prepended, "gone"), consecutive repeats folded."""
    agent = f.topo.agent_asn
    out: dict[tuple[str, str], list[str]] = {}
    last: dict[str, dict[str, Any]] = {}
    for t, transit, entry in watch.paths:
        if t < since:
            last[transit] = entry
    samples = [(since, tr, e) for tr, e in last.items()] + [(t, tr, e) for t, tr, e in watch.paths
                                                            if since <= t <= until]
    for _, transit, entry in samples:
        states = {p.name: "gone" for p in f.topo.pops}
        for path in entry.get("paths", []):
            asns = [int(a) for a in str(path["aspath"]["string"]).split() if a.isdigit()]
            pop = next((p.name for p in f.topo.pops for a in asns if a == p.asn), None)
            if pop is not None:
                state = "draining" if asns.count(agent) > 1 else "up"
                states[pop] = "up" if "up" in (states[pop], state) else state
        for pop, state in states.items():
            seq = out.setdefault((transit, pop), [])
            if not seq or seq[-1] != state:
                seq.append(state)
    return out


def flaps(states: dict[tuple[str, str], list[str]], allowed: Callable[[str, list[str]], bool]) -> list[str]:
    """The (transit, POP) histories that ``allowed(pop, history)`` does not explain."""
    return [f"{t} / {p}: {' -> '.join(h)}" for (t, p), h in sorted(states.items()) if not allowed(p, h)]


def unchanged(pop: str, history: list[str]) -> bool:
    return len(history) <= 1


def reported_since(f: Fleet, t0: float) -> bool:
    """The leader's status has a report from every POP received after ``t0``."""
    asked = time.time()
    status = f.status()
    return status is not None and all(p["report_age"] is not None and p["report_age"] < asked - t0
                                      for p in status["pops"])


def _kill_leader(f: HaFleet) -> tuple[str, str, float, float]:
    """SIGKILL the leader; once a follower leads: (killed, new leader, when killed, how long
    the new one took to say it leads)."""
    killed = f.leader()
    assert killed is not None, "no leader to kill"
    t_kill = time.time()
    f.kill_controller(killed)
    new = wait_for(lambda: next((n for n in f.leaders() if n != killed), None), 60, interval=0.05,
                   desc="a follower leads")
    return killed, new, t_kill, time.time() - t_kill


def ha1_kill_leader_mid_drain(f: Fleet) -> dict[str, Any]:
    """The leader is SIGKILLed half-way through fra's drain: a follower leads, the drain
    goes on from where it was (same drained_since, fra withdrawn drain_time after the drain
    began), no route flaps at the transits, no request lost beyond the drain's own move."""
    hf = _hf(f)
    assert_clean(f)
    with IngressWatch(f) as watch:
        t0 = time.time()
        hf.operator("POST", "/v1/drains/fra")
        killed = new = ""
        try:
            status = answered_status(f)
            since = next(p["drained_since"] for p in status["pops"] if p["pop"] == "fra")
            assert since is not None
            wait_for(lambda: time.time() >= since + DRAIN_TIME / 4, 10, desc="a quarter of the drain")
            killed, new, t_kill, took = _kill_leader(hf)
            after = answered_status(f)
            resumed = next(p["drained_since"] for p in after["pops"] if p["pop"] == "fra")
            assert resumed == since, f"the new leader {new} has fra drained since {resumed}, not {since}"
            # Reported, not asserted: under load a takeover can come after the drain's end (no
            # leader then withdraws fra); the new leader must then end it from the same
            # drained_since, which the checks here and below hold it to all the same.
            mid_drain = t_kill + took < since + DRAIN_TIME
            wait_for(lambda: not f.announced("fra", VIP), 30, desc="fra withdrawn at the end of its drain")
            withdrawn = time.time()
            time.sleep(0.5)
            until = time.time()
            stats = {c.node: client_stats(f, c.node, t0, until) for c in f.topo.clients}
        finally:
            hf.operator("DELETE", "/v1/drains/fra")
            hf.start_controller()  # the killed one again (a follower now), whatever failed
    assert_clean(f)
    order = ["up", "draining", "gone"]

    def drain_only(pop: str, h: list[str]) -> bool:
        return unchanged(pop, h) or pop == "fra" and all(order.index(a) < order.index(b) for a, b in zip(h, h[1:]))
    states = path_states(f, watch, t0, until)
    fra_transit = f.topo.pop("fra").transit
    assert states[(fra_transit, "fra")] == order, f"{fra_transit} saw fra's path go {states[(fra_transit, 'fra')]}"
    flapped = flaps(states, drain_only)
    assert not flapped, f"route flaps at the transits: {flapped}; {watch.sessions_dropped()}"
    assert withdrawn >= since + DRAIN_TIME - 0.5, "fra was withdrawn before its drain time"
    lost = drain_losses(f, watch, "fra", "c-eu", stats, t0, until)
    assert not lost, f"requests lost: {lost}"
    return {"killed": killed, "new_leader": new, "new_leader_after_kill_s": round(took, 2),
            "new_leader_before_drain_end": mid_drain,
            "lease_ttl_s": LEASE_TTL, "withdrawn_after_drain_start_s": round(withdrawn - since, 2),
            "drain_time_s": DRAIN_TIME, "clients": stats}


def ha2_kill_leader_mid_failback_hold_down(f: Fleet) -> dict[str, Any]:
    """us-west fails (every POP moves the VIP to eu-central), comes back (the failback
    hold-down starts), and the leader is SIGKILLed half-way through it: the new leader
    keeps eu-central until the hold-down that began before the kill ends (not a new one
    from the kill), then fails back; nothing changes at the transits, no request is lost
    from the kill on (but the one a failback may reset)."""
    hf = _hf(f)
    assert_clean(f)
    f.stop_backends("usw")
    try:
        wait_for(lambda: (e := f.explain(NAME)) and not json_cmp(
            e["pops"], [{"pop": p.name, "active_origin": SECONDARY} for p in f.topo.pops]), 30,
            desc=f"every POP planned on {SECONDARY}")
    finally:
        f.start_backends("usw")
    t_up = time.time()
    with IngressWatch(f) as watch:
        try:
            wait_for(lambda: time.time() >= t_up + HOLD_DOWN / 4, 10, desc="a quarter of the hold-down")
            killed, new, t_kill, took = _kill_leader(hf)
            t_new = time.time()
            item = pop_item(answered_explain(f, NAME), "sjc")
            # (if the answer came after the hold-down could have ended, a failback is right:
            # the lower bound on `failback` below holds the new leader to the hold-down then)
            assert item is not None and (item["active_origin"] == SECONDARY or time.time() >= t_up + HOLD_DOWN), \
                f"the new leader failed back at once: {item}"
            def failed_back() -> bool:
                e = f.explain(NAME)
                return all((i := pop_item(e, p.name)) is not None and i["active_origin"] == PRIMARY
                           for p in f.topo.pops)
            wait_for(failed_back, 60, interval=0.1, desc=f"failback to {PRIMARY}")
            failback = time.time()
            def served_by_primary() -> bool:
                # Each client's latest answered request since the failback came from PRIMARY
                # (one must exist: a request reset by the failback answers nothing for its
                # whole timeout, so a short window of "every answer" can be empty).
                return all((ok := [r for r in f.requests(c.node, failback) if r["ok"]])
                           and ok[-1]["origin"] == PRIMARY for c in f.topo.clients)
            wait_for(served_by_primary, 20, desc=f"clients served by {PRIMARY} again")
            until = time.time()
            stats = {c.node: client_stats(f, c.node, t_kill, until) for c in f.topo.clients}
        finally:
            hf.start_controller()  # the killed one again (a follower now), whatever failed
    assert_clean(f)
    # The hold-down began once us-west's backends were back (t_up) or later.
    assert failback >= t_up + HOLD_DOWN - 0.5, f"failback {failback - t_up:.1f}s after us-west came back"
    # A hold-down started again by the new leader would end at t_new + HOLD_DOWN or later.
    assert failback < t_new + HOLD_DOWN, (f"failback at +{failback - t_up:.1f}s after us-west came back: the new "
                                          f"leader {new} restarted the hold-down")
    flapped = flaps(path_states(f, watch, t_kill, until), unchanged)
    assert not flapped, f"route flaps at the transits: {flapped}; {watch.sessions_dropped()}"
    # The failback itself moves each client's traffic to another origin: a request in
    # flight then can be reset (its TCP connection now routed to an origin that never saw
    # it), as at any failback, HA or not; nothing else may fail, before or after.
    lost = []
    for c in f.topo.clients:
        rs = [r for r in f.requests(c.node, t_kill) if r["t"] <= until]
        back = next((r["t"] for r in rs if r["ok"] and r["origin"] == PRIMARY), None)
        lost += [f"{c.node}: never served by {PRIMARY}"] if back is None else move_failures(c.node, rs, 1, back)
    assert not lost, f"requests lost from the kill on: {lost}"
    return {"killed": killed, "new_leader": new, "new_leader_after_kill_s": round(took, 2),
            "failback_after_primary_back_s": round(failback - t_up, 2), "hold_down_s": HOLD_DOWN, "clients": stats}


def ha3_leader_partitioned_from_etcd(f: Fleet) -> dict[str, Any]:
    """The leader's node drops all traffic to and from etcd (nftables): it stops acting as
    leader (503 to everything but status) before another controller starts; never two
    leaders in any sample; agents follow the new one; nothing moves at the transits."""
    hf = _hf(f)
    assert_clean(f)
    old = hf.leader()
    assert old is not None
    etcd = ", ".join(ETCD_MEMBERS.values())
    rule = (f" chain out {{ type filter hook output priority 0; ip daddr {{ {etcd} }} drop; }}\n"
            f" chain in {{ type filter hook input priority 0; ip saddr {{ {etcd} }} drop; }}")
    with IngressWatch(f) as watch, hf.watch_leaders() as leaders:
        wait_for(lambda: any(ls == [old] for _, _, ls in leaders.samples()), 30, desc="the sampler sees the leader")
        t0 = time.time()
        with nft_drop(f, old, rule):
            wait_for(lambda: any(n != old for _, _, ls in leaders.samples() for n in ls), 60, interval=0.05,
                     desc="another controller leads")
            # The new leader holds a report from every POP sent after the cut (an agent's
            # "reachable" metric could still be the old leader's: a long-poll held there).
            wait_for(lambda: reported_since(f, t0), 60, desc="every agent reports to the new leader")
            until = time.time()
        samples = [s for s in leaders.samples() if s[0] >= t0]
        stats = {c.node: client_stats(f, c.node, t0, until) for c in f.topo.clients}
    new = next(n for _, _, ls in samples for n in ls if n != old)
    # Samples are sequential (each asks every controller, then waits for every answer). The
    # old leader had stopped by the end of the first sample that found it not leading (j);
    # the new one was not leading yet when the sample before the first that found it leading
    # (k) asked. Sample j ending before sample k - 1 began proves the order.
    j = next((i for i, (_, _, ls) in enumerate(samples) if old not in ls), None)
    k = next(i for i, (_, _, ls) in enumerate(samples) if new in ls)
    assert j is not None and k >= 1 and j <= k - 2, \
        f"the new leader started before the old one stopped: samples {samples[max(0, (j or 0) - 1):k + 1]}"
    old_stopped, new_started = samples[j][1], samples[k - 1][0]
    assert_clean(f)
    both = [(round(t - t0, 3), ls) for t, _, ls in samples if len(ls) > 1]
    assert not both, f"two leaders at once: {both}"
    flapped = flaps(path_states(f, watch, t0, until), unchanged)
    assert not flapped, f"route flaps at the transits: {flapped}; {watch.sessions_dropped()}"
    assert not unserved(stats), stats
    return {"old_leader": old, "new_leader": new, "old_stopped_after_cut_ms": ms(t0, old_stopped),
            "new_started_after_cut_ms": ms(t0, new_started), "gap_without_leader_ms": ms(old_stopped, new_started),
            "samples": len(samples), "clients": stats}


def ha4_etcd_member_loss(f: Fleet) -> dict[str, Any]:
    """One of three etcd members killed (its raft leader): nothing happens (same controller
    leads, no plan change).
    Then all three: controllers change nothing (no leader, agents keep their plans, the
    no-leader alarm), and when etcd is back a controller resumes without a route flap."""
    hf = _hf(f)
    assert_clean(f)
    leader = hf.leader()
    gens = {p["pop"]: p["plan_generation"] for p in answered_status(f)["pops"]}
    with IngressWatch(f) as watch:
        t0 = time.time()
        # The raft leader, the harder case: the two others elect a new one meanwhile.
        one = wait_for(hf.etcd_raft_leader, 30, desc="etcd's raft leader")
        try:
            hf.kill_etcd(one)
            time.sleep(3 * LEASE_TTL)
            assert hf.leaders() == [leader], f"leaders after one etcd member died: {hf.leaders()}"
            after_one = {p["pop"]: p["plan_generation"] for p in answered_status(f)["pops"]}
            assert after_one == gens, f"plans changed when one etcd member died: {gens} -> {after_one}"
            t_all = time.time()
            for name in ETCD_MEMBERS:
                if name != one:
                    hf.kill_etcd(name)
            wait_for(lambda: not hf.leaders(), 30, desc="no controller leads without etcd")
            no_leader = time.time()
            wait_for(lambda: all(parse(hf.controller_metrics(n)).value("anycast_controller_leader_known") == 0.0
                                 for n in CONTROLLERS), 30, desc="every controller raises the no-leader alarm")
            plans_kept = {p.name: parse(f.agent_metrics(p.name)).value("anycast_vip_announced", vip=NAME)
                          for p in f.topo.pops}
            assert all(v == 1.0 for v in plans_kept.values()), f"an agent withdrew without a controller: {plans_kept}"
        finally:
            for name in ETCD_MEMBERS:
                if not hf.etcd[name].alive():
                    hf.restart_etcd(name)
        wait_for(lambda: hf.leader() is not None, 60, desc="a leader once etcd is back")
        back = time.time()
        assert_clean(f)
        until = time.time()
    flapped = flaps(path_states(f, watch, t0, until), unchanged)
    assert not flapped, f"route flaps at the transits: {flapped}; {watch.sessions_dropped()}"
    stats = {c.node: client_stats(f, c.node, t0, until) for c in f.topo.clients}
    assert not unserved(stats), stats
    return {"etcd_member_killed": one, "no_leader_after_etcd_down_ms": ms(t_all, no_leader), "leader_after_etcd_back_ms": ms(no_leader, back),
            "clients": stats}


SCENARIOS: list[Callable[[Fleet], dict[str, Any]]] = [
    ha1_kill_leader_mid_drain, ha2_kill_leader_mid_failback_hold_down, ha3_leader_partitioned_from_etcd,
    ha4_etcd_member_loss,
]
