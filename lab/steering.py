"""A POP that splits a VIP across origins with the agent's kernel adapter, and clients that
measure it: the split of new connections, and how many established connections survive a
weight change or an origin leaving the group.

Topology (namespaces ``PREFIX-cli``, ``PREFIX-pop``, ``PREFIX-o1`` .. ``-oN``)::

    cli 10.77.0.2 ── 10.77.0.1 pop ── 10.78.K.1 / 10.78.K.2 oK   (the VIP on oK's lo)

``pop`` forwards with ``fib_multipath_hash_policy=1`` (the L4 hash: each TCP connection is
one flow, kept on one path) and holds the VIP's route, installed by
``controller.kernel.netlink.KernelAdapter`` as the agent would. Every origin runs a line
server on VIP:8080 that answers each line with its own name, so a client knows which origin
served it. A connection moved to another origin is reset there (that origin has no socket
for it): that is a connection that did not survive.

``python -m lab.steering [--json PATH]`` runs the measurement (root, under the lab lock) and
prints a table; the integration test asserts on the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from typing import Any

from controller.kernel.diff import KernelRoute, multipath
from controller.kernel.netlink import KernelAdapter
from controller.kernel.nexthop import ResilientSettings

VIP = "198.51.100.77"
VIP6 = "2001:db8:51::77"  # ipv6=True: the same topology over IPv6 (fd77::/64, fd78:K::/64), clients to VIP6
PORT = 8080
NO_TXREHASH = ("net.core.txrehash", "0")  # for client namespaces: see steering_lab

SERVER = r"""
import asyncio, sys
name = sys.argv[1].encode()
async def serve(reader, writer):
    try:
        while await reader.readline():
            writer.write(name + b"\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(serve, sys.argv[2].split(","), int(sys.argv[3]), backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

# Arguments: VIP PORT [CONNECT_TIMEOUT READ_TIMEOUT] (seconds; 3 and 2 by default). Reads
# commands on stdin, answers one JSON line each:
#   open N [KEEP]  N persistent connections, each asked once -> {"origins": [name or null, ...]};
#                  with KEEP (seconds), each is asked again every KEEP s in the background, so its
#                  resilient-group bucket is never idle (an idle bucket may move on a weight change)
#   ask       each open connection asked again -> {"origins": [name or null, ...], "stable": [bool, ...]}
#             (null: reset/timeout; stable: every answer since open came from its first origin)
#   split N   N new connections, one question each -> {"counts": {name: n}, "failed": n}
#             (and "errors": {"connect ConnectionRefusedError": n, "ask eof": n, ...} if any failed)
CLIENT = r"""
import asyncio, json, sys
host, port = sys.argv[1], int(sys.argv[2])
connect_timeout, read_timeout = (float(a) for a in (sys.argv[3:5] if len(sys.argv) > 4 else (3.0, 2.0)))
conns, first, stable, locks, keeper = [], [], [], [], []
def error(errors, where, what):  # errors: {"connect ConnectionRefusedError": n, "ask eof": n, ...}
    if errors is not None:
        errors[f"{where} {what}"] = errors.get(f"{where} {what}", 0) + 1
async def ask(rw, errors=None):
    reader, writer = rw
    try:
        writer.write(b"q\n"); await writer.drain()
        line = await asyncio.wait_for(reader.readline(), read_timeout)
    except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
        error(errors, "ask", type(exc).__name__)
        return None
    if not line.strip():
        error(errors, "ask", "eof")
    return line.decode().strip() or None
async def one(errors=None):
    try:
        rw = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        error(errors, "connect", type(exc).__name__)
        return None, None
    return rw, await ask(rw, errors)
async def ask_i(i):
    async with locks[i]:  # the keeper and a command never interleave on one stream
        o = await ask(conns[i])
    if o is None or o != first[i]:
        stable[i] = False
    return o
async def keep(interval):
    while True:
        await asyncio.sleep(interval)
        await asyncio.gather(*(ask_i(i) for i in range(len(conns))))
async def main():
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        cmd, *arg = line.split()
        if cmd == "open":
            sem = asyncio.Semaphore(64)
            async def guarded():
                async with sem:
                    return await one()
            for task in keeper:
                task.cancel()
            keeper.clear()
            for _, w in conns:
                w.close()
            got = await asyncio.gather(*(guarded() for _ in range(int(arg[0]))))
            conns[:] = [rw for rw, _ in got if rw is not None]
            first[:] = [o for rw, o in got if rw is not None]
            stable[:] = [o is not None for o in first]
            locks[:] = [asyncio.Lock() for _ in conns]
            if len(arg) > 1:
                keeper.append(asyncio.create_task(keep(float(arg[1]))))
            out = {"origins": [o for rw, o in got if rw is not None], "failed": sum(1 for rw, _ in got if rw is None)}
        elif cmd == "ask":
            origins = list(await asyncio.gather(*(ask_i(i) for i in range(len(conns)))))
            out = {"origins": origins, "stable": list(stable)}
        elif cmd == "split":
            counts, failed, errors = {}, 0, {}
            sem = asyncio.Semaphore(64)
            async def single():
                async with sem:
                    rw, o = await one(errors)
                    if rw is not None:
                        rw[1].close()
                    return o
            for o in await asyncio.gather(*(single() for _ in range(int(arg[0])))):
                if o is None:
                    failed += 1
                else:
                    counts[o] = counts.get(o, 0) + 1
            out = {"counts": counts, "failed": failed}
            if errors:
                out["errors"] = dict(errors)
        print(json.dumps(out), flush=True)
asyncio.run(main())
"""


def _sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class SteeringLab:
    prefix: str
    origins: int
    ipv6: bool = False
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    client: subprocess.Popen[str] | None = None

    @property
    def pop(self) -> str:
        return f"{self.prefix}-pop"

    def origin_ns(self, k: int) -> str:
        return f"{self.prefix}-o{k}"

    def next_hop(self, k: int) -> str:
        return f"fd78:{k}::2" if self.ipv6 else f"10.78.{k}.2"

    @property
    def vip(self) -> str:
        return VIP6 if self.ipv6 else VIP

    def route(self, weights: dict[int, int]) -> KernelRoute:
        """The VIP's route split across origins ``k`` by weight (one: a plain route)."""
        return multipath(ip_network(f"{self.vip}/{128 if self.ipv6 else 32}"),
                         [(ip_address(self.next_hop(k)), w) for k, w in weights.items()])

    def client_do(self, command: str) -> dict[str, Any]:
        assert self.client is not None
        return client_do(self.client, command)


def client_do(client: subprocess.Popen[str], command: str) -> dict[str, Any]:
    """One command to a client started with CLIENT (see above) and its JSON answer."""
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(command + "\n")
    client.stdin.flush()
    line = client.stdout.readline()
    if not line:
        raise RuntimeError(f"the client exited ({command})")
    out: dict[str, Any] = json.loads(line)
    return out


@contextmanager
def steering_lab(prefix: str, origins: int = 2, ipv6: bool = False) -> Iterator[SteeringLab]:
    """The topology above, torn down (processes by PID, then the namespaces) pass or fail
    (``ipv6``: IPv6 addresses on every link too, and the client goes to VIP6)."""
    lab = SteeringLab(prefix, origins, ipv6)
    names = [f"{prefix}-cli", lab.pop, *(lab.origin_ns(k) for k in range(1, origins + 1))]
    made: list[str] = []
    try:
        for ns in names:
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        cli, pop = names[0], lab.pop
        _sh("ip", "link", "add", "c0", "netns", cli, "type", "veth", "peer", "name", "p0", "netns", pop)
        _sh("ip", "-n", cli, "addr", "add", "10.77.0.2/24", "dev", "c0")
        _sh("ip", "-n", pop, "addr", "add", "10.77.0.1/24", "dev", "p0")
        for ns, dev in ((cli, "c0"), (pop, "p0")):
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        _sh("ip", "-n", cli, "route", "add", "default", "via", "10.77.0.1")
        # The POP's L4 multipath hash takes a packet's skb hash when it has one, and over
        # veth that is the client socket's own txhash, which TCP re-randomises on a
        # retransmission or a spurious one (a late SYN-ACK on a loaded machine): the same
        # connection would then hash to another bucket, another origin, and be reset. A NIC's
        # RSS hash of the headers does not change so; without rehashing, neither does this one.
        _sh("ip", "netns", "exec", cli, "sysctl", "-qw", f"{NO_TXREHASH[0]}={NO_TXREHASH[1]}")
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1",
                    "net.ipv6.conf.all.forwarding=1", "net.ipv6.fib_multipath_hash_policy=1"):
            _sh("ip", "netns", "exec", pop, "sysctl", "-qw", key)
        if ipv6:  # nodad: usable at once (duplicate address detection would hold them ~2 s)
            _sh("ip", "-n", cli, "addr", "add", "fd77::2/64", "dev", "c0", "nodad")
            _sh("ip", "-n", pop, "addr", "add", "fd77::1/64", "dev", "p0", "nodad")
            _sh("ip", "-n", cli, "-6", "route", "add", "default", "via", "fd77::1")
        for k in range(1, origins + 1):
            ons = lab.origin_ns(k)
            _sh("ip", "link", "add", f"u{k}", "netns", pop, "type", "veth", "peer", "name", "d0", "netns", ons)
            _sh("ip", "-n", pop, "addr", "add", f"10.78.{k}.1/30", "dev", f"u{k}")
            _sh("ip", "-n", ons, "addr", "add", f"10.78.{k}.2/30", "dev", "d0")
            _sh("ip", "-n", pop, "link", "set", f"u{k}", "up")
            _sh("ip", "-n", ons, "link", "set", "d0", "up")
            _sh("ip", "-n", ons, "addr", "add", f"{VIP}/32", "dev", "lo")
            _sh("ip", "-n", ons, "route", "add", "default", "via", f"10.78.{k}.1")
            if ipv6:
                _sh("ip", "-n", pop, "addr", "add", f"fd78:{k}::1/64", "dev", f"u{k}", "nodad")
                _sh("ip", "-n", ons, "addr", "add", f"fd78:{k}::2/64", "dev", "d0", "nodad")
                _sh("ip", "-n", ons, "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad")
                _sh("ip", "-n", ons, "-6", "route", "add", "default", "via", f"fd78:{k}::1")
            server = subprocess.Popen(["ip", "netns", "exec", ons, sys.executable, "-c", SERVER, f"o{k}",
                                       f"{VIP},{VIP6}" if ipv6 else VIP, str(PORT)], stdout=subprocess.PIPE, text=True)
            lab.procs.append(server)
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the server in {ons} did not start")
        lab.client = subprocess.Popen(["ip", "netns", "exec", cli, sys.executable, "-c", CLIENT, lab.vip, str(PORT),
                                       "10", "5"],  # generous timeouts: a loaded machine is slow, not lossy
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.procs.append(lab.client)
        yield lab
    finally:
        for p in lab.procs:
            p.kill()
            p.wait()
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def survival(before: list[str | None], after: list[str | None], gone: frozenset[str] = frozenset(),
             stable: list[bool] | None = None) -> dict[str, int]:
    """Of the connections established before, how many answered from the same origin after
    (``gone``: origins that left; their connections are counted apart, they cannot survive;
    ``stable``: the client's per-connection flag that every answer in between did too)."""
    kept = moved = lost_with_origin = 0
    for i, (b, a) in enumerate(zip(before, after)):
        if b in gone:
            lost_with_origin += 1
        elif a == b and (stable is None or stable[i]):
            kept += 1
        else:
            moved += 1
    return {"connections": len(before), "survived": kept, "broken": moved, "on_the_origin_that_left": lost_with_origin}


def measure(prefix: str, connections: int = 600, requests: int = 2000) -> dict[str, Any]:
    """Every case of the table: split, weight change, origin leaving; resilient group vs a
    plain weighted multipath route (what ``ip route add ... nexthop ... nexthop`` does)."""
    out: dict[str, Any] = {}
    with steering_lab(prefix, origins=3) as lab, KernelAdapter(netns=lab.pop, resilient=ResilientSettings()) as k:
        k.sync_routes({lab.route({1: 3, 2: 1})})
        out["split_3_1"] = lab.client_do(f"split {requests}")
        # Established connections, then a weight change 3:1 -> 1:1 (in place).
        before = lab.client_do(f"open {connections}")["origins"]
        k.sync_routes({lab.route({1: 1, 2: 1})})
        out["weight_change_resilient"] = survival(before, lab.client_do("ask")["origins"])
        out["split_after_weight_change_resilient"] = lab.client_do(f"split {requests}")
        # Three origins, o1 leaves (fails: the agent gives it weight 0).
        k.sync_routes({lab.route({1: 1, 2: 1, 3: 1})})
        time.sleep(0.2)
        before = lab.client_do(f"open {connections}")["origins"]
        k.sync_routes({lab.route({2: 1, 3: 1})})
        out["origin_leaves_resilient"] = survival(before, lab.client_do("ask")["origins"], frozenset({"o1"}))
        # A dial to 0 on o3: all new connections to o2, none lost.
        k.sync_routes({lab.route({2: 1})})
        out["dial_0_split"] = lab.client_do(f"split {requests}")
        k.sync_routes(set())
    # The same two changes with a plain (hash-threshold) multipath route, for comparison.
    with steering_lab(prefix, origins=3) as lab:
        def plain(weights: dict[int, int]) -> None:
            hops = [a for k, w in weights.items() for a in ("nexthop", "via", lab.next_hop(k), "weight", str(w))]
            _sh("ip", "-n", lab.pop, "route", "replace", f"{VIP}/32", *hops)
        plain({1: 3, 2: 1})
        before = lab.client_do(f"open {connections}")["origins"]
        plain({1: 1, 2: 1})
        out["weight_change_plain"] = survival(before, lab.client_do("ask")["origins"])
        plain({1: 1, 2: 1, 3: 1})
        time.sleep(0.2)
        before = lab.client_do(f"open {connections}")["origins"]
        plain({2: 1, 3: 1})
        out["origin_leaves_plain"] = survival(before, lab.client_do("ask")["origins"], frozenset({"o1"}))
    return out


def table(results: dict[str, Any]) -> str:
    rows = ["| case | connections | survived | broken | on the origin that left |", "|---|---|---|---|---|"]
    for key in ("weight_change_resilient", "weight_change_plain", "origin_leaves_resilient", "origin_leaves_plain"):
        r = results[key]
        rows.append(f"| {key} | {r['connections']} | {r['survived']} | {r['broken']} | {r['on_the_origin_that_left']} |")
    for key in ("split_3_1", "split_after_weight_change_resilient", "dial_0_split"):
        r = results[key]
        total = sum(r["counts"].values()) + r["failed"]
        shares = ", ".join(f"{o} {n / total:.1%}" for o, n in sorted(r["counts"].items()))
        rows.append(f"| {key} (new connections) | {total} | {shares} | failed {r['failed']} | |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m lab.steering", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="steering-results.json")
    p.add_argument("--connections", type=int, default=600)
    p.add_argument("--requests", type=int, default=2000)
    args = p.parse_args()
    started = time.time()
    results = measure(f"t-steer-{os.getpid() % 100000}", args.connections, args.requests)
    doc = {"started": started, "kernel": os.uname().release, "load_before": os.getloadavg(), "results": results}
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(table(results))


if __name__ == "__main__":
    main()
