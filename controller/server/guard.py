"""What keeps an unauthenticated peer from exhausting the controller's API.

Theory of operation. A peer that opens connections and sends nothing, or trickles a request
line a byte at a time, costs a file descriptor each; at 4448db0 1,100 of them used up the
1,024 the process had and every agent's plan fetch failed. Three bounds hold that off:

1. **Header deadline.** aiohttp closes a connection whose request line and headers have not
   all arrived ``api.header_timeout`` seconds after it opened (or after its last response):
   that is its keep-alive timer, which runs from the connection's start and is not pushed
   back by partial data. The daemon sets it; nothing here.
2. **Unauthenticated connections are few.** A connection counts as unauthenticated until a
   request on it carries a valid token (``ConnectionGuard.trust``). At most
   ``max_unauthenticated`` exist: a newcomer past the bound closes the oldest one. An
   agent's request arrives within milliseconds of its connect, so the oldest is a slow one;
   a flood would have to open that many connections in those milliseconds to close an
   agent's, and the agent retries. Authenticated connections are never closed by the guard,
   and an agent keeps its connections alive (it polls and reports every few seconds), so a
   flood does not reach the agents already connected. Descriptors stay bounded whatever
   the rate.
3. **Accept errors are logged at a bounded rate.** asyncio logs every failed ``accept()``
   with a traceback (64,700 lines in 7 s under EMFILE); ``RateLimitedLoopErrors`` logs a
   message at most once per interval and counts the rest.

With TLS, a connection reaches the guard once its handshake is done; the handshake itself is
bounded by ``ssl_handshake_timeout`` (the header deadline too), and ``LimitNOFILE`` in the
unit leaves room for that many.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any, cast

log = logging.getLogger("controller.server")


class Shed(enum.Enum):
    """Why the guard closed a connection (the metric's ``reason`` label)."""

    EVICTED = "evicted"  # the oldest unauthenticated connection, for a newcomer


class ConnectionGuard:
    """Counts unauthenticated connections and sheds the excess (see the module docstring)."""

    def __init__(self, max_unauthenticated: int, *, on_shed: Callable[[Shed], None] = lambda reason: None) -> None:
        self.max_unauthenticated = max_unauthenticated
        self._on_shed = on_shed
        self._waiting: dict[asyncio.Transport, None] = {}  # insertion order: oldest first

    @property
    def unauthenticated(self) -> int:
        return len(self._waiting)

    def opened(self, transport: asyncio.Transport) -> None:
        """A new connection: the oldest waiting ones are closed to keep within the bound."""
        while self._waiting and len(self._waiting) >= self.max_unauthenticated:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.abort()
            self._on_shed(Shed.EVICTED)
        self._waiting[transport] = None

    def trust(self, transport: asyncio.Transport | None) -> None:
        """A request on ``transport`` carried a valid token: no longer the guard's to close."""
        if transport is not None:
            self._waiting.pop(transport, None)

    def closed(self, transport: asyncio.Transport) -> None:
        self._waiting.pop(transport, None)

    def protocol_factory(self, inner: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.Protocol]:
        """Wrap a server's protocol factory (aiohttp's ``web.Server``) so that every connection
        passes through opened() and closed()."""
        return lambda: _Guarded(self, inner())


def bounded_by_descriptors(configured: int, fd_limit: int) -> int:
    """``configured``, or half the process's descriptor limit if that is lower: waiting
    connections alone never use up the descriptors agents, state files and git need."""
    return max(4, min(configured, fd_limit // 2))


class _Guarded(asyncio.Protocol):
    """Delegates everything to aiohttp's protocol; tells the guard of the connection first."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.BaseProtocol) -> None:
        self._guard = guard
        self._inner: Any = inner  # an aiohttp RequestHandler: an asyncio.Protocol
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream server's transports are
        self._guard.opened(self._transport)
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.closed(self._transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class RateLimitedLoopErrors:
    """An event-loop exception handler that logs each distinct message at most once per
    ``every`` seconds, saying how many like it were not logged; ``on_error`` sees them all."""

    MAX_KINDS = 100  # distinct messages remembered (the dict never grows without bound)

    def __init__(self, every: float = 10.0, *, clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[str], None] = lambda message: None,
                 log_error: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None] | None = None) -> None:
        self.every = every
        self._clock = clock
        self._on_error = on_error
        self._log = log_error or (lambda loop, context: loop.default_exception_handler(context))
        self._seen: dict[str, tuple[float, int]] = {}  # message -> (last logged, not logged since)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        self._on_error(message)
        now = self._clock()
        last, skipped = self._seen.get(message, (-float("inf"), 0))
        if now - last < self.every:
            self._seen[message] = (last, skipped + 1)
            return
        if len(self._seen) >= self.MAX_KINDS and message not in self._seen:
            self._seen.clear()
        self._seen[message] = (now, 0)
        if skipped:
            context = {**context, "message": f"{message} ({skipped} more like it in the last "
                                             f"{now - last:.0f} s not logged)"}
        self._log(loop, context)


def is_accept_error(message: str) -> bool:
    """asyncio's message for an accept() that failed for want of descriptors or memory."""
    return message.startswith("socket.accept() out of system resource")
