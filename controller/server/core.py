"""The controller's state and its planning step, without HTTP.

It keeps the last good desired state (a bad reload never replaces it), the freshest report
per POP, the drains, the planner's memory, and the per-POP plans with their generation
numbers (a POP's generation grows only when its plan's content changes). Planning is the
incremental engine's (``policy/engine.py``): a pass plans only the VIPs whose inputs
changed or whose time came; waiters of a POP are woken when its plan changes (long-poll).

Planning never blocks serving: inside the event loop a pass of more than SMALL_PASS VIPs
(a cold start, a commit or drain that touches many VIPs) runs in slices of about SLICE_S
seconds, yielding to the loop between them; the slices plan into a staging area and the
new plans become visible all at once, so requests answered meanwhile see the previous,
complete plan. ``replan()`` plans at once (tests, the CLI, operator actions).
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
from ..policy.engine import Changes, Engine, Pass, compact_report
from ..policy.model import Alarm, PlanItem, PlanResult, PopReport
from ..wire import encode_plan
from . import store

log = logging.getLogger("controller.server")
REPORT_BATCH = 0.01  # s: reports arriving within this share a planning pass
SMALL_PASS = 256  # VIPs: a pass this small runs at once, a larger one in slices
SLICE_S = 0.004  # s of planning between two turns of the event loop


@dataclass
class ServedPlan:
    generation: int
    revision: str
    content: dict[str, Any]  # the JSON body minus generation
    material: list[tuple[Any, ...]] = field(default_factory=list)  # what the agent acts on, per VIP
    # What the last pass planned for this POP (content may be older: a pass that changed only
    # explanations or the revision is not a new plan). Equal next time: nothing to look at.
    seen_items: Mapping[str, PlanItem] = field(default_factory=dict)
    seen_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen_desired: object = None  # the DesiredState seen_specs were taken from


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
    served: dict[str, ServedPlan] = field(default_factory=dict)
    result: PlanResult | None = None
    config: ConfigStatus = field(default_factory=ConfigStatus)
    persisted: store.Persisted = field(default_factory=store.Persisted)
    _changed: dict[str, asyncio.Event] = field(default_factory=dict)
    _wake: asyncio.TimerHandle | None = None
    _spec_dicts: tuple[DesiredState | None, dict[str, dict[str, Any]]] = (None, {})
    _saved: tuple[object, ...] = ()
    _pending: asyncio.Future[None] | None = None  # the pass that will plan the reports received
    _indexed: _DesiredIndex | None = None
    _engine: Engine | None = None
    _waiting: list[asyncio.Future[None]] = field(default_factory=list)  # reports for the next pass
    _driver: asyncio.Task[None] | None = None  # runs the passes inside the event loop
    _again: bool = False  # a pass was asked for while one ran
    _staged: Pass | None = None  # the sliced pass in progress

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
        self.plan_soon()

    def reject_config(self, exc: ConfigError, revision: str) -> None:
        self.config.last_error = exc.summary()
        self.config.last_error_revision = revision
        self.config.failures += 1
        log.error("config revision %s rejected, still serving %s:\n%s", revision, self.desired.revision,
                  exc.summary())

    def add_report(self, report: PopReport) -> None:
        self.reports[report.pop] = compact_report(report, self.reports.get(report.pop))
        self.replan()

    async def take_report(self, report: PopReport) -> None:
        """Store the report and return once a pass has planned with it. Reports that arrive
        together share one pass (at 50 POPs x 10,000 VIPs a pass takes about a second: one
        per report would queue 50 of them when every POP reports at once). A report that
        says what the POP's previous, still fresh, report said changes no plan: it is
        stored (it keeps the POP fresh) and answered at once; the next pass sees it."""
        previous = self.reports.get(report.pop)
        report = self.reports[report.pop] = compact_report(report, previous)  # equal origins: the same object
        if (previous is not None and previous.origins is report.origins
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
        self._waiting.append(done)
        self.plan_soon()

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
    def plan_soon(self) -> None:
        """Plan what changed or came due, in the background of the running event loop (at
        once when there is none: tests, the CLI). The serve loop's tick calls it too, as a
        safety net: timers are scheduled on their own (``_schedule``)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.replan()
            return
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        else:
            self._again = True

    async def _drive(self) -> None:
        """Passes until nothing is dirty or waiting. Reports waiting for a pass are answered
        after the first pass that began after they were stored."""
        engine = self._get_engine()
        while True:
            self._again = False
            waiters, self._waiting = self._waiting, []
            try:
                now = self.clock()
                engine.mark(self.desired, self.reports, self.persisted.drains, now)
                if engine.dirty(refresh=True) > SMALL_PASS:
                    await self._sliced(engine, now)
                elif waiters or engine.dirty():
                    self.replan()
            except Exception as exc:  # noqa: BLE001 - a planner bug must not take the API down
                log.exception("planning failed; agents keep the last plan")
                self._staged = None  # a broken pass is never published
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                if not self._waiting:
                    return
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)
            if not self._waiting and not self._again:
                return

    async def _sliced(self, engine: Engine, now: float) -> None:
        """One large pass, SLICE_S of planning at a time; visible when whole."""
        p = self._staged = engine.begin(now)
        while not engine.compute(p, SLICE_S):
            await asyncio.sleep(0)  # answer requests (from the previous plan) meanwhile
            if self._staged is not p:
                return  # replan() finished and published it meanwhile
        self._staged = None
        self._publish(engine.commit(p), now)

    def _get_engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.persisted.planner)  # the persisted memory, for the first plans
        return self._engine

    def replan(self) -> PlanResult:
        """Plan now whatever changed or came due, and the countdowns in explanations."""
        engine = self._get_engine()
        if self._staged is not None:  # a sliced pass in progress: finish it first
            p, self._staged = self._staged, None
            engine.compute(p)
            self._publish(engine.commit(p), p.now)
        now = self.clock()
        engine.mark(self.desired, self.reports, self.persisted.drains, now)
        p = engine.begin(now, refresh=True)
        engine.compute(p)
        return self._publish(engine.commit(p), now)

    def _publish(self, changes: Changes, now: float) -> PlanResult:
        """Log, persist and serve what a committed pass changed."""
        engine = self._get_engine()
        for a in changes.new_alarms:
            log.warning("ALARM %s for VIP %s: %s", a.kind, a.vip, a.detail)
        for vip, (old, note) in changes.notes.items():
            if old is None or _origin_of(old) != _origin_of(note):
                log.info("VIP %s: %s", vip, note)
        result = PlanResult(engine.state(), engine.items, engine.notes, engine.alarms(), engine.settle_at())
        self.result = result
        self._schedule(engine.next_wake(), now)
        self.persisted.planner = result.state
        pops = set(changes.pops)
        if self._spec_dicts[0] is not self.desired:
            # Each VIP's definition as JSON, once per desired state, not once per POP and pass;
            # an unchanged VIP keeps its object, so comparing plans after a reload stays cheap.
            # The POPs of a VIP whose definition changed are served again (its spec is in
            # their plans); a publish list's change or a removed VIP changes items, which
            # the engine reports in changes.pops; the other POPs' plans cannot have changed.
            old_state, old_specs = self._spec_dicts
            old_vips = {v.name: v.vip for v in old_state.vips} if old_state else {}
            specs: dict[str, dict[str, Any]] = {}
            for fv in self.desired.vips:
                was = old_vips.get(fv.name)
                if was is not None and (was is fv.vip or was == fv.vip):
                    specs[fv.name] = old_specs[fv.name]
                else:
                    specs[fv.name] = vip_to_dict(fv.vip)
                    pops.update(fv.publish)
            self._spec_dicts = (self.desired, specs)
        spec_dicts = self._spec_dicts[1]
        for pop in self.desired.pops:
            if pop.name in pops or pop.name not in self.served:
                self._serve(pop.name, engine.items.get(pop.name, {}), spec_dicts)
        self._save()
        return result

    def _serve(self, pop: str, items: Mapping[str, PlanItem], spec_dicts: Mapping[str, dict[str, Any]]) -> None:
        """Make ``items`` the POP's plan if an agent would act differently on it.

        A new revision, or a new explanation (timers count down in them), that changes
        nothing an agent acts on is not a new plan for this POP: the plan keeps the revision
        it last changed at, and agents are not woken for nothing. Comparisons go from cheap
        to dear: most passes at a large fleet change nothing at most POPs (the planner hands
        back the very same item objects, so the first test is a walk over pointers).
        """
        served = self.served.get(pop)
        if served is not None and served.seen_items == items and (
                served.seen_desired is self.desired
                or all(spec_dicts.get(name) is d for name, d in served.seen_specs.items())):
            served.seen_desired = self.desired
            return
        names = sorted(items)
        material = [(name, spec_dicts[name], i.wanted, i.active_origin, i.drain, i.reason, i.safety_hold)
                    for name in names for i in (items[name],)]
        seen_specs = {name: spec_dicts[name] for name in names}
        if served is not None and served.material == material:
            served.seen_items, served.seen_specs, served.seen_desired = items, seen_specs, self.desired
            return
        content = encode_plan(pop, 0, self.desired.revision, [(items[name], spec_dicts[name]) for name in names])
        del content["generation"]
        generation = max(self.persisted.generations.get(pop, 0), served.generation if served else 0) + 1
        self.persisted.generations[pop] = generation
        self.served[pop] = ServedPlan(generation, self.desired.revision, content, material, items, seen_specs,
                                      self.desired)
        self._event(pop).set()
        self._changed[pop] = asyncio.Event()

    def _schedule(self, wake_at: float | None, now: float) -> None:
        """Plan again when the engine's next timer comes due (a settle window ends, a drain
        time passes, a report goes stale...), not at the next tick: that is when a POP's
        withdrawal gets confirmed (or held), while its agent is waiting."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if wake_at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # planning outside the server (tests, CLI): nothing to wake
            return
        self._wake = loop.call_later(max(0.0, wake_at - now) + 0.005, self.plan_soon)

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
    def plan_body(self, pop: str) -> dict[str, Any]:
        served = self.served[pop]
        return {**served.content, "generation": served.generation}

    async def wait_for_change(self, pop: str, after: int, wait: float) -> None:
        """Return when the POP's plan generation differs from ``after``, or after ``wait`` s."""
        served = self.served.get(pop)
        if served is None or served.generation != after or wait <= 0:
            return
        try:
            await asyncio.wait_for(self._event(pop).wait(), wait)
        except asyncio.TimeoutError:
            pass

    def _event(self, pop: str) -> asyncio.Event:
        return self._changed.setdefault(pop, asyncio.Event())

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
            vips = served.content["vips"]
            report = self.reports.get(pop.name)
            pops.append(PopSnapshot(pop.name, served.generation,
                                    sum(1 for v in vips if v["wanted"]), sum(1 for v in vips if v["safety_hold"]),
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

