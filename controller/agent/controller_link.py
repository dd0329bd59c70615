"""The agent's two loops toward the central controller: follow its plan, report health.

Static stability: when the controller cannot be reached, the agent keeps its last plan
(and keeps acting on its own health checks under that plan); nothing here withdraws
anything. Errors are logged once per outage, not once per retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from .decide import origin_verdict
from .intent import Plan, PlanSource

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger("controller.agent")


class ControllerUnavailable(Exception):
    """The controller could not be reached or gave an unusable answer (already explained)."""


@dataclass(frozen=True)
class HealthReport:
    pop: str
    plan_generation: int
    origins: Mapping[str, Mapping[str, bool | None]]  # vip -> region -> verdict
    announced: Mapping[str, bool]  # vip -> announced by this POP now
    # vip -> region -> (seconds since ok, seconds since failing): see agent/evidence.py
    checks: Mapping[str, Mapping[str, tuple[float | None, float | None]]] = field(default_factory=dict)


class ControllerPort(Protocol):
    """The controller as the agent sees it (an HTTP client in production)."""

    async def fetch_plan(self, after: int, wait: float) -> Plan | None:
        """The POP's plan if it differs from generation ``after`` (-1: no plan held), long-
        polling up to ``wait`` s; None if the plan is still ``after``. Raises
        ControllerUnavailable."""

    async def report(self, report: HealthReport) -> None:
        """Send the POP's health. Raises ControllerUnavailable."""


def health_report(agent: Agent) -> HealthReport:
    """Per VIP and origin region, this POP's verdict, plus what it announces."""
    verdicts = agent.verdicts()
    origins = {
        vip.name: {o.region: origin_verdict(o, (verdicts.get((vip.name, o.region, b)) for b in o.backends))
                   for o in vip.origins}
        for vip in agent.vips
    }
    announced = {vip.name: vip.prefix in agent.announced for vip in agent.vips}
    return HealthReport(agent.config.pop, agent.plan.generation, origins, announced, agent.evidence_checks())


class _OutageLog:
    """Log the first failure and the recovery, not every retry in between."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down = False

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            log.warning("%s failed: %s; keeping the last plan and retrying", self.what, exc)
        self.down = True

    def ok(self) -> None:
        if self.down:
            log.info("%s works again", self.what)
        self.down = False


async def follow_plans(agent: Agent, port: ControllerPort, wait: float,
                       on_state: Callable[[bool], None] = lambda ok: None,
                       backoff: Any = None, retry_now: asyncio.Event | None = None) -> None:
    """Long-poll the controller for newer plans and hand them to the agent, forever.
    Failures back off exponentially (0.5 s doubling to 10 s, plus up to 1 s of jitter);
    ``retry_now`` (set when a health report got through) cuts the wait short: the controller
    is back, and a withdrawal may be waiting for its answer, which comes with the plan."""
    outage = _OutageLog("fetching the plan from the controller")
    # (wait_exponential_jitter's ``initial`` is deprecated in tenacity 9 and its replacement,
    # ``multiplier``, does not exist in tenacity 8, which we also support: the same curve)
    backoff = backoff if backoff is not None else wait_exponential(multiplier=0.5, max=10) + wait_random(0, 1)
    retry_now = retry_now or asyncio.Event()

    async def pause(delay: float) -> None:
        retry_now.clear()
        try:
            await asyncio.wait_for(retry_now.wait(), delay)
        except asyncio.TimeoutError:
            pass

    while True:
        async for attempt in AsyncRetrying(retry=retry_if_exception_type(ControllerUnavailable),
                                           wait=backoff, sleep=pause):
            with attempt:
                try:
                    # A cached plan is a base too: the controller answers what changed since.
                    held = agent.plan.source in (PlanSource.CONTROLLER, PlanSource.CACHED_PLAN)
                    plan = await port.fetch_plan(agent.plan.generation if held else -1, wait)
                except ControllerUnavailable as exc:
                    outage.failed(exc)
                    on_state(False)
                    raise
                except Exception as exc:  # noqa: BLE001 - input nobody foresaw must not end the task
                    log.exception("fetching the plan failed unexpectedly; keeping the last plan and retrying")
                    on_state(False)
                    raise ControllerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        outage.ok()
        on_state(True)
        if plan is not None:
            try:
                agent.apply_plan(plan)
            except Exception:  # noqa: BLE001 - the task that follows plans never dies silently
                log.exception("applying plan generation %d failed; keeping the last plan", plan.generation)
            await _cache_plan(port)


async def _cache_plan(port: ControllerPort) -> None:
    """The port's cache write for the plan just applied (``PlanClient.cache_plan``: an fsync),
    in a worker thread: neither acting on the plan nor the event loop (checks, reports) waits
    for the disk. Before the next fetch, so the cache is written in the order of the plans."""
    cache: Callable[[], None] | None = getattr(port, "cache_plan", None)
    if cache is None:
        return
    try:
        await asyncio.to_thread(cache)
    except Exception:  # noqa: BLE001 - a cache is a convenience for the next start, never fatal
        log.exception("caching the plan failed; the next start fetches it from the controller")


async def report_health(agent: Agent, port: ControllerPort, interval: float,
                        now: asyncio.Event | None = None, reached: asyncio.Event | None = None) -> None:
    """Report this POP's health every ``interval`` s, and at once when ``now`` is set
    (a verdict changed: a withdrawal may be waiting for the controller's answer). Sets
    ``reached`` after every report that got through."""
    outage = _OutageLog("reporting health to the controller")
    now = now or asyncio.Event()
    while True:
        now.clear()
        try:
            await port.report(health_report(agent))
            outage.ok()
            if reached is not None:
                reached.set()
        except ControllerUnavailable as exc:
            outage.failed(exc)
        except Exception as exc:  # noqa: BLE001 - input nobody foresaw must not end the task
            # (as in follow_plans: a task that dies here would leave the controller with a
            # stale report, and so withdrawals unconfirmed, until the agent restarts)
            log.exception("reporting health failed unexpectedly; retrying")
            outage.failed(exc)
        try:
            await asyncio.wait_for(now.wait(), interval)
        except asyncio.TimeoutError:
            pass
