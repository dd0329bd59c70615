"""The controller's state and its planning step, without HTTP.

It keeps the last good desired state (a bad reload never replaces it), the freshest report
per POP, the drains, the planner's memory, and the per-POP plans with their generation
numbers (a POP's generation grows only when its plan's content changes). ``replan()`` runs
the pure planner; waiters of a POP are woken when its plan changes (long-poll).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config.desired_model import DesiredState
from ..config.errors import ConfigError
from ..config.model import Vip
from ..config.serialize import vip_to_dict
from ..metrics.central import ActiveOrigin, ControllerSnapshot, PopSnapshot
from ..policy.model import Alarm, PlanItem, PlanResult, PopReport
from ..policy.planner import plan
from . import store
from .plans import PlanStore, PopPlan

log = logging.getLogger("controller.server")
REPORT_BATCH = 0.01  # s: reports arriving within this share a planning pass


@dataclass(frozen=True)
class _DesiredIndex:
    desired: DesiredState
    by_pop: dict[str, dict[str, frozenset[str]]]  # pop -> published VIP -> its origin regions
    stale_after: float  # the shortest report_stale_after of any VIP


@dataclass
class ConfigStatus:
    revision: str = ""
    loaded_at: float = 0.0
    last_error: str = ""  # empty: the last load worked
    last_error_revision: str = ""
    failures: int = 0


@dataclass
class Controller:
    desired: DesiredState
    clock: Callable[[], float] = time.time
    reports: dict[str, PopReport] = field(default_factory=dict)
    plans: PlanStore = field(default_factory=PlanStore)  # what agents fetch (server/plans.py)
    result: PlanResult | None = None
    config: ConfigStatus = field(default_factory=ConfigStatus)
    persisted: store.Persisted = field(default_factory=store.Persisted)
    _wake: asyncio.TimerHandle | None = None
    _spec_dicts: tuple[DesiredState | None, dict[str, dict[str, Any]]] = (None, {})
    _saved: tuple[object, ...] = ()
    _pending: asyncio.Future[None] | None = None  # the pass that will plan the reports received
    _indexed: _DesiredIndex | None = None

    def __post_init__(self) -> None:
        self.persisted = store.load(self.desired.state_dir)
        self.config = ConfigStatus(revision=self.desired.revision, loaded_at=self.clock())
        self.replan()

    # --- inputs ------------------------------------------------------------------------
    def apply_config(self, new: DesiredState) -> None:
        removed = {p.name for p in self.desired.pops} - {p.name for p in new.pops}
        self.desired = new
        for pop in removed:
            self.reports.pop(pop, None)
        self.config = ConfigStatus(revision=new.revision, loaded_at=self.clock(), failures=self.config.failures)
        log.info("desired state %s loaded: %d POP(s), %d VIP(s)", new.revision, len(new.pops), len(new.vips))
        self.replan()

    def reject_config(self, exc: ConfigError, revision: str) -> None:
        self.config.last_error = exc.summary()
        self.config.last_error_revision = revision
        self.config.failures += 1
        log.error("config revision %s rejected, still serving %s:\n%s", revision, self.desired.revision,
                  exc.summary())

    def add_report(self, report: PopReport) -> None:
        self.reports[report.pop] = report
        self.replan()

    async def take_report(self, report: PopReport) -> None:
        """Store the report and return once a pass has planned with it. Reports that arrive
        together share one pass (at 50 POPs x 10,000 VIPs a pass takes about a second: one
        per report would queue 50 of them when every POP reports at once). A report that
        says what the POP's previous, still fresh, report said changes no plan: it is
        stored (it keeps the POP fresh) and answered at once; the next pass sees it."""
        previous = self.reports.get(report.pop)
        self.reports[report.pop] = report
        if (previous is not None and previous.origins == report.origins
                and report.received_at - previous.received_at < self._min_stale_after()):
            return
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(REPORT_BATCH, self._planned_reports)
        await asyncio.shield(self._pending)

    def _min_stale_after(self) -> float:
        return self._index().stale_after

    def published_regions(self, pop: str) -> dict[str, frozenset[str]]:
        """The VIPs ``pop`` publishes and their origin regions (to validate its reports)."""
        return self._index().by_pop.get(pop, {})

    def _index(self) -> _DesiredIndex:
        """Lookups derived from the desired state, built once per desired state."""
        if self._indexed is None or self._indexed.desired is not self.desired:
            by_pop: dict[str, dict[str, frozenset[str]]] = {p.name: {} for p in self.desired.pops}
            for fv in self.desired.vips:
                regions = frozenset(o.region for o in fv.vip.origins)
                for pop in fv.publish:
                    by_pop.setdefault(pop, {})[fv.name] = regions
            stale_after = min((fv.policy.safety.report_stale_after for fv in self.desired.vips),
                              default=self.desired.policy.safety.report_stale_after)
            self._indexed = _DesiredIndex(self.desired, by_pop, stale_after)
        return self._indexed

    def _planned_reports(self) -> None:
        done, self._pending = self._pending, None
        assert done is not None
        try:
            self.replan()
            done.set_result(None)
        except Exception as exc:  # noqa: BLE001 - every waiting request answers 500
            done.set_exception(exc)

    def drain(self, pop: str) -> bool:
        if pop in self.persisted.drains:
            return False
        self.persisted.drains[pop] = self.clock()
        log.info("drain of POP %s started", pop)
        self.replan()
        return True

    def undrain(self, pop: str) -> bool:
        if self.persisted.drains.pop(pop, None) is None:
            return False
        log.info("POP %s undrained", pop)
        self.replan()
        return True

    # --- planning ----------------------------------------------------------------------
    def replan(self) -> PlanResult:
        now = self.clock()
        result = plan(self.desired, self.reports, self.persisted.drains, now, self.persisted.planner)
        previous_alarms = {(a.kind, a.vip) for a in self.result.alarms} if self.result else set()
        for a in result.alarms:
            if (a.kind, a.vip) not in previous_alarms:
                log.warning("ALARM %s for VIP %s: %s", a.kind, a.vip, a.detail)
        for vip, note in result.notes.items():
            old = self.result.notes.get(vip) if self.result else None
            if old != note and (old is None or _origin_of(old) != _origin_of(note)):
                log.info("VIP %s: %s", vip, note)
        self.result = result
        self._schedule(result.wake_at, now)
        self.persisted.planner = result.state
        if self._spec_dicts[0] is not self.desired:
            # Each VIP's definition as JSON, once per desired state, not once per POP and pass;
            # an unchanged VIP keeps its object, so comparing plans after a reload stays cheap.
            old_state, old_specs = self._spec_dicts
            old_vips = {v.name: v.vip for v in old_state.vips} if old_state else {}
            self._spec_dicts = (self.desired, {v.name: old_specs[v.name] if old_vips.get(v.name) == v.vip
                                               else vip_to_dict(v.vip) for v in self.desired.vips})
        spec_dicts = self._spec_dicts[1]
        for pop in self.desired.pops:
            self._serve(pop.name, result.pops.get(pop.name, {}), spec_dicts)
        self._save()
        return result

    def _serve(self, pop: str, items: Mapping[str, PlanItem], spec_dicts: Mapping[str, dict[str, Any]]) -> None:
        """Make ``items`` the POP's plan if an agent would act differently on it (a new
        explanation or revision alone is no new plan: agents are not woken for nothing)."""
        generation = self.plans.serve(pop, items, spec_dicts, self.desired.revision,
                                      self.persisted.generations.get(pop, 0), self.desired)
        if generation is not None:
            self.persisted.generations[pop] = generation

    def _schedule(self, wake_at: float | None, now: float) -> None:
        """Plan again when a settle window ends, not at the next tick: that is when a
        POP's withdrawal gets confirmed (or held), while its agent is waiting."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if wake_at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # planning outside the server (tests, CLI): nothing to wake
            return
        self._wake = loop.call_later(max(0.0, wake_at - now) + 0.005, self.replan)

    def _save(self) -> None:
        """Write the state file when something in it changed (most passes change nothing)."""
        p = self.persisted
        now = (self.desired.state_dir, dict(p.drains), dict(p.generations), p.planner.vips, p.planner.pop_vips)
        if self._saved == now:
            return
        try:
            store.save(self.desired.state_dir, p)
            self._saved = now
        except OSError as exc:
            log.error("cannot save controller state in %s: %s", self.desired.state_dir, exc)

    # --- outputs -----------------------------------------------------------------------
    @property
    def served(self) -> Mapping[str, PopPlan]:
        """Per POP, the plan being served (its ``generation``, ``entries``, counts)."""
        return self.plans.pops

    def plan_body(self, pop: str) -> dict[str, Any]:
        return self.plans.plan_body(pop)

    async def wait_for_change(self, pop: str, after: int | None, wait: float) -> None:
        await self.plans.wait_for_change(pop, after, wait)

    def alarms(self) -> tuple[Alarm, ...]:
        return self.result.alarms if self.result else ()

    def item(self, pop: str, vip: str) -> PlanItem | None:
        return self.result.item(pop, vip) if self.result else None

    def spec(self, vip: str) -> Vip | None:
        fv = self.desired.vip(vip)
        return fv.vip if fv else None

    def metrics_snapshot(self) -> ControllerSnapshot:
        """What the metrics collector exports, read at scrape time."""
        now = self.clock()
        pops = []
        for pop in self.desired.pops:
            served = self.served[pop.name]
            report = self.reports.get(pop.name)
            pops.append(PopSnapshot(pop.name, served.generation, served.wanted, served.safety_holds,
                                    now - report.received_at if report else float("inf"),
                                    pop.name in self.persisted.drains))
        origins = []
        for fv in self.desired.vips:
            item = next((i for p in fv.publish if (i := self.item(p, fv.name)) is not None), None)
            if item is not None:
                origins.append(ActiveOrigin(fv.name, item.active_origin,
                                            item.active_origin == fv.vip.origins[0].region))
        return ControllerSnapshot(tuple(pops), tuple(fv.name for fv in self.desired.vips),
                                  frozenset((a.kind, a.vip) for a in self.alarms()), tuple(origins),
                                  not self.config.last_error, self.config.loaded_at)


def _origin_of(note: str) -> str:
    """The part of a note that names where the VIP goes (to log moves, not every timer tick)."""
    return re.split("[:;]", note, maxsplit=1)[0]

