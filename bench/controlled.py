"""Failover under a controller: one POP's checks refused, the other POPs still healthy.

Lab: the three-POP fleet of the lab scenarios (lab.fleet, lab/topologies/three-pops.yaml):
transits, POP routers with BFD, ExaBGP + anycast-agent at sjc, fra and sin, the controller
(configs/controller with the lab's timers), the origins' backends. No clients. The VIP
game-global is checked over HTTP at interval 0.1 s, timeout 0.08 s, rise 1, fall 2, polling
only (``watch: false``), its primary origin us-west with one backend: as the standalone arms.

The failure: an nftables rule in sjc's agent host rejects (TCP reset) its connections to
us-west's check ports, the active origin; fra and sin keep seeing it healthy, so the
controller confirms sjc's withdrawal (``backend_down``) and sjc's agent withdraws. The clock
starts just before the `nft` call and stops when `ip monitor route` in rtr-sjc, the POP's
router (the agent's upstream), reports that the VIP's route is no longer the BGP route from
the agent (the lab's floating static route toward the agent host, distance 250, takes its
place until the transit's path arrives). Each repetition first waits until the route is via the agent
again, then one to two check intervals at random.

Two arms, the same lab and code, the policy switched by a commit to the desired state:
- ``evidence``: ``policy.safety.settle_on_evidence: true`` (the default): the withdrawal is
  confirmed as soon as fra's or sin's fresh checks show us-west healthy after sjc's first
  failed check;
- ``settle only``: ``settle_on_evidence: false``: every withdrawal waits the fixed
  ``policy.safety.settle`` (1 s), the controller's behaviour before the evidence-based settle.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lab.fleet import AGENT_LINK, Fleet
from lab.netns import Lab, Netns
from lab.poll import wait_for
from lab.scenarios import NAME, VIP, head_commit, lab_controller_config
from lab.topology import load_topology

from .report import summary

INTERVAL, TIMEOUT, FALL = 0.1, 0.08, 2
POP = "sjc"
REFUSE = (" chain out { type filter hook output priority 0; "
          "ip daddr 100.64.10.1 tcp dport 8080 reject with tcp reset; }")
TABLE = "tbctl"
ARMS = (("evidence", True), ("settle only", False))

Log = Callable[[str], None]


class ViaWatcher:
    """`ip -o monitor route` in a namespace: when did the VIP's route last change, and is
    it the BGP route via ``gateway``? Stamped with time.monotonic() on arrival, like lab.fib.RouteWatcher
    (which records presence, not the next hop)."""

    def __init__(self, ns: Netns, prefix: str, gateway: str) -> None:
        self.prefix, self.gateway = prefix, gateway
        self.proc = ns.popen(["ip", "-o", "monitor", "route"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, bufsize=0)
        self._cond = threading.Condition()
        self._events: list[tuple[float, bool]] = []  # (stamp, via the gateway)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            stamp = time.monotonic()
            words = raw.decode(errors="replace").split()
            deleted = bool(words) and words[0] == "Deleted"
            dest = words[1] if deleted and len(words) > 1 else (words[0] if words else "")
            if dest not in (self.prefix, f"{self.prefix}/32") or "table" in words:
                continue
            # (rtr-sjc also has a floating static route toward the agent host, distance 250,
            # which takes over the moment the agent's BGP route goes: that is "out".)
            line = " ".join(words)
            via = not deleted and f"via {self.gateway}" in line and "proto bgp" in line
            with self._cond:
                self._events.append((stamp, via))
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self._events)

    def wait_not_via(self, since: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            i = since
            while True:
                while i < len(self._events):
                    stamp, via = self._events[i]
                    i += 1
                    if not via:
                        return stamp
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        self.proc.kill()


def _fast_checks(config_dir: Path) -> None:
    lab_controller_config(config_dir)
    path = config_dir / "vips.yaml"
    data = yaml.safe_load(path.read_text())
    vip = next(v for v in data["vips"] if v["name"] == NAME)
    vip["check"].update({"interval": INTERVAL, "timeout": TIMEOUT, "rise": 1, "fall": FALL, "watch": False})
    # One backend in us-west, as the standalone arms check one: with two (min_healthy 1) the
    # origin is down only when the later of the two has failed `fall` times.
    vip["origins"][0]["backends"] = vip["origins"][0]["backends"][:1]
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _via_agent(f: Fleet) -> bool:
    entry = f.routers[f.topo.pop(POP).router].vtysh_json(f"show ip route {VIP}/32 json") or {}
    routes = entry.get(f"{VIP}/32", [])
    return any(r.get("selected") and r.get("protocol") == "bgp"
               and any(nh.get("ip") == AGENT_LINK[1] and nh.get("fib") for nh in r.get("nexthops", []))
               for r in routes)


def _set_policy(f: Fleet, on_evidence: bool) -> None:
    def edit(data: Any) -> None:
        data["policy"]["safety"]["settle_on_evidence"] = on_evidence
    f.edit_controller_yaml("controller.yaml", edit)
    f.commit(f"bench: settle_on_evidence {on_evidence}")
    revision = head_commit(f)[:12]
    wait_for(lambda: (s := f.status()) is not None and s["config"]["revision"] == revision
             and not s["config"]["last_error"], 15, 0.05, "the controller loaded the policy")
    time.sleep(0.5)


def run(*, reps: int, log: Log, rng: random.Random | None = None) -> list[dict[str, Any]]:
    rng = rng or random.Random()
    lab = Lab("t-bctl-")
    results = []
    try:
        f = Fleet(lab, load_topology(), controller_edit=_fast_checks).up()
        agent_ns = f.nodes[f.topo.pop(POP).agent]
        watcher = ViaWatcher(f.nodes[f.topo.pop(POP).router], VIP, AGENT_LINK[1])
        try:
            wait_for(lambda: _via_agent(f), 60, 0.05, f"{VIP} via the agent at rtr-{POP}")
            for label, on_evidence in ARMS:
                _set_policy(f, on_evidence)
                log(f"failover under a controller ({label}): {reps} x {POP}'s checks refused")
                samples: list[float] = []
                misses = 0
                for _ in range(reps):
                    wait_for(lambda: _via_agent(f), 30, 0.02, f"{VIP} back via the agent at rtr-{POP}")
                    time.sleep(INTERVAL * (1.0 + rng.random()))
                    mark = watcher.mark()
                    t0 = time.monotonic()
                    agent_ns.run(["nft", "-f", "-"], input=f"table inet {TABLE} {{\n{REFUSE}\n}}\n")
                    try:
                        gone = watcher.wait_not_via(mark, 10.0)
                    finally:
                        agent_ns.run(["nft", "delete", "table", "inet", TABLE], check=False)
                    if gone is None:
                        misses += 1
                        log("  no withdrawal within 10 s")
                        continue
                    samples.append(gone - t0)
                stats = summary(samples)
                log(f"  p50 {stats['p50']}s p99 {stats['p99']}s max {stats['max']}s")
                results.append({"impl": "agent-controlled", "label": f"controlled, {label}", "interval": INTERVAL,
                                "timeout": TIMEOUT, "rise": 1, "fall": FALL, "watch": False,
                                "settle_on_evidence": on_evidence,
                                "modes": {"refused": {"samples_s": [round(s, 4) for s in samples],
                                                      "misses": misses, **stats}}})
        finally:
            watcher.close()
    finally:
        lab.teardown()
    return results
