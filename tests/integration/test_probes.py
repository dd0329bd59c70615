"""Probes and the scheduler against real servers on 127.0.0.1 and ::1 (no mocks).

Each test server runs on its own thread with its own event loop (`serve`), so how fast it
answers does not depend on how busy the probes' loop is: on a loaded machine a probe may
be slower, but it meets the server in the stage the test means.

Timing rules, so that the tests hold on a busy 2-core machine:
- A probe whose test is not about timing gets GENEROUS seconds: only a hung test meets it.
- A test about a timeout stage uses STAGE_TIMEOUT (or a short one where nothing but the
  kernel is involved: a connect to a listener that never accepts) and asserts the exact
  detail. A timeout result may be checked not to come before its timeout (a lower bound);
  no test bounds a duration from above: what such a bound measures belongs to `bench/`.
- Waiting for something to happen polls a condition (`until`); its bound only fails a
  hung test.

Servers are asyncio servers started on port 0. `http.server` is avoided on purpose: it
does a reverse DNS lookup at bind, which stalls where no resolver answers.
"""

from __future__ import annotations

import asyncio
import gc
import os
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.helpers.waiting import check, until
from controller.cli import event_loop
from controller.health import probes
from controller.health.probes import ProbeResult, ProbeSpec, probe
from controller.health.scheduler import CheckScheduler, Target

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]

GENEROUS = 30.0  # probe timeout where the test is not about timing
STAGE_TIMEOUT = 1.0  # where the server must have written its part before the deadline strikes
HOLD = 3600.0  # a server "never" finishes: it holds the connection until the test tears it down


@dataclass
class Server:
    host: str
    port: int
    requests: list[bytes] = field(default_factory=list)  # appended by the server's thread
    peers: list[str] = field(default_factory=list)


@contextmanager
def serve(
    handler: Handler, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None, read_request: bool = True,
    limit: int = 2**16,
) -> Iterator[Server]:
    """A server that reads one request head, records it, and lets `handler` answer.

    It runs on its own thread and event loop: its answers are written while the probes'
    loop is busy, and a test may block its own loop without stalling the server. Usable
    from a test's event loop (start and stop take milliseconds) or from plain code.
    """
    info = Server(host, 0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"test-server-{host}", daemon=True)
    thread.start()
    handlers: set[asyncio.Task[Any]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        info.peers.append(writer.get_extra_info("peername")[0])
        try:
            head = await reader.readuntil(b"\r\n\r\n") if read_request else b""
            info.requests.append(head)
            await handler(head, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # tcp probes connect and leave; that is their job
        except asyncio.CancelledError:
            pass  # the test is over (a cancelled handler task makes asyncio log noise)
        finally:
            writer.transport.abort()
            handlers.discard(task)

    async def start() -> asyncio.Server:
        return await asyncio.start_server(on_connect, host, 0, ssl=tls, backlog=1024, limit=limit)

    async def stop(server: asyncio.Server) -> None:
        server.close()
        # A connection accepted just now may not have started its handler yet: repeat until
        # every task on this loop (handshakes, handlers) has ended, so every socket is closed.
        me = asyncio.current_task()
        while others := [t for t in asyncio.all_tasks() if t is not me]:
            for task in list(handlers):
                task.cancel()
            await asyncio.wait(others, timeout=0.05)
        await server.wait_closed()

    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result()
        info.port = server.sockets[0].getsockname()[1]
        try:
            yield info
        finally:
            asyncio.run_coroutine_threadsafe(stop(server), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def answer(status: str = "200 OK", body: bytes = b"ok", headers: str = "") -> Handler:
    async def handler(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body)
        await writer.drain()

    return handler


def raw(data: bytes, then_wait: float = 0.0) -> Handler:
    async def handler(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(then_wait)

    return handler


async def never_answer(head: bytes, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(HOLD)






def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def no_leaks() -> Iterator[None]:
    """Fail if the block leaves a file descriptor open or warns about an unclosed resource
    (the servers' threads included: start and stop them inside the block)."""
    gc.collect()
    before = open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert open_fds() <= before


def timed_out_no_sooner(result: ProbeResult, timeout: float) -> bool:
    """A timeout result does not come before its timeout (10 ms of slack for clock rounding)."""
    return result.latency > timeout - 0.01


@contextmanager
def unaccepting_listener() -> Iterator[int]:
    """A port whose listener never accepts and whose accept queue is full: further SYNs are
    dropped, so a connect hangs until the probe's timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(3):
                f = socket.socket()
                fillers.append(f)
                f.setblocking(False)
                f.connect_ex(("127.0.0.1", port))  # in progress or done: either fills the queue
            yield port
        finally:
            for f in fillers:
                f.close()


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- TCP ----------------------------------------------------------------------------------


def test_tcp_connects() -> None:
    with serve(never_answer) as srv:
        result = asyncio.run(probe(ProbeSpec("tcp", "127.0.0.1", srv.port, GENEROUS)))
    assert (result.ok, result.detail) == (True, "connected")
    assert result.latency > 0


def test_tcp_refused_fails_naming_the_refusal() -> None:
    result = asyncio.run(probe(ProbeSpec("tcp", "127.0.0.1", free_port(), GENEROUS)))
    assert (result.ok, result.detail) == (False, "connect refused")  # not a timeout


def test_tcp_timeout_when_the_listener_never_accepts() -> None:
    async def scenario() -> ProbeResult:
        with unaccepting_listener() as port:
            await asyncio.sleep(0.05)
            return await probe(ProbeSpec("tcp", "127.0.0.1", port, 0.3))

    with no_leaks():
        result = check(scenario)
    assert (result.ok, result.detail) == (False, "timeout after 0.30s connecting")
    assert timed_out_no_sooner(result, 0.3)


def test_tcp_over_ipv6() -> None:
    async def scenario() -> tuple[ProbeResult, ProbeResult]:
        with serve(answer()) as srv6_missing:  # an IPv4-only server: ::1 refuses
            refused = await probe(ProbeSpec("tcp", "::1", srv6_missing.port, GENEROUS))
        with serve(never_answer, host="::1") as srv:
            ok = await probe(ProbeSpec("tcp", "::1", srv.port, GENEROUS))
        return ok, refused

    ok, refused = check(scenario)
    assert (ok.ok, ok.detail) == (True, "connected")
    assert (refused.ok, refused.detail) == (False, "connect refused")


def test_a_source_address_is_used_for_the_connection() -> None:
    with serve(answer()) as srv:
        result = asyncio.run(probe(ProbeSpec("http", "127.0.0.1", srv.port, GENEROUS, source="127.0.0.2")))
    assert result.ok and srv.peers == ["127.0.0.2"]


# --- HTTP ---------------------------------------------------------------------------------


def http(srv: Server, **kw: Any) -> Coroutine[Any, Any, ProbeResult]:
    return probe(ProbeSpec("http", srv.host, srv.port, kw.pop("timeout", GENEROUS), **kw))


def run_http(handler: Handler, host: str = "127.0.0.1", **kw: Any) -> tuple[ProbeResult, Server]:
    with serve(handler, host) as srv:
        return asyncio.run(http(srv, **kw)), srv


def test_http_200_is_healthy_and_the_request_is_a_proper_get() -> None:
    result, srv = run_http(answer(), path="/healthz?deep=1")
    assert (result.ok, result.detail) == (True, "HTTP 200")
    head = srv.requests[0].decode()
    assert head.startswith("GET /healthz?deep=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{srv.port}\r\n" in head
    assert "\r\nConnection: close\r\n" in head


def test_http_503_fails_naming_the_status() -> None:
    result, _ = run_http(answer("503 Service Unavailable", b"draining"))
    assert (result.ok, result.detail) == (False, "HTTP 503 (expected 200)")


def test_http_expected_status_other_than_200() -> None:
    result, _ = run_http(answer("204 No Content", b""), expect_status=204)
    assert (result.ok, result.detail) == (True, "HTTP 204")


def test_http_body_must_contain_the_expected_text() -> None:
    good, _ = run_http(answer(body=b'{"status": "ok"}'), expect_body='"ok"')
    bad, _ = run_http(answer(body=b'{"status": "degraded"}'), expect_body='"ok"')
    assert (good.ok, good.detail) == (True, "HTTP 200")
    assert (bad.ok, bad.detail) == (False, "body lacks '\"ok\"'")


def test_http_only_the_first_64_kib_of_the_body_count() -> None:
    body = b"x" * (70 * 1024) + b"MARKER"
    result, _ = run_http(answer(body=body), expect_body="MARKER")
    assert (result.ok, result.detail) == (False, "body lacks 'MARKER'")


def test_http_chunked_body_is_decoded() -> None:
    # "MARK" / "ER" split across chunks: a raw substring search would miss it.
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nMARK\r\n2;ext=1\r\nER\r\n0\r\n\r\n"
    result, _ = run_http(raw(chunked), expect_body="MARKER")
    assert (result.ok, result.detail) == (True, "HTTP 200")


def test_http_body_read_to_eof_without_content_length() -> None:
    result, _ = run_http(raw(b"HTTP/1.0 200 OK\r\n\r\nall good"), expect_body="good")
    assert (result.ok, result.detail) == (True, "HTTP 200")


def test_http_content_length_ends_the_read_even_if_the_server_keeps_the_connection() -> None:
    # The server holds the connection past the probe's timeout: a probe that read on to
    # EOF would report "timeout ... reading the body", not a verdict.
    result, _ = run_http(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", then_wait=HOLD), expect_body="ok")
    assert (result.ok, result.detail) == (True, "HTTP 200")


def test_http_interim_100_continue_is_skipped() -> None:
    result, _ = run_http(raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert (result.ok, result.detail) == (True, "HTTP 200")


def test_http_truncated_body_fails() -> None:
    result, _ = run_http(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"))
    assert (result.ok, result.detail) == (False, "body truncated (7 of 100 bytes)")


def test_http_closed_without_an_answer() -> None:
    result, _ = run_http(raw(b""))
    assert (result.ok, result.detail) == (False, "connection closed waiting for the response")


def test_http_garbage_instead_of_http() -> None:
    result, _ = run_http(raw(b"SSH-2.0-OpenSSH_9.2\r\n"))
    assert (result.ok, result.detail) == (False, "bad response: not an HTTP status line: 'SSH-2.0-OpenSSH_9.2'")


def test_http_host_header_is_sent_as_given() -> None:
    result, srv = run_http(answer(), host_header="game.example.com")
    assert result.ok
    assert b"\r\nHost: game.example.com\r\n" in srv.requests[0]


def test_http_path_and_host_header_are_encoded_for_the_wire() -> None:
    result, srv = run_http(answer(), path="/santé check", host_header="bücher.example")
    assert result.ok
    assert srv.requests[0].startswith(b"GET /sant%C3%A9%20check HTTP/1.1\r\n")
    assert b"\r\nHost: xn--bcher-kva.example\r\n" in srv.requests[0]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"host": "backend.example.com"}, "host must be an IP address"),
        ({"source": "lo"}, "source must be an IP address"),
        ({"kind": "icmp"}, "kind must be one of tcp, http, https"),
        ({"port": 0}, "port must be 1-65535"),
        ({"timeout": 0.0}, "timeout must be positive"),
        ({"path": "health"}, "path must start with '/'"),
        ({"expect_status": 42}, "expect_status must be an HTTP status"),
        ({"host_header": "a.example\r\nX-Evil: 1"}, "host_header must be a non-empty name without spaces"),
    ],
)
def test_a_spec_that_cannot_work_is_refused_when_built(kw: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"kind": "http", "host": "127.0.0.1", "port": 80, "timeout": 1.0} | kw
    with pytest.raises(ValueError, match=message):
        ProbeSpec(**fields)  # type: ignore[arg-type]


def test_http_over_ipv6_brackets_the_host() -> None:
    result, srv = run_http(answer(), host="::1")
    assert (result.ok, result.detail) == (True, "HTTP 200")
    assert f"\r\nHost: [::1]:{srv.port}\r\n".encode() in srv.requests[0]


# --- HTTPS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=backend.test",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:backend.test"],
        check=True, capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return ctx


def run_https(tls: ssl.SSLContext | None, handler: Handler, read_request: bool = True,
              **kw: Any) -> tuple[ProbeResult, Server]:
    with serve(handler, tls=tls, read_request=read_request) as srv:
        spec = ProbeSpec("https", srv.host, srv.port, kw.pop("timeout", GENEROUS), **kw)
        return asyncio.run(probe(spec)), srv


def test_https_self_signed_is_fine_without_verification(self_signed: ssl.SSLContext) -> None:
    result, srv = run_https(self_signed, answer(body=b"ok"), expect_body="ok")
    assert (result.ok, result.detail) == (True, "HTTP 200")
    assert f"\r\nHost: 127.0.0.1:{srv.port}\r\n".encode() in srv.requests[0]


def test_https_status_is_checked_too(self_signed: ssl.SSLContext) -> None:
    result, _ = run_https(self_signed, answer("500 Internal Server Error"))
    assert (result.ok, result.detail) == (False, "HTTP 500 (expected 200)")


def test_https_with_verification_rejects_a_self_signed_cert(self_signed: ssl.SSLContext) -> None:
    result, _ = run_https(self_signed, answer(), tls_verify=True)
    assert (result.ok, result.detail) == (False, "TLS: self-signed certificate")


def test_https_against_a_plain_http_port_fails_naming_tls() -> None:
    # Like a real HTTP server, it answers the TLS hello it cannot parse with a 400.
    result, _ = run_https(None, raw(b"HTTP/1.1 400 Bad Request\r\n\r\n"), read_request=False)
    assert (result.ok, result.detail) == (False, "TLS: wrong version number")


# --- plain HTTP: the callback path against the stream path ---------------------------------
# Plain HTTP checks run on a bare socket with callbacks (probes._PlainHttpCheck); HTTPS and
# TCP keep asyncio streams. Each scenario below runs both on the same server and requires
# the same verdict and detail, and the detail the scenario expects.


def segments(parts: list[bytes], gap: float = 0.002, then: str = "close") -> Handler:
    """Write `parts` as separate TCP segments (`gap` apart), then `close` (FIN, after every
    byte is out), `reset` (RST) or `wait` (keep the connection open)."""

    async def handler(head: bytes, writer: asyncio.StreamWriter) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(gap)
        if then == "reset":
            # Let the data go out first (a reset drops unsent data). The peer's kernel still
            # hands it over before reporting the reset, however late the probe reads.
            await asyncio.sleep(0.02)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif then == "close":
            writer.close()
            await writer.wait_closed()
        else:
            await asyncio.sleep(HOLD)

    return handler


def bytewise(data: bytes, then: str = "close") -> Handler:
    return segments([data[i:i + 1] for i in range(len(data))], gap=0.0005, then=then)


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nConnection: close\r\n\r\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
BIG = b"x" * (70 * 1024)

PLAIN_SCENARIOS: list[tuple[str, Handler, dict[str, Any], tuple[bool, str]]] = [
    ("one segment", raw(OK_HEAD + b"MARKER"), {"expect_body": "MARKER"}, (True, "HTTP 200")),
    ("one byte per segment", bytewise(OK_HEAD + b"MARKER"), {"expect_body": "MARKER"}, (True, "HTTP 200")),
    ("split inside the blank line", segments([OK_HEAD[:-3], OK_HEAD[-3:-1], OK_HEAD[-1:] + b"MAR", b"KER"]),
     {"expect_body": "MARKER"}, (True, "HTTP 200")),
    ("bare LF line ends", raw(b"HTTP/1.0 200 OK\nContent-Length: 2\n\nok"), {"expect_body": "ok"}, (True, "HTTP 200")),
    ("no Content-Length, closed by the server", segments([b"HTTP/1.0 200 OK\r\n\r\nall go", b"od"]),
     {"expect_body": "good"}, (True, "HTTP 200")),
    ("no Content-Length, byte by byte", bytewise(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nall good"),
     {"expect_body": "good"}, (True, "HTTP 200")),
    ("no Content-Length, empty body", segments([b"HTTP/1.0 200 OK\r\n\r\n"]), {"expect_body": ""}, (True, "HTTP 200")),
    ("no Content-Length, past 64 KiB", segments([b"HTTP/1.1 200 OK\r\n\r\n", BIG[:40000], BIG[40000:] + b"MARKER"]),
     {"expect_body": "MARKER"}, (False, "body lacks 'MARKER'")),
    ("no Content-Length, 64 KiB and the server keeps the connection",
     segments([b"HTTP/1.1 200 OK\r\n\r\n" + BIG[:30000], BIG[:40000]], then="wait"),
     {"expect_body": "xx"}, (True, "HTTP 200")),
    ("Content-Length, body past 64 KiB",
     segments([b"HTTP/1.1 200 OK\r\nContent-Length: 71686\r\n\r\n" + BIG + b"MARKER"], then="wait"),
     {"expect_body": "MARKER"}, (False, "body lacks 'MARKER'")),
    ("Content-Length twice: the last counts", raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\ncontent-length: 2\r\n\r\nok",
                                                  then_wait=HOLD), {"expect_body": "ok"}, (True, "HTTP 200")),
    ("Content-Length body truncated", segments([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npar", b"tial"]),
     {}, (False, "body truncated (7 of 100 bytes)")),
    ("Content-Length body truncated past 64 KiB", segments([b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x" * 10]),
     {}, (False, "body truncated (10 of 65536 bytes)")),
    ("header names and values padded with latin-1 white space",
     raw(b"HTTP/1.1 200 OK\r\n \tCONTENT-length\x0b :\xa02\x85\r\nX-Long-Header-Name-Here: 1\r\n\r\nok", then_wait=HOLD),
     {"expect_body": "ok"}, (True, "HTTP 200")),
    ("Transfer-Encoding padded, in capitals", raw(b"HTTP/1.1 200 OK\r\n\x1cTRANSFER-ENCODING:\xa0Chunked \r\n\r\n"
                                                 b"2\r\nok\r\n0\r\n\r\n", then_wait=HOLD), {"expect_body": "ok"}, (True, "HTTP 200")),
    ("Content-Length of non-ASCII digits", raw(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok"), {},
     (False, "bad response: bad Content-Length '\xb2'")),
    ("bad Content-Length", raw(b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\nok"), {},
     (False, "bad response: bad Content-Length '12abc'")),
    ("chunked, byte by byte", bytewise(CHUNKED + b"4;ext=1\r\nMARK\r\n2\r\nER\r\n0\r\nTrailer: x\r\n\r\n"),
     {"expect_body": "MARKER"}, (True, "HTTP 200")),
    ("chunked, upper-case hex sizes", raw(CHUNKED + b"A\r\n0123456789\r\n0\r\n\r\n"), {"expect_body": "56789"},
     (True, "HTTP 200")),
    ("chunked, one chunk past 64 KiB", segments([CHUNKED + b"11806\r\n", BIG + b"MARKER\r\n0\r\n\r\n"], then="wait"),
     {"expect_body": "MARKER"}, (False, "body lacks 'MARKER'")),
    ("chunked, chunks reach exactly 64 KiB", segments([CHUNKED, b"8000\r\n" + BIG[:32768] + b"\r\n",
                                                       b"8000\r\n" + BIG[:32760] + b"MARKER!!\r\n"], then="wait"),
     {"expect_body": "MARKER"}, (True, "HTTP 200")),
    ("chunked, data truncated", segments([CHUNKED + b"a\r\nabc"]), {}, (False, "body truncated (3 of 10 bytes)")),
    ("chunked, no CRLF after the data", segments([CHUNKED + b"4\r\nMARK"]), {}, (False, "body truncated (0 of 2 bytes)")),
    ("chunked, closed before a size line", segments([CHUNKED + b"4\r\nMARK\r\n"]), {},
     (False, "connection closed reading the body")),
    ("chunked, bad size", raw(CHUNKED + b"zz\r\n"), {}, (False, "bad response: bad chunk size 'zz'")),
    ("interim answers, split", segments([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early", b" Hints\r\nLink: x\r\n\r\n",
                                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]), {}, (True, "HTTP 200")),
    ("101 is final", raw(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), {}, (False, "HTTP 101 (expected 200)")),
    ("204 has no body", raw(b"HTTP/1.1 204 No Content\r\n\r\n", then_wait=HOLD), {"expect_status": 204, "expect_body": "x"},
     (False, "body lacks 'x'")),
    ("status other than expected, body not read", raw(b"HTTP/1.1 503 Busy\r\nContent-Length: 100\r\n\r\n", then_wait=HOLD),
     {}, (False, "HTTP 503 (expected 200)")),
    ("headers longer than 64 KiB", segments([b"HTTP/1.1 200 OK\r\n"] + [b"X-Filler: " + b"y" * 1000 + b"\r\n"] * 70,
                                            then="wait"), {}, (False, "bad response: headers longer than 65536 bytes")),
    ("status line longer than the line limit", segments([b"HTTP/1.1 200 " + b"x" * 100_000], then="wait"), {},
     (False, "bad response: Separator is not found, and chunk exceed the limit")),
    ("malformed header line", raw(b"HTTP/1.1 200 OK\r\ngarbage\r\n\r\n"), {}, (False, "bad response: malformed header line: 'garbage'")),
    ("garbage status line, then nothing", raw(b"SSH-2.0-OpenSSH_9.2\r\n", then_wait=HOLD), {},
     (False, "bad response: not an HTTP status line: 'SSH-2.0-OpenSSH_9.2'")),
    ("status line without a reason", raw(b"HTTP/1.1 200\r\n\r\n"), {}, (True, "HTTP 200")),
    ("closed mid-head", segments([b"HTTP/1.1 200 OK\r\nContent-Le"]), {}, (False, "connection closed waiting for the response")),
    ("reset before answering", segments([], then="reset"), {}, (False, "connection reset waiting for the response")),
    ("reset mid-head", segments([b"HTTP/1.1 200 OK\r\n", b"Content-Le"], then="reset"), {},
     (False, "connection reset waiting for the response")),
    ("reset mid-body", segments([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"partial"], then="reset"), {},
     (False, "connection reset reading the body")),
    ("reset mid-chunk", segments([CHUNKED + b"a\r\nabc"], then="reset"), {}, (False, "connection reset reading the body")),
    ("reset during a body read to EOF", segments([b"HTTP/1.1 200 OK\r\n\r\n", b"partial"], then="reset"), {},
     (False, "connection reset reading the body")),
    # 20 header lines 0.1 s apart: still arriving when the deadline strikes, and no end of head.
    ("head trickling past the timeout", segments([b"HTTP/1.1 200 OK\r\n"] + [b"X: y\r\n"] * 20, gap=0.1, then="wait"),
     {"timeout": STAGE_TIMEOUT}, (False, "timeout after 1.00s waiting for the response")),
    ("Host header, path encoding", answer(), {"path": "/santé check?x=1", "host_header": "bücher.example:8080"},
     (True, "HTTP 200")),
    ("source address", answer(), {"source": "127.0.0.2"}, (True, "HTTP 200")),
    ("source address not on this host", answer(), {"source": "192.0.2.1"}, (False, "source address not available")),
    ("source address of the other family", answer(), {"source": "::1"}, (False, "OSError")),
]


def both_paths(handler: Handler, host: str = "127.0.0.1", **kw: Any) -> tuple[ProbeResult, ProbeResult, Server]:
    """The agent's probe (the callback path for plain HTTP) and the stream path, at once
    against one server."""
    with serve(handler, host) as srv:
        spec = ProbeSpec("http", srv.host, srv.port, kw.pop("timeout", GENEROUS), **kw)
        assert spec._plain_http is not None
        fast, slow = run_both(spec)
    return fast, slow, srv


def run_both(spec: ProbeSpec) -> tuple[ProbeResult, ProbeResult]:
    async def scenario() -> tuple[ProbeResult, ProbeResult]:
        fast, slow = await asyncio.gather(probe(spec), probes._probe_streams(spec, time.perf_counter()))
        return fast, slow

    return asyncio.run(scenario())


@pytest.mark.parametrize("handler, kw, expected", [s[1:] for s in PLAIN_SCENARIOS], ids=[s[0] for s in PLAIN_SCENARIOS])
def test_plain_http_gives_the_stream_paths_verdicts(handler: Handler, kw: dict[str, Any],
                                                    expected: tuple[bool, str]) -> None:
    fast, slow, srv = both_paths(handler, **kw)
    assert (fast.ok, fast.detail) == expected
    assert (slow.ok, slow.detail) == expected
    assert len(set(srv.requests)) <= 1  # the same request bytes, when the server got that far


def test_plain_http_parses_a_response_as_its_segments_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    """One byte per segment, each sent only once the probe has read the one before: the
    parser really meets the response in as many reads as it has bytes, on any machine."""
    reads = 0  # counted on the probe's loop, watched from the server's thread
    on_readable = probes._PlainHttpCheck._on_readable

    def counting(self: probes._PlainHttpCheck, mask: int) -> None:
        nonlocal reads
        on_readable(self, mask)
        reads += 1

    async def lockstep(head: bytes, writer: asyncio.StreamWriter) -> None:
        for i in range(len(chunked)):
            seen = reads
            writer.write(chunked[i:i + 1])
            await writer.drain()
            while reads == seen:  # a probe that never reads times out (GENEROUS) and fails
                await asyncio.sleep(0.0005)
        writer.close()

    monkeypatch.setattr(probes._PlainHttpCheck, "_on_readable", counting)
    chunked = CHUNKED + b"4\r\nMARK\r\n2\r\nER\r\n0\r\n\r\n"
    with serve(lockstep) as srv:
        result = asyncio.run(probe(ProbeSpec("http", srv.host, srv.port, GENEROUS, expect_body="MARKER")))
    assert (result.ok, result.detail) == (True, "HTTP 200")
    # One read per byte, up to the last chunk's size line ("0\r\n"): the verdict comes there.
    assert reads >= len(chunked) - len(b"\r\n")


def test_plain_http_over_ipv6_and_refused() -> None:
    fast, slow, srv = both_paths(answer(), host="::1")
    assert (fast.ok, fast.detail) == (slow.ok, slow.detail) == (True, "HTTP 200")
    assert f"\r\nHost: [::1]:{srv.port}\r\n".encode() in srv.requests[0]

    fast, slow = run_both(ProbeSpec("http", "127.0.0.1", free_port(), GENEROUS))
    assert (fast.ok, fast.detail) == (slow.ok, slow.detail) == (False, "connect refused")


def test_plain_http_request_larger_than_the_socket_takes_at_once() -> None:
    """A 16 MiB path: the request goes out over many writable events, then the answer counts."""
    path = "/" + "p" * (16 * 1024 * 1024)
    with serve(answer(), limit=2**25) as srv:
        fast, slow = run_both(ProbeSpec("http", "127.0.0.1", srv.port, GENEROUS, path=path, expect_body="ok"))
    assert (fast.ok, fast.detail) == (slow.ok, slow.detail) == (True, "HTTP 200")
    assert [len(r) for r in srv.requests] == [len(srv.requests[0])] * 2 and len(srv.requests[0]) > len(path)


def test_plain_http_plan_is_made_once_and_leaves_the_spec_alone() -> None:
    spec = ProbeSpec("http", "127.0.0.1", 8080, 1.0, host_header="a.example")
    twin = ProbeSpec("http", "127.0.0.1", 8080, 1.0, host_header="a.example")
    plan = spec._plain_http
    assert plan is not None and spec._plain_http is plan
    assert plan.request.startswith(b"GET / HTTP/1.1\r\nHost: a.example\r\n")
    assert spec == twin and hash(spec) == hash(twin) and repr(spec) == repr(twin)
    assert ProbeSpec("https", "127.0.0.1", 443, 1.0)._plain_http is None
    assert ProbeSpec("tcp", "127.0.0.1", 80, 1.0)._plain_http is None
    assert ProbeSpec("http", "fe80::1%lo", 80, 1.0)._plain_http is None  # scoped: the stream path resolves it


def test_a_cancelled_plain_http_check_closes_its_socket_at_once() -> None:
    async def scenario() -> tuple[int, int, int]:
        with serve(segments([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npar"], then="wait")) as srv:
            gc.collect()
            before = open_fds()
            tasks = [asyncio.create_task(probe(ProbeSpec("http", srv.host, srv.port, GENEROUS))) for _ in range(20)]
            # Every connection accepted (so no server socket opens later), each probe connected.
            await until(lambda: len(srv.requests) == 20, "the server has all 20 requests")
            during = open_fds()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert all(t.cancelled() for t in tasks)
            return before, during, open_fds()

    before, during, after = check(scenario)
    assert during >= before + 20  # our 20 sockets (and the server's ends)
    assert after <= during - 20


def test_a_bug_in_the_plain_http_parser_is_the_probes_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a hang until the timeout (that would be a timeout result): the scheduler
    reports it as a probe error."""

    def broken(line: bytes) -> int:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(probes, "_status_of", broken)
    with serve(answer()) as srv, pytest.raises(RuntimeError, match="parser bug"):
        asyncio.run(probe(ProbeSpec("http", srv.host, srv.port, GENEROUS)))


# --- timeouts: each stage names itself ------------------------------------------------------
# Against a server that puts the probe in the stage named: connecting and sending, in the
# kernel (a listener that never accepts or never reads); the others, the server writes its
# part at once, on its own thread, well before the deadline. Plain HTTP runs both paths at
# once. Each test also checks that the timed-out probes left no socket behind.


def test_http_timeout_when_the_server_never_answers() -> None:
    with no_leaks():
        fast, slow, _ = both_paths(never_answer, timeout=STAGE_TIMEOUT)
    assert (fast.ok, fast.detail) == (slow.ok, slow.detail) == (False, "timeout after 1.00s waiting for the response")
    assert timed_out_no_sooner(fast, STAGE_TIMEOUT) and timed_out_no_sooner(slow, STAGE_TIMEOUT)


def test_http_timeout_covers_a_body_that_never_ends() -> None:
    with no_leaks():
        fast, slow, _ = both_paths(segments([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npar"], then="wait"),
                                   timeout=STAGE_TIMEOUT)
    assert (fast.ok, fast.detail) == (slow.ok, slow.detail) == (False, "timeout after 1.00s reading the body")
    assert timed_out_no_sooner(fast, STAGE_TIMEOUT) and timed_out_no_sooner(slow, STAGE_TIMEOUT)


def test_http_timeout_while_the_request_cannot_go_out() -> None:
    """A listener that never accepts nor reads: more than 64 KiB of the request stays unsent."""
    with no_leaks(), socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        spec = ProbeSpec("http", "127.0.0.1", listener.getsockname()[1], STAGE_TIMEOUT,
                         path="/" + "p" * (16 * 1024 * 1024))
        fast, slow = run_both(spec)
    assert (fast.ok, fast.detail) == (slow.ok, slow.detail) == (False, "timeout after 1.00s sending the request")


def test_https_timeout_in_the_tls_handshake_counts_as_connecting() -> None:
    """TCP is up (the server accepted), the server never answers the TLS hello."""
    with no_leaks():
        result, srv = run_https(None, never_answer, read_request=False, timeout=STAGE_TIMEOUT)
    assert (result.ok, result.detail) == (False, "timeout after 1.00s connecting")
    assert timed_out_no_sooner(result, STAGE_TIMEOUT)
    assert srv.peers == ["127.0.0.1"]


def test_https_timeout_waiting_for_the_response(self_signed: ssl.SSLContext) -> None:
    with no_leaks():
        result, srv = run_https(self_signed, never_answer, timeout=STAGE_TIMEOUT)
    assert (result.ok, result.detail) == (False, "timeout after 1.00s waiting for the response")
    assert srv.requests[0].startswith(b"GET / HTTP/1.1\r\n")  # TLS was up, the request went out


def test_https_timeout_reading_the_body(self_signed: ssl.SSLContext) -> None:
    with no_leaks():
        result, _ = run_https(self_signed, raw(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npar", then_wait=HOLD),
                              timeout=STAGE_TIMEOUT)
    assert (result.ok, result.detail) == (False, "timeout after 1.00s reading the body")


# --- resources ----------------------------------------------------------------------------


def test_ten_thousand_probes_of_every_outcome_leak_no_sockets_and_warn_nothing(self_signed: ssl.SSLContext) -> None:
    """Successes, failures, refusals, and timeouts while waiting, mid-body and mid-TLS: after
    10,000 probes no file descriptor is left open and nothing warned about an unclosed
    resource. Only that is asserted. Which outcome each spec met is counted per spec and
    printed: on a busy machine a short timeout may strike a stage earlier, and the stage
    tests above pin each detail."""
    outcomes: Counter[tuple[str, str]] = Counter()

    async def scenario(specs: dict[str, tuple[ProbeSpec, int]]) -> None:
        # Mostly cheap outcomes; enough slow ones that timeouts happen hundreds of times.
        plan = [(label, spec) for label, (spec, weight) in specs.items() for _ in range(weight)]
        sem = asyncio.Semaphore(200)

        async def one(label: str, spec: ProbeSpec) -> None:
            async with sem:
                outcomes[label, (await probe(spec)).detail] += 1

        await asyncio.gather(*(one(*plan[i % len(plan)]) for i in range(10_000)))

    quick = 0.1  # the timeouts the test provokes: short, so that 10,000 probes stay quick
    with no_leaks():
        with (
            serve(answer()) as ok_srv,
            serve(answer("503 Service Unavailable")) as bad_srv,
            serve(never_answer) as hung_srv,
            serve(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npar", then_wait=HOLD)) as slow_body,
            serve(answer(), tls=self_signed) as tls_srv,
            serve(never_answer, read_request=False) as tls_hung,  # TCP up, TLS never answered
        ):
            specs = {
                "tcp": (ProbeSpec("tcp", "127.0.0.1", ok_srv.port, GENEROUS), 3),
                "http": (ProbeSpec("http", "127.0.0.1", ok_srv.port, GENEROUS, expect_body="ok"), 3),
                "http 503": (ProbeSpec("http", "127.0.0.1", bad_srv.port, GENEROUS), 1),
                "tcp refused": (ProbeSpec("tcp", "127.0.0.1", free_port(), GENEROUS), 1),
                "https": (ProbeSpec("https", "127.0.0.1", tls_srv.port, GENEROUS), 1),
                "http, no answer": (ProbeSpec("http", "127.0.0.1", hung_srv.port, quick), 1),
                "http, endless body": (ProbeSpec("http", "127.0.0.1", slow_body.port, quick), 1),
                "https, no TLS answer": (ProbeSpec("https", "127.0.0.1", tls_hung.port, quick), 1),
            }
            started = time.perf_counter()
            asyncio.run(scenario(specs))
            elapsed = time.perf_counter() - started
    assert sum(outcomes.values()) == 10_000
    by_spec: defaultdict[str, dict[str, int]] = defaultdict(dict)
    for (label, detail), n in sorted(outcomes.items()):
        by_spec[label][detail] = n
    print(f"\n10,000 probes in {elapsed:.1f}s:" + "".join(f"\n  {label}: {d}" for label, d in by_spec.items()))


# --- the real scheduler -------------------------------------------------------------------


def test_scheduler_checks_each_of_200_targets_again_and_again_against_a_real_server() -> None:
    """200 targets every 0.2 s against one real server: each target is checked three times
    at least, and every verdict is right. How late checks start is the benchmark's to measure."""
    verdicts: defaultdict[Hashable, list[tuple[bool, str]]] = defaultdict(list)

    def on_result(key: Hashable, result: ProbeResult, finished_at: float) -> None:
        verdicts[key].append((result.ok, result.detail))

    async def scenario(srv: Server) -> tuple[int, int, int, int]:
        sched = CheckScheduler(on_result)
        sched.set_targets(
            # A path each: identical checks would share one probe (the scheduler's rule).
            Target(key=i, spec=ProbeSpec("http", "127.0.0.1", srv.port, GENEROUS, path=f"/{i}", expect_body="ok"),
                   interval=0.2)
            for i in range(200)
        )
        task = asyncio.create_task(sched.run())
        try:
            await until(lambda: len(verdicts) == 200 and min(map(len, verdicts.values())) >= 3,
                        "each of the 200 targets has 3 results")
        finally:
            sched.stop()
            await task
        stats = sched.stats()
        return stats.checks, stats.probe_errors, stats.dropped, stats.skipped

    with serve(answer()) as srv:
        checks, probe_errors, dropped, skipped = asyncio.run(scenario(srv))
    assert set(verdicts) == set(range(200))
    assert {v for vs in verdicts.values() for v in vs} == {(True, "HTTP 200")}
    assert checks == sum(map(len, verdicts.values()))
    assert (probe_errors, dropped) == (0, 0)
    assert len(srv.requests) >= checks  # each verdict answers a request the server read
    counts = sorted(map(len, verdicts.values()))
    print(f"\nchecks per target: min {counts[0]} max {counts[-1]}; skipped {skipped}")


# --- TCP on callbacks, the scheduler's callback path, and every event loop ------------------
# TCP checks run as callbacks too (probes._TcpCheck), the stream path's _tcp_connect stays for
# scoped IPv6 addresses: the same verdicts and details on both. The scheduler runs the
# agent's probe with no task (probes.start); the agent runs on uvloop where it is installed.

EVENT_LOOPS = ["asyncio"] + (["uvloop"] if event_loop.loop_factory("uvloop")[0] == "uvloop" else [])
if "uvloop" in EVENT_LOOPS:
    # uvloop's first loop opens a pipe it keeps for the process: not a leak of a test's.
    event_loop.run(asyncio.sleep(0), "uvloop")


def on_loop(name: str, main: Coroutine[Any, Any, Any]) -> Any:
    return event_loop.run(main, name)


def tcp_both(spec: ProbeSpec, loop: str = "asyncio") -> tuple[ProbeResult, ProbeResult]:
    async def scenario() -> tuple[ProbeResult, ProbeResult]:
        assert spec._plain_tcp is not None
        fast, slow = await asyncio.gather(probe(spec), probes._probe_streams(spec, time.perf_counter()))
        return fast, slow

    return on_loop(loop, scenario())  # type: ignore[no-any-return]


@pytest.mark.parametrize("loop", EVENT_LOOPS)
def test_tcp_on_callbacks_gives_the_stream_paths_verdicts(loop: str) -> None:
    # (No no_leaks() here: under load the test server's own accepted sockets can outlive
    # it; the probes' sockets are counted by the 10,000-probe test and the timeout test.)
    with serve(never_answer) as srv:
        cases = {
            "connected": (ProbeSpec("tcp", "127.0.0.1", srv.port, GENEROUS), (True, "connected")),
            "refused": (ProbeSpec("tcp", "127.0.0.1", free_port(), GENEROUS), (False, "connect refused")),
            "source": (ProbeSpec("tcp", "127.0.0.1", srv.port, GENEROUS, source="127.0.0.2"), (True, "connected")),
            "source not here": (ProbeSpec("tcp", "127.0.0.1", srv.port, GENEROUS, source="192.0.2.1"),
                                (False, "source address not available")),
            "ipv6 refused": (ProbeSpec("tcp", "::1", free_port(), GENEROUS), (False, "connect refused")),
        }
        got = {name: tcp_both(spec, loop) for name, (spec, _) in cases.items()}
        # Both paths bound the source address (the server's handler records it when it runs).
        asyncio.run(until(lambda: srv.peers.count("127.0.0.2") >= 2, "both source-bound connections seen"))
    for name, (_, expected) in cases.items():
        fast, slow = got[name]
        assert ((fast.ok, fast.detail), (slow.ok, slow.detail)) == (expected, expected), name


@pytest.mark.parametrize("loop", EVENT_LOOPS)
@pytest.mark.parametrize("kind", ["tcp", "http"])
def test_a_timeout_while_connecting_on_callbacks_and_on_streams(kind: str, loop: str) -> None:
    async def scenario() -> tuple[ProbeResult, ProbeResult]:
        with unaccepting_listener() as port:
            await asyncio.sleep(0.05)
            spec = ProbeSpec(kind, "127.0.0.1", port, 0.3)
            fast, slow = await asyncio.gather(probe(spec), probes._probe_streams(spec, time.perf_counter()))
            return fast, slow

    with no_leaks():
        fast, slow = on_loop(loop, scenario())
    assert (fast.ok, fast.detail) == (slow.ok, slow.detail) == (False, "timeout after 0.30s connecting")
    assert timed_out_no_sooner(fast, 0.3) and timed_out_no_sooner(slow, 0.3)


@pytest.mark.parametrize("loop", EVENT_LOOPS)
@pytest.mark.parametrize("handler, kw, expected", [s[1:] for s in PLAIN_SCENARIOS], ids=[s[0] for s in PLAIN_SCENARIOS])
def test_plain_http_verdicts_on_every_event_loop(loop: str, handler: Handler, kw: dict[str, Any],
                                                 expected: tuple[bool, str]) -> None:
    kw = dict(kw)  # the scenario's own dict: the other loop's run takes it too
    with serve(handler) as srv:
        result = on_loop(loop, probe(ProbeSpec("http", srv.host, srv.port, kw.pop("timeout", GENEROUS), **kw)))
    assert (result.ok, result.detail) == expected


@pytest.mark.parametrize("loop", EVENT_LOOPS)
def test_https_on_every_event_loop(loop: str, self_signed: ssl.SSLContext) -> None:
    with serve(answer("503 Busy"), tls=self_signed) as srv:
        result = on_loop(loop, probe(ProbeSpec("https", srv.host, srv.port, GENEROUS)))
    assert (result.ok, result.detail) == (False, "HTTP 503 (expected 200)")


def test_a_check_that_fails_at_once_reports_on_the_loops_next_pass_not_within_start() -> None:
    calls: list[tuple[probes.Check, ProbeResult | Exception]] = []

    async def scenario() -> tuple[int, probes.Check | None]:
        check = probes.start(ProbeSpec("tcp", "127.0.0.1", 9, GENEROUS, source="192.0.2.1"),
                             lambda c, outcome: calls.append((c, outcome)))
        within = len(calls)
        await asyncio.sleep(0)
        return within, check

    within, check = asyncio.run(scenario())
    assert within == 0 and check is not None
    assert len(calls) == 1 and calls[0][0] is check
    outcome = calls[0][1]
    assert isinstance(outcome, ProbeResult) and (outcome.ok, outcome.detail) == (False, "source address not available")
    assert probes.start(ProbeSpec("https", "127.0.0.1", 443, 1.0), lambda c, o: None) is None  # streams only


@pytest.mark.parametrize("loop", EVENT_LOOPS)
def test_the_scheduler_drops_a_removed_targets_check_and_closes_its_socket_at_once(loop: str) -> None:
    """The callback path: a check in flight when its target goes is cancelled (its socket
    closed, its slot free), counted as dropped, and reports nothing."""
    seen: list[Hashable] = []

    async def scenario(srv: Server) -> tuple[int, int, int, int, int]:
        sched = CheckScheduler(lambda key, result, at: seen.append(key), first_window=0.0)
        sched.set_targets([Target(key=i, spec=ProbeSpec("http", srv.host, srv.port, GENEROUS, path=f"/{i}"),
                                  interval=3600.0) for i in range(20)])
        task = asyncio.create_task(sched.run())
        try:
            await until(lambda: len(srv.requests) == 20, "the server holds all 20 requests")
            during = open_fds()
            sched.set_targets([])
            after, stats = open_fds(), sched.stats()
            await asyncio.sleep(0.05)  # nothing reports later either
        finally:
            sched.stop()
            await task
        return during, after, stats.in_flight, stats.dropped, len(seen)

    with no_leaks(), serve(never_answer) as srv:
        during, after, in_flight, dropped, reported = on_loop(loop, scenario(srv))
    assert after <= during - 20
    assert (in_flight, dropped, reported) == (0, 20, 0)


def test_a_bug_in_a_check_is_reported_by_the_scheduler_as_a_probe_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(line: bytes) -> int:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(probes, "_status_of", broken)
    results: list[ProbeResult] = []

    async def scenario(srv: Server) -> int:
        sched = CheckScheduler(lambda key, result, at: results.append(result), first_window=0.0)
        sched.set_targets([Target(key="a", spec=ProbeSpec("http", srv.host, srv.port, GENEROUS), interval=3600.0)])
        task = asyncio.create_task(sched.run())
        try:
            await until(lambda: bool(results), "a result")
        finally:
            sched.stop()
            await task
        return sched.stats().probe_errors

    with serve(answer()) as srv:
        errors = asyncio.run(scenario(srv))
    assert errors == 1
    assert (results[0].ok, results[0].detail) == (False, "probe error: RuntimeError: parser bug")


@pytest.mark.parametrize("loop", EVENT_LOOPS)
def test_stopping_the_scheduler_closes_the_checks_in_flight(loop: str) -> None:
    async def scenario(srv: Server) -> int:
        sched = CheckScheduler(lambda key, result, at: None, first_window=0.0)
        sched.set_targets([Target(key=i, spec=ProbeSpec("tcp" if i % 2 else "http", srv.host, srv.port, GENEROUS,
                                                        path=f"/{i}"), interval=3600.0) for i in range(20)])
        task = asyncio.create_task(sched.run())
        await until(lambda: len(srv.requests) == 10 and len(srv.peers) == 20, "every check connected")
        sched.stop()
        await task
        return sched.stats().in_flight

    with no_leaks(), serve(never_answer) as srv:
        assert on_loop(loop, scenario(srv)) == 0


# --- closing with a reset, the answer before the request, the deadline sweep ---------------


def time_waits(port: int) -> int:
    """Connections to or from 127.0.0.1:`port` in TIME_WAIT (this network namespace)."""
    end = f"0100007F:{port:04X}"  # /proc/net/tcp's spelling of 127.0.0.1:port
    with open("/proc/net/tcp") as f:
        next(f)
        return sum(1 for line in f if line.split()[3] == "06" and end in line.split()[1:3])


@contextmanager
def closing_server(response: bytes | None) -> Iterator[tuple[int, Callable[[], int]]]:
    """A blocking server that closes gracefully (a FIN, never a reset): HTTP (`response`)
    reads the request head, answers and closes first, as a server answering "Connection:
    close" does; TCP (None) closes once the peer has closed or reset. Yields the port and
    a function giving the number of connections the server has finished with."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    finished = [0]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(GENEROUS)
                try:
                    if response is None:
                        while conn.recv(4096):
                            pass
                    else:
                        head = b""
                        while b"\r\n\r\n" not in head:
                            data = conn.recv(4096)
                            if not data:
                                break
                            head += data
                        conn.sendall(response)
                except OSError:
                    pass  # the probe's reset
            finished[0] += 1

    thread = threading.Thread(target=run, name="closing-server", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], lambda: finished[0]
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.mark.parametrize("kind", ["tcp", "http"])
def test_a_check_leaves_no_connection_in_time_wait_on_either_end(kind: str) -> None:
    """The probe closes with a reset once the verdict is in (SO_LINGER 0): neither the
    agent (TCP: it closes first) nor the backend (HTTP: it closes first after its answer)
    keeps the connection in TIME_WAIT. The verdicts are those of the stream path, which
    closes with a FIN and leaves them."""
    response = OK_HEAD + b"MARKER" if kind == "http" else None
    with closing_server(response) as (port, finished):
        spec = ProbeSpec(kind, "127.0.0.1", port, GENEROUS, **({"expect_body": "MARKER"} if kind == "http" else {}))

        async def fast() -> ProbeResult:
            result = await probe(spec)
            await until(lambda: finished() == 1, "the server is done with the connection")
            return result

        result = asyncio.run(fast())
        assert (result.ok, result.detail) == (True, "HTTP 200" if kind == "http" else "connected")
        assert time_waits(port) == 0

        async def streams() -> ProbeResult:
            result = await probes._probe_streams(spec, time.perf_counter())
            await until(lambda: finished() == 2, "the server is done with the second connection")
            return result

        slow = asyncio.run(streams())
        assert (slow.ok, slow.detail) == (result.ok, result.detail)
        if kind == "tcp":  # the stream path closes TCP checks with a FIN: the agent's end waits
            assert time_waits(port) == 1


@pytest.mark.parametrize("loop", EVENT_LOOPS)
def test_an_answer_written_before_the_request_arrives_is_read(loop: str) -> None:
    """The server answers as soon as it accepts: the answer may be in by the time the probe
    learns it is connected (one edge for both), and is read then, not at the timeout."""
    with serve(raw(OK_HEAD + b"MARKER", then_wait=HOLD), read_request=False) as srv:
        for _ in range(20):
            result = on_loop(loop, probe(ProbeSpec("http", srv.host, srv.port, GENEROUS, expect_body="MARKER")))
            assert (result.ok, result.detail) == (True, "HTTP 200")


def test_an_answer_the_loop_has_not_looked_at_is_not_a_timeout() -> None:
    """The deadline sweep hands over the events that are in before it strikes: here the
    loop stops watching the checks' epoll set after the request went out, the answer
    arrives, and only the sweep at the deadline sees it."""
    go = threading.Event()

    async def later(head: bytes, writer: asyncio.StreamWriter) -> None:
        while not go.is_set():
            await asyncio.sleep(0.005)
        writer.write(OK_HEAD + b"MARKER")
        await writer.drain()
        await asyncio.sleep(HOLD)

    async def scenario(srv: Server) -> list[ProbeResult | Exception]:
        loop = asyncio.get_running_loop()
        results: list[ProbeResult | Exception] = []
        poller = probes.Poller(loop)
        try:
            spec = ProbeSpec("http", srv.host, srv.port, STAGE_TIMEOUT, expect_body="MARKER")
            probes.start(spec, lambda c, outcome: results.append(outcome), poller)
            await until(lambda: len(srv.requests) == 1, "the server has the request")
            loop.remove_reader(poller._epfd)  # the loop no longer looks
            go.set()
            await until(lambda: bool(results), "a result")
        finally:
            poller.close()
        return results

    with no_leaks(), serve(later) as srv:
        results = asyncio.run(scenario(srv))
    assert len(results) == 1
    result = results[0]
    assert isinstance(result, ProbeResult) and (result.ok, result.detail) == (True, "HTTP 200")
    assert timed_out_no_sooner(result, STAGE_TIMEOUT)  # it was the sweep that saw it


def test_after_a_starved_loop_more_answers_than_one_epoll_wait_returns_are_answers_not_timeouts() -> None:
    """3,000 TCP checks connect while the event loop is held past their timeout: when it runs
    again, every one is connected, none struck by the deadline sweep (one epoll_wait hands
    over at most 1,023 events by default; found by review: 954 of 3,000 were timeouts)."""
    n, timeout = 3000, 0.3

    async def scenario() -> Counter[str]:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        poller = probes.Poller(loop)
        outcomes: Counter[str] = Counter()
        try:
            spec = ProbeSpec("tcp", "127.0.0.1", listener.getsockname()[1], timeout)
            for _ in range(n):
                probes.start(spec, lambda c, r: outcomes.update([r.detail if isinstance(r, ProbeResult) else repr(r)]),
                             poller)
            # The loop held (no callback runs) until the kernel has every connection up and
            # the checks' timeout has passed.
            waiting = select.poll()
            for fd in list(poller._checks):
                waiting.register(fd, select.POLLOUT)
            ready: set[int] = set()
            while len(ready) < len(poller._checks):
                ready |= {fd for fd, _ in waiting.poll(100)}
            time.sleep(timeout + 0.1)
            await until(lambda: sum(outcomes.values()) == n, "every check's result")
        finally:
            poller.close()
            listener.close()
        return outcomes

    assert asyncio.run(scenario()) == Counter({"connected": n})
