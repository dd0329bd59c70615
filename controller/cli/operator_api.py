"""The operator's side of the controller API, for anycastctl (blocking, stdlib only)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any


class ApiError(Exception):
    """A failed call, explained for a human (exit code 1 in the CLI)."""


def operator_token(token_file: str | None) -> str:
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise ApiError(f"cannot read {token_file}: {exc.strerror}") from None
    token = os.environ.get("ANYCAST_OPERATOR_TOKEN", "")
    if not token:
        raise ApiError("no operator token: pass --token-file FILE or set ANYCAST_OPERATOR_TOKEN")
    return token


class OperatorApi:
    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:  # noqa: S310 - operator-given URL
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                detail = ""
            raise ApiError(f"{method} {path}: HTTP {exc.code}{': ' + detail if detail else ''}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"cannot reach the controller at {self.url}: {reason}") from None
