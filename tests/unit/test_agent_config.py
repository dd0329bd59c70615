"""Agent config: the example loads; every class of bad input is reported with its path."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from controller.cli.anycastctl import main as anycastctl
from controller.config.agent import load_agent_config, parse_agent_config
from controller.config.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "agent-sjc.yaml"


def base() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def errors_of(data: dict | str) -> list[str]:
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    with pytest.raises(ConfigError) as info:
        parse_agent_config(text, "test.yaml")
    return [str(i) for i in info.value.issues]


def test_example_config_loads_into_typed_values() -> None:
    c = load_agent_config(str(EXAMPLE))
    assert c.pop == "sjc"
    assert c.local_as == 65101
    vip = c.vips[0]
    assert vip.prefix == ipaddress.ip_network("198.51.100.10/32")
    assert [o.region for o in vip.origins] == ["us-west", "eu-central"]
    assert str(vip.origins[0].backends[1]) == "100.64.10.1:8081"
    assert (vip.check.kind, vip.check.rise, vip.check.fall) == ("http", 2, 2)
    assert vip.attributes.draining.as_path_prepend == 3
    assert c.neighbors[0].router_id == ipaddress.ip_address("100.64.1.2")  # defaults to local_address


def test_all_examples_in_configs_validate() -> None:
    agent_configs = sorted((ROOT / "configs").glob("agent-*.yaml"))
    assert agent_configs
    for path in agent_configs:
        load_agent_config(str(path))


def test_unknown_key_is_named_with_its_path() -> None:
    d = base()
    d["vips"][0]["check"]["intreval"] = 1
    errs = errors_of(d)
    assert any(e.startswith("vips[0].check.intreval: unknown key") for e in errs), errs


def test_bad_prefix_and_bad_address() -> None:
    d = base()
    d["allowed_prefixes"].append("198.51.100.7/24")  # host bits set
    d["vips"][0]["origins"][1]["next_hop"] = "100.64.20.300"
    errs = errors_of(d)
    assert any(e.startswith("allowed_prefixes[2]: not a valid prefix") for e in errs), errs
    assert any(e.startswith("vips[0].origins[1].next_hop: not an IP address") for e in errs), errs


def test_vip_outside_allowed_ranges_is_refused() -> None:
    d = base()
    d["vips"][0]["address"] = "203.0.113.10/32"
    errs = errors_of(d)
    assert any(e.startswith("vips[0].address: 203.0.113.10/32 is outside the allowed anycast prefixes")
               for e in errs), errs


def test_vip_must_be_a_host_prefix() -> None:
    d = base()
    d["vips"][0]["address"] = "198.51.100.0/24"
    assert any("a VIP must be a single address (/32)" in e for e in errors_of(d))


def test_rise_zero_is_rejected() -> None:
    d = base()
    d["vips"][0]["check"]["rise"] = 0
    assert "vips[0].check.rise: must be >= 1, got 0" in errors_of(d)


def test_duplicate_vip() -> None:
    d = base()
    second = dict(d["vips"][0], name="other")
    d["vips"].append(second)
    assert any(e.startswith("vips[1]: duplicate VIP address 198.51.100.10/32") for e in errors_of(d))


def test_duplicate_yaml_key_is_an_error_not_a_silent_override() -> None:
    text = EXAMPLE.read_text().replace("pop: sjc", "pop: sjc\npop: fra")
    errs = errors_of(text)
    assert len(errs) == 1 and "duplicate key 'pop'" in errs[0], errs


def test_more_than_five_origins() -> None:
    d = base()
    o = d["vips"][0]["origins"][0]
    d["vips"][0]["origins"] = [dict(o, region=f"r{i}") for i in range(6)]
    assert "vips[0].origins: at most 5 origin regions per VIP, got 6" in errors_of(d)


def test_timeout_longer_than_interval_and_bad_community() -> None:
    d = base()
    d["vips"][0]["check"]["timeout"] = 5
    d["bgp"]["attributes"]["up"]["communities"] = ["65101:70000"]
    errs = errors_of(d)
    assert "vips[0].check.timeout: must not exceed interval (0.2s), got 5.0s" in errs
    assert any(e.startswith("bgp.attributes.up.communities[0]: not a BGP community") for e in errs), errs


def test_every_error_is_reported_in_one_pass() -> None:
    d = base()
    del d["pop"]
    d["vips"][0]["check"]["fall"] = "two"
    d["bgp"]["neighbors"][0]["peer_as"] = 0
    errs = errors_of(d)
    assert "pop: required" in errs
    assert any(e.startswith("vips[0].check.fall: expected an integer") for e in errs)
    assert any(e.startswith("bgp.neighbors[0].peer_as: must be >= 1") for e in errs)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_agent_config(str(tmp_path / "missing.yaml"))
    assert "cannot read file: No such file or directory" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pop: sjc\nvips: [\n")
    with pytest.raises(ConfigError) as info:
        load_agent_config(str(bad))
    assert "invalid YAML" in str(info.value) and "line" in str(info.value)


def test_anycastctl_validate_lists_errors_and_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = base()
    d["vips"][0]["check"]["rise"] = 0
    d["vips"][0]["address"] = "203.0.113.10"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(d))
    assert anycastctl(["validate", str(EXAMPLE)]) == 0
    assert anycastctl(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{EXAMPLE}: OK" in out
    assert f"{bad}: INVALID, 2 error(s)" in out
    assert "vips[0].check.rise: must be >= 1, got 0" in out
    assert "vips[0].address: 203.0.113.10/32 is outside the allowed anycast prefixes" in out



def test_vip_family_must_match_the_bgp_sessions() -> None:
    d = base()
    d["vips"][0]["address"] = "2001:db8:51::10/128"
    d["vips"][0]["origins"] = [{"region": "v6", "next_hop": "2001:db8:ffff::1", "backends": ["[2001:db8:ffff::1]:80"]}]
    assert "vips[0].address: an IPv6 VIP needs an IPv6 BGP session; bgp.neighbors has none" in errors_of(d)
    d["bgp"]["neighbors"].append({"address": "2001:db8:1::1", "local_address": "2001:db8:1::2",
                                  "router_id": "100.64.1.2", "peer_as": 65001})
    # Both families in one agent: each command goes to its family's sessions (daemon).
    c = parse_agent_config(yaml.safe_dump(d), "test.yaml")
    assert [n.address.version for n in c.neighbors] == [4, 6]


def test_host_header_that_would_break_the_request_is_rejected() -> None:
    d = base()
    d["vips"][0]["check"]["host_header"] = "evil\r\nX-Injected: 1"
    assert any(e.startswith("vips[0].check.host_header: a Host header is ASCII without spaces")
               for e in errors_of(d))


@pytest.mark.parametrize("kind, set_to, expected", [
    ("http", None, True), ("tcp", None, True), ("https", None, False),  # the defaults
    ("http", False, False), ("https", True, True),
])
def test_check_watch_defaults_by_kind_and_survives_a_plan_round_trip(kind: str, set_to: bool | None,
                                                                      expected: bool) -> None:
    from controller.config.agent import DEFAULT_CHECK, DEFAULT_DRAINING, DEFAULT_UP, read_vip
    from controller.config.model import StateAttributes
    from controller.config.reader import Issues, Node
    from controller.config.serialize import vip_to_dict

    d = base()
    check = {"type": kind}
    if set_to is not None:
        check["watch"] = set_to
    d["vips"][0]["check"] = check
    config = parse_agent_config(yaml.safe_dump(d))
    vip = config.vips[0]
    assert vip.check.watch is expected
    # A plan carries it only when it differs from its kind's default, and reads back the same.
    raw = vip_to_dict(vip)
    assert ("watch" in raw["check"]) is (set_to is not None and set_to != (kind != "https"))
    issues = Issues()
    back = read_vip(Node(raw, "", issues), config.allowed_prefixes, dict(DEFAULT_CHECK),
                    StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))
    assert not issues.items and back == vip


def test_check_watch_must_be_a_boolean() -> None:
    d = base()
    d["vips"][0]["check"]["watch"] = "sometimes"
    assert any("vips[0].check.watch" in e for e in errors_of(d))


def test_graceful_restart_and_shutdown_are_read_and_bounded() -> None:
    d = base()
    d["bgp"]["graceful_restart"] = 120
    d["bgp"]["graceful_shutdown"] = 2.5
    c = parse_agent_config(yaml.safe_dump(d), "test.yaml")
    assert (c.graceful_restart, c.graceful_shutdown) == (120, 2.5)
    assert (load_agent_config(str(EXAMPLE)).graceful_restart, load_agent_config(str(EXAMPLE)).graceful_shutdown) == (0, 0.0)
    d["bgp"]["graceful_restart"] = 4096
    d["bgp"]["graceful_shutdown"] = -1
    errs = errors_of(d)
    assert any(e.startswith("bgp.graceful_restart: must be <= 4095") for e in errs), errs
    assert any(e.startswith("bgp.graceful_shutdown: must be >= 0") for e in errs), errs


@pytest.mark.parametrize("default, kind, own, expected", [
    (False, "http", None, False), (False, "tcp", None, False),  # check_defaults turns the watch off...
    (False, "http", True, True),  # ...a check's own setting wins
    (True, "https", None, True),  # and on, for every kind
    (None, "https", None, False), (None, "tcp", None, True),  # unset: each kind's own default
])
def test_check_defaults_watch_is_every_checks_default(default: bool | None, kind: str, own: bool | None,
                                                     expected: bool) -> None:
    from controller.config.serialize import vip_to_dict

    d = base()
    if default is not None:
        d["check_defaults"]["watch"] = default
    d["vips"][0]["check"] = {"type": kind} | ({} if own is None else {"watch": own})
    vip = parse_agent_config(yaml.safe_dump(d)).vips[0]
    assert vip.check.watch is expected
    # What a plan carries for it says the same to an agent reading it without the defaults.
    assert vip_to_dict(vip)["check"].get("watch", kind != "https") is expected


def test_check_defaults_watch_must_be_a_boolean() -> None:
    d = base()
    d["check_defaults"]["watch"] = "sometimes"
    assert any(e.startswith("check_defaults.watch") for e in errors_of(d)), errors_of(d)


def _with_controller(**link: object) -> dict:
    data = base()
    data["vips"] = []
    data["controller"] = {"url": "https://192.0.2.9:9800", "token_file": "/etc/anycast/agent.token", **link}
    return data


def test_the_controller_link_reads_its_tls_and_plan_keys() -> None:
    config = parse_agent_config(yaml.safe_dump(_with_controller(
        ca_file="/etc/anycast/ca.pem", client_cert="/etc/anycast/sjc.pem", client_key="/etc/anycast/sjc.key",
        plan_keys=["/etc/anycast/plan.pub"], max_plan_age=3600)))
    link = config.controller
    assert link is not None and link.tls.ca_file == "/etc/anycast/ca.pem" and link.tls.key == "/etc/anycast/sjc.key"
    assert link.plan_keys == ("/etc/anycast/plan.pub",) and link.max_plan_age == 3600


@pytest.mark.parametrize("link, expected", [
    ({"client_cert": "/etc/anycast/sjc.pem"}, "controller.client_key: client_cert and client_key go together"),
    ({"ca_file": "ca.pem"}, "controller.ca_file: expected an absolute path, got 'ca.pem'"),
    ({"plan_keys": ["plan.pub"]}, "controller.plan_keys[0]: expected an absolute path, got 'plan.pub'"),
    ({"url": "http://192.0.2.9:9800", "ca_file": "/etc/anycast/ca.pem"},
     "controller.url: ca_file and client_cert need an https:// URL"),
])
def test_controller_tls_mistakes_name_the_key(link: dict, expected: str) -> None:
    assert expected in errors_of(_with_controller(**link))


def _edit(change: Callable[[dict], None]) -> dict:
    data = base()
    change(data)
    return data


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.__setitem__("allowed_prefixes", []), "allowed_prefixes: at least one prefix is needed"),
    (lambda d: d["vips"][0]["origins"][0].__setitem__("next_hop", "0.0.0.0"),
     "vips[0].origins[0].next_hop: 0.0.0.0 is an unspecified address, not a next hop"),
    (lambda d: d["vips"][0]["origins"][0].__setitem__("next_hop", "127.0.0.1"),
     "vips[0].origins[0].next_hop: 127.0.0.1 is a loopback address, not a next hop"),
    (lambda d: d["vips"][0]["origins"][0].__setitem__("next_hop", "224.0.0.5"),
     "vips[0].origins[0].next_hop: 224.0.0.5 is a multicast address, not a next hop"),
    (lambda d: d["vips"][0]["origins"][0].__setitem__("backends", ["0.0.0.0:80"]),
     "vips[0].origins[0].backends[0]: 0.0.0.0 is an unspecified address, not a backend"),
    (lambda d: d["vips"][0]["origins"][0].__setitem__("backends", [{"address": "239.1.1.1", "port": 80}]),
     "vips[0].origins[0].backends[0].address: 239.1.1.1 is a multicast address, not a backend"),
    (lambda d: d["bgp"]["neighbors"][0].__setitem__("address", d["bgp"]["neighbors"][0]["local_address"]),
     "bgp.neighbors[0].address: the neighbour's address is local_address"),
])
def test_what_cannot_be_right_is_refused_naming_the_path(change: Callable[[dict], None], expected: str) -> None:
    assert any(e.startswith(expected) for e in errors_of(_edit(change))), errors_of(_edit(change))


def test_check_reuse_connection_is_read_and_survives_a_plan_round_trip() -> None:
    from controller.agent.daemon import probe_spec
    from controller.config.agent import DEFAULT_CHECK, DEFAULT_DRAINING, DEFAULT_UP, read_vip
    from controller.config.model import StateAttributes
    from controller.config.reader import Issues, Node
    from controller.config.serialize import vip_to_dict

    for check, reuse, every in [({}, False, 10), ({"reuse_connection": True}, True, 10),
                                ({"reuse_connection": True, "fresh_connection_every": 3}, True, 3)]:
        d = base()
        d["vips"][0]["check"] = {"type": "http", **check}
        config = parse_agent_config(yaml.safe_dump(d))
        vip = config.vips[0]
        assert (vip.check.reuse_connection, vip.check.fresh_connection_every) == (reuse, every)
        raw = vip_to_dict(vip)
        assert {k: v for k, v in raw["check"].items() if k in check} == check  # only what was set
        issues = Issues()
        back = read_vip(Node(raw, "", issues), config.allowed_prefixes, dict(DEFAULT_CHECK),
                        StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))
        assert not issues.items and back == vip
        key = (vip.name, vip.origins[0].region, vip.origins[0].backends[0])
        spec = probe_spec(vip, key)
        assert (spec.reuse_connection, spec.fresh_connection_every) == (reuse, every)


@pytest.mark.parametrize("check, path, words", [
    ({"type": "http", "reuse_connection": "yes"}, "vips[0].check.reuse_connection", "expected true or false"),
    ({"type": "https", "reuse_connection": True}, "vips[0].check.reuse_connection", "only for http checks"),
    ({"type": "tcp", "reuse_connection": True}, "vips[0].check.reuse_connection", "only for http checks"),
    ({"type": "http", "fresh_connection_every": 5}, "vips[0].check.fresh_connection_every",
     "only with reuse_connection: true"),
    ({"type": "http", "reuse_connection": True, "fresh_connection_every": 0},
     "vips[0].check.fresh_connection_every", ""),
    ({"type": "http", "reuse_connection": True, "fresh_connection_every": 2.5},
     "vips[0].check.fresh_connection_every", "expected an integer"),
])
def test_check_reuse_connection_errors_name_the_key(check: dict, path: str, words: str) -> None:
    d = base()
    d["vips"][0]["check"] = check
    errs = errors_of(d)
    assert any(e.startswith(path) and words in e for e in errs), errs
