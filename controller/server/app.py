"""The controller's HTTP API (aiohttp).

Agents (bearer token of their POP; the controller stores only its sha256 in pops.yaml):

    GET  /v1/plans/{pop}                          the POP's full plan
    GET  /v1/plans/{pop}?after=GEN&wait=SECONDS   the changes since plan GEN (a full plan if GEN
                                                  is unknown or too old); long-polls while the
                                                  plan's generation equals GEN (<= SECONDS, <= 60)
    POST /v1/reports/{pop}                        the POP's health, full or as a delta onto its
                                                  last report (see controller.wire); answered once
                                                  validated and stored, before the planning pass it
                                                  triggers (a plan it changes wakes the long-poll)

Reads that show plans (``/v1/status``, ``/v1/explain``, ``/v1/snapshot``, a whole plan: no
``after``) first wait for the pass that plans every report acknowledged before them, so that
what a report changed is visible to whoever asks after its answer.

Operators (bearer operator token; sha256 in controller.yaml ``operator_token_sha256``):

    GET    /v1/status            config revision and errors, plans, report ages, alarms
    GET    /v1/explain/{vip}     per POP: decision, reason, sentence
    GET    /v1/snapshot          what ``anycastctl diff`` needs to re-plan locally
    POST   /v1/drains/{pop}      start draining a POP
    DELETE /v1/drains/{pop}      undrain it
    GET    /v1/dials             every origin region's traffic dial (config and operator), who and why
    POST   /v1/dials/{region}    {"pct": 0-100, "by": "...", "why": "...", "force": false}: set it (409:
                                 it moves more traffic than the change budget allows; "force": true skips that)
    DELETE /v1/dials/{region}    hand the region's dial back to the config (the same gate; ?force=true)
    POST   /v1/change/confirm    confirm the held (or rolled-back) config revision:
                                 ``{"revision": REV, "by": WHO, "reason": WHY}``; 409 if REV is
                                 not the revision waiting (a newer commit replaced it, or
                                 nothing waits)

Errors are JSON ``{"error": "...", "field": "..."}``: 400 malformed JSON or a bad field,
401 no or unknown token, 403 a token for another POP (or a POP token on an operator
endpoint, or with mTLS a POP request without a client certificate naming the POP), 404
unknown POP or VIP, 408 a report body slower than ``api.body_timeout``, 409 a delta report
whose ``base`` is not the last report held (send a full one), whose ``seq`` is not above the
last one applied (a replay; ``last_seq`` says where to continue) or a confirm of a revision
that is not the one waiting, 413 a report over ``wire.report_limit`` (1 MiB plus 160 B per VIP
x origin-region pair the POP publishes), 422 a report about a VIP the POP does not publish, 503
a drain or undrain that cannot be saved (the state directory is full, failing or read-only). A
rejected request changes nothing.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from aiohttp import web

from ..config.desired_model import ApiTransport, DesiredState, PopSpec
from ..config.serialize import vip_to_dict
from ..policy.model import PopReport
from ..wire import (MAX_REPORT_BYTES, SIGNATURE_HEADER, WireError, WireReport, apply_report_delta, decode_report,
                    decode_report_steps, parse_counter, report_limit)
from ..policy import change
from . import core
from .core import ActionNotPersisted, ActionRefused, ChangeRefused, Controller
from .guard import ConnectionGuard
from .looplag import LoopLag
from .signing import PlanSigner
from .snapshot import persistence_status, snapshot
from .tls import peer_names

log = logging.getLogger("controller.server")
CONTROLLER = web.AppKey("controller", Controller)
REPORTS = web.AppKey("reports", dict[str, "_ReportBook"])
POP_TOKENS: web.AppKey[_PopTokens] = web.AppKey("pop_tokens")  # (_pop_auth)
PARSING = web.AppKey("parsing", asyncio.Lock)  # the turn of large reports' parses (_parsed)
GUARD = web.AppKey("guard", ConnectionGuard)  # set by the daemon; absent in tests of the handlers alone
SIGNER = web.AppKey("signer", PlanSigner)  # set by the daemon with api.signing_key
TRANSPORT = web.AppKey("transport", ApiTransport)  # set by the daemon: how the API is served (status api.transport)
LOOP_LAG = web.AppKey("loop_lag", LoopLag)  # set by the daemon unless --loop-lag-every 0 (status event_loop)
StatusExtra = Callable[[], dict[str, Any]]
STATUS_EXTRA: web.AppKey[StatusExtra] = web.AppKey("status_extra")  # more /v1/status sections (HA)
MAX_WAIT = 60.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str, field: str = "") -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (413, 404 for an unknown path, 405) as JSON too.

    An unknown path or method is answered from the route's match without calling its handler:
    the handler raises the error, and the raised exception's traceback holds the handler's frame,
    which holds the match, which holds the exception: a cycle of ~30 objects per answer, left for
    the cyclic GC (a 404 every few ms, e.g. a prober's, made gen-0 collections of 25-40 ms
    during a burst's pass, results/README.md 3z)."""
    unmatched = request.match_info.http_exception
    if unmatched is not None and unmatched.status >= 400:
        return _as_json(unmatched)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _as_json(exc)


def _as_json(exc: web.HTTPException) -> web.Response:
    """The error as JSON, with the headers its status needs (405's Allow, RFC 9110 15.5.6)."""
    resp = error(exc.status, exc.reason)
    allow = exc.headers.get("Allow")
    if allow:
        resp.headers["Allow"] = allow
    return resp


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, sha256_hex: str | None) -> bool:
    if not sha256_hex:
        return False
    return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), sha256_hex)


def _pop_auth(request: web.Request) -> tuple[Controller, str] | web.Response:
    ctl = request.app[CONTROLLER]
    pop = request.match_info["pop"]
    token = _token(request)
    if token is None:
        return error(401, "missing bearer token", "Authorization")
    checked = request.app[POP_TOKENS]
    spec = checked.pop(ctl.desired, pop)
    if spec is None:
        # Unknown POP, but do not tell a stranger which POPs exist.
        known = any(_matches(token, p.token_sha256) for p in ctl.desired.pops)
        return error(404, f"unknown POP {pop!r}", "pop") if known else error(401, "invalid token", "Authorization")
    if not checked.known(spec, token):
        if not _matches(token, spec.token_sha256):
            if any(_matches(token, p.token_sha256) for p in ctl.desired.pops):
                return error(403, f"this token belongs to another POP, not {pop!r}", "Authorization")
            return error(401, "invalid token", "Authorization")
        checked.remember(spec, token)
    tls = ctl.desired.api.tls
    if tls is not None and tls.client_ca is not None:
        names = peer_names(request.transport.get_extra_info("peercert") if request.transport else None)
        if pop not in names:
            got = ", ".join(sorted(names)) or "no client certificate"
            return error(403, f"POP {pop!r} must present a client certificate naming it (got {got})", "certificate")
    _authenticated(request)
    return ctl, pop


class _PopTokens:
    """The POPs by name and, per POP, the last token that matched its ``token_sha256``, for
    one desired state (a reload starts again). Every report (25 a second at 50 POPs every
    2 s) looked its POP up in a list and hashed its token: with the token that matched last
    time, a constant-time comparison of the two tokens stands for the hash (the same answer:
    a token equal to one whose hash matched matches). Only a token that matched is kept, one
    per POP: a stranger's tokens are hashed every time and never stored."""

    def __init__(self) -> None:
        self._desired: object = None
        self._pops: dict[str, PopSpec] = {}
        self._tokens: dict[str, tuple[str | None, bytes]] = {}  # pop -> (its token_sha256, the token)

    def pop(self, desired: DesiredState, name: str) -> PopSpec | None:
        if desired is not self._desired:
            self._desired, self._pops, self._tokens = desired, {p.name: p for p in desired.pops}, {}
        return self._pops.get(name)

    def known(self, spec: PopSpec, token: str) -> bool:
        held = self._tokens.get(spec.name)
        return (held is not None and held[0] is spec.token_sha256
                and hmac.compare_digest(held[1], token.encode()))

    def remember(self, spec: PopSpec, token: str) -> None:
        self._tokens[spec.name] = (spec.token_sha256, token.encode())


def _authenticated(request: web.Request) -> None:
    """This connection carried a valid token: the connection guard no longer counts it."""
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.trust(request.transport)


def _operator_auth(request: web.Request) -> Controller | web.Response:
    ctl = request.app[CONTROLLER]
    token = _token(request)
    if token is None:
        return error(401, "missing bearer token", "Authorization")
    if not _matches(token, ctl.desired.operator_token_sha256):
        if any(_matches(token, p.token_sha256) for p in ctl.desired.pops):
            return error(403, "an agent token cannot use operator endpoints", "Authorization")
        return error(401, "invalid token", "Authorization")
    _authenticated(request)
    return ctl


async def get_plan(request: web.Request) -> web.StreamResponse:
    auth = _pop_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl, pop = auth
    try:
        after = parse_counter(request.query["after"], "after") if "after" in request.query else None
        wait = _seconds(request.query.get("wait", "0"), "wait")
    except WireError as exc:
        return error(400, exc.message, exc.field)
    if after is None:
        await ctl.settled()  # a whole plan includes every report acknowledged before it was asked for
    await ctl.wait_for_change(pop, after, min(wait, MAX_WAIT))
    body, gzipped = ctl.plans.answer(pop, after)
    headers = {}
    signer = request.app.get(SIGNER)
    if signer is not None:
        headers[SIGNATURE_HEADER] = signer.header(pop, ctl.plans.pops[pop].generation, body, gzipped)
    if gzipped and "gzip" not in request.headers.get("Accept-Encoding", ""):
        # a client without gzip (aiohttp's has it)
        return web.Response(body=gzip.decompress(bytes(body)), content_type="application/json", headers=headers)
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    if len(body.parts) == 1:
        return web.Response(body=body.parts[0], content_type="application/json", headers=headers)
    # A full plan's pieces, shared with other POPs' (plans.Body): written one after the
    # other, not joined into one copy per request.
    response = web.StreamResponse(headers=headers)
    response.content_type = "application/json"
    response.content_length = len(body)
    await response.prepare(request)
    for part in body.parts:
        await response.write(part)
    await response.write_eof()
    return response


def _seconds(text: str, field: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise WireError(field, f"expected a number of seconds >= 0, got {text[:40]!r}")
    return value


class _ReportBook:
    """Per POP: the number of the last report applied (delta reports go onto it), and the
    body limit for the set of VIPs it publishes (computed once per desired state)."""

    def __init__(self) -> None:
        self.seq: int | None = None
        self._limit: tuple[object, int] = (None, 0)
        # The verdict mappings this book last stored and the published mapping they were
        # validated against: while the controller still holds those very objects and the POP
        # publishes the same (identity), a delta needs no check of the names it does not send.
        self._held: tuple[object, object, object] = (None, None, None)
        # A POP's reports are taken one at a time, in the order their bodies arrived: a delta
        # sent right after a full report parsed in slices must find it applied.
        self.lock = asyncio.Lock()

    def hold(self, published: Mapping[str, Collection[str]], report: PopReport) -> None:
        self._held = (published, report.origins, report.announced)

    def holds(self, published: Mapping[str, Collection[str]], report: PopReport) -> bool:
        p, o, a = self._held
        return p is published and o is report.origins and a is report.announced

    def limit(self, published: Mapping[str, Collection[str]]) -> int:
        if self._limit[0] is not published:
            self._limit = (published, report_limit(sum(map(len, published.values()))))  # (in C: 50 POPs' first reports)
        return self._limit[1]


async def _read_at_most(request: web.Request, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (the rest is never read)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def post_report(request: web.Request) -> web.StreamResponse:
    auth = _pop_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl, pop = auth
    with ctl.receiving():  # (the pass of the reports stored before it waits for it: a burst)
        published = ctl.published_regions(pop)
        books = request.app[REPORTS]
        book = books.get(pop)
        if book is None:
            book = books[pop] = _ReportBook()
        limit = book.limit(published)
        content = request.content
        raw: bytes | None
        if content.is_eof():
            # The whole body came with the headers (a delta report, a few hundred bytes): read
            # from the buffer, no body timer armed and cancelled (the steady state's 25
            # reports a second each paid for an asyncio.timeout and a read task's turns).
            raw = content.read_nowait()
            if len(raw) > limit:
                raw = None
        else:
            try:
                async with asyncio.timeout(ctl.desired.api.body_timeout):
                    raw = await _read_at_most(request, limit)
            except TimeoutError:
                return error(408, f"the report body did not arrive within {ctl.desired.api.body_timeout:g} s", "body")
        if raw is None:
            return error(413, f"a report from {pop} may be at most {limit} bytes", "body")
        async with book.lock:
            return _take_report(ctl, pop, book, published, await _parsed(raw, published, request.app[PARSING]))


async def _parsed(raw: bytes, published: Mapping[str, Collection[str]],
                  turn: asyncio.Lock) -> WireReport | tuple[int, str, str]:
    """A large body (a full report of 10,000 VIPs: ~15-25 ms of ``json.loads`` and ~40-50 ms
    of ``decode_report``'s Python in the older form, ~5 ms compact, ~1.5 ms compact and equal
    to a recent POP's: wire.py) is parsed on the event loop in pieces: ``json.loads`` (one C
    call), then the validation in slices of ``core.SLICE_S`` with a turn of the loop between
    them, as a planning pass is (Engine.compute). 50 POPs reporting at once no longer stall
    every other request for seconds, and no thread competes with the loop for the GIL: a
    parser thread took the GIL at each of the loop's system calls and kept it a whole switch
    interval, keeping the loop out 0.2-0.4 s at a time (results 3q). One report at a time, in
    the order they came to ``turn`` (asyncio.Lock is first come, first served): side by side
    they would finish no sooner, but each later (50 interleaved: all answered at the end)."""
    if len(raw) < SLICED_REPORT_BYTES:
        return _parse_report(raw, published)
    async with turn:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            return _malformed(exc)
        await asyncio.sleep(0)  # (the validation is a piece of its own)
        steps = decode_report_steps(body, published, core.SLICE_S)
        try:
            while True:
                next(steps)
                await asyncio.sleep(0)  # other requests meanwhile (this POP's next report waits: book.lock)
        except StopIteration as done:
            report: WireReport = done.value
        except WireError as exc:
            return _refused(exc)
        await asyncio.sleep(0)  # (storing it, _take_report, is a piece of its own)
        return report


def _take_report(ctl: Controller, pop: str, book: _ReportBook, published: Mapping[str, Collection[str]],
                 parsed: WireReport | tuple[int, str, str]) -> web.Response:
    """The answer to a parsed report: refused (a replay, a delta onto another base), or stored."""
    if not isinstance(parsed, WireReport):
        return error(*parsed)
    report = parsed
    origins, announced = report.origins, report.announced
    last = ctl.report_seqs.get(pop)  # (survives a restart: Controller.report_seqs)
    if report.seq is not None and last is not None and report.seq <= last:
        # Each report is numbered above the last (agents start from the clock): an older or
        # equal number is a replay or a straggler, and would roll the POP's health back.
        return web.json_response({"error": f"report {report.seq} is not newer than report {last}, already "
                                           f"applied for {pop}: replayed or out of order", "field": "seq",
                                  "last_seq": last}, status=409)
    if report.base is not None:
        previous = ctl.reports.get(pop)
        if previous is None or book.seq != report.base:
            held = "none" if previous is None or book.seq is None else f"report {book.seq}"
            return web.json_response({"error": f"a delta onto report {report.base}, but the last report held "
                                               f"for {pop} is {held}: send a full report",
                                      "field": "base", "full_report": True}, status=409)
        origins, announced = apply_report_delta(previous.origins, previous.announced, report, published,
                                                checked=book.holds(published, previous))
    book.seq = report.seq
    if report.seq is not None:
        ctl.report_seqs[pop] = report.seq
    now = ctl.clock()
    # Acknowledged once stored: the pass it triggers runs after (core.accept_report); reads
    # that must see it wait for that pass (Controller.settled).
    ctl.accept_report(PopReport(pop, now, report.plan_generation, origins, announced,
                                PopReport.checks_at(report.checks, now)))
    book.hold(published, ctl.reports[pop])
    # (json_response's answer, the same bytes, without json.dumps: 25 a second in the steady state)
    return web.Response(body=b'{"accepted": true, "plan_generation": %d, "seq": %s}'
                        % (ctl.served[pop].generation, b"null" if report.seq is None else b"%d" % report.seq),
                        content_type="application/json", charset="utf-8")


SLICED_REPORT_BYTES = 64 << 10  # a report body this large is parsed in slices (_parsed)


def _parse_report(raw: bytes, published: Mapping[str, Collection[str]]) -> WireReport | tuple[int, str, str]:
    """The report in ``raw``, or the error answer's (status, message, field), whole."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also a 5,000-digit number or 100,000-level nesting
        return _malformed(exc)
    try:
        return decode_report(body, published)
    except WireError as exc:
        return _refused(exc)


def _malformed(exc: Exception) -> tuple[int, str, str]:
    return 400, f"malformed JSON: {str(exc)[:200]}", "body"


def _refused(exc: WireError) -> tuple[int, str, str]:
    return 422 if "does not publish" in exc.message else 400, exc.message, exc.field or "body"


async def get_status(request: web.Request) -> web.StreamResponse:
    auth = _operator_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl = auth
    await ctl.settled()  # what it shows includes every report acknowledged before
    await ctl.published()  # (notes, alarms and generations of one pass, not of two)
    now = ctl.clock()
    # Everything as of now; the VIPs' list (10,000 notes: ~20-50 ms built and encoded in one
    # piece, a stall of every other request after a burst) made and encoded in slices after,
    # from a copy of the notes (the desired state's VIPs are immutable).
    vips, notes = ctl.desired.vips, dict(ctl.result.notes) if ctl.result else {}
    head = {
        "config": {"revision": ctl.config.revision, "loaded_at": ctl.config.loaded_at,
                   "last_error": ctl.config.last_error, "last_error_revision": ctl.config.last_error_revision,
                   "reload_failures": ctl.config.failures, "directory": ctl.desired.directory,
                   "watch": ctl.watch_status()},
        "pops": [{"pop": p.name, "plan_generation": ctl.served[p.name].generation,
                  "report_age": (now - r.received_at) if (r := ctl.reports.get(p.name)) else None,
                  "reported_plan_generation": r.plan_generation if r else None,
                  "drained_since": ctl.persisted.drains.get(p.name),
                  "vips_wanted": ctl.served[p.name].wanted,
                  "safety_holds": ctl.served[p.name].safety_holds}
                 for p in ctl.desired.pops]}
    tail = {
        "alarms": [*([own] if (own := ctl.change_alarm()) else []),
                   *({"kind": a.kind, "vip": a.vip, "detail": a.detail} for a in ctl.alarms())],
        "persistence": persistence_status(ctl),
        # How agents and operators reach this API: "http-insecure" is plain HTTP beyond this
        # host by api.insecure_plain_http (also anycast_controller_api_insecure_http 1).
        "api": {"transport": request.app[TRANSPORT].value if TRANSPORT in request.app else None},
        "change": change_status(ctl),
        # The event loop's lag as the daemon samples it (server/looplag.py; null: sampling off).
        "event_loop": request.app[LOOP_LAG].status() if LOOP_LAG in request.app else None,
        **(request.app[STATUS_EXTRA]() if STATUS_EXTRA in request.app else {}),
    }
    text = [json.dumps(head)[:-1], ', "vips": [']
    for at in range(0, len(vips), STATUS_VIPS_PER_SLICE):
        if at:
            await asyncio.sleep(0)  # other requests meanwhile
            text.append(", ")
        text.append(json.dumps([{"vip": v.name, "note": notes.get(v.name, "")}
                                for v in vips[at:at + STATUS_VIPS_PER_SLICE]])[1:-1])
    text += ["], ", json.dumps(tail)[1:]]
    return web.Response(text="".join(text), content_type="application/json")


STATUS_VIPS_PER_SLICE = 1000  # VIPs of /v1/status's list built and encoded between two turns of the loop (~1 ms)


def change_status(ctl: Controller) -> dict[str, object]:
    """``/v1/status``'s change section: the config change's state (policy/change.py)."""
    r = ctl.rollout
    return {**change.to_json(r), "applied_revision": ctl.base.revision, "alarm": r.alarm(),
            "rolled": sorted(r.rolled()), "bake": ctl.base.change.bake, "wave_ends_at": r.wake_at(ctl.base.change),
            "budget": {"max_withdraw_fraction": ctl.base.change.max_withdraw_fraction,
                       "max_removed_vips": ctl.base.change.max_removed_vips}}


async def confirm_change(request: web.Request) -> web.StreamResponse:
    auth = _operator_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl = auth
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return error(400, f"malformed JSON: {exc}", "body")
    if not isinstance(body, dict):
        return error(400, "expected a JSON object", "body")
    for key in ("revision", "by", "reason"):
        if not isinstance(body.get(key), str) or not body[key].strip():
            return error(400, f"{key}: a non-empty string is needed", key)
    try:
        ctl.confirm_change(body["revision"].strip(), body["by"].strip()[:200], body["reason"].strip()[:2000])
    except ChangeRefused as exc:
        return error(409, str(exc), "revision")
    except ActionNotPersisted as exc:
        return error(503, str(exc), "state_dir")
    return web.json_response(change_status(ctl))


async def get_explain(request: web.Request) -> web.StreamResponse:
    auth = _operator_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl = auth
    await ctl.settled()  # what it shows includes every report acknowledged before
    name = request.match_info["vip"]
    fv = ctl.desired.vip(name)
    if fv is None:
        return error(404, f"unknown VIP {name!r}", "vip")
    pops = []
    for pop in fv.publish:
        item = ctl.item(pop, name)
        report = ctl.reports.get(pop)
        if item is not None:
            pops.append({"pop": pop, "wanted": item.wanted, "drain": item.drain, "reason": item.reason,
                         "safety_hold": item.safety_hold, "active_origin": item.active_origin,
                         "weights": [list(w) for w in item.weights],
                         "announced": report.announced.get(name) if report else None,
                         "explanation": item.explanation})
    return web.json_response({"vip": name, "address": str(fv.vip.prefix), "enabled": fv.enabled,
                              "note": ctl.result.notes.get(name, "") if ctl.result else "", "pops": pops,
                              "alarms": [{"kind": a.kind, "detail": a.detail} for a in ctl.alarms() if a.vip == name],
                              "spec": vip_to_dict(fv.vip)})


async def get_snapshot(request: web.Request) -> web.StreamResponse:
    auth = _operator_auth(request)
    if isinstance(auth, web.Response):
        return auth
    await auth.settled()
    return web.json_response(snapshot(auth))


async def drain(request: web.Request) -> web.StreamResponse:
    auth = _operator_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl = auth
    pop = request.match_info["pop"]
    if ctl.desired.pop(pop) is None:
        return error(404, f"unknown POP {pop!r}", "pop")
    try:
        changed = ctl.drain(pop) if request.method == "POST" else ctl.undrain(pop)
    except ActionNotPersisted as exc:  # never acknowledged, nothing changed
        return error(503, str(exc), "state_dir")
    return web.json_response({"pop": pop, "drained": pop in ctl.persisted.drains, "changed": changed,
                              "drain_time": ctl.desired.policy.drain.drain_time})


def _dials(ctl: Controller) -> dict[str, Any]:
    config = dict(ctl.desired.dials)
    out = {}
    for region in sorted(ctl.regions()):
        op = ctl.persisted.dials.get(region)
        out[region] = {"pct": op.pct if op else config.get(region, 100), "config": config.get(region, 100),
                       "operator": None if op is None else {"pct": op.pct, "by": op.by, "why": op.why, "at": op.at}}
    return {"dials": out}


async def dials(request: web.Request) -> web.StreamResponse:
    """An operator action like a drain (same auth, durable before acknowledged), put to the
    controller's dial gate first (Controller.dial_gate: the config-change gate's seam)."""
    auth = _operator_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl = auth
    if request.method == "GET":
        return web.json_response(_dials(ctl))
    region = request.match_info["region"]
    if region not in ctl.regions():
        return error(404, f"unknown origin region {region!r}", "region")
    pct: int | None = None
    by, why = "", ""
    force = request.query.get("force", "") in ("1", "true")  # DELETE ?force=true (POST: in the body)
    if request.method == "POST":
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError) as exc:  # also a 5,000-digit number or 100,000-level nesting
            return error(400, f"malformed JSON: {str(exc)[:200]}", "body")
        if not isinstance(body, dict):
            return error(400, "expected a JSON object", "body")
        pct, by, why = body.get("pct"), body.get("by", ""), body.get("why", "")
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            return error(400, f"expected an integer from 0 to 100, got {pct!r}", "pct")
        if not isinstance(by, str) or not by.strip():
            return error(400, "say who sets the dial", "by")
        if not isinstance(why, str) or not why.strip():
            return error(400, "say why (it is recorded with the dial)", "why")
        force = body.get("force", False)
        if not isinstance(force, bool):
            return error(400, f"expected true or false, got {force!r}", "force")
        by, why = by.strip()[:200], why.strip()[:2000]
    try:
        changed = ctl.dial(region, pct, by, why, force)
    except ActionRefused as exc:
        return error(409, str(exc), "pct")
    except ActionNotPersisted as exc:
        return error(503, str(exc), "state_dir")
    return web.json_response({"region": region, "changed": changed, **_dials(ctl)["dials"][region]})


def make_app(ctl: Controller, extra_status: Callable[[], dict[str, Any]] | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_REPORT_BYTES, middlewares=[json_errors])
    app[CONTROLLER] = ctl
    if extra_status is not None:
        app[STATUS_EXTRA] = extra_status
    app[REPORTS] = {}
    app[POP_TOKENS] = _PopTokens()
    app[PARSING] = asyncio.Lock()
    app.add_routes([
        web.get("/v1/plans/{pop}", get_plan),
        web.post("/v1/reports/{pop}", post_report),
        web.get("/v1/status", get_status),
        web.get("/v1/explain/{vip}", get_explain),
        web.get("/v1/snapshot", get_snapshot),
        web.post("/v1/drains/{pop}", drain),
        web.delete("/v1/drains/{pop}", drain),
        web.get("/v1/dials", dials),
        web.post("/v1/dials/{region}", dials),
        web.delete("/v1/dials/{region}", dials),
        web.post("/v1/change/confirm", confirm_change),
    ])
    return app
