"""What an origin failover costs: the primary origin dies at every POP -> every POP planned on the target.

Lab: the three-POP fleet of the lab scenarios (lab.fleet, the controller with the lab's
timers), no clients. game-global as in configs/controller/vips.yaml: HTTP checks every
0.2 s, timeout 0.15 s, fall 2; us-west (two backends) then eu-central. Each repetition
stops us-west's backends (connections refused at every POP at once) and measures, on the
wall clock, from just before the stop to the controller's log line ``VIP game-global:
moved from us-west to eu-central`` (the pass that planned every POP on eu-central; the
logger's timestamp, ms resolution); then restarts us-west and waits for the failback (the
lab's 5 s hold-down). The controller's failover waits for fresh proof that eu-central is
healthy (policy/origins.py); run it from a checkout without that (``main`` before it) for
the other arm: the same module, the code under test is whatever the venv imports.

``sudo .venv/bin/python -m bench.origin_failover --reps 10 --json results/x.json``
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import time
from pathlib import Path
from typing import Any

from lab.fleet import Fleet
from lab.netns import Lab
from lab.poll import wait_for
from lab.scenarios import NAME, PRIMARY, SECONDARY, lab_controller_config
from lab.topology import load_topology

from .report import machine, summary

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*VIP " + NAME + r": moved (back )?from (\S+) to (\S+?)[:;]")


def _moves(log: str) -> list[tuple[float, str, str]]:
    """(time, from, to) of every origin move the controller logged."""
    out = []
    for line in log.splitlines():
        m = LINE.match(line)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((t, m.group(3), m.group(4)))
    return out


def _moved(f: Fleet, since: float, to: str, timeout: float) -> float | None:
    """When the controller logged a move to ``to`` at or after ``since`` (None: not within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = next((t for t, _, dst in _moves(f.controller_log()) if dst == to and t >= since - 0.002), None)
        if hit is not None:
            return hit
        time.sleep(0.02)
    return None


def run(*, reps: int, log: Any = print) -> dict[str, Any]:
    lab = Lab("t-bof-")
    samples: list[float] = []
    misses = 0
    try:
        f = Fleet(lab, load_topology(), controller_edit=lab_controller_config).up()
        wait_for(lambda: (e := f.explain(NAME)) is not None and all(
            p["wanted"] and p["active_origin"] == PRIMARY and p["reason"] == "healthy" for p in e["pops"]),
            90, 0.1, f"every POP healthy on {PRIMARY}")
        for i in range(reps):
            time.sleep(1.0)
            t0 = time.time()
            f.stop_backends("usw")
            try:
                at = _moved(f, t0, SECONDARY, 15)
            finally:
                f.start_backends("usw")
            if at is None:
                misses += 1
                log(f"  {i}: no move to {SECONDARY} within 15 s")
            else:
                samples.append(at - t0)
                log(f"  {i}: every POP planned on {SECONDARY} after {at - t0:.3f}s")
            back = _moved(f, time.time(), PRIMARY, 30)
            assert back is not None, f"no failback to {PRIMARY} within 30 s"
    finally:
        lab.teardown()
    stats = summary(samples)
    log(f"origin failover: p50 {stats['p50']}s p90 {stats['p90']}s max {stats['max']}s ({misses} missed)")
    return {"samples_s": [round(s, 4) for s in samples], "misses": misses, **stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--label", default="")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = {"label": args.label, "machine": machine(), "origin_failover": run(reps=args.reps)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
