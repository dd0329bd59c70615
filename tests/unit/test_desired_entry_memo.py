"""An entry of a VIP file parsed key by key, each key's text once per load (desired._parse_entry),
says what the entry parsed whole says (``parse_yaml("vips:\\n" + entry)``), or leaves it to that
parse: random entries of the shapes that matter (keys YAML reads as booleans or null, values of
every scalar kind, flow collections left open or closed across lines, quoted scalars over
several lines, lines at, left of and right of the keys' column, comments, block scalars, a key
given twice, nesting at the depth bound), one memo for all of them. Fixed seeds and one from
the clock (printed on failure)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from bench.controller_scale import generate
from controller.config.desired import _UNPARSED, LoadCache, _parse_entry, load_desired
from controller.config.errors import ConfigError
from controller.config.reader import parse_yaml
from tests.helpers.seeds import with_clock_seed

KEYS = ["name", "address", "publish", "check", "origins", "enabled", "yes", "on", "null", "y", "No", "a_b", "_x"]
VALUES = ["vip-1", "10.0.0.1/32", "1.5", "12:30", "2026-01-01", "0x1f", "0777", "yes", "~", "null", "a::b", "a:",
          "x  # c", "'q'", "\"q\"", "[p00, p01]", "{type: tcp}", "[a, b", "\"open", "'open", "-5", "1e5", ".inf",
          "a: b", "a b", "", "[]", "{}", "\"a\\x41\"", "[x, {y: [1, 2]}]", "{a: 1, a: 2}", "p00", "fra", "1_000",
          "=", "<<", "a]", "b}", "-", "? x", "x:y", "[x]  # c", "|", "|+", ">-", "@x", "`x", "%x"]
GOOD = ["vip-1", "10.0.0.1/32", "[p00, p01]", "{type: tcp}", "true", "1.5", "yes", "2026-01-01", "'q'", "[x, {y: 1}]",
        "a::b", "", "x  # c"]
MORE = ["- item", "key: v", "continued", "b]", "close\"", "close'", "# c", "", "- [x, y]", "deeper: {a: 1}", "x: y: z",
        "- {type: tcp}", "...", "name: again"]


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _value(rng: random.Random) -> str:
    return rng.choice(GOOD) if rng.random() < 0.75 else rng.choice(VALUES)


def _entry(rng: random.Random, indent: int) -> str:
    column = indent + 2
    first = "- " if rng.random() < 0.9 else rng.choice(["-  ", "- - ", "- '"])
    keys = rng.sample(KEYS, len(KEYS)) + rng.sample(KEYS, 3)  # (mostly each once; a few twice)
    lines = [" " * indent + first + keys.pop() + ":" + rng.choice([" ", " ", " ", "", "  "]) + _value(rng)]
    for _ in range(rng.randint(0, 6)):
        r = rng.random()
        if r < 0.6:  # a key line at the keys' column
            value = _deep(rng.choice([27, 28, 29, 30, 31])) if rng.random() < 0.05 else _value(rng)
            lines.append(" " * column + keys.pop() + ":" + rng.choice([" ", " ", " ", ""]) + value)
        elif r < 0.9:  # a deeper line, or one at another column
            lines.append(" " * (column + rng.choice([2, 2, 2, 4, 1, 0, -1])) + rng.choice(MORE + GOOD))
        else:
            lines.append(" " * rng.randint(0, column + 4) + rng.choice(["# a comment", "", "#"]))
    text = "\n".join(lines)
    return text + "\n" if rng.random() < 0.9 else text


def _whole(entry: str) -> Any:
    """What the loader does without _parse_entry: the entry's one item, or an error."""
    try:
        doc = parse_yaml("vips:\n" + entry, "f.yaml")
    except ConfigError as exc:
        return ("error", [str(i) for i in exc.issues])
    if not (isinstance(doc, dict) and list(doc) == ["vips"] and isinstance(doc["vips"], list)
            and len(doc["vips"]) == 1):
        return ("not one item", repr(doc))
    return doc["vips"][0]


def test_an_entry_parsed_key_by_key_is_the_entry_parsed_whole() -> None:
    with_clock_seed(_entries_alike)


def _entries_alike(seed: int) -> None:
    memo: dict[str, Any] = {}
    taken = 0
    for s in [*range(3000), seed]:
        rng = random.Random(s)
        indent = rng.choice([0, 2, 4])
        entry = _entry(rng, indent)
        got = _parse_entry(entry, indent, memo)
        if got is _UNPARSED:
            continue
        taken += 1
        # repr: the same types (1 is not 1.0 nor True), the same keys in the same order
        assert repr(got) == repr(_whole(entry)), (s, entry)
        assert _parse_entry(entry, indent, memo) == got  # from the memo: the same again
    assert taken > 600, taken  # mostly of the shape that is taken, not all left to the whole parse


def test_the_plain_entries_are_taken_and_share_their_values() -> None:
    memo: dict[str, Any] = {}
    a = _parse_entry("  - name: a\n    address: 10.0.0.1/32\n    publish: [p00, p01]\n    check: {type: tcp}\n", 2, memo)
    b = _parse_entry("  - name: b\n    address: 10.0.0.2/32\n    publish: [p00, p01]\n    check: {type: tcp}\n", 2, memo)
    assert a == {"name": "a", "address": "10.0.0.1/32", "publish": ["p00", "p01"], "check": {"type": "tcp"}}
    assert b["publish"] is a["publish"] and b["check"] is a["check"]
    for left in ("  - name: a\n    name: b\n",  # a key twice: the whole parse words it
                 "  - name: a\n    origins:\n    - region: x\n",  # a list at the keys' column
                 "  - name: a\n    d: \"two\n    x: lines\"\n",  # a quoted scalar over a key line
                 "  - name: a\n    d: |\n      text\n",  # a block scalar
                 "  - name: a\n   x: 1\n",  # left of the keys' column
                 f"  - name: a\n    deep: {_deep(30)}\n"):  # past the depth bound once in the file
        assert _parse_entry(left, 2, memo) is _UNPARSED, left


def _load(d: Path, cache: LoadCache | None) -> Any:
    try:
        return load_desired(str(d), "r", cache)
    except ConfigError as exc:
        return [str(i) for i in exc.issues]


def test_a_checkout_loads_with_the_memo_as_it_loads_whole(tmp_path: Path) -> None:
    with_clock_seed(lambda seed: _checkouts_alike(tmp_path, seed))


def _checkouts_alike(tmp_path: Path, seed: int) -> None:
    """The load with a LoadCache (the daemon's: entries parsed key by key) against the load
    without one (each file parsed whole): the same desired state or the same errors, for a
    generated checkout with random entries put in it."""
    for s in [*range(12), seed]:
        rng = random.Random(s)
        d = tmp_path / f"c{s}-{seed}"
        generate(d, 30, 4, 3)
        for path in [d / "vips.yaml", *sorted((d / "vips").glob("*.yaml"))]:
            text = path.read_text()
            for _ in range(rng.choice([0, 0, 1, 2])):
                at = rng.choice([i for i in range(len(text)) if text.startswith("\n  - name:", i)])
                text = text[:at + 1] + _entry(rng, 2).rstrip("\n") + "\n" + text[at + 1:]
            if rng.random() < 0.3:  # a VIP's key changed to one of the odd values
                text = text.replace("    check: {type: tcp}", f"    check: {rng.choice(VALUES)}", 1)
            path.write_text(text)
        assert _load(d, LoadCache()) == _load(d, None), s


def _canonical_before(v: Any) -> Any:
    """What _shape digested before it wrote the text itself (and once a pass for shared subtrees)."""
    if isinstance(v, dict):
        return ("{", tuple(sorted(((repr(k), _canonical_before(x)) for k, x in v.items()), key=lambda kv: kv[0])))
    if isinstance(v, list):
        return ("[", tuple(_canonical_before(x) for x in v))
    return v


def test_the_shapes_text_is_the_repr_it_digested_before() -> None:
    """_canonical writes ``repr`` of the canonical tuples itself: random trees (keys of every
    scalar kind, one-element and empty containers, subtrees shared between trees and within
    one), one ``shared`` for all of them, give the text ``repr`` gave."""
    from controller.config.desired import _canonical

    def tree(rng: random.Random, depth: int, pool: list[Any]) -> Any:
        r = rng.random()
        if pool and r < 0.15:
            return rng.choice(pool)
        if depth > 3 or r < 0.4:
            return rng.choice(["a", "b'c", 'd"e', 1, 1.0, True, None, -0.0, "", "\n", 10**30])
        if r < 0.7:
            made: Any = [tree(rng, depth + 1, pool) for _ in range(rng.choice([0, 1, 1, 2, 5]))]
        else:
            made = {rng.choice(["k", "a", 1, True, None, 2.5, "z", "1"]): tree(rng, depth + 1, pool)
                    for _ in range(rng.choice([0, 1, 2, 4]))}
        pool.append(made)
        return made

    def check(seed: int) -> None:
        shared: dict[int, tuple[Any, str]] = {}
        pool: list[Any] = []
        trees = [tree(random.Random(seed * 1000 + s), 0, pool) for s in range(300)]
        for t in trees:
            assert _canonical(t, shared) == repr(_canonical_before(t)), (seed, t)
        assert shared  # (the pool's subtrees are shared: some were kept)

    with_clock_seed(lambda seed: [check(s) for s in (0, 1, 2, seed)])


def test_what_yaml_refuses_outside_the_entries_parsed_is_refused_with_the_cache_too(tmp_path: Path) -> None:
    """Found by review: a control character in a comment before the first entry (no entry's
    parse sees it) loaded with the daemon's cache and was refused without; and a key over
    YAML's 1024-character bound for a simple key was taken by the one-line shortcut (an
    "unknown key" error instead of YAML's). Each gives the same answer both ways."""
    for n, edit in enumerate((lambda t: "# \x01\n" + t,
                              lambda t: t.replace("vips:\n", "vips: # \x7f\n", 1),
                              lambda t: t.replace("\n  - name:", "\n  - " + "k" * 1025 + ": v\n    name:", 1))):
        d = tmp_path / f"c{n}"
        generate(d, 6, 2, 2)
        path = sorted((d / "vips").glob("*.yaml"))[0]
        path.write_text(edit(path.read_text()))
        whole = _load(d, None)
        assert isinstance(whole, list), n  # refused
        assert _load(d, LoadCache()) == whole, n
