"""Fakes for driving the agent (controller.agent.daemon.Agent) in unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from controller.health.probes import ProbeResult
from controller.health.scheduler import SchedulerStats


class IdleScheduler:
    """Runs no checks: a test hands results to the agent through ``on_result``, as the real
    scheduler would; ``targets`` is what the agent asked it to check."""

    def __init__(self, on_result: Callable[[Hashable, ProbeResult, float], None]) -> None:
        self.on_result = on_result
        self.targets: list[Any] = []
        self.asked: list[list[Hashable]] = []

    def set_targets(self, targets: Iterable[Any]) -> None:
        self.targets = list(targets)

    def check_now(self, keys: Iterable[Hashable]) -> bool:
        """Records what the agent asked to check at once (``asked``); starts nothing."""
        self.asked.append(list(keys))
        return False

    async def run(self) -> None:
        await asyncio.Event().wait()

    def stop(self) -> None:
        pass

    def stats(self, lateness: bool = True) -> SchedulerStats:
        return SchedulerStats(targets=len(self.targets), in_flight=0, checks=0, skipped=0, dropped=0,
                              probe_errors=0, lateness=())


class AckingAnnouncer:
    """ExaBGP acknowledging every command."""

    async def send(self, line: str) -> bool:
        return True
