"""A report is acknowledged once validated and stored, not after the planning pass it
triggers; reads that show plans wait for that pass. In process (the app on a loopback test
server, a fake clock); the pass is held back by a gate, so every order asserted is certain."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from controller.config.desired import load_desired
from controller.server.app import make_app
from controller.server.core import Controller
from controller.wire import WireReport, encode_report
from tests.helpers.loopback_app import with_client
from tests.helpers.waiting import HANG_GUARD, until

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "controller"
TOKENS = {p: (EXAMPLE / "lab-tokens" / f"{p}.token").read_text().strip() for p in ("sjc", "fra", "sin", "operator")}


def _reason(ctl: Controller, pop: str) -> str:
    item = ctl.item(pop, "game-global")
    assert item is not None
    return str(item.reason)


def test_a_report_is_acknowledged_before_its_pass_and_a_read_after_the_answer_includes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    desired = dataclasses.replace(load_desired(str(EXAMPLE), "rev1"), state_dir=str(tmp_path))
    ctl = Controller(desired, clock=lambda: now[0])
    gate = asyncio.Event()
    planned = ctl._planned_reports

    def held_back() -> None:  # the batch's pass starts only once the test opens the gate
        async def later() -> None:
            await gate.wait()
            planned()
        asyncio.ensure_future(later())

    monkeypatch.setattr(ctl, "_planned_reports", held_back)
    healthy = {"game-global": {"us-west": True, "eu-central": True}}
    down = {"game-global": {"us-west": False, "eu-central": True}}
    arrived: list[str] = []  # request paths, as the controller receives them

    async def steps(client: ClientSession) -> None:
        async def post(pop: str, seq: int, origins: Any) -> tuple[int, Any]:
            doc = encode_report(WireReport(1, origins, {"game-global": True}, seq=seq))
            r = await client.post(f"/v1/reports/{pop}", json=doc, headers={"Authorization": f"Bearer {TOKENS[pop]}"})
            return r.status, await r.json()

        async def status() -> Any:
            r = await client.get("/v1/status", headers={"Authorization": f"Bearer {TOKENS['operator']}"})
            assert r.status == 200
            return await r.json()

        for pop in ("sjc", "fra", "sin"):
            assert (await post(pop, 1, healthy))[0] == 200
        gate.set()
        await status()  # planned with the three
        assert _reason(ctl, "sjc") == "healthy"
        gate.clear()

        assert (await post("sjc", 2, down))[0] == 200  # acknowledged while its pass is held back
        assert _reason(ctl, "sjc") == "healthy"  # not planned yet
        assert ctl.reports["sjc"].origins == down  # but stored
        code, answer = await post("sjc", 2, down)  # the same report again: a replay, refused at once
        assert (code, answer["field"], answer["last_seq"]) == (409, "seq", 2)
        code, answer = await post("sjc", 3, {"game-global": {"mars": False}})
        assert (code, answer["field"]) == (400, "origins.game-global.mars")
        assert ctl.reports["sjc"].origins == down  # the refused ones changed nothing

        before = ctl.served["sjc"].generation
        reading = asyncio.ensure_future(status())
        await until(lambda: "/v1/status" in arrived, "the status request reached the controller")
        for _ in range(20):
            await asyncio.sleep(0)
        assert not reading.done()  # a read waits for the pass of the reports acknowledged before it
        gate.set()
        answer = await reading
        assert _reason(ctl, "sjc") != "healthy"  # planned with the report: sjc sees us-west down
        # and the answer shows that plan (its generation), not the one served when it arrived
        assert [p["plan_generation"] for p in answer["pops"] if p["pop"] == "sjc"] == [before + 1]

    async def scenario() -> None:
        # (a POST that waited for its pass would wait for the gate: failed by the hang guard)
        app = make_app(ctl)

        @web.middleware
        async def seen(request: web.Request, handler: Any) -> web.StreamResponse:
            arrived.append(request.path)
            return await handler(request)  # type: ignore[no-any-return]

        app.middlewares.append(seen)
        await with_client(app, steps)

    asyncio.run(scenario())
    ctl.close()
