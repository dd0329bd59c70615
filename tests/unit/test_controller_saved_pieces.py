"""A journal write's end lets go of the records it replaced in pieces (issue 10 item 2, results
3aj): after a burst's write, ``_DurableMemory.saved`` freed 10,000 old records (each VIP's memory,
default and POPs' own) in the one step of the event loop that took the write in. Now they are
handed to a task that drops them SLICE_S at a time; what the store holds as last written, what
the next write compares against and what a restart reads are the same as when freed at once.
Ordering and content assertions only (SLICE_S 0)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controller.policy.model import PopReport
from controller.server import core, store
from controller.server.core import Controller
from tests.helpers.sliced_fleet import POPS, VIPS
from tests.helpers.sliced_fleet import desired as _desired
from tests.helpers.sliced_fleet import report as _report


def _down_report(pop: str, at: float, down: bool) -> PopReport:
    """Every VIP's us-west down (or up again): a report that changes every VIP."""
    return PopReport(pop, at, 1, {f"v{i:04d}": {"us-west": not down, "eu-central": True} for i in range(VIPS)})


def _as_written(ctl: Controller) -> dict[str, tuple[Any, ...]]:
    return {n: (w.memory, w.default, dict(w.pop_memory), w.pops) for n, w in ctl._held._written.items()}


def _run(state_dir: Path, monkeypatch: pytest.MonkeyPatch, handed_over: bool,
         rounds: int = 3) -> tuple[Controller, list[list[Any]], list[int], list[dict[str, Any]]]:
    """A controller on the sliced fleet, planned once, then ``rounds`` bursts of reports that
    change every VIP, each journaled; the records each write's end handed over (``_let_go``'s
    lists of _Written or loaded memories) and how many turns each took to let go of."""
    now = [100.0]
    ctl = Controller(_desired(state_dir), clock=lambda: now[0])
    monkeypatch.setattr(ctl, "_schedule", lambda wake_at, now: None)  # (no wall-clock timers)
    if not handed_over:
        monkeypatch.setattr(ctl, "_retired_records", lambda: None)
    given: list[list[Any]] = []
    pieces: list[int] = []
    olds: list[dict[str, Any]] = []  # per write's end: the records it replaced, as held before it
    real = core._let_go
    real_saved = core._DurableMemory.saved

    def saved(self: core._DurableMemory, records: Any, retired: Any = None) -> None:
        held = self._written
        olds.append({n: held[n] for n in [*records.kept, *records.gone] if n in held})
        real_saved(self, records, retired)

    monkeypatch.setattr(core._DurableMemory, "saved", saved)

    def spy(retired: list[Any]) -> Any:
        records = bool(retired) and not isinstance(retired[0], core.VipPlan)
        if records:
            given.append(list(retired))
            pieces.append(0)
        for _ in real(retired):
            if records:
                pieces[-1] += 1
            yield

    monkeypatch.setattr(core, "_let_go", spy)

    async def scenario() -> None:
        for r in range(rounds):
            now[0] += 10.0
            for p in POPS:
                ctl.accept_report(_down_report(p, now[0], r % 2 == 1) if r else _report(p, now[0]))
            while (driver := ctl.planning()) is None or not driver.done():
                await asyncio.sleep(0)
            for p in POPS:
                await asyncio.wait_for(ctl.durable_plan(p), 60)
            while ctl._writing is not None:  # (a pass that changed memory only: no generation waits)
                await asyncio.sleep(0.001)
            while ctl._letting_go is not None:
                await asyncio.sleep(0)

    asyncio.run(scenario())
    return ctl, given, pieces, olds


def test_a_writes_end_hands_over_the_records_it_replaced_and_they_are_let_go_of_in_pieces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "SLICE_S", 0.0)
    ctl, given, pieces, olds = _run(tmp_path / "state", monkeypatch, True)
    # Every write's end that replaced records handed over the very objects it replaced (those
    # held just before it), each burst's (every VIP's) let go of in several turns.
    replaced = [old for old in olds if old]
    assert len(replaced) == len(given) >= 3 and sum(len(old) == VIPS for old in replaced) >= 3
    for old, handed, turns in zip(replaced, given, pieces):
        assert sorted(map(id, handed)) == sorted(id(w) for w in old.values())
        assert turns >= len(old) // 256 - 1
    ctl.close()
    back = store.load(str(tmp_path / "state"))
    assert back.planner == ctl.persisted.planner and back.generations == ctl.persisted.generations


def test_records_let_go_of_in_pieces_leave_what_freeing_them_at_once_leaves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bursts, the old records freed at once (no task): the same memory held as last
    written, the same state read back after a restart, the same in-memory planner state."""
    monkeypatch.setattr(core, "SLICE_S", 0.0)
    a, given_a, _, _ = _run(tmp_path / "a", monkeypatch, True, rounds=4)
    with monkeypatch.context() as m:
        b, given_b, _, _ = _run(tmp_path / "b", m, False, rounds=4)
    assert given_a and not given_b  # (freed at once: nothing handed to a task)
    assert _as_written(a) == _as_written(b)
    assert a.persisted.planner == b.persisted.planner
    a.close()
    b.close()
    back_a, back_b = store.load(str(tmp_path / "a")), store.load(str(tmp_path / "b"))
    assert back_a.planner == back_b.planner == a.persisted.planner


def test_a_restart_then_bursts_read_back_what_the_controller_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a restart (the loaded memory taken in by the first write), bursts whose old
    records are let go of in pieces journal what a restart reads back as held."""
    monkeypatch.setattr(core, "SLICE_S", 0.0)
    first, _, _, _ = _run(tmp_path / "state", monkeypatch, True, rounds=2)
    first.close()
    with monkeypatch.context() as m:
        again, given, _, _ = _run(tmp_path / "state", m, True, rounds=3)
    assert given and not again._held._boot_vips and not again._held._boot_pops
    again.close()
    back = store.load(str(tmp_path / "state"))
    assert back.planner == again.persisted.planner and back.generations == again.persisted.generations
