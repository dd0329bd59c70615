"""The inotify config watch's gaps a review found (server/inotify.py, Watcher._inotify), each
with real files and real inotify: the loop left spinning on an unread descriptor while git
holds index.lock; directories made during a queue overflow never watched; a symlinked config
subdirectory not watched; the config directory itself replaced (renamed, or removed and made
again) and the watch lost for good."""

from __future__ import annotations

import asyncio
import os
import select
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.server import revision
from controller.server.daemon import Watcher
from controller.server.inotify import OVERFLOW, Inotify
from tests.helpers.controller_process import committed_example, git
from tests.helpers.waiting import check, until


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_the_watch_reads_its_queue_while_git_holds_the_index_lock(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """While the batch waited in GitLock.settled() for index.lock to go, nothing read the
    queue: the descriptor stayed readable and the level-triggered reader ran every turn of the
    loop (a whole core, review: 0.97 s CPU a second). The reader now reads the queue itself:
    after a write made during the wait, the descriptor is left unreadable and further turns of
    the loop call no reader; the poke waits for the lock to go."""
    d = committed_example(tmp_path)
    watcher = Watcher(str(d), str(tmp_path / "state"))
    watcher.load()
    calls = 0
    fds: list[int] = []

    async def scenario() -> None:
        nonlocal calls
        loop = asyncio.get_running_loop()
        add_reader = loop.add_reader

        def counting(fd: int, callback: Callable[..., Any], *args: Any) -> None:
            def counted() -> None:
                nonlocal calls
                calls += 1
                callback(*args)
            fds.append(fd)
            add_reader(fd, counted)
        monkeypatch.setattr(loop, "add_reader", counting)
        poke = asyncio.Event()
        watching = asyncio.ensure_future(watcher.poke_on_change(poke))
        lock = d / ".git" / "index.lock"
        held = None
        try:
            await until(lambda: watcher.notifier == "inotify" and poke.is_set(), "the watch set up")
            poke.clear()
            watcher.batch_at = 0.0
            held = open(lock, "w")  # noqa: SIM115 - held open, as a running git holds it
            (d / "controller.yaml").write_text((d / "controller.yaml").read_text() + "\n")
            await until(lambda: watcher.batch_at > 0, "the batch handed on to GitLock.settled()")
            (d / "more.yaml").write_text("vips: []\n")  # (while the batch waits for the lock)
            for _ in range(20):
                await asyncio.sleep(0)
            assert not _readable(fds[0]), "the queue is left unread while the lock is held"
            before = calls
            for _ in range(200):
                await asyncio.sleep(0)
            assert calls == before, f"{calls - before} reader callbacks in 200 turns of an idle loop"
            assert not poke.is_set()
            held.close()
            held = None
            lock.unlink()
            await until(poke.is_set, "poked once git let the index go")
        finally:
            if held is not None:
                held.close()
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    check(scenario)


def test_directories_made_during_a_queue_overflow_are_watched(tmp_path: Path) -> None:
    """The kernel drops the events past max_queued_events, a new directory's IN_CREATE among
    them: it was never watched. On an overflow the trees are added again (inotify_add_watch of
    a watched directory is a no-op) and the overflow reported (the watcher looks at everything)."""
    top = tmp_path / "c"
    top.mkdir()
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    ino = Inotify()
    try:
        ino.add(str(top))
        for i in range(limit // 2 + 100):  # (IN_CREATE and IN_CLOSE_WRITE each: past the limit)
            (top / f"f{i}.yaml").touch()
        (top / "vips").mkdir()
        assert OVERFLOW in ino.read()
        (top / "vips" / "new.yaml").write_text("x")
        assert str(top / "vips" / "new.yaml") in {p for _, p in ino.read()}
    finally:
        ino.close()


def _hidden(path: str) -> bool:
    return os.path.basename(path).startswith(".")  # (the Watcher's prune: .git, .gen, ...)


def test_a_symlinked_config_directory_is_watched_under_the_links_path(tmp_path: Path) -> None:
    """conf/vips -> conf/.gen/vips: the loader follows the link, watchfiles did, the inotify
    walk did not (is_dir(follow_symlinks=False)). The link's target is watched and its events
    named by the link's path; a link made later too; a link back up the tree is not followed
    round (one watch per directory); a link out of the tree is not followed at all (the
    loader refuses what is there: a committed `x -> /` would watch the machine's disk)."""
    top = tmp_path / "conf"
    gen, elsewhere = top / ".gen", tmp_path / "elsewhere"
    (gen / "vips").mkdir(parents=True)
    (gen / "more").mkdir()
    (elsewhere / "deep").mkdir(parents=True)
    (top / "vips").symlink_to(gen / "vips")
    (top / "loop").symlink_to(top)
    (top / "out").symlink_to(elsewhere)
    ino = Inotify()
    try:
        ino.add(str(top), prune=_hidden)
        assert sorted(d for d, _, _ in ino._dirs.values()) == [str(top), str(top / "vips")]
        (gen / "vips" / "a.yaml").write_text("x")
        assert str(top / "vips" / "a.yaml") in {p for _, p in ino.read()}
        (top / "later").symlink_to(gen / "more")
        (top / "later-out").symlink_to(elsewhere / "deep")
        ino.read()
        assert len(ino._dirs) == 3, ino._dirs  # (later, not later-out)
        (gen / "more" / "b.yaml").write_text("x")
        (elsewhere / "c.yaml").write_text("x")
        (elsewhere / "deep" / "d.yaml").write_text("x")
        assert {p for _, p in ino.read()} == {str(top / "later" / "b.yaml")}
    finally:
        ino.close()


def test_the_fingerprint_sees_a_file_under_a_symlinked_directory_inside_the_checkout(tmp_path: Path) -> None:
    """What the loader reads through conf/vips -> conf/.gen/vips is what the fingerprint hashes:
    an edit there is a change (before, os.walk did not follow the link: the watch poked, the
    fingerprint stayed, and the edit was never loaded); a link out of the tree or round it
    adds nothing and never loops."""
    top = tmp_path / "conf"
    (top / ".gen" / "vips").mkdir(parents=True)
    (top / "vips").symlink_to(top / ".gen" / "vips")
    (top / "loop").symlink_to(top)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.yaml").write_text("x")
    (top / "out").symlink_to(tmp_path / "elsewhere")
    (top / ".gen" / "vips" / "a.yaml").write_text("vips: []\n")
    before = revision.fingerprint(str(top))
    assert str(top / "vips" / "a.yaml") in revision._yaml_files(str(top))
    assert not any("elsewhere" in p or "/out/" in p for p in revision._yaml_files(str(top)))
    (top / ".gen" / "vips" / "a.yaml").write_text("vips: [broken\n")
    assert revision.fingerprint(str(top)) != before


def test_a_symlinked_subdirectory_pokes_the_watcher(tmp_path: Path) -> None:
    d = committed_example(tmp_path)
    gen = d / ".gen"
    gen.mkdir()
    (d / "generated").symlink_to(gen)
    watcher = Watcher(str(d), str(tmp_path / "state"))

    async def scenario() -> None:
        poke = asyncio.Event()
        watching = asyncio.ensure_future(watcher.poke_on_change(poke))
        try:
            await until(lambda: watcher.notifier == "inotify" and poke.is_set(), "the watch set up")
            poke.clear()
            (gen / "x.yaml").write_text("vips: []\n")
            await until(poke.is_set, "a YAML file in the symlinked directory poked the watch")
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    check(scenario)


def test_the_old_directory_is_not_reported_once_the_config_directory_is_renamed(tmp_path: Path) -> None:
    """mv conf conf.old; mv conf.new conf: the watches of conf.old are dropped (its writes were
    reported as conf's), conf is watched anew, and the change is reported (a rescan)."""
    top = tmp_path / "conf"
    top.mkdir()
    new = tmp_path / "conf.new"
    (new / "sub").mkdir(parents=True)
    ino = Inotify()
    try:
        ino.add(str(top))
        top.rename(tmp_path / "conf.old")
        new.rename(top)
        assert OVERFLOW in ino.read()
        (tmp_path / "conf.old" / "x.yaml").write_text("x")
        (top / "sub" / "y.yaml").write_text("y")
        assert {p for _, p in ino.read()} == {str(top / "sub" / "y.yaml")}
    finally:
        ino.close()


def test_the_watch_survives_the_config_directory_replaced(tmp_path: Path) -> None:
    """Review: (deleted, top) was judged not relevant (its relative path "." counted as a
    hidden one) and the watch on the old directory stayed: after a rename of the config
    directory, or its removal and remaking, no change was seen again. Now each is reported
    and the new directory watched (the watch waits for it to be there again)."""
    d = committed_example(tmp_path)
    watcher = Watcher(str(d), str(tmp_path / "state"))
    watcher.load()

    async def scenario() -> None:
        poke = asyncio.Event()
        watching = asyncio.ensure_future(watcher.poke_on_change(poke))
        try:
            await until(lambda: watcher.notifier == "inotify" and poke.is_set(), "the watch set up")
            poke.clear()
            shutil.copytree(d, tmp_path / "desired.new", symlinks=True)
            d.rename(tmp_path / "desired.old")
            (tmp_path / "desired.new").rename(d)
            await until(poke.is_set, "the directory's replacement poked the watch")
            await until(lambda: watcher.notifier == "inotify", "watching again")
            poke.clear()
            (d / "new.yaml").write_text("vips: []\n")
            await until(poke.is_set, "a file in the new directory poked the watch")
            poke.clear()
            shutil.rmtree(d)
            await until(poke.is_set, "the directory's removal poked the watch")
            poke.clear()
            shutil.copytree(tmp_path / "desired.old", d, symlinks=True)
            await until(lambda: watcher.notifier == "inotify" and poke.is_set(), "watching the directory made again")
            poke.clear()
            (d / "again.yaml").write_text("vips: []\n")
            await until(poke.is_set, "a file in the directory made again poked the watch")
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    check(scenario)


def test_a_config_directory_that_is_a_symlink_re_pointed_is_watched_where_it_leads(tmp_path: Path) -> None:
    """/etc/anycast -> release-1, re-pointed atomically to release-2 (a new link renamed over
    it, as ``ln -sfn`` and deploy tools do): nothing in release-1's tree changed, so nothing
    was noticed, and release-2's edits were never seen. The link's directory is watched for
    it: the re-pointing pokes, release-2 is watched from then on (release-1's writes are not
    reported), and the git directory, its index copy and index.lock's GitLock are release-2's."""
    r1 = committed_example(tmp_path / "r1")
    r2 = committed_example(tmp_path / "r2")
    (r2 / "release.yaml").write_text("vips: []\n")
    git(r2, "add", "-A")
    git(r2, "commit", "-qm", "release 2")
    link = tmp_path / "anycast"
    link.symlink_to(r1)
    watcher = Watcher(str(link), str(tmp_path / "state"))
    assert git(r1, "rev-parse", "HEAD").startswith(watcher.load().revision)
    assert watcher.git_lock.path == str(r1.resolve() / ".git" / "index.lock")

    async def scenario() -> None:
        poke = asyncio.Event()
        watching = asyncio.ensure_future(watcher.poke_on_change(poke))
        try:
            await until(lambda: watcher.notifier == "inotify" and poke.is_set(), "the watch set up")
            poke.clear()
            (tmp_path / "anycast.new").symlink_to(r2)
            os.replace(tmp_path / "anycast.new", link)  # (ln -sfn: atomic)
            await until(poke.is_set, "the link re-pointed poked the watch")
            await until(lambda: watcher.notifier == "inotify" and watcher._where == str(r2.resolve()),
                        "watching where the link leads now")
            assert watcher.git_lock.path == str(r2.resolve() / ".git" / "index.lock")
            await asyncio.sleep(0.1)
            poke.clear()
            (r1 / "old.yaml").write_text("vips: []\n")  # (where it led before: no longer the config)
            await asyncio.sleep(0.3)
            assert not poke.is_set(), "release-1's write poked the watch"
            (r2 / "new.yaml").write_text("vips: []\n")
            await until(poke.is_set, "a file in release-2 poked the watch")
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    check(scenario)
    assert watcher.changed()
    revision = watcher.load().revision
    assert "+dirty" in revision and git(r2, "rev-parse", "HEAD").startswith(revision.split("+")[0])
    watcher.close()


def test_a_symlink_in_the_tree_removed_or_re_pointed_leaves_no_watch_on_its_old_target(tmp_path: Path) -> None:
    """conf/vips -> conf/.gen/vips-1: removed, the watch of vips-1 stayed, its writes reported
    as conf/vips/... (a look each time); re-pointed to vips-2, vips-1's watch stayed beside
    vips-2's. Both are dropped now (one watch per directory the tree leads to)."""
    top = tmp_path / "conf"
    gen = top / ".gen"
    (gen / "vips-1" / "sub").mkdir(parents=True)
    (gen / "vips-2").mkdir(parents=True)
    (top / "vips").symlink_to(gen / "vips-1")
    ino = Inotify()
    try:
        ino.add(str(top), prune=_hidden)
        assert sorted(d for d, _, _ in ino._dirs.values()) == [str(top), str(top / "vips"), str(top / "vips" / "sub")]
        (top / "vips.new").symlink_to(gen / "vips-2")
        os.replace(top / "vips.new", top / "vips")  # (re-pointed, atomically)
        ino.read()
        assert sorted(d for d, _, _ in ino._dirs.values()) == [str(top), str(top / "vips")]
        (gen / "vips-1" / "a.yaml").write_text("x")
        (gen / "vips-1" / "sub" / "b.yaml").write_text("x")
        (gen / "vips-2" / "c.yaml").write_text("x")
        assert {p for _, p in ino.read()} == {str(top / "vips" / "c.yaml")}
        (top / "vips").unlink()
        assert {p for _, p in ino.read()} == {str(top / "vips")}
        assert sorted(d for d, _, _ in ino._dirs.values()) == [str(top)]
        (gen / "vips-2" / "d.yaml").write_text("x")
        assert ino.read() == []
        # a real directory renamed inside the tree is watched under its new name, once
        (top / "real").mkdir()
        ino.read()
        (top / "real").rename(top / "moved")
        ino.read()
        assert sorted(d for d, _, _ in ino._dirs.values()) == [str(top), str(top / "moved")]
        (top / "moved" / "e.yaml").write_text("x")
        assert {p for _, p in ino.read()} == {str(top / "moved" / "e.yaml")}
    finally:
        ino.close()


def test_a_real_directory_keeps_its_watch_when_links_to_it_are_removed(tmp_path: Path) -> None:
    """conf/a and links conf/b0..b9 -> a: the one watch of a's directory is named by whichever
    path the walk met first, often a link. The links removed, a's watch was dropped with the
    one that had its name and never added again: a write in conf/a went unreported (found by
    a review). The trees are walked again now: a's writes are reported under conf/a."""
    top = tmp_path / "conf"
    (top / "a").mkdir(parents=True)
    for i in range(10):
        (top / f"b{i}").symlink_to(top / "a")
    ino = Inotify()
    try:
        ino.add(str(top), prune=_hidden)
        for i in range(10):
            (top / f"b{i}").unlink()
        ino.read()
        (top / "a" / "vips.yaml").write_text("x")
        assert {p for _, p in ino.read() if p} >= {str(top / "a" / "vips.yaml")}
        assert sorted(d for d, _, _ in ino._dirs.values()) == [str(top), str(top / "a")]
    finally:
        ino.close()
