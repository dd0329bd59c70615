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
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

import watchfiles

from aiohttp import web
from prometheus_client import CollectorRegistry, start_http_server

from ..config.desired import LoadCache, load_desired, read_state_dir
from ..config.desired_model import DesiredState
from ..config.errors import ConfigError
from ..metrics.central import ControllerMetrics
from ..sdnotify import Notifier
from .app import Handler, make_app
from . import store
from .core import Controller
from .revision import fingerprint, git_dir, revision, stat_signature

log = logging.getLogger("controller.server")
TICK = 1.0  # look at the config and the engine's timers at least this often
WATCH = 0.1  # stat polling looks this often, and a change it sees must have settled this long
INOTIFY_QUIET_MS = 50  # inotify: events are grouped until none came for this long (a checkout
# writes its files within milliseconds; the revision check catches one caught half-way anyway)
RECHECK = 30.0  # look at content and commit this often even without a notification


class Watcher:
    """Reload the desired state when the directory's content or git commit changes.

    A change is noticed by inotify (watchfiles: a maintained Rust ``notify`` binding with
    debouncing and an asyncio API; asyncinotify would have us walk the tree and follow new
    directories ourselves), with stat polling as the fallback where inotify is unavailable
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
        self._to_keep: tuple[str, str, dict[str, str]] | None = None  # fingerprint, revision, files
        self._kept = ""  # fingerprint of the desired state kept last
        self._keeper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keep-desired")
        self._peeked: tuple[str, str] | None = None  # (fingerprint, revision) changed() saw

    def load(self) -> DesiredState:
        # What changed() just computed, if it did (hashing every file and two git commands:
        # ~30-60 ms a reload that need not be paid twice), else now.
        peeked, self._peeked = self._peeked, None
        fp, rev = peeked if peeked is not None else (fp := fingerprint(self.directory), revision(self.directory, fp))
        self.seen = (fp, rev)
        self._dirty, self._checked = False, time.monotonic()
        desired = load_desired(self.directory, rev, self.cache)
        if self.state_dir:
            desired = dataclasses.replace(desired, state_dir=self.state_dir)
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

    def keep_last_good(self, state_dir: str, on_error: Callable[[store.PersistenceError], None]) -> None:
        """Keep what load() read last in ``state_dir`` (in a thread: a reload's plans are not
        held up by it), unless it is kept already. Call it only while holding the state
        directory (a second controller must not write there)."""
        if self._to_keep is None or self._to_keep[0] == self._kept:
            return
        fp, rev, files = self._to_keep
        self._kept = fp

        def keep() -> None:
            try:
                store.save_desired(state_dir, rev, files)
            except store.PersistenceError as exc:
                loop.call_soon_threadsafe(on_error, exc)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            try:
                store.save_desired(state_dir, rev, files)
            except store.PersistenceError as exc:
                on_error(exc)
            return
        self._keeper.submit(keep)

    def close(self) -> None:
        self._keeper.shutdown(wait=True)

    def changed(self) -> bool:
        if not self._dirty and time.monotonic() - self._checked < RECHECK:
            return False
        self._dirty, self._checked = False, time.monotonic()
        fp = fingerprint(self.directory)
        now = (fp, revision(self.directory, fp))
        self._peeked = now if now != self.seen else None  # load() follows at once
        return now != self.seen

    async def poke_on_change(self, poke: asyncio.Event) -> None:
        """Set ``poke`` when a config file or the git checkout's state looks different and
        has stayed so for WATCH seconds (a checkout writing several files is not caught
        half-way); the daemon then checks content and commit with changed()."""
        gd = git_dir(self.directory)
        if self.use_inotify:
            try:
                await self._inotify(poke, gd)
            except (OSError, RuntimeError) as exc:  # watchfiles raises these when inotify cannot start
                log.warning("inotify unavailable for %s (%s): polling stat data every %.1fs instead",
                            self.directory, exc, WATCH)
        await self._poll(poke, gd)

    def _mark(self, poke: asyncio.Event) -> None:
        self._dirty = True
        poke.set()

    async def _inotify(self, poke: asyncio.Event, gd: str | None) -> None:
        top = os.path.realpath(self.directory)
        paths = [top]
        if gd and not os.path.realpath(gd).startswith(top + os.sep):
            paths.append(os.path.realpath(gd))
        self.notifier = "inotify"
        self._mark(poke)  # anything between load() and the watch being set up
        async for _ in watchfiles.awatch(*paths, watch_filter=_Relevant(top, gd), debounce=1000,
                                         step=INOTIFY_QUIET_MS, force_polling=False):
            self._mark(poke)

    async def _poll(self, poke: asyncio.Event, gd: str | None) -> None:
        self.notifier = "stat-polling"
        last = stat_signature(self.directory, gd)
        self._mark(poke)
        while True:
            await asyncio.sleep(WATCH)
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


class _Relevant:
    """What a reload depends on: the YAML files (not in hidden directories) and the git files
    a commit, checkout or reset changes. The objects git writes are not."""

    def __init__(self, top: str, gd: str | None) -> None:
        self.top = top
        self.git = os.path.realpath(gd) if gd else None

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        if self.git and (path == self.git or path.startswith(self.git + os.sep)):
            rel = os.path.relpath(path, self.git)
            return rel in ("HEAD", "index", "packed-refs") or rel.startswith("refs" + os.sep)
        rel = os.path.relpath(path, self.top)
        if rel.startswith(".."):
            return False
        parts = rel.split(os.sep)
        return not any(p.startswith(".") for p in parts) and (parts[-1].endswith((".yaml", ".yml"))
                                                             or change == watchfiles.Change.deleted)


async def serve(watcher: Watcher, listen: tuple[str, int] | None = None,
                metrics_listen: tuple[str, int] | None = None, *, stop: asyncio.Event | None = None) -> int:
    desired = watcher.load_at_start()
    ctl = Controller(desired)  # takes the state directory (StateDirLocked: another controller has it)
    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry, lambda: ctl)
    if watcher.start_error is not None:  # serving the kept last good state: say why, as a rejected reload
        ctl.reject_config(*watcher.start_error)
        metrics.config_reloads.labels("failure").inc()
    else:
        metrics.config_reloads.labels("success").inc()
    state_dir = ctl.persistence.state_dir
    watcher.keep_last_good(state_dir, ctl.persistence_failed)
    app = make_app(ctl)

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        route = request.match_info.route.resource
        metrics.requests.labels(route.canonical if route else "unknown", str(response.status)).inc()
        return response

    app.middlewares.append(count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = listen or desired.listen
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("controller serving %s (%d POPs, %d VIPs) on http://%s:%d", desired.revision, len(desired.pops),
             len(desired.vips), host, port)
    mhost_port = metrics_listen or desired.metrics_listen
    if mhost_port:
        start_http_server(mhost_port[1], addr=mhost_port[0], registry=registry)
        log.info("metrics on http://%s:%d/metrics", *mhost_port)

    stop = stop or asyncio.Event()
    reload_now = asyncio.Event()
    poke = asyncio.Event()  # the config files may have changed: look now, not at the next tick
    watching = asyncio.ensure_future(watcher.poke_on_change(poke))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    notifier = Notifier()
    notifier.notify(ready="1", status=f"serving {desired.revision}")
    try:
        while not stop.is_set():
            planned = False
            if reload_now.is_set() or watcher.changed():
                reload_now.clear()
                try:
                    ctl.apply_config(watcher.load())
                    metrics.config_reloads.labels("success").inc()
                    watcher.keep_last_good(state_dir, ctl.persistence_failed)
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
            poke.clear()
            waits = [asyncio.ensure_future(e.wait()) for e in (stop, reload_now, poke)]
            await asyncio.wait(waits, timeout=TICK, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
    finally:
        watching.cancel()
        await runner.cleanup()
        watcher.close()
        ctl.close()
    log.info("controller stopped")
    return 0
