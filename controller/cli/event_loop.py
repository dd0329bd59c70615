"""Which asyncio event loop the agent runs on: asyncio's own, or uvloop when asked for.

``ANYCAST_EVENT_LOOP=uvloop`` in the agent's environment (systemd's ``Environment=``, which
ExaBGP passes on to its API process) runs the agent on uvloop if it is installed
(``pip install 'anycast-controller[fast]'``), else on asyncio's loop: a clean fallback.
Not the default: with the checks running as loop callbacks (``health.probes.start``),
uvloop saved 4-10 % (TCP) and 3-26 % (HTTP) of the CPU per check in the throughput
benchmark on a loaded machine, about the spread of runs minutes apart (results/README.md,
section 10): not clear enough for a second event-loop implementation under ExaBGP's API
process.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

T = TypeVar("T")

LOOPS: Final = ("asyncio", "uvloop")
ENV: Final = "ANYCAST_EVENT_LOOP"


def loop_factory(want: str | None = None) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """(the loop's name, its factory; None: asyncio's default). ``want`` (or the environment,
    else asyncio) names the loop; ``uvloop`` falls back to asyncio when it is not installed."""
    want = want or os.environ.get(ENV) or "asyncio"
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
