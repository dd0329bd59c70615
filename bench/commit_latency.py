"""One VIP's commit, end to end, broken down (issue 10's 150 / 250 ms target; results 3l).

    python -m bench.commit_latency --files 1 --changes 20 --out FILE.json

The real daemon on 127.0.0.1 serving a generated checkout of 10,000 VIPs x 50 POPs (the
same as ``python -m bench controller``: ``controller_scale.generate``), every POP's first
full report, then only the commits: ``--changes`` times one VIP's publish list loses or
regains p00 (the agent's ``PlanClient`` long-polls p00), then ``--everywhere`` times a new
VIP published at all 50 POPs (plain HTTP long-polls, as in controller_scale). No steady
state, no in-process part: a few minutes instead of ~20.

Each one-VIP sample is split with timestamps from both sides (wall clock, one machine):
the benchmark's rename + ``git commit`` (``commit``), the daemon's ``reload of ...`` log line
where the code logs it (when inotify's batch arrived, when the reload and apply_config
returned, when the pass that followed had served), else the ``desired state ... loaded``
line (older code), the long-poll answer's bytes arriving, and the client holding the plan
(decoded and checked; its cache is written after, as the agent does: ``cache_later``).

This process stands in for p00's agent, so it holds what an agent holds and no more: the
desired state it loads to know the VIPs' names is dropped (only names, regions and POP names
are kept), the 50 POPs' report bodies too, and once set up its heap is frozen out of cyclic
garbage collection (``gc.freeze``, as the agent's ``freeze_startup_heap`` does). Before that,
its full collections rescanned the ~10^6 objects of a desired state no agent holds: 0.26-0.48 s
pauses that were most of the one-VIP p99 (results 3n). Its collections are timed
(``gc.callbacks``): ``watcher_gc`` in the JSON says how many of each generation there were
over the changes and the longest, so the agent's own (its plan client applying plans) show.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .controller_scale import (CHANGED_VIP, WATCHED_POP, Daemon, _change_everywhere, _cpu_s, _git, _log_times,
                               _Probe, _status_mb, generate, token, verdicts)
from .commit_cpu import toggled
from .report import load_average, summary

# The daemon's line after a reload's pass was served (controller/server/daemon.py).
_RELOAD = re.compile(r"reload of (\S+): batch ([\d.]+), looked ([\d.]+), loaded ([\d.]+), applied ([\d.]+), "
                     r"served ([\d.]+)")


IDLE_S = 10.0


def _reload_lines(path: Path) -> list[tuple[float, ...]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = _RELOAD.search(line)
        if m:
            out.append(tuple(float(g) for g in m.groups()[1:]))
    return out


class _GcPauses:
    """This process's cyclic collections, timed, until stop(): their count per generation and
    the longest (seconds)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.longest = [0.0, 0.0, 0.0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        g = info["generation"]
        self.count[g] += 1
        self.longest[g] = max(self.longest[g], time.perf_counter() - self._start)

    def stop(self) -> dict[str, Any]:
        gc.callbacks.remove(self._callback)
        return {"collections": self.count, "longest_s": [round(x, 4) for x in self.longest]}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def run(config_dir: Path, work: Path, changes: int, everywhere: int) -> dict[str, Any]:
    import aiohttp

    from controller import wire
    from controller.agent.plan_client import PlanClient
    from controller.config.desired import load_desired

    desired = load_desired(str(config_dir))
    names = [v.name for v in desired.vips]
    regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
    pops = [p.name for p in desired.pops]
    allowed = desired.allowed_prefixes
    del desired  # (an agent holds no desired state: its full collections rescanned it, see above)
    out: dict[str, Any] = {}
    daemon = Daemon(config_dir, work)
    started = time.monotonic()
    watcher: Any = None
    try:
        while not daemon.answering():
            if not daemon.alive():
                raise RuntimeError(f"the controller exited: {daemon.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        watcher = PlanClient(daemon.url, WATCHED_POP, token(WATCHED_POP), str(work / "agent"),
                             allowed, timeout=600.0)
        watcher.cache_later = True  # as the agent: the plan is held (and acted on) before its cache is fsynced
        plan = await watcher.fetch_plan(-1, 0)
        assert plan is not None
        out["start_to_first_plan_s"] = round(time.monotonic() - started, 2)
        bodies = {pop: json.dumps(wire.encode_report(wire.WireReport(plan.generation if pop == WATCHED_POP else 0,
                                                                     verdicts(names, regions, i, len(pops), 0),
                                                                     {n: True for n in names}, 1))).encode()
                  for i, pop in enumerate(pops)}
        async with aiohttp.ClientSession() as session:
            for pop in pops:  # one after the other: the burst is not what this measures
                async with session.post(f"{daemon.url}/v1/reports/{pop}", data=bodies[pop],
                                        headers={"Authorization": f"Bearer {token(pop)}",
                                                 "Content-Type": "application/json"},
                                        timeout=aiohttp.ClientTimeout(total=600)) as r:
                    await r.read()
                    assert r.status == 200, r.status
        watcher._seq, watcher._accepted = 1, None
        del bodies
        # settle: the passes after the reports
        while True:
            c0 = _cpu_s(daemon.proc.pid)
            await asyncio.sleep(1.0)
            if _cpu_s(daemon.proc.pid) - c0 < 0.1:
                break
        plan = await watcher.fetch_plan(-1, 0)
        assert plan is not None
        _log(f"daemon up and reported after {time.monotonic() - started:.1f}s, RSS "
             f"{_status_mb(daemon.proc.pid, 'VmRSS')} MB")
        gc.freeze()  # what the agent does once started (runner.freeze_startup_heap)
        pauses = _GcPauses()
        idle0 = _cpu_s(daemon.proc.pid)
        await asyncio.sleep(IDLE_S)  # nothing asked, nothing changed: the watcher's own cost
        out["idle_cpu_pct"] = round((_cpu_s(daemon.proc.pid) - idle0) / IDLE_S * 100, 2)

        arrived = [0.0]
        request = watcher._request

        async def timed_request(*args: Any, **kwargs: Any) -> Any:
            r = await request(*args, **kwargs)
            arrived[0] = time.time()
            return r
        watcher._request = timed_request

        target = next(p for p in sorted(config_dir.rglob("*.yaml")) if f"  - name: {CHANGED_VIP}\n" in p.read_text())
        samples: list[dict[str, Any]] = []
        probe = _Probe(daemon.port, work / "probe-changes.json")
        cpu0, load0, rss0 = _cpu_s(daemon.proc.pid), load_average(), _status_mb(daemon.proc.pid, "VmRSS")
        for rep in range(changes):
            await asyncio.sleep(random.uniform(0.5, 1.5))
            present = CHANGED_VIP in plan.vips
            answers0 = dict(watcher.answers)
            waiting = asyncio.ensure_future(watcher.fetch_plan(plan.generation, 60))
            await asyncio.sleep(0.3)
            text = target.read_text()
            tmp = target.with_suffix(".tmp")  # (not *.yaml: the controller never reads half a file)
            tmp.write_text(toggled(text, CHANGED_VIP, WATCHED_POP))
            reloads_before = len(_reload_lines(daemon.log))
            t0 = time.time()
            tmp.replace(target)
            _git(config_dir, "commit", "-qam", f"{'remove' if present else 'add'} {WATCHED_POP} for {CHANGED_VIP}")
            t_commit = time.time()
            new_plan = await waiting
            while new_plan is None or (CHANGED_VIP in new_plan.vips) == present:
                new_plan = await watcher.fetch_plan(new_plan.generation if new_plan else plan.generation, 60)
            t_hold = time.time()
            await asyncio.sleep(0.2)  # (the daemon's line after its pass)
            sample: dict[str, Any] = {"action": "remove" if present else "add", "t0": round(t0, 3),
                                      "total_s": round(t_hold - t0, 3),
                                      "commit_s": round(t_commit - t0, 3),
                                      "answer_arrived_s": round(arrived[0] - t0, 3),
                                      "answers": {k: v - answers0.get(k, 0) for k, v in watcher.answers.items()
                                                  if v != answers0.get(k, 0)}}
            lines = _reload_lines(daemon.log)[reloads_before:]
            if lines:
                batch, looked, loaded, applied, served = lines[0]
                sample.update(inotify_batch_s=round(batch - t0, 3), looked_s=round(looked - t0, 3),
                              loaded_s=round(loaded - t0, 3), applied_s=round(applied - t0, 3),
                              served_s=round(served - t0, 3), reloads=len(lines))
            else:
                loaded_at = [t for t in _log_times(daemon.log, r"desired state \S+ loaded") if t >= t0 - 0.002]
                if loaded_at:
                    sample["loaded_s"] = round(loaded_at[0] - t0, 3)
            samples.append(sample)
            _log(f"change {rep + 1}/{changes}: {sample}")
            plan = new_plan
        out["change_stall_ms"] = probe.stop()
        out["watcher_gc"] = pauses.stop()
        out["watcher_answers"] = dict(watcher.answers)  # deltas, full plans, refetches after a delta that did not fit
        out["change_cpu_s"] = round(_cpu_s(daemon.proc.pid) - cpu0, 2)
        out["change_load_average"] = [load0, load_average()]
        out["change_rss_mb"] = [rss0, _status_mb(daemon.proc.pid, "VmRSS")]  # before and after the changes
        out["change_samples"] = samples
        for key in ("total_s", "commit_s", "inotify_batch_s", "looked_s", "loaded_s", "applied_s", "served_s",
                    "answer_arrived_s"):
            vals = [s[key] for s in samples if key in s]
            if vals:
                out[f"change_{key}"] = summary(vals, 3)
        if everywhere:
            out.update(await _change_everywhere(daemon, config_dir, pops, everywhere, _log))
        out["rss_mb_end"] = _status_mb(daemon.proc.pid, "VmRSS")
    finally:
        if watcher is not None:
            await watcher.close()
        daemon.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.commit_latency")
    p.add_argument("--files", type=int, default=1)
    p.add_argument("--vips", type=int, default=10000)
    p.add_argument("--pops", type=int, default=50)
    p.add_argument("--changes", type=int, default=20)
    p.add_argument("--everywhere", type=int, default=3)
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-commit-") as tmp:
        work = Path(tmp)
        config_dir = work / "desired"
        generate(config_dir, a.vips, a.pops, a.files)
        _git(config_dir, "init", "-q")
        _git(config_dir, "add", "-A")
        _git(config_dir, "commit", "-qm", "synthetic desired state")
        load = load_average()
        result = asyncio.run(run(config_dir, work, a.changes, a.everywhere))
    result.update(label=a.label, files=a.files, vips=a.vips, pops=a.pops, load_average_start=load,
                  load_average_end=load_average(), finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    _log(f"{a.label} files={a.files}: one VIP p50 {result.get('change_total_s')} ; everywhere "
         f"{result.get('everywhere_all_hold_s')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
