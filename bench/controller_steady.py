"""The controller's steady state at 10,000 VIPs x 50 POPs: CPU with and without the stall
probe, the daemon's own event-loop lag, RSS at each phase (issue 10, results 3x).

    python -m bench.controller_steady --out FILE --label X [--files 1] [--window 60]
        [--root CHECKOUT --python VENV_PYTHON] [-- DAEMON_ARGS...]

The real daemon (``controller_scale.Daemon``) on the benchmark's generated checkout, from
``--root`` (default: this file's checkout) with ``--python``: one driver runs both codes of a
side-by-side comparison (the client side, PlanClient and the wire, from this checkout). Then:

1. up: the first plan of POP p00 (RSS);
2. the burst: the 50 POPs' first full reports at once (``controller_scale._burst``, its probe
   through it), RSS; the daemon idle (under 0.1 core over 1 s), RSS;
3. ``--window`` s of delta reports from every POP every 2 s **with no probe**: the daemon's CPU
   share (``/proc/PID/stat``), RSS, and where the daemon samples its own lag
   (``/v1/status`` event_loop) its p50 / p99 / max over the window (its 60 s window: use
   ``--window 60``);
4. the same with **the external probe** (100 trivial requests a second), its stalls, and the
   daemon's own lag over the same window beside them (``--no-probe``: skipped);
5. ``--idle`` s with nothing sent: the daemon's CPU alone (the sampler's own cost, against a
   daemon started with ``-- --loop-lag-every 0``);
6. VmHWM (the peak RSS) at the end.

One JSON line per run appended to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import controller_scale as cs
from .report import ROOT, load_average


def _head(root: Path) -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(root), capture_output=True, text=True)
    return r.stdout.strip()


async def drive(files: int, window: float, idle: float, root: Path, python: str,
                extra: tuple[str, ...], vips: int = 10000, pops: int = 50, no_probe: bool = False) -> dict[str, Any]:
    from controller.agent.plan_client import PlanClient

    out: dict[str, Any] = {"commit": _head(root), "root": str(root), "daemon_args": list(extra), "files": files, "vips": vips, "pops": pops,
                           "load_start": load_average()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-steady-"))
    cdir, desired, names, regions = cs.committed_checkout(tmp, vips, pops, files)
    daemon = cs.Daemon(cdir, tmp, root=root, python=python, extra=extra)
    pid = daemon.proc.pid

    def rss() -> float | None:
        return cs._status_mb(pid, "VmRSS")

    clients: dict[str, PlanClient] = {}
    t0 = time.monotonic()
    try:
        clients = await cs.agents_of(daemon, desired, tmp)
        plan = await clients[cs.WATCHED_POP].fetch_plan(-1, 0)
        assert plan is not None
        out["up_s"] = round(time.monotonic() - t0, 1)
        out["rss_mb_up"] = rss()
        b = await cs._burst(daemon, clients, names, regions, plan.generation, len(clients), tmp, print)
        out["burst"] = {k: b[k] for k in ("reports_all_answered_s", "reports_all_planned_s", "reports_stall_ms",
                                          "report_failures", "reports_cpu_s")}
        out["rss_mb_after_burst"] = b["rss_mb_after_reports"]
        out["hwm_mb_after_burst"] = cs._status_mb(pid, "VmHWM")
        await asyncio.sleep(3)
        out["idle_wait_s"] = await cs._until_idle(pid)
        out["rss_mb_idle"] = rss()
        out["hwm_mb_idle"] = cs._status_mb(pid, "VmHWM")

        for name, stalls in (("reports", "none"), ("probe", "probe"))[:1 if no_probe else 2]:
            s = await cs._steady_state(daemon, clients, names, regions, len(clients), print, stalls, window)
            own = cs.daemon_lag_ms(await cs._status(daemon))
            out[name] = {"cpu_fraction": s["steady_cpu_fraction"], "cpu_s": s["steady_cpu_s"],
                         "window_s": s["steady_window_s"], "failures": s["steady_report_failures"],
                         "rss_mb": s["steady_rss_mb"], "load": s["steady_load_average"],
                         "probe_ms": s["steady_stall_ms"] if stalls == "probe" else None, "daemon_lag_ms": own}
        c0, w0 = cs._cpu_s(pid), time.monotonic()
        await asyncio.sleep(idle)
        out["idle"] = {"cpu_fraction": round((cs._cpu_s(pid) - c0) / (time.monotonic() - w0), 4),
                       "cpu_s": round(cs._cpu_s(pid) - c0, 2), "window_s": idle}
        out["rss_mb_end"] = rss()
        out["peak_rss_mb"] = cs._status_mb(pid, "VmHWM")
    finally:
        await cs.end_run(clients, daemon, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.controller_steady")
    ap.add_argument("--out", required=True, help="append one JSON line of results to this file")
    ap.add_argument("--label", default="")
    ap.add_argument("--files", type=int, default=1)
    ap.add_argument("--vips", type=int, default=10000)
    ap.add_argument("--pops", type=int, default=50)
    ap.add_argument("--window", type=float, default=60.0, help="seconds of each steady window (default 60: "
                    "the daemon's /v1/status lag window)")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of the idle window")
    ap.add_argument("--no-probe", action="store_true", help="skip the window with the probe (step 4): a "
                    "shorter run, for side-by-side CPU figures under a shared bench lock")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose daemon runs (default this one)")
    ap.add_argument("--python", default=sys.executable, help="its venv's python")
    ap.add_argument("daemon_args", nargs="*", help="after --: more anycast-controller arguments")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res = {"label": args.label, "started": started,
           **asyncio.run(drive(args.files, args.window, args.idle, args.root, args.python, tuple(args.daemon_args),
                                args.vips, args.pops, args.no_probe))}
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(res) + "\n")
    r, p = res["reports"], res.get("probe")
    probed = f"probe {p['cpu_fraction']:.2%} (probe {p['probe_ms']}, own lag {p['daemon_lag_ms']}), " if p else ""
    print(f"{args.label} {res['commit']}: reports only {r['cpu_fraction']:.2%} (own lag {r['daemon_lag_ms']}), {probed}"
          f"idle {res['idle']['cpu_fraction']:.2%}; RSS up {res['rss_mb_up']} burst {res['rss_mb_after_burst']} "
          f"idle {res['rss_mb_idle']} steady {r['rss_mb']} end {res['rss_mb_end']} peak {res['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
