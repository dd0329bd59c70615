"""A stopping controller (SIGTERM, or an HA leader whose term ends) answers its long-polls
at once: aiohttp's cleanup waits for every request in flight, so a long-poll parked for
up to 60 s would hold the process, and keep its agent from following the new leader,
that long (a lab run saw a deposed leader hold an agent 24 s). Ordering assertions only."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from controller.config.desired import load_desired
from controller.server.core import Controller

ROOT = Path(__file__).resolve().parents[2]
BASE = load_desired(str(ROOT / "configs" / "controller"), "rev1")


async def _turns(n: int = 20) -> None:
    for _ in range(n):  # no I/O here: a wake-up is a few turns of the loop
        await asyncio.sleep(0)


def test_stopping_answers_parked_long_polls_and_lets_none_park(tmp_path: Path) -> None:
    ctl = Controller(dataclasses.replace(BASE, state_dir=str(tmp_path)), clock=lambda: 100.0)
    ctl.replan()

    async def scenario() -> None:
        generation = ctl.served["sjc"].generation
        parked = [asyncio.ensure_future(ctl.wait_for_change(pop, ctl.served[pop].generation, 60))
                  for pop in ("sjc", "fra")]
        await _turns()
        assert not any(p.done() for p in parked), "nothing changed: the long-polls wait"
        ctl.release_waiters()
        await _turns()
        assert all(p.done() for p in parked), "stopping left a long-poll parked"
        late = asyncio.ensure_future(ctl.wait_for_change("sjc", generation, 60))
        await _turns()
        assert late.done(), "a long-poll that came in while stopping was parked"

    asyncio.run(scenario())
    ctl.close()
