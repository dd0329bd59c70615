"""The journal's line made on the event loop in slices (results/ section 3v), under faults:
a full disk in the write, a bug in a slice, a pass arriving mid-slices, the loop ending
mid-slices, the journal's thread gone. Each answers the waiting long-poll, raises the alarm
where the write failed, keeps the VIPs to journal, and reads back an acknowledged state.
Slices are 0 s (one step per turn of the loop), so every moment between two is reached."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controller.server import core, store
from controller.server.core import Controller
from tests.helpers.controller_state import controller, reports
from tests.helpers.waiting import until


def _sliced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Controller:
    monkeypatch.setattr(core, "SLICE_S", 0.0)
    ctl = controller(tmp_path, [10.0], state_store=store.FileJournal(str(tmp_path), background=True))
    reports(ctl, True, 10.0)
    return ctl


async def _answered_after_a_change(ctl: Controller) -> None:
    before = ctl.served["sin"].generation
    poll = asyncio.ensure_future(ctl.wait_for_change("sin", before, 60))
    await asyncio.sleep(0)
    reports(ctl, False, 11.0)
    await until(poll.done, "the long-poll is answered")


def _read_back(d: Path) -> Any:
    back = store.FileJournal(str(d), lock=False).load()
    assert back.problems == ()
    return back.state


def test_a_full_disk_in_the_sliced_write_raises_the_alarm_and_keeps_what_to_journal(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctl = _sliced(monkeypatch, tmp_path)

    def full(body: Any, expect: Any) -> Any:
        raise store.PersistenceError(store.StoreOp.APPEND, str(tmp_path), "No space left on device")
    monkeypatch.setattr(ctl.state_store, "append_text", full)

    async def scenario() -> None:
        await _answered_after_a_change(ctl)
        assert not ctl.persistence.ok and ctl._writing is None
        assert ctl._held.unsaved  # (journaled by the next write)
    asyncio.run(scenario())
    monkeypatch.undo()
    ctl.close()


def test_a_bug_in_a_slice_raises_the_alarm_and_keeps_what_to_journal(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctl = _sliced(monkeypatch, tmp_path)

    def bad(*_: Any) -> Any:
        yield
        raise ValueError("bug")
    monkeypatch.setattr(store, "changes_json_steps", bad)

    async def scenario() -> None:
        await _answered_after_a_change(ctl)
        assert not ctl.persistence.ok and ctl._writing is None
        assert ctl._held.unsaved
    asyncio.run(scenario())
    monkeypatch.undo()
    ctl.close()


def test_a_pass_arriving_mid_slices_is_journaled_after_it_in_order(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctl = _sliced(monkeypatch, tmp_path / "st")

    async def scenario() -> None:
        reports(ctl, False, 11.0)
        w = ctl._writing
        assert w is not None and w.prep is not None
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        reports(ctl, True, 12.0)  # a pass mid-slices
        assert ctl._save_again or ctl._writing is not w
        await until(lambda: ctl._writing is None and not ctl._save_again, "both writes are done")
        assert ctl._durable.generations == ctl.persisted.generations
    asyncio.run(scenario())
    ctl.close()
    back = _read_back(tmp_path / "st")
    assert back.generations == ctl.persisted.generations and back.planner == ctl.persisted.planner


def test_the_loop_ending_mid_slices_loses_no_write(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctl = _sliced(monkeypatch, tmp_path / "st")

    async def scenario() -> None:
        reports(ctl, False, 11.0)
        await asyncio.sleep(0)
    asyncio.run(scenario())  # (the slices' task cancelled as the loop ends)
    ctl.close()
    assert _read_back(tmp_path / "st").generations == ctl.persisted.generations


def test_a_write_whose_thread_is_gone_fails_instead_of_hanging(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Found by review: the write handed to a journal thread already shut down left its
    future unsettled, and the next wait for it blocked the loop for good."""
    ctl = _sliced(monkeypatch, tmp_path)

    async def scenario() -> None:
        reports(ctl, False, 11.0)
        w = ctl._writing
        assert w is not None and w.prep is not None
        assert ctl._writer is not None
        ctl._writer.shutdown(wait=True)
        w.prep.finish()
        assert w.future.done() and isinstance(w.future.exception(), RuntimeError)
    asyncio.run(scenario())
    ctl.close()  # (the failed write reported, not waited for)
