"""The controller's HTTP API (aiohttp).

Agents (bearer token of their POP; the controller stores only its sha256 in pops.yaml):

    GET  /v1/plans/{pop}?after=GEN&wait=SECONDS   the POP's plan; long-polls while the plan's
                                                  generation equals GEN (at most SECONDS, <= 60)
    POST /v1/reports/{pop}                        the POP's health (see controller.wire)

Operators (bearer operator token; sha256 in controller.yaml ``operator_token_sha256``):

    GET    /v1/status            config revision and errors, plans, report ages, alarms
    GET    /v1/explain/{vip}     per POP: decision, reason, sentence
    GET    /v1/snapshot          what ``anycastctl diff`` needs to re-plan locally
    POST   /v1/drains/{pop}      start draining a POP
    DELETE /v1/drains/{pop}      undrain it

Errors are JSON ``{"error": "...", "field": "..."}``: 400 malformed JSON or a bad field,
401 no or unknown token, 403 a token for another POP (or a POP token on an operator
endpoint), 404 unknown POP or VIP, 413 body over 1 MiB, 422 a report about a VIP the POP
does not publish, 503 a drain or undrain that cannot be saved (the state directory is
full, failing or read-only). A rejected request changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..config.serialize import vip_to_dict
from ..policy.model import PopReport
from ..wire import MAX_REPORT_BYTES, WireError, decode_report
from .core import ActionNotPersisted, Controller
from .snapshot import persistence_status, snapshot

log = logging.getLogger("controller.server")
CONTROLLER = web.AppKey("controller", Controller)
MAX_WAIT = 60.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str, field: str = "") -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (413, 404 for an unknown path, 405) as JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)


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
    spec = ctl.desired.pop(pop)
    if spec is None:
        # Unknown POP, but do not tell a stranger which POPs exist.
        known = any(_matches(token, p.token_sha256) for p in ctl.desired.pops)
        return error(404, f"unknown POP {pop!r}", "pop") if known else error(401, "invalid token", "Authorization")
    if not _matches(token, spec.token_sha256):
        if any(_matches(token, p.token_sha256) for p in ctl.desired.pops):
            return error(403, f"this token belongs to another POP, not {pop!r}", "Authorization")
        return error(401, "invalid token", "Authorization")
    return ctl, pop


def _operator_auth(request: web.Request) -> Controller | web.Response:
    ctl = request.app[CONTROLLER]
    token = _token(request)
    if token is None:
        return error(401, "missing bearer token", "Authorization")
    if not _matches(token, ctl.desired.operator_token_sha256):
        if any(_matches(token, p.token_sha256) for p in ctl.desired.pops):
            return error(403, "an agent token cannot use operator endpoints", "Authorization")
        return error(401, "invalid token", "Authorization")
    return ctl


async def get_plan(request: web.Request) -> web.StreamResponse:
    auth = _pop_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl, pop = auth
    try:
        after = int(request.query.get("after", "-1"))
        wait = min(float(request.query.get("wait", "0")), MAX_WAIT)
    except ValueError:
        return error(400, "after must be an integer and wait a number of seconds", "after")
    await ctl.wait_for_change(pop, after, wait)
    return web.json_response(ctl.plan_body(pop))


async def post_report(request: web.Request) -> web.StreamResponse:
    auth = _pop_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl, pop = auth
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return error(400, f"malformed JSON: {exc}", "")
    published = ctl.published_regions(pop)
    try:
        report = decode_report(body, published)
    except WireError as exc:
        status = 422 if "does not publish" in exc.message else 400
        return error(status, exc.message, exc.field)
    await ctl.take_report(PopReport(pop, ctl.clock(), report.plan_generation, report.origins, report.announced))
    return web.json_response({"accepted": True, "plan_generation": ctl.served[pop].generation})


async def get_status(request: web.Request) -> web.StreamResponse:
    auth = _operator_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl = auth
    now = ctl.clock()
    return web.json_response({
        "config": {"revision": ctl.config.revision, "loaded_at": ctl.config.loaded_at,
                   "last_error": ctl.config.last_error, "last_error_revision": ctl.config.last_error_revision,
                   "reload_failures": ctl.config.failures, "directory": ctl.desired.directory},
        "pops": [{"pop": p.name, "plan_generation": ctl.served[p.name].generation,
                  "report_age": (now - r.received_at) if (r := ctl.reports.get(p.name)) else None,
                  "reported_plan_generation": r.plan_generation if r else None,
                  "drained_since": ctl.persisted.drains.get(p.name),
                  "vips_wanted": sum(1 for v in ctl.plan_body(p.name)["vips"] if v["wanted"]),
                  "safety_holds": sum(1 for v in ctl.plan_body(p.name)["vips"] if v["safety_hold"])}
                 for p in ctl.desired.pops],
        "vips": [{"vip": v.name, "note": ctl.result.notes.get(v.name, "") if ctl.result else ""}
                 for v in ctl.desired.vips],
        "alarms": [{"kind": a.kind, "vip": a.vip, "detail": a.detail} for a in ctl.alarms()],
        "persistence": persistence_status(ctl),
    })


async def get_explain(request: web.Request) -> web.StreamResponse:
    auth = _operator_auth(request)
    if isinstance(auth, web.Response):
        return auth
    ctl = auth
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


def make_app(ctl: Controller) -> web.Application:
    app = web.Application(client_max_size=MAX_REPORT_BYTES, middlewares=[json_errors])
    app[CONTROLLER] = ctl
    app.add_routes([
        web.get("/v1/plans/{pop}", get_plan),
        web.post("/v1/reports/{pop}", post_report),
        web.get("/v1/status", get_status),
        web.get("/v1/explain/{vip}", get_explain),
        web.get("/v1/snapshot", get_snapshot),
        web.post("/v1/drains/{pop}", drain),
        web.delete("/v1/drains/{pop}", drain),
    ])
    return app
