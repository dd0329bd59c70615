"""The steady report path (results 3ak): a body that came with its headers is read from the
buffer, the answer is written without json.dumps, a POP's token that matched is compared
rather than hashed again. What must not change: an unchanged report still refreshes the
POP's freshness, a changed one is taken in, a garbage or oversized body is still refused,
a wrong token is still refused after a right one, and a reload's new token replaces the old.
In process (the app on a loopback test server, a fake clock)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from controller.config.desired import load_desired
from controller.server import app as app_module
from controller.server.app import make_app
from controller.server.core import Controller
from controller.wire import WireReport, encode_report, report_delta
from tests.helpers.loopback_app import with_client
from tests.helpers.waiting import HANG_GUARD

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "controller"
TOKENS = {p: (EXAMPLE / "lab-tokens" / f"{p}.token").read_text().strip() for p in ("sjc", "fra", "sin", "operator")}
HEALTHY = {"game-global": {"us-west": True, "eu-central": True}}
DOWN = {"game-global": {"us-west": False, "eu-central": True}}
ANNOUNCED = {"game-global": True}

Steps = Callable[[ClientSession], Awaitable[None]]


def _serve(ctl: Controller, steps: Steps) -> None:
    asyncio.run(with_client(make_app(ctl), steps))


def _controller(tmp_path: Path, now: list[float]) -> Controller:
    desired = dataclasses.replace(load_desired(str(EXAMPLE), "rev1"), state_dir=str(tmp_path))
    return Controller(desired, clock=lambda: now[0])


async def _post(client: ClientSession, pop: str, body: bytes, token: str | None = None) -> tuple[int, Any, str]:
    r = await client.post(f"/v1/reports/{pop}", data=body, headers={
        "Authorization": f"Bearer {token if token is not None else TOKENS[pop]}",
        "Content-Type": "application/json"})
    return r.status, await r.json(), r.headers.get("Content-Type", "")


def _body(report: WireReport) -> bytes:
    import json
    return json.dumps(encode_report(report, compact=True)).encode()


def test_an_unchanged_report_refreshes_the_pop_and_a_changed_one_is_taken_in(tmp_path: Path) -> None:
    now = [100.0]
    ctl = _controller(tmp_path, now)

    async def steps(client: ClientSession) -> None:
        first = WireReport(1, HEALTHY, ANNOUNCED, seq=1)
        code, answer, ctype = await _post(client, "sjc", _body(first))
        assert code == 200
        assert answer == {"accepted": True, "plan_generation": ctl.served["sjc"].generation, "seq": 1}
        assert ctype == "application/json; charset=utf-8"
        held = ctl.reports["sjc"].origins
        last = first
        for seq in range(2, 40):  # 38 unchanged reports, 5 s apart: far past report_stale_after
            now[0] += 5.0
            same = WireReport(1, HEALTHY, ANNOUNCED, seq=seq)
            code, answer, _ = await _post(client, "sjc", _body(report_delta(last, same)))
            assert (code, answer["seq"]) == (200, seq)
            assert ctl.reports["sjc"].received_at == now[0]  # fresh as of this report
            assert ctl.reports["sjc"].origins is held  # nothing new to plan
            last = same
        assert now[0] - 100.0 > 2 * ctl.desired.vips[0].policy.safety.report_stale_after
        ctl.replan()  # planned now: sjc is fresh (its last report), still healthy
        await ctl.settled()
        item = ctl.item("sjc", "game-global")
        assert item is not None and str(item.reason) == "healthy"

        now[0] += 5.0
        changed = WireReport(1, DOWN, ANNOUNCED, seq=40)
        code, answer, _ = await _post(client, "sjc", _body(report_delta(last, changed)))
        assert (code, answer["seq"]) == (200, 40)
        assert ctl.reports["sjc"].origins == DOWN  # taken in
        await ctl.settled()
        item = ctl.item("sjc", "game-global")
        assert item is not None and str(item.reason) != "healthy"  # and planned

    _serve(ctl, steps)
    ctl.close()


def test_a_garbage_or_oversized_body_is_still_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    ctl = _controller(tmp_path, now)

    async def steps(client: ClientSession) -> None:
        code, answer, _ = await _post(client, "sjc", b"{not json")
        assert (code, answer["field"]) == (400, "body")
        code, answer, _ = await _post(client, "sjc", b"[]")
        assert code == 400
        code, answer, _ = await _post(client, "sjc", b"")
        assert (code, answer["field"]) == (400, "body")
        assert "sjc" not in ctl.reports
        # a body over the POP's limit that came whole with its headers (read from the buffer;
        # fra's limit is worked out at its first report: this one)
        monkeypatch.setattr(app_module, "report_limit", lambda pairs: 64)
        big = _body(WireReport(1, HEALTHY, ANNOUNCED, seq=1))
        assert 64 < len(big) < 4096
        code, answer, _ = await _post(client, "fra", big)
        assert (code, answer["field"]) == (413, "body")
        assert "fra" not in ctl.reports
        code, _, _ = await _post(client, "fra", big[:64])  # at the limit: read (and refused: cut JSON)
        assert code == 400

    _serve(ctl, steps)
    ctl.close()


def test_a_wrong_token_is_refused_after_a_right_one_and_a_reload_replaces_it(tmp_path: Path) -> None:
    now = [100.0]
    ctl = _controller(tmp_path, now)

    async def steps(client: ClientSession) -> None:
        assert (await _post(client, "sjc", _body(WireReport(1, HEALTHY, ANNOUNCED, seq=1))))[0] == 200
        body = _body(WireReport(1, HEALTHY, ANNOUNCED, seq=2))
        code, answer, _ = await _post(client, "sjc", body, token=TOKENS["sjc"] + "x")
        assert (code, answer["field"]) == (401, "Authorization")
        code, answer, _ = await _post(client, "sjc", body, token=TOKENS["sjc"][:-1])
        assert (code, answer["field"]) == (401, "Authorization")
        code, answer, _ = await _post(client, "sjc", body, token=TOKENS["fra"])
        assert (code, answer["field"]) == (403, "Authorization")  # another POP's
        assert (await _post(client, "fra", _body(WireReport(1, HEALTHY, ANNOUNCED, seq=1))))[0] == 200
        code, _, _ = await _post(client, "fra", _body(WireReport(1, HEALTHY, ANNOUNCED, seq=2)), token=TOKENS["sjc"])
        assert code == 403  # sjc's token, remembered for sjc, is not fra's
        assert ctl.report_seqs["sjc"] == 1 and ctl.report_seqs["fra"] == 1

        # a reload gives sjc a new token: the old one (remembered) is refused, the new one taken
        new_token = "a-new-token-for-sjc"
        d = ctl.desired
        pops = tuple(dataclasses.replace(p, token_sha256=hashlib.sha256(new_token.encode()).hexdigest())
                     if p.name == "sjc" else p for p in d.pops)
        ctl.apply_config(dataclasses.replace(d, pops=pops, revision="rev2"))
        code, _, _ = await _post(client, "sjc", body)
        assert code == 401
        assert (await _post(client, "sjc", body, token=new_token))[0] == 200
        assert ctl.report_seqs["sjc"] == 2

    _serve(ctl, steps)
    ctl.close()


def test_the_request_counter_counts_each_endpoint_and_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's middleware looks each (endpoint, status)'s counter child up once: the
    counts are still per endpoint and status, each request once."""
    import yaml
    from prometheus_client import CollectorRegistry

    from controller.server import daemon
    from controller.server.daemon import Watcher
    from tests.helpers.controller_process import committed_example, free_ports
    from tests.helpers.waiting import check

    d = committed_example(tmp_path)
    conf = yaml.safe_load((d / "controller.yaml").read_text())
    conf["api"].pop("tls", None)
    conf["state_dir"] = str(tmp_path / "state")
    (port,) = free_ports(1)
    conf["listen"] = f"127.0.0.1:{port}"
    conf.pop("metrics_listen", None)
    (d / "controller.yaml").write_text(yaml.safe_dump(conf))

    async def no_watch(self: Watcher, poke: asyncio.Event) -> None:
        await asyncio.Event().wait()
    monkeypatch.setattr(Watcher, "poke_on_change", no_watch)
    watcher = Watcher(str(d), str(tmp_path / "state"))
    registry = CollectorRegistry()
    stop = asyncio.Event()

    def count(endpoint: str, status: int) -> float:
        value = registry.get_sample_value("anycast_controller_requests_total",
                                          {"endpoint": endpoint, "status": str(status)})
        return value or 0.0

    async def scenario() -> None:
        serving = asyncio.ensure_future(daemon.serve(watcher, ("127.0.0.1", port), None, stop=stop,
                                                     registry=registry))
        try:
            async with ClientSession(f"http://127.0.0.1:{port}") as client:
                async with asyncio.timeout(HANG_GUARD):
                    while True:  # until the daemon answers
                        try:
                            async with client.get("/v1/status") as r:
                                assert r.status == 401
                                break
                        except OSError:
                            await asyncio.sleep(0.05)
                base = count("/v1/status", 401)
                for seq in (1, 2, 3):
                    code, _, _ = await _post(client, "sjc", _body(WireReport(1, HEALTHY, ANNOUNCED, seq=seq)))
                    assert code == 200
                assert (await _post(client, "sjc", b"{not json"))[0] == 400
                assert (await _post(client, "sjc", b"{}", token="wrong"))[0] == 401
                async with client.get("/v1/status", headers={"Authorization": f"Bearer {TOKENS['operator']}"}) as r:
                    assert r.status == 200
        finally:
            stop.set()
            await serving
        assert count("/v1/reports/{pop}", 200) == 3
        assert count("/v1/reports/{pop}", 400) == 1
        assert count("/v1/reports/{pop}", 401) == 1
        assert count("/v1/status", 200) == 1
        assert count("/v1/status", 401) == base
        # (an unknown path is answered by json_errors, outside this middleware: not counted, as before)
    check(scenario)
