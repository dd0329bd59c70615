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
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from .fleet import Fleet
from .metrics import parse
from .netns import LabError, add_addr
from .poll import wait_for
from .scenarios import _anycastctl, _back_to_base, assert_clean, base_commit, change_status, ms, nft_drop
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


def kernel_split(f: Fleet) -> dict[str, Any]:
    """The VIP's route on the POP host as the kernel holds it (``ip -j``): its group id and
    type, the weight and bucket count per next hop, or the single gateway. The agent may
    change it between the three reads (a group deleted after the route named it: "Dump
    terminated"): then ``{"changing": why}``, which no wait accepts, so it polls again."""
    try:
        return _kernel_split(f)
    except (LabError, KeyError) as exc:
        return {"changing": str(exc)}


def _kernel_split(f: Fleet) -> dict[str, Any]:
    host = f.nodes[f.topo.pop(STEER_POP).agent]

    def ip_json(*args: str) -> list[dict[str, Any]]:
        out = host.run(["ip", "-j", *args]).stdout
        return json.loads(out) if out.strip() else []

    routes = ip_json("route", "show", f"{STEER_VIP}/32")
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
    return {"nhid": route["nhid"], "type": group.get("type"),
            "weights": {gateway[m["id"]]: m.get("weight", 1) for m in group["group"]}, "buckets": buckets}


def share(split: dict[str, Any], region: str) -> float:
    total = sum(split["counts"].values()) + split["failed"]
    return float(split["counts"].get(region, 0)) / total if total else 0.0


def controller_weights(f: Fleet) -> dict[str, float]:
    """The controller's effective weight per origin for the VIP at the POP (its metric)."""
    m = parse(f.controller_metrics())
    return {o.region: w for o in f.topo.origins
            if (w := m.value("anycast_controller_origin_weight", vip=STEER_NAME, pop=STEER_POP, origin=o.region))
            is not None}


def wait_path_ready(f: Fleet, client: subprocess.Popen[str]) -> None:
    """Wait until the client's traffic can reach the VIP, before measuring it. The routers'
    BGP tables (what ``announced`` and ``ingress`` read) lead their FIBs: a measurement
    started on the RIB alone lost its first SYNs to "no route" (2 of 1,000 in CI). So: the
    route in the FIB of every router on the way (the client's transit and the POP's router),
    then a probe of real connections that all get an answer."""
    transit = next(c.transit for c in f.topo.clients if c.node == STEER_CLIENT)
    hops = (transit, f.topo.pop(STEER_POP).router)
    wait_for(lambda: all(f.routers[h].fib_has(f"{STEER_VIP}/32") for h in hops), 30,
             desc=f"{STEER_VIP}/32 in the FIB of {', '.join(hops)}")
    wait_for(lambda: (p := client_do(client, f"split {PROBE}"))["failed"] == 0 and sum(p["counts"].values()) == PROBE,
             60, interval=0.5, desc=f"{PROBE} probe connections from {STEER_CLIENT} all answered")


@contextmanager
def steered_traffic(f: Fleet) -> Iterator[subprocess.Popen[str]]:
    """The VIP on the origins' loopbacks, a line server on each origin and the POP host's L4
    hash (README: set it where the split route is); yields the client. All undone on exit."""
    host = f.nodes[f.topo.pop(STEER_POP).agent]
    hash_key = "net.ipv4.fib_multipath_hash_policy"
    old_hash = host.run(["sysctl", "-n", hash_key]).stdout.strip()
    with ExitStack() as undo:
        host.sysctl({hash_key: "1"})
        undo.callback(host.sysctl, {hash_key: old_hash})
        for o in f.topo.origins:
            ns = f.nodes[o.node]
            add_addr(ns, "lo", f"{STEER_VIP}/32")
            undo.callback(ns.run, ["ip", "addr", "del", f"{STEER_VIP}/32", "dev", "lo"], check=False)
            server = ns.popen([sys.executable, "-c", SERVER, o.region, "0.0.0.0", str(STEER_PORT)],
                              stdout=subprocess.PIPE, text=True)
            undo.callback(ns.terminate, server.pid)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready", o.node
        cl = f.nodes[STEER_CLIENT]
        old_rehash = cl.run(["sysctl", "-n", NO_TXREHASH[0]]).stdout.strip()
        cl.sysctl(dict([NO_TXREHASH]))  # a connection keeps its hash, so its path (lab.steering)
        undo.callback(cl.sysctl, {NO_TXREHASH[0]: old_rehash})
        # Generous timeouts: on a loaded machine a slow answer is not a lost connection.
        client = cl.popen([sys.executable, "-c", CLIENT, STEER_VIP, str(STEER_PORT), "10", "5"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        undo.callback(cl.terminate, client.pid)
        yield client


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
                    wait_for(lambda: kernel_split(f) == {"gateway": origins[HEAVY]}, 30,
                             desc=f"fra's route to {STEER_NAME} only via {HEAVY}")
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
