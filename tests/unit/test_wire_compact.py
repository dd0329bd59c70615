"""The compact form of a report (wire.py, *The compact form*): the same maps as the older
form, every check of it with the field named, the older form still read."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from typing import Any

import pytest

from controller import wire
from controller.policy.engine import compact_report
from controller.policy.model import PopReport
from controller.wire import COMPACT, WireError, WireReport, decode_report, encode_report, report_delta

REGIONS = ("us-west", "us-east", "eu-central")
# (names interned, as the config's are: config.agent.read_name)
PUBLISHED: dict[str, frozenset[str]] = {sys.intern(f"v{i}"): frozenset(REGIONS[:1 + i % 3]) for i in range(40)}


def _random_report(rng: random.Random, seq: int = 7) -> WireReport:
    """Verdicts and flags of every kind: null verdicts, withdrawn VIPs, VIPs with only
    verdicts or only a flag, and a few combinations shared by many VIPs."""
    origins: dict[str, dict[str, bool | None]] = {}
    announced: dict[str, bool] = {}
    for name, regions in PUBLISHED.items():
        kind = rng.random()
        if kind > 0.1:
            origins[name] = {r: rng.choice((True, True, True, False, None)) for r in sorted(regions)
                             if rng.random() > 0.1}
        if kind < 0.9:
            announced[name] = rng.random() > 0.2
    return WireReport(rng.randrange(100), origins, announced, seq)


def _wire(value: Any) -> Any:
    return json.loads(json.dumps(value))


@pytest.mark.parametrize("seed", range(20))
def test_the_compact_form_decodes_to_what_the_older_form_decodes_to(seed: int) -> None:
    rng = random.Random(seed)
    report = _random_report(rng)
    older = decode_report(_wire(encode_report(report)), PUBLISHED)
    compact = decode_report(_wire(encode_report(report, compact=True)), PUBLISHED)
    assert compact == older == report
    # a delta in the compact form too (base, removed), and the same checks
    later = _random_report(rng, seq=8)
    later = dataclasses.replace(later, checks={"v1": {"us-west": (0.5, None)}})
    delta = report_delta(report, later)
    assert (decode_report(_wire(encode_report(delta, compact=True)), PUBLISHED)
            == decode_report(_wire(encode_report(delta)), PUBLISHED) == delta)


def test_a_full_report_is_about_a_quarter_of_the_bytes_at_10000_vips() -> None:
    published = {f"vip-{i:05d}": frozenset(REGIONS[:2]) for i in range(10_000)}
    report = WireReport(3, {n: {"us-west": True, "us-east": i % 100 != 0} for i, n in enumerate(published)},
                        dict.fromkeys(published, True), 1)
    older, compact = (json.dumps(encode_report(report, compact=c)).encode() for c in (False, True))
    assert len(compact) * 3 < len(older)
    assert decode_report(json.loads(compact), published) == decode_report(json.loads(older), published) == report
    assert len(json.loads(compact)[COMPACT]["groups"]) == 2  # one per distinct set of verdicts


def test_equal_compact_reports_share_their_maps_and_names_are_interned() -> None:
    report = _random_report(random.Random(1))
    a = decode_report(_wire(encode_report(report, compact=True)), PUBLISHED)
    b = decode_report(_wire(encode_report(dataclasses.replace(report, seq=9), compact=True)), PUBLISHED)
    assert b.seq == 9 and a.origins is b.origins and a.announced is b.announced
    name = next(iter(a.origins))
    assert name is next(n for n in PUBLISHED if n == name)  # the config's own string object
    # and the engine's store keeps them (a POP's first report after a restart)
    kept = compact_report(PopReport("sjc", 0.0, 1, b.origins, b.announced), None)
    assert kept.origins == report.origins and kept.announced == report.announced


def _body(groups: Any) -> dict[str, Any]:
    return {"plan_generation": 1, "seq": 5, COMPACT: {"groups": groups}}


GOOD = {"origins": {"us-west": True}, "vips": ["v0", "v3"], "announced": [True, False]}

BAD: list[tuple[Any, str, str]] = [
    ({"plan_generation": 1, COMPACT: []}, COMPACT, "expected a JSON object"),
    ({"plan_generation": 1, COMPACT: {"groups": {}}}, f"{COMPACT}.groups", "expected a list"),
    ({"plan_generation": 1, COMPACT: {"groups": [], "extra": 1}}, f"{COMPACT}.extra", "unknown field"),
    ({"plan_generation": 1, COMPACT: {"groups": []}, "origins": {}}, "origins", "not with"),
    ({"plan_generation": 1, COMPACT: {"groups": []}, "announced": {}}, "announced", "not with"),
    (_body([GOOD, 3]), f"{COMPACT}.groups[1]", "expected a JSON object"),
    (_body([{**GOOD, "more": 1}]), f"{COMPACT}.groups[0].more", "unknown field"),
    (_body([{**GOOD, "vips": "v0"}]), f"{COMPACT}.groups[0].vips", "expected a list"),
    (_body([{**GOOD, "vips": ["v0", 3]}]), f"{COMPACT}.groups[0].vips[1]", "expected a VIP's name"),
    (_body([{**GOOD, "vips": ["v0", ["v1"]]}]), f"{COMPACT}.groups[0].vips[1]", "expected a VIP's name"),
    (_body([{**GOOD, "vips": ["v0", "mars"]}]), f"{COMPACT}.groups[0].vips[1]", "does not publish"),
    (_body([{"origins": None, "vips": ["v0", "mars"], "announced": [True, True]}]),
     f"{COMPACT}.groups[0].vips[1]", "does not publish"),
    (_body([{"origins": {}, "vips": ["mars"]}]), f"{COMPACT}.groups[0].vips[0]", "does not publish"),
    (_body([{**GOOD, "origins": {"eu-central": True}}]), f"{COMPACT}.groups[0].origins.eu-central",
     "not an origin region of compact.groups[0].vips[0]"),
    (_body([{**GOOD, "origins": {"us-west": 1}}]), f"{COMPACT}.groups[0].origins.us-west", "expected true, false or null"),
    (_body([{**GOOD, "origins": {"us-west": "yes"}}]), f"{COMPACT}.groups[0].origins.us-west", "expected true"),
    (_body([{**GOOD, "origins": ["us-west"]}]), f"{COMPACT}.groups[0].origins", "expected a JSON object"),
    (_body([{**GOOD, "announced": [True]}]), f"{COMPACT}.groups[0].announced", "one per VIP"),
    (_body([{**GOOD, "announced": True}]), f"{COMPACT}.groups[0].announced", "one per VIP"),
    (_body([{**GOOD, "announced": [True, 0]}]), f"{COMPACT}.groups[0].announced[1]", "expected true, false or null"),
    (_body([{**GOOD, "vips": ["v0", "v0"]}]), f"{COMPACT}.groups[0].vips[1]", "listed twice"),
    (_body([GOOD, {"origins": {"us-west": False}, "vips": ["v6", "v3"]}]), f"{COMPACT}.groups[1].vips[1]", "listed twice"),
    (_body([GOOD, {"origins": None, "vips": ["v3"], "announced": [True]}]), f"{COMPACT}.groups[1].vips[0]",
     "listed twice"),
]


@pytest.mark.parametrize(("body", "field", "words"), BAD, ids=[f for _, f, _ in BAD])
def test_a_bad_compact_report_is_refused_naming_the_field(body: Any, field: str, words: str) -> None:
    with pytest.raises(WireError) as caught:
        decode_report(body, PUBLISHED)
    assert caught.value.field == field and words in caught.value.message


def test_a_value_equal_to_a_valid_one_but_with_numbers_for_flags_is_still_refused() -> None:
    """1 == True and 0.0 == False: the recent values are compared with ==, so the types
    are checked as well (and the older form's shared verdicts, the same way)."""
    good = _body([GOOD])
    decode_report(good, PUBLISHED)
    with pytest.raises(WireError) as caught:
        decode_report(_body([{**GOOD, "announced": [1, False]}]), PUBLISHED)
    assert caught.value.field == f"{COMPACT}.groups[0].announced[0]"
    with pytest.raises(WireError) as caught:
        decode_report(_body([{**GOOD, "origins": {"us-west": 1.0}}]), PUBLISHED)
    assert caught.value.field == f"{COMPACT}.groups[0].origins.us-west"
    decode_report({"origins": {"v0": {"us-west": True}}}, PUBLISHED)
    with pytest.raises(WireError) as caught:
        decode_report({"origins": {"v3": {"us-west": 1}}}, PUBLISHED)
    assert caught.value.field == "origins.v3.us-west"


def test_a_value_equal_to_a_recent_one_without_optional_keys_decodes_again() -> None:
    """A group without "origins" (no verdicts) and a value without "groups" are valid; the
    second time such a value came (equal to a recent one: the fast path), a missing key
    raised KeyError there, a 500 instead of the same answer as the first time."""
    for value in ({"groups": [{"vips": ["v0", "v1"], "announced": [True, False]}]}, {}):
        first = decode_report({"seq": 1, COMPACT: value}, PUBLISHED)
        again = decode_report({"seq": 2, COMPACT: value}, PUBLISHED)
        assert (again.origins, again.announced) == (first.origins, first.announced)


def test_an_older_controller_refuses_the_compact_form_naming_the_field() -> None:
    """What the agent's fallback keys on: the decoder before the form answered "unknown field"
    for any key it did not know, naming the first in sorted order; the compact form adds one
    top-level key only."""
    body = encode_report(_random_report(random.Random(3)), compact=True)
    older_fields = {"plan_generation", "origins", "announced", "seq", "base", "removed", "checks"}
    assert sorted(set(body) - older_fields) == [COMPACT]
    assert wire.COMPACT == "compact"


@pytest.mark.parametrize(("body", "field", "words"), BAD, ids=[f for _, f, _ in BAD])
def test_a_bad_compact_report_is_refused_naming_the_field_by_the_large_groups_path_too(
        body: Any, field: str, words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every group taken as a large one (wire._canonical_names, _Published): the same 4xx."""
    monkeypatch.setattr(wire, "_LARGE_GROUP", 1)
    monkeypatch.setattr(wire, "_RECENT_COMPACT", [])
    with pytest.raises(WireError) as caught:
        decode_report(body, PUBLISHED)
    assert caught.value.field == field and words in caught.value.message


def _decoded(body: Any, published: Any, large: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    """decode_report's maps (in order) or its error, with groups of ``large`` names or more
    taken as large (nothing recent: each decoded anew)."""
    monkeypatch.setattr(wire, "_LARGE_GROUP", large)
    monkeypatch.setattr(wire, "_RECENT_COMPACT", [])
    try:
        r = decode_report(body, published)
    except WireError as exc:
        return ("refused", exc.field, exc.message)
    return (list(r.origins.items()), list(r.announced.items()), r.seq, r.plan_generation)


def _spoiled(body: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``body`` (the compact form) with one thing wrong, or right, at random."""
    groups = body[COMPACT]["groups"]
    if not groups:
        return body
    g = rng.choice(groups)
    kind = rng.choice(("none", "unknown", "number", "list", "twice", "across", "region", "flag", "flags"))
    if kind == "unknown" and g["vips"]:
        g["vips"][rng.randrange(len(g["vips"]))] = "mars"
    elif kind == "number" and g["vips"]:
        g["vips"][rng.randrange(len(g["vips"]))] = 7
    elif kind == "list" and g["vips"]:
        g["vips"][rng.randrange(len(g["vips"]))] = ["v1"]
    elif kind == "twice" and g["vips"]:
        g["vips"].append(g["vips"][0])
        if "announced" in g:
            g["announced"].append(True)
    elif kind == "across" and len(groups) > 1 and groups[0]["vips"]:
        other = groups[-1]
        other["vips"].append(groups[0]["vips"][0])
        if "announced" in other:
            other["announced"].append(None)
    elif kind == "region" and g.get("origins") is not None:
        g["origins"][rng.choice(REGIONS + ("mars-1",))] = True
    elif kind == "flag" and g.get("announced"):
        g["announced"][rng.randrange(len(g["announced"]))] = rng.choice((1, 0.0, "yes"))
    elif kind == "flags" and "announced" in g:
        g["announced"] = g["announced"][1:]
    return body


def _run_large_groups(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    for step in range(200):
        # a published mapping with regions as sets (hashable: the index's) or lists (a
        # caller's own), some VIPs with fewer regions than a group names
        published: dict[str, Any] = dict(PUBLISHED)
        if rng.random() < 0.3:
            published = {n: sorted(r) for n, r in published.items()}
        if rng.random() < 0.3:
            published = {n: r for n, r in published.items() if rng.random() > 0.2}
        report = _random_report(rng)
        report = dataclasses.replace(report, origins={n: v for n, v in report.origins.items() if n in published},
                                     announced={n: f for n, f in report.announced.items() if n in published})
        body = _spoiled(_wire(encode_report(report, compact=True)), rng)
        small = _decoded(body, published, 10**9, monkeypatch)
        large = _decoded(body, published, 1, monkeypatch)
        assert large == small, (seed, step, body)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_large_groups_decode_as_small_ones_do_or_are_refused_alike(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The large groups' path (one lookup per name in the published VIPs' own names, the
    regions against their distinct sets) against the per-group path, on random reports
    with one thing wrong or none: the same maps in the same order, or the same 4xx."""
    _run_large_groups(seed, monkeypatch)


def test_large_groups_decode_as_small_ones_do_seed_from_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers.seeds import with_clock_seed
    with_clock_seed(lambda seed: _run_large_groups(seed, monkeypatch))


def test_a_large_group_keeps_the_published_names_objects() -> None:
    published = {sys.intern(f"vip-{i:05d}"): frozenset(REGIONS[:2]) for i in range(5000)}
    report = WireReport(3, {n: {"us-west": True} for n in published}, dict.fromkeys(published, True), 1)
    decoded = decode_report(json.loads(json.dumps(encode_report(report, compact=True))), published)
    assert decoded == report
    assert all(a is b for a, b in zip(decoded.origins, published)) and all(a is b for a, b in zip(decoded.announced, published))
