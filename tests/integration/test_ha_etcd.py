"""HA on a real etcd (Debian's etcd-server, started here on loopback in a temporary
directory, killed by PID): fencing, failover, restart continuity, agents following the
leader, and bad input (etcd unreachable, wrong endpoints, TLS mismatch, incompatible layout).

Loopback only: no lab lock needed. Waits are hang guards (lab.poll.wait_for with
HANG_GUARD), never timing assertions, except where the issue asks for a measured bound
(a follower leads within lease TTL + 1 s of the leader's lease ending).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from controller.agent.plan_client import PlanClient
from controller.config.desired import load_desired
from controller.config.desired_model import HaSettings, StoreKind
from controller.policy.model import VipMemory
from controller.server import store
from controller.server.etcd import Etcd, EtcdStore, EtcdUnavailable, Fenced, Leadership, check_layout, margin
from lab.etcd import EtcdMember, etcd_cluster, free_ports, make_tls
from lab.poll import wait_for
from tests.helpers.controller_process import client_ssl, session_ca, tls_on
from tests.helpers.http import request

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "controller"
TOKENS = {p: (EXAMPLE / "lab-tokens" / f"{p}.token").read_text().strip() for p in ("sjc", "fra", "sin", "operator")}
BIN = Path(sys.executable).parent
ALLOWED = load_desired(str(EXAMPLE)).allowed_prefixes
CA_FILE = str(session_ca()[0].ca)
HANG_GUARD = 120.0
TTL = 2


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdMember]:
    with etcd_cluster(str(tmp_path / "etcd"), 1) as ms:
        yield ms[0]


def settings(*endpoints: str, ttl: int = TTL, **kw: Any) -> HaSettings:
    return HaSettings(StoreKind.ETCD, tuple(endpoints), lease_ttl=ttl, **kw)


def leading(*ls: Leadership) -> Leadership:
    return wait_for(lambda: next((x for x in ls if x.acting()), None), HANG_GUARD, desc="a leader")


def started(s: HaSettings, name: str) -> tuple[Leadership, EtcdStore, int]:
    """A controller ``name`` that leads, its store started: (leadership, store, sequence)."""
    lead = Leadership(s, name, f"http://{name}")
    lead.start()
    leading(lead)
    st = EtcdStore(lead)
    loaded = st.load()
    st.start(loaded.state, loaded.seq)
    return lead, st, loaded.seq


def desired_dir(tmp: Path, endpoints: list[str], **ha: Any) -> Path:
    d = tmp / "desired"
    if not d.exists():
        shutil.copytree(EXAMPLE, d)
    data = yaml.safe_load((d / "controller.yaml").read_text())
    data["policy"]["drain"]["drain_time"] = 1.5
    data["ha"] = {"store": "etcd", "endpoints": endpoints, "lease_ttl": TTL, "request_timeout": 0.5, **ha}
    (d / "controller.yaml").write_text(yaml.safe_dump(data))
    tls_on(d)
    return d


class Ctl:
    """One anycast-controller process in HA mode on loopback."""

    def __init__(self, tmp: Path, name: str, config: Path) -> None:
        self.name, self.config, self.tmp = name, config, tmp
        self.port, self.metrics_port = free_ports(2)
        self.url = f"https://127.0.0.1:{self.port}"  # (tls_on: the session CA's certificate)
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Ctl:
        self.proc = subprocess.Popen(
            [str(BIN / "anycast-controller"), "--config-dir", str(self.config), "--state-dir",
             str(self.tmp / f"state-{self.name}"), "--listen", f"127.0.0.1:{self.port}", "--metrics-listen",
             f"127.0.0.1:{self.metrics_port}", "--name", self.name, "--advertise-url", self.url],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc is not None and (self.proc.poll() is not None or self.status() is not None),
                 HANG_GUARD, desc=f"{self.name} answering")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def request(self, method: str, path: str, token: str = TOKENS["operator"]) -> tuple[int, dict[str, Any]]:
        return request(self.url + path, method, token, timeout=10)

    def status(self) -> dict[str, Any] | None:
        try:
            code, body = self.request("GET", "/v1/status")
        except OSError:
            return None
        return body if code == 200 else None

    def role(self) -> str | None:
        s = self.status()
        return s["ha"]["role"] if s else None

    def metric(self, name: str) -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def leading_and_kept(tmp: Path, etcd: EtcdMember, ctls: list[Ctl], config: Path) -> tuple[Ctl, str]:
    """c1 on ``config``, leading, its revision kept in etcd as the applied one: (c1, revision)."""
    c1 = Ctl(tmp, "c1", config).start()
    ctls.append(c1)
    wait_for(lambda: c1.role() == "leader", HANG_GUARD, desc="c1 leads")
    revision = str(c1.status()["config"]["revision"])  # type: ignore[index]
    e = Etcd(settings(etcd.client_url))
    wait_for(lambda: (kv := e.get("desired")) is not None and json.loads(kv.value)["revision"] == revision,
             HANG_GUARD, desc="the applied desired state kept in etcd")
    return c1, revision


@pytest.fixture
def ctls() -> Iterator[list[Ctl]]:
    started: list[Ctl] = []
    yield started
    for c in started:
        c.kill()


# --- the store and leadership, in process ---------------------------------------------------
def test_a_deposed_leader_cannot_write_and_stops_acting_before_its_lease_ends(etcd: EtcdMember) -> None:
    s = settings(etcd.client_url)
    a, st, seq0 = started(s, "a")
    b = Leadership(s, "b", "http://b")
    b.start()
    seq = st.append(store.Changes(drains={"sjc": 100.0}), seq0)

    # Partition a from etcd: its thread stops (no keep-alives), and it still believes it
    # leads until its own deadline, which comes before its lease can end at etcd.
    a._stop.set()
    deadline = a.valid_until
    wait_for(lambda: not a.acting(), HANG_GUARD, desc="a stops acting on its own")
    stopped = time.monotonic()
    new = leading(b)
    took_over = time.monotonic()
    assert new is b
    assert stopped < took_over  # never two acting at once
    # b leads within TTL + 1 s of a's lease ending (the lease ends TTL after the last keep-alive
    # was sent at the latest, i.e. at deadline + margin).
    assert took_over - (deadline + margin(TTL)) < TTL + 1.0

    # a, believing again that it leads (a stale process), is fenced by etcd: nothing written.
    a.leader_revision, a.valid_until = a.leader_revision or 1, time.monotonic() + 100
    before = Etcd(s).get_prefix("state/")
    with pytest.raises(Fenced):
        st.append(store.Changes(drains={"fra": 200.0}), seq)
    assert Etcd(s).get_prefix("state/") == before
    assert not a.acting()  # the refused write deposed it

    # b resumes what a wrote, with generations numbered past a's.
    got = EtcdStore(b).load()
    assert got.state.drains == {"sjc": 100.0} and got.seq == seq
    b.stop()


def test_generations_never_go_back_across_leaders(etcd: EtcdMember) -> None:
    s = settings(etcd.client_url)
    a, st, seq = started(s, "a")
    st.append(store.Changes(generations={"sjc": 7}), seq)
    a.stop()  # resigns: the next leads at once
    b = Leadership(s, "b", "http://b")
    b.start()
    leading(b)
    assert EtcdStore(b).load().state.generations["sjc"] > 7
    b.stop()


def test_the_steering_state_survives_a_change_of_leader(etcd: EtcdMember) -> None:
    """The operator's dials and the planner's steering memory (per-preference active origins,
    weighted origins held out) go through etcd as through the file journal: in the journal
    and in the snapshot."""
    s = settings(etcd.client_url)
    a, st, seq = started(s, "a")
    memory = VipMemory("us-west", 10.0, {"us-west": 1.0}, (), {"eu-central,us-west": ("eu-central", 12.0)},
                       frozenset({"us-west"}))
    dial = store.Dial(25, "alice", "canary, ticket 123", 20.0)
    seq = st.append(store.Changes(vips={"game-global": memory}, dials={"eu-central": dial, "us-west": store.Dial(
        0, "bob", "maintenance", 21.0)}), seq)
    seq = st.append(store.Changes(dials={"us-west": None}), seq)  # handed back to the config
    a.stop()
    b, st_b, _ = started(s, "b")  # loads the journal, then writes it as a snapshot (start)
    got = EtcdStore(b).load().state
    assert got.dials == {"eu-central": dial}
    assert got.planner.vips["game-global"] == memory
    b.stop()


# --- controllers as processes ------------------------------------------------------------------
def test_failover_keeps_the_drain_and_agents_follow_the_new_leader(tmp_path: Path, etcd: EtcdMember,
                                                                    ctls: list[Ctl]) -> None:
    config = desired_dir(tmp_path, [etcd.client_url])
    ctls += [Ctl(tmp_path, n, config).start() for n in ("c1", "c2", "c3")]
    leader = wait_for(lambda: next((c for c in ctls if c.role() == "leader"), None), HANG_GUARD, desc="a leader")
    followers = [c for c in ctls if c is not leader]
    status = followers[0].status()
    assert status is not None and status["ha"]["leader"]["name"] == leader.name
    wait_for(lambda: {m["name"] for m in (followers[0].status() or {"ha": {"members": []}})["ha"]["members"]}
             == {"c1", "c2", "c3"}, HANG_GUARD, desc="members listed")
    # A follower refuses writes and names the leader.
    code, body = followers[0].request("POST", "/v1/drains/fra")
    assert code == 503 and body["leader"] == leader.url
    assert leader.metric("anycast_controller_leader") == 1.0
    assert followers[0].metric("anycast_controller_leader") == 0.0

    # anycastctl status on a follower: who leads, the members, etcd's health.
    run = subprocess.run([str(BIN / "anycastctl"), "status", "--json", "--url", followers[0].url],
                         capture_output=True, text=True, timeout=HANG_GUARD,
                         env={**os.environ, "ANYCAST_OPERATOR_TOKEN": TOKENS["operator"], "SSL_CERT_FILE": CA_FILE})
    assert run.returncode == 0, run.stderr
    ha = json.loads(run.stdout)["ha"]
    assert ha["role"] == "follower" and ha["leader"]["url"] == leader.url
    assert ha["endpoints"][etcd.client_url]["ok"] is True
    human = subprocess.run([str(BIN / "anycastctl"), "status", "--url", followers[0].url], capture_output=True,
                           text=True, timeout=HANG_GUARD, env={**os.environ, "ANYCAST_OPERATOR_TOKEN": TOKENS["operator"], "SSL_CERT_FILE": CA_FILE})
    assert human.returncode == 0, human.stderr

    code, body = leader.request("POST", "/v1/drains/fra")
    assert code == 200 and body["drained"] is True

    # An agent listing every controller, the leader last, reaches the leader and gets its plan.
    client = PlanClient([c.url for c in followers] + [leader.url], "fra", TOKENS["fra"], str(tmp_path / "agent"),
                        ALLOWED, timeout=2, tls=client_ssl())

    async def fetch(after: int = -1) -> int:
        plan = await client.fetch_plan(after, 0)
        assert plan is not None
        return plan.generation

    async def scenario() -> None:
        first = await fetch()
        assert client.url == leader.url
        drained_at = leader.status()["pops"]  # type: ignore[index]
        leader.kill()
        new = wait_for(lambda: next((c for c in followers if c.role() == "leader"), None), HANG_GUARD,
                       desc="a follower leads")
        s = new.status()
        assert s is not None
        fra = next(p for p in s["pops"] if p["pop"] == "fra")
        assert fra["drained_since"] == next(p for p in drained_at if p["pop"] == "fra")["drained_since"]
        second = await fetch(first)
        assert client.url == new.url and second > first
        await client.close()

    asyncio.run(scenario())


def _exchange(tls: ssl.SSLSocket, path: str, token: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request on ``tls`` (kept alive): (status, the raw head), or (0, b"") if the
    server had closed the connection."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            return 0, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), head


def _accepted_by(pid: int, raw: socket.socket) -> bool:
    """Whether process ``pid`` holds the server side of ``raw`` (``ss -p`` names a socket's
    process only once it has been accept()ed)."""
    port = raw.getsockname()[1]
    out = subprocess.run(["ss", "-tnpH", "state", "established", "dst", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout
    return f"pid={pid}," in out


def test_a_connection_accepted_by_a_follower_that_then_leads_is_not_kept_on_the_follower(
        tmp_path: Path, etcd: EtcdMember, ctls: list[Ctl]) -> None:
    """A connection accepted while a controller was a follower, whose TLS handshake ends after
    the follower's API made way for the leader's, is served by the follower's app (aiohttp
    closes a site's listener and its established connections, not one mid-handshake). Kept
    alive, it told an agent "not the leader" for minutes while the same process led (a lab
    run of ha3). The follower's refusal closes it: the agent's next request reaches the
    leader."""
    config = desired_dir(tmp_path, [etcd.client_url])
    ctls += [Ctl(tmp_path, n, config).start() for n in ("c1", "c2")]
    leader = wait_for(lambda: next((c for c in ctls if c.role() == "leader"), None), HANG_GUARD, desc="a leader")
    follower = next(c for c in ctls if c is not leader)
    raw = socket.create_connection(("127.0.0.1", follower.port), timeout=HANG_GUARD)  # no handshake yet
    try:
        # Accepted by the follower's process (not only queued by the kernel: a connection still
        # in the listen queue when the listener closes is reset, and this case never arises).
        assert follower.proc is not None
        wait_for(lambda: _accepted_by(follower.proc.pid if follower.proc else -1, raw), HANG_GUARD,
                 desc="the follower accepted the raw connection")
        leader.kill()
        wait_for(lambda: follower.role() == "leader", HANG_GUARD, desc="the follower leads")
        with client_ssl().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            answers = [_exchange(tls, "/v1/plans/fra", TOKENS["fra"]) for _ in range(2)]
    finally:
        raw.close()
    # Whatever app took the connection: never "not the leader" twice on it.
    assert answers[0][0] in (200, 503), answers
    if answers[0][0] == 503:
        assert b"connection: close" in answers[0][1].lower(), answers[0][1]
        assert answers[1][0] == 0, f"the connection answered 503 was kept: {answers[1]}"
    code, body = follower.request("GET", "/v1/plans/fra", token=TOKENS["fra"])  # a new connection
    assert code == 200 and body["pop"] == "fra"


def served_serial(c: Ctl) -> int:
    """The serial number of the certificate a new connection to ``c`` is shown."""
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as raw:
        with client_ssl().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_systemctl_reload_keeps_leader_and_follower_and_both_serve_a_renewed_certificate(
        tmp_path: Path, etcd: EtcdMember, ctls: list[Ctl]) -> None:
    """SIGHUP (the unit's ExecReload) in HA: the leader reloads as a lone controller does; a
    follower reloads its certificate too. Without a handler SIGHUP ended the process (and
    systemd's Restart=on-failure does not restart a SIGHUP death)."""
    config = desired_dir(tmp_path, [etcd.client_url])
    ca, pair = session_ca()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pair.cert, cert)
    shutil.copy(pair.key, key)
    data = yaml.safe_load((config / "controller.yaml").read_text())
    data["api"]["tls"] = {"cert": str(cert), "key": str(key)}
    (config / "controller.yaml").write_text(yaml.safe_dump(data))
    c1 = Ctl(tmp_path, "c1", config).start()
    ctls.append(c1)
    wait_for(lambda: c1.role() == "leader", HANG_GUARD, desc="c1 leads")
    c2 = Ctl(tmp_path, "c2", config).start()
    ctls.append(c2)
    wait_for(lambda: c2.role() == "follower", HANG_GUARD, desc="c2 follows")
    assert served_serial(c1) == served_serial(c2) == ca.serial(pair)

    renewed = ca.server(f"renewed-{os.getpid()}-{tmp_path.name}")
    shutil.copy(renewed.cert, cert)  # renewed in place, as certbot would
    shutil.copy(renewed.key, key)
    for c in (c1, c2):
        assert c.proc is not None
        c.proc.send_signal(signal.SIGHUP)
    def renewed_or_gone(c: Ctl) -> bool:
        if c.proc is None or c.proc.poll() is not None:
            return True  # asserted below
        try:
            return served_serial(c) == ca.serial(renewed)
        except OSError:
            return False

    for c in (c2, c1):
        wait_for(lambda c=c: renewed_or_gone(c), HANG_GUARD, desc=f"{c.name} serving the renewed certificate")
    assert c1.proc is not None and c2.proc is not None and c1.proc.poll() is None and c2.proc.poll() is None, \
        (c1.log.read_text()[-2000:], c2.log.read_text()[-2000:])
    assert (c1.role(), c2.role()) == ("leader", "follower")


def test_a_restarted_cluster_resumes_its_drains(tmp_path: Path, etcd: EtcdMember, ctls: list[Ctl]) -> None:
    config = desired_dir(tmp_path, [etcd.client_url])
    c1 = Ctl(tmp_path, "c1", config).start()
    ctls.append(c1)
    wait_for(lambda: c1.role() == "leader", HANG_GUARD, desc="c1 leads")
    assert c1.request("POST", "/v1/drains/sjc")[0] == 200
    drained = next(p["drained_since"] for p in c1.status()["pops"] if p["pop"] == "sjc")  # type: ignore[index]
    c1.stop()
    c2 = Ctl(tmp_path, "c2", config).start()
    ctls.append(c2)
    wait_for(lambda: c2.role() == "leader", HANG_GUARD, desc="c2 leads")
    s = c2.status()
    assert s is not None and next(p["drained_since"] for p in s["pops"] if p["pop"] == "sjc") == drained


def test_a_new_leader_on_a_fresh_host_continues_and_rolls_back_the_old_leaders_rollout(
        tmp_path: Path, etcd: EtcdMember, ctls: list[Ctl]) -> None:
    """c1 applies a revision, then a commit reordering game-global's origins starts rolling
    out in waves; c1 dies. c2, on another host (the same commit checked out, a state_dir that
    never kept anything), takes the applied base from etcd: it keeps the rollout c1 started
    (same waves, same bake start; fra, whose wave has not come, keeps the base's origin
    order) and, since no POP reports to pass the gate, rolls it back to that base, instead of
    applying the commit everywhere at once."""
    config = desired_dir(tmp_path, [etcd.client_url])
    controller_yaml = config / "controller.yaml"
    data = yaml.safe_load(controller_yaml.read_text())
    data["change"] = {"rollout": {"bake": 20}}
    controller_yaml.write_text(yaml.safe_dump(data))
    c1, base = leading_and_kept(tmp_path, etcd, ctls, config)
    vips = yaml.safe_load((config / "vips.yaml").read_text())
    game = next(v for v in vips["vips"] if v["name"] == "game-global")
    game["origins"].reverse()  # eu-central first: moves traffic, withdraws nothing
    (config / "vips.yaml").write_text(yaml.safe_dump(vips))

    def change_of(c: Ctl) -> dict[str, Any] | None:
        st = c.status()
        return st["change"] if st is not None else None

    rolling = wait_for(lambda: (ch := change_of(c1)) is not None and ch["phase"] == "rolling" and ch, HANG_GUARD,
                       desc="c1 rolls the reorder out")
    assert rolling["base"] == base and rolling["target"] != base and rolling["move"]
    c1.kill()
    other = tmp_path / "other-host"
    shutil.copytree(config, other)
    c2 = Ctl(tmp_path, "c2", other).start()
    ctls.append(c2)
    wait_for(lambda: c2.role() == "leader", HANG_GUARD, desc="c2 leads")
    taken = change_of(c2)
    assert taken is not None and taken["phase"] in ("rolling", "rolled_back"), taken
    assert (taken["base"], taken["target"], taken["applied_revision"]) == (base, rolling["target"], base)
    assert (taken["waves"], taken["wave_started"]) == (rolling["waves"], rolling["wave_started"])
    held = next(p for w in rolling["waves"][1:] for p in w)  # a POP whose wave has not come
    code, plan = c2.request("GET", f"/v1/plans/{held}", TOKENS[held])
    assert code == 200
    spec = next(v["spec"] for v in plan["vips"] if v["name"] == "game-global")
    assert spec["origins"][0]["region"] == "us-west"  # the base's order, as c1 served it
    back = wait_for(lambda: (ch := change_of(c2)) is not None and ch["phase"] == "rolled_back" and ch, HANG_GUARD,
                    desc="c2 rolls back the rollout c1 started")
    assert (back["base"], back["target"], back["applied_revision"]) == (base, rolling["target"], base)
    code, plan = c2.request("GET", f"/v1/plans/{rolling['waves'][0][0]}", TOKENS[rolling["waves"][0][0]])
    assert code == 200
    spec = next(v["spec"] for v in plan["vips"] if v["name"] == "game-global")
    assert spec["origins"][0]["region"] == "us-west"  # the first wave's POP is back on the base


# --- bad input ------------------------------------------------------------------------------------
def test_etcd_unreachable_at_start_waits_as_a_follower_and_says_where(tmp_path: Path, ctls: list[Ctl]) -> None:
    (nobody,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{nobody}"
    c = Ctl(tmp_path, "c1", desired_dir(tmp_path, [endpoint])).start()
    ctls.append(c)

    def error() -> str:
        s = c.status()
        return s["ha"]["endpoints"][endpoint]["error"] if s else ""
    wait_for(error, HANG_GUARD, desc="the endpoint's error in status")
    s = c.status()
    assert s is not None and s["ha"]["role"] == "follower" and s["ha"]["leader"] is None
    assert endpoint in s["ha"]["last_error"]
    assert c.request("GET", "/v1/plans/sjc", TOKENS["sjc"])[0] == 503
    assert c.metric("anycast_controller_etcd_up") == 0.0


def test_wrong_endpoint_is_named(tmp_path: Path, ctls: list[Ctl]) -> None:
    # Something that answers HTTP but is not etcd.
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        c = Ctl(tmp_path, "c1", desired_dir(tmp_path, [endpoint])).start()
        ctls.append(c)
        wait_for(lambda: (s := c.status()) and endpoint in s["ha"]["last_error"], HANG_GUARD,
                 desc="the wrong endpoint named")
        assert c.role() == "follower"
    finally:
        server.shutdown()


def test_tls_mismatch_is_named_and_changes_nothing(tmp_path: Path, etcd: EtcdMember, ctls: list[Ctl]) -> None:
    endpoint = etcd.client_url.replace("http://", "https://")
    ca = tmp_path / "ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "ca.key"),
                    "-out", str(ca), "-days", "1", "-subj", "/CN=test-ca"], check=True, capture_output=True)
    c = Ctl(tmp_path, "c1", desired_dir(tmp_path, [endpoint], tls={"ca_file": str(ca)})).start()
    ctls.append(c)
    wait_for(lambda: (s := c.status()) and "TLS" in s["ha"]["endpoints"][endpoint]["error"], HANG_GUARD,
             desc="a TLS error for the endpoint")
    assert c.role() == "follower"
    assert Etcd(settings(etcd.client_url)).get_prefix("") == []


def test_an_incompatible_layout_is_refused_and_left_alone(tmp_path: Path, etcd: EtcdMember) -> None:
    e = Etcd(settings(etcd.client_url))
    e.txn([], [e.put("layout", json.dumps({"layout": 99})), e.put("state/seq", "5")], "test")
    before = e.get_prefix("")
    config = desired_dir(tmp_path, [etcd.client_url])
    run = subprocess.run([str(BIN / "anycast-controller"), "--config-dir", str(config), "--state-dir",
                          str(tmp_path / "state"), "--listen", f"127.0.0.1:{free_ports(1)[0]}", "--name", "c1"],
                         capture_output=True, text=True, timeout=HANG_GUARD)
    assert run.returncode == 1
    assert "/anycast/layout says layout 99" in run.stderr and etcd.client_url in run.stderr
    assert e.get_prefix("") == before


def test_a_controller_starting_while_another_writes_its_first_state_is_not_refused(etcd: EtcdMember) -> None:
    """Three controllers start at once on an empty prefix: the winner writes the layout and
    its first state in one transaction while another checks the layout (the lab saw a
    controller exit "keys under /anycast/ but no /anycast/layout"). The check reads the
    prefix once, so the first write lands wholly before or after it, never between."""
    class Racing(Etcd):
        raced = False

        def call(self, path: str, body: Any, op: str) -> dict[str, Any]:
            answer = super().call(path, body, op)
            if path == "kv/range" and not self.raced:  # the winner's first state, right after our first read
                self.raced = True
                Etcd.txn(self, [], [self.put("layout", json.dumps({"layout": 1})), self.put("state/seq", "1")],
                         "test")
            return answer

    racing = Racing(settings(etcd.client_url))
    check_layout(racing)
    assert racing.raced
    check_layout(Etcd(settings(etcd.client_url)))  # and at the next start, with the state there


def test_tls_to_etcd_with_client_certificates(tmp_path: Path) -> None:
    """etcd with client TLS and --client-cert-auth: the controller's CA and client certificate
    work; without the client certificate, or trusting another CA, the error says TLS."""
    tls = make_tls(str(tmp_path / "pki"))
    with etcd_cluster(str(tmp_path / "etcd"), 1, tls=tls) as (member,):
        good = settings(member.client_url, ca_file=tls.ca, cert_file=tls.cert, key_file=tls.key)
        a, st, seq = started(good, "a")
        st.append(store.Changes(drains={"sin": 5.0}), seq)
        assert EtcdStore(a).load().state.drains == {"sin": 5.0}
        a.stop()

        other = make_tls(str(tmp_path / "other-pki"))
        for bad in (settings(member.client_url, ca_file=tls.ca),  # no client certificate
                    settings(member.client_url, ca_file=other.ca, cert_file=tls.cert, key_file=tls.key)):
            with pytest.raises(EtcdUnavailable) as exc:
                Etcd(bad).get("layout")
            assert member.client_url in str(exc.value) and "TLS" in str(exc.value), str(exc.value)


def test_a_bad_checkout_on_a_fresh_host_starts_on_the_desired_state_kept_in_etcd(tmp_path: Path, etcd: EtcdMember,
                                                                                  ctls: list[Ctl]) -> None:
    config = desired_dir(tmp_path, [etcd.client_url])
    c1, good = leading_and_kept(tmp_path, etcd, ctls, config)
    c1.stop()
    # Another host: its checkout has a broken VIP file, its state_dir never kept anything.
    bad = tmp_path / "other-host"
    shutil.copytree(config, bad)
    (bad / "vips.yaml").write_text("vips: [{name: broken}]\n")
    c2 = Ctl(tmp_path, "c2", bad).start()
    ctls.append(c2)
    wait_for(lambda: c2.role() == "leader", HANG_GUARD, desc="c2 leads")
    s = c2.status()
    assert s is not None and s["config"]["revision"] == good and s["config"]["last_error"]
    assert [p["pop"] for p in s["pops"]] == ["sjc", "fra", "sin"]
