"""Watch connections and confirmation probes against a real backend on 127.0.0.1.

The backend (`Backend`) runs on its own thread with its own event loop, like the servers of
test_probes.py: how fast it answers does not depend on the probes' loop. It answers every
HTTP request with 200 and closes; a connection that sends nothing is a watch connection,
which it holds, and which the test can reset (RST), half-close (FIN), or keep open while
every request goes unanswered (a blackhole the watch cannot see). `crash()` is a killed
process: the listener closes (connects are refused) and every connection is reset.

No test bounds a duration from above. Where a test is about "at once", the check's interval
is an hour: after its first check nothing but a confirmation can probe it again, so a
verdict reached at all was reached through the watch.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tests.helpers.waiting import HANG_GUARD, check, until
from controller.health import state as hs
from controller.health.probes import ProbeResult, ProbeSpec
from controller.health.scheduler import CheckScheduler, Target
from controller.health.watcher import WatchPool
from controller.health.watch import LossKind

HOUR = 3600.0
GENEROUS = 30.0  # a probe timeout where the test is not about timing
R = TypeVar("R")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"



class Backend:
    """An HTTP backend on its own thread; every counter is read from the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-backend", daemon=True)
        self.idle: list[asyncio.StreamWriter] = []  # connections that sent nothing (yet)
        self.accepted = 0
        self.requests = 0
        self.answering = True
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self) -> Backend:
        self.thread.start()
        self.server = self._call(asyncio.start_server(self._on_connect, "127.0.0.1", 0, backlog=256))
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def _call(self, coro: Coroutine[Any, Any, R]) -> R:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.accepted += 1
        self.idle.append(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.idle.remove(writer)
            self.requests += 1
            if not self.answering:
                await asyncio.sleep(HOUR)  # blackholed: the request goes nowhere
            writer.write(OK)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if writer in self.idle:
                self.idle.remove(writer)
            writer.transport.abort()
            self.tasks.discard(task)

    # --- what the test does to it (each runs on the backend's loop) ---------------------------
    def reset_idle(self) -> int:
        """RST every watch connection (SO_LINGER 0, then close); the backend keeps serving."""
        return self._call(self._reset_idle())

    async def _reset_idle(self) -> int:
        n = len(self.idle)
        for writer in list(self.idle):
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        return n

    def half_close_idle(self) -> int:
        """FIN on every watch connection (shutdown for writing; the backend's side stays open)."""
        return self._call(self._half_close_idle())

    async def _half_close_idle(self) -> int:
        n = len(self.idle)
        for writer in list(self.idle):
            writer.write_eof()
        return n

    def blackhole(self) -> None:
        self.answering = False

    def crash(self) -> None:
        """A killed process: no more listener (connects are refused), every connection reset."""
        self._call(self._crash())

    async def _crash(self) -> None:
        assert self.server is not None
        self.server.close()
        await self._reset_idle()
        for task in list(self.tasks):
            task.cancel()

    def stop(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            me = asyncio.current_task()
            while others := [t for t in asyncio.all_tasks() if t is not me]:
                for t in others:
                    t.cancel()
                await asyncio.wait(others, timeout=0.05)

        self._call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@contextmanager
def backend() -> Iterator[Backend]:
    b = Backend().start()
    try:
        yield b
    finally:
        b.stop()


class Latest(random.Random):
    """The scheduler's random draws at their upper end: a new target's first check comes
    FIRST seconds after it is set, its steady schedule starts a whole interval later (an
    hour in most tests: no periodic check interferes with a confirmation), no jitter."""

    def uniform(self, a: float, b: float) -> float:
        return b if a >= 0 else 0.0


FIRST = 0.05


class Checked:
    """A scheduler with the real probes and watch pool, feeding one state machine per key."""

    def __init__(self, targets: list[Target], rise: int = 1, fall: int = 2,
                 probe_fn: Callable[[ProbeSpec], Coroutine[Any, Any, ProbeResult]] | None = None,
                 max_sockets: int | None = None) -> None:
        self.rise, self.fall = rise, fall
        self.max_sockets = max_sockets
        self.health: dict[Hashable, hs.HealthState] = {t.key: hs.initial(0.0) for t in targets}
        self.results: dict[Hashable, list[ProbeResult]] = {t.key: [] for t in targets}
        self.pool: WatchPool | None = None
        kw: dict[str, Any] = {"probe_fn": probe_fn} if probe_fn else {}
        self.sched = CheckScheduler(self._on_result, watcher_factory=self._pool, rng=Latest(), first_window=FIRST,
                                    **kw)
        self.sched.set_targets(targets)
        self.task: asyncio.Task[None] | None = None

    def _pool(self, on_loss: Callable[[tuple[str, int, str | None], str], None]) -> WatchPool:
        self.pool = WatchPool(on_loss, max_sockets=self.max_sockets)
        return self.pool

    def _on_result(self, key: Hashable, result: ProbeResult, finished_at: float) -> None:
        self.results[key].append(result)
        self.health[key], _ = hs.step(self.health[key], result.ok, self.rise, self.fall, finished_at, result.detail)

    def phase(self, key: Hashable) -> hs.Phase:
        return self.health[key].phase

    async def __aenter__(self) -> Checked:
        self.task = asyncio.create_task(self.sched.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sched.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, HANG_GUARD)


def http_target(key: str, port: int, interval: float = HOUR, timeout: float = GENEROUS, fall: int = 2,
                watch: bool = True) -> Target:
    return Target(key=key, spec=ProbeSpec("http", "127.0.0.1", port, timeout, path="/healthz"),
                  interval=interval, watch=watch, fall=fall)




def watching(c: Checked) -> bool:
    return c.pool is not None and c.pool.stats().connected == 1


# --- a crash: reset, then refused -------------------------------------------------------------


def test_a_crashed_backend_is_down_through_the_watch_without_waiting_for_the_interval() -> None:
    async def scenario() -> None:
        with backend() as b:
            async with Checked([http_target("vip", b.port, fall=2)]) as c:
                await until(lambda: c.phase("vip") is hs.Phase.UP and watching(c) and len(b.idle) == 1,
                            "UP, and the watch connection held by the backend")
                b.crash()
                await until(lambda: c.phase("vip") is hs.Phase.DOWN, "DOWN after the crash")
                after = c.results["vip"][1:]
                # Exactly fall confirmation probes, both refused; the hourly check never came.
                assert [(r.ok, r.detail) for r in after] == [(False, "connect refused")] * 2
                st = c.sched.stats()
                assert (st.watch_losses, st.confirmations, st.probes) == (1, 2, 3)
                assert c.pool is not None and c.pool.stats().losses == 1

    check(scenario)


# --- a healthy backend drops the watch connection: confirmation succeeds --------------------


def test_a_reset_or_half_closed_watch_of_a_healthy_backend_confirms_once_and_reconnects() -> None:
    async def scenario() -> None:
        with backend() as b:
            async with Checked([http_target("vip", b.port, fall=3)]) as c:
                for n, drop in enumerate((b.reset_idle, b.half_close_idle, b.reset_idle), start=1):
                    await until(lambda: watching(c) and len(b.idle) == 1, "the watch connection is up")
                    assert drop() == 1
                    await until(lambda: c.sched.stats().probes == 1 + n, f"confirmation {n} ran")
                    # One success ends it: one probe, not fall; the verdict stays.
                    assert c.sched.stats().confirmations == n
                    assert c.phase("vip") is hs.Phase.UP
                    assert c.results["vip"][-1].ok
                assert c.pool is not None and c.pool.stats().losses == 3
                # What anycast_watch_losses_total{kind} exports, through the scheduler's stats.
                watch = c.sched.stats().watch
                assert watch is not None and watch.losses_by_kind == {
                    LossKind.RESET: 2, LossKind.EOF: 1, LossKind.ERROR: 0}
                await until(lambda: watching(c) and len(b.idle) == 1, "watched again")
                assert all(r.ok for r in c.results["vip"])

    check(scenario)


def test_fall_counts_confirmations_a_flap_shorter_than_fall_probes_keeps_the_backend() -> None:
    """fall 3: the backend refuses two confirmation probes, then serves: it stays UP."""
    async def scenario() -> None:
        refusals = 2
        calls: list[str] = []

        async def flaky(spec: ProbeSpec) -> ProbeResult:
            from controller.health.probes import probe

            calls.append("x")
            if 1 < len(calls) <= 1 + refusals:
                return ProbeResult(False, 0.0, "connect refused")
            return await probe(spec)

        with backend() as b:
            async with Checked([http_target("vip", b.port, fall=3)], probe_fn=flaky) as c:
                await until(lambda: c.phase("vip") is hs.Phase.UP and watching(c) and len(b.idle) == 1,
                            "UP and watched")
                b.reset_idle()
                await until(lambda: c.sched.stats().probes == 4, "three confirmations")
                assert [r.ok for r in c.results["vip"]] == [True, False, False, True]
                assert c.phase("vip") is hs.Phase.UP
                assert c.sched.stats().confirmations == 3

    check(scenario)


# --- a blackhole: no event; the periodic probes find it -----------------------------------------


def test_a_blackholed_backend_gives_the_watch_no_event_and_the_periodic_probes_find_it() -> None:
    async def scenario() -> None:
        with backend() as b:
            async with Checked([http_target("vip", b.port, interval=1.5, timeout=1.0, fall=2)]) as c:
                await until(lambda: c.phase("vip") is hs.Phase.UP and watching(c), "UP and watched")
                b.blackhole()
                await until(lambda: c.phase("vip") is hs.Phase.DOWN, "DOWN by the periodic probes")
                st = c.sched.stats()
                assert (st.watch_losses, st.confirmations) == (0, 0)
                assert c.results["vip"][-1].detail == "timeout after 1.00s waiting for the response"
                assert watching(c)  # the connection is still up: a blackhole says nothing

    check(scenario)


# --- a watch that cannot connect marks nothing down ----------------------------------------------


def test_a_watch_that_cannot_connect_never_marks_the_backend_down() -> None:
    async def scenario() -> None:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
            port = closed.getsockname()[1]

            async def healthy(spec: ProbeSpec) -> ProbeResult:
                return ProbeResult(True, 0.0, "HTTP 200")

            async with Checked([http_target("vip", port, interval=0.05, timeout=0.04)], probe_fn=healthy) as c:
                await until(lambda: c.pool is not None and c.pool.stats().connect_failures >= 3,
                            "three refused watch connects")
                assert c.phase("vip") is hs.Phase.UP
                assert all(r.ok for r in c.results["vip"])
                assert c.sched.stats().confirmations == 0

    check(scenario)


# --- shared probes --------------------------------------------------------------------------------


def test_vips_on_one_backend_share_one_probe_and_one_watch_and_all_are_fed() -> None:
    async def scenario() -> None:
        n = 50
        with backend() as b:
            targets = [http_target(f"vip{i}", b.port, interval=0.2, timeout=GENEROUS / 200) for i in range(n)]
            async with Checked(targets) as c:
                await until(lambda: c.sched.stats().probes >= 10 and watching(c), "ten shared probes")
                assert c.pool is not None
                watch = c.pool.stats()
            # One request per probe (a probe cancelled at stop may have sent its request
            # without reporting), and one watch connection for all fifty VIPs.
            probes = c.sched.stats().probes
            assert probes <= b.requests <= probes + 1
            assert (watch.endpoints, watch.connects, watch.losses) == (1, 1, 0)
            first = [(r.ok, r.detail) for r in c.results["vip0"]]
            assert len(first) == probes
            assert all([(r.ok, r.detail) for r in c.results[f"vip{i}"]] == first for i in range(n))
            assert c.sched.stats().checks == n * probes

    check(scenario)


def test_watches_beyond_their_socket_budget_are_left_to_polling() -> None:
    async def scenario() -> None:
        with backend() as b1, backend() as b2:
            targets = [http_target("one", b1.port), http_target("two", b2.port)]
            async with Checked(targets, max_sockets=1) as c:
                await until(lambda: all(c.phase(k) is hs.Phase.UP for k in ("one", "two")) and watching(c),
                            "both UP, one watched")
                assert c.pool is not None
                st = c.pool.stats()
                assert (st.endpoints, st.unwatched) == (1, 1)
                assert len(b1.idle) + len(b2.idle) == 1

    check(scenario)
