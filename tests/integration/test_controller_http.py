"""The controller as a real process over real HTTP: agents' clients, anycastctl, bad requests.

The config directory is a temporary git repository holding a copy of configs/controller,
so config changes are real commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from aiohttp import web
from cryptography import x509

from controller.agent.controller_link import ControllerUnavailable, HealthReport
from controller.agent.plan_client import PlanClient
from controller.agent.signing import load_plan_keys
from controller.agent.tls import client_context
from controller.config.model import ClientTls
from controller.wire import SIGNATURE_HEADER
from controller.config.desired import load_desired
from lab.metrics import parse as parse_metrics
from lab.tls import LabCa, Pair, plan_signing_key
from lab.poll import wait_for
from tests.helpers.controller_process import BIN, ControllerProcess, GitConfig, free_ports, git, session_ca, tls_on

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "controller"
TOKENS = {p: (EXAMPLE / "lab-tokens" / f"{p}.token").read_text().strip() for p in ("sjc", "fra", "sin", "operator")}
ALLOWED = load_desired(str(EXAMPLE)).allowed_prefixes
T = TypeVar("T")


def free_port() -> int:
    return free_ports(1)[0]


def _systemd_default_fd_limit() -> None:
    """The controller gets the 1,024 descriptors a unit without LimitNOFILE has."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


class Running(GitConfig, ControllerProcess):
    """The example config in a git checkout under ``tmp``, and a controller on it."""



    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "desired"
        shutil.copytree(EXAMPLE, self.dir)
        self.edit("controller.yaml", lambda c: c["policy"]["drain"].__setitem__("drain_time", 1.5))
        tls_on(self.dir)
        git(self.dir, "init", "-q")
        git(self.dir, "add", "-A")
        git(self.dir, "commit", "-qm", "initial")
        super().__init__(self.dir, tmp / "state", tmp / "controller.log", TOKENS["operator"],
                         preexec=_systemd_default_fd_limit)
        self.must_be_up()

    def restart(self) -> None:
        self.stop()
        self.start()
        self.must_be_up()

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**self.env(), "ANYCAST_OPERATOR_TOKEN": TOKENS["operator"]}
        return subprocess.run([str(BIN / "anycastctl"), *args], capture_output=True, text=True, timeout=30, env=env)


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Running]:
    c = Running(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def client(c: Running, pop: str, tmp: Path) -> PlanClient:
    return PlanClient(c.url, pop, TOKENS[pop], str(tmp / f"agent-{pop}"), ALLOWED, tls=c.ssl)


def report_json(origins: dict[str, Any], announced: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"plan_generation": 1, "origins": origins, "announced": announced or {}}).encode()


def test_agents_get_their_plans_and_a_committed_change_arrives_within_the_poll(controller: Running,
                                                                              tmp_path: Path) -> None:
    async def scenario() -> None:
        sjc, fra = client(controller, "sjc", tmp_path), client(controller, "fra", tmp_path)
        try:
            p_sjc = await sjc.fetch_plan(-1, 0)
            p_fra = await fra.fetch_plan(-1, 0)
            assert p_sjc is not None and p_fra is not None
            assert set(p_sjc.vips) == {"game-global", "api-eu"} and set(p_fra.vips) == {"game-global", "api-eu"}
            assert p_sjc.vips["game-global"].active_origin == "us-west"
            assert p_sjc.specs is not None and p_sjc.specs[0].origins[0].backends  # full VIP specs ride along
            # Both agents long-poll; an operator commits "api-eu is no longer published at sjc".
            # The longest long poll the controller allows (60 s): the change must arrive
            # within it (the watcher polls every 1 s), however slow a loaded machine is.
            polls = [asyncio.create_task(c.fetch_plan(p.generation, 60)) for c, p in ((sjc, p_sjc), (fra, p_fra))]
            await asyncio.sleep(0.3)
            controller.edit("vips.yaml", lambda v: v["vips"][1].__setitem__("publish", ["fra"]))
            controller.commit("api-eu: fra only")
            new_sjc = await polls[0]  # None: the poll ended without the change
            assert new_sjc is not None and set(new_sjc.vips) == {"game-global"}
            assert new_sjc.generation == p_sjc.generation + 1
            assert not polls[1].done()  # fra's plan did not change: it is still waiting
            polls[1].cancel()
            cached = sjc.load_cached()
            assert cached is not None and cached.source == "cached-plan" and set(cached.vips) == {"game-global"}
        finally:
            await sjc.close()
            await fra.close()

    asyncio.run(scenario())


def test_bad_commit_keeps_the_last_good_plan_and_status_shows_the_error(controller: Running,
                                                                       tmp_path: Path) -> None:
    before = controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1]
    controller.edit("vips.yaml", lambda v: v["vips"][0]["publish"].append("lhr"))
    controller.commit("typo: lhr is not a POP")
    wait_for(lambda: controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]["config"]["last_error"],
             60, desc="error visible in status")
    after = controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1]
    assert after == before  # same generation, same content, same revision
    r = controller.ctl("status")
    assert r.returncode == 0, r.stderr
    assert "CONFIG ERROR in revision" in r.stdout
    assert "vips.yaml: vips[0].publish[3]: unknown POP 'lhr'" in r.stdout
    assert f"still serving {before['revision']}" in r.stdout
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{controller.metrics_port}/metrics").read().decode()
    assert "anycast_controller_config_last_reload_successful 0.0" in metrics
    assert 'anycast_controller_config_reloads_total{result="failure"} 1.0' in metrics


@pytest.mark.parametrize("case", ["no token", "wrong token", "other pop's token", "malformed json",
                                  "oversize", "unknown pop", "unpublished vip", "unknown region",
                                  "garbage body", "not an object", "bad seq", "delta onto an unknown base",
                                  "operator endpoint with agent token", "deeply nested", "a 5,000-digit number"])
def test_bad_requests_get_a_clear_4xx_and_change_nothing(controller: Running, case: str) -> None:
    good = report_json({"game-global": {"us-west": True, "eu-central": True}}, {"game-global": True})
    assert controller.request("POST", "/v1/reports/sin", good, TOKENS["sin"])[0] == 200
    before_status = controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]
    before_plan = controller.request("GET", "/v1/plans/sin", token=TOKENS["sin"])[1]
    method, path, body, token = "POST", "/v1/reports/sin", good, TOKENS["sin"]
    expect_status, expect_field = 0, ""
    if case == "no token":
        token, expect_status, expect_field = None, 401, "Authorization"
    elif case == "wrong token":
        token, expect_status = "not-a-token", 401
    elif case == "other pop's token":
        token, expect_status = TOKENS["sjc"], 403
    elif case == "malformed json":
        body, expect_status = b'{"plan_generation": 1, "origins": {', 400
    elif case == "oversize":
        body, expect_status, expect_field = b"{" + b" " * (2 << 20) + b"}", 413, "body"
    elif case == "unknown pop":
        path, token, expect_status = "/v1/reports/lhr", TOKENS["sin"], 404
    elif case == "unpublished vip":
        body = report_json({"api-eu": {"eu-central": False}})  # sin does not publish api-eu
        expect_status, expect_field = 422, "origins.api-eu"
    elif case == "unknown region":
        body = report_json({"game-global": {"mars": False}})
        expect_status, expect_field = 400, "origins.game-global.mars"
    elif case == "garbage body":
        body, expect_status, expect_field = b"\xff\x00\x17 not json", 400, "body"
    elif case == "not an object":
        body, expect_status, expect_field = b"[1, 2]", 400, "body"
    elif case == "deeply nested":
        body, expect_status, expect_field = b"[" * 100_000 + b"]" * 100_000, 400, "body"
    elif case == "a 5,000-digit number":
        body, expect_status, expect_field = b'{"plan_generation": ' + b"9" * 5000 + b"}", 400, "body"
    elif case == "bad seq":
        body, expect_status, expect_field = json.dumps({"seq": "7", "origins": {}}).encode(), 400, "seq"
    elif case == "delta onto an unknown base":
        body = json.dumps({"plan_generation": 1, "seq": 9, "base": 8, "origins": {}}).encode()
        expect_status, expect_field = 409, "base"
    elif case == "operator endpoint with agent token":
        method, path, body, token, expect_status = "POST", "/v1/drains/sin", None, TOKENS["sin"], 403
    status, answer = controller.request(method, path, body, token)
    assert status == expect_status, answer
    assert answer["error"]
    if expect_field:
        assert answer["field"] == expect_field
    after_status = controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]
    assert controller.request("GET", "/v1/plans/sin", token=TOKENS["sin"])[1] == before_plan
    assert [p["drained_since"] for p in after_status["pops"]] == [p["drained_since"] for p in before_status["pops"]]
    assert [p["reported_plan_generation"] for p in after_status["pops"]] == \
        [p["reported_plan_generation"] for p in before_status["pops"]]


@pytest.mark.parametrize("query, field", [("after=-1", "after"), ("after=abc", "after"), ("after=", "after"),
                                          ("after=99999999999999999999", "after"), ("after=1e3", "after"),
                                          ("after=1&wait=-1", "wait"), ("after=1&wait=nan", "wait"),
                                          ("after=1&wait=inf", "wait"), ("wait=abc", "wait")])
def test_bad_plan_requests_get_a_400_naming_the_field_and_change_nothing(controller: Running, query: str,
                                                                         field: str) -> None:
    before = controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1]
    status, answer = controller.request("GET", f"/v1/plans/sjc?{query}", token=TOKENS["sjc"])
    assert (status, answer["field"]) == (400, field), answer
    assert controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1] == before


async def after_restart(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, once more if the client's pooled connection was the old process's (as the
    agent's loops do: they retry)."""
    try:
        return await call()
    except ControllerUnavailable as exc:
        # (over TLS a write into the old process's socket can also be a broken pipe)
        assert any(w in str(exc) for w in ("Disconnected", "Connection", "Broken pipe")), exc
        return await call()


def test_plans_travel_as_deltas_through_agent_and_controller_restarts(controller: Running, tmp_path: Path) -> None:
    async def scenario() -> None:
        sjc = client(controller, "sjc", tmp_path)
        try:
            plan = await sjc.fetch_plan(-1, 0)
            assert plan is not None and set(plan.vips) == {"game-global", "api-eu"}
            g = plan.generation
            status, empty = controller.request("GET", f"/v1/plans/sjc?after={g}", token=TOKENS["sjc"])
            assert (status, empty["after"], empty["generation"], empty["vips"], empty["removed"]) == (200, g, g, [], [])

            poll = asyncio.create_task(sjc.fetch_plan(g, 60))
            await asyncio.sleep(0.3)
            controller.edit("vips.yaml", lambda v: v["vips"][1].__setitem__("publish", ["fra"]))
            controller.commit("api-eu: fra only")
            plan = await poll
            assert plan is not None and set(plan.vips) == {"game-global"} and plan.generation == g + 1
            delta = controller.request("GET", f"/v1/plans/sjc?after={g}", token=TOKENS["sjc"])[1]
            assert (delta["after"], delta["removed"], delta["vips"], delta["specs"]) == (g, ["api-eu"], [], {})
            assert sjc.answers == {"full": 1, "delta": 1}  # the change came as a delta, and it fit

            # The agent's copy drifted (a bug, a bit flip): the next delta does not sum to the
            # controller's digest, so the agent fetches the full plan instead of a wrong one.
            sjc.book.digest ^= 1
            poll = asyncio.create_task(sjc.fetch_plan(g + 1, 60))
            await asyncio.sleep(0.3)
            controller.edit("vips.yaml", lambda v: v["vips"][1].__setitem__("publish", ["fra", "sjc"]))
            controller.commit("api-eu: back at sjc")
            plan = await poll
            assert plan is not None and set(plan.vips) == {"game-global", "api-eu"} and plan.generation == g + 2
            assert sjc.answers == {"full": 2, "delta": 1, "refetch": 1}
            g += 1  # the plan below is now g + 1 (api-eu back, as at first)
        finally:
            await sjc.close()

        # The agent restarts: it starts from its cache and asks what changed since.
        restarted = client(controller, "sjc", tmp_path)
        try:
            cached = restarted.load_cached()
            assert cached is not None and cached.source == "cached-plan" and cached.generation == g + 1
            confirmed = await restarted.fetch_plan(g + 1, 60)
            assert confirmed is not None and confirmed.source == "controller" and confirmed.generation == g + 1
            assert confirmed.vips == cached.vips

            # The controller restarts: a higher generation, and a full plan for the old base.
            controller.restart()
            raw = controller.request("GET", f"/v1/plans/sjc?after={g + 1}", token=TOKENS["sjc"])[1]
            assert "after" not in raw and raw["generation"] > g + 1
            new = await after_restart(lambda: restarted.fetch_plan(g + 1, 60))
            assert new is not None and new.generation == raw["generation"] and new.vips == cached.vips
            assert restarted.answers == {"delta": 1, "full": 1}  # confirmed by a delta; then the full plan
        finally:
            await restarted.close()

        # A corrupted cache is ignored: the agent fetches the full plan.
        cache = tmp_path / "agent-sjc" / "plan.json"
        cache.write_bytes(cache.read_bytes().replace(b'"us-west"', b'"us-east"', 1))
        fresh = client(controller, "sjc", tmp_path)
        try:
            assert fresh.load_cached() is None
            plan = await fresh.fetch_plan(-1, 0)
            assert plan is not None and plan.generation == raw["generation"] and plan.vips == cached.vips
        finally:
            await fresh.close()

    asyncio.run(scenario())


def test_reports_travel_as_deltas_and_a_restarted_controller_gets_a_full_one(controller: Running,
                                                                            tmp_path: Path) -> None:
    def held() -> dict[str, Any]:
        snap = controller.request("GET", "/v1/snapshot", token=TOKENS["operator"])[1]
        return next({"origins": r["origins"], "announced": r["announced"]} for r in snap["reports"]
                    if r["pop"] == "sjc")

    both = {"game-global": {"us-west": True, "eu-central": True}, "api-eu": {"eu-central": True}}
    announced = {"game-global": True, "api-eu": True}

    async def scenario() -> None:
        sjc = client(controller, "sjc", tmp_path)
        try:
            await sjc.report(HealthReport("sjc", 1, both, announced))
            assert held() == {"origins": both, "announced": announced}
            one_down = {**both, "game-global": {"us-west": False, "eu-central": True}}
            await sjc.report(HealthReport("sjc", 1, one_down, announced))  # a delta: game-global only
            assert held() == {"origins": one_down, "announced": announced}  # merged onto the full set

            controller.restart()  # it holds no report now: the delta is answered 409, then a full one goes
            back_up = {**one_down, "api-eu": {"eu-central": False}}
            await after_restart(lambda: sjc.report(HealthReport("sjc", 1, back_up, announced)))
            assert held() == {"origins": back_up, "announced": announced}
        finally:
            await sjc.close()

    asyncio.run(scenario())


def test_drain_explain_undrain_and_diff_through_anycastctl(controller: Running, tmp_path: Path) -> None:
    healthy = report_json({"game-global": {"us-west": True, "eu-central": True},
                           "api-eu": {"eu-central": True, "us-west": True}}, {"game-global": True})
    def report_healthy() -> None:  # again before each read that expects "healthy": each anycastctl run
        for pop in ("sjc", "fra"):  # starts a Python, and under load 15 s (report_stale_after) pass
            assert controller.request("POST", f"/v1/reports/{pop}", healthy, TOKENS[pop])[0] == 200

    report_healthy()
    r = controller.ctl("drain", "fra")
    assert r.returncode == 0 and "fra: draining" in r.stdout, r.stdout + r.stderr
    plan = controller.request("GET", "/v1/plans/fra", token=TOKENS["fra"])[1]
    game = next(v for v in plan["vips"] if v["name"] == "game-global")
    assert (game["wanted"], game["drain"], game["reason"]) == (True, True, "draining")
    # drain_time is 1.5 s in this config: then the drained POP withdraws.
    wait_for(lambda: not next(v for v in controller.request("GET", "/v1/plans/fra", token=TOKENS["fra"])[1]["vips"]
                              if v["name"] == "game-global")["wanted"], 60, desc="fra withdrawn after drain_time")
    report_healthy()
    r = controller.ctl("explain", "game-global")
    assert r.returncode == 0, r.stderr
    assert "fra: plan withdraw via us-west, reason drained" in r.stdout
    assert "sjc: plan announce via us-west, reason healthy" in r.stdout
    r = controller.ctl("plan", "--json")
    assert json.loads(r.stdout)["fra"]["game-global"]["reason"] == "drained"
    # diff: a working-tree change that unpublishes game-global at sin, not committed yet.
    proposed = tmp_path / "proposed"
    shutil.copytree(controller.dir, proposed, ignore=shutil.ignore_patterns(".git"))
    data = yaml.safe_load((proposed / "vips.yaml").read_text())
    data["vips"][0]["publish"] = ["sjc", "fra"]
    (proposed / "vips.yaml").write_text(yaml.safe_dump(data))
    r = controller.ctl("diff", "--config", str(proposed), "--json")
    assert r.returncode == 2, r.stderr  # changes (as terraform plan -detailed-exitcode)
    out = json.loads(r.stdout)
    changes = out["changes"]
    assert {"pop": "sin", "vip": "game-global", "action": "withdraw",
            "detail": "no longer published at this POP"} in changes
    assert all(c["pop"] == "sin" for c in changes)  # nothing else moves
    blast = out["blast_radius"]
    # fra is drained (withdrawn): 3 pairs announced now (sjc's two, sin's one); sin's withdrawn
    # is a third of them, over the 25% budget: the controller would hold this commit.
    assert (blast["announced_now"], blast["withdrawn"]) == (3, 1)
    assert "withdraws 1 of 3 announced (VIP, POP) pairs (33% > change.max_withdraw_fraction 25%)" \
        in blast["over_budget"]
    assert blast["per_pop"] == {"sin": {"withdrawn": 1, "announced": 0, "moved": 0, "announced_now": 1,
                                        "share_withdrawn": 1.0}}
    report_healthy()
    r = controller.ctl("undrain", "fra")
    assert r.returncode == 0 and "fra: undrained" in r.stdout
    plan = controller.request("GET", "/v1/plans/fra", token=TOKENS["fra"])[1]
    assert next(v for v in plan["vips"] if v["name"] == "game-global")["reason"] == "healthy"


def test_unreachable_controller_is_reported_to_the_agent_not_raised(tmp_path: Path) -> None:
    async def scenario() -> None:
        c = PlanClient(f"http://127.0.0.1:{free_port()}", "sjc", "x", str(tmp_path), ALLOWED, timeout=1)
        try:
            with pytest.raises(ControllerUnavailable, match="ClientConnectorError"):
                await c.fetch_plan(-1, 0)
            with pytest.raises(ControllerUnavailable):
                await c.report(HealthReport("sjc", 1, {}, {}))
        finally:
            await c.close()

    asyncio.run(scenario())


def test_dial_through_anycastctl_moves_the_origin_records_who_and_why_and_refuses_bad_values(
        controller: Running) -> None:
    healthy = report_json({"game-global": {"us-west": True, "eu-central": True},
                           "api-eu": {"eu-central": True, "us-west": True}}, {"game-global": True})
    for pop in ("sjc", "fra"):
        assert controller.request("POST", f"/v1/reports/{pop}", healthy, TOKENS[pop])[0] == 200
    # us-west carries game-global at sjc, fra and sin: 3 of 5 announced pairs, over the change
    # budget (25 %): refused, naming what it would move, until forced.
    r = controller.ctl("dial", "us-west", "0", "--why", "maintenance", "--by", "alice")
    assert r.returncode == 1 and "HTTP 409" in r.stderr and "game-global@fra" in r.stderr, r.stdout + r.stderr
    assert json.loads(controller.ctl("dial", "--json").stdout)["dials"]["us-west"]["operator"] is None
    r = controller.ctl("dial", "us-west", "0", "--why", "maintenance", "--by", "alice", "--force")
    assert r.returncode == 0 and "us-west: dial 0" in r.stdout, r.stdout + r.stderr
    plan = controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1]
    game = next(v for v in plan["vips"] if v["name"] == "game-global")
    assert (game["wanted"], game["active_origin"]) == (True, "eu-central")  # moved, still announced
    # anycastctl diff plans the config with the operator's dials over it: the dial is no change.
    r = controller.ctl("diff", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["changes"] == [], r.stdout + r.stderr
    listed = json.loads(controller.ctl("dial", "--json").stdout)["dials"]["us-west"]
    assert listed["pct"] == 0 and listed["operator"]["by"] == "alice" and listed["operator"]["why"] == "maintenance"
    for body, field in (({"pct": 101, "by": "a", "why": "b"}, "pct"), ({"pct": 5, "by": "a"}, "why"),
                        ({"pct": 5, "by": "a", "why": "b", "force": "yes"}, "force")):
        status, answer = controller.request("POST", "/v1/dials/us-west", json.dumps(body).encode(),
                                            TOKENS["operator"])
        assert status == 400 and answer["field"] == field, answer
    assert controller.request("POST", "/v1/dials/mars", json.dumps({"pct": 1, "by": "a", "why": "b"}).encode(),
                              TOKENS["operator"])[0] == 404
    r = controller.ctl("dial", "us-west", "--config", "--force")  # back from 0 moves the same pairs
    assert r.returncode == 0 and "us-west: dial 100" in r.stdout, r.stdout + r.stderr



# --- anycastctl as scripts use it: exit codes, and no traceback for any input --------------

API_COMMANDS = [["status"], ["plan"], ["plan", "--pop", "sjc"], ["diff"], ["explain", "game-global"],
                ["drain", "fra"], ["undrain", "fra"]]


def ctl_at(url: str, *args: str, token: str = TOKENS["operator"]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANYCAST_OPERATOR_TOKEN": token, "SSL_CERT_FILE": str(session_ca()[0].ca)}
    env.pop("ANYCAST_CONTROLLER_URL", None)
    return subprocess.run([str(BIN / "anycastctl"), *args, "--url", url], capture_output=True, text=True,
                          timeout=30, env=env)


def assert_clean_failure(r: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert words in r.stderr, r.stderr
    assert r.stdout == ""  # a script reading stdout gets nothing half-made


@pytest.fixture
def json_elsewhere() -> Iterator[str]:
    """Another HTTP service answering JSON of another shape (`{"ok": true}`) on every path."""
    import http.server
    import socketserver
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_any(self) -> None:
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = do_any

        def log_message(self, *args: Any) -> None:
            pass

    # socketserver, not http.server.HTTPServer: the latter does a reverse DNS lookup at bind.
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join()


@pytest.mark.parametrize("command", API_COMMANDS, ids=lambda c: " ".join(c))
def test_anycastctl_names_each_kind_of_failure_with_its_exit_code(controller: Running, json_elsewhere: str,
                                                                  command: list[str]) -> None:
    # Nothing listens: unreachable (4).
    assert_clean_failure(ctl_at(f"http://127.0.0.1:{free_port()}", *command), 4, "cannot reach the controller")
    # The controller's metrics port instead of its API: something answers, not the API (5).
    assert_clean_failure(ctl_at(f"http://127.0.0.1:{controller.metrics_port}", *command), 5,
                         "is --url the controller")
    # Another JSON service: the answer has another shape (5).
    assert_clean_failure(ctl_at(json_elsewhere, *command), 5, "is --url the controller")
    # The right controller, a wrong token: refused (6).
    assert_clean_failure(ctl_at(controller.url, *command, token="not-the-token"), 6, "HTTP 401")
    # The right controller and token: works (0).
    r = ctl_at(controller.url, *command)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("command, words", [
    (["explain", "no-such-vip"], "no-such-vip"),
    (["drain", "lhr"], "lhr"),
    (["undrain", "lhr"], "lhr"),
    (["plan", "--pop", "lhr"], "unknown POP 'lhr'"),
])
def test_anycastctl_unknown_names_exit_3_and_change_nothing(controller: Running, command: list[str],
                                                            words: str) -> None:
    before = controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]
    assert_clean_failure(ctl_at(controller.url, *command), 3, words)
    after = controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]
    assert [p["drained_since"] for p in after["pops"]] == [p["drained_since"] for p in before["pops"]]


@pytest.mark.parametrize("args", [
    ["status", "--bogus"], ["explain"], ["drain"], ["nosuchcommand"], ["status", "--url", "nonsense"],
    ["status", "--url", "ftp://controller:9800"], ["status", "--url", "http://controller:99999"], [],
])
def test_anycastctl_bad_flags_are_usage_errors_not_tracebacks(args: list[str]) -> None:
    r = subprocess.run([str(BIN / "anycastctl"), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 64, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "usage: anycastctl" in r.stderr


def test_anycastctl_diff_exits_2_on_changes_0_on_none_1_on_error(controller: Running) -> None:
    """By default, as ``terraform plan -detailed-exitcode``; the old flag is accepted and
    changes nothing; ``--budget`` makes a change over the blast-radius budget an error."""
    def diff(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "anycastctl"), "diff", "--config", str(controller.dir), "--against", "HEAD",
                               *extra], capture_output=True, text=True, timeout=60)

    assert diff().returncode == 0  # the working tree is HEAD
    assert diff("--detailed-exitcode").returncode == 0
    controller.edit("vips.yaml", lambda d: d["vips"][0].__setitem__("publish", ["sjc", "fra"]))
    changed = diff()
    assert changed.returncode == 2, changed.stderr
    assert "sin" in changed.stdout and "game-global" in changed.stdout
    assert "withdraws 1 of 5 announced (VIP, POP) pairs (20%)" in changed.stdout
    assert diff("--detailed-exitcode").returncode == 2
    assert diff("--budget").returncode == 2  # 20%: within the budget
    controller.edit("vips.yaml", lambda d: d.__setitem__("vips", []))
    over = diff("--budget")
    assert over.returncode == 1 and "over the blast-radius budget" in over.stderr, over.stdout + over.stderr
    assert diff().returncode == 2
    r = diff("--against", "no-such-rev")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no-such-rev" in r.stderr


def test_a_full_plan_is_sent_gzipped_to_clients_that_accept_it(controller: Running) -> None:
    import gzip

    def get(headers: dict[str, str]) -> tuple[str | None, bytes]:
        req = urllib.request.Request(controller.url + "/v1/plans/sjc",
                                     headers={"Authorization": f"Bearer {TOKENS['sjc']}", **headers})
        with urllib.request.urlopen(req, timeout=10, context=controller.ssl) as r:
            return r.headers.get("Content-Encoding"), r.read()

    encoding, packed = get({"Accept-Encoding": "gzip, deflate"})
    plain_encoding, plain = get({})
    assert (encoding, plain_encoding) == ("gzip", None)
    assert gzip.decompress(packed) == plain and json.loads(plain)["pop"] == "sjc"


# --- config changes: the blast-radius budget (policy/change.py) ------------------------------------
def _announcing(c: Running, pop: str) -> set[str]:
    return {v["name"] for v in c.request("GET", f"/v1/plans/{pop}", token=TOKENS[pop])[1]["vips"] if v["wanted"]}


def test_a_commit_withdrawing_everything_is_held_until_confirmed_through_anycastctl(controller: Running) -> None:
    """``vips: []`` committed: every POP's plan still announces what it did, status and the
    metric say HELD naming the revision, also after a restart; a confirm naming another
    revision, or with a bad token, is refused; the right one starts the waves, sin first (it
    announces the least), fra and sjc keeping everything meanwhile."""
    healthy = report_json({"game-global": {"us-west": True, "eu-central": True},
                           "api-eu": {"eu-central": True, "us-west": True}}, {"game-global": True, "api-eu": True})
    for pop in ("sjc", "fra"):
        assert controller.request("POST", f"/v1/reports/{pop}", healthy, TOKENS[pop])[0] == 200
    assert controller.request("POST", "/v1/reports/sin", report_json(
        {"game-global": {"us-west": True, "eu-central": True}}, {"game-global": True}), TOKENS["sin"])[0] == 200
    before = {pop: _announcing(controller, pop) for pop in ("sjc", "fra", "sin")}
    assert before == {"sjc": {"game-global", "api-eu"}, "fra": {"game-global", "api-eu"}, "sin": {"game-global"}}
    controller.edit("vips.yaml", lambda v: v.__setitem__("vips", []))
    controller.commit("remove every VIP")
    rev = subprocess.run(["git", "-C", str(controller.dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()[:12]

    def change() -> dict[str, Any]:
        return controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]["change"]  # type: ignore[no-any-return]

    # (Its target the commit's, not the working tree's "+dirty" one the watcher may hold first.)
    wait_for(lambda: change()["phase"] == "held" and change()["target"] == rev, 60, desc="the commit held")
    st = controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]
    assert st["change"]["target"] == rev and st["alarms"][0]["kind"] == "change_held"
    assert "withdraws 5 of 5" in st["change"]["detail"]
    assert {pop: _announcing(controller, pop) for pop in before} == before  # nothing withdrawn
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{controller.metrics_port}/metrics").read().decode()
    assert 'anycast_controller_change_phase{phase="held"} 1.0' in metrics
    assert "anycast_controller_change_withdraw_pairs 5.0" in metrics
    r = controller.ctl("status")
    assert r.returncode == 0 and f"CONFIG CHANGE HELD: revision {rev}" in r.stdout, r.stdout + r.stderr
    controller.restart()
    assert change()["phase"] == "held" and change()["target"] == rev
    assert {pop: _announcing(controller, pop) for pop in before} == before
    r = controller.ctl("apply", "--confirm", "0123456789ab", "--reason", "wrong one")
    assert r.returncode == 1 and "not the one waiting" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = ctl_at(controller.url, "apply", "--confirm", rev, "--reason", "x", token="not-the-token")
    assert r.returncode == 6, r.stderr
    assert change()["phase"] == "held"
    r = controller.ctl("apply", "--confirm", rev, "--reason", "retiring the lab VIPs", "--by", "tester")
    assert r.returncode == 0 and "3 wave(s), first at sin" in r.stdout, r.stdout + r.stderr
    assert _announcing(controller, "sin") == set()
    assert _announcing(controller, "sjc") == before["sjc"] and _announcing(controller, "fra") == before["fra"]
    assert change()["confirmed"]["by"] == "tester"
    r = controller.ctl("status")
    assert f"revision {rev} confirmed by tester: retiring the lab VIPs" in r.stdout


@pytest.mark.parametrize("hostile", ["symlink to /dev/zero", "symlink out of the checkout", "fifo", "deep yaml"])
def test_a_hostile_file_in_the_checkout_is_refused_and_the_controller_keeps_serving(controller: Running,
                                                                                    hostile: str) -> None:
    before = controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1]
    bad = controller.dir / "vips" / "bad.yaml"
    bad.parent.mkdir(exist_ok=True)
    if hostile == "symlink to /dev/zero":
        os.symlink("/dev/zero", bad)
    elif hostile == "symlink out of the checkout":
        (controller.dir.parent / "secret.yaml").write_text("vips: []  # hunter2\n")
        os.symlink(controller.dir.parent / "secret.yaml", bad)
    elif hostile == "fifo":
        os.mkfifo(bad)
    else:
        bad.write_text("vips: " + "[" * 100_000 + "]" * 100_000 + "\n")
    if hostile != "fifo":  # git does not store a FIFO: it is only in the working tree
        git(controller.dir, "add", "-A")
        controller.commit(f"hostile: {hostile}")

    def status() -> dict[str, Any]:
        return controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]
    wait_for(lambda: "vips/bad.yaml" in (status()["config"]["last_error"] or ""), 60, desc="the refusal in status")
    assert "hunter2" not in json.dumps(status())  # a file outside the checkout is never read nor shown
    assert controller.proc.poll() is None
    assert controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1] == before  # still serving, unchanged
    r = subprocess.run([str(BIN / "anycastctl"), "validate", str(controller.dir)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "vips/bad.yaml: " in r.stdout, r.stdout + r.stderr


class SlowFlood:
    """``n`` connections from one thread, each holding half a request line and trickling one
    more header byte every 0.3 s; one the controller closes is opened again (until
    ``reconnect`` is cleared). ``alive`` counts those open now, ``opened`` all ever opened."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.socks: list[socket.socket] = []
        self.opened = self.closed_by_server = 0
        self.reconnect = threading.Event()
        self.reconnect.set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def alive(self) -> int:
        return len(self.socks)

    def _open(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        except OSError:
            return  # refused or reset at once: counted as nothing, tried again next sweep
        s.setblocking(False)
        try:
            s.send(b"GET /v1/plans/sjc HT")
        except OSError:
            s.close()
            return
        self.socks.append(s)
        self.opened += 1

    def _run(self) -> None:
        while not self.stop.is_set():
            keep = []
            for s in self.socks:
                try:
                    gone = s.recv(1 << 12) == b""  # closed by the controller
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if not gone:
                    try:
                        s.send(b"x")  # another byte of a header that never ends
                    except BlockingIOError:
                        pass
                    except OSError:
                        gone = True
                if gone:
                    s.close()
                    self.closed_by_server += 1
                else:
                    keep.append(s)
            self.socks = keep
            while self.reconnect.is_set() and len(self.socks) < self.n and not self.stop.is_set():
                self._open()
            self.stop.wait(0.3)
        for s in self.socks:
            s.close()


def metric(c: Running, name: str, **labels: str) -> float | None:
    return parse_metrics(urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics").read().decode()).value(
        name, **labels)


def test_slow_connections_cannot_lock_agents_out(controller: Running, tmp_path: Path) -> None:
    """1,100 connections trickling half a request (more than the 1,024 descriptors the
    controller has): agents still fetch plans and report, each slow connection is closed at
    the header deadline although it keeps sending, and accept() never runs out of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test process holds the 1,100
    # Plain HTTP, asked for by name: the trickled bytes must reach the HTTP parser (over TLS
    # they would fail the handshake at once).
    controller.edit("controller.yaml", lambda c: c.__setitem__("api", {"header_timeout": 2,
                                                                       "insecure_plain_http": True}))
    controller.commit("api: a 2 s header deadline")
    controller.ssl = None
    controller.restart()  # the header deadline is set at start
    flood = SlowFlood(controller.port, 1100)
    connected = client(controller, "fra", tmp_path)  # an agent connected before the flood

    async def scenario() -> None:
        try:
            assert await connected.fetch_plan(-1, 0) is not None
            flood.thread.start()
            await asyncio.to_thread(wait_for, lambda: flood.opened >= 1100, 120, desc="1,100 slow connections opened")
            for i in range(5):  # new agents (new connections) and the connected one, during the flood
                for c in (client(controller, "sjc", tmp_path / f"new-{i}"), connected):
                    for attempt in range(3):  # as an agent does: a connection closed under it is tried again
                        try:
                            plan = await c.fetch_plan(-1, 0)
                            await c.report(HealthReport("sjc" if c is not connected else "fra", plan.generation
                                                        if plan else 0, {}, {}))
                            break
                        except ControllerUnavailable:
                            if attempt == 2:
                                raise
                    if c is not connected:
                        await c.close()
        finally:
            await connected.close()

    try:
        asyncio.run(scenario())
        assert flood.opened >= 1100
        flood.reconnect.clear()  # the rest keep trickling: each is closed at its header deadline all the same
        wait_for(lambda: flood.alive == 0, 120, desc="every slow connection closed by the controller")
    finally:
        flood.stop.set()
        flood.thread.join(30)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert controller.proc.poll() is None
    assert metric(controller, "anycast_controller_accept_errors_total") == 0  # descriptors never ran out
    status, body = controller.request("GET", "/v1/status", token=TOKENS["operator"])
    assert status == 200 and not body["config"]["last_error"]


def test_past_the_bound_a_newcomer_closes_the_oldest_unauthenticated_connection(controller: Running,
                                                                                tmp_path: Path) -> None:
    """Whether the flood above ever holds more than the bound at once depends on how fast a
    loaded machine accepts; here the header deadline is far away, so only the bound closes them."""
    controller.edit("controller.yaml", lambda c: c.__setitem__(  # plain HTTP, as above
        "api", {"header_timeout": 300, "max_unauthenticated_connections": 20, "insecure_plain_http": True}))
    controller.commit("api: a bound of 20 waiting connections")
    controller.ssl = None
    controller.restart()
    with contextlib.ExitStack() as stack:
        for _ in range(40):
            s = stack.enter_context(socket.create_connection(("127.0.0.1", controller.port), timeout=30))
            s.sendall(b"GET /v1/plans/sjc HT")
        wait_for(lambda: (metric(controller, "anycast_controller_connections_shed_total", reason="evicted") or 0)
                 >= 20, 60, desc="the 20 oldest closed for the newcomers")

        async def agent() -> None:  # and an agent is answered while 20 still wait
            c = client(controller, "sjc", tmp_path)
            try:
                assert await c.fetch_plan(-1, 0) is not None
            finally:
                await c.close()
        asyncio.run(agent())  # (its own new connection made room too: one more of the 20 closed)


def serve_tls(c: Running, ca: LabCa, mutual: bool = True) -> Pair:
    """Commit api.tls (with the lab CA as client CA if ``mutual``) and restart on HTTPS."""
    pair = ca.server()
    tls = {"cert": str(pair.cert), "key": str(pair.key), **({"client_ca": str(ca.ca)} if mutual else {})}
    c.edit("controller.yaml", lambda d: d.__setitem__("api", {"tls": tls}))
    c.commit("api: TLS")
    c.ssl = ssl.create_default_context(cafile=str(ca.ca))  # the URL is https:// from now on
    c.restart()  # switching TLS on takes a restart (a reload refuses it)
    return pair


def tls_client(c: Running, pop: str, tmp: Path, ca: LabCa | None, cert: Pair | None) -> PlanClient:
    tls = ClientTls(str(ca.ca) if ca else None, str(cert.cert) if cert else None, str(cert.key) if cert else None)
    return PlanClient(c.url, pop, TOKENS[pop], str(tmp / f"agent-{pop}"), ALLOWED, tls=client_context(c.url, tls))


async def fetch_and_report(c: PlanClient) -> None:
    try:
        plan = await c.fetch_plan(-1, 0)
        assert plan is not None and plan.vips
        await c.report(HealthReport(c.pop, plan.generation, {}, {}))
    finally:
        await c.close()


def served_serial(c: Running) -> int:
    """The serial number of the certificate a new connection to the controller is shown."""
    assert c.ssl is not None
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as raw:
        with c.ssl.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_with_mtls_agents_fetch_and_report_and_every_stranger_is_refused(controller: Running,
                                                                        tmp_path: Path) -> None:
    ca = LabCa(tmp_path / "tls")
    serve_tls(controller, ca)
    sjc_cert, fra_cert = ca.client("sjc"), ca.client("fra")
    stranger_ca = LabCa(tmp_path / "other", "someone else's CA")

    async def scenario() -> list[str]:
        await fetch_and_report(tls_client(controller, "sjc", tmp_path, ca, sjc_cert))
        await fetch_and_report(tls_client(controller, "fra", tmp_path, ca, fra_cert))
        refusals = []
        for pop, trust, cert in (("sjc", ca, None),  # no client certificate
                                 ("fra", ca, sjc_cert),  # sjc's certificate with fra's token
                                 ("sjc", None, sjc_cert),  # trusts only the system CAs
                                 ("sjc", stranger_ca, sjc_cert),  # trusts another CA
                                 ("sjc", ca, stranger_ca.client("sjc"))):  # a certificate from another CA
            with pytest.raises(ControllerUnavailable) as info:
                await fetch_and_report(tls_client(controller, pop, tmp_path, trust, cert))
            refusals.append(str(info.value))
        return refusals

    refusals = asyncio.run(scenario())
    assert "HTTP 403: POP 'sjc' must present a client certificate naming it (got no client certificate)" in refusals[0]
    assert "HTTP 403: POP 'fra' must present a client certificate naming it (got sjc)" in refusals[1]
    assert all("certificate verify failed" in r for r in refusals[2:4]), refusals
    assert "HTTP" not in refusals[4]  # refused in the handshake, before any request
    with pytest.raises(OSError):  # plain HTTP to the HTTPS port gets nothing
        urllib.request.urlopen(controller.url.replace("https://", "http://") + "/v1/status", timeout=10)
    # Operators keep using their token alone; a private CA through SSL_CERT_FILE.
    r = subprocess.run([str(BIN / "anycastctl"), "status"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "ANYCAST_CONTROLLER_URL": controller.url, "SSL_CERT_FILE": str(ca.ca),
                            "ANYCAST_OPERATOR_TOKEN": TOKENS["operator"]})
    assert r.returncode == 0, r.stdout + r.stderr
    assert metric(controller, "anycast_controller_api_tls") == 1


def test_a_renewed_certificate_is_served_after_a_reload_and_a_bad_one_changes_nothing(controller: Running,
                                                                                     tmp_path: Path) -> None:
    ca = LabCa(tmp_path / "tls")
    first = serve_tls(controller, ca, mutual=False)
    assert served_serial(controller) == ca.serial(first)
    renewed = ca.server("renewed")
    shutil.copy(renewed.cert, first.cert)  # renewed in place, as certbot or an operator would
    shutil.copy(renewed.key, first.key)
    controller.proc.send_signal(signal.SIGHUP)  # systemctl reload
    wait_for(lambda: served_serial(controller) == ca.serial(renewed), 60, desc="the renewed certificate served")
    first.key.write_text("not a key\n")
    controller.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "api.tls.cert" in (controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]
                                        ["config"]["last_error"] or ""), 60, desc="the bad key refused in status")
    assert served_serial(controller) == ca.serial(renewed)  # still the last good pair
    asyncio.run(fetch_and_report(tls_client(controller, "sjc", tmp_path, ca, None)))


def test_a_replayed_report_is_refused_and_changes_nothing(controller: Running, tmp_path: Path) -> None:
    def post(report: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return controller.request("POST", "/v1/reports/sjc", json.dumps(report).encode(), token=TOKENS["sjc"],
                                  headers={"Content-Type": "application/json"})

    down = {"plan_generation": 1, "seq": 1000, "origins": {"game-global": {"us-west": False}}, "announced": {}}
    up = {"plan_generation": 1, "seq": 1001, "origins": {"game-global": {"us-west": True}}, "announced": {}}
    assert post(down)[0] == 200 and post(up)[0] == 200
    explain = controller.request("GET", "/v1/explain/game-global", token=TOKENS["operator"])[1]
    for _ in range(3):  # a captured report sent again, and again
        status, body = post(down)
        assert (status, body["field"], body["last_seq"]) == (409, "seq", 1001), body
    assert controller.request("GET", "/v1/explain/game-global", token=TOKENS["operator"])[1] == explain

    async def agent() -> None:  # a real agent (its numbers come from the clock) goes on as before
        c = client(controller, "sjc", tmp_path)
        try:
            await c.report(HealthReport("sjc", 1, {"game-global": {"us-west": True}}, {}))
            c._seq = 5  # its clock stepped back: the controller says where to continue
            await c.report(HealthReport("sjc", 1, {"game-global": {"us-west": True}}, {}))
        finally:
            await c.close()
    asyncio.run(agent())


def test_a_report_captured_before_a_restart_is_refused_after_it(controller: Running) -> None:
    """The last report number per POP survives a stop and start (the alive hint in the state
    directory) and a SIGKILL once the hint has been written: the replay is a 409 either way."""
    def post(report: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return controller.request("POST", "/v1/reports/sjc", json.dumps(report).encode(), token=TOKENS["sjc"],
                                  headers={"Content-Type": "application/json"})

    def explain() -> dict[str, Any]:
        return controller.request("GET", "/v1/explain/game-global", token=TOKENS["operator"])[1]

    down = {"plan_generation": 1, "seq": 1000, "origins": {"game-global": {"us-west": False}}, "announced": {}}
    up = {"plan_generation": 1, "seq": 1001, "origins": {"game-global": {"us-west": True}}, "announced": {}}
    assert post(down)[0] == 200 and post(up)[0] == 200
    controller.restart()  # SIGTERM: the last hint is written as it stops
    before = explain()
    status, body = post(down)
    assert (status, body["field"], body["last_seq"]) == (409, "seq", 1001), body
    assert explain() == before

    up2 = {**up, "seq": 1002}
    assert post(up2)[0] == 200
    lock = controller.state / "lock"
    wait_for(lambda: '"sjc":1002' in lock.read_text(), 60, desc="the alive hint holding report 1002")
    assert controller.proc is not None
    controller.proc.kill()  # a crash: no last hint at the stop
    controller.proc.wait()
    controller.start()
    controller.must_be_up()
    before = explain()
    for replay in (down, up, up2):
        status, body = post(replay)
        assert (status, body["field"], body["last_seq"]) == (409, "seq", 1002), body
    assert explain() == before
    assert post({**up, "seq": 1003})[0] == 200  # the agent's next report goes on


def test_https_is_the_default_and_plain_http_only_by_name_loudly_flagged(controller: Running,
                                                                        tmp_path: Path) -> None:
    assert controller.url.startswith("https://")
    assert controller.request("GET", "/v1/status")[1]["api"] == {"transport": "https"}
    assert metric(controller, "anycast_controller_api_insecure_http") == 0
    assert metric(controller, "anycast_controller_api_tls") == 1

    controller.edit("controller.yaml", lambda c: c.__setitem__("api", {"insecure_plain_http": True}))
    controller.commit("api: plain HTTP, on purpose")
    controller.ssl = None
    for start in range(2):  # flagged at every start, not only the first
        controller.restart()
        assert controller.request("GET", "/v1/status")[1]["api"] == {"transport": "http-insecure"}
        assert metric(controller, "anycast_controller_api_insecure_http") == 1
        assert metric(controller, "anycast_controller_api_tls") == 0
        warnings = [line for line in controller.log.read_text().splitlines()
                    if "WARNING" in line and "api.insecure_plain_http" in line]
        assert len(warnings) == start + 1, warnings

    async def agent() -> None:  # an agent allowed plain HTTP by name still works
        await fetch_and_report(client(controller, "sjc", tmp_path))
    asyncio.run(agent())


def test_a_listen_beyond_loopback_without_tls_or_the_setting_is_refused_at_start(tmp_path: Path) -> None:
    """controller.yaml on loopback loads; --listen 0.0.0.0 on the command line is refused before
    anything is bound or served, naming api.tls and what to do."""
    d = tmp_path / "desired"
    shutil.copytree(EXAMPLE, d)
    data = yaml.safe_load((d / "controller.yaml").read_text())
    data["listen"], data["api"] = "127.0.0.1:9800", {}
    (d / "controller.yaml").write_text(yaml.safe_dump(data))
    git(d, "init", "-q")
    git(d, "add", "-A")
    git(d, "commit", "-qm", "plain HTTP on loopback")
    port = free_port()
    r = subprocess.run([str(BIN / "anycast-controller"), "--config-dir", str(d), "--state-dir", str(tmp_path / "s"),
                        "--listen", f"0.0.0.0:{port}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "controller.yaml: 1 error(s)\n  api.tls: the API would listen on 0.0.0.0 in plain HTTP" in r.stderr, r.stderr
    assert "VIP game-global" not in r.stderr  # refused before planning
    assert "api.insecure_plain_http: true" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # nothing was served


def signing_client(c: Running, pop: str, tmp: Path, *keys: Pair) -> PlanClient:
    return PlanClient(c.url, pop, TOKENS[pop], str(tmp / f"agent-{pop}"), ALLOWED, tls=c.ssl,
                      plan_keys=load_plan_keys([str(k.cert) for k in keys]))


def test_signed_plans_a_controller_without_the_key_cannot_steer_an_agent_and_keys_rotate(
        controller: Running, tmp_path: Path) -> None:
    old, new = plan_signing_key(tmp_path / "keys", "old"), plan_signing_key(tmp_path / "keys", "new")

    async def refused(c: PlanClient, reason: str) -> None:
        before = c.book.generation
        with pytest.raises(ControllerUnavailable):
            await c.fetch_plan(-1 if before is None else before, 0)
        assert c.book.generation == before and c.refusals[reason] >= 1  # the last good plan stays

    async def unsigned() -> None:  # the controller as it runs now: no signing key, as a fake one would
        agent = signing_client(controller, "sjc", tmp_path, old)
        try:
            await refused(agent, "signature")
            assert agent.book.generation is None
        finally:
            await agent.close()
    asyncio.run(unsigned())

    controller.edit("controller.yaml", lambda d: d["api"].update({"signing_key": str(old.key)}))
    controller.commit("api: sign plans")
    controller.restart()  # switching signing on takes a restart

    async def signed() -> None:
        agent = signing_client(controller, "sjc", tmp_path / "a", old, new)  # holds both during the rotation
        stale = signing_client(controller, "sjc", tmp_path / "b", old)  # was never given the new key
        stranger = signing_client(controller, "sjc", tmp_path / "c", new)
        try:
            first = await agent.fetch_plan(-1, 0)
            assert first is not None and await stale.fetch_plan(-1, 0) is not None
            await refused(stranger, "signature")
            captured = controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1]  # generation G, signed
            raw_headers = _raw_plan(controller)
            controller.edit("vips.yaml", lambda v: v["vips"][1].__setitem__("publish", ["fra"]))
            controller.commit("api-eu: fra only")
            changed = await agent.fetch_plan(first.generation, 60)  # a signed delta
            assert changed is not None and set(changed.vips) == {"game-global"} and agent.answers["delta"] == 1
            # A replay of the older signed plan, from anywhere, is refused: the plan held stays.
            async with _serving(*raw_headers) as url:
                agent.urls = (url,)  # a fake controller in its place
                await refused(agent, "replay")
                assert set(agent.book.entries) == {"game-global"}
            agent.urls = (controller.url,)
            assert captured["generation"] < agent.book.generation
            # Rotation: the controller switches to the new key at a reload.
            controller.edit("controller.yaml", lambda d: d["api"].update({"signing_key": str(new.key)}))
            controller.commit("api: the new plan key")
            controller.edit("vips.yaml", lambda v: v["vips"][1].__setitem__("publish", ["sjc", "fra"]))
            controller.commit("api-eu: back at sjc")
            wait_for(lambda: controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1]["generation"]
                     > changed.generation, 60, desc="the new key and plan served")
            again = await agent.fetch_plan(changed.generation, 0)
            assert again is not None and set(again.vips) == {"game-global", "api-eu"}
            await refused(stale, "signature")  # an agent without the new key keeps its last plan
        finally:
            for c in (agent, stale, stranger):
                await c.close()
    asyncio.run(signed())


def _raw_plan(c: Running) -> tuple[bytes, str]:
    req = urllib.request.Request(c.url + "/v1/plans/sjc", headers={"Authorization": f"Bearer {TOKENS['sjc']}"})
    with urllib.request.urlopen(req, timeout=10, context=c.ssl) as r:
        return r.read(), r.headers[SIGNATURE_HEADER]


@contextlib.asynccontextmanager
async def _serving(body: bytes, signature: str) -> Any:
    """A fake controller on loopback that answers every plan request with ``body`` and its
    (genuine, captured) signature."""
    async def plan(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json", headers={SIGNATURE_HEADER: signature})
    app = web.Application()
    app.router.add_get("/v1/plans/{pop}", plan)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_a_deeply_nested_plan_is_refused_not_fatal_to_the_agent(controller: Running, tmp_path: Path) -> None:
    """100,000-level JSON from a fake controller used to kill the plan-following task silently."""
    async def scenario() -> None:
        c = client(controller, "sjc", tmp_path)
        try:
            held = await c.fetch_plan(-1, 0)
            assert held is not None
            async with _serving(b"[" * 100_000 + b"]" * 100_000, "") as url:
                c.urls = (url,)
                with pytest.raises(ControllerUnavailable, match="RecursionError"):
                    await c.fetch_plan(-1, 0)
            assert c.book.generation == held.generation
        finally:
            await c.close()
    asyncio.run(scenario())


def test_status_says_how_changes_are_noticed_and_names_a_git_lock_given_up_on(controller: Running) -> None:
    """config.watch: the notifier, and a stale index.lock (a git killed half-way, an hour old,
    held by no process) named once a reload has given up on it; still serving, and the
    commit behind it loaded."""
    def watch() -> dict[str, Any]:
        return controller.request("GET", "/v1/status", token=TOKENS["operator"])[1]["config"]["watch"]
    wait_for(lambda: watch()["notifier"] != "none", 60, desc="the watch set up")
    assert watch() == {"notifier": "inotify", "stale_git_lock": None}
    lock = controller.config / ".git" / "index.lock"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 3600,) * 2)
    controller.edit("vips.yaml", lambda v: v["vips"][0].update(enabled=False))
    wait_for(lambda: watch()["stale_git_lock"] == os.path.realpath(lock), 60, desc="the lock named")
    r = controller.ctl("status")
    assert r.returncode == 0 and f"STALE GIT LOCK {os.path.realpath(lock)}" in r.stdout, r.stdout
    lock.unlink()
    controller.edit("vips.yaml", lambda v: v["vips"][0].update(enabled=True))
    wait_for(lambda: watch()["stale_git_lock"] is None, 60, desc="the lock gone")
