"""HTTP checks on a kept connection (``reuse_connection``): real sockets on loopback, a small
asyncio HTTP server that counts connections and requests and misbehaves on cue; for the
open-file limit a server in a process of its own, whose descriptors do not count against
the checker's."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from controller.health.probes import Poller, ProbeResult, ProbeSpec, start
from controller.health.scheduler import FD_RESERVE, CheckScheduler, Target, kept_budget_for

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


# --- the open-file limit, the server's 408, real failures with reuse on ----------------------

# A keep-alive server that answers every request 200 and keeps the connection.
SERVER = r"""
import asyncio, sys
async def handle(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()
async def main():
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    s = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(s.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


@pytest.fixture
def far_server() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Limit:
    """The soft open-file limit set to ``open now + room`` for the test, then restored."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __enter__(self) -> int:
        self.saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = _open_fds() + self.room
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, self.saved[1]))
        return soft

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, self.saved)


class _NoWatch:
    """No watch connections (and none of the watch pool's raising of the soft limit)."""

    def set_endpoints(self, endpoints: object) -> None: ...
    def probe_succeeded(self, endpoint: object) -> None: ...
    def start(self) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> None: ...


def _specs(port: int, n: int) -> list[ProbeSpec]:
    """n checks of one server that differ by path: each keeps a connection of its own."""
    return [ProbeSpec(kind="http", host="127.0.0.1", port=port, timeout=5.0, path=f"/health/{i}",
                      reuse_connection=True) for i in range(n)]


def test_kept_connections_stay_within_their_budget_under_the_open_file_limit(far_server: int) -> None:
    """More reusing checks than the open-file limit allows kept connections for: the ones
    past the budget connect afresh, every check passes (on the code before, the kept
    connections took every descriptor and checks failed 'Too many open files')."""
    results: dict[int, list[ProbeResult]] = {}

    def on_result(key: object, result: ProbeResult, _at: float) -> None:
        results.setdefault(key, []).append(result)  # type: ignore[arg-type]

    async def main() -> tuple[int, object]:
        s = CheckScheduler(on_result, max_concurrency=20, first_window=0.2,
                           watcher_factory=lambda _loss: _NoWatch())  # type: ignore[arg-type,return-value]
        specs = _specs(far_server, 400)
        s.set_targets([Target(key=i, spec=sp, interval=0.3) for i, sp in enumerate(specs)])
        runner = asyncio.create_task(s.run())
        try:
            while min((len(results.get(i, ())) for i in range(400)), default=0) < 3:
                await asyncio.sleep(0.05)
            return kept_budget_for(20, 0), s.stats(lateness=False)
        finally:
            s.stop()
            await runner

    with _Limit(FD_RESERVE + 20 + 60) as soft:
        budget, stats = run(main())  # type: ignore[misc]
    assert budget == soft - 20 - FD_RESERVE
    bad = [r.detail for rs in results.values() for r in rs if not r.ok]
    assert bad == []
    assert stats.kept_over_budget > 0  # type: ignore[attr-defined]
    assert 0 < stats.kept_idle <= budget  # type: ignore[attr-defined]


def test_a_check_out_of_descriptors_closes_idle_kept_connections_first(far_server: int) -> None:
    """No budget set (a poller of a caller's own): the kept connections exhaust the limit,
    and the next check that needs a socket closes idle ones rather than failing."""
    async def main() -> tuple[list[ProbeResult], Poller]:
        poller = Poller(asyncio.get_running_loop())
        try:
            return [await check(sp, poller) for sp in _specs(far_server, 60)], poller
        finally:
            poller.close()

    with _Limit(25):
        results, poller = run(main())  # type: ignore[misc]
    assert [r.detail for r in results if not r.ok] == []
    assert poller.kept_evicted > 0


TIMEOUT_408 = "answer+close:HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
ERROR_500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail"


def _plan_408(then: bytes | str) -> Callable[[int, int], bytes | str]:
    """Connection 1: 200, then a 408 as the server's idle timeout strikes; later connections: ``then``."""
    return lambda c, r: (OK if r == 1 else TIMEOUT_408) if c == 1 else then


def test_a_408_on_a_kept_connection_is_retried_on_a_fresh_one_and_not_a_failure() -> None:
    async def main() -> tuple[list[ProbeResult], list[int], Poller]:
        srv = await serve(_plan_408(OK))
        poller = Poller(asyncio.get_running_loop())
        try:
            results = [await check(spec(srv.port), poller) for _ in range(3)]
        finally:
            poller.close()
        return results, srv.requests, poller

    results, requests, poller = run(main())  # type: ignore[misc]
    assert [r.detail for r in results] == ["HTTP 200"] * 3  # the code before: "HTTP 408 (expected 200)"
    assert requests == [2, 2]  # the 408'd request went again, on connection 2, which stays
    assert (poller.kept_retried, poller.kept_retried_408) == (1, 1)


@pytest.mark.parametrize(("then", "detail"), [
    (ERROR_500, "HTTP 500 (expected 200)"),
    (TIMEOUT_408, "HTTP 408 (expected 200)"),
], ids=["500", "408-again"])
def test_after_a_408_on_a_kept_connection_the_fresh_answer_is_the_verdict(then: bytes | str, detail: str) -> None:
    async def main() -> list[ProbeResult]:
        srv = await serve(_plan_408(then))
        poller = Poller(asyncio.get_running_loop())
        try:
            return [await check(spec(srv.port), poller) for _ in range(2)]
        finally:
            poller.close()

    results = run(main())
    assert [(r.ok, r.detail) for r in results] == [(True, "HTTP 200"), (False, detail)]  # type: ignore[attr-defined]


def test_a_408_on_a_fresh_connection_is_a_failure() -> None:
    async def main() -> tuple[ProbeResult, list[int]]:
        srv = await serve(lambda c, r: TIMEOUT_408)
        poller = Poller(asyncio.get_running_loop())
        try:
            return await check(spec(srv.port), poller), srv.requests
        finally:
            poller.close()

    result, requests = run(main())  # type: ignore[misc]
    assert (result.ok, result.detail) == (False, "HTTP 408 (expected 200)")
    assert requests == [1]  # no second attempt


@pytest.mark.parametrize("failure", ["refused", "500", "timeout"])
def test_a_real_failure_with_reuse_on_is_down_check_after_check(failure: str) -> None:
    """With kept connections on, a backend that fails fails every check: the kept
    connection neither hides it nor delays it (safety: a false UP is worse than a false DOWN)."""
    broken = {"on": False}

    def plan(c: int, r: int) -> bytes | str:
        if not broken["on"]:
            return OK
        return {"refused": "stop", "500": ERROR_500, "timeout": "silent"}[failure]

    async def main() -> list[ProbeResult]:
        srv = await serve(plan)
        poller = Poller(asyncio.get_running_loop())
        try:
            results = [await check(spec(srv.port, timeout=0.5), poller)]
            broken["on"] = True
            for _ in range(3):
                results.append(await check(spec(srv.port, timeout=0.5), poller))
                await asyncio.sleep(0)
            return results
        finally:
            poller.close()

    results = run(main())
    assert results[0].ok  # type: ignore[index]
    details = {"refused": "connect refused", "500": "HTTP 500 (expected 200)",
               "timeout": "timeout after 0.50s waiting for the response"}
    assert [(r.ok, r.detail) for r in results[1:]] == [(False, details[failure])] * 3  # type: ignore[index]
