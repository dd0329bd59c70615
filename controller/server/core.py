"""The controller's state and its planning step, without HTTP.

It keeps the last good desired state (a bad reload never replaces it), the freshest report
per POP, the drains, the planner's memory, and the per-POP plans with their generation
numbers (a POP's generation grows only when its plan's content changes). Planning is the
incremental engine's (``policy/engine.py``): a pass plans only the VIPs whose inputs
changed or whose time came; waiters of a POP are woken when its plan changes (long-poll).

Planning never blocks serving: inside the event loop a pass of more than SMALL_PASS VIPs
(a cold start, a commit or drain that touches many VIPs) runs in slices of about SLICE_S
seconds, yielding to the loop between them; the slices plan into a staging area and the
new plans become visible once the pass is whole, so requests answered meanwhile see the
previous, complete plan (then served POP by POP between turns of the loop: each POP's plan
is whole, old or new, never part of one). ``replan()`` plans at once (tests, the CLI, operator actions).

A report is acknowledged once stored (``accept_report``), not after its pass: the reports
that arrive within REPORT_BATCH share the next pass, which also waits while other reports are
still being received and stored (``receiving()``, REPORT_HOLD: a burst is one pass; a report
that changes verdicts is never held), and
``settled()`` waits for the pass that plans every report accepted so far (what the API's
plan-showing reads wait for).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import operator
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..config.desired_model import DesiredState, FleetVip, changed_vips, common_ends, with_dials
from ..config.errors import ConfigError
from ..config.model import Vip
from ..config.serialize import vip_to_dict
from ..metrics.central import ActiveOrigin, ControllerSnapshot, OriginWeight, PopSnapshot
from ..policy import change
from ..policy.engine import Changes, Engine, Pass, compact_report
from ..policy.model import (Alarm, PlanItem, PlannerState, PlanResult, PopReport, PopVipMemory, UniformItems,
                            VipMemory)
from ..policy.planner import VipPlan
from ..policy.steering import steered
from . import store
from .plans import PlanStore, PopPlan, SpecJson, as_spec_json

log = logging.getLogger("controller.server")
REPORT_BATCH = 0.01  # s: reports arriving within this share a planning pass
# s: while reports are being received (see receiving()), the pass of those stored waits until
# none was stored for this long, and at most REPORT_HOLD_MAX s after the first. Only reports
# that change no verdict wait (a POP's first, one after a stale one): 50 POPs' first full
# reports take seconds to parse on a loaded 2-vCPU machine, and a pass started among them
# took the GIL their parsing needed (a bound of 0.5 s after the first: the last answered
# after 6-20 s, passes in the middle). A body that never comes stores nothing: it holds the
# pass REPORT_HOLD s at most.
REPORT_HOLD = 1.0
REPORT_HOLD_MAX = 30.0
# s: the bound of a burst that brings POPs' first reports since the start (a cold start, or a
# restart after report_stale_after: within it the reports presumed from the saved state make
# each POP's first real report a change, and a change is never held). Such a burst is held
# past REPORT_HOLD_MAX while some POP of the inventory has not reported and first reports keep
# coming (the last one less than REPORT_FIRST_GAP ago: a POP dead at the start, never heard
# from, ends the hold a second after the last live POP's first report, not at this bound). At
# 100,000 VIPs x 300 POPs the 300 first reports take 45-70 s to take in, and a pass begun with
# part of them planned every VIP POP by POP (the POPs heard from healthy, the others silent:
# 30 million pairs, a per-pair memory), then again with the rest. A burst whose reports cover
# every POP of the inventory is held no longer (nothing more to wait for). Holding plans
# nothing the burst brought: the POPs keep the plans they have (the timers still plan what
# comes due: a stale report, a settle's end). Urgent reports and reports that change verdicts
# are never held.
REPORT_FIRST_HOLD_MAX = 180.0
REPORT_FIRST_GAP = 1.0  # s: ... and the last POP's first report came this recently
RETRY = 5.0  # s: while the state cannot be written, passes try again this often
SMALL_PASS = 256  # VIPs: a pass this small runs at once, a larger one in slices
SLICE_S = 0.004  # s of planning between two turns of the event loop
# s: a background pass re-renders the sentences that count down ("confirming for 0.4s more")
# of the VIPs planned at least this long ago, not of every one: each pass re-planned all of
# them (10,000 VIPs per pass during an incident, results 3al). Their decisions are not
# touched: a VIP whose time comes is planned then (its wake-up), whatever this says.
COUNTDOWN_REFRESH_S = 1.0
HINTED_MAX = 1000  # VIPs: a pass that changed more has every POP it serves walk its VIPs (no hint)


@dataclass(frozen=True)
class _DesiredIndex:
    desired: DesiredState
    by_pop: dict[str, dict[str, frozenset[str]]]  # pop -> published VIP -> its origin regions
    stale_after: float  # the shortest report_stale_after of any VIP
    names: frozenset[str]  # the VIPs
    fleet: Mapping[str, FleetVip]  # name -> definition (what the next index is updated from)
    all_enabled: bool = True  # no VIP is disabled (``by_pop`` then lists what the POPs announce)


class _Receiving:
    """Controller.receiving()'s context: a report being received and parsed."""

    __slots__ = ("_ctl",)

    def __init__(self, ctl: Controller) -> None:
        self._ctl = ctl

    def __enter__(self) -> None:
        self._ctl._incoming += 1

    def __exit__(self, *exc: object) -> None:
        self._ctl._incoming -= 1


@dataclass
class ConfigStatus:
    revision: str = ""
    loaded_at: float = 0.0
    last_error: str = ""  # empty: the last load worked
    last_error_revision: str = ""
    failures: int = 0


@dataclass
class PersistenceStatus:
    """Whether what the controller must remember is being written (``/v1/status``, metrics)."""

    state_dir: str = ""
    ok: bool = True  # False from a failed write until the next one succeeds
    errors: dict[store.StoreOp, int] = field(default_factory=lambda: {op: 0 for op in store.StoreOp})
    last_error: str = ""
    last_error_at: float = 0.0
    recovered: tuple[str, ...] = ()  # what the state at start could not be read from (an alarm until restart)


class ChangeRefused(change.ChangeRefused):
    """A confirm that does not fit the config change's state (HTTP 409); nothing changed."""


class ActionNotPersisted(Exception):
    """An operator action was refused because it could not be made durable (HTTP 503)."""


class ActionRefused(Exception):
    """An operator action refused by a gate (HTTP 409), with the gate's reason."""


@dataclass(frozen=True)
class DialChange:
    """A traffic dial an operator asks for, and what it would change: what a gate judges."""

    region: str
    pct: int
    by: str
    why: str
    before: DesiredState  # the desired state as planned now (config and operator dials)
    after: DesiredState  # with this dial


# A gate a dial is put to before it is journaled: a sentence refuses it (ActionRefused, nothing
# changed), None lets it through. The default (Controller.dial_budget) is the config change's
# budget: a dial may move the traffic of at most change.max_withdraw_fraction of the announced
# (VIP, POP) pairs; a forced dial skips the gate.
DialGate = Callable[[DialChange], str | None]


@dataclass
class Controller:
    """``desired``: the newest revision loaded (the *target*); ``applied``: the last revision
    applied everywhere, kept in the state directory (None: the same). While a config change
    is held or rolls out, ``self.desired`` is what the planner gets (policy/change.py)."""

    desired: DesiredState
    clock: Callable[[], float] = time.time
    applied: DesiredState | None = None
    on_applied: Callable[[DesiredState], None] | None = None  # a revision became the base: keep it
    reports: dict[str, PopReport] = field(default_factory=dict)
    plans: PlanStore = field(default_factory=PlanStore)  # what agents fetch (server/plans.py)
    result: PlanResult | None = None
    config: ConfigStatus = field(default_factory=ConfigStatus)
    persisted: store.Persisted = field(default_factory=store.Persisted)
    state_store: store.Store | None = None  # None: the file journal in desired.state_dir (locked while we run)
    persistence: PersistenceStatus = field(default_factory=PersistenceStatus)
    _wake: asyncio.TimerHandle | None = None
    # name -> each VIP's spec as served (its JSON and hash, not its dict), per desired state
    _spec_dicts: tuple[DesiredState | None, dict[str, SpecJson]] = (None, {})
    _saved: tuple[object, ...] = ()
    _pending: asyncio.Future[None] | None = None  # the pass that will plan the reports received
    _pending_timer: asyncio.Handle | None = None  # when that pass is asked for
    _pending_since: float = 0.0  # (loop time) when the first report waiting for it was stored
    _stored_at: float = 0.0  # (loop time) when the last report was stored
    _pending_urgent: bool = False  # a report waiting for it is urgent: it waits for no other
    _pending_changed: bool = False  # a report waiting for it changed verdicts (or is urgent): not held
    _pending_pops: set[str] = field(default_factory=set)  # the POPs whose reports wait for it
    _pending_first: bool = False  # one of them is a POP's first report since the start (REPORT_FIRST_HOLD_MAX)
    _heard: set[str] = field(default_factory=set)  # POPs that sent a report since the start
    _first_at: float = float("-inf")  # (loop time) when the last POP's first report since the start was stored
    _incoming: int = 0  # reports being received or parsed (receiving())
    _indexed: _DesiredIndex | None = None
    _durable: store.Persisted = field(default_factory=store.Persisted)  # the drains and generations the store holds
    _held: _DurableMemory = field(default_factory=lambda: _DurableMemory(PlannerState.initial()))  # and memory
    _seq: int = 0  # the store's sequence number after the last durable write
    # The pass's journal write in progress (slices, then a thread: see _save): its future, the state it
    # makes durable, the VIPs whose memory it covers, the frozen memory for the compaction.
    _writing: _Write | None = None
    _save_again: bool = False  # a pass asked to save while that write ran: once more after it
    _wrote: asyncio.Event | None = None  # set when a write ends (durable_plan's answers look again)
    _released: bool = False  # stopping (release_waiters): durable_plan waits no more
    _writer: concurrent.futures.ThreadPoolExecutor | None = None
    _preparing: asyncio.Task[None] | None = None  # the write's pre-phase in slices (_prepare), kept referenced
    # the loop on which the old records a write's end replaced are being dropped in pieces
    _letting_go: asyncio.AbstractEventLoop | None = None
    _retired: list[Any] = field(default_factory=list)  # (what _letting_go drops; appended to while it runs)
    _started: bool = False  # the store accepts appends (False after a failed start: retried)
    _failed_start: bool = False
    _presumed: set[str] = field(default_factory=set)  # POPs whose report is presumed (see _presume_reports)
    _alive_marked: float = 0.0
    _alive_fresh: set[str] = field(default_factory=set)
    # POP -> the ``seq`` of the last report applied (app.post_report refuses any not above it),
    # loaded from the store's alive hint so a restart does not reopen the replay of a report
    # captured before it; kept with the hint (store.Alive.seqs), not by an fsync per report.
    report_seqs: dict[str, int] = field(default_factory=dict)
    _engine: Engine | None = None
    _waiting: list[asyncio.Future[None]] = field(default_factory=list)  # reports for the next pass
    _unplanned: asyncio.Future[None] | None = None  # the pass of the newest report accepted (settled())
    _driver: asyncio.Task[None] | None = None  # runs the passes inside the event loop
    _again: bool = False  # a pass was asked for while one ran
    _staged: Pass | None = None  # the sliced pass in progress
    _committed: tuple[Changes, float] | None = None  # the sliced pass committed, its publishing a turn later
    _unserved: dict[str, None] = field(default_factory=dict)  # POPs a committed pass has yet to serve (in order)
    # POP -> (the items and spec dicts it was last served from, the VIPs whose item or spec
    # passes changed since): PlanStore.serve's hint (no walk over the POP's every VIP)
    _since_served: dict[str, tuple[Mapping[str, PlanItem], Mapping[str, SpecJson], set[str]]] = field(
        default_factory=dict)
    hints: bool = True  # False: every serve walks the POP's VIPs (the differential test's reference)
    dial_gate: DialGate | None = None  # see DialGate (None: dial_budget)
    rollout: change.Rollout = field(default_factory=change.Rollout)  # the config change in progress
    target: DesiredState = field(init=False)  # the newest revision loaded
    base: DesiredState = field(init=False)  # the last revision applied everywhere
    # What the config change serves (change.effective of base and target, their config dials
    # in it), before the operator's dials: ``desired`` is this with them over it.
    _configured: DesiredState | None = None
    # (base, rollout, spec dicts) -> the held POPs' spec dicts, and the definitions they hold
    _held_specs: tuple[object, object, object, Mapping[str, Mapping[str, SpecJson]],
                       Mapping[str, Mapping[str, Vip]]] = (None, None, None, {}, {})

    def __post_init__(self) -> None:
        """Load the state (StateDirLocked, StateUnreadable: the caller cannot start)."""
        if self.state_store is None:
            self.state_store = store.FileJournal(self.desired.state_dir, background=True)
        self.persistence = PersistenceStatus(self.desired.state_dir)
        try:
            loaded = self.state_store.load()
        except BaseException:
            self.state_store.close()
            raise
        self.persisted, self._durable, self._seq = loaded.state.copy(), loaded.state.copy(), loaded.seq
        self._held = _DurableMemory(loaded.state.planner)
        pending = self._resume_rollout(loaded.state.rollout)
        if loaded.problems:
            # Recovered from the previous good state without what could not be read: loud,
            # and kept in status until a restart (the operator should check the drains).
            self.persistence.recovered = loaded.problems
            self.persistence.errors[store.StoreOp.LOAD] += len(loaded.problems)
            for problem in loaded.problems:
                log.error("ALARM persistence: controller state partly unreadable, recovered without it: %s", problem)
        self._start_store()
        self._presume_reports(loaded.previous_alive)
        if loaded.previous_alive is not None:
            self.report_seqs = dict(loaded.previous_alive.seqs)
        # The engine starts from the loaded memory; its first pass plans every VIP (all are
        # new to it) with the presumed reports, so a restart resumes the timers where they were.
        self._engine = Engine(loaded.state.planner)
        self.config = ConfigStatus(revision=self.target.revision, loaded_at=self.clock())
        # How the daemon notices config changes (status "config.watch"; the daemon sets it)
        self.watch_status: Callable[[], dict[str, Any]] = dict
        self.replan()
        if pending:  # a revision committed while no controller ran: judged against what the base announces
            self._new_revision(self.target)

    def _resume_rollout(self, saved: Mapping[str, Any] | None) -> bool:
        """Start serving the base, the target, or the rollout between them the store kept;
        True if the target is new to the store (it must pass the gate, once planned)."""
        self.target = self.desired
        self.base = self.applied if self.applied is not None else self.desired
        rollout = None
        if saved is not None:
            try:
                rollout = change.from_json(saved)
            except (KeyError, ValueError, TypeError, AssertionError) as exc:
                log.error("ALARM persistence: the config change's state is unreadable (%s): judging revision %s "
                          "again", exc, self.target.revision)
        pending = False
        if self.base.revision == self.target.revision:
            self.rollout = change.Rollout(base=self.target.revision, target=self.target.revision,
                                          since=rollout.since if rollout else 0.0)
        elif rollout is not None and rollout.phase is change.Phase.STEADY and rollout.base == self.target.revision:
            # The store says the target is applied everywhere; its files are kept after that
            # (a leader that stopped in between left the previous ones): applied.
            self.base = self.target
            self.rollout = change.Rollout(base=self.target.revision, target=self.target.revision, since=rollout.since)
        elif rollout is not None and rollout.base == self.base.revision and rollout.target == self.target.revision:
            self.rollout = rollout
            if rollout.phase is not change.Phase.STEADY:
                log.error("ALARM resuming config change %s -> %s: %s", rollout.base, rollout.target,
                          rollout.alarm() or f"{rollout.phase}, {rollout.detail}")
        else:
            self.rollout = change.Rollout(base=self.base.revision, target=self.base.revision)
            pending = True
        self.persisted.rollout = change.to_json(self.rollout)
        self._plan_composed(change.effective(self.base, self.target, self.rollout))
        return pending

    def _plan_composed(self, composed: DesiredState) -> None:
        """Plan ``composed`` (what the config change serves) with the operator's dials over it:
        an operator's dial outlives revisions; a revision's own ``dials:`` are in ``composed``."""
        self._configured = composed
        self.desired = with_dials(composed, self._operator_dials())

    def _presume_reports(self, alive: store.Alive | None) -> None:
        """After a quick restart, presume each POP still says what it said last.

        The first passes after a start have no reports: every POP would be "not reporting,
        left to its own checks", which resets what only a fresh report keeps (a settle
        window, the withdrawal a dampening hold-down ordered; a dampened POP would announce
        again until its next report). A POP whose report was fresh when the previous
        controller was last alive gets a report made of the verdicts kept in memory (its
        verdict on each VIP's active origin; on each origin of a steered VIP), dated when the
        real one was received: it goes stale exactly when the real one would have, and the
        POP's next report replaces it.
        """
        if alive is None:
            return
        now = self.clock()
        stale_after = self._index().stale_after
        verdicts: dict[str, dict[str, Mapping[str, bool | None]]] = {}
        announced: dict[str, dict[str, bool]] = {}
        planner = self.persisted.planner
        for (pop, vip), memory in planner.pop_vips.items():
            if (vm := planner.vips.get(vip)) is not None and (kept := vm.verdicts.get(pop)) is not None:
                # A steered VIP: each origin's verdict. Its POPs judge different origins, so
                # one verdict per POP would change the others' views of each origin (a quorum
                # of fewer POPs): the first pass would move or reweight traffic.
                verdicts.setdefault(pop, {})[vip] = kept
                announced.setdefault(pop, {})[vip] = not memory.withdrawn
            elif memory.verdict is not None and vm is not None:
                active = vm.active
                if vm.routes and (fv := self.desired.vip(vip)) is not None and (
                        pref := fv.steering.preference(pop)) is not None:
                    # A POP with its own origin preference judged its own active origin.
                    active = vm.routes.get(",".join(pref.origins), (active, 0.0))[0]
                verdicts.setdefault(pop, {})[vip] = {active: memory.verdict}
                # (what it is presumed to announce once this presumed report goes stale too)
                announced.setdefault(pop, {})[vip] = not memory.withdrawn
        for pop, received_at in alive.fresh.items():
            if self.desired.pop(pop) is not None and now - received_at <= stale_after and pop not in self.reports:
                self.reports[pop] = PopReport(pop, received_at, 0, verdicts.get(pop, {}), announced.get(pop, {}))
                self._presumed.add(pop)
        if self._presumed:
            log.info("presuming the last verdicts of %s until they report (the previous controller was alive "
                     "%.1fs ago)", ", ".join(sorted(self._presumed)), now - alive.at)

    def close(self) -> None:
        """Release the state directory (its lock): another controller may start on it. The
        last hint first, so the next controller refuses every report this one applied."""
        if self.state_store is not None:
            self._flush()
            self._mark_alive(self.clock(), force=True)
            self.state_store.close()
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    def _start_store(self) -> bool:
        assert self.state_store is not None
        # After a failed start, what was loaded is no longer the whole truth (memory moved
        # on): the retry writes the current state as a snapshot one step further.
        seq = self._seq if not self._failed_start else self._seq + 1
        try:
            self.state_store.start(self.persisted, seq)
        except store.PersistenceError as exc:
            self._failed_start = True
            self._persistence_failed(exc)
            return False
        self._seq, self._started, self._durable = seq, True, self.persisted.copy()
        if self._engine is not None:  # the snapshot holds the engine's current memory
            self._held.snapshot(self._engine.plans)
        if self._failed_start:
            self._persistence_recovered()
        return True

    def persistence_failed(self, exc: store.PersistenceError) -> None:
        """A write of the state directory outside the journal failed (the kept desired state)."""
        self._persistence_failed(exc)

    def _persistence_failed(self, exc: store.PersistenceError) -> None:
        p = self.persistence
        p.errors[exc.op] += 1
        if p.ok or p.last_error != str(exc):
            log.error("ALARM persistence: %s (operator actions are refused until a write succeeds)", exc)
        p.ok, p.last_error, p.last_error_at = False, str(exc), self.clock()

    def _persistence_recovered(self) -> None:
        if not self.persistence.ok:
            log.warning("persistence works again in %s", self.persistence.state_dir)
        self.persistence.ok = True

    # --- inputs ------------------------------------------------------------------------
    def apply_config(self, new: DesiredState) -> None:
        """A new revision: applied at once if it withdraws nothing announced; else held (over
        the budget) or rolled out in waves (policy/change.py). Its ``dials:`` travel with it."""
        self.target = new
        self.config = ConfigStatus(revision=new.revision, loaded_at=self.clock(), failures=self.config.failures)
        log.info("desired state %s loaded: %d POP(s), %d VIP(s)", new.revision, len(new.pops), len(new.vips))
        self._new_revision(new)
        self._plan_soon()

    # --- config changes: the blast-radius budget and the staged rollout -------------------------
    def announced_pairs(self, vips: Iterable[FleetVip] | None = None) -> frozenset[change.Pair]:
        """The (VIP, POP) pairs the served desired state publishes (of ``vips``, default all)
        and its plans do not withdraw."""
        out = set()
        for fv in self.desired.vips if vips is None else vips:
            if fv.enabled:
                for pop in fv.publish:
                    item = self.item(pop, fv.name)
                    if item is None or item.wanted:
                        out.add((fv.name, pop))
        return frozenset(out)

    def blast_radius(self, new: DesiredState) -> tuple[change.BlastRadius, tuple[tuple[str, ...], ...]]:
        """What ``new`` would withdraw of what is announced now, and in which waves. Only the
        VIPs it changes are walked (a VIP whose definition is the same object, as the loader
        keeps it, withdraws nothing): a one-line commit costs O(VIPs), not O(VIPs x POPs).
        Judged against what is served before the operator's dials (a revision carries its own
        dials, not the operator's: else every dialed VIP would count as changed)."""
        assert self._configured is not None
        served = self._configured
        # (the VIPs it changes are between the tuples' common head and tail: only those walked)
        head, tail = common_ends(served.vips, new.vips)
        old_middle, new_middle = served.vips[head:len(served.vips) - tail], new.vips[head:len(new.vips) - tail]
        touched = changed_vips(old_middle, new_middle)
        old_vips = tuple(fv for fv in old_middle if fv.vip.name in touched) if touched else ()
        new_vips = tuple(fv for fv in new_middle if fv.vip.name in touched) if touched else ()
        load = {pop: self.served[pop].wanted for pop in self.served}
        radius = change.blast_radius(self.announced_pairs(old_vips),
                                     change.pairs(dataclasses.replace(served, vips=old_vips)),
                                     dataclasses.replace(new, vips=new_vips), announced_total=sum(load.values()),
                                     before=old_vips)
        return radius, change.waves(radius.withdrawn + radius.moved, load, self.base.change)

    def _new_revision(self, new: DesiredState) -> None:
        radius, waves = self.blast_radius(new)
        self._step(change.NewRevision(new.revision, radius, waves))

    def confirm_change(self, revision: str, by: str, reason: str) -> change.Rollout:
        """An operator confirms the held (or rolled-back) revision: it rolls out in waves.
        ChangeRefused if ``revision`` is not the one waiting; ActionNotPersisted if the
        confirm cannot be saved (nothing changed either way)."""
        radius, waves = self.blast_radius(self.target)
        try:
            self._step(change.Confirm(revision, by, reason, radius, waves), durable=f"confirm of revision {revision}")
        except change.ChangeRefused as exc:
            raise ChangeRefused(str(exc)) from None
        log.warning("config revision %s confirmed by %s: %s", self.target.revision, by, reason)
        return self.rollout

    def _step(self, event: change.Event, durable: str = "") -> None:
        """One transition of the config change (the base's ``change`` policy: a revision
        cannot loosen the budget that judges it), then serve what it says."""
        now = self.clock()
        new, effects = change.step(self.rollout, event, now, self.base.change)
        if new == self.rollout:
            return
        if new.phase is change.Phase.ROLLING and (new.target, new.wave, new.wave_started) != (
                self.rollout.target, self.rollout.wave, self.rollout.wave_started):
            # A wave begins: what is unhealthy at its POPs now is not the change's doing.
            new = dataclasses.replace(new, excused=change.excused(new, self.desired, self.reports, self.item, now,
                                                                  self._min_stale_after(),
                                                                  self._published(new.waves[new.wave]),
                                                                  self.result.pops if self.result else {}))
        doc = change.to_json(new)
        if durable:
            self._persist_action(store.Changes(rollout=doc), durable)
        self.rollout = new
        self.persisted.rollout = doc
        for e in effects:
            if e.kind is change.EffectKind.HELD:
                log.error("ALARM change_held: %s", e.text)
            elif e.kind is change.EffectKind.ROLLED_BACK:
                log.error("ALARM rollout_rolled_back: %s", e.text)
            elif e.kind is change.EffectKind.WAVE:
                log.warning("%s", e.text)
            else:
                log.info("%s", e.text)
                self.base = self.target
                if self.on_applied is not None:
                    self.on_applied(self.target)
        self._set_effective()
        if not durable:
            self._save()

    def _set_effective(self) -> None:
        new = change.effective(self.base, self.target, self.rollout)
        if new is self._configured:
            return
        for pop in {p.name for p in self.desired.pops} - {p.name for p in new.pops}:
            self.reports.pop(pop, None)
        self._plan_composed(new)
        self._plan_soon()

    def _check_gate(self) -> None:
        if self.rollout.phase is not change.Phase.ROLLING:
            return
        result = change.gate(self.rollout, self.base.change, self.clock(), self.desired, self.reports,
                             self.persisted.generations, self._min_stale_after(), self.item,
                             self._published(self.rollout.waves[self.rollout.wave]))
        if result.verdict is not change.Verdict.WAIT:
            self._step(result)

    def change_alarm(self) -> dict[str, str] | None:
        """The config change's alarm (held, rolled back) as /v1/status lists alarms (about no
        VIP: ``vip`` empty); the metric is anycast_controller_change_phase."""
        text = self.rollout.alarm()
        if not text:
            return None
        kind = "change_held" if self.rollout.phase is change.Phase.HELD else "rollout_rolled_back"
        return {"kind": kind, "vip": "", "detail": text}

    def reject_config(self, exc: ConfigError, revision: str) -> None:
        self.config.last_error = exc.summary()
        self.config.last_error_revision = revision
        self.config.failures += 1
        log.error("config revision %s rejected, still serving %s:\n%s", revision, self.desired.revision,
                  exc.summary())

    def add_report(self, report: PopReport) -> None:
        self.reports[report.pop] = compact_report(report, self.reports.get(report.pop))
        self._heard.add(report.pop)
        self.replan()

    def accept_report(self, report: PopReport) -> asyncio.Future[None] | None:
        """Store the report and have it planned soon; the future of the pass that will plan
        it (None: nothing to plan). Returns at once: the API acknowledges a report when it
        is stored, not after its pass (50 POPs reporting at once were answered one pass
        later, seconds at 10,000 VIPs; agents never needed the wait: a plan the report
        changes wakes their long-poll). Reports that arrive together share one pass. A
        report that says what the POP's previous, still fresh, report said changes no plan:
        it is stored (it keeps the POP fresh) and the next pass sees it."""
        previous = self.reports.get(report.pop)
        report = self.reports[report.pop] = compact_report(report, previous)  # equal origins: the same object
        first = report.pop not in self._heard
        self._heard.add(report.pop)
        with contextlib.suppress(RuntimeError):  # (no loop: a test, the CLI)
            self._stored_at = asyncio.get_running_loop().time()
            if first:
                self._first_at = self._stored_at
        if self._pending is not None:
            self._pending_pops.add(report.pop)
        if (previous is not None and previous.origins is report.origins and previous.checks == report.checks
                and report.received_at - previous.received_at < self._min_stale_after()):
            return None
        loop = asyncio.get_running_loop()
        # A report with check ages (a failure starting or confirmed here, evidence asked of
        # it) is what a POP's withdrawal is waiting for, and one whose verdicts changed (an
        # origin back, a standby's health) is what a plan waits for: planned in the next turn
        # of the loop (reports already received share that pass), not after the batching
        # delay, and never held while others are being received (receiving()). (A POP's first
        # report is no change: a burst.) compact_report keeps the previous report's mapping
        # when the verdicts are equal: the same object.
        changed = previous is not None and report.origins is not previous.origins
        urgent = bool(report.checks) or changed
        self._pending_changed = self._pending_changed or urgent
        self._pending_first = self._pending_first or first
        if self._pending is None:
            self._pending = loop.create_future()
            self._pending_since, self._pending_urgent = loop.time(), urgent
            self._pending_pops = {report.pop}
            self._pending_timer = (loop.call_soon(self._planned_reports) if urgent
                                   else loop.call_later(REPORT_BATCH, self._planned_reports))
            self._unplanned = self._pending
        elif urgent and not self._pending_urgent:
            self._pending_urgent = True
            if self._pending_timer is not None:
                self._pending_timer.cancel()
            self._pending_timer = loop.call_soon(self._planned_reports)
        return self._pending

    def receiving(self) -> _Receiving:
        """Around the receipt and parsing of a report (the API's handler): the pass of the
        reports already stored waits for it, at most REPORT_HOLD s after the first of them
        (an urgent report waits for none). 50 POPs reporting at once (after a restart of the
        controller or of the network) are then planned in one pass, not in one per wave of
        arrivals: each pass planned all 10,000 VIPs again, and the passes held the GIL the
        worker threads parsing the other reports needed (the last answered after 5-8 s).
        (A plain context manager, not a generator's: one per report, 25 a second.)"""
        return _Receiving(self)

    async def take_report(self, report: PopReport) -> None:
        """accept_report(), then return once a pass has planned with the report."""
        pending = self.accept_report(report)
        if pending is not None:
            await asyncio.shield(pending)

    async def published(self) -> None:
        """Return once no pass is between its commit and its publishing: the engine's notes
        are then the new ones while the alarms, generations and plans shown are the last
        published (the window is one turn of the loop); what /v1/status shows is one pass."""
        while self._committed is not None:
            await asyncio.sleep(0)

    async def settled(self) -> None:
        """Return once every report accepted so far has been planned: what a read that must
        see them waits for (status, explain, snapshot, a whole plan). Passes plan reports in
        the order they were accepted, so the newest report's pass covers all before it."""
        pending = self._unplanned
        if pending is not None and not pending.done():
            await asyncio.wait([pending])

    def _published(self, pops: Iterable[str]) -> dict[str, Collection[str]]:
        """change.published_at(self.desired, pops) from the index: the enabled VIPs each POP
        publishes (the gate of a rollout's wave asked on every pass, walking every pair)."""
        ix = self._index()
        fleet = ix.fleet
        out: dict[str, Collection[str]] = {}
        for pop in pops:
            names = ix.by_pop.get(pop, {})
            out[pop] = names.keys() if ix.all_enabled else [n for n in names if fleet[n].enabled]
        return out

    def _min_stale_after(self) -> float:
        return self._index().stale_after

    def published_regions(self, pop: str) -> dict[str, frozenset[str]]:
        """The VIPs ``pop`` publishes and their origin regions (to validate its reports)."""
        return self._index().by_pop.get(pop, {})

    def _index(self) -> _DesiredIndex:
        """Lookups derived from the desired state, once per desired state (``index``)."""
        ix = self._indexed
        if ix is None or ix.desired is not self.desired:
            ix = self._indexed = index(self.desired, ix)
        return ix

    def _holding(self) -> bool:
        """Whether the pass of the reports stored waits for others being received: a burst
        of reports that change no verdict, still making progress (see REPORT_HOLD)."""
        if self._pending is None or not self._incoming or self._pending_changed:
            return False
        now = asyncio.get_running_loop().time()
        if now - self._stored_at >= REPORT_HOLD:
            return False  # (a body that never comes)
        if all(p.name in self._pending_pops for p in self.desired.pops):
            return False  # every POP's report is in: nothing more to wait for
        if now - self._pending_since < REPORT_HOLD_MAX:
            return True
        # POPs' first reports still coming in (the last one REPORT_FIRST_GAP ago at most: the
        # other POPs' next reports, which keep coming, do not hold it), some POP not heard from yet
        return (self._pending_first and now - self._pending_since < REPORT_FIRST_HOLD_MAX
                and now - self._first_at < REPORT_FIRST_GAP
                and not all(p.name in self._heard for p in self.desired.pops))

    def _planned_reports(self) -> None:
        loop = asyncio.get_running_loop()
        if self._holding():
            self._pending_timer = loop.call_later(REPORT_BATCH, self._planned_reports)  # more on the way
            return
        done, self._pending, self._pending_timer = self._pending, None, None
        self._pending_urgent = self._pending_changed = self._pending_first = False
        self._pending_pops = set()
        assert done is not None
        self._waiting.append(done)
        self._plan_soon()

    def drain(self, pop: str) -> bool:
        """Start draining ``pop``; False if it is drained already. Durable before it counts:
        ActionNotPersisted (and nothing changed) if the state cannot be written."""
        if pop in self.persisted.drains:
            return False
        now = self.clock()
        self._persist_action(store.Changes(drains={pop: now}), f"drain of POP {pop}")
        self.persisted.drains[pop] = now
        log.info("drain of POP %s started", pop)
        self.replan()
        return True

    def undrain(self, pop: str) -> bool:
        if pop not in self.persisted.drains:
            return False
        self._persist_action(store.Changes(drains={pop: None}), f"undrain of POP {pop}")
        del self.persisted.drains[pop]
        log.info("POP %s undrained", pop)
        self.replan()
        return True

    def _operator_dials(self) -> dict[str, int]:
        return {r: d.pct for r, d in self.persisted.dials.items()}

    def regions(self) -> set[str]:
        return {o.region for fv in self.desired.vips for o in fv.vip.origins}

    def dial_budget(self, c: DialChange) -> str | None:
        """The default dial gate: the base revision's change budget (policy/change.py)."""
        moved = change.dial_radius(c.region, c.before, c.after, self.item)
        why = change.dial_over_budget(moved, sum(p.wanted for p in self.served.values()), self.base.change)
        return why or None

    def dial(self, region: str, pct: int | None, by: str, why: str, force: bool = False) -> bool:
        """Set an origin region's traffic dial (0-100), or (``pct`` None) hand it back to the
        config; False if nothing changes. Recorded with who and why, durable before it counts
        (ActionNotPersisted), and first put to ``dial_gate`` unless ``force`` (ActionRefused).
        Moves traffic between origins only: no BGP announcement changes because of a dial."""
        if region not in self.regions():
            raise KeyError(region)
        current = self.persisted.dials.get(region)
        if (current.pct if current else None) == pct:
            return False
        operator = self._operator_dials()
        if pct is None:
            operator.pop(region, None)
        else:
            operator[region] = pct
        assert self._configured is not None
        after = with_dials(self._configured, operator)
        what = f"dial of {region} to {pct if pct is not None else 'the config'}"
        gate = self.dial_gate if self.dial_gate is not None else self.dial_budget
        if not force and (refusal := gate(DialChange(region, pct if pct is not None else -1, by, why,
                                                     self.desired, after))) is not None:
            raise ActionRefused(f"{what} refused: {refusal}; to do it anyway: anycastctl dial --force "
                                f"(API: \"force\": true)")
        record = None if pct is None else store.Dial(pct, by, why, self.clock())
        self._persist_action(store.Changes(dials={region: record}), what)
        if record is None:
            self.persisted.dials.pop(region, None)
        else:
            self.persisted.dials[region] = record
        log.log(logging.WARNING if force else logging.INFO, "traffic dial of %s set to %s by %s%s: %s", region,
                pct if pct is not None else "the config's", by, " (forced past the dial gate)" if force else "", why)
        self.desired = after
        self.replan()
        return True

    def _mark_alive(self, now: float, force: bool = False) -> None:
        """Tell the store which POPs' reports are fresh (for _presume_reports after a restart)
        and the last report number applied per POP: about once a second, and at once when the
        fresh set changes."""
        assert self.state_store is not None
        stale_after = self._index().stale_after
        fresh = {pop: r.received_at for pop, r in self.reports.items() if now - r.received_at <= stale_after}
        if force or abs(now - self._alive_marked) >= 1.0 or fresh.keys() != self._alive_fresh:
            self.state_store.mark_alive(now, fresh, dict(self.report_seqs))
            self._alive_marked, self._alive_fresh = now, set(fresh)

    def _persist_action(self, changes: store.Changes, what: str) -> None:
        """Journal an operator action on its own, now, or raise ActionNotPersisted."""
        assert self.state_store is not None
        self._finish_write(resave=False)  # (the journal's order: the pass's write in progress first)
        if not self._started and not self._start_store():
            raise ActionNotPersisted(f"{what} refused: the controller cannot save its state "
                                     f"({self.persistence.last_error})")
        try:
            self._seq = self.state_store.append(changes, self._seq)
        except store.PersistenceError as exc:
            self._persistence_failed(exc)
            raise ActionNotPersisted(f"{what} refused: the controller cannot save its state ({exc})") from None
        for pop, at in changes.drains.items():  # (an action changes drains or dials only: no copy of the planner's maps)
            if at is None:
                self._durable.drains.pop(pop, None)
            else:
                self._durable.drains[pop] = at
        for region, d in changes.dials.items():
            if d is None:
                self._durable.dials.pop(region, None)
            else:
                self._durable.dials[region] = d
        if changes.rollout is not None:
            self._durable.rollout = changes.rollout
        self._persistence_recovered()
        if self._save_again:  # (a pass asked to save while the write taken in above ran)
            self._save()

    # --- planning ----------------------------------------------------------------------
    def plan_soon(self) -> None:
        """Plan what changed or came due, in the background of the running event loop (at
        once when there is none: tests, the CLI). The serve loop's tick calls it, as a safety
        net: timers are scheduled on their own (``_schedule``). While a burst of reports is
        held (``_holding``) the tick's pass is the burst's: it would plan the reports stored
        so far in the middle of the burst, on the GIL the others' parsing needs."""
        with contextlib.suppress(RuntimeError):  # (no running loop: nothing is held)
            if self._holding():
                return  # planned when the hold ends (_planned_reports)
        self._plan_soon()

    def _plan_soon(self) -> None:
        self._check_gate()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.replan()
            return
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        else:
            self._again = True

    def planning(self) -> asyncio.Task[None] | None:
        """The passes running in the background (_drive), if any: done once nothing is
        dirty or waiting, every pass it ran served."""
        return self._driver

    async def _drive(self) -> None:
        """Passes until nothing is dirty or waiting. The futures of reports waiting for a pass
        are resolved after the first pass that began after they were stored."""
        engine = self._get_engine()
        while True:
            self._again = False
            waiters, self._waiting = self._waiting, []
            try:
                now = self.clock()
                # The reports taken in SLICE_S at a time (a burst's 50 full reports compared
                # VIP by VIP: ~15 ms in one piece), a turn of the loop between; each call takes
                # what came meanwhile too (the reports already taken in are not looked at twice).
                while not engine.mark(self.desired, self.reports, self.persisted.drains, now, SLICE_S):
                    await asyncio.sleep(0)
                    now = self.clock()
                # A pass runs when something is dirty or waiting; it plans the VIPs whose
                # explanations count down too, those planned COUNTDOWN_REFRESH_S ago or more,
                # in slices when that is more than SMALL_PASS. (The choice counted them while a sliced pass left them out:
                # with more than SMALL_PASS counting down, each wake-up ran an empty pass and
                # their "in N s" stayed as of their last plan.)
                if not (waiters or engine.dirty() or self._served_specs_moved()):
                    pass
                elif engine.dirty(now, COUNTDOWN_REFRESH_S) > SMALL_PASS:
                    await self._sliced(engine, now)
                else:
                    # (at the clock the choice counted on: a later one could find every VIP of
                    # a sliced pass a second ago due at once, and plan them all in one piece)
                    self.replan(refresh_after=COUNTDOWN_REFRESH_S, now=now)
            except Exception as exc:  # noqa: BLE001 - a planner bug must not take the API down
                log.exception("planning failed; agents keep the last plan")
                self._staged = None  # a broken pass is never published
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                        w.exception()  # retrieved: a report acknowledged without waiting is no "never retrieved" error
                if not self._waiting:
                    return
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)
            if not self._waiting and not self._again:
                return

    def _served_specs_moved(self) -> bool:
        """Whether the definitions served may have changed with no VIP to re-plan: a new
        desired state, or a config change's wave began or ended (a definition-only move, a
        MED, re-plans nothing, yet the POPs it reaches must be served the new spec; before,
        they kept the old one until some other pass ran, in a steady fleet never)."""
        held = self._held_specs
        return self._spec_dicts[0] is not self.desired or held[0] is not self.base or held[1] is not self.rollout

    async def _sliced(self, engine: Engine, now: float) -> None:
        """One large pass, SLICE_S of planning at a time; visible when whole. It plans what
        replan() would: the dirty VIPs and those counting down planned COUNTDOWN_REFRESH_S ago
        or more (the count _drive chose on)."""
        p = self._staged = engine.begin(now, refresh_after=COUNTDOWN_REFRESH_S)
        await asyncio.sleep(0)  # (the pass's VIPs sorted: a piece of its own)
        if self._staged is not p:
            return
        while not engine.compute(p, SLICE_S):
            await asyncio.sleep(0)  # answer requests (from the previous plan) meanwhile
            if self._staged is not p:
                return  # replan() finished and published it meanwhile
        await asyncio.sleep(0)  # (the commit is a piece of its own)
        if self._staged is not p:
            return
        self._staged = None
        retired: list[VipPlan] = []  # (the plans the commit replaced: let go of in pieces, below)
        committed = self._committed = (engine.commit(p, retired), now)
        try:
            await asyncio.sleep(0)  # (the commit is a piece, its publishing another)
        except asyncio.CancelledError:  # (the loop is ending: what was committed is published, saved)
            if self._committed is committed:
                self._committed = None
                self._publish(*committed)
            raise
        if self._committed is not committed:
            return  # replan() published it meanwhile (and served and saved it)
        self._committed = None
        self._publish(*committed, defer=True)
        try:
            await asyncio.sleep(0)  # (the commit was one piece: the serving next is another)
            for _ in _let_go(retired):
                await asyncio.sleep(0)
            for _ in self._warm_unserved():
                await asyncio.sleep(0)
            for _ in self._walk_first_unserved():
                await asyncio.sleep(0)
            while not self._serve_unserved(SLICE_S):
                await asyncio.sleep(0)  # requests meanwhile: each POP's plan is whole, old or new
        finally:
            self._save()  # (the answers of what was served wait for it: durable_plan)

    def _warm_unserved(self) -> Iterator[None]:
        """Ahead of serving the POPs a large pass changed, the entries their new items need
        (PlanStore.warm), SLICE_S at a time (a step of the iterator each): the first POP's
        serve after a burst made 10,000 entries in one piece. Each distinct mapping once
        (POPs healthy alike share one); only the VIPs whose item is not the one served."""
        engine = self._get_engine()
        done: set[int] = set()
        # The last mapping warmed and its spec dicts: of the next, only the VIPs whose item is
        # another object need warming (after the first reports at 100,000 x 300 each POP had
        # a mapping of its own, a few items apart, and each was warmed in full: 30 million steps).
        last: tuple[Mapping[str, PlanItem], Mapping[str, SpecJson]] | None = None
        for pop in list(self._unserved):
            items = engine.items.get(pop)
            if items is None or id(items) in done or pop not in self._unserved:
                continue
            done.add(id(items))
            pp = self.plans.pops.get(pop)
            seen = pp.seen_items if pp is not None else {}
            spec_dicts = self._held_specs[3].get(pop, self._spec_dicts[1])
            since = self._since_served.get(pop) if self.hints else None
            if since is not None and since[1] is spec_dicts and pp is not None and len(since[2]) < len(items) // 8:
                # Served since the last large change (the serve's own hint): only the VIPs
                # touched since can need an entry (a pass of 1,000 VIPs at 100,000 x 300 walked
                # all 30 million items here). A warm is the serve's cache filled ahead: one
                # that misses an entry costs the serve making it, never a plan.
                names = [n for n in since[2] if (i := items.get(n)) is not None and i is not seen.get(n)]
                if len(names) >= SMALL_PASS:
                    at = 0
                    while at < len(names):
                        at = self.plans.warm(names, items, spec_dicts, at, SLICE_S)
                        if at < len(names):
                            yield
                continue
            # (in C: the VIPs whose item is another object than the one served)
            values = items.values()
            fresh = map(operator.is_not, values, map(seen.get, items))
            if last is not None and last[1] is spec_dicts:
                fresh = map(operator.and_, fresh, map(operator.is_not, values, map(last[0].get, items)))
            names = list(itertools.compress(items, fresh))
            last = (items, spec_dicts)
            if len(names) < SMALL_PASS:
                continue
            at = 0
            while at < len(names):
                at = self.plans.warm(names, items, spec_dicts, at, SLICE_S)
                if at < len(names):
                    yield

    def _walk_first_unserved(self) -> Iterator[None]:
        """The walk of the first POP to serve (PlanStore.walk_ahead), SLICE_S at a time (a step
        of the iterator each), ahead of its serve, which takes it (and so do the POPs served
        alike): after a burst the first POP's serve walked 10,000 candidates in one piece
        (30-80 ms). What it serves is what its own walk would: the walk is kept only for the
        very mappings and entries it started from."""
        if not self._unserved:
            return
        pop = next(iter(self._unserved))
        items = self._get_engine().items.get(pop)
        if items is None:
            return
        base = self._spec_dicts[1]
        spec_dicts = self._held_specs[3].get(pop, base)
        yield from self.plans.walk_ahead(pop, items, spec_dicts, self.desired if spec_dicts is base else None, SLICE_S)

    def _get_engine(self) -> Engine:
        assert self._engine is not None, "made in __post_init__ from the loaded memory"
        return self._engine

    def replan(self, *, refresh_after: float = 0.0, now: float | None = None) -> PlanResult:
        """Plan now whatever changed or came due, and the countdowns in explanations (those
        planned ``refresh_after`` ago or more: the background passes say COUNTDOWN_REFRESH_S;
        an operator's action, the CLI, a test: every one). ``now``: the clock's reading to
        plan at (the background pass's, taken when it chose this unsliced pass), else read."""
        engine = self._get_engine()
        if self._staged is not None:  # a sliced pass in progress: finish it first
            p, self._staged = self._staged, None
            engine.compute(p)
            self._publish(engine.commit(p), p.now)
        if self._committed is not None:  # a sliced pass committed, not yet published: first
            committed, self._committed = self._committed, None
            self._publish(*committed)
        now = self.clock() if now is None else now
        engine.mark(self.desired, self.reports, self.persisted.drains, now)
        p = engine.begin(now, refresh_after=refresh_after)
        engine.compute(p)
        result = self._publish(engine.commit(p), now)
        self._check_gate()
        return self.result or result

    def _publish(self, changes: Changes, now: float, defer: bool = False) -> PlanResult:
        """Log, persist and serve what a committed pass changed (``defer``: the caller serves,
        with _serve_unserved, then saves)."""
        engine = self._get_engine()
        for a in changes.new_alarms:
            log.warning("ALARM %s for VIP %s: %s", a.kind, a.vip, a.detail)
        origin: dict[str, str] = {}  # note -> _origin_of(note): a burst changes 10,000 notes, few distinct
        for vip, (old, note) in changes.notes.items():
            if old is None or _origin(old, origin) != _origin(note, origin):
                log.info("VIP %s: %s", vip, note)
        result = PlanResult(engine.state(), engine.items, engine.notes, engine.alarms(), engine.settle_at())
        self.result = result
        wake = engine.next_wake()
        if (gate_at := self.rollout.wake_at(self.base.change)) is not None:
            gate_at = gate_at if gate_at > now else now + 1.0  # past the bake: look again each second
            wake = gate_at if wake is None else min(wake, gate_at)
        self._schedule(wake, now)
        self.persisted.planner = result.state
        self._held.unsaved |= changes.memory
        pops = set(changes.pops)
        touched: set[str] | None = set(changes.planned) | changes.removed  # (what the hints add)
        if self._spec_dicts[0] is not self.desired:
            # Each VIP's definition as JSON, once per desired state, not once per POP and pass;
            # an unchanged VIP keeps its object, so comparing plans after a reload stays cheap.
            # The POPs of a VIP whose definition changed are served again (its spec is in
            # their plans); a publish list's change or a removed VIP changes items, which
            # the engine reports in changes.pops; the other POPs' plans cannot have changed.
            # Only the VIPs between the common head and tail of the two VIP tuples are looked
            # at (the rest are the same objects): a one-VIP commit walked 10,000 here.
            old_state, old_specs = self._spec_dicts
            looked_at: tuple[FleetVip, ...] = self.desired.vips
            old_vips: dict[str, Vip] = {}
            specs: dict[str, SpecJson] = {}
            if old_state is not None:
                head, tail = common_ends(old_state.vips, self.desired.vips)
                old_vips = {v.name: v.vip for v in old_state.vips[head:len(old_state.vips) - tail]}
                looked_at = self.desired.vips[head:len(self.desired.vips) - tail]
                specs = dict(old_specs)
                for name in old_vips:
                    specs.pop(name, None)
            for fv in looked_at:
                was = old_vips.get(fv.name)
                if was is not None and (was is fv.vip or was == fv.vip):
                    specs[fv.name] = old_specs[fv.name]
                else:
                    specs[fv.name] = as_spec_json(vip_to_dict(fv.vip))
                    pops.update(fv.publish)
                    if touched is not None:
                        touched.add(fv.name)
            if old_state is None:
                touched = None
            elif touched is not None:
                touched.update(name for name in old_vips if name not in specs)
            self._spec_dicts = (self.desired, specs)
        if touched is None or len(touched) > HINTED_MAX:
            self._since_served.clear()  # (a walk per POP is as cheap, or the changes are unknown)
        else:
            for since in self._since_served.values():
                since[2].update(touched)
        # (adds to ``pops`` the POPs whose held definitions changed: a wave began, a rollback)
        self._held_spec_dicts(self._spec_dicts[1], pops)
        for pop in self.desired.pops:
            if pop.name in pops or pop.name not in self.served:
                self._unserved[pop.name] = None
        if not defer:
            try:
                self._serve_unserved()
            finally:
                self._save()  # (the answers of what was served wait for it: durable_plan)
        return result

    def _serve_unserved(self, budget_s: float | None = None) -> bool:
        """Serve the POPs whose plans a committed pass may have changed, from the engine's
        items as they are now, for about ``budget_s`` seconds (None: all); True when none
        is left. A pass in slices serves POP by POP between turns of the event loop (after a
        cold start, 50 plans of 10,000 entries took seconds in one piece); any pass that
        runs meanwhile serves the rest, so no POP is left with an older plan."""
        engine = self._get_engine()
        start = time.perf_counter()
        known = {p.name for p in self.desired.pops}
        while self._unserved:
            spec_dicts = self._spec_dicts[1]
            changed: set[str] = set()  # (the rollout moved on between two POPs: theirs too)
            held = self._held_spec_dicts(spec_dicts, changed)
            for name in changed:
                self._unserved.setdefault(name, None)
            pop = next(iter(self._unserved))
            del self._unserved[pop]
            if pop in known:
                self._serve(pop, engine.items.get(pop, {}), held.get(pop, spec_dicts))
            if budget_s is not None and time.perf_counter() - start >= budget_s:
                break
        return not self._unserved

    def _held_spec_dicts(self, spec_dicts: dict[str, SpecJson],
                         pops: set[str]) -> Mapping[str, Mapping[str, SpecJson]]:
        """Per POP whose wave has not come, the spec dicts with the base's definition of the
        VIPs whose traffic the config change moves (change.held_specs); adds to ``pops`` the
        POPs whose definitions changed since the last pass (a wave began, a rollback)."""
        cached = self._held_specs
        if cached[0] is self.base and cached[1] is self.rollout and cached[2] is spec_dicts:
            return cached[3]
        held = change.held_specs(self.base, self.rollout)
        pops.update(p for p in cached[4].keys() | held.keys() if cached[4].get(p) != held.get(p))
        views: dict[str, Mapping[str, SpecJson]] = {}
        for pop, vips in held.items():
            own = {name: as_spec_json(vip_to_dict(v)) for name, v in vips.items() if name in spec_dicts}
            views[pop] = collections.ChainMap(own, spec_dicts)
        self._held_specs = (self.base, self.rollout, spec_dicts, views, held)
        return views

    def _serve(self, pop: str, items: Mapping[str, PlanItem], spec_dicts: Mapping[str, SpecJson]) -> None:
        """Make ``items`` the POP's plan if an agent would act differently on it (a new
        explanation or revision alone is no new plan: agents are not woken for nothing)."""
        own = spec_dicts is not self._spec_dicts[1]  # (a held POP's: compared VIP by VIP, not by the desired state)
        since = self._since_served.pop(pop, None)
        generation = self.plans.serve(pop, items, spec_dicts, self.desired.revision,
                                      self.persisted.generations.get(pop, 0), None if own else self.desired,
                                      since if self.hints and not own else None)
        if not own:  # (a held POP's view changes with the rollout, not with the passes: no hint)
            self._since_served[pop] = (items, spec_dicts, set())
        if generation is not None:
            self.persisted.generations[pop] = generation

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
        self._wake = loop.call_later(max(0.0, wake_at - now) + 0.005, self._plan_soon)

    def _save(self, sync: bool = False) -> None:
        """Journal what changed since the last durable write: drains and generations by
        comparison (per POP: small), the memory of the VIPs the engine said changed (never
        all pairs; most passes change nothing). A failure raises the persistence alarm and is
        retried every RETRY seconds: the journal gets the difference from what it holds, so
        nothing is skipped.

        In the event loop, with a store that can (``threaded_append``), the comparison and
        the JSON run on the loop in slices of SLICE_S (a burst of first reports changes
        500,000 pairs: 1-2 s of CPU), and the write and its fsync in a thread, one write at a
        time and in order (a store without ``append_text``: all of it in the thread); a plan's answer waits until
        its generation is durable (``durable_plan``), as before, when the write held the loop
        until it was. ``sync``: on this thread, now (stopping)."""
        assert self.state_store is not None
        now = self.clock()
        self._mark_alive(now)
        if self._writing is not None:
            self._save_again = True  # after the write in progress, with what changed since
            return
        if not self.persistence.ok and abs(now - self.persistence.last_error_at) < RETRY:
            return  # failing: retried every RETRY s (a retry may serialize the whole state), actions at once
        if not self._started and not self._start_store():
            return
        self._save_again = False  # (this write covers what it was asked for)
        engine = self._get_engine()
        drains = store.diff_map(self._durable.drains, self.persisted.drains)
        generations = store.diff_map(self._durable.generations, self.persisted.generations)
        rollout = self.persisted.rollout if self.persisted.rollout != self._durable.rollout else None
        names, self._held.unsaved = self._held.unsaved, set()
        submitted = self.persisted.copy()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if sync or loop is None or not getattr(self.state_store, "threaded_append", False):
            job = _WriteJob(self.state_store, self._held, names, engine.plans, self._index().names,
                            drains, generations, rollout, self._seq)
            try:
                result = job()
            except store.PersistenceError as exc:
                self._held.unsaved |= names
                self._persistence_failed(exc)
                self._wake_durable()  # (failing: they answer, under the alarm)
                return
            except BaseException:  # (Conflict: another writer; the caller's)
                self._held.unsaved |= names
                self._wake_durable()
                raise
            w = _Write(concurrent.futures.Future(), submitted, names, None, None)
            w.future.set_result(result)
            self._writing = w
            self._finish_write()
            return
        # The write reads the plans as of now (a copy of the name -> plan mapping: the plans
        # are immutable) and the held memory (changed only when a write ends, here).
        job = _WriteJob(self.state_store, self._held, names, dict(engine.plans), self._index().names,
                        drains, generations, rollout, self._seq)
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
        future: concurrent.futures.Future[tuple[int | None, _Records, set[str]]] = concurrent.futures.Future()
        prep = None
        if hasattr(self.state_store, "append_text"):
            # Its Python on this loop in slices (_Prep), only the write and fsync in the thread:
            # a thread running the comparison and the JSON kept the loop out 0.1-0.4 s at a
            # time after a burst's pass, taking the GIL at each of its system calls (3q, 3v).
            budget = store.Budget(SLICE_S)
            prep = _Prep(job.prepared(budget), budget, future, self._writer)
        else:
            self._writer.submit(_settle, future, job)
        w = _Write(future, submitted, names, engine.frozen_state(), prep)
        self._writing = w
        asyncio.wrap_future(future).add_done_callback(lambda f: self._write_ended(f, w))
        if prep is not None:
            self._preparing = loop.create_task(self._prepare(w, prep))

    async def _prepare(self, w: _Write, prep: _Prep) -> None:
        """The write ``w``'s pre-phase, a slice per turn of the loop, unless someone waiting
        for it (_finish_write) ran it to its end meanwhile."""
        try:
            while self._writing is w and not prep.step():
                await asyncio.sleep(0)  # requests meanwhile (a plan's answer waits: durable_plan)
        except asyncio.CancelledError:  # (the loop is ending: the write goes on, as a thread's would)
            prep.finish()
            raise

    def _write_ended(self, done: asyncio.Future[Any], w: _Write) -> None:
        if not done.cancelled():
            done.exception()  # (retrieved here; _finish_write handles it, from ``w``)
        self._finish_write(w)

    def _finish_write(self, which: _Write | None = None, resave: bool = True) -> None:
        """Take in the write in progress (``which``: only if it is that one), waiting for it
        if it is still running (an operator action, closing): what it made durable counts
        from now on; if it failed, its VIPs are unsaved again (the next write covers them).
        ``resave``: the save asked for meanwhile starts now (not before an action's own
        append: two writers at once would interleave their lines)."""
        w = self._writing
        if w is None or (which is not None and w is not which):
            return
        if w.prep is not None:
            w.prep.finish()  # (waited for: its slices that are left at once, then its write)
        self._writing = None
        try:
            seq, written, waiting = w.future.result()
        except store.PersistenceError as exc:
            self._held.unsaved |= w.names
            self._persistence_failed(exc)
            seq = None
        except Exception:  # noqa: BLE001 - a bug in the write: the alarm, and the retry covers it
            log.exception("saving the controller state failed")
            self._held.unsaved |= w.names
            self._persistence_failed(store.PersistenceError(store.StoreOp.APPEND, self.persistence.state_dir,
                                                            "internal error (see the log)"))
            seq = None
        else:
            self._held.unsaved |= waiting
            self._held.saved(written, self._retired_records())
            if seq is not None:
                self._seq = seq
                self._durable = w.submitted
                self._persistence_recovered()
                self._compact(w)
        self._wake_durable()
        if self._save_again and resave:
            self._save()

    def _retired_records(self) -> list[Any] | None:
        """Where a write's end puts the records it replaces (_DurableMemory.saved), let go of
        SLICE_S at a time by a task of their own (_let_records_go); None outside a running
        loop (freed at once)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if self._letting_go is not loop:  # (none under way, or on a loop that ended: a test's)
            self._retired, self._letting_go = [], loop
            loop.call_soon(self._let_records_go, _let_go(self._retired))  # (the write's end: a piece of its own)
        return self._retired

    def _let_records_go(self, pieces: Iterator[None]) -> None:
        """One piece of the freeing a turn of the loop. Callbacks, not a task: a write that
        ends while the loop shuts down (asyncio.run's executor shutdown) left a task created
        after the tasks were cancelled, destroyed pending ("coroutine never awaited")."""
        if next(pieces, _DONE) is _DONE:
            self._letting_go = None
        else:
            asyncio.get_running_loop().call_soon(self._let_records_go, pieces)

    def _compact(self, w: _Write) -> None:
        """Everything up to the write ``w`` is durable: its state may become the snapshot."""
        assert self.state_store is not None
        try:
            # (A copy that later passes do not change: the file journal writes it in a thread.)
            # Everything the journal holds: a snapshot without the dials or the rollout's state
            # dropped them (their journal lines are pruned with the older generations).
            frozen = store.Persisted(dict(w.submitted.drains), dict(w.submitted.generations),
                                     w.frozen if w.frozen is not None else self._get_engine().frozen_state(),
                                     w.submitted.rollout, dict(w.submitted.dials))
            self.state_store.compact(frozen, self._seq)
        except store.PersistenceError as exc:
            self._persistence_failed(exc)  # the journal still holds everything: only longer

    async def durable_plan(self, pop: str) -> None:
        """Until the POP's served generation is in the store: an answer that left before would
        let a crash serve the same generation again with other contents. (While the store
        fails, plans are served anyway, under the persistence alarm, as they always were.)"""
        while True:
            served = self.plans.pops.get(pop)
            if (served is None or self._released or not self.persistence.ok
                    or served.generation <= self._durable.generations.get(pop, 0)):
                return
            if self._wrote is None:
                self._wrote = asyncio.Event()
            await self._wrote.wait()

    def _wake_durable(self) -> None:
        """A write ended (or failed): the answers waiting in durable_plan look again."""
        if self._wrote is not None:
            self._wrote.set()
            self._wrote = None

    def _flush(self) -> None:
        """Stopping: the write in progress taken in, and whatever a pass asked to save since
        written now, on this thread (before, every pass saved before it returned; a pass
        whose save waited behind the thread's write would be lost at a stop)."""
        self._finish_write(resave=False)
        # (a store that writes on the loop, etcd, saved every pass in full: nothing waits)
        if getattr(self.state_store, "threaded_append", False) and (self._started or self.persistence.ok):
            try:
                self._save(sync=True)
            except Exception:  # noqa: BLE001 - stopping: the log says it, the journal keeps the rest
                log.exception("saving the controller state while stopping failed")

    # --- outputs -----------------------------------------------------------------------
    @property
    def served(self) -> Mapping[str, PopPlan]:
        """Per POP, the plan being served (its ``generation``, ``entries``, counts)."""
        return self.plans.pops

    def plan_body(self, pop: str) -> dict[str, Any]:
        return self.plans.plan_body(pop)

    async def wait_for_change(self, pop: str, after: int | None, wait: float) -> None:
        await self.plans.wait_for_change(pop, after, wait)
        await self.durable_plan(pop)

    def release_waiters(self) -> None:
        """Stopping: every long-poll answers now (an HA term that ended answers 503 and the
        leader's URL, so its agents move to the new leader at once). What was served is made
        durable first, so the answers carry no generation a crash could serve again."""
        if self.state_store is not None:
            self._flush()
        self._released = True
        self._wake_durable()
        self.plans.release_waiters()

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
                                  not self.config.last_error, self.config.loaded_at,
                                  self.persistence.ok, {str(op): n for op, n in self.persistence.errors.items()},
                                  change_phase=str(self.rollout.phase),
                                  change_withdraw_pairs=len(self.rollout.withdraw)
                                  if self.rollout.phase is not change.Phase.STEADY else 0,
                                  origin_weights=self._origin_weights())

    def _origin_weights(self) -> tuple[OriginWeight, ...]:
        out = []
        for fv in self.desired.vips:
            if not steered(fv):
                continue
            for pop in fv.publish:
                item = self.item(pop, fv.name)
                if item is None:
                    continue
                given = dict(item.weights) if item.weights else {item.active_origin: 1}
                out += [OriginWeight(fv.name, pop, o.region, given.get(o.region, 0) if item.wanted else 0,
                                     fv.dial(o.region)) for o in fv.vip.origins]
        return tuple(out)


def index(d: DesiredState, ix: _DesiredIndex | None = None) -> _DesiredIndex:
    """The lookups of ``d`` (``_DesiredIndex``), updated from ``ix`` (the previous desired
    state's) when given: only the VIPs whose FleetVip changed (a reload keeps the objects of
    unchanged VIPs) are looked at, and a POP's mapping is copied only where its entry for one
    of them changes (a VIP whose publish list lost p00 copies p00's mapping alone; the report
    handler keys its body limit on a mapping's identity, so mappings are never changed in
    place). At 10,000 VIPs x 50 POPs a rebuild walked 500,000 pairs on every reload (~0.3 s);
    copying the 50 mappings of a VIP changed anywhere else, ~0.1 s. The same as from scratch
    (``index(d)``): tests/unit/test_controller_index.py."""
    by_pop: dict[str, dict[str, frozenset[str]]] = {}
    old_fleet: Mapping[str, FleetVip] = {}
    # The VIPs to look at: all (from scratch), else those between the common head and tail of
    # the two VIP tuples (the same objects: a reload keeps unchanged VIPs in their order), so a
    # one-VIP commit does not walk 10,000 VIPs three times (~10-20 ms).
    was: tuple[FleetVip, ...] = ()
    now: tuple[FleetVip, ...] = d.vips
    if ix is None:
        fleet = {fv.vip.name: fv for fv in d.vips}
    else:
        by_pop, old_fleet = dict(ix.by_pop), ix.fleet
        head, tail = common_ends(ix.desired.vips, d.vips)
        was, now = ix.desired.vips[head:len(ix.desired.vips) - tail], d.vips[head:len(d.vips) - tail]
        fleet = dict(old_fleet)
        for fv in was:
            fleet.pop(fv.vip.name, None)
        fleet.update((fv.vip.name, fv) for fv in now)
    # POP -> its edits (VIP, regions; None: removed), applied once per distinct (mapping,
    # edits): POPs that shared a mapping and get the same edits (a VIP added at every POP)
    # share the one copy, not 50 copies of 10,000 entries compared with each other.
    edits: dict[str, list[tuple[str, frozenset[str] | None]]] = {}
    region_sets: dict[frozenset[str], frozenset[str]] = {}  # one object per distinct set of regions
    empty: dict[str, frozenset[str]] = {}

    for old in was:
        name = old.vip.name
        now_fv = fleet.get(name)
        if now_fv is not old:
            kept = () if now_fv is None else now_fv.publish
            for pop in old.publish:
                if pop not in kept and name in by_pop.get(pop, empty):
                    edits.setdefault(pop, []).append((name, None))
    if ix is None:
        by_pop = _first_by_pop(d.vips, region_sets)
        now = ()
    for fv in now:
        name = fv.vip.name
        if old_fleet.get(name) is not fv:
            regions = frozenset(o.region for o in fv.vip.origins)
            regions = region_sets.setdefault(regions, regions)
            for pop in fv.publish:
                if by_pop.get(pop, empty).get(name) != regions:
                    edits.setdefault(pop, []).append((name, regions))
    made: dict[tuple[int, tuple[tuple[str, frozenset[str] | None], ...]], dict[str, frozenset[str]]] = {}
    for pop, changes in edits.items():
        base = by_pop.get(pop, empty)
        key = (id(base), tuple(changes))
        mapping = made.get(key)
        if mapping is None:
            mapping = made[key] = dict(base)
            for name, value in changes:
                if value is None:
                    mapping.pop(name, None)
                else:
                    mapping[name] = value
        by_pop[pop] = mapping
    touched = edits
    known = {p.name for p in d.pops}
    for pop in known - by_pop.keys():
        by_pop[pop] = {}
    for pop in [p for p in by_pop if p not in known and not by_pop[p]]:
        del by_pop[pop]
    # POPs that publish the same VIPs share one mapping (equal, read-only): at 10,000 VIPs
    # x 50 POPs each was 0.2 MB.
    distinct: dict[int, list[dict[str, frozenset[str]]]] = {}  # len -> mappings kept
    # (a touched POP may be gone: a commit that removes a POP and its VIPs' entries for it)
    for pop in (by_pop if ix is None else [p for p in touched if p in by_pop]):
        mapping = by_pop[pop]
        same = distinct.setdefault(len(mapping), [])
        found = next((m for m in same if m is mapping or m == mapping), None)
        if found is not None:
            by_pop[pop] = found
        elif len(same) < 2:  # (a bound on the comparisons; a mapping kept once, not again per POP sharing it)
            same.append(mapping)
    # (the shortest report_stale_after and whether all are enabled: from the previous index
    # and the VIPs looked at, unless one that went had the shortest or was disabled)
    if ix is not None and d.vips and ix.desired.vips and all(fv.policy.safety.report_stale_after > ix.stale_after for fv in was):
        stale_after = min((fv.policy.safety.report_stale_after for fv in now), default=ix.stale_after)
        stale_after = min(stale_after, ix.stale_after)
    else:
        stale_after = min((fv.policy.safety.report_stale_after for fv in d.vips),
                          default=d.policy.safety.report_stale_after)
    if ix is not None and ix.all_enabled:
        all_enabled = all(fv.enabled for fv in now)
    else:
        all_enabled = all(fv.enabled for fv in d.vips)
    return _DesiredIndex(d, by_pop, stale_after, frozenset(fleet), fleet, all_enabled)


def _first_by_pop(vips: tuple[FleetVip, ...], region_sets: dict[frozenset[str], frozenset[str]]
                  ) -> dict[str, dict[str, frozenset[str]]]:
    """The first index's POP -> published VIP -> its regions, each mapping in the VIPs' order
    (what ``by_pop.setdefault(pop, {})[name] = regions`` per VIP and POP makes, POPs in the
    order first named), made per distinct publish list rather than per pair: POPs named by
    the same publish lists get one mapping, built in C from those lists' VIPs (30 million
    pairs at 100,000 VIPs x 300 POPs were ~13 s of a cold load)."""
    names: list[str] = []
    regions_of: list[frozenset[str]] = []
    lists: dict[tuple[str, ...], list[int]] = {}  # publish list -> its VIPs (indices), in order
    for i, fv in enumerate(vips):
        names.append(fv.vip.name)
        regions = frozenset(o.region for o in fv.vip.origins)
        regions_of.append(region_sets.setdefault(regions, regions))
        lists.setdefault(fv.publish, []).append(i)
    named: dict[str, list[int]] = {}  # POP -> the publish lists naming it (their numbers)
    for n, publish in enumerate(lists):
        for pop in dict.fromkeys(publish):
            named.setdefault(pop, []).append(n)
    members = list(lists.values())
    made: dict[tuple[int, ...], dict[str, frozenset[str]]] = {}
    by_pop: dict[str, dict[str, frozenset[str]]] = {}
    for pop, numbers in named.items():
        key = tuple(numbers)
        mapping = made.get(key)
        if mapping is None:
            at = members[numbers[0]] if len(numbers) == 1 else sorted(itertools.chain.from_iterable(
                map(members.__getitem__, numbers)))
            mapping = made[key] = dict(zip(map(names.__getitem__, at), map(regions_of.__getitem__, at)))
        by_pop[pop] = mapping
    return by_pop


class _Written(NamedTuple):
    """A VIP's memory as last written: ``pop_memory`` where it differs from ``default``, at
    the POPs ``pops`` (VipPlan.memory_at)."""

    memory: VipMemory
    default: PopVipMemory
    pop_memory: Mapping[str, PopVipMemory]
    pops: tuple[str, ...]
    # The plan's POPs as a shared key dict (UniformItems.pops, one per distinct publish list),
    # if its items were uniform: a plan over the same object has the same POPs (_same_pops).
    keys: Mapping[str, None] | None = None


def _same_pops(old: _Written, new_items: Mapping[str, Any]) -> bool:
    """Whether ``new_items`` is at the POPs ``old`` was written at: by identity of their shared
    key dict in the steady state (O(1): the journal's comparison of a pass that changed every
    VIP's memory walked every pair in Python, ``p in items`` per POP), else by their key sets."""
    if len(old.pops) != len(new_items):
        return False
    if old.keys is not None and type(new_items) is UniformItems and new_items.pops is old.keys:
        return True
    return new_items.keys() == set(old.pops)


class _DurableMemory:
    """The planner memory the store holds, per VIP, and the VIPs whose memory changed since
    (``unsaved``, from each committed pass's ``Changes.memory``). A pass's memory is then
    journaled by comparing those VIPs only, pair by pair, with what was last written: at
    500,000 pairs nothing walks them all. What was last written is each VIP's VipPlan as of
    its last durable write, or for a VIP not written since the start, the loaded memory."""

    def __init__(self, loaded: PlannerState) -> None:
        # (Each VIP's memory alone, not its VipPlan: a plan whose items changed but not its
        # memory is not written again, and holding it kept its old items alive, a second
        # per-VIP dict of 50 items at 10,000 VIPs x 50 POPs, ~15 MB.)
        self._written: dict[str, _Written] = {}
        self._pop_lists: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per distinct list
        # id(a UniformItems' shared key dict) -> it (held: the id stays its own) and its POPs' tuple
        self._pops_of_keys: dict[int, tuple[Mapping[str, None], tuple[str, ...]]] = {}
        self._boot_vips: dict[str, VipMemory] = dict(loaded.vips)
        self._boot_pops: dict[str, dict[str, PopVipMemory]] = {}
        for (pop, vip), m in loaded.pop_vips.items():
            self._boot_pops.setdefault(vip, {})[pop] = m
        # A loaded VIP the desired state no longer has is planned never again: its removal
        # is journaled with the first write.
        self.unsaved: set[str] = set(self._boot_vips) | set(self._boot_pops)

    def _held(self, name: str) -> tuple[VipMemory | None, Mapping[str, PopVipMemory]]:
        w = self._written.get(name)
        if w is not None:
            get, default = w.pop_memory.get, w.default
            return w.memory, {pop: get(pop, default) for pop in w.pops}
        return self._boot_vips.get(name), self._boot_pops.get(name, {})

    def _record(self, vp: VipPlan) -> _Written:
        items = vp.items
        if type(items) is UniformItems:
            # (the POPs' tuple per shared key dict, not made again per VIP: the records of a
            # pass that changed 100,000 VIPs' memory iterated 30 million POPs)
            keys = items.pops
            hit = self._pops_of_keys.get(id(keys))
            if hit is None or hit[0] is not keys:
                if len(self._pops_of_keys) > 10_000:  # (a bound: publish lists are few)
                    self._pops_of_keys.clear()
                pops = tuple(keys)
                hit = self._pops_of_keys[id(keys)] = (keys, self._pop_lists.setdefault(pops, pops))
            return _Written(vp.memory, vp.default, vp.pop_memory, hit[1], keys)
        pops = tuple(items)
        return _Written(vp.memory, vp.default, vp.pop_memory, self._pop_lists.setdefault(pops, pops))

    def changes_steps(self, names: Iterable[str], plans: Mapping[str, VipPlan], desired: frozenset[str],
                      budget: store.Budget) -> Generator[None, None, tuple[
                          dict[str, VipMemory | None], dict[tuple[str, str], PopVipMemory | None], list[str],
                          dict[str, tuple[PopVipMemory, tuple[str, ...]]]]]:
        """``changes`` in slices of ``budget`` (a generator that yields between them; the held
        memory changes only when a write ends, after them): the VIPs' memories, the pairs',
        the VIPs covered, and the VIPs' defaults at their POPs (``store.Changes.pop_defaults``:
        a VIP written for the first time, or whose default changed, is written as its default
        at its POPs and the POPs with a memory of their own, not pair by pair: the first two
        passes of a cold start at 100,000 VIPs x 300 POPs wrote 30 million pairs each)."""
        vips: dict[str, VipMemory | None] = {}
        pairs: dict[tuple[str, str], PopVipMemory | None] = {}
        defaults: dict[str, tuple[PopVipMemory, tuple[str, ...]]] = {}
        lists = self._pop_lists
        covered = []
        written = self._written
        for i, name in enumerate(names):
            if not i & 31 and budget.due():
                yield
            vp = plans.get(name)
            if vp is None and name in desired:
                continue
            covered.append(name)
            w = written.get(name)
            if w is not None and vp is not None:
                # Both compact (a default and the POPs that differ from it): compared as such,
                # not pair by pair (a pass that changed 10,000 VIPs walked 500,000 pairs here).
                if not (w.memory is vp.memory or w.memory == vp.memory):
                    vips[name] = vp.memory
                _pair_changes(name, w, vp, pairs, defaults, lists)
                continue
            memory, pops = self._held(name)
            new = vp.memory if vp is not None else None
            if new != memory:
                vips[name] = new
            if vp is not None:
                # Never written since the start: its default at its POPs and its own POPs,
                # whatever the store held for them (absolute values: the same memory after).
                keys = tuple(vp.items)
                defaults[name] = (vp.default, lists.setdefault(keys, keys))
                for pop, m in vp.pop_memory.items():
                    pairs[(pop, name)] = m
            for pop in pops:
                if vp is None or pop not in vp.items:
                    pairs[(pop, name)] = None
        return vips, pairs, covered, defaults

    def records_steps(self, written: Mapping[str, VipPlan | None], budget: store.Budget) -> Generator[
            None, None, _Records]:
        """What ``saved`` takes in for ``written`` (``changes()``' VIPs as written; None: gone),
        made beforehand, in slices of ``budget`` (after a burst's write, 10,000 records made
        in one piece were ~30 ms of the event loop)."""
        record = self._record
        kept: dict[str, _Written] = {}
        gone: list[str] = []
        for i, (name, vp) in enumerate(written.items()):
            if vp is None:
                gone.append(name)
            else:
                kept[name] = record(vp)
            if not i & 255 and budget.due():
                yield
        return _Records(kept, gone)

    def saved(self, records: _Records, retired: list[Any] | None = None) -> None:
        """Those VIPs are durable as ``records`` has them (``records``). ``retired``: the
        records they replace are appended to it, for the caller to let
        go of in pieces (_let_go), not freed here: after a burst's write, 10,000 old records
        (each VIP's memory, its default and its POPs' own) freed in this one step of the loop."""
        if self._boot_vips or self._boot_pops:  # (VIPs loaded at the start and not written since)
            for name in itertools.chain(records.kept, records.gone):
                self._boot_vips.pop(name, None)
                self._boot_pops.pop(name, None)
        written = self._written
        if retired is not None:
            get = written.get
            retired.extend(filter(None, map(get, records.kept)))
            retired.extend(filter(None, map(get, records.gone)))
        written.update(records.kept)
        for name in records.gone:
            written.pop(name, None)

    def snapshot(self, plans: Mapping[str, VipPlan]) -> None:
        """A snapshot of ``plans``' memory (and nothing else) is durable."""
        self._written = {name: self._record(vp) for name, vp in plans.items()}
        self._boot_vips, self._boot_pops, self.unsaved = {}, {}, set()


_DONE = object()  # (_let_records_go: the pieces' end)


def _let_go(retired: list[Any]) -> Iterator[None]:
    """Drop ``retired``'s objects, SLICE_S at a time (a step of the iterator each): the plans a
    burst's commit replaced (10,000 VipPlans of 50 POPs' items each) freed in one piece were
    about a third of the commit's step of the event loop."""
    budget = store.Budget(SLICE_S)
    while retired:
        del retired[-256:]  # (from the end: nothing moved)
        if retired and budget.due():
            yield
            budget.start()


class _Records(NamedTuple):
    """_DurableMemory.records(): the VIPs written, as recorded, and those gone."""

    kept: dict[str, _Written]
    gone: list[str]


class _Write(NamedTuple):
    """A pass's journal write (Controller._save): (new sequence or None if nothing changed,
    the plans its memory was written from, the VIPs it left unsaved), the state it makes
    durable, the VIPs it covers, and the memory as of it (the compaction's snapshot)."""

    future: concurrent.futures.Future[tuple[int | None, _Records, set[str]]]
    submitted: store.Persisted
    names: set[str]
    frozen: PlannerState | None
    prep: _Prep | None  # its pre-phase on the event loop (None: all of it in the thread, or done)


class _Prep:
    """A write's pre-phase on the event loop (_WriteJob.prepared): stepped a slice at a time
    (Controller._prepare), or run to its end at once by whoever must wait for the write
    (_finish_write); at its end the rest, the write and fsync, goes to the journal's thread,
    which settles ``future``. Only the loop's thread steps it."""

    def __init__(self, steps: Generator[None, None, Callable[[], tuple[int | None, _Records, set[str]]]],
                 budget: store.Budget, future: concurrent.futures.Future[tuple[int | None, _Records, set[str]]],
                 writer: concurrent.futures.ThreadPoolExecutor) -> None:
        self.steps, self.budget, self.future, self.writer = steps, budget, future, writer
        self.done = False

    def step(self) -> bool:
        """One slice; True once the pre-phase is over (handed to the thread, or failed)."""
        if self.done:
            return True
        self.budget.start()
        try:
            next(self.steps)
        except StopIteration as end:
            self.done = True
            try:
                self.writer.submit(_settle, self.future, end.value)
            except RuntimeError as exc:  # (the journal's thread shut down: never a future left unsettled)
                self.future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - a bug in the write: _finish_write reports it
            self.done = True
            self.future.set_exception(exc)
        return self.done

    def finish(self) -> None:
        self.budget.slice_s = None  # (the rest in one piece: someone waits for it)
        while not self.step():
            pass


def _settle(future: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
    """``future`` settled with what ``fn()`` returns or raises (in the journal's thread)."""
    try:
        future.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - the caller's (_finish_write)
        future.set_exception(exc)


@dataclass(frozen=True)
class _WriteJob:
    """The part of a save that may run in a thread: it reads its arguments only (the plans
    are a copy of the mapping, the held memory changes only after the write ends)."""

    state_store: store.Store
    held: _DurableMemory
    names: set[str]
    plans: Mapping[str, VipPlan]
    desired: frozenset[str]
    drains: Mapping[str, float | None]
    generations: Mapping[str, int]
    rollout: Mapping[str, Any] | None
    expect: int

    def __call__(self) -> tuple[int | None, _Records, set[str]]:
        """The whole write, here (the sync path: etcd, stopping, outside a loop)."""
        changes, written, waiting = store.run_steps(self._compared(store.Budget(None)))
        if not changes:
            return None, written, waiting
        return self.state_store.append(changes, self.expect), written, waiting

    def _compared(self, budget: store.Budget) -> Generator[None, None, tuple[store.Changes, _Records, set[str]]]:
        vips, pop_vips, covered, defaults = yield from self.held.changes_steps(self.names, self.plans, self.desired,
                                                                               budget)
        written = yield from self.held.records_steps({name: self.plans.get(name) for name in covered}, budget)
        waiting = self.names.difference(covered)
        return (store.Changes(self.drains, self.generations, vips, pop_vips, self.rollout, pop_defaults=defaults),
                written, waiting)

    def prepared(self, budget: store.Budget) -> Generator[None, None, Callable[[], tuple[int | None, _Records, set[str]]]]:
        """The write's Python (the pair comparison, the records, the line's JSON) in slices of
        ``budget``, to run on the event loop; it returns what is left, the line's write and
        fsync (``FileStore.append_text``), for the journal's thread. Until that has run,
        nothing is durable: the caller acknowledges nothing before (durable_plan)."""
        changes, written, waiting = yield from self._compared(budget)
        if not changes:
            return lambda: (None, written, waiting)
        body = yield from store.line_text_steps(changes, self.expect + 1, budget)
        append_text = self.state_store.append_text  # type: ignore[attr-defined]
        expect = self.expect
        return lambda: (append_text(body, expect), written, waiting)


def _pair_changes(name: str, old: _Written, new: VipPlan, out: dict[tuple[str, str], PopVipMemory | None],
                  defaults: dict[str, tuple[PopVipMemory, tuple[str, ...]]] | None = None,
                  lists: dict[tuple[str, ...], tuple[str, ...]] | None = None) -> None:
    """Into ``out``, the (POP, ``name``) memories that differ between ``old`` (as last
    written) and ``new`` (None: the VIP is no longer published there): what comparing the
    memory at every POP of either finds, from their compact forms. A POP published in both
    whose memory is neither's own differs only if the defaults differ. With ``defaults``, a
    changed default is written there (the VIP's new default at all its POPs, ``lists``
    interning the tuple of POPs) with its own POPs and the POPs it left in ``out``, instead
    of one pair per POP."""
    same_default = old.default is new.default or old.default == new.default
    old_pops, new_items = old.pops, new.items
    same_pops = _same_pops(old, new_items)
    if same_default and same_pops and old.pop_memory is new.pop_memory:
        return
    if not same_default and defaults is not None:
        keys = tuple(new_items)
        defaults[name] = (new.default, keys if lists is None else lists.setdefault(keys, keys))
        for pop, m in new.pop_memory.items():
            out[(pop, name)] = m
        if not same_pops:
            for pop in old_pops:
                if pop not in new_items:
                    out[(pop, name)] = None
        return
    old_set = set(old_pops)
    look = {*old.pop_memory, *new.pop_memory, *(() if same_pops else old_set ^ new_items.keys())}
    if not same_default:  # every other POP of both: the old default, now the new one
        default = new.default
        for pop in new_items:
            if pop not in look:
                out[(pop, name)] = default
    old_at = old.pop_memory.get
    for pop in look:
        if pop not in new_items:
            if pop in old_set:
                out[(pop, name)] = None
            continue
        m = new.memory_at(pop)
        if pop not in old_set:
            out[(pop, name)] = m
            continue
        was = old_at(pop, old.default)
        if was is not m and was != m:
            out[(pop, name)] = m


def _origin(note: str, seen: dict[str, str]) -> str:
    """``_origin_of(note)``, remembered in ``seen``."""
    o = seen.get(note)
    if o is None:
        o = seen[note] = _origin_of(note)
    return o


def _origin_of(note: str) -> str:
    """The part of a note that names where the VIP goes (to log moves, not every timer tick)."""
    # (str.find, not re.split: a burst's pass changes 10,000 notes, compared two by two: ~20 ms
    # of one piece of the event loop in re)
    cut = len(note)
    for sep in ":;":
        if 0 <= (at := note.find(sep, 0, cut)) < cut:
            cut = at
    return note[:cut]

