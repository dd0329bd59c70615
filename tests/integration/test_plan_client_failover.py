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


def test_an_answer_of_not_the_leader_is_never_asked_again_on_the_same_connection(tmp_path: Path) -> None:
    """A connection answered 503 may belong to an instance that no longer listens (an HA
    controller between roles: a lab run saw an agent kept on a retired follower's app,
    told "not the leader" for minutes while the same process led): the next request opens
    a new connection, even when the server offered to keep this one."""
    (port,) = free_ports(1)
    peers: list[object] = []

    async def scenario() -> None:
        async def not_leader(request: web.Request) -> web.Response:
            peers.append(request.transport.get_extra_info("peername") if request.transport else None)
            return web.json_response({"error": "c2 is not the leader", "field": "leader", "leader": None}, status=503)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", not_leader)
        runner = web.AppRunner(app)  # keep-alive on: the server would keep the connection
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = PlanClient(f"http://127.0.0.1:{port}", "sjc", TOKEN, str(tmp_path / "agent"), (), timeout=2)
        try:
            for _ in range(2):
                with pytest.raises(ControllerUnavailable):
                    await client.fetch_plan(-1, 0)
        finally:
            await client.close()
            await runner.cleanup()
    check(scenario)
    assert len(peers) == 2 and None not in peers
    assert peers[0] != peers[1], "the second request went over the connection answered 503"


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
