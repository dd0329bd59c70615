"""One real anycast-controller process on loopback, for the integration tests.

A port found free can be taken by someone else before the controller binds it (two sockets bound
at the same moment on a busy machine: seen in CI's overloaded run). The controller then exits with
``Exit.UNAVAILABLE`` and nothing served or changed, so the process is started again on new ports;
any other exit is the test's business (``exited()`` tells).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from controller.cli.conventions import Exit
from lab import host_process
from lab.poll import wait_for

BIN = Path(sys.executable).parent
STARTUP = 120.0  # a hang guard for a loaded machine: the wait ends as soon as the controller answers
ATTEMPTS = 3
OWN_TOKEN = "\0own"  # request(): the process's own token (None: no Authorization header at all)


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (held open together, so never the same one twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def git(d: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(d), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}).stdout.strip()


class GitConfig:
    """A controller's config directory ``dir`` that is a git checkout: edits and commits."""

    dir: Path

    def edit(self, name: str, change: Callable[[Any], None]) -> None:
        """Change the YAML file ``name`` in place (``change`` edits the parsed document)."""
        data = yaml.safe_load((self.dir / name).read_text())
        change(data)
        (self.dir / name).write_text(yaml.safe_dump(data))

    def commit(self, message: str) -> str:
        """Commit every change; the revision, as the controller names a clean checkout."""
        git(self.dir, "commit", "-qam", message)
        return git(self.dir, "rev-parse", "HEAD")[:12]


class ControllerProcess:
    """anycast-controller on ``config`` and ``state``, logging to ``log``, asked with ``token``.

    Started by the constructor: it returns once the controller answers or has exited (for a reason
    other than a taken port). ``preexec`` runs in the child before it starts (e.g. resource limits);
    once ``ssl`` is set (trusting the controller's CA), the URL is https:// and requests verify it."""

    def __init__(self, config: Path, state: Path, log: Path, token: str,
                 preexec: Callable[[], None] | None = None) -> None:
        self.config, self.state, self.log, self.token, self.preexec = config, state, log, token, preexec
        self.ssl: ssl.SSLContext | None = None
        self.port, self.metrics_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(ATTEMPTS):
            if attempt:
                self.port, self.metrics_port = free_ports(2)
            self.start()
            if self.proc is None or self.proc.returncode != Exit.UNAVAILABLE:
                break

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start on the current ports; wait until it answers or exits."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "anycast-controller"), "--config-dir", str(self.config), "--state-dir", str(self.state),
                 "--listen", f"127.0.0.1:{self.port}", "--metrics-listen", f"127.0.0.1:{self.metrics_port}"],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=self.preexec)
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or self.up(), STARTUP, 0.1, desc="controller answering (or exiting)")

    def exited(self) -> int | None:
        """The exit code, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def must_be_up(self) -> None:
        """Fail the test with the controller's log if it is not running."""
        if self.exited() is not None:
            raise AssertionError(f"the controller exited with {self.exited()}:\n"
                                 + self.log.read_bytes().decode(errors="replace")[-3000:])

    def up(self) -> bool:
        try:
            self.request("GET", "/v1/status")
            return True
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = OWN_TOKEN,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {self.token if token == OWN_TOKEN else token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ssl) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        if self.proc is not None:
            host_process.stop(self.proc)
