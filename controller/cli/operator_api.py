"""The operator's side of the controller API, for anycastctl (blocking, stdlib only)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .conventions import Exit


class ApiError(Exception):
    """A failed call, explained for a human, with the exit code that tells a script what
    kind of failure it was."""

    def __init__(self, message: str, code: Exit = Exit.ERROR) -> None:
        super().__init__(message)
        self.code = code


def check_url(url: str) -> str:
    """A controller URL as ``--url`` takes it: ``http(s)://HOST[:PORT]``; raises ValueError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host (e.g. http://controller:9800)")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    return url


def operator_token(token_file: str | None) -> str:
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise ApiError(f"cannot read {token_file}: {exc.strerror}", Exit.USAGE) from None
    token = os.environ.get("ANYCAST_OPERATOR_TOKEN", "")
    if not token:
        raise ApiError("no operator token: pass --token-file FILE or set ANYCAST_OPERATOR_TOKEN", Exit.USAGE)
    return token


class OperatorApi:
    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """``body``: sent as JSON if not None."""
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:  # noqa: S310 - operator-given URL
                body = r.read()
        except urllib.error.HTTPError as exc:
            raise _http_error(method, self.url + path, exc.code, exc.read()) from None
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"cannot reach the controller at {self.url}: {reason}", Exit.UNREACHABLE) from None
        try:
            data = json.loads(body)
        except ValueError:
            raise ApiError(f"{method} {self.url + path}: the answer is not JSON ({_first(body)}): is --url the "
                           "controller's API address (not its metrics port, not another service)?",
                           Exit.BAD_ANSWER) from None
        if not isinstance(data, dict):
            raise ApiError(f"{method} {self.url + path}: the answer is JSON but not an object: not the "
                           "controller's API", Exit.BAD_ANSWER)
        return data


def _first(body: bytes, limit: int = 60) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return f"starts {text!r}" if text else "empty"


def _http_error(method: str, url: str, status: int, body: bytes) -> ApiError:
    """The controller answers every error with JSON ``{"error", "field"}``; a status without
    it came from something else at that address."""
    try:
        detail = json.loads(body).get("error")
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, str):
        return ApiError(f"{method} {url}: HTTP {status} without the controller's JSON error ({_first(body)}): "
                        "is --url the controller's API address?", Exit.BAD_ANSWER)
    code = {404: Exit.NOT_FOUND, 401: Exit.DENIED, 403: Exit.DENIED}.get(status, Exit.ERROR)
    return ApiError(f"{method} {url}: HTTP {status}: {detail}", code)
