"""Bounded polling for lab assertions (the idea of FRR topotests' run_and_expect).

Lab state converges asynchronously (BGP sessions, route processing, the FIB), so tests
poll with a deadline instead of sleeping a fixed time, and a timeout says what was
awaited and what was last seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    fn: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    desc: str = "condition",
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn until it returns something truthy and return that value.

    Raises TimeoutError naming `desc` and the last value seen. Exceptions from fn
    propagate: a broken probe should fail loudly, not look like "not yet".
    """
    value = _poll(fn, bool, timeout, interval, desc, clock, sleep)
    assert value is not None  # truthy, so never None; tells the type checker
    return value


def wait_for_equal(
    fn: Callable[[], T],
    expected: T,
    timeout: float,
    interval: float = 0.05,
    desc: str | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn until it returns a value equal to `expected`; return it.

    Works for falsy expectations too, e.g. waiting for a route to be gone:
    `wait_for_equal(lambda: r1.bgp_route(p), None, 5, desc="route withdrawn")`.
    """
    label = desc or f"value == {expected!r}"
    return _poll(fn, lambda v: v == expected, timeout, interval, label, clock, sleep)


def _poll(
    fn: Callable[[], T],
    accept: Callable[[T], bool],
    timeout: float,
    interval: float,
    desc: str,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> T:
    # fn runs at least once and once more at the deadline, so a condition that comes
    # true during the last interval is not reported as a timeout.
    deadline = clock() + timeout
    while True:
        value = fn()
        if accept(value):
            return value
        now = clock()
        if now >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:.2f}s waiting for {desc}; last value: {value!r}"
            )
        sleep(min(interval, deadline - now))
