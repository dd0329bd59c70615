"""One health-check attempt against one backend: a TCP connect, or an HTTP(S) GET.

A probe never raises for anything the network or the backend does: refused, reset,
unreachable, TLS failures, garbage answers and timeouts all become a failed
``ProbeResult`` whose ``detail`` says why in a few words (it ends up in the log line of a
health transition). The whole attempt, connect and TLS included, is bounded by the spec's
timeout. Hosts are IP literals only: a health check must not depend on DNS, which may be
the very thing that is broken.

The HTTP client is deliberately minimal (one HTTP/1.1 GET with ``Connection: close``,
status line, headers, at most 64 KiB of body, plain or chunked): it is all a health check
needs, and it keeps the agent free of an HTTP library dependency. Plain HTTP and TCP, the
bulk of the checks, run as event-loop callbacks on a bare socket in an epoll set of their
own (``_PlainHttpCheck``, ``_TcpCheck``, ``Poller``), HTTPS on asyncio streams; both paths
give the same verdicts and details. Every check is a fresh connection, closed with a reset
once the verdict is in (no TIME_WAIT on either end), unless the spec asks to keep it.

Kept connections (``reuse_connection``, plain HTTP under a scheduler's ``Poller`` only):
the request goes out without ``Connection: close`` and, once an answer is judged, the
connection waits in the poller for the spec's next check, if the answer allows it: HTTP/1.1,
no ``Connection: close``, a body framed by Content-Length (at most 64 KiB) or complete
chunks, nothing after it. A connection serves at most ``fresh_connection_every`` checks,
then the next one connects afresh: that check proves again that the listener accepts, which
a kept connection does not. An idle kept connection that the server closes, resets or
writes to is dropped at once (an idle timeout is routine; a crash is the watch's business,
``health.watch``, and the next check's). A check that finds its kept connection closed by
the server before any byte of the answer (EOF, a reset, a broken pipe, sending or waiting)
runs once more on a fresh connection within the same deadline; only that attempt's verdict
counts. So does a check answered ``408 Request Timeout`` on a kept connection: the server's
idle timeout raced the request (a 408 on a fresh connection is the verdict, as any other
status). A kept connection that stays silent is a timeout, as a fresh one would be. HTTPS
checks always connect afresh. Kept connections have a budget of file descriptors below the
open-file limit (``Poller.kept_budget``, set by the scheduler): past it a check's connection
closes as without reuse (counted, logged once), and a check that finds no descriptor free
closes idle kept connections first, so no check fails for descriptors the checker holds.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import functools
import ipaddress
import logging
import os
import select
import socket
import ssl
import string
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("controller.health")

KINDS: Final = ("tcp", "http", "https")
MAX_BODY: Final = 64 * 1024  # enough for any sane health page; bounds memory per probe
MAX_HEAD: Final = 64 * 1024  # status line and headers together
USER_AGENT: Final = "anycast-agent-healthcheck/1"

_DEFAULT_PORT: Final = {"http": 80, "https": 443}
_PRINTABLE_STR: Final = "".join(chr(c) for c in range(0x21, 0x7F))  # visible ASCII, no space
_PRINTABLE: Final = frozenset(_PRINTABLE_STR)
_ERRNO_TEXT: Final = {
    errno.ECONNREFUSED: "connect refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed by peer",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connect timed out in the kernel",
    errno.EADDRNOTAVAIL: "source address not available",
    errno.EADDRINUSE: "no free local port",
}


@dataclass(frozen=True)
class ProbeSpec:
    """What to check and how. Invalid values raise ValueError at construction."""

    kind: str  # tcp | http | https
    host: str  # an IP literal, never a name
    port: int
    timeout: float  # seconds, for the whole attempt
    path: str = "/"
    expect_status: int = 200
    expect_body: str | None = None  # a substring the first 64 KiB of the body must contain
    host_header: str | None = None  # default: the address and port; also the TLS SNI name
    tls_verify: bool = False  # backbone checks usually hit IPs with self-signed certs
    source: str | None = None  # local address to connect from
    reuse_connection: bool = False  # plain HTTP: keep the connection between checks (module docstring)
    fresh_connection_every: int = 10  # with reuse_connection: a connection serves at most this many checks

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("host", "source"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{name} must be an IP address (health checks do no DNS), got {value!r}") from None
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if not 100 <= self.expect_status <= 599:
            raise ValueError(f"expect_status must be an HTTP status (100-599), got {self.expect_status}")
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        if self.reuse_connection and self.kind != "http":
            raise ValueError(f"reuse_connection is for http checks only, not {self.kind}")
        if self.fresh_connection_every < 1:
            raise ValueError(f"fresh_connection_every must be at least 1, got {self.fresh_connection_every}")
        if self.host_header:  # "" means none, as in _request
            _wire_host(self.host_header)  # raises ValueError if it cannot go on the wire

    @functools.cached_property
    def _plain_http(self) -> _PlainHttpPlan | None:
        """What a plain HTTP check needs, worked out once per spec (not per check); None
        where the stream path runs: tcp, https, and scoped IPv6 addresses ('fe80::1%eth0'),
        which asyncio resolves through getaddrinfo."""
        if self.kind != "http" or "%" in self.host:
            return None
        return _PlainHttpPlan(self)

    @functools.cached_property
    def _plain_tcp(self) -> _TcpPlan | None:
        """A TCP check's plan (``_TcpCheck``); None for the other kinds and for scoped IPv6
        addresses (the stream path resolves them)."""
        if self.kind != "tcp" or "%" in self.host:
            return None
        return _TcpPlan(self)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency: float  # seconds from start to verdict, failures included
    detail: str  # short and human: "HTTP 200", "connect refused", "timeout after 0.50s connecting"


class _BadResponse(Exception):
    """The backend answered something that is not an HTTP response we can judge."""


async def probe(spec: ProbeSpec) -> ProbeResult:
    """Run one check. Returns a failed result, never raises, for network and backend trouble."""
    loop = asyncio.get_running_loop()
    verdict: asyncio.Future[ProbeResult] = loop.create_future()

    def done(_check: Check, outcome: ProbeResult | Exception) -> None:
        if verdict.done():
            return
        if isinstance(outcome, Exception):
            verdict.set_exception(outcome)
        else:
            verdict.set_result(outcome)

    check = start(spec, done)
    if check is None:
        return await _probe_streams(spec, time.perf_counter())
    try:
        return await verdict
    finally:
        check.cancel()  # cancelled (target removed): the socket still closes now


Done = Callable[["Check", "ProbeResult | Exception"], None]  # (the check, its result or a bug)


def start(spec: ProbeSpec, done: Done, poller: Poller | None = None) -> Check | None:
    """Start one check as event-loop callbacks, with no task (the scheduler's path, see
    ``Check``): ``done(check, result)`` is called once, never from within ``start``; an
    exception in place of the result is a bug in the probe. ``poller``: the epoll set the
    check's socket joins (the scheduler keeps one for all its checks); without one, the
    check gets a poller of its own, closed with it. None: this spec runs only as the
    coroutine ``probe`` (HTTPS, scoped IPv6 addresses, a system without epoll), and
    ``done`` is never called."""
    plan = spec._plain_http
    tcp = spec._plain_tcp if plan is None else None
    if (plan is None and tcp is None) or not _HAVE_EPOLL:
        return None
    if poller is None:
        poller = Poller(asyncio.get_running_loop(), transient=True)
    if plan is not None:
        return _PlainHttpCheck(plan, done, poller)
    assert tcp is not None
    return _TcpCheck(tcp, done, poller)


async def _probe_streams(spec: ProbeSpec, started: float) -> ProbeResult:
    """TCP, HTTPS, and HTTP to scoped IPv6 addresses: asyncio streams."""
    stage = "connecting"  # where a timeout or an error struck, for the detail
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.kind == "tcp":
                await _tcp_connect(spec)
                ok, detail = True, "connected"
            else:
                reader, writer = await _connect(spec)
                stage = "sending the request"
                writer.write(_request(spec))
                await writer.drain()
                stage = "waiting for the response"
                status, headers = await _read_head(reader)
                if status != spec.expect_status:
                    # No need to read a body we will not judge.
                    ok, detail = False, f"HTTP {status} (expected {spec.expect_status})"
                else:
                    stage = "reading the body"
                    body = await _read_body(reader, status, headers)
                    if spec.expect_body is not None and spec.expect_body.encode() not in body:
                        ok, detail = False, f"body lacks {_shorten(spec.expect_body)!r}"
                    else:
                        ok, detail = True, f"HTTP {status}"
    except TimeoutError:
        ok, detail = False, f"timeout after {spec.timeout:.2f}s {stage}"
    except ssl.SSLCertVerificationError as exc:  # before OSError: SSL errors are OSErrors
        ok, detail = False, f"TLS: {exc.verify_message or exc.reason}"
    except ssl.SSLError as exc:
        # exc.reason is OpenSSL's WRONG_VERSION_NUMBER style; make it read like the rest.
        ok, detail = False, f"TLS: {exc.reason.lower().replace('_', ' ') if exc.reason else exc}"
    except OSError as exc:
        text = _ERRNO_TEXT.get(exc.errno or 0) or exc.strerror or type(exc).__name__
        ok, detail = False, text if stage == "connecting" else f"{text} {stage}"
    except asyncio.IncompleteReadError as exc:
        if stage == "reading the body" and exc.expected is not None:
            ok, detail = False, f"body truncated ({len(exc.partial)} of {exc.expected} bytes)"
        else:
            ok, detail = False, f"connection closed {stage}"
    except (_BadResponse, asyncio.LimitOverrunError) as exc:
        ok, detail = False, f"bad response: {exc}"
    finally:
        if writer is not None:
            # abort, not close: a graceful TLS close waits up to 30 s for the peer's
            # close_notify, and a health check has nothing left to say. Closes the fd now.
            writer.transport.abort()
    return ProbeResult(ok, time.perf_counter() - started, detail)


async def _tcp_connect(spec: ProbeSpec) -> None:
    """Connect, then close. A bare socket costs about a third less CPU than a stream pair,
    which counts at thousands of checks a second."""
    sock = socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if spec.source:
            sock.bind((spec.source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (spec.host, spec.port))
    finally:
        sock.close()


async def _connect(spec: ProbeSpec) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    if spec.kind == "https":
        tls = _tls_context(spec.tls_verify)
        # SNI and certificate name: the virtual host when one is given, else the address
        # (matched against the certificate's IP SANs when verifying).
        server_hostname = _hostname_of(spec.host_header) if spec.host_header else spec.host
    return await asyncio.open_connection(
        spec.host, spec.port, ssl=tls, server_hostname=server_hostname,
        local_addr=(spec.source, 0) if spec.source else None,
    )


@functools.cache
def _tls_context(verify: bool) -> ssl.SSLContext:
    """One context per mode for the whole process: building one loads the CA store (ms)."""
    if verify:
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- plain HTTP without streams -------------------------------------------------------------
# The stream path (open_connection with its transport and protocol, StreamReader.readuntil
# per line, a task wake-up per await, asyncio.timeout) spends more CPU in Python than the
# kernel spends on the connection; at thousands of checks a second that is the agent's
# budget. Plain HTTP therefore runs as callbacks on a bare non-blocking socket: connect,
# send the request prepared once per spec, parse each segment as it arrives, the socket in
# the checks' own epoll set and the deadline in its FIFO (``Poller``). The verdicts and details are the
# stream path's: the same parsing helpers, StreamReader's line limit, the same stages and
# error texts (tests run both paths against the same odd servers). Known differences, all
# in corner cases: a send that fails right after the connect reads "connection reset
# sending the request" where the stream path may say "ConnectionResetError sending the
# request"; and for a line over 64 KiB, which of StreamReader's two limit messages comes
# depends on how the data was split into reads (64 KiB here, 256 KiB there).

# What str.strip() strips from a latin-1 decoded line: the header rules on bytes match it.
_LATIN1_SPACE: Final = bytes(c for c in range(256) if chr(c).isspace())
_LINE_LIMIT: Final = 2**16  # asyncio's StreamReader limit: the longest line readuntil() returns
_RECV_SIZE: Final = 2**16  # per recv(); asyncio's 256 KiB costs more (a fresh large buffer each time)
_HIGH_WATER: Final = 2**16  # asyncio's write buffer high-water mark: drain() waits above it

# Parser states.
_STATUS, _HEADER, _LENGTH, _TO_EOF, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF = range(7)

_CONNECTING: Final = "connecting"
_SENDING: Final = "sending the request"
_WAITING: Final = "waiting for the response"
_BODY: Final = "reading the body"


class _PlainHttpPlan:
    """Everything about a plain HTTP check that does not change from one check to the next."""

    __slots__ = ("address", "body_lacks", "every", "expect_body", "expect_status", "family", "header_min", "key",
                 "nodelay", "request", "reuse", "source", "timeout", "timeout_prefix")

    def __init__(self, spec: ProbeSpec) -> None:
        # Kept connections are filed by the spec's value (its repr: a str, whose hash Python
        # keeps): a new plan from the controller makes new, equal specs (and plans) for the
        # checks it leaves alone, and those keep their connection.
        self.key = repr(spec)
        v6 = ":" in spec.host
        self.family = socket.AF_INET6 if v6 else socket.AF_INET
        # As asyncio's _ensure_resolved() spells an IP literal (it shows in connect errors).
        self.address: tuple[str, int] | tuple[str, int, int, int] = (
            (spec.host, spec.port, 0, 0) if v6 else (spec.host, spec.port))
        self.source: tuple[str, int] | tuple[str, int, int, int] | None = None
        if spec.source:
            self.source = (spec.source, 0, 0, 0) if ":" in spec.source else (spec.source, 0)
        self.reuse = spec.reuse_connection and spec.fresh_connection_every > 1
        self.every = spec.fresh_connection_every
        self.request = _request(spec, keep=self.reuse)
        # The shortest header name the parser looks at: Connection (10) only when keeping.
        self.header_min = 10 if self.reuse else 14
        # asyncio's transport sets TCP_NODELAY; it only matters for a request that goes out
        # in more than one segment (a very long path), where Nagle could hold back its tail.
        self.nodelay = len(self.request) > 512
        self.timeout = spec.timeout
        self.timeout_prefix = f"timeout after {spec.timeout:.2f}s "
        self.expect_status = spec.expect_status
        self.expect_body = None if spec.expect_body is None else spec.expect_body.encode()
        self.body_lacks = "" if spec.expect_body is None else f"body lacks {_shorten(spec.expect_body)!r}"


class _Closed(Exception):
    """EOF where a line was due (the stream path's IncompleteReadError from readuntil)."""


class _Truncated(Exception):
    """EOF within a counted read (the stream path's IncompleteReadError from readexactly)."""

    def __init__(self, got: int, expected: int) -> None:
        super().__init__(got, expected)
        self.got, self.expected = got, expected


# --- the checks' own epoll set --------------------------------------------------------------
# asyncio's add_writer/add_reader/remove_* cost a Handle, a SelectorKey and an epoll_ctl
# each, three or four times per check, plus a TimerHandle for the deadline: more than the
# check's own system calls. A ``Poller`` keeps the checks' sockets in an epoll set of its
# own, edge-triggered (each socket is registered once, for everything, and leaves the set
# when it is closed), which the loop watches as one reader; and it keeps the deadlines in
# one FIFO per timeout value, with one loop timer for the earliest.

_HAVE_EPOLL: Final = hasattr(select, "epoll")
_IN: Final = getattr(select, "EPOLLIN", 0x001)
_OUT: Final = getattr(select, "EPOLLOUT", 0x004)
_ERR: Final = getattr(select, "EPOLLERR", 0x008)
_HUP: Final = getattr(select, "EPOLLHUP", 0x010)
_RDHUP: Final = getattr(select, "EPOLLRDHUP", 0x2000)
_ET: Final = getattr(select, "EPOLLET", 1 << 31)
_EVENTS: Final = _IN | _OUT | _RDHUP | _ET  # ERR and HUP are always reported
_FAILED: Final = _ERR | _HUP
_READABLE: Final = _IN | _RDHUP | _HUP | _ERR  # something to read: data, EOF or an error
_CLOSED_OR_FAILED: Final = _RDHUP | _HUP | _ERR  # a short read does not end the reading
# Closed with a reset, not a FIN (SO_LINGER on, 0 s), once the verdict is in: neither end
# keeps the connection in TIME_WAIT (the agent at thousands of checks a second, or the
# backend, which closes first after a "Connection: close" answer) and no FIN/ACK exchange
# follows. What a check proves is settled before it closes: the connection was accepted
# (and the answer judged); HAProxy closes its health checks the same way.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
# What a kept connection the server closed reads as (it may have closed it just as we sent).
_CLOSED_BY_PEER: Final = frozenset((errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED))


class Poller:
    """The epoll set and the deadlines of a set of checks on one event loop.

    The scheduler keeps one for all its checks and closes it when it stops; ``start``
    without one gives the check a ``transient`` poller that closes with it. An event for a
    socket reaches its check only from a later ``epoll_wait`` than the one during which
    the check started (``batch``), so a file descriptor reused within one batch of events
    never gets its predecessor's event.
    """

    __slots__ = ("_checks", "_deadlines", "_ep", "_epfd", "_idle", "_live", "_timer", "_timer_at", "_transient",
                 "_warned_budget", "batch", "kept_budget", "kept_evicted", "kept_over_budget", "kept_retried",
                 "kept_retried_408", "kept_used", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, transient: bool = False) -> None:
        self.loop = loop
        self._ep = select.epoll()
        self._epfd = self._ep.fileno()
        self._transient = transient
        self._checks: dict[int, Check | _Kept] = {}  # by file descriptor, the sockets in the set
        self._idle: dict[str, _Kept] = {}  # kept connections between checks, by their plan's key (the spec's value)
        self._live: set[str] | None = None  # the keys of the scheduler's checks at its last retain(); None: all
        self.kept_used = 0  # checks that ran on a kept connection
        self.kept_retried = 0  # of those, checks that found it closed (or got a 408) and ran again on a fresh one
        self.kept_retried_408 = 0  # of kept_retried: the server answered 408 (its idle timeout) on the kept one
        # The most kept connections idle at once (None: no limit); the scheduler sets it below
        # the open-file limit (``kept_budget_for``). Past it a check's connection is closed, as
        # without reuse: a check must never fail for descriptors the checker itself holds.
        self.kept_budget: int | None = None
        self.kept_over_budget = 0  # connections closed instead of kept: the budget was full
        self.kept_evicted = 0  # idle kept connections closed to give a check a descriptor (EMFILE)
        self._warned_budget = False
        # By timeout value: the checks waiting for that deadline, in start order (a dict as an
        # ordered set: a check leaves it when it ends, so a finished check is not kept alive
        # until its deadline, as a FIFO of (when, check) did: ~10,000 objects a second that
        # lived long enough to reach the collector's older generations).
        self._deadlines: dict[float, dict[Check, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.batch = 0
        loop.add_reader(self._epfd, self._on_events)

    @property
    def closed(self) -> bool:
        return self._epfd < 0

    def close(self) -> None:
        """Cancel the checks still running (they report nothing) and release the set."""
        if self._epfd < 0:
            return
        for check in list(self._checks.values()):
            check.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        self.loop.remove_reader(self._epfd)
        self._epfd = -1
        self._ep.close()

    def add(self, check: Check, fd: int) -> None:
        self._ep.register(fd, _EVENTS)
        self._checks[fd] = check

    def park(self, plan: _PlainHttpPlan, sock: _socket.socket, fd: int, uses: int, kept: _Kept | None) -> None:
        """Keep a check's connection (still in the set) for the plan's next check; ``kept``:
        the connection's holder from its last idle spell, used again (one per connection, not
        one per check)."""
        if plan.key in self._idle or self._transient or (self._live is not None and plan.key not in self._live):
            # (one per spec is enough: two groups of one spec; a check that ended after its
            # spec left the scheduler keeps nothing: no later check would take it)
            self._checks.pop(fd, None)
            sock.close()
            return
        budget = self.kept_budget
        if budget is not None and len(self._idle) >= budget:
            self.kept_over_budget += 1
            if not self._warned_budget:
                self._warned_budget = True
                log.warning("kept HTTP connections (check.reuse_connection) reached their budget of %d file "
                            "descriptors (below the open-file limit): checks past it connect afresh each time "
                            "(anycast_check_kept_over_budget counts them)", budget)
            self._checks.pop(fd, None)
            sock.close()
            return
        if kept is None:
            kept = _Kept(self, plan, sock, fd, uses)
        else:
            kept.sock, kept.fd, kept.uses, kept._batch = sock, fd, uses, self.batch
        self._checks[fd] = self._idle[plan.key] = kept

    def evict(self) -> bool:
        """Out of file descriptors: close the idle kept connections, oldest first, up to 16
        (or all), for a check that needs a socket. False: none was idle."""
        if not self._idle:
            return False
        for kept in list(self._idle.values())[:16]:
            kept.cancel()
            self.kept_evicted += 1
        return True

    def take(self, plan: _PlainHttpPlan) -> _Kept | None:
        """The plan's kept connection, if one waits; it leaves the idle set (the caller
        hands it to a check with ``adopt`` or closes it)."""
        return self._idle.pop(plan.key, None) if self._idle else None

    def adopt(self, check: Check, fd: int) -> None:
        """A kept connection's socket (already in the set) now belongs to ``check``."""
        self._checks[fd] = check

    def retain(self, specs: Iterable[ProbeSpec]) -> None:
        """Close the kept connections of every spec but these (the scheduler's live ones)."""
        # (only reusing specs: their plan is made now rather than at their next check)
        self._live = live = {p.key for spec in specs
                             if spec.reuse_connection and (p := spec._plain_http) is not None and p.reuse}
        for key, kept in list(self._idle.items()):
            if key not in live:
                kept.cancel()

    @property
    def idle(self) -> int:
        """Kept connections waiting for their next check."""
        return len(self._idle)

    def discard(self, fd: int) -> None:
        """The check's socket is about to close (which takes it out of the epoll set)."""
        self._checks.pop(fd, None)

    def deadline(self, check: Check, timeout: float) -> None:
        """Call ``check._on_timeout()`` after ``timeout`` seconds, unless it is over by then
        (``Check.cancel`` takes it out)."""
        when = self.loop.time() + timeout
        queue = self._deadlines.get(timeout)
        if queue is None:
            queue = self._deadlines[timeout] = {}
        queue[check] = when  # one timeout value, start order: deadlines in order
        check._deadline = queue
        if when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self.poll()  # answers first: one that is in is not a timeout
        now = self.loop.time()
        soonest = float("inf")
        for queue in list(self._deadlines.values()):
            while queue:
                check, when = next(iter(queue.items()))  # the oldest still running
                if when > now:
                    soonest = min(soonest, when)
                    break
                del queue[check]
                check._deadline = None
                check._on_timeout()
        if soonest < self._timer_at and self._epfd >= 0:
            self._arm(soonest)

    def poll(self) -> None:
        """Hand the events that are in to their checks now. The loop calls this when the
        epoll set becomes readable; the scheduler also on each of its passes (results free
        slots before it starts checks), and the deadline sweep before it strikes: an
        answer that came in after the loop's last look is an answer, not a timeout."""
        if self._epfd >= 0:
            self._on_events()

    def _on_events(self) -> None:
        # epoll hands over at most ``maxevents`` at a time (by default FD_SETSIZE - 1, 1,023):
        # room for every socket in the set, and again while a batch came back full, so that
        # after a starved loop the deadline sweep strikes no check whose answer is in.
        checks = self._checks
        while True:
            self.batch += 1
            batch = self.batch
            room = len(checks) + 1
            try:
                events = self._ep.poll(0, room)
            except InterruptedError:
                return
            for fd, mask in events:
                check = checks.get(fd)
                if check is not None and check._batch != batch:
                    check._on_event(mask)
            if len(events) < room or self._epfd < 0:
                return


class _Kept:
    """A kept connection between two checks of its plan: in the epoll set, read by nobody.
    Anything it reports that can be read (the server's FIN or reset, or bytes nobody asked
    for) ends it: the next check connects afresh. Idle timeouts are routine (Apache 5 s,
    nginx 75 s), so this is no verdict; a crashed backend resets the watch connection too
    (``health.watch``), and the next check decides."""

    __slots__ = ("_batch", "_plan", "_poller", "fd", "sock", "uses")

    def __init__(self, poller: Poller, plan: _PlainHttpPlan, sock: _socket.socket, fd: int, uses: int) -> None:
        self._poller = poller
        self._batch = poller.batch  # the parking check's batch: its events were its own
        self._plan = plan
        self.sock, self.fd = sock, fd
        self.uses = uses  # checks this connection has served

    def _on_event(self, mask: int) -> None:
        if mask & _READABLE:
            self.cancel()

    def cancel(self) -> None:
        """Close it (with a reset, as every check's socket: SO_LINGER 0)."""
        poller = self._poller
        if poller._idle.get(self._plan.key) is self:
            del poller._idle[self._plan.key]
        if poller._checks.get(self.fd) is self:
            del poller._checks[self.fd]
        self.sock.close()


class Check:
    """What a check driven by event-loop callbacks shares: its socket in the poller's epoll
    set, its deadline, and the one call of ``done`` with the result.

    Nothing here raises into the loop: network trouble and bad answers become a result; a
    bug becomes ``done``'s exception, which the scheduler reports as a probe error. A
    result reached within the constructor (an immediate connect error) is handed over on
    the loop's next pass, so the caller always has the check before its ``done`` runs.
    ``cancel()`` (idempotent) releases the socket and reports nothing.

    The socket is registered once, edge-triggered: ``_on_event(mask)`` gets each change of
    its readiness. Connecting, the mask says whether the connect failed (ERR or HUP: only
    then is SO_ERROR read) or succeeded (OUT).
    """

    __slots__ = ("_address", "_batch", "_deadline", "_done", "_fd", "_poller", "_sock", "_started", "building")

    def __init__(self, done: Done, timeout: float, address: object, poller: Poller) -> None:
        self._poller = poller
        self._batch = poller.batch
        self._address = address  # for a connect error's text, as asyncio words it
        self._started = time.perf_counter()
        self._done: Done | None = done
        self.building = True  # within the constructor: a result waits for the loop's next pass
        self._sock: _socket.socket | None = None
        self._fd = -1
        self._deadline: dict[Check, float] | None = None  # the poller's queue this check waits in
        poller.deadline(self, timeout)

    def _open(self, family: int) -> _socket.socket:
        # The C socket: socket.socket's Python __init__ and close() cost more than their
        # system calls at thousands of checks a second, and add nothing here.
        try:
            sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            # Out of descriptors while kept connections sit idle: theirs first, the check
            # must not fail for what the checker itself holds.
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._poller.evict():
                raise
            sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self._sock = sock
        self._fd = sock.fileno()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        return sock

    def _connect(self, sock: _socket.socket, address: object) -> None:
        """Start the connect; the poller reports its end (at once, if it is done already)."""
        err = sock.connect_ex(address)  # type: ignore[arg-type]
        if err not in (0, errno.EINPROGRESS, errno.EINTR):
            raise OSError(err, f"Connect call failed {self._address}")
        self._poller.add(self, self._fd)

    def _connect_failed(self, mask: int) -> bool:
        """Connecting: True when ``mask`` reports the connect's failure (then reported);
        False when it is up, or the event said nothing yet."""
        if mask & _FAILED:
            assert self._sock is not None
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._error(OSError(err, f"Connect call failed {self._address}"))
                return True
        return False

    def _on_event(self, mask: int) -> None:
        raise NotImplementedError

    def _on_timeout(self) -> None:
        raise NotImplementedError

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.perf_counter() - self._started

    def _finish(self, ok: bool, detail: str) -> None:
        self._report(ProbeResult(ok, time.perf_counter() - self._started, detail))

    def _bug(self, exc: Exception) -> None:
        self._report(exc)

    def _report(self, outcome: ProbeResult | Exception) -> None:
        done = self._done
        self.cancel()
        if done is None:
            return
        if self.building:
            self._poller.loop.call_soon(done, self, outcome)
        else:
            done(self, outcome)

    def cancel(self) -> None:
        self._done = None
        queue = self._deadline
        if queue is not None:
            self._deadline = None
            queue.pop(self, None)
        sock = self._sock
        if sock is not None:
            self._sock = None
            self._poller.discard(self._fd)
            sock.close()  # which takes it out of the epoll set
        if self._poller._transient:
            self._poller.close()

    def _error(self, exc: OSError, stage: str = _CONNECTING) -> None:
        text = _ERRNO_TEXT.get(exc.errno or 0) or exc.strerror or type(exc).__name__
        self._finish(False, text if stage == _CONNECTING else f"{text} {stage}")


class _TcpPlan:
    """A TCP check, worked out once per spec."""

    __slots__ = ("address", "family", "source", "timeout", "timeout_detail")

    def __init__(self, spec: ProbeSpec) -> None:
        self.family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        self.address = (spec.host, spec.port)
        self.source = spec.source
        self.timeout = spec.timeout
        self.timeout_detail = f"timeout after {spec.timeout:.2f}s {_CONNECTING}"


class _TcpCheck(Check):
    """Connect, then close: the stream path's ``_tcp_connect`` as callbacks, with its
    verdicts and details ("connected", the connect error, "timeout after ... connecting")."""

    __slots__ = ("_plan",)

    def __init__(self, plan: _TcpPlan, done: Done, poller: Poller) -> None:
        self._plan = plan
        super().__init__(done, plan.timeout, plan.address, poller)
        try:
            sock = self._open(plan.family)
            if plan.source:
                sock.bind((plan.source, 0))
            self._connect(sock, plan.address)
        except OSError as exc:
            self._error(exc)
        except Exception as exc:  # a bug: the probe's exception, as on the stream path
            self._bug(exc)
        self.building = False

    def _on_event(self, mask: int) -> None:
        try:
            if mask & (_OUT | _FAILED) and not self._connect_failed(mask):
                self._finish(True, "connected")
        except OSError as exc:
            self._error(exc)
        except Exception as exc:
            self._bug(exc)

    def _on_timeout(self) -> None:
        self._finish(False, self._plan.timeout_detail)


class _PlainHttpCheck(Check):
    """One plain HTTP check, driven by event-loop callbacks (see ``Check``)."""

    __slots__ = ("_body", "_buf", "_chunk", "_close", "_http11", "_kept", "_length", "_need", "_plan", "_pos",
                 "_reused", "_scan", "_size", "_stage", "_state", "_status", "_te", "_unsent", "_uses")

    def __init__(self, plan: _PlainHttpPlan, done: Done, poller: Poller) -> None:
        super().__init__(done, plan.timeout, plan.address, poller)
        self._plan = plan
        self._stage = _CONNECTING
        self._unsent = b""  # request bytes the socket did not take yet
        self._buf = bytearray()
        self._pos = 0  # start of the unparsed data in _buf
        self._scan = 0  # where the search for the next newline resumes
        self._state = _STATUS
        self._size = 0  # bytes of status lines and headers so far
        self._status = 0
        self._te = ""  # Transfer-Encoding and Content-Length of the response being read
        self._length: str | None = None
        self._need = 0  # bytes a counted read waits for
        self._chunk = 0  # size of the chunk being read
        self._body = bytearray()  # chunked bodies only; the others are sliced from _buf
        self._http11 = False  # the answer is HTTP/1.1 and
        self._close = False  # says "Connection: close" (read only when keeping connections)
        self._reused = False  # this attempt runs on a kept connection (a fresh one: False)
        self._kept: _Kept | None = None  # that connection's idle holder, parked again if it stays usable
        self._uses = 1  # checks the connection has served, this one included
        try:
            if not (plan.reuse and self._adopt()):
                self._connect_fresh()
        except OSError as exc:
            self._error(exc)
        except Exception as exc:  # a bug: make it the probe's exception, as on the stream path
            self._bug(exc)
        self.building = False

    def _connect_fresh(self) -> None:
        plan = self._plan
        sock = self._open(plan.family)
        if plan.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if plan.source is not None:
            self._bind(sock, plan.source)
        self._connect(sock, plan.address)

    def _adopt(self) -> bool:
        """Send the request on the plan's kept connection; False: none is usable."""
        poller = self._poller
        kept = poller.take(self._plan)
        if kept is None:
            return False
        sock = kept.sock
        try:
            stale = sock.recv(1)  # an idle connection has nothing to read: b"" is the server's FIN
        except (BlockingIOError, InterruptedError):
            stale = None
        except OSError:  # reset while idle, in this batch of events
            stale = b""
        if stale is not None:
            kept.cancel()
            return False
        self._sock, self._fd = sock, kept.fd
        poller.adopt(self, kept.fd)
        poller.kept_used += 1
        self._reused = True
        self._kept = kept
        self._uses = kept.uses + 1
        self._stage = _SENDING
        self._unsent = self._plan.request
        self._send()
        return True

    def _again(self, timed_out: bool = False) -> bool:
        """The kept connection was closed by the server before any of the answer came (it
        timed out the idle connection as we sent), or answered 408 Request Timeout (its idle
        timeout's answer, raced by our request; ``timed_out``): run once more on a fresh
        connection, within the same deadline. False: this attempt was a fresh connection, its
        failure counts."""
        if not self._reused or (self._buf and not timed_out) or self._done is None:
            return False
        self._reused = False
        self._kept = None
        self._uses = 1
        self._poller.kept_retried += 1
        if timed_out:
            self._poller.kept_retried_408 += 1
            # The parser starts over: nothing of the 408 carries into the fresh answer.
            self._buf = bytearray()
            self._pos = self._scan = self._size = 0
            self._state = _STATUS
        sock = self._sock
        if sock is not None:
            self._sock = None
            self._poller.discard(self._fd)
            sock.close()
        self._stage = _CONNECTING
        self._unsent = b""
        # The fresh socket may get the closed one's file descriptor: events of this batch
        # for that number were the old socket's (the rule a check's start keeps, Poller).
        self._batch = self._poller.batch
        try:
            self._connect_fresh()
        except OSError as exc:
            self._error(exc)
        return True

    def _bind(self, sock: _socket.socket, source: tuple[str, int] | tuple[str, int, int, int]) -> None:
        """Bind to the source address; failures read as asyncio's create_connection words them."""
        if (len(source) == 4) != (self._plan.family == socket.AF_INET6):
            raise OSError(f"no matching local address with family={self._plan.family!r} found")
        try:
            sock.bind(source)
        except OSError as exc:
            raise OSError(exc.errno, f"error while attempting to bind on address {source!r}: "
                                     f"{(exc.strerror or '').lower()}") from None

    # --- loop callbacks -------------------------------------------------------------------
    def _on_event(self, mask: int) -> None:
        """Connect done: send the request; room to send: the rest; something to read: read.
        Edge-triggered, so whatever the mask reports is acted on now."""
        try:
            if self._stage is _CONNECTING:
                if not mask & (_OUT | _FAILED) or self._connect_failed(mask):
                    return
                self._stage = _SENDING
                self._unsent = self._plan.request
                if not self._send():
                    return
            elif self._unsent and mask & (_OUT | _FAILED):
                if not self._send():
                    return
            if mask & _READABLE:
                self._on_readable(mask)
        except Exception as exc:
            self._bug(exc)

    def _send(self) -> bool:
        """Send what the socket takes; False when that failed (the check is over)."""
        assert self._sock is not None
        try:
            sent = self._sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._error(exc)
            return False
        self._unsent = self._unsent[sent:]
        if self._stage == _SENDING and len(self._unsent) <= _HIGH_WATER:
            # The stream path's drain() returns once the rest fits its write buffer.
            self._stage = _WAITING
        return True

    def _on_readable(self, mask: int) -> None:
        """Read until the verdict, or until the socket has nothing more for now: a short read
        drained it, unless the peer closed or failed (then the EOF or the error is next)."""
        mine = self._sock  # a retry on a fresh connection (_again) ends this event's reading
        try:
            while True:
                sock = self._sock
                if sock is None or sock is not mine:
                    return
                try:
                    data = sock.recv(_RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self._error(exc)
                    return
                if not data:
                    if self._reused and self._again():
                        return
                    self._parse(True)
                    if self._sock is mine:
                        raise AssertionError("the response parser neither finished nor failed at EOF")
                    return
                self._buf += data
                self._parse(False)
                if len(data) < _RECV_SIZE and not mask & _CLOSED_OR_FAILED:
                    return
        except _BadResponse as exc:
            self._finish(False, f"bad response: {exc}")
        except _Closed:
            self._finish(False, f"connection closed {self._stage}")
        except _Truncated as exc:
            self._finish(False, f"body truncated ({exc.got} of {exc.expected} bytes)")

    def _on_timeout(self) -> None:
        self._finish(False, self._plan.timeout_prefix + self._stage)

    # --- the response ---------------------------------------------------------------------
    def _line(self, eof: bool) -> bytearray | None:
        """The next line, newline included; None until it is complete. StreamReader.readuntil's
        rules: a line longer than its limit, or that much data without a newline, is an error."""
        buf = self._buf
        pos = self._pos
        end = buf.find(b"\n", self._scan)
        if end < 0:
            if len(buf) - pos > _LINE_LIMIT:
                raise _BadResponse("Separator is not found, and chunk exceed the limit")
            if eof:
                raise _Closed
            self._scan = len(buf)
            return None
        if end - pos > _LINE_LIMIT:
            raise _BadResponse("Separator is found, but chunk is longer than limit")
        self._pos = self._scan = end + 1
        return buf[pos:end + 1]

    def _parse(self, eof: bool) -> None:
        """Consume what arrived; finish the check once the response is judged. At EOF every
        state either finishes or raises (or hands the check to a fresh connection, _again)."""
        sock = self._sock
        while sock is not None and self._sock is sock:
            state = self._state
            if state == _STATUS or state == _HEADER or state == _CHUNK_SIZE:
                line = self._line(eof)
                if line is None:
                    return
                if state == _STATUS:
                    self._size += len(line)
                    self._status = _status_of(line)
                    self._http11 = line.startswith(b"HTTP/1.1 ")
                    self._te, self._length, self._close = "", None, False
                    self._state = _HEADER
                elif state == _HEADER:
                    self._size += len(line)
                    if self._size > MAX_HEAD:
                        raise _BadResponse(f"headers longer than {MAX_HEAD} bytes")
                    if line == b"\r\n" or line == b"\n":
                        self._end_of_head()
                    else:
                        # _header_of's rules on the bytes, decoding only the two headers
                        # that matter (a name shorter than both is neither).
                        name, colon, value = line.partition(b":")
                        if not colon:
                            _header_of(line)  # raises, with its words
                        if len(name) >= self._plan.header_min:
                            name = name.strip(_LATIN1_SPACE).lower()
                            if name == b"transfer-encoding":
                                self._te = value.strip(_LATIN1_SPACE).decode("latin-1")
                            elif name == b"content-length":
                                self._length = value.strip(_LATIN1_SPACE).decode("latin-1")
                            elif name == b"connection" and b"close" in value.lower():
                                self._close = True
                else:
                    self._chunk = _chunk_size_of(line)
                    if self._chunk == 0:
                        self._judge(self._body, 0, len(self._body))  # trailers, if any, are left unread
                        return
                    self._need = min(self._chunk, MAX_BODY - len(self._body))
                    self._state = _CHUNK_DATA
                continue
            available = len(self._buf) - self._pos
            if state == _TO_EOF:
                if available >= MAX_BODY or eof:
                    self._judge(self._buf, self._pos, self._pos + min(available, MAX_BODY))
                return
            need = self._need
            if available < need:
                if eof:
                    raise _Truncated(available, need)
                self._compact()
                return
            start = self._pos
            self._pos = self._scan = start + need
            if state == _LENGTH:
                self._judge(self._buf, start, start + need)
                return
            if state == _CHUNK_DATA:
                self._body += self._buf[start:start + need]
                if need < self._chunk:
                    self._judge(self._body, 0, len(self._body))  # MAX_BODY reached within the chunk
                    return
                self._need = 2  # the CRLF after the chunk data (not looked at)
                self._state = _CHUNK_CRLF
            else:  # _CHUNK_CRLF
                if len(self._body) >= MAX_BODY:
                    self._judge(self._body, 0, len(self._body))
                    return
                self._state = _CHUNK_SIZE
                self._compact()

    def _end_of_head(self) -> None:
        status = self._status
        if not _is_final(status):
            self._state = _STATUS
            return
        if status == 408 and self._reused and self._again(timed_out=True):
            return  # the server's idle timeout, not the check's answer (module docstring)
        expected = self._plan.expect_status
        if status != expected:
            # No need to read a body we will not judge.
            self._finish(False, f"HTTP {status} (expected {expected})")
            return
        self._stage = _BODY
        if status in (204, 304):
            self._judge(b"", 0, 0)
        elif "chunked" in self._te.lower():
            self._state = _CHUNK_SIZE
        elif self._length is not None:
            self._need = _body_length_of(self._length)
            self._state = _LENGTH
        else:
            self._state = _TO_EOF

    def _compact(self) -> None:
        """Drop parsed data once it is large, so a long exchange does not keep it all."""
        if self._pos > MAX_BODY:
            del self._buf[:self._pos]
            self._scan -= self._pos
            self._pos = 0

    def _judge(self, data: bytes | bytearray, start: int, end: int) -> None:
        """Judge the body, data[start:end]."""
        plan = self._plan
        if plan.reuse:
            self._keep()
        if plan.expect_body is not None and data.find(plan.expect_body, start, end) < 0:
            self._finish(False, plan.body_lacks)
        else:
            self._finish(True, f"HTTP {self._status}")

    def _keep(self) -> None:
        """Park the connection for the next check if the answer is over and leaves it usable:
        HTTP/1.1 without "Connection: close", its body read to its end as framed (a body cut
        at MAX_BODY, or one that runs to EOF, leaves it unusable), nothing after it, and
        fewer than ``fresh_connection_every`` checks on it."""
        sock = self._sock
        if sock is None or not self._http11 or self._close or self._uses >= self._plan.every:
            return
        state, rest = self._state, len(self._buf) - self._pos
        if state == _LENGTH:
            complete = rest == 0 and self._need < MAX_BODY
        elif state == _CHUNK_SIZE:  # at the last chunk: no trailers, the final CRLF in
            complete = self._buf[self._pos:] == b"\r\n"
        else:  # _HEADER: 204 and 304 have no body
            complete = state == _HEADER and rest == 0
        if complete:
            self._sock = None
            self._poller.park(self._plan, sock, self._fd, self._uses, self._kept)

    # --- the end --------------------------------------------------------------------------
    def _error(self, exc: OSError, stage: str | None = None) -> None:
        if self._reused and exc.errno in _CLOSED_BY_PEER and self._again():
            return
        super()._error(exc, self._stage if stage is None else stage)


def _request(spec: ProbeSpec, keep: bool = False) -> bytes:
    """The check's GET; ``keep``: without ``Connection: close`` (HTTP/1.1 keeps the connection)."""
    host = _wire_host(spec.host_header) if spec.host_header else _authority(spec)
    return (
        f"GET {_wire_path(spec.path)} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\n"
        + ("" if keep else "Connection: close\r\n")
        + "\r\n"
    ).encode("ascii")


def _authority(spec: ProbeSpec) -> str:
    address = ipaddress.ip_address(spec.host)
    host = f"[{address}]" if address.version == 6 else str(address)
    return host if spec.port == _DEFAULT_PORT[spec.kind] else f"{host}:{spec.port}"


def _hostname_of(host_header: str) -> str:
    """'example.com:8443' -> 'example.com', '[2001:db8::1]:443' -> '2001:db8::1'."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    name, colon, port = host_header.rpartition(":")
    return name if colon and port.isdigit() else host_header


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status code and headers (names lowercased) of the final response; 1xx are skipped."""
    size = 0
    while True:
        line = await reader.readuntil(b"\n")
        size += len(line)
        status = _status_of(line)
        headers: dict[str, str] = {}
        while True:
            line = await reader.readuntil(b"\n")
            size += len(line)
            if size > MAX_HEAD:
                raise _BadResponse(f"headers longer than {MAX_HEAD} bytes")
            if line in (b"\r\n", b"\n"):
                break
            name, value = _header_of(line)
            headers[name] = value
        if _is_final(status):
            return status, headers


def _status_of(line: bytes | bytearray) -> int:
    """The status code of a status line ('HTTP/1.1 200 OK\\r\\n')."""
    version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/") or not _is_number(code, 10) or rest[3:4] not in ("", " "):
        raise _BadResponse(f"not an HTTP status line: {_shorten(line.decode('latin-1').strip())!r}")
    return int(code)


def _is_final(status: int) -> bool:
    """100 Continue, 103 Early Hints: an interim answer, the real one follows."""
    return not (100 <= status < 200) or status == 101


def _header_of(line: bytes | bytearray) -> tuple[str, str]:
    """(name lowercased, value) of a header line."""
    name, colon, value = line.decode("latin-1").partition(":")
    if not colon:
        raise _BadResponse(f"malformed header line: {_shorten(line.decode('latin-1').strip())!r}")
    return name.strip().lower(), value.strip()


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> bytes:
    """Up to MAX_BODY bytes of the body, framed by chunked encoding, Content-Length or EOF."""
    if status in (204, 304):
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    length = headers.get("content-length")
    if length is not None:
        # Stop at Content-Length: a server that ignores "Connection: close" must not
        # turn a good answer into a timeout.
        return await reader.readexactly(_body_length_of(length))
    body = bytearray()
    while len(body) < MAX_BODY:
        chunk = await reader.read(MAX_BODY - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while len(body) < MAX_BODY:
        size = _chunk_size_of(await reader.readuntil(b"\n"))
        if size == 0:
            break  # trailers, if any, are left unread: the connection closes anyway
        take = min(size, MAX_BODY - len(body))
        body += await reader.readexactly(take)
        if take < size:
            break
        await reader.readexactly(2)  # CRLF after the chunk data
    return bytes(body)


def _chunk_size_of(size_line: bytes | bytearray) -> int:
    size_text = size_line.split(b";", 1)[0].strip().decode("latin-1")
    if not _is_number(size_text, 16):
        raise _BadResponse(f"bad chunk size {_shorten(size_text)!r}")
    return int(size_text, 16)


def _body_length_of(content_length: str) -> int:
    """How much of a Content-Length body to read."""
    if not _is_number(content_length, 10):
        raise _BadResponse(f"bad Content-Length {_shorten(content_length)!r}")
    return min(int(content_length), MAX_BODY)


def _is_number(text: str, base: int) -> bool:
    """Plain digits only: int() would also take '+5', '1_000' and non-ASCII digits."""
    if base == 10:
        return text.isascii() and text.isdigit()  # the ASCII digits are the only ASCII isdigit()
    digits = string.hexdigits
    return bool(text) and all(c in digits for c in text)


def _wire_path(path: str) -> str:
    """Percent-encode what may not appear raw in a request line (spaces, non-ASCII)."""
    return path if _PRINTABLE.issuperset(path) else urllib.parse.quote(path, safe=_PRINTABLE_STR)


def _wire_host(host_header: str) -> str:
    """The Host header as sent: IDNA for non-ASCII names; whitespace could split the request."""
    if not host_header or not all(c.isprintable() and not c.isspace() for c in host_header):
        raise ValueError(f"host_header must be a non-empty name without spaces or control characters, "
                         f"got {host_header!r}")
    return host_header if host_header.isascii() else host_header.encode("idna").decode("ascii")


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
