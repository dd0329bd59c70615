"""A config that validates always announces: every attribute the config reader accepts goes
through the agent's real announce path (``daemon.exabgp_attributes`` -> ``announce_line``)
and then through ExaBGP 5's own API command parser, in process (no ExaBGP daemon).

Before, ``communities: ["no-export"]`` validated and then crashed the announce path, and
RFC 8326's ``graceful-shutdown`` was refused; an 80-character non-ASCII MD5 key validated
and crashed the launcher. The cases below are drawn from a seeded generator, so a failure
is reproducible, plus every well-known name.
"""

from __future__ import annotations

import ipaddress
import os
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.agent.daemon import exabgp_attributes
from controller.agent.decide import graceful_shutdown_attributes
from controller.bgp.exabgp_api import announce_line
from controller.bgp.exabgp_config import NeighborSpec, render_exabgp_config
from controller.bgp_values import WELL_KNOWN_COMMUNITIES
from controller.config.agent import parse_agent_config
from controller.config.errors import ConfigError


EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "agent-sjc.yaml"
SEED = 14
CASES = 200


def base() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text()))


@pytest.fixture(scope="module")
def exabgp_api() -> Any:
    """ExaBGP's API object, parsing command lines exactly as the daemon does."""
    os.environ.setdefault("exabgp.log.destination", "stderr")
    os.environ.setdefault("exabgp.log.level", "CRITICAL")
    from exabgp.configuration.configuration import Configuration
    from exabgp.environment import getenv
    from exabgp.logger import log
    from exabgp.reactor.api import API

    log.init(getenv())
    return API(Configuration([]))


def exabgp_parse(api: Any, line: str) -> Any:
    """The one route ExaBGP makes of `line` (it answers ``error`` when it makes none)."""
    changes = api.api_route(line)
    assert len(changes) == 1, f"ExaBGP refused: {line}"
    return changes[0]


def wire_communities(change: Any) -> tuple[set[int], set[tuple[int, int, int]]]:
    communities: set[int] = set()
    large: set[tuple[int, int, int]] = set()
    for attr in change.attributes.values():
        name = type(attr).__name__
        if name == "Communities":
            communities |= {int.from_bytes(c.community, "big") for c in attr.communities}
        elif name == "LargeCommunities":
            large |= {(int.from_bytes(c.large_community[:4], "big"), int.from_bytes(c.large_community[4:8], "big"),
                       int.from_bytes(c.large_community[8:], "big")) for c in attr.communities}
    return communities, large


def random_attributes(rng: random.Random) -> dict[str, Any]:
    names = list(WELL_KNOWN_COMMUNITIES)
    communities: list[str] = []
    for _ in range(rng.randint(0, 6)):
        pick = rng.random()
        if pick < 0.4:
            communities.append(rng.choice(names).upper() if rng.random() < 0.1 else rng.choice(names))
        else:
            communities.append(f"{rng.choice([0, 1, 65535, rng.randint(0, 65535)])}:"
                               f"{rng.choice([0, 65535, rng.randint(0, 65535)])}")
    large = [":".join(str(rng.choice([0, 4294967295, rng.randint(0, 4294967295)])) for _ in range(3))
             for _ in range(rng.randint(0, 3))]
    extended = []
    for _ in range(rng.randint(0, 3)):
        kind = rng.choice(["target", "origin", "Target"])
        if rng.random() < 0.5:
            extended.append(f"{kind}:{rng.choice([0, 65535, rng.randint(0, 65535)])}:"
                            f"{rng.choice([0, 4294967295, rng.randint(0, 4294967295)])}")
        else:
            address = ipaddress.IPv4Address(rng.randint(0, 2**32 - 1))
            extended.append(f"{kind}:{address}:{rng.choice([0, 65535, rng.randint(0, 65535)])}")
    attrs: dict[str, Any] = {"communities": communities, "large_communities": large,
                             "extended_communities": extended, "as_path_prepend": rng.randint(0, 10)}
    if rng.random() < 0.8:
        attrs["med"] = rng.choice([0, 4294967295, rng.randint(0, 4294967295)])
    return attrs


def wire_extended(change: Any) -> set[bytes]:
    return {c.community for attr in change.attributes.values() if type(attr).__name__ == "ExtendedCommunities"
            for c in attr.communities}


def expected_extended(attrs: dict[str, Any]) -> set[bytes]:
    """RFC 4360's eight octets, computed here, not by ExaBGP: type (0x00 2-byte AS, 0x01 IPv4),
    sub-type (0x02 route target, 0x03 route origin), then the two fields."""
    out = set()
    for e in attrs["extended_communities"]:
        kind, admin, value = e.split(":")
        sub = {"target": 2, "origin": 3}[kind.lower()]
        if admin.isdigit():
            out.add(bytes([0, sub]) + int(admin).to_bytes(2, "big") + int(value).to_bytes(4, "big"))
        else:
            out.add(bytes([1, sub]) + ipaddress.IPv4Address(admin).packed + int(value).to_bytes(2, "big"))
    return out


def expected(attrs: dict[str, Any]) -> tuple[set[int], set[tuple[int, int, int]]]:
    values = set()
    for c in attrs["communities"]:
        a, b = WELL_KNOWN_COMMUNITIES.get(c.lower()) or tuple(int(x) for x in c.split(":"))
        values.add(a << 16 | b)
    return values, {tuple(int(x) for x in lc.split(":")) for lc in attrs["large_communities"]}  # type: ignore[misc]


@pytest.mark.parametrize("case", range(CASES))
def test_every_accepted_attribute_set_is_announced_by_exabgp(exabgp_api: Any, case: int) -> None:
    rng = random.Random(SEED * 100_000 + case)
    d = base()
    up, draining = random_attributes(rng), random_attributes(rng)
    d["vips"][0]["attributes"] = {"up": up, "draining": draining}
    if rng.random() < 0.3:
        d["vips"][0]["address"] = "198.51.100.10"
    config = parse_agent_config(yaml.safe_dump(d), "case.yaml")
    vip = config.vips[0]
    for raw, attrs in ((up, vip.attributes.up), (draining, vip.attributes.draining)):
        line = announce_line(vip.prefix, exabgp_attributes(attrs, config.local_as))
        change = exabgp_parse(exabgp_api, line)
        assert str(change.nlri.cidr.prefix()) == str(vip.prefix)
        assert wire_communities(change) == expected(raw), line
        assert wire_extended(change) == expected_extended(raw), line
    # A drain with bgp.graceful_shutdown set: the draining attributes plus 65535:0.
    line = announce_line(vip.prefix, exabgp_attributes(graceful_shutdown_attributes(vip.attributes.draining),
                                                       config.local_as))
    communities, large = expected(draining)
    assert wire_communities(exabgp_parse(exabgp_api, line)) == (communities | {0xFFFF0000}, large), line


@pytest.mark.parametrize("name", sorted(WELL_KNOWN_COMMUNITIES))
def test_each_well_known_name_validates_and_announces(exabgp_api: Any, name: str) -> None:
    d = base()
    d["bgp"]["attributes"]["up"]["communities"] = [name, "65101:100"]
    config = parse_agent_config(yaml.safe_dump(d), "case.yaml")
    attrs = config.vips[0].attributes.up
    a, b = WELL_KNOWN_COMMUNITIES[name]
    assert f"{a}:{b}" in attrs.communities  # stored in the canonical form ExaBGP sends
    line = announce_line(config.vips[0].prefix, exabgp_attributes(attrs, config.local_as))
    assert wire_communities(exabgp_parse(exabgp_api, line))[0] == {a << 16 | b, 65101 << 16 | 100}


def test_ipv6_vip_with_well_known_communities(exabgp_api: Any) -> None:
    from controller.bgp.exabgp_api import RouteAttributes

    prefix = ipaddress.ip_network("2001:db8::10/128")
    line = announce_line(prefix, RouteAttributes(med=5, communities=("graceful-shutdown", "no-export")))
    assert wire_communities(exabgp_parse(exabgp_api, line))[0] == {0xFFFF0000, 0xFFFFFF01}


@pytest.mark.parametrize("value", [65101, "65101", "65536:1", "no-such-name", "1:2:3", "", "６５１０１:1"])
def test_a_refused_community_is_refused_by_the_validator(value: object) -> None:
    d = base()
    d["bgp"]["attributes"]["up"]["communities"] = [value]
    with pytest.raises(ConfigError) as info:
        parse_agent_config(yaml.safe_dump(d), "case.yaml")
    assert any(str(i).startswith("bgp.attributes.up.communities[0]: not a BGP community")
               for i in info.value.issues), info.value.issues


def test_unquoted_yaml_community_read_as_base_60_is_refused_not_mangled() -> None:
    # YAML 1.1 reads 65101:50 (every later part < 60) as the integer 3906110.
    text = yaml.safe_dump(base()).replace("- 65101:100", "- 65101:50")
    assert "65101:50" in text
    with pytest.raises(ConfigError) as info:
        parse_agent_config(text, "case.yaml")
    assert any("quoted string" in str(i) for i in info.value.issues), info.value.issues


def _neighbor(password: str) -> NeighborSpec:
    return NeighborSpec("100.64.1.1", "100.64.1.2", "100.64.1.2", 65101, 65001, md5_password=password)


@pytest.mark.parametrize("password", ["é" * 80, "ü" * 41, "x" * 81, "a\tb", 'a"b', "a\\b", "a;b"])
def test_an_md5_key_the_renderer_refuses_never_validates(password: str) -> None:
    d = base()
    d["bgp"]["neighbors"][0]["md5_password"] = password
    with pytest.raises(ConfigError) as info:
        parse_agent_config(yaml.safe_dump(d), "case.yaml")
    assert any(str(i).startswith("bgp.neighbors[0].md5_password:") for i in info.value.issues)
    with pytest.raises(ValueError, match="md5_password"):
        _neighbor(password)


@pytest.mark.parametrize("password", ["x" * 80, "s3cret pass!", "s3cret!p#ss", "~{}[],"])
def test_an_md5_key_that_validates_renders_and_exabgp_parses_it(tmp_path: Any, exabgp_api: Any,
                                                                  password: str) -> None:
    from exabgp.configuration.configuration import Configuration

    d = base()
    d["bgp"]["neighbors"][0]["md5_password"] = password
    config = parse_agent_config(yaml.safe_dump(d), "case.yaml")
    assert config.neighbors[0].md5_password == password
    path = tmp_path / "exabgp.conf"
    path.write_text(render_exabgp_config([_neighbor(password)], "agent", ["/bin/true"]))
    parsed = Configuration([str(path)])
    assert parsed.reload() is True, parsed.error
    (neighbor,) = parsed.neighbors.values()
    assert neighbor["md5-password"] == password
    assert len(password.encode("ascii")) <= 80


@pytest.mark.parametrize("value", [
    "target:4200000000:5",  # a 4-byte AS: ExaBGP 5 would send it as an IPv4 address
    "target:65000:4294967296", "origin:192.0.2.1:65536", "target:65000", "rt:65000:1", "target:1.2.3:4",
    "target:65000:-1", "", 7, "target:６５０００:1",
])
def test_a_refused_extended_community_is_refused_by_the_validator(value: object) -> None:
    d = base()
    d["bgp"]["attributes"]["up"]["extended_communities"] = [value]
    with pytest.raises(ConfigError) as err:
        parse_agent_config(yaml.safe_dump(d), "case.yaml")
    assert "extended_communities" in str(err.value.summary())


def test_extended_communities_are_canonical_and_reach_exabgp_in_order(exabgp_api: Any) -> None:
    d = base()
    d["bgp"]["attributes"]["up"]["extended_communities"] = ["Origin:192.0.2.1:7", "target:65000:1",
                                                            "target:65000:1"]
    config = parse_agent_config(yaml.safe_dump(d), "case.yaml")
    attrs = config.vips[0].attributes.up
    assert attrs.extended_communities == ("origin:192.0.2.1:7", "target:65000:1")
    line = announce_line(config.vips[0].prefix, exabgp_attributes(attrs, config.local_as))
    assert line.endswith("extended-community [ origin:192.0.2.1:7 target:65000:1 ]")
    assert wire_extended(exabgp_parse(exabgp_api, line)) == {bytes.fromhex("0002fde800000001"),
                                                             bytes.fromhex("0103c00002010007")}
