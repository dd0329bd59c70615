"""The lab's command line (run as root):

    python -m lab up [--topology FILE]     build the topology, start everything, return
    python -m lab status                   routers, BGP sessions, who announces what
    python -m lab exec NODE [CMD...]       run a command (default: a shell) inside a node
    python -m lab down                     remove everything (also after a crash)

Each node is a container without an image: its own network, mount, UTS, IPC and PID
namespaces (hostname = node name; private /run, /tmp, /etc/frr), so ``exec`` gives the
node's view: ``hostname``, ``ps`` and plain ``vtysh`` see only that node. The network
namespaces are named ``lab-<node>`` (e.g. ``lab-rtr-sjc``), the files are under
/var/tmp/anycast-lab/lab ($ANYCAST_LAB_PREFIX changes the prefix). ``down`` sweeps by that
prefix: recorded PIDs, each node's init (which ends everything inside it), processes in
the namespaces, the namespaces; never anything by process name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from .cleanup import sweep
from .fleet import AGENT_LINK, AGENT_LINK6, AGENT_METRICS_PORT, CONTROLLER_METRICS_PORT, PROMETHEUS_PORT, Fleet, host_prefix
from .frr import FrrRouter
from .netns import LAB_ROOT, Lab, LabError, Netns, list_netns
from .scenarios import ipv6_vip_config
from .topology import DEFAULT, Topology, load_topology

PREFIX = os.environ.get("ANYCAST_LAB_PREFIX", "lab-")  # the tests use their own
ROOT = LAB_ROOT / PREFIX.rstrip("-")
TOPOLOGY_NOTE = ROOT / "topology.path"


def up(topology: Path) -> int:
    if any(n.startswith(PREFIX) for n in list_netns()):
        print("the lab is already up (python -m lab down first)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited: daemons outlive this shell
    shutil.rmtree(ROOT, ignore_errors=True)  # logs of an earlier run (kept by `down` for a post-mortem)
    topo = load_topology(topology)
    lab = Lab(PREFIX, root=ROOT, unique=False)
    try:
        # A dual-stack topology: the example controller config plus an IPv6 VIP (game-global-v6).
        fleet = Fleet(lab, topo, prometheus=True, controller_edit=ipv6_vip_config(topo) if topo.ipv6 else None).up()
        for vip in topo.vips[:1]:
            fleet.wait_converged(vip, 90)
    except Exception:
        lab.teardown()
        raise
    TOPOLOGY_NOTE.write_text(str(topology))
    print(f"lab {topo.name} is up: {len(lab.namespaces)} namespaces ({PREFIX}<node>), files in {ROOT}")
    print_endpoints(topo)
    return 0


def print_endpoints(topo: Topology) -> None:
    ctl = topo.controller_address
    print(f"  controller API  https://{ctl}:9800 (CA {ROOT / 'tls' / 'ca.pem'})   metrics "
          f"http://{ctl}:{CONTROLLER_METRICS_PORT}/metrics   (node {topo.controller_node})")
    print(f"  Prometheus      http://{ctl}:{PROMETHEUS_PORT}   (node {topo.controller_node}; alerts from ops/)")
    for p in topo.pops:
        print(f"  agent {p.name:<4}      http://{p.mgmt_address}:{AGENT_METRICS_PORT}/metrics   (node {p.agent})")
    print("  reach them from a node, e.g.: python -m lab exec ctl curl -s http://192.0.2.11:9701/metrics")


def down() -> int:
    report = sweep(PREFIX, force=True)
    for name in report.deleted:
        print(f"deleted {name}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


def _router(topo_node: str) -> FrrRouter:
    wd = ROOT / topo_node
    return FrrRouter(Netns.attach(PREFIX + topo_node), wd, {"bgpd": "", "bfdd": ""})


def status() -> int:
    names = [n for n in list_netns() if n.startswith(PREFIX)]
    if not names:
        print("the lab is down")
        return 1
    topo = load_topology(Path(TOPOLOGY_NOTE.read_text()) if TOPOLOGY_NOTE.exists() else DEFAULT)
    print(f"lab {topo.name}: {len(names)} namespaces")
    for t in [*(t.node for t in topo.transits), *(p.router for p in topo.pops)]:
        try:
            summary = _router(t).vtysh_json("show bgp ipv4 unicast summary json")
            peers = summary.get("peers", {})
            if topo.ipv6:  # the IPv6 twins
                peers |= _router(t).vtysh_json("show bgp ipv6 unicast summary json").get("peers", {})
        except (LabError, OSError) as exc:
            print(f"  {t:<8} bgpd not answering: {exc}")
            continue
        sessions = ", ".join(f"{addr} {'up' if p.get('state') == 'Established' else p.get('state')}"
                             for addr, p in sorted(peers.items()))
        print(f"  {t:<8} AS {summary.get('as')}: {sessions}")
    print("who announces what (POP router's table, path from its agent):")
    for p in topo.pops:
        row = []
        for vip in (*topo.vips, *topo.vips6):
            try:
                entry = _router(p.router).bgp_route(host_prefix(vip))
            except (LabError, OSError):
                entry = None
            agent = AGENT_LINK6[1] if ":" in vip else AGENT_LINK[1]
            mine = entry is not None and any(x.get("peer", {}).get("peerId") == agent
                                             for x in entry.get("paths", []))
            row.append(f"{vip} {'announced' if mine else '-'}")
        print(f"  {p.name:<4} " + "   ".join(row))
    print("where each client's transit sends each VIP:")
    for c in topo.clients:
        row = []
        for vip in (*topo.vips, *topo.vips6):
            try:
                entry = _router(c.transit).bgp_route(host_prefix(vip))
            except (LabError, OSError):
                entry = None
            best = next((x for x in (entry or {}).get("paths", []) if x.get("bestpath", {}).get("overall")), None)
            row.append(f"{vip} via AS path {best['aspath']['string'] if best else '(none)'}")
        print(f"  {c.node:<5} ({c.transit}) " + "   ".join(row))
    print_endpoints(topo)
    return 0


def exec_in(node: str, argv: list[str]) -> int:
    name = PREFIX + node
    if name not in list_netns():
        print(f"no node {node!r} (namespaces: {', '.join(n[len(PREFIX):] for n in list_netns() if n.startswith(PREFIX))})",
              file=sys.stderr)
        return 2
    try:
        target = Netns.attach(name)
    except LabError:
        target = Netns(name)  # a namespace without a state file: plain `ip netns exec`
    full = target.exec_argv(argv or [shutil.which("bash") or "/bin/sh"])
    os.execvp(full[0], full)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description="the anycast FRR lab (run as root)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build the topology and start everything")
    p_up.add_argument("--topology", type=Path, default=DEFAULT)
    sub.add_parser("down", help="remove everything the lab started")
    sub.add_parser("status", help="routers, sessions, who announces what")
    p_exec = sub.add_parser("exec", help="run a command (default: a shell) inside a node")
    p_exec.add_argument("node")
    p_exec.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces, FRR)", file=sys.stderr)
        return 2
    try:
        if args.cmd == "up":
            return up(args.topology)
        if args.cmd == "down":
            return down()
        if args.cmd == "status":
            return status()
        return exec_in(args.node, args.argv)
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
