"""An unknown path (or method) is answered from the route's match, without raising: the raised
404's traceback held a cycle (exception -> frame -> match -> exception) for the cyclic GC at
every answer, and a prober's 404 every few ms made gen-0 collections of 25-40 ms in a burst's
pass (results/README.md 3z)."""

from __future__ import annotations

import asyncio
import json

from aiohttp import test_utils, web
from aiohttp.web_urldispatcher import MatchInfoError

from controller.server import app


def _unmatched(exc: web.HTTPException) -> web.Request:
    request = test_utils.make_mocked_request("GET", "/v1/probe")
    request._match_info = MatchInfoError(exc)  # what the router's resolve gives for no route
    return request


def test_an_unknown_path_is_a_json_404_without_its_handler_raising() -> None:
    called: list[web.Request] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        called.append(request)
        raise web.HTTPNotFound()

    resp = asyncio.run(app.json_errors(_unmatched(web.HTTPNotFound()), handler))
    assert called == []
    assert isinstance(resp, web.Response) and resp.status == 404 and resp.content_type == "application/json"
    assert json.loads(resp.text or "") == {"error": "Not Found", "field": ""}
    resp = asyncio.run(app.json_errors(_unmatched(web.HTTPMethodNotAllowed("PUT", ["GET"])), handler))
    assert called == [] and resp.status == 405 and resp.headers["Allow"] == "GET"  # RFC 9110: a 405 names what is allowed


def test_an_unknown_paths_error_is_never_raised_so_holds_no_traceback() -> None:
    async def route_handler(request: web.Request) -> web.StreamResponse:
        return await request.match_info.handler(request)  # the system route's handler: raises its error

    exc = web.HTTPNotFound()
    assert asyncio.run(app.json_errors(_unmatched(exc), route_handler)).status == 404
    assert exc.__traceback__ is None  # raised, it held its frames: exception -> frame -> route -> exception


def test_a_known_path_still_has_its_errors_as_json() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2)

    resp = asyncio.run(app.json_errors(test_utils.make_mocked_request("POST", "/v1/reports/p00"), handler))
    assert resp.status == 413 and json.loads(resp.text or "")["field"] == ""  # type: ignore[attr-defined]


def test_a_method_a_handler_refuses_keeps_its_allow_header() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed("DELETE", ["GET", "POST"])

    resp = asyncio.run(app.json_errors(test_utils.make_mocked_request("DELETE", "/v1/status"), handler))
    assert resp.status == 405 and resp.headers["Allow"] == "GET,POST"
