"""The agent's HTTP client for the controller (a ``ControllerPort``), with an on-disk cache
of the last good plan so that an agent restarted while the controller is down starts from
it (static stability).

Plans are fetched as deltas onto the plan held (``?after=GEN``); a delta that does not fit
(a gap, a hash or digest mismatch) is followed at once by a full fetch, so the agent only
ever holds whole plans. Reports are sent as deltas onto the last one the controller
accepted; a 409 (it restarted, or lost one) is followed at once by a full report."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import aiohttp

from ..config.model import IPNetwork
from ..wire import WireDelta, WireError, WireReport, decode_plan, decode_plan_answer, encode_report, report_delta
from .controller_link import ControllerUnavailable, HealthReport
from .intent import Plan, PlanSource
from .plan_wire import NeedFullPlan, PlanBook

log = logging.getLogger("controller.agent")
CACHE_FILE = "plan.json"


class PlanClient:
    def __init__(self, url: str, pop: str, token: str, state_dir: str, allowed: Iterable[IPNetwork], *,
                 timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.pop = pop
        self.allowed = tuple(allowed)
        self.book = PlanBook(pop, self.allowed)  # the last good plan, to apply deltas onto
        self._confirmed = False  # the controller said the book's plan is current (this process)
        self._cached_generation: int | None = None  # the plan in the cache file
        self._seq = 0  # numbers the reports
        # Answers applied, by kind: "full", "delta", and "refetch" (a delta that did not fit).
        self.answers: collections.Counter[str] = collections.Counter()
        self._accepted: WireReport | None = None  # the last report the controller accepted
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

    async def _request(self, method: str, path: str, timeout: float, body: Any = None,
                       accept: tuple[int, ...] = (200,)) -> tuple[int, Any]:
        try:
            async with self._client().request(method, self.url + path, json=body,
                                              timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                text = await r.text()
                if r.status not in accept:
                    try:
                        detail = json.loads(text).get("error", text)
                    except (ValueError, AttributeError):
                        detail = text[:200]
                    raise ControllerUnavailable(f"{method} {path}: HTTP {r.status}: {detail}")
                return r.status, json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ControllerUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def fetch_plan(self, after: int, wait: float) -> Plan | None:
        """A delta onto the plan held when ``after`` is its generation, else the full plan.
        Until the controller has confirmed the plan held (one from the cache), it is asked
        without waiting, so that the agent knows at once the plan is current."""
        path = f"/v1/plans/{self.pop}"
        if after >= 0 and after == self.book.generation:
            path += f"?after={after}&wait={wait if self._confirmed else 0}"
        _, data = await self._request("GET", path, wait + self._timeout)
        try:
            try:
                answer = decode_plan_answer(data, self.pop)
                plan = self.book.apply(answer)
                self.answers["delta" if isinstance(answer, WireDelta) else "full"] += 1
            except NeedFullPlan as exc:
                log.info("fetching the full plan: %s", exc)
                self.answers["refetch"] += 1
                _, data = await self._request("GET", f"/v1/plans/{self.pop}", self._timeout)
                plan = self.book.apply(decode_plan(data, self.pop))
                self.answers["full"] += 1
        except WireError as exc:
            # An invalid plan never replaces the last good one.
            raise ControllerUnavailable(f"rejected the controller's plan: {exc}") from None
        if plan.generation == after and self._confirmed:
            return None
        self._confirmed = True
        if plan.generation != self._cached_generation:
            self.save_cached()
        return plan

    async def report(self, report: HealthReport) -> None:
        """Send the POP's health: what changed since the last report accepted, or in full."""
        self._seq += 1
        full = WireReport(report.plan_generation, report.origins, report.announced, self._seq, checks=report.checks)
        body = full if self._accepted is None else report_delta(self._accepted, full)
        path = f"/v1/reports/{self.pop}"
        status, _ = await self._request("POST", path, self._timeout, encode_report(body), accept=(200, 409))
        if status == 409:  # the controller does not hold the report the delta was onto
            log.info("the controller asked for a full report")
            self._accepted = None
            await self._request("POST", path, self._timeout, encode_report(full))
        self._accepted = full

    def save_cached(self) -> None:
        """Write the plan held to the cache file (atomically)."""
        try:
            os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
            tmp = f"{self.cache_path}.tmp"
            with open(tmp, "wb") as f:
                f.write(self.book.full_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.cache_path)
            self._cached_generation = self.book.generation
        except OSError as exc:
            log.warning("cannot cache the plan in %s: %s", self.cache_path, exc)

    def load_cached(self) -> Plan | None:
        """The last plan received, re-validated (hashes and digest too); None (with a
        warning) if absent or bad. It becomes the plan deltas are applied onto."""
        try:
            with open(self.cache_path, encoding="utf-8") as f:
                data = json.load(f)
            book = PlanBook(self.pop, self.allowed)
            plan = book.apply(decode_plan(data, self.pop), verify=True)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the cached plan %s: %s", self.cache_path, exc)
            return None
        self.book, self._confirmed, self._cached_generation = book, False, plan.generation
        return dataclasses.replace(plan, source=PlanSource.CACHED_PLAN)
