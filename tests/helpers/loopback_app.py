"""An aiohttp app served on 127.0.0.1 (a port of the kernel's choosing) for the length of a
client's steps: the controller's API tests' scenario around ``steps(client)``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import ClientSession, web

from tests.helpers.waiting import HANG_GUARD


async def with_client(app: web.Application, steps: Callable[[ClientSession], Awaitable[None]]) -> None:
    """Serve ``app`` on a loopback port, run ``steps`` with a client of it, then clean up."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with asyncio.timeout(HANG_GUARD), ClientSession(f"http://127.0.0.1:{port}") as client:
            await steps(client)
    finally:
        await runner.cleanup()
