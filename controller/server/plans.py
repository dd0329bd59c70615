"""The plans the controller serves: per POP, the current plan, a bounded log of its changes,
and the bodies agents fetch (a full plan, or a delta since a generation; ``controller.wire``
documents both).

Theory of operation. Each planning pass hands every POP's items to ``serve``; an entry is
what an agent acts on (its spec's hash, wanted, active origin, drain, reason, safety hold)
plus the explanation it had when that last changed. A pass that changes no entry of a POP
is no new plan for it (an explanation counting down, a revision that touches nothing of
the POP): no generation, no wake-up. A pass that does makes generation G+1 and logs
"G -> G+1 touched these names, introduced these spec hashes". A request for the changes
since A walks the log back to A: the names touched since are sent as they are now (or as
removed), with the specs whose hash appeared since. Older than the log (LOG_DEPTH changes)
or unknown (a controller restart starts an empty log, at a new generation): a full plan.
A delta that would touch more than half the plan is sent as the full plan instead.

Bodies are serialized once per generation and base (kept until the next generation), never
per request, and only when asked for. Full plans are sent gzipped, and made of pieces shared
by the POPs (gzipjoin): the entries, in name order, are cut into runs after each VIP whose
name's hash has its low CHUNK_BITS bits clear (about 2**CHUNK_BITS VIPs a run, the same cuts at
every POP, so a VIP missing at one POP changes one run there), and a run of the very same
entry objects is deflated once, for every POP whose plan holds it (``_chunks``: kept while a
body holds it); a POP's full body is its head and tail around those pieces. A change of one VIP
makes one run anew per POP whose entry changed (the others' pieces are found: each POP keeps
its last full body's pieces until its next one is made). Spec JSON is serialized once per
spec (shared by every POP), and entries are
small tuples, not dicts, shared by every POP whose item is the same object (a VIP healthy
everywhere has one entry, not one per POP: a POP's plan holds pointers). Each entry's share of
the digest is computed when the entry is made, the POP's digest kept up to date per changed
entry.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import itertools
import json
import operator
import time
import weakref
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..policy.model import PlanItem
from ..wire import (DIGEST_MOD, FULL_TAIL, canonical_json, delta_body, entry_hash, entry_json, format_digest,
                    full_head, spec_hash)
from .gzipjoin import Piece, member

LOG_DEPTH = 64  # changes per POP a delta can span; an agent further behind gets a full plan
SHARED_PER_VIP = 4  # entries kept per VIP for reuse across POPs (PlanStore._entry)
ALIKE_MIN = 256  # a walk of this many candidates is kept for the POPs served alike (PlanStore._memo)
CHUNK_BITS = 8  # a full body's runs: about 2**CHUNK_BITS entries each (PlanStore._full)
_CUT = (1 << CHUNK_BITS) - 1


class Entry(NamedTuple):
    """One VIP of a served plan: what the agent acts on, and its share of the digest."""

    item: PlanItem  # as planned when the entry last changed (its explanation included)
    spec_hash: str
    ehash: int = 0  # its share of the digest
    # Its JSON without the spec (wire.entry_json), made once with the entry: entries are
    # shared by every POP with the same item, so 50 POPs' full plans after a restart encode
    # each VIP's entry once, not 50 times (a full plan of 10,000 VIPs took ~1 s to encode).
    text: str = ""

    def material(self) -> tuple[Any, ...]:
        i = self.item
        return (self.spec_hash, i.wanted, i.active_origin, i.drain, i.reason, i.safety_hold, i.evidence, i.weights,
                i.evidence_origins)


_SPEC_HASH = operator.attrgetter("spec_hash")


def _hashed(name: str, e: Entry) -> Entry:
    i = e.item
    return e._replace(ehash=entry_hash(name, e.spec_hash, i.wanted, i.active_origin, i.drain, i.reason, i.safety_hold,
                                       i.explanation, i.evidence),
                      text=entry_json(i, e.spec_hash, None))


def _with_spec(e: Entry, spec_json: str) -> str:
    """``entry_json(e.item, e.spec_hash, spec_json)`` from the entry's own text."""
    return f'{e.text[:-1]},"spec":{spec_json}}}'


class SpecJson(NamedTuple):
    """A VIP's spec as served, in place of its dict: its canonical JSON and that JSON's hash,
    made once per definition (the controller keeps these, not the dicts: at 10,000 VIPs the
    dicts were ~22 MB beside their JSON)."""

    hash: str
    text: str


def as_spec_json(spec: Mapping[str, Any]) -> SpecJson:
    text = canonical_json(spec)
    return SpecJson(spec_hash(text), text)


# What ``PlanStore.serve`` takes per VIP: the spec dict or its SpecJson (compared by identity).
Spec = dict[str, Any] | SpecJson


class Body:
    """A body as served: a delta's JSON, or a full plan's gzip member as the pieces to send
    one after the other (``parts``; shared with other POPs' bodies, see PlanStore._full).
    ``len()`` is its size on the wire, ``bytes()`` its bytes in one object."""

    __slots__ = ("parts", "size", "_pieces")

    def __init__(self, parts: tuple[bytes, ...], pieces: tuple[object, ...] = ()) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))
        self._pieces = pieces  # the shared pieces it is made of (kept alive with it)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


class _Chunk(Piece):
    """A run of a full plan's entries deflated (``Piece``), with the entries it was made of:
    they keep the identities its key names alive as long as it is."""

    __slots__ = ("entries",)

    def __init__(self, raw: bytes, entries: list[Entry]) -> None:
        super().__init__(raw)
        self.entries = entries


_TAIL = Piece(FULL_TAIL.encode(), final=True)  # every full body's last piece


class _Spec(NamedTuple):
    obj: Spec  # the spec it was taken from (identity: unchanged VIPs keep theirs)
    hash: str
    text: str  # canonical JSON


@dataclass(frozen=True)
class _Change:
    base: int
    generation: int
    names: frozenset[str]  # added, changed or removed
    hashes: frozenset[str]  # spec hashes this change brought in


class _Memo(NamedTuple):
    """A walked serve's outcome (PlanStore._serve_alike): the POP's entries before it (a
    copy), the mappings it was served from and to, and what the walk found."""

    entries: dict[str, Entry]  # the POP's entries before the serve (a copy)
    seen_items: Mapping[str, PlanItem]
    seen_specs: Mapping[str, Spec]
    seen_token: object
    items: Mapping[str, PlanItem]
    specs: Mapping[str, Spec]
    token: object
    updates: dict[str, Entry]
    removed: list[str]
    kept_older: bool
    names: frozenset[str]  # the change's (its log entry)
    introduced: frozenset[str]
    sums: tuple[int, int, int]  # digest, wanted, safety holds after it (functions of the entries)


@dataclass
class PopPlan:
    """The plan served to one POP."""

    generation: int
    revision: str
    entries: dict[str, Entry] = field(default_factory=dict)
    digest: int = 0  # the sum of the entries' hashes, kept up to date per changed entry
    wanted: int = 0
    safety_holds: int = 0
    log: deque[_Change] = field(default_factory=lambda: deque(maxlen=LOG_DEPTH))
    bodies: dict[int | None, Body] = field(default_factory=dict)  # after (None: full) -> body, this generation
    # The last full body made (of this generation or one before): its pieces stay found for
    # the next one (a change of one VIP deflates one run again, not the whole plan).
    last_full: Body | None = None
    seen_items: Mapping[str, PlanItem] = field(default_factory=dict)
    seen_specs: Mapping[str, Spec] = field(default_factory=dict)  # the mapping served from (not a copy)
    seen_token: object = None
    # Every entry's item is the very item it was served from (``seen_items``): no entry kept
    # an older explanation because what an agent acts on was the same. Such a plan can be the
    # starting point of another POP's first plan (PlanStore._donor).
    exact: bool = True


def _layers(specs: Mapping[str, Spec]) -> tuple[Mapping[str, Spec], Mapping[str, Spec]] | None:
    """A spec mapping as (the names over it, the dict under them): a dict is ({}, itself), a
    two-map ChainMap over a dict its two maps; anything else None."""
    if isinstance(specs, dict):
        return _NO_SPECS, specs
    if isinstance(specs, collections.ChainMap) and len(specs.maps) == 2 and isinstance(specs.maps[1], dict):
        return specs.maps[0], specs.maps[1]
    return None


_NO_SPECS: Mapping[str, Spec] = {}


def changed_names(items: Mapping[str, PlanItem], seen: Mapping[str, PlanItem]) -> list[str]:
    """The names in ``items`` whose item is not the very object ``seen`` has for them (in
    ``items``' order), in C: no Python step per VIP (30 million at a cold start of 100,000 x
    300). Where both have the same names in the same order (the engine's mappings of POPs
    that publish alike), by position: no lookup either (~16 ms -> 3 ms at 100,000 VIPs)."""
    if items is seen:
        return []
    names = list(items)
    ordered = len(seen) == len(names) and list(seen) == names
    before = seen.values() if ordered else map(seen.get, names)
    return list(itertools.compress(names, map(operator.is_not, items.values(), before)))


def same_items(items: Mapping[str, PlanItem], seen: Mapping[str, PlanItem]) -> bool:
    """``items == seen``, first by position and identity, in C (a held POP's new mapping of
    the very same items, the same names in the same order: ~3 ms at 100,000 VIPs, where the
    dicts' comparison looks up every name, ~16 ms, at each of 299 POPs held in a change)."""
    if items is seen:
        return True
    if len(items) != len(seen):
        return False
    if list(items) == list(seen) and all(map(operator.is_, items.values(), seen.values())):
        return True
    return items == seen


class PlanStore:
    """Every POP's served plan, its change log and its long-poll waiters."""

    def __init__(self) -> None:
        self.pops: dict[str, PopPlan] = {}
        self._specs: dict[str, _Spec] = {}  # VIP name -> its current spec's JSON
        self._texts: dict[str, str] = {}  # spec hash -> canonical JSON, for every hash an entry names
        self._changed: dict[str, asyncio.Event] = {}
        self._released = False  # the controller is stopping: no long-poll waits any more
        self._shared: dict[str, tuple[Entry, ...]] = {}  # VIP name -> its recent entries (see _entry)
        # A few recent name sets of the change log, shared by the POPs whose changes are equal:
        # a cold start's change names every VIP at every POP (50 x 10,000 names, ~16 MB).
        self._recent_sets: list[frozenset[str]] = []
        # The last POP served whose plan is exact: a POP's first plan starts as a copy of its
        # entries, and only the VIPs whose item or spec differ are looked at (a cold start at
        # 100,000 VIPs x 300 POPs made every entry of every POP in Python: 79 CPU s).
        self._donor: PopPlan | None = None
        # The last walk of a POP's plan (not a hinted one): the next POP whose entries are the
        # very same objects, served from and to the very same mappings, takes its outcome
        # (_serve_alike). After a burst of first reports 50 POPs were served the same 10,000
        # new items, each walking them in one piece of the event loop (~25 ms, 0.1 s loaded).
        self._memo: _Memo | None = None
        self.alike = True  # False: every POP walks (the differential test's reference)
        # A full body's deflated runs, by the identities of their entries (and whether the run
        # is the plan's last): made once for every POP whose plan holds the run, forgotten when
        # no body holds it any more.
        self._chunks: weakref.WeakValueDictionary[tuple[bool, tuple[int, ...]], _Chunk] = (
            weakref.WeakValueDictionary())
        self.chunks_made = 0  # runs deflated (tests, the benchmark)
        self._diffs: list[tuple[Mapping[str, Spec], Mapping[str, Spec], Collection[str]]] = []  # (_dict_changes)

    # --- planning side -----------------------------------------------------------------
    def serve(self, pop: str, items: Mapping[str, PlanItem], spec_dicts: Mapping[str, Spec],
              revision: str, last_generation: int, token: object = None,
              hint: tuple[Mapping[str, PlanItem], Mapping[str, Spec], Collection[str]] | None = None,
              ) -> int | None:
        """Make ``items`` the POP's plan if an agent would act differently on it; the new
        generation (above ``last_generation``, the persisted one), or None if nothing changed.

        ``token`` (the desired state) says the spec dicts are those of last time: the first
        test is then a walk over pointers (the planner hands back the very same items).
        ``hint`` (items, spec dicts, names): ``items`` and ``spec_dicts`` differ from those two
        mappings at ``names`` only; used when they are the very mappings this POP was served
        from last time, so that a one-VIP change looks at one entry per POP, not at every VIP
        of it three times (a VIP added at 50 POPs of 10,000 VIPs walked 1.5 million names)."""
        pp = self.pops.get(pop)
        hinted = hint is not None and pp is not None and pp.seen_items is hint[0] and pp.seen_specs is hint[1]
        if not hinted and pp is not None and (alike := self._alike(pp, items, spec_dicts, token)) is not None:
            return self._serve_alike(pop, pp, *alike, revision, last_generation)
        if not hinted and pp is not None and (near := self._near(pp, items, spec_dicts, token)) is not None:
            served = self._serve_near(pop, pp, items, spec_dicts, token, *near, revision, last_generation)
            if served is not False:
                return served
        if pp is not None and not hinted and same_items(items, pp.seen_items) and (
                pp.seen_token is token and token is not None
                or self._specs_alike(pp.seen_specs, spec_dicts, items)):
            if pp.seen_items is not items and pp.exact:
                # Equal items, not all the very objects: the entries keep the older ones, so
                # the plan is no longer exact (as a walk would find them kept: _serve_alike's
                # memo.kept_older; the clock's seed 566033 found the two disagreeing).
                pp.exact = all(map(operator.is_, items.values(), map(pp.seen_items.get, items)))
            pp.seen_items, pp.seen_token, pp.seen_specs = items, token, spec_dicts  # (equal items: the newer object)
            return None
        # A POP's first plan: relative to the donor's, which is exactly what serving it
        # from nothing would make of the donor's items and specs.
        base = pp if pp is not None else self._donor if self._donor is not None and self._donor.exact else None
        old = base.entries if base is not None else {}
        seen_items = base.seen_items if base is not None else {}
        seen_specs = base.seen_specs if base is not None else {}
        same_specs = base is not None and token is not None and base.seen_token is token
        # Candidates by identity first (a comprehension over pointers): at 10,000 VIPs a
        # pass that changed one item looks at one entry, not 10,000.
        if hinted:
            assert hint is not None
            candidates = [name for name in hint[2] if name in items]
        else:
            candidates = changed_names(items, seen_items)
        if not same_specs and not hinted:
            listed = set(candidates)
            moved = self._spec_changes(seen_specs, spec_dicts)
            if moved is None:
                get_spec = seen_specs.get
                candidates += [name for name in items if name not in listed and get_spec(name) is not spec_dicts[name]]
            else:
                candidates += [name for name in moved if name in items and name not in listed]
        # (The loops below run once per (POP, VIP) pair on a cold start, 30 million times at
        # 100,000 VIPs x 300 POPs: lookups inlined, no call per pair in the common case.)
        updates: dict[str, Entry] = {}
        specs, shared = self._specs, self._shared
        kept_older = False  # an entry kept its item for a newer one with the same material
        for name in candidates:
            item = items[name]
            spec = spec_dicts[name]
            sp = specs.get(name)
            h = sp.hash if sp is not None and sp.obj is spec else self._spec(name, spec).hash
            e = old.get(name)
            if e is not None and e.item is item and e.spec_hash == h:
                continue
            recent = shared.get(name)
            new = (recent[0] if recent is not None and recent[0].item is item and recent[0].spec_hash == h
                   else self._entry(name, item, h))
            # (Not for a first plan from the donor's: made from nothing, it has this item.)
            if e is not None and (e is new or pp is not None and e.material() == new.material()):
                kept_older |= e.item is not item
                continue
            updates[name] = new
        # Same count and nothing added: nothing removed either (no walk over the plan).
        if hinted:
            assert hint is not None
            removed = [name for name in hint[2] if name in old and name not in items]
        else:
            grown = len(old) != len(items) or any(name not in old for name in candidates)
            removed = [name for name in old if name not in items] if grown else []
        # The caller's mapping itself, not a copy per POP (one per desired state, shared by
        # every POP served from it): its values are compared by identity next time.
        new_specs = spec_dicts
        # (the walk's starting point, kept for the POPs served alike: a copy of the entries, in C)
        start = ((dict(pp.entries), pp.seen_items, pp.seen_specs, pp.seen_token)
                 if pp is not None and not hinted and self.alike and len(candidates) >= ALIKE_MIN else None)
        if pp is not None and not updates and not removed:
            if start is not None:
                self._memo = _Memo(*start, items, spec_dicts, token, updates, removed, kept_older, frozenset(),
                                   frozenset(), (pp.digest, pp.wanted, pp.safety_holds))
            pp.seen_items, pp.seen_specs, pp.seen_token = items, new_specs, token
            pp.exact = pp.exact and not kept_older
            return None
        generation = max(last_generation, pp.generation if pp is not None else 0) + 1
        if pp is None:
            pp = self.pops[pop] = PopPlan(generation, revision)
            if base is not None:
                pp.entries = dict(base.entries)
                pp.digest, pp.wanted, pp.safety_holds = base.digest, base.wanted, base.safety_holds
        else:
            introduced = frozenset(e.spec_hash for n, e in updates.items()
                                   if n not in old or old[n].spec_hash != e.spec_hash)
            names = frozenset(updates) | frozenset(removed) if removed else frozenset(updates)
            pp.log.append(_Change(pp.generation, generation, self._shared_set(names), self._shared_set(introduced)))
        entries, texts = pp.entries, self._texts
        digest, wanted, holds = pp.digest, pp.wanted, pp.safety_holds
        for name in removed:
            e = entries.pop(name)
            digest, wanted, holds = digest - e.ehash, wanted - e.item.wanted, holds - e.item.safety_hold
        for name, e in updates.items():
            previous = entries.get(name)
            if previous is not None:
                digest -= previous.ehash
                wanted -= previous.item.wanted
                holds -= previous.item.safety_hold
            entries[name] = e
            digest += e.ehash
            wanted += e.item.wanted
            holds += e.item.safety_hold
            if e.spec_hash not in texts:
                texts[e.spec_hash] = specs[name].text
        pp.digest, pp.wanted, pp.safety_holds = digest % DIGEST_MOD, wanted, holds
        if start is not None and pp.log:
            self._memo = _Memo(*start, items, spec_dicts, token, updates, removed, kept_older, pp.log[-1].names,
                               pp.log[-1].hashes, (pp.digest, pp.wanted, pp.safety_holds))
        pp.exact = pp.exact and not kept_older
        return self._published(pop, pp, generation, revision, items, new_specs, token)

    def _specs_alike(self, seen: Mapping[str, Spec], specs: Mapping[str, Spec], items: Mapping[str, PlanItem]) -> bool:
        """Whether every VIP of ``items`` has the very same spec object in both mappings."""
        moved = self._spec_changes(seen, specs)
        if moved is None:
            return all(specs.get(name) is seen.get(name) for name in items)
        return not any(name in items for name in moved)

    def _spec_changes(self, seen: Mapping[str, Spec], specs: Mapping[str, Spec]) -> Collection[str] | None:
        """The names whose spec object may differ between ``seen`` and ``specs`` (a superset;
        None: not known without a walk of the names). Both are the controller's spec dicts,
        or views of them (a POP whose rollout wave has not come: the base definition of a
        few VIPs over them, a ChainMap): the dicts' difference is made once per pair of
        dicts, for every POP served from them, in C, and a view adds the names it holds
        (a traffic move held 299 POPs of 300, each walking every VIP in a ChainMap's Python
        lookup: 20 s at 20,000 VIPs)."""
        if seen is specs:
            return ()
        a, b = _layers(seen), _layers(specs)
        if a is None or b is None:
            return None
        names = self._dict_changes(a[1], b[1])
        if not a[0] and not b[0]:
            return names
        return {*names, *a[0], *b[0]}

    def _dict_changes(self, a: Mapping[str, Spec], b: Mapping[str, Spec]) -> Collection[str]:
        """The names whose value in ``a`` is not the very object in ``b``, or that only one
        has; the last few pairs' kept (the POPs of one pass are served from the same two)."""
        if a is b:
            return ()
        for x, y, names in self._diffs:
            if x is a and y is b:
                return names
        changed = list(itertools.compress(b, map(operator.is_not, map(a.get, b), b.values())))
        if len(a) + sum(1 for name in changed if name not in a) != len(b):
            changed += a.keys() - b.keys()
        self._diffs.insert(0, (a, b, changed))
        del self._diffs[2:]
        return changed

    def _alike(self, pp: PopPlan, items: Mapping[str, PlanItem], spec_dicts: Mapping[str, Spec],
               token: object) -> tuple[_Memo, dict[str, str]] | None:
        """The last walk's outcome, if it is this serve's: the same mappings before and after
        (identity), and the POP's entries the very objects that walk started from (so every
        test it made, by identity and by content, would come out the same here); with the
        spec texts its entries need that were pruned since (hash -> text)."""
        memo = self._memo
        if (memo is None or memo.items is not items or memo.specs is not spec_dicts or memo.token is not token
                or memo.seen_items is not pp.seen_items or memo.seen_specs is not pp.seen_specs
                or memo.seen_token is not pp.seen_token):
            return None
        entries, before = pp.entries, memo.entries
        # (in C: one identity test per entry)
        if len(entries) != len(before) or not all(map(operator.is_, map(entries.get, before), before.values())):
            return None
        missing: dict[str, str] = {}
        texts = self._texts
        if not texts.keys() >= set(map(_SPEC_HASH, memo.updates.values())):  # (the walked POP added them: unless pruned)
            for name, e in memo.updates.items():
                if e.spec_hash not in texts:
                    # The text of the spec the walk made ``e`` from (memo.specs), never the
                    # last one served for the name: another POP may have moved on since.
                    sp = self._spec(name, memo.specs[name])
                    if sp.hash != e.spec_hash:  # (not expected: walk instead)
                        return None
                    missing[e.spec_hash] = sp.text
        return memo, missing

    def _near(self, pp: PopPlan, items: Mapping[str, PlanItem], spec_dicts: Mapping[str, Spec],
              token: object) -> tuple[_Memo, dict[str, str], list[str]] | None:
        """As ``_alike``, for ``items`` that are another mapping than the last walk's, with
        the same VIPs and the very same items but at a few (at most an eighth): the walk's
        outcome, its missing spec texts, and the VIPs whose item differs (walked on their
        own). After the first reports at 100,000 VIPs x 300 POPs each POP had a mapping of its
        own (its few VIPs seen down) and each walked its 100,000 VIPs in Python."""
        memo = self._memo
        if (memo is None or memo.items is items or memo.kept_older or memo.introduced
                or len(memo.items) != len(items) or memo.specs is not spec_dicts or memo.token is not token
                or memo.seen_items is not pp.seen_items or memo.seen_specs is not pp.seen_specs
                or memo.seen_token is not pp.seen_token or memo.items.keys() != items.keys()):
            return None
        walked = memo.items
        # (in C: the VIPs whose item is another object than in the walked mapping)
        differ = list(itertools.compress(items, map(operator.is_not, items.values(), map(walked.get, items))))
        if len(differ) * 8 > len(items):
            return None
        alike = self._alike(pp, walked, spec_dicts, token)
        if alike is None:
            return None
        return alike[0], alike[1], differ

    def _serve_near(self, pop: str, pp: PopPlan, items: Mapping[str, PlanItem], spec_dicts: Mapping[str, Spec],
                    token: object, memo: _Memo, missing: dict[str, str], differ: list[str], revision: str,
                    last_generation: int) -> int | None | bool:
        """``serve``'s outcome from the last walk's (``_near``): its updates, but for the VIPs
        in ``differ``, walked here exactly as ``serve`` walks a candidate; False: walk instead
        (an entry kept an older explanation, or a new spec hash came in: not worked out here)."""
        old = pp.entries
        seen_items, get_spec = pp.seen_items, pp.seen_specs.get
        same_specs = token is not None and pp.seen_token is token
        specs, shared = self._specs, self._shared
        own: dict[str, Entry] = {}
        for name in differ:
            item = items[name]
            spec = spec_dicts[name]
            if item is seen_items.get(name) and (same_specs or get_spec(name) is spec):
                continue  # (not a candidate of this POP's walk)
            sp = specs.get(name)
            h = sp.hash if sp is not None and sp.obj is spec else self._spec(name, spec).hash
            e = old.get(name)
            if e is not None and e.item is item and e.spec_hash == h:
                continue
            recent = shared.get(name)
            new = (recent[0] if recent is not None and recent[0].item is item and recent[0].spec_hash == h
                   else self._entry(name, item, h))
            if e is not None and (e is new or e.material() == new.material()):
                if e.item is not item:
                    return False  # (kept an older explanation: walk)
                continue
            if e is None or e.spec_hash != new.spec_hash:
                return False  # (a spec hash new to the POP: walk)
            own[name] = new
        updates = memo.updates
        if differ:
            updates = dict(updates)
            for name in differ:
                updates.pop(name, None)
            updates.update(own)
        removed = memo.removed
        if not updates and not removed:
            pp.seen_items, pp.seen_specs, pp.seen_token = items, spec_dicts, token
            return None
        digest, wanted, holds = memo.sums
        for name in differ:  # (the walked POP's entry for each of them, then this POP's)
            was, now = memo.updates.get(name) or old.get(name), own.get(name) or old.get(name)
            if was is not None:
                digest, wanted, holds = digest - was.ehash, wanted - was.item.wanted, holds - was.item.safety_hold
            if now is not None:
                digest, wanted, holds = digest + now.ehash, wanted + now.item.wanted, holds + now.item.safety_hold
        texts = self._texts
        texts.update(missing)
        for name, e in own.items():
            if e.spec_hash not in texts:
                texts[e.spec_hash] = specs[name].text
        generation = max(last_generation, pp.generation) + 1
        names = memo.names if not differ else self._shared_set(
            frozenset(updates) | frozenset(removed) if removed else frozenset(updates))
        pp.log.append(_Change(pp.generation, generation, names, memo.introduced))
        entries = pp.entries
        for name in removed:
            del entries[name]
        entries.update(updates)
        pp.digest, pp.wanted, pp.safety_holds = digest % DIGEST_MOD, wanted, holds
        return self._published(pop, pp, generation, revision, items, spec_dicts, token)

    def _serve_alike(self, pop: str, pp: PopPlan, memo: _Memo, missing: dict[str, str], revision: str,
                     last_generation: int) -> int | None:
        """``serve``'s outcome for ``pp`` taken from the walk of another POP's (``_alike``):
        the same entries updated and removed, so the same sums; the generation, the log and
        the wake-up are the POP's own."""
        updates, removed = memo.updates, memo.removed
        pp.exact = pp.exact and not memo.kept_older
        if not updates and not removed:
            pp.seen_items, pp.seen_specs, pp.seen_token = memo.items, memo.specs, memo.token
            return None
        texts = self._texts
        generation = max(last_generation, pp.generation) + 1
        pp.log.append(_Change(pp.generation, generation, memo.names, memo.introduced))
        entries = pp.entries
        for name in removed:
            del entries[name]
        texts.update(missing)
        entries.update(updates)
        # (the walked POP's sums: they are the entries', and its entries are these)
        pp.digest, pp.wanted, pp.safety_holds = memo.sums
        return self._published(pop, pp, generation, revision, memo.items, memo.specs, memo.token)

    def _published(self, pop: str, pp: PopPlan, generation: int, revision: str, items: Mapping[str, PlanItem],
                   spec_dicts: Mapping[str, Spec], token: object) -> int:
        """The POP's entries are its new plan: generation ``generation``, served from these
        mappings; its old bodies dropped, the spec texts nobody holds pruned, its waiters woken."""
        pp.generation, pp.revision = generation, revision
        pp.bodies.clear()  # (its full body's pieces stay found: pp.last_full)
        pp.seen_items, pp.seen_specs, pp.seen_token = items, spec_dicts, token
        if pp.exact:
            self._donor = pp
        self._prune_texts()
        self._event(pop).set()
        self._changed[pop] = asyncio.Event()
        return generation

    def walk_ahead(self, pop: str, items: Mapping[str, PlanItem], spec_dicts: Mapping[str, Spec],
                   token: object, budget_s: float) -> Iterator[None]:
        """The walk ``serve(pop, items, spec_dicts, ..., token)`` would make, ahead of it and
        about ``budget_s`` seconds a step (the iterator's), kept as the last walk's outcome
        (``_memo``): the serve then takes it (``_alike``: the same mappings, the POP's entries
        still the very objects the walk started from) instead of walking in one piece (after a
        burst the first POP's walk of 10,000 candidates was a 30-80 ms step of the event loop).
        Nothing served changes: the POP's plan, log and waiters are the serve's. If the POP
        is served meanwhile, or never was (a first plan: from the donor's), nothing is kept."""
        pp = self.pops.get(pop)
        if pp is None or not self.alike:
            return
        t0 = time.perf_counter()
        old = dict(pp.entries)  # (the walk's starting point, in C; _alike compares the entries to it)
        seen_items, seen_specs, seen_token = pp.seen_items, pp.seen_specs, pp.seen_token
        digest, wanted, holds = pp.digest, pp.wanted, pp.safety_holds
        get_spec = seen_specs.get
        candidates = changed_names(items, seen_items)
        if not (token is not None and seen_token is token):
            listed = set(candidates)
            candidates += [name for name in items if name not in listed and get_spec(name) is not spec_dicts[name]]
        if len(candidates) < ALIKE_MIN:
            return  # (serve's own walk is short)
        updates: dict[str, Entry] = {}
        specs, shared = self._specs, self._shared
        kept_older = False
        for i, name in enumerate(candidates):  # (as serve's loop, for a POP served before)
            if i % 64 == 63 and time.perf_counter() - t0 >= budget_s:
                yield
                t0 = time.perf_counter()
            item = items[name]
            spec = spec_dicts[name]
            sp = specs.get(name)
            h = sp.hash if sp is not None and sp.obj is spec else self._spec(name, spec).hash
            e = old.get(name)
            if e is not None and e.item is item and e.spec_hash == h:
                continue
            recent = shared.get(name)
            new = (recent[0] if recent is not None and recent[0].item is item and recent[0].spec_hash == h
                   else self._entry(name, item, h))
            if e is not None and (e is new or e.material() == new.material()):
                kept_older |= e.item is not item
                continue
            updates[name] = new
        grown = len(old) != len(items) or any(name not in old for name in candidates)
        removed = [name for name in old if name not in items] if grown else []
        for name in removed:
            e = old[name]
            digest, wanted, holds = digest - e.ehash, wanted - e.item.wanted, holds - e.item.safety_hold
        for i, (name, e) in enumerate(updates.items()):
            if i % 64 == 63 and time.perf_counter() - t0 >= budget_s:
                yield
                t0 = time.perf_counter()
            previous = old.get(name)
            if previous is not None:
                digest -= previous.ehash
                wanted -= previous.item.wanted
                holds -= previous.item.safety_hold
            digest += e.ehash
            wanted += e.item.wanted
            holds += e.item.safety_hold
        if updates or removed:
            introduced = frozenset(e.spec_hash for n, e in updates.items()
                                   if n not in old or old[n].spec_hash != e.spec_hash)
            names = frozenset(updates) | frozenset(removed) if removed else frozenset(updates)
            names, introduced = self._shared_set(names), self._shared_set(introduced)
            sums = (digest % DIGEST_MOD, wanted, holds)
        else:
            names = introduced = frozenset()
            sums = (pp.digest, pp.wanted, pp.safety_holds)
        self._memo = _Memo(old, seen_items, seen_specs, seen_token, items, spec_dicts, token, updates, removed,
                           kept_older, names, introduced, sums)

    def warm(self, names: list[str], items: Mapping[str, PlanItem], spec_dicts: Mapping[str, Spec],
             start: int, budget_s: float) -> int:
        """Make, ahead of ``serve``, the entries and spec JSON that serving ``items`` will
        need, from ``names[start:]`` for about ``budget_s`` seconds; where it stopped
        (``len(names)``: done). Nothing served changes (the entries are kept per VIP,
        ``_entry``, and found there by the serve): the first POP served after a burst made
        10,000 entries, hashes and JSON in one piece of the event loop (~0.1 s)."""
        t0 = time.perf_counter()
        specs, shared = self._specs, self._shared
        i = start
        for i in range(start, len(names)):
            name = names[i]
            item = items.get(name)
            spec = spec_dicts.get(name)
            if item is None or spec is None:
                continue
            sp = specs.get(name)
            h = sp.hash if sp is not None and sp.obj is spec else self._spec(name, spec).hash
            recent = shared.get(name)
            if recent is None or recent[0].item is not item or recent[0].spec_hash != h:
                self._entry(name, item, h)
            if i % 64 == 63 and time.perf_counter() - t0 >= budget_s:
                return i + 1
        return len(names)

    def _entry(self, name: str, item: PlanItem, h: str) -> Entry:
        """The entry for ``item`` with spec ``h``, hashed: the same object at every POP that
        has the same item (a VIP's shared items: healthy, not reporting), so that a POP's plan
        is a mapping of shared entries and a cold start hashes each VIP once, not once per
        POP. A few recent entries per VIP are kept (a POP-specific item, confirming at one
        POP, must not evict the shared one)."""
        recent = self._shared.get(name, ())
        for e in recent:
            if e.item is item and e.spec_hash == h:
                return e
        e = _hashed(name, Entry(item, h))
        self._shared[name] = (e, *recent[:SHARED_PER_VIP - 1])
        return e

    def _spec(self, name: str, spec: Spec) -> _Spec:
        """A spec's canonical JSON and hash, computed once per spec dict."""
        known = self._specs.get(name)
        if known is None or known.obj is not spec:
            js = spec if isinstance(spec, SpecJson) else as_spec_json(spec)
            known = self._specs[name] = _Spec(spec, js.hash, js.text)
        return known

    def _shared_set(self, names: frozenset[str]) -> frozenset[str]:
        """``names``, or an equal recent set (one comparison in C each)."""
        if len(names) < 64:
            return names
        recent = self._recent_sets
        for r in recent:
            if r is names or (len(r) == len(names) and r == names):
                return r
        recent.insert(0, names)
        del recent[4:]
        return names

    def _prune_texts(self) -> None:
        """Forget the JSON of specs no entry names any more (old versions of changed VIPs)."""
        if len(self._texts) <= 2 * len(self._specs) + 64:
            return
        named = {e.spec_hash for pp in self.pops.values() for e in pp.entries.values()}
        self._texts = {h: t for h, t in self._texts.items() if h in named}

    # --- serving side ------------------------------------------------------------------
    def answer(self, pop: str, after: int | None) -> tuple[Body, bool]:
        """The POP's plan as agents fetch it: the changes since ``after``, or the full plan
        (``after`` None, unknown or too old), and whether it is gzipped (a full plan is:
        9 MB of JSON at 10,000 VIPs is 0.4 MB gzipped, to keep and to send). Serialized
        once per generation and base, when first asked for; the same object until the
        next generation."""
        pp = self.pops[pop]
        key = self._base(pp, after)
        body = pp.bodies.get(key)
        if body is None:
            if key is None:
                body = pp.last_full = self._full(pop, pp)
            else:
                body = Body((self._delta(pop, pp, key),))
            pp.bodies[key] = body
        return body, key is None

    def body(self, pop: str, after: int | None) -> bytes:
        """``answer``'s JSON, uncompressed."""
        body, gzipped = self.answer(pop, after)
        return gzip.decompress(bytes(body)) if gzipped else bytes(body)

    def _base(self, pp: PopPlan, after: int | None) -> int | None:
        """``after`` if a delta from it can be served (and is smaller than the plan), else None."""
        if after is None or after > pp.generation:
            return None
        if after == pp.generation:
            return after
        names: set[str] = set()
        for change in reversed(pp.log):
            names |= change.names
            if len(names) > len(pp.entries) // 2 + 16:
                return None
            if change.base == after:
                return after
        return None

    @staticmethod
    def _digest(pp: PopPlan) -> str:
        return format_digest(pp.digest)

    def _full(self, pop: str, pp: PopPlan) -> Body:
        """The full plan gzipped (``wire.full_body``'s JSON, byte for byte): its head, its
        entries in name order cut into runs (module docstring), each run's piece found or
        deflated, and its tail."""
        entries = pp.entries
        names = sorted(entries)
        values = list(map(entries.__getitem__, names))
        # a run ends after each name whose hash has the low bits clear (str hashes are cached)
        ends = list(itertools.compress(range(1, len(names) + 1),
                                       map(operator.not_, map(_CUT.__and__, map(hash, names)))))
        if names and (not ends or ends[-1] != len(names)):
            ends.append(len(names))
        head = full_head(pop, pp.generation, pp.revision, self._digest(pp)).encode()
        pieces: list[Piece] = [Piece(head)]
        cache, texts = self._chunks, self._texts
        start = 0
        for end in ends:
            run = values[start:end]
            last = end == len(names)
            key = (last, tuple(map(id, run)))
            chunk = cache.get(key)
            if chunk is None:
                text = ",".join([_with_spec(e, texts[e.spec_hash]) for e in run])
                chunk = cache[key] = _Chunk((text if last else text + ",").encode(), run)
                self.chunks_made += 1
            pieces.append(chunk)
            start = end
        pieces.append(_TAIL)
        return Body(member(pieces), tuple(pieces))

    def _delta(self, pop: str, pp: PopPlan, after: int) -> bytes:
        names: set[str] = set()
        hashes: set[str] = set()
        for change in reversed(pp.log):
            if change.generation <= after:
                break
            names |= change.names
            hashes |= change.hashes
        current = [(n, pp.entries[n]) for n in sorted(names) if n in pp.entries]
        carried = sorted({e.spec_hash for _, e in current if e.spec_hash in hashes})
        return delta_body(pop, pp.generation, after, pp.revision, self._digest(pp),
                          ((h, self._texts[h]) for h in carried),
                          (e.text for _, e in current),
                          (n for n in names if n not in pp.entries))

    def plan_body(self, pop: str) -> dict[str, Any]:
        """The full plan as a JSON value (status, snapshots, tests)."""
        value: dict[str, Any] = json.loads(self.body(pop, None))
        return value

    async def wait_for_change(self, pop: str, after: int | None, wait: float) -> None:
        """Return when the POP's plan generation differs from ``after``, or after ``wait`` s."""
        pp = self.pops.get(pop)
        if pp is None or after is None or pp.generation != after or wait <= 0 or self._released:
            return
        try:
            await asyncio.wait_for(self._event(pop).wait(), wait)
        except asyncio.TimeoutError:
            pass

    def release_waiters(self) -> None:
        """Wake every long-poll now and let none wait from here on: the controller is
        stopping (a SIGTERM, or an HA leader's term ending), and an agent held in a long-poll
        until it times out (up to 30 s) would follow nobody meanwhile."""
        self._released = True
        for event in self._changed.values():
            event.set()

    def _event(self, pop: str) -> asyncio.Event:
        return self._changed.setdefault(pop, asyncio.Event())
