"""``python -m bench [failover|throughput|announce|controller|all] [--quick] [--json PATH]``

Prints a table per benchmark and writes one JSON report with the machine's description
(CPU, cores, kernel, Python, FRR and ExaBGP versions, load average before and after).
Needs root: every benchmark runs in network namespaces named ``t-bench-*``, removed at the
end (`python -m lab.cleanup --prefix t-bench-` sweeps a crashed run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import document, machine, write_json

WHICH = ("failover", "throughput", "announce", "controller")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="?", default="all", choices=(*WHICH, "all"))
    p.add_argument("--quick", action="store_true", help="a short run (few repetitions): a smoke test")
    p.add_argument("--json", type=Path, default=Path("bench-results.json"), metavar="PATH",
                   help="where to write the JSON report (default: ./bench-results.json)")
    p.add_argument("--reps", type=int, help="failover: repetitions per case (default 20, quick 3)")
    p.add_argument("--compare-interval", type=float, default=0.5,
                   help="failover: check interval for the ours-vs-ExaBGP comparison (default 0.5)")
    p.add_argument("--compare-timeout", type=float, default=0.25,
                   help="failover: check timeout for the comparison (default 0.25)")
    p.add_argument("--arms", nargs="+", default=(), metavar="LABEL",
                   help="failover: only the arms with these labels (compare, fastest, 'fastest, t<0.9i', "
                        "event-driven, controlled; default all)")
    p.add_argument("--endpoints", type=int, nargs="+", help="throughput: endpoint counts (default 100 1000 10000)")
    p.add_argument("--rows", nargs="+", default=(), metavar="KIND",
                   help="throughput: only these rows (http, tcp, tcp-minimal, http+watch, http-idle+watch ...)")
    p.add_argument("--routes", type=int, help="announce: number of /32s (default 10000, quick 1000)")
    p.add_argument("--batch", type=int, help="announce: routes per command in the batched rows (default: the agent's)")
    p.add_argument("--window", type=int, help="announce: commands in flight in the batched rows (default: the agent's)")
    p.add_argument("--styles", nargs="+", metavar="STYLE",
                   help="announce: only these rows (sequential, pipelined, batched, agent; default all)")
    p.add_argument("--vips", type=int, help="controller: number of VIPs (default 10000, quick 1000)")
    p.add_argument("--pops", type=int, help="controller: number of POPs, each VIP published at all (default 50, "
                                            "quick 10)")
    p.add_argument("--end-to-end-only", action="store_true",
                   help="controller: skip the in-process part (runs against older code, e.g. 4448db0)")
    p.add_argument("--changes", type=int, help="controller: end-to-end change repetitions (default 5, quick 2)")
    p.add_argument("--stalls", choices=("probe", "daemon", "none"), default="probe",
                   help="controller: the steady state's event-loop stalls from the external probe (100 requests/s, "
                        "~3-5 %% of a core of the daemon's), the daemon's own lag (/v1/status event_loop; a 60 s "
                        "window), or none (default probe)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    which = WHICH if args.which == "all" else (args.which,)
    if os.geteuid() != 0 and which != ("controller",):
        print("python -m bench needs root (network namespaces, FRR, ExaBGP); only `controller` does not",
              file=sys.stderr)
        return 2
    started = time.time()
    before = machine()  # load average first thing, before our own work raises it
    _log(f"machine: {json.dumps(before)}")
    results: dict[str, Any] = {}
    renders: list[str] = []
    runners: dict[str, Callable[[], tuple[dict[str, Any], str]]] = {
        "failover": lambda: _failover(args),
        "throughput": lambda: _throughput(args),
        "announce": lambda: _announce(args),
        "controller": lambda: _controller(args),
    }
    failed = False
    for name in which:
        t = time.monotonic()
        try:
            result, text = runners[name]()
        except Exception as exc:  # noqa: BLE001 - report the others, say what broke
            _log(f"{name} failed: {exc!r}")
            results[name] = {"error": repr(exc)}
            failed = True
            continue
        result["wall_s"] = round(time.monotonic() - t, 1)
        results[name] = result
        renders.append(text)
        print(text, flush=True)
    doc = document(results, quick=args.quick, started=started, before=before)
    write_json(args.json, doc)
    m = doc["machine"]
    print(f"machine: {m['cpu_model']}, {m['cpus']} CPUs, kernel {m['kernel']}, Python {m['python']}, "
          f"FRR {m['frr']}, ExaBGP {m['exabgp']}; load average before {m['load_average_before']}, "
          f"after {m['load_average_after']}; Python loop {m['python_loop_ms_before']} ms before, "
          f"{m['python_loop_ms_after']} ms after; total {time.time() - started:.0f}s")
    print(f"JSON report: {args.json}")
    return 1 if failed else 0


def _failover(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from . import failover

    r = failover.run(quick=args.quick, log=_log, compare_interval=args.compare_interval,
                     compare_timeout=args.compare_timeout, reps=args.reps, labels=tuple(args.arms))
    return r, failover.render(r)


def _throughput(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from . import throughput

    r = throughput.run(quick=args.quick, log=_log, endpoints=args.endpoints, only=tuple(args.rows))
    return r, throughput.render(r)


def _announce(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from . import announce_rate

    r = announce_rate.run(quick=args.quick, log=_log, routes=args.routes, batch=args.batch, window=args.window,
                          styles=args.styles or announce_rate.STYLES)
    return r, announce_rate.render(r)


def _controller(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from . import controller_scale

    controller_scale.STALLS = args.stalls
    r = controller_scale.run(quick=args.quick, log=_log, vips=args.vips, pops=args.pops, reps=args.changes,
                             inproc=not args.end_to_end_only)
    return r, controller_scale.render(r)


if __name__ == "__main__":
    sys.exit(main())
