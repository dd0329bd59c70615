"""``make demo``: the three-POP lab with the configs/ examples, a failover story told with a
live table, then everything torn down.

    python -m lab.demo [--keep] [--ha]   (--keep: leave the lab up; ``python -m lab down`` ends it;
                                          --ha: three controllers on a three-member etcd cluster,
                                          and a story of the leader being killed: lab/ha.py)

The lab is the one ``python -m lab up`` builds (namespaces ``lab-<node>``, files in
/var/tmp/anycast-lab), so while the demo runs, and after it with --keep, ``python -m lab
status`` and ``python -m lab exec NODE CMD`` reach it from another terminal; the places to
look are printed as soon as it is up.

The story is made of the lab's own scenarios (lab/scenarios.py), so what the demo shows
is what ``make test`` asserts. The controller runs configs/controller/ with the lab's
timers (lab.scenarios.lab_controller_config: 3 s drain, 5 s failback hold-down).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ha_scenarios, scenarios
from .__main__ import PREFIX, ROOT, TOPOLOGY_NOTE
from .fleet import AGENT_METRICS_PORT, CONTROLLER_METRICS_PORT, PROMETHEUS_PORT, Fleet
from .ha import CONTROLLERS, HaFleet, controller_url
from .netns import Lab, LabError, list_netns
from .topology import DEFAULT, Topology, load_topology

GAP = "  "  # between columns


@dataclass(frozen=True)
class Columns:
    """The live table's layout: one column per client, wide enough for any cell it can
    show (every POP and origin name, a loss count up to 99: a cell counts the last 0.3 s of
    requests, sent every 20 ms), then the announcing POPs."""

    clients: tuple[str, ...]  # header of each client column
    width: int  # of every client column
    t_width: int = 7

    @classmethod
    def for_topology(cls, topo: Topology) -> Columns:
        pop = max((len(p.name) for p in topo.pops), default=4)
        origin = max((len(o.region) for o in topo.origins), default=4)
        headers = tuple(f"{c.node} ({c.region})" for c in topo.clients)
        widest = max([len("(no answer yet)"), len(" -> ") + pop + origin + len(" (99 lost)"),
                      *(len(h) for h in headers)])
        return cls(headers, widest)

    def header(self) -> list[str]:
        top = GAP.join([f"{'t (s)':>{self.t_width}}", *(h.ljust(self.width) for h in self.clients), "announced at"])
        rule = GAP.join(["-" * self.t_width, *("-" * self.width for _ in self.clients), "-" * len("announced at")])
        return [top, rule]

    def row(self, t: float, cells: Sequence[str], announced: str) -> str:
        return GAP.join([f"{t:{self.t_width}.2f}", *(fit(c, self.width) for c in cells), announced])


def fit(text: str, width: int) -> str:
    """``text`` padded to ``width``, or cut with an ellipsis: a cell never pushes the next one."""
    return text.ljust(width) if len(text) <= width else text[:width - 1] + "~"


def client_cell(last: dict[str, Any] | None, lost: int) -> str:
    if last is None:
        return "(no answer yet)"
    if not last["ok"]:
        return "FAILING"
    return f"{last['pop']} -> {last['origin']}" + (f" ({lost} lost)" if lost else "")


class LiveTable:
    """A row whenever what a client sees or who announces changes (sampled every 0.1 s)."""

    def __init__(self, f: Fleet) -> None:
        self.f = f
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.lock = threading.Lock()
        self.columns = Columns.for_topology(f.topo)
        print()
        for line in self.columns.header():
            print(line)

    def sample(self) -> tuple[list[str], str]:
        now = time.time()
        cells = []
        for c in self.f.topo.clients:
            recent = self.f.requests(c.node, now - 0.3)
            cells.append(client_cell(recent[-1] if recent else None, sum(1 for r in recent if not r["ok"])))
        pops = " ".join(p.name for p in self.f.topo.pops if self._announced(p.name))
        return cells, pops or "(none)"

    def _announced(self, pop: str) -> bool:
        try:
            return self.f.announced(pop, scenarios.VIP)
        except (LabError, OSError):
            return False

    def _run(self) -> None:
        last: tuple[list[str], str] | None = None
        while not self._stop.is_set():
            sample = self.sample()
            if sample != last:
                with self.lock:
                    print(self.columns.row(time.time() - self.t0, *sample), flush=True)
                last = sample
            self._stop.wait(0.1)

    def say(self, text: str) -> None:
        with self.lock:
            print(f"\n==> {text}", flush=True)

    def __enter__(self) -> LiveTable:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def where_to_look(topo: Topology) -> list[str]:
    """Commands that reach the running lab from another terminal (as root, in the checkout)."""
    ctl = topo.controller_address
    run = f"{sys.executable} -m lab"
    anycastctl = Path(sys.executable).parent / "anycastctl"
    token = Path("configs/controller/lab-tokens/operator.token")
    lines = [f"    the lab:           {run} status",
             f"    the controller:    {run} exec {topo.controller_node} env SSL_CERT_FILE={ROOT / 'tls' / 'ca.pem'} "
             f"{anycastctl} status --url https://{ctl}:9800 --token-file {token}",
             f"    its metrics:       {run} exec {topo.controller_node} curl -s "
             f"http://{ctl}:{CONTROLLER_METRICS_PORT}/metrics",
             f"    Prometheus:        {run} exec {topo.controller_node} curl -s "
             f"'http://{ctl}:{PROMETHEUS_PORT}/api/v1/query?query=ALERTS'"]
    for pop in topo.pops:
        lines.append(f"    agent {pop.name + ':':<12} {anycastctl} agent status --socket "
                     f"{ROOT / pop.agent / 'state' / 'agent.sock'}")
        lines.append(f"    {'':<18} {run} exec {topo.controller_node} curl -s "
                     f"http://{pop.mgmt_address}:{AGENT_METRICS_PORT}/metrics")
    lines.append(f"    logs:              {ROOT}/<node>/")
    return lines


def ha_where_to_look() -> list[str]:
    """The HA lab's controllers and etcd members, from another terminal."""
    run = f"{sys.executable} -m lab"
    anycastctl = Path(sys.executable).parent / "anycastctl"
    token = Path("configs/controller/lab-tokens/operator.token")
    lines = [f"    the lab:           {run} status"]
    for name in CONTROLLERS:
        lines.append(f"    {name + ':':<18} {run} exec {name} env SSL_CERT_FILE={ROOT / 'tls' / 'ca.pem'} {anycastctl} "
                     f"status --url {controller_url(name)} --token-file {token}")
    lines.append(f"    logs:              {ROOT}/<node>/ (ctl-a/controller.log, etcd-a/etcd.log, ...)")
    return lines


ACTS: list[tuple[str, Callable[[Fleet], dict[str, Any]], Callable[[dict[str, Any]], str]]] = [
    ("Steady state: every client enters at its nearest POP, us-west serves",
     scenarios.s1_steady_state, lambda r: "no request lost"),
    ("sjc's health checks to its backends fail (its path to them is cut, clients' traffic is not): "
     "sjc reports, the controller confirms after its 1 s settle window, sjc withdraws",
     scenarios.s2_backend_failure_seen_by_one_pop,
     lambda r: f"c-na's transit moved to {r['new_pop']} {r['fib_change_ms']} ms after the cut; "
               f"c-na lost {r['clients']['c-na']['failed']} request(s)"),
    ("sjc's IPv6 checks fail (its IPv6 path to the backends is cut, IPv4's is not): the same agent "
     "withdraws the /128 and keeps announcing the /32",
     scenarios.s12_ipv6_backend_failure_seen_by_one_pop,
     lambda r: f"c-na's IPv6 transit moved to {r['new_pop']} {r['fib_change_ms']} ms after the cut; "
               f"{sum(c['failed'] for c in r['clients'].values())} IPv4 request(s) lost"),
    ("fra crashes (ExaBGP and the agent killed): the BGP session drops with them",
     scenarios.s3_pop_crash,
     lambda r: f"c-eu's transit moved to {r['new_pop']} after {r['fib_change_ms']} ms; "
               f"outage {r['c-eu']['outage_s']} s, {r['c-eu']['failed']} lost"),
    ("fra's router goes silent (every packet dropped, no reset): BFD 100 ms x 3 notices",
     scenarios.s3b_silent_pop_failure,
     lambda r: f"c-eu's transit moved after {r['fib_change_ms']} ms; outage {r['c-eu']['outage_s']} s"),
    ("us-west's backends stop for everyone: the controller moves the VIP to eu-central, then back",
     scenarios.s4_origin_failover,
     lambda r: "clients served by eu-central after " + ", ".join(
         f"{c} {v} ms" for c, v in r["first_success_on_eu_central_ms"].items())
               + f"; back on us-west {r['failback_after_restart_s']} s after it recovered"),
    ("Every health check fails at once, client traffic still flows: the safety valve holds",
     scenarios.s6_safety_checks_down_everywhere,
     lambda r: f"nothing withdrawn, alarm after {r['alarm_after_ms']} ms, Prometheus alert firing after "
               f"{r['alert_firing_after_ms']} ms, "
               "no request lost"),
    ("anycastctl drain fra: less preferred first (MED, AS-path prepend), withdrawn 3 s later",
     scenarios.s8_drain,
     lambda r: f"c-eu left fra after {r['fib_change_ms']} ms, fra withdrew after {r['withdrawn_ms']} ms, "
               f"{sum(c['failed'] for c in r['clients'].values())} request(s) lost"),
]


IPV6_ACTS = {scenarios.s12_ipv6_backend_failure_seen_by_one_pop}  # only on a dual-stack topology


HA_ACTS: list[tuple[str, Callable[[Fleet], dict[str, Any]], Callable[[dict[str, Any]], str]]] = [
    ("Steady state: three controllers (one leads), three etcd members; us-west serves",
     scenarios.s1_steady_state, lambda r: "no request lost"),
    ("Drain fra (12 s), then SIGKILL the leading controller a quarter of the way through",
     ha_scenarios.ha1_kill_leader_mid_drain,
     lambda r: f"{r['killed']} killed, {r['new_leader']} led {r['new_leader_after_kill_s']} s later (lease "
               f"{r['lease_ttl_s']} s); fra withdrawn {r['withdrawn_after_drain_start_s']} s after the drain began "
               f"(drain time {r['drain_time_s']} s); no route flap, "
               f"{sum(c['failed'] for c in r['clients'].values())} request(s) lost"),
    ("The leader is cut off from etcd (nftables): it stops before another starts",
     ha_scenarios.ha3_leader_partitioned_from_etcd,
     lambda r: f"{r['old_leader']} stopped {r['old_stopped_after_cut_ms']} ms after the cut, {r['new_leader']} "
               f"started {r['new_started_after_cut_ms']} ms after it; never two leaders"),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true",
                   help="leave the lab up at the end (python -m lab down removes it)")
    p.add_argument("--ha", action="store_true",
                   help="three controllers on a three-member etcd cluster; the leader is killed and cut off")
    args = p.parse_args()
    if any(n.startswith(PREFIX) for n in list_netns()):
        print(f"a lab is already up ({PREFIX}* namespaces): python -m lab down first", file=sys.stderr)
        return 1
    if args.keep:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited: the daemons outlive this shell
    topo = load_topology()
    shutil.rmtree(ROOT, ignore_errors=True)  # logs of an earlier run
    lab = Lab(PREFIX, root=ROOT, unique=False)
    results: list[str] = []
    keep = False
    try:
        control = ("three controllers on a three-member etcd cluster (HA)" if args.ha
                   else "the controller, Prometheus")
        print(f"==> Starting the {topo.name} lab: {len(topo.transits)} transit routers, {len(topo.pops)} POPs "
              f"(FRR router + ExaBGP + anycast-agent each), {control}, 2 origins, "
              f"{len(topo.clients)} clients; one network namespace per node")
        t0 = time.monotonic()
        if args.ha:
            f: Fleet = HaFleet(lab, topo, controller_edit=ha_scenarios.ha_controller_config).up()
        else:
            edit = scenarios.dual_stack_controller_config(topo) if topo.ipv6 else scenarios.lab_controller_config
            f = Fleet(lab, topo, controller_edit=edit, prometheus=True).up()
        TOPOLOGY_NOTE.write_text(str(DEFAULT))  # for `python -m lab status`
        f.start_clients(scenarios.VIP)
        f.wait_converged(scenarios.VIP, 90)
        print(f"    up and converged in {time.monotonic() - t0:.1f} s; clients send HTTP to {scenarios.VIP} "
              "every 20 ms")
        print("\n==> Where to look, from another terminal, while it runs")
        for line in where_to_look(topo) if not args.ha else ha_where_to_look():
            print(line)
        with LiveTable(f) as table:
            acts = HA_ACTS if args.ha else [a for a in ACTS if topo.ipv6 or a[1] not in IPV6_ACTS]
            for title, act, summary in acts:
                table.say(title)
                result = act(f)
                line = summary(result)
                table.say("measured: " + line)
                results.append(f"{act.__name__:<42} {line}")
                time.sleep(1)
        print("\n==> What was measured")
        for line in results:
            print("    " + line)
        keep = args.keep
        if keep:
            print("\n==> The lab stays up (clients keep sending). Look around:")
            for line in where_to_look(topo) if not args.ha else ha_where_to_look():
                print(line)
            print(f"    end it with:       {sys.executable} -m lab down")
        return 0
    except (AssertionError, TimeoutError, LabError) as exc:
        print(f"\ndemo failed: {exc}\n(logs are in {lab.root})", file=sys.stderr)
        return 1
    finally:
        if not keep:
            print("\n==> Tearing down")
            lab.teardown()
            print(f"    all namespaces and processes removed (logs kept in {lab.root})")


if __name__ == "__main__":
    sys.exit(main())
