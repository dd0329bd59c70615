"""The agent's HTTP client for the controller (a ``ControllerPort``), with an on-disk cache
of the last good plan so that an agent restarted while the controller is down starts from
it (static stability): the whole plan in ``plan.json``, and each delta applied since as one
checksummed line in ``plan.deltas`` (a change appends a few hundred bytes instead of
rewriting the plan); a damaged cache of either kind is ignored and the full plan fetched.

Plans are fetched as deltas onto the plan held (``?after=GEN``); a delta that does not fit
(a gap, a hash or digest mismatch) is followed at once by a full fetch, so the agent only
ever holds whole plans. Reports are sent as deltas onto the last one the controller
accepted; a 409 (it restarted, or lost one) is followed at once by a full report. Reports go
in the wire's compact form; a controller that predates it (400 naming ``compact``) gets the
same report at once in the older form, and the later ones too until a 409.

HA: with several controller URLs (``controller.urls``) a request that finds no answer at
one (connection refused, a timeout, a 5xx such as a follower's 503 "not the leader") goes
to the next, the leader's first if the follower named it; the URL that answered is kept
for the next requests. Only when none answers is the controller unavailable (and the
agent keeps its plan)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..config.model import ClientTls, IPNetwork
from ..wire import (
    COMPACT, SIGNATURE_HEADER, WireDelta, WireError, WirePlan, WireReport, decode_plan, decode_plan_answer,
    encode_report, report_delta,
)
from .controller_link import ControllerUnavailable, HealthReport
from .intent import Plan, PlanSource
from .plan_wire import NeedFullPlan, PlanBook
from .signing import PlanRefused, check_signature, load_plan_keys
from .tls import client_context

log = logging.getLogger("controller.agent")
CACHE_FILE = "plan.json"
MAX_CACHE_BYTES = 256 << 20  # a plan of 100,000 VIPs is ~90 MB of JSON
DELTAS_FILE = "plan.deltas"


class PlanClient:
    def __init__(self, url: str | Sequence[str], pop: str, token: str, state_dir: str, allowed: Iterable[IPNetwork], *,
                 timeout: float = 5.0, tls: ssl.SSLContext | None = None,
                 plan_keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self.urls = tuple(u.rstrip("/") for u in ((url,) if isinstance(url, str) else url))
        self._at = 0  # the URL that answered last
        self.pop = pop
        self.allowed = tuple(allowed)
        self.book = PlanBook(pop, self.allowed)  # the last good plan, to apply deltas onto
        self._confirmed = False  # the controller said the book's plan is current (this process)
        self._cached_generation: int | None = None  # the plan in the cache file
        # Numbers the reports, from the clock in microseconds so that a restarted agent goes on
        # above its last number and the controller can refuse a replayed (older) report.
        self._seq = time.time_ns() // 1000
        # Answers applied, by kind: "full", "delta", and "refetch" (a delta that did not fit).
        self.answers: collections.Counter[str] = collections.Counter()
        self._accepted: WireReport | None = None  # the last report the controller accepted
        # Reports go in the compact form until a controller refuses it (one that predates it).
        self.compact = True
        self.cache_path = os.path.join(state_dir, CACHE_FILE)
        # The cache is sealed with a key only the token's holder knows: a plan written into
        # STATE_DIR by anyone else (a hand-edited address) is refused, not announced.
        self._cache_key = hashlib.sha256(b"anycast plan cache\0" + token.encode()).digest()
        self.refusals: collections.Counter[str] = collections.Counter()  # reason -> plans refused
        self._refused_vips: set[str] = set()  # VIPs of the plan held refused alone, already logged
        self.confirmed_at: float | None = None  # wall-clock time the controller last confirmed the plan held
        self.deltas_path = os.path.join(state_dir, DELTAS_FILE)  # deltas applied since, one a line
        self._cached_size = 0  # bytes of the whole plan in the cache file
        self._deltas_size = 0
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout
        self._tls = tls  # None: aiohttp's defaults (the system trust store for https://)
        self._plan_keys = plan_keys  # None: plans are not signed; else each answer must be, by one of them
        # One session (connection pool) per controller URL: a URL's connections can be dropped
        # alone (see _request_one) without cutting a request in flight to another.
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        # True (the agent): fetch_plan leaves the cache write to cache_plan(), called after the
        # plan is applied. An fsync under load took up to ~0.2 s here, before the plan was acted on.
        self.cache_later = False
        self._uncached: tuple[Any, int | None] | None = None  # (the answer, the generation a delta is onto)

    @property
    def url(self) -> str:
        """The controller followed now (the one that answered last)."""
        return self.urls[self._at]

    @classmethod
    def from_token_file(cls, url: str | Sequence[str], pop: str, token_file: str, state_dir: str,
                        allowed: Iterable[IPNetwork], timeout: float = 5.0, tls: ClientTls = ClientTls(),
                        plan_keys: tuple[str, ...] = ()) -> PlanClient:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ControllerUnavailable(f"cannot read the token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ControllerUnavailable(f"the token file {token_file} is empty")
        urls = (url,) if isinstance(url, str) else tuple(url)
        # One context serves every https:// controller (aiohttp uses it for https only).
        https = next((u for u in urls if u.startswith("https://")), urls[0])
        return cls(urls, pop, token, state_dir, allowed, timeout=timeout, tls=client_context(https, tls),
                   plan_keys=load_plan_keys(plan_keys) if plan_keys else None)

    def _client(self, url: str) -> aiohttp.ClientSession:
        session = self._sessions.get(url)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(ssl=self._tls) if self._tls is not None else None
            session = self._sessions[url] = aiohttp.ClientSession(headers=self._headers, connector=connector)
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()

    async def _request(self, method: str, path: str, timeout: float, body: Any = None,
                       accept: tuple[int, ...] = (200,), signed: bool = False) -> tuple[int, Any]:
        """Ask the controller followed now, then the others in turn (the leader first when one
        names it) while they do not answer; ``signed``: a plan answer, checked against the plan
        keys (if any) before it is parsed (a refused plan is not tried elsewhere)."""
        order = [(self._at + i) % len(self.urls) for i in range(len(self.urls))]
        failures = []
        while order:
            n = order.pop(0)
            try:
                answer = await self._request_one(self.urls[n], method, path, timeout, body, accept, signed)
            except _TryAnother as exc:
                failures.append(str(exc))
                if exc.leader in self.urls and self.urls.index(exc.leader) in order:
                    order.remove(self.urls.index(exc.leader))
                    order.insert(0, self.urls.index(exc.leader))
                continue
            if n != self._at:
                log.info("following the controller at %s now", self.urls[n])
                self._at = n
            return answer
        raise ControllerUnavailable("; ".join(failures))

    async def _request_one(self, url: str, method: str, path: str, timeout: float, body: Any,
                           accept: tuple[int, ...], signed: bool) -> tuple[int, Any]:
        where = f"{method} {url}{path}" if len(self.urls) > 1 else f"{method} {path}"
        try:
            session = self._client(url)
            async with session.request(method, url + path, json=body,
                                       timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                raw = await r.read()
                if signed and r.status == 200 and self._plan_keys is not None:
                    self._check(lambda: check_signature(self._plan_keys or {}, r.headers.get(SIGNATURE_HEADER), raw))
                text = raw.decode("utf-8", errors="replace")
                if r.status not in accept:
                    leader = None
                    try:
                        doc = json.loads(text)
                        detail, leader = doc.get("error", text), doc.get("leader")
                    except (ValueError, AttributeError):
                        detail = text[:200]
                    if r.status >= 500:
                        # The URL's kept-alive connections go: one answered "not the leader" may
                        # belong to an instance that no longer listens (an HA controller between
                        # roles); new ones reach whatever listens on the port now.
                        if self._sessions.get(url) is session:
                            del self._sessions[url]
                        await session.close()  # (a request in flight on it goes to the next URL)
                        raise _TryAnother(f"{where}: HTTP {r.status}: {detail}", leader)
                    raise ControllerUnavailable(f"{where}: HTTP {r.status}: {detail}")
                return r.status, json.loads(text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _TryAnother(f"{where}: {type(exc).__name__}: {str(exc)[:200]}", None) from None
        except (ValueError, RecursionError) as exc:
            # RecursionError: a deeply nested body must not kill the plan-following task.
            raise ControllerUnavailable(f"{where}: {type(exc).__name__}: {str(exc)[:200]}") from None

    async def fetch_plan(self, after: int, wait: float) -> Plan | None:
        """A delta onto the plan held when ``after`` is its generation, else the full plan.
        Until the controller has confirmed the plan held (one from the cache), it is asked
        without waiting, so that the agent knows at once the plan is current."""
        path = f"/v1/plans/{self.pop}"
        if after >= 0 and after == self.book.generation:
            path += f"?after={after}&wait={wait if self._confirmed else 0}"
        _, data = await self._request("GET", path, wait + self._timeout, signed=True)
        delta: WireDelta | None = None
        try:
            try:
                answer = decode_plan_answer(data, self.pop)
                self._check(lambda: self._not_older(answer))
                plan = self.book.apply(answer)
                self.answers["delta" if isinstance(answer, WireDelta) else "full"] += 1
                delta = answer if isinstance(answer, WireDelta) else None
            except NeedFullPlan as exc:
                log.info("fetching the full plan: %s", exc)
                self.answers["refetch"] += 1
                _, data = await self._request("GET", f"/v1/plans/{self.pop}", self._timeout, signed=True)
                full = decode_plan(data, self.pop)
                self._check(lambda: self._not_older(full))
                plan = self.book.apply(full)
                self.answers["full"] += 1
        except WireError as exc:
            # An invalid plan never replaces the last good one.
            raise ControllerUnavailable(f"rejected the controller's plan: {exc}") from None
        self._confirm()
        self._note_refused_vips()
        if plan.generation == after and self._confirmed:
            return None
        self._confirmed = True
        if plan.generation != self._cached_generation:
            self._uncached = (data, delta.after if delta is not None else None)
            if not self.cache_later:
                self.cache_plan()
        return plan

    def cache_plan(self) -> None:
        """Write the plan fetch_plan last returned to the cache, if it is not there yet: a
        delta onto the cached plan as one appended line, else the whole plan. Blocking (an
        fsync): the agent runs it in a worker thread once it has applied the plan
        (``cache_later``), so acting on a plan never waits for the disk."""
        pending, self._uncached = self._uncached, None
        if pending is None or self.book.generation == self._cached_generation:
            return
        data, after = pending
        if after is not None and after == self._cached_generation and data is not None:
            self._append_cached(data)
        else:
            self.save_cached()  # (also when more than one answer came since: the plan held now)

    def _check(self, check: Callable[[], None]) -> None:
        """Run a check that raises PlanRefused; count and log a refusal (the last good plan stays)."""
        try:
            check()
        except PlanRefused as exc:
            self.refusals[exc.reason] += 1
            log.error("refusing a plan from %s: %s", self.url, exc, extra={"reason": exc.reason, "pop": self.pop})
            raise

    def _note_refused_vips(self) -> None:
        """Log and count each VIP of the plan refused alone (outside the allowed prefixes), once."""
        refused = self.book.refused
        for name, why in sorted(refused.items()):
            if name not in self._refused_vips:
                self.refusals["outside_allowed"] += 1
                log.error("refusing VIP %s of plan generation %s (the rest applies): %s", name,
                          self.book.generation, why, extra={"vip": name, "reason": "outside_allowed"})
        self._refused_vips = set(refused)

    def _not_older(self, answer: WirePlan | WireDelta) -> None:
        """With signed plans, a full plan older than the one held is a replay (a signed plan
        captured earlier); refused, whatever controller or leader sends it."""
        held = self.book.generation
        if self._plan_keys is not None and held is not None and answer.generation < held:
            raise PlanRefused("replay", f"plan generation {answer.generation} is older than generation {held} "
                                        "held: a replayed plan")

    def _confirm(self) -> None:
        """The controller just vouched for the plan held: note when (the cache file's mtime,
        at most once a minute, says so across restarts; it only feeds the age alarm)."""
        now = time.time()
        if self.confirmed_at is None or now - self.confirmed_at >= 60:
            with contextlib.suppress(OSError):
                os.utime(self.cache_path, (now, now))
        self.confirmed_at = now

    def _append_cached(self, data: Any) -> None:
        """Add a delta applied onto the cached plan to the cache (one line sealed with the
        cache's MAC, fsynced) instead of rewriting the whole plan (8 MB at 10,000 VIPs) for each change;
        the whole plan is written again once the deltas outgrow half of it."""
        line = json.dumps(data, separators=(",", ":")).encode()
        line = b"%s %s\n" % (self._mac(line).encode(), line)
        try:
            if self._deltas_size + len(line) > max(self._cached_size // 2, 1 << 16):
                self.save_cached()
                return
            with open(self.deltas_path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._deltas_size += len(line)
            self._cached_generation = self.book.generation
        except OSError as exc:
            log.warning("cannot cache the plan's change in %s: %s", self.deltas_path, exc)
            self._cached_generation = None  # the next change writes the whole plan

    async def report(self, report: HealthReport) -> None:
        """Send the POP's health: what changed since the last report accepted, or in full."""
        self._seq += 1
        full = WireReport(report.plan_generation, report.origins, report.announced, self._seq, checks=report.checks)
        body = full if self._accepted is None else report_delta(self._accepted, full)
        status, answer = await self._post_report(body, (200, 409))
        if status == 409:  # the controller does not hold the report the delta was onto
            log.info("the controller asked for a full report: %s", answer.get("error", ""))
            last = answer.get("last_seq") if answer.get("field") == "seq" else None
            if isinstance(last, int) and not isinstance(last, bool) and last >= self._seq:
                self._seq = last + 1  # our clock went back: continue above what it applied
                full = dataclasses.replace(full, seq=self._seq)
            self._accepted = None
            # A 409 is a controller that restarted or another one answering: maybe one that
            # reads the compact form now (an upgrade), so the full report tries it again.
            self.compact = True
            await self._post_report(full, (200,))
        self._accepted = full

    def report_body(self, report: WireReport) -> dict[str, Any]:
        """The JSON value this client sends for ``report`` now (the compact form unless the
        controller refused it: wire.py, *The compact form*)."""
        return encode_report(report, compact=self.compact)

    async def _post_report(self, report: WireReport, accept: tuple[int, ...]) -> tuple[int, Any]:
        """POST a report in the compact form; a controller that predates it (400 naming the
        field ``compact``) gets it again at once in the older form, which is kept."""
        path = f"/v1/reports/{self.pop}"
        if self.compact:
            status, answer = await self._request("POST", path, self._timeout, self.report_body(report),
                                                 accept=(*accept, 400))
            if status != 400:
                return status, answer
            if not (isinstance(answer, dict) and answer.get("field") == COMPACT):
                detail = answer.get("error", answer) if isinstance(answer, dict) else answer
                raise ControllerUnavailable(f"POST {path}: HTTP 400: {str(detail)[:200]}")
            log.info("the controller at %s does not read compact reports: sending them in the older form", self.url)
            self.compact = False
        return await self._request("POST", path, self._timeout, self.report_body(report), accept=accept)

    def save_cached(self) -> None:
        """Write the plan held to the cache file (atomically), with no deltas after it. The
        deltas file goes first: a crash in between leaves the previous whole plan alone,
        which is an older plan, never a mix."""
        try:
            os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
            tmp = f"{self.cache_path}.tmp"
            body = self._sealed(self.book.full_json())
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.unlink(self.deltas_path)
            except FileNotFoundError:
                pass
            os.replace(tmp, self.cache_path)
            self._cached_generation, self._cached_size, self._deltas_size = self.book.generation, len(body), 0
        except OSError as exc:
            log.warning("cannot cache the plan in %s: %s", self.cache_path, exc)
            self._cached_generation = None

    def _mac(self, body: bytes) -> str:
        return hmac.new(self._cache_key, body, hashlib.sha256).hexdigest()

    def _sealed(self, body: bytes) -> bytes:
        """A full plan's JSON with its MAC as one more key (still a plan any reader can parse)."""
        assert body.endswith(b"}")
        return body[:-1] + b',"cache_mac":"' + self._mac(body).encode() + b'"}'

    @staticmethod
    def _read_cache_file(path: str) -> tuple[bytes, float]:
        """A cache file's bytes and mtime: a regular file, not followed through a symlink,
        opened without blocking, at most MAX_CACHE_BYTES (ValueError otherwise)."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path}: not a regular file")
            raw = f.read(MAX_CACHE_BYTES + 1)
        if len(raw) > MAX_CACHE_BYTES:
            raise ValueError(f"{path}: larger than {MAX_CACHE_BYTES} bytes")
        return raw, st.st_mtime

    def load_cached(self, max_age: float | None = None) -> Plan | None:
        """The last plan received, re-validated (hashes, digest and MAC); None if absent or
        bad (with an ERROR log and a refusal counted: a cache the agent did not write is not
        followed). It becomes the plan deltas are applied onto. Older than ``max_age``
        (since the controller last confirmed it) it is followed all the same, with a warning:
        static stability never ends by itself."""
        try:
            raw, confirmed = self._read_cache_file(self.cache_path)
            data = json.loads(raw)
            mac = data.pop("cache_mac", None) if isinstance(data, dict) else None
            book = PlanBook(self.pop, self.allowed)
            plan = book.apply(decode_plan(data, self.pop), verify=True)
            if not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(book.full_json())):
                raise CacheRefused("its MAC does not match: written or edited by someone without this POP's token")
            deltas = b""
            try:
                deltas, _ = self._read_cache_file(self.deltas_path)
            except FileNotFoundError:
                pass
            for number, line in enumerate(deltas.split(b"\n")[:-1] if deltas else [], 1):
                # Any bad line (torn, flipped, a delta that does not fit) voids the whole cache:
                # the agent fetches the full plan rather than guess how much of it to trust.
                mac_hex, _, body = line.partition(b" ")
                if not hmac.compare_digest(mac_hex, self._mac(body).encode()):
                    raise CacheRefused(f"{self.deltas_path}: line {number}: its MAC does not match (torn, or "
                                       "written by someone without this POP's token)")
                plan = book.apply(decode_plan_answer(json.loads(body), self.pop))
            if deltas and not deltas.endswith(b"\n"):
                raise ValueError(f"{self.deltas_path}: unfinished last line")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError, NeedFullPlan) as exc:
            reason = "cache_mac" if isinstance(exc, CacheRefused) else "cache_invalid"
            self.refusals[reason] += 1
            log.error("refusing the cached plan %s: %s", self.cache_path, exc, extra={"reason": reason})
            return None
        age = time.time() - confirmed
        if max_age is not None and age > max_age:
            log.warning("the cached plan %s was last confirmed by the controller %.0f s ago (more than %.0f s): "
                        "following it until the controller answers", self.cache_path, age, max_age,
                        extra={"reason": "plan_old"})
        self.book, self._confirmed, self._cached_generation = book, False, plan.generation
        self.confirmed_at = confirmed
        self._cached_size, self._deltas_size = len(raw), len(deltas)
        return dataclasses.replace(plan, source=PlanSource.CACHED_PLAN)


class CacheRefused(ValueError):
    """The cache file parsed, but this agent did not write it."""


class _TryAnother(Exception):
    """No answer from this controller (down, a timeout, a 5xx): the next URL may answer."""

    def __init__(self, message: str, leader: str | None) -> None:
        super().__init__(message)
        self.leader = leader.rstrip("/") if isinstance(leader, str) else None
