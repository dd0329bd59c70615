"""_CommonVerdicts: each chunk's islice skips from the start of every report: O(VIPs^2/STEP x reports)."""
import sys, time
sys.path.insert(0, ".")  # (run from the tree measured)
from controller.policy.planner import _CommonVerdicts
for vips, reports in ((10_000, 50), (100_000, 50), (100_000, 300)):
    names = [f"v{i:06d}" for i in range(vips)]
    v = ("up",)
    first = dict.fromkeys(names, v)
    origins = tuple(dict(first) for _ in range(reports))
    c = _CommonVerdicts(origins)
    t = time.perf_counter()
    for i in range(0, vips, _CommonVerdicts.STEP):
        c.get(names[i])
    total = time.perf_counter() - t
    # the old one-pass version, for comparison: sequential iterators
    t = time.perf_counter()
    its = [iter(o.values()) for o in origins]
    import itertools
    for i in range(0, vips, 8192):
        rows = zip(*[list(itertools.islice(it, 8192)) for it in its])
        for r in rows: pass
    old = time.perf_counter() - t
    print(f"{vips} VIPs x {reports} reports: chunked all chunks {total*1000:.0f} ms (old one pass ~{old*1000:.0f} ms); last chunk alone:", end=" ")
    c2 = _CommonVerdicts(origins); t = time.perf_counter(); c2.get(names[-1]); print(f"{(time.perf_counter()-t)*1000:.1f} ms")
