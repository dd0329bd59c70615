"""One JSON request to a controller under test: (HTTP status, parsed body), errors too."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from tests.helpers.controller_process import client_ssl


def request(url: str, method: str, token: str, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        # https://: a controller on the test session's CA (controller_process.tls_on)
        context = client_ssl() if url.startswith("https://") else None
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
