"""The controller at rest (results 3ad): the config watch wakes nothing while nothing changes
(inotify's descriptor on the event loop, no polling thread), yet sees what it must: a file
in a directory made after the watch began, a git ref; not a hidden directory's file. And the
loop-lag sampler is stopped when serve() fails after starting it (review L3)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import yaml

from controller.server import daemon
from controller.server.daemon import Watcher
from controller.server.inotify import Inotify
from controller.server.looplag import LoopLag
from tests.helpers.controller_process import committed_example, free_ports, git
from tests.helpers.waiting import check, until


def test_the_inotify_watch_runs_no_thread_and_sees_new_directories_and_refs(tmp_path: Path) -> None:
    """watchfiles' awatch ran its Rust loop in a worker thread that slept 10 ms and took the
    GIL after each sleep: 100 wake-ups a second of an idle controller. The watch now adds no
    thread, and what it must notice it notices: a YAML file in a directory created after the
    watch began (the directory is watched at once), a branch ref; a file in a hidden
    directory pokes nothing."""
    d = committed_example(tmp_path)
    watcher = Watcher(str(d), str(tmp_path / "state"))
    watcher.load()

    async def scenario() -> None:
        poke = asyncio.Event()
        threads = threading.active_count()
        watching = asyncio.ensure_future(watcher.poke_on_change(poke))
        try:
            await until(lambda: watcher.notifier == "inotify" and poke.is_set(), "the watch set up")
            for _ in range(20):  # (turns of the loop with the watch running)
                await asyncio.sleep(0)
            assert threading.active_count() == threads, [t.name for t in threading.enumerate()]
            poke.clear()
            (d / ".hidden").mkdir()
            (d / ".hidden" / "x.yaml").write_text("a: 1\n")
            (d / "more" / "deeper").mkdir(parents=True)
            (d / "more" / "deeper" / "new.yaml").write_text("vips: []\n")
            await until(poke.is_set, "a YAML file in a new directory poked the watch")
            poke.clear()
            watcher._dirty = False
            git(d, "branch", "other")  # (refs/heads/other: relevant)
            await until(poke.is_set, "a new branch ref poked the watch")
            assert watcher._dirty
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    check(scenario)


def test_inotify_reports_the_files_of_a_directory_moved_in_and_skips_pruned_ones(tmp_path: Path) -> None:
    """A directory moved into a watched tree is watched, and the files already in it are
    reported as added (they were there before its watch); a pruned directory is not watched."""
    top = tmp_path / "top"
    (top / ".git").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "a.yaml").write_text("x")
    ino = Inotify()
    try:
        ino.add(str(top), prune=lambda p: Path(p).name.startswith("."))
        (top / ".git" / "HEAD").write_text("ref")
        outside.rename(top / "moved")
        changes = ino.read()
        paths = {p for _, p in changes}
        assert str(top / "moved") in paths and str(top / "moved" / "sub" / "a.yaml") in paths
        assert not any(".git" in p for p in paths)
        (top / "moved" / "sub" / "b.yaml").write_text("y")  # (the moved-in tree is watched now)
        assert str(top / "moved" / "sub" / "b.yaml") in {p for _, p in ino.read()}
    finally:
        ino.close()


def test_serve_stops_the_loop_lag_sampler_when_it_fails_after_starting_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Review L3: the sampler was started before serve()'s try block, so a failure between
    the two (here the heap freeze) left its timer running on the loop for good."""
    d = committed_example(tmp_path)
    conf = yaml.safe_load((d / "controller.yaml").read_text())
    conf["api"].pop("tls", None)
    conf["state_dir"] = str(tmp_path / "state")
    conf["listen"], conf["metrics_listen"] = "127.0.0.1:9800", "127.0.0.1:9801"  # (the ports given to serve())
    (d / "controller.yaml").write_text(yaml.safe_dump(conf))
    samplers: list[LoopLag] = []

    class Recorded(LoopLag):
        def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
            samplers.append(self)
            super().start(loop)

    def broken_freeze() -> None:
        raise RuntimeError("freeze failed")
    monkeypatch.setattr(daemon, "LoopLag", Recorded)
    monkeypatch.setattr(daemon, "_freeze_heap", broken_freeze)
    monkeypatch.setattr(daemon, "LOOP_LAG_EVERY", 0.05)
    port, mport = free_ports(2)

    async def no_watch(self: Watcher, poke: asyncio.Event) -> None:
        await asyncio.Event().wait()
    monkeypatch.setattr(Watcher, "poke_on_change", no_watch)
    watcher = Watcher(str(d), str(tmp_path / "state"))

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="freeze failed"):
            await daemon.serve(watcher, ("127.0.0.1", port), ("127.0.0.1", mport))
        running = [s for s in samplers if s._handle is not None and not s._handle.cancelled()]
        assert not running, "the loop-lag sampler still runs after serve() failed"
    check(scenario)
