"""Failover under a controller: one POP's checks refused, the other POPs still healthy.

Lab: the three-POP fleet of the lab scenarios (lab.fleet, lab/topologies/three-pops.yaml):
transits, POP routers with BFD, ExaBGP + anycast-agent at sjc, fra and sin, the controller
(configs/controller with the lab's timers), the origins' backends. No clients. The VIP
game-global is checked over HTTP at interval 0.1 s, timeout 0.08 s, rise 1, fall 2, polling
only (``watch: false``), its primary origin us-west with one backend: as the standalone arms.

The failure: an nftables rule in sjc's agent host rejects (TCP reset) its connections to
us-west's check ports, the active origin; fra and sin keep seeing it healthy, so the
controller confirms sjc's withdrawal (``backend_down``) and sjc's agent withdraws. The clock
starts when the rule is handed to an `nft -f -` already running in the agent host and
waiting on its stdin (``_Refusal``; until h/fail4 it started before the `nft` process was
spawned, and on a loaded machine starting it through nsenter took tens of milliseconds,
sometimes hundreds, before any check could fail: ``nft_call_s`` records what such a call
costs in the same run), and stops when `ip monitor route` in rtr-sjc, the POP's
router (the agent's upstream), reports that the VIP's route is no longer the BGP route from
the agent (the lab's floating static route toward the agent host, distance 250, takes its
place until the transit's path arrives). Each repetition first waits until the route is via the agent
again, then one to two check intervals at random.

Per sample, where the time went (``breakdown``, seconds from the clock's start, from the
agents' logs at ms resolution: the creation time of each record): the rule in (nft exited),
sjc's first failed check and its ``fall``, the first plan fra and sin followed (the
controller asking them for evidence), the last plan sjc followed before its decision (the
controller confirming the withdrawal), the decision, ExaBGP's ack of the withdraw.

Two arms, the same lab and code, the policy switched by a commit to the desired state:
- ``evidence``: ``policy.safety.settle_on_evidence: true`` (the default): the withdrawal is
  confirmed as soon as fra's or sin's fresh checks show us-west healthy after sjc's first
  failed check;
- ``settle only``: ``settle_on_evidence: false``: every withdrawal waits the fixed
  ``policy.safety.settle`` (1 s), the controller's behaviour before the evidence-based settle.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from lab.fleet import AGENT_LINK, Fleet
from lab.netns import Lab, Netns
from lab.poll import wait_for
from lab.scenarios import NAME, VIP, head_commit, lab_controller_config
from lab.topology import load_topology

from .failover import log_lines
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


class _Refusal:
    """``nft -f -`` started in the agent host ahead of the failure, blocked reading its
    stdin: ``apply()`` hands it the rule, so the clock starts with the rule, not with a
    process start (nsenter, nft's own start) that a loaded machine may delay."""

    def __init__(self, ns: Netns) -> None:
        self.proc = ns.spawn(["nft", "-f", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        # nsenter execs nft in place: the same PID, once it reads fd 0 (read(2) is syscall 0).
        wait_for(self._reading, 10, 0.002, "nft started and reading its stdin")

    def _reading(self) -> bool:
        try:
            comm = Path(f"/proc/{self.proc.pid}/comm").read_text().strip()
            call = Path(f"/proc/{self.proc.pid}/syscall").read_text().split()
        except OSError:
            return False
        return comm == "nft" and call[:2] == ["0", "0x0"]

    def apply(self) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(f"table inet {TABLE} {{\n{REFUSE}\n}}\n".encode())
        stdin.close()

    def wait(self) -> float:
        """Until nft has exited (the rule is in): time.monotonic() then."""
        code = self.proc.wait(10)
        if code != 0:
            raise RuntimeError(f"nft exited with {code}")
        return time.monotonic()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# What each step of a sample logs at sjc (agent.daemon's INFO lines about game-global).
_STEPS = (("first_fail", f"of {NAME}/us-west: up -> falling"),
          ("fall", f"of {NAME}/us-west: falling -> down"),
          ("decision", f"VIP {NAME} ({VIP}/32): withdraw, reason backend_down"),
          ("ack", f"withdraw {VIP}/32 (VIP {NAME}), reason backend_down"))
_PLAN = "following plan generation"


def _breakdown(logs: dict[str, tuple[Path, int]], wall0: float) -> dict[str, float | None]:
    """Seconds from ``wall0`` to each step of one sample in the agents' logs (None: not seen)."""
    out: dict[str, float | None] = {}
    lines = {pop: log_lines(path, offset) for pop, (path, offset) in logs.items()}
    for key, needle in _STEPS:
        out[key] = next((round(at - wall0, 4) for at, line in lines[POP] if needle in line), None)
    decided = out["decision"]
    plans = [at - wall0 for at, line in lines[POP] if _PLAN in line]
    before = [t for t in plans if decided is None or t <= decided + 0.0005]
    out["plan"] = round(before[-1], 4) if before else None
    out["plans"] = len(before)
    for pop in sorted(set(lines) - {POP}):
        asked = [at - wall0 for at, line in lines[pop] if _PLAN in line]
        out[f"asked_{pop}"] = round(asked[0], 4) if asked else None
    return out


def _segments(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per step of the path, its time over the samples that saw both ends."""
    def span(a: str, b: str) -> list[float]:
        return [r[b] - r[a] for r in rows if r.get(a) is not None and r.get(b) is not None]

    return {name: summary(span(a, b)) for name, (a, b) in {
        "rule_in": ("start", "nft"), "detect_first_fail": ("start", "first_fail"),
        "first_fail_to_fall": ("first_fail", "fall"), "fall_to_plan": ("fall", "plan"),
        "plan_to_decision": ("plan", "decision"), "decision_to_ack": ("decision", "ack"),
        "ack_to_fib": ("ack", "total")}.items()}


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
                rows: list[dict[str, Any]] = []
                nft_calls: list[float] = []
                for _ in range(reps):
                    wait_for(lambda: _via_agent(f), 30, 0.02, f"{VIP} back via the agent at rtr-{POP}")
                    refusal = _Refusal(agent_ns)
                    try:
                        time.sleep(INTERVAL * (1.0 + rng.random()))
                        logs = {pop: (node.log_path, os.path.getsize(node.log_path))
                                for pop, node in f.agents.items()}
                        mark = watcher.mark()
                        wall0, t0 = time.time(), time.monotonic()
                        refusal.apply()
                        rule_in = refusal.wait()
                        gone = watcher.wait_not_via(mark, 10.0)
                    finally:
                        refusal.close()
                        t_call = time.monotonic()
                        agent_ns.run(["nft", "delete", "table", "inet", TABLE], check=False)
                        nft_calls.append(time.monotonic() - t_call)
                    if gone is None:
                        misses += 1
                        log("  no withdrawal within 10 s")
                        continue
                    samples.append(gone - t0)
                    row: dict[str, Any] = {"start": 0.0, "total": round(gone - t0, 4), "nft": round(rule_in - t0, 4),
                                           **_breakdown(logs, wall0)}
                    rows.append(row)
                    if gone - t0 > 0.3:
                        log(f"  slow sample: {row}")
                stats = summary(samples)
                log(f"  p50 {stats['p50']}s p99 {stats['p99']}s max {stats['max']}s")
                results.append({"impl": "agent-controlled", "label": f"controlled, {label}", "interval": INTERVAL,
                                "timeout": TIMEOUT, "rise": 1, "fall": FALL, "watch": False,
                                "settle_on_evidence": on_evidence,
                                "modes": {"refused": {"samples_s": [round(s, 4) for s in samples],
                                                      "misses": misses, **stats,
                                                      "breakdown": rows, "segments": _segments(rows),
                                                      "nft_call_s": summary(nft_calls)}}})
        finally:
            watcher.close()
    finally:
        lab.teardown()
    return results
