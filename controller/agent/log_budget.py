"""Per-VIP log lines in bursts: the first few one by one, the rest summed up.

A cold start with 10,000 VIPs changes every VIP at once: three INFO lines each (the
backend's transition, the decision, ExaBGP's ack), 30,000 lines and about half the agent's
CPU for that pass. Where one line per VIP helps (a few VIPs change), it is kept; past
``limit`` lines in one burst the others are counted by what they say and one summary line
at INFO gives the counts. Each of them is still logged at DEBUG when DEBUG is on (and only
then formatted), so ``--log-level debug`` shows every VIP again.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

LIMIT = 20  # per-VIP lines at INFO per burst


class LineBudget:
    """One kind of per-VIP line (``what``); a burst lasts until ``flush``."""

    def __init__(self, logger: logging.Logger, what: str, limit: int = LIMIT) -> None:
        self.logger, self.what, self.limit = logger, what, limit
        self.used = 0
        self.over: Counter[str] = Counter()  # what the lines not logged at INFO said

    def info(self, kind: str, msg: str, *args: object, extra: dict[str, Any] | None = None) -> None:
        """``msg % args`` at INFO within the budget, else counted under ``kind`` (and at DEBUG)."""
        if self.used < self.limit:
            self.used += 1
            self.logger.info(msg, *args, extra=extra)
            return
        self.over[kind] += 1
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug(msg, *args, extra=extra)

    def flush(self) -> None:
        """End the burst: one INFO line with the counts of the lines over the budget."""
        if self.over:
            counts = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.over.items(), key=lambda kv: -kv[1]))
            self.logger.info("%s: %d more not logged one by one (DEBUG shows each): %s",
                             self.what, sum(self.over.values()), counts)
        self.used = 0
        self.over.clear()
