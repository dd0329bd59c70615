"""HA on etcd v3: the controller's memory in an etcd cluster, and one leader among several
controllers by an etcd lease.

Theory of operation. Every controller holds one lease (``lease_ttl`` s), kept alive by a
thread of its own (``Leadership``), and a member key on it. A follower tries, every POLL,
a transaction "if the leader key does not exist, create it on my lease" (else: read it).
The winner is the leader until its lease ends: it alone plans, serves plans and writes.

Fencing. Each write is one transaction conditioned on the leader key's create revision
being the one this controller created (and, for the journal, on the store's sequence):
once the key is gone (the lease expired, an operator deleted it) or belongs to another
controller, every write of the old leader is refused (``Fenced``), whatever it believes.
And a leader stops acting on its own before its lease can expire at etcd: the lease runs
from when etcd received a keep-alive, never before it was sent, so a leader whose last
answered keep-alive was *sent* at t stops at t + lease_ttl - MARGIN(ttl), while the lease
ends at or after t + lease_ttl and only then can another controller create the key.

Key layout (``prefix`` from ``ha.prefix``, version LAYOUT_VERSION)::

    <prefix>layout               {"layout": 1, ...}: written with the first state; another
                                 version there: IncompatibleLayout, nothing is written
    <prefix>leader               {"name", "url", "since"} on the leader's lease
    <prefix>members/<name>       {"name", "url", "started"} on each controller's lease
    <prefix>state/seq            the store's sequence number (decimal)
    <prefix>state/snapshot       the whole state as of its "seq" (store.state_to_json)
    <prefix>state/journal/<seq>  the changes after the snapshot, one key each (20 digits)
    <prefix>state/alive          the leader's liveness hint (store.Alive) for the next one
    <prefix>desired              the last good desired state: {"revision", "files"}

etcd3gw (OpenStack's client for etcd's JSON gateway) does the HTTP: a synchronous client
fits the synchronous Store protocol, and it needs no gRPC stack. Requests go to one
endpoint at a time, the next one on a connection error, a timeout or an etcd error.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_exceptions

from ..config.desired_model import HaSettings
from . import store

log = logging.getLogger("controller.server")
LAYOUT_VERSION = 1
COMPACT_ENTRIES = 500  # journal keys after which a new snapshot replaces them
GENERATION_GAP = 1000  # a new leader numbers plans this far past the stored generation (see load)


def margin(ttl: float) -> float:
    """How long before its lease could end a leader stops acting (clock rates, scheduling)."""
    return min(ttl / 2, max(0.5, ttl * 0.2))


class EtcdUnavailable(Exception):
    """No etcd endpoint answered; the message names each endpoint and why."""


class IncompatibleLayout(Exception):
    """The keys under the prefix were written by an incompatible version (nothing changed)."""


class Fenced(store.PersistenceError):
    """A write refused by etcd because this controller is no longer the leader."""


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _range_end(prefix: str) -> str:
    """The key just past every key that starts with ``prefix``."""
    raw = prefix.encode()
    return _b64(raw[:-1] + bytes([raw[-1] + 1]))


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    lease: int


def _kv(doc: Mapping[str, Any]) -> KV:
    return KV(_unb64(doc["key"]).decode(), _unb64(doc.get("value", "")), int(doc.get("create_revision", 0)),
              int(doc.get("lease", 0)))


@dataclass
class EndpointHealth:
    ok: bool | None = None  # None: not tried yet
    error: str = ""
    at: float = 0.0


class Etcd:
    """A few etcd v3 calls over the JSON gateway, failing over between the endpoints.

    Not shared between threads (each thread makes its own: a requests.Session is not safe
    to share)."""

    def __init__(self, settings: HaSettings) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self.endpoints = settings.endpoints
        self._clients = []
        for url in settings.endpoints:
            u = urlsplit(url)
            # Our own session: with the environment trusted (requests' default), a
            # REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE overrides the session's CA (ha.tls.ca_file
            # would be ignored) and an http(s)_proxy would carry etcd's traffic.
            session = requests.Session()
            session.trust_env = False
            if settings.ca_file is not None:
                session.verify = settings.ca_file
            if settings.cert_file is not None and settings.key_file is not None:
                session.cert = (settings.cert_file, settings.key_file)
            self._clients.append(etcd3gw.client(
                host=u.hostname or "", port=u.port or 2379, protocol=u.scheme, timeout=settings.request_timeout,
                api_path="/v3/", session=session))
        self._current = 0
        self.health: dict[str, EndpointHealth] = {e: EndpointHealth() for e in settings.endpoints}
        self.errors: Counter[str] = Counter()  # failed calls (every endpoint failed), by operation

    def call(self, path: str, body: Mapping[str, Any], op: str) -> dict[str, Any]:
        """POST ``body`` to /v3/``path`` on the first endpoint that answers."""
        reasons = []
        for i in range(len(self._clients)):
            n = (self._current + i) % len(self._clients)
            client, endpoint = self._clients[n], self.endpoints[n]
            try:
                answer: dict[str, Any] = client.post(client.get_url(path), json=dict(body))
            except etcd_exceptions.Etcd3Exception as exc:
                why = _why(exc)
                reasons.append(f"{endpoint}: {why}")
                self.health[endpoint] = EndpointHealth(False, why, time.time())
                continue
            except ValueError as exc:  # not JSON: something else listens there
                why = f"not an etcd answer ({exc})"
                reasons.append(f"{endpoint}: {why}")
                self.health[endpoint] = EndpointHealth(False, why, time.time())
                continue
            self._current = n
            if not self.health[endpoint].ok:
                self.health[endpoint] = EndpointHealth(True, "", time.time())
            return answer
        self.errors[op] += 1
        raise EtcdUnavailable(f"etcd {op}: no endpoint answered: " + "; ".join(reasons))

    def key(self, name: str) -> str:
        return self.prefix + name

    def get(self, name: str, op: str = "read") -> KV | None:
        answer = self.call("kv/range", {"key": _b64(self.key(name))}, op)
        kvs = answer.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, name: str, op: str = "read", keys_only: bool = False) -> list[KV]:
        key = self.key(name)
        answer = self.call("kv/range", {"key": _b64(key), "range_end": _range_end(key), "keys_only": keys_only}, op)
        return [_kv(d) for d in answer.get("kvs", [])]

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]], op: str,
            failure: list[dict[str, Any]] | None = None) -> tuple[bool, list[dict[str, Any]]]:
        answer = self.call("kv/txn", {"compare": compare, "success": success, "failure": failure or []}, op)
        return bool(answer.get("succeeded", False)), list(answer.get("responses", []))

    # --- transaction parts -------------------------------------------------------------
    def put(self, name: str, value: str | bytes, lease: int = 0) -> dict[str, Any]:
        req: dict[str, Any] = {"key": _b64(self.key(name)), "value": _b64(value)}
        if lease:
            req["lease"] = str(lease)
        return {"request_put": req}

    def delete_prefix(self, name: str, below: str | None = None) -> dict[str, Any]:
        """Delete the keys under ``name`` (those before ``name + below`` if given)."""
        key = self.key(name)
        end = _b64(self.key(name + below)) if below is not None else _range_end(key)
        return {"request_delete_range": {"key": _b64(key), "range_end": end}}

    def read(self, name: str) -> dict[str, Any]:
        return {"request_range": {"key": _b64(self.key(name))}}

    def created_at(self, name: str, revision: int) -> dict[str, Any]:
        """Compare: ``name`` exists with this create revision (0: does not exist)."""
        return {"key": _b64(self.key(name)), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}

    def value_is(self, name: str, value: str) -> dict[str, Any]:
        return {"key": _b64(self.key(name)), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}

    def status(self) -> list[dict[str, Any]]:
        """Each endpoint's own status (version, its raft leader, db size) or its error."""
        out = []
        for client, endpoint in zip(self._clients, self.endpoints):
            try:
                s = client.post(client.get_url("maintenance/status"), json={})
                out.append({"endpoint": endpoint, "ok": True, "version": s.get("version", ""),
                            "member_id": s.get("header", {}).get("member_id", ""), "leader": s.get("leader", ""),
                            "db_size": int(s.get("dbSize", 0)), "error": ""})
                self.health[endpoint] = EndpointHealth(True, "", time.time())
            except (etcd_exceptions.Etcd3Exception, ValueError) as exc:
                out.append({"endpoint": endpoint, "ok": False, "error": _why(exc)})
                self.health[endpoint] = EndpointHealth(False, _why(exc), time.time())
        return out


def _why(exc: BaseException) -> str:
    detail = getattr(exc, "detail_text", None)
    text = str(detail or exc or type(exc).__name__)
    if "CERTIFICATE_VERIFY_FAILED" in text or "SSLError" in text or "SSL" in text and "handshake" in text.lower():
        return "TLS handshake failed (check ha.tls.ca_file and the endpoint's certificate): " + text[-300:]
    if "wrong version number" in text or "Connection aborted" in text and "https" in text:
        return "TLS mismatch (https to a plain http endpoint, or the other way round): " + text[-300:]
    return text[-400:]


def check_layout(etcd: Etcd) -> None:
    """Raise IncompatibleLayout if the prefix holds keys of another layout version (or keys
    but no layout: not ours). EtcdUnavailable if etcd cannot be read."""
    # The keys in one range read (one etcd revision): a layout and its first state are written
    # in one transaction, so reading "layout" and then the rest could see the state another
    # controller wrote meanwhile without its layout, and refuse a prefix that is ours.
    keys = [kv.key for kv in etcd.get_prefix("", "load", keys_only=True)]
    doc = etcd.get("layout", "load") if etcd.key("layout") in keys else None  # once written, never removed
    if doc is None:
        others = [k for k in keys if not k.startswith((etcd.key("members/"), etcd.key("leader")))]
        if others:
            raise IncompatibleLayout(f"etcd {etcd.endpoints[0]}: keys under {etcd.prefix} but no "
                                     f"{etcd.key('layout')} ({others[0]}, ...): not written by anycast-controller; "
                                     "choose another ha.prefix")
        return
    try:
        version = json.loads(doc.value)["layout"]
    except (ValueError, KeyError, TypeError):
        version = doc.value[:40]
    if version != LAYOUT_VERSION:
        raise IncompatibleLayout(f"etcd {etcd.endpoints[0]}: {etcd.key('layout')} says layout {version!r}; this "
                                 f"anycast-controller reads layout {LAYOUT_VERSION} only: nothing was changed (run "
                                 "the version that wrote it, or migrate)")


# --- leadership --------------------------------------------------------------------------------
@dataclass
class LeaderInfo:
    name: str
    url: str
    since: float


@dataclass
class Leadership:
    """This controller's lease, member key and (when won) the leader key, kept by a thread.

    ``acting()`` is the one question the rest asks: True only while this controller holds
    the leader key and its lease is surely alive at etcd. ``on_change`` is called (from the
    thread) when this controller becomes leader or stops being one."""

    settings: HaSettings
    name: str
    url: str
    on_change: Callable[[], None] = lambda: None
    clock: Callable[[], float] = time.monotonic
    lease: int = 0
    leader_revision: int = 0  # create revision of our leader key; 0: not leader
    valid_until: float = 0.0  # monotonic: when this controller stops acting without a keep-alive
    leader: LeaderInfo | None = None  # whoever leads, as last seen
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_error: str = ""
    changes: int = 0  # times this controller became leader
    _lease_valid: float = 0.0
    _next_keepalive: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.etcd = Etcd(self.settings)
        self.poll = min(0.25, self.settings.lease_ttl / 8)

    def acting(self) -> bool:
        return self.leader_revision != 0 and self.clock() < self.valid_until

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="etcd-leadership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Resign (delete our leader key, revoke the lease: a follower leads at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            was = self.leader_revision
            self.leader_revision = 0
            if self.lease:
                try:
                    if was:
                        self.etcd.txn([self.etcd.created_at("leader", was)],
                                      [{"request_delete_range": {"key": _b64(self.etcd.key("leader"))}}], "resign")
                    self.etcd.call("lease/revoke", {"ID": str(self.lease)}, "resign")
                except EtcdUnavailable as exc:
                    log.warning("could not resign cleanly (the lease ends by itself): %s", exc)

    def depose(self, reason: str) -> None:
        """Stop acting as leader now (a write was fenced, or the lease could not be kept)."""
        with self._lock:
            if self.leader_revision == 0:
                return
            self.leader_revision = 0
            self.valid_until = 0.0
        log.error("ALARM leadership: %s is no longer the leader: %s", self.name, reason)
        self.on_change()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except EtcdUnavailable as exc:
                if exc.args[0] != self.last_error:
                    log.error("ALARM etcd: %s", exc)
                self.last_error = str(exc)
                if not self.leader_revision:
                    self.leader = None  # unknown now: not known to lead (status, the no-leader alert)
            except Exception:  # noqa: BLE001 - the thread must keep the lease or step down
                log.exception("leadership step failed")
            if self.leader_revision and self.clock() >= self.valid_until:
                self.depose(f"no keep-alive answered for {self.settings.lease_ttl - margin(self.settings.lease_ttl):.1f}s "
                            "(etcd unreachable or partitioned): stopping before the lease can end at etcd")
            self._stop.wait(self.poll)

    def _step(self) -> None:
        now = self.clock()
        ttl = self.settings.lease_ttl
        if not self.lease or now >= self._lease_valid + margin(ttl):
            self._grant()
        elif now >= self._next_keepalive:
            sent = self.clock()
            answer = self.etcd.call("lease/keepalive", {"ID": str(self.lease)}, "keepalive")
            left = int(answer.get("result", {}).get("TTL", -1))
            if left <= 0:
                self.depose("the lease expired at etcd")
                self.lease = 0
                return
            self._keepalive_ok(sent)
        self.last_error = ""
        if not self.leader_revision:
            self._campaign()
        if self.clock() - getattr(self, "_members_at", 0.0) > 2.0:
            self._members_at = self.clock()
            self.members = {kv.key.rsplit("/", 1)[1]: json.loads(kv.value)
                            for kv in self.etcd.get_prefix("members/", "members")}

    def _keepalive_ok(self, sent: float) -> None:
        ttl = self.settings.lease_ttl
        self._lease_valid = sent + ttl - margin(ttl)
        self._next_keepalive = sent + ttl / 5
        if self.leader_revision:
            self.valid_until = self._lease_valid

    def _grant(self) -> None:
        """A new lease (the first, or after the old one lapsed: a follower only) and our member key."""
        if self.leader_revision:
            self.depose("the lease could not be kept alive")
        sent = self.clock()
        answer = self.etcd.call("lease/grant", {"TTL": str(self.settings.lease_ttl), "ID": "0"}, "keepalive")
        self.lease = int(answer["ID"])
        self._keepalive_ok(sent)
        member = json.dumps({"name": self.name, "url": self.url, "started": time.time(), "pid": os.getpid()})
        self.etcd.txn([], [self.etcd.put(f"members/{self.name}", member, self.lease)], "keepalive")

    def _campaign(self) -> None:
        doc = json.dumps({"name": self.name, "url": self.url, "since": time.time()})
        sent = self.clock()
        won, responses = self.etcd.txn([self.etcd.created_at("leader", 0)], [self.etcd.put("leader", doc, self.lease),
                                                                               self.etcd.read("leader")],
                                       "campaign", failure=[self.etcd.read("leader")])
        kvs = [_kv(d) for r in responses for d in r.get("response_range", {}).get("kvs", [])]
        kv = kvs[0] if kvs else None
        if kv is not None:
            try:
                info = json.loads(kv.value)
                self.leader = LeaderInfo(str(info["name"]), str(info["url"]), float(info["since"]))
            except (ValueError, KeyError, TypeError):
                self.leader = None
        if not won and kv is not None and kv.lease == self.lease:
            # Our own key, left from a term we ended early (deposed while the lease lived on):
            # remove it so that an election can happen (a fresh term needs a fresh revision).
            self.etcd.txn([self.etcd.created_at("leader", kv.create_revision)],
                          [{"request_delete_range": {"key": _b64(self.etcd.key("leader"))}}], "campaign")
            self.leader = None
            return
        if won and kv is not None:
            with self._lock:
                self.leader_revision = kv.create_revision
                # The lease is the one kept alive since the last keep-alive: it is surely
                # alive until then (a campaign proves nothing newer about it).
                self.valid_until = min(self._lease_valid, sent + self.settings.lease_ttl - margin(self.settings.lease_ttl))
                self.changes += 1
            log.info("%s is the leader (leader key revision %d, lease %x)", self.name, kv.create_revision, self.lease)
            self.on_change()

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "role": "leader" if self.acting() else "follower",
                "leader": None if self.leader is None else {"name": self.leader.name, "url": self.leader.url,
                                                            "since": self.leader.since},
                "members": sorted(self.members.values(), key=lambda m: str(m.get("name"))),
                "lease_ttl": self.settings.lease_ttl, "last_error": self.last_error,
                "endpoints": {e: {"ok": h.ok, "error": h.error} for e, h in self.etcd.health.items()}}


# --- the store --------------------------------------------------------------------------------
class EtcdStore:
    """The Store protocol on etcd, every write fenced by the leader key (see the top)."""

    def __init__(self, leadership: Leadership, etcd: Etcd | None = None) -> None:
        self.leadership = leadership
        self.etcd = etcd or Etcd(leadership.settings)
        self.where = f"etcd {','.join(self.etcd.endpoints)} {self.etcd.prefix}"
        self._seq = 0
        self._journal = 0  # entries since the snapshot
        self._alive_busy = threading.Lock()

    def load(self) -> store.Loaded:
        try:
            check_layout(self.etcd)
            kvs = self.etcd.get_prefix("state/", "load")
        except EtcdUnavailable as exc:
            raise store.PersistenceError(store.StoreOp.LOAD, self.where, str(exc)) from None
        by_key = {kv.key[len(self.etcd.key("state/")):]: kv.value for kv in kvs}
        problems: list[str] = []
        state, seq = store.Persisted(), 0
        if "snapshot" in by_key:
            try:
                data = json.loads(by_key["snapshot"])
                state, seq = store.state_from_json(data), int(data["seq"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise store.StateUnreadable(self.where, (f"{self.etcd.key('state/snapshot')}: {store._why(exc)}",))
        elif any(k.startswith("journal/") for k in by_key):
            raise store.StateUnreadable(self.where, (f"{self.etcd.key('state/journal/')}: journal without snapshot",))
        self._journal = 0
        for k in sorted(k for k in by_key if k.startswith("journal/")):
            try:
                doc = json.loads(by_key[k])
                entry = int(doc["seq"])
                if entry <= seq:
                    continue
                if entry != seq + 1:
                    problems.append(f"{self.etcd.key('state/' + k)}: sequence {entry} follows {seq}")
                state, seq = store.apply(state, store.changes_from_json(doc)), entry
                self._journal += 1
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                problems.append(f"{self.etcd.key('state/' + k)}: {store._why(exc)}")
        stored_seq = by_key.get("seq")
        if stored_seq is not None and int(stored_seq) != seq:
            problems.append(f"{self.etcd.key('state/seq')} says {stored_seq.decode()}, the journal ends at {seq}")
        # The previous leader may have served plans it could not store before it stopped
        # (it stops within the lease TTL): number ours past them, never back.
        state.generations = {pop: g + GENERATION_GAP for pop, g in state.generations.items()}
        alive = None
        if "alive" in by_key:
            try:
                doc = json.loads(by_key["alive"])
                alive = store.Alive(float(doc["at"]), {str(p): float(t) for p, t in doc["fresh"].items()},
                                    store.alive_seqs(doc))
            except (ValueError, KeyError, TypeError, AttributeError):
                alive = None
        self._seq = seq
        return store.Loaded(state, seq, tuple(problems), alive)

    def _fence(self) -> dict[str, Any]:
        rev = self.leadership.leader_revision
        if not rev or not self.leadership.acting():
            raise Fenced(store.StoreOp.APPEND, self.where, "not the leader (fenced)")
        return self.etcd.created_at("leader", rev)

    def _write(self, op: store.StoreOp, compare: list[dict[str, Any]], success: list[dict[str, Any]],
               seq_expected: int | None) -> None:
        fence = self._fence()
        try:
            ok, _ = self.etcd.txn([fence, *compare], success, str(op),
                                  failure=[self.etcd.read("leader"), self.etcd.read("state/seq")])
        except EtcdUnavailable as exc:
            raise store.PersistenceError(op, self.where, str(exc)) from None
        if ok:
            return
        leader = self.etcd.get("leader", str(op))
        if leader is None or leader.create_revision != self.leadership.leader_revision:
            self.leadership.depose(f"a {op} was refused by etcd: the leader key is "
                                   f"{'gone' if leader is None else 'another controller' + chr(39) + 's'}")
            raise Fenced(op, self.where, "fenced: this controller is no longer the leader; nothing written")
        raise store.Conflict(f"{self.etcd.key('state/seq')} is not {seq_expected}: another writer was here")

    def start(self, state: store.Persisted, seq: int) -> None:
        snapshot = json.dumps(store.state_to_json(state, seq), sort_keys=True)
        layout = json.dumps({"layout": LAYOUT_VERSION, "writer": "anycast-controller"})
        self._write(store.StoreOp.COMPACT, [], [self.etcd.put("layout", layout), self.etcd.put("state/snapshot", snapshot),
                                                self.etcd.put("state/seq", str(seq)),
                                                self.etcd.delete_prefix("state/journal/")], None)
        self._seq, self._journal = seq, 0

    def append(self, changes: store.Changes, expect: int) -> int:
        if expect != self._seq:
            raise store.Conflict(f"the store is at {self._seq}, the writer expected {expect}")
        line = json.dumps(store.changes_to_json(changes, expect + 1), sort_keys=True, separators=(",", ":"))
        self._write(store.StoreOp.APPEND, [self.etcd.value_is("state/seq", str(expect))],
                    [self.etcd.put(f"state/journal/{expect + 1:020d}", line),
                     self.etcd.put("state/seq", str(expect + 1))], expect)
        self._seq, self._journal = expect + 1, self._journal + 1
        return self._seq

    def compact(self, state: store.Persisted, seq: int) -> None:
        if self._journal < COMPACT_ENTRIES:
            return
        snapshot = json.dumps(store.state_to_json(state, seq), sort_keys=True)
        self._write(store.StoreOp.COMPACT, [self.etcd.value_is("state/seq", str(seq))],
                    [self.etcd.put("state/snapshot", snapshot),
                     self.etcd.delete_prefix("state/journal/", f"{seq + 1:020d}")], seq)
        self._journal = 0

    def mark_alive(self, at: float, fresh: Mapping[str, float], seqs: Mapping[str, int]) -> None:
        """In the background (a hint: it must not hold up a planning pass), fenced too."""
        if not at or not self._alive_busy.acquire(blocking=False):
            return
        doc = json.dumps({"at": at, "fresh": dict(fresh), "seqs": dict(seqs)})

        def write() -> None:
            try:
                etcd = getattr(self, "_alive_etcd", None) or Etcd(self.leadership.settings)
                self._alive_etcd = etcd
                rev = self.leadership.leader_revision
                if rev and self.leadership.acting():
                    etcd.txn([etcd.created_at("leader", rev)], [etcd.put("state/alive", doc)], "alive")
            except EtcdUnavailable:
                pass  # a hint; the keep-alive thread raises the alarm
            finally:
                self._alive_busy.release()
        threading.Thread(target=write, name="etcd-alive", daemon=True).start()

    def keep_desired(self, revision: str, files: Mapping[str, str]) -> None:
        """Keep the last good desired state in etcd too (fenced; called from the watcher's
        keeper thread, hence an Etcd of its own): a controller started on a bad checkout on
        a host that never kept one locally starts on it (see fetch_desired)."""
        etcd = Etcd(self.leadership.settings)
        rev = self.leadership.leader_revision
        if not rev or not self.leadership.acting():
            raise Fenced(store.StoreOp.DESIRED, self.where, "not the leader (fenced)")
        doc = json.dumps({"revision": revision, "files": dict(files)}, sort_keys=True)
        try:
            ok, _ = etcd.txn([etcd.created_at("leader", rev)], [etcd.put("desired", doc)], "desired")
        except EtcdUnavailable as exc:
            raise store.PersistenceError(store.StoreOp.DESIRED, self.where, str(exc)) from None
        if not ok:
            raise Fenced(store.StoreOp.DESIRED, self.where, "fenced: no longer the leader; nothing written")

    def kept_desired(self) -> tuple[str, dict[str, str]] | None:
        """What the leaders kept in etcd (``keep_desired``): a new leader judges and rolls back
        a config change against the base the old one applied, not its own host's copy."""
        return _read_desired(self.etcd)

    def close(self) -> None:
        pass


def fetch_desired(settings: HaSettings) -> tuple[str, dict[str, str]] | None:
    """(revision, files) of the last good desired state kept in etcd, if any and readable."""
    return _read_desired(Etcd(settings))


def _read_desired(etcd: Etcd) -> tuple[str, dict[str, str]] | None:
    try:
        kv = etcd.get("desired", "load")
        if kv is None:
            return None
        doc = json.loads(kv.value)
        return str(doc["revision"]), {str(k): str(v) for k, v in doc["files"].items()}
    except (EtcdUnavailable, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error("cannot read the last good desired state from etcd: %s", exc)
        return None
