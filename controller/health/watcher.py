"""The I/O shell of the watch connections: one idle TCP socket per backend endpoint.

``WatchPool.set_endpoints`` takes the whole set of (host, port, source) to watch, level
based; each endpoint gets one connection however many checks (VIPs) point at it. What a
connection does next is ``health.watch.step``'s decision; this module only opens and
closes sockets, registers them with the event loop and delivers the events. When an
established connection is lost (RST, FIN, a socket error), ``on_loss(endpoint, detail)``
tells the scheduler, which runs the confirmation probes.

A socket costs a file descriptor, about 1 KiB of Python objects and a few KiB in the
kernel; nothing is sent on it except TCP keepalives (``KEEPALIVE``), which keep a NAT or
load balancer from forgetting an idle connection silently and turn a peer that vanished
without a word into an error within about a minute. Data a server sends anyway (a banner,
a 408 before an idle close) is read and discarded.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import resource
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from . import watch as w

log = logging.getLogger("controller.health")

Endpoint = tuple[str, int, str | None]  # host (an IP literal), port, source address or None
OnLoss = Callable[[Endpoint, str], None]

CONNECT_TIMEOUT: Final = 5.0  # a blackholed backend's SYN would otherwise retry for two minutes
KEEPALIVE: Final = (20, 5, 3)  # idle seconds, seconds between probes, probes: ~35 s to notice
RECONNECT_JITTER: Final = 0.2  # a backoff wait is stretched by up to this fraction: no lockstep storms
FD_WANTED: Final = 65536  # the soft descriptor limit start() asks for (systemd's default soft limit is 1024)
_LOSS_TEXT: Final = {
    errno.ECONNRESET: (w.LossKind.RESET, "connection reset"),
    errno.ETIMEDOUT: (w.LossKind.ERROR, "keepalive timed out"),
    errno.EHOSTUNREACH: (w.LossKind.ERROR, "host unreachable"),
    errno.ENETUNREACH: (w.LossKind.ERROR, "network unreachable"),
}


@dataclass(frozen=True)
class WatchStats:
    endpoints: int
    connected: int
    unwatched: int  # endpoints left to polling alone: the descriptor budget was spent
    losses: int  # established connections lost (each asked for confirmation probes)
    connects: int  # connection attempts
    connect_failures: int
    # `losses` by how the connection ended (every LossKind, zeros included)
    losses_by_kind: dict[w.LossKind, int] = field(default_factory=lambda: dict.fromkeys(w.LossKind, 0))


class _Conn:
    """One endpoint's connection: its pure state, socket and timer."""

    __slots__ = ("endpoint", "fd", "sock", "state", "timer", "writing", "reading")

    def __init__(self, endpoint: Endpoint, state: w.WatchState) -> None:
        self.endpoint = endpoint
        self.state = state
        self.sock: socket.socket | None = None
        self.fd = -1
        self.timer: asyncio.TimerHandle | None = None
        self.reading = self.writing = False


class WatchPool:
    """Watch connections for a set of endpoints; ``start()`` on the running loop first."""

    def __init__(self, on_loss: OnLoss, *, connect_timeout: float = CONNECT_TIMEOUT,
                 rng: random.Random | None = None, max_sockets: int | None = None) -> None:
        self._on_loss = on_loss
        self._max_sockets = max_sockets  # None: half the descriptor limit, worked out at start()
        self._connect_timeout = connect_timeout
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wanted: set[Endpoint] = set()
        self._conns: dict[Endpoint, _Conn] = {}
        self._losses = 0
        self._losses_by_kind = dict.fromkeys(w.LossKind, 0)
        self._connects = 0
        self._connect_failures = 0

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Watch exactly these; takes effect at once if started, else at ``start()``."""
        self._wanted = set(endpoints)
        if self._loop is not None:
            self._sync()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._max_sockets is None:
            self._max_sockets = _socket_budget()
        self._sync()

    def probe_succeeded(self, endpoint: Endpoint) -> None:
        """A probe of ``endpoint`` succeeded: a watch waiting out failed connects tries now."""
        conn = self._conns.get(endpoint)
        if conn is not None and conn.state.phase is w.WatchPhase.BACKOFF and conn.state.refused:
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
            self._feed(conn, w.ProbeSucceeded())

    def close(self) -> None:
        """Close every connection; a closed pool may be started again."""
        for conn in self._conns.values():
            self._drop(conn)
        self._conns.clear()
        self._loop = None

    def stats(self) -> WatchStats:
        """Safe from another thread (the metrics server's): the containers are copied by one
        C call each before anything iterates them."""
        conns, wanted = list(self._conns.values()), len(self._wanted)
        return WatchStats(len(conns), sum(1 for c in conns if c.state.phase is w.WatchPhase.CONNECTED),
                          max(0, wanted - len(conns)), self._losses, self._connects,
                          self._connect_failures, dict(self._losses_by_kind))

    def _sync(self) -> None:
        assert self._loop is not None
        for endpoint in [e for e in self._conns if e not in self._wanted]:
            self._drop(self._conns.pop(endpoint))
        now = self._loop.time()
        new = self._wanted - self._conns.keys()
        room = max(0, (self._max_sockets or 0) - len(self._conns))
        if len(new) > room:
            # A watch is a hint; a probe that cannot get a descriptor is a false "down".
            # So watches never take more than their budget: the rest are polled only.
            log.warning("watching %d of %d backend endpoint(s): the rest exceed the watch budget of %d "
                        "sockets (half the open-file limit); they are checked by polling only",
                        len(self._conns) + room, len(self._wanted), self._max_sockets)
            new = set(sorted(new)[:room])
        for endpoint in new:
            state, effects = w.initial(now)
            conn = self._conns[endpoint] = _Conn(endpoint, state)
            self._do(conn, effects, None)

    # --- the pure machine, driven -------------------------------------------------------------
    def _feed(self, conn: _Conn, event: w.WatchEvent) -> None:
        if self._conns.get(conn.endpoint) is not conn:
            return  # dropped meanwhile (a late callback)
        assert self._loop is not None
        try:
            conn.state, effects, wake_at = w.step(conn.state, event, self._loop.time())
        except ValueError:
            log.exception("watch of %s: a bug in the watch shell; closing it", _text(conn.endpoint))
            self._drop(self._conns.pop(conn.endpoint))
            return
        self._do(conn, effects, wake_at)

    def _do(self, conn: _Conn, effects: tuple[w.WatchEffect, ...], wake_at: float | None) -> None:
        assert self._loop is not None
        for effect in effects:
            if isinstance(effect, w.Confirm):
                self._losses += 1
                self._losses_by_kind[effect.kind] += 1
                try:
                    self._on_loss(conn.endpoint, f"watch connection {effect.kind.value}: {effect.detail}")
                except Exception:  # noqa: BLE001 - one bad callback must not stop the watches
                    log.exception("on_loss failed for %s", _text(conn.endpoint))
            else:
                self._connect(conn)
        if wake_at is not None:
            now = self._loop.time()
            delay = (wake_at - now) * (1.0 + self._rng.uniform(0.0, RECONNECT_JITTER))
            conn.timer = self._loop.call_at(now + delay, self._on_timer, conn)

    def _on_timer(self, conn: _Conn) -> None:
        conn.timer = None
        self._feed(conn, w.Timer())

    # --- sockets ---------------------------------------------------------------------------------
    def _connect(self, conn: _Conn) -> None:
        assert self._loop is not None
        host, port, source = conn.endpoint
        v6 = ":" in host
        self._connects += 1
        try:
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:  # out of file descriptors: try again later
            self._loop.call_soon(self._failed, conn, exc.strerror or "socket failed")
            return
        sock.setblocking(False)
        conn.sock, conn.fd = sock, sock.fileno()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            idle, every, count = KEEPALIVE
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, every)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
            if source:
                sock.bind((source, 0))
            err = sock.connect_ex((host, port, 0, 0) if v6 else (host, port))
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            self._failed(conn, _connect_text(err))
            return
        conn.writing = True
        self._loop.add_writer(conn.fd, self._on_connect, conn)
        conn.timer = self._loop.call_later(self._connect_timeout, self._failed, conn, "connect timed out")

    def _on_connect(self, conn: _Conn) -> None:
        assert self._loop is not None and conn.sock is not None
        conn.writing = False
        self._loop.remove_writer(conn.fd)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(conn, _connect_text(err))
            return
        conn.reading = True
        self._loop.add_reader(conn.fd, self._on_readable, conn)
        self._feed(conn, w.Connected())

    def _failed(self, conn: _Conn, detail: str) -> None:
        if self._conns.get(conn.endpoint) is not conn or conn.state.phase is not w.WatchPhase.CONNECTING:
            return
        self._close_socket(conn)
        self._connect_failures += 1
        self._feed(conn, w.ConnectFailed(detail))

    def _on_readable(self, conn: _Conn) -> None:
        assert conn.sock is not None
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            kind, text = _LOSS_TEXT.get(exc.errno or 0, (w.LossKind.ERROR, exc.strerror or type(exc).__name__))
            self._lost(conn, w.Lost(kind, text))
            return
        if not data:
            self._lost(conn, w.Lost(w.LossKind.EOF, "closed by the backend (FIN)"))
        # Data: a banner or an idle-timeout answer; the close that may follow is the event.

    def _lost(self, conn: _Conn, event: w.Lost) -> None:
        self._close_socket(conn)
        self._feed(conn, event)

    def _close_socket(self, conn: _Conn) -> None:
        assert self._loop is not None
        if conn.reading:
            conn.reading = False
            self._loop.remove_reader(conn.fd)
        if conn.writing:
            conn.writing = False
            self._loop.remove_writer(conn.fd)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.sock is not None:
            conn.sock.close()
            conn.sock, conn.fd = None, -1

    def _drop(self, conn: _Conn) -> None:
        if self._loop is not None:
            self._close_socket(conn)
        elif conn.sock is not None:
            conn.sock.close()
            conn.sock = None


def _socket_budget() -> int:
    """Half the open-file limit, after raising the soft limit toward FD_WANTED (within the
    hard limit): the other half stays for probes, ExaBGP's pipes and the metrics server."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_WANTED if hard == resource.RLIM_INFINITY else min(FD_WANTED, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return FD_WANTED // 2 if soft == resource.RLIM_INFINITY else soft // 2


def _connect_text(err: int) -> str:
    return {errno.ECONNREFUSED: "connect refused", errno.ETIMEDOUT: "connect timed out",
            errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable"}.get(
        err, f"connect failed: {errno.errorcode.get(err, err)}")


def _text(endpoint: Endpoint) -> str:
    host, port, _ = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
