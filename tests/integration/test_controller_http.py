"""The controller as a real process over real HTTP: agents' clients, anycastctl, bad requests.

The config directory is a temporary git repository holding a copy of configs/controller,
so config changes are real commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from controller.agent.controller_link import ControllerUnavailable, HealthReport
from controller.agent.plan_client import PlanClient
from controller.config.desired import load_desired
from lab.poll import wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "controller"
TOKENS = {p: (EXAMPLE / "lab-tokens" / f"{p}.token").read_text().strip() for p in ("sjc", "fra", "sin", "operator")}
BIN = Path(sys.executable).parent
ALLOWED = load_desired(str(EXAMPLE)).allowed_prefixes
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (held open together, so never the same one twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def git(d: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(d), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"})


class Running:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "desired"
        shutil.copytree(EXAMPLE, self.dir)
        self.edit("controller.yaml", lambda c: c["policy"]["drain"].__setitem__("drain_time", 1.5))
        git(self.dir, "init", "-q")
        git(self.dir, "add", "-A")
        git(self.dir, "commit", "-qm", "initial")
        self.log = tmp / "controller.log"
        self.state = tmp / "state"
        # A port found free may be taken by someone else before the controller binds it (two
        # sockets bound at the same moment, on a busy machine): then start again on new ports.
        for attempt in range(3):
            self.port, self.metrics_port = free_ports(2)
            self.url = f"http://127.0.0.1:{self.port}"
            if self.start(may_fail=attempt < 2):
                break

    def start(self, may_fail: bool = False) -> bool:
        """Start on self.port; False if it exited at once and ``may_fail`` (the caller picks
        new ports), else wait until it answers (an exit fails the test with its log)."""
        logged = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [str(BIN / "anycast-controller"), "--config-dir", str(self.dir), "--state-dir", str(self.state),
             "--listen", f"127.0.0.1:{self.port}", "--metrics-listen", f"127.0.0.1:{self.metrics_port}"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self.up(), 60, desc="controller answering (or exiting)")
        if self.proc.poll() is None:
            return True
        if may_fail:
            return False
        raise AssertionError(f"the controller exited with {self.proc.returncode} at start:\n"
                             + self.log.read_bytes()[logged:].decode(errors="replace")[-3000:])

    def restart(self) -> None:
        self.stop()
        self.start()

    def up(self) -> bool:
        try:
            self.request("GET", "/v1/status", token=TOKENS["operator"])
            return True
        except OSError:
            return False

    def edit(self, name: str, change: Any) -> None:
        data = yaml.safe_load((self.dir / name).read_text())
        change(data)
        (self.dir / name).write_text(yaml.safe_dump(data))

    def commit(self, message: str) -> None:
        git(self.dir, "commit", "-qam", message)

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ANYCAST_CONTROLLER_URL": self.url, "ANYCAST_OPERATOR_TOKEN": TOKENS["operator"]}
        return subprocess.run([str(BIN / "anycastctl"), *args], capture_output=True, text=True, timeout=30, env=env)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Running]:
    c = Running(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def client(c: Running, pop: str, tmp: Path) -> PlanClient:
    return PlanClient(c.url, pop, TOKENS[pop], str(tmp / f"agent-{pop}"), ALLOWED)


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
                                  "operator endpoint with agent token"])
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
        assert "Disconnected" in str(exc) or "Connection" in str(exc), exc
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
    for pop in ("sjc", "fra"):
        assert controller.request("POST", f"/v1/reports/{pop}", healthy, TOKENS[pop])[0] == 200
    r = controller.ctl("drain", "fra")
    assert r.returncode == 0 and "fra: draining" in r.stdout, r.stdout + r.stderr
    plan = controller.request("GET", "/v1/plans/fra", token=TOKENS["fra"])[1]
    game = next(v for v in plan["vips"] if v["name"] == "game-global")
    assert (game["wanted"], game["drain"], game["reason"]) == (True, True, "draining")
    # drain_time is 1.5 s in this config: then the drained POP withdraws.
    wait_for(lambda: not next(v for v in controller.request("GET", "/v1/plans/fra", token=TOKENS["fra"])[1]["vips"]
                              if v["name"] == "game-global")["wanted"], 60, desc="fra withdrawn after drain_time")
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
    assert r.returncode == 0, r.stderr
    changes = json.loads(r.stdout)
    assert {"pop": "sin", "vip": "game-global", "action": "withdraw",
            "detail": "no longer published at this POP"} in changes
    assert all(c["pop"] == "sin" for c in changes)  # nothing else moves
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
    r = controller.ctl("dial", "us-west", "0", "--why", "maintenance", "--by", "alice")
    assert r.returncode == 0 and "us-west: dial 0" in r.stdout, r.stdout + r.stderr
    plan = controller.request("GET", "/v1/plans/sjc", token=TOKENS["sjc"])[1]
    game = next(v for v in plan["vips"] if v["name"] == "game-global")
    assert (game["wanted"], game["active_origin"]) == (True, "eu-central")  # moved, still announced
    listed = json.loads(controller.ctl("dial", "--json").stdout)["dials"]["us-west"]
    assert listed["pct"] == 0 and listed["operator"]["by"] == "alice" and listed["operator"]["why"] == "maintenance"
    for body, field in (({"pct": 101, "by": "a", "why": "b"}, "pct"), ({"pct": 5, "by": "a"}, "why")):
        status, answer = controller.request("POST", "/v1/dials/us-west", json.dumps(body).encode(),
                                            TOKENS["operator"])
        assert status == 400 and answer["field"] == field, answer
    assert controller.request("POST", "/v1/dials/mars", json.dumps({"pct": 1, "by": "a", "why": "b"}).encode(),
                              TOKENS["operator"])[0] == 404
    r = controller.ctl("dial", "us-west", "--config")
    assert r.returncode == 0 and "us-west: dial 100" in r.stdout, r.stdout + r.stderr



# --- anycastctl as scripts use it: exit codes, and no traceback for any input --------------

API_COMMANDS = [["status"], ["plan"], ["plan", "--pop", "sjc"], ["diff"], ["explain", "game-global"],
                ["drain", "fra"], ["undrain", "fra"]]


def ctl_at(url: str, *args: str, token: str = TOKENS["operator"]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANYCAST_OPERATOR_TOKEN": token}
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


def test_anycastctl_diff_detailed_exitcode_tells_a_change_from_none(controller: Running) -> None:
    def diff(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "anycastctl"), "diff", "--config", str(controller.dir), "--against", "HEAD",
                               *extra], capture_output=True, text=True, timeout=60)

    assert diff("--detailed-exitcode").returncode == 0  # the working tree is HEAD
    controller.edit("vips.yaml", lambda d: d["vips"][0].__setitem__("publish", ["sjc", "fra"]))
    changed = diff("--detailed-exitcode")
    assert changed.returncode == 2, changed.stderr
    assert "sin" in changed.stdout and "game-global" in changed.stdout
    assert diff().returncode == 0  # without the flag a change is still a success
    r = diff("--against", "no-such-rev")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no-such-rev" in r.stderr


def test_a_full_plan_is_sent_gzipped_to_clients_that_accept_it(controller: Running) -> None:
    import gzip

    def get(headers: dict[str, str]) -> tuple[str | None, bytes]:
        req = urllib.request.Request(controller.url + "/v1/plans/sjc",
                                     headers={"Authorization": f"Bearer {TOKENS['sjc']}", **headers})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.headers.get("Content-Encoding"), r.read()

    encoding, packed = get({"Accept-Encoding": "gzip, deflate"})
    plain_encoding, plain = get({})
    assert (encoding, plain_encoding) == ("gzip", None)
    assert gzip.decompress(packed) == plain and json.loads(plain)["pop"] == "sjc"
