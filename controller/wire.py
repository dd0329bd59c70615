"""The JSON the controller and the agents exchange: plans (controller -> agent) and health
reports (agent -> controller), as typed values with their codecs. Both directions validate
what they receive and name the field that is wrong; nothing invalid is ever half-applied.

This module depends on nothing else of ours: the agent and the controller depend on it, and
each converts between these wire values and its own types in its own package
(``agent/plan_wire.py``; ``server/``). A VIP's ``spec`` is its definition in the config
format: here it is only carried; the agent reads it with its config reader.

Plans: ``GET /v1/plans/{pop}`` (no ``after``) answers a full plan::

    {"pop": "sjc", "generation": 7, "revision": "3f2a9c1e0b7d", "digest": "9c0e...16 hex",
     "vips": [{"name": "game-global", "spec": {...a VIP in the config format...},
               "spec_hash": "32 hex", "wanted": true, "active_origin": "us-west", "drain": false,
               "reason": "healthy", "safety_hold": false, "explanation": "..."}]}

An entry may also carry ``"evidence": true`` (absent: false): another POP's withdrawal of
this VIP is being confirmed, so the agent reports its checks of the VIP (``checks`` below)
at once and again after its next check of every backend; that is what ends the settle
window early (README, *Policy*). It is part of the entry's hash only when true.

With ``evidence``, an entry may also carry ``"evidence_origins": ["eu-central"]``: the
origin regions whose checks are asked (each one of the VIP's, each once; traffic steering:
the POP being confirmed follows its own route, so its origin may not be this entry's
``active_origin``). Absent: the entry's ``active_origin``, the meaning before the field (a
controller that predates it asks that way, and so does this one when that is the question).
The agent then probes every backend of each named origin at once, carries each one's ages in
``checks`` (keyed by region: the answer names the origin it is about) and reports once more
when every backend of each has been checked since the ask. Outside the digest, as
``weights`` are: an agent that predates it ignores it and answers about its active origin,
with the other origins' ages it happens to have (ages, so never wrong: only later). The
controller still makes a new generation when only it changes (plans.py).

``GET /v1/plans/{pop}?after=GEN`` answers the changes since generation GEN (a delta: it has
``after``), or a full plan when the controller no longer knows GEN (a restart, or more
changes since than its per-POP log keeps)::

    {"pop": "sjc", "generation": 9, "after": 7, "revision": "...", "digest": "...",
     "specs": {"<spec_hash>": {...}},          # only specs the agent cannot have at GEN
     "vips": [{"name": ..., "spec_hash": ..., "wanted": ..., ...}],   # added or changed
     "removed": ["old-vip"]}

An entry may carry ``"weights": [["eu-central", 3], ["us-west", 1]]`` (traffic steering:
split the VIP's traffic across those origin regions in those proportions, each weight an
integer from 1 to MAX_WIRE_WEIGHT, each region one of the VIP's; ``active_origin`` is then
one of them). Absent or empty: everything to ``active_origin``, as before weights. The field
is optional on purpose and outside the digest (``entry_hash`` is unchanged): an agent that
predates it ignores it and keeps sending everything to ``active_origin``, a healthy origin
with weight, so an old agent loses only the split, never the plan. The controller still
makes a new generation when only weights change (plans.py), so deltas carry them.

A spec travels once per content hash: ``spec_hash`` is the first 32 hex digits of the
sha256 of the spec's canonical JSON (``canonical_json``); the agent keeps specs by hash and
a delta names the hash of each changed entry's spec. ``digest`` is the whole plan's
checksum: the sum, modulo 2**64, of each entry's ``entry_hash``, so both sides update it
per changed entry instead of re-hashing the plan. The agent applies a delta to its copy of
plan GEN only if ``after`` is its generation, every named hash is known or carried (and a
carried spec hashes to its name), and the result's digest is ``digest``; otherwise it asks
for a full plan. A spec outside the agent's allowed prefixes is refused alone (that VIP
keeps what the agent had for it; the rest of the plan applies). With ``wait=SECONDS`` the answer waits while the plan's generation is still GEN (long-poll);
an unchanged plan answers an empty delta (``"generation" == "after"``). A full plan is sent
with ``Content-Encoding: gzip`` to clients that accept it. ``after`` is an integer from 0 to
2**63-1 and ``wait`` a finite number >= 0 (``after=-1``, ``after=abc``, ``wait=nan``: 400
naming the field). Agents from before deltas cannot read one (and asked ``after=-1`` for a
first plan): upgrade the agents first, they read both kinds of full plan.

Reports: ``POST /v1/reports/{pop}``; a full report (``seq`` is the agent's counter, absent
from agents that predate it)::

    {"plan_generation": 7, "seq": 41,
     "origins": {"game-global": {"us-west": true, "eu-central": null}},
     "announced": {"game-global": true}}

A report may carry ``checks`` for the VIPs whose plan entry asks for evidence or whose
active origin is failing at the POP, each a whole current set (never a delta): the active
origin's, and the other origins' that have any (the proof an origin failover waits for)::

    "checks": {"game-global": {"us-west": {"ok": null, "failing": 0.3},
                               "eu-central": {"ok": 0.03, "failing": null}}}

``ok``: seconds since at least ``min_healthy`` of the origin's backends last succeeded (their
last checks all succeeded), ``failing``: seconds since the first failed check of a failure
now running; null where there is none. Ages, not times: the controller subtracts them from
the report's arrival, so the hosts' clocks need not agree.

or a delta report onto the one numbered ``base`` (each VIP listed replaces that VIP's
verdicts; ``removed`` VIPs are gone from both maps)::

    {"plan_generation": 7, "seq": 42, "base": 41, "origins": {...changed VIPs...},
     "announced": {...changed VIPs...}, "removed": ["old-vip"]}

When ``base`` is not the last report the controller holds for the POP (it restarted, or a
report was lost), it answers 409 with ``"field": "base"``: the agent sends a full report.
``seq`` only grows (agents start it from the clock in microseconds, so a restarted agent goes
on above its last): a report numbered at or below the last one applied for the POP is a
replay or a straggler, refused with 409, ``"field": "seq"`` and ``"last_seq"``.
A report may be ``report_limit(pairs)`` bytes long (``pairs``: the POP's published VIP x
origin-region pairs); a longer body is refused with 413.

The compact form. A report (full or delta) may carry its two maps as ``compact`` instead of
``origins`` and ``announced`` (never both): the VIPs grouped by their verdicts, each distinct
set of verdicts once, and beside each group's names, in the same order, each VIP's
``announced`` flag (null: none; a group without ``announced``: none for any of its VIPs; a
group with ``"origins": null``: VIPs with a flag and no verdicts)::

    {"plan_generation": 7, "seq": 41,
     "compact": {"groups": [{"origins": {"us-west": true, "eu-central": null},
                             "vips": ["game-global", "game-eu", "api-eu"], "announced": [true, false, true]},
                            {"origins": {"us-west": false, "eu-central": true},
                             "vips": ["api"], "announced": [true]}]}}

It says exactly what the two maps say (each VIP in one group at most; the same checks, and
the same 4xx naming the field, e.g. ``compact.groups[0].vips[3]``). Why: a fleet's VIPs have
a handful of verdict combinations, so a full report of 10,000 VIPs is 10,000 short strings and
as many flags instead of 20,000 entries of two objects: about a quarter of the bytes, read and
checked by the controller with a few operations per group instead of a few per VIP
(json.loads, interning, membership, ``dict.fromkeys``: in C; ~4x less CPU), which is what 50
POPs' full reports at once (a controller restart, every agent's first report) cost it.

Compatibility: a controller that predates the form refuses it with 400 naming the field
``compact`` ("unknown field", nothing stored). The agent sends the compact form first; on
that answer it sends the same report again in the older form at once and keeps the older
form, until a 409 (the controller restarted, or another one answers: maybe an upgraded one)
makes it try the compact form again with the full report it then sends. Controllers accept
both forms, so agents are upgraded after controllers, as always.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import time
from sys import intern
from collections.abc import Collection, Generator, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

# Signed plans: with ``api.signing_key`` every plan answer carries this header,
# ``<key id>:<base64 Ed25519 signature over the exact JSON body, uncompressed>``; the key id
# is plan_key_id() of the public key. Agents with ``controller.plan_keys`` refuse an answer
# without a valid one from a key they hold.
SIGNATURE_HEADER = "X-Anycast-Plan-Signature"
MAX_REPORT_BYTES = 1 << 20  # a report's allowance beside its per-pair share (report_limit)
REPORT_BYTES_PER_PAIR = 160  # a full report spends ~35 B per VIP x region pair: room for long names
MAX_WIRE_WEIGHT = 65535  # an effective weight (config weight x dial, reduced); the agent scales it for the kernel
MAX_COUNTER = (1 << 63) - 1  # generations and report numbers: beyond this, a request is garbage
DIGEST_MOD = 1 << 64


class WireError(ValueError):
    """Invalid data received; ``field`` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


# --- plans -------------------------------------------------------------------------------------
class PlanReason(enum.StrEnum):
    """Why the controller plans a VIP as it does at a POP (controller/policy/planner.py).

    A closed vocabulary: a plan with any other word is refused, so a peer cannot choose the
    agent's metric label values (the agent withdraws an unwanted VIP with the plan's reason)."""

    HEALTHY = "healthy"
    HEALTH_UNKNOWN = "health_unknown"  # the POP has no verdict on the active origin yet
    REPORT_STALE = "report_stale"  # no recent report: left to the agent's own checks
    DRAINING = "draining"  # the POP is draining: announced less preferred
    DRAINED = "drained"  # the drain time has passed: withdrawn
    DRAIN_BLOCKED = "drain_blocked"  # drained, but kept announced (less preferred) by the safety limits
    CONFIRMING = "confirming"  # the POP sees the origin down; the settle window runs
    BACKEND_DOWN = "backend_down"  # the POP sees the origin down: its agent withdraws
    DAMPENED = "dampened"  # the POP flapped: held down
    SAFETY_HOLD = "safety_hold"  # a withdrawal held back by a global safety rule
    DISABLED = "disabled"  # the VIP is disabled in the config: withdrawn everywhere


class PlanEntry(Protocol):
    """What a plan says about one VIP at one POP (the planner's PlanItem is one, PlanVip another)."""

    @property
    def vip(self) -> str: ...  # the VIP's name
    @property
    def wanted(self) -> bool: ...
    @property
    def active_origin(self) -> str: ...
    @property
    def drain(self) -> bool: ...
    @property
    def reason(self) -> PlanReason: ...
    @property
    def safety_hold(self) -> bool: ...
    @property
    def explanation(self) -> str: ...
    @property
    def evidence(self) -> bool: ...
    @property
    def weights(self) -> tuple[tuple[str, int], ...]: ...  # (): single path
    @property
    def evidence_origins(self) -> tuple[str, ...]: ...  # with evidence; (): the active origin


Weights = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class PlanVip:
    """One VIP of a received plan. ``spec`` is the JSON value received (the agent's config
    reader validates it, against the agent's allowed prefixes)."""

    vip: str  # "name" on the wire
    spec: Any
    wanted: bool
    active_origin: str
    drain: bool
    reason: PlanReason
    safety_hold: bool
    explanation: str = ""
    spec_hash: str = ""  # empty from controllers that predate deltas
    evidence: bool = False  # report this VIP's checks now and after the next ones (see above)
    weights: Weights = ()  # (region, weight); empty from controllers that predate weights
    evidence_origins: tuple[str, ...] = ()  # with evidence: the regions asked; (): ``active_origin``


@dataclass(frozen=True)
class WirePlan:
    """A full plan."""

    pop: str
    generation: int
    revision: str
    vips: tuple[PlanVip, ...]
    digest: str = ""  # empty from controllers that predate deltas


@dataclass(frozen=True)
class WireDelta:
    """The changes from plan ``after`` to plan ``generation``; its entries' ``spec`` is None."""

    pop: str
    generation: int
    after: int
    revision: str
    digest: str
    specs: Mapping[str, Any]  # spec_hash -> spec, for the hashes the agent cannot have yet
    vips: tuple[PlanVip, ...]  # added or changed
    removed: tuple[str, ...]


def plan_key_id(public_raw: bytes) -> str:
    """The name of a plan-signing key: 16 hex digits of the sha256 of its raw 32 bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def canonical_json(spec: Any) -> str:
    """The one serialization of a spec that its hash is taken of (and that is sent)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def spec_hash(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def entry_hash(name: str, spec_hash_: str, wanted: bool, active_origin: str, drain: bool, reason: str,
               safety_hold: bool, explanation: str, evidence: bool = False) -> int:
    """One entry's share of the plan's digest: the first 8 bytes of the BLAKE2b of
    ``name US spec_hash US <wanted><drain><safety_hold as 0/1>[E] US active_origin US reason US
    explanation`` (US: the byte 0x1f; the explanation, last, may hold anything; ``E`` only
    when ``evidence`` is set, so entries without it hash as they always did)."""
    line = (f"{name}\x1f{spec_hash_}\x1f{wanted:d}{drain:d}{safety_hold:d}{'E' if evidence else ''}"
            f"\x1f{active_origin}\x1f{reason}\x1f{explanation}")
    return int.from_bytes(hashlib.blake2b(line.encode(), digest_size=8).digest(), "big")


def vip_entry_hash(v: PlanVip) -> int:
    return entry_hash(v.vip, v.spec_hash, v.wanted, v.active_origin, v.drain, v.reason, v.safety_hold,
                      v.explanation, v.evidence)


def format_digest(total: int) -> str:
    return f"{total % DIGEST_MOD:016x}"


def entry_json(i: PlanEntry, spec_hash_: str, spec_json: str | None) -> str:
    """One plan entry as JSON text; with ``spec_json`` (canonical) in a full plan."""
    entry: dict[str, Any] = {"name": i.vip, "spec_hash": spec_hash_, "wanted": i.wanted,
                             "active_origin": i.active_origin, "drain": i.drain, "reason": str(i.reason),
                             "safety_hold": i.safety_hold, "explanation": i.explanation}
    if i.evidence:
        entry["evidence"] = True
    if i.weights:
        entry["weights"] = [list(w) for w in i.weights]
    if i.evidence and i.evidence_origins:
        entry["evidence_origins"] = list(i.evidence_origins)
    text = json.dumps(entry, separators=(",", ":"))
    return text if spec_json is None else f'{text[:-1]},"spec":{spec_json}}}'


def full_head(pop: str, generation: int, revision: str, digest: str) -> str:
    """A full plan's JSON up to its first entry: what ``full_body`` puts before the entries
    (then the entries joined by commas, then ``FULL_TAIL``)."""
    head = json.dumps({"pop": pop, "generation": generation, "revision": revision, "digest": digest},
                      separators=(",", ":"))
    return f'{head[:-1]},"vips":['


FULL_TAIL = "]}"


def full_body(pop: str, generation: int, revision: str, digest: str, entries: Iterable[str]) -> bytes:
    """A full plan from its entries' JSON (``entry_json`` with specs): no per-VIP dicts."""
    return f'{full_head(pop, generation, revision, digest)}{",".join(entries)}{FULL_TAIL}'.encode()


def delta_body(pop: str, generation: int, after: int, revision: str, digest: str,
               specs: Iterable[tuple[str, str]], entries: Iterable[str], removed: Iterable[str]) -> bytes:
    """``specs``: (spec_hash, canonical spec JSON); ``entries``: ``entry_json`` without specs."""
    head = json.dumps({"pop": pop, "generation": generation, "after": after, "revision": revision,
                       "digest": digest, "removed": sorted(removed)}, separators=(",", ":"))
    carried = ",".join(f'"{h}":{text}' for h, text in specs)
    return f'{head[:-1]},"specs":{{{carried}}},"vips":[{",".join(entries)}]}}'.encode()


def encode_plan(pop: str, generation: int, revision: str,
                vips: Iterable[tuple[PlanEntry, Any]]) -> dict[str, Any]:
    """``vips``: (entry, the VIP's spec) pairs; the controller passes cached spec dicts and
    its PlanItems as they are (no copy per VIP: a fleet's plans have 500,000 of them)."""
    return {
        "pop": pop, "generation": generation, "revision": revision,
        "vips": [{"name": i.vip, "spec": spec, "wanted": i.wanted, "active_origin": i.active_origin,
                  "drain": i.drain, "reason": i.reason, "safety_hold": i.safety_hold,
                  "explanation": i.explanation, **({"evidence": True} if i.evidence else {}),
                  **({"weights": [list(w) for w in i.weights]} if i.weights else {}),
                  **({"evidence_origins": list(i.evidence_origins)} if i.evidence and i.evidence_origins else {})}
                 for i, spec in vips],
    }


def decode_plan(data: Any, pop: str) -> WirePlan:
    """Validate the shape of a full plan for ``pop`` (each VIP's spec is left to the agent)."""
    answer = decode_plan_answer(data, pop)
    if isinstance(answer, WireDelta):
        raise WireError("after", "expected a full plan, got a delta")
    return answer


def decode_plan_answer(data: Any, pop: str) -> WirePlan | WireDelta:
    """Validate the shape of a plan answer for ``pop``: a full plan, or a delta (``after``)."""
    obj = _mapping(data, "")
    if obj.get("pop") != pop:
        raise WireError("pop", f"plan is for {obj.get('pop')!r}, this agent is {pop!r}")
    generation = _int(obj.get("generation"), "generation")
    revision = obj.get("revision")
    if not isinstance(revision, str):
        raise WireError("revision", "expected a string")
    digest = obj.get("digest", "")
    if not isinstance(digest, str):
        raise WireError("digest", "expected a string")
    delta = "after" in obj
    entries = _plan_entries(obj.get("vips"), delta)
    if not delta:
        return WirePlan(pop, generation, revision, entries, digest)
    after = _int(obj.get("after"), "after")
    specs = _mapping(obj.get("specs", {}), "specs")
    removed = obj.get("removed", [])
    if not isinstance(removed, list) or (removed and not all(isinstance(n, str) for n in removed)):
        raise WireError("removed", "expected a list of VIP names")
    return WireDelta(pop, generation, after, revision, digest, specs, entries, tuple(removed))


def _plan_entries(vips: Any, delta: bool) -> tuple[PlanVip, ...]:
    if not isinstance(vips, list):
        raise WireError("vips", "expected a list")
    entries = []
    for i, e in enumerate(vips):
        # One test for the whole entry, the field's name only when it fails: a plan has
        # 10,000 entries and almost always every one is right.
        if not isinstance(e, dict):
            raise WireError(f"vips[{i}]", "expected a JSON object")
        name, active, reason = e.get("name"), e.get("active_origin"), e.get("reason")
        wanted, drain, hold = e.get("wanted"), e.get("drain"), e.get("safety_hold")
        explanation, hash_ = e.get("explanation", ""), e.get("spec_hash", "")
        evidence = e.get("evidence", False)
        known = _PLAN_REASONS.get(reason) if isinstance(reason, str) else None
        if not (isinstance(name, str) and isinstance(active, str) and known is not None
                and isinstance(wanted, bool) and isinstance(drain, bool) and isinstance(hold, bool)
                and isinstance(explanation, str) and isinstance(hash_, str) and (hash_ or not delta)
                and isinstance(evidence, bool)):
            _refuse(e, f"vips[{i}]")
        weights = _weights(e["weights"], f"vips[{i}].weights", active) if "weights" in e else ()
        asked = (_evidence_origins(e["evidence_origins"], f"vips[{i}].evidence_origins", evidence)
                 if "evidence_origins" in e else ())
        entries.append(PlanVip(name, None if delta else e.get("spec"), wanted, active, drain, known, hold,
                               explanation, hash_, evidence, weights, asked))
    return tuple(entries)


def _weights(v: Any, where: str, active: str) -> Weights:
    """An entry's ``weights``: [[region, 1..MAX_WIRE_WEIGHT], ...], each region once, the active one among them."""
    if not isinstance(v, list):
        raise WireError(where, "expected a list of [region, weight] pairs")
    out: list[tuple[str, int]] = []
    for j, pair in enumerate(v):
        ok = (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], int)
              and not isinstance(pair[1], bool) and 1 <= pair[1] <= MAX_WIRE_WEIGHT)
        if not ok:
            raise WireError(f"{where}[{j}]", f"expected [region, weight 1-{MAX_WIRE_WEIGHT}]")
        if any(r == pair[0] for r, _ in out):
            raise WireError(f"{where}[{j}]", f"region {pair[0]!r} listed twice")
        out.append((pair[0], pair[1]))
    if out and all(r != active for r, _ in out):
        raise WireError(where, f"the active origin {active!r} has no weight")
    return tuple(out)


MAX_EVIDENCE_ORIGINS = 64  # more regions than any VIP has: garbage


def _evidence_origins(v: Any, where: str, evidence: bool) -> tuple[str, ...]:
    """An entry's ``evidence_origins``: a non-empty list of distinct region names, only with
    ``evidence`` (that they are the VIP's regions, the agent checks against the spec)."""
    if not evidence:
        raise WireError(where, "only with \"evidence\": true")
    if not isinstance(v, list) or not v or len(v) > MAX_EVIDENCE_ORIGINS:
        raise WireError(where, f"expected a list of 1 to {MAX_EVIDENCE_ORIGINS} origin regions")
    for j, region in enumerate(v):
        if not isinstance(region, str) or not region:
            raise WireError(f"{where}[{j}]", "expected an origin region's name")
        if region in v[:j]:
            raise WireError(f"{where}[{j}]", f"region {region!r} listed twice")
    return tuple(v)


def _refuse(e: dict[str, Any], where: str) -> NoReturn:
    """Raise the WireError for the first bad field of a plan entry."""
    if not isinstance(e.get("name"), str):
        raise WireError(f"{where}.name", "expected a string")
    active = e.get("active_origin")
    if not isinstance(active, str):
        raise WireError(f"{where}.active_origin", f"{active!r} is not one of the VIP's origin regions")
    for flag in ("wanted", "drain", "safety_hold"):
        _bool(e.get(flag), f"{where}.{flag}")
    reason = e.get("reason")
    if not isinstance(reason, str) or reason not in _PLAN_REASONS:
        raise WireError(f"{where}.reason", f"{reason!r} is not a plan reason ({', '.join(_PLAN_REASONS)})")
    if not isinstance(e.get("explanation", ""), str):
        raise WireError(f"{where}.explanation", "expected a string")
    _bool(e.get("evidence", False), f"{where}.evidence")
    raise WireError(f"{where}.spec_hash", "expected the spec's hash (a string)")


_PLAN_REASONS = {r.value: r for r in PlanReason}


# --- reports -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WireReport:
    """A full report (``base`` None) or a delta report onto report ``base``."""

    plan_generation: int
    origins: Mapping[str, Mapping[str, bool | None]]  # vip -> origin region -> verdict (None: none yet)
    announced: Mapping[str, bool]  # vip -> announced by the POP now
    seq: int | None = None  # the agent's number for this report (None: an agent before delta reports)
    base: int | None = None
    removed: tuple[str, ...] = ()  # delta only: VIPs gone from the report
    # vip -> region -> (seconds since at least min_healthy backends' last checks succeeded,
    # seconds since the first failed check of a failure now running), None where there is
    # none. Only the VIPs the plan asks evidence for or whose active origin is failing or down here;
    # never a delta: each report carries the whole current set (ages move with every report).
    checks: Mapping[str, Mapping[str, tuple[float | None, float | None]]] = field(default_factory=dict)


def report_limit(pairs: int) -> int:
    """The largest report body a POP publishing ``pairs`` VIP x origin-region pairs may send."""
    return MAX_REPORT_BYTES + REPORT_BYTES_PER_PAIR * pairs


def encode_report(report: WireReport, *, compact: bool = False) -> dict[str, Any]:
    """``report``'s JSON value; ``compact``: its maps in the compact form (see above)."""
    data: dict[str, Any] = {"plan_generation": report.plan_generation}
    if compact:
        data[COMPACT] = compact_maps(report.origins, report.announced)
    else:
        data["origins"] = {v: dict(r) for v, r in report.origins.items()}
        data["announced"] = dict(report.announced)
    if report.seq is not None:
        data["seq"] = report.seq
    if report.checks:
        data["checks"] = {v: {r: {"ok": ok, "failing": failing} for r, (ok, failing) in regions.items()}
                          for v, regions in report.checks.items()}
    if report.base is not None:
        data["base"] = report.base
        data["removed"] = list(report.removed)
    return data


COMPACT = "compact"  # the report field of the compact form (an older controller's 400 names it)


def compact_maps(origins: Mapping[str, Mapping[str, bool | None]], announced: Mapping[str, bool]) -> dict[str, Any]:
    """The ``compact`` value of a report's two maps: one group per distinct set of verdicts
    (in the order first seen), each VIP's announcement beside it."""
    groups: dict[tuple[tuple[str, bool | None], ...] | None, list[str]] = {}
    for vip, regions in origins.items():
        key = tuple(regions.items())
        names = groups.get(key)
        if names is None:
            groups[key] = [vip]
        else:
            names.append(vip)
    bare = [v for v in announced if v not in origins]
    if bare:
        groups[None] = bare
    flag = announced.get
    return {"groups": [{"origins": None if key is None else dict(key), "vips": names,
                        "announced": [flag(v) for v in names]} for key, names in groups.items()]}


def report_delta(previous: WireReport, new: WireReport) -> WireReport:
    """``new`` (a full report) as a delta onto ``previous`` (both numbered): only the VIPs
    whose verdicts or announcement changed, and the VIPs gone."""
    assert previous.seq is not None and new.seq is not None
    po, pa = previous.origins, previous.announced
    origins = {v: r for v, r in new.origins.items() if po.get(v) != r}
    announced = {v: f for v, f in new.announced.items() if pa.get(v) != f}
    removed = tuple(sorted((set(po) - set(new.origins)) | (set(pa) - set(new.announced))))
    return WireReport(new.plan_generation, origins, announced, new.seq, previous.seq, removed, new.checks)


def apply_report_delta(origins: Mapping[str, Mapping[str, bool | None]], announced: Mapping[str, bool],
                       delta: WireReport, published: Collection[str], *, checked: bool = False
                       ) -> tuple[Mapping[str, Mapping[str, bool | None]], Mapping[str, bool]]:
    """The full verdict set after ``delta``, onto the last one; VIPs no longer published drop out.
    A delta that changes nothing (the steady state: every POP, every few seconds) returns the
    last mappings themselves when they name only published VIPs (a set comparison in C), so
    the controller sees the same report content by identity and does no O(VIPs) work.
    ``checked``: the caller knows the last mappings name only published VIPs (it validated
    them against this very ``published``): no comparison at all (it was ~1 ms per report at
    10,000 VIPs, most of an empty delta's cost), and a copy instead of a filter."""
    if checked:
        if not delta.removed and not delta.origins and not delta.announced:
            return origins, announced
        new_o, new_a = dict(origins), dict(announced)
        for v in delta.removed:
            new_o.pop(v, None)
            new_a.pop(v, None)
        new_o.update(delta.origins)
        new_a.update(delta.announced)
        return new_o, new_a
    if not delta.removed and not delta.origins and not delta.announced:
        names = published.keys() if isinstance(published, Mapping) else published
        if isinstance(names, AbstractSet) and origins.keys() <= names and announced.keys() <= names:
            return origins, announced
    gone = set(delta.removed)
    new_origins = {v: r for v, r in origins.items() if v not in gone and v in published}
    new_origins.update(delta.origins)
    new_announced = {v: f for v, f in announced.items() if v not in gone and v in published}
    new_announced.update(delta.announced)
    return new_origins, new_announced


def decode_report(data: Any, published: Mapping[str, Collection[str]]) -> WireReport:
    """Validate a POP's report (full or delta) against the VIPs it publishes (name -> regions)."""
    steps = decode_report_steps(data, published, None)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            report: WireReport = done.value
            return report


def decode_report_steps(data: Any, published: Mapping[str, Collection[str]],
                        budget_s: float | None) -> Generator[None, None, WireReport]:
    """``decode_report`` in slices of about ``budget_s`` (None: whole): a generator that yields
    between slices and returns the report (or raises its WireError). The controller's event
    loop runs a large report's ~40-50 ms of Python this way, answering other requests between
    slices, instead of in a thread that would take the GIL from the loop at each of its
    system calls (results 3q, 3t). Nothing is kept or changed but the validated-verdict
    caches (read-only shared objects): a report refused half-way leaves no trace."""
    obj = _mapping(data, "")
    unknown = obj.keys() - _REPORT_FIELDS  # (a set literal there was built anew for every report)
    if unknown:
        raise WireError(sorted(unknown)[0], "unknown field")
    if COMPACT in obj:
        for both in ("origins", "announced"):
            if both in obj:
                raise WireError(both, f"not with \"{COMPACT}\" (a report's maps are in one form or the other)")
    generation = _int(obj.get("plan_generation", 0), "plan_generation")
    seq = _counter(obj["seq"], "seq") if "seq" in obj else None
    base = _counter(obj["base"], "base") if "base" in obj else None
    if base is not None and seq is None:
        raise WireError("seq", "a delta report (with base) needs its own seq")
    removed = obj.get("removed", [])
    if base is None and "removed" in obj:
        raise WireError("removed", "only a delta report (with base) removes VIPs")
    if not isinstance(removed, list) or (removed and not all(isinstance(n, str) for n in removed)):
        raise WireError("removed", "expected a list of VIP names")
    if COMPACT in obj:
        origins, announced = _compact(obj[COMPACT], published)  # (a few operations per group, in C)
    else:
        origins, announced = yield from _maps(obj, published, budget_s)
    checks: dict[str, dict[str, tuple[float | None, float | None]]] = {}
    for vip_name, regions in _mapping(obj.get("checks", {}), "checks").items():
        known = published.get(vip_name)
        if known is None:
            raise WireError(f"checks.{vip_name}", "this POP does not publish that VIP")
        times: dict[str, tuple[float | None, float | None]] = {}
        for region, pair in _mapping(regions, f"checks.{vip_name}").items():
            where = f"checks.{vip_name}.{region}"
            if region not in known:
                raise WireError(where, "not an origin region of this VIP")
            pair = _mapping(pair, where)
            if set(pair) - {"ok", "failing"}:
                raise WireError(f"{where}.{sorted(set(pair) - {'ok', 'failing'})[0]}", "unknown field")
            times[region] = (_age(pair.get("ok"), f"{where}.ok"), _age(pair.get("failing"), f"{where}.failing"))
        checks[vip_name] = times
    return WireReport(generation, origins, announced, seq, base, tuple(removed), checks)


def _maps(obj: dict[str, Any], published: Mapping[str, Collection[str]], budget_s: float | None
          ) -> Generator[None, None, tuple[Mapping[str, Mapping[str, bool | None]], Mapping[str, bool]]]:
    """A report's ``origins`` and ``announced`` (the form before ``compact``), validated;
    yielding every ``budget_s`` (None: never) of the per-VIP loop (~4 us a VIP)."""
    origins: dict[str, Mapping[str, bool | None]] = {}
    start = time.perf_counter() if budget_s is not None else 0.0
    i = 0
    checked, get = _CHECKED, _CHECKED.get
    received = _mapping(obj.get("origins", {}), "origins")
    # The shared verdicts are found by equality, and 1 or 1.0 equal true (0: false): only a
    # report whose verdicts are all true, false or null (one scan in C) uses them.
    try:
        exact = set(map(type, itertools.chain.from_iterable(map(dict.values, received.values())))) <= _VERDICT_TYPES
    except TypeError:  # a VIP's verdicts not an object: refused below
        exact = False
    for vip_name, regions in received.items():
        known = published.get(vip_name)
        if known is None:
            raise WireError(f"origins.{vip_name}", "this POP does not publish that VIP")
        # A VIP's verdicts are one of a handful of combinations fleet-wide (every origin up,
        # the primary down...): each combination is validated once per set of regions and
        # shared, read-only, by every VIP and report that has it (~0.5 us a VIP instead of
        # ~2.5: a full report of 10,000 VIPs is validated in ~5 ms).
        key: tuple[Collection[str], tuple[tuple[Any, Any], ...]] | None = None
        shared = None
        if exact and type(regions) is dict:
            key = (known, tuple(regions.items()))
            try:
                shared = get(key)
            except TypeError:  # an unhashable verdict (refused below) or set of regions
                key = None
        if shared is None:
            shared = _verdicts(vip_name, regions, known)
            if key is not None:
                if len(checked) > 100_000:  # a bound, not a cache policy: combinations are few
                    checked.clear()
                checked[key] = shared
        origins[intern(vip_name)] = shared
        i += 1
        if budget_s is not None and not i % _VIPS_PER_CLOCK and time.perf_counter() - start >= budget_s:
            yield  # (the next VIPs after a turn of the event loop: ``received`` is not changed meanwhile)
            start = time.perf_counter()
    if budget_s is not None:
        yield  # (the announced flags, in C, are a piece of their own: the last VIPs' slice was full)
    flags = _mapping(obj.get("announced", {}), "announced")
    if not (flags.keys() <= published.keys() and all(f is True or f is False for f in flags.values())):
        for vip_name, flag in flags.items():  # (only to name the first bad one)
            if vip_name not in published:
                raise WireError(f"announced.{vip_name}", "this POP does not publish that VIP")
            _bool(flag, f"announced.{vip_name}")
    # The names interned (map() in C): a POP's report is kept until its next one, and 50
    # POPs x 10,000 VIPs of names decoded anew by json are 30 MB of copies of one string each
    # (the config's names are interned too: config.agent.read_name).
    announced: dict[str, bool] = dict(zip(map(intern, flags), flags.values()))
    return origins, announced


def _compact(v: Any, published: Mapping[str, Collection[str]]
             ) -> tuple[Mapping[str, Mapping[str, bool | None]], Mapping[str, bool]]:
    """A report's ``compact`` value as its two maps (read-only: shared), validated. Equal to
    a recent one against the same published VIPs (the same object; a healthy fleet's POPs
    that publish the same VIPs report the same, e.g. their first reports after a controller
    restart), that one's maps: one comparison in C instead of building them again."""
    for p, value, maps in _RECENT_COMPACT:
        if p is published and value == v and _exact(v):
            return maps
    maps = _compact_maps(v, published)
    _RECENT_COMPACT.insert(0, (published, v, maps))
    del _RECENT_COMPACT[2:]  # (a value is ~2 strings a VIP: a few MB at most)
    return maps


_REPORT_FIELDS = frozenset({"plan_generation", "origins", "announced", "seq", "base", "removed", "checks", COMPACT})
_VIPS_PER_CLOCK = 64  # VIPs of a report's origins between two looks at the clock (~0.3 ms)


_RECENT_COMPACT: list[tuple[object, Any, tuple[Mapping[str, Mapping[str, bool | None]], Mapping[str, bool]]]] = []


def _exact(v: dict[str, Any]) -> bool:
    """Whether a ``compact`` value equal to a valid one is valid too: == takes 1 for true
    and 0.0 for false, so the flags' and verdicts' types are checked (in C, per group)."""
    allowed = {bool, type(None)}
    return all(set(map(type, g.get("announced", ()))) <= allowed
               and set(map(type, (g.get("origins") or {}).values())) <= allowed for g in v.get("groups", ()))


def _compact_maps(v: Any, published: Mapping[str, Collection[str]]
                  ) -> tuple[dict[str, Mapping[str, bool | None]], dict[str, bool]]:
    """A report's ``compact`` value as its two maps, validated as ``_maps`` validates them.
    Each check is a few operations per group in C (``map``, ``set``, ``dict.fromkeys``,
    ``zip``), not a few per VIP in Python: a group's verdicts are checked once and shared by
    its VIPs, and its regions once per distinct set of regions its VIPs have (the controller
    keeps one object per distinct set)."""
    c = _mapping(v, COMPACT)
    if set(c) - {"groups"}:
        raise WireError(f"{COMPACT}.{sorted(set(c) - {'groups'})[0]}", "unknown field")
    groups = c.get("groups", [])
    if not isinstance(groups, list):
        raise WireError(f"{COMPACT}.groups", 'expected a list of {"origins": ..., "vips": [...], "announced": [...]}')
    named: list[list[str]] = []  # per group with verdicts: its VIPs
    shared: list[Mapping[str, bool | None]] = []  # ... and its verdicts
    bare: list[str] = []  # the VIPs of groups with "origins": null
    flagged: list[list[str]] = []  # per group with flags: its VIPs
    flags: list[list[bool]] = []  # ... and their flags
    for i, g in enumerate(groups):
        where = f"{COMPACT}.groups[{i}]"
        g = _mapping(g, where)
        if set(g) - {"origins", "vips", "announced"}:
            raise WireError(f"{where}.{sorted(set(g) - {'origins', 'vips', 'announced'})[0]}", "unknown field")
        verdicts = _group_verdicts(g.get("origins"), f"{where}.origins")
        vips = g.get("vips")
        if isinstance(vips, list) and len(vips) >= _LARGE_GROUP:
            fleet = _published(published)
            # A large group (a cold start's reports: 100,000 VIPs a POP, most in one group):
            # its names checked and made the config's objects by one lookup each (in C), its
            # verdicts' regions against the few distinct sets of regions the POP's VIPs have.
            names = _canonical_names(vips, f"{where}.vips", published, fleet)
            if verdicts and not fleet.covers(verdicts):
                _regions_known(names, verdicts, published, where)
        else:
            names = _names(vips, f"{where}.vips", published, checked=bool(verdicts))
            if verdicts:  # (which also finds a VIP not published)
                _regions_known(names, verdicts, published, where)
        if verdicts is None:
            bare.extend(names)
        else:
            named.append(names)
            shared.append(verdicts)
        if "announced" in g:
            some, these = _flags(g["announced"], f"{where}.announced", names)
            flagged.append(some)
            flags.append(these)
    # Each map made at once from the groups' lists (chained in C: no per-VIP Python).
    origins: dict[str, Mapping[str, bool | None]] = dict(zip(
        itertools.chain.from_iterable(named), itertools.chain.from_iterable(map(itertools.repeat, shared, map(len, named)))))
    if len(origins) + len(bare) != sum(map(len, named)) + len(bare) or (bare and not origins.keys().isdisjoint(bare)):
        _twice([(f"{COMPACT}.groups[{k}].vips", g["vips"]) for k, g in enumerate(groups)])
    announced = dict(zip(itertools.chain.from_iterable(flagged), itertools.chain.from_iterable(flags)))
    return origins, announced


def _flags(v: Any, where: str, names: list[str]) -> tuple[list[str], list[bool]]:
    """A group's ``announced``: per VIP, in the order of ``vips``, true, false or null (no
    entry); the VIPs with a flag and their flags."""
    if not isinstance(v, list) or len(v) != len(names):
        raise WireError(where, f"expected a list of {len(names)} true, false or null (one per VIP of the group)")
    if set(map(type, v)) <= {bool}:
        return names, v
    for j, flag in enumerate(v):
        if flag is not None and not isinstance(flag, bool):
            raise WireError(f"{where}[{j}]", "expected true, false or null")
    return [n for n, f in zip(names, v) if f is not None], [f for f in v if f is not None]


def _names(v: Any, where: str, published: Mapping[str, Collection[str]], *, checked: bool = False) -> list[str]:
    """A list of names of VIPs the POP publishes, interned (in C; the first bad one named).
    ``checked``: the caller looks each one up in ``published`` (not checked here)."""
    if not isinstance(v, list):
        raise WireError(where, "expected a list of VIP names")
    try:
        # The names interned (the config's are too: config.agent.read_name): a POP's report
        # is kept until its next one, and 50 POPs x 10,000 names decoded anew by json are
        # 30 MB of copies of one string each.
        names = list(map(intern, v))
    except TypeError:  # not a string
        names = []
    if len(names) != len(v) or not (checked or all(map(published.__contains__, names))):
        _unknown(v, where, published)
    return names


_LARGE_GROUP = 4096  # names in a group from which the POP's published VIPs are looked at whole (_Published)


class _Published:
    """What large groups are checked against, made once per published mapping (read-only:
    the controller's index, one object per distinct set of VIPs): each VIP's name as the
    mapping's own key object (a lookup that is the membership check and the interning at
    once), and the distinct sets of regions its VIPs have."""

    __slots__ = ("canonical", "regions")

    def __init__(self, published: Mapping[str, Collection[str]]) -> None:
        self.canonical: dict[str, str] = dict(zip(published, published))
        try:
            self.regions: tuple[Collection[str], ...] | None = tuple(set(published.values()))
        except TypeError:  # unhashable sets of regions (lists: a caller's own mapping)
            self.regions = None

    def covers(self, verdicts: Mapping[str, bool | None]) -> bool:
        """Whether every region of ``verdicts`` is one of every published VIP's."""
        return self.regions is not None and all(r in known for known in self.regions for r in verdicts)


def _published(published: Mapping[str, Collection[str]]) -> _Published:
    for p, made in _PUBLISHED:
        if p is published:
            return made
    made = _Published(published)
    _PUBLISHED.insert(0, (published, made))
    del _PUBLISHED[8:]  # (a bound: POPs that publish the same VIPs share one mapping)
    return made


_PUBLISHED: list[tuple[object, _Published]] = []


def _canonical_names(v: list[Any], where: str, published: Mapping[str, Collection[str]], fleet: _Published) -> list[str]:
    """``_names(v, ...)`` with every name checked: the published VIPs' own name objects."""
    try:
        return list(map(fleet.canonical.__getitem__, v))
    except (KeyError, TypeError):  # not published, or not a string
        _unknown(v, where, published)


def _unknown(v: list[Any], where: str, published: Mapping[str, Collection[str]]) -> NoReturn:
    """Raise the WireError naming the first entry of ``v`` that is not a published VIP's name."""
    for j, name in enumerate(v):
        if not isinstance(name, str):
            raise WireError(f"{where}[{j}]", "expected a VIP's name")
        if name not in published:
            raise WireError(f"{where}[{j}]", f"this POP does not publish that VIP ({name[:100]!r})")
    raise WireError(where, "expected names of VIPs this POP publishes")


def _group_verdicts(v: Any, where: str) -> Mapping[str, bool | None] | None:
    """A group's verdicts (region -> true, false or null), one shared object per distinct
    set; None: its VIPs have no verdicts (only announcements)."""
    if v is None:
        return None
    verdicts = _mapping(v, where)
    for region, verdict in verdicts.items():  # (every time: 1 equals True as a key, and groups are few)
        if not isinstance(region, str):
            raise WireError(where, "expected origin regions' names as keys")
        if verdict is not None and not isinstance(verdict, bool):
            raise WireError(f"{where}.{region}", "expected true, false or null")
    key = tuple(verdicts.items())
    shared = _GROUPS.get(key)
    if shared is None:
        if len(_GROUPS) > 100_000:  # a bound, not a cache policy: combinations are few
            _GROUPS.clear()
        shared = _GROUPS[key] = verdicts
    return shared


# a group's verdicts, as received, -> the validated object its VIPs share (read-only)
_GROUPS: dict[tuple[tuple[str, Any], ...], Mapping[str, bool | None]] = {}


def _regions_known(names: list[str], verdicts: Mapping[str, bool | None],
                   published: Mapping[str, Collection[str]], where: str) -> None:
    """Every region of a group's verdicts is one of each of its VIPs' (checked once per
    distinct set of regions among them)."""
    try:
        distinct: Iterable[Collection[str]] = set(map(published.__getitem__, names))
    except KeyError:
        _unknown(names, f"{where}.vips", published)
    except TypeError:  # unhashable sets of regions (lists: a caller's own mapping)
        if not all(map(published.__contains__, names)):
            _unknown(names, f"{where}.vips", published)
        distinct = [published[n] for n in names]
    for known in distinct:
        missing = next((r for r in verdicts if r not in known), None)
        if missing is not None:
            j = next(j for j, n in enumerate(names) if published[n] == known)
            raise WireError(f"{where}.origins.{missing}",
                            f"not an origin region of {where}.vips[{j}] ({names[j][:100]!r})")


def _twice(lists: list[tuple[str, Any]]) -> NoReturn:
    """Raise the WireError naming the first VIP listed a second time across ``lists``."""
    seen: set[str] = set()
    for where, names in lists:
        for j, name in enumerate(names):
            if name in seen:
                raise WireError(f"{where}[{j}]", f"VIP {name[:100]!r} listed twice (a VIP is in one group at most)")
            seen.add(name)
    raise WireError(lists[-1][0], "a VIP listed twice")


# (the regions a VIP has, its verdicts in a report's order) -> the validated verdicts
_CHECKED: dict[tuple[Collection[str], tuple[tuple[Any, Any], ...]], Mapping[str, bool | None]] = {}
_VERDICT_TYPES = {bool, type(None)}


def _verdicts(vip_name: str, regions: Any, known: Collection[str]) -> dict[str, bool | None]:
    verdicts: dict[str, bool | None] = {}
    for region, verdict in _mapping(regions, f"origins.{vip_name}").items():
        if region not in known:
            raise WireError(f"origins.{vip_name}.{region}", "not an origin region of this VIP")
        if verdict is not None and not isinstance(verdict, bool):
            raise WireError(f"origins.{vip_name}.{region}", "expected true, false or null")
        verdicts[region] = verdict
    return verdicts


# --- helpers -----------------------------------------------------------------------------------
def _mapping(v: Any, field: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise WireError(field, "expected a JSON object")
    return v


def _age(v: Any, field: str) -> float | None:
    """Seconds ago (a check time in a report): null, or a finite number from 0 to a day."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 86400:
        raise WireError(field, "expected null or seconds (0 to 86400)")
    return float(v)


def _int(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNTER:
        raise WireError(field, f"expected an integer from 0 to {MAX_COUNTER}")
    return v


def _counter(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNTER:
        raise WireError(field, f"expected an integer from 0 to {MAX_COUNTER}")
    return v


def parse_counter(text: str, field: str) -> int:
    """A query parameter's non-negative integer (``after=GEN``), refused by name otherwise."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_COUNTER:
        raise WireError(field, f"expected an integer from 0 to {MAX_COUNTER}, got {text[:40]!r}")
    return int(text)


def _bool(v: Any, field: str) -> bool:
    if not isinstance(v, bool):
        raise WireError(field, "expected true or false")
    return v
