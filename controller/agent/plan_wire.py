"""A plan received from the controller, from the wire's values to the agent's own ``Plan``.

``controller.wire`` checks the plan's shape; here every VIP spec goes through the config's
own reader, with the agent's allowed prefixes (a VIP outside them is refused alone, by name:
it keeps what the agent last had for it, the rest of the plan applies), and the active origin
must be one of the VIP's origin regions. ``PlanBook`` holds the plan in wire terms and applies
deltas onto it, whole or not at all.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable
from typing import Any

from ..config.agent import DEFAULT_CHECK, DEFAULT_DRAINING, DEFAULT_UP, read_vip
from ..config.model import IPNetwork, StateAttributes, Vip
from ..config.reader import Issues, Node, gc_paused
from ..wire import (DIGEST_MOD, PlanVip, WireDelta, WireError, WirePlan, canonical_json, entry_json, format_digest,
                    full_body, spec_hash, vip_entry_hash)
from ..wire import decode_plan as decode_wire_plan
from .intent import Plan, PlanSource, VipIntent

# VIP name -> (its spec as received, the allowed prefixes it was checked against, the result)
SpecCache = dict[str, tuple[Any, tuple[IPNetwork, ...], Vip]]


def decode_plan(data: Any, pop: str, allowed: Iterable[IPNetwork], cache: SpecCache | None = None) -> Plan:
    """Validate a plan's JSON for ``pop`` and make it the agent's Plan (raises WireError)."""
    return plan_from_wire(decode_wire_plan(data, pop), allowed, cache)


def plan_from_wire(wire: WirePlan, allowed: Iterable[IPNetwork], cache: SpecCache | None = None) -> Plan:
    """``cache`` (kept by the caller between plans) skips the reader for a spec equal to one
    that already passed it: most of a new plan is the previous one (10,000 VIPs: 0.8 s ->
    0.1 s). It is replaced only when the whole plan is valid."""
    allowed = tuple(allowed)
    previous: SpecCache = cache if cache is not None else {}
    checked: SpecCache = {}
    specs: list[Vip] = []
    intents: dict[str, VipIntent] = {}
    with gc_paused():  # 10,000 VIPs' typed specs, all kept: see gc_paused
        for i, entry in enumerate(wire.vips):
            raw = entry.spec
            name = raw.get("name") if isinstance(raw, dict) else None
            hit = previous.get(name) if isinstance(name, str) else None
            if hit is not None and hit[1] == allowed and hit[0] == raw:
                vip = hit[2]
            else:
                issues = Issues()
                read = read_vip(Node(raw, f"vips[{i}].spec", issues), allowed, dict(DEFAULT_CHECK),
                                StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))
                if issues.items or read is None:
                    first = issues.items[0] if issues.items else None
                    raise WireError(first.path if first else f"vips[{i}].spec",
                                    first.message if first else "invalid VIP")
                vip = read
            checked[vip.name] = (raw, allowed, vip)
            if vip.name in intents:
                raise WireError(f"vips[{i}].spec.name", f"VIP {vip.name!r} listed twice")
            if entry.vip != vip.name:
                raise WireError(f"vips[{i}].name", f"{entry.vip!r} is not the name in its spec ({vip.name!r})")
            if vip.origin(entry.active_origin) is None:
                raise WireError(f"vips[{i}].active_origin",
                                f"{entry.active_origin!r} is not one of the VIP's origin regions")
            specs.append(vip)
            _check_weights(entry, vip, f"vips[{i}]")
            intents[vip.name] = _intent(entry)
    if cache is not None:
        cache.clear()
        cache.update(checked)
    return Plan(PlanSource.CONTROLLER, wire.generation, wire.revision, intents, specs=tuple(specs))


class NeedFullPlan(Exception):
    """A delta that cannot be applied to the plan held (a gap, an unknown or mismatched spec
    hash, a digest that differs): nothing of it was applied; fetch the full plan."""


def _read_spec(raw: Any, where: str, allowed: tuple[IPNetwork, ...]) -> Vip:
    issues = Issues()
    read = read_vip(Node(raw, where, issues), allowed, dict(DEFAULT_CHECK), StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))
    if issues.items or read is None:
        first = issues.items[0] if issues.items else None
        raise WireError(first.path if first else where, first.message if first else "invalid VIP")
    return read


_ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _read_spec_or_outside(raw: Any, where: str, allowed: tuple[IPNetwork, ...],
                          outside: dict[str, str], h: str) -> Vip:
    """``_read_spec``; a spec whose only fault is an address outside ``allowed`` is read
    anyway and its hash recorded in ``outside`` (with the reason): that VIP alone is refused,
    the rest of the plan applies. Any other fault refuses the plan whole (WireError)."""
    try:
        return _read_spec(raw, where, allowed)
    except WireError as exc:
        try:
            vip = _read_spec(raw, where, _ANYWHERE)
        except WireError:
            raise exc from None
        outside[h] = str(exc)
        return vip


class PlanBook:
    """The agent's copy of the controller's plan in wire terms, to apply deltas onto.

    ``apply`` takes a full plan or a delta and returns the agent's Plan, or raises and
    changes nothing: WireError for a plan to refuse (a bad field: the last good plan stays;
    a spec whose only fault is an address outside the allowed prefixes is refused alone,
    ``refused``), NeedFullPlan for a delta that does not fit what is
    held. Specs are kept by hash, validated once; a hash is checked against its spec's
    canonical JSON wherever a spec arrives (the network or the cache file)."""

    def __init__(self, pop: str, allowed: Iterable[IPNetwork]) -> None:
        self.pop = pop
        self.allowed = tuple(allowed)
        self.generation: int | None = None  # None: no plan held
        self.revision = ""
        self.entries: dict[str, PlanVip] = {}  # spec None; spec_hash set
        self.specs: dict[str, tuple[str, Vip]] = {}  # spec hash -> (canonical JSON, validated VIP)
        self._ehash: dict[str, int] = {}
        self.digest = 0
        self._intents: dict[str, VipIntent] = {}
        self.outside: dict[str, str] = {}  # spec hash -> why the VIP it defines is refused alone
        self._kept: dict[str, tuple[VipIntent, Vip]] = {}  # per VIP, what the last Plan had (a good spec)
        # The last Plan's VIP names in order (sorted: its specs' order), its intents and specs:
        # a delta's Plan is these with the delta's VIPs replaced (``_plan``'s ``changed``).
        self._order: list[str] = []
        self._plan_intents: dict[str, VipIntent] = {}
        self._plan_specs: tuple[Vip, ...] = ()

    def apply(self, answer: WirePlan | WireDelta, verify: bool = False) -> Plan:
        """``verify``: check every spec's hash, even of specs held (a plan read from disk);
        from the controller, a hash already held is taken for the spec it names."""
        if isinstance(answer, WireDelta):
            return self._apply_delta(answer)
        return self._apply_full(answer, verify)

    def _apply_full(self, plan: WirePlan, verify: bool) -> Plan:
        specs: dict[str, tuple[str, Vip]] = {}
        outside = dict(self.outside)
        entries: dict[str, PlanVip] = {}
        for i, e in enumerate(plan.vips):
            held = None if verify or not e.spec_hash else self.specs.get(e.spec_hash)
            if held is None:  # a spec not held yet (or from the cache file): its hash is checked
                text = canonical_json(e.spec)
                h = spec_hash(text)
                if e.spec_hash and e.spec_hash != h:
                    raise WireError(f"vips[{i}].spec_hash", "does not match the spec's content")
                known = self.specs.get(h)
                held = known if known is not None else (
                    text, _read_spec_or_outside(e.spec, f"vips[{i}].spec", self.allowed, outside, h))
            else:
                h = e.spec_hash
            vip = held[1]
            _check_entry(e, vip, f"vips[{i}]")
            if vip.name in entries:
                raise WireError(f"vips[{i}].spec.name", f"VIP {vip.name!r} listed twice")
            specs[h] = held
            entries[e.vip] = PlanVip(e.vip, None, e.wanted, e.active_origin, e.drain, e.reason, e.safety_hold,
                                     e.explanation, h, e.evidence, e.weights, e.evidence_origins)
        ehash = {n: vip_entry_hash(e) for n, e in entries.items()}
        digest = sum(ehash.values()) % DIGEST_MOD
        if plan.digest and plan.digest != format_digest(digest):
            raise WireError("digest", f"the plan's entries sum to {format_digest(digest)}, not {plan.digest}")
        self.generation, self.revision, self.entries, self.specs = plan.generation, plan.revision, entries, specs
        self._ehash, self.digest = ehash, digest
        self._intents = {n: _intent(e) for n, e in entries.items()}
        self.outside = {h: why for h, why in outside.items() if h in specs}
        return self._plan(None)

    def _apply_delta(self, delta: WireDelta) -> Plan:
        if self.generation is None or delta.after != self.generation:
            raise NeedFullPlan(f"a delta from plan {delta.after}, this agent holds plan {self.generation}")
        carried: dict[str, tuple[str, Vip]] = {}
        outside = dict(self.outside)
        for h, raw in delta.specs.items():
            text = canonical_json(raw)
            if spec_hash(text) != h:
                raise NeedFullPlan(f"the spec sent as {h} has another hash")
            held = self.specs.get(h)
            carried[h] = held if held is not None else (
                text, _read_spec_or_outside(raw, f"specs.{h}", self.allowed, outside, h))
        entries = dict(self.entries)
        ehash = dict(self._ehash)
        digest = self.digest
        intents = dict(self._intents)
        for name in delta.removed:
            if name in entries:
                del entries[name], intents[name]
                digest -= ehash.pop(name)
        for i, e in enumerate(delta.vips):
            held = carried.get(e.spec_hash) or self.specs.get(e.spec_hash)
            if held is None:
                raise NeedFullPlan(f"vips[{i}] names spec {e.spec_hash}, which this agent does not hold")
            _check_entry(e, held[1], f"vips[{i}]")
            if e.vip in ehash:
                digest -= ehash[e.vip]
            entries[e.vip], ehash[e.vip], intents[e.vip] = e, vip_entry_hash(e), _intent(e)
            digest += ehash[e.vip]
        digest %= DIGEST_MOD
        if format_digest(digest) != delta.digest:
            raise NeedFullPlan(f"plan {delta.generation} would sum to {format_digest(digest)}, "
                               f"the controller's to {delta.digest}")
        specs = {**self.specs, **carried}
        if len(specs) > 2 * len(entries) + 16:  # forget the specs no entry names any more
            specs = {e.spec_hash: specs[e.spec_hash] for e in entries.values()}
        self.generation, self.revision, self.entries, self.specs = delta.generation, delta.revision, entries, specs
        self._ehash, self.digest, self._intents = ehash, digest, intents
        self.outside = {h: why for h, why in outside.items() if h in specs}
        return self._plan({*delta.removed, *(e.vip for e in delta.vips)})

    @property
    def refused(self) -> dict[str, str]:
        """VIP name -> why, for the VIPs of the plan held that the agent refuses alone (an
        address outside its allowed prefixes)."""
        if not self.outside:
            return {}
        return {n: self.outside[e.spec_hash] for n, e in self.entries.items() if e.spec_hash in self.outside}

    # False: every Plan built from all the entries (the tests' reference for ``changed``).
    incremental = True

    def _good(self, n: str) -> tuple[VipIntent, Vip] | None:
        """What the Plan has for VIP ``n`` of the entries held: its intent and spec, or for a
        VIP refused alone what the last Plan had (None: it is left out)."""
        h = self.entries[n].spec_hash
        return (self._intents[n], self.specs[h][1]) if h not in self.outside else self._kept.get(n)

    def _plan(self, changed: set[str] | None) -> Plan:
        """The agent's Plan from the plan held. A VIP refused alone keeps what the last plan
        had for it (its old, allowed address: never withdrawn for the controller's mistake),
        or is left out if it never had a good one.

        ``changed``: the names a delta removed or sent; every other VIP's entry, spec and
        refusal are the last Plan's (a spec held keeps its hash's refusal), so the Plan is the
        last one's intents and specs with those names replaced, in the same (sorted) order:
        copies of three 10,000-item containers instead of a tuple per VIP and a sort (the
        young collections they caused were most of an agent's time on a one-VIP delta)."""
        assert self.generation is not None
        if changed is None or not self.incremental:
            return self._plan_whole()
        kept = dict(self._kept)
        intents = dict(self._plan_intents)
        order = list(self._order)
        specs = list(self._plan_specs)
        inserted = False
        for n in changed:
            good = self._good(n) if n in self.entries else None
            i = bisect.bisect_left(order, n)
            there = i < len(order) and order[i] == n
            if good is None:
                kept.pop(n, None)
                if there:
                    del order[i], specs[i], intents[n]
                continue
            kept[n] = good
            intents[n] = good[0]
            if there:
                specs[i] = good[1]
            else:
                order.insert(i, n)
                specs.insert(i, good[1])
                inserted = True
        if inserted:  # (a new key went to the dict's end: the order is the names')
            intents = {n: intents[n] for n in order}
        return self._hold(kept, intents, order, tuple(specs))

    def _plan_whole(self) -> Plan:
        intents: dict[str, VipIntent] = {}
        specs: list[Vip] = []
        kept: dict[str, tuple[VipIntent, Vip]] = {}
        for n in sorted(self.entries):
            good = self._good(n)
            if good is not None:
                kept[n] = good
                intents[n] = good[0]
                specs.append(good[1])
        return self._hold(kept, intents, list(intents), tuple(specs))

    def _hold(self, kept: dict[str, tuple[VipIntent, Vip]], intents: dict[str, VipIntent], order: list[str],
              specs: tuple[Vip, ...]) -> Plan:
        assert self.generation is not None
        self._kept, self._order, self._plan_specs = kept, order, specs
        self._plan_intents = intents
        # The Plan's own copy: the book's is copied before any change, so a Plan handed out never changes.
        return Plan(PlanSource.CONTROLLER, self.generation, self.revision, intents, specs=specs)

    def full_json(self) -> bytes:
        """The plan held, as a full plan's JSON (the agent's cache file)."""
        assert self.generation is not None
        return full_body(self.pop, self.generation, self.revision, format_digest(self.digest),
                         (entry_json(e, e.spec_hash, self.specs[e.spec_hash][0])
                          for _, e in sorted(self.entries.items())))


def _check_entry(e: PlanVip, vip: Vip, where: str) -> None:
    if e.vip != vip.name:
        raise WireError(f"{where}.name", f"{e.vip!r} is not the name in its spec ({vip.name!r})")
    if vip.origin(e.active_origin) is None:
        raise WireError(f"{where}.active_origin", f"{e.active_origin!r} is not one of the VIP's origin regions")
    _check_weights(e, vip, where)


def _check_weights(e: PlanVip, vip: Vip, where: str) -> None:
    """The regions an entry names beside its active origin (weights, evidence asked) are the VIP's."""
    for j, (region, _) in enumerate(e.weights):
        if vip.origin(region) is None:
            raise WireError(f"{where}.weights[{j}]", f"{region!r} is not one of the VIP's origin regions")
    for j, region in enumerate(e.evidence_origins):
        if vip.origin(region) is None:
            raise WireError(f"{where}.evidence_origins[{j}]", f"{region!r} is not one of the VIP's origin regions")


def _intent(e: PlanVip) -> VipIntent:
    return VipIntent(e.vip, e.wanted, e.active_origin, e.drain, e.reason, e.safety_hold, e.evidence, e.weights,
                     e.evidence_origins)
