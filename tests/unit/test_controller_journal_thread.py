"""The daemon's journal writes off the event loop (issue 10's stalls): a pass's comparison,
JSON and fsync run in a thread, one write at a time, and a plan's answer still leaves only
once its generation is durable; a compaction's snapshot is written in another thread while
passes go on; a full disk raises the alarm and loses nothing; a crash at any of these
moments reads back a state that was acknowledged. Faults and crashes are injected through
fsync (a gate that holds a thread) and by reading the state directory as a restart would
while a write is held."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.server import core, store
from controller.server.core import RETRY, Controller
from tests.helpers.controller_state import controller, report, reports
from tests.helpers.waiting import check, until


class GatedDisk:
    """fsync that holds the threads whose name starts with ``hold`` while ``gate`` is clear
    (``held`` says one is waiting there), and fails with ``broken`` (an errno) when set."""

    def __init__(self, hold: str) -> None:
        self.hold = hold
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self.broken: int | None = None

    def __call__(self, fd: int) -> None:
        if threading.current_thread().name.startswith(self.hold):
            if not self.gate.is_set():
                self.held.set()
                assert self.gate.wait(120), "a test left a write held"
            if self.broken is not None:
                raise OSError(self.broken, os.strerror(self.broken))
        os.fsync(fd)


def restart_reads(state_dir: Path, copy: Path) -> store.Loaded:
    """What a controller started after a crash *now* would read (a copy of the directory, so
    the running controller's lock and files are left alone)."""
    shutil.copytree(state_dir, copy, ignore=shutil.ignore_patterns("lock"))
    return store.FileJournal(str(copy), lock=False).load()


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0.01)


def _gated(tmp_path: Path) -> tuple[Controller, GatedDisk, list[float]]:
    """The daemon's journal (writes in a thread) behind a gated fsync; planned once."""
    disk = GatedDisk("journal")
    now = [10.0]
    ctl = controller(tmp_path, now, state_store=store.FileJournal(str(tmp_path), fsync=disk, background=True))
    reports(ctl, True, now[0])
    return ctl, disk, now


def test_a_long_poll_answers_only_once_the_generation_it_carries_is_durable(tmp_path: Path) -> None:
    disk = GatedDisk("journal")
    now = [10.0]
    ctl = controller(tmp_path / "state", now,
                     state_store=store.FileJournal(str(tmp_path / "state"), fsync=disk, background=True))
    reports(ctl, True, now[0])  # (no event loop: written at once, as before)
    before = ctl.served["sin"].generation
    assert store.load(str(tmp_path / "state")).generations["sin"] == before

    async def scenario() -> None:
        poll = asyncio.ensure_future(ctl.wait_for_change("sin", before, 60))
        await turns(2)
        disk.gate.clear()  # the pass's journal write will wait in its thread
        now[0] = 11.0
        reports(ctl, False, now[0])  # us-west down everywhere: new plans at every POP
        assert ctl.served["sin"].generation > before  # served in memory...
        await until(disk.held.is_set, "the journal write is held in its thread")
        await turns()  # the event loop runs meanwhile (the probe a stall would delay)
        assert not poll.done()  # ...but the answer has not left
        crashed = restart_reads(tmp_path / "state", tmp_path / "crash")
        # A restart now numbers from the durable generation: the one in flight was never
        # answered, so no agent holds it with the old contents.
        assert crashed.state.generations["sin"] == before and crashed.problems == ()
        disk.gate.set()
        await asyncio.wait_for(poll, 60)
        assert ctl.served["sin"].generation in {ctl._durable.generations["sin"]}  # answered once durable

    check(scenario)
    ctl.close()
    back = store.load(str(tmp_path / "state"))
    assert back.generations == ctl.persisted.generations and back.planner == ctl.persisted.planner


def test_a_full_disk_in_the_write_thread_raises_the_alarm_serves_on_and_loses_nothing(tmp_path: Path) -> None:
    ctl, disk, now = _gated(tmp_path)
    before = ctl.served["sin"].generation

    async def scenario() -> None:
        disk.broken = errno.ENOSPC
        poll = asyncio.ensure_future(ctl.wait_for_change("sin", before, 60))
        now[0] = 11.0
        reports(ctl, False, now[0])
        await until(lambda: not ctl.persistence.ok, "the failed write raised the alarm")
        assert "No space left on device" in (ctl.persistence.last_error or "")
        assert ctl.persistence.errors[store.StoreOp.APPEND] == 1
        # While the state cannot be written, plans are served anyway (static stability: the
        # alarm says why), as when the write held the event loop.
        await asyncio.wait_for(poll, 60)
        assert store.load(str(tmp_path)).generations["sin"] == before  # nothing of it counted
        disk.broken = None
        now[0] = 11.0 + RETRY
        reports(ctl, False, now[0])  # the retry writes the difference from what the journal holds
        await until(lambda: ctl.persistence.ok and ctl._writing is None, "the retry was written")

    check(scenario)
    ctl.close()
    back = store.load(str(tmp_path))
    assert back.generations == ctl.persisted.generations and back.generations["sin"] > before
    assert back.planner == ctl.persisted.planner  # the failed pass's memory too


def _compacting_controller(state_dir: Path, now: list[float]) -> tuple[Controller, GatedDisk]:
    """A controller whose every journal write is followed by a compaction, its snapshots'
    fsyncs gated; planned once (us-west up)."""
    disk = GatedDisk("snapshot")
    journal = store.FileJournal(str(state_dir), fsync=disk, background=True, compact_min_bytes=0)
    ctl = controller(state_dir, now, state_store=journal)
    reports(ctl, True, now[0])
    if journal._compacting is not None:  # (its snapshot written before a test gates the next)
        journal._compacting[2].result(120)
    return ctl, disk


def _a_restart_reads_all(ctl: Controller, state_dir: Path, copy: Path) -> None:
    crashed = restart_reads(state_dir, copy)
    assert crashed.problems == ()
    assert crashed.state.generations == ctl.persisted.generations
    assert crashed.state.planner == ctl.persisted.planner


def test_passes_journal_on_while_a_snapshot_is_written_and_a_crash_then_loses_none_of_them(
        tmp_path: Path) -> None:
    now = [10.0]
    ctl, disk = _compacting_controller(tmp_path / "state", now)

    async def scenario() -> None:
        disk.gate.clear()  # every compaction's snapshot waits in its thread
        now[0] = 11.0
        reports(ctl, False, now[0])  # a pass: journaled, then a compaction begins
        await until(disk.held.is_set, "a snapshot is being written")
        for t, usw in ((12.0, True), (13.0, None)):  # two more passes while it is
            now[0] = t
            reports(ctl, usw, now[0])
            await until(lambda: ctl._writing is None, "the pass's journal write ended")
        assert ctl.persistence.ok
        _a_restart_reads_all(ctl, tmp_path / "state", tmp_path / "crash")
        disk.gate.set()

    check(scenario)
    ctl.close()
    back = store.load(str(tmp_path / "state"))
    assert back.generations == ctl.persisted.generations and back.planner == ctl.persisted.planner


def test_a_crash_between_a_snapshots_write_and_its_rename_reads_the_previous_generation_whole(
        tmp_path: Path) -> None:
    now = [10.0]
    ctl, disk = _compacting_controller(tmp_path / "state", now)

    async def scenario() -> None:
        disk.gate.clear()
        now[0] = 11.0
        reports(ctl, False, now[0])
        # The snapshot's body is written and being fsynced, not yet renamed into place.
        await until(disk.held.is_set, "a snapshot's temporary file is written")
        await until(lambda: ctl._writing is None, "the pass's journal write ended")
        tmp = [p.name for p in (tmp_path / "state").iterdir() if p.name.endswith(".json.tmp")]
        assert len(tmp) == 1
        _a_restart_reads_all(ctl, tmp_path / "state", tmp_path / "crash")  # (the .tmp is no snapshot: ignored)
        disk.gate.set()

    check(scenario)
    ctl.close()
    # A controller started on the crashed copy runs on what was acknowledged: its plans
    # (served anew) number above every generation the crashed one served.
    later = controller(tmp_path / "crash", now)
    assert later.persistence.ok and later.persistence.recovered == ()
    assert all(later.served[p].generation > g for p, g in ctl.persisted.generations.items())
    later.close()


def test_an_operator_action_during_a_pass_write_is_journaled_after_it_in_order(tmp_path: Path) -> None:
    ctl, disk, now = _gated(tmp_path)

    async def scenario() -> None:
        disk.gate.clear()
        now[0] = 11.0
        reports(ctl, False, now[0])
        await until(disk.held.is_set, "the pass's write is held")
        threading.Timer(0.2, disk.gate.set).start()  # (the action waits for it: the journal's order)
        assert ctl.drain("sin")  # (durable when it returns; its pass journals after it)
        await until(lambda: ctl._writing is None, "the drain's pass was written")
        assert ctl.persistence.ok

    check(scenario)
    ctl.close()
    back = store.FileJournal(str(tmp_path), lock=False).load()
    assert back.problems == () and back.state.drains == {"sin": 11.0}
    assert back.state.generations == ctl.persisted.generations


def test_a_journal_line_in_pieces_is_the_compact_json_of_the_whole() -> None:
    import json

    doc = {"steady": {f"p{i}": [f"vip-{j:05d}" for j in range(5000)] for i in range(3)},
           "pop_vips": [["p0", "v", {"flaps": [1.5, 2.0], "verdict": None}]] * 3, "seq": 7, "drains": {},
           "generations": {"p0": 3}, "vips": {"v": None}, "é": "\"quoted\""}
    assert store._dumps_compact(doc) == json.dumps(doc, sort_keys=True, separators=(",", ":"))


def test_the_daemons_controller_journals_in_a_thread_and_reads_back_whole(tmp_path: Path) -> None:
    """No fault: the daemon's path end to end (a burst of reports under a running loop)."""
    now = [10.0]
    ctl = controller(tmp_path, now)  # the daemon's store: FileJournal(background=True)
    threads: list[str] = []
    real: Callable[..., int] = ctl.state_store.append_text  # type: ignore[union-attr]

    def append_text(body: str, expect: int) -> int:
        threads.append(threading.current_thread().name)
        return real(body, expect)

    ctl.state_store.append_text = append_text  # type: ignore[union-attr]

    async def scenario() -> None:
        for t, usw in ((11.0, True), (12.0, False), (13.0, True)):
            now[0] = t
            for pop in ("sjc", "fra", "sin"):
                ctl.add_report(report(pop, usw, t))
            await asyncio.wait_for(ctl.durable_plan("sin"), 60)

    check(scenario)
    ctl.close()
    assert threads and all(name.startswith("journal") for name in threads)
    back = store.load(str(tmp_path))
    assert back.generations == ctl.persisted.generations and back.planner == ctl.persisted.planner


def test_a_compaction_keeps_the_operators_dials_and_the_rollout(tmp_path: Path) -> None:
    """A snapshot folds the journal: it must hold everything the journal did. It dropped the
    dials (and a rollout's state), acknowledged by their own journal lines, which the
    compaction then pruned: a restart after a routine compaction forgot `anycastctl dial`."""
    now = [10.0]
    journal = store.FileJournal(str(tmp_path), compact_min_bytes=0)  # (every write compacts)
    ctl = controller(tmp_path, now, state_store=journal)
    reports(ctl, True, now[0])
    assert ctl.dial("us-west", 50, "ops", "test", force=True)
    for t, usw in ((11.0, False), (12.0, True)):  # passes after it: journaled, then compacted
        now[0] = t
        reports(ctl, usw, now[0])
        ctl.replan()
    assert ctl.persistence.ok and ctl.persisted.dials
    ctl.close()
    back = store.FileJournal(str(tmp_path), lock=False).load()
    assert back.problems == ()
    assert any(p.name.startswith("snapshot-") for p in tmp_path.iterdir())
    assert back.state.dials == ctl.persisted.dials
    assert back.state.rollout == ctl.persisted.rollout
    assert back.state.drains == ctl.persisted.drains and back.state.generations == ctl.persisted.generations


def _two_passes_one_write_held(ctl: Controller, disk: GatedDisk, now: list[float]):  # type: ignore[no-untyped-def]
    """A pass whose write is held in its thread, and a second pass whose save waits for it
    (``_save_again``): the state a stop or an action must not lose."""
    async def run() -> int:
        disk.gate.clear()
        now[0] = 11.0
        reports(ctl, False, now[0])
        await until(disk.held.is_set, "the first pass's write is held")
        now[0] = 12.0
        reports(ctl, True, now[0])  # the second pass: its save waits behind the first write
        await until(lambda: ctl._save_again, "the second pass asked to save")
        return ctl.served["sin"].generation
    return run


def test_a_stop_writes_the_save_a_pass_left_waiting_behind_the_threads_write(tmp_path: Path) -> None:
    """close() took in the write in progress but dropped the save asked for meanwhile: the
    last pass's memory and generations were lost at every stop that came during a write."""
    ctl, disk, now = _gated(tmp_path)
    served: list[int] = []

    async def scenario() -> None:
        served.append(await _two_passes_one_write_held(ctl, disk, now)())
        threading.Timer(0.2, disk.gate.set).start()
        ctl.close()  # (waits for the held write, then writes the second pass's)

    check(scenario)
    back = store.load(str(tmp_path))
    assert back.generations == ctl.persisted.generations and back.generations["sin"] == served[0]
    assert back.planner == ctl.persisted.planner


def test_stopping_answers_a_long_poll_only_with_a_durable_generation(tmp_path: Path) -> None:
    """release_waiters (SIGTERM, an HA term ending) answers the parked long-polls at once,
    and first makes what was served durable: never an answer a crash could contradict."""
    ctl, disk, now = _gated(tmp_path)
    before = ctl.served["sin"].generation

    async def scenario() -> None:
        poll = asyncio.ensure_future(ctl.wait_for_change("sin", before, 60))
        generation = await _two_passes_one_write_held(ctl, disk, now)()
        assert not poll.done()
        threading.Timer(0.2, disk.gate.set).start()
        ctl.release_waiters()
        await asyncio.wait_for(poll, 60)
        assert store.load(str(tmp_path)).generations["sin"] == generation  # durable before the answer

    check(scenario)
    ctl.close()


def test_an_action_taking_in_a_write_runs_the_save_that_waited_for_it(tmp_path: Path) -> None:
    """An operator action takes the write in progress in before its own line; a save asked
    for meanwhile was then never run (unless the action planned again), and the long-polls
    of the POPs served by that pass waited for a write that never came."""
    ctl, disk, now = _gated(tmp_path)

    async def scenario() -> None:
        generation = await _two_passes_one_write_held(ctl, disk, now)()
        poll = asyncio.ensure_future(ctl.wait_for_change("sin", generation - 1, 60))
        threading.Timer(0.2, disk.gate.set).start()
        ctl._persist_action(store.Changes(rollout=ctl.persisted.rollout or {}), "a test action")
        await asyncio.wait_for(poll, 60)  # answered: its generation became durable
        assert store.load(str(tmp_path)).generations["sin"] == generation

    check(scenario)
    ctl.close()


def _sliced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Controller:
    """The daemon's journal, its pre-phase in the smallest slices (a turn of the loop at every
    point it may yield); planned once."""
    monkeypatch.setattr(core, "SLICE_S", 0.0)
    ctl = controller(tmp_path, [10.0], state_store=store.FileJournal(str(tmp_path), background=True))
    reports(ctl, True, 10.0)
    return ctl


def test_a_pass_write_compares_and_encodes_on_the_loop_in_slices_and_only_writes_in_the_thread(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The journal thread ran the comparison and the JSON (Python), and at each of the event
    loop's system calls it took the GIL for a whole switch interval: after a burst's pass the
    loop was kept out 0.1-0.4 s at a time (results 3q, 3v). Now that Python runs on the loop,
    with turns of the loop between slices, and the thread only writes and fsyncs."""
    ctl = _sliced(monkeypatch, tmp_path)
    threads: dict[str, list[str]] = {"json": [], "append": []}
    real_json, real_append = store.changes_json_steps, ctl.state_store.append_text  # type: ignore[union-attr]

    def changes_json_steps(*a: Any) -> Any:
        threads["json"].append(threading.current_thread().name)
        return (yield from real_json(*a))

    def append_text(body: str, expect: int) -> int:
        threads["append"].append(threading.current_thread().name)
        return real_append(body, expect)

    monkeypatch.setattr(store, "changes_json_steps", changes_json_steps)
    ctl.state_store.append_text = append_text  # type: ignore[union-attr]

    async def scenario() -> None:
        before = ctl.served["sin"].generation
        reports(ctl, False, 11.0)  # new plans everywhere: their pass's write begins
        w = ctl._writing
        assert w is not None and w.prep is not None and not w.prep.done
        turns_taken = 0
        while not w.prep.done:  # (each turn of the loop: one slice)
            assert threads["append"] == []  # (nothing written before its JSON is whole)
            await asyncio.sleep(0)
            turns_taken += 1
        assert turns_taken >= 5
        await asyncio.wait_for(ctl.durable_plan("sin"), 60)
        assert ctl._durable.generations["sin"] > before

    check(scenario)
    ctl.close()
    assert threads["json"] and set(threads["json"]) == {"MainThread"}
    assert threads["append"] and all(name.startswith("journal") for name in threads["append"])
    back = store.load(str(tmp_path))
    assert back.generations == ctl.persisted.generations and back.planner == ctl.persisted.planner


def test_a_crash_or_an_action_during_a_writes_slices_loses_nothing_acknowledged(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """While a pass's write is still being compared on the loop nothing of it is durable, so
    nothing of it has been answered; an operator action then finishes that write at once and
    journals its own line after it (the journal's order), durable when it returns."""
    ctl = _sliced(monkeypatch, tmp_path / "state")

    async def scenario() -> None:
        before = ctl.served["sin"].generation
        poll = asyncio.ensure_future(ctl.wait_for_change("sin", before, 60))
        await asyncio.sleep(0)
        reports(ctl, False, 11.0)
        await asyncio.sleep(0)
        w = ctl._writing
        assert w is not None and w.prep is not None and not w.prep.done
        assert ctl.served["sin"].generation > before and not poll.done()
        crashed = restart_reads(tmp_path / "state", tmp_path / "crash")
        assert crashed.state.generations["sin"] == before and crashed.problems == ()
        assert ctl.drain("sin")  # (takes the write in: its slices at once, then its fsync)
        assert w.prep.done and w.future.done() and ctl._writing is not w
        after = restart_reads(tmp_path / "state", tmp_path / "crash2")
        assert after.problems == () and after.state.drains == {"sin": 10.0}
        assert after.state.generations == w.submitted.generations  # (that write's, whole)
        await asyncio.wait_for(poll, 60)  # answered once its generation is in the store:
        assert store.load(str(tmp_path / "state")).generations["sin"] > before

    check(scenario)
    ctl.close()
    back = store.FileJournal(str(tmp_path / "state"), lock=False).load()
    assert back.problems == () and back.state.drains == {"sin": 10.0}
    assert back.state.generations == ctl.persisted.generations
