"""``make demo``: the three-POP lab with the configs/ examples, a failover story told with a
live table, then everything torn down.

    python -m lab.demo [--keep]     (--keep: leave the lab up until Enter is pressed)

The story is made of the lab's own scenarios (lab/scenarios.py), so what the demo shows
is what ``make test`` asserts. The controller runs configs/controller/ with the lab's
timers (lab.scenarios.lab_controller_config: 3 s drain, 5 s failback hold-down).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import scenarios
from .fleet import AGENT_METRICS_PORT, CONTROLLER_METRICS_PORT, PROMETHEUS_PORT, Fleet
from .netns import Lab, LabError
from .topology import load_topology


class LiveTable:
    """A row whenever what a client sees or who announces changes (sampled every 0.1 s)."""

    def __init__(self, f: Fleet) -> None:
        self.f = f
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.lock = threading.Lock()
        clients = "".join(f"{c.node + ' (' + c.region + ')':<30}" for c in f.topo.clients)
        print(f"\n{'t (s)':>7}  {clients}announced at")
        print(f"{'-' * 7}  {'-' * 30 * len(f.topo.clients)}{'-' * 20}")

    def sample(self) -> str:
        now = time.time()
        cells = []
        for c in self.f.topo.clients:
            recent = self.f.requests(c.node, now - 0.3)
            last = recent[-1] if recent else None
            lost = sum(1 for r in recent if not r["ok"])
            cell = "(no answer yet)" if last is None else (f"via {last['pop']} -> {last['origin']}" if last["ok"] else "FAILING")
            cells.append(f"{cell + (' (' + str(lost) + ' lost)' if lost and last and last['ok'] else ''):<30}")
        pops = " ".join(p.name for p in self.f.topo.pops if self._announced(p.name))
        return "".join(cells) + (pops or "(none)")

    def _announced(self, pop: str) -> bool:
        try:
            return self.f.announced(pop, scenarios.VIP)
        except (LabError, OSError):
            return False

    def _run(self) -> None:
        last = ""
        while not self._stop.is_set():
            row = self.sample()
            if row != last:
                with self.lock:
                    print(f"{time.time() - self.t0:7.2f}  {row}", flush=True)
                last = row
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


ACTS: list[tuple[str, Callable[[Fleet], dict[str, Any]], Callable[[dict[str, Any]], str]]] = [
    ("Steady state: every client enters at its nearest POP, us-west serves",
     scenarios.s1_steady_state, lambda r: "no request lost"),
    ("sjc's health checks to its backends fail (its path to them is cut, clients' traffic is not): "
     "sjc reports, the controller confirms after its 1 s settle window, sjc withdraws",
     scenarios.s2_backend_failure_seen_by_one_pop,
     lambda r: f"c-na's transit moved to {r['new_pop']} {r['fib_change_ms']} ms after the cut; "
               f"c-na lost {r['clients']['c-na']['failed']} request(s)"),
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="leave the lab up until Enter is pressed")
    args = p.parse_args()
    topo = load_topology()
    lab = Lab("acl-demo-")
    results: list[str] = []
    try:
        print(f"==> Starting the {topo.name} lab: {len(topo.transits)} transit routers, {len(topo.pops)} POPs "
              "(FRR router + ExaBGP + anycast-agent each), the controller, Prometheus, 2 origins, "
              f"{len(topo.clients)} clients; one network namespace per node")
        t0 = time.monotonic()
        f = Fleet(lab, topo, controller_edit=scenarios.lab_controller_config, prometheus=True).up()
        f.start_clients(scenarios.VIP)
        f.wait_converged(scenarios.VIP, 90)
        print(f"    up and converged in {time.monotonic() - t0:.1f} s; clients send HTTP to {scenarios.VIP} "
              "every 20 ms")
        with LiveTable(f) as table:
            for title, act, summary in ACTS:
                table.say(title)
                result = act(f)
                line = summary(result)
                table.say("measured: " + line)
                results.append(f"{act.__name__:<36} {line}")
                time.sleep(1)
        print("\n==> What was measured")
        for line in results:
            print("    " + line)
        print("\n==> Where to look")
        ctl = f.nodes[topo.controller_node].name
        print(f"    Prometheus: ip netns exec {ctl} curl -s 'http://{topo.controller_address}:{PROMETHEUS_PORT}"
              "/api/v1/query?query=anycast_vip_announced'")
        print(f"    controller: ip netns exec {ctl} curl -s http://{topo.controller_address}:{CONTROLLER_METRICS_PORT}/metrics")
        for pop in topo.pops:
            print(f"    agent {pop.name}:  ip netns exec {ctl} curl -s http://{pop.mgmt_address}:{AGENT_METRICS_PORT}/metrics")
        print(f"    logs:       {lab.root}")
        if args.keep:
            input("\nThe lab stays up. Press Enter to tear it down... ")
        return 0
    except (AssertionError, TimeoutError, LabError) as exc:
        print(f"\ndemo failed: {exc}\n(logs are in {lab.root} until teardown)", file=sys.stderr)
        return 1
    finally:
        print("\n==> Tearing down")
        lab.teardown()
        print("    all namespaces and processes removed")


if __name__ == "__main__":
    sys.exit(main())
