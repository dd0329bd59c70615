"""A changed VIP file is cut again only where its lines changed (``_cut_again``): it must give
exactly the cut of the whole text (``_cut``: the same entries, where they start, or None when
the file is not of the plain shape), whatever the edit. Random chains of edits (characters,
lines and entries inserted, deleted, moved; comments, blanks, anchors, tags, tabs, document
marks, odd whitespace, lines at the entries' indentation that start no entry, the head of the
file, the last newline), each cut from the one before as the load cache does; fixed seeds
and one from the clock (printed on failure)."""

from __future__ import annotations

import random

import pytest

from controller.config import desired
from controller.config.desired import _common_head, _common_tail, _cut, _cut_again
from tests.helpers.seeds import with_clock_seed

STEPS = 300


def _entry(rng: random.Random, indent: int, serial: int) -> list[str]:
    pad = " " * indent
    lines = [f"{pad}- name: vip-{serial:05d}", f"{pad}  address: 10.0.{serial // 250}.{serial % 250 + 1}/32",
             f"{pad}  publish: [p00, p01, p02]"]
    if rng.random() < 0.5:
        lines += [f"{pad}  origins:", f"{pad}    - region: r{serial % 3}", f"{pad}      next_hop: 100.64.1.1"]
    if rng.random() < 0.2:
        lines.insert(rng.randrange(1, len(lines) + 1), rng.choice([f"{pad}  # a note", "", "   ", "# column 0"]))
    return [line + "\n" for line in lines]


# Lines an edit puts somewhere: good ones, and each thing that makes the whole cut say None or
# go line by line.
_ODD_LINES = ["  # a comment\n", "\n", "      deeper: 1\n", "    - listed\n", "vips:\n", "other: 1\n",
              "    x: &anchor 1\n", "    y: *anchor\n", "    z: !!str 1\n", "---\n", "...\n", "%YAML 1.1\n",
              "    t:\tx\n", "    r: 1\r\n", "    caf\u00e9: 1\n", "\x0c\n", "  continued\n", " - shallow: 1\n",
              "  -nospace\n", "    - name: inner\n", "  - name: new\n"]


def _edit(rng: random.Random, lines: list[str], indent: int, serial: int) -> list[str]:
    kind = rng.random()
    i = rng.randrange(len(lines) + 1)
    if kind < 0.25:  # a character changed, added or taken out of a line
        if lines and i < len(lines):
            line = lines[i]
            j = rng.randrange(len(line) + 1)
            c = rng.choice(["x", "1", " ", "-", "#", "\n", "&", "\t", ":"])
            lines[i] = line[:j] + c + line[j + rng.choice([0, 1]):]
    elif kind < 0.45:  # a new entry, anywhere (also inside another)
        lines[i:i] = _entry(rng, indent, serial)
    elif kind < 0.6 and lines:  # some lines deleted
        del lines[i:i + rng.randint(1, 4)]
    elif kind < 0.7 and len(lines) > 4:  # a run of lines moved
        j = rng.randrange(len(lines))
        run = lines[j:j + rng.randint(1, 6)]
        del lines[j:j + len(run)]
        k = rng.randrange(len(lines) + 1)
        lines[k:k] = run
    elif kind < 0.85:  # an odd line, usually deep in the file, taken out again now and then
        lines.insert(i, rng.choice(_ODD_LINES))
    elif kind < 0.92:  # the head of the file
        lines.insert(rng.randrange(min(3, len(lines) + 1)), rng.choice(["# top\n", "\n", "vips:\n", "  # c\n"]))
    elif lines:  # the last newline, or a line's
        lines[-1] = lines[-1].rstrip("\n") if lines[-1].endswith("\n") else lines[-1] + "\n"
    return lines


def _clean(lines: list[str]) -> list[str]:
    """Lines without the odd ones, most of the time (else few texts are of the plain shape)."""
    return [line for line in lines if line not in _ODD_LINES[5:16] and "\t" not in line and "&" not in line]


def _run(seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    indent = rng.choice([0, 2, 4])
    lines = [rng.choice(["", "# the VIPs\n"]), "vips:\n"]
    for serial in range(rng.randint(1, 30)):
        lines += _entry(rng, indent, serial)
    previous = _cut("".join(lines))
    assert previous is not None
    again = plain = 0
    for step in range(STEPS):
        lines = _edit(rng, list(lines), indent, 1000 + step)
        if rng.random() < 0.15:
            lines = _clean(lines)
        text = "".join(lines)
        whole = _cut(text)
        got, head, tail = _cut_again(text, previous)
        assert got == whole, (seed, step, text)
        if got is not None and previous is not None:
            # the entries said to be the last cut's are the same text (and taken from it)
            assert got.entries[:head] == previous.entries[:head], (seed, step)
            assert head + tail <= min(len(got.entries), len(previous.entries)), (seed, step)
            if tail:
                assert got.entries[-tail:] == previous.entries[-tail:], (seed, step)
            again += head + tail > 0
        plain += whole is not None
        if whole is None and rng.random() < 0.5:  # an operator fixes it: back to the plain shape
            lines = _clean(lines)
            lines = lines if _cut("".join(lines)) is not None else [
                "vips:\n", *(line for s in range(3) for line in _entry(rng, indent, 5000 + step * 3 + s))]
        previous = whole if whole is not None or rng.random() < 0.5 else previous
    return again, plain


@pytest.mark.parametrize("seed", range(12))
def test_a_file_cut_again_where_it_changed_is_cut_as_the_whole_text_is(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if seed % 2:  # the texts compared a few characters at a time: every chunk's edge is met
        monkeypatch.setattr(desired, "_CHUNK", 1 + seed % 5)
    again, plain = _run(seed)
    assert again > STEPS // 10 and plain > STEPS // 5  # both paths ran, on texts of both kinds


def test_a_file_cut_again_where_it_changed_is_cut_as_the_whole_text_is_seed_from_the_clock() -> None:
    with_clock_seed(_run)


@pytest.mark.parametrize("chunk", [1, 3, 16, 1 << 16])
def test_the_common_head_and_tail_of_two_texts(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(desired, "_CHUNK", chunk)
    rng = random.Random(chunk)
    for _ in range(300):
        base = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 300)))
        other = list(base)
        for _ in range(rng.randint(0, 3)):
            j = rng.randrange(len(other) + 1)
            other[j:j + rng.randint(0, 2)] = rng.choice(["", "a", "c", "bb"])
        a, b = base, "".join(other)
        head = _common_head(a, b)
        n = min(len(a), len(b))
        expect = next((k for k in range(n) if a[k] != b[k]), n)
        assert head == expect
        most = n - head
        tail = _common_tail(a, b, most)
        expect_tail = next((k for k in range(most) if a[len(a) - 1 - k] != b[len(b) - 1 - k]), most)
        assert tail == expect_tail
