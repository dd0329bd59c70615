"""CPU (thread time, median of 30) of one POP's full report of 10,000 VIPs x 2 origin regions
on the controller: json.loads + wire.decode_report, then policy.engine.compact_report (what
storing it costs), and the agent's encoding (encode_report + json.dumps). Run with the code to
measure importable (PYTHONPATH=<worktree>); prints one JSON line. Used for results 3j."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time
from typing import Any, Callable

from controller import wire
from controller.policy.engine import compact_report
from controller.policy.model import PopReport

REGIONS = ("us-west", "us-east", "eu-central", "eu-west", "ap-south")
NAMES = [sys.intern(f"vip-{i:05d}") for i in range(10_000)]
_SETS: dict[frozenset[str], frozenset[str]] = {}
PUBLISHED = {n: _SETS.setdefault(s := frozenset((REGIONS[i % 5], REGIONS[(i + 1) % 5])), s) for i, n in enumerate(NAMES)}


def report(pop: int) -> wire.WireReport:
    """All healthy, except that this POP sees the primary of 2 VIPs in 10,000 down (as the
    bench's --distinct burst): no two POPs' reports are equal."""
    origins = {n: {r: not (i % 100 == 0 and (i // 100) % 50 == pop and j == 0)
                   for j, r in enumerate((REGIONS[i % 5], REGIONS[(i + 1) % 5]))} for i, n in enumerate(NAMES)}
    return wire.WireReport(1, origins, dict.fromkeys(NAMES, True), 1)


def cpu_ms(f: Callable[[], Any], n: int = 30) -> float:
    times = []
    for _ in range(n):
        t = time.thread_time()
        f()
        times.append(time.thread_time() - t)
    return round(sorted(times)[n // 2] * 1000, 2)


def main() -> None:
    compact_ok = "compact" in inspect.signature(wire.encode_report).parameters
    out: dict[str, Any] = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                     text=True).stdout.strip(),
                           "load_average": open("/proc/loadavg").read().split()[:3]}
    forms = [("older", {})] + ([("compact", {"compact": True})] if compact_ok else [])
    for form, kw in forms:
        reports = [report(p) for p in range(50)]
        bodies = [json.dumps(wire.encode_report(r, **kw)).encode() for r in reports]
        k = iter(range(10**9))
        # distinct: each call decodes another POP's report (no two equal); same: one POP's again
        distinct = cpu_ms(lambda: wire.decode_report(json.loads(bodies[next(k) % 50]), PUBLISHED))
        same = cpu_ms(lambda: wire.decode_report(json.loads(bodies[0]), PUBLISHED))
        decoded = [wire.decode_report(json.loads(b), PUBLISHED) for b in bodies]
        j = iter(range(10**9))
        store = cpu_ms(lambda: compact_report(PopReport("p", 0.0, 1, (d := decoded[next(j) % 50]).origins,
                                                        d.announced), None))
        encode = cpu_ms(lambda: json.dumps(wire.encode_report(reports[0], **kw)))
        out[form] = {"body_bytes": len(bodies[0]), "decode_ms_distinct": distinct, "decode_ms_same": same,
                     "compact_report_ms": store, "agent_encode_ms": encode}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
