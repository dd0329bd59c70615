"""One real anycast-controller process on loopback, for the integration tests.

A port found free can be taken by someone else before the controller binds it (two sockets bound
at the same moment on a busy machine: seen in CI's overloaded run). The controller then exits with
``Exit.UNAVAILABLE`` and nothing served or changed, so the process is started again on new ports;
any other exit is the test's business (``exited()`` tells).

TLS is on by default, as in production: ``tls_on(config_dir)`` points controller.yaml's
``api.tls`` at a certificate for 127.0.0.1 from one throwaway CA made once per test session
(``session_ca()``), and a ControllerProcess on such a config speaks https:// and verifies it. Tests
of plain HTTP set ``api.insecure_plain_http`` (or listen on loopback without api.tls) themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from controller.cli.conventions import Exit
from lab import host_process
from lab.tls import LabCa, Pair
from lab.poll import wait_for
from tests.helpers.config_dirs import EXAMPLE

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


def committed_example(tmp_path: Path) -> Path:
    """The example controller config copied to ``tmp_path/desired``, a git checkout with it
    committed on ``main``."""
    d = tmp_path / "desired"
    shutil.copytree(EXAMPLE, d)
    git(d, "init", "-q", "-b", "main")
    git(d, "add", "-A")
    git(d, "commit", "-qm", "A")
    return d


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


_SESSION: list[tuple[LabCa, Pair]] = []


def session_ca() -> tuple[LabCa, Pair]:
    """The session's throwaway CA and its server certificate for 127.0.0.1 (made once)."""
    if not _SESSION:
        ca = LabCa(Path(tempfile.mkdtemp(prefix="anycast-test-ca-")), "anycast test CA")
        _SESSION.append((ca, ca.server("test-controller")))
    return _SESSION[0]


def tls_on(config_dir: Path) -> None:
    """controller.yaml's api.tls: the session CA's server pair (the other api keys kept)."""
    _, pair = session_ca()
    path = config_dir / "controller.yaml"
    data = yaml.safe_load(path.read_text())
    data.setdefault("api", {})["tls"] = {"cert": str(pair.cert), "key": str(pair.key)}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def client_ssl() -> ssl.SSLContext:
    """A client context trusting the session CA (urllib, aiohttp and the agent's PlanClient)."""
    return ssl.create_default_context(cafile=str(session_ca()[0].ca))


def _serves_test_tls(config_dir: Path) -> bool:
    try:
        api = (yaml.safe_load((config_dir / "controller.yaml").read_text()) or {}).get("api") or {}
    except OSError:
        return False
    return isinstance(api, dict) and isinstance(api.get("tls"), dict) and \
        api["tls"].get("cert") == str(session_ca()[1].cert)


class ControllerProcess:
    """anycast-controller on ``config`` and ``state``, logging to ``log``, asked with ``token``.

    Started by the constructor: it returns once the controller answers or has exited (for a reason
    other than a taken port). ``preexec`` runs in the child before it starts (e.g. resource limits);
    once ``ssl`` is set (trusting the controller's CA), the URL is https:// and requests verify it:
    set at once for a config made by ``tls_on``."""

    def __init__(self, config: Path, state: Path, log: Path, token: str,
                 preexec: Callable[[], None] | None = None) -> None:
        self.config, self.state, self.log, self.token, self.preexec = config, state, log, token, preexec
        self.ssl: ssl.SSLContext | None = client_ssl() if _serves_test_tls(config) else None
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

    def env(self) -> dict[str, str]:
        """The environment for anycastctl against this controller (its CA trusted when https)."""
        return {**os.environ, "ANYCAST_CONTROLLER_URL": self.url,
                **({"SSL_CERT_FILE": str(session_ca()[0].ca)} if self.ssl is not None else {})}

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
