"""A config written as JSON (YAML's flow style; generated configs often are) takes json's
parser (issue 13: the agent's config load at 10,000 VIPs). It must give exactly what the YAML
loader gives for the same text, types included, and every refusal must stay the YAML
loader's, with its line numbers and paths."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.config.agent import load_agent_config, parse_agent_config
from controller.config.errors import ConfigError
from controller.config.reader import (MAX_DEPTH, gc_paused, nesting_depth, parse_json, parse_yaml, parse_yaml_only,
                                      tree_depth)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXAMPLES = sorted(CONFIGS.rglob("*.yaml"))


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (1 == 1.0 == True in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def both(text: str) -> tuple[Any, Any]:
    """What the JSON path and the YAML loader read from ``text``; the JSON path must be taken."""
    return parse_json(text), parse_yaml_only(text, "t")


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_as_json_reads_as_its_yaml(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    for text in (json.dumps(data), json.dumps(data, indent=2), json.dumps(data, separators=(",", ":"))):
        via_json, via_yaml = both(text)
        assert same(via_json, via_yaml)
        assert same(parse_yaml(text, "t"), via_yaml)


def test_the_agent_example_as_json_is_the_same_config(tmp_path: Path) -> None:
    source = CONFIGS / "agent-sjc.yaml"
    target = tmp_path / "agent.json"
    target.write_text(json.dumps(yaml.safe_load(source.read_text())))
    assert dataclasses.replace(load_agent_config(str(target)), source="x") == \
        dataclasses.replace(load_agent_config(str(source)), source="x")


@pytest.mark.parametrize("literal", ["0", "-0", "7", "12345678901234567890", "0.5", "-2.50", "1e5", "1E5", "1.5e5",
                                     "1.0e+5", "1.0E-3", "-2.5e+3", "1.0e+400", "0.0"])
def test_numbers_have_the_type_yaml_gives_them(literal: str) -> None:
    # PyYAML (YAML 1.1) wants a dot and a signed exponent for a float: 1e5 is a string there.
    via_json, via_yaml = both(f'{{"a": {literal}, "b": [{literal}]}}')
    assert same(via_json, via_yaml), (via_json, via_yaml)


@pytest.mark.parametrize("value", ['"a\\/b"', '"caf\\u00e9"', '"tab\\there"', '"line\\nbreak"', '"q\\"uote"',
                                   '"yes"', '"on"', '"null"', '"1.5"', '"~"', '""', "true", "false", "null", "[]",
                                   "{}"])
def test_strings_and_constants_are_what_yaml_reads(value: str) -> None:
    via_json, via_yaml = both(f'{{"k": {value}}}')
    assert same(via_json, via_yaml), (via_json, via_yaml)


def test_a_duplicate_key_is_refused_with_its_line_as_in_yaml() -> None:
    text = '{"pop": "sjc",\n "pop": "fra"}'
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "t")
    with pytest.raises(ConfigError) as yaml_info:
        parse_yaml_only(text, "t")
    assert [str(i) for i in info.value.issues] == [str(i) for i in yaml_info.value.issues]
    assert "duplicate key 'pop'" in str(info.value.issues[0])


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": -Infinity}', '{"a": 1} # comment', '{"a": 1}\n---\n{"b": 2}'])
def test_what_json_refuses_or_yaml_reads_otherwise_goes_to_yaml(text: str) -> None:
    try:
        expected: Any = ("value", parse_yaml_only(text, "t"))
    except ConfigError as exc:
        expected = ("error", [str(i) for i in exc.issues])
    try:
        got: Any = ("value", parse_yaml(text, "t"))
    except ConfigError as exc:
        got = ("error", [str(i) for i in exc.issues])
    assert got[0] == expected[0]
    assert same(got[1], expected[1])


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000])
def test_json_nested_too_deep_is_refused(depth: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_yaml('{"a": ' + "[" * depth + "]" * depth + "}", "t")
    assert f"nested deeper than {MAX_DEPTH} levels" in str(info.value)


def test_json_at_the_depth_limit_loads() -> None:
    assert parse_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH, "t") is not None


def test_a_bad_field_in_a_json_config_is_named_by_its_path() -> None:
    data = yaml.safe_load((CONFIGS / "agent-sjc.yaml").read_text())
    data["vips"][0]["check"]["interval"] = "fast"
    data["vips"][0]["origins"][0]["next_hop"] = "256.1.1.1"
    with pytest.raises(ConfigError) as info:
        parse_agent_config(json.dumps(data))
    paths = {i.path for i in info.value.issues}
    assert {"vips[0].check.interval", "vips[0].origins[0].next_hop"} <= paths


@pytest.mark.parametrize("text", ["1", "[]", "{}", '{"a": [1, {"b": []}], "c": {"d": {"e": 1}}}',
                                  "[[[], [[]]], {}]"])
def test_tree_depth_is_nesting_depth_on_trees(text: str) -> None:
    data = json.loads(text)
    for limit in (0, 1, 2, 100):
        assert min(tree_depth(data, limit), limit + 1) == min(nesting_depth(data, limit), limit + 1)


def test_gc_paused_resumes_collection_even_after_an_error_and_keeps_an_outer_pause() -> None:
    assert gc.isenabled()
    with pytest.raises(ConfigError), gc_paused():
        assert not gc.isenabled()
        parse_agent_config("pop: [")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # someone else's pause is theirs to end
    finally:
        gc.enable()


def test_paths_of_errors_deep_in_lists_are_spelled_out() -> None:
    data = yaml.safe_load((CONFIGS / "agent-sjc.yaml").read_text())
    data["vips"][0]["origins"][0]["backends"].append({"address": "10.0.0.1", "port": 0, "colour": "red"})
    with pytest.raises(ConfigError) as info:
        parse_agent_config(json.dumps(data))
    n = len(data["vips"][0]["origins"][0]["backends"]) - 1
    assert {i.path for i in info.value.issues} >= {f"vips[0].origins[0].backends[{n}].port",
                                                   f"vips[0].origins[0].backends[{n}].colour"}
