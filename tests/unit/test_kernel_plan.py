"""The pure planning of kernel routes and loopback addresses (no kernel involved)."""

from __future__ import annotations

import errno
import os
from ipaddress import ip_address, ip_interface, ip_network

import pytest

from controller.kernel.diff import (
    AddressDiff,
    InstalledRoute,
    KernelMarks,
    KernelOpError,
    KernelRoute,
    RouteDiff,
    RouteReplace,
    op_failure,
    plan_addresses,
    plan_route_sync,
    plan_routes,
)


def route(prefix: str, next_hop: str) -> KernelRoute:
    return KernelRoute(ip_network(prefix), ip_address(next_hop))


VIP_A = "198.51.100.10/32"
VIP_B = "198.51.100.11/32"
VIP6 = "2001:db8:ff::10/128"


# --- routes -------------------------------------------------------------------------------
def test_new_vips_are_added() -> None:
    diff = plan_routes([route(VIP_A, "10.0.0.2"), route(VIP6, "2001:db8:1::2")], [])
    assert diff == RouteDiff(add=(route(VIP_A, "10.0.0.2"), route(VIP6, "2001:db8:1::2")))


def test_same_routes_plan_nothing() -> None:
    routes = {route(VIP_A, "10.0.0.2"), route(VIP6, "2001:db8:1::2")}
    diff = plan_routes(routes, set(routes))
    assert diff == RouteDiff()
    assert not diff
    assert str(diff) == "no change"


def test_next_hop_change_is_one_replace_not_remove_and_add() -> None:
    # A replace is one atomic kernel change: traffic never sees the VIP without a route.
    diff = plan_routes([route(VIP_A, "10.0.1.2")], [route(VIP_A, "10.0.0.2")])
    assert diff == RouteDiff(
        replace=(RouteReplace(old=route(VIP_A, "10.0.0.2"), new=route(VIP_A, "10.0.1.2")),)
    )
    assert str(diff) == "replace 198.51.100.10/32 via 10.0.0.2 -> 10.0.1.2"


def test_routes_no_longer_wanted_are_removed() -> None:
    actual = [route(VIP_A, "10.0.0.2"), route(VIP_B, "10.0.0.2")]
    diff = plan_routes([route(VIP_A, "10.0.0.2")], actual)
    assert diff == RouteDiff(remove=(route(VIP_B, "10.0.0.2"),))


def test_empty_desired_set_removes_every_route_of_ours() -> None:
    actual = [route(VIP6, "2001:db8:1::2"), route(VIP_A, "10.0.0.2")]
    diff = plan_routes([], actual)
    # IPv4 before IPv6, in address order: logs and kernel changes come in a stable order.
    assert diff.remove == (route(VIP_A, "10.0.0.2"), route(VIP6, "2001:db8:1::2"))
    assert not diff.add and not diff.replace


def test_two_of_our_routes_for_one_prefix_leave_only_the_wanted_one() -> None:
    # Possible after someone ran `ip route append ... proto 99`: we own both, keep one.
    actual = [route(VIP_A, "10.0.0.2"), route(VIP_A, "10.0.1.2")]
    kept = plan_routes([route(VIP_A, "10.0.1.2")], actual)
    assert kept == RouteDiff(remove=(route(VIP_A, "10.0.0.2"),))
    moved = plan_routes([route(VIP_A, "10.0.2.2")], actual)
    assert moved.replace == (RouteReplace(route(VIP_A, "10.0.0.2"), route(VIP_A, "10.0.2.2")),)
    assert moved.remove == (route(VIP_A, "10.0.1.2"),)


def test_two_next_hops_wanted_for_one_prefix_is_refused_naming_the_prefix() -> None:
    with pytest.raises(ValueError, match=r"198\.51\.100\.10/32: two next hops"):
        plan_routes([route(VIP_A, "10.0.0.2"), route(VIP_A, "10.0.1.2")], [])


def test_the_same_route_wanted_twice_is_one_route() -> None:
    twice = [route(VIP_A, "10.0.0.2")] * 2
    assert plan_routes(twice, []) == RouteDiff(add=(route(VIP_A, "10.0.0.2"),))


def test_a_route_needs_a_next_hop_of_its_own_family() -> None:
    with pytest.raises(ValueError, match="not IPv4"):
        route(VIP_A, "2001:db8:1::2")


def test_a_link_local_next_hop_is_refused() -> None:
    # It would need an outgoing interface, which a KernelRoute does not carry.
    with pytest.raises(ValueError, match="link-local"):
        route(VIP6, "fe80::1")


def test_diff_reads_as_a_log_line() -> None:
    diff = plan_routes([route(VIP_A, "10.0.0.2")], [route(VIP_B, "10.0.0.2")])
    assert str(diff) == "add 198.51.100.10/32 via 10.0.0.2; remove 198.51.100.11/32 via 10.0.0.2"


def test_a_big_diff_logs_as_one_bounded_line() -> None:
    many = [route(f"198.51.100.{i}/32", "10.0.0.2") for i in range(200)]
    brief = plan_routes(many, [route(VIP6, "2001:db8:1::2")]).brief(limit=2)
    assert brief == (
        "+200 ~0 -1: add 198.51.100.0/32 via 10.0.0.2; add 198.51.100.1/32 via 10.0.0.2;"
        " ... 199 more"
    )


# --- loopback addresses ---------------------------------------------------------------------
A = ip_interface("198.51.100.10/32")
B = ip_interface("198.51.100.11/32")
A6 = ip_interface("2001:db8:ff::10/128")


def test_addresses_are_added_and_removed_to_match() -> None:
    diff = plan_addresses({A, A6}, {A, B})
    assert diff == AddressDiff(add=(A6,), remove=(B,))


def test_same_addresses_plan_nothing() -> None:
    assert not plan_addresses({A, A6}, {A, A6})


def test_a_wanted_address_someone_else_put_there_is_left_alone() -> None:
    # The VIP answers already; we neither add a copy nor claim it (so we never remove it).
    diff = plan_addresses({A, B}, set(), foreign={A, ip_interface("127.0.0.1/8")})
    assert diff == AddressDiff(add=(B,), not_ours=(A,))
    assert plan_addresses(set(), set(), foreign={A}) == AddressDiff()


def test_a_foreign_address_with_the_wanted_ip_at_another_length_blocks_ours() -> None:
    # The kernel refuses a second copy of an IPv6 address at another prefix length.
    other = ip_interface("2001:db8:ff::10/64")
    assert plan_addresses({A6}, set(), foreign={other}) == AddressDiff(not_ours=(A6,))


def test_our_address_at_a_new_prefix_length_is_swapped() -> None:
    old = ip_interface("198.51.100.10/24")
    assert plan_addresses({A}, {old}) == AddressDiff(add=(A,), remove=(old,))


# --- a changed metric setting ----------------------------------------------------------------
def test_routes_of_ours_at_another_metric_are_stale_and_go_after_the_diff() -> None:
    # The metric setting moved from 30 to 10: the new routes are added (no gap), and the
    # old ones are handed back as stale, in the kernel's order, to remove afterwards.
    installed = [InstalledRoute(route(VIP_B, "10.0.0.2"), 30), InstalledRoute(route(VIP_A, "10.0.0.2"), 30),
                 InstalledRoute(route(VIP6, "2001:db8:1::2"), 10)]
    diff, stale = plan_route_sync([route(VIP_A, "10.0.0.2"), route(VIP6, "2001:db8:1::2")], installed, 10)
    assert diff == RouteDiff(add=(route(VIP_A, "10.0.0.2"),))
    assert stale == (installed[0], installed[1])


def test_at_one_metric_the_sync_plan_is_the_plain_diff() -> None:
    installed = [InstalledRoute(route(VIP_A, "10.0.0.2"), 10), InstalledRoute(route(VIP_B, "10.0.0.2"), 10)]
    desired = [route(VIP_A, "10.0.1.2")]
    assert plan_route_sync(desired, installed, 10) == (
        plan_routes(desired, [r.route for r in installed]), ())


# --- what a netlink error on one change means -----------------------------------------------
ROUTE_ITEM = "route 198.51.100.10/32 via 10.0.0.2 (table 254, metric 10)"


@pytest.mark.parametrize("code", [errno.ESRCH, errno.ENOENT, errno.EADDRNOTAVAIL])
def test_a_remove_that_finds_nothing_is_done(code: int) -> None:
    assert op_failure("remove", ROUTE_ITEM, code) is None
    assert op_failure("remove", "address 198.51.100.10/32 on lo", code) is None


def test_an_add_that_finds_nothing_is_a_failure() -> None:
    assert op_failure("add", ROUTE_ITEM, errno.ENOENT) == KernelOpError(
        "add", ROUTE_ITEM, errno.ENOENT, os.strerror(errno.ENOENT))


@pytest.mark.parametrize("code, hint", [
    (errno.ENETUNREACH, "no connected route to the next hop"),
    (errno.EHOSTUNREACH, "no connected route to the next hop"),
    (errno.EEXIST, "another route already holds this prefix at our metric; not ours, left alone"),
])
def test_a_route_failure_says_why_in_the_operators_terms(code: int, hint: str) -> None:
    failure = op_failure("add", ROUTE_ITEM, code)
    assert failure == KernelOpError("add", ROUTE_ITEM, code, f"{os.strerror(code)}: {hint}")
    assert str(failure).endswith(f"({errno.errorcode[code]})")


def test_an_address_failure_has_the_kernels_text_only() -> None:
    item = "address 198.51.100.10/32 on lo"
    assert op_failure("add", item, errno.EEXIST) == KernelOpError("add", item, errno.EEXIST, os.strerror(errno.EEXIST))


# --- marks the adapter refuses before touching anything --------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": 0}, "protocol 0: must be 5-255"),
        ({"protocol": 4}, "protocol 4: must be 5-255"),
        ({"protocol": 256}, "protocol 256: must be 5-255"),
        ({"table": 0}, "table 0"),
        ({"metric": 0}, "metric 0"),
    ],
)
def test_marks_that_would_claim_others_state_are_refused(
    kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        KernelMarks(**kwargs)


def test_the_default_marks() -> None:
    assert KernelMarks() == KernelMarks(protocol=99, table=254, metric=10)


def test_the_adapter_checks_its_marks_before_opening_anything() -> None:
    from controller.kernel.netlink import KernelAdapter

    with pytest.raises(ValueError, match="protocol 4: must be 5-255"):
        KernelAdapter(protocol=4)  # raises before any thread, loop or netlink socket exists
