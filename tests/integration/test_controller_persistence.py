"""The controller's memory as a real process sees it: a bad commit at start, two controllers
on one state directory, a corrupt state, a full and a read-only state directory (a tiny
tmpfs this test mounts), and the config watcher (inotify and its stat-polling fallback).

Loopback only, no namespaces: no lab lock needed. Needs root for the tmpfs (CI runs as root).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.cli.conventions import Exit
from controller.server.daemon import Watcher
from lab.poll import wait_for
from tests.helpers.controller_process import BIN, STARTUP, ControllerProcess, git, tls_on

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "controller"
OPERATOR = (EXAMPLE / "lab-tokens" / "operator.token").read_text().strip()


def checkout(tmp: Path) -> Path:
    d = tmp / "desired"
    shutil.copytree(EXAMPLE, d)
    tls_on(d)
    git(d, "init", "-q")
    git(d, "add", "-A")
    git(d, "commit", "-qm", "initial")
    return d


def edit(d: Path, name: str, change: Any) -> None:
    data = yaml.safe_load((d / name).read_text())
    change(data)
    (d / name).write_text(yaml.safe_dump(data))


class Controller(ControllerProcess):
    """One anycast-controller process on ``config`` and ``state``, asked with the operator token."""

    def __init__(self, config: Path, state: Path, log: Path) -> None:
        super().__init__(config, state, log, OPERATOR)

    def wait_up(self) -> Controller:
        self.must_be_up()
        return self

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")[1]

    def metric(self, name: str) -> float:
        for line in self.metrics_text().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exported")

    def drained(self) -> dict[str, Any]:
        return {p["pop"]: p["drained_since"] for p in self.status()["pops"]}


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[Controller]]:
    started: list[Controller] = []
    try:
        yield started
    finally:
        for c in started:
            c.stop()


def start(running: list[Controller], config: Path, state: Path, log: Path) -> Controller:
    c = Controller(config, state, log)
    running.append(c)
    return c


def state_files(state: Path) -> dict[str, bytes]:
    return {str(p.relative_to(state)): p.read_bytes() for p in sorted(state.rglob("*"))
            if p.is_file() and p.name != "lock"}


def ctl_status(c: Controller) -> subprocess.CompletedProcess[str]:
    env = {**c.env(), "ANYCAST_OPERATOR_TOKEN": OPERATOR}
    return subprocess.run([str(BIN / "anycastctl"), "status"], capture_output=True, text=True, timeout=60, env=env)


def test_a_bad_commit_at_start_serves_the_last_good_state_and_shows_the_error(tmp_path: Path,
                                                                                running: list[Controller]) -> None:
    config, state = checkout(tmp_path), tmp_path / "state"
    good = git(config, "rev-parse", "HEAD")[:12]
    first = start(running, config, state, tmp_path / "1.log").wait_up()
    assert first.request("POST", "/v1/drains/sin")[0] == 200
    wait_for(lambda: (state / "desired" / "REVISION").exists(), STARTUP, desc="last good state kept")
    first.stop()
    edit(config, "vips.yaml", lambda v: v["vips"][0]["publish"].append("lhr"))
    git(config, "commit", "-qam", "typo: lhr is not a POP")
    bad = git(config, "rev-parse", "HEAD")[:12]

    second = start(running, config, state, tmp_path / "2.log").wait_up()  # used to exit 2
    st = second.status()
    assert st["config"]["revision"] == good and st["config"]["last_error_revision"] == bad
    assert "unknown POP 'lhr'" in st["config"]["last_error"]
    assert second.drained()["sin"] is not None
    assert second.metric("anycast_controller_config_last_reload_successful") == 0.0
    assert "CONFIG ERROR in revision" in ctl_status(second).stdout

    edit(config, "vips.yaml", lambda v: v["vips"][0]["publish"].remove("lhr"))
    git(config, "commit", "-qam", "fix the typo")
    fixed = git(config, "rev-parse", "HEAD")[:12]
    wait_for(lambda: second.status()["config"]["revision"] == fixed, STARTUP, 0.1, desc="the fix loaded")
    assert second.status()["config"]["last_error"] == ""


def test_a_second_controller_on_the_same_state_dir_refuses_and_changes_nothing(tmp_path: Path,
                                                                               running: list[Controller]) -> None:
    config, state = checkout(tmp_path), tmp_path / "state"
    first = start(running, config, state, tmp_path / "1.log").wait_up()
    assert first.request("POST", "/v1/drains/sin")[0] == 200
    wait_for(lambda: (state / "desired" / "REVISION").exists(), STARTUP, desc="last good state kept")
    generations = {p["pop"]: p["plan_generation"] for p in first.status()["pops"]}
    before = state_files(state)
    second = start(running, config, state, tmp_path / "2.log")
    assert second.exited() == 1
    assert "is in use by another controller" in (tmp_path / "2.log").read_text()
    assert state_files(state) == before  # not one byte rewritten
    assert {p["pop"]: p["plan_generation"] for p in first.status()["pops"]} == generations
    assert first.request("DELETE", "/v1/drains/sin")[0] == 200  # the first one is undisturbed


def test_a_corrupt_newest_snapshot_keeps_the_drain_with_an_alarm_and_no_readable_state_refuses(
        tmp_path: Path, running: list[Controller]) -> None:
    config, state = checkout(tmp_path), tmp_path / "state"
    c = start(running, config, state, tmp_path / "1.log").wait_up()
    assert c.request("POST", "/v1/drains/sin")[0] == 200
    c.stop()
    start(running, config, state, tmp_path / "2.log").wait_up().stop()  # folds the journal: two generations
    snapshots = sorted(state.glob("snapshot-*.json"))
    assert len(snapshots) == 2
    snapshots[-1].write_bytes(snapshots[-1].read_bytes()[:100])  # truncated

    c = start(running, config, state, tmp_path / "3.log").wait_up()
    assert c.drained()["sin"] is not None  # not silently undone
    persistence = c.status()["persistence"]
    assert persistence["recovered_without"] and snapshots[-1].name in persistence["recovered_without"][0]
    assert "STATE RECOVERED" in ctl_status(c).stdout
    text = c.metrics_text()
    assert 'anycast_controller_persistence_errors_total{operation="load"} 1.0' in text
    c.stop()

    for s in state.glob("snapshot-*.json"):
        s.write_bytes(b"garbage")
    c = start(running, config, state, tmp_path / "4.log")
    assert c.exited() == 1
    assert "refusing to start with empty state" in (tmp_path / "4.log").read_text()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_state_dir_refuses_drains_with_503_and_raises_the_alarm(
        tmp_path: Path, tiny_tmpfs: Path, running: list[Controller]) -> None:
    config, state = checkout(tmp_path), tiny_tmpfs / "state"
    c = start(running, config, state, tmp_path / "1.log").wait_up()
    assert c.metric("anycast_controller_persistence_ok") == 1.0
    filler = tiny_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the disk to the last byte
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    # The journal's last page may still have room for a line or two (those writes are real):
    # toggle the drain until an append needs a page the disk does not have.
    drained = False
    for _ in range(1000):
        status, body = c.request("DELETE" if drained else "POST", "/v1/drains/sin")
        if status != 200:
            break
        drained = not drained
    assert status == 503 and "No space left on device" in body["error"], body
    assert (c.drained()["sin"] is not None) == drained  # refused, not acknowledged: unchanged
    st = c.status()["persistence"]
    assert not st["ok"] and st["errors"]["append"] >= 1 and "No space left" in st["last_error"]
    assert c.metric("anycast_controller_persistence_ok") == 0.0
    assert "PERSISTENCE FAILING" in ctl_status(c).stdout
    filler.unlink()
    assert c.request("DELETE" if drained else "POST", "/v1/drains/sin")[0] == 200
    drained = not drained
    assert c.status()["persistence"]["ok"] and c.metric("anycast_controller_persistence_ok") == 1.0
    c.stop()
    c = start(running, config, state, tmp_path / "2.log").wait_up()
    assert (c.drained()["sin"] is not None) == drained and c.status()["persistence"]["recovered_without"] == []


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a state directory, the same directory mounted read-only elsewhere)."""
    state, view = tmp_path / "state", tmp_path / "ro-state"
    state.mkdir()
    view.mkdir()
    subprocess.run(["mount", "--bind", str(state), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        yield state, view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=True)


def test_a_read_only_state_dir_serves_what_it_holds_and_refuses_drains(
        tmp_path: Path, read_only_view: tuple[Path, Path], running: list[Controller]) -> None:
    config = checkout(tmp_path)
    state, view = read_only_view
    c = start(running, config, state, tmp_path / "1.log").wait_up()
    assert c.request("POST", "/v1/drains/sin")[0] == 200
    c.stop()
    c = start(running, config, view, tmp_path / "2.log").wait_up()
    assert c.drained()["sin"] is not None
    st = c.status()["persistence"]
    assert not st["ok"] and "Read-only file system" in st["last_error"]
    status, body = c.request("DELETE", "/v1/drains/sin")
    assert status == 503 and "Read-only file system" in body["error"], body
    assert c.drained()["sin"] is not None
    assert c.metric("anycast_controller_persistence_ok") == 0.0


@pytest.mark.parametrize("inotify", [True, False])
def test_the_watcher_notices_an_edit_and_a_commit(tmp_path: Path, inotify: bool) -> None:
    config = checkout(tmp_path)
    watcher = Watcher(str(config), str(tmp_path / "state"), use_inotify=inotify)
    watcher.load()

    async def scenario() -> None:
        poke = asyncio.Event()
        task = asyncio.ensure_future(watcher.poke_on_change(poke))
        try:
            await asyncio.wait_for(poke.wait(), STARTUP)  # the first look, once the watch is set up
            poke.clear()
            assert not watcher.changed()
            edit(config, "vips.yaml", lambda v: v["vips"][1].__setitem__("publish", ["fra"]))
            await asyncio.wait_for(poke.wait(), STARTUP)
            assert watcher.changed() and watcher.load().vip("api-eu").publish == ("fra",)  # type: ignore[union-attr]
            assert not watcher.changed()  # nothing new until the next notification
            poke.clear()
            git(config, "commit", "-qam", "api-eu at fra only")
            await asyncio.wait_for(poke.wait(), STARTUP)
            assert watcher.changed()  # the same files, a new commit
            assert watcher.notifier == ("inotify" if inotify else "stat-polling")
        finally:
            task.cancel()
            watcher.close()

    asyncio.run(scenario())


def test_a_taken_listen_port_exits_69_naming_it_and_leaves_the_state_dir_free(tmp_path: Path,
                                                                              running: list[Controller]) -> None:
    config, state = checkout(tmp_path), tmp_path / "state"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([str(BIN / "anycast-controller"), "--config-dir", str(config), "--state-dir", str(state),
                            "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=STARTUP)
    assert r.returncode == Exit.UNAVAILABLE == 69
    assert f"cannot listen on 127.0.0.1:{port} (listen)" in r.stderr and "Traceback" not in r.stderr
    c = start(running, config, state, tmp_path / "next.log").wait_up()  # the state dir was let go
    assert c.status()["pops"]


POP_TOKENS = {p: (EXAMPLE / "lab-tokens" / f"{p}.token").read_text().strip() for p in ("sjc", "fra", "sin")}


def test_a_restart_presumes_each_origins_verdict_of_a_steered_vip_and_moves_no_traffic(
        tmp_path: Path, running: list[Controller]) -> None:
    """game-global with fra preferring eu-central, split 1:1 with us-west (min_down_pops 1).
    sjc sees us-west down, fra and sin see both up: us-west is up (1 of 3). The controller is
    stopped and started again while the reports are fresh (report_stale_after 300 s here, so a
    slow start on a loaded machine still presumes them): before any POP reports again, fra's
    split and sin's origin are what they were. (With one verdict presumed per POP, us-west is
    1 down of 2 and down: fra's first plan after the restart lost us-west's share.)"""
    config, state = checkout(tmp_path), tmp_path / "state"

    def steer(v: Any) -> None:
        game = next(x for x in v["vips"] if x["name"] == "game-global")
        game["steering"] = {"preference": [{"pops": ["fra"], "origins": ["eu-central", "us-west"],
                                            "weights": {"eu-central": 1, "us-west": 1}}]}

    def policy(c: Any) -> None:
        c["policy"]["failover"]["min_down_pops"] = 1
        c["policy"]["safety"]["report_stale_after"] = 300

    edit(config, "vips.yaml", steer)
    edit(config, "controller.yaml", policy)
    git(config, "commit", "-qam", "steer fra")

    def where(c: Controller) -> dict[str, tuple[str, list[list[Any]]]]:
        pops = c.request("GET", "/v1/explain/game-global")[1]["pops"]
        return {p["pop"]: (p["active_origin"], p["weights"]) for p in pops if p["pop"] in ("fra", "sin")}

    first = start(running, config, state, tmp_path / "1.log").wait_up()
    for pop, usw in (("fra", True), ("sin", True), ("sjc", False)):  # (sjc's alone first: us-west 1 of 1 down)
        body = {"plan_generation": 1, "seq": 1, "origins": {"game-global": {"us-west": usw, "eu-central": True}},
                "announced": {"game-global": True}}
        status, answer = first.request("POST", f"/v1/reports/{pop}", json.dumps(body).encode(), POP_TOKENS[pop])
        assert status == 200, answer
    before = where(first)
    assert before == {"fra": ("eu-central", [["eu-central", 1], ["us-west", 1]]), "sin": ("us-west", [])}
    first.stop()

    second = start(running, config, state, tmp_path / "2.log").wait_up()
    ages = {p["pop"]: p["report_age"] for p in second.status()["pops"]}
    assert all(ages[p] is not None for p in ("sjc", "fra", "sin")), ages  # presumed (none has reported since)
    assert where(second) == before
