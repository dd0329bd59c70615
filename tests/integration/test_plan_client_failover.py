"""An agent with several controller URLs (HA): a refused connection or a follower's 503 sends
the request to the next URL (the leader first when a follower names it), the URL that
answered is kept, and only when none answers is the controller unavailable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from aiohttp import web

from controller.agent.controller_link import ControllerUnavailable
from controller.agent.plan_client import PlanClient
from controller.config.desired import load_desired
from controller.server.app import make_app
from controller.server.core import Controller
from lab.etcd import free_ports
from tests.helpers.waiting import check

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "controller"
TOKEN = (EXAMPLE / "lab-tokens" / "sjc.token").read_text().strip()


async def follower(port: int, leader: str | None) -> web.AppRunner:
    async def not_leader(request: web.Request) -> web.Response:
        return web.json_response({"error": "c2 is not the leader", "field": "leader", "leader": leader}, status=503)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_leader)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def test_a_follower_naming_the_leader_sends_the_agent_there(tmp_path: Path) -> None:
    desired = dataclasses.replace(load_desired(str(EXAMPLE), "r1"), state_dir=str(tmp_path / "ctl"))
    ctl = Controller(desired, clock=lambda: 1000.0)
    closed, f_port, spare, l_port = free_ports(4)
    urls = [f"http://127.0.0.1:{p}" for p in (closed, f_port, spare, l_port)]

    async def scenario() -> None:
        runners = [await follower(f_port, urls[3]), await follower(spare, None)]
        leader = web.AppRunner(make_app(ctl))
        await leader.setup()
        await web.TCPSite(leader, "127.0.0.1", l_port).start()
        runners.append(leader)
        client = PlanClient(urls, "sjc", TOKEN, str(tmp_path / "agent"), desired.allowed_prefixes, timeout=2)
        try:
            plan = await client.fetch_plan(-1, 0)
            assert plan is not None and plan.generation == ctl.served["sjc"].generation
            assert client.url == urls[3]  # the follower named it: the spare follower was skipped
            await client.fetch_plan(plan.generation, 0)
            assert client.url == urls[3]  # kept
            await leader.cleanup()
            runners.remove(leader)
            with pytest.raises(ControllerUnavailable) as exc:
                await client.fetch_plan(plan.generation, 0)
            for u in urls:  # every URL was tried, and says why it did not answer
                assert u in str(exc.value)
            assert client.url == urls[3]
        finally:
            await client.close()
            for r in runners:
                await r.cleanup()
    check(scenario)
    ctl.close()
