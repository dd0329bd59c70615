"""Traffic steering in the full lab (issue 18): a VIP split 3:1 between two origins at one
POP by ``steering.weights``, measured from the POP host's kernel and from client traffic.

The scenario adds its own VIP by a commit (a revision that withdraws nothing is applied at
once) and removes it by resetting to the base commit, so the other scenarios' fleet and
base config stay as they are. Traffic is lab.steering's: a line server on port 8090 of each
origin that answers every line with its region, and a client in ``c-eu`` holding long-lived
connections through the VIP (each asked every half second, so the kernel sees it busy) and
opening short ones to measure the split of new connections.

What a user notices, asserted: the split (kernel weights and buckets, and client shares in
a tolerant band); a dial change (``anycastctl dial``) keeps every established connection
and moves new ones to the new split; an origin failing at the POP gets weight 0, the other
carries every new connection, and the connections on the surviving origin are kept.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import yaml

from .fleet import Fleet
from .metrics import parse
from .netns import LabError, add_addr
from .poll import wait_for, wait_for_equal
from .scenarios import (API_NAME, IngressWatch, _anycastctl, _back_to_base, _slim, assert_clean, base_commit,
                        change_status, ms, nft_drop)
from .steering import CLIENT, NO_TXREHASH, SERVER, client_do, survival

STEER_VIP, STEER_NAME, STEER_PORT = "198.51.100.30", "steer-fra", 8090
STEER_POP, STEER_CLIENT = "fra", "c-eu"
HEAVY, LIGHT = "us-west", "eu-central"  # weights 3 and 1
LONG_LIVED, NEW_CONNECTIONS, KEEP_EVERY = 64, 1000, 0.5
PROBE = 16  # connections that must all be answered before a measurement starts
BAND = 0.07  # client shares: 128 buckets, the L4 hash over 1,000 connections (sd ~1.4 %)


def steered_vip(f: Fleet) -> dict[str, Any]:
    """The scenario's VIP (vips.yaml): published at fra only, TCP checks on the line servers."""
    origins = {o.region: o for o in f.topo.origins}
    return {"name": STEER_NAME, "address": f"{STEER_VIP}/32", "publish": [STEER_POP],
            "check": {"type": "tcp", "interval": 0.2, "timeout": 0.15, "rise": 2, "fall": 2},
            "origins": [{"region": r, "next_hop": origins[r].address,
                         "backends": [f"{origins[r].address}:{STEER_PORT}"]} for r in (HEAVY, LIGHT)],
            "steering": {"weights": {HEAVY: 3, LIGHT: 1}}}


def kernel_split(f: Fleet, pop: str = STEER_POP, vip: str = STEER_VIP) -> dict[str, Any]:
    """The VIP's route on the POP host as the kernel holds it (``ip -j``): its group id and
    type, the weight and bucket count per next hop, or the single gateway. The agent may
    change it between the three reads (a group deleted after the route named it: "Dump
    terminated"): then ``{"changing": why}``, which no wait accepts, so it polls again."""
    try:
        return _kernel_split(f, pop, vip)
    except (LabError, KeyError) as exc:
        return {"changing": str(exc)}


def _kernel_split(f: Fleet, pop: str, vip: str) -> dict[str, Any]:
    host = f.nodes[f.topo.pop(pop).agent]

    def ip_json(*args: str) -> list[dict[str, Any]]:
        out = host.run(["ip", "-j", *args]).stdout
        return json.loads(out) if out.strip() else []

    routes = ip_json("route", "show", f"{vip}/32")
    if not routes:
        return {}
    route = routes[0]
    if "nhid" not in route:
        return {"gateway": route.get("gateway")}
    objects = {n["id"]: n for n in ip_json("nexthop", "show")}
    group = objects[route["nhid"]]
    gateway = {m["id"]: objects[m["id"]]["gateway"] for m in group["group"]}
    buckets: dict[str, int] = {}
    for b in ip_json("nexthop", "bucket", "show", "id", str(route["nhid"])):
        gw = gateway[b["bucket"]["nhid"]]
        buckets[gw] = buckets.get(gw, 0) + 1
    weights: dict[str, int] = {}
    for m in group["group"]:  # (summed per gateway: a single path's group has it twice, see single_path)
        weights[gateway[m["id"]]] = weights.get(gateway[m["id"]], 0) + m.get("weight", 1)
    return {"nhid": route["nhid"], "type": group.get("type"), "weights": weights, "buckets": buckets}


def single_path(split: dict[str, Any], address: str, nhid: int) -> bool:
    """Whether the VIP's route sends everything to ``address`` through its group ``nhid``, kept
    while it is down to one next hop (that next hop and a shadow of it that owns no bucket:
    controller/kernel/netlink.py), so that a region's return moves idle buckets only."""
    return (split.get("nhid") == nhid and split.get("buckets") == {address: 128}
            and set(split.get("weights", {})) == {address})


def share(split: dict[str, Any], region: str) -> float:
    total = sum(split["counts"].values()) + split["failed"]
    return float(split["counts"].get(region, 0)) / total if total else 0.0


def controller_weights(f: Fleet, name: str = STEER_NAME, pop: str = STEER_POP) -> dict[str, float]:
    """The controller's effective weight per origin for the VIP at the POP (its metric)."""
    m = parse(f.controller_metrics())
    return {o.region: w for o in f.topo.origins
            if (w := m.value("anycast_controller_origin_weight", vip=name, pop=pop, origin=o.region)) is not None}


def wait_path_ready(f: Fleet, client: subprocess.Popen[str], node: str = STEER_CLIENT, pop: str = STEER_POP,
                    vip: str = STEER_VIP, origins: frozenset[str] | None = None) -> None:
    """Wait until the client's traffic can reach the VIP, before measuring it. The routers'
    BGP tables (what ``announced`` and ``ingress`` read) lead their FIBs: a measurement
    started on the RIB alone lost its first SYNs to "no route" (2 of 1,000 in CI). So: the
    route in the FIB of every router on the way (the client's transit and the POP's router),
    then a probe of real connections that all get an answer (from ``origins`` only, if given)."""
    transit = next(c.transit for c in f.topo.clients if c.node == node)
    hops = (transit, f.topo.pop(pop).router)
    wait_for(lambda: all(f.routers[h].fib_has(f"{vip}/32") for h in hops), 30,
             desc=f"{vip}/32 in the FIB of {', '.join(hops)}")
    wait_for(lambda: (p := client_do(client, f"split {PROBE}"))["failed"] == 0 and sum(p["counts"].values()) == PROBE
             and (origins is None or set(p["counts"]) <= origins),
             60, interval=0.5, desc=f"{PROBE} probe connections from {node} all answered"
                                    + (f" by {', '.join(sorted(origins))}" if origins else ""))


@contextmanager
def steered_traffic(f: Fleet) -> Iterator[subprocess.Popen[str]]:
    """s14's traffic (steered_clients): STEER_VIP from STEER_CLIENT, split at STEER_POP."""
    with steered_clients(f, STEER_VIP, (STEER_POP,), (STEER_CLIENT,)) as clients:
        yield clients[STEER_CLIENT]


@contextmanager
def steered_clients(f: Fleet, vip: str, pops: tuple[str, ...],
                    clients: tuple[str, ...]) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """The VIP on the origins' loopbacks, a line server on each origin and the L4 hash on
    the hosts of ``pops`` (README: set it where the split route is); yields a CLIENT (lab.
    steering) per client node, by node. All undone on exit."""
    hash_key = "net.ipv4.fib_multipath_hash_policy"
    with ExitStack() as undo:
        for pop in pops:
            host = f.nodes[f.topo.pop(pop).agent]
            old_hash = host.run(["sysctl", "-n", hash_key]).stdout.strip()
            host.sysctl({hash_key: "1"})
            undo.callback(host.sysctl, {hash_key: old_hash})
        for o in f.topo.origins:
            ns = f.nodes[o.node]
            add_addr(ns, "lo", f"{vip}/32")
            undo.callback(ns.run, ["ip", "addr", "del", f"{vip}/32", "dev", "lo"], check=False)
            server = ns.popen([sys.executable, "-c", SERVER, o.region, "0.0.0.0", str(STEER_PORT)],
                              stdout=subprocess.PIPE, text=True)
            undo.callback(ns.terminate, server.pid)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready", o.node
        started: dict[str, subprocess.Popen[str]] = {}
        for node in clients:
            cl = f.nodes[node]
            old_rehash = cl.run(["sysctl", "-n", NO_TXREHASH[0]]).stdout.strip()
            cl.sysctl(dict([NO_TXREHASH]))  # a connection keeps its hash, so its path (lab.steering)
            undo.callback(cl.sysctl, {NO_TXREHASH[0]: old_rehash})
            # Generous timeouts: on a loaded machine a slow answer is not a lost connection.
            started[node] = cl.popen([sys.executable, "-c", CLIENT, vip, str(STEER_PORT), "10", "5"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            undo.callback(cl.terminate, started[node].pid)
        yield started


def s14_weighted_split_dial_and_origin_failure(f: Fleet) -> dict[str, Any]:
    """steer-fra is split 3:1 (us-west:eu-central) at fra: fra's host has a resilient group
    (96/32 buckets) and c-eu's new connections split within a few percent of 75/25. With 64
    long-lived connections open, ``anycastctl dial us-west 33`` makes it 99:100 in place (same
    group): every connection is kept, and new ones split about 50/50 once idle buckets
    moved. Then fra's checks of eu-central fail: its weight goes to 0 (controller and
    kernel), every new connection goes to us-west, none fails, and every connection on
    us-west is kept (those on eu-central are the ones that cannot be)."""
    assert_clean(f)
    base = base_commit(f)
    origins = {o.region: o.address for o in f.topo.origins}
    out: dict[str, Any] = {}
    try:
        with steered_traffic(f) as client:
            f.edit_controller_yaml("vips.yaml", lambda d: d["vips"].append(steered_vip(f)))
            t0 = time.time()
            f.commit(f"{STEER_NAME}: split 3:1 at {STEER_POP}")
            first = wait_for(lambda: (k := kernel_split(f)).get("weights") == {origins[HEAVY]: 3, origins[LIGHT]: 1}
                             and f.announced(STEER_POP, STEER_VIP) and f.ingress(STEER_CLIENT, STEER_VIP) == STEER_POP
                             and k, 60, desc=f"{STEER_NAME} announced at {STEER_POP} with a 3:1 group, "
                                             f"{STEER_CLIENT}'s transit routing it there")
            out["commit_to_announced_ms"] = ms(t0, time.time())
            wait_path_ready(f, client)
            assert first["type"] == "resilient" and sum(first["buckets"].values()) == 128, first
            assert abs(first["buckets"][origins[HEAVY]] - 96) <= 4, first
            split = client_do(client, f"split {NEW_CONNECTIONS}")
            assert split["failed"] == 0 and abs(share(split, HEAVY) - 0.75) < BAND, split
            out["split_3_1"] = split

            before = client_do(client, f"open {LONG_LIVED} {KEEP_EVERY}")["origins"]
            assert None not in before and set(before) == {HEAVY, LIGHT}, before
            t_dial = time.time()
            _anycastctl(f, "dial", HEAVY, "33", "--why", "lab: s14 weight change", "--by", "lab")
            try:
                dialed = wait_for(lambda: (k := kernel_split(f)).get("weights") == {origins[HEAVY]: 99,
                                                                                   origins[LIGHT]: 100} and k,
                                  30, desc="the group at 99:100 after the dial")
                out["dial_to_kernel_ms"] = ms(t_dial, time.time())
                assert dialed["nhid"] == first["nhid"], (first, dialed)  # replaced in place
                assert controller_weights(f) == {HEAVY: 99.0, LIGHT: 100.0}
                # Idle buckets move once idle for the group's idle timer (10 s); busy ones stay.
                rebalanced = wait_for(lambda: (k := kernel_split(f)).get("buckets", {}).get(origins[LIGHT], 0) >= 63
                                      and k,
                                      90, interval=0.5, desc="eu-central holds its 64 of 128 buckets, or 63")
                out["dial_to_rebalanced_ms"] = ms(t_dial, time.time())
                asked = client_do(client, "ask")
                kept = survival(before, asked["origins"], stable=asked["stable"])
                assert kept["survived"] == kept["connections"] == LONG_LIVED, kept
                out["dial_connections"] = kept
                split = client_do(client, f"split {NEW_CONNECTIONS}")
                assert split["failed"] == 0 and abs(share(split, HEAVY) - 0.5) < BAND, (split, rebalanced)
                out["split_after_dial"] = split

                before = client_do(client, f"open {LONG_LIVED} {KEEP_EVERY}")["origins"]
                assert None not in before and set(before) == {HEAVY, LIGHT}, before
                cut = f" chain out {{ type filter hook output priority 0; ip daddr {origins[LIGHT]} " \
                      f"tcp dport {STEER_PORT} drop; }}"
                with nft_drop(f, f.topo.pop(STEER_POP).agent, cut, table="labsteer"):
                    t_fail = time.time()
                    wait_for(lambda: single_path(kernel_split(f), origins[HEAVY], first["nhid"]), 30,
                             desc=f"fra's route to {STEER_NAME} only via {HEAVY}, through its group")
                    out["failure_to_kernel_ms"] = ms(t_fail, time.time())
                    wait_for(lambda: controller_weights(f).get(LIGHT) == 0.0, 30,
                             desc=f"{LIGHT}'s weight 0 at the controller")
                    asked = client_do(client, "ask")
                    lost = survival(before, asked["origins"], frozenset({LIGHT}), asked["stable"])
                    assert lost["broken"] == 0 and lost["survived"] == before.count(HEAVY) > 0, lost
                    out["failure_connections"] = lost
                    split = client_do(client, f"split {NEW_CONNECTIONS}")
                    assert split == {"counts": {HEAVY: NEW_CONNECTIONS}, "failed": 0}, split
                    out["split_after_failure"] = split
                wait_for(lambda: (k := kernel_split(f)).get("weights") == {origins[HEAVY]: 99, origins[LIGHT]: 100}
                         and k, 60, desc=f"{LIGHT} back in the group after the failback hold-down")
            finally:
                _anycastctl(f, "dial", HEAVY, "--config")
    finally:
        _back_to_base(f, base)
    wait_for(lambda: change_status(f).get("phase") == "steady" and not f.announced(STEER_POP, STEER_VIP)
             and not kernel_split(f), 60, desc=f"{STEER_NAME} removed again")
    assert_clean(f)
    return out


# --- s15, s16: per-POP preference, a dial to 0 and back, the split over thousands ---------------
PREF_VIP, PREF_NAME = "198.51.100.31", "steer-pref"
# Published at two POPs of three: removing it (back to the base) then withdraws 2 of the 9
# announced (VIP, POP) pairs, within the change budget (25 %), so it is applied at once; at
# all three it would be 3 of 10, and held.
PREFERS = {"fra": LIGHT, "sjc": HEAVY}  # fra: eu-central first, sjc: us-west first
SERVED = 400  # new connections of a measurement, per client
SIGMAS = 5.0  # the split's band, in binomial standard deviations (a false alarm about 1 run in 10^6)


def preferred_vip(f: Fleet) -> dict[str, Any]:
    """steer-pref (vips.yaml): at fra, preferring eu-central, and sjc, preferring us-west
    (each by a preference; the VIP's own order is us-west first)."""
    vip = steered_vip(f)
    fallback = {LIGHT: HEAVY, HEAVY: LIGHT}
    return {**vip, "name": PREF_NAME, "address": f"{PREF_VIP}/32", "publish": list(PREFERS),
            "steering": {"preference": [{"pops": [pop], "origins": [PREFERS[pop], fallback[PREFERS[pop]]]}
                                        for pop in PREFERS]}}


def entry_pop(f: Fleet, client: str) -> str:
    return f.nearest(next(c for c in f.topo.clients if c.node == client))


def explain_origins(f: Fleet, name: str) -> dict[str, Any]:
    """Per POP of /v1/explain/{name}: the origin it sends to, its weights, and whether it is
    wanted and announced ({} if the controller does not answer)."""
    e = f.explain(name) or {}
    return {p["pop"]: {k: p[k] for k in ("active_origin", "weights", "wanted", "announced")}
            for p in e.get("pops", [])}


def split_band(split: dict[str, Any], kernel: dict[str, Any], heavy_address: str) -> dict[str, Any]:
    """The heavy origin's client share of a split against the kernel's: its buckets' share
    of the group. Each new connection's L4 hash picks a bucket uniformly (the client's
    source ports vary), so its count is binomial: the band is SIGMAS standard deviations."""
    n = sum(split["counts"].values()) + split["failed"]
    p = kernel["buckets"][heavy_address] / sum(kernel["buckets"].values())
    band = SIGMAS * (p * (1 - p) / n) ** 0.5
    got = share(split, HEAVY)
    return {"connections": n, "share": round(got, 4), "bucket_share": round(p, 4), "band": round(band, 4),
            "within": abs(got - p) <= band}


def s15_per_pop_preference(f: Fleet) -> dict[str, Any]:
    """steer-pref is published at fra, preferring eu-central, and sjc, preferring us-west.
    Both healthy: c-eu (entering at fra) is served by eu-central and c-na (sjc) by us-west,
    as /v1/explain and each POP host's route say. Then eu-central fails for the VIP (its
    line server's port dropped at the origin): fra falls back along its own order to
    us-west, sjc stays on us-west and every connection c-na held through sjc is kept. Once
    eu-central is back, fra returns to it after the failback hold-down."""
    assert_clean(f)
    base = base_commit(f)
    origins = {o.region: o.address for o in f.topo.origins}
    clients = tuple(c.node for c in f.topo.clients if f.nearest(c) in PREFERS)
    out: dict[str, Any] = {}

    def expected(prefers: dict[str, str]) -> dict[str, Any]:
        return {pop: {"active_origin": o, "weights": [], "wanted": True, "announced": True} for pop, o in prefers.items()}

    def served(conns: dict[str, subprocess.Popen[str]], prefers: dict[str, str]) -> dict[str, Any]:
        """SERVED new connections per client, each asserted on the origin its POP prefers."""
        got = {}
        for node, conn in conns.items():
            split = client_do(conn, f"split {SERVED}")
            assert split == {"counts": {prefers[entry_pop(f, node)]: SERVED}, "failed": 0}, (node, split)
            got[node] = split
        return got

    def routed(conns: dict[str, subprocess.Popen[str]], prefers: dict[str, str], desc: str) -> None:
        """Plan, POP hosts' routes and every client's real traffic as ``prefers`` says."""
        wait_for(lambda: explain_origins(f, PREF_NAME) == expected(prefers), 60, desc=f"/v1/explain: {desc}")
        for pop, origin in prefers.items():
            wait_for_equal(partial(kernel_split, f, pop, PREF_VIP), {"gateway": origins[origin]}, 30,
                           desc=f"{pop}'s host routes {PREF_NAME} via {origin}")
        for node, conn in conns.items():
            wait_path_ready(f, conn, node, entry_pop(f, node), PREF_VIP, frozenset({prefers[entry_pop(f, node)]}))

    try:
        with steered_clients(f, PREF_VIP, (), clients) as conns:
            f.edit_controller_yaml("vips.yaml", lambda d: d["vips"].append(preferred_vip(f)))
            t0 = time.time()
            f.commit(f"{PREF_NAME}: fra prefers {LIGHT}, sjc {HEAVY}")
            wait_for(lambda: all(f.announced(pop, PREF_VIP) for pop in PREFERS)
                     and all(f.ingress(c, PREF_VIP) == entry_pop(f, c) for c in clients), 60,
                     desc=f"{PREF_NAME} announced at fra and sjc, c-eu's and c-na's transits routing it there")
            routed(conns, PREFERS, "fra on eu-central, sjc on us-west")
            out["commit_to_served_ms"] = ms(t0, time.time())
            out["both_healthy"] = served(conns, PREFERS)

            before = client_do(conns["c-na"], "open 16")
            assert before["failed"] == 0 and set(before["origins"]) == {HEAVY}, before
            fell_back = {**PREFERS, "fra": HEAVY}
            cut = f" chain in {{ type filter hook input priority 0; tcp dport {STEER_PORT} drop; }}"
            with nft_drop(f, next(o.node for o in f.topo.origins if o.region == LIGHT), cut, table="labsteer"):
                t_fail = time.time()
                routed(conns, fell_back, "fra fell back to us-west, sjc kept it")
                out["failure_to_served_ms"] = ms(t_fail, time.time())
                out["eu_central_down"] = served(conns, fell_back)
                asked = client_do(conns["c-na"], "ask")
                kept = survival(before["origins"], asked["origins"], stable=asked["stable"])
                assert kept["survived"] == kept["connections"] == 16, kept
                out["sjc_connections"] = kept
                t_back = time.time()
            routed(conns, PREFERS, "fra back on eu-central after the failback hold-down")
            out["restore_to_failback_ms"] = ms(t_back, time.time())
            out["failed_back"] = served(conns, PREFERS)
    finally:
        _back_to_base(f, base)
    wait_for(lambda: change_status(f).get("phase") == "steady"
             and not any(f.announced(pop, PREF_VIP) or kernel_split(f, pop, PREF_VIP) for pop in PREFERS),
             60, desc=f"{PREF_NAME} removed again")
    assert_clean(f)
    return out


MEASURED = 4000  # new connections of the 3:1 split: its binomial band is about +-3.4 %


def s16_dial_drains_a_region_and_split_over_thousands(f: Fleet) -> dict[str, Any]:
    """steer-fra split 3:1 at fra again: over 4,000 new connections c-eu's share on us-west
    is within SIGMAS binomial deviations of the group's bucket share (96 of 128, 75 %, give
    or take the kernel's rounding). ``anycastctl dial eu-central 0``: fra's host routes the
    VIP via us-west alone, every new connection goes there, none fails, every busy
    connection on us-west is kept (those on eu-central are cut at once: a POP routes, it
    keeps no flow state, so a dial of 0 is a move, not a connection drain), and BGP does
    not change (the transits' paths, fra's router's path from its agent). Dialing back
    (``--config``) restores the 3:1 split in the same group (kept through the drain): every
    connection opened while drained is kept, eu-central gets idle buckets only."""
    assert_clean(f)
    base = base_commit(f)
    origins = {o.region: o.address for o in f.topo.origins}
    three_to_one = {origins[HEAVY]: 3, origins[LIGHT]: 1}
    pop = f.topo.pop(STEER_POP)
    out: dict[str, Any] = {}

    def from_agent() -> dict[str, Any]:
        return _slim(f.routers[pop.router].bgp_route(f"{STEER_VIP}/32"))

    try:
        with steered_traffic(f) as client:
            f.edit_controller_yaml("vips.yaml", lambda d: d["vips"].append(steered_vip(f)))
            f.commit(f"{STEER_NAME}: split 3:1 at {STEER_POP}")
            first = wait_for(lambda: (k := kernel_split(f)).get("weights") == three_to_one
                             and f.announced(STEER_POP, STEER_VIP) and f.ingress(STEER_CLIENT, STEER_VIP) == STEER_POP
                             and k, 60, desc=f"{STEER_NAME} announced at {STEER_POP} with a 3:1 group")
            wait_path_ready(f, client)
            split = client_do(client, f"split {MEASURED}")
            band = split_band(split, first, origins[HEAVY])
            assert split["failed"] == 0 and band["within"], (split, band, first)
            assert abs(band["bucket_share"] - 0.75) <= 4 / 128 and abs(band["share"] - 0.75) < BAND, (band, first)
            out["split_3_1"] = {**split, **band}

            with IngressWatch(f, STEER_VIP) as watch:
                bgp_before = from_agent()
                assert bgp_before["paths"], bgp_before
                before = client_do(client, f"open {LONG_LIVED} {KEEP_EVERY}")["origins"]
                assert None not in before and set(before) == {HEAVY, LIGHT}, before
                t_dial = time.time()
                # Forced: the dial moves api-eu off eu-central at fra and sjc too, more than the
                # lab's change budget (README: a dial that moves too much is refused with 409).
                _anycastctl(f, "dial", LIGHT, "0", "--force", "--why", "lab: s16 drain", "--by", "lab")
                try:
                    wait_for(lambda: single_path(kernel_split(f), origins[HEAVY], first["nhid"]), 30,
                             desc=f"fra's route to {STEER_NAME} only via {HEAVY} after the dial, through its group")
                    out["dial_to_kernel_ms"] = ms(t_dial, time.time())
                    wait_for(lambda: controller_weights(f).get(LIGHT) == 0.0
                             and explain_origins(f, STEER_NAME).get(STEER_POP, {}).get("active_origin") == HEAVY, 30,
                             desc=f"{LIGHT}'s weight 0 at the controller")
                    asked = client_do(client, "ask")
                    drained = survival(before, asked["origins"], frozenset({LIGHT}), asked["stable"])
                    assert drained["broken"] == 0 and drained["survived"] == before.count(HEAVY) > 0, drained
                    cut = [a for b, a in zip(before, asked["origins"]) if b == LIGHT]
                    assert cut and set(cut) == {None}, cut  # cut, not left half-open nor served by us-west
                    out["dial_connections"] = drained
                    split = client_do(client, f"split {NEW_CONNECTIONS}")
                    assert split == {"counts": {HEAVY: NEW_CONNECTIONS}, "failed": 0}, split
                    out["split_at_dial_0"] = split
                    planned = explain_origins(f, API_NAME)
                    assert {p: e["active_origin"] for p, e in planned.items()} == {"fra": HEAVY, "sjc": HEAVY}, planned
                    assert all(e["wanted"] and e["announced"] for e in planned.values()), planned
                    during = client_do(client, f"open {LONG_LIVED} {KEEP_EVERY}")["origins"]
                    assert during == [HEAVY] * LONG_LIVED, during
                finally:
                    t_back = time.time()
                    _anycastctl(f, "dial", LIGHT, "--config", "--force")  # moves api-eu back, forced too
                back = wait_for(lambda: (k := kernel_split(f)).get("weights") == three_to_one and k, 60,
                                desc=f"{LIGHT} back in fra's group after the failback hold-down")
                out["dial_back_to_kernel_ms"] = ms(t_back, time.time())
                assert back["nhid"] == first["nhid"], (first, back)  # the same group, members replaced in place
                # eu-central takes idle buckets only, once idle for the group's idle timer (10 s):
                # the busy ones of the connections opened during the drain stay on us-west.
                back = wait_for(lambda: (k := kernel_split(f)).get("buckets", {}).get(origins[LIGHT]) == 32 and k,
                                90, interval=0.5, desc=f"{LIGHT} holds its 32 of 128 buckets again")
                out["dial_back_to_rebalanced_ms"] = ms(t_back, time.time())
                wait_path_ready(f, client)
                asked = client_do(client, "ask")
                kept = survival(during, asked["origins"], stable=asked["stable"])
                assert kept["survived"] == kept["connections"] == LONG_LIVED, kept  # (a new group reset 12-18)
                out["dial_back_connections"] = kept
                bgp_after = from_agent()
            split = client_do(client, f"split {NEW_CONNECTIONS * 2}")
            band = split_band(split, back, origins[HEAVY])
            assert split["failed"] == 0 and band["within"], (split, band, back)
            out["split_after_dial_back"] = {**split, **band}
            assert bgp_after == bgp_before, (bgp_before, bgp_after)
            moved = [(t, c, p) for t, c, p in watch.changes if t >= t_dial]
            assert not moved and {c for _, c, _ in watch.changes} == {c.node for c in f.topo.clients}, watch.changes
            changed = [(t, n, e) for t, n, e in watch.paths if t >= t_dial]
            assert not changed and {n for _, n, _ in watch.paths} == {t.node for t in f.topo.transits}, watch.paths
    finally:
        _anycastctl(f, "dial", LIGHT, "--config", "--force")  # (again: a failure before the dial back)
        _back_to_base(f, base)
    wait_for(lambda: change_status(f).get("phase") == "steady" and not f.announced(STEER_POP, STEER_VIP)
             and not kernel_split(f), 60, desc=f"{STEER_NAME} removed again")
    assert_clean(f)
    return out


# --- s17: a preferring POP's settle ends on the others' fresh checks of its own origin --------------
EARLY_VIP, EARLY_NAME = "198.51.100.32", "steer-early"
FIXED_VIP, FIXED_NAME = "198.51.100.33", "steer-fixed"
WIDE_SETTLE = 60.0  # the most safety.settle may be: only the evidence can end it within the scenario


def settle_twin(f: Fleet, name: str, address: str, on_evidence: bool) -> dict[str, Any]:
    """steer-pref's shape (fra prefers eu-central, sjc us-west) with a settle window of
    WIDE_SETTLE, ended early on evidence or not (``on_evidence``), as the VIP's own policy."""
    return {**preferred_vip(f), "name": name, "address": f"{address}/32",
            "policy": {"safety": {"settle": WIDE_SETTLE, "settle_on_evidence": on_evidence}}}


@contextmanager
def agent_confirm_timeout(f: Fleet, pop: str, seconds: float) -> Iterator[None]:
    """``controller.confirm_timeout`` of ``pop``'s agent set (SIGHUP) for the block, then
    its default again: how long the agent keeps announcing while it waits for the answer."""
    def reload(edit: Any) -> None:
        node = f.agents[pop]
        data = yaml.safe_load(node.config.read_text())
        edit(data["controller"])
        node.config.write_text(yaml.safe_dump(data, sort_keys=False))
        done = parse(f.agent_metrics(pop)).total("anycast_config_reloads_total", result="success")
        node.signal_agent(signal.SIGHUP)
        wait_for(lambda: parse(f.agent_metrics(pop)).total("anycast_config_reloads_total", result="success") > done,
                 60, interval=0.2, desc=f"{pop}'s agent reloaded its config")

    reload(lambda c: c.__setitem__("confirm_timeout", seconds))
    try:
        yield
    finally:
        reload(lambda c: c.pop("confirm_timeout", None))


def pop_state(f: Fleet, name: str, pop: str) -> dict[str, Any]:
    """The controller's reason and active origin for (VIP, POP) (/v1/explain), and whether
    the POP's router has the VIP from its agent (vtysh json)."""
    e: dict[str, Any] = next((p for p in (f.explain(name) or {}).get("pops", []) if p["pop"] == pop), {})
    address = EARLY_VIP if name == EARLY_NAME else FIXED_VIP
    return {"reason": e.get("reason"), "active_origin": e.get("active_origin"), "announced": f.announced(pop, address)}


def s17_preferring_pops_settle_ends_on_the_others_fresh_checks(f: Fleet) -> dict[str, Any]:
    """Two VIPs alike (fra prefers eu-central, sjc us-west), both with a 60 s settle window;
    steer-early's ends on evidence, steer-fixed's does not (``settle_on_evidence: false``);
    fra's agent waits up to 60 s for the controller's answer. fra's checks of eu-central fail
    (its host drops them; us-west stays healthy there): the controller asks sjc about
    eu-central by name, sjc's fresh success of it ends steer-early's window, and fra
    withdraws steer-early (``backend_down``, gone from fra's router) while steer-fixed, the
    same failure under the fixed window, is still ``confirming`` and announced there. sjc
    keeps both, on us-west. Healed, fra announces both again."""
    assert_clean(f)
    base = base_commit(f)
    origins = {o.region: o.address for o in f.topo.origins}
    healthy = {"fra": {"reason": "healthy", "active_origin": LIGHT, "announced": True},
               "sjc": {"reason": "healthy", "active_origin": HEAVY, "announced": True}}
    out: dict[str, Any] = {}

    def states() -> dict[str, dict[str, Any]]:
        return {name: {pop: pop_state(f, name, pop) for pop in PREFERS} for name in (EARLY_NAME, FIXED_NAME)}

    try:
        with steered_clients(f, EARLY_VIP, (), ()), agent_confirm_timeout(f, STEER_POP, WIDE_SETTLE):
            f.edit_controller_yaml("vips.yaml", lambda d: d["vips"].extend(
                [settle_twin(f, EARLY_NAME, EARLY_VIP, True), settle_twin(f, FIXED_NAME, FIXED_VIP, False)]))
            f.commit(f"{EARLY_NAME}, {FIXED_NAME}: settle {WIDE_SETTLE:g} s, on evidence or not")
            # Announced first: /v1/explain answers 404 for a VIP the controller has not loaded yet.
            wait_for(lambda: all(f.announced(pop, a) for pop in PREFERS for a in (EARLY_VIP, FIXED_VIP)), 90,
                     interval=0.2, desc="both VIPs announced at fra and sjc")
            wait_for(lambda: states() == {EARLY_NAME: healthy, FIXED_NAME: healthy}, 90, interval=0.2,
                     desc="both VIPs healthy and announced at fra (eu-central) and sjc (us-west)")
            cut = f" chain out {{ type filter hook output priority 0; ip daddr {origins[LIGHT]} " \
                  f"tcp dport {STEER_PORT} drop; }}"
            with nft_drop(f, f.topo.pop(STEER_POP).agent, cut, table="labsteer"):
                t_cut = time.time()
                wait_for(lambda: pop_state(f, EARLY_NAME, STEER_POP) == {"reason": "backend_down",
                                                                      "active_origin": LIGHT, "announced": False},
                         WIDE_SETTLE * 2, interval=0.1, desc=f"fra withdraws {EARLY_NAME} on sjc's evidence")
                out["cut_to_withdrawn_ms"] = ms(t_cut, time.time())
                fixed = pop_state(f, FIXED_NAME, STEER_POP)
                # The same failure, the same moment, the fixed window: still confirming, still announced.
                assert fixed == {"reason": "confirming", "active_origin": LIGHT, "announced": True}, (fixed, out)
                sjc = {name: pop_state(f, name, "sjc") for name in (EARLY_NAME, FIXED_NAME)}
                assert sjc == {EARLY_NAME: healthy["sjc"], FIXED_NAME: healthy["sjc"]}, sjc
                m = parse(f.agent_metrics(STEER_POP))
                assert m.value("anycast_vip_state", vip=EARLY_NAME, state="withdrawn") == 1, "fra's agent"
                assert m.value("anycast_vip_state", vip=FIXED_NAME, state="pending") == 1, "fra's agent"
                out["fixed_at_that_moment"] = fixed
            wait_for(lambda: states() == {EARLY_NAME: healthy, FIXED_NAME: healthy}, 90, interval=0.2,
                     desc="both VIPs healthy and announced at fra again")
            # One VIP per commit: the change budget lets one announced VIP go at a time.
            f.edit_controller_yaml("vips.yaml", lambda d: d.__setitem__(
                "vips", [v for v in d["vips"] if v["name"] != FIXED_NAME]))
            f.commit(f"{FIXED_NAME} removed")
            wait_for(lambda: change_status(f).get("phase") == "steady"
                     and not any(f.announced(pop, FIXED_VIP) for pop in PREFERS), 60, desc=f"{FIXED_NAME} removed")
    finally:
        _back_to_base(f, base)
    wait_for(lambda: change_status(f).get("phase") == "steady"
             and not any(f.announced(pop, a) for pop in PREFERS for a in (EARLY_VIP, FIXED_VIP)),
             60, desc=f"{EARLY_NAME} and {FIXED_NAME} removed again")
    assert_clean(f)
    return out
