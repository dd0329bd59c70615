"""The controller's event-loop stalls at 10,000 VIPs x 50 POPs (issue 10), in a few minutes.

    python -m bench.controller_stall --out FILE [--files 1] [--commits 5] [--pyspy PREFIX]

What ``python -m bench controller --end-to-end-only`` does for the stalls, and nothing else:
the real daemon (``controller_scale.Daemon``) on the benchmark's generated checkout, then

1. **the burst**: the 50 POPs' first full reports at once (encoded before the clock), a status
   read (it waits for the pass that plans them all), the stall probe running through both;
2. **the steady state**: ``controller_scale._steady_state`` (delta reports every 2 s, 12 s);
3. **one-VIP commits**: ``--commits`` times, one VIP's publish list gains or loses p00 in a
   commit while p00's agent long-polls, the stall probe running through all of them.

``--pyspy PREFIX``: py-spy records the daemon (every thread, raw folded stacks, 100 Hz,
non-blocking) through the burst and its pass into PREFIX.burst.txt and through the commits
into PREFIX.commits.txt (``--gil``: only the thread holding the GIL at each sample). Run it
from a worktree of the code to measure, with any venv: the
daemon is started from this file's checkout (``controller_scale.ROOT``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import controller_scale as cs
from .report import ROOT, load_average, summary


def _git_head() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True, text=True)
    return r.stdout.strip()


class _Spy:
    """py-spy recording the daemon until stopped (nothing when no prefix was given)."""

    def __init__(self, pid: int, out: str | None, gil: bool = False) -> None:
        self.proc = None
        if out:
            exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--threads", "--nonblocking",
                                          *(["--gil"] if gil else []),
                                          "--rate", "100", "--format", "raw", "--output", out],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(2)  # SIGINT: py-spy writes what it recorded
            self.proc.wait(60)


async def drive(files: int, commits: int, pyspy: str | None, gil: bool = False,
                stalls: str = "probe") -> dict[str, Any]:
    from controller import wire
    from controller.agent.controller_link import HealthReport
    from controller.agent.plan_client import PlanClient
    import aiohttp

    out: dict[str, Any] = {"commit": _git_head(), "files": files, "load_start": load_average()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-stall-"))
    cdir, desired, names, regions = cs.committed_checkout(tmp, 10000, 50, files)
    daemon = cs.Daemon(cdir, tmp)
    clients: dict[str, PlanClient] = {}
    t0 = time.monotonic()
    try:
        clients = await cs.agents_of(daemon, desired, tmp)
        watcher = clients[cs.WATCHED_POP]
        plan = await watcher.fetch_plan(-1, 0)
        assert plan is not None
        out["up_s"] = round(time.monotonic() - t0, 1)

        # 1. the burst, as controller_scale.end_to_end sends it
        bodies = {}
        for i, pop in enumerate(clients):
            r = HealthReport(pop, plan.generation if pop == cs.WATCHED_POP else 0,
                             cs.verdicts(names, regions, i, len(clients), down_every=0), {n: True for n in names})
            w = wire.WireReport(r.plan_generation, r.origins, r.announced, 1)
            bodies[pop] = (json.dumps(wire.encode_report(w)).encode(), w)
        failed: list[str] = []

        async def post(pop: str, session: aiohttp.ClientSession) -> int:
            headers = {"Authorization": f"Bearer {cs.token(pop)}", "Content-Type": "application/json"}
            url, timeout = f"{daemon.url}/v1/reports/{pop}", aiohttp.ClientTimeout(total=600)
            async with session.post(url, data=bodies[pop][0], headers=headers, timeout=timeout) as resp:
                await resp.read()
                return resp.status

        async def one(pop: str, session: aiohttp.ClientSession) -> float:
            """Sent as controller_scale.end_to_end sends it: once more on a broken connection."""
            t = time.monotonic()
            for attempt in (1, 2):
                try:
                    if (status := await post(pop, session)) != 200:
                        raise RuntimeError(f"HTTP {status}")
                    clients[pop]._seq, clients[pop]._accepted = 1, bodies[pop][1]
                except Exception as exc:  # noqa: BLE001 - counted
                    if attempt == 1 and cs._broken_connection(exc):
                        continue
                    failed.append(f"{pop}: {exc}"[:200])
                break
            return time.monotonic() - t

        probe = cs._Probe(daemon.port, tmp / "probe-burst.json")
        await asyncio.sleep(0.5)
        spy = _Spy(daemon.proc.pid, f"{pyspy}.burst.txt" if pyspy else None, gil)
        load0, t_all = load_average(), time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            posts = await asyncio.gather(*(one(pop, session) for pop in clients))
        out["burst_answered_s"] = round(time.monotonic() - t_all, 3)
        await cs._status(daemon)
        out["burst_planned_s"] = round(time.monotonic() - t_all, 3)
        await asyncio.sleep(1.0)  # (the pass's journal and snapshot, after the status read's answer)
        spy.stop()
        out["burst_stall_ms"] = probe.stop()
        out["burst_answer_s"] = summary(posts, 3)
        out["burst_failures"] = failed
        out["burst_load"] = [load0, load_average()]
        await asyncio.sleep(3)
        out["idle_wait_s"] = await cs._until_idle(daemon.proc.pid)

        # 2. the steady state
        steady = await cs._steady_state(daemon, clients, names, regions, len(clients), print, stalls)
        out["steady_stall_ms"], out["steady_cpu_fraction"] = steady["steady_stall_ms"], steady["steady_cpu_fraction"]
        out["steady_load"] = steady["steady_load_average"]

        # 3. one-VIP commits
        plan = await watcher.fetch_plan(-1, 0)
        assert plan is not None
        vips_file = cdir / "vips.yaml"
        probe = cs._Probe(daemon.port, tmp / "probe-commits.json")
        spy = _Spy(daemon.proc.pid, f"{pyspy}.commits.txt" if pyspy else None, gil)
        load0 = load_average()
        totals = []
        for rep in range(commits):
            await asyncio.sleep(random.uniform(0.5, 1.5))
            present = cs.CHANGED_VIP in plan.vips
            waiting = asyncio.ensure_future(watcher.fetch_plan(plan.generation, 60))
            await asyncio.sleep(0.3)
            text = vips_file.read_text()
            head, sep, tail = text.partition(f"  - name: {cs.CHANGED_VIP}\n")
            address_line, _, rest = tail.partition("\n")
            publish_line, _, rest = rest.partition("\n")
            pops_now = publish_line.split("[", 1)[1].rstrip("]").split(", ")
            pops_new = [p for p in pops_now if p != cs.WATCHED_POP] if present else [cs.WATCHED_POP, *pops_now]
            tmpf = vips_file.with_suffix(".tmp")
            tmpf.write_text(f"{head}{sep}{address_line}\n    publish: [{', '.join(pops_new)}]\n{rest}")
            m0 = time.monotonic()
            tmpf.replace(vips_file)
            cs._git(cdir, "commit", "-qam", f"change {rep}")
            new_plan = await waiting
            while new_plan is None or (cs.CHANGED_VIP in new_plan.vips) == present:
                base = new_plan.generation if new_plan is not None else plan.generation
                new_plan = await watcher.fetch_plan(base, 60)
            totals.append(time.monotonic() - m0)
            plan = new_plan
        await asyncio.sleep(1.0)
        spy.stop()
        out["commits_stall_ms"] = probe.stop()
        out["commit_to_agent_s"] = summary(totals, 3)
        out["commits_load"] = [load0, load_average()]
        out["rss_mb"] = cs._status_mb(daemon.proc.pid, "VmRSS")
    finally:
        await cs.end_run(clients, daemon, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.controller_stall")
    ap.add_argument("--out", required=True, help="append one JSON line of results to this file")
    ap.add_argument("--label", default="", help="a name for this run in the file (main, branch...)")
    ap.add_argument("--files", type=int, default=1)
    ap.add_argument("--commits", type=int, default=5)
    ap.add_argument("--pyspy", help="record the daemon with py-spy into PREFIX.burst.txt / PREFIX.commits.txt")
    ap.add_argument("--gil", action="store_true", help="with --pyspy: sample only the thread holding the GIL "
                    "(py-spy record --gil): which thread keeps the event loop from running")
    ap.add_argument("--stalls", choices=("probe", "daemon", "none"), default="probe",
                    help="the steady state's stalls: the external probe, the daemon's own lag (/v1/status "
                    "event_loop, a 60 s window) or none")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res = {"label": args.label, "started": started, **asyncio.run(drive(args.files, args.commits, args.pyspy, args.gil, args.stalls))}
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(res) + "\n")
    b, s, c = res["burst_stall_ms"], res["steady_stall_ms"] or {}, res["commits_stall_ms"]
    print(f"{args.label} {res['commit']}: burst answered {res['burst_answered_s']} s, planned "
          f"{res['burst_planned_s']} s, stall p99/max {b['p99']}/{b['max']} ms; steady {s.get('p99')}/{s.get('max')} ms; "
          f"commits {c['p99']}/{c['max']} ms, to agent p50 {res['commit_to_agent_s']['p50']} s; "
          f"load {res['burst_load']} -> {res['commits_load']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
