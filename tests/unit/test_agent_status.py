"""``anycastctl agent status``: the document the agent serves (built from the snapshot the
metrics read), its rendering, and the read-only unix socket it is served on."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.helpers.agent_fakes import AckingAnnouncer, IdleScheduler
from controller.agent.daemon import Agent
from controller.agent.local_status import FORMAT, StatusServer, status_document
from controller.bgp.exabgp_api import NeighborState
from controller.cli.agent_status import fetch, render
from controller.cli.conventions import Exit
from controller.cli.operator_api import ApiError
from controller.config.agent import load_agent_config
from controller.config.model import Attributes
from controller.health.probes import ProbeResult
from controller.health.state import Phase
from controller.metrics.agent import AgentMetrics, AgentSnapshot, BackendSnapshot, PeerSnapshot, VipSnapshot
from lab.metrics import parse

ROOT = Path(__file__).resolve().parents[2]
UP = Attributes(med=100, communities=("65101:100",))
DRAINING = Attributes(med=1000, as_path_prepend=3, communities=("65101:666",))


def snapshot(**changes: Any) -> AgentSnapshot:
    base = AgentSnapshot(
        pop="sjc",
        vips=(
            VipSnapshot("game-global", "198.51.100.10/32", "up", "healthy", True, "us-west", action="announce",
                        next_hop="100.64.10.1", intended=UP, held=UP),
            VipSnapshot("api-eu", "198.51.100.20/32", "draining", "draining", True, "eu-central", action="announce",
                        intended=DRAINING, held=UP),  # the drain's attributes not acknowledged yet
            VipSnapshot("old", "198.51.100.30/32", "withdrawn", "backend_down", False, "us-west", action="withdraw",
                        detail="0/2 backends healthy in us-west (need 1)", held_unsure=True),
            VipSnapshot("new", "198.51.100.40/32", "pending", "health_unknown", False, "", action="hold"),
        ),
        backends=(BackendSnapshot("game-global", "us-west", "100.64.10.1:8080", Phase.UP, True, 0.002),
                  BackendSnapshot("game-global", "us-west", "100.64.10.1:8081", Phase.DOWN, False, 0.15),
                  BackendSnapshot("game-global", "eu-central", "100.64.20.1:8080", Phase.UP, True, 0.003)),
        neighbors={"100.64.1.1": True},
        peers=(PeerSnapshot("100.64.1.1", 65001, "100.64.1.2"), PeerSnapshot("100.64.1.5", 65001, "100.64.1.6")),
        local_as=65101, last_reconcile_success=995.0, config_last_reload_time=900.0,
        plan_source="controller", plan_generation=7, plan_revision="3f2a9c1e0b7d",
        controller_ok=False, controller_url="http://192.0.2.1:9800",
        held_elsewhere=("198.51.100.99/32",),
    )
    return dataclasses.replace(base, **changes)


# --- the document --------------------------------------------------------------------------------
def test_document_says_what_exabgp_holds_against_what_the_agent_intends() -> None:
    doc = status_document(snapshot(), now=1000.0)
    vips = {v["name"]: v for v in doc["vips"]}
    assert vips["game-global"]["exabgp"] == {"holds": True, "in_sync": True, "attributes": {
        "med": 100, "as_path_prepend": 0, "communities": ["65101:100"], "large_communities": []}}
    assert vips["game-global"]["intended"] == vips["game-global"]["exabgp"]["attributes"]
    assert vips["api-eu"]["exabgp"]["in_sync"] is False  # holds the up attributes, wants draining
    assert vips["api-eu"]["intended"]["as_path_prepend"] == 3
    assert vips["old"]["exabgp"] == {"holds": None, "in_sync": False, "attributes": None}  # may hold it
    assert vips["new"]["exabgp"] == {"holds": False, "in_sync": None, "attributes": None}  # nothing sent while holding
    assert (vips["old"]["action"], vips["old"]["reason"], vips["old"]["detail"]) == (
        "withdraw", "backend_down", "0/2 backends healthy in us-west (need 1)")
    assert [b["backend"] for b in vips["game-global"]["backends"]] == [
        "100.64.10.1:8080", "100.64.10.1:8081", "100.64.20.1:8080"]
    assert doc["bgp"]["sessions"] == [
        {"neighbor": "100.64.1.1", "peer_as": 65001, "local_address": "100.64.1.2", "state": "up"},
        {"neighbor": "100.64.1.5", "peer_as": 65001, "local_address": "100.64.1.6", "state": "unknown"}]
    assert doc["plan"] == {"source": "controller", "generation": 7, "revision": "3f2a9c1e0b7d"}
    assert doc["controller"] == {"url": "http://192.0.2.1:9800", "reachable": False}
    assert doc["exabgp_other_prefixes"] == ["198.51.100.99/32"]
    assert doc["format"] == FORMAT
    json.dumps(doc)  # and it is JSON as it stands


def test_a_standalone_agent_has_no_controller_link() -> None:
    doc = status_document(snapshot(controller_ok=None, controller_url="", plan_source="local-config"), now=1.0)
    assert doc["controller"] is None
    assert "controller: none (standalone" in render(doc)


def test_render_names_sessions_decisions_reasons_attributes_and_the_link() -> None:
    text = render(status_document(snapshot(), now=1000.0))
    lines = text.splitlines()
    assert lines[0].startswith("POP sjc (anycast-agent ")
    assert "plan: generation 7 from controller, revision 3f2a9c1e0b7d" in lines
    assert "controller: http://192.0.2.1:9800 UNREACHABLE (following the last plan)" in lines
    assert "config: last reload ok, 100.0s ago; last good reconcile 5.0s ago" in lines
    session = next(line for line in lines if line.startswith("100.64.1.1 "))
    assert session.split() == ["100.64.1.1", "65001", "100.64.1.2", "up"]
    row = next(line for line in lines if line.startswith("game-global "))
    assert row.split() == ["game-global", "198.51.100.10/32", "announce", "healthy", "us-west", "1/2", "announced"]
    assert next(line for line in lines if line.startswith("new ")).split()[2:6] == [
        "hold", "health_unknown", "-", "-"]
    assert "  game-global: wants med 100, 65101:100; ExaBGP holds med 100, 65101:100" in lines
    assert ("  api-eu: wants med 1000, prepend 3, 65101:666; ExaBGP holds med 100, 65101:100"
            "  [ExaBGP differs: the next pass corrects it]") in lines
    assert "      0/2 backends healthy in us-west (need 1)" in lines
    assert "ExaBGP holds (or may hold) prefixes of no VIP: 198.51.100.99/32" in lines
    # The table's columns line up: every row's DECISION column starts where its header does.
    header = next(line for line in lines if line.startswith("VIP "))
    col = header.index("DECISION")
    for name in ("game-global", "api-eu", "old", "new"):
        row = next(line for line in lines if line.startswith(name + " "))
        assert row[col - 2:col] == "  " and row[col] != " ", row


# --- status and metrics agree: one snapshot ----------------------------------------------------------
def test_status_and_metrics_come_from_the_same_snapshot(tmp_path: Path) -> None:
    config = dataclasses.replace(load_agent_config(str(ROOT / "configs" / "agent-sjc.yaml")),
                                 state_dir=str(tmp_path / "agent"))
    registry = CollectorRegistry()
    agent = Agent(config, lambda: config, AckingAnnouncer(), kernel=None,
                  metrics=lambda snap: AgentMetrics(registry, snap), clock=lambda: 1000.0,
                  scheduler_factory=IdleScheduler)
    assert isinstance(agent.scheduler, IdleScheduler)
    for _ in range(3):
        for key in list(agent.health):
            agent.scheduler.on_result(key, ProbeResult(True, 0.002, "HTTP 200"), 1000.0)
    assert asyncio.run(agent.reconcile_once())
    agent.on_event(NeighborState("100.64.1.1", "100.64.1.2", "up"))

    doc = status_document(agent.snapshot(), now=1000.0)
    scrape = parse(generate_latest(registry).decode())
    (vip,) = doc["vips"]
    assert (vip["name"], vip["action"], vip["reason"], vip["exabgp"]["holds"]) == (
        "game-global", "announce", "healthy", True)
    assert vip["exabgp"]["in_sync"] is True and vip["intended"]["med"] == 100
    assert scrape.value("anycast_vip_announced", vip="game-global") == 1
    assert scrape.value("anycast_vip_reason", vip="game-global", reason=vip["reason"], origin=vip["origin"]) == 1
    assert doc["bgp"]["sessions"][0]["state"] == "up"
    assert scrape.value("anycast_bgp_neighbor_up", neighbor="100.64.1.1") == 1
    assert doc["plan"]["generation"] == scrape.value("anycast_plan_generation")
    assert doc["controller"] is None  # configs/agent-sjc.yaml is standalone


# --- the socket ---------------------------------------------------------------------------------------
@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A unix socket path must fit in 108 bytes; pytest's tmp_path may not."""
    d = Path(tempfile.mkdtemp(prefix="as-"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_the_socket_serves_the_document_ignores_input_and_is_the_owners_only(short_dir: Path) -> None:
    path = str(short_dir / "agent.sock")
    calls: list[int] = []

    def snap() -> AgentSnapshot:
        calls.append(1)
        return snapshot()

    async def scenario() -> tuple[dict[str, Any], bytes, int]:
        server = StatusServer(path, snap, clock=lambda: 1000.0)
        await server.start()
        mode = stat.S_IMODE(os.stat(path).st_mode)
        doc = await asyncio.to_thread(fetch, path)
        # A client that writes something (a request, garbage) gets the same document: the
        # endpoint has nothing to ask for.
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"POST /v1/drains/sjc HTTP/1.1\r\n\r\nwithdraw everything\n")
        await writer.drain()
        answer = await reader.read()
        writer.close()
        await server.close()
        return doc, answer, mode

    doc, answer, mode = asyncio.run(scenario())
    assert mode == 0o600
    assert doc == status_document(snapshot(), now=1000.0)
    assert json.loads(answer) == doc
    assert len(calls) == 2  # a fresh snapshot per client
    assert not os.path.exists(path)  # removed on close


def test_a_stale_socket_file_is_replaced(short_dir: Path) -> None:
    path = short_dir / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens

    async def scenario() -> dict[str, Any]:
        server = StatusServer(str(path), snapshot)
        await server.start()
        try:
            return await asyncio.to_thread(fetch, str(path))
        finally:
            await server.close()

    assert asyncio.run(scenario())["pop"] == "sjc"


@pytest.mark.parametrize("answer, code, words", [
    (None, Exit.UNREACHABLE, "no agent answers at"),
    (b"HTTP/1.0 200 OK\r\n\r\n# HELP anycast_vip_announced\n", Exit.BAD_ANSWER, "not JSON"),
    (b'{"format": 99}', Exit.BAD_ANSWER, "status format 99"),
    (b"[1, 2]", Exit.BAD_ANSWER, "status format 'list'"),
])
def test_fetch_names_each_failure_with_its_exit_code(short_dir: Path, answer: bytes | None, code: Exit,
                                                     words: str) -> None:
    path = str(short_dir / "agent.sock")
    if answer is None:
        with pytest.raises(ApiError) as err:
            fetch(path)
    else:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(answer)
            await writer.drain()
            writer.close()

        async def scenario() -> None:
            server = await asyncio.start_unix_server(serve, path=path)
            try:
                await asyncio.to_thread(fetch, path)
            finally:
                server.close()
                await server.wait_closed()

        with pytest.raises(ApiError) as err:
            asyncio.run(scenario())
    assert err.value.code == code and words in str(err.value), str(err.value)


def test_watch_connections_losses_and_confirmations_are_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from controller.health.scheduler import SchedulerStats
    from controller.health.watch import LossKind
    from controller.health.watcher import WatchStats

    watch = WatchStats(endpoints=3, connected=2, unwatched=1, losses=4, connects=9, connect_failures=5,
                       losses_by_kind={LossKind.RESET: 3, LossKind.EOF: 1, LossKind.ERROR: 0})
    stats = SchedulerStats(targets=4, in_flight=0, checks=10, skipped=0, dropped=0, probe_errors=0, lateness=(),
                           confirmations=6, watch=watch)
    registry = CollectorRegistry()
    AgentMetrics(registry, lambda: AgentSnapshot(pop="sjc", checks=stats))
    value = registry.get_sample_value
    assert (value("anycast_watch_endpoints"), value("anycast_watch_connected"), value("anycast_watch_unwatched")) == (
        3, 2, 1)
    assert {k.value: value("anycast_watch_losses_total", {"kind": k.value}) for k in LossKind} == {
        "reset": 3, "eof": 1, "error": 0}
    assert (value("anycast_watch_connects_total"), value("anycast_watch_connect_failures_total"),
            value("anycast_check_confirmations_total")) == (9, 5, 6)
    # Nothing watched (or no scheduler yet): zeros, not gaps.
    empty = CollectorRegistry()
    AgentMetrics(empty, lambda: AgentSnapshot(pop="sjc"))
    assert empty.get_sample_value("anycast_watch_losses_total", {"kind": "reset"}) == 0
    assert empty.get_sample_value("anycast_check_confirmations_total") == 0
