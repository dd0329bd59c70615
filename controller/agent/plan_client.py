"""The agent's HTTP client for the controller (a ``ControllerPort``), with an on-disk cache
of the last good plan so that an agent restarted while the controller is down starts from
it (static stability)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import aiohttp

from ..config.model import IPNetwork
from ..wire import WireError, WireReport, encode_report
from .controller_link import ControllerUnavailable, HealthReport
from .intent import Plan, PlanSource
from .plan_wire import SpecCache, decode_plan

log = logging.getLogger("controller.agent")
CACHE_FILE = "plan.json"


class PlanClient:
    def __init__(self, url: str, pop: str, token: str, state_dir: str, allowed: Iterable[IPNetwork], *,
                 timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.pop = pop
        self.allowed = tuple(allowed)
        self._specs: SpecCache = {}  # VIP specs of the last good plan, already validated
        self.cache_path = os.path.join(state_dir, CACHE_FILE)
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_token_file(cls, url: str, pop: str, token_file: str, state_dir: str, allowed: Iterable[IPNetwork],
                        timeout: float = 5.0) -> PlanClient:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ControllerUnavailable(f"cannot read the token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ControllerUnavailable(f"the token file {token_file} is empty")
        return cls(url, pop, token, state_dir, allowed, timeout=timeout)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _request(self, method: str, path: str, timeout: float, body: Any = None) -> Any:
        try:
            async with self._client().request(method, self.url + path, json=body,
                                              timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                text = await r.text()
                if r.status != 200:
                    try:
                        detail = json.loads(text).get("error", text)
                    except (ValueError, AttributeError):
                        detail = text[:200]
                    raise ControllerUnavailable(f"{method} {path}: HTTP {r.status}: {detail}")
                return json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ControllerUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def fetch_plan(self, after: int, wait: float) -> Plan | None:
        data = await self._request("GET", f"/v1/plans/{self.pop}?after={after}&wait={wait}", wait + self._timeout)
        try:
            plan = decode_plan(data, self.pop, self.allowed, self._specs)
        except WireError as exc:
            # An invalid plan never replaces the last good one.
            raise ControllerUnavailable(f"rejected the controller's plan: {exc}") from None
        if plan.generation == after:
            return None
        self.save_cached(data)
        return plan

    async def report(self, report: HealthReport) -> None:
        await self._request("POST", f"/v1/reports/{self.pop}", self._timeout,
                            encode_report(WireReport(report.plan_generation, report.origins, report.announced)))

    def save_cached(self, data: Any) -> None:
        try:
            os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
            tmp = f"{self.cache_path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(data))  # dumps: the C encoder; dump() to a file is pure Python
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            log.warning("cannot cache the plan in %s: %s", self.cache_path, exc)

    def load_cached(self) -> Plan | None:
        """The last plan received, re-validated; None (with a warning) if absent or bad."""
        try:
            with open(self.cache_path, encoding="utf-8") as f:
                data = json.load(f)
            plan = decode_plan(data, self.pop, self.allowed, self._specs)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the cached plan %s: %s", self.cache_path, exc)
            return None
        return dataclasses.replace(plan, source=PlanSource.CACHED_PLAN)
