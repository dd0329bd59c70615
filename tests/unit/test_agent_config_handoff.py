"""The config launch hands over to ExaBGP's API process (agent/config_handoff.py): taken over
only when launch sealed it in this start and it was built from the text the API process
finds in its file now, with the same overrides; anything else loads the file as before."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
from pathlib import Path

import pytest

from controller.agent import config_handoff as h
from controller.cli import agent_main
from controller.config.agent import parse_agent_config
from controller.config.model import AgentConfig

CONFIG = """\
pop: sjc
allowed_prefixes: [198.51.100.0/24]
state_dir: {state}
kernel: {{enabled: false}}
bgp:
  local_as: 65101
  neighbors: [{{address: 100.64.1.1, local_address: 100.64.1.2, peer_as: 65000}}]
vips:
  - name: web
    address: 198.51.100.10/32
    check: {{type: tcp, interval: 0.5}}
    origins: [{{region: us-west, next_hop: 100.64.10.1, backends: ["100.64.10.1:8080"]}}]
"""


def _config_file(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text.format(state=tmp_path / "state"))
    (tmp_path / "state").mkdir(exist_ok=True)
    return path


def _launched(path: Path, *extra: str) -> tuple[argparse.Namespace, dict[str, str], AgentConfig]:
    """What launch loads and hands over (without exec'ing ExaBGP): its args, the environment
    it gives ExaBGP, its config."""
    args = agent_main._parser().parse_args(["launch", "--config", str(path), *extra])
    text = path.read_text()
    config = agent_main.load(args, text)
    env = h.hand_over(config.state_dir, config, agent_main._built_from(text, args))
    return args, env, config


def _run_args(path: Path, *extra: str) -> argparse.Namespace:
    return agent_main._parser().parse_args(["run", "--config", os.path.abspath(path), *extra])


def test_the_api_process_takes_over_what_launch_loaded_for_the_same_text(tmp_path: Path) -> None:
    path = _config_file(tmp_path)
    _, env, config = _launched(path, "--metrics-listen", "off")
    run = _run_args(path, "--metrics-listen", "off")
    taken = h.take_over(agent_main._built_from(path.read_text(), run), env)
    assert taken == config == agent_main.load(run)
    assert h.ENV_KEY not in env and h.ENV_FILE not in env  # nothing the agent starts inherits the key
    assert [v.name for v in taken.vips] == ["web"]  # the VIPs are kept, not an empty config
    assert (os.stat(env_path := tmp_path / "state" / h.FILE).st_mode & 0o777) == 0o600, env_path


def test_an_edited_file_or_other_overrides_are_loaded_again(tmp_path: Path) -> None:
    path = _config_file(tmp_path)
    _, env, _ = _launched(path)
    path.write_text(path.read_text().replace("interval: 0.5", "interval: 0.2"))
    assert h.take_over(agent_main._built_from(path.read_text(), _run_args(path)), dict(env)) is None
    other = _run_args(path, "--state-dir", str(tmp_path / "elsewhere"))
    assert h.take_over(agent_main._built_from(path.read_text(), other), dict(env)) is None


def test_a_file_not_sealed_by_this_launch_is_refused_before_it_is_unpickled(tmp_path: Path) -> None:
    path = _config_file(tmp_path)
    run = _run_args(path)
    built_from = agent_main._built_from(path.read_text(), run)
    _, env, _ = _launched(path)
    # Another launch's file (another key), and one whose payload would run code if unpickled.
    (tmp_path / "state" / h.FILE).write_bytes(h.seal(agent_main.load(run), built_from, os.urandom(32)))
    assert h.take_over(built_from, dict(env)) is None

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (pytest.fail, ("unpickled a forged handoff",))

    payload = pickle.dumps((built_from, Boom()))
    assert h.unseal(h._MAGIC + b"\0" * 32 + payload, built_from, b"k" * 32) is None
    assert h.unseal(b"garbage", built_from, b"k" * 32) is None


def test_without_the_key_or_the_file_the_api_process_loads_its_file(tmp_path: Path) -> None:
    path = _config_file(tmp_path)
    built_from = agent_main._built_from(path.read_text(), _run_args(path))
    assert h.take_over(built_from, {}) is None  # run by hand, or by an older launch
    _, env, _ = _launched(path)
    os.unlink(env[h.ENV_FILE])
    assert h.take_over(built_from, dict(env)) is None
    assert h.take_over(built_from, {h.ENV_KEY: "not hex", h.ENV_FILE: env[h.ENV_FILE]}) is None


def test_launch_carries_on_without_a_handoff_when_the_state_dir_is_not_writable(tmp_path: Path) -> None:
    path = _config_file(tmp_path)
    config = agent_main.load(_run_args(path))
    missing = dataclasses.replace(config, state_dir=str(tmp_path / "no" / "such" / "dir"))
    assert h.hand_over(missing.state_dir, missing, b"x") == {}  # (a warning; ExaBGP starts all the same)


def test_main_run_uses_the_handoff_and_names_its_own_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``anycast-agent run`` as ExaBGP starts it: the config handed over (source: the path
    it was given), and the file's own when the handoff does not fit."""
    path = _config_file(tmp_path)
    _, env, config = _launched(path)
    seen: list[object] = []

    async def fake_run_agent(cfg: object, reload: object, **_: object) -> int:
        seen.append(cfg)
        return 0

    monkeypatch.setattr("controller.agent.runner.run_agent", fake_run_agent)
    parsed: list[str] = []

    def parse(text: str, source: str = "<config>") -> AgentConfig:
        parsed.append(source)
        return parse_agent_config(text, source)

    monkeypatch.setattr(agent_main, "parse_agent_config", parse)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert agent_main.main(["run", "--config", os.path.abspath(path)]) == 0
    assert seen == [dataclasses.replace(config, source=os.path.abspath(path))]
    assert parsed == []  # not parsed again
    assert h.ENV_KEY not in os.environ
    assert agent_main.main(["run", "--config", os.path.abspath(path)]) == 0  # no key now: loads the file
    assert parsed == [os.path.abspath(path)] and seen[1] == seen[0]


def test_launch_execs_exabgp_with_the_handoff_and_the_api_process_takes_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``anycast-agent launch`` end to end up to its exec: the environment it gives ExaBGP
    carries the key and the file, and with them the API process's load is the handed config."""
    path = _config_file(tmp_path)
    execs: list[dict[str, str]] = []

    def execve(exe: str, argv: list[str], env: dict[str, str]) -> None:
        execs.append(env)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(SystemExit):
        agent_main.main(["launch", "--config", str(path), "--exabgp", "/nonexistent/exabgp"])
    [env] = execs
    assert env[h.ENV_FILE] == str(tmp_path / "state" / h.FILE) and len(bytes.fromhex(env[h.ENV_KEY])) == 32
    run = _run_args(path)
    taken = h.take_over(agent_main._built_from(path.read_text(), run), dict(env))
    assert taken is not None and dataclasses.replace(taken, source=run.config) == agent_main.load(run)
