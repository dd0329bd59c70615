import sys, time, tempfile, subprocess
from pathlib import Path
from bench.controller_scale import generate, CHANGED_VIP
from bench.commit_cpu import toggled
from controller.server import revision as rv
from controller.server.daemon import Watcher
from controller.config.desired import load_desired
files = int(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    d = Path(tmp) / "desired"; generate(d, 10000, 50, files)
    g = lambda *a: subprocess.run(["git", "-C", str(d), *a], check=True, capture_output=True)
    g("init", "-q"); g("add", "-A"); g("commit", "-qm", "x")
    w = Watcher(str(d)); w.load()
    target = next(p for p in sorted(d.rglob("*.yaml")) if f"name: {CHANGED_VIP}\n" in p.read_text())
    for i in range(6):
        target.write_text(toggled(target.read_text())); g("commit", "-qam", f"c{i}")
        t = {}
        a = time.perf_counter(); sig = w._stat_signature(); t["sig"] = time.perf_counter() - a
        a = time.perf_counter(); c = {}; fp = rv.fingerprint(str(d), c); t["fp"] = time.perf_counter() - a
        a = time.perf_counter(); r = rv.revision_started(str(d), fp, w._index_copy())(); t["git"] = time.perf_counter() - a
        w._dirty = True
        a = time.perf_counter(); new = w.reload(); t["reload"] = time.perf_counter() - a
        # load_desired alone with cache, same content
        w.cache.prefetched = c
        a = time.perf_counter(); load_desired(str(d), r, w.cache); t["load_cached_same"] = time.perf_counter() - a
        print({k: round(v * 1000, 1) for k, v in t.items()})
