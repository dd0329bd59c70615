"""Announcement rate: 10,000 /32s through the agent's speaker, ExaBGP and FRR, and back.

    python -m bench.announce_rate api --count N --result FILE --ready FILE   # ExaBGP's API process

The API process is the agent's real BGP side: `ExaBGPSpeaker.connect_stdio` and the
`announce_line` / `withdraw_line` commands with the agent's default attributes (MED 100,
one community), ExaBGP 5 with per-command acks (the agent's settings). On each SIGUSR1
it runs the next phase and appends its timestamps (CLOCK_MONOTONIC, shared by every
process on the machine) to the result file:

1. announce, sequential: one command, wait for its ack, the next (what the agent's
   reconcile pass does);
2. withdraw, sequential;
3. announce, pipelined: up to WINDOW one-route commands in flight (the speaker's FIFO of
   acks allows it; the agent never did this);
4. withdraw, pipelined;
5. announce, batched: what the agent does since, `speaker.send_changes`: routes alike share
   one ``announce attributes ... nlri`` command of up to `exabgp_api.MAX_BATCH` prefixes,
   `speaker.PIPELINE_WINDOW` commands in flight, per-route outcome kept;
6. withdraw, batched.
7. announce, agent: the agent itself (``controller.agent.daemon.Agent``, standalone, one VIP
   per /32, each with a TCP check of one shared backend, rise 1 and fall 1, the agent's
   logging at INFO to a file and its metrics): the first round of check results is handed
   in as its scheduler would (its scheduler is never run: no probes, the backend is not in
   this lab), then one
   ``reconcile_once``, whose commands go through the speaker above. So the row is a cold
   start as the agent does it, its own CPU (decisions, logs, metric label sets, the state
   file) included; built before the signal (config load and construction are reported apart);
8. withdraw, agent: one round of failed checks, one pass.

The harness (same lab as bench.failover, without the origin) times each phase from the
signal to: the last ack (API side), FRR bgpd holding all of them (``pfxRcd`` of the
session, polled over bgpd's vty socket every 10 ms), and the kernel FIB of the router
holding all of them (the N-th ``proto bgp`` route event from `ip monitor route`; zebra's
own count as a fallback), or none of them for withdrawals.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lab.exabgp import ExaBGPProcess
from lab.netns import Lab
from lab.nodes import ROOT
from lab.poll import wait_for

from .labtopo import LOCAL_AS, ORIGIN_ADDR, PEER_AS, POP_ADDR, PREFIX, RTR_ADDR, BgpLab, neighbor_block, proc_cpu_seconds, proc_rss_mb
from .report import fmt, table

BASE = int(ipaddress.IPv4Address("198.18.0.0"))  # RFC 2544's benchmarking range
WINDOW = 1000
IDLE_S = 3.0  # the window in which ExaBGP's CPU at rest is measured, before the first phase
PHASES = (("announce", "sequential"), ("withdraw", "sequential"), ("announce", "pipelined"),
          ("withdraw", "pipelined"), ("announce", "batched"), ("withdraw", "batched"),
          ("announce", "agent"), ("withdraw", "agent"))
STYLES = ("sequential", "pipelined", "batched", "agent")

Log = Callable[[str], None]


def prefixes(count: int) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network((BASE + i, 32)) for i in range(count)]


def selected_phases(styles: Iterable[str]) -> list[tuple[str, str]]:
    wanted = set(styles)
    return [(a, s) for a, s in PHASES if s in wanted]


# --- the API process ---------------------------------------------------------------------------
def agent_config(count: int, workdir: Path) -> dict[str, Any]:
    """The agent rows' config: ``count`` VIPs, one per /32 of ``prefixes``."""
    return {
        "pop": "bench", "allowed_prefixes": ["198.18.0.0/15"], "state_dir": str(workdir / "agent-state"),
        "bgp": {"local_as": LOCAL_AS, "neighbors": [{"address": RTR_ADDR, "local_address": POP_ADDR,
                                                      "peer_as": PEER_AS}],
                "attributes": {"up": {"med": 100, "communities": ["65101:100"]}}},
        "check_defaults": {"interval": 1.0, "timeout": 0.5, "rise": 1, "fall": 1},
        "vips": [{"name": f"v{i:05d}", "address": str(net), "check": {"type": "tcp"},
                  "origins": [{"region": "r1", "next_hop": ORIGIN_ADDR, "backends": [f"{ORIGIN_ADDR}:8080"]}]}
                 for i, net in enumerate(prefixes(count))],
    }


def _agent(count: int, workdir: Path, speaker: Any) -> tuple[Any, dict[str, float]]:
    """A standalone agent with ``count`` VIPs (one per /32 of ``prefixes``) and the agent's
    INFO logging to ``workdir/agent.log``; and the CPU seconds its config and construction took."""
    from prometheus_client import CollectorRegistry

    from controller import logs
    from controller.agent.daemon import Agent
    from controller.agent.runner import freeze_startup_heap
    from controller.config.agent import load_agent_config
    from controller.metrics.agent import AgentMetrics

    path = workdir / "agent.yaml"
    path.write_text(json.dumps(agent_config(count, workdir)))  # YAML is a superset of JSON, and json writes 10,000 VIPs in ms
    t0 = time.process_time()
    cfg = load_agent_config(str(path))
    t1 = time.process_time()
    logs.setup("anycast-agent", "INFO", stream=open(workdir / "agent.log", "a"))  # noqa: SIM115 - for the process's life
    registry = CollectorRegistry()
    # The real scheduler, never run: no probes (the backend is not in this lab), its set of
    # targets built as the agent builds it.
    agent = Agent(cfg, lambda: cfg, speaker, kernel=None, metrics=lambda snap: AgentMetrics(registry, snap))
    freeze_startup_heap()  # as run_agent does once the agent is built
    t2 = time.process_time()
    return agent, {"config_load_cpu_s": round(t1 - t0, 3), "construct_cpu_s": round(t2 - t1, 3)}


async def _agent_pass(agent: Any, ok: bool, acks: _Acks | None = None) -> dict[str, Any]:
    from controller.health.probes import ProbeResult

    result = ProbeResult(ok, 0.001, "ok" if ok else "connect refused")
    t0 = time.process_time()
    now = time.monotonic()
    for key in list(agent.health):
        agent._on_result(key, result, now)
    t1 = time.process_time()
    done = await agent.reconcile_once()
    t2 = time.process_time()
    out = {"results_cpu_s": round(t1 - t0, 3), "reconcile_cpu_s": round(t2 - t1, 3), "ok": done}
    if acks is not None and acks.first_cpu is not None:
        # The pass's CPU before its first command: serial, ExaBGP idle meanwhile.
        out["before_first_command_cpu_s"] = round(acks.first_cpu - t1, 3)
    return out


async def api_main(count: int, result: Path, ready: Path, batch: int, in_flight: int,
                   styles: Iterable[str] = STYLES) -> int:
    from controller.bgp.exabgp_api import RouteAttributes, RouteChange, announce_line, withdraw_line
    from controller.bgp.speaker import ExaBGPSpeaker, send_changes

    speaker = await ExaBGPSpeaker.connect_stdio(on_event=lambda _event: None, ack_timeout=60.0)
    reader = asyncio.create_task(speaker.run_reader())
    loop = asyncio.get_running_loop()
    go: asyncio.Queue[int] = asyncio.Queue()
    loop.add_signal_handler(signal.SIGUSR1, go.put_nowait, 1)
    attrs = RouteAttributes(med=100, communities=("65101:100",))
    nets = prefixes(count)
    todo = selected_phases(styles)
    agent: Any = None
    setup: dict[str, float] = {}
    ready.write_text(str(os.getpid()))
    for action, style in todo:
        if style == "agent" and agent is None:
            # Built once the speaker's rows are done, before this row's signal (the harness
            # waits for agent.ready): its config load is no part of any row's time.
            first = _FirstSend(speaker)
            agent, setup = _agent(count, result.parent, first)
            (result.parent / "agent.ready").write_text("")
        waiter = asyncio.ensure_future(go.get())
        await asyncio.wait((waiter, reader), return_when=asyncio.FIRST_COMPLETED)
        if reader.done():
            waiter.cancel()
            return 1  # ExaBGP went away
        extra: dict[str, Any] = {}
        if style == "agent":
            started = time.monotonic()
            first.at = None
            extra = {**setup, **await _agent_pass(agent, action == "announce")}
            acked = time.monotonic()
            if first.at is not None:  # ExaBGP had no work from the signal to this
                extra["first_command_s"] = round(first.at - started, 3)
            with open(result, "a") as f:
                f.write(json.dumps({"action": action, "style": style, "started": started, "acked": acked,
                                    "errors": 0 if extra["ok"] else 1, "agent": extra}) + "\n")
            continue
        lines = [announce_line(p, attrs) if action == "announce" else withdraw_line(p) for p in nets]
        started = time.monotonic()
        if style == "sequential":
            oks = [await speaker.send(line) for line in lines]
        elif style == "batched":
            oks = []
            changes = [RouteChange(p, attrs if action == "announce" else None) for p in nets]
            async for members, ok in send_changes(speaker.send, changes, max_routes=batch, window=in_flight):
                oks.extend([ok] * len(members))
        else:
            window = asyncio.Semaphore(WINDOW)

            async def one(line: str) -> bool:
                async with window:
                    return await speaker.send(line)

            oks = list(await asyncio.gather(*(one(line) for line in lines)))
        acked = time.monotonic()
        with open(result, "a") as f:
            f.write(json.dumps({"action": action, "style": style, "started": started, "acked": acked,
                                "errors": oks.count(False)}) + "\n")
    await reader  # until ExaBGP stops
    return 0


# --- the harness ---------------------------------------------------------------------------------
def _pfx_rcd(topo: BgpLab) -> int | None:
    try:
        summary = topo.rtr.vtysh_json("show bgp ipv4 unicast summary json")
        return int(summary["peers"][POP_ADDR]["pfxRcd"])
    except Exception:  # noqa: BLE001 - session not there yet: unknown
        return None


def _zebra_fib(topo: BgpLab) -> int:
    summary = topo.rtr.vtysh_json("show ip route summary json")
    return sum(int(r.get("fib", 0)) for r in summary.get("routes", []) if r.get("type") == "bgp")


def _kernel_count(topo: BgpLab) -> int:
    out = topo["rtr"].run(["ip", "-4", "route", "show", "proto", "bgp"]).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def run(*, quick: bool, log: Log, routes: int | None = None, batch: int | None = None,
        window: int | None = None, styles: Iterable[str] = STYLES) -> dict[str, Any]:
    from controller.bgp.exabgp_api import MAX_BATCH
    from controller.bgp.exabgp_config import exabgp_environment
    from controller.bgp.speaker import PIPELINE_WINDOW

    count = routes or (1000 if quick else 10000)
    batch, window = batch or MAX_BATCH, window or PIPELINE_WINDOW
    lab = Lab(PREFIX)
    phases = []
    footprint: dict[str, Any] = {}
    exabgp_env: dict[str, str] = {}
    idle_share: float | None = None
    try:
        topo = BgpLab(lab, with_origin=False).up()
        workdir = topo.workdir("pop", "announce")
        result, ready = workdir / "phases.jsonl", workdir / "api.ready"
        run_line = (f"{sys.executable} -m bench.announce_rate api --count {count} --result {result} --ready {ready} "
                    f"--batch {batch} --window {window} --styles {' '.join(styles)}")  # (ExaBGP splits a run line at commas)
        config = (f"process bench {{\n    run {run_line};\n    encoder json;\n}}\n\n"
                  + neighbor_block(api="    api {\n        processes [ bench ];\n        neighbor-changes;\n    }\n"))
        # ExaBGP runs with the agent's settings (what `anycast-agent launch` gives it); settings
        # to try go in as exabgp.* variables of the bench's own environment and win.
        tried = {k: v for k, v in os.environ.items() if k.startswith("exabgp.")}
        exabgp_env = {**exabgp_environment(str(workdir / "exabgp.log")), **tried}
        exa = ExaBGPProcess(topo["pop"], workdir, config,
                            env={"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **exabgp_env}).start()
        wait_for(ready.exists, 20, 0.05, "the announce API process")
        # The ready file holds the PID as the node sees it; signals from here need the host's.
        [api_pid] = exa.wait_api_started()
        wait_for(topo.neighbor_established, 30, 0.05, "the BGP session rtr <-> ExaBGP")
        time.sleep(1.0)  # let the session settle (a collision can flap it once at start-up)
        # ExaBGP's own CPU with the session up and nothing to do: what its reactor's polling
        # costs at rest (exabgp.reactor.speed sets how often it wakes).
        idle0, idle_t0 = proc_cpu_seconds(exa.pid), time.monotonic()
        time.sleep(IDLE_S)
        idle_cpu = _delta(proc_cpu_seconds(exa.pid), idle0)
        idle_share = None if idle_cpu is None else round(idle_cpu / (time.monotonic() - idle_t0), 4)
        assert topo.watcher is not None
        for i, (action, style) in enumerate(selected_phases(styles)):
            target = count if action == "announce" else 0
            log(f"announce: {action} {count} /32s, {style}")
            if style == "agent":
                wait_for((workdir / "agent.ready").exists, 300, 0.05, "the agent with its VIPs")
                time.sleep(1.0)
            mark = topo.watcher.mark()
            cpu0 = {n: proc_cpu_seconds(p) for n, p in (("exabgp", exa.pid), ("api", api_pid))}
            sleeps0 = _voluntary_switches(exa.pid)
            sched0 = _schedstat(exa.pid)
            t0 = time.monotonic()
            os.kill(api_pid, signal.SIGUSR1)
            limit = t0 + max(120.0, count / 50)
            t_rib = None
            while time.monotonic() < limit:
                if _pfx_rcd(topo) == target:
                    t_rib = time.monotonic()
                    break
                time.sleep(0.01)
            # The kernel: the count-th route event (exact), else zebra's count (polled).
            t_fib = topo.watcher.wait_count(action == "announce", "bgp", count, mark, max(0.0, limit - time.monotonic()))
            fib_source = "ip monitor"
            if t_fib is None:
                fib_source = "zebra"
                t_fib = wait_for(lambda: _zebra_fib(topo) == target and time.monotonic(), 60, 0.01,
                                 f"zebra fib count {target}")
            kernel = _kernel_count(topo)
            api = wait_for(lambda: _api_phase(result, i), 60, 0.05, "the API process's timestamps")
            cpu = {n: _delta(proc_cpu_seconds(p), cpu0[n]) for n, p in (("exabgp", exa.pid), ("api", api_pid))}
            # How often ExaBGP's reactor went to sleep in this phase: with work queued and no
            # command arriving it polls for 10 ms (reactor.speed / 100) per 50 routes.
            sleeps = _delta(_voluntary_switches(exa.pid), sleeps0)
            sched1 = _schedstat(exa.pid)
            row = {
                "action": action, "style": style, "routes": count,
                "acked_s": round(api["acked"] - t0, 3),
                "rib_s": None if t_rib is None else round(t_rib - t0, 3),
                "fib_s": round(t_fib - t0, 3),
                "fib_source": fib_source,
                "errors": api["errors"],
                "kernel_routes_after": kernel,
                "cpu_s": cpu,
                "exabgp_sleeps": None if sleeps is None else int(sleeps),
                # Time ExaBGP was runnable but waited for a CPU (the kernel's run-queue wait).
                "exabgp_runqueue_wait_s": (None if sched0 is None or sched1 is None
                                           else round((sched1[1] - sched0[1]) / 1e9, 3)),
            }
            if "agent" in api:  # the agent's own CPU in the API process's, split
                row["agent"] = {k: v for k, v in api["agent"].items() if k != "ok"}
            for key in ("acked", "rib", "fib"):
                secs = row[f"{key}_s"]
                row[f"{key}_per_s"] = round(count / secs) if secs else None
            phases.append(row)
            log(f"  acked {row['acked_s']}s, FRR RIB {row['rib_s']}s, FIB {row['fib_s']}s "
                f"({row['fib_per_s']}/s), {row['errors']} errors, kernel holds {kernel}")
            if action == "announce":
                footprint[style] = {"exabgp_rss_mb": _r(proc_rss_mb(exa.pid)), "api_rss_mb": _r(proc_rss_mb(api_pid)),
                                    **{f"{d}_rss_mb": _r(proc_rss_mb(pid)) for d, pid in topo.rtr.pids.items()}}
            time.sleep(1.0)
        exa.stop(signal.SIGTERM)
    finally:
        lab.teardown()
    return {"routes": count, "window": WINDOW, "batch": batch, "batch_window": window, "phases": phases, "rss_with_all_routes": footprint,
            "exabgp_env": exabgp_env, "exabgp_idle_cpu_share": idle_share,
            "reference": "LAB-NOTES: about 2,000 routes/s with the per-command ack, about 2,800/s "
                         "when one command carries 100 prefixes"}


def _api_phase(result: Path, i: int) -> dict[str, Any] | None:
    lines = result.read_text().splitlines() if result.exists() else []
    return json.loads(lines[i]) if len(lines) > i else None


def _schedstat(pid: int) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable waiting for one) of ``pid``'s main thread."""
    try:
        on_cpu, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
        return int(on_cpu), int(waiting)
    except (OSError, ValueError):
        return None


def _voluntary_switches(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round(after - before, 2)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def render(result: dict[str, Any]) -> str:
    rows = [[p["action"], p["style"], p["routes"], p["acked_s"], p["rib_s"], p["fib_s"], p["acked_per_s"],
             p["fib_per_s"], p["errors"], p["kernel_routes_after"], (p["cpu_s"] or {}).get("exabgp"),
             (p["cpu_s"] or {}).get("api"), p.get("exabgp_sleeps")] for p in result["phases"]]
    fp = result.get("rss_with_all_routes", {}).get("sequential", {})
    return table(f"Announcement rate: {result['routes']:,} /32s, agent speaker -> ExaBGP -> FRR (seconds from the start)",
                 ["action", "style", "routes", "all acked", "all in FRR RIB", "all in FIB", "acks/s", "FIB/s",
                  "errors", "kernel after", "ExaBGP CPU s", "API CPU s", "ExaBGP sleeps"], rows,
                 [f"sequential = wait for each ack (the agent until now); pipelined = up to {result['window']} "
                  f"one-route commands in flight; batched = the agent's send_changes: up to {result.get('batch')} "
                  f"routes per command, {result.get('batch_window')} commands in flight",
                  "RSS with all routes (MB): " + ", ".join(f"{k.removesuffix('_rss_mb')} {fmt(v)}" for k, v in fp.items()),
                  result["reference"], *_agent_notes(result),
                  f"ExaBGP at rest (session up, no routes): {fmt(result.get('exabgp_idle_cpu_share'))} of a core; "
                  "settings: " + " ".join(f"{k}={v}" for k, v in sorted(result.get("exabgp_env", {}).items())
                                          if "log_destination" not in k)])


def _agent_notes(result: dict[str, Any]) -> list[str]:
    """The agent rows' own CPU, split (the API CPU column holds it with the speaker's)."""
    out = []
    for p in result["phases"]:
        a = p.get("agent")
        if a:
            out.append(f"agent {p['action']}: check results {a['results_cpu_s']} CPU s, reconcile pass "
                       f"{a['reconcile_cpu_s']} CPU s (config load {a['config_load_cpu_s']}, construction "
                       f"{a['construct_cpu_s']}, before the signal)")
    return out


class _FirstSend:
    """The speaker, noting when the agent's pass sent its first command."""

    def __init__(self, speaker: Any) -> None:
        self._speaker = speaker
        self.at: float | None = None

    async def send(self, line: str) -> bool:
        if self.at is None:
            self.at = time.monotonic()
        return bool(await self._speaker.send(line))


class _Acks:
    """A speaker that acks every command at once (the agent's pass alone, no ExaBGP); it notes
    the process's CPU time at the first command, so a pass shows what it spent before ExaBGP
    got any work."""

    def __init__(self) -> None:
        self.commands = 0
        self.first_cpu: float | None = None

    async def send(self, line: str) -> bool:
        if self.first_cpu is None:
            self.first_cpu = time.process_time()
        self.commands += 1
        return True


async def agent_pass_main(count: int, reps: int) -> dict[str, Any]:
    """The agent rows' pass in this process, without a lab (no root): ``reps`` times an
    agent built afresh, its first round of results and one pass to announce, then one of
    failures and one pass to withdraw; CPU seconds of each part."""
    import tempfile

    rows = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            acks = _Acks()
            agent, setup = _agent(count, Path(tmp), acks)
            announce = await _agent_pass(agent, True, acks)
            acks.first_cpu = None
            withdraw = await _agent_pass(agent, False, acks)
            rows.append({**setup, "announce": announce, "withdraw": withdraw, "commands": acks.commands})
            logging.getLogger().handlers.clear()
            gc.unfreeze()  # the next rep's agent starts as a fresh process's would
    return {"vips": count, "reps": rows, "load_average": list(os.getloadavg())}


def config_load_main(count: int, reps: int) -> dict[str, Any]:
    """CPU seconds of ``load_agent_config`` on the agent rows' config written as JSON (what
    the rows load) and as block YAML (what a person writes), ``reps`` times each, alternately."""
    import tempfile

    import yaml

    from controller.config.agent import load_agent_config

    rows: dict[str, list[float]] = {"json": [], "yaml": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = agent_config(count, Path(tmp))
        files = {"json": Path(tmp) / "agent.json", "yaml": Path(tmp) / "agent.yaml"}
        files["json"].write_text(json.dumps(config))
        files["yaml"].write_text(yaml.safe_dump(config, sort_keys=False))
        for _ in range(reps):
            for form, path in files.items():
                t0 = time.process_time()
                load_agent_config(str(path))
                rows[form].append(round(time.process_time() - t0, 3))
    return {"vips": count, "config_load_cpu_s": rows, "load_average": list(os.getloadavg())}


def config_handoff_main(count: int, reps: int) -> dict[str, Any]:
    """CPU seconds of a cold start's config work at ``count`` VIPs, JSON and YAML, ``reps``
    times alternately: ``launch`` (read, parse, hand over: ``agent.config_handoff``) and the
    API process (read, take over), against the second parse it did before."""
    import tempfile

    import yaml

    from controller.agent import config_handoff
    from controller.config.agent import parse_agent_config
    from controller.config.reader import read_text

    rows: dict[str, dict[str, list[float]]] = {f: {"launch": [], "run": [], "parse": []} for f in ("json", "yaml")}
    with tempfile.TemporaryDirectory() as tmp:
        config = agent_config(count, Path(tmp))
        files = {"json": Path(tmp) / "agent.json", "yaml": Path(tmp) / "agent.yaml"}
        files["json"].write_text(json.dumps(config))
        files["yaml"].write_text(yaml.safe_dump(config, sort_keys=False))
        (Path(tmp) / "agent-state").mkdir()
        for _ in range(reps):
            for form, path in files.items():
                t0 = time.process_time()
                text = read_text(str(path))
                cfg = parse_agent_config(text, source=str(path))
                env = config_handoff.hand_over(cfg.state_dir, cfg, config_handoff.identity(text, []))
                t1 = time.process_time()
                text = read_text(str(path))
                taken = config_handoff.take_over(config_handoff.identity(text, []), env)
                t2 = time.process_time()
                parse_agent_config(read_text(str(path)), source=str(path))  # what the API process did before
                t3 = time.process_time()
                assert taken == cfg, "the handoff must give the config the file gives"
                for key, secs in (("launch", t1 - t0), ("run", t2 - t1), ("parse", t3 - t2)):
                    rows[form][key].append(round(secs, 3))
    return {"vips": count, "cpu_s": rows, "load_average": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.announce_rate")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("api", help="run as ExaBGP's API process")
    a.add_argument("--count", type=int, required=True)
    a.add_argument("--result", type=Path, required=True)
    a.add_argument("--ready", type=Path, required=True)
    a.add_argument("--batch", type=int, required=True)
    a.add_argument("--window", type=int, required=True)
    a.add_argument("--styles", nargs="+", default=list(STYLES))
    g = sub.add_parser("agent-pass", help="the agent rows' pass in process, no lab: JSON on stdout")
    g.add_argument("--count", type=int, default=10000)
    g.add_argument("--reps", type=int, default=3)
    c = sub.add_parser("config-load", help="the agent rows' config load, as JSON and as YAML: JSON on stdout")
    c.add_argument("--count", type=int, default=10000)
    c.add_argument("--reps", type=int, default=3)
    o = sub.add_parser("config-handoff", help="a cold start's config work, launch and the API process: JSON on stdout")
    o.add_argument("--count", type=int, default=10000)
    o.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.cmd == "config-handoff":
        print(json.dumps(config_handoff_main(args.count, args.reps)))
        return 0
    if args.cmd == "config-load":
        print(json.dumps(config_load_main(args.count, args.reps)))
        return 0
    if args.cmd == "agent-pass":
        print(json.dumps(asyncio.run(agent_pass_main(args.count, args.reps))))
        return 0
    return asyncio.run(api_main(args.count, args.result, args.ready, args.batch, args.window,
                                args.styles))


if __name__ == "__main__":
    sys.exit(main())
