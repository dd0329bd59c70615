"""Controller scale: 10,000 VIPs x 50 POPs, planned, served and changed.

    python -m bench.controller_scale inproc --dir DIR --out FILE [--runs N]   # the in-process part
    python -m bench.controller_scale cold [--vips N] [--pops N] [--files N] [--out FILE]  # the daemon's start, one process

A synthetic desired state (``generate``) goes into a temporary git checkout: every VIP
published at every POP (the worst case: VIPs x POPs (POP, VIP) pairs, each planned and
served), two origin regions of a few backends each, half HTTP and half TCP checks. The
synthetic health reports say every origin is healthy, except that for one VIP in a
hundred one POP sees the primary down (the ``confirming`` path of the planner).

1. **In process** (a child process of its own, so that its RSS is the planner's alone):
   ``load_desired`` (the real YAML loader), ``plan`` (the pure planner) from an empty
   memory and then repeatedly with the previous run's memory, as the daemon calls it;
   a whole ``Controller.replan`` (plan + the per-POP plan bodies + the persisted state),
   what the daemon does every second and on every report; the agent's ``decode_plan`` of
   one POP's plan; tracemalloc's peak over one plan; RSS. Also the plan time with each
   VIP published at fewer POPs, to show how it scales with (POP, VIP) pairs.
2. **End to end**: the real daemon (``anycast-controller``) on 127.0.0.1 serving the
   checkout, health reports from every POP through the agent's ``PlanClient.report``,
   then, repeatedly, the agent's ``PlanClient.fetch_plan`` long-polling POP p00's plan
   while one VIP's publish list gains or loses p00 in a commit. Timed from just before
   the file is written to the client holding the decoded plan of the new generation; the
   controller's log line ``desired state ... loaded`` splits it into *detect + load* and
   *plan + serve + decode*.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import gzip
import hashlib
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lab import host_process

from .report import ROOT, load_average, summary, table

Log = Callable[[str], None]
REGIONS = ("us-west", "us-east", "eu-central", "eu-west", "ap-south")
OPERATOR_TOKEN = "bench-operator-token"
CHANGED_VIP = "vip-00000"
WATCHED_POP = "p00"
TARGET_PLAN_S = 1.0
SPLIT_FILES = 100  # the second layout: 100 VIPs per file; a commit re-parses one file
TARGET_CHANGE_S = 1.0


def pop_name(i: int) -> str:
    return f"p{i:02d}"


def token(pop: str) -> str:
    return f"bench-token-{pop}"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- the synthetic desired state ---------------------------------------------------------------
def generate(directory: Path, vips: int, pops: int, files: int = 1) -> None:
    """controller.yaml, pops.yaml and vips.yaml for ``vips`` VIPs, each published at all
    ``pops`` POPs. Written as an operator would (block style, one VIP after the other).
    ``files`` > 1: vips.yaml holds the first share and vips/NNN.yaml the others."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "controller.yaml").write_text(
        "# Synthetic desired state for python -m bench controller\n"
        "listen: 127.0.0.1:9800\n"
        "state_dir: /nonexistent  # the benchmark passes --state-dir\n"
        f"operator_token_sha256: {_sha(OPERATOR_TOKEN)}\n"
        "allowed_prefixes: [10.0.0.0/8]\n"
        "policy:\n"
        "  safety:\n"
        "    report_stale_after: 3600  # reports are sent once: keep them fresh for the whole run\n"
        "check_defaults: {interval: 1.0, timeout: 0.5, rise: 3, fall: 2}\n")
    with open(directory / "pops.yaml", "w") as f:
        f.write("pops:\n")
        for p in range(pops):
            f.write(f"  - name: {pop_name(p)}\n    description: POP {p}\n"
                    f"    token_sha256: {_sha(token(pop_name(p)))}\n")
    publish = "[" + ", ".join(pop_name(p) for p in range(pops)) + "]"
    per_file = -(-vips // files)
    if files > 1:
        (directory / "vips").mkdir(exist_ok=True)
    for k in range(files):
        path = directory / "vips.yaml" if k == 0 else directory / "vips" / f"{k:03d}.yaml"
        with open(path, "w") as f:
            f.write("vips:\n")
            for i in range(k * per_file, min(vips, (k + 1) * per_file)):
                f.write(_vip_yaml(i, publish))


def _vip_yaml(i: int, publish: str) -> str:
    a, b = i % len(REGIONS), (i + 1) % len(REGIONS)
    host = 10 + i % 200
    check = "{type: http, path: /healthz, expect_body: ok}" if i % 2 else "{type: tcp}"
    return (f"  - name: vip-{i:05d}\n"
            f"    address: 10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}/32\n"
            f"    publish: {publish}\n"
            f"    check: {check}\n"
            f"    origins:\n"
            f"      - region: {REGIONS[a]}\n"
            f"        next_hop: 100.64.{a + 1}.1\n"
            f"        backends: [\"100.64.{a + 1}.{host}:8080\", \"100.64.{a + 1}.{host + 1}:8080\"]\n"
            f"      - region: {REGIONS[b]}\n"
            f"        next_hop: 100.64.{b + 1}.1\n"
            f"        backends: [\"100.64.{b + 1}.{host}:8080\"]\n")


def verdicts(vip_names: list[str], regions: Mapping[str, tuple[str, ...]], pop_index: int,
             pops: int, down_every: int = 100) -> dict[str, dict[str, bool | None]]:
    """POP ``pop_index``'s report: everything healthy, except that for every ``down_every``-th
    VIP (0: none) one POP (a different one each time) sees the primary origin down."""
    out: dict[str, dict[str, bool | None]] = {}
    for i, name in enumerate(vip_names):
        rs = regions[name]
        down = down_every > 0 and i % down_every == 0 and (i // down_every) % pops == pop_index
        out[name] = {r: not (down and j == 0) for j, r in enumerate(rs)}
    return out


def compact_report_body(vip_names: list[str], regions: Mapping[str, tuple[str, ...]], pop_index: int,
                        pops: int, down_every: int = 100, seq: int = 1) -> bytes:
    """POP ``pop_index``'s first report (``verdicts``: the same content, every VIP announced)
    as its agent sends it, the compact form's JSON (wire.encode_report(..., compact=True)),
    made without a per-VIP dict: the bench's part, not the controller's."""
    down = set(vip_names[i] for i in range(0, len(vip_names), down_every)
               if (i // down_every) % pops == pop_index) if down_every > 0 else set()
    groups: dict[tuple[tuple[str, ...], bool], list[str]] = {}
    kinds = set(regions.values())
    if len(kinds) == 1:  # (every VIP the same regions: one list comprehension in C, mostly)
        (rs,) = kinds
        groups[(rs, True)] = [n for n in vip_names if n not in down] if down else list(vip_names)
        if down:
            groups[(rs, False)] = [n for n in vip_names if n in down]
    else:
        for name in vip_names:
            groups.setdefault((regions[name], name not in down), []).append(name)
    value = {"plan_generation": 1, "seq": seq, "compact": {"groups": [
        {"origins": {r: healthy or j != 0 for j, r in enumerate(rs)}, "vips": names, "announced": [True] * len(names)}
        for (rs, healthy), names in groups.items()]}}
    return json.dumps(value, separators=(",", ":")).encode()


def _git(directory: Path, *args: str) -> None:
    """Retried a few times: a controller before --no-optional-locks (the reference commit)
    holds index.lock while its `git status` runs, and a commit at that moment fails."""
    for attempt in range(5):
        r = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, timeout=60,
                           env={**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.org",
                                "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.org"})
        if r.returncode == 0:
            return
        if b"index.lock" not in r.stderr or attempt == 4:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        time.sleep(0.2)


def _status_mb(pid: int | str, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# --- 1. in process (run in a child) ------------------------------------------------------------
def inproc(directory: Path, runs: int, load_runs: int, scaling: list[int]) -> dict[str, Any]:
    from controller.cli.controller_main import GC_THRESHOLD
    from controller.config.desired import load_desired
    from controller.policy.model import PlannerState, PopReport
    from controller.policy.planner import plan
    from controller.server.core import Controller
    from controller.agent.plan_wire import decode_plan

    default_gc = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)  # as the daemon runs
    out: dict[str, Any] = {"rss_mb_start": _status_mb("self", "VmRSS"), "gc_threshold": list(GC_THRESHOLD)}
    load_times = []
    desired = None
    for _ in range(load_runs):
        desired = None  # free the previous one first
        t = time.perf_counter()
        desired = load_desired(str(directory), "bench")
        load_times.append(time.perf_counter() - t)
    assert desired is not None
    out["load_s"] = summary(load_times, 3)
    out["rss_mb_after_load"] = _status_mb("self", "VmRSS")
    npops, nvips = len(desired.pops), len(desired.vips)
    out["pairs"] = sum(len(v.publish) for v in desired.vips)

    names = [v.name for v in desired.vips]
    regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
    now = time.time()
    reports = {p.name: PopReport(p.name, now, 1, verdicts(names, regions, i, npops), {n: True for n in names})
               for i, p in enumerate(desired.pops)}
    out["rss_mb_after_reports"] = _status_mb("self", "VmRSS")

    times = []
    state = PlannerState.initial()
    result = None
    for i in range(runs + 1):
        result = None
        t = time.perf_counter()
        result = plan(desired, reports, {}, now + 0.1 * i, state)
        times.append(time.perf_counter() - t)
        state = result.state
    assert result is not None
    out["plan_first_s"] = round(times[0], 3)
    out["plan_s"] = summary(times[1:], 3)
    out["reasons"] = _reasons(result.pops)
    gc.set_threshold(*default_gc)  # the same with Python's default collector settings
    gtimes = []
    for i in range(3):
        result = None
        t = time.perf_counter()
        result = plan(desired, reports, {}, now + 0.1 * (runs + 1 + i), state)
        gtimes.append(time.perf_counter() - t)
        state = result.state
    gc.set_threshold(*GC_THRESHOLD)
    out["default_gc_threshold"] = list(default_gc)
    out["plan_default_gc_s"] = summary(gtimes, 3)
    out["rss_mb_after_plan"] = _status_mb("self", "VmRSS")

    # tracemalloc over one more steady plan: its peak, and what its result keeps
    result = None
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = plan(desired, reports, {}, now + 0.1 * (runs + 5), state)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["tracemalloc_plan_peak_mb"] = round((peak - base) / 2**20, 1)
    out["tracemalloc_plan_result_mb"] = round((current - base) / 2**20, 1)

    # the daemon's whole pass: plan, per-POP bodies, persisted memory
    with tempfile.TemporaryDirectory(prefix="bench-ctl-") as state_dir:
        d = dataclasses.replace(desired, state_dir=state_dir)
        t = time.perf_counter()
        ctl = Controller(d)  # plans once, with no reports
        out["controller_init_s"] = round(time.perf_counter() - t, 3)
        ctl.reports.update(reports)
        rtimes = []
        for _ in range(6):
            t = time.perf_counter()
            ctl.replan()
            rtimes.append(time.perf_counter() - t)
        # the first passes after the reports re-encode every POP's plan and move the 1 % of
        # pairs that see their origin down from confirming to backend_down; then steady
        out["controller_replan_first_s"] = round(rtimes[0], 3)
        out["controller_replan_s"] = summary(rtimes[3:], 3)
        # the journal's snapshot and lines (it was one rewritten controller-state.json)
        out["state_file_mb"] = round(sum(os.path.getsize(os.path.join(state_dir, n)) for n in os.listdir(state_dir)
                                         if n.startswith(("snapshot-", "journal-"))) / 2**20, 1)
        out["controller_one_change_s"] = _one_change_passes(ctl, 5)
        ctl.close()
        body = ctl.plan_body(WATCHED_POP)
        raw = json.dumps(body)
        out["plan_body_mb"] = round(len(raw) / 2**20, 2)
        dtimes = []
        for _ in range(3):
            t = time.perf_counter()
            decode_plan(json.loads(raw), WATCHED_POP, desired.allowed_prefixes)
            dtimes.append(time.perf_counter() - t)
        out["agent_decode_s"] = summary(dtimes, 3)
        # what the agent does: the previous plan's specs are cached (PlanClient keeps them)
        spec_cache: dict[str, Any] = {}
        decode_plan(json.loads(raw), WATCHED_POP, desired.allowed_prefixes, spec_cache)
        dtimes = []
        for _ in range(3):
            t = time.perf_counter()
            decode_plan(json.loads(raw), WATCHED_POP, desired.allowed_prefixes, spec_cache)
            dtimes.append(time.perf_counter() - t)
        out["agent_decode_cached_s"] = summary(dtimes, 3)
        # ...and the agent's cache of it (PlanClient.save_cached: json.dump + fsync), before
        # fetch_plan hands the plan over
        from controller.agent.plan_client import PlanClient
        cache_client = PlanClient("http://127.0.0.1:1", WATCHED_POP, "x", os.path.join(state_dir, "agent"),
                                  desired.allowed_prefixes)
        from controller.wire import decode_plan as decode_wire_plan
        cache_client.book.apply(decode_wire_plan(json.loads(raw), WATCHED_POP))
        ctimes = []
        for _ in range(3):
            t = time.perf_counter()
            cache_client.save_cached()
            ctimes.append(time.perf_counter() - t)
        out["agent_cache_write_s"] = summary(ctimes, 3)
        out["rss_mb_after_controller"] = _status_mb("self", "VmRSS")
        del ctl, body, raw

    # the same plan with each VIP published at fewer POPs
    scale = []
    for k in scaling:
        if k >= npops:
            continue
        pops_k = tuple(p.name for p in desired.pops[:k])
        dk = dataclasses.replace(desired, pops=desired.pops[:k],
                                 vips=tuple(dataclasses.replace(v, publish=pops_k) for v in desired.vips))
        st = PlannerState.initial()
        ks = []
        for i in range(3):
            t = time.perf_counter()
            st = plan(dk, reports, {}, now + 0.1 * i, st).state
            ks.append(time.perf_counter() - t)
        scale.append({"pops": k, "pairs": k * nvips, "plan_s": round(sorted(ks[1:])[0], 3)})
    scale.append({"pops": npops, "pairs": out["pairs"], "plan_s": out["plan_s"]["p50"]})
    out["scaling"] = scale
    out["us_per_pair"] = round(1e6 * out["plan_s"]["p50"] / out["pairs"], 2) if out["pairs"] else None
    out["rss_mb_end"] = _status_mb("self", "VmRSS")
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _one_change_passes(ctl: Any, n: int) -> dict[str, Any]:
    """``Controller.apply_config`` of a desired state in which one VIP's publish list lost
    or regained its first POP (what a one-line commit does once the files are parsed)."""
    times = []
    for k in range(n):
        d = ctl.desired
        fv = d.vips[0]
        first = d.pops[0].name
        publish = tuple(p for p in fv.publish if p != first) if first in fv.publish else (first, *fv.publish)
        changed = dataclasses.replace(fv, publish=publish)
        new = dataclasses.replace(d, revision=f"change-{k}", vips=(changed, *d.vips[1:]))
        t = time.perf_counter()
        ctl.apply_config(new)
        times.append(time.perf_counter() - t)
    return summary(times, 4)


class _GcClock:
    """CPU seconds spent in the garbage collector's passes (gc.callbacks), so that a step's
    figure says how much of it was a full collection that happened to fall in it (one over
    a 5 GB heap takes seconds, and when it comes depends on every allocation before)."""

    def __init__(self) -> None:
        self.total, self.passes, self._start = 0.0, 0, 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.process_time()
        else:
            self.total += time.process_time() - self._start
            self.passes += info.get("generation") == 2

    def close(self) -> None:
        gc.callbacks.remove(self._tick)


def engine_scale(nvips: int, npops: int) -> dict[str, Any]:
    """The incremental engine alone (no YAML, no HTTP, no plan bodies: what the planning
    side costs at a size the daemon's other parts cannot hold yet): a desired state built
    in memory from the example config's VIP, reports from every POP (all healthy, except
    that for one VIP in a hundred one POP sees the primary down), the first plan from an
    empty memory, then one commit that changes one VIP, one report that changes one
    verdict, and a pass with nothing to do; RSS after each."""
    from controller.config.desired import load_desired
    from controller.config.desired_model import FleetVip, PopSpec
    from controller.policy.engine import Engine, compact_report
    from controller.policy.model import PopReport
    from controller.server import core as server_core
    from controller.wire import decode_report

    gc.set_threshold(100_000, 50, 100)  # as the daemon runs
    gc_clock = _GcClock()
    out: dict[str, Any] = {"vips": nvips, "pops": npops, "pairs": nvips * npops,
                           "rss_mb_start": _status_mb("self", "VmRSS"), "load_average_start": load_average()}
    base = load_desired(str(ROOT / "configs" / "controller"), "bench")
    template = base.vip("game-global")
    assert template is not None
    pops = tuple(PopSpec(pop_name(i) if npops <= 100 else f"p{i:03d}", "0" * 64) for i in range(npops))
    publish = tuple(p.name for p in pops)
    t, c = time.perf_counter(), time.process_time()
    vips = tuple(FleetVip(dataclasses.replace(template.vip, name=f"vip-{i:06d}"), publish, True, template.policy)
                 for i in range(nvips))
    desired = dataclasses.replace(base, pops=pops, vips=vips)
    out["build_desired_s"] = round(time.perf_counter() - t, 2)
    out["build_desired_cpu_s"] = round(time.process_time() - c, 2)
    names = [v.name for v in vips]
    regions = {v.name: tuple(o.region for o in v.vip.origins) for v in vips}
    now = time.time()
    # The index the daemon validates reports against (core.index: per POP, its VIPs' regions):
    # part of the cold load.
    t, c = time.perf_counter(), time.process_time()
    published = server_core.index(desired, None).by_pop
    out["index_s"] = round(time.perf_counter() - t, 2)
    out["index_cpu_s"] = round(time.process_time() - c, 2)
    # Every POP's first report as its agent sends it (the compact form, every VIP announced:
    # a controller restart), made by the bench (``reports_generate``: not the controller's
    # work, timed apart), then taken in as the daemon takes a POST's body in: app._parse_report
    # (json.loads, wire.decode_report against the POP's published VIPs), then what
    # Controller.accept_report stores (engine.compact_report). One body at a time.
    gen_wall = gen_cpu = parse_cpu = decode_cpu = store_cpu = 0.0
    reports: dict[str, PopReport] = {}
    t, g = time.perf_counter(), gc_clock.total
    gen_gc = 0.0
    body_bytes = 0
    for i, p in enumerate(pops):
        c, w, g0 = time.process_time(), time.perf_counter(), gc_clock.total
        raw = compact_report_body(names, regions, i, npops)
        gen_wall += time.perf_counter() - w
        c1 = time.process_time()
        gen_cpu += c1 - c
        gen_gc += gc_clock.total - g0
        body_bytes += len(raw)
        body = json.loads(raw)
        c2 = time.process_time()
        parsed = decode_report(body, published[p.name])
        c3 = time.process_time()
        del body, raw
        reports[p.name] = compact_report(PopReport(p.name, now, parsed.plan_generation, parsed.origins,
                                                   parsed.announced), reports.get(p.name))
        c4 = time.process_time()
        parse_cpu += c2 - c1
        decode_cpu += c3 - c2
        store_cpu += c4 - c3
    out["reports_s"] = round(time.perf_counter() - t - gen_wall, 2)  # the intake's wall time
    out["reports_generate_s"] = round(gen_wall, 2)
    out["reports_generate_cpu_s"] = round(gen_cpu, 2)
    out["reports_body_mb"] = round(body_bytes / 1e6 / len(pops), 2)  # per POP
    out["reports_parse_cpu_s"] = round(parse_cpu, 2)  # json.loads
    out["reports_decode_cpu_s"] = round(decode_cpu, 2)  # wire.decode_report
    out["reports_store_cpu_s"] = round(store_cpu, 2)  # engine.compact_report
    out["reports_cpu_s"] = round(parse_cpu + decode_cpu + store_cpu, 2)  # the intake
    out["reports_gc_cpu_s"] = round(gc_clock.total - g - gen_gc, 2)  # of which the garbage collector
    out["rss_mb_after_reports"] = _status_mb("self", "VmRSS")
    engine = Engine()
    t, c, g = time.perf_counter(), time.process_time(), gc_clock.total
    changes = engine.run(desired, reports, {}, now)
    out["first_plan_s"] = round(time.perf_counter() - t, 2)
    out["first_plan_cpu_s"] = round(time.process_time() - c, 2)
    out["first_plan_gc_cpu_s"] = round(gc_clock.total - g, 2)
    out["first_plan_vips"] = len(changes.planned)
    out["rss_mb_after_first_plan"] = _status_mb("self", "VmRSS")
    # What the daemon serves from the plan: every POP's served plan (plans.PlanStore), from
    # each VIP's spec as JSON (what agents get)
    from controller.config.serialize import vip_to_dict
    from controller.server.plans import PlanStore

    t, c, g = time.perf_counter(), time.process_time(), gc_clock.total
    spec_dicts = {fv.name: vip_to_dict(fv.vip) for fv in vips}
    served = PlanStore()
    for p in pops:
        served.serve(p.name, engine.items[p.name], spec_dicts, desired.revision, 0, desired)
    out["serve_all_s"] = round(time.perf_counter() - t, 2)
    out["serve_all_cpu_s"] = round(time.process_time() - c, 2)
    out["serve_all_gc_cpu_s"] = round(gc_clock.total - g, 2)
    out["rss_mb_after_serving"] = _status_mb("self", "VmRSS")

    t, c, g = time.perf_counter(), time.process_time(), gc_clock.total
    changes = engine.run(desired, reports, {}, now + 2)  # the settle windows end: confirmed
    out["settled_s"] = round(time.perf_counter() - t, 3)
    out["settled_cpu_s"] = round(time.process_time() - c, 3)
    out["settled_gc_cpu_s"] = round(gc_clock.total - g, 3)
    out["settled_vips"] = len(changes.planned)

    fv = vips[0]
    changed = dataclasses.replace(fv, publish=publish[1:])
    new = dataclasses.replace(desired, revision="bench-2", vips=(changed, *vips[1:]))
    t, c = time.perf_counter(), time.process_time()
    changes = engine.run(new, reports, {}, now + 3)
    out["one_commit_s"] = round(time.perf_counter() - t, 4)
    out["one_commit_cpu_s"] = round(time.process_time() - c, 4)
    out["one_commit_vips"] = len(changes.planned)
    out["one_commit_pops"] = len(changes.pops)
    t, c = time.perf_counter(), time.process_time()
    for name in changes.pops:
        served.serve(name, engine.items[name], spec_dicts, new.revision, 0, new)
    out["one_commit_serve_s"] = round(time.perf_counter() - t, 4)
    out["one_commit_serve_cpu_s"] = round(time.process_time() - c, 4)

    pop = pops[1].name
    flipped = dict(reports[pop].origins)
    flipped[names[1]] = {r: j != 0 for j, r in enumerate(regions[names[1]])}
    reports[pop] = compact_report(PopReport(pop, now + 4, 1, flipped), reports[pop])
    t, c = time.perf_counter(), time.process_time()
    changes = engine.run(new, reports, {}, now + 4)
    out["one_report_s"] = round(time.perf_counter() - t, 4)
    out["one_report_cpu_s"] = round(time.process_time() - c, 4)
    out["one_report_vips"] = len(changes.planned)
    repeated = {p: compact_report(PopReport(p, now + 4.5, 1, dict(r.origins)), r) for p, r in reports.items()}
    t, c = time.perf_counter(), time.process_time()
    changes = engine.run(new, repeated, {}, now + 4.5)
    out["repeated_reports_s"] = round(time.perf_counter() - t, 4)
    out["repeated_reports_cpu_s"] = round(time.process_time() - c, 4)
    out["repeated_reports_vips"] = len(changes.planned)
    out["rss_mb_end"] = _status_mb("self", "VmRSS")
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_average_end"] = load_average()
    # The in-process cold start: the desired state, its index, every POP's report taken in,
    # the first plan and every POP's served plan (the bench's own report making apart).
    out["cold_path_cpu_s"] = round(sum(out[k] for k in ("build_desired_cpu_s", "index_cpu_s", "reports_cpu_s",
                                                        "first_plan_cpu_s", "serve_all_cpu_s")), 2)
    out["process_cpu_s"] = round(time.process_time(), 1)
    out["gc_cpu_s"], out["gc_full_passes"] = round(gc_clock.total, 2), gc_clock.passes
    gc_clock.close()
    return out


# --- the cold path in one process, as the daemon runs it at start ----------------------------
class _Phases:
    """Each phase's wall and CPU seconds, the collector's CPU in it, RSS after it and the
    process's peak RSS so far (ru_maxrss: a phase's own peak where it is the highest yet)."""

    def __init__(self, log: Log, trace: Any = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.log = log
        self.gc = _GcClock()
        self.trace = trace  # bench.cold_trace.Trace, or None

    def _begin(self, name: str) -> None:
        if self.trace is not None:
            self.trace.phase = name
            self.trace.event("phase begins")
            self.trace.profile(name)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self._begin(name)
        t, c, g = time.perf_counter(), time.process_time(), self.gc.total
        value = fn()
        self.done(name, t, c, g)
        return value

    async def arun(self, name: str, fn: Callable[[], Any]) -> Any:
        self._begin(name)
        t, c, g = time.perf_counter(), time.process_time(), self.gc.total
        value = await fn()
        self.done(name, t, c, g)
        return value

    def done(self, name: str, t: float, c: float, g: float) -> None:
        if self.trace is not None:
            self.trace.profile(None)
        row = {"phase": name, "wall_s": round(time.perf_counter() - t, 3), "cpu_s": round(time.process_time() - c, 3),
               "gc_cpu_s": round(self.gc.total - g, 3), "rss_mb": _status_mb("self", "VmRSS"),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        self.rows.append(row)
        self.log(f"cold: {name}: {row['wall_s']} s wall, {row['cpu_s']} CPU s, RSS {row['rss_mb']} MB "
                 f"(peak {row['peak_rss_mb']})")


COLD_PHASES = ("load", "controller", "reports", "first plan", "serve")  # the cold path's total


async def cold_path(config_dir: Path, state_dir: Path, log: Log, trace: Path | None = None) -> dict[str, Any]:
    """The daemon's start (daemon.serve) on a generated checkout, in this process, with the
    daemon's own objects: Watcher.load() (files hashed, git's revision, load_desired with the
    LoadCache), the Controller on a file journal (its first pass, with no reports: every
    POP's plan as the daemon serves before any POP has reported), the heap frozen; every POP's
    first full report as its agent sends it (compact, every VIP announced: bodies made by the
    bench beforehand, not timed) taken in as POST /v1/reports takes it (app._parsed: json.loads
    and decode_report in slices; app._take_report: Controller.accept_report), the index made
    by the first report's published_regions; the pass of the reports (Controller.settled:
    plan, serve, journal); every POP's full plan as GET /v1/plans/{pop} answers it
    (PlanStore.answer: the gzipped JSON). Then two edits of the checkout, each reloaded
    (Watcher.reload), applied (Controller.apply_config), planned, and served to the POPs
    whose plan moved (their delta from the generation before): one VIP's publish list loses
    p00, another VIP's backend port changes (at every POP)."""
    from controller.cli.controller_main import GC_THRESHOLD
    from controller.server import app as server_app
    from controller.server import daemon as server_daemon
    from controller.server import store as server_store
    from controller.server.core import Controller

    gc.set_threshold(*GC_THRESHOLD)  # as the daemon runs
    server_daemon.FREEZE_HEAP = True
    tracer = None
    if trace is not None:  # (the timeline of bench/cold_trace.py: where the wall time goes)
        from . import cold_trace
        tracer = cold_trace.Trace(trace)
        untrace = cold_trace.instrument(tracer)
    ph = _Phases(log, tracer)
    out: dict[str, Any] = {"rss_mb_start": _status_mb("self", "VmRSS"), "load_average_start": load_average()}
    watcher = server_daemon.Watcher(str(config_dir), str(state_dir), use_inotify=False)
    desired = await ph.arun("load", lambda: asyncio.to_thread(watcher.load_at_start))
    out.update(vips=len(desired.vips), pops=len(desired.pops), pairs=sum(len(v.publish) for v in desired.vips))

    def start() -> Controller:
        journal = server_store.FileJournal(desired.state_dir, background=True)
        c = Controller(desired, applied=watcher.kept_base(desired, journal), state_store=journal)
        server_daemon._freeze_heap()
        return c
    ctl = ph.run("controller", start)

    names = [v.name for v in desired.vips]
    regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
    pops = [p.name for p in desired.pops]
    t = time.perf_counter()
    bodies = [compact_report_body(names, regions, i, len(pops), seq=int(time.time() * 1000)) for i in range(len(pops))]
    out["reports_generate_s"] = round(time.perf_counter() - t, 2)  # the bench's part, not timed with the rest
    out["report_body_mb"] = round(len(bodies[0]) / 2**20, 2)
    del names, regions
    turn = asyncio.Lock()
    books: dict[str, Any] = {}
    statuses: list[int] = []

    async def intake() -> None:
        for pop, raw in zip(pops, bodies):
            with ctl.receiving():
                published = ctl.published_regions(pop)
                book = books.setdefault(pop, server_app._ReportBook())
                async with book.lock:
                    parsed = await server_app._parsed(raw, published, turn)
                    statuses.append(server_app._take_report(ctl, pop, book, published, parsed).status)
            if tracer is not None and len(statuses) % 25 == 0:
                tracer.event("reports stored", n=len(statuses))
    await ph.arun("reports", intake)
    del bodies
    out["report_statuses"] = {str(s): statuses.count(s) for s in set(statuses)}
    async def first_plan() -> None:
        await ctl.settled()
        planned = ctl.planning()
        if planned is not None:
            await planned  # (settled() returns with the pass's plans published; its serving may go on)
    await ph.arun("first plan", first_plan)

    def serve_all() -> int:
        return sum(len(ctl.plans.answer(pop, None)[0]) for pop in pops)
    out["served_bytes_gzipped"] = ph.run("serve", serve_all)
    out["plan_body_mb_p00"] = round(len(ctl.plans.body(pops[0], None)) / 2**20, 2)
    first = {r["phase"]: r for r in ph.rows}
    out["cold_total"] = {k: round(sum(first[p][k] for p in COLD_PHASES), 2) for k in ("wall_s", "cpu_s", "gc_cpu_s")}
    out["cold_total"]["peak_rss_mb"] = first["serve"]["peak_rss_mb"]
    # Let the journal's writes of the start finish, so the change does not wait for them.
    await asyncio.sleep(0.5)

    changes = []
    for what, edit in (("one VIP's publish list loses p00", _edit_publish), ("one VIP's backend port", _edit_port)):
        generations = {pop: ctl.served[pop].generation for pop in pops}

        async def change() -> int:
            edit(config_dir, pops)
            new = await asyncio.to_thread(watcher.reload, True)
            assert new is not None, "the edit was not loaded"
            ctl.apply_config(new)
            server_daemon._freeze_heap()
            task = ctl.planning()
            if task is not None:
                await task
            moved = [pop for pop in pops if ctl.served[pop].generation != generations[pop]]
            sizes = [len(ctl.plans.answer(pop, generations[pop])[0]) for pop in moved]
            changes.append({"change": what, "pops_served": len(moved),
                            "delta_bytes_max": max(sizes) if sizes else None})
            return len(moved)
        await ph.arun(f"change: {what}", change)
    out["changes"] = changes
    # A restart from the saved state after longer than report_stale_after (no report presumed:
    # the clock 2 h on), before any report: the loaded memory is STEADY at most pairs.
    desired_now = ctl.target
    ctl.close()
    del ctl
    gc.collect()

    def restart() -> Controller:
        journal = server_store.FileJournal(desired_now.state_dir, background=True)
        return Controller(desired_now, applied=watcher.kept_base(desired_now, journal), state_store=journal,
                          clock=lambda: time.time() + 7200.0)
    ctl = ph.run("restart: saved state, no report", restart)
    out["restart_presumed"] = len(ctl._presumed)
    out["phases"] = ph.rows
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["load_average_end"] = load_average()
    out["process_cpu_s"] = round(time.process_time(), 1)
    out["gc_cpu_s"], out["gc_full_passes"] = round(ph.gc.total, 2), ph.gc.passes
    ph.gc.close()
    watcher.close()
    ctl.close()
    if tracer is not None:
        untrace()
        tracer.close()
        out["trace"] = tracer.summary()
        log("trace (s): " + json.dumps(out["trace"]))
    return out


def _edit_publish(config_dir: Path, pops: list[str]) -> None:
    """vip-00000 (in vips.yaml) published everywhere but at the first POP."""
    path = config_dir / "vips.yaml"
    text = path.read_text()
    old = "  - name: vip-00000\n"
    at = text.index(old)
    line_at = text.index("    publish: [", at)
    end = text.index("\n", line_at)
    path.write_text(text[:line_at] + "    publish: [" + ", ".join(pops[1:]) + "]" + text[end:])


def _edit_port(config_dir: Path, pops: list[str]) -> None:
    """vip-00001's first backend on another port (its definition: every POP's plan moves)."""
    path = config_dir / "vips.yaml"
    text = path.read_text()
    at = text.index("  - name: vip-00001\n")
    port_at = text.index(":8080\"", at)
    path.write_text(text[:port_at] + ":8081\"" + text[port_at + len(":8080\""):])


def cold_main(vips: int, pops: int, files: int, out: Path | None, log: Log, trace: Path | None = None) -> dict[str, Any]:
    """The config files written (and committed) to a temporary directory, untimed; then
    ``cold_path`` on them in this process."""
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        config_dir = Path(tmp) / "desired"
        t = time.monotonic()
        generate(config_dir, vips, pops, files)
        _git(config_dir, "init", "-q")
        _git(config_dir, "add", "-A")
        _git(config_dir, "commit", "-qm", "synthetic desired state")
        size = sum(f.stat().st_size for f in config_dir.rglob("*.yaml"))
        log(f"cold: {vips} VIPs x {pops} POPs in {files} files ({size / 2**20:.0f} MB of YAML) written in "
            f"{time.monotonic() - t:.1f} s (not timed)")
        from .report import calibrate
        result: dict[str, Any] = {"files": files, "yaml_mb": round(size / 2**20, 1), "python_loop_ms": calibrate(),
                                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        result.update(asyncio.run(cold_path(config_dir, Path(tmp) / "state", log, trace)))
    result["targets"] = {"cold_s": TARGET_COLD_S, "change_s": TARGET_CHANGE_S, "rss_mb": TARGET_COLD_RSS_MB}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


TARGET_COLD_S = 60.0
TARGET_COLD_RSS_MB = 8192


def render_cold(r: dict[str, Any]) -> str:
    rows: list[list[Any]] = [[p["phase"], p["wall_s"], p["cpu_s"], p["gc_cpu_s"], p["rss_mb"], p["peak_rss_mb"]]
                             for p in r["phases"]]
    tot = r["cold_total"]
    rows.insert(len(COLD_PHASES), ["cold path total (load .. serve)", tot["wall_s"], tot["cpu_s"], tot["gc_cpu_s"],
                                    "-", tot["peak_rss_mb"]])
    changes = "; ".join(f"{c['change']}: {c['pops_served']} POPs served, delta <= {c['delta_bytes_max']} B"
                        for c in r["changes"])
    return table(f"Cold path, one process: {r['vips']:,} VIPs x {r['pops']} POPs, {r['files']} files "
                 f"({r['yaml_mb']} MB of YAML)", ["phase", "wall s", "CPU s", "of which GC", "RSS MB", "peak RSS MB"],
                 rows, [changes,
                        f"reports: {r['report_statuses']} (HTTP status of each), {r['report_body_mb']} MB a body; "
                        f"served {r['served_bytes_gzipped'] / 2**20:.0f} MB gzipped, p00's plan "
                        f"{r['plan_body_mb_p00']} MB of JSON",
                        f"targets: cold path <= {TARGET_COLD_S:g} s, one change <= {TARGET_CHANGE_S:g} s, RSS <= "
                        f"{TARGET_COLD_RSS_MB} MB; python_loop_ms {r['python_loop_ms']}, load "
                        f"{r['load_average_start']} -> {r['load_average_end']}"])


def _reasons(pops: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for items in pops.values():
        for item in items.values():
            counts[item.reason] = counts.get(item.reason, 0) + 1
    return counts


# --- 2. end to end -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_times(path: Path, pattern: str) -> list[float]:
    """Epoch times of the controller's log lines matching ``pattern`` (asctime, ms)."""
    out = []
    rx = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        m = rx.match(line)
        if m:
            out.append(datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


def committed_checkout(tmp: Path, vips: int, pops: int, files: int) -> tuple[Path, Any, list[str], dict[str, tuple[str, ...]]]:
    """A synthetic desired state in ``tmp/desired``, committed to git: (its directory, the
    parsed desired state, the VIP names, each VIP's origin regions)."""
    from controller.config.desired import load_desired

    cdir = tmp / "desired"
    generate(cdir, vips, pops, files)
    _git(cdir, "init", "-q")
    _git(cdir, "add", "-A")
    _git(cdir, "commit", "-qm", "synthetic desired state")
    desired = load_desired(str(cdir))
    names = [v.name for v in desired.vips]
    regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
    return cdir, desired, names, regions


async def agents_of(daemon: "Daemon", desired: Any, tmp: Path) -> dict[str, Any]:
    """Once the daemon answers: one agent's PlanClient per POP (state under ``tmp``)."""
    from controller.agent.plan_client import PlanClient

    while not daemon.answering():
        if not daemon.alive():
            raise RuntimeError(daemon.log.read_text()[-2000:])
        await asyncio.sleep(0.1)
    return {p.name: PlanClient(daemon.url, p.name, token(p.name), str(tmp / f"agent-{p.name}"),
                               desired.allowed_prefixes, timeout=600.0) for p in desired.pops}


async def end_run(clients: Mapping[str, Any], daemon: "Daemon", tmp: Path | None = None) -> None:
    """A daemon benchmark's end: its agents' sessions closed, the daemon stopped by PID, its
    files (``tmp``) removed."""
    for c in clients.values():
        await c.close()
    daemon.stop()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


class Daemon:
    """``anycast-controller`` as systemd would run it, on 127.0.0.1; stopped by PID."""

    def __init__(self, config_dir: Path, work: Path, *, root: Path = ROOT, python: str = sys.executable,
                 extra: tuple[str, ...] = ()) -> None:
        """``root``, ``python``: another checkout's daemon and venv (side-by-side runs from one
        driver: ``bench.controller_steady --root``); ``extra``: more daemon arguments."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "controller.log"
        argv = [python, "-m", "controller.cli.controller_main", "--config-dir", str(config_dir),
                "--state-dir", str(work / "state"), "--listen", f"127.0.0.1:{self.port}", *extra]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(argv, cwd=str(root), stdout=f, stderr=subprocess.STDOUT)

    def answering(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        host_process.stop(self.proc)


async def end_to_end(config_dir: Path, work: Path, reps: int, reporting: int, log: Log) -> dict[str, Any]:
    from controller.agent.controller_link import HealthReport
    from controller.agent.plan_client import PlanClient
    from controller.config.desired import load_desired

    desired = load_desired(str(config_dir))
    names = [v.name for v in desired.vips]
    regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
    out: dict[str, Any] = {}
    work.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(config_dir, work)
    started = time.monotonic()
    clients: dict[str, PlanClient] = {}
    try:
        while not daemon.answering():
            if not daemon.alive():
                raise RuntimeError(f"the controller exited: {daemon.log.read_text()[-2000:]}")
            if time.monotonic() - started > 1200:
                raise RuntimeError("the controller did not answer within 20 minutes")
            await asyncio.sleep(0.05)
        out["start_to_listening_s"] = round(time.monotonic() - started, 2)
        # The event loop is blocked while a plan is computed: generous client timeouts.
        clients = {p.name: PlanClient(daemon.url, p.name, token(p.name), str(work / f"agent-{p.name}"),
                                      desired.allowed_prefixes, timeout=600.0) for p in desired.pops}
        watcher = clients[WATCHED_POP]
        plan = await watcher.fetch_plan(-1, 0)
        assert plan is not None
        out["start_to_first_plan_s"] = round(time.monotonic() - started, 2)
        reporting = min(reporting, len(clients))
        log(f"controller: daemon up after {out['start_to_first_plan_s']}s (pid {daemon.proc.pid}, "
            f"RSS {_status_mb(daemon.proc.pid, 'VmRSS')} MB); reports from {reporting} POPs")

        # Every reporting POP at once, as after a controller restart: the daemon plans the
        # reports that arrive together in one pass. All healthy (a "down" here would move VIPs:
        # plan changes that are not the commit's).
        out.update(await _burst(daemon, clients, names, regions, plan.generation, reporting, work, log))
        await asyncio.sleep(3)  # let the passes after the reports settle
        out["idle_wait_s"] = await _until_idle(daemon.proc.pid)
        plan = await watcher.fetch_plan(-1, 0)
        assert plan is not None
        cache = Path(watcher.cache_path)
        out["plan_body_mb"] = round(cache.stat().st_size / 2**20, 2) if cache.exists() else None

        out.update(await _steady_state(daemon, clients, names, regions, reporting, log))

        vips_file = config_dir / "vips.yaml"
        samples: list[dict[str, Any]] = []
        probe = _Probe(daemon.port, work / "probe-changes.json")
        change_cpu0, change_load0 = _cpu_s(daemon.proc.pid), load_average()
        for rep in range(reps):
            await asyncio.sleep(random.uniform(0.5, 1.5))  # a random phase of the daemon's 1 s loop
            present = CHANGED_VIP in plan.vips
            waiting = asyncio.ensure_future(watcher.fetch_plan(plan.generation, 60))
            await asyncio.sleep(0.3)  # the long-poll is parked at the controller
            text = vips_file.read_text()
            # the generated layout: "- name:", then "address:", then "publish: [...]"
            head, sep, tail = text.partition(f"  - name: {CHANGED_VIP}\n")
            address_line, _, rest = tail.partition("\n")
            publish_line, _, rest = rest.partition("\n")
            pops_now = publish_line.split("[", 1)[1].rstrip("]").split(", ")
            pops_new = [p for p in pops_now if p != WATCHED_POP] if present else [WATCHED_POP, *pops_now]
            new_text = f"{head}{sep}{address_line}\n    publish: [{', '.join(pops_new)}]\n{rest}"
            tmp = vips_file.with_suffix(".tmp")  # not *.yaml: the controller never reads half a file
            tmp.write_text(new_text)
            t0 = time.time()
            m0 = time.monotonic()
            tmp.replace(vips_file)
            _git(config_dir, "commit", "-qam", f"{'remove' if present else 'add'} {WATCHED_POP} for {CHANGED_VIP}")
            commit_s = time.monotonic() - m0
            new_plan = await waiting
            spurious = 0
            while new_plan is None or (CHANGED_VIP in new_plan.vips) == present:
                spurious += new_plan is not None
                base = new_plan.generation if new_plan is not None else plan.generation
                new_plan = await watcher.fetch_plan(base, 60)
            total = time.monotonic() - m0
            loaded = [t for t in _log_times(daemon.log, r"desired state \S+ loaded") if t >= t0 - 0.002]
            detect_load = loaded[0] - t0 if loaded else None
            sample = {"total_s": round(total, 3), "commit_s": round(commit_s, 3),
                      "detect_and_load_s": round(detect_load, 3) if detect_load is not None else None,
                      "after_load_s": round(total - detect_load, 3) if detect_load is not None else None,
                      "action": "remove" if present else "add", "generation": new_plan.generation,
                      "spurious_generations": spurious}
            samples.append(sample)
            log(f"controller: change {rep + 1}/{reps} ({sample['action']} {WATCHED_POP} in {CHANGED_VIP}'s "
                f"publish list) reached the agent after {total:.3f}s (detect + load {sample['detect_and_load_s']}s)")
            plan = new_plan
        out["change_stall_ms"] = probe.stop()
        out["change_cpu_s"] = round(_cpu_s(daemon.proc.pid) - change_cpu0, 2)
        out["change_load_average"] = [change_load0, load_average()]
        out["change_samples"] = samples
        out["change_s"] = summary([s["total_s"] for s in samples], 3)
        out["change_detect_and_load_s"] = summary([s["detect_and_load_s"] for s in samples
                                                   if s["detect_and_load_s"] is not None], 3)
        out["change_after_load_s"] = summary([s["after_load_s"] for s in samples if s["after_load_s"] is not None], 3)
        out.update(await _change_everywhere(daemon, config_dir, [p.name for p in desired.pops], EVERYWHERE_REPS, log))
        out["rss_mb_end"] = _status_mb(daemon.proc.pid, "VmRSS")
        out["peak_rss_mb"] = _status_mb(daemon.proc.pid, "VmHWM")
        out["reloads_logged"] = len(_log_times(daemon.log, r"desired state \S+ loaded"))
    finally:
        await end_run(clients, daemon)
    return out


async def _burst(daemon: Daemon, clients: Mapping[str, Any], names: list[str], regions: Mapping[str, tuple[str, ...]],
                 first_generation: int, reporting: int, work: Path, log: Log, distinct: bool = False) -> dict[str, Any]:
    """Every reporting POP's first full report at once (a controller restart: every agent's
    first report), all healthy, as the code under test's agent encodes it; the last answer,
    each answer, a status read after (planned), the stall probe throughout. ``distinct``:
    each POP sees the primary of a different few VIPs down, so no two reports are equal
    (the controller shares equal ones)."""
    from controller import wire
    from controller.agent.controller_link import HealthReport

    out: dict[str, Any] = {}

    # Built and encoded before the clock starts: the benchmark's own 10,000-VIP dicts and
    # 50 x 700 KB of JSON are no daemon time (encoding them inside the burst, as the
    # agents' client does, put ~75 ms of the benchmark's CPU per report into "answered" on
    # the same 2 vCPUs). Sent as the code under test's agent would send its first report
    # (numbered 1 where the wire numbers reports); the clients then go on with deltas.
    first_reports = {pop: HealthReport(pop, first_generation if pop == WATCHED_POP else 0,
                                       verdicts(names, regions, i, len(clients), down_every=100 if distinct else 0),
                                       {n: True for n in names}) for i, pop in enumerate(clients)}
    numbered = hasattr(wire, "WireReport") and "seq" in {f.name for f in dataclasses.fields(wire.WireReport)}
    first_wire = {pop: wire.WireReport(r.plan_generation, r.origins, r.announced, 1) if numbered else None
                  for pop, r in first_reports.items()}
    # What the agent sends: PlanClient.report_body where it has one (the compact form), else
    # the wire's encoding of its time.
    first_bodies = {pop: json.dumps(_agent_body(clients[pop], w) if w is not None else
                                    _encode_report(first_reports[pop].origins, first_reports[pop].announced)
                                    ).encode() for pop, w in first_wire.items()}
    out["report_body_bytes"] = summary([len(b) for b in first_bodies.values()], 0)
    import aiohttp

    async def one(i: int, pop: str, c: Any) -> float:
        t = time.monotonic()
        for attempt in (1, 2):
            try:
                async with burst_session.post(f"{daemon.url}/v1/reports/{pop}", data=first_bodies[pop],
                                              headers={"Authorization": f"Bearer {token(pop)}",
                                                       "Content-Type": "application/json"},
                                              timeout=aiohttp.ClientTimeout(total=600)) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")
                if first_wire[pop] is not None:  # the agent's client goes on with deltas onto it
                    c._seq, c._accepted = 1, first_wire[pop]
            except Exception as exc:  # noqa: BLE001 - counted (older code closed connections of a blocked loop)
                if attempt == 1 and _broken_connection(exc):
                    # A kept-alive connection the server closed as the request went out
                    # (aiohttp's idle keep-alive timeout, under load): what an agent's
                    # next report does, once; counted apart, not as a failure.
                    retried.append(f"{pop}: {exc}"[:300])
                    continue
                failed.append(f"{pop}: {exc}"[:300])
            break
        return time.monotonic() - t

    failed: list[str] = []
    retried: list[str] = []

    burst_probe = _Probe(daemon.port, work / "probe-burst.json")
    await asyncio.sleep(0.5)  # (the probe connected)
    t_all = time.monotonic()
    reports_cpu0, reports_load0 = _cpu_s(daemon.proc.pid), load_average()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as burst_session:
        post_times = list(await asyncio.gather(*(one(i, pop, c) for i, (pop, c)
                                                 in enumerate(list(clients.items())[:reporting]))))
    out["reports_all_answered_s"] = round(time.monotonic() - t_all, 3)
    # Answered is not planned since reports are acknowledged before their pass: a status
    # read waits for the pass of every report acknowledged before it (older code answered
    # each report after its pass, so there the two are the same).
    await _status(daemon)
    out["reports_all_planned_s"] = round(time.monotonic() - t_all, 3)
    out["reports_stall_ms"] = burst_probe.stop()  # the event loop's stalls, burst and its pass
    out["reports_cpu_s"] = round(_cpu_s(daemon.proc.pid) - reports_cpu0, 2)
    out["reports_load_average"] = [reports_load0, load_average()]
    out["reporting_pops"] = reporting
    out["report_failures"] = len(failed)
    out["report_failure_examples"] = failed[:3]
    out["report_retries"] = len(retried)  # once each, on a broken keep-alive connection
    out["report_retry_examples"] = retried[:3]
    out["report_post_s"] = summary(post_times, 3)
    out["report_answers_s"] = sorted(round(x, 3) for x in post_times)
    out["rss_mb_after_reports"] = _status_mb(daemon.proc.pid, "VmRSS")
    log(f"controller: {len(post_times)} reports sent together, all answered after "
        f"{out['reports_all_answered_s']}s, planned after {out['reports_all_planned_s']}s; "
        f"RSS {out['rss_mb_after_reports']} MB")
    return out


def _agent_body(client: Any, report: Any) -> Any:
    """The JSON value ``client`` (a PlanClient) sends for ``report``: its ``report_body``
    where it has one, else ``wire.encode_report`` (code before the compact form)."""
    from controller import wire

    body = getattr(client, "report_body", None)
    return body(report) if body is not None else wire.encode_report(report)


def _broken_connection(exc: BaseException) -> bool:
    """Whether a report failed on the connection (reset or closed before any answer), not
    on an answer: the agent's client names aiohttp's exception in its error."""
    text = str(exc)
    return any(kind in text for kind in ("ServerDisconnectedError", "ClientOSError", "Connection reset"))


EVERYWHERE_VIP = "vip-00001"  # the new VIPs go into its file, after it: a copy of its entry
EVERYWHERE_REPS = 3
EVERYWHERE_LIMIT_S = 30.0  # s: a POP not holding the change by then is counted, not waited for


def _vip_block(text: str, name: str) -> tuple[int, int]:
    """Where VIP ``name``'s entry starts and ends in a generated vips file."""
    start = text.index(f"  - name: {name}\n")
    end = text.find("\n  - name: ", start + 1)
    return start, len(text) if end < 0 else end + 1


def _new_vip_block(block: str, rep: int) -> tuple[str, str]:
    """A copy of a generated VIP entry under a new name and address (10.99.0.0/24 is not
    generated): the VIP ``rep`` of the change-at-every-POP step, and its name."""
    name = f"vip-new-{rep:02d}"
    out = re.sub(r"- name: \S+\n", f"- name: {name}\n", block, count=1)
    return re.sub(r"address: \S+\n", f"address: 10.99.0.{rep + 1}/32\n", out, count=1), name


async def _change_everywhere(daemon: Daemon, config_dir: Path, pops: list[str], reps: int,
                             log: Log) -> dict[str, Any]:
    """A change published at every POP that moves no traffic: a new VIP published at all of
    them (policy/change.py applies additions at once; a change of a VIP's definition, e.g. a
    backend port, moves traffic and rolls out in waves with a bake, which would time the bake,
    not the controller). Every POP long-polls its plan with plain HTTP (no agent decoding: 50
    agents decode on 50 machines, not in this process), timed from the rename to the answer's
    last byte that carries the new VIP, per POP; and the bytes of each answer as sent (gzip
    included: the wire size)."""
    import aiohttp

    target = None
    for path in sorted(config_dir.rglob("*.yaml")):
        if f"  - name: {EVERYWHERE_VIP}\n" in path.read_text():
            target = path
    assert target is not None
    gens: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    stall_probe = _Probe(daemon.port, Path(str(daemon.log) + ".probe-everywhere.json"))
    cpu0, load0 = _cpu_s(daemon.proc.pid), load_average()
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async def get(pop: str, query: str) -> tuple[bytes, bytes]:
            async with session.get(f"{daemon.url}/v1/plans/{pop}{query}",
                                   headers={"Authorization": f"Bearer {token(pop)}", "Accept-Encoding": "gzip"},
                                   timeout=aiohttp.ClientTimeout(total=600)) as r:
                raw = await r.read()
                assert r.status == 200, (r.status, raw[:200])
                return raw, gzip.decompress(raw) if r.headers.get("Content-Encoding") == "gzip" else raw

        for pop in pops:
            gens[pop] = int(json.loads((await get(pop, ""))[1])["generation"])
        for rep in range(reps):
            text = target.read_text()
            a, b = _vip_block(text, EVERYWHERE_VIP)
            block, added = _new_vip_block(text[a:b], rep)
            marker = re.compile(rb'"%s"' % added.encode())  # the new VIP's name in the plan's JSON

            start = [0.0]

            async def poll(pop: str) -> tuple[float, int]:
                while True:
                    raw, body = await get(pop, f"?after={gens[pop]}&wait=60")
                    arrived = time.monotonic()
                    doc = json.loads(body)
                    gens[pop] = int(doc["generation"])
                    if marker.search(body):
                        return arrived - start[0], len(raw)

            tmp = target.with_suffix(".tmp")
            tmp.write_text(text[:b] + block + text[b:])
            polls = [asyncio.ensure_future(poll(pop)) for pop in pops]
            await asyncio.sleep(0.5)  # the long-polls are parked at the controller
            start[0] = time.monotonic()
            tmp.replace(target)
            _git(config_dir, "commit", "-qam", f"{added}: new, published at every POP")
            done, waiting = await asyncio.wait(polls, timeout=EVERYWHERE_LIMIT_S)
            for task in waiting:  # (a controller that never serves it to some POPs: bounded, counted)
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            got = [t.result() for t in polls if t in done]
            times = [g[0] for g in got]
            sample = {"all_hold_s": round(max(times), 3) if not waiting else None,
                      "p50_s": round(sorted(times)[len(times) // 2], 3) if len(got) * 2 > len(polls) else None,
                      "held_by": len(got), "of": len(polls),
                      "bytes_p00": polls[0].result()[1] if polls[0] in done else None,
                      "bytes_max": max((g[1] for g in got), default=None)}
            samples.append(sample)
            log(f"controller: {added} added at every POP ({len(pops)}): all hold it after "
                f"{sample['all_hold_s']}s (p50 {sample['p50_s']}s), answer {sample['bytes_p00']} B on the wire"
                + (f"; {len(waiting)} POPs did not get it within {EVERYWHERE_LIMIT_S:g}s" if waiting else ""))
            if waiting:  # the next repetition's generations: whatever those POPs hold now
                for pop in pops:
                    gens[pop] = int(json.loads((await get(pop, ""))[1])["generation"])
            await asyncio.sleep(1.0)
    return {"everywhere_samples": samples,
            "everywhere_all_hold_s": summary([s["all_hold_s"] for s in samples if s["all_hold_s"] is not None], 3),
            "everywhere_timeouts": sum(s["all_hold_s"] is None for s in samples),
            "everywhere_bytes": summary([float(s["bytes_p00"]) for s in samples if s["bytes_p00"] is not None], 0),
            "everywhere_stall_ms": stall_probe.stop(), "everywhere_cpu_s": round(_cpu_s(daemon.proc.pid) - cpu0, 2),
            "everywhere_load_average": [load0, load_average()]}


STEADY_S = 12.0  # the steady-state window: every POP reports every REPORT_EVERY s, nothing changes
REPORT_EVERY = 2.0
PROBE_EVERY = 0.01


def _encode_report(origins: Mapping[str, Mapping[str, bool | None]], announced: Mapping[str, bool]) -> Any:
    """A full report's JSON value, with the wire API of the code under test (the reference
    commit 4448db0 had ``encode_report(generation, origins, announced)``)."""
    from controller import wire

    if hasattr(wire, "WireReport"):
        return wire.encode_report(wire.WireReport(0, origins, announced))
    return wire.encode_report(0, origins, announced)  # type: ignore[call-arg,arg-type]


async def _status(daemon: Daemon) -> Any:
    """``/v1/status``'s JSON (a read that waits for the pass of every report acknowledged before)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{daemon.url}/v1/status", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                               timeout=aiohttp.ClientTimeout(total=600)) as r:
            return json.loads(await r.read())


def daemon_lag_ms(status: Mapping[str, Any]) -> dict[str, Any] | None:
    """The daemon's own event-loop lag from a ``/v1/status`` (``event_loop``, code that has
    it: controller/server/looplag.py) as the probe's summary has it, in ms, over the status's
    window (the last ``window_s``); None where the daemon does not sample it."""
    lag = status.get("event_loop")
    if not lag:
        return None
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {"n": lag["samples"], "p50": ms(lag["lag_p50_s"]), "p99": ms(lag["lag_p99_s"]),
            "max": ms(lag["lag_max_s"]), "window_s": lag["window_s"], "every_s": lag["lag_every_s"]}


async def _until_idle(pid: int, limit_s: float = 120.0) -> float:
    """Wait until the daemon uses under a tenth of a core over a second (the passes after a
    burst of first reports are done), at most ``limit_s``: the steady state is measured
    from there. The seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        c0 = _cpu_s(pid)
        await asyncio.sleep(1.0)
        if _cpu_s(pid) - c0 < 0.1:
            break
    return round(time.monotonic() - t0, 1)


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Probe:
    """A child process that asks the daemon for a trivial answer (an unknown path: 404)
    every PROBE_EVERY s on a kept-alive connection and records each answer's latency:
    how long the daemon's event loop kept a request waiting. A process of its own, so the
    benchmark's own work (encoding reports) does not show up as the daemon's stall."""

    def __init__(self, port: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.controller_scale", "probe", "--port", str(port),
                                      "--out", str(out)], cwd=str(ROOT), stdin=subprocess.PIPE)

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the probe stops at EOF on stdin
        self.proc.wait(60)
        lat: list[float] = json.loads(self.out.read_text())
        return summary(lat, 1)


def probe_main(port: int, out: Path) -> None:
    import http.client
    import threading

    done = threading.Event()
    def wait_for_eof() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    lat: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    while not done.is_set():
        t = time.perf_counter()
        try:
            conn.request("GET", "/v1/probe")
            conn.getresponse().read()
            lat.append(round((time.perf_counter() - t) * 1000, 2))
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        time.sleep(PROBE_EVERY)
    out.write_text(json.dumps(lat))


STALLS = "probe"  # where the steady state's stalls come from (_steady_state's ``stalls``)


async def _steady_state(daemon: Daemon, clients: Mapping[str, Any], names: list[str],
                        regions: Mapping[str, tuple[str, ...]], reporting: int, log: Log,
                        stalls: str | None = None, seconds: float | None = None) -> dict[str, Any]:
    """Every reporting POP sends its (unchanged, all-healthy) report every REPORT_EVERY s,
    spread over the interval, for STEADY_S s: the daemon's CPU share and its event loop's
    stalls meanwhile. Bodies are encoded once (the benchmark's CPU is not the daemon's).

    ``stalls`` (default STALLS): "probe", the external probe's (100 requests a second, which
    costs the daemon 3-5 % of a core itself: results 3i, 3x); "daemon", the daemon's own lag
    (``/v1/status`` event_loop after the window; the window is then as long as the status's,
    60 s, so the figures are the window's); "none": neither (the daemon's CPU for the
    reports alone). ``seconds``: the window's length instead of STEADY_S."""
    import aiohttp

    stalls = stalls or STALLS
    if stalls not in ("probe", "daemon", "none"):
        raise ValueError(f"stalls: probe, daemon or none, not {stalls!r}")
    if seconds is None:
        seconds = STEADY_S
        if stalls == "daemon":
            lag = (await _status(daemon)).get("event_loop")
            if lag:
                seconds = max(seconds, float(lag["window_s"]))

    pops = list(clients)[:reporting]
    bodies = {pop: json.dumps(_encode_report(verdicts(names, regions, i, len(clients), down_every=0),
                                             {n: True for n in names})).encode()
              for i, pop in enumerate(pops)}
    posts: list[float] = []
    failures = 0
    stop_at = time.monotonic() + seconds

    from controller import wire
    from controller.agent.controller_link import HealthReport

    # An agent of the code under test sends what it sends: delta reports where the wire has
    # them (an unchanged report is a few bytes), else its whole report, encoded once here.
    deltas = hasattr(wire, "report_delta")
    health = {pop: HealthReport(pop, 0, verdicts(names, regions, i, len(clients), down_every=0),
                                {n: True for n in names}) for i, pop in enumerate(pops)}

    async def reporter(i: int, pop: str, session: aiohttp.ClientSession) -> None:
        nonlocal failures
        await asyncio.sleep(REPORT_EVERY * i / len(pops))
        while time.monotonic() < stop_at:
            t = time.monotonic()
            if deltas:
                try:
                    await clients[pop].report(health[pop])
                except Exception:  # noqa: BLE001 - counted, the window goes on
                    failures += 1
                posts.append(time.monotonic() - t)
                await asyncio.sleep(max(0.0, REPORT_EVERY - (time.monotonic() - t)))
                continue
            async with session.post(f"{daemon.url}/v1/reports/{pop}", data=bodies[pop],
                                    headers={"Authorization": f"Bearer {token(pop)}",
                                             "Content-Type": "application/json"},
                                    timeout=aiohttp.ClientTimeout(total=600)) as r:
                await r.read()
                failures += r.status != 200
            posts.append(time.monotonic() - t)
            await asyncio.sleep(max(0.0, REPORT_EVERY - (time.monotonic() - t)))

    probe = _Probe(daemon.port, Path(str(daemon.log) + ".probe-steady.json")) if stalls == "probe" else None
    load0 = load_average()
    cpu0, t0 = _cpu_s(daemon.proc.pid), time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(reporter(i, pop, session) for i, pop in enumerate(pops)))
    cpu_s, took = _cpu_s(daemon.proc.pid) - cpu0, time.monotonic() - t0
    cpu = cpu_s / took
    rss = _status_mb(daemon.proc.pid, "VmRSS")
    stall: dict[str, Any] | None = None
    if probe is not None:
        stall = probe.stop()
    elif stalls == "daemon":
        stall = daemon_lag_ms(await _status(daemon))
    out = {"steady_report_kind": "delta" if deltas else "full", "steady_cpu_fraction": round(cpu, 4), "steady_report_post_s": summary(posts, 3),
           "steady_report_failures": failures, "steady_stall_ms": stall or {}, "steady_stalls_from": stalls,
           "steady_window_s": round(took, 1),
           "steady_rss_mb": rss, "steady_load_average": [load0, load_average()],
           "steady_cpu_s": round(cpu_s, 2)}
    stall = stall or {}
    log(f"controller: steady state ({reporting} POPs reporting every {REPORT_EVERY:g}s for {seconds:g}s, "
        f"stalls from {stalls}): daemon CPU {cpu:.1%} of a core, event-loop stall p99 {stall.get('p99')} ms "
        f"max {stall.get('max')} ms, RSS {out['steady_rss_mb']} MB")
    return out


async def burst_only(config_dir: Path, work: Path, log: Log, distinct: bool = False) -> dict[str, Any]:
    """The daemon up (first plan), then ``_burst`` alone: what ``end_to_end`` measures first,
    for side-by-side runs of two codes (``python -m bench.controller_scale burst``)."""
    from controller.agent.plan_client import PlanClient
    from controller.config.desired import load_desired

    desired = load_desired(str(config_dir))
    names = [v.name for v in desired.vips]
    regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    daemon = Daemon(config_dir, work)
    started = time.monotonic()
    clients: dict[str, PlanClient] = {}
    try:
        while not daemon.answering():
            if not daemon.alive() or time.monotonic() - started > 1200:
                raise RuntimeError(f"the controller did not come up: {daemon.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        clients = {p.name: PlanClient(daemon.url, p.name, token(p.name), str(work / f"agent-{p.name}"),
                                      desired.allowed_prefixes, timeout=600.0) for p in desired.pops}
        plan = await clients[WATCHED_POP].fetch_plan(-1, 0)
        assert plan is not None
        out["start_to_first_plan_s"] = round(time.monotonic() - started, 2)
        await _until_idle(daemon.proc.pid)
        out.update(await _burst(daemon, clients, names, regions, plan.generation, len(clients), work, log, distinct))
        out["rss_mb_end"] = _status_mb(daemon.proc.pid, "VmRSS")
    finally:
        await end_run(clients, daemon)
    return out


def burst_main(vips: int, pops: int, files: int, runs: int, out: Path | None, log: Log,
               distinct: bool = False) -> list[dict[str, Any]]:
    """``runs`` bursts (a fresh daemon each) on one generated config of ``files`` files."""
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        config_dir = Path(tmp) / "desired"
        generate(config_dir, vips, pops, files)
        _git(config_dir, "init", "-q")
        _git(config_dir, "add", "-A")
        _git(config_dir, "commit", "-qm", "synthetic desired state")
        for run_ in range(runs):
            r = asyncio.run(burst_only(config_dir, Path(tmp) / f"run{run_}", log, distinct))
            r.update({"files": files, "vips": vips, "pops": pops, "distinct": distinct,
                      "at": time.strftime("%H:%M:%S", time.gmtime())})
            results.append(r)
            if out is not None:
                out.write_text(json.dumps(results, indent=1) + "\n")
    return results


# --- the harness -------------------------------------------------------------------------------
def run(*, quick: bool, log: Log, vips: int | None = None, pops: int | None = None,
        reps: int | None = None, inproc: bool = True) -> dict[str, Any]:
    """``inproc`` False: the end-to-end part only (it runs against older code too, e.g. the
    reference commit 4448db0, whose in-process APIs differ)."""
    nvips = vips or (1000 if quick else 10000)
    npops = pops or (10 if quick else 50)
    nreps = reps or (2 if quick else 5)
    runs = 3 if quick else 7
    scaling = [5, 10, 25]
    with tempfile.TemporaryDirectory(prefix="bench-ctl-") as tmp:
        work = Path(tmp)
        config_dir = work / "desired"
        split_dir = work / "desired-split"
        t = time.monotonic()
        for d, files in ((config_dir, 1), (split_dir, SPLIT_FILES)):
            generate(d, nvips, npops, files)
            _git(d, "init", "-q")
            _git(d, "add", "-A")
            _git(d, "commit", "-qm", "synthetic desired state")
        size_mb = sum(f.stat().st_size for f in config_dir.glob("*.yaml")) / 2**20
        log(f"controller: {nvips} VIPs x {npops} POPs generated in {time.monotonic() - t:.1f}s "
            f"({size_mb:.1f} MB of YAML)")
        inp: dict[str, Any] | None = None
        if inproc:
            inp = _run_inproc(work, config_dir, runs, quick, scaling, log)
        e2e = asyncio.run(end_to_end(config_dir, work / "one", nreps, npops, log))
        log(f"controller: the same with the VIPs in {SPLIT_FILES} files (vips.yaml + vips/*.yaml)")
        split = asyncio.run(end_to_end(split_dir, work / "split", nreps, npops, log))
    return {"vips": nvips, "pops": npops, "pairs": nvips * npops, "yaml_mb": round(size_mb, 1),
            "inproc": inp, "end_to_end": e2e, "end_to_end_split": split, "split_files": SPLIT_FILES,
            "targets": {"full_plan_s": TARGET_PLAN_S, "change_end_to_end_s": TARGET_CHANGE_S}}


def _run_inproc(work: Path, config_dir: Path, runs: int, quick: bool, scaling: list[int], log: Log) -> dict[str, Any]:
    out_file = work / "inproc.json"
    argv = [sys.executable, "-m", "bench.controller_scale", "inproc", "--dir", str(config_dir),
            "--out", str(out_file), "--runs", str(runs), "--load-runs", "1" if quick else "2",
            "--scaling", *map(str, scaling)]
    r = subprocess.run(argv, cwd=str(ROOT), capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"controller in-process benchmark failed: {r.stderr[-3000:]}")
    inp: dict[str, Any] = json.loads(out_file.read_text())
    log(f"controller: load {inp['load_s']['p50']}s, plan p50 {inp['plan_s']['p50']}s "
        f"(max {inp['plan_s']['max']}s, first {inp['plan_first_s']}s), "
        f"daemon pass (Controller.replan) p50 {inp['controller_replan_s']['p50']}s, "
        f"agent decode {inp['agent_decode_s']['p50']}s, peak RSS {inp['peak_rss_mb']} MB; end to end")
    return inp


def render(result: dict[str, Any]) -> str:
    if result["inproc"] is None:
        return _render_e2e(result)
    i, e = result["inproc"], result["end_to_end"]
    plan_ok = (i["plan_s"]["max"] or 0) < TARGET_PLAN_S
    rows: list[list[Any]] = [
        ["load_desired (YAML -> typed state)", i["load_s"]["p50"], i["load_s"]["max"], i["load_s"]["n"], "-"],
        ["plan(), first (empty memory)", i["plan_first_s"], i["plan_first_s"], 1, "-"],
        ["plan(), steady (previous memory)", i["plan_s"]["p50"], i["plan_s"]["max"], i["plan_s"]["n"],
         plan_ok],
        [f"plan(), GC thresholds {tuple(i['default_gc_threshold'])} (Python's default)",
         i["plan_default_gc_s"]["p50"], i["plan_default_gc_s"]["max"], i["plan_default_gc_s"]["n"], "-"],
        ["Controller.replan, first after the reports (every POP's plan new)", i["controller_replan_first_s"],
         i["controller_replan_first_s"], 1, "-"],
        ["Controller.replan, steady (plan + changed bodies + state file)", i["controller_replan_s"]["p50"],
         i["controller_replan_s"]["max"], i["controller_replan_s"]["n"], "-"],
        ["Controller.apply_config, one VIP's publish list changed", i["controller_one_change_s"]["p50"],
         i["controller_one_change_s"]["max"], i["controller_one_change_s"]["n"], "-"],
        ["agent decode_plan (one POP), first plan", i["agent_decode_s"]["p50"], i["agent_decode_s"]["max"],
         i["agent_decode_s"]["n"], "-"],
        ["agent decode_plan (one POP), specs cached", i["agent_decode_cached_s"]["p50"],
         i["agent_decode_cached_s"]["max"], i["agent_decode_cached_s"]["n"], "-"],
        ["agent PlanClient.save_cached (one POP)", i["agent_cache_write_s"]["p50"], i["agent_cache_write_s"]["max"],
         i["agent_cache_write_s"]["n"], "-"],
    ]
    for label, x in ((f"{result['yaml_mb']} MB vips.yaml", e),
                     (f"{result['split_files']} files", result["end_to_end_split"])):
        rows += [
            [f"[{label}] POST /v1/reports, {x['reporting_pops']} POPs at once", x["report_post_s"]["p50"],
             x["report_post_s"]["max"], x["report_post_s"]["n"], "-"],
            [f"[{label}] steady: POST /v1/reports (each POP every {REPORT_EVERY:g} s)",
             x["steady_report_post_s"]["p50"], x["steady_report_post_s"]["max"], x["steady_report_post_s"]["n"], "-"],
            [f"[{label}] steady: event-loop stall (ms, trivial request)", x["steady_stall_ms"]["p99"],
             x["steady_stall_ms"]["max"], x["steady_stall_ms"]["n"], "p99 in the p50 column"],
            [f"[{label}] during changes: event-loop stall (ms)", x["change_stall_ms"]["p99"],
             x["change_stall_ms"]["max"], x["change_stall_ms"]["n"], "p99 in the p50 column"],
            [f"[{label}] one VIP's change -> agent holds the plan", x["change_s"]["p50"], x["change_s"]["max"],
             x["change_s"]["n"], (x["change_s"]["max"] or 0) < TARGET_CHANGE_S],
            ["  of which: write -> reload logged", x["change_detect_and_load_s"]["p50"],
             x["change_detect_and_load_s"]["max"], x["change_detect_and_load_s"]["n"], "-"],
            ["  of which: reload -> agent holds it", x["change_after_load_s"]["p50"], x["change_after_load_s"]["max"],
             x["change_after_load_s"]["n"], "-"],
        ]
    scale = ", ".join(f"{s['pops']} POPs ({s['pairs']:,} pairs) {s['plan_s']}s" for s in i["scaling"])
    return table(f"Controller scale: {result['vips']:,} VIPs x {result['pops']} POPs "
                 f"({result['pairs']:,} (POP, VIP) pairs, {result['yaml_mb']} MB of YAML)",
                 ["step", "p50 s", "max s", "n", "target met"], rows,
                 [f"memory: planner process peak RSS {i['peak_rss_mb']} MB (after load {i['rss_mb_after_load']}, "
                  f"after reports {i['rss_mb_after_reports']}); tracemalloc peak of one plan "
                  f"{i['tracemalloc_plan_peak_mb']} MB, its result {i['tracemalloc_plan_result_mb']} MB",
                  f"steady state: daemon CPU {e['steady_cpu_fraction']:.1%} of a core (one file), "
                  f"{result['end_to_end_split']['steady_cpu_fraction']:.1%} (split); RSS {e['steady_rss_mb']} MB",
                  f"daemon RSS {e['rss_mb_after_reports']} MB after the reports, peak {e['peak_rss_mb']} MB; "
                  f"one POP's plan {e['plan_body_mb']} MB of JSON; state file {i['state_file_mb']} MB",
                  f"plan() by publish-domain size: {scale} ({i['us_per_pair']} us per pair)",
                  f"GC thresholds {tuple(i['gc_threshold'])} as the daemon sets them, except where said; the "
                  "daemon notices a change of the files or of the git checkout within ~0.2 s (stat data polled every 0.1 s)",
                  f"targets: full plan < {TARGET_PLAN_S:g} s; one change end to end < {TARGET_CHANGE_S:g} s"])


def _render_e2e(result: dict[str, Any]) -> str:
    """The end-to-end figures alone (a run with ``inproc`` False)."""
    rows: list[list[Any]] = []
    for label, x in (("one file", result["end_to_end"]), (f"{result['split_files']} files", result["end_to_end_split"])):
        rows += [
            [f"[{label}] one VIP's change -> agent holds it", x["change_s"]["p50"], x["change_s"]["p99"],
             x["change_s"]["max"]],
            [f"[{label}] a change at all POPs -> all hold it", x["everywhere_all_hold_s"]["p50"],
             f"{x.get('everywhere_timeouts', 0)} of {len(x['everywhere_samples'])} not everywhere in "
             f"{EVERYWHERE_LIMIT_S:g} s", x["everywhere_all_hold_s"]["max"]],
            [f"[{label}] {x['reporting_pops']} full reports at once, each answered", x["report_post_s"]["p50"],
             x["report_post_s"]["p99"], x["report_post_s"]["max"]],
            [f"[{label}]   the last answered / every one planned s; failed, retried",
             x["reports_all_answered_s"], x["reports_all_planned_s"],
             f"{x['report_failures']} failed, {x.get('report_retries', 0)} retried"],
            [f"[{label}]   event-loop stall ms, burst and its pass", *(x["reports_stall_ms"][k] if "reports_stall_ms" in x
                                                                       else "-" for k in ("p50", "p99", "max"))],
            [f"[{label}] steady: daemon CPU (fraction of a core)", x["steady_cpu_fraction"], "-", "-"],
            [f"[{label}] steady: event-loop stall ms", x["steady_stall_ms"]["p50"], x["steady_stall_ms"]["p99"],
             x["steady_stall_ms"]["max"]],
            [f"[{label}] changes: event-loop stall ms", x["change_stall_ms"]["p50"], x["change_stall_ms"]["p99"],
             x["change_stall_ms"]["max"]],
            [f"[{label}] RSS MB steady / peak", x["steady_rss_mb"], "-", x["peak_rss_mb"]],
            [f"[{label}] one-VIP answer bytes on the wire", x["everywhere_bytes"]["p50"], "-", x["everywhere_bytes"]["max"]],
        ]
    return table(f"Controller end to end: {result['vips']:,} VIPs x {result['pops']} POPs", ["measure", "p50", "p99", "max"],
                 rows, [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.controller_scale")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("inproc", help="the in-process measurements on a generated config directory")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--runs", type=int, default=7)
    s.add_argument("--load-runs", type=int, default=2)
    s.add_argument("--scaling", type=int, nargs="*", default=[5, 10, 25])
    e = sub.add_parser("engine", help="the incremental engine alone, in process, at a given size")
    e.add_argument("--vips", type=int, default=100_000)
    e.add_argument("--pops", type=int, default=300)
    e.add_argument("--out", type=Path)
    pr = sub.add_parser("probe", help="time trivial requests to a daemon until stdin closes")
    pr.add_argument("--port", type=int, required=True)
    pr.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("burst", help="the daemon, then every POP's first full report at once (no other step)")
    b.add_argument("--vips", type=int, default=10000)
    b.add_argument("--pops", type=int, default=50)
    b.add_argument("--files", type=int, default=1, help="1, or SPLIT_FILES: the VIPs in that many files")
    b.add_argument("--runs", type=int, default=1)
    b.add_argument("--out", type=Path)
    b.add_argument("--distinct", action="store_true", help="no two POPs' reports equal (a few VIPs down at each)")
    cd = sub.add_parser("cold", help="the daemon's cold start in one process: load, reports, first plan, serving, a change")
    cd.add_argument("--vips", type=int, default=100_000)
    cd.add_argument("--pops", type=int, default=300)
    cd.add_argument("--files", type=int, default=SPLIT_FILES)
    cd.add_argument("--out", type=Path)
    cd.add_argument("--trace", type=Path, help="write a timeline (bench/cold_trace.py) to this file")
    g = sub.add_parser("generate", help="write a synthetic config directory")
    g.add_argument("--dir", type=Path, required=True)
    g.add_argument("--vips", type=int, default=10000)
    g.add_argument("--pops", type=int, default=50)
    args = p.parse_args(argv)
    if args.cmd == "engine":
        r = engine_scale(args.vips, args.pops)
        text = json.dumps(r, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0
    if args.cmd == "cold":
        print(render_cold(cold_main(args.vips, args.pops, args.files, args.out, lambda m: print(m, flush=True),
                                    args.trace)))
        return 0
    if args.cmd == "burst":
        res = burst_main(args.vips, args.pops, args.files, args.runs, args.out, lambda m: print(m, flush=True),
                         args.distinct)
        print(json.dumps([{k: v for k, v in r.items() if k != "report_answers_s"} for r in res], indent=1))
        return 0
    if args.cmd == "probe":
        probe_main(args.port, args.out)
        return 0
    if args.cmd == "generate":
        generate(args.dir, args.vips, args.pops)
        return 0
    result = inproc(args.dir, args.runs, args.load_runs, args.scaling)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
