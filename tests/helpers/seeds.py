"""A randomized test's run with a seed from the clock, printed when it fails (to replay it)."""

from __future__ import annotations

import time
from collections.abc import Callable


def with_clock_seed(run: Callable[[int], object]) -> None:
    seed = time.time_ns() % 1_000_000
    try:
        run(seed)
    except AssertionError:
        print(f"failing seed from the clock: {seed}")
        raise
