"""``make demo``: one POP, a real FRR router, ExaBGP + the agent, two origins, and a failover
story you can watch. Everything runs in network namespaces and is torn down at the end.

    python -m lab.demo [--keep]     (--keep: leave the lab up until Enter is pressed)
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable

from .netns import Lab
from .single_pop import AGENT_CONFIG, METRICS_PORT, VIP, SinglePop

PREFIX = f"{VIP}/32"


class Watch:
    """Samples the router, a client request and the agent; prints a row when anything changes."""

    def __init__(self, pop: SinglePop) -> None:
        self.pop = pop
        self.t0 = time.monotonic()
        self.last: tuple[str, ...] | None = None
        print(f"{'t (s)':>7}  {'FRR BGP table':<30} {'FRR FIB':<9} {'client -> VIP':<26} agent")
        print(f"{'-' * 7}  {'-' * 30} {'-' * 9} {'-' * 26} {'-' * 30}")

    def sample(self) -> tuple[str, ...]:
        route = self.pop.router.bgp_route(PREFIX)
        if route:
            path = route["paths"][0]
            bgp = f"via {path['peer']['peerId']} med {path.get('metric', '-')}"
            hops = len(path["aspath"]["string"].split())
            bgp += f" aspath x{hops}" if hops > 1 else ""
        else:
            bgp = "(no route)"
        fib = "installed" if self.pop.router.fib_has(PREFIX) else "-"
        served = self.pop.request_vip(timeout=0.3)
        m = re.search(r"origin=(\S+)", served or "")
        client = f"served by {m.group(1)}" if m else "FAILED"
        metrics = self.pop.metrics()
        m = re.search(r'anycast_vip_reason\{[^}]*reason="([^"]+)"', metrics)
        agent = m.group(1) if m else "(agent starting)"
        return bgp, fib, client, agent

    def tick(self) -> tuple[str, ...]:
        row = self.sample()
        if row != self.last:
            print(f"{time.monotonic() - self.t0:7.2f}  {row[0]:<30} {row[1]:<9} {row[2]:<26} {row[3]}", flush=True)
            self.last = row
        return row

    def until(self, done: Callable[[tuple[str, ...]], bool], timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if done(self.tick()):
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError("the demo's expected change did not happen; see the agent log")

    def hold(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(0.05)


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def story(pop: SinglePop, keep: bool) -> None:
    w = Watch(pop)
    say("The agent checks us-west's backends (HTTP /healthz every 0.2 s, rise 2, fall 2) and announces the VIP")
    took = w.until(lambda r: r[1] == "installed" and "us-west" in r[2], 30)
    print(f"    announced and serving {took:.1f} s after start (includes the BGP session coming up)")

    say("us-west's backends stop (connection refused): the agent withdraws the VIP from this POP")
    pop.stop_backends("usw")
    took = w.until(lambda r: r[1] == "-", 10)
    print(f"    gone from the router's FIB {took * 1000:.0f} ms after the backends stopped "
          f"(bound: interval x fall + timeout = 0.55 s, plus one FRR hop)")
    w.hold(0.5)

    say("us-west comes back: after rise=2 good checks the VIP is announced again")
    pop.start_backends("usw")
    took = w.until(lambda r: r[1] == "installed" and "us-west" in r[2], 10)
    print(f"    back in the FIB and serving {took * 1000:.0f} ms after the backends started")

    say("Drain this POP (admin: drain, then SIGHUP): still announced, but MED 1000 and AS path prepended x3")
    config = pop.agent_config
    config.write_text(config.read_text().replace("    address: 198.51.100.10/32", "    address: 198.51.100.10/32\n    admin: drain"))
    pop.signal_agent(signal.SIGHUP)
    w.until(lambda r: "med 1000" in r[0], 10)
    w.hold(0.3)
    config.write_text(AGENT_CONFIG.read_text())
    pop.signal_agent(signal.SIGHUP)
    w.until(lambda r: "med 100 " in r[0] + " ", 10)

    say("Kill the agent (SIGKILL): ExaBGP respawns it and keeps the route; the new agent takes it over without a flap")
    pop.signal_agent(signal.SIGKILL)
    w.hold(2.0)

    say("Where to look" + ("" if keep else " (run `.venv/bin/python -m lab.demo --keep` to keep the lab up)"))
    ns = pop.nodes["pop"].name
    print(f"    metrics:   ip netns exec {ns} curl -s http://127.0.0.1:{METRICS_PORT}/metrics | grep ^anycast_")
    print(f"    router:    vtysh --vty_socket {pop.workdir('rtr') / 'run'} -c 'show bgp ipv4 unicast {PREFIX}'")
    print(f"    agent log: {pop.agent_log_path}")
    if keep:
        input("\nThe lab stays up. Press Enter to tear it down... ")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="leave the lab up until Enter is pressed")
    args = p.parse_args()
    lab = Lab("acl-demo-")
    try:
        say("Starting: FRR router 'rtr' (AS 65001), POP 'sjc' (ExaBGP + anycast-agent, AS 65101), "
            "origins us-west and eu-central, each in its own network namespace")
        pop = SinglePop(lab).up()
        config = pop.workdir("pop") / "agent.yaml"
        shutil.copy(AGENT_CONFIG, config)
        pop.agent_config = config
        for node in ("usw", "euc"):
            pop.start_backends(node)
        pop.start_agent()
        story(pop, args.keep)
        say("Tearing down")
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        lab.teardown()
        print("    all namespaces and processes removed")


if __name__ == "__main__":
    sys.exit(main())
