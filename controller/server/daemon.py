"""The controller daemon: watch the config directory, plan on every event and timer (only
what changed), serve plans over HTTP, export metrics.

A config that fails to load at start is fatal (there is nothing good to serve). Later, a
bad revision is logged, counted and shown in ``anycastctl status``; the last good desired
state keeps being served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, start_http_server

from ..config.desired import LoadCache, load_desired
from ..config.desired_model import DesiredState
from ..config.errors import ConfigError
from ..metrics.central import ControllerMetrics
from ..sdnotify import Notifier
from .app import Handler, make_app
from .core import Controller
from .revision import fingerprint, git_dir, revision, stat_signature

log = logging.getLogger("controller.server")
TICK = 1.0  # look at the config and the engine's timers at least this often
WATCH = 0.1  # look at the config files' stat data this often (a commit is noticed within it)


class Watcher:
    """Reload the desired state when the directory's content or git commit changes."""

    def __init__(self, directory: str, state_dir: str | None = None) -> None:
        self.directory = directory
        self.state_dir = state_dir
        self.seen: tuple[str, str] | None = None
        self.cache = LoadCache()  # unchanged files and VIPs are not read again on a reload

    def load(self) -> DesiredState:
        fp = fingerprint(self.directory)
        rev = revision(self.directory, fp)
        self.seen = (fp, rev)
        desired = load_desired(self.directory, rev, self.cache)
        if self.state_dir:
            desired = dataclasses.replace(desired, state_dir=self.state_dir)
        return desired

    def changed(self) -> bool:
        fp = fingerprint(self.directory)
        return self.seen != (fp, revision(self.directory, fp))

    async def poke_on_change(self, poke: asyncio.Event) -> None:
        """Set ``poke`` when a config file or the git checkout's state looks different and
        has stayed so for WATCH seconds (a checkout writing several files is not caught
        half-way); stat data only, the daemon then checks content and commit with changed()."""
        gd = git_dir(self.directory)
        last = stat_signature(self.directory, gd)
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
            poke.set()


async def serve(watcher: Watcher, listen: tuple[str, int] | None = None,
                metrics_listen: tuple[str, int] | None = None, *, stop: asyncio.Event | None = None) -> int:
    desired = watcher.load()
    ctl = Controller(desired)
    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry, lambda: ctl)
    metrics.config_reloads.labels("success").inc()
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
    log.info("controller stopped")
    return 0
