"""What the controller must not forget across restarts: drains, per-POP plan generations,
and the planner's memory (active origins, failback hold-downs, settle and dampening
timers: absolute times, so a restart resumes them), behind a small ``Store`` protocol.

Theory of operation (``FileJournal``, the default: one process, local disk)::

    state_dir/
      lock                    flock(LOCK_EX) while a controller runs, with its PID: a second
                              controller on the same directory refuses to start (StateDirLocked);
                              and, about once a second, when it was alive with which POPs fresh
                              and the last report number applied per POP (no fsync: a hint)
      snapshot-<seq>.json     the whole state as of journal sequence <seq>
      journal-<seq>.jsonl     the changes after that snapshot, one line each,
                              ``<crc32 hex> <json>\\n``, each line fsynced before the change counts
      desired/                the last good desired state (its YAML files and revision)

A change appends one line (a few hundred bytes for a drain or a timer), not a rewrite of the
whole state (7.9 MB at 10,000 VIPs x 50 POPs). When the journal outgrows its snapshot, a
compaction writes a new snapshot (temporary file, fsync, rename, fsync of the directory) and
starts a new journal. Two generations are kept: the previous snapshot and its journal replay
to exactly the current snapshot, so a corrupt newest snapshot loses nothing.

Loading: the newest snapshot that reads cleanly, then every journal line after it, in
sequence. A torn last line (a crash in the middle of an append: no final newline; that
change was never acknowledged) is cut off. Anything else unreadable (a corrupt snapshot,
a bad line in the middle) is a *problem*: the state is recovered from what is readable and
the problems are kept in ``Loaded.problems``, which the controller shows as an alarm. If
state files exist and no snapshot at all can be read, ``load`` raises ``StateUnreadable``
and the controller refuses to start: it cannot know which POPs were drained, and starting
empty would silently undo those drains. Agents keep their last plans meanwhile (static
stability) until an operator moves the files aside (see ops/runbooks/AnycastControllerPersistenceFailing.md).

Every write failure raises ``PersistenceError`` naming the operation, the file and the
OS error; nothing is half-applied (a failed append is truncated away on the next append).
An HA store (etcd) can implement the same protocol: ``append``'s ``expect`` is the
compare-and-set that fences a deposed writer.
"""

from __future__ import annotations

import concurrent.futures
import enum
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..policy.model import STEADY, PlannerState, PopVipMemory, VipMemory

log = logging.getLogger("controller.server")
LEGACY_FILENAME = "controller-state.json"  # the single file written before the journal (read once)
LOCK_FILENAME = "lock"
COMPACT_MIN_BYTES = 1 << 20  # a journal smaller than this is never compacted
_SNAPSHOT = re.compile(r"^snapshot-(\d{20})\.json$")
_JOURNAL = re.compile(r"^journal-(\d{20})\.jsonl$")


class StoreOp(enum.StrEnum):
    """What failed (the ``operation`` label of anycast_controller_persistence_errors_total)."""

    LOAD = "load"  # reading the state at start (a problem recovered from, or nothing readable)
    APPEND = "append"  # journaling a change
    COMPACT = "compact"  # writing a new snapshot
    DESIRED = "desired"  # keeping the last good desired state


class PersistenceError(Exception):
    """A write (or read) of the state failed; nothing of it counts."""

    def __init__(self, op: StoreOp, path: str, reason: str) -> None:
        super().__init__(f"{op} {path}: {reason}")
        self.op, self.path, self.reason = op, path, reason


class StateDirLocked(Exception):
    """Another controller holds the state directory."""


class StateUnreadable(Exception):
    """State files exist but none can be read: starting empty would forget drains."""

    def __init__(self, state_dir: str, problems: tuple[str, ...]) -> None:
        super().__init__(f"no readable controller state in {state_dir}: " + "; ".join(problems)
                         + " (refusing to start with empty state: drains would be forgotten; "
                         "see ops/runbooks/AnycastControllerPersistenceFailing.md)")
        self.problems = problems


class Conflict(Exception):
    """``append`` was given a sequence that is not the store's (another writer was here)."""


@dataclass(frozen=True)
class Dial:
    """An operator's traffic dial on an origin region (``anycastctl dial``): who, why, when."""

    pct: int  # 0-100
    by: str
    why: str
    at: float


@dataclass
class Persisted:
    drains: dict[str, float] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    planner: PlannerState = field(default_factory=PlannerState.initial)
    rollout: Mapping[str, Any] | None = None  # the config change's state (policy/change.py to_json); None: none yet
    dials: dict[str, Dial] = field(default_factory=dict)  # region -> the operator's dial (over the config's)

    def copy(self) -> Persisted:
        """A copy whose dicts the caller may change. The planner's maps are shared, not copied:
        the controller's are read-only views over the engine's current memory (no snapshot)."""
        return Persisted(dict(self.drains), dict(self.generations), self.planner, self.rollout, dict(self.dials))


@dataclass(frozen=True)
class Changes:
    """What differs between two states, key by key; None: the key is gone."""

    drains: Mapping[str, float | None] = field(default_factory=dict)
    generations: Mapping[str, int] = field(default_factory=dict)
    vips: Mapping[str, VipMemory | None] = field(default_factory=dict)
    pop_vips: Mapping[tuple[str, str], PopVipMemory | None] = field(default_factory=dict)
    rollout: Mapping[str, Any] | None = None  # the config change's new state (None: unchanged)
    dials: Mapping[str, Dial | None] = field(default_factory=dict)
    # VIP -> (its memory at each of these POPs, the POPs): a VIP's memory at many POPs at once
    # (its default: a cold start's first passes move 30 million pairs from nothing to NEW, then
    # to STEADY, at 100,000 VIPs x 300 POPs), applied before ``pop_vips``, which then holds the
    # exceptions (the POPs with a memory of their own, the POPs it left). A tuple of POPs is
    # shared by the VIPs that have the same one (the journal lists it once per group).
    pop_defaults: Mapping[str, tuple[PopVipMemory, tuple[str, ...]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.drains or self.generations or self.vips or self.pop_vips or self.rollout is not None
                    or self.dials or self.pop_defaults)


@dataclass(frozen=True)
class Alive:
    """When the previous controller on this state was last alive, and which POPs' reports
    it held fresh then, received when (so a quick restart can presume them: see Controller)."""

    at: float
    fresh: Mapping[str, float]
    # POP -> the ``seq`` of the last report applied: the next controller refuses reports not
    # above it, so a report captured before a restart cannot be replayed after it. Carried by
    # the hint (written about once a second and at a clean stop), never by an fsync per report:
    # after a crash, reports received since the last hint (about a second's) could replay once.
    seqs: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Loaded:
    state: Persisted
    seq: int  # the store's sequence number: the next append passes it as ``expect``
    problems: tuple[str, ...] = ()  # what could not be read (the state was recovered without it)
    previous_alive: Alive | None = None  # None: unknown (first start, or the hint was unreadable)


class Store(Protocol):
    """Where the controller's memory lives (the file journal here; etcd for HA)."""

    def load(self) -> Loaded: ...

    def start(self, state: Persisted, seq: int) -> None:
        """Be ready to append after ``load()`` (``state``, ``seq``: what it returned)."""
        ...

    def append(self, changes: Changes, expect: int) -> int:
        """Make ``changes`` durable if the store is at sequence ``expect``; the new sequence.
        Raises PersistenceError (nothing durable) or Conflict (another writer)."""
        ...

    def compact(self, state: Persisted, seq: int) -> None:
        """Fold the changes so far into one snapshot, if due. Raises PersistenceError. The
        store may write it after returning (the file journal does, in a thread): the caller
        hands over ``state`` and never changes it afterwards."""
        ...

    def mark_alive(self, at: float, fresh: Mapping[str, float], seqs: Mapping[str, int]) -> None:
        """A hint for the next start (see Alive); may be lost."""
        ...

    def keep_desired(self, revision: str, files: Mapping[str, str]) -> None:
        """Keep the desired state applied everywhere (the base a config change is judged
        against and rolled back to: policy/change.py), its YAML files by relative path.
        Raises PersistenceError. A new leader reads it with ``kept_desired``."""
        ...

    def kept_desired(self) -> tuple[str, dict[str, str]] | None:
        """(revision, files) of the desired state kept by ``keep_desired``; None if none (or
        unreadable: the caller then applies the checkout as it is, saying so)."""
        ...

    def close(self) -> None: ...


def _read_alive(fd: int) -> Alive | None:
    try:
        lines = os.pread(fd, 1 << 20, 0).decode().split("\n")
        doc = json.loads(lines[1])
        at = float(doc["alive_at"])
        seqs = alive_seqs(doc)
        return Alive(at, {str(p): float(t) for p, t in doc["fresh"].items()}, seqs) if at > 0 or seqs else None
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        return None


def alive_seqs(doc: Mapping[str, Any]) -> dict[str, int]:
    """The report numbers of an alive hint (absent in hints written before they were kept)."""
    seqs = doc.get("seqs", {})
    return {str(p): int(n) for p, n in seqs.items()} if isinstance(seqs, dict) else {}


# --- the pure part: differences and their application ---------------------------------------
def diff(old: Persisted, new: Persisted) -> Changes:
    """The changes that turn ``old`` into ``new``. Cheap when little changed: the planner hands
    back the very same memory objects for unchanged pairs, and equal maps compare in C."""
    return Changes(diff_map(old.drains, new.drains), diff_map(old.generations, new.generations),
                   diff_map(old.planner.vips, new.planner.vips), diff_map(old.planner.pop_vips, new.planner.pop_vips),
                   new.rollout if new.rollout != old.rollout else None, diff_map(old.dials, new.dials))


def diff_map(old: Mapping[Any, Any], new: Mapping[Any, Any]) -> dict[Any, Any]:
    """The entries that turn ``old`` into ``new`` (None: the key is gone)."""
    if old is new or old == new:
        return {}
    out = {k: v for k, v in new.items() if (o := old.get(k, _ABSENT)) is not v and o != v}
    out.update((k, None) for k in old if k not in new)
    return out


_ABSENT = object()


def apply(state: Persisted, c: Changes) -> Persisted:
    """``state`` with ``c`` applied (a new object; ``state`` is left as it was)."""
    drains, generations = dict(state.drains), dict(state.generations)
    _apply_map(drains, c.drains)
    generations.update(c.generations)
    vips, pop_vips = dict(state.planner.vips), dict(state.planner.pop_vips)
    _apply_map(vips, c.vips)
    _apply_defaults(pop_vips, c.pop_defaults)
    _apply_map(pop_vips, c.pop_vips)
    dials = dict(state.dials)
    _apply_map(dials, c.dials)
    return Persisted(drains, generations, PlannerState(vips, pop_vips),
                     c.rollout if c.rollout is not None else state.rollout, dials)


def _apply_defaults(pop_vips: dict[tuple[str, str], PopVipMemory],
                    defaults: Mapping[str, tuple[PopVipMemory, tuple[str, ...]]]) -> None:
    """Each VIP's memory at each of its POPs (``Changes.pop_defaults``), the pairs made in C."""
    for vip, (memory, pops) in defaults.items():
        pop_vips.update(zip(zip(pops, itertools.repeat(vip)), itertools.repeat(memory)))


def _apply_map(target: dict[Any, Any], changes: Mapping[Any, Any]) -> None:
    for k, v in changes.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = v


# --- JSON forms ------------------------------------------------------------------------------
def planner_to_json(state: PlannerState) -> dict[str, Any]:
    """Pairs in the steady state (healthy, no history: most of a large fleet) are listed by
    name under ``steady`` (POP -> VIPs), pairs with no memory at all yet (no verdict: before
    the first reports) under ``unseen``, the others in full under ``pop_vips``."""
    steady: dict[str, list[str]] = {}
    unseen: dict[str, list[str]] = {}
    others = []
    doc: dict[str, Any] = {}
    compact = getattr(state.pop_vips, "compact", None)
    pairs: Iterable[tuple[tuple[str, str], PopVipMemory]]
    if compact is not None:
        # The engine's live memory (engine._PairMemoryView): each VIP's default at its POPs
        # by group (``defaults``: the VIPs with the same default and POPs), then the POPs
        # with a memory of their own: per VIP, not per pair (30 million at 100,000 x 300).
        defaults: dict[str, tuple[PopVipMemory, tuple[str, ...]]] = {}
        lists: dict[tuple[str, ...], tuple[str, ...]] = {}
        own: list[tuple[tuple[str, str], PopVipMemory]] = []
        for vip, default, pops, pop_memory in compact():
            pops = lists.setdefault(pops, pops)
            defaults[vip] = (default, pops)
            own.extend(((pop, vip), m) for pop, m in pop_memory.items())
        doc["defaults"] = _defaults_to_json(defaults)
        pairs = own
    else:
        pairs = state.pop_vips.items()
    for (pop, vip), m in pairs:
        if m is STEADY:
            steady.setdefault(pop, []).append(vip)
        elif _is_unseen(m):
            unseen.setdefault(pop, []).append(vip)
        else:
            others.append({"pop": pop, "vip": vip, **_pop_vip_to_json(m)})
    return {"vips": {name: _vip_to_json(m) for name, m in state.vips.items()}, "steady": steady, "unseen": unseen,
            "pop_vips": others, **doc}


def _memory_json(m: PopVipMemory) -> str | dict[str, Any]:
    return "steady" if m is STEADY or m == STEADY else "unseen" if _is_unseen(m) else _pop_vip_to_json(m)


def _memory_from_json(v: Any) -> PopVipMemory:
    if v == "steady":
        return STEADY
    if v == "unseen":
        return _UNSEEN
    if not isinstance(v, dict):
        raise ValueError(f"memory {v!r}")
    return _pop_vip_from_json(v)


def _defaults_to_json(defaults: Mapping[str, tuple[PopVipMemory, tuple[str, ...]]]) -> list[dict[str, Any]]:
    """``Changes.pop_defaults`` as groups: {"memory", "pops", "vips"} per distinct (memory, POPs)."""
    groups: dict[tuple[int, int], tuple[PopVipMemory, tuple[str, ...], list[str]]] = {}
    for vip, (memory, pops) in defaults.items():
        key = (id(memory), id(pops))
        g = groups.get(key)
        if g is None:
            g = groups[key] = (memory, pops, [])
        g[2].append(vip)
    return [{"memory": _memory_json(m), "pops": list(pops), "vips": vips} for m, pops, vips in groups.values()]


def _defaults_from_json(groups: Any) -> dict[str, tuple[PopVipMemory, tuple[str, ...]]]:
    out: dict[str, tuple[PopVipMemory, tuple[str, ...]]] = {}
    if not isinstance(groups, list):
        raise ValueError("defaults: not a list")
    for g in groups:
        memory = _memory_from_json(g["memory"])
        pops = tuple(str(p) for p in g["pops"])
        for vip in g["vips"]:
            out[str(vip)] = (memory, pops)
    return out


_UNSEEN = PopVipMemory()


def _is_unseen(m: PopVipMemory) -> bool:
    """Equal to PopVipMemory() (field by field: dataclass == is ten times slower at 500,000 pairs)."""
    return (m is _UNSEEN or m.verdict is None and not m.flaps and not m.dampened_until and not m.penalty
            and not m.quiet_since and not m.withdrawn and m.down_since is None)


def planner_from_json(data: dict[str, Any]) -> PlannerState:
    """Raises KeyError/ValueError/TypeError on a malformed document."""
    vips = {name: _vip_from_json(m) for name, m in data["vips"].items()}
    pop_vips: dict[tuple[str, str], PopVipMemory] = {}
    _apply_defaults(pop_vips, _defaults_from_json(data.get("defaults", [])))  # (absent before they existed)
    pop_vips.update({(m["pop"], m["vip"]): _pop_vip_from_json(m) for m in data["pop_vips"]})
    for key, memory in (("steady", STEADY), ("unseen", _UNSEEN)):
        for pop, names in data.get(key, {}).items():  # absent in files written before they existed
            for vip in names:
                pop_vips[(str(pop), str(vip))] = memory
    return PlannerState(vips, pop_vips)


def _vip_to_json(m: VipMemory) -> dict[str, Any]:
    doc = {"active": m.active, "active_since": m.active_since, "healthy_since": dict(m.healthy_since),
           "withdrawals": list(m.withdrawals)}
    if m.routes or m.weight_out:  # traffic steering (absent from files written before it, and without it)
        doc["routes"] = {k: list(v) for k, v in m.routes.items()}
        doc["weight_out"] = sorted(m.weight_out)
    if m.down_since:  # a failover window running (absent from files written before it, and mostly)
        doc["down_since"] = dict(m.down_since)
    if m.verdicts:  # a steered VIP's verdicts per POP and origin (absent from files written before them)
        doc["verdicts"] = {pop: dict(v) for pop, v in m.verdicts.items()}
    return doc


def _vip_from_json(m: dict[str, Any]) -> VipMemory:
    return VipMemory(str(m["active"]), float(m["active_since"]),
                     {str(r): float(t) for r, t in m["healthy_since"].items()},
                     tuple(float(t) for t in m["withdrawals"]),
                     {str(k): (str(a), float(t)) for k, (a, t) in m.get("routes", {}).items()},
                     frozenset(str(r) for r in m.get("weight_out", ())),
                     {str(r): float(t) for r, t in m.get("down_since", {}).items()},
                     {str(pop): {str(r): _verdict(v) for r, v in by.items()}
                      for pop, by in m.get("verdicts", {}).items()})


def _verdict(v: Any) -> bool | None:
    if v is not True and v is not False and v is not None:
        raise ValueError(f"verdict {v!r}")
    return v


def _pop_vip_to_json(m: PopVipMemory) -> dict[str, Any]:
    return {"verdict": m.verdict, "flaps": list(m.flaps), "dampened_until": m.dampened_until, "penalty": m.penalty,
            "quiet_since": m.quiet_since, "withdrawn": m.withdrawn, "down_since": m.down_since}


def _pop_vip_from_json(m: dict[str, Any]) -> PopVipMemory:
    mem = PopVipMemory(_verdict(m["verdict"]), tuple(float(t) for t in m["flaps"]), float(m["dampened_until"]),
                       int(m["penalty"]), float(m["quiet_since"]), bool(m["withdrawn"]),
                       None if m.get("down_since") is None else float(m["down_since"]))
    return STEADY if mem == STEADY else _UNSEEN if _is_unseen(mem) else mem


def _dial_to_json(d: Dial) -> dict[str, Any]:
    return {"pct": d.pct, "by": d.by, "why": d.why, "at": d.at}


def _dial_from_json(d: dict[str, Any]) -> Dial:
    pct = int(d["pct"])
    if not 0 <= pct <= 100:
        raise ValueError(f"dial {pct}")
    return Dial(pct, str(d["by"]), str(d["why"]), float(d["at"]))


def state_to_json(p: Persisted, seq: int) -> dict[str, Any]:
    doc = {"version": 2, "seq": seq, "drains": p.drains, "generations": p.generations, **planner_to_json(p.planner),
           **({"rollout": dict(p.rollout)} if p.rollout is not None else {})}
    if p.dials:  # (absent from files written before dials, and without any)
        doc["dials"] = {r: _dial_to_json(d) for r, d in p.dials.items()}
    return doc


def state_from_json(data: dict[str, Any]) -> Persisted:
    rollout = data.get("rollout")  # absent in files written before staged rollouts
    return Persisted({str(k): float(v) for k, v in data["drains"].items()},
                     {str(k): int(v) for k, v in data["generations"].items()}, planner_from_json(data),
                     dict(rollout) if isinstance(rollout, dict) else None,
                     {str(r): _dial_from_json(d) for r, d in data.get("dials", {}).items()})


class Budget:
    """How long a slice of a sliced job (``changes_json_steps``, the controller's journal
    pre-phase) may run before its generator yields: ``due()`` once ``slice_s`` seconds have
    passed since ``start()`` (None: never). The driver calls ``start()`` before each step."""

    def __init__(self, slice_s: float | None) -> None:
        self.slice_s = slice_s
        self._end = float("inf")
        self.start()

    def start(self) -> None:
        self._end = float("inf") if self.slice_s is None else time.perf_counter() + self.slice_s

    def due(self) -> bool:
        return time.perf_counter() >= self._end


def run_steps(steps: Generator[None, None, Any]) -> Any:
    """A sliced job's generator run to its end, on this thread: its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def changes_to_json(c: Changes, seq: int) -> dict[str, Any]:
    """Pairs that became steady, unseen or were removed are listed by name (POP -> VIPs): the
    first reports after a start turn 500,000 pairs steady in one line."""
    doc: dict[str, Any] = run_steps(changes_json_steps(c, seq, Budget(None)))
    return doc


def changes_json_steps(c: Changes, seq: int, budget: Budget) -> Generator[None, None, dict[str, Any]]:
    """``changes_to_json`` in slices of ``budget`` (a generator that yields between them)."""
    grouped: dict[str, dict[str, list[str]]] = {"steady": {}, "unseen": {}, "removed": {}}
    others = []
    for i, ((pop, vip), v) in enumerate(c.pop_vips.items()):
        kind = "removed" if v is None else "steady" if v is STEADY else "unseen" if _is_unseen(v) else ""
        if kind:
            grouped[kind].setdefault(pop, []).append(vip)
        else:
            others.append([pop, vip, _pop_vip_to_json(v)])  # type: ignore[arg-type]
        if not i & 255 and budget.due():
            yield
    vips: dict[str, Any] = {}
    for i, (k, vm) in enumerate(c.vips.items()):  # (a burst's 10,000 VIPs: ~20-50 ms in one piece)
        vips[k] = None if vm is None else _vip_to_json(vm)
        if not i & 63 and budget.due():
            yield
    doc = {"seq": seq, "drains": dict(c.drains), "generations": dict(c.generations), "vips": vips,
           "pop_vips": others, **grouped, **({"rollout": dict(c.rollout)} if c.rollout is not None else {})}
    if c.pop_defaults:  # (absent from lines written before them, and without any)
        doc["defaults"] = _defaults_to_json(c.pop_defaults)
    if c.dials:
        doc["dials"] = {r: None if d is None else _dial_to_json(d) for r, d in c.dials.items()}
    return doc


def changes_from_json(data: dict[str, Any]) -> Changes:
    pop_vips: dict[tuple[str, str], PopVipMemory | None] = {
        (str(pop), str(vip)): _pop_vip_from_json(v) for pop, vip, v in data["pop_vips"]}
    for kind, memory in (("steady", STEADY), ("unseen", _UNSEEN), ("removed", None)):
        for pop, names in data[kind].items():
            for vip in names:
                pop_vips[(str(pop), str(vip))] = memory
    return Changes({str(k): None if v is None else float(v) for k, v in data["drains"].items()},
                   {str(k): int(v) for k, v in data["generations"].items()},
                   {str(k): None if v is None else _vip_from_json(v) for k, v in data["vips"].items()}, pop_vips,
                   dict(data["rollout"]) if isinstance(data.get("rollout"), dict) else None,
                   {str(r): None if d is None else _dial_from_json(d) for r, d in data.get("dials", {}).items()},
                   _defaults_from_json(data.get("defaults", [])))


def _framed(body_text: str) -> bytes:
    """A journal line: its checksum, its JSON, a newline."""
    body = body_text.encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def line_text_steps(changes: Changes, seq: int, budget: Budget) -> Generator[None, None, str]:
    """The JSON of the journal line for ``changes`` at ``seq`` (``FileStore.append_text``
    frames and writes it), in slices of ``budget``: the controller runs it on the event loop,
    a slice at a time, and only the write and its fsync in a thread (a thread that runs
    Python keeps the loop out for whole switch intervals at each of its system calls:
    results 3q, 3v)."""
    doc = yield from changes_json_steps(changes, seq, budget)
    parts: list[str] = []
    yield from _encode_steps(doc, parts, budget)
    return "".join(parts)


_CHUNK = 2048  # list elements per json.dumps call (see _dumps_compact)


def _dumps_compact(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"))``, in many small calls: the C
    encoder holds the GIL for a whole call, and the line of a burst of first reports (500,000
    pairs by name) took 50-100 ms in one, a stall of the event loop while a thread wrote it."""
    parts: list[str] = []
    run_steps(_encode_steps(value, parts, Budget(None)))
    return "".join(parts)


def _encode_steps(value: Any, parts: list[str], budget: Budget) -> Generator[None, None, None]:
    """Into ``parts``, ``value``'s JSON (``_dumps_compact``), yielding when ``budget`` is due
    between two of its json.dumps calls."""
    if isinstance(value, dict):
        if (len(value) <= _CHUNK and not any(isinstance(v, (dict, list, tuple)) for v in value.values())
                or not all(isinstance(k, str) for k in value)):  # (json's own key conversions)
            parts.append(json.dumps(value, sort_keys=True, separators=(",", ":")))
            return
        parts.append("{")
        for i, key in enumerate(sorted(value)):
            parts.append(("," if i else "") + json.dumps(key) + ":")
            yield from _encode_steps(value[key], parts, budget)
        parts.append("}")
    elif isinstance(value, (list, tuple)):
        if not any(isinstance(v, (dict, list, tuple)) for v in value):
            chunks = []
            for i in range(0, len(value), _CHUNK):
                chunks.append(json.dumps(value[i:i + _CHUNK], separators=(",", ":"))[1:-1])
                if budget.due():
                    yield
            parts.append("[" + ",".join(chunks) + "]")
            return
        parts.append("[")
        for i, v in enumerate(value):
            if i:
                parts.append(",")
            yield from _encode_steps(v, parts, budget)
        parts.append("]")
    else:
        parts.append(json.dumps(value))
    if budget.due():
        yield


def _parse_line(line: bytes) -> dict[str, Any]:
    """One journal line's document; ValueError if its checksum or JSON is wrong."""
    crc, sep, body = line.rstrip(b"\n").partition(b" ")
    if not sep or len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
        raise ValueError("checksum mismatch")
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


# --- the file journal --------------------------------------------------------------------------
Fsync = Callable[[int], None]


class FileJournal:
    """The default Store: an append-only, fsynced journal with snapshots in ``state_dir``.

    Constructing it takes the directory's lock (StateDirLocked if another process holds it);
    ``close()`` releases it. ``fsync`` is injectable so a unit test can make the disk fail.
    """

    def __init__(self, state_dir: str, *, compact_min_bytes: int = COMPACT_MIN_BYTES, fsync: Fsync = os.fsync,
                 lock: bool = True, background: bool = False) -> None:
        """``background``: a compaction writes its snapshot in a thread (the daemon: a 20 MB
        snapshot at 10,000 VIPs x 50 POPs must not stall the event loop); see compact()."""
        self.state_dir = state_dir
        self._background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="snapshot") if background else None
        # The controller may call append() from a thread of its own (one at a time, never
        # beside start(), compact() or close()): the daemon's passes journal off the event loop.
        self.threaded_append = background
        self._compacting: tuple[int, int, concurrent.futures.Future[int]] | None = None  # seq, previous, write
        self.compact_min_bytes = compact_min_bytes
        self._fsync = fsync
        self._lock_fd: int | None = None
        self._journal: int | None = None  # fd of the journal appended to
        self._journal_path = ""
        self._journal_size = 0  # bytes known good in it (a failed append is truncated back to this)
        self._base = 0  # the sequence of the snapshot the journal follows
        self._previous_base: int | None = None  # the generation kept as the previous good state
        self._snapshot_size = 0
        self._seq = 0
        self._previous_alive: Alive | None = None
        if lock:
            self._take_lock()

    def _take_lock(self) -> None:
        path = os.path.join(self.state_dir, LOCK_FILENAME)
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                # A read-only state directory still locks (flock needs no write access): the
                # controller starts on what is there, with the alarm raised and actions refused.
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise PersistenceError(StoreOp.LOAD, self.state_dir, exc.strerror or str(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").partition("\n")[0].strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirLocked(f"state directory {self.state_dir} is in use by another controller "
                                     f"(pid {holder}); two controllers on one state directory would overwrite "
                                     "each other's drains and generations") from None
            raise PersistenceError(StoreOp.LOAD, self.state_dir, exc.strerror or str(exc)) from None
        self._previous_alive = _read_alive(fd)
        self._lock_fd = fd
        # Who holds it now, for the next one's error message; the report numbers carried
        # over, so a crash before our first hint does not forget them.
        self.mark_alive(0.0, {}, self._previous_alive.seqs if self._previous_alive else {})

    def mark_alive(self, at: float, fresh: Mapping[str, float], seqs: Mapping[str, int]) -> None:
        """Note in the lock file that this controller was alive at ``at`` holding fresh reports
        from ``fresh`` (POP -> when received; no fsync: a hint for the next start, written
        about once a second)."""
        if self._lock_fd is None:
            return
        doc = json.dumps({"alive_at": at, "fresh": dict(fresh), "seqs": dict(seqs)}, sort_keys=True,
                         separators=(",", ":"))
        body = f"{os.getpid()}\n{doc}\n".encode()
        try:  # best effort: a read-only state directory still locks
            os.pwrite(self._lock_fd, body, 0)
            os.ftruncate(self._lock_fd, len(body))
        except OSError:
            pass

    def keep_desired(self, revision: str, files: Mapping[str, str]) -> None:
        save_desired(self.state_dir, revision, files, self._fsync)

    def kept_desired(self) -> tuple[str, dict[str, str]] | None:
        kept = saved_desired(self.state_dir)
        if kept is None:
            return None
        directory, revision = kept
        files: dict[str, str] = {}
        try:
            for root, _, names in os.walk(directory):
                for n in names:
                    path = os.path.join(root, n)
                    rel = os.path.relpath(path, directory)
                    if rel != REVISION_FILE:
                        with open(path, encoding="utf-8") as f:
                            files[rel] = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            log.error("the applied desired state kept in %s is unreadable: %s", directory, exc)
            return None
        return revision, files

    def close(self) -> None:
        if self._background is not None:
            self._background.shutdown(wait=True)  # a snapshot being written is finished first
            try:
                self._reap()
            except PersistenceError as exc:
                log.error("controller state: %s (the journal still holds everything)", exc)
        for fd in (self._journal, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._journal = self._lock_fd = None

    def __del__(self) -> None:  # a dropped store frees its directory and descriptors (tests make many)
        if getattr(self, "_lock_fd", None) is not None or getattr(self, "_journal", None) is not None:
            self.close()

    def _path(self, kind: str, seq: int) -> str:
        return os.path.join(self.state_dir, f"{kind}-{seq:020d}.{'json' if kind == 'snapshot' else 'jsonl'}")

    # --- load ---------------------------------------------------------------------------------
    def load(self) -> Loaded:
        try:
            names = os.listdir(self.state_dir)
        except FileNotFoundError:
            names = []
        except OSError as exc:
            raise StateUnreadable(self.state_dir, (f"{self.state_dir}: {exc.strerror}",)) from None
        snapshots = sorted((int(m[1]) for n in names if (m := _SNAPSHOT.match(n))), reverse=True)
        journals = sorted(int(m[1]) for n in names if (m := _JOURNAL.match(n)))
        problems: list[str] = []
        state: Persisted | None = None
        seq = 0
        for s in snapshots:
            path = self._path("snapshot", s)
            try:
                with open(path, "rb") as f:
                    data = json.loads(f.read())
                if int(data["seq"]) != s:
                    raise ValueError(f"says seq {data['seq']}")
                state, seq = state_from_json(data), s
                self._snapshot_size = os.path.getsize(path)
                break
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                problems.append(f"{path}: {_why(exc)}")
        if state is None:
            legacy = os.path.join(self.state_dir, LEGACY_FILENAME)
            if LEGACY_FILENAME in names:
                try:
                    with open(legacy, "rb") as f:
                        state = state_from_json(json.loads(f.read()))
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    problems.append(f"{legacy}: {_why(exc)}")
            elif not snapshots and journals:
                problems.append(f"{self.state_dir}: journals without their snapshot")
            elif not snapshots:
                state = Persisted()  # a new state directory
            if state is None:
                raise StateUnreadable(self.state_dir, tuple(problems))
        base = seq
        # From the journal that the snapshot follows: normally journal-<base>, but the older one
        # if a compaction wrote snapshot-<base> and failed before starting its journal.
        first = max((j for j in journals if j <= base), default=None)
        for j in journals:
            if first is not None and j < first:
                continue
            state, seq = self._replay(j, state, seq, j == journals[-1], problems)
        self._base = base
        self._previous_base = base if snapshots else None
        return Loaded(state, seq, tuple(problems), self._previous_alive)

    def _replay(self, j: int, state: Persisted, seq: int, newest: bool,
                problems: list[str]) -> tuple[Persisted, int]:
        path = self._path("journal", j)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            problems.append(f"{path}: {_why(exc)}")
            return state, seq
        lines = data.split(b"\n")
        torn = lines.pop()  # after the last newline: empty, or an append cut short by a crash
        if torn:
            if newest:
                log.warning("controller state: %s ends in an unfinished append (%d bytes, never acknowledged): "
                            "ignored", path, len(torn))
            else:
                problems.append(f"{path}: unfinished line at its end in a journal that was followed by another")
        skipped = False  # a bad line's sequence is unknown: the gap after it says nothing new
        for number, line in enumerate(lines, 1):
            try:
                doc = _parse_line(line)
                entry_seq = int(doc["seq"])
                if entry_seq <= seq:
                    continue  # folded into the snapshot already
                changes = changes_from_json(doc)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                problems.append(f"{path}: line {number}: {_why(exc)}")
                skipped = True
                continue  # every entry holds absolute values: the later ones still apply
            if entry_seq != seq + 1 and not skipped:
                problems.append(f"{path}: line {number}: sequence {entry_seq} follows {seq}")
            state, seq, skipped = apply(state, changes), entry_seq, False
        return state, seq

    # --- write --------------------------------------------------------------------------------
    def append(self, changes: Changes, expect: int) -> int:
        return self.append_text(_dumps_compact(changes_to_json(changes, expect + 1)), expect)

    def append_text(self, body: str, expect: int) -> int:
        """``append``, of a line's JSON made beforehand (``line_text_steps(changes, expect + 1)``):
        framed, written and fsynced here (the controller's journal thread)."""
        if self._journal is None:
            raise PersistenceError(StoreOp.APPEND, self.state_dir, "no journal open (start() not called)")
        if expect != self._seq:
            raise Conflict(f"the store is at {self._seq}, the writer expected {expect}")
        line = _framed(body)
        try:
            if os.fstat(self._journal).st_size != self._journal_size:
                os.ftruncate(self._journal, self._journal_size)  # what a failed append left
            done = 0
            while done < len(line):  # a nearly full disk writes part of it, then fails
                n = os.pwrite(self._journal, line[done:], self._journal_size + done)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
            self._fsync(self._journal)
        except OSError as exc:
            raise PersistenceError(StoreOp.APPEND, self._journal_path, exc.strerror or str(exc)) from None
        self._journal_size += len(line)
        self._seq = expect + 1
        return self._seq

    def start(self, state: Persisted, seq: int) -> None:
        """Begin appending after ``load()``: a fresh snapshot at ``seq`` (so what was recovered
        becomes the base, and a legacy file is converted) and a new journal after it."""
        self._seq = seq
        self._snapshot(state, seq)

    def compact(self, state: Persisted, seq: int) -> None:
        self._reap()
        if self._journal_size < max(self.compact_min_bytes, self._snapshot_size):
            return
        if self._background is None:
            self._snapshot(state, seq)
            return
        if self._compacting is not None:
            return  # one snapshot at a time: the next call looks again
        # In the background: the new journal starts now (appends go there at once) and the
        # snapshot of ``state`` is written by a thread. Until that snapshot is durable the
        # previous snapshot and both journals replay to the same state (load() replays every
        # journal from the snapshot's on), so a crash meanwhile loses nothing; only then are
        # older generations pruned. The caller must not change ``state`` afterwards.
        journal = self._path("journal", seq)
        try:
            fd = self._empty_journal(journal)
        except OSError as exc:
            raise PersistenceError(StoreOp.COMPACT, journal, exc.strerror or str(exc)) from None
        if self._journal is not None:
            os.close(self._journal)
        self._journal, self._journal_path, self._journal_size = fd, journal, 0
        path, fsync, state_dir = self._path("snapshot", seq), self._fsync, self.state_dir

        def write() -> int:
            body = _dumps_sorted(state_to_json(state, seq))
            _write_atomic(path, body, fsync)
            _fsync_dir(state_dir, fsync)
            return len(body)

        self._compacting = (seq, self._base, self._background.submit(write))

    def _reap(self) -> None:
        """Take in a background snapshot that is done: it becomes the base, the generation
        before the previous one goes. PersistenceError if writing it failed (retried at the
        next compaction that is due; the journals hold everything meanwhile)."""
        if self._compacting is None or not self._compacting[2].done():
            return
        seq, previous, future = self._compacting
        self._compacting = None
        try:
            size = future.result()
        except OSError as exc:
            raise PersistenceError(StoreOp.COMPACT, self._path("snapshot", seq), exc.strerror or str(exc)) from None
        self._snapshot_size, self._base, self._previous_base = size, seq, previous
        self._prune(previous)

    def _snapshot(self, state: Persisted, seq: int) -> None:
        path = self._path("snapshot", seq)
        journal = self._path("journal", seq)
        try:
            if seq != self._base or not os.path.exists(path):
                body = json.dumps(state_to_json(state, seq), sort_keys=True).encode()
                _write_atomic(path, body, self._fsync)
                self._snapshot_size = len(body)
            # Nothing in a journal named after ``seq`` counts (entries follow their snapshot; at
            # start, load() applied none of it if the store is still at its base): start it empty.
            fd = self._empty_journal(journal)
            size = 0
        except OSError as exc:
            raise PersistenceError(StoreOp.COMPACT, path, exc.strerror or str(exc)) from None
        if self._journal is not None:
            os.close(self._journal)
        previous = self._base if seq != self._base else self._previous_base
        self._journal, self._journal_path, self._journal_size, self._base = fd, journal, size, seq
        self._previous_base = previous
        self._prune(previous if previous is not None else seq)

    def _empty_journal(self, journal: str) -> int:
        """``journal`` created (or emptied), durable, open for appending; raises OSError."""
        fd = os.open(journal, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, 0)
            self._fsync(fd)
            _fsync_dir(self.state_dir, self._fsync)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _prune(self, keep_from: int) -> None:
        """Remove generations older than the previous good one (best effort)."""
        for name in os.listdir(self.state_dir):
            m = _SNAPSHOT.match(name) or _JOURNAL.match(name)
            if m and int(m[1]) < keep_from:
                try:
                    os.unlink(os.path.join(self.state_dir, name))
                except OSError as exc:
                    log.warning("cannot remove old controller state %s: %s", name, exc.strerror)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return str(exc) or type(exc).__name__


def _dumps_sorted(doc: Mapping[str, Any]) -> bytes:
    """``json.dumps(doc, sort_keys=True)``, one top-level entry's member at a time: the C
    encoder holds the GIL for a whole call, so one call over a 20 MB document would stall the
    event loop as much as writing it there; many small calls let the loop's thread in."""
    parts: list[str] = []
    for key in sorted(doc):
        value = doc[key]
        if isinstance(value, dict):
            inner = ", ".join(f"{json.dumps(k)}: {json.dumps(value[k], sort_keys=True)}" for k in sorted(value))
            text = "{" + inner + "}"
        elif isinstance(value, list):
            text = "[" + ", ".join(json.dumps(v, sort_keys=True) for v in value) + "]"
        else:
            text = json.dumps(value, sort_keys=True)
        parts.append(f"{json.dumps(key)}: {text}")
    return ("{" + ", ".join(parts) + "}").encode()


def _write_atomic(path: str, body: bytes, fsync: Fsync) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        fsync(fd)
    except OSError:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(directory: str, fsync: Fsync) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def load(state_dir: str) -> Persisted:
    """The state in ``state_dir`` as a controller would start on it (read only, no lock)."""
    return FileJournal(state_dir, lock=False).load().state


# --- the last good desired state -----------------------------------------------------------------
DESIRED_DIR = "desired"
REVISION_FILE = "REVISION"


def save_desired(state_dir: str, revision: str, files: Mapping[str, str], fsync: Fsync = os.fsync) -> None:
    """Keep ``files`` (relative path -> text) as the last good desired state with its revision:
    written beside, then swapped in by rename, so a crash keeps the previous one whole."""
    final = os.path.join(state_dir, DESIRED_DIR)
    tmp = f"{final}.new"
    try:
        _remove_tree(tmp)
        for rel, text in files.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_atomic(path, text.encode(), fsync)
        _write_atomic(os.path.join(tmp, REVISION_FILE), revision.encode() + b"\n", fsync)
        for d in {os.path.dirname(os.path.join(tmp, rel)) for rel in files} | {tmp}:
            _fsync_dir(d, fsync)
        old = f"{final}.old"
        _remove_tree(old)
        if os.path.isdir(final):
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(state_dir, fsync)
        _remove_tree(old)
    except OSError as exc:
        raise PersistenceError(StoreOp.DESIRED, final, exc.strerror or str(exc)) from None


def saved_desired(state_dir: str) -> tuple[str, str] | None:
    """(directory, revision) of the last good desired state kept in ``state_dir``, if any
    (the previous copy if a crash came between the two renames of save_desired)."""
    for name in (DESIRED_DIR, f"{DESIRED_DIR}.old"):
        d = os.path.join(state_dir, name)
        try:
            with open(os.path.join(d, REVISION_FILE), encoding="utf-8") as f:
                return d, f.read().strip()
        except OSError:
            continue
    return None


def _remove_tree(path: str) -> None:
    if not os.path.isdir(path):
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for n in files:
            os.unlink(os.path.join(root, n))
        for n in dirs:
            os.rmdir(os.path.join(root, n))
    os.rmdir(path)
