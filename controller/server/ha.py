"""The HA controller: one of several, on etcd (``ha.store: etcd`` in controller.yaml).

A controller starts as a follower: its API answers ``/v1/status`` (role, leader, members,
etcd's health) and refuses everything else with 503 and the leader's URL, so an agent
moves on to its next controller URL (``controller.urls``) and an operator is told where
to go. When its leadership thread (server/etcd.py) wins the leader key, it runs the
ordinary controller (daemon.serve) on the etcd store, until leadership is lost: then that
term ends (the API goes back to the follower's) and it campaigns again. etcd unreachable
at start is no reason to exit: the controller waits as a follower, the error in status,
metrics and the log, and agents keep their plans meanwhile. An incompatible key layout
is: IncompatibleLayout, nothing written.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import signal
import socket
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, start_http_server

from ..config.desired_model import DesiredState, HaSettings, plain_http_refusal
from ..config.errors import ConfigError, ConfigIssue
from ..metrics.central import HaSnapshot, register_ha_metrics
from . import store
from .daemon import ListenFailed, Watcher, reload_tls, serve
from .etcd import Etcd, EtcdStore, EtcdUnavailable, Leadership, check_layout, fetch_desired
from .tls import ServerTls

log = logging.getLogger("controller.server")


class Shell:
    """Leadership as the API and the metrics see it (daemon.Gate, metrics.central.HaView)."""

    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership
        self.term_registry: CollectorRegistry | None = None

    def acting(self) -> bool:
        return self.leadership.acting()

    def not_leader(self) -> web.Response:
        leader = self.leadership.leader
        where = f"the leader is {leader.name} at {leader.url}" if leader else "no leader is known right now"
        response = web.json_response({"error": f"{self.leadership.name} is not the leader: {where}",
                                      "field": "leader", "leader": leader.url if leader else None}, status=503)
        # The connection closes after this answer: a kept-alive connection would stay with the
        # app that answered (a follower's, or a term that ended), not with whatever listens
        # on the port next, and an agent retrying on it would be told "not the leader" forever.
        response.force_close()
        return response

    def status(self) -> dict[str, Any]:
        return self.leadership.status()

    def ha_snapshot(self) -> HaSnapshot:
        lead = self.leadership
        return HaSnapshot(lead.acting(), lead.leader is not None or lead.acting(), lead.changes, len(lead.members),
                          {e: h.ok for e, h in lead.etcd.health.items()}, dict(lead.etcd.errors))


def _follower_app(shell: Shell, operator_sha256: str | None, revision: str, directory: str) -> web.Application:
    async def status(request: web.Request) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not operator_sha256 or not hmac.compare_digest(
                hashlib.sha256(token.strip().encode()).hexdigest(), operator_sha256):
            return web.json_response({"error": "invalid token", "field": "Authorization"}, status=401)
        # The shape of the leader's status, without what only the leader knows (plans, reports).
        # Won but not serving yet (this API is about to make way for the leader's): "starting".
        ha = {**shell.status(), "role": "starting" if shell.acting() else "follower"}
        return web.json_response({"config": {"revision": revision, "directory": directory, "last_error": "",
                                             "last_error_revision": "", "reload_failures": 0, "loaded_at": None,
                                             "watch": {"notifier": "none", "stale_git_lock": None}},
                                  "ha": ha, "pops": [], "vips": [], "alarms": [], "persistence": None,
                                  "event_loop": None})  # (a follower samples nothing)

    async def elsewhere(request: web.Request) -> web.StreamResponse:
        return shell.not_leader()

    app = web.Application()
    app.add_routes([web.get("/v1/status", status), web.route("*", "/{tail:.*}", elsewhere)])
    return app


async def serve_ha(watcher: Watcher, settings: HaSettings, name: str | None = None, advertise: str | None = None,
                   listen: tuple[str, int] | None = None, metrics_listen: tuple[str, int] | None = None, *,
                   stop: asyncio.Event | None = None) -> int:
    watcher.fetch_kept = lambda: fetch_desired(settings)
    desired = watcher.load_at_start()  # the listen addresses and the operator token (ConfigError: exit)
    host, port = listen or desired.listen
    if (refusal := plain_http_refusal(desired.api, host)) is not None:  # as serve() does, before anything
        raise ConfigError("controller.yaml", [ConfigIssue("api.tls", refusal)])
    # A follower answers on HTTPS too (agents try every controller with their token).
    tls = ServerTls(desired.api.tls) if desired.api.tls is not None else None  # ConfigError: exit at start
    name = name or socket.gethostname()
    scheme = "https" if tls else "http"
    advertise = advertise or f"{scheme}://{host if host not in ('0.0.0.0', '::') else socket.getfqdn()}:{port}"
    try:
        check_layout(Etcd(settings))  # IncompatibleLayout: the caller exits, nothing written
    except EtcdUnavailable as exc:
        log.error("ALARM etcd unreachable at start: %s; waiting as a follower (agents keep their plans)", exc)
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def on_change() -> None:  # from the leadership thread
        loop.call_soon_threadsafe(changed.set)

    leadership = Leadership(settings, name, advertise, on_change=on_change)
    shell = Shell(leadership)
    registry = CollectorRegistry()
    register_ha_metrics(registry, shell, lambda: shell.term_registry)
    mhost_port = metrics_listen or desired.metrics_listen
    if mhost_port:
        try:
            start_http_server(mhost_port[1], addr=mhost_port[0], registry=registry)
        except OSError as exc:
            raise ListenFailed("metrics_listen", *mhost_port, exc) from exc
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # systemctl reload: the leader's term reloads as serve() does alone; a follower reloads
    # its certificate (without a handler SIGHUP's default action would end the process).
    hup = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    leadership.start()
    log.info("controller %s (%s) on etcd %s, prefix %s, lease %ds", name, advertise, ",".join(settings.endpoints),
             settings.prefix, settings.lease_ttl)
    try:
        while not stop.is_set():
            runner = web.AppRunner(_follower_app(shell, desired.operator_token_sha256, desired.revision, desired.directory),
                                   access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port, ssl_context=tls.context if tls else None).start()
            except OSError as exc:
                await runner.cleanup()
                raise ListenFailed("listen", host, port, exc) from exc
            while not stop.is_set() and not leadership.acting():
                await _either(stop, changed, 1.0)
                if hup.is_set() and not leadership.acting():
                    hup.clear()
                    desired = await _follower_reload(watcher, tls, desired)
            await runner.cleanup()
            if stop.is_set():
                break
            term_stop = asyncio.Event()

            async def watch_term(term_stop: asyncio.Event = term_stop) -> None:
                while leadership.acting() and not stop.is_set():
                    await _either(stop, changed, 0.1)
                term_stop.set()

            watching = asyncio.ensure_future(watch_term())
            shell.term_registry = CollectorRegistry()
            term_watcher, term_store = Watcher(watcher.directory, watcher.state_dir), EtcdStore(leadership)
            term_watcher.fetch_kept, term_watcher.also_keep = watcher.fetch_kept, term_store.keep_desired
            try:
                await serve(term_watcher, (host, port), None, stop=term_stop, state_store=term_store, gate=shell,
                            registry=shell.term_registry, reload=hup)
            except store.PersistenceError as exc:  # etcd failed between winning and loading
                log.error("ALARM persistence: cannot load the state from etcd as the new leader: %s", exc)
                leadership.depose("the state could not be loaded")
            finally:
                watching.cancel()
                shell.term_registry = None
                term_watcher.close()  # (serve closes it too, unless it failed before it began)
            if not stop.is_set():
                log.warning("%s stopped leading; back to follower", name)
                await asyncio.sleep(leadership.poll)
    finally:
        await asyncio.to_thread(leadership.stop)
    log.info("controller stopped")
    return 0


async def _follower_reload(watcher: Watcher, tls: ServerTls | None, desired: DesiredState) -> DesiredState:
    """SIGHUP as a follower: the config again and, with TLS, the certificate and key (renewed
    files serve new handshakes); a config that does not load or a pair that does not load
    is logged and changes nothing."""
    try:
        new = await asyncio.to_thread(watcher.load)
        if tls is not None or new.api.tls is not None:
            reload_tls(tls, new)
    except ConfigError as exc:
        log.error("reload refused, the follower keeps serving as it was: %s", exc)
        return desired
    log.info("reloaded as a follower: config revision %s%s", new.revision, ", certificate and key" if tls else "")
    return new


async def _either(a: asyncio.Event, b: asyncio.Event, timeout: float) -> None:
    b.clear()
    waits = [asyncio.ensure_future(e.wait()) for e in (a, b)]
    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
