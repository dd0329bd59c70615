"""The controller daemon: watch the config directory, plan on every event and timer (only
what changed), serve plans over HTTP, export metrics.

A config that fails to load at start is served from the last good desired state kept in
the state directory (the error shown in ``anycastctl status``); fatal only if none was
ever kept. Later, a bad revision is logged, counted and shown in ``anycastctl status``;
the last good desired state keeps being served.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, start_http_server

from ..config.desired import LoadCache, load_desired, read_state_dir
from ..config.desired_model import ApiTransport, DesiredState, api_transport, plain_http_refusal
from ..config.errors import ConfigError, ConfigIssue
from ..metrics.central import ControllerMetrics
from ..sdnotify import Notifier
from .app import GUARD, LOOP_LAG, SIGNER, TRANSPORT, Handler, make_app
from .guard import ConnectionGuard, RateLimitedLoopErrors, bounded_by_descriptors, is_accept_error
from .inotify import OVERFLOW, Change, Inotify
from .looplag import LAG_EVERY, LoopLag
from . import store
from .core import Controller
from .revision import FileStats, IndexCopy, common_dir, fingerprint, git_dir, revision, revision_started, stat_signature
from .signing import PlanSigner, load_signing_key
from .tls import ServerTls

log = logging.getLogger("controller.server")
TICK = 1.0  # look at the config and the engine's timers at least this often
WATCH = 0.1  # stat polling looks this often, and a change it sees must have settled this long
INOTIFY_QUIET_MS = 10  # inotify: events are grouped until none came for this long. A git command
# that writes the checkout (checkout, reset, merge, commit -a) holds .git/index.lock throughout:
# the reload waits for it to go (GitLock.settled), so a checkout is one reload however long the
# gaps between its writes on a loaded machine; the window is for a writer without a lock (an
# editor's rename, one file). It was 50 ms: 50-100 ms of every commit's latency (watchfiles
# returns a batch one step after the last step that saw a new event).
INOTIFY_DEBOUNCE = 1.0  # s: a batch of changes that never goes quiet is handed on after this long
GIT_LOCK_WAIT = 10.0  # s: the longest index.lock holds a reload back; a lock older and held by no process: none (GitLock)
RECHECK = 30.0  # look at content and commit this often even without a notification
TRIM_EVERY = 10.0  # give free heap pages back to the system this often (_release_free_memory)


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, or nothing where the C library has none (musl)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def release() -> None:
        trim(0)
    return release


# Python frees large objects (plan bodies, decoded reports, parsed YAML) to the C heap, which
# keeps the pages: at 10,000 VIPs x 50 POPs ~40-50 MB of RSS stayed after the burst of first
# reports or a reload. malloc_trim hands them back (~1 ms; nothing to do costs ~0.2 ms).
_release_free_memory = _malloc_trim()


# Set by the daemon's entry point (cli/controller_main.py), not by code that runs serve() in
# a process of its own (tests): see _freeze_heap.
FREEZE_HEAP = False
# The event loop's lag sampled every this many seconds (server/looplag.py; anycast-controller
# --loop-lag-every; 0: not sampled, /v1/status event_loop null, the metric without samples).
LOOP_LAG_EVERY = LAG_EVERY


# How often a freeze first unfreezes and collects the whole heap (see _freeze_heap).
FULL_COLLECTION_EVERY = 3600.0
_last_full: list[float] = []  # when the last full collection ran (monotonic), once one has


def _freeze_heap(now: Callable[[], float] = time.monotonic) -> None:
    """Move every object alive now out of cyclic garbage collection (``gc.freeze``), after
    the start-up load and after each reload's apply_config: at 10,000 VIPs x 50 POPs the
    desired state, its index and the plans are millions of objects that live until a reload
    replaces them, and each full collection scanned them all again (0.52 s on the event loop
    in bench.commit_latency, in a VIP's change at all 50 POPs). Reference counting still
    frees what a later reload drops; only objects in a reference cycle are never collected
    once frozen: a dropped desired state or load cache holds none and a reload makes none
    (tests/integration/test_controller_reload_cycles.py), but cyclic garbage of other code
    (a finished request's or task's) still uncollected at a freeze is kept: not counted yet;
    RSS across 20 commits moved as on main (results/README.md 3r). A young collection first
    (generations 0 and 1: thousands of objects, not the heap) frees the cyclic garbage that is
    recent, so what a freeze keeps is only what had already reached generation 2; a full
    collection would scan the whole heap on the event loop, so it runs (unfrozen first) only
    at a freeze FULL_COLLECTION_EVERY s or more after the last one."""
    if not FREEZE_HEAP:
        return
    t = now()
    if not _last_full:
        _last_full.append(t)
    elif t - _last_full[0] >= FULL_COLLECTION_EVERY:
        # What became cyclic garbage after an earlier freeze (a long-poll's request parked at
        # that moment, finished since) is never collected while frozen: at most once an hour,
        # at a reload, the whole heap is collected (0.5-0.7 s at 10,000 VIPs x 50 POPs).
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        _last_full[0] = t
        log.info("heap: a full garbage collection before freezing it again found %d unreachable objects in "
                 "%.0f ms (at most once every %.0f s, at a reload)", found, (time.perf_counter() - started) * 1000,
                 FULL_COLLECTION_EVERY)
    gc.collect(1)
    gc.freeze()


class ListenFailed(Exception):
    """An address the controller must listen on cannot be bound (in use, not local, no permission)."""

    def __init__(self, what: str, host: str, port: int, exc: OSError) -> None:
        super().__init__(f"cannot listen on {host}:{port} ({what}): {exc.strerror or exc}")


class Watcher:
    """Reload the desired state when the directory's content or git commit changes.

    A change is noticed by inotify (server/inotify.py: the kernel's queue read when the
    event loop sees its descriptor readable, the tree and new directories followed there;
    watchfiles, used before, woke every 10 ms to look for changes even when there were
    none), with stat polling as the fallback where inotify is unavailable
    (no inotify instances or watches left, some container file systems). Between
    notifications ``changed()`` costs nothing; every RECHECK seconds it looks anyway (a
    lost event, a queue overflow). Each successful load is kept in the state directory
    with its revision (``keep_last_good``): a controller restarted on a bad checkout starts
    on it instead of exiting.
    """

    def __init__(self, directory: str, state_dir: str | None = None, *, use_inotify: bool = True) -> None:
        self.directory = directory
        self.state_dir = state_dir
        self.seen: tuple[str, str] | None = None
        self.cache = LoadCache()  # unchanged files and VIPs are not read again on a reload
        self.use_inotify = use_inotify
        self.start_error: tuple[ConfigError, str] | None = None  # started on the kept state: why
        self.notifier = "none"  # how changes are noticed: inotify | stat-polling
        self._dirty = True  # something may have changed since seen was taken
        self._checked = 0.0  # monotonic time of the last full look
        # The stat data (stat_signature) as of the last full look: the periodic look reads and
        # hashes every file and runs git twice (~30-60 ms on the event loop at 10,000 VIPs)
        # only if these moved.
        self._signature: tuple[tuple[str, int, int, int], ...] | None = None
        self._git_dir: str | None | bool = False  # False: not asked yet
        self._where: str | None = None  # the real path _git_dir was asked for (the directory may be a symlink re-pointed)
        self._index: IndexCopy | None = None  # the git index's copy status refreshes (revision.IndexCopy)
        self._to_keep: tuple[str, str, dict[str, str]] | None = None  # fingerprint, revision, files
        self._kept = ""  # fingerprint of the desired state kept last
        self._keeper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keep-desired")
        # HA (server/ha.py): keep the last good desired state in etcd too, and fetch it from
        # there at start when neither the checkout nor state_dir has a good one.
        self.also_keep: Callable[[str, dict[str, str]], None] | None = None
        self.fetch_kept: Callable[[], tuple[str, dict[str, str]] | None] | None = None
        # (fingerprint, revision) changed() saw; the revision None: its git commands run (_revision)
        self._peeked: tuple[str, str | None] | None = None
        self._revision: Callable[[], str] | None = None
        self._loaded: tuple[str, DesiredState] | None = None  # the last load's fingerprint and result
        self._contents: dict[str, bytes] = {}  # the files' bytes the last fingerprint read, for load()
        # Each file's stat data and digest as the last fingerprint read it: a reload reads the
        # files whose stat data moved (or that were racily clean), not the whole checkout.
        self._stats = FileStats()
        self.git_lock = GitLock(None)  # index.lock: what holds a reload back (_git_lock sets it)
        self.unsettled = False  # the last reload found what it read moving: settle() before the next
        self._unsettled_since: float | None = None  # monotonic time of the first of back-to-back discards
        self.batch_at = 0.0  # wall-clock time inotify's last batch of changes arrived (the reload's log line)

    def load(self) -> DesiredState:
        """The desired state on disk now, with its revision. A read that moved under it (a git
        command writing the checkout: index.lock there, or the stat data of the files or of
        git's HEAD, refs and index moved while the files were read and git answered) is not
        loaded: read again once settled. After GIT_LOCK_WAIT of that, what is there is loaded,
        with a warning (the watch reloads it once git is done)."""
        waited = time.monotonic()
        while True:
            try:
                return self._load()
            except _Unsettled as exc:
                if time.monotonic() - waited >= GIT_LOCK_WAIT:
                    log.warning("%s for %.0fs: loaded as it is (a serving controller's watch loads it again once "
                                "git is done; a follower at its next SIGHUP)", exc, GIT_LOCK_WAIT)
                    return self._load(settled_only=False)
                time.sleep(WATCH)

    def _load(self, settled_only: bool = True) -> DesiredState:
        """One look and load. ``settled_only``: raise _Unsettled, and change nothing the next
        look compares with, if what was read moved under it (see load)."""
        # What changed() just computed, if it did (hashing every file and two git commands:
        # ~30-60 ms a reload that need not be paid twice), else now.
        seen_before, self.unsettled = self.seen, False
        peeked, self._peeked = self._peeked, None
        pending, self._revision = self._revision, None
        if peeked is None:
            self._dirty = False  # (before the reads, as in changed())
        signature = self._stat_signature() if peeked is None else self._signature
        if peeked is None:
            self._contents = {}
        fp, rev = peeked if peeked is not None else (
            fp := fingerprint(self.directory, self._contents, self._stats),
            revision(self.directory, fp, self._index_copy()))
        contents, self._contents = self._contents, {}
        self._signature, self._checked = signature, time.monotonic()

        def revision_now() -> str:
            nonlocal rev
            if rev is None:  # (git ran while the files were parsed)
                assert pending is not None
                rev = pending()
            self.seen = (fp, rev)
            return rev
        if rev is not None:
            revision_now()
        if self._loaded is not None and self._loaded[0] == fp:
            # The same files (their names and bytes: all the loader reads), a new revision: a
            # commit of what was loaded as "+dirty" a moment before (an operator's edit, then
            # its commit). Not read again: the walk of 10,000 cached VIPs was ~0.1 s.
            desired = dataclasses.replace(self._loaded[1], revision=revision_now())
        else:
            self.cache.prefetched = contents  # (the bytes just hashed: not read again)
            self.cache.digests_now = self._stats.digests  # (and the files not read: as loaded last?)
            refused: ConfigError | None = None
            try:
                desired = load_desired(self.directory, rev or "", self.cache)
            except ConfigError as exc:
                refused = exc
            except Exception as exc:  # noqa: BLE001 - a loader bug refuses the revision, never ends the controller
                log.exception("loading config revision %s failed unexpectedly", rev or "(git still answering)")
                refused = ConfigError(self.directory, [ConfigIssue(
                    "", f"the loader failed unexpectedly ({type(exc).__name__}: {str(exc)[:300]}); please report it")])
                refused.__cause__ = exc
            finally:
                revision_now()  # (also for a refused load: ``seen`` names the revision refused)
            if refused is not None:
                if settled_only:
                    self._unsettled(signature, seen_before)  # (a checkout half-written: not refused)
                raise refused
            if desired.revision != revision_now():
                desired = dataclasses.replace(desired, revision=revision_now())
            if self.state_dir:
                desired = dataclasses.replace(desired, state_dir=self.state_dir)
        rev = revision_now()
        if settled_only:
            self._unsettled(signature, seen_before)
        self._loaded = (fp, desired)
        self._to_keep = (fp, rev, {name: text for name, (text, _) in self.cache.files.items()})
        self.start_error = None
        return desired

    def load_at_start(self) -> DesiredState:
        """load(), or, if the checkout does not load, the last good desired state kept in the
        state directory (``start_error`` says why); ConfigError if there is none."""
        try:
            return self.load()
        except ConfigError as exc:
            state_dir = self.state_dir or read_state_dir(self.directory)
            kept = store.saved_desired(state_dir)
            if kept is None and self.fetch_kept is not None and (fetched := self.fetch_kept()) is not None:
                try:
                    store.save_desired(state_dir, *fetched)
                    kept = store.saved_desired(state_dir)
                except store.PersistenceError as keep_error:
                    log.error("cannot keep the desired state fetched from etcd: %s", keep_error)
            if kept is None:
                raise
            kept_dir, kept_rev = kept
            try:
                desired = load_desired(kept_dir, kept_rev)
            except ConfigError:
                log.error("the desired state kept in %s does not load either", kept_dir)
                raise exc from None
            log.error("config revision %s does not load; starting on the last good revision %s kept in %s",
                      self.seen[1] if self.seen else "?", kept_rev, kept_dir)
            self.start_error = (exc, self.seen[1] if self.seen else "?")
            self._kept = ""
            return dataclasses.replace(desired, directory=self.directory, state_dir=state_dir)

    def kept_base(self, desired: DesiredState, source: store.Store | None = None) -> DesiredState | None:
        """The last revision applied everywhere, if it is not ``desired`` (a change committed
        while no controller ran, or one held or rolling out when it stopped: judged against
        it, see policy/change.py); None if none loads. ``source``: the store that keeps it
        (HA: etcd, so a new leader continues or rolls back the old leader's rollout); its copy
        is written to the state directory first if that holds another (the files load from there)."""
        state_dir = desired.state_dir
        if source is not None and (kept_files := source.kept_desired()) is not None:
            local = store.saved_desired(state_dir)
            if kept_files[0] != desired.revision and (local is None or local[1] != kept_files[0]):
                try:
                    store.save_desired(state_dir, *kept_files)
                except store.PersistenceError as exc:
                    log.error("cannot keep the applied desired state %s from the store here: %s", kept_files[0], exc)
                    return None
            if kept_files[0] == desired.revision:
                return None
        kept = store.saved_desired(state_dir)
        if kept is None or kept[1] == desired.revision:
            return None
        kept_dir, kept_rev = kept
        try:
            base = load_desired(kept_dir, kept_rev)
        except ConfigError as exc:
            log.error("the applied desired state kept in %s does not load (%s): revision %s is applied as it is",
                      kept_dir, exc.summary(), desired.revision)
            return None
        return dataclasses.replace(base, directory=self.directory, state_dir=state_dir)

    def keep_last_good(self, state_dir: str, on_error: Callable[[store.PersistenceError], None]) -> None:
        """Keep what load() read last in ``state_dir`` (in a thread: a reload's plans are not
        held up by it), unless it is kept already. Call it only while holding the state
        directory (a second controller must not write there)."""
        if self._to_keep is None or self._to_keep[0] == self._kept:
            return
        fp, rev, files = self._to_keep
        self._kept = fp

        also = self.also_keep

        def keep() -> None:
            try:
                store.save_desired(state_dir, rev, files)
                if also is not None:
                    also(rev, files)
            except store.PersistenceError as exc:
                loop.call_soon_threadsafe(on_error, exc)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            try:
                store.save_desired(state_dir, rev, files)
                if also is not None:
                    also(rev, files)
            except store.PersistenceError as exc:
                on_error(exc)
            return
        self._keeper.submit(keep)

    def _unsettled(self, before: tuple[tuple[str, int, int, int], ...] | None,
                   seen: tuple[str, str] | None) -> None:
        """Raise _Unsettled, ``seen`` put back and the next look marked, if a git command is
        writing the checkout now or the stat data moved since ``before`` (taken before the
        files were read): the files, HEAD and the revision git gave may be of different
        moments (a checkout half-written: a VIP missing; or a commit's new HEAD against the
        index before it: its content named "+dirty")."""
        lock = self._git_lock()
        locked = lock.busy()
        why = (f"{lock.path} is there (a git command writing the checkout)" if locked else
               "the files or git's HEAD, refs or index changed while they were read"
               if self._stat_signature() != before else None)
        if why is not None:
            self.seen, self._dirty, self.unsettled = seen, True, True
            raise _Unsettled(f"{self.directory}: {why}", locked=locked)

    def watch_status(self) -> dict[str, Any]:
        """``anycastctl status``'s config.watch: how changes are noticed (inotify, stat-polling,
        or none before the watch is set up), and the path of an index.lock given up on (a git
        killed half-way left it: remove it if no git runs there), else null."""
        return {"notifier": self.notifier, "stale_git_lock": self.git_lock.stale}

    def _git_lock(self) -> GitLock:
        """The GitLock of the checkout (one, so a lock given up on stays given up on)."""
        gd = self._gd()  # (first: a re-pointed directory's drops the old lock)
        if self.git_lock.path is None and gd:
            self.git_lock = GitLock(gd)
        return self.git_lock

    async def settle(self) -> None:
        """After a reload found what it read moving (``unsettled``): return once no git
        command writes the checkout (GitLock.settled), and a stat-polling window more."""
        self.unsettled = False
        await self._git_lock().settled()
        await asyncio.sleep(WATCH)

    def close(self) -> None:
        self._keeper.shutdown(wait=True)
        if self._index is not None:
            self._index.close()

    def _gd(self) -> str | None:
        """The checkout's git directory (None outside git), asked once per place the config
        directory leads to: a directory that is a symlink re-pointed (``/etc/anycast ->
        release-N``, ``ln -sfn`` to another checkout) is asked again, and what was kept for
        the git directory before (the index's copy, index.lock's GitLock) is dropped with it."""
        where = os.path.realpath(self.directory)
        if self._git_dir is False or where != self._where:
            gd = git_dir(self.directory)
            if self._git_dir is not False and gd != self._git_dir:
                old, self._index = self._index, None
                if old is not None:
                    old.close()
                self.git_lock = GitLock(None)  # (_git_lock makes the new one's)
                self._signature = None  # (the periodic look compares afresh)
            self._git_dir, self._where = gd, where
        assert not isinstance(self._git_dir, bool)
        return self._git_dir

    def _index_copy(self) -> IndexCopy | None:
        """The IndexCopy git status reads (None outside git)."""
        gd = self._gd()
        if self._index is None and gd:
            under = os.path.join(self.state_dir, "git-index") if self.state_dir else None
            self._index = IndexCopy(gd, under)
        return self._index

    def _stat_signature(self) -> tuple[tuple[str, int, int, int], ...]:
        return stat_signature(self.directory, self._gd())

    def pending(self) -> bool:
        """Whether changed() has anything to look at (a notification, or the periodic look is due)."""
        return self._dirty or time.monotonic() - self._checked >= RECHECK

    def reload(self, forced: bool = False) -> DesiredState | None:
        """load() if ``forced`` (SIGHUP) or changed(), else None. The daemon runs it in a worker
        thread: hashing every file and two git commands (~20-60 ms under load) no longer hold
        up the event loop, nor the pass of the reload before. None too if what it read moved
        under it (``unsettled``: await settle(), then reload again)."""
        if forced:
            # SIGHUP reads and hashes every file again, whatever its stat data say: the
            # operator's way past a filesystem whose stat data lag its content (NFS's attribute
            # cache, a FUSE attr_timeout, a clock behind the host's). The loader still takes a
            # file whose bytes hash to the digest it loaded last without decoding it.
            self._stats = FileStats()
        if not (forced or self.changed(overlap=True)):
            return None
        now = time.monotonic()
        if self._unsettled_since is not None and now - self._unsettled_since >= GIT_LOCK_WAIT:
            # (something rewrites the files faster than a reload reads them: load what is there)
            log.warning("%s: every read for %.0fs moved under it; loading it as it is", self.directory, GIT_LOCK_WAIT)
            self._unsettled_since = None
            return self._load(settled_only=False)
        try:
            desired = self._load()
        except _Unsettled as exc:
            # (the bound is for reads that keep moving: a lock git holds is waited for, settle())
            if exc.locked:
                self._unsettled_since = None
            elif self._unsettled_since is None:
                self._unsettled_since = now
            log.info("%s: not loaded; looked at again once git is done", exc)
            return None
        self._unsettled_since = None
        return desired

    def changed(self, overlap: bool = False) -> bool:
        """Whether the files or the commit differ from what load() read last. ``overlap``: if
        the files do, True without waiting for git, and the load that must follow parses them
        while git says the revision (reload())."""
        if not self._dirty and time.monotonic() - self._checked < RECHECK:
            return False
        # (cleared before the stat data is taken, and that before the content: a notification
        # from here on marks the next look, a change made meanwhile moves the stat data again)
        dirty, self._dirty = self._dirty, False
        signature = self._stat_signature()
        if not dirty and signature == self._signature:
            self._checked = time.monotonic()  # the periodic look: nothing moved on disk
            return False
        self._checked, self._signature = time.monotonic(), signature
        self._contents = {}
        fp = fingerprint(self.directory, self._contents, self._stats)
        if overlap and (self.seen is None or fp != self.seen[0]):
            self._peeked, self._revision = (fp, None), revision_started(self.directory, fp, self._index_copy())
            return True
        now = (fp, revision(self.directory, fp, self._index_copy()))
        self._peeked = now if now != self.seen else None  # load() follows at once
        return now != self.seen

    async def poke_on_change(self, poke: asyncio.Event) -> None:
        """Set ``poke`` when a config file or the git checkout's state looks different and
        has stayed so for WATCH seconds (a checkout writing several files is not caught
        half-way); the daemon then checks content and commit with changed()."""
        gd = self._gd()
        if self.use_inotify:
            try:
                while True:
                    try:
                        # (returns when the directory watched is gone, or a symlink to it re-pointed)
                        repointed = await self._inotify(poke, gd)
                    except FileNotFoundError:
                        if os.path.isdir(self.directory):
                            raise
                        repointed = False
                        # (removed again between its coming back and its watch: wait for it again)
                    self.notifier = "stat-polling"
                    while not os.path.isdir(self.directory):
                        await asyncio.sleep(WATCH)
                    gd = self._gd()  # (another checkout's git directory, maybe: what was kept for the old one dropped)
                    if repointed:
                        log.info("%s leads to %s now: watching it with inotify", self.directory,
                                 os.path.realpath(self.directory))
                    else:
                        log.info("%s is there again: watching it with inotify", self.directory)
            except (OSError, RuntimeError) as exc:  # inotify cannot start (no instances or watches left)
                log.warning("inotify unavailable for %s (%s): polling stat data every %.1fs instead",
                            self.directory, exc, WATCH)
        await self._poll(poke, gd)

    def _mark(self, poke: asyncio.Event) -> None:
        self._dirty = True
        poke.set()

    async def _inotify(self, poke: asyncio.Event, gd: str | None) -> bool:
        """Mark and poke after each batch of relevant changes (one that is followed by
        INOTIFY_QUIET_MS with none, or INOTIFY_DEBOUNCE after its first), once no git command
        holds the checkout. The kernel's queue is read when its descriptor is readable
        (server/inotify.py): nothing wakes the loop while nothing changes. Returns when the
        directory is gone (False) or is a symlink that was re-pointed, removed or made again
        (True: ``ln -sfn release-8 /etc/anycast``; the tree watched is where it led before,
        whose changes no longer matter, and the new one's were never seen): watched anew."""
        top = os.path.realpath(self.directory)
        relevant = _Relevant(top, gd)
        ino = Inotify()
        try:
            # The config tree without its hidden directories (a checkout's .git among them:
            # none of their files is relevant), and of git what a commit, checkout or reset
            # moves: the git directory itself (HEAD, index, packed-refs) and its refs, for
            # a linked worktree also the common directory's.
            ino.add_links(self.directory)  # (the directory a symlink: its re-pointing; first, see below)
            ino.add(top, prune=lambda path: os.path.basename(path).startswith("."))
            if gd:
                for d in sorted({os.path.realpath(gd), os.path.realpath(common_dir(gd))}, key=len):
                    ino.add(d, recursive=False)
                    if os.path.isdir(os.path.join(d, "refs")):
                        ino.add(os.path.join(d, "refs"))
        except OSError:
            ino.close()
            raise
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        seen = False  # a relevant change was read since the last mark

        def on_readable() -> None:
            # The queue is read here, not where the batch is handled: while that waits
            # (GitLock.settled: a git command holding index.lock) a descriptor left readable
            # would call this every turn of the loop (a whole core spinning).
            nonlocal seen
            try:
                changes = ino.read()
            except OSError as exc:
                log.warning("reading inotify's queue for %s failed (%s): looking at everything", top, exc)
                changes = [OVERFLOW]
            if any(c is OVERFLOW or relevant(*c) for c in changes):
                seen = True
            ready.set()
        loop.add_reader(ino.fd, on_readable)
        try:
            self.notifier = "inotify"
            self._git_lock()
            self._mark(poke)  # anything between load() and the watch being set up
            if os.path.realpath(self.directory) != top:
                return True  # (re-pointed while the tree was walked, before its link's watch saw it: anew)
            while True:
                await ready.wait()
                ready.clear()
                if not seen:
                    continue
                first = time.monotonic()
                while time.monotonic() - first < INOTIFY_DEBOUNCE:
                    try:
                        await asyncio.wait_for(ready.wait(), INOTIFY_QUIET_MS / 1000)
                    except TimeoutError:
                        break  # quiet for the window: the batch is whole
                    ready.clear()
                self.batch_at = time.time()
                await self.git_lock.settled()
                seen = False  # (what came while git held the checkout: the mark below covers it)
                ready.clear()
                self._mark(poke)
                if ino.repointed:
                    return True
                if ino.lost:
                    log.warning("%s is gone (deleted or moved away): watched again once it is there",
                                ", ".join(sorted(ino.lost)))
                    return False
        finally:
            loop.remove_reader(ino.fd)
            ino.close()

    async def _poll(self, poke: asyncio.Event, gd: str | None) -> None:
        self.notifier = "stat-polling"
        self._git_lock()
        last = stat_signature(self.directory, gd)
        self._mark(poke)
        while True:
            await asyncio.sleep(WATCH)
            gd = self._gd()  # (the directory a symlink re-pointed: its git directory now)
            now = stat_signature(self.directory, gd)
            if now == last:
                continue
            while True:
                await asyncio.sleep(WATCH)
                settled = stat_signature(self.directory, gd)
                if settled == now:
                    break
                now = settled
            last = now
            self._mark(poke)


def _lock_held(path: str) -> bool | None:
    """Whether a process has ``path`` open (git keeps its index.lock open while it works);
    None if some process's descriptors could not be read (another user's git: cannot tell)."""
    unknown = False
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            unknown = True
            continue
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    return True
            except OSError:
                continue
    return None if unknown else False


class _Unsettled(Exception):
    """What a load read moved under it (Watcher._unsettled): not loaded, read again.
    ``locked``: a git command holds index.lock (settle() waits for it however long it takes)."""

    def __init__(self, message: str, locked: bool) -> None:
        super().__init__(message)
        self.locked = locked


class GitLock:
    """``index.lock`` as a reload sees it. While it exists a git command is writing the checkout
    (checkout, reset, merge, commit -a write the work tree and index under it): the reload
    waits for it to go. A lock left by a killed git stays for good (git itself refuses to run
    then, so the operator hears of it): it held every reload GIT_LOCK_WAIT s. Now a lock is
    given up on, once, with one warning naming it, when it has been waited on that long, or
    when first seen its mtime is that old and no process holds it open; the same lock (inode
    and mtime unchanged) then holds no reload again. ``stale`` names it while it is there (the
    warning says it once; not yet in the status JSON). A lock a process holds open is never
    given up on (see settled)."""

    def __init__(self, gd: str | None, wait: float = GIT_LOCK_WAIT, *,
                 now: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 held: Callable[[str], bool | None] = _lock_held) -> None:
        self.path = os.path.join(os.path.realpath(gd), "index.lock") if gd else None
        self.wait = wait
        self._now, self._clock, self._sleep, self._held = now, clock, sleep, held
        self._given_up: tuple[int, int] | None = None  # (inode, mtime_ns) of the lock given up on
        self.stale: str | None = None  # the path of a lock given up on, while it is there

    def _key(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def busy(self) -> bool:
        """Whether index.lock is there and is not the one given up on: a git command may be
        writing the checkout (what a read finds may be half-written)."""
        if self.path is None:
            return False
        key = self._key()
        if key is None or key == self._given_up:
            return False
        self._forget_gone()
        age = self._old(key)
        return not (age is not None and self._held(self.path) is False and self._left(key, age))

    def _forget_gone(self) -> None:
        """A lock other than the one given up on is seen: that one went."""
        if self._given_up is not None:
            self._given_up = self.stale = None

    def _old(self, key: tuple[int, int]) -> float | None:
        """The lock's age by its mtime if it is GIT_LOCK_WAIT old (the first-sight rule's
        first half: then, if no process holds it open, a killed git left it), else None."""
        age = self._now() - key[1] / 1e9
        return age if age >= self.wait else None

    def _left(self, key: tuple[int, int], age: float) -> bool:
        """Give up on the lock ``key``, found ``age`` old and held by no process; True."""
        self._give_up(key, f"has not changed for {age:.0f}s and no process holds it open")
        return True

    def _give_up(self, key: tuple[int, int], why: str) -> None:
        self._given_up, self.stale = key, self.path
        log.warning("%s %s: reloads no longer wait for it (a git command killed half-way? remove it if no git "
                    "runs in the checkout)", self.path, why)

    async def _held_now(self) -> bool | None:
        assert self.path is not None
        return await asyncio.to_thread(self._held, self.path)  # (a walk of /proc: not on the loop)

    async def settled(self) -> None:
        """Return once no git command is writing the checkout (then one quiet window more: a
        checkout moves HEAD just after it lets the index go), or the lock is given up on.

        Given up on only when no process is known to hold it: at first sight if its mtime is
        GIT_LOCK_WAIT old and no process has it open (``_lock_held`` False; "cannot tell",
        another user's processes, is not enough), else after GIT_LOCK_WAIT of waiting (by the
        monotonic clock) unless a process is seen holding it then. A lock a running git holds
        is waited for however long it takes (a slow checkout must not be loaded half-written),
        with one warning per lock once the bound is passed."""
        if self.path is None:
            return
        key = self._key()
        if key is None:
            self.stale = None
            return
        step = INOTIFY_QUIET_MS / 1000
        since, first, told = self._clock(), True, False
        while key is not None:
            if key == self._given_up:
                return
            self._forget_gone()
            if first:
                first = False
                if (age := self._old(key)) is not None and await self._held_now() is False and self._left(key, age):
                    return
            waited = self._clock() - since
            if waited >= self.wait:
                held = await self._held_now()
                if held is not True:
                    self._give_up(key, f"has stayed for {waited:.0f}s" +
                                  ("" if held is False else " (whether a process holds it open cannot be told)"))
                    return
                if not told:
                    told = True
                    log.warning("%s is held open by a running process after %.0fs: reloads wait for it to go",
                                self.path, waited)
                since = self._clock()  # look again after another bound
            await self._sleep(step)
            new = self._key()
            if new is not None and new != key:
                since, first, told = self._clock(), True, False  # another git's lock
            key = new
        self.stale = None
        await self._sleep(step)


class _Relevant:
    """What a reload depends on: the YAML files (not in hidden directories) and the git files
    a commit, checkout or reset changes. The objects git writes are not."""

    def __init__(self, top: str, gd: str | None) -> None:
        self.top = top
        self.git = os.path.realpath(gd) if gd else None
        self.common = os.path.realpath(common_dir(gd)) if gd else None  # (a linked worktree's branches)

    def __call__(self, change: Change, path: str) -> bool:
        if self.git and (path == self.git or path.startswith(self.git + os.sep)):
            rel = os.path.relpath(path, self.git)
            return rel in ("HEAD", "index", "packed-refs") or rel.startswith("refs" + os.sep)
        if self.common and self.common != self.git and path.startswith(self.common + os.sep):
            rel = os.path.relpath(path, self.common)
            return rel == "packed-refs" or rel.startswith("refs" + os.sep)
        rel = os.path.relpath(path, self.top)
        if rel.startswith(".."):
            return False
        if rel == ".":
            return change == Change.deleted  # (the directory itself deleted or moved away)
        parts = rel.split(os.sep)
        return not any(p.startswith(".") for p in parts) and (parts[-1].endswith((".yaml", ".yml"))
                                                             or change == Change.deleted)


class Gate(Protocol):
    """HA (server/ha.py): whether this controller may act as the leader right now."""

    def acting(self) -> bool: ...

    def not_leader(self) -> web.Response: ...

    def status(self) -> dict[str, Any]: ...


async def serve(watcher: Watcher, listen: tuple[str, int] | None = None,
                metrics_listen: tuple[str, int] | None = None, *, stop: asyncio.Event | None = None,
                state_store: store.Store | None = None, gate: Gate | None = None,
                registry: CollectorRegistry | None = None, reload: asyncio.Event | None = None) -> int:
    """Serve until ``stop``. HA (server/ha.py) passes the etcd store, the leadership gate
    (every request is refused once it stops acting), a registry of this term's own, which
    the shell's metrics server exports while this controller leads, and ``reload``, set by
    the shell's SIGHUP handler (alone, serve() handles the signals itself)."""
    desired = await asyncio.to_thread(watcher.load_at_start)  # (off the loop: it may wait for git, GIT_LOCK_WAIT)
    if (refusal := plain_http_refusal(desired.api, (listen or desired.listen)[0])) is not None:
        # a --listen beyond loopback (controller.yaml's own listen was checked by the loader):
        # refused before the state directory is taken or anything is served
        raise ConfigError("controller.yaml", [ConfigIssue("api.tls", refusal)])
    # Takes the state (the file journal: its directory, StateDirLocked if another controller has it).
    # The applied base comes from the same store as the rollout's state (HA: etcd).
    own_store = state_store is None
    if state_store is None:
        state_store = store.FileJournal(desired.state_dir, background=True)
    ctl = Controller(desired, applied=watcher.kept_base(desired, state_store) if watcher.start_error is None else None,
                     state_store=state_store)
    if not own_store:
        ctl.persistence.state_dir = getattr(state_store, "where", ctl.persistence.state_dir)
    own_registry = registry is None
    registry = registry if registry is not None else CollectorRegistry()
    metrics = ControllerMetrics(registry, lambda: ctl)
    if watcher.start_error is not None:  # serving the kept last good state: say why, as a rejected reload
        ctl.reject_config(*watcher.start_error)
        metrics.config_reloads.labels("failure").inc()
    else:
        metrics.config_reloads.labels("success").inc()
    ctl.watch_status = watcher.watch_status
    state_dir = ctl.desired.state_dir
    # Only a revision applied everywhere is kept as the last good one (a held revision is not
    # good yet: a restart must judge it against the one before).
    ctl.on_applied = lambda _: watcher.keep_last_good(state_dir, ctl.persistence_failed)
    if ctl.base.revision == desired.revision:
        watcher.keep_last_good(state_dir, ctl.persistence_failed)
    app = make_app(ctl, extra_status=(lambda: {"ha": gate.status()}) if gate is not None else None)
    lag = LoopLag(LOOP_LAG_EVERY, metrics.event_loop_lag.observe) if LOOP_LAG_EVERY > 0 else None
    if lag is not None:
        app[LOOP_LAG] = lag
    ended = False  # this term is over: its app answers nothing any more (see leader_only)
    if gate is not None:
        @web.middleware
        async def leader_only(request: web.Request, handler: Handler) -> web.StreamResponse:
            # Checked again after the handler: a long-poll woken after leadership was lost
            # must not hand out a plan. ``ended``: a connection accepted by this term (its TLS
            # handshake finished after the term's cleanup, or kept alive past it) must not be
            # served from this term's plans if the same process leads again in a new term.
            if ended or not gate.acting():
                return gate.not_leader()
            response = await handler(request)
            return response if gate.acting() and not ended else gate.not_leader()

        app.middlewares.append(leader_only)

    # Each (endpoint, status)'s counter child, looked up once: .labels() per request (its lock,
    # its key tuple) was a tenth of the middleware's cost at 25 reports a second.
    counted: dict[tuple[str, int], Any] = {}

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        route = request.match_info.route.resource
        key = (route.canonical if route else "unknown", response.status)
        child = counted.get(key)
        if child is None:
            child = counted[key] = metrics.requests.labels(key[0], str(key[1]))
        child.inc()
        return response

    app.middlewares.append(count)
    host, port = listen or desired.listen
    app[TRANSPORT] = transport = api_transport(desired.api, host)
    tls = ServerTls(desired.api.tls) if desired.api.tls is not None else None  # ConfigError: exit at start
    guard = ConnectionGuard(_guard_bound(desired.api.max_unauthenticated_connections),
                            on_shed=lambda reason: metrics.connections_shed.labels(reason.value).inc())
    app[GUARD] = guard
    if desired.api.signing_key is not None:  # ConfigError: exit at start
        app[SIGNER] = PlanSigner(load_signing_key(desired.api.signing_key))
    metrics.api_tls.set(1 if tls else 0)
    metrics.api_insecure_http.set(1 if transport == ApiTransport.INSECURE_HTTP else 0)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(RateLimitedLoopErrors(
        on_error=lambda message: metrics.accept_errors.inc() if is_accept_error(message) else None))
    # keepalive_timeout is also the header deadline (controller.server.guard, point 1).
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=desired.api.header_timeout)
    await runner.setup()
    assert runner.server is not None  # set up just now
    mhost_port = metrics_listen or desired.metrics_listen
    try:
        # The API first: a controller that cannot serve plans must not look alive on its metrics port.
        try:
            server = await loop.create_server(guard.protocol_factory(runner.server), host, port,
                                              ssl=tls.context if tls else None,
                                              ssl_handshake_timeout=desired.api.header_timeout if tls else None)
        except OSError as exc:
            raise ListenFailed("listen", host, port, exc) from exc
        if mhost_port and own_registry:  # HA: the shell serves its own registry (server/ha.py)
            try:
                start_http_server(mhost_port[1], addr=mhost_port[0], registry=registry)
            except OSError as exc:
                server.close()
                raise ListenFailed("metrics_listen", *mhost_port, exc) from exc
    except ListenFailed:
        await runner.cleanup()
        ctl.close()  # frees the state directory: nothing was served, nothing changed
        raise
    if transport == ApiTransport.INSECURE_HTTP:  # at every start, and flagged in status and metrics
        log.warning("INSECURE: api.insecure_plain_http is set: the API on %s:%d speaks plain HTTP, bearer tokens "
                    "and plans cross the network in clear (anycast_controller_api_insecure_http 1); set api.tls "
                    "(README, Security)", host, port)
    log.info("controller serving %s (%d POPs, %d VIPs) on %s://%s:%d", desired.revision, len(desired.pops),
             len(desired.vips), "https" if tls else "http", host, port)
    if mhost_port and own_registry:
        log.info("metrics on http://%s:%d/metrics", *mhost_port)

    stop = stop or asyncio.Event()
    reload_now = reload or asyncio.Event()
    poke = asyncio.Event()  # the config files may have changed: look now, not at the next tick
    watching = asyncio.ensure_future(watcher.poke_on_change(poke))
    if gate is None:  # HA's shell has the signals
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    _freeze_heap()
    notifier = Notifier()
    notifier.notify(ready="1", status=f"serving {desired.revision}")
    trimmed = time.monotonic()
    settling: asyncio.Future[None] | None = None  # Watcher.settle() after an unsettled reload, then a poke
    try:
        if lag is not None:
            lag.start(loop)  # (inside the try: stopped in its finally whatever raises from here on)
        while not stop.is_set():
            planned = False
            poke.clear()  # (here, not after the reload: a change noticed during it wakes the wait below)
            if reload_now.is_set() or (watcher.pending() and (settling is None or settling.done())):
                forced = reload_now.is_set()
                reload_now.clear()
                looked = time.time()
                try:
                    # In a worker thread, the look at content and commit too: parsing a changed
                    # 5.5 MB vips.yaml is ~0.5 s of Python, which would stall every request; the
                    # thread gives the event loop the GIL back every few milliseconds. Only this
                    # loop touches the watcher.
                    new = await asyncio.to_thread(watcher.reload, forced)
                    if new is None and watcher.unsettled:  # what it read moved under it: again once git is done
                        # (SIGHUP's forced reload stays forced: it also takes renewed TLS files)
                        if settling is not None:
                            settling.cancel()
                        settling = asyncio.ensure_future(_then_poke(watcher.settle(), reload_now if forced else poke))
                    if new is not None:  # (None: a notification about what is loaded already)
                        loaded = time.time()
                        if tls is not None or new.api.tls is not None:
                            reload_tls(tls, new)
                        _reload_signing_key(app, new)
                        guard.max_unauthenticated = _guard_bound(new.api.max_unauthenticated_connections, warn=False)
                        ctl.apply_config(new)  # kept as the last good one once applied (on_applied)
                        _freeze_heap()
                        _log_reload_timing(ctl, new.revision, (watcher.batch_at, looked, loaded, time.time()))
                        metrics.config_reloads.labels("success").inc()
                        planned = True  # apply_config planned: a second pass now only delays the new plans
                except ConfigError as exc:
                    ctl.reject_config(exc, watcher.seen[1] if watcher.seen else "?")
                    metrics.config_reloads.labels("failure").inc()
            if not planned:
                # No full pass: the tick only asks the engine to plan what is dirty or due (its
                # timers are scheduled on their own; this is the safety net), in the background.
                started = time.monotonic()
                try:
                    ctl.plan_soon()
                    metrics.reconciles.labels("success").inc()
                except Exception:  # noqa: BLE001 - a planner bug must not take the API down
                    metrics.reconciles.labels("error").inc()
                    log.exception("planning failed; agents keep the last plan")
                metrics.reconcile_duration.observe(time.monotonic() - started)
            notifier.notify(watchdog="1", status=f"serving {ctl.desired.revision}")
            if planned or time.monotonic() - trimmed >= TRIM_EVERY:
                _release_free_memory()
                trimmed = time.monotonic()
            waits = [asyncio.ensure_future(e.wait()) for e in (stop, reload_now, poke)]
            await asyncio.wait(waits, timeout=TICK, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
    finally:
        if lag is not None:
            lag.stop()
        watching.cancel()
        if settling is not None:
            settling.cancel()
        ended = True
        server.close()
        ctl.release_waiters()  # else cleanup() waits for every long-poll to time out
        await runner.cleanup()
        watcher.close()
        ctl.close()
    log.info("controller stopped")
    return 0


async def _then_poke(wait: Awaitable[None], poke: asyncio.Event) -> None:
    await wait
    poke.set()


def _log_reload_timing(ctl: Controller, revision: str, times: tuple[float, float, float, float]) -> None:
    """Once the reload's pass has served its plans: when inotify's batch came, when the
    content and commit were looked at, when the reload and apply_config returned, and when
    the plans were served (wall-clock seconds, so a benchmark can line them up with its
    commit: bench/commit_latency.py)."""
    def done(_: object = None) -> None:
        log.info("reload of %s: batch %.3f, looked %.3f, loaded %.3f, applied %.3f, served %.3f (%.0f ms after "
                 "the batch)", revision, *times, time.time(), (time.time() - times[0]) * 1000)

    driver = ctl.planning()
    if driver is None or driver.done():
        done()
    else:
        driver.add_done_callback(done)


def reload_tls(tls: ServerTls | None, new: DesiredState) -> None:
    """The certificate and key again (renewed files take effect for new connections), or a
    ConfigError that rejects the reload: TLS cannot be switched on or off without a restart."""
    if tls is None:
        raise ConfigError("controller.yaml", [ConfigIssue("api.tls", "TLS was off at start: switching it on "
                                                                     "takes a restart")])
    tls.reload(new.api.tls)


def _guard_bound(configured: int, warn: bool = True) -> int:
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    bound = bounded_by_descriptors(configured, fd_limit if fd_limit != resource.RLIM_INFINITY else 1 << 20)
    if bound < configured and warn:
        log.warning("api.max_unauthenticated_connections %d lowered to %d: the process may open only %d files "
                    "(raise LimitNOFILE)", configured, bound, fd_limit)
    return bound


def _reload_signing_key(app: web.Application, new: DesiredState) -> None:
    """The signing key again (a rotation: README, Security); ConfigError, nothing changed, if it
    does not load or would be switched on or off (agents holding plan_keys would refuse
    every plan, or accept unsigned ones: that takes a restart)."""
    signer = app.get(SIGNER)
    if (signer is None) != (new.api.signing_key is None):
        raise ConfigError("controller.yaml", [ConfigIssue("api.signing_key", "switching plan signing on or off "
                                                                             "takes a restart")])
    if signer is not None and new.api.signing_key is not None:
        signer.use(load_signing_key(new.api.signing_key))
