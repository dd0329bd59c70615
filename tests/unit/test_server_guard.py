"""The API's connection guard and rate-limited loop errors (controller.server.guard), with fake
transports and a fake clock; the real-socket flood is tests/integration/test_controller_http."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.server.guard import ConnectionGuard, RateLimitedLoopErrors, Shed, is_accept_error


class FakeTransport(asyncio.Transport):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def __repr__(self) -> str:
        return self.name


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_past_the_bound_the_oldest_waiting_connection_is_closed() -> None:
    shed: list[Shed] = []
    guard = ConnectionGuard(3, on_shed=shed.append)
    a, b, c, d, e = (FakeTransport(n) for n in "abcde")
    for t in (a, b, c, d):
        guard.opened(t)
    assert a.aborted and not (b.aborted or c.aborted or d.aborted)
    guard.closed(a)  # its connection_lost comes later: nothing more is closed for it
    guard.closed(c)  # a connection that went away by itself frees its place
    guard.opened(e)
    assert not b.aborted and shed == [Shed.EVICTED] and guard.unauthenticated == 3


def test_an_authenticated_connection_is_never_closed_by_the_guard() -> None:
    guard = ConnectionGuard(1)
    agent, flood = FakeTransport("agent"), [FakeTransport(f"f{i}") for i in range(50)]
    guard.opened(agent)
    guard.trust(agent)
    for t in flood:
        guard.opened(t)
    assert not agent.aborted and all(t.aborted for t in flood[:-1]) and not flood[-1].aborted
    guard.closed(flood[-1])
    assert guard.unauthenticated == 0
    guard.trust(None)  # a request whose connection is already gone: nothing to do


def test_loop_errors_are_logged_once_per_interval_and_all_counted() -> None:
    clock, logged, counted = Clock(), [], []
    handler = RateLimitedLoopErrors(10.0, clock=clock, on_error=counted.append,
                                    log_error=lambda loop, context: logged.append(context["message"]))
    loop: Any = None
    accept = "socket.accept() out of system resource"
    for _ in range(1000):
        handler(loop, {"message": accept})
        clock.now += 0.005
    handler(loop, {"message": "another"})
    clock.now += 5.1
    handler(loop, {"message": accept})
    assert len(counted) == 1002 and sum(is_accept_error(m) for m in counted) == 1001
    assert logged == [accept, "another", f"{accept} (999 more like it in the last 10 s not logged)"]
