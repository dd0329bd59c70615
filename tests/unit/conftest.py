"""The unit layer is pure: no subprocess, no network socket. A test that needs a real tool
(ExaBGP, promtool, git, systemd-analyze) or a real server belongs in tests/integration.

The guard below makes that a rule rather than a habit: spawning a process or opening an
IP socket from a unit test fails it, naming what it tried. Unix-domain sockets stay
allowed (asyncio's own self-pipe is one, and the sd_notify fake is a local datagram socket).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class ImpureUnitTest(AssertionError):
    """A unit test reached for the outside world."""


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise ImpureUnitTest(f"tests/unit must stay pure, but this test tried {what}: "
                             "move it to tests/integration")

    return refused


_real_socket_init = socket.socket.__init__


def _guarded_socket_init(self: socket.socket, family: int = -1, *args: Any, **kwargs: Any) -> None:
    if family in (socket.AF_INET, socket.AF_INET6) or (family == -1 and not kwargs.get("fileno")):
        raise ImpureUnitTest("tests/unit must stay pure, but this test opened an IP socket: "
                             "move it to tests/integration")
    _real_socket_init(self, family, *args, **kwargs)


@pytest.fixture(autouse=True)
def _pure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("to start a process (subprocess)"))
    monkeypatch.setattr(os, "fork", _refuse("to fork"))
    monkeypatch.setattr(os, "posix_spawn", _refuse("to spawn a process"))
    monkeypatch.setattr(os, "posix_spawnp", _refuse("to spawn a process"))
    monkeypatch.setattr(socket.socket, "__init__", _guarded_socket_init)
    yield
