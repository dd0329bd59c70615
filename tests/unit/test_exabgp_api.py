"""ExaBGP 5 text protocol: exact command lines and parsing of real captured messages."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from controller.bgp.exabgp_api import (
    Ack,
    Batch,
    Event,
    Garbage,
    NeighborState,
    RouteAttributes,
    RouteChange,
    Shutdown,
    Unknown,
    Update,
    announce_batch_line,
    announce_line,
    batches,
    parse_line,
    withdraw_line,
)

GOLDEN = Path(__file__).parent / "golden"

V4 = ipaddress.ip_network("198.51.100.10/32")
V6 = ipaddress.ip_network("2001:db8::10/128")

# (prefix, attributes) -> the exact line ExaBGP 5.0.15 accepts. The lines with MED,
# prepend and communities were sent to real ExaBGP and checked in FRR's RIB
# (tests/integration/test_exabgp_real.py).
ANNOUNCE_CASES = [
    (V4, RouteAttributes(), "announce route 198.51.100.10/32 next-hop self"),
    (V4, RouteAttributes(med=0), "announce route 198.51.100.10/32 next-hop self med 0"),
    (V4, RouteAttributes(med=100), "announce route 198.51.100.10/32 next-hop self med 100"),
    (
        V4,
        RouteAttributes(med=4294967295),
        "announce route 198.51.100.10/32 next-hop self med 4294967295",
    ),
    (
        V4,
        RouteAttributes(as_path_prepend=0, local_as=65101),
        "announce route 198.51.100.10/32 next-hop self",
    ),
    (
        V4,
        RouteAttributes(as_path_prepend=1, local_as=65101),
        "announce route 198.51.100.10/32 next-hop self as-path [ 65101 65101 ]",
    ),
    (
        V4,
        RouteAttributes(as_path_prepend=3, local_as=4200000001),
        "announce route 198.51.100.10/32 next-hop self as-path [ 4200000001 4200000001 4200000001 4200000001 ]",
    ),
    (
        V4,
        RouteAttributes(communities=("65000:100",)),
        "announce route 198.51.100.10/32 next-hop self community [ 65000:100 ]",
    ),
    (
        V4,
        RouteAttributes(
            med=100,
            as_path_prepend=1,
            local_as=65101,
            communities=("65000:100", "65000:200"),
            large_communities=("65000:1:2",),
        ),
        "announce route 198.51.100.10/32 next-hop self med 100 as-path [ 65101 65101 ]"
        " community [ 65000:100 65000:200 ] large-community [ 65000:1:2 ]",
    ),
    (
        V4,
        RouteAttributes(next_hop="192.0.2.1", med=5),
        "announce route 198.51.100.10/32 next-hop 192.0.2.1 med 5",
    ),
    (V6, RouteAttributes(), "announce route 2001:db8::10/128 next-hop self"),
    (
        V6,
        RouteAttributes(med=50, as_path_prepend=3, local_as=65101, communities=("65000:300",)),
        "announce route 2001:db8::10/128 next-hop self med 50 as-path [ 65101 65101 65101 65101 ]"
        " community [ 65000:300 ]",
    ),
    (
        V6,
        RouteAttributes(next_hop="2001:db8:ffff::1"),
        "announce route 2001:db8::10/128 next-hop 2001:db8:ffff::1",
    ),
]


@pytest.mark.parametrize(("prefix", "attrs", "expected"), ANNOUNCE_CASES)
def test_announce_line(
    prefix: ipaddress.IPv4Network | ipaddress.IPv6Network, attrs: RouteAttributes, expected: str
) -> None:
    assert announce_line(prefix, attrs) == expected


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (V4, "withdraw route 198.51.100.10/32"),
        (V6, "withdraw route 2001:db8::10/128"),
        (ipaddress.ip_network("203.0.113.0/24"), "withdraw route 203.0.113.0/24"),
    ],
)
def test_withdraw_line_needs_no_next_hop(
    prefix: ipaddress.IPv4Network | ipaddress.IPv6Network, expected: str
) -> None:
    assert withdraw_line(prefix) == expected


def test_communities_are_sorted_and_deduplicated_like_exabgp_sends_them() -> None:
    # ExaBGP sorts communities on the wire (FRR showed 65000:100 before 65000:200 for
    # a command listing them the other way round), so these two are the same route.
    a = RouteAttributes(communities=("65000:200", "65000:100", "65000:200"), large_communities=("2:1:1", "1:9:9"))
    b = RouteAttributes(communities=("65000:100", "65000:200"), large_communities=("1:9:9", "2:1:1"))
    assert a == b
    assert a.communities == ("65000:100", "65000:200")
    # Numeric, not text order.
    assert RouteAttributes(communities=("65000:100", "9:1")).communities == ("9:1", "65000:100")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"med": -1}, "med"),
        ({"med": 4294967296}, "med"),
        ({"as_path_prepend": 1}, "local_as: needed"),
        ({"as_path_prepend": -1, "local_as": 65101}, "as_path_prepend"),
        ({"as_path_prepend": 255, "local_as": 65101}, "as_path_prepend"),
        ({"local_as": 0}, "local_as"),
        ({"communities": ("65000",)}, "communities"),
        ({"communities": ("65536:1",)}, "communities"),
        ({"communities": ("no-such-name",)}, "communities"),
            ({"communities": (65101,)}, "communities"),
        ({"communities": "65000:1"}, "communities"),
        ({"large_communities": ("1:2",)}, "large_communities"),
        ({"large_communities": ("4294967296:1:1",)}, "large_communities"),
        ({"extended_communities": ("target:4200000000:1",)}, "extended_communities"),
        ({"extended_communities": "target:65000:1"}, "extended_communities"),
        ({"next_hop": "router1"}, "next_hop"),
    ],
)
def test_invalid_attributes_are_refused_naming_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouteAttributes(**kwargs)  # type: ignore[arg-type]


def test_next_hop_of_the_other_family_is_refused() -> None:
    # ExaBGP would map it to ::ffff:192.0.2.1; FRR accepts that path but never
    # installs it in the kernel.
    with pytest.raises(ValueError, match="same family"):
        announce_line(V6, RouteAttributes(next_hop="192.0.2.1"))
    with pytest.raises(ValueError, match="same family"):
        announce_line(V4, RouteAttributes(next_hop="2001:db8::1"))


# --------------------------------------------------------------------------- parsing


def _summary(event: Event) -> str:
    """The one-line form used by the golden *.expected files."""
    if isinstance(event, Ack):
        return "ack done" if event.ok else "ack error"
    if isinstance(event, NeighborState):
        return " ".join(x for x in ("state", event.peer, event.local, event.state, event.reason) if x)
    if isinstance(event, Shutdown):
        return "shutdown"
    if isinstance(event, Update):
        return " ".join(["update", event.peer, *(f"+{p}" for p in event.announced), *(f"-{p}" for p in event.withdrawn)])
    return f"{type(event).__name__.lower()} {event!r}"


@pytest.mark.parametrize("capture", ["exabgp_stdin_capture", "exabgp_stdin_v4_session_with_ipv6"])
def test_real_exabgp_output_parses_as_recorded(capture: str) -> None:
    lines = (GOLDEN / f"{capture}.txt").read_text().splitlines()
    expected = (GOLDEN / f"{capture}.expected").read_text().splitlines()
    assert [_summary(parse_line(line)) for line in lines] == expected


def test_real_up_message() -> None:
    line = next(
        line
        for line in (GOLDEN / "exabgp_stdin_capture.txt").read_text().splitlines()
        if '"state": "up"' in line and '"peer": "100.64.1.1"' in line
    )
    assert parse_line(line) == NeighborState(peer="100.64.1.1", local="100.64.1.2", state="up")


def test_real_update_keeps_the_raw_line() -> None:
    line = next(
        line for line in (GOLDEN / "exabgp_stdin_capture.txt").read_text().splitlines() if '"type": "update"' in line
    )
    event = parse_line(line + "\n")
    assert isinstance(event, Update)
    assert event.raw == line


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("done", Ack(True)),
        ("error", Ack(False)),
        ("done\n", Ack(True)),
        ("  error \r\n", Ack(False)),
        # JSON acks exist in ExaBGP's source (Answer.json_done) though 5.0.15 never sends them.
        ('{ "answer": "done", "message": "command completed" }', Ack(True)),
        ('{ "answer": "error", "message": "this command does not support json output" }', Ack(False)),
        ('{ "exabgp": "5.0.0", "time": 1.0, "type": "notification", "notification": "shutdown" }', Shutdown()),
    ],
)
def test_acks_and_shutdown(line: str, expected: Event) -> None:
    assert parse_line(line) == expected


def test_end_of_rib_is_an_update_with_no_prefixes() -> None:
    # Shape from ExaBGP's EOR.json(): the message holds "eor" instead of "update".
    line = (
        '{ "exabgp": "5.0.0", "time": 1.0, "type": "update", "neighbor": { "address": { "local": "100.64.1.2",'
        ' "peer": "100.64.1.1" }, "asn": { "local": 65101, "peer": 65000 }, "direction": "receive",'
        ' "message": { "eor": { "afi" : "ipv4", "safi" : "unicast" } } } }'
    )
    event = parse_line(line)
    assert isinstance(event, Update)
    assert (event.peer, event.announced, event.withdrawn) == ("100.64.1.1", (), ())


def test_bgp_notification_from_a_peer_is_not_a_shutdown() -> None:
    # Same "type" as ExaBGP's own shutdown, but the notification is inside "neighbor".
    line = (
        '{ "exabgp": "5.0.0", "time": 1.0, "type": "notification", "neighbor": { "address": { "local": "100.64.1.2",'
        ' "peer": "100.64.1.1" }, "asn": { "local": 65101, "peer": 65000 }, "direction": "receive",'
        ' "notification": { "code": 6, "subcode": 4, "data": "", "message": "" } } }'
    )
    assert parse_line(line) == Unknown(type="notification", raw=line)


def test_other_message_types_are_unknown() -> None:
    line = '{ "exabgp": "5.0.0", "type": "keepalive", "neighbor": {} }'
    assert parse_line(line) == Unknown(type="keepalive", raw=line)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Done", "not JSON"),
        ("hello world", "not JSON"),
        ('{"type": "state"', "not JSON"),
        ("[1, 2]", "not an object"),
        ("42", "not an object"),
        ('{"type": "state"}', "malformed 'state'"),
        ('{"type": "state", "neighbor": {"address": {"peer": "1.1.1.1"}}}', "malformed 'state'"),
        ('{"type": "state", "neighbor": {"address": {"peer": 1, "local": "x"}, "state": "up"}}', "malformed"),
        ('{"type": "update", "neighbor": {"address": {"peer": "1.1.1.1"}, "message": "x"}}', "malformed 'update'"),
        ('{"type": "update", "neighbor": {"address": {"peer": "1.1.1.1"}, "message": {"update": {"announce": 3}}}}', "malformed"),
        ("\x00\xff garbage", "not JSON"),
    ],
)
def test_garbage_never_raises(line: str, error: str) -> None:
    event = parse_line(line)
    assert isinstance(event, Garbage)
    assert event.raw == line
    assert error in event.error


# --------------------------------------------------------------------------- batches
def _v4(i: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"198.51.100.{i}/32")  # type: ignore[return-value]


UP_ATTRS = RouteAttributes(med=100, communities=("65101:100",))


def test_alike_changes_share_one_command_in_order_of_first_change() -> None:
    changes = [RouteChange(_v4(1), UP_ATTRS), RouteChange(_v4(2), None), RouteChange(_v4(3), UP_ATTRS),
               RouteChange(_v4(4), None), RouteChange(V6, UP_ATTRS)]
    assert batches(changes) == [
        Batch("announce attributes next-hop self med 100 community [ 65101:100 ] nlri 198.51.100.1/32 198.51.100.3/32",
              (0, 2)),
        Batch("withdraw attributes next-hop self nlri 198.51.100.2/32 198.51.100.4/32", (1, 3)),
        # A lone change is the plain command, exactly as before batching.
        Batch("announce route 2001:db8::10/128 next-hop self med 100 community [ 65101:100 ]", (4,)),
    ]


def test_batches_split_by_attributes_neighbours_and_size() -> None:
    other = RouteAttributes(med=200)
    changes = [RouteChange(_v4(i), UP_ATTRS) for i in range(1, 6)] + [
        RouteChange(_v4(6), other), RouteChange(_v4(7), UP_ATTRS, ("100.64.1.1",))]
    out = batches(changes, max_routes=2)
    assert [b.members for b in out] == [(0, 1), (2, 3), (4,), (5,), (6,)]
    assert out[-1].line == "neighbor 100.64.1.1 announce route 198.51.100.7/32 next-hop self med 100 community [ 65101:100 ]"
    assert sorted(m for b in out for m in b.members) == list(range(len(changes)))


def test_a_batch_line_refuses_mixed_families_and_a_foreign_next_hop() -> None:
    with pytest.raises(ValueError, match="one family"):
        announce_batch_line([V4, V6], RouteAttributes())
    with pytest.raises(ValueError, match="same family"):
        announce_batch_line([V6, V6], RouteAttributes(next_hop="192.0.2.1"))
    with pytest.raises(ValueError, match="at least 1"):
        batches([RouteChange(V4, None)], max_routes=0)


@pytest.mark.parametrize("line", ["[" * 100_000 + "]" * 100_000, '{"type": "update", "x": ' + "9" * 5000 + "}"])
def test_a_hostile_line_is_garbage_not_an_exception(line: str) -> None:
    """parse_line never raises: a 100,000-level line used to end the agent without its withdrawal."""
    event = parse_line(line)
    assert isinstance(event, Garbage) and event.error.startswith("not JSON")
