"""Hostile files in the config repository (issue 15): symlinks to devices or out of the
checkout, FIFOs, directories, huge files, deep nesting. Each is refused with a ConfigError
naming the file, by the loader, by ``anycastctl validate`` and without a hang by the
revision fingerprint; a symlink that stays inside the checkout still loads."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

from controller.cli.anycastctl import main as anycastctl
from controller.config.agent import load_agent_config, parse_agent_config
from controller.config.desired import load_desired
from controller.config.errors import ConfigError
from controller.config.reader import MAX_DEPTH, MAX_FILE_BYTES, nesting_depth, parse_yaml
from controller.server.revision import fingerprint
from tests.helpers.waiting import HANG_GUARD

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "controller"
AGENT = Path(__file__).resolve().parents[2] / "configs" / "agent-sjc.yaml"
R = TypeVar("R")


def copy(tmp_path: Path) -> Path:
    d = tmp_path / "controller"
    shutil.copytree(EXAMPLE, d)
    (d / "vips").mkdir()
    return d


def bounded(call: Callable[[], R]) -> R:
    """``call()`` on a thread: a hang fails the test after HANG_GUARD instead of hanging it
    (what a FIFO did to the loader)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(call).result(timeout=HANG_GUARD)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"still running after {HANG_GUARD:.0f} s (hung)") from None
    finally:
        pool.shutdown(wait=False)


def refusal(d: Path) -> list[str]:
    def load() -> list[str]:
        with pytest.raises(ConfigError) as info:
            load_desired(str(d))
        return [str(i) for i in info.value.issues]
    return bounded(load)


def _symlink_to(target: str) -> Callable[[Path], None]:
    return lambda d: os.symlink(target, d / "vips" / "bad.yaml")


def _fifo(d: Path) -> None:
    os.mkfifo(d / "vips" / "bad.yaml")


def _fifo_through_a_symlink(d: Path) -> None:
    os.mkfifo(d / "pipe")
    os.symlink("../pipe", d / "vips" / "bad.yaml")


def _directory(d: Path) -> None:
    (d / "vips" / "bad.yaml").mkdir()


def _huge(d: Path) -> None:
    with open(d / "vips" / "bad.yaml", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk


def _outside(d: Path) -> None:
    secret = d.parent / "secret.yaml"
    secret.write_text("vips: []  # hunter2\n")
    os.symlink(secret, d / "vips" / "bad.yaml")


@pytest.mark.parametrize("make, says", [
    (_symlink_to("/dev/zero"), "a symlink to /dev/zero, outside the config directory"),
    (_symlink_to("/dev/urandom"), "a symlink to /dev/urandom, outside the config directory"),
    (_fifo_through_a_symlink, "a named pipe, not a regular file: refused"),
    (_fifo, "a named pipe, not a regular file: refused"),
    (_directory, "a directory, not a regular file: refused"),
    (_huge, f"{MAX_FILE_BYTES + 1} bytes, more than the {MAX_FILE_BYTES} a config file may have: refused"),
    (_outside, "outside the config directory"),
    (_symlink_to("/nonexistent/x.yaml"), "outside the config directory"),
], ids=["dev-zero", "dev-urandom", "fifo-by-symlink", "fifo", "directory", "huge", "outside", "dangling"])
def test_a_hostile_file_is_refused_naming_it_and_nothing_hangs(tmp_path: Path, make: Callable[[Path], None],
                                                               says: str) -> None:
    d = copy(tmp_path)
    before = bounded(lambda: fingerprint(str(d)))
    make(d)
    errs = refusal(d)
    assert len(errs) == 1 and errs[0].startswith("vips/bad.yaml: ") and says in errs[0], errs
    assert "hunter2" not in errs[0]  # the contents of a file outside are never read, nor shown
    assert bounded(lambda: fingerprint(str(d))) != before  # the change is seen, without reading it


def test_the_validator_refuses_it_with_the_path_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = copy(tmp_path)
    os.symlink("/dev/zero", d / "vips" / "zero.yaml")
    assert bounded(lambda: anycastctl(["validate", str(d)])) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "vips/zero.yaml: a symlink to /dev/zero, outside the config directory" in out


def test_a_symlink_that_stays_inside_the_checkout_loads(tmp_path: Path) -> None:
    d = copy(tmp_path)
    shared = d / "shared"
    shared.mkdir()
    vip = yaml.safe_load((d / "vips.yaml").read_text())["vips"][0]
    (shared / "more.yaml").write_text(yaml.safe_dump({"vips": [dict(vip, name="other", address="198.51.100.99")]}))
    os.symlink("../shared/more.yaml", d / "vips" / "more.yaml")
    assert load_desired(str(d)).vip("other") is not None


def test_a_top_level_file_replaced_by_a_symlink_out_is_refused(tmp_path: Path) -> None:
    d = copy(tmp_path)
    outside = tmp_path / "pops.yaml"
    shutil.copy(d / "pops.yaml", outside)
    (d / "pops.yaml").unlink()
    os.symlink(outside, d / "pops.yaml")
    assert any(e.startswith("pops.yaml: a symlink to ") for e in refusal(d))


def _flow(levels: int) -> str:
    return "vips: " + "[" * levels + "]" * levels + "\n"


def _block(levels: int) -> str:
    return "vips:\n" + "".join(" " * i + "-\n" for i in range(1, levels)) + " " * levels + "- x\n"


@pytest.mark.parametrize("text", [_flow(100_000), _flow(1_500), _flow(MAX_DEPTH + 1), _block(MAX_DEPTH + 5),
                                  _block(2_000)],
                         ids=["flow-100000", "flow-1500", "flow-just-over", "block-just-over", "block-2000"])
def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path: Path, text: str) -> None:
    d = copy(tmp_path)
    (d / "vips" / "deep.yaml").write_text(text)
    errs = refusal(d)
    assert len(errs) == 1 and errs[0].startswith("vips/deep.yaml: ") and f"nested deeper than {MAX_DEPTH}" in errs[0]


def test_nesting_at_the_bound_parses_and_shared_aliases_are_counted_once() -> None:
    assert nesting_depth(parse_yaml("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1), "t"), 100) == MAX_DEPTH
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    assert nesting_depth(parse_yaml(laughs, "t"), 100) == 10  # 9**8 lists if expanded; 9 here, measured once
    # The deepest path is found even when a shared subtree is met first at a shallow place.
    half = MAX_DEPTH // 2 + 1
    twice = "a: &a " + "[" * half + "]" * half + "\nb: " + "[" * half + "*a" + "]" * half + "\n"
    assert nesting_depth(yaml.safe_load(twice), 100) == 2 * half + 1
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_DEPTH}"):
        parse_yaml(twice, "t")
    assert nesting_depth(yaml.safe_load("a: &a [b, *a]"), 100) == 101  # contains itself


def test_the_agent_config_refuses_a_device_and_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.yaml"
    os.mkfifo(fifo)
    for path, says in ((str(fifo), "a named pipe"), ("/dev/zero", "a character device")):
        with pytest.raises(ConfigError) as info:
            bounded(lambda: load_agent_config(path))
        assert info.value.source == path and says in str(info.value)
    assert load_agent_config(str(AGENT)).pop == "sjc"  # a regular file still loads


@pytest.mark.parametrize("text, line, says", [
    ("vips:\n  - name: x\n    since: 2026-13-01\n", 3, "month must be in 1..12"),  # a date YAML resolves
    ("vips:\n  - name: x\n    med: 1" + "0" * 5000 + "\n", 3, "4300 digits"),  # past Python's int digits
    ('{"vips": [{"name": "x", "med": 1' + "0" * 5000 + "}]}", 1, "4300 digits"),  # the same as JSON
    ("vips:\n  - name: x\n    med: !!float many\n", 3, "could not convert"),
    ("vips:\n  - ? [a, b]\n    : 1\n", 2, "a list or mapping as a key"),
    ('{"vips": [{[a]: 1}]}', 1, "a list or mapping as a key"),
    ("vips:\n  - name: x\n    enabled: !!bool maybe\n", 3, "cannot read 'maybe' as tag:yaml.org,2002:bool"),
    ("vips:\n  - name: x\n    publish: !!set [sjc]\n", 3, "expected a mapping node, but found sequence"),
    ("vips:\n  - name: x\n    med: !!int\n", 3, "cannot read '' as tag:yaml.org,2002:int"),
], ids=["bad-date", "huge-int", "huge-int-json", "bad-float-tag", "list-key", "list-key-flow", "bad-bool-tag",
        "set-tag-on-a-list", "empty-int-tag"])
def test_a_scalar_python_cannot_build_is_a_config_error_with_its_line(tmp_path: Path, text: str, line: int,
                                                                     says: str) -> None:
    """Not a ValueError, KeyError, TypeError or IndexError: the controller's reload loop and
    the agent's reload catch ConfigError (a bad revision is refused, the last good one kept); anything else
    ended the daemon."""
    d = copy(tmp_path)
    (d / "vips" / "odd.yaml").write_text(text)
    errs = refusal(d)
    assert len(errs) == 1 and errs[0].startswith(f"vips/odd.yaml: line {line}, ") and says in errs[0]
    with pytest.raises(ConfigError, match=says):
        parse_yaml(text, "t")


def test_an_integer_past_what_a_float_holds_is_an_error_at_its_path(tmp_path: Path) -> None:
    """``1`` and 400 zeros where a number of seconds (a float) is read: math.isfinite raised
    OverflowError, which no loader caller catches (the same reload death as above)."""
    huge = "1" + "0" * 400
    agent = AGENT.read_text()
    assert "\n  interval: 1.0\n" in agent
    with pytest.raises(ConfigError) as info:
        parse_agent_config(agent.replace("\n  interval: 1.0\n", f"\n  interval: {huge}\n", 1), "agent.yaml")
    assert [(i.path, i.message) for i in info.value.issues] == [("check_defaults.interval",
                                                                 "too large: a number of 401 digits")]
    d = copy(tmp_path)
    text = (d / "controller.yaml").read_text()
    assert "quorum: 0.5 " in text
    (d / "controller.yaml").write_text(text.replace("quorum: 0.5 ", f"quorum: {huge} ", 1))
    assert refusal(d) == ["controller.yaml: policy.failover.quorum: too large: a number of 401 digits"]
