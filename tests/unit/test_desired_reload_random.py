"""A reload with the load cache (what the daemon does: unchanged entries reused, addresses and
names checked for duplicates from the last load's) says exactly what a load from nothing says:
the same desired state, or the same errors. Random edits of a generated checkout, fixed seeds
and one from the clock (printed on failure)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from bench.controller_scale import generate
from controller.config.desired import LoadCache, load_desired
from controller.config.errors import ConfigError
from tests.helpers.seeds import with_clock_seed

STEPS = 80


def _files(d: Path) -> list[Path]:
    return [d / "vips.yaml", *sorted((d / "vips").glob("*.yaml"))]


def _entries(text: str) -> list[str]:
    head, *rest = re.split(r"(?m)^(?=  - name: )", text)
    return [head, *rest]


def _edit(d: Path, rng: random.Random, serial: int) -> None:
    files = _files(d)
    path = rng.choice(files)
    parts = _entries(path.read_text())
    kind = rng.choice(("address", "swap", "publish", "duplicate", "remove", "move", "rename", "broken",
                       "unknown_pop", "context", "fix_address", "same", "entangle", "pops", "comment", "reorder",
                       "column0", "two_edits"))
    if len(parts) < 3 and kind in ("swap", "remove", "move", "duplicate"):
        kind = "same"
    k = rng.randrange(1, len(parts)) if len(parts) > 1 else 0
    address = re.compile(r"address: (\S+)\n")
    if kind == "address" and k:  # another VIP's address (a duplicate), anywhere in the checkout
        other = rng.choice([m for f in files for m in address.findall(f.read_text())])
        parts[k] = address.sub(f"address: {other}\n", parts[k], count=1)
    elif kind == "swap":  # two VIPs exchange addresses: no duplicate once both are read
        i, j = rng.sample(range(1, len(parts)), 2)
        a, b = address.search(parts[i]), address.search(parts[j])
        if a and b:
            parts[i] = address.sub(f"address: {b.group(1)}\n", parts[i], count=1)
            parts[j] = address.sub(f"address: {a.group(1)}\n", parts[j], count=1)
    elif kind == "fix_address" and k:  # a fresh address: undoes a duplicate
        parts[k] = address.sub(f"address: 10.77.{serial // 250}.{serial % 250 + 1}/32\n", parts[k], count=1)
    elif kind == "publish" and k:
        pops = rng.sample(["p00", "p01", "p02", "p03"], rng.randint(1, 4))
        parts[k] = re.sub(r"publish: \[[^\]]*\]", f"publish: [{', '.join(pops)}]", parts[k], count=1)
    elif kind == "duplicate" and k:
        parts.insert(rng.randrange(1, len(parts) + 1), parts[k])
    elif kind == "remove" and k:
        del parts[k]
    elif kind == "move" and k and len(files) > 1:
        moved = parts.pop(k)
        other = rng.choice([f for f in files if f != path])
        path.write_text("".join(parts))
        path, parts = other, _entries(other.read_text())
        parts.insert(rng.randrange(1, len(parts) + 1), moved)
    elif kind == "rename" and k:
        parts[k] = re.sub(r"- name: \S+", f"- name: vip-r{serial:04d}", parts[k], count=1)
    elif kind == "broken" and k:
        parts[k] = parts[k].replace("publish:", "publish: [", 1) if rng.random() < 0.5 else parts[k] + "    bogus: 1\n"
    elif kind == "unknown_pop" and k:
        parts[k] = re.sub(r"publish: \[", "publish: [lhr, ", parts[k], count=1)
    elif kind == "comment" and k:  # a comment or a blank line inside an entry (its text changes, not its VIP)
        lines = parts[k].split("\n")
        lines.insert(rng.randrange(1, len(lines)), rng.choice(["    # note", "", "  # at the entries' column"]))
        parts[k] = "\n".join(lines)
    elif kind == "reorder" and len(parts) > 2:  # two VIPs change places in the file
        i, j = rng.sample(range(1, len(parts)), 2)
        parts[i], parts[j] = parts[j], parts[i]
    elif kind == "column0" and k:  # a line the cut cannot take (the file is parsed whole: its errors)
        parts[k] += rng.choice(["other: 1\n", "  continued\n", "- name: shallow\n"])
    elif kind == "two_edits" and len(parts) > 3:  # two entries far apart change: one cut across both
        for i in (1, len(parts) - 1):
            parts[i] = re.sub(r"publish: \[[^\]]*\]", f"publish: [{rng.choice(['p00', 'p01'])}]", parts[i], count=1)
    elif kind == "entangle":  # a comment the cut cannot tell from an anchor: the file is parsed whole (or again cut)
        note = "# see &note\n"
        parts[0] = parts[0].replace(note, "") if note in parts[0] else note + parts[0]
    elif kind == "pops":  # the POPs, a VIP's context too: one fewer (VIPs published there are refused), or back
        p = d / "pops.yaml"
        text = p.read_text()
        last = re.search(r"  - name: p03\n(?:    .*\n)*", text)
        if last:
            (d / "pops.p03").write_text(last.group(0))
            p.write_text(text.replace(last.group(0), ""))
        elif (d / "pops.p03").exists():
            p.write_text(text + (d / "pops.p03").read_text())
    elif kind == "context":  # what every VIP's reading depends on: all are read again
        c = d / "controller.yaml"
        text = c.read_text()
        timeout = rng.choice(("0.5", "0.4", "0.3"))
        c.write_text(re.sub(r"timeout: [0-9.]+", f"timeout: {timeout}", text, count=1))
    path.write_text("".join(parts))


def _outcome(d: Path, cache: LoadCache | None) -> object:
    try:
        return load_desired(str(d), "rev", cache)
    except ConfigError as exc:
        return exc.summary()


def _run(seed: int, tmp: Path) -> int:
    rng = random.Random(seed)
    d = tmp / f"seed{seed}"
    generate(d, 40, 4, files=rng.choice((1, 1, 3, 6)))
    cache = LoadCache()
    errors = 0
    for step in range(STEPS):
        _edit(d, rng, step)
        cached, fresh = _outcome(d, cache), _outcome(d, None)
        assert cached == fresh, f"seed {seed}, step {step}"
        errors += isinstance(fresh, str)
        if isinstance(fresh, str) and rng.random() < 0.5:  # an operator fixes it: back to a good state
            generate(d, 40, 4, files=len(_files(d)))
    return errors


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_a_reload_with_the_cache_says_what_a_load_from_nothing_says(seed: int, tmp_path: Path) -> None:
    assert 0 < _run(seed, tmp_path) < STEPS  # both good and refused states were compared


def test_a_reload_with_the_cache_says_what_a_load_from_nothing_says_seed_from_the_clock(tmp_path: Path) -> None:
    with_clock_seed(lambda seed: _run(seed, tmp_path))
