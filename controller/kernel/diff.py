"""The kernel side of a POP agent, without the kernel: values, the pure diff, the boundary.

Theory of operation
-------------------
Reconcile by level, like the BGP side: every pass hands the *whole* desired set of VIP
host routes and loopback addresses to a ``Kernel`` (``sync_routes`` / ``sync_addresses``),
which reads what the kernel holds of ours, diffs it here (``plan_route_sync``,
``plan_routes``, ``plan_addresses``) and applies only the difference. A second pass with
the same set changes nothing. Everything in this module is a pure function of its
arguments; ``netlink.KernelAdapter`` does the reading and writing, through pyroute2.

What is "ours" is decided by marks the kernel stores (``KernelMarks``: our route protocol
number, in our table, at our metric), never by memory of past events: the agent may have
restarted. Errors are per item (``KernelOpError``): one failed change does not stop the
others, and ``KernelSyncError`` lists every failure once the rest is applied.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Final, Protocol

Prefix = IPv4Network | IPv6Network
NextHop = IPv4Address | IPv6Address
LoopbackAddress = IPv4Interface | IPv6Interface

RT_TABLE_MAIN = 254
DEFAULT_PROTOCOL = 99
# Below zebra's BGP routes (metric 20), so ours win on a box that also runs FRR, and
# away from the defaults (0 for IPv4, 1024 for IPv6) so a hand-made static route for the
# same VIP lives beside ours instead of colliding with it. Never 0: IPv6 turns 0 into
# 1024, and we would then never find our routes at the metric we asked for.
DEFAULT_METRIC = 10


# --- values -----------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelMarks:
    """What makes kernel state ours: routes with our protocol number in our table (at our
    metric), loopback addresses whose IFA_PROTO is that same number."""

    protocol: int = DEFAULT_PROTOCOL
    table: int = RT_TABLE_MAIN
    metric: int = DEFAULT_METRIC

    def __post_init__(self) -> None:
        # 0-4 are the kernel's own (unspec, redirect, kernel, boot, static) and 0 would
        # match every unmarked address: owning them would mean touching others' state.
        if not 5 <= self.protocol <= 255:
            raise ValueError(f"protocol {self.protocol}: must be 5-255")
        if not 1 <= self.table <= 0xFFFFFFFF:
            raise ValueError(f"table {self.table}: must be 1-4294967295")
        if not 1 <= self.metric <= 0xFFFFFFFF:
            raise ValueError(f"metric {self.metric}: must be 1-4294967295")


MAX_KERNEL_WEIGHT = 255  # a next hop's weight in a group (the kernel's nexthop_grp.weight + 1, 8 bits kept)


@dataclass(frozen=True)
class KernelRoute:
    """A route the agent wants (or has): `prefix` via `next_hop`, nothing more; or, with
    `group`, split across those next hops by weight (a resilient next-hop group: see
    netlink.py). Build a split one with ``multipath``: its form is canonical (next hops in
    address order, `next_hop` the first), so a route read back from the kernel equals it."""

    prefix: Prefix
    next_hop: NextHop
    group: tuple[tuple[NextHop, int], ...] = ()  # (next hop, weight 1-255), two or more; (): single path

    def __post_init__(self) -> None:
        for hop in (self.next_hop, *(h for h, _ in self.group)):
            if self.prefix.version != hop.version:
                raise ValueError(f"{self}: next hop is not IPv{self.prefix.version}")
            # A link-local next hop needs an outgoing interface, which we do not model.
            if hop.is_link_local:
                raise ValueError(f"{self}: link-local next hops are not supported")
        if self.group and (len(self.group) < 2 or any(not 1 <= w <= MAX_KERNEL_WEIGHT for _, w in self.group)):
            raise ValueError(f"{self}: a group needs two or more next hops with weights 1-{MAX_KERNEL_WEIGHT}")

    def __str__(self) -> str:
        if self.group:
            return f"{self.prefix} via {', '.join(f'{h}*{w}' for h, w in self.group)}"
        return f"{self.prefix} via {self.next_hop}"


def multipath(prefix: Prefix, hops: Iterable[tuple[NextHop, int]]) -> KernelRoute:
    """The route for ``prefix`` split across ``hops`` (next hop, weight > 0; any scale: the
    weights are scaled into the kernel's 1-255 keeping their ratios as closely as that
    allows, and a next hop listed twice gets the sum). One next hop: a plain route."""
    merged: dict[NextHop, int] = {}
    for hop, w in hops:
        if w > 0:
            merged[hop] = merged.get(hop, 0) + w
    if not merged:
        raise ValueError(f"{prefix}: no next hop with a weight above 0")
    ordered = sorted(merged.items(), key=lambda hw: (hw[0].version, int(hw[0])))
    if len(ordered) == 1:
        return KernelRoute(prefix, ordered[0][0])
    top = max(w for _, w in ordered)
    if top > MAX_KERNEL_WEIGHT:
        ordered = [(h, max(1, round(w * MAX_KERNEL_WEIGHT / top))) for h, w in ordered]
    return KernelRoute(prefix, ordered[0][0], tuple(ordered))


@dataclass(frozen=True)
class InstalledRoute:
    """A route of ours as the kernel holds it, at the metric it was installed with."""

    route: KernelRoute
    metric: int
    nhid: int = 0  # the next-hop group it forwards through (a split route), 0 for none


@dataclass(frozen=True)
class RouteReplace:
    """The route for `old.prefix` moves from `old.next_hop` to `new.next_hop`."""

    old: KernelRoute
    new: KernelRoute

    def __str__(self) -> str:
        return f"{self.new.prefix} via {self.old.next_hop} -> {self.new.next_hop}"


@dataclass(frozen=True)
class RouteDiff:
    """What a sync must do (from `plan_routes`) or did (from `sync_routes`)."""

    add: tuple[KernelRoute, ...] = ()
    replace: tuple[RouteReplace, ...] = ()
    remove: tuple[KernelRoute, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.replace or self.remove)

    def __str__(self) -> str:
        parts = [f"add {r}" for r in self.add]
        parts += [f"replace {r}" for r in self.replace]
        parts += [f"remove {r}" for r in self.remove]
        return "; ".join(parts) or "no change"

    def brief(self, limit: int = 5) -> str:
        """Counts and the first few changes: one bounded log line even for 2,000 VIPs."""
        return _brief(str(self).split("; "), f"+{len(self.add)} ~{len(self.replace)} "
                      f"-{len(self.remove)}", limit)


@dataclass(frozen=True)
class AddressDiff:
    """Loopback addresses to add and remove; `not_ours` are wanted but held by others."""

    add: tuple[LoopbackAddress, ...] = ()
    remove: tuple[LoopbackAddress, ...] = ()
    # Wanted addresses already on the interface without our mark: the kernel already
    # answers for them, and since we did not add them we must not claim or remove them.
    not_ours: tuple[LoopbackAddress, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)

    def __str__(self) -> str:
        parts = [f"add {a}" for a in self.add] + [f"remove {a}" for a in self.remove]
        return "; ".join(parts) or "no change"

    def brief(self, limit: int = 5) -> str:
        """Counts and the first few changes: one bounded log line."""
        return _brief(str(self).split("; "), f"+{len(self.add)} -{len(self.remove)}", limit)


def _brief(parts: list[str], counts: str, limit: int) -> str:
    more = f"; ... {len(parts) - limit} more" if len(parts) > limit else ""
    return f"{counts}: {'; '.join(parts[:limit])}{more}"


@dataclass(frozen=True)
class KernelOpError:
    """One netlink operation that failed: what, on which item, and the errno."""

    operation: str  # add | replace | remove
    item: str  # "198.51.100.10/32 via 10.0.0.2 (table 254)" or "198.51.100.10/32 on lo"
    errno: int
    message: str

    def __str__(self) -> str:
        name = errno_mod.errorcode.get(self.errno, f"errno {self.errno}")
        return f"{self.operation} {self.item}: {self.message} ({name})"


class KernelError(Exception):
    """The kernel side failed as a whole (no such interface, namespace, ...)."""


class KernelSyncError(KernelError):
    """Some changes failed; every other change in the same sync was applied."""

    def __init__(
        self, failures: tuple[KernelOpError, ...], applied: RouteDiff | AddressDiff
    ) -> None:
        self.failures = failures
        self.applied = applied
        listed = "; ".join(str(f) for f in failures)
        super().__init__(f"{len(failures)} kernel change(s) failed: {listed}")


# --- pure planning ----------------------------------------------------------------------
def _net_key(net: Prefix) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def _route_key(route: KernelRoute) -> tuple[int, int, int, int]:
    return (*_net_key(route.prefix), int(route.next_hop))


def _addr_key(addr: LoopbackAddress) -> tuple[int, int, int]:
    return (addr.version, int(addr.ip), addr.network.prefixlen)


def plan_routes(desired: Iterable[KernelRoute], actual: Iterable[KernelRoute]) -> RouteDiff:
    """Diff the routes we want with the routes of ours the kernel holds.

    A prefix whose next hop changed is a `replace` (one atomic kernel change, no gap in
    forwarding), not a remove plus an add. Raises ValueError if `desired` has two next
    hops for one prefix: we install single-path routes only.
    """
    want: dict[Prefix, KernelRoute] = {}
    for route in desired:
        seen = want.setdefault(route.prefix, route)
        if seen != route:
            raise ValueError(
                f"{route.prefix}: two next hops wanted ({seen.next_hop}, {route.next_hop})"
            )
    have: dict[Prefix, list[KernelRoute]] = {}
    for route in sorted(set(actual), key=_route_key):
        have.setdefault(route.prefix, []).append(route)

    add: list[KernelRoute] = []
    replace: list[RouteReplace] = []
    remove: list[KernelRoute] = []
    for prefix, route in want.items():
        current = have.pop(prefix, [])
        if route in current:
            # Extra routes of ours for the prefix (e.g. left by an `append`) go away.
            remove += [r for r in current if r != route]
        elif current:
            replace.append(RouteReplace(old=current[0], new=route))
            remove += current[1:]
        else:
            add.append(route)
    for leftovers in have.values():
        remove += leftovers
    return RouteDiff(
        add=tuple(sorted(add, key=_route_key)),
        replace=tuple(sorted(replace, key=lambda r: _route_key(r.new))),
        remove=tuple(sorted(remove, key=_route_key)),
    )


def plan_route_sync(
    desired: Iterable[KernelRoute], installed: Iterable[InstalledRoute], metric: int
) -> tuple[RouteDiff, tuple[InstalledRoute, ...]]:
    """The diff at our metric, and the routes of ours at another metric (the metric
    setting changed): those are stale, to be removed after the diff is applied, so that
    forwarding never has a gap. Stale routes keep the order the kernel listed them in."""
    ours = list(installed)
    current = {r.route for r in ours if r.metric == metric}
    stale = tuple(r for r in ours if r.metric != metric)
    return plan_routes(desired, current), stale


def plan_addresses(
    desired: Iterable[LoopbackAddress],
    actual: Iterable[LoopbackAddress],
    *,
    foreign: Iterable[LoopbackAddress] = (),
) -> AddressDiff:
    """Diff the loopback addresses we want with ours (`actual`) on the interface.

    `foreign` are the interface's other addresses. One of them with a wanted IP (at any
    prefix length: the kernel would refuse a second copy anyway) is left alone and
    reported in `not_ours`, never added, claimed or removed.
    """
    want, have = set(desired), set(actual)
    foreign_ips = {a.ip for a in foreign}
    not_ours = {a for a in want - have if a.ip in foreign_ips}
    return AddressDiff(
        add=tuple(sorted(want - have - not_ours, key=_addr_key)),
        remove=tuple(sorted(have - want, key=_addr_key)),
        not_ours=tuple(sorted(not_ours, key=_addr_key)),
    )


# Why an errno happened, in the operator's terms; the kernel's text alone is too terse.
ROUTE_HINTS: Final[dict[int, str]] = {
    errno_mod.ENETUNREACH: "no connected route to the next hop",
    errno_mod.EHOSTUNREACH: "no connected route to the next hop",
    errno_mod.EEXIST: "another route already holds this prefix at our metric; not ours, left alone",
}
# A delete that finds nothing leaves the kernel as we want it (someone removed it first).
GONE: Final = frozenset({errno_mod.ESRCH, errno_mod.ENOENT, errno_mod.EADDRNOTAVAIL})


def op_failure(operation: str, item: str, code: int) -> KernelOpError | None:
    """What a netlink error on one change means: None if the change is done all the same
    (a remove that finds nothing), else the failure with the errno's text and, for a
    route, a hint in the operator's terms."""
    if operation == "remove" and code in GONE:
        return None
    text = os.strerror(code)
    hint = ROUTE_HINTS.get(code) if item.startswith("route") else None
    return KernelOpError(operation, item, code, f"{text}: {hint}" if hint else text)


# --- the boundary the agent depends on ---------------------------------------------------
class Kernel(Protocol):
    """What the agent needs from the kernel; `netlink.KernelAdapter` is the real one."""

    def read_routes(self) -> set[KernelRoute]: ...

    def sync_routes(self, desired: Iterable[KernelRoute]) -> RouteDiff: ...

    def read_addresses(self) -> set[LoopbackAddress]: ...

    def sync_addresses(self, desired: Iterable[LoopbackAddress]) -> AddressDiff: ...

    def close(self) -> None: ...
