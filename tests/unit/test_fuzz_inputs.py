"""Fixed-seed fuzz of everything that reads untrusted input (issue 15): the agent's config, the
controller's config directory, plan answers and reports. Each mutated input is accepted or
refused with the loader's own error naming where; never another exception (a traceback), never
a hang. The seed is fixed: a failure reproduces, and the run is the same in CI."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.agent.plan_wire import NeedFullPlan, PlanBook
from controller.config.agent import parse_agent_config
from controller.config.desired import FILES, load_desired
from controller.config.errors import ConfigError
from controller.config.serialize import vip_to_dict
from controller.policy.model import PlanItem
from controller.wire import WireError, decode_plan_answer, decode_report, encode_plan

ROOT = Path(__file__).resolve().parents[2]
AGENT = yaml.safe_load((ROOT / "configs" / "agent-sjc.yaml").read_text())
CONTROLLER = ROOT / "configs" / "controller"
DESIRED = load_desired(str(CONTROLLER))
CASES = 150


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


HOSTILE: tuple[Any, ...] = (
    None, True, False, 0, -1, 2 ** 70, -(2 ** 63), 1e308, -0.0, 0.5, "", " ", "x" * 5000, "9" * 5000,
    [], {}, [None], {"": None}, {"unknown": 1}, _nested(40), "0.0.0.0", "::", "127.0.0.1", "224.0.0.1",
    "198.51.100.10/33", "198.51.100.300", "/dev/zero", "../../etc/passwd", "no-export", "65535:65281",
    "a:b:c", "\u0661", "\x00", "${HOME}", "*", "&a", "!!python/object:os.system",
)


def _paths(value: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield here
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*here, i))


def _mutate(tree: Any, rng: random.Random) -> Any:
    """The tree with 1-3 places changed: a value replaced, a key dropped, or a key added."""
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(tree) if p]  # never the root: the file stays a mapping
        if not paths:  # every key dropped already
            tree["x"] = copy.deepcopy(rng.choice(HOSTILE))
            continue
        path = rng.choice(paths)
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.7:
            parent[path[-1]] = copy.deepcopy(rng.choice(HOSTILE))
        elif action < 0.85 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["intreval", "x", "1", "vips"])] = copy.deepcopy(rng.choice(HOSTILE))
    return tree


def _cases(name: str, tree: Any) -> list[Any]:
    rng = random.Random(f"issue-15-{name}")
    return [_mutate(tree, rng) for _ in range(CASES)]


def _named(exc: ConfigError) -> None:
    assert exc.issues, exc
    for issue in exc.issues:
        assert issue.path and issue.message, f"an error without its path: {issue!r} in {exc.summary()}"


@pytest.mark.parametrize("i", range(0, CASES, 25))
def test_the_agent_config_loader_names_every_error(i: int) -> None:
    for tree in _cases("agent", AGENT)[i:i + 25]:
        text = yaml.safe_dump(tree)
        try:
            parse_agent_config(text, "agent.yaml")
        except ConfigError as exc:
            _named(exc)


@pytest.mark.parametrize("name", FILES)
def test_the_controller_config_loader_names_every_error(tmp_path: Path, name: str) -> None:
    d = tmp_path / "desired"
    shutil.copytree(CONTROLLER, d)
    tree = yaml.safe_load((CONTROLLER / name).read_text())
    for case in _cases(f"controller-{name}", tree)[:60]:
        (d / name).write_text(yaml.safe_dump(case))
        try:
            load_desired(str(d))
        except ConfigError as exc:
            _named(exc)


def _plan() -> dict[str, Any]:
    items = [(PlanItem(v.name, True, v.vip.origins[0].region), vip_to_dict(v.vip)) for v in DESIRED.published_at("sjc")]
    return json.loads(json.dumps(encode_plan("sjc", 7, "abc", items)))


def _check_plan(data: Any) -> None:
    try:
        PlanBook("sjc", DESIRED.allowed_prefixes).apply(decode_plan_answer(data, "sjc"))
    except (WireError, NeedFullPlan) as exc:
        assert str(exc)


def test_plan_decoding_refuses_with_a_field_and_never_raises_anything_else() -> None:
    for case in _cases("plan", _plan()):
        _check_plan(case)
        _check_plan(json.loads(json.dumps(case, allow_nan=True)))  # as it would arrive


def test_a_plan_spec_with_an_integer_past_a_float_is_refused_with_its_field() -> None:
    """A spec's seconds as ``1`` and 400 zeros (JSON allows it): math.isfinite raised
    OverflowError in the agent's plan decoding, which its plan fetch does not catch."""
    plan = _plan()
    plan["vips"][0]["spec"]["check"]["interval"] = 10 ** 400
    with pytest.raises(WireError) as info:
        PlanBook("sjc", DESIRED.allowed_prefixes).apply(decode_plan_answer(json.loads(json.dumps(plan)), "sjc"))
    assert str(info.value).startswith("vips[0].spec.check.interval") and "too large" in str(info.value)


def test_report_decoding_refuses_with_a_field_and_never_raises_anything_else() -> None:
    published = {v.name: [o.region for o in v.vip.origins] for v in DESIRED.published_at("sjc")}
    report = {"plan_generation": 7, "seq": 3, "origins": {n: {r: True for r in rs} for n, rs in published.items()},
              "announced": {n: True for n in published}}
    for case in _cases("report", report):
        try:
            decode_report(case, published)
        except WireError as exc:
            assert exc.field or str(exc)


def test_the_fuzz_really_mutates() -> None:
    """Guard against a fuzz that tests nothing: most agent cases are refused, some accepted."""
    refused = 0
    for tree in _cases("agent", AGENT):
        try:
            parse_agent_config(yaml.safe_dump(tree), "agent.yaml")
        except ConfigError:
            refused += 1
    assert 0.3 * CASES < refused < CASES
    assert not any(isinstance(v, float) and math.isnan(v) for v in HOSTILE)  # JSON would refuse to carry it
