"""Waiting in tests without wall-clock bounds: poll a condition until it holds; only a hung
test (HANG_GUARD seconds) fails, never a slow one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

HANG_GUARD = 120.0  # bound of `until`: fails a hung test, never a slow one
R = TypeVar("R")


def check(scenario: Callable[[], Coroutine[Any, Any, R]]) -> R:
    return asyncio.run(scenario())


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` on the running loop until it holds; HANG_GUARD fails a hung test."""
    try:
        async with asyncio.timeout(HANG_GUARD):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"still not true after {HANG_GUARD:.0f} s: {what}") from None
