"""The daemon's desired-state load at start (Watcher.load: every file read and hashed, git's
revision, load_desired with the daemon's LoadCache) of 100,000 VIPs x 300 POPs in 100 files:
the part of the cold path section 3p's cold_path_cpu_s leaves out. Each run in a fresh
process: CPU s, wall s and peak RSS (ru_maxrss) of that process.

    python -m bench.desired_parse [--vips N] [--pops N] [--files N] [--runs N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time, gc
gc.set_threshold(100_000, 50, 100)  # as the daemon runs
from controller.server.daemon import Watcher
from controller.server import revision as rv
d = sys.argv[1]
w = Watcher(d)
t, c = time.perf_counter(), time.process_time()
fp = rv.fingerprint(d, {})
t_fp, c_fp = time.perf_counter() - t, time.process_time() - c
w2 = Watcher(d)
t, c = time.perf_counter(), time.process_time()
desired = w2.load()
wall, cpu = time.perf_counter() - t, time.process_time() - c
ch = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"load_wall_s": round(wall, 2), "load_cpu_s": round(cpu, 2),
                  "fingerprint_wall_s": round(t_fp, 2), "fingerprint_cpu_s": round(c_fp, 2),
                  "git_children_cpu_s": round(ch.ru_utime + ch.ru_stime, 2),
                  "vips": len(desired.vips), "pops": len(desired.pops), "revision": desired.revision,
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vips", type=int, default=100_000)
    p.add_argument("--pops", type=int, default=300)
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="reuse a generated directory")
    p.add_argument("--python", default=sys.executable, help="the interpreter (another checkout's venv)")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose controller is measured")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    from bench.controller_scale import generate
    d = a.dir
    if d is None:
        d = Path(tempfile.mkdtemp(prefix="desired-parse-"))
    if not (d / "pops.yaml").exists():
        generate(d, a.vips, a.pops, a.files)
        for args in (("init", "-q"), ("add", "-A"), ("-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "x")):
            subprocess.run(["git", "-C", str(d), *args], check=True)
    size = sum(f.stat().st_size for f in d.rglob("*.yaml"))
    runs = []
    for _ in range(a.runs):
        r = subprocess.run([a.python, "-c", CHILD, str(d)], capture_output=True, text=True, cwd=a.root,
                           env={**os.environ, "PYTHONPATH": str(a.root)})
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        runs[-1]["load_average"] = os.getloadavg()
        print(json.dumps(runs[-1]), flush=True)
    out = {"vips": a.vips, "pops": a.pops, "files": a.files, "yaml_mb": round(size / 2**20, 1),
           "root": str(a.root), "dir": str(d), "runs": runs, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
