"""The ExaBGP config and environment rendered for an agent (pure; real ExaBGP checks them in
tests/integration/test_exabgp_validate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.bgp.exabgp_config import NeighborSpec, exabgp_environment, render_exabgp_config
from tests.helpers.exabgp_neighbors import NEIGHBORS

GOLDEN = Path(__file__).parent / "golden" / "exabgp_config_dual_stack.conf"
ARGV = ["/opt/anycast/venv/bin/python", "-m", "controller.cli.agent_main", "run", "--config", "/etc/anycast/agent.yaml"]


def test_rendered_config_matches_golden() -> None:
    assert render_exabgp_config(NEIGHBORS, "anycast-agent", ARGV) == GOLDEN.read_text()


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


def test_environment_logs_to_stdout_unless_given_a_file() -> None:
    assert exabgp_environment()["exabgp_log_destination"] == "stdout"
    assert exabgp_environment("/var/log/exabgp.log")["exabgp_log_destination"] == "/var/log/exabgp.log"


def test_environment_keeps_exabgp_from_logging_every_route() -> None:
    # One INFO line per route change was ~1/3 of ExaBGP's CPU at a 10,000-VIP cold start;
    # the session lines (other sources) stay at INFO (test_exabgp_validate runs real ExaBGP).
    env = exabgp_environment()
    assert env["exabgp_log_processes"] == "false"
    assert env["exabgp_log_level"] == "INFO"


def test_environment_shortens_exabgps_naps_between_our_commands() -> None:
    # At the default reactor speed (1.0) ExaBGP naps up to 10 ms between passes that read
    # no new command, with routes still queued: 0.5 halves that (section 19c).
    assert exabgp_environment()["exabgp_reactor_speed"] == "0.5"


def test_graceful_restart_renders_the_capability_and_manual_eor() -> None:
    import dataclasses

    text = render_exabgp_config([dataclasses.replace(NEIGHBORS[0], graceful_restart=120)], "agent", ["/bin/true"])
    assert "    capability {\n        graceful-restart 120;\n    }\n    manual-eor true;\n" in text
    assert "graceful-restart" not in render_exabgp_config([NEIGHBORS[0]], "agent", ["/bin/true"])
    with pytest.raises(ValueError, match="graceful_restart"):
        dataclasses.replace(NEIGHBORS[0], graceful_restart=4096)
