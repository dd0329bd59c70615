"""The ExaBGP config and environment rendered for an agent, checked by real ExaBGP 5."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.bgp.exabgp_config import NeighborSpec, exabgp_environment, render_exabgp_config

GOLDEN = Path(__file__).parent / "golden" / "exabgp_config_dual_stack.conf"
EXABGP = Path(sys.executable).with_name("exabgp")

# A dual-stack POP: one session per family (see NeighborSpec on why), one with a password.
NEIGHBORS = [
    NeighborSpec(
        address="100.64.1.1",
        local_address="100.64.1.2",
        router_id="100.64.1.2",
        local_as=65101,
        peer_as=65000,
        md5_password="s3cret pass!",
    ),
    NeighborSpec(
        address="fd00:64:1::1",
        local_address="fd00:64:1::2",
        router_id="100.64.1.2",
        local_as=65101,
        peer_as=65000,
        hold_time=3,
        passive=True,
    ),
]
ARGV = ["/opt/anycast/venv/bin/python", "-m", "controller.cli.agent_main", "run", "--config", "/etc/anycast/agent.yaml"]


def _validate(config: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "exabgp.conf"
    path.write_text(config)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **exabgp_environment()}
    return subprocess.run([str(EXABGP), "validate", "--neighbor", str(path)], env=env, capture_output=True, text=True, timeout=60)


def test_rendered_config_matches_golden() -> None:
    assert render_exabgp_config(NEIGHBORS, "anycast-agent", ARGV) == GOLDEN.read_text()


def test_real_exabgp_validate_accepts_the_rendered_config(tmp_path: Path) -> None:
    # ExaBGP checks that the run program exists and is executable, so use a real one.
    config = render_exabgp_config(NEIGHBORS, "anycast-agent", [sys.executable, "-m", "controller.cli.agent_main"])
    result = _validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Both neighbours were parsed, not just the file opened.
    out = result.stdout + result.stderr
    assert "neighbor  100.64.1.1" in out and "neighbor  fd00:64:1::1" in out


def test_exabgp_validate_does_reject_a_broken_config(tmp_path: Path) -> None:
    # Proves the test above can fail: ExaBGP refuses a hold time of 1 s.
    config = render_exabgp_config(NEIGHBORS, "anycast-agent", [sys.executable]).replace("hold-time 9;", "hold-time 1;")
    result = _validate(config, tmp_path)
    assert result.returncode != 0
    assert "holdtime" in result.stderr


def test_families_default_to_the_sessions_own() -> None:
    v4, v6 = NEIGHBORS
    assert v4.effective_families() == ("ipv4 unicast",)
    assert v6.effective_families() == ("ipv6 unicast",)
    both = NeighborSpec("100.64.1.1", "100.64.1.2", "100.64.1.2", 65101, 65000, families=("ipv4 unicast", "ipv6 unicast"))
    assert "        ipv4 unicast;\n        ipv6 unicast;\n" in render_exabgp_config([both], "a", ["/bin/true"])


@pytest.mark.parametrize(
    "argv",
    [
        ["/usr/bin/python3", "/opt/my agent.py"],
        ["/usr/bin/python3", '"quoted"'],
        ["/usr/bin/python3", "it's"],
        ["/usr/bin/python3", "--x;rm"],
        ["/usr/bin/python3", "--tabs\there"],
        ["/usr/bin/python3", "{block}"],
        ["/usr/bin/python3", "[list]"],
        ["/usr/bin/python3", "a,b"],
        ["/usr/bin/python3", "#comment"],
        ["/usr/bin/python3", "back\\slash"],
        ["/usr/bin/python3", ""],
        ["python3", "-m", "controller"],
        [],
    ],
)
def test_a_run_argument_exabgp_would_mangle_is_refused(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="run_argv"):
        render_exabgp_config(NEIGHBORS, "anycast-agent", argv)


def test_a_bare_string_argv_is_refused() -> None:
    with pytest.raises(ValueError, match="run_argv"):
        render_exabgp_config(NEIGHBORS, "anycast-agent", "/usr/bin/agent")


@pytest.mark.parametrize("name", ["", "two words", "a;b", "-leading", "ünicode"])
def test_bad_process_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="process_name"):
        render_exabgp_config(NEIGHBORS, name, ARGV)


def test_neighbors_must_be_present_and_distinct() -> None:
    with pytest.raises(ValueError, match="at least one"):
        render_exabgp_config([], "anycast-agent", ARGV)
    with pytest.raises(ValueError, match=r"neighbors\[1\].address"):
        render_exabgp_config([NEIGHBORS[0], NEIGHBORS[0]], "anycast-agent", ARGV)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"address": "router1"}, "address"),
        ({"local_address": "fd00::2"}, "same family"),
        ({"router_id": "fd00::2"}, "router_id"),
        ({"local_as": 0}, "local_as"),
        ({"peer_as": 4294967296}, "peer_as"),
        ({"hold_time": 1}, "hold_time"),
        ({"hold_time": 65536}, "hold_time"),
        ({"md5_password": ""}, "md5_password"),
        ({"md5_password": 'a"b'}, "md5_password"),
        ({"md5_password": "a\\b"}, "md5_password"),
        ({"md5_password": "a\nb"}, "md5_password"),
        ({"md5_password": "x" * 81}, "md5_password"),
        ({"families": ()}, "families"),
        ({"families": "ipv4 unicast"}, "families"),
        ({"families": ("ipv4 flow",)}, "families"),
    ],
)
def test_invalid_neighbor_specs_are_refused_naming_the_field(changes: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "address": "100.64.1.1",
        "local_address": "100.64.1.2",
        "router_id": "100.64.1.2",
        "local_as": 65101,
        "peer_as": 65000,
    }
    with pytest.raises(ValueError, match=message):
        NeighborSpec(**{**base, **changes})  # type: ignore[arg-type]


def test_hold_time_zero_is_allowed() -> None:
    assert NeighborSpec("100.64.1.1", "100.64.1.2", "100.64.1.2", 65101, 65000, hold_time=0).hold_time == 0


def test_real_exabgp_reads_the_environment() -> None:
    # `exabgp env` prints the settings ExaBGP resolved; each of ours must show up.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **exabgp_environment("/var/log/anycast/exabgp.log")}
    out = subprocess.run([str(EXABGP), "env"], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    sections: dict[str, dict[str, str]] = {}
    section = ""
    for line in out.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            key, value = line.split(" = ", 1)
            sections.setdefault(section, {})[key] = value.strip("'")
    for name, value in exabgp_environment("/var/log/anycast/exabgp.log").items():
        _, group, key = name.split("_", 2)
        assert sections[f"exabgp.{group}"][key].lower() == value.lower(), name


def test_environment_logs_to_stdout_unless_given_a_file() -> None:
    assert exabgp_environment()["exabgp_log_destination"] == "stdout"
    assert exabgp_environment("/var/log/exabgp.log")["exabgp_log_destination"] == "/var/log/exabgp.log"
