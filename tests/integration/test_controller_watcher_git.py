"""The Watcher and a slow `git checkout`: one reload of the commit checked out, never of a
checkout half-written (loopback-free: files, inotify and git only; no lab lock needed)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Callable

import yaml

from controller.config.errors import ConfigError
from controller.server import daemon
from controller.server.daemon import Watcher
from controller.server.revision import FileStats, IndexCopy, fingerprint
from tests.helpers.config_dirs import EXAMPLE
from tests.helpers.controller_process import git
from tests.helpers.waiting import HANG_GUARD, check, until

FILES = 8


def _write(d: Path, shift: int) -> None:
    """VIPs api-0..api-7, api-k in vips/f{(k + shift) % 8}.yaml: between two shifts every file
    changes, and any mix of the two (some files written, some not) lists a VIP twice or not at
    all: a duplicate is refused, a missing VIP would be withdrawn."""
    template = next(v for v in yaml.safe_load((EXAMPLE / "vips.yaml").read_text())["vips"] if v["name"] == "api-eu")
    (d / "vips").mkdir(exist_ok=True)
    for k in range(FILES):
        vip = {**template, "name": f"api-{k}", "address": f"198.51.100.{100 + k}/32"}
        (d / "vips" / f"f{(k + shift) % FILES}.yaml").write_text(yaml.safe_dump({"vips": [vip]}))


def test_a_slow_checkout_of_many_files_is_one_reload_of_the_commit_checked_out(tmp_path: Path) -> None:
    """A checkout whose file writes are 100 ms apart (a smudge filter that sleeps: on a
    loaded machine git can be that slow between two files), ten times the inotify quiet
    window: the reload waits for git's index.lock, so every load is of the new commit's
    files (the same bytes, the new commit's revision at the end), and none is refused."""
    d = tmp_path / "desired"
    shutil.copytree(EXAMPLE, d)
    _write(d, 0)
    git(d, "init", "-q", "-b", "main")
    (d / ".gitattributes").write_text("vips/*.yaml filter=slow\n")
    git(d, "config", "filter.slow.smudge", "sleep 0.1; cat")
    git(d, "config", "filter.slow.clean", "cat")
    git(d, "add", "-A")
    git(d, "commit", "-qm", "A")
    git(d, "checkout", "-qb", "next")
    _write(d, 1)
    git(d, "commit", "-qam", "B: every VIP one file further")
    b_head = git(d, "rev-parse", "HEAD")[:12]
    b_content = fingerprint(str(d))
    git(d, "checkout", "-q", "main")
    assert fingerprint(str(d)) != b_content
    assert daemon.INOTIFY_QUIET_MS * 10 <= 100  # (the gaps below are ten windows or more)

    watcher = Watcher(str(d), str(tmp_path / "state"))
    assert watcher.load().vip("api-0") is not None
    loads: list[tuple[str, str]] = []  # (content fingerprint, revision) of each load
    refused: list[str] = []

    async def scenario() -> None:
        poke = asyncio.Event()
        watching = asyncio.ensure_future(watcher.poke_on_change(poke))

        in_reload = [False]

        async def reloading() -> None:  # what the daemon's loop does on a poke
            while True:
                await poke.wait()
                poke.clear()
                in_reload[0] = True
                try:
                    new = await asyncio.to_thread(watcher.reload)
                except ConfigError as exc:
                    refused.append(exc.summary())
                    continue
                finally:
                    in_reload[0] = False
                if new is None and watcher.unsettled:
                    await watcher.settle()
                    poke.set()
                if new is not None:
                    assert watcher.seen is not None
                    loads.append((watcher.seen[0], new.revision))

        loop = asyncio.ensure_future(reloading())
        try:
            # (the look the watch's start marks has ended, not only begun: pending() turns
            # false when it begins)
            await until(lambda: watcher.notifier == "inotify" and not watcher.pending() and not in_reload[0],
                        "the watch is set up")
            await asyncio.to_thread(git, d, "checkout", "-q", "next")
            await until(lambda: any(rev == b_head for _, rev in loads), "the checked-out commit is loaded")
            await asyncio.sleep(0.5)  # (any late reload is counted too)
        finally:
            loop.cancel()
            watching.cancel()
            watcher.close()

    check(scenario)
    assert refused == []
    assert loads and all(fp == b_content for fp, _ in loads), loads  # never a half-written checkout
    assert loads[-1][1] == b_head


def test_a_reload_parses_while_git_answers_and_names_the_revision_it_loaded_or_refused(tmp_path: Path) -> None:
    """reload() starts git (the revision) and parses the changed files meanwhile: the state
    loaded carries the revision git gave, and a refused one is named in ``seen`` (what
    ``anycastctl status`` shows as the rejected revision), as when git answered first."""
    from controller.server.revision import revision

    d = _commit_a(tmp_path)
    watcher = Watcher(str(d), str(tmp_path / "state"))
    try:
        assert watcher.load().revision == git(d, "rev-parse", "HEAD")[:12]
        _write(d, 1)  # edited, not committed: "+dirty"
        watcher._dirty = True  # (what a notification does)
        edited = watcher.reload()
        assert edited is not None and edited.revision == revision(str(d)) and "+dirty." in edited.revision
        (d / "vips" / "f0.yaml").write_text("vips: [\n")  # broken
        watcher._dirty = True
        try:
            watcher.reload()
            raise AssertionError("a broken file loaded")
        except ConfigError:
            pass
        assert watcher.seen is not None and watcher.seen[1] == revision(str(d))
        _write(d, 1)
        git(d, "commit", "-qam", "B")
        watcher._dirty = True
        committed = watcher.reload()
        assert committed is not None and committed.revision == git(d, "rev-parse", "HEAD")[:12]
        assert committed.vips == edited.vips
    finally:
        watcher.close()


def _commit_a(tmp_path: Path, edit: Callable[[Path], None] | None = None) -> Path:
    """A checkout of the example with api-k in vips/f{k}.yaml (``edit`` run on it first),
    committed as A on main."""
    d = tmp_path / "desired"
    shutil.copytree(EXAMPLE, d)
    if edit is not None:
        edit(d)
    _write(d, 0)
    git(d, "init", "-q", "-b", "main")
    git(d, "add", "-A")
    git(d, "commit", "-qm", "A")
    return d


def _two_commits(tmp_path: Path, edit: Callable[[Path], None] | None = None) -> tuple[Path, str, str]:
    """A checkout on commit A (api-k in f{k}), and branch ``next`` at commit B (api-k one file
    further). Returns the directory and A's and B's revisions."""
    d = _commit_a(tmp_path, edit)
    a_head = git(d, "rev-parse", "HEAD")[:12]
    git(d, "checkout", "-qb", "next")
    _write(d, 1)
    git(d, "commit", "-qam", "B")
    b_head = git(d, "rev-parse", "HEAD")[:12]
    git(d, "checkout", "-q", "main")
    return d, a_head, b_head


def test_a_reload_that_read_a_checkout_half_way_loads_nothing_and_looks_again(tmp_path: Path, monkeypatch) -> None:
    """A reload already reading the files when a checkout begins (the periodic look, the
    start-up mark, a change just before: GitLock only holds back a reload's start) reads a
    tree half-written: here f0.yaml removed, index.lock there. It must not load it (api-0
    would be withdrawn at every POP) nor refuse it: it loads nothing, and the next look,
    once git is done, loads the commit checked out."""
    d, _, b_head = _two_commits(tmp_path)
    watcher = Watcher(str(d), str(tmp_path / "state"))
    try:
        assert watcher.load().vip("api-0") is not None
        real = daemon.fingerprint
        lock = d / ".git" / "index.lock"

        def mid_checkout(directory: str, contents: dict[str, bytes] | None = None,
                         stats: FileStats | None = None) -> str:
            monkeypatch.setattr(daemon, "fingerprint", real)  # (once)
            lock.write_bytes(b"")  # git's checkout has begun: the lock taken, a file removed
            (d / "vips" / "f0.yaml").unlink()
            return real(directory, contents, stats)
        monkeypatch.setattr(daemon, "fingerprint", mid_checkout)
        watcher._dirty = True  # (a notification, or the periodic look)
        assert watcher.reload() is None  # nothing loaded, nothing refused
        assert watcher.unsettled and watcher.pending()
        lock.unlink()
        git(d, "checkout", "-qf", "next")  # the checkout ends
        check(watcher.settle)
        new = watcher.reload()
        assert new is not None and new.revision == b_head
        assert all(new.vip(f"api-{k}") is not None for k in range(FILES))
        assert watcher.seen is not None and watcher.seen[0] == fingerprint(str(d))
    finally:
        watcher.close()


def test_a_commit_during_a_reload_is_named_by_its_revision_not_as_dirty(tmp_path: Path, monkeypatch) -> None:
    """`git commit -a` while a reload runs git: the index read before the commit, HEAD after
    it, so git said "<new commit>+dirty" of the commit's own content (seen in CI: the lab's
    s7 plan named so). The read moved under it (HEAD's ref and the index did): nothing is
    loaded, and the next look names the commit."""
    d, a_head, _ = _two_commits(tmp_path)
    watcher = Watcher(str(d), str(tmp_path / "state"))
    try:
        watcher.load()
        _write(d, 1)  # an operator's edit, about to be committed
        real = IndexCopy.path

        def then_commit(self: IndexCopy) -> str | None:
            monkeypatch.setattr(IndexCopy, "path", real)  # (once)
            copy = real(self)  # the index as it was
            git(d, "commit", "-qam", "C")  # the commit lands before git's rev-parse runs
            return copy
        monkeypatch.setattr(IndexCopy, "path", then_commit)
        edited_fp = fingerprint(str(d))
        revisions = []
        watcher._dirty = True
        for _ in range(3):
            new = watcher.reload()
            if new is not None:
                revisions.append(new.revision)
            elif watcher.unsettled:
                check(watcher.settle)
        c_head = git(d, "rev-parse", "HEAD")[:12]
        assert revisions and revisions[-1] == c_head, revisions
        # Each revision loaded is true of what was read: the commit's, or A's "+dirty" edit.
        assert set(revisions) <= {c_head, f"{a_head}+dirty.{edited_fp[:8]}"}, revisions
    finally:
        watcher.close()


def test_a_lock_a_killed_git_left_does_not_hold_the_start(tmp_path: Path, monkeypatch) -> None:
    """An index.lock an hour old that no process holds (git killed half-way) is not a git
    writing the checkout: the start-up load reads once, without waiting GIT_LOCK_WAIT for it."""
    import os
    import time

    d, a_head, _ = _two_commits(tmp_path)
    lock = d / ".git" / "index.lock"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 3600,) * 2)

    watcher = Watcher(str(d), str(tmp_path / "state"))
    reads = []
    real = watcher._load
    monkeypatch.setattr(watcher, "_load", lambda **kw: reads.append(kw) or real(**kw))
    try:
        assert watcher.load_at_start().revision == a_head
        assert reads == [{}], reads  # one read, not read again while waiting for the lock
        assert watcher.git_lock.stale == os.path.realpath(lock)
    finally:
        watcher.close()


def test_reads_that_keep_moving_are_loaded_after_the_bound(tmp_path: Path, monkeypatch) -> None:
    """Something rewriting the files faster than a reload reads them must not hold every
    reload back for good: once reads have moved under them for GIT_LOCK_WAIT, what is there
    is loaded (the old behaviour, with a warning)."""
    import time

    d, _, _ = _two_commits(tmp_path)
    watcher = Watcher(str(d), str(tmp_path / "state"))
    try:
        watcher.load()
        real = daemon.fingerprint

        def rewriting(directory: str, contents: dict[str, bytes] | None = None,
                      stats: FileStats | None = None) -> str:
            fp = real(directory, contents, stats)
            f7 = d / "vips" / "f7.yaml"
            f7.write_text(f7.read_text() + "\n")  # (moved again while read)
            return fp
        monkeypatch.setattr(daemon, "fingerprint", rewriting)
        _write(d, 1)
        watcher._dirty = True
        assert watcher.reload() is None and watcher.unsettled
        watcher._unsettled_since = time.monotonic() - daemon.GIT_LOCK_WAIT  # (GIT_LOCK_WAIT of discards)
        new = watcher.reload()
        assert new is not None and all(new.vip(f"api-{k}") is not None for k in range(FILES))
    finally:
        watcher.close()


def test_a_wait_on_a_lock_git_holds_does_not_count_toward_the_bound(tmp_path: Path, monkeypatch) -> None:
    """The bound on back-to-back discards is for reads that keep moving; a read discarded
    because git holds index.lock is settle()'s to wait out however long git takes, so after a
    long checkout the next read is still checked, not loaded as it is."""
    import time

    d, _, _ = _two_commits(tmp_path)
    watcher = Watcher(str(d), str(tmp_path / "state"))
    try:
        watcher.load()
        watcher._unsettled_since = time.monotonic() - 1  # (an earlier discard, of moving files)
        lock = d / ".git" / "index.lock"
        lock.write_bytes(b"")  # a git at work (a fresh lock)
        _write(d, 1)
        watcher._dirty = True
        assert watcher.reload() is None and watcher.unsettled
        assert watcher._unsettled_since is None
    finally:
        watcher.close()


def test_a_linked_worktree_s_branch_moving_is_noticed(tmp_path: Path) -> None:
    """A checkout made by `git worktree add`: its git directory is .git/worktrees/NAME, its
    branch's ref and packed-refs are in the main repository's. The stat data must include
    those (they were looked for in the worktree's git directory, where they never are): a
    `git reset --soft` moves only the branch, and the periodic look missed it for good."""
    main = _commit_a(tmp_path)
    git(main, "commit", "-q", "--allow-empty", "-m", "B")
    linked = tmp_path / "linked"
    git(main, "worktree", "add", "-q", "-b", "pop", str(linked))
    watcher = Watcher(str(linked), str(tmp_path / "state"))
    try:
        first = watcher.load()
        assert first.revision == git(linked, "rev-parse", "HEAD")[:12]
        before = watcher._stat_signature()
        git(linked, "reset", "-q", "--soft", "HEAD~1")  # the branch moves, index and files do not
        assert watcher._stat_signature() != before
        assert daemon._Relevant(os.path.realpath(linked), daemon.git_dir(str(linked)))(
            daemon.Change.modified, os.path.realpath(main / ".git" / "refs" / "heads" / "pop"))
        watcher._checked -= daemon.RECHECK  # the periodic look is due
        assert watcher.changed()
        new = watcher.load()
        assert new.revision != first.revision and new.revision.startswith(git(linked, "rev-parse", "HEAD")[:12])
    finally:
        watcher.close()


def test_the_serving_loop_discards_a_half_read_checkout_and_serves_the_commit_once_git_is_done(
        tmp_path: Path, monkeypatch) -> None:
    """serve() itself (in process, plain HTTP on loopback): a reload reads the checkout while
    git writes it (index.lock there, f0.yaml gone). The served config stays commit A while the
    lock is there (not the half tree: api-0 would be withdrawn everywhere, and nothing refused);
    once the lock goes and the checkout ends, the loop reloads by itself and serves commit B.
    The watcher's own watch is off here, so only the loop's settle-then-look path can do it."""
    import aiohttp

    from tests.helpers.controller_process import free_ports

    def plain_http(d: Path) -> None:
        conf = yaml.safe_load((d / "controller.yaml").read_text())
        conf["api"].pop("tls", None)
        conf["state_dir"] = str(tmp_path / "state")
        conf["listen"], conf["metrics_listen"] = "127.0.0.1:9800", "127.0.0.1:9801"  # (the ports given to serve())
        (d / "controller.yaml").write_text(yaml.safe_dump(conf))

    d, a_head, b_head = _two_commits(tmp_path, plain_http)
    token = (EXAMPLE / "lab-tokens" / "operator.token").read_text().strip()
    port, mport = free_ports(2)
    lock = d / ".git" / "index.lock"

    async def no_watch(self: Watcher, poke: asyncio.Event) -> None:
        await asyncio.Event().wait()
    monkeypatch.setattr(Watcher, "poke_on_change", no_watch)
    real = daemon.fingerprint
    armed, read_half = [False], [False]

    def mid_checkout(directory: str, contents: dict[str, bytes] | None = None,
                     stats: FileStats | None = None) -> str:
        if armed[0]:
            armed[0] = False
            lock.write_bytes(b"")  # git's checkout has begun: the lock taken, a file removed
            (d / "vips" / "f0.yaml").unlink()
            read_half[0] = True
        return real(directory, contents, stats)
    monkeypatch.setattr(daemon, "fingerprint", mid_checkout)
    watcher = Watcher(str(d), str(tmp_path / "state"))

    async def scenario() -> None:
        stop = asyncio.Event()
        serving = asyncio.ensure_future(daemon.serve(watcher, ("127.0.0.1", port), ("127.0.0.1", mport), stop=stop))
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            async def status() -> dict | None:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/v1/status") as r:
                        return await r.json() if r.status == 200 else None
                except aiohttp.ClientError:
                    return None
            try:
                first = None
                async with asyncio.timeout(HANG_GUARD):
                    while first is None:
                        assert not serving.done(), serving
                        first = await status()
                        await asyncio.sleep(0.05)
                assert first["config"]["revision"] == a_head
                armed[0] = True
                watcher._dirty = True  # (a notification: the loop reloads at its next turn)
                # (pending again: the discarded read marked the next look)
                await until(lambda: read_half[0] and watcher.pending(), "the reload read the half checkout")
                mid = await status()  # (while the lock is there: nothing reloaded, nothing refused)
                assert mid is not None and mid["config"]["revision"] == a_head and not mid["config"]["last_error"]
                assert {v["vip"] for v in mid["vips"]} >= {f"api-{k}" for k in range(FILES)}
                lock.unlink()
                git(d, "checkout", "-qf", "next")  # the checkout ends
                async def served_b() -> bool:
                    s = await status()
                    return s is not None and s["config"]["revision"] == b_head
                async with asyncio.timeout(HANG_GUARD):  # (a hang guard, never a slow one)
                    while not await served_b():
                        assert not serving.done(), serving
                        await asyncio.sleep(0.05)
                end = await status()
                assert end is not None and not end["config"]["last_error"] and end["config"]["reload_failures"] == 0
                assert {v["vip"] for v in end["vips"]} >= {f"api-{k}" for k in range(FILES)}
            finally:
                stop.set()
                assert await serving == 0

    check(scenario)
