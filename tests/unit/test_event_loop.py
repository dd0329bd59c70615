"""The agent's event loop: asyncio's own, or uvloop when asked for and installed."""

from __future__ import annotations

import asyncio
import importlib
import types
from pathlib import Path

import pytest

from controller.cli import event_loop


def test_asyncio_by_default_and_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.loop_factory() == ("asyncio", None)
    assert event_loop.loop_factory("asyncio") == ("asyncio", None)
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.loop_factory() == ("asyncio", None)


def test_uvloop_when_asked_and_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(new_event_loop=asyncio.new_event_loop)
    monkeypatch.setattr(importlib, "import_module", lambda name: fake if name == "uvloop" else None)
    monkeypatch.setenv(event_loop.ENV, "uvloop")
    assert event_loop.loop_factory() == ("uvloop", asyncio.new_event_loop)
    monkeypatch.delenv(event_loop.ENV)
    assert event_loop.loop_factory("uvloop") == ("uvloop", asyncio.new_event_loop)


def test_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> object:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setenv(event_loop.ENV, "uvloop")
    monkeypatch.setattr(importlib, "import_module", missing)
    assert event_loop.loop_factory() == ("asyncio", None)
    assert event_loop.loop_factory("uvloop") == ("asyncio", None)

    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert event_loop.run(main()).startswith("asyncio")


def test_an_unknown_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "trio")
    with pytest.raises(ValueError, match="ANYCAST_EVENT_LOOP must be one of asyncio, uvloop, got 'trio'"):
        event_loop.loop_factory()


def test_run_returns_the_coroutines_result_on_either_loop() -> None:
    async def main() -> int:
        await asyncio.sleep(0)
        return 42

    assert event_loop.run(main(), "asyncio") == 42
    assert event_loop.run(main(), "uvloop") == 42  # uvloop, or asyncio where it is not installed


def test_the_agent_refuses_to_start_on_an_unknown_loop_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``anycast-agent launch`` (and ``run``) with a bad ANYCAST_EVENT_LOOP exits 2 naming the
    variable, before ExaBGP or the agent starts: no traceback, no respawn loop."""
    from controller.cli import agent_main

    config = str(Path(__file__).resolve().parents[2] / "configs" / "agent-sjc.yaml")
    started: list[str] = []
    monkeypatch.setattr(agent_main, "_launch", lambda *a: started.append("launch") or 0)
    monkeypatch.setattr(event_loop, "run", lambda *a, **k: started.append("run") or 0)
    monkeypatch.setenv(event_loop.ENV, "trio")
    for command in ("launch", "run"):
        assert agent_main.main([command, "--config", config]) == 2
        assert "ANYCAST_EVENT_LOOP must be one of asyncio, uvloop, got 'trio'" in capsys.readouterr().err
    assert started == []
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert agent_main.main(["launch", "--config", config]) == 0
    assert started == ["launch"]
