"""index.lock and the reload: a git command writing the checkout holds the reload back; a lock a
killed git left behind does not hold every reload GIT_LOCK_WAIT s (it did: 10 s each). No real
time passes: the clock and the sleep are fakes, the lock's age is its mtime."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from controller.server.daemon import GIT_LOCK_WAIT, GitLock


class Clock:
    def __init__(self, start: float) -> None:
        self.t = start
        self.slept = 0.0
        self.on_sleep: list[object] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.t += s
        self.slept += s
        for hook in list(self.on_sleep):
            hook()  # type: ignore[operator]


def _lock(gd: Path, mtime: float) -> Path:
    lock = gd / "index.lock"
    lock.write_bytes(b"")
    os.utime(lock, (mtime, mtime))
    return lock


def _git_lock(gd: Path, clock: Clock, held: bool | None = False) -> GitLock:
    return GitLock(str(gd), now=clock.now, clock=clock.now, sleep=clock.sleep, held=lambda path: held)


def test_a_lock_older_than_the_bound_that_no_process_holds_holds_no_reload_and_is_warned_of_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(1_000_000.0)
    lock = _lock(tmp_path, clock.t - GIT_LOCK_WAIT - 5)
    gl = _git_lock(tmp_path, clock)
    with caplog.at_level(logging.WARNING, "controller.server"):
        for _ in range(3):  # three reloads
            asyncio.run(gl.settled())
    assert clock.slept == 0.0
    assert gl.stale == str(lock)
    warnings = [r for r in caplog.records if str(lock) in r.getMessage()]
    assert len(warnings) == 1
    lock.unlink()
    asyncio.run(gl.settled())
    assert gl.stale is None


def test_a_fresh_lock_still_holds_the_reload_until_it_goes(tmp_path: Path) -> None:
    clock = Clock(1_000_000.0)
    lock = _lock(tmp_path, clock.t - 0.5)
    gl = _git_lock(tmp_path, clock)
    clock.on_sleep.append(lambda: clock.slept >= 3.0 and lock.exists() and lock.unlink())
    asyncio.run(gl.settled())
    assert 3.0 <= clock.slept < 3.1  # waited for it, then one quiet window
    assert gl.stale is None


def test_an_old_lock_a_process_holds_open_is_waited_for(tmp_path: Path) -> None:
    clock = Clock(1_000_000.0)
    lock = _lock(tmp_path, clock.t - GIT_LOCK_WAIT - 5)
    gl = _git_lock(tmp_path, clock, held=True)
    clock.on_sleep.append(lambda: clock.slept >= 2.0 and lock.exists() and lock.unlink())
    asyncio.run(gl.settled())
    assert clock.slept >= 2.0 and gl.stale is None


def test_a_lock_waited_on_for_the_bound_is_given_up_once_and_a_new_lock_is_waited_on_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(1_000_000.0)
    lock = _lock(tmp_path, clock.t)
    gl = _git_lock(tmp_path, clock, held=None)  # another user's git: cannot tell
    with caplog.at_level(logging.WARNING, "controller.server"):
        asyncio.run(gl.settled())
        assert GIT_LOCK_WAIT - 0.01 <= clock.slept < GIT_LOCK_WAIT + 0.1
        before = clock.slept
        asyncio.run(gl.settled())  # the same lock: no wait this time
        assert clock.slept == before
    assert len([r for r in caplog.records if str(lock) in r.getMessage()]) == 1
    lock.unlink()
    lock = _lock(tmp_path, clock.t)  # a new git's lock
    clock.on_sleep.append(lambda: clock.slept >= before + 1.0 and lock.exists() and lock.unlink())
    asyncio.run(gl.settled())
    assert clock.slept >= before + 1.0 and gl.stale is None


def test_no_lock_no_wait(tmp_path: Path) -> None:
    clock = Clock(1_000_000.0)
    asyncio.run(_git_lock(tmp_path, clock).settled())
    asyncio.run(GitLock(None, now=clock.now, clock=clock.now, sleep=clock.sleep).settled())
    assert clock.slept == 0.0


def test_a_lock_this_process_holds_open_is_held(tmp_path: Path) -> None:
    from controller.server.daemon import _lock_held

    lock = tmp_path / "index.lock"
    with open(lock, "w"):
        assert _lock_held(str(lock)) is True
    assert _lock_held(str(lock)) is not True


def test_an_old_lock_whose_holder_cannot_be_told_is_waited_on_once_for_the_bound(tmp_path: Path) -> None:
    # A daemon not running as root cannot read other users' /proc/PID/fd: "cannot tell" is not
    # "no one holds it" (an operator's slow checkout must not be loaded half-written).
    clock = Clock(1_000_000.0)
    lock = _lock(tmp_path, clock.t - GIT_LOCK_WAIT - 5)
    gl = _git_lock(tmp_path, clock, held=None)
    asyncio.run(gl.settled())
    assert GIT_LOCK_WAIT - 0.01 <= clock.slept < GIT_LOCK_WAIT + 0.1
    assert gl.stale == str(lock)
    before = clock.slept
    asyncio.run(gl.settled())
    assert clock.slept == before


def test_a_lock_a_running_process_holds_is_never_given_up_on(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(1_000_000.0)
    lock = _lock(tmp_path, clock.t)
    gl = _git_lock(tmp_path, clock, held=True)
    clock.on_sleep.append(lambda: clock.slept >= 3 * GIT_LOCK_WAIT and lock.exists() and lock.unlink())
    with caplog.at_level(logging.WARNING, "controller.server"):
        asyncio.run(gl.settled())
    assert clock.slept >= 3 * GIT_LOCK_WAIT
    assert gl.stale is None
    assert len([r for r in caplog.records if str(lock) in r.getMessage()]) == 1  # "held open", once


@pytest.mark.parametrize("held", [False, True, None])
def test_busy_says_a_read_may_be_half_written_unless_the_lock_was_left_behind(tmp_path: Path, held: bool | None) -> None:
    """busy() (a reload's read, and the start-up load, which never await settled()) applies
    settled()'s first-sight rule: an old lock no process holds was left by a killed git, and
    no read waits for it (it held every start 10 s); a lock a process holds, or whose holder
    cannot be told, may be a git writing the checkout."""
    clock = Clock(1_000_000.0)
    gl = _git_lock(tmp_path, clock, held=held)
    assert not gl.busy()  # no lock
    lock = _lock(tmp_path, clock.t - 1)
    assert gl.busy()  # a fresh lock: a git at work, whoever holds it
    os.utime(lock, (clock.t - GIT_LOCK_WAIT - 5,) * 2)
    assert gl.busy() is (held is not False)
    assert gl.stale == (str(lock) if held is False else None)
    lock.unlink()
    assert not gl.busy()
    _lock(tmp_path, clock.t)  # a new lock after the one given up on
    assert gl.busy() and gl.stale is None
