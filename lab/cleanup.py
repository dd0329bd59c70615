"""Sweep what crashed lab runs left behind: `python -m lab.cleanup [--prefix P] [--force]`.

Works from two sources, so it also cleans a run that died halfway through set-up:
- the state files in STATE_DIR (one per namespace, with the PIDs the harness started);
- `ip netns list`, for namespaces whose name starts with the prefix.

Recorded PIDs are killed only if they are still the same process (start time and
command line match), since a PID may have been reused. Other processes are killed only
if they are inside one of the swept namespaces. Nothing is ever killed by name.
A namespace whose owning process (the test run that made it) is still alive is left
alone unless --force: another run may be using it right now.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.netns import (
    DEFAULT_GRACE,
    DEFAULT_PREFIX,
    STATE_DIR,
    Netns,
    ProcRecord,
    is_same_process,
    list_netns,
    proc_starttime,
    teardown_all,
)


@dataclass(frozen=True)
class SweepReport:
    """What a sweep did; `problems` non-empty means something could not be removed."""

    deleted: tuple[str, ...]
    killed: tuple[int, ...]
    skipped: tuple[str, ...]
    problems: tuple[str, ...]
    workdirs: tuple[str, ...] = ()  # logs of the swept nodes, left for a post-mortem


@dataclass(frozen=True)
class _State:
    name: str
    owner_pid: int | None
    owner_starttime: int | None
    procs: tuple[ProcRecord, ...]
    notes: dict[str, str]


def _load_states(state_dir: Path, prefix: str) -> tuple[dict[str, _State], list[str]]:
    states: dict[str, _State] = {}
    problems: list[str] = []
    if not state_dir.is_dir():
        return states, problems
    for path in sorted(state_dir.glob(f"{prefix}*.json")):
        try:
            raw = json.loads(path.read_text())
            owner = raw.get("owner") or {}
            states[raw["netns"]] = _State(
                name=raw["netns"],
                owner_pid=owner.get("pid"),
                owner_starttime=owner.get("starttime"),
                procs=tuple(ProcRecord.from_json(p) for p in raw.get("procs", [])),
                notes={str(k): str(v) for k, v in (raw.get("notes") or {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A torn file cannot name PIDs; the namespace itself is still swept by name.
            problems.append(f"unreadable state file {path}: {exc}")
    return states, problems


def _owner_alive(state: _State) -> bool:
    if state.owner_pid is None:
        return False
    return proc_starttime(state.owner_pid) == state.owner_starttime


def sweep(
    prefix: str = DEFAULT_PREFIX,
    *,
    state_dir: Path = STATE_DIR,
    force: bool = False,
    grace: float = DEFAULT_GRACE,
) -> SweepReport:
    """Remove every lab namespace, and the processes in or recorded for it, under `prefix`."""
    if not prefix:
        raise ValueError("refusing to sweep with an empty prefix")
    states, problems = _load_states(state_dir, prefix)
    names = sorted({n for n in list_netns() if n.startswith(prefix)} | set(states))
    skipped = [n for n in names if n in states and _owner_alive(states[n]) and not force]
    targets = [n for n in names if n not in skipped]

    nodes = [
        Netns(n, state_dir=state_dir, records=states[n].procs, notes=states[n].notes)
        if n in states
        else Netns(n, state_dir=state_dir)
        for n in targets
    ]
    existed = [ns.name for ns in nodes if ns.exists()]
    killed = [r.pid for ns in nodes for r in ns.records if is_same_process(r)]
    killed += [pid for ns in nodes for pid in ns.pids() if pid not in killed]
    problems += teardown_all(nodes, grace)
    deleted = [n for n in existed if n not in list_netns()]
    workdirs = sorted(
        {d for n in targets if n in states for k, d in states[n].notes.items() if k.endswith("workdir") and Path(d).exists()}
    )
    return SweepReport(tuple(deleted), tuple(killed), tuple(skipped), tuple(problems), tuple(workdirs))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit status 1 if anything could not be removed."""
    parser = argparse.ArgumentParser(prog="python -m lab.cleanup", description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"namespace prefix (default {DEFAULT_PREFIX})")
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    parser.add_argument("--force", action="store_true", help="also sweep namespaces whose owner is alive")
    args = parser.parse_args(argv)
    if not args.prefix:
        parser.error("--prefix must not be empty: that would sweep every namespace")
    report = sweep(args.prefix, state_dir=args.state_dir, force=args.force)
    for name in report.deleted:
        print(f"deleted namespace {name}")
    if report.killed:
        print(f"killed PIDs {', '.join(map(str, report.killed))}")
    for name in report.skipped:
        print(f"skipped {name}: its owner process is alive (use --force)")
    for workdir in report.workdirs:
        print(f"left work files (logs) in {workdir}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    if not (report.deleted or report.killed or report.skipped or report.problems):
        print(f"nothing to clean for prefix {args.prefix!r}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
