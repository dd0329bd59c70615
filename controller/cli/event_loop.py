"""Which asyncio event loop the agent runs on: uvloop when it is installed, else asyncio's own.

Why: at thousands of checks a second the agent's CPU goes mostly to the event loop's own
bookkeeping (registering a socket with the selector, a handle per callback), which uvloop
does in C. Measured in the throughput benchmark (results/README.md, section 10). uvloop is
optional: without it, or with ``ANYCAST_EVENT_LOOP=asyncio`` in the environment, the agent
runs on the standard loop with the same behaviour.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

T = TypeVar("T")

LOOPS: Final = ("uvloop", "asyncio")
ENV: Final = "ANYCAST_EVENT_LOOP"


def loop_factory(want: str | None = None) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """(the loop's name, its factory; None: asyncio's default). ``want`` (or the environment)
    may ask for ``asyncio``; ``uvloop`` falls back to asyncio when it is not installed."""
    want = want or os.environ.get(ENV) or "uvloop"
    if want not in LOOPS:
        raise ValueError(f"{ENV} must be one of {', '.join(LOOPS)}, got {want!r}")
    if want == "uvloop":
        try:
            uvloop = importlib.import_module("uvloop")  # optional: no import error when absent
        except ImportError:
            return "asyncio", None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return "uvloop", factory
    return "asyncio", None


def run(main: Coroutine[Any, Any, T], want: str | None = None) -> T:
    """``asyncio.run(main)`` on the loop ``loop_factory`` picks."""
    name, factory = loop_factory(want)
    logging.getLogger("controller.agent").info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
