"""Compact reports over HTTP (loopback, no lab): the controller reads both forms, refuses a
bad compact report with a 4xx naming the field and stores nothing, and the agent's client
falls back to the older form against a controller that does not read the compact one (as
one that predates it answers: 400, field ``compact``), and tries it again after a 409."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from controller.agent.controller_link import HealthReport
from controller.agent.plan_client import PlanClient
from controller.config.desired import load_desired
from controller.server import app as app_module
from controller.server.app import make_app
from controller.server.core import Controller
from controller.wire import COMPACT, WireError, WireReport, encode_report
from tests.helpers.waiting import HANG_GUARD

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "controller"
TOKENS = {p: (EXAMPLE / "lab-tokens" / f"{p}.token").read_text().strip() for p in ("sjc", "fra", "operator")}
HEALTHY = {"game-global": {"us-west": True, "eu-central": True}, "api-eu": {"eu-central": True}}


def _controller(tmp_path: Path) -> Controller:
    desired = dataclasses.replace(load_desired(str(EXAMPLE), "rev1"), state_dir=str(tmp_path / "state"))
    return Controller(desired, clock=lambda: 100.0)


async def _serving(ctl: Controller, steps: Callable[[str, web.Application], Awaitable[None]]) -> None:
    app = make_app(ctl)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with asyncio.timeout(HANG_GUARD):
            await steps(f"http://127.0.0.1:{runner.addresses[0][1]}", app)
    finally:
        await runner.cleanup()


def _forms(monkeypatch: pytest.MonkeyPatch, *, older: list[bool]) -> list[str]:
    """Record each report body's form as the controller parses it; ``older[0]`` True: the
    controller answers as one that predates the compact form (its decoder refused any
    unknown field with 400 naming it: test_wire_compact)."""
    forms: list[str] = []
    parse = app_module.decode_report

    def decode(body: Any, published: Any) -> WireReport:
        forms.append(COMPACT if COMPACT in body else "older")
        if older[0] and COMPACT in body:
            raise WireError(COMPACT, "unknown field")
        return parse(body, published)

    monkeypatch.setattr(app_module, "decode_report", decode)
    return forms


def test_the_controller_reads_both_forms_and_refuses_a_bad_compact_report_storing_nothing(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)

    async def steps(url: str, _: web.Application) -> None:
        async with ClientSession(url, headers={"Authorization": f"Bearer {TOKENS['sjc']}"}) as client:
            async def post(doc: Any) -> tuple[int, Any]:
                async with client.post("/v1/reports/sjc", json=doc) as r:
                    return r.status, await r.json()

            full = WireReport(1, HEALTHY, {"game-global": True, "api-eu": False}, seq=1)
            assert (await post(encode_report(full, compact=True)))[0] == 200
            assert ctl.reports["sjc"].origins == HEALTHY
            assert ctl.reports["sjc"].announced == {"game-global": True, "api-eu": False}
            down = {**HEALTHY, "game-global": {"us-west": False, "eu-central": True}}
            assert (await post(encode_report(dataclasses.replace(full, origins=down, seq=2))))[0] == 200
            assert ctl.reports["sjc"].origins == down  # the older form, still read
            stored = ctl.reports["sjc"]
            bad: list[tuple[Any, int, str]] = [
                ({"plan_generation": 1, "seq": 3, COMPACT: {"groups": [
                    {"origins": {"us-west": True}, "vips": ["game-global", "sin-only"]}]}},
                 422, f"{COMPACT}.groups[0].vips[1]"),
                ({"plan_generation": 1, "seq": 3, COMPACT: {"groups": [
                    {"origins": {"mars": True}, "vips": ["game-global"]}]}}, 400, f"{COMPACT}.groups[0].origins.mars"),
                ({"plan_generation": 1, "seq": 3, COMPACT: {"groups": [
                    {"origins": {"us-west": "up"}, "vips": ["game-global"]}]}}, 400,
                 f"{COMPACT}.groups[0].origins.us-west"),
                ({"plan_generation": 1, "seq": 3, COMPACT: {"groups": [
                    {"origins": {"us-west": True}, "vips": ["game-global"], "announced": [True, False]}]}}, 400,
                 f"{COMPACT}.groups[0].announced"),
                ({"plan_generation": 1, "seq": 3, "origins": {}, COMPACT: {"groups": []}}, 400, "origins"),
                ({"plan_generation": 1, "seq": 3, "base": 2, "removed": [], COMPACT: {"groups": [
                    {"origins": {"us-west": True}, "vips": ["game-global", "game-global"]}]}}, 400,
                 f"{COMPACT}.groups[0].vips[1]"),
            ]
            for doc, status, field in bad:
                code, answer = await post(doc)
                assert (code, answer["field"]) == (status, field), doc
                assert ctl.reports["sjc"] is stored and ctl.report_seqs["sjc"] == 2  # nothing stored
            # a delta in the compact form onto the last one
            delta = {"plan_generation": 1, "seq": 3, "base": 2, "removed": [],
                     COMPACT: {"groups": [{"origins": {"us-west": True, "eu-central": True}, "vips": ["game-global"],
                                           "announced": [True]}]}}
            assert (await post(delta))[0] == 200
            assert ctl.reports["sjc"].origins == HEALTHY
            # and a body over the bound is still a 413 naming the body
            limit = app_module.report_limit(sum(map(len, ctl.published_regions("sjc").values())))
            async with client.post("/v1/reports/sjc", data=b" " * (limit + 1)) as r:
                assert (r.status, (await r.json())["field"]) == (413, "body")
            assert ctl.report_seqs["sjc"] == 3

    asyncio.run(_serving(ctl, steps))
    ctl.close()


def test_the_agent_falls_back_to_the_older_form_for_a_controller_that_predates_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    older = [True]
    forms = _forms(monkeypatch, older=older)
    ctl = _controller(tmp_path)
    health = HealthReport("sjc", 1, HEALTHY, {"game-global": True, "api-eu": True})

    async def steps(url: str, app: web.Application) -> None:
        agent = PlanClient(url, "sjc", TOKENS["sjc"], str(tmp_path / "agent"), load_desired(str(EXAMPLE)).allowed_prefixes)
        try:
            await agent.report(health)  # compact, refused naming the field; at once again, older: stored
            assert forms == [COMPACT, "older"] and ctl.reports["sjc"].origins == HEALTHY
            assert not agent.compact
            down = dataclasses.replace(health, origins={**HEALTHY, "api-eu": {"eu-central": False}})
            await agent.report(down)  # a delta, in the older form at once
            assert forms[2:] == ["older"] and ctl.reports["sjc"].origins["api-eu"] == {"eu-central": False}
            # The controller restarts (it holds no report to apply a delta onto: 409), still
            # the older one: the full report tries the compact form once more, then the older.
            app[app_module.REPORTS].clear()
            await agent.report(health)
            assert forms[3:] == ["older", COMPACT, "older"] and ctl.reports["sjc"].origins == HEALTHY
            # Upgraded and restarted: the full report after the 409 is compact, and accepted.
            older[0] = False
            app[app_module.REPORTS].clear()
            await agent.report(down)
            assert forms[6:] == ["older", COMPACT] and agent.compact
            assert ctl.reports["sjc"].origins["api-eu"] == {"eu-central": False}
            await agent.report(health)  # and the deltas after it too
            assert forms[8:] == [COMPACT] and ctl.reports["sjc"].origins == HEALTHY
        finally:
            await agent.close()

    asyncio.run(_serving(ctl, steps))
    ctl.close()


def test_a_400_about_anything_else_is_no_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the answer of a controller that does not know the field moves the agent to the
    older form; any other refusal of a compact report is an error, as before."""
    forms = _forms(monkeypatch, older=[False])
    ctl = _controller(tmp_path)
    from controller.agent.controller_link import ControllerUnavailable

    async def steps(url: str, _: web.Application) -> None:
        agent = PlanClient(url, "sjc", TOKENS["sjc"], str(tmp_path / "agent"), load_desired(str(EXAMPLE)).allowed_prefixes)
        try:
            with pytest.raises(ControllerUnavailable, match="not an origin region"):
                await agent.report(HealthReport("sjc", 1, {"game-global": {"mars": True}}, {}))
            assert forms == [COMPACT] and agent.compact and "sjc" not in ctl.reports
        finally:
            await agent.close()

    asyncio.run(_serving(ctl, steps))
    ctl.close()
