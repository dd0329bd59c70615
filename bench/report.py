"""What every benchmark shares: the machine description, percentiles, tables, the JSON file."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "anycast-bench/1"


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages, rounded: how busy the machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def calibrate() -> float:
    """Milliseconds for a fixed pure-Python loop (best of 5): compares CPU speed between runs
    and machines (62 ms on the AMD EPYC VM the committed results come from)."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x = 0
        for i in range(2_000_000):
            x += i * i
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 1)


def machine() -> dict[str, Any]:
    """Everything a reader needs to judge the numbers: hardware, software, and load."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_mb": _mem_total_mb(),
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo \"$PRETTY_NAME\""]),
        "virtualization": _first_line(["systemd-detect-virt"]) if _which("systemd-detect-virt") else "unknown",
        "python": platform.python_version(),
        "frr": _first_line(["/usr/lib/frr/bgpd", "--version"]).replace("bgpd version ", ""),
        "exabgp": _version("exabgp"),
        "pyroute2": _version("pyroute2"),
        "git_revision": _first_line(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"]),
        "load_average": load_average(),
        "python_loop_ms": calibrate(),
    }


def _which(name: str) -> bool:
    return any(os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", "").split(":") if d)


# --- statistics ------------------------------------------------------------------------------
QUANTILES = (0.5, 0.9, 0.99)


def quantile(samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile: an observed value, never an interpolation (honest at n=20,
    where p99 is simply the largest sample)."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summary(samples: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """n, p50, p90, p99, max, mean of a list of seconds (or any unit), rounded."""
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "n": len(samples),
        "p50": r(quantile(samples, 0.5)),
        "p90": r(quantile(samples, 0.9)),
        "p99": r(quantile(samples, 0.99)),
        "max": r(max(samples)) if samples else None,
        "min": r(min(samples)) if samples else None,
        "mean": r(sum(samples) / len(samples)) if samples else None,
    }


# --- output ----------------------------------------------------------------------------------
def fmt(value: Any, unit: str = "") -> str:
    """A table cell: None as '-', floats to 3 significant places."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if abs(value) >= 100:
            text = f"{value:,.0f}"
        elif abs(value) >= 10:
            text = f"{value:.1f}"
        else:
            text = f"{value:.3f}"
        return text + unit
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return str(value) + unit


def table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]], notes: Sequence[str] = ()) -> str:
    """A plain-text table (cells already formatted or passed through fmt)."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in header]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    line = "  ".join("-" * w for w in widths)
    out = [title, "=" * len(title), "  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in cells]
    out += [f"  {n}" for n in notes]
    return "\n".join(out) + "\n"


def document(results: dict[str, Any], *, quick: bool, started: float, before: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: machine, load before and after, and each benchmark's results."""
    info = machine()
    info["load_average_before"] = before["load_average"]
    info["python_loop_ms_before"] = before["python_loop_ms"]
    info["load_average_after"] = info.pop("load_average")
    info["python_loop_ms_after"] = info.pop("python_loop_ms")
    return {
        "schema": SCHEMA,
        "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": info,
        "benchmarks": results,
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
