"""Real etcd members for tests and the lab: Debian's etcd-server, each in its own data
directory, on loopback (or inside a lab node, through ``prefix``), stopped by PID.

    with etcd_cluster(tmp_path, 3) as members:      # three members, each healthy
        members[0].kill()                           # SIGKILL, by PID
        members[0].start()                          # back, same data
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

ETCD = "/usr/bin/etcd"
START_GUARD = 120.0  # s: a member that is not healthy by then failed to start (never a slow one)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free a moment ago (a member that loses the race is started again)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Node(Protocol):
    """A lab node (lab.netns.Netns): processes started and killed inside it."""

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]: ...

    def terminate(self, pid: int, grace: float = ..., sig: int = ...) -> bool: ...


@dataclass(frozen=True)
class Tls:
    """PEM files: the CA, and a certificate + key it signed for 127.0.0.1 (server and client)."""

    ca: str
    cert: str
    key: str


def make_tls(directory: str) -> Tls:
    """A throw-away CA and one certificate for 127.0.0.1 usable by etcd and its clients."""
    d = directory
    os.makedirs(d, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem",
            "-days", "2", "-subj", "/CN=anycast-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/etcd.key", "-out", f"{d}/etcd.csr",
            "-subj", "/CN=127.0.0.1")
    with open(f"{d}/ext.cnf", "w", encoding="utf-8") as f:
        f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", f"{d}/etcd.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
            "-CAcreateserial", "-out", f"{d}/etcd.pem", "-days", "2", "-extfile", f"{d}/ext.cnf")
    return Tls(f"{d}/ca.pem", f"{d}/etcd.pem", f"{d}/etcd.key")


@dataclass
class EtcdMember:
    name: str
    data_dir: str
    client_url: str
    peer_url: str
    initial_cluster: str
    prefix: Sequence[str] = ()  # e.g. nsenter into a lab node
    extra: Sequence[str] = ()  # more etcd flags (TLS)
    log_path: str = ""
    node: Node | None = None  # None: on this host
    election_ms: int = 1000  # etcd's --election-timeout (its heartbeat is 100 ms)
    tls: Tls | None = None  # client TLS with client certificates required (client_url is https)
    proc: subprocess.Popen[Any] | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        return [*self.prefix, ETCD, "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", "anycast-test", "--heartbeat-interval", "100",
                "--election-timeout", str(self.election_ms), "--logger", "zap", "--log-outputs", "stderr",
                *(() if self.tls is None else ("--cert-file", self.tls.cert, "--key-file", self.tls.key,
                                               "--trusted-ca-file", self.tls.ca, "--client-cert-auth")), *self.extra]

    def start(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        self.log_path = self.log_path or os.path.join(os.path.dirname(self.data_dir), f"{self.name}.log")
        log = open(self.log_path, "ab")
        if self.node is not None:
            self.proc = self.node.popen(self.command(), stdout=log, stderr=log)
        else:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.cert, self.tls.key)
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1, context=context) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        """SIGKILL by PID, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            if self.node is not None:
                self.node.terminate(self.proc.pid, 0.0, signal.SIGKILL)
            else:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""


def members(base: str, n: int, host: str = "127.0.0.1", tls: Tls | None = None) -> list[EtcdMember]:
    ports = free_ports(2 * n, host)
    names = [f"etcd{i}" for i in range(n)]
    peers = [f"http://{host}:{ports[2 * i + 1]}" for i in range(n)]
    cluster = ",".join(f"{name}={peer}" for name, peer in zip(names, peers))
    scheme = "http" if tls is None else "https"
    return [EtcdMember(name, os.path.join(base, name, "data"), f"{scheme}://{host}:{ports[2 * i]}", peers[i],
                       cluster, tls=tls) for i, name in enumerate(names)]


def wait_healthy(ms: Sequence[EtcdMember], guard: float = START_GUARD) -> bool:
    """Until every member is healthy (True), one exited (False) or ``guard`` passed (False)."""
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        if any(not m.alive() for m in ms):
            return False
        if all(m.healthy() for m in ms):
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def etcd_cluster(base: str, n: int = 1, attempts: int = 3, tls: Tls | None = None) -> Iterator[list[EtcdMember]]:
    """``n`` healthy members on loopback, killed by PID at the end, pass or fail. A member
    that exits at start (a port taken between choosing and binding it) is tried again on
    new ports."""
    ms: list[EtcdMember] = []
    try:
        for attempt in range(attempts):
            ms = members(os.path.join(base, f"try{attempt}"), n, tls=tls)
            for m in ms:
                os.makedirs(os.path.dirname(m.data_dir), exist_ok=True)
                m.start()
            if wait_healthy(ms):
                break
            tails = "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in ms)
            for m in ms:
                m.kill()
            if attempt == attempts - 1:
                raise RuntimeError(f"etcd did not start:\n{tails}")
        yield ms
    finally:
        for m in ms:
            m.kill()
