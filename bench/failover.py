"""Detection to withdrawal: from a backend failing to the VIP leaving the upstream router's FIB.

Lab (bench.labtopo): FRR router ``rtr`` <- BGP -> ExaBGP in ``pop`` -> one HTTP backend in
``org`` (lab.backend on 100.64.10.1:8080, checked with GET /healthz). Two ways to fail it:

- refused: SIGKILL the backend process; checks get a TCP reset at once.
- blackhole: an nftables rule in ``org`` drops everything to port 8080; checks time out.

The clock starts just before the kill (os.kill, or the `nft add rule` call, ~3 ms) and
stops when `ip monitor route` in ``rtr`` reports the VIP's route deleted (RouteWatcher).
Each repetition first waits until the VIP is back in rtr's FIB, then a random delay of
one to two check intervals, so kills land at random phases of the check cycle.

Two health checkers, each run as ExaBGP's API process with the same interval, timeout,
rise and fall:
- ours: ``anycast-agent launch`` (ExaBGP + the agent, as systemd runs it);
- ExaBGP's bundled ``exabgp-healthcheck`` with ``--withdraw-on-down``, checking with
  ``curl -sf --max-time TIMEOUT`` (its own ``--timeout`` takes whole seconds only, so the
  sub-second timeout has to come from the command), ``--fast-interval`` equal to the
  interval, and ``--debounce`` (commands only on state changes; detection is unaffected).

``rise`` does not enter the measurement (it only paces the recovery between
repetitions), so both run with rise 1 to keep the benchmark short.

Ours runs with ``watch: false`` (polling only) in the comparison and fastest arms, so they
stay comparable with earlier runs; the ``event-driven`` arms run ours with the default
``watch: true`` at a 1 s interval, side by side with exabgp-healthcheck at 1 s, on the
failure watch is for (the killed process); a blackhole gives a watch no event and is
measured by the polling arms.
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lab.exabgp import ExaBGPProcess
from lab.netns import Lab
from lab.nodes import AgentNode, start_backend
from lab.poll import wait_for

from .labtopo import ORIGIN_ADDR, PREFIX, BgpLab, neighbor_block
from .report import fmt, summary, table

VIP = "198.51.100.10"
VIP_PREFIX = f"{VIP}/32"
PORT = 8080
NFT_TABLE = "tbench"
METRICS_PORT = 9701
MODES = ("refused", "blackhole")
IMPLS = {"agent": "ours (anycast-agent)", "exabgp-healthcheck": "exabgp-healthcheck"}
CONTROLLED = {"agent-controlled": "ours under a controller (3 POPs)"}  # bench/controlled.py

Log = Callable[[str], None]


@dataclass(frozen=True)
class Arm:
    """One health checker at one set of settings."""

    impl: str  # "agent" | "exabgp-healthcheck"
    label: str  # "compare" | "fastest"
    interval: float
    timeout: float
    rise: int
    fall: int
    watch: bool = False  # ours only: event-driven detection (check.watch)
    modes: tuple[str, ...] = MODES

    @property
    def bound(self) -> float:
        """The target from the issue: interval x fall + timeout + 0.1 s."""
        return self.interval * self.fall + self.timeout + 0.1

    @property
    def settings(self) -> str:
        watch = " watch" if self.watch else ""
        return f"i={self.interval:g} t={self.timeout:g} r={self.rise} f={self.fall}{watch}"


def arms(compare_interval: float, compare_timeout: float) -> list[Arm]:
    """Ours and ExaBGP's at the comparison settings, then both at our fastest safe ones,
    then ours with the timeout below interval x (1 - jitter): with timeout == interval a
    check that times out is often still running when the next one is due, and the
    scheduler skips that one (never two probes of one target at once)."""
    out = []
    for label, interval, timeout in (("compare", compare_interval, compare_timeout), ("fastest", 0.1, 0.1)):
        for impl in IMPLS:
            out.append(Arm(impl, label, interval, timeout, rise=1, fall=2))
    out.append(Arm("agent", "fastest, t<0.9i", 0.1, 0.08, rise=1, fall=2))
    # Event-driven: a killed backend at a 1 s interval, ours watching, theirs polling.
    for impl in IMPLS:
        out.append(Arm(impl, "event-driven", 1.0, 0.5, rise=1, fall=2, watch=impl == "agent", modes=("refused",)))
    return out


# --- configs ---------------------------------------------------------------------------------
def agent_config(arm: Arm) -> dict[str, Any]:
    return {
        "pop": "bench",
        "allowed_prefixes": ["198.51.100.0/24"],
        "bgp": {"local_as": 65101, "neighbors": [
            {"address": "100.64.1.1", "local_address": "100.64.1.2", "peer_as": 65001, "hold_time": 3}]},
        "vips": [{
            "name": "bench", "address": VIP_PREFIX,
            "check": {"type": "http", "path": "/healthz", "expect_status": 200, "interval": arm.interval,
                      "timeout": arm.timeout, "rise": arm.rise, "fall": arm.fall, "watch": arm.watch},
            "origins": [{"region": "origin", "next_hop": ORIGIN_ADDR, "backends": [f"{ORIGIN_ADDR}:{PORT}"]}],
        }],
    }


def healthcheck_conf(arm: Arm) -> str:
    """exabgp-healthcheck's config file: ExaBGP's `run` line cannot quote a --cmd with spaces."""
    return "\n".join([
        "name = bench",
        f"interval = {arm.interval}",
        f"fast-interval = {arm.interval}",
        # Whole seconds (its SIGALRM); a safety net above curl's own --max-time.
        f"timeout = {math.ceil(arm.timeout) + 1}",
        f"rise = {arm.rise}",
        f"fall = {arm.fall}",
        f"command = curl -sf -o /dev/null --max-time {arm.timeout} http://{ORIGIN_ADDR}:{PORT}/healthz",
        f"ip = {VIP_PREFIX}",
        "withdraw-on-down",
        "no-ip-setup",
        "no-syslog",
        "debounce",
    ]) + "\n"


def healthcheck_exabgp_conf(conf_path: Path) -> str:
    exe = Path(sys.executable).parent / "exabgp-healthcheck"
    # ExaBGP only takes route commands from a process listed in the neighbor's api block.
    return (f"process healthcheck {{\n    run {exe} --config {conf_path};\n    encoder text;\n}}\n\n"
            + neighbor_block(api="    api {\n        processes [ healthcheck ];\n    }\n"))


# --- the benchmark ---------------------------------------------------------------------------
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


class Failover:
    def __init__(self, topo: BgpLab, reps: int, log: Log, rng: random.Random) -> None:
        self.topo = topo
        self.reps = reps
        self.log = log
        self.rng = rng
        self.backend: subprocess.Popen[Any] | None = None
        self.blackholed = False
        self.agent_log: Path | None = None  # ours logs its withdraws; ExaBGP's checker does not
        org = topo["org"]
        org.run(["nft", "add", "table", "inet", NFT_TABLE])
        org.run(["nft", "add", "chain", "inet", NFT_TABLE, "in", "{ type filter hook input priority 0; }"])

    # --- backend ---------------------------------------------------------------------------
    def start_backend(self) -> None:
        if self.backend is None:
            self.backend = start_backend(self.topo["org"], self.topo.workdir("org"), "origin",
                                         [f"{ORIGIN_ADDR}:{PORT}"])

    def reap_backend(self) -> None:
        if self.backend is not None:
            self.topo["org"].terminate(self.backend.pid)  # already dead: only bookkeeping
            self.backend = None

    def heal(self) -> None:
        if self.blackholed:
            self.topo["org"].run(["nft", "flush", "chain", "inet", NFT_TABLE, "in"])
            self.blackholed = False
        self.start_backend()

    def in_fib(self) -> bool:
        return self.topo.rtr.fib_has(VIP_PREFIX)

    def wait_announced(self, timeout: float = 30.0) -> None:
        wait_for(self.in_fib, timeout, 0.01, f"{VIP_PREFIX} in rtr's FIB")

    # --- one checker -------------------------------------------------------------------------
    def start(self, arm: Arm) -> Callable[[], None]:
        """Start the checker of `arm` in pop; return its stop function."""
        pop = self.topo["pop"]
        workdir = self.topo.workdir("pop", f"{arm.impl}-{arm.interval:g}-{arm.timeout:g}")
        if arm.impl == "agent":
            config = workdir / "agent.yaml"
            config.write_text(yaml.safe_dump(agent_config(arm)))
            agent = AgentNode(pop, workdir, config, METRICS_PORT)
            agent.start()
            self.agent_log = agent.log_path
            return lambda: agent.stop_exabgp(signal.SIGTERM)
        conf = workdir / "healthcheck.conf"
        conf.write_text(healthcheck_conf(arm))
        exa = ExaBGPProcess(pop, workdir, healthcheck_exabgp_conf(conf)).start()
        self.agent_log = None

        def stop() -> None:
            exa.stop(signal.SIGTERM)

        return stop

    def run_arm(self, arm: Arm) -> dict[str, Any]:
        self.log(f"failover: {IMPLS[arm.impl]} at {arm.settings}: {self.reps} x {', '.join(arm.modes)}")
        self.heal()
        stop = self.start(arm)
        try:
            self.wait_announced(60)
            modes = {mode: self.run_mode(arm, mode) for mode in arm.modes}
        finally:
            stop()
        # The session closed with ExaBGP: FRR drops the route; start the next arm clean.
        wait_for(lambda: not self.in_fib(), 15, 0.02, f"{VIP_PREFIX} gone after stopping {arm.impl}")
        return {"impl": arm.impl, "label": arm.label, "interval": arm.interval, "timeout": arm.timeout,
                "rise": arm.rise, "fall": arm.fall, "watch": arm.watch, "bound_s": round(arm.bound, 3),
                "modes": modes}

    def run_mode(self, arm: Arm, mode: str) -> dict[str, Any]:
        samples: list[float] = []
        detect: list[float] = []
        misses = 0
        limit = max(5.0, 5 * arm.bound)
        for _ in range(self.reps):
            self.heal()
            self.wait_announced()
            time.sleep(arm.interval * (1.0 + self.rng.random()))
            log_offset = self.agent_log.stat().st_size if self.agent_log else 0
            mark = self.topo.watcher.mark() if self.topo.watcher else 0
            wall0 = time.time()
            t0 = time.monotonic()
            self.fail(mode)
            assert self.topo.watcher is not None
            gone = self.topo.watcher.wait(VIP_PREFIX, False, mark, limit)
            if mode == "refused":
                self.reap_backend()  # the next heal() starts a new one
            if gone is None:
                misses += 1
                self.log(f"  {mode}: no withdrawal within {limit:.1f}s")
                continue
            samples.append(gone - t0)
            if self.agent_log is not None:
                at = withdraw_time(self.agent_log, log_offset)
                if at is not None:
                    detect.append(at - wall0)
        self.heal()
        stats = summary(samples)
        out: dict[str, Any] = {"samples_s": [round(s, 4) for s in samples], "misses": misses, **stats}
        if detect:
            # Kill -> the agent logged ExaBGP's ack of its withdraw (ms resolution); the rest
            # of the total is ExaBGP -> FRR bgpd -> zebra -> kernel.
            out["agent_ack"] = summary(detect)
            prop = [s - d for s, d in zip(samples, detect)] if len(detect) == len(samples) else []
            out["ack_to_fib"] = summary(prop)
        p99 = stats["p99"]
        self.log(f"  {mode}: p50 {fmt(stats['p50'])}s p99 {fmt(p99)}s max {fmt(stats['max'])}s"
                 f" (bound {arm.bound:.2f}s){'' if not misses else f', {misses} missed'}")
        return out

    def fail(self, mode: str) -> None:
        if mode == "refused":
            assert self.backend is not None
            os.kill(self.backend.pid, signal.SIGKILL)
        else:
            self.topo["org"].run(["nft", "add", "rule", "inet", NFT_TABLE, "in", "tcp", "dport", str(PORT), "drop"])
            self.blackholed = True


def withdraw_time(log_path: Path, offset: int) -> float | None:
    """Unix time at which the agent logged its backend_down withdraw of the VIP after `offset`."""
    needle = f"withdraw {VIP_PREFIX} (VIP bench), reason backend_down"
    return next((at for at, line in log_lines(log_path, offset) if needle in line), None)


def log_lines(log_path: Path, offset: int) -> list[tuple[float, str]]:
    """The agent's log lines after byte `offset`, each with the Unix time it was logged at
    (``asctime``: local time, ms resolution; the record's creation, not its write)."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        m = _LOG_TIME.match(line)
        if m:
            out.append((time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000, line))
    return out


# --- entry points -----------------------------------------------------------------------------
def run(*, quick: bool, log: Log, compare_interval: float = 0.5, compare_timeout: float = 0.25,
        reps: int | None = None, labels: tuple[str, ...] = ()) -> dict[str, Any]:
    """``labels``: run only the arms with these labels (all by default)."""
    reps = reps or (3 if quick else 20)
    selected = [a for a in arms(compare_interval, compare_timeout) if not labels or a.label in labels]
    controlled = not labels or "controlled" in labels
    if not selected and not controlled:
        raise ValueError(f"no failover arm is labelled {', '.join(labels)}")
    results: list[dict[str, Any]] = []
    if selected:
        lab = Lab(PREFIX)
        try:
            topo = BgpLab(lab).up()
            bench = Failover(topo, reps, log, random.Random())
            results = [bench.run_arm(arm) for arm in selected]
        finally:
            lab.teardown()
    if controlled:
        from . import controlled as under_controller
        results += under_controller.run(reps=reps, log=log)
    return {"reps": reps, "arms": results, "ratios": ratios(results) + controlled_ratios(results),
            "method": "kill (SIGKILL backend, or nft drop rule) -> VIP route deleted from rtr's kernel FIB "
                      "(ip monitor route); nearest-rank percentiles"}


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """exabgp-healthcheck / ours, per settings and failure mode."""
    out = []
    for label in dict.fromkeys(r["label"] for r in results):
        by_impl = {r["impl"]: r for r in results if r["label"] == label}
        if set(by_impl) != set(IMPLS):
            continue
        for mode in MODES:
            if mode not in by_impl["agent"]["modes"] or mode not in by_impl["exabgp-healthcheck"]["modes"]:
                continue
            ours, theirs = by_impl["agent"]["modes"][mode], by_impl["exabgp-healthcheck"]["modes"][mode]
            row: dict[str, Any] = {"label": label, "mode": mode}
            for q in ("p50", "p99"):
                a, b = ours.get(q), theirs.get(q)
                row[f"{q}_ratio"] = round(b / a, 2) if a and b else None
            out.append(row)
    return out


def controlled_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Under a controller, refused checks: the fixed settle and exabgp-healthcheck (standalone,
    the same interval and fall) over the evidence-based settle."""
    by_label = {r["label"]: r["modes"].get("refused") for r in results}
    ours = by_label.get("controlled, evidence")
    if not ours:
        return []
    out = []
    for label in ("controlled, settle only", "fastest"):
        theirs = next((r["modes"].get("refused") for r in results if r["label"] == label
                       and r["impl"] in ("agent-controlled", "exabgp-healthcheck")), None)
        if not theirs:
            continue
        row: dict[str, Any] = {"label": f"{'exabgp-healthcheck ' + label if label == 'fastest' else label}"
                                        f" / controlled, evidence", "mode": "refused"}
        for q in ("p50", "p99"):
            a, b = ours.get(q), theirs.get(q)
            row[f"{q}_ratio"] = round(b / a, 2) if a and b else None
        out.append(row)
    return out


def render(result: dict[str, Any]) -> str:
    rows = []
    names = {**IMPLS, **CONTROLLED}
    for r in result["arms"]:
        arm = Arm(r["impl"], r["label"], r["interval"], r["timeout"], r["rise"], r["fall"], r.get("watch", False))
        settings = arm.settings + (f", {r['label'].removeprefix('controlled, ')}" if r["impl"] in CONTROLLED else "")
        for mode, m in r["modes"].items():
            ack = m.get("agent_ack", {}).get("p50")
            fib = m.get("ack_to_fib", {}).get("p50")
            rows.append([names[arm.impl], settings, mode, m["n"], m["p50"], m["p90"], m["p99"], m["max"],
                         arm.bound, None if m["p99"] is None else m["p99"] < arm.bound and not m["misses"],
                         ack, fib])
    out = table(f"Failover: backend failure -> VIP out of the upstream FIB (seconds, {result['reps']} reps each)",
                ["checker", "settings", "failure", "n", "p50", "p90", "p99", "max", "bound", "p99<bound",
                 "kill->ack p50", "ack->FIB p50"], rows,
                ["bound = interval x fall + timeout + 0.1 s; p99 is nearest-rank (the max at n=20)",
                 "kill->ack: until ExaBGP acknowledged the agent's withdraw (agent log, ms resolution)",
                 "under a controller: sjc's checks refused (nft reject), fra and sin healthy; until the VIP's route "
                 "at rtr-sjc (the POP router) is no longer via the agent (bench/controlled.py)"])
    ratio_rows = [[x["label"], x["mode"], x["p50_ratio"], x["p99_ratio"]] for x in result["ratios"]]
    out += "\n" + table("Failover: exabgp-healthcheck / ours (same interval, timeout, rise, fall)",
                        ["settings", "failure", "p50 ratio", "p99 ratio"], ratio_rows)
    return out
