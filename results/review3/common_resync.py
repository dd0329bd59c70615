"""_CommonVerdicts, all chunks in order, at 50,000 VIPs x 100 reports: every report in the first
one's order, and one report with one VIP out of order (two neighbours swapped near the start; one
VIP moved to the end; one VIP missing) in the first report (whose order the others are read by: so
every other report is out of order there). On main's code each such report was read by name from
that chunk on, for the rest of the pass. Run from the tree measured: python results/review3/common_resync.py"""
import sys
import time

sys.path.insert(0, ".")  # (the tree measured)
from controller.policy.planner import _CommonVerdicts  # noqa: E402

VIPS, REPORTS = 50_000, 100
REPEAT = 3
names = [f"v{i:06d}" for i in range(VIPS)]
up = {"us-west": True}


def case(kind: str) -> tuple[dict[str, object], ...]:
    first = dict.fromkeys(names, up)
    origins = [dict(first) for _ in range(REPORTS)]
    odd = list(names)
    if kind == "swapped":
        odd[10], odd[11] = odd[11], odd[10]
    elif kind == "moved to the end":
        odd.append(odd.pop(10))
    elif kind == "missing":
        del odd[10]
    if kind != "in order":
        origins[0] = dict.fromkeys(odd, up)  # (the first report's order is the one read by: all others differ)
    return tuple(origins)


for kind in ("in order", "swapped", "moved to the end", "missing"):
    origins = case(kind)
    best = []
    for _ in range(REPEAT):
        c = _CommonVerdicts(origins)  # type: ignore[arg-type]
        t = time.perf_counter()
        asked = list(origins[0])  # (each chunk of the first report's order, as a pass asks)
        for i in range(0, len(asked), _CommonVerdicts.STEP):
            c.get(asked[i])
        best.append(time.perf_counter() - t)
        common = len(c.out)
    print(f"{VIPS} VIPs x {REPORTS} reports, {kind}: all chunks {min(best) * 1000:.0f} ms "
          f"(of {REPEAT}: {', '.join(f'{b * 1000:.0f}' for b in best)}); {common} common")
