"""HTTP checks on a kept connection (``reuse_connection``): real sockets on loopback, a small
asyncio HTTP server that counts connections and requests and misbehaves on cue."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from controller.health.probes import Poller, ProbeResult, ProbeSpec, start

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nok\n\r\n0\r\n\r\n"

# (connection number from 1, request number on it from 1) -> what to do: bytes to answer
# and keep the connection, or one of the verbs below.
Plan = Callable[[int, int], "bytes | str"]


@dataclass
class Server:
    port: int = 0
    requests: list[int] = field(default_factory=list)  # requests seen, per connection
    server: asyncio.Server | None = None


async def serve(plan: Plan) -> Server:
    s = Server()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s.requests.append(0)
        conn = len(s.requests)
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                s.requests[conn - 1] += 1
                what = plan(conn, s.requests[conn - 1])
                if isinstance(what, bytes):
                    writer.write(what)
                    await writer.drain()
                elif what == "close":  # FIN without an answer (an idle timeout as the request came)
                    return
                elif what == "reset":  # RST without an answer
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                elif what == "stop":  # the listener goes away, then this connection closes
                    assert s.server is not None
                    s.server.close()
                    return
                elif what == "silent":  # read, never answer, keep the connection open
                    continue
                elif what.startswith("answer+close:"):  # answer, then FIN
                    writer.write(what.partition(":")[2].encode("latin-1"))
                    await writer.drain()
                    return
                else:
                    raise AssertionError(what)
        finally:
            writer.close()

    s.server = await asyncio.start_server(handle, "127.0.0.1", 0)
    s.port = s.server.sockets[0].getsockname()[1]
    return s


def spec(port: int, reuse: bool = True, every: int = 10, timeout: float = 2.0) -> ProbeSpec:
    return ProbeSpec(kind="http", host="127.0.0.1", port=port, timeout=timeout, path="/health",
                     reuse_connection=reuse, fresh_connection_every=every)


async def check(s: ProbeSpec, poller: Poller) -> ProbeResult:
    """One check on the scheduler's path (a shared poller), then a turn of the loop."""
    fut: asyncio.Future[ProbeResult | Exception] = asyncio.get_running_loop().create_future()
    assert start(s, lambda _c, r: fut.done() or fut.set_result(r), poller) is not None
    outcome = await fut
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def checks(s: ProbeSpec, n: int, settle: Callable[[], object] | None = None) -> tuple[list[ProbeResult], Poller]:
    poller = Poller(asyncio.get_running_loop())
    results = []
    try:
        for _ in range(n):
            results.append(await check(s, poller))
            await asyncio.sleep(0)  # the server's side of the exchange
            if settle is not None:
                await settle()  # type: ignore[misc]
    finally:
        poller.close()
    return results, poller


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.001)


def test_a_kept_connection_serves_n_checks_then_a_fresh_one_is_opened() -> None:
    async def main() -> tuple[list[ProbeResult], list[int], Poller]:
        srv = await serve(lambda c, r: OK)
        results, poller = await checks(spec(srv.port, every=5), 12)
        return results, srv.requests, poller

    results, requests, poller = run(main())  # type: ignore[misc]
    assert [r.detail for r in results] == ["HTTP 200"] * 12
    assert requests == [5, 5, 2]  # a new connection every 5th check
    assert poller.kept_used == 9 and poller.kept_retried == 0


def test_without_reuse_every_check_is_a_fresh_connection() -> None:
    async def main() -> tuple[list[ProbeResult], list[int]]:
        srv = await serve(lambda c, r: OK)
        results, _ = await checks(spec(srv.port, reuse=False), 4)
        return results, srv.requests

    results, requests = run(main())  # type: ignore[misc]
    assert all(r.ok for r in results)
    assert requests == [1, 1, 1, 1]


def test_chunked_answers_keep_the_connection() -> None:
    async def main() -> list[int]:
        srv = await serve(lambda c, r: CHUNKED)
        results, _ = await checks(spec(srv.port), 3)
        assert [r.detail for r in results] == ["HTTP 200"] * 3
        return srv.requests

    assert run(main()) == [3]


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nconnection:  keep-alive, Close\r\n\r\nok\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\nextra",  # bytes after the answer
], ids=["connection-close", "close-token", "http-1.0", "trailing-bytes"])
def test_an_answer_that_does_not_allow_reuse_is_honoured(answer: bytes) -> None:
    """The server keeps its end open: a client that reused the connection anyway would show
    as fewer connections than checks."""
    async def main() -> tuple[list[ProbeResult], list[int]]:
        srv = await serve(lambda c, r: answer)
        results, _ = await checks(spec(srv.port), 3)
        return results, srv.requests

    results, requests = run(main())  # type: ignore[misc]
    assert all(r.ok for r in results)
    assert requests == [1, 1, 1]


def test_an_answer_without_a_length_is_read_to_eof_and_not_kept() -> None:
    async def main() -> tuple[list[ProbeResult], list[int]]:
        srv = await serve(lambda c, r: "answer+close:HTTP/1.1 200 OK\r\n\r\nok\n")
        results, _ = await checks(spec(srv.port), 3)
        return results, srv.requests

    results, requests = run(main())  # type: ignore[misc]
    assert [r.detail for r in results] == ["HTTP 200"] * 3
    assert requests == [1, 1, 1]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_kept_connection_the_server_closed_as_the_request_came_is_retried_fresh(how: str) -> None:
    """The idle-timeout race: the server closes the kept connection just as the next request
    arrives. The check runs again on a fresh connection and passes; no failure is counted."""
    async def main() -> tuple[list[ProbeResult], list[int], Poller]:
        srv = await serve(lambda c, r: OK if r == 1 else how)
        results, poller = await checks(spec(srv.port), 4)
        return results, srv.requests, poller

    results, requests, poller = run(main())  # type: ignore[misc]
    assert [r.detail for r in results] == ["HTTP 200"] * 4
    # Connection 1 answers check 1; each later check finds its kept connection closed
    # (one request seen, no answer) and passes on a fresh one, which it then keeps.
    assert requests == [2, 2, 2, 1]
    assert poller.kept_retried == 3


def test_a_kept_connection_the_server_closed_while_idle_is_dropped_not_failed() -> None:
    async def main() -> tuple[list[ProbeResult], list[int], Poller]:
        srv = await serve(lambda c, r: "answer+close:" + OK.decode())
        # Each answer is followed by the server's FIN; give it time to arrive while idle.
        results, poller = await checks(spec(srv.port), 3, settle=lambda: asyncio.sleep(0.01))
        return results, srv.requests, poller

    results, requests, poller = run(main())  # type: ignore[misc]
    assert [r.detail for r in results] == ["HTTP 200"] * 3
    assert requests == [1, 1, 1]
    # Whenever the FIN came (while idle: dropped; as the next request went out: retried),
    # no check failed for it, and every use of a kept connection ended in a fresh retry.
    assert poller.kept_used == poller.kept_retried


def test_a_real_failure_on_the_fresh_retry_counts() -> None:
    """The kept connection closes and the listener is gone: the retry is refused, and that is
    the check's verdict, as it would be on a fresh connection."""
    async def main() -> tuple[list[ProbeResult], list[int]]:
        srv = await serve(lambda c, r: OK if r == 1 else "stop")
        results, _ = await checks(spec(srv.port), 2)
        return results, srv.requests

    results, requests = run(main())  # type: ignore[misc]
    assert results[0].ok
    assert (results[1].ok, results[1].detail) == (False, "connect refused")
    assert requests == [2]


def test_a_server_that_stops_answering_on_the_kept_connection_fails_as_a_fresh_one_would() -> None:
    async def main() -> tuple[list[ProbeResult], ProbeResult]:
        kept = await serve(lambda c, r: OK if r == 1 else "silent")
        results, _ = await checks(spec(kept.port, timeout=1.0), 2)
        silent = await serve(lambda c, r: "silent")
        fresh, _ = await checks(spec(silent.port, reuse=False, timeout=1.0), 1)
        assert kept.requests == [2]  # the second check did go out on the kept connection
        return results, fresh[0]

    results, fresh = run(main())  # type: ignore[misc]
    assert results[0].ok
    assert (results[1].ok, results[1].detail) == (False, "timeout after 1.00s waiting for the response")
    assert (fresh.ok, fresh.detail) == (results[1].ok, results[1].detail)


def test_a_truncated_answer_on_a_kept_connection_fails_and_is_not_retried() -> None:
    async def main() -> tuple[list[ProbeResult], list[int]]:
        srv = await serve(lambda c, r: OK if r == 1 else
                          "answer+close:HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok\n")
        results, _ = await checks(spec(srv.port), 2)
        return results, srv.requests

    results, requests = run(main())  # type: ignore[misc]
    assert results[0].ok
    assert (results[1].ok, results[1].detail) == (False, "body truncated (3 of 10 bytes)")
    assert requests == [2]  # no second attempt: part of the answer had come


def test_a_wrong_status_on_a_kept_connection_fails_and_drops_it() -> None:
    async def main() -> tuple[list[ProbeResult], list[int]]:
        srv = await serve(lambda c, r: OK if (c, r) != (1, 2) else
                          b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
        results, _ = await checks(spec(srv.port), 3)
        return results, srv.requests

    results, requests = run(main())  # type: ignore[misc]
    assert [r.detail for r in results] == ["HTTP 200", "HTTP 503 (expected 200)", "HTTP 200"]
    assert requests == [2, 1]


def test_https_and_tcp_checks_cannot_keep_connections() -> None:
    for kind in ("https", "tcp"):
        with pytest.raises(ValueError, match="reuse_connection is for http checks only"):
            ProbeSpec(kind=kind, host="127.0.0.1", port=1, timeout=1, reuse_connection=True)
    with pytest.raises(ValueError, match="fresh_connection_every must be at least 1"):
        ProbeSpec(kind="http", host="127.0.0.1", port=1, timeout=1, reuse_connection=True, fresh_connection_every=0)


def test_a_new_plan_with_the_same_check_keeps_its_connection_and_a_changed_one_closes_it() -> None:
    """The agent makes new, equal specs for every check at each new plan from the controller
    (``set_targets`` then ``retain``): an unchanged check keeps its connection; a check whose
    spec changed or left has it closed; a check still running when its spec left parks
    nothing (no connection left open that no later check would take)."""
    async def main() -> tuple[list[int], list[int], list[int], int]:
        srv = await serve(lambda c, r: OK)
        poller = Poller(asyncio.get_running_loop())
        try:
            await check(spec(srv.port), poller)
            poller.retain([spec(srv.port)])  # a new plan, the same check (a new, equal spec)
            await check(spec(srv.port), poller)
            same = list(srv.requests)
            poller.retain([spec(srv.port, timeout=3.0)])  # the check changed: its connection goes
            await _until(lambda: poller.idle == 0)
            await check(spec(srv.port, timeout=3.0), poller)
            changed = list(srv.requests)
            # One in flight while its spec leaves the scheduler's set:
            fut: asyncio.Future[ProbeResult | Exception] = asyncio.get_running_loop().create_future()
            assert start(spec(srv.port, timeout=3.0), lambda _c, r: fut.done() or fut.set_result(r), poller)
            poller.retain([spec(srv.port, timeout=4.0)])
            assert isinstance(await fut, ProbeResult)
            await asyncio.sleep(0)
            idle_after = poller.idle
            await check(spec(srv.port, timeout=4.0), poller)
            return same, changed, list(srv.requests), idle_after
        finally:
            poller.close()

    same, changed, after, idle_after = run(main())  # type: ignore[misc]
    assert same == [2]  # two checks, one connection, across the new plan
    assert changed == [2, 1]  # the changed check on a fresh connection
    assert idle_after == 0  # the in-flight check of the spec that left kept nothing
    assert after[-1] == 1  # the new spec's check on a fresh connection of its own
