"""The controller's memory on disk: journal, snapshots, corruption, disk faults, the lock,
and timers that resume after a restart. Fake clock; faults injected through fsync."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from controller.config.desired_model import ChangePolicy
from controller.policy.model import STEADY, PlannerState, PopReport, PopVipMemory, VipMemory
from controller.policy.planner import plan
from controller.server import store
from controller.server.core import ActionNotPersisted, Controller
from tests.helpers.controller_state import DESIRED, controller, report, reports

def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "lock"}


def sample_state() -> store.Persisted:
    rs = {p: PopReport(p, 0, 1, {"game-global": {"us-west": False, "eu-central": True}}) for p in ("sjc", "fra")}
    result = plan(DESIRED, rs, {"sin": 5.0}, 10.0, PlannerState.initial())
    rs["sin"] = PopReport("sin", 10, 1, {"game-global": {"us-west": False, "eu-central": False}})
    result = plan(DESIRED, rs, {}, 10.5, result.state)  # sin's withdrawal waits for the settle window
    assert result.state.pop_vips[("sin", "game-global")].down_since == 10.5
    return store.Persisted({"sin": 5.0}, {"sjc": 7}, result.state)


def journal_with(d: Path, *states: store.Persisted, compact_min_bytes: int = 1 << 20) -> store.FileJournal:
    j = store.FileJournal(str(d), compact_min_bytes=compact_min_bytes)
    loaded = j.load()
    j.start(loaded.state, loaded.seq)
    seq, last = loaded.seq, loaded.state
    for s in states:
        seq = j.append(store.diff(last, s), seq)
        j.compact(s, seq)
        last = s
    return j


# --- the journal -----------------------------------------------------------------------------
def test_changes_round_trip_through_the_journal_and_a_compaction_keeps_the_previous_generation(tmp_path: Path) -> None:
    s1 = sample_state()
    s2 = store.Persisted({}, {"sjc": 8, "fra": 1}, s1.planner)  # sin undrained, generations moved
    j = journal_with(tmp_path, s1, s2)
    assert [n for n in files(tmp_path)] == [f"journal-{0:020d}.jsonl", f"snapshot-{0:020d}.json"]
    j.close()
    back = store.FileJournal(str(tmp_path), lock=False).load()
    assert back.seq == 2 and back.problems == ()
    assert (back.state.drains, back.state.generations, back.state.planner) == ({}, s2.generations, s1.planner)
    assert back.state.planner.pop_vips[("sin", "game-global")].down_since == 10.5  # the settle timer
    s3 = store.Persisted({"fra": 20.0}, s2.generations, s2.planner)
    # Each start folds the journal into a snapshot (2, then 3); the one before stays as the
    # previous good generation, older ones go.
    journal_with(tmp_path, s3).close()
    assert list(files(tmp_path)) == [f"journal-{0:020d}.jsonl", f"journal-{2:020d}.jsonl",
                                     f"snapshot-{0:020d}.json", f"snapshot-{2:020d}.json"]
    journal_with(tmp_path).close()
    assert list(files(tmp_path)) == [f"journal-{2:020d}.jsonl", f"journal-{3:020d}.jsonl",
                                     f"snapshot-{2:020d}.json", f"snapshot-{3:020d}.json"]
    assert store.load(str(tmp_path)).drains == {"fra": 20.0}


def test_a_corrupt_newest_snapshot_is_recovered_from_the_previous_generation_with_nothing_lost(tmp_path: Path) -> None:
    s1 = sample_state()
    s2 = store.Persisted({"sin": 5.0, "fra": 9.0}, s1.generations, s1.planner)
    j = journal_with(tmp_path, s1, s2, compact_min_bytes=0)
    j.close()
    newest = max(tmp_path.glob("snapshot-*.json"))
    newest.write_bytes(newest.read_bytes()[: 40])  # truncated
    back = store.FileJournal(str(tmp_path), lock=False).load()
    assert back.state.drains == {"sin": 5.0, "fra": 9.0} and back.state.planner == s1.planner
    assert len(back.problems) == 1 and newest.name in back.problems[0]


def test_a_torn_last_line_is_an_unacknowledged_append_and_not_a_problem(tmp_path: Path) -> None:
    j = journal_with(tmp_path, sample_state())
    j.close()
    [journal] = tmp_path.glob("journal-*.jsonl")
    with open(journal, "ab") as f:
        f.write(b"0badc0de {\"seq\": 2, \"dra")  # a crash in the middle of the next append
    ctl = controller(tmp_path, [20.0])
    assert ctl.persisted.drains == {"sin": 5.0} and ctl.persistence.recovered == ()
    ctl.drain("fra")  # the journal goes on after the cut: readable whole
    ctl.close()
    assert store.FileJournal(str(tmp_path), lock=False).load().problems == ()
    assert store.load(str(tmp_path)).drains == {"sin": 5.0, "fra": 20.0}


def test_a_garbage_line_in_the_middle_is_an_alarm_and_the_later_changes_still_apply(tmp_path: Path) -> None:
    s1 = sample_state()
    s2 = store.Persisted({"sin": 5.0, "fra": 9.0}, s1.generations, s1.planner)
    s3 = store.Persisted({"sin": 5.0, "fra": 9.0, "sjc": 11.0}, s1.generations, s1.planner)
    journal_with(tmp_path, s1, s2, s3).close()
    [journal] = tmp_path.glob("journal-*.jsonl")
    lines = journal.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"fra", b"frx")  # bit rot in s2's line: its checksum fails
    journal.write_bytes(b"\n".join(lines))
    ctl = controller(tmp_path, [20.0])
    assert ctl.persisted.drains == {"sin": 5.0, "sjc": 11.0}  # what fra's line said is lost, loudly
    assert len(ctl.persistence.recovered) == 1 and "line 2: checksum mismatch" in ctl.persistence.recovered[0]
    assert ctl.persistence.errors[store.StoreOp.LOAD] == 1
    assert ctl.metrics_snapshot().persistence_errors["load"] == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_state_that_cannot_be_read_at_all_refuses_to_start_instead_of_forgetting_drains(
        tmp_path: Path, damage: str) -> None:
    journal_with(tmp_path, sample_state()).close()
    [snapshot] = tmp_path.glob("snapshot-*.json")
    body = snapshot.read_bytes()
    snapshot.write_bytes({"garbage": b"\x00\xff{not json", "truncated": body[: len(body) // 2], "empty": b""}[damage])
    before = files(tmp_path)
    with pytest.raises(store.StateUnreadable, match="drains would be forgotten") as info:
        controller(tmp_path, [20.0])
    assert snapshot.name in str(info.value)
    assert files(tmp_path) == before  # nothing rewritten: the evidence stays for the operator
    store.FileJournal(str(tmp_path)).close()  # and the lock was released


def test_the_single_file_of_earlier_versions_is_read_and_converted_and_if_unreadable_refuses(tmp_path: Path) -> None:
    s = sample_state()
    legacy = tmp_path / store.LEGACY_FILENAME
    import json
    legacy.write_text(json.dumps({"version": 1, "drains": s.drains, "generations": s.generations,
                                  **store.planner_to_json(s.planner)}))
    ctl = controller(tmp_path, [20.0])
    assert ctl.persisted.drains == {"sin": 5.0}
    ctl.close()
    assert list(tmp_path.glob("snapshot-*.json"))
    other = tmp_path / "other"
    other.mkdir()
    (other / store.LEGACY_FILENAME).write_text("{not json")
    with pytest.raises(store.StateUnreadable):
        controller(other, [20.0])


# --- disk faults -------------------------------------------------------------------------------
class FlakyDisk:
    """fsync that fails with ``error`` while ``broken``."""

    def __init__(self) -> None:
        self.broken: int | None = None

    def __call__(self, fd: int) -> None:
        if self.broken is not None:
            raise OSError(self.broken, os.strerror(self.broken))
        os.fsync(fd)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO, errno.EROFS])
def test_a_drain_that_cannot_be_saved_is_refused_and_the_alarm_stays_until_a_write_works(
        tmp_path: Path, error: int) -> None:
    now = [10.0]
    disk = FlakyDisk()
    ctl = controller(tmp_path, now, state_store=store.FileJournal(str(tmp_path), fsync=disk))
    reports(ctl, True, now[0])
    disk.broken = error
    with pytest.raises(ActionNotPersisted, match=os.strerror(error)):
        ctl.drain("sin")
    assert ctl.persisted.drains == {} and not ctl.item("sin", "game-global").drain  # type: ignore[union-attr]
    assert not ctl.persistence.ok and ctl.persistence.errors[store.StoreOp.APPEND] == 1
    snap = ctl.metrics_snapshot()
    assert not snap.persistence_ok and snap.persistence_errors["append"] == 1
    now[0] = 11.0
    reports(ctl, False, now[0])  # memory changes: not even tried again yet (every RETRY s)
    assert ctl.persistence.errors[store.StoreOp.APPEND] == 1
    now[0] = 16.0
    reports(ctl, False, now[0])  # tried, and failed again
    assert ctl.persistence.errors[store.StoreOp.APPEND] == 2 and not ctl.persistence.ok
    disk.broken = None
    now[0] = 17.0
    assert ctl.drain("sin")  # an action tries at once
    assert ctl.persistence.ok
    ctl.replan()
    ctl.close()
    back = store.load(str(tmp_path))  # the journal holds everything: the failed passes were retried
    assert back.drains == {"sin": 17.0} and back.planner == ctl.persisted.planner
    assert back.generations == ctl.persisted.generations


def test_a_state_dir_that_cannot_be_written_at_start_serves_refuses_actions_and_recovers(tmp_path: Path) -> None:
    journal_with(tmp_path, sample_state()).close()
    disk = FlakyDisk()
    disk.broken = errno.EROFS
    now = [20.0]
    ctl = controller(tmp_path, now, state_store=store.FileJournal(str(tmp_path), fsync=disk))
    assert ctl.persisted.drains == {"sin": 5.0} and not ctl.persistence.ok  # read what was there
    assert ctl.item("sin", "game-global").drain  # type: ignore[union-attr]
    with pytest.raises(ActionNotPersisted):
        ctl.undrain("sin")
    assert ctl.persisted.drains == {"sin": 5.0}
    disk.broken = None
    assert ctl.undrain("sin") and ctl.persistence.ok
    ctl.close()
    assert store.load(str(tmp_path)).drains == {}


# --- two controllers ---------------------------------------------------------------------------
def test_a_second_controller_on_the_same_state_dir_refuses_to_start_and_writes_nothing(tmp_path: Path) -> None:
    now = [10.0]
    first = controller(tmp_path, now)
    reports(first, True, now[0])
    first.drain("sin")
    before = files(tmp_path)
    with pytest.raises(store.StateDirLocked, match=f"pid {os.getpid()}"):
        controller(tmp_path, now)
    assert files(tmp_path) == before
    first.drain("fra")  # the first one goes on undisturbed
    first.close()
    assert store.load(str(tmp_path)).drains == {"sin": 10.0, "fra": 10.0}
    controller(tmp_path, now).close()  # free again once the first is gone


# --- timers across a restart ---------------------------------------------------------------------
@pytest.mark.parametrize("restart_at", [131.0, 150.0])
def test_a_restart_in_the_middle_of_a_failback_hold_down_resumes_it(tmp_path: Path, restart_at: float) -> None:
    """game-global fails over to eu-central; us-west comes back at t=100 and must stay healthy
    60 s. A controller restart must not restart the hold-down: it fails back at t=160, not
    60 s after the restart. At 131 the last reports are presumed; at 150 they are stale (the
    first pass sees every origin unknown, which keeps the hold-down running)."""
    now = [0.0]
    ctl = controller(tmp_path, now)
    reports(ctl, False, now[0])
    now[0] = 2.0
    reports(ctl, False, now[0])
    assert ctl.item("sjc", "game-global").active_origin == "eu-central"  # type: ignore[union-attr]
    for t in (100.0, 110.0, 120.0, 130.0):
        now[0] = t
        reports(ctl, True, t)
    assert ctl.persisted.planner.vips["game-global"].healthy_since["us-west"] == 100.0
    ctl.close()
    now[0] = restart_at
    ctl = controller(tmp_path, now)
    assert set(ctl.reports) == ({"sjc", "fra", "sin"} if restart_at == 131.0 else set())
    assert ctl.persisted.planner.vips["game-global"].healthy_since["us-west"] == 100.0
    assert ctl.item("sjc", "game-global").active_origin == "eu-central"  # type: ignore[union-attr]
    for t in (restart_at + 1, 159.0):
        now[0] = t
        reports(ctl, True, t)
    assert ctl.item("sjc", "game-global").active_origin == "eu-central"  # type: ignore[union-attr]
    now[0] = 160.5
    reports(ctl, True, now[0])
    assert ctl.item("sjc", "game-global").active_origin == "us-west"  # type: ignore[union-attr]


def test_unknown_keeps_the_hold_down_running_but_down_restarts_it(tmp_path: Path) -> None:
    now = [0.0]
    ctl = controller(tmp_path, now)
    reports(ctl, False, 0.0)
    now[0] = 100.0
    reports(ctl, True, 100.0)
    now[0] = 120.0
    reports(ctl, None, 120.0)  # nobody can tell
    assert ctl.persisted.planner.vips["game-global"].healthy_since["us-west"] == 100.0
    now[0] = 130.0
    reports(ctl, False, 130.0)
    assert "us-west" not in ctl.persisted.planner.vips["game-global"].healthy_since


def test_a_restart_in_the_middle_of_a_dampening_hold_down_keeps_the_pop_withdrawn(tmp_path: Path) -> None:
    """sin flaps and is held down (withdrawn) for 30 s. After a restart 5 s later the first
    plan, before any report, still withdraws it (its last report is presumed), and its next
    real report does not count as a new withdrawal against the rate limit."""
    now = [0.0]
    ctl = controller(tmp_path, now)
    for i, up in enumerate([True, False, True, False, True, False, True]):  # sin flaps: dampened
        now[0] = float(i)
        ctl.add_report(report("sjc", True, now[0]))
        ctl.add_report(report("fra", True, now[0]))
        ctl.add_report(report("sin", up, now[0]))
    memory = ctl.persisted.planner.pop_vips[("sin", "game-global")]
    assert memory.dampened_until > now[0] + 10
    before = ctl.item("sin", "game-global")
    assert before is not None and before.reason == "dampened" and not before.wanted
    ctl.close()
    back = store.load(str(tmp_path))
    assert back.planner.pop_vips[("sin", "game-global")] == ctl.persisted.planner.pop_vips[("sin", "game-global")]
    assert back.planner.vips == ctl.persisted.planner.vips
    now[0] += 5
    ctl = controller(tmp_path, now)
    first = ctl.item("sin", "game-global")
    assert first is not None and first.reason == "dampened" and not first.wanted  # no re-announce at start
    assert ctl.item("fra", "game-global").reason == "healthy"  # type: ignore[union-attr]
    now[0] += 1
    for pop in ("sjc", "fra", "sin"):
        ctl.add_report(report(pop, True, now[0]))
    after = ctl.item("sin", "game-global")
    assert after is not None and after.reason == "dampened" and not after.wanted
    assert ctl.persisted.planner.pop_vips[("sin", "game-global")].dampened_until == memory.dampened_until


def test_a_restart_in_the_middle_of_a_settle_window_resumes_it(tmp_path: Path) -> None:
    now = [50.0]
    ctl = controller(tmp_path, now)
    for pop in ("fra", "sin"):
        ctl.add_report(report(pop, True, now[0]))
    ctl.add_report(report("sjc", False, now[0]))
    assert ctl.item("sjc", "game-global").reason == "confirming"  # type: ignore[union-attr]
    now[0] = 50.4
    ctl.replan()
    ctl.close()
    now[0] = 50.6
    ctl = controller(tmp_path, now)
    assert ctl.item("sjc", "game-global").reason == "confirming"  # type: ignore[union-attr]
    assert ctl.result is not None and ctl.result.wake_at == 51.0  # the window that started at 50
    now[0] = 51.1
    ctl.replan()
    assert ctl.item("sjc", "game-global").reason == "backend_down"  # type: ignore[union-attr]


def test_after_a_long_downtime_nothing_is_presumed(tmp_path: Path) -> None:
    now = [0.0]
    ctl = controller(tmp_path, now)
    reports(ctl, True, now[0])
    ctl.close()
    now[0] = 100.0  # longer than report_stale_after (15 s): the reports would be stale anyway
    ctl = controller(tmp_path, now)
    assert ctl.reports == {} and ctl.item("sjc", "game-global").reason == "report_stale"  # type: ignore[union-attr]


def test_the_diff_names_only_what_changed() -> None:
    s1 = sample_state()
    vips = dict(s1.planner.vips)
    vips["game-global"] = VipMemory("us-west", 1.0)
    pop_vips = dict(s1.planner.pop_vips)
    pop_vips[("fra", "api-eu")] = PopVipMemory(verdict=False)
    del pop_vips[("sjc", "game-global")]
    s2 = store.Persisted({}, {"sjc": 8}, PlannerState(vips, pop_vips))
    c = store.diff(s1, s2)
    assert c == store.Changes({"sin": None}, {"sjc": 8}, {"game-global": VipMemory("us-west", 1.0)},
                              {("fra", "api-eu"): PopVipMemory(verdict=False), ("sjc", "game-global"): None})
    assert store.apply(s1, c) == s2 and not store.diff(s2, store.apply(s1, c))


def test_a_removed_vip_and_a_pop_dropped_from_a_publish_list_leave_the_journal_too(tmp_path: Path) -> None:
    """The journal follows the engine's memory changes: a VIP gone from the desired state and
    a pair gone with a publish list's POP are removed from what a restart reads back."""
    now = [10.0]
    ctl = controller(tmp_path, now)
    ctl.base = dataclasses.replace(ctl.base, change=ChangePolicy(max_withdraw_fraction=1.0, bake=0.0))  # at once
    reports(ctl, True, now[0])
    game = ctl.desired.vip("game-global")
    assert game is not None and "sin" in game.publish
    fewer = dataclasses.replace(game, publish=tuple(p for p in game.publish if p != "sin"))
    now[0] = 11.0
    ctl.apply_config(dataclasses.replace(ctl.desired, revision="rev2", vips=(fewer,)))
    assert ("sin", "game-global") not in ctl.persisted.planner.pop_vips
    assert set(ctl.persisted.planner.vips) == {"game-global"}
    ctl.close()
    back = store.load(str(tmp_path))
    assert back.planner == ctl.persisted.planner
    assert set(back.planner.vips) == {"game-global"} and ("sin", "game-global") not in back.planner.pop_vips


def test_a_background_compaction_appends_on_at_once_and_a_crash_before_its_snapshot_loses_nothing(
        tmp_path: Path) -> None:
    """The daemon's journal writes snapshots in a thread (a 20 MB snapshot must not stall its
    event loop): appends go to the new journal at once; until the snapshot is durable the
    previous snapshot and both journals give the same state; then the old generation goes."""
    import threading

    gate = threading.Event()
    seen: list[int] = []

    def slow_fsync(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            gate.wait(30)  # the snapshot's thread waits: a crash "now" finds no new snapshot
        seen.append(fd)
        os.fsync(fd)

    s1 = sample_state()
    s2 = store.Persisted({"sin": 5.0, "fra": 9.0}, s1.generations, s1.planner)
    j = store.FileJournal(str(tmp_path), compact_min_bytes=0, fsync=slow_fsync, background=True)
    loaded = j.load()
    j.start(loaded.state, loaded.seq)
    seq = j.append(store.diff(loaded.state, s1), loaded.seq)
    j.compact(s1, seq)  # due (no minimum): journal-1 starts now, snapshot-1 is being written
    seq = j.append(store.diff(s1, s2), seq)  # goes to the new journal without waiting
    assert f"snapshot-{1:020d}.json" not in files(tmp_path) and f"journal-{1:020d}.jsonl" in files(tmp_path)
    crashed = store.FileJournal(str(tmp_path), lock=False).load()  # what a restart now would read
    assert crashed.seq == 2 and crashed.problems == ()
    assert (crashed.state.drains, crashed.state.planner) == (s2.drains, s1.planner)
    gate.set()
    j.close()  # waits for the snapshot, then prunes
    assert list(files(tmp_path)) == [f"journal-{0:020d}.jsonl", f"journal-{1:020d}.jsonl",
                                     f"snapshot-{0:020d}.json", f"snapshot-{1:020d}.json"]
    back = store.FileJournal(str(tmp_path), lock=False).load()
    assert back.seq == 2 and back.problems == () and back.state.drains == s2.drains
    assert back.state.planner == s1.planner


def test_a_snapshot_written_in_pieces_is_the_json_of_the_whole() -> None:
    import json

    doc = store.state_to_json(sample_state(), 7)
    assert store._dumps_sorted(doc) == json.dumps(doc, sort_keys=True).encode()


def test_the_last_report_numbers_ride_on_the_alive_hint_across_restarts_and_crashes(tmp_path: Path) -> None:
    """A clean stop writes them; a crash keeps the last hint's; a controller that crashes
    before its own first hint still hands the previous one's on (the lock-time note keeps them)."""
    now = [100.0]
    ctl = controller(tmp_path, now)
    ctl.report_seqs.update({"sjc": 1001, "fra": 7})
    ctl.close()  # a clean stop: the last hint
    second = controller(tmp_path, now)
    assert second.report_seqs == {"sjc": 1001, "fra": 7}
    second.report_seqs["sjc"] = 1002
    second._mark_alive(now[0], force=True)  # the periodic hint (about once a second)
    second.report_seqs["sjc"] = 1003  # accepted after the last hint: lost by the crash below
    assert second.state_store is not None
    second.state_store.close()  # a crash: the lock freed, no last hint (Controller.close() not called)
    third = store.FileJournal(str(tmp_path))  # takes the lock, notes who holds it, then "crashes"
    assert third.load().previous_alive is not None
    third.close()
    fourth = controller(tmp_path, now)
    assert fourth.report_seqs == {"sjc": 1002, "fra": 7}
    fourth.close()


def test_a_quick_restart_presumes_a_preferring_pops_verdict_about_its_own_active_origin(tmp_path: Path) -> None:
    """fra prefers eu-central (steering.preference) and sees it down; sjc sees us-west down;
    sin sees both healthy (game-global's quorum 0.6 here: no failover, 1 of 3 each). After a
    quick restart fra's presumed report sees eu-central down, the origin it judged (c59608d;
    without it fra is presumed to see us-west down, a vote on an origin it did not judge), and
    us-west up: each origin's verdict is presumed. sjc and sin stay on us-west."""
    from controller.config.desired_model import FailoverPolicy, Preference, Steering

    fv = DESIRED.vip("game-global")
    assert fv is not None
    steered = dataclasses.replace(fv, steering=Steering(preferences=(Preference(("fra",), ("eu-central", "us-west")),)),
                                  policy=dataclasses.replace(fv.policy, failover=FailoverPolicy(quorum=0.6)))
    desired = dataclasses.replace(DESIRED, state_dir=str(tmp_path),
                                  vips=tuple(steered if v.name == "game-global" else v for v in DESIRED.vips))
    now = [0.0]

    def seen(pop: str, usw: bool, euc: bool, at: float) -> PopReport:
        return PopReport(pop, at, 1, {"game-global": {"us-west": usw, "eu-central": euc},
                                      "api-eu": {"eu-central": True, "us-west": True}},
                         {"game-global": True, "api-eu": True})

    ctl = Controller(desired, clock=lambda: now[0])
    for pop in ("sjc", "fra", "sin"):
        ctl.add_report(seen(pop, True, True, 0.0))
    now[0] = 1.0
    for r in (seen("sjc", False, True, 1.0), seen("fra", True, False, 1.0), seen("sin", True, True, 1.0)):
        ctl.add_report(r)
    assert [ctl.item(p, "game-global").active_origin for p in ("sjc", "fra", "sin")] == \
        ["us-west", "eu-central", "us-west"]  # type: ignore[union-attr]
    ctl.close()
    now[0] = 2.0  # well within report_stale_after: the last reports are presumed
    ctl = Controller(desired, clock=lambda: now[0])
    # (each origin's verdict, as a steered VIP's presumed reports carry them)
    assert ctl.reports["fra"].origins["game-global"] == {"us-west": True, "eu-central": False}
    assert ctl.reports["sjc"].origins["game-global"] == {"us-west": False, "eu-central": True}
    assert ctl.persisted.planner.vips["game-global"].active == "us-west"
    kept = [ctl.item(p, "game-global").active_origin for p in ("sjc", "sin")]  # type: ignore[union-attr]
    assert kept == ["us-west", "us-west"]
    ctl.close()


def test_a_quick_restart_presumes_each_origins_verdict_of_a_steered_vip_and_moves_no_traffic(tmp_path: Path) -> None:
    """6 POPs: sjc, iad, lax follow us-west > eu-central; fra, ams, lhr prefer eu-central and
    split 1:1 with us-west. sjc and iad see us-west down (2 of 6: not down, quorum 0.5), the
    others see both up. A restart in the middle presumes each origin's verdict per POP, so
    the first passes see what was seen before: fra's split and lax's active origin stay,
    also once the settle window has passed before any POP reported again. (With one verdict
    per POP, us-west's view is 2 down of 3, down: fra's split lost us-west on the first
    pass, and lax moved to eu-central when the window ended.)"""
    from controller.config.desired_model import FleetVip, PopSpec, Preference, Steering

    fv = DESIRED.vip("game-global")
    assert fv is not None
    pops = ("sjc", "iad", "lax", "fra", "ams", "lhr")
    steering = Steering(preferences=(Preference(("fra", "ams", "lhr"), ("eu-central", "us-west"),
                                                (("eu-central", 1), ("us-west", 1))),))
    vip = FleetVip(fv.vip, pops, True, fv.policy, steering=steering)
    desired = dataclasses.replace(DESIRED, state_dir=str(tmp_path), pops=tuple(PopSpec(p, "0" * 64) for p in pops),
                                  vips=(vip,))
    now = [0.0]

    def seen(pop: str, usw: bool, at: float) -> PopReport:
        return PopReport(pop, at, 1, {"game-global": {"us-west": usw, "eu-central": True}}, {"game-global": True})

    def where(c: Controller) -> dict[str, tuple[str, tuple[tuple[str, int], ...]]]:
        return {p: (i.active_origin, i.weights) for p in ("lax", "fra") if (i := c.item(p, "game-global"))}

    ctl = Controller(desired, clock=lambda: now[0])
    for pop in pops:
        ctl.add_report(seen(pop, True, 0.0))
    now[0] = 1.0
    for pop in pops:
        ctl.add_report(seen(pop, pop not in ("sjc", "iad"), 1.0))
    before = where(ctl)
    assert before == {"lax": ("us-west", ()), "fra": ("eu-central", (("eu-central", 1), ("us-west", 1)))}
    ctl.close()
    now[0] = 2.0  # well within report_stale_after: the last reports are presumed
    ctl = Controller(desired, clock=lambda: now[0])
    assert ctl.reports["lax"].origins["game-global"] == {"us-west": True, "eu-central": True}
    assert ctl.reports["sjc"].origins["game-global"] == {"us-west": False, "eu-central": True}
    assert where(ctl) == before
    now[0] = 2.0 + 2 * vip.policy.safety.settle  # no report yet: a failover window would have ended
    ctl.replan()
    assert where(ctl) == before
    ctl.close()


def _walked_changes(old: Any, new: Any) -> dict[tuple[str, str], PopVipMemory | None]:
    """VIP "v"'s pairs that changed from ``old`` to ``new``, found by a walk over every POP
    (what _pair_changes must find)."""
    walked: dict[tuple[str, str], PopVipMemory | None] = {}
    for pop in {*old.items, *new.items}:
        if pop not in new.items:
            walked[(pop, "v")] = None
        elif pop not in old.items or old.memory_at(pop) != new.memory_at(pop):
            walked[(pop, "v")] = new.memory_at(pop)
    return walked


def test_a_vips_changed_pairs_from_the_compact_memories_are_those_a_walk_over_every_pair_finds() -> None:
    """core._pair_changes compares two plans of a VIP by their default and own POPs; random
    publish lists, defaults and per-POP memories (shared and equal-but-distinct objects)
    must give exactly what comparing memory_at at every POP of either gives."""
    import random

    from controller.policy.model import NEW
    from controller.policy.planner import VipPlan
    from controller.server.core import _pair_changes, _Written

    pops = [f"p{i}" for i in range(8)]
    kinds = [NEW, STEADY, PopVipMemory(verdict=True), PopVipMemory(verdict=False, down_since=5.0),
             PopVipMemory(verdict=True, flaps=(1.0, 2.0), penalty=1), PopVipMemory(withdrawn=True)]

    def a_plan(rng: random.Random) -> VipPlan:
        published = rng.sample(pops, rng.randint(0, len(pops)))
        own = {p: rng.choice(kinds) for p in rng.sample(published, rng.randint(0, len(published)))}
        return VipPlan("v", {p: None for p in published}, VipMemory("us", 0.0), rng.choice(kinds), own,  # type: ignore[arg-type]
                       "", None, (), {}, None, None, False)  # type: ignore[arg-type]

    rng = random.Random(20261201)
    for _ in range(3000):
        old = a_plan(rng)
        new = a_plan(rng) if rng.random() < 0.7 else dataclasses.replace(old, default=rng.choice(kinds))
        walked = _walked_changes(old, new)
        found: dict[tuple[str, str], PopVipMemory | None] = {}
        _pair_changes("v", _Written(old.memory, old.default, old.pop_memory, tuple(old.items)), new, found)
        assert found == walked, (old, new)


def test_a_vips_changed_pairs_over_shared_pop_keys_are_those_a_walk_over_every_pair_finds() -> None:
    """_pair_changes takes two plans over the same shared POP key dict (UniformItems) as
    published at the same POPs without looking at each POP (_same_pops); over equal lists in
    another order, over other lists, or dicts, it compares the key sets. Random plans, with
    and without the defaults' form, must give what comparing every POP of either gives."""
    import random

    from controller.policy.model import NEW, UniformItems
    from controller.policy.planner import VipPlan
    from controller.server.core import _pair_changes, _Written

    pops = [f"p{i}" for i in range(12)]
    kinds = [NEW, STEADY, PopVipMemory(verdict=True), PopVipMemory(verdict=False, down_since=5.0),
             PopVipMemory(withdrawn=True)]
    item = object()

    def items_of(published: list[str], rng: random.Random) -> Any:
        if len(published) >= 8 and rng.random() < 0.7:
            return UniformItems.over(tuple(published), item)  # type: ignore[arg-type]
        return {p: item for p in published}

    def a_plan(rng: random.Random, published: list[str] | None = None) -> VipPlan:
        if published is None:
            published = rng.sample(pops, rng.choice([0, 3, 8, 10, 12]))
        own = {p: rng.choice(kinds) for p in rng.sample(published, rng.randint(0, min(3, len(published))))}
        return VipPlan("v", items_of(published, rng), VipMemory("us", 0.0), rng.choice(kinds), own,
                       "", None, (), {}, None, None, False)  # type: ignore[arg-type]

    rng = random.Random(20261204)
    for _ in range(3000):
        old = a_plan(rng)
        shape = rng.random()
        if shape < 0.4:  # the same POPs (the same shared keys, or in another order), other memory
            same = list(old.items)
            new = a_plan(rng, same if rng.random() < 0.5 else rng.sample(same, len(same)))
        elif shape < 0.6:
            new = dataclasses.replace(old, default=rng.choice(kinds))
        else:
            new = a_plan(rng)
        keys = old.items.pops if type(old.items) is UniformItems else None
        written = _Written(old.memory, old.default, old.pop_memory, tuple(old.items), keys)
        walked = _walked_changes(old, new)
        found: dict[tuple[str, str], PopVipMemory | None] = {}
        _pair_changes("v", written, new, found)
        assert found == walked, (old, new)
        # The defaults' form: a changed default at the new POPs, and the pairs that differ from it.
        pairs: dict[tuple[str, str], PopVipMemory | None] = {}
        defaults: dict[str, tuple[PopVipMemory, tuple[str, ...]]] = {}
        _pair_changes("v", written, new, pairs, defaults, {})
        if "v" in defaults:
            default, at = defaults["v"]
            assert set(at) == set(new.items)
            rebuilt = {(p, "v"): default for p in at if (p, "v") not in pairs}
            rebuilt.update(pairs)
            expect = {(p, "v"): new.memory_at(p) for p in new.items}
            expect.update({(p, "v"): None for p in old.items if p not in new.items})
            assert rebuilt == expect, (old, new)
        else:
            assert pairs == walked, (old, new)
