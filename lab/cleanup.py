"""Sweep what crashed lab runs left behind: `python -m lab.cleanup [--prefix P] [--force]`.

Works from three sources, so it also cleans a run that died halfway through set-up:
- the node state files in STATE_DIR (one per node: its init, the PIDs the harness started);
- the lab records in STATE_DIR/labs/ (one per Lab: its namespace prefix);
- `ip netns list`, for namespaces whose name starts with a recorded prefix (or --prefix).

Without --prefix it sweeps everything the state dir records, whatever the prefix
(`lab up`'s `lab-`, the tests' `t-...-`, the demo's `acl-demo-`, benchmarks' `t-bench-`). Recorded PIDs are killed only if they are still the same
process (start time and command line match), since a PID may have been reused; killing a
node's init ends every process in the node. Other processes are killed only if they are
inside one of the swept namespaces. Nothing is ever killed by name. A node whose owning
process (the run that made it) is still alive is left alone unless --force: another run
may be using it right now.
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
    INIT_EXIT_WAIT,
    STATE_DIR,
    Netns,
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
class _Owned:
    node: Netns
    owner_pid: int | None
    owner_starttime: int | None


def _owner(raw: dict[str, object]) -> tuple[int | None, int | None]:
    owner = raw.get("owner") or {}
    if not isinstance(owner, dict):
        return None, None
    pid, start = owner.get("pid"), owner.get("starttime")
    return (pid if isinstance(pid, int) else None), (start if isinstance(start, int) else None)


def _load_nodes(state_dir: Path, prefix: str) -> tuple[dict[str, _Owned], list[str]]:
    nodes: dict[str, _Owned] = {}
    problems: list[str] = []
    if not state_dir.is_dir():
        return nodes, problems
    for path in sorted(state_dir.glob(f"{prefix}*.json")):
        try:
            raw = json.loads(path.read_text())
            node = Netns.from_state(raw, state_dir)
            nodes[node.name] = _Owned(node, *_owner(raw))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A torn file cannot name PIDs; the namespace itself is still swept by name.
            problems.append(f"unreadable state file {path}: {exc}")
    return nodes, problems


def _load_labs(state_dir: Path, prefix: str) -> dict[str, tuple[Path, int | None, int | None]]:
    """Recorded lab prefixes under `prefix`: prefix -> (record file, owner pid, owner start)."""
    labs = {}
    for path in sorted((state_dir / "labs").glob(f"{prefix}*.json")) if (state_dir / "labs").is_dir() else []:
        try:
            raw = json.loads(path.read_text())
            labs[str(raw["prefix"])] = (path, *_owner(raw))
        except (OSError, ValueError, KeyError, TypeError):
            labs[path.name[: -len(".json")]] = (path, None, None)
    return labs


def _alive(pid: int | None, starttime: int | None) -> bool:
    return pid is not None and proc_starttime(pid) == starttime


def sweep(
    prefix: str | None = None,
    *,
    state_dir: Path = STATE_DIR,
    force: bool = False,
    grace: float = DEFAULT_GRACE,
) -> SweepReport:
    """Remove every lab node under `prefix` (None: all the state dir records), processes and all."""
    if prefix == "":
        raise ValueError("refusing to sweep with an empty prefix (None sweeps what the state dir records)")
    scope = prefix or ""
    states, problems = _load_nodes(state_dir, scope)
    labs = _load_labs(state_dir, scope)
    # With --prefix, that prefix; without, only the prefixes labs recorded: a namespace
    # no lab claims is not ours to judge.
    prefixes = set(labs) | ({prefix} if prefix else set())
    names = sorted({n for n in list_netns() if any(n.startswith(p) for p in prefixes)} | set(states))

    # A node writes its state file before `ip netns add`: a namespace without one was
    # left by a crash (or made by hand under a lab's prefix), whoever owns the prefix.
    skipped = [n for n in names if n in states and _alive(states[n].owner_pid, states[n].owner_starttime)
               and not force]
    targets = [n for n in names if n not in skipped]

    nodes = [states[n].node if n in states else Netns(n, state_dir=state_dir) for n in targets]
    existed = [ns.name for ns in nodes if ns.exists()]
    killed = [r.pid for ns in nodes for r in (*ns.records, *ns.node_records) if is_same_process(r)]
    killed += [pid for ns in nodes for pid in ns.pids() if pid not in killed]
    problems += teardown_all(nodes, grace, INIT_EXIT_WAIT)
    deleted = [n for n in existed if n not in list_netns()]
    # A lab's record goes once none of its nodes is left and its owner is gone (or forced).
    left = set(list_netns())
    if state_dir.is_dir():
        left |= {p.stem for p in state_dir.glob("*.json")}
    for lab_prefix, (path, pid, start) in labs.items():
        if (force or not _alive(pid, start)) and not any(n.startswith(lab_prefix) for n in left):
            path.unlink(missing_ok=True)
    workdirs = sorted({d for n in targets if n in states for k, d in states[n].node._notes.items()
                       if k.endswith("workdir") and Path(d).exists()})
    return SweepReport(tuple(deleted), tuple(killed), tuple(skipped), tuple(problems), tuple(workdirs))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit status 1 if anything could not be removed."""
    parser = argparse.ArgumentParser(prog="python -m lab.cleanup", description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default=None,
                        help="only namespaces with this prefix, recorded or not (default: every lab and "
                             f"node the state dir records; the harness's default prefix is {DEFAULT_PREFIX})")
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    parser.add_argument("--force", action="store_true", help="also sweep nodes whose owner is alive")
    args = parser.parse_args(argv)
    if args.prefix == "":
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
        print("nothing to clean" + (f" for prefix {args.prefix!r}" if args.prefix else ""))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
