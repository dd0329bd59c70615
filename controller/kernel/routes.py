"""The kernel side of a POP agent: VIP host routes and loopback addresses, over netlink.

Theory of operation
-------------------
Reconcile by level, like the BGP side: every pass hands the *whole* desired set to
`KernelAdapter.sync_routes` / `sync_addresses`, which read what the kernel holds, diff it
with a pure function (`plan_routes`, `plan_addresses`) and apply only the difference. A
second pass with the same set changes nothing.

Ownership is decided by marks the kernel stores for us, never by memory of past events
(the agent may have restarted):
  * a route is ours when its protocol is our number (default 99) and it is in our table;
  * a loopback address is ours when its IFA_PROTO is that same number (Linux >= 6.3; the
    kernel keeps it for IPv4 and IPv6 alike, which an IPv4 label like `lo:anycast` could
    not do). Nothing else is ever changed or removed, even for the same prefix.

Routes are installed at one fixed metric (default 10). The kernel identifies a route by
(table, prefix, tos, metric) and not by protocol, so a `replace` aimed at a slot held by
someone else's route would silently take it over: we therefore `add` with NLM_F_EXCL
(a foreign route in our slot makes the add fail, loudly) and `replace` only a slot where
we have just read our own route. Deletes name our protocol, next hop and metric, which
the kernel matches on for IPv4 and IPv6 alike.

Errors are per item: a next hop without a connected route (ENETUNREACH) or a foreign
route in our slot (EEXIST) fails that one route, the rest are still applied, and then
`KernelSyncError` lists every failure with the route, the errno name and its text.

pyroute2 0.9's synchronous `IPRoute` runs its own asyncio loop and so raises if it is
called from a thread where a loop is running (as in the agent). The adapter therefore
owns one worker thread with a private event loop and drives pyroute2's `AsyncIPRoute`
there: its methods are plain blocking calls, safe from any thread, and from the agent's
loop either directly or via `await asyncio.to_thread(kernel.sync_routes, desired)`.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

Prefix = IPv4Network | IPv6Network
NextHop = IPv4Address | IPv6Address
LoopbackAddress = IPv4Interface | IPv6Interface

RT_TABLE_MAIN = 254
RTN_UNICAST = 1
DEFAULT_PROTOCOL = 99
# Below zebra's BGP routes (metric 20), so ours win on a box that also runs FRR, and
# away from the defaults (0 for IPv4, 1024 for IPv6) so a hand-made static route for the
# same VIP lives beside ours instead of colliding with it. Never 0: IPv6 turns 0 into
# 1024, and we would then never find our routes at the metric we asked for.
DEFAULT_METRIC = 10


# --- values -----------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelRoute:
    """A route the agent wants (or has): `prefix` via `next_hop`, nothing more."""

    prefix: Prefix
    next_hop: NextHop

    def __post_init__(self) -> None:
        if self.prefix.version != self.next_hop.version:
            raise ValueError(f"{self}: next hop is not IPv{self.prefix.version}")
        # A link-local next hop needs an outgoing interface, which we do not model.
        if self.next_hop.is_link_local:
            raise ValueError(f"{self}: link-local next hops are not supported")

    def __str__(self) -> str:
        return f"{self.prefix} via {self.next_hop}"


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


# --- the boundary the agent depends on ---------------------------------------------------
class Kernel(Protocol):
    """What the agent needs from the kernel; `KernelAdapter` is the real one."""

    def read_routes(self) -> set[KernelRoute]: ...

    def sync_routes(self, desired: Iterable[KernelRoute]) -> RouteDiff: ...

    def read_addresses(self) -> set[LoopbackAddress]: ...

    def sync_addresses(self, desired: Iterable[LoopbackAddress]) -> AddressDiff: ...

    def close(self) -> None: ...


# --- the netlink adapter ----------------------------------------------------------------
# Why an errno happened, in the operator's terms; the kernel's text alone is too terse.
_ROUTE_HINTS = {
    errno_mod.ENETUNREACH: "no connected route to the next hop",
    errno_mod.EHOSTUNREACH: "no connected route to the next hop",
    errno_mod.EEXIST: "another route already holds this prefix at our metric; not ours, left alone",
}
# A delete that finds nothing leaves the kernel as we want it (someone removed it first).
_GONE = frozenset({errno_mod.ESRCH, errno_mod.ENOENT, errno_mod.EADDRNOTAVAIL})

T = TypeVar("T")


@dataclass(frozen=True)
class _OurRoute:
    route: KernelRoute
    metric: int


@dataclass
class _Applied:
    """Collects what succeeded and what failed while a diff is applied."""

    done: list[Any] = field(default_factory=list)
    failures: list[KernelOpError] = field(default_factory=list)


class KernelAdapter:
    """Keeps our VIP routes and loopback addresses right, through pyroute2.

    `netns` names a network namespace (lab and tests); None is the agent's own.
    Every method blocks its caller for the netlink round trips (about a millisecond).
    """

    def __init__(
        self,
        *,
        protocol: int = DEFAULT_PROTOCOL,
        table: int = RT_TABLE_MAIN,
        loopback: str = "lo",
        netns: str | None = None,
        metric: int = DEFAULT_METRIC,
    ) -> None:
        # 0-4 are the kernel's own (unspec, redirect, kernel, boot, static) and 0 would
        # match every unmarked address: owning them would mean touching others' state.
        if not 5 <= protocol <= 255:
            raise ValueError(f"protocol {protocol}: must be 5-255")
        if not 1 <= table <= 0xFFFFFFFF:
            raise ValueError(f"table {table}: must be 1-4294967295")
        if not 1 <= metric <= 0xFFFFFFFF:
            raise ValueError(f"metric {metric}: must be 1-4294967295")
        self.protocol, self.table, self.metric = protocol, table, metric
        self.loopback, self.netns = loopback, netns
        # One thread with its own event loop does all netlink work (see the module doc).
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._loop = self._thread.submit(asyncio.new_event_loop).result()
        self._ipr: Any = None
        try:
            self._ipr = self._run(self._open)
        except BaseException:
            self._shutdown()
            raise

    async def _open(self) -> Any:
        from pyroute2 import AsyncIPRoute  # type: ignore[import-untyped]

        # strict_check lets the kernel filter route dumps by table and protocol: without
        # it every pass would parse the whole table in Python (100k BGP routes: 6-11 s).
        # flags=0: never create the namespace (pyroute2's default would); a typo must fail.
        kwargs: dict[str, Any] = {"strict_check": True}
        if self.netns is not None:
            kwargs.update(netns=self.netns, flags=0)
        try:
            ipr = AsyncIPRoute(**kwargs)
            await ipr.setup_endpoint()
        except FileNotFoundError as exc:
            raise KernelError(f"network namespace {self.netns!r} does not exist") from exc
        return ipr

    def _run(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return self._thread.submit(lambda: self._loop.run_until_complete(fn())).result()

    def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self._ipr is None:
            raise KernelError("the kernel adapter is closed")
        return self._run(fn)

    def close(self) -> None:
        """Close the netlink socket; the kernel state we set stays as it is."""
        if self._ipr is not None:
            self._thread.submit(self._ipr.close).result()
            self._ipr = None
        self._shutdown()

    def _shutdown(self) -> None:
        if not self._loop.is_closed():
            self._thread.submit(self._loop.close).result()
        self._thread.shutdown(wait=True)

    def __enter__(self) -> KernelAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- routes --------------------------------------------------------------------------
    def read_routes(self) -> set[KernelRoute]:
        """Every route of ours: our protocol, in our table (at any metric)."""
        return {r.route for r in self._call(self._read_ours)}

    def sync_routes(self, desired: Iterable[KernelRoute]) -> RouteDiff:
        """Make our routes exactly `desired`; return what changed.

        Raises KernelSyncError after applying everything else if some changes failed.
        """
        wanted = tuple(desired)
        return self._call(lambda: self._sync_routes(wanted))

    async def _sync_routes(self, desired: tuple[KernelRoute, ...]) -> RouteDiff:
        ours = await self._read_ours()
        # Routes of ours at another metric (the metric setting changed) are stale: they
        # are removed after the new ones are in, so forwarding never has a gap.
        current = {r.route for r in ours if r.metric == self.metric}
        stale = [r for r in ours if r.metric != self.metric]
        plan = plan_routes(desired, current)

        added, replaced, removed = _Applied(), _Applied(), _Applied()
        for route in plan.add:
            await self._try(added, "add", route, self._route_item(route),
                            self._route_op("add", route, self.metric))
        for rep in plan.replace:
            # NLM_F_REPLACE rewrites whatever holds the slot, whoever made it: safe only
            # because we just read our own route there. One atomic change: no gap.
            await self._try(replaced, "replace", rep, self._route_item(rep.new),
                            self._route_op("replace", rep.new, self.metric))
        for route in plan.remove:
            await self._try(removed, "remove", route, self._route_item(route),
                            self._route_op("del", route, self.metric))
        for old in stale:
            await self._try(removed, "remove", old.route, self._route_item(old.route, old.metric),
                            self._route_op("del", old.route, old.metric))

        applied = RouteDiff(
            add=tuple(added.done), replace=tuple(replaced.done), remove=tuple(removed.done)
        )
        failures = added.failures + replaced.failures + removed.failures
        if applied:
            log.info("kernel routes %s", applied.brief())
        if failures:
            raise KernelSyncError(tuple(failures), applied)
        return applied

    def _route_item(self, route: KernelRoute, metric: int | None = None) -> str:
        shown = self.metric if metric is None else metric
        return f"route {route} (table {self.table}, metric {shown})"

    async def _read_ours(self) -> list[_OurRoute]:
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST  # type: ignore[import-untyped]
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
        from pyroute2.netlink.rtnl import RTM_GETROUTE  # type: ignore[import-untyped]
        from pyroute2.netlink.rtnl.rtmsg import rtmsg  # type: ignore[import-untyped]

        out: list[_OurRoute] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            # pyroute2's route("dump", ...) filters in Python only; this request has the
            # kernel skip every route not in our table with our protocol.
            request = rtmsg()
            request["family"] = family
            request["proto"] = self.protocol
            request["attrs"] = [("RTA_TABLE", self.table)]
            try:
                flags = NLM_F_REQUEST | NLM_F_DUMP
                dump = await self._ipr.nlm_request(request, RTM_GETROUTE, flags)
                messages = [msg async for msg in dump]
            except NetlinkError as exc:
                if exc.code == errno_mod.ENOENT:  # the table does not exist (yet)
                    continue
                raise KernelError(f"cannot read routes (table {self.table}): {exc}") from exc
            for msg in messages:
                # Checked again here: the kernel's filter is a speed-up, not our authority.
                if msg["proto"] != self.protocol or msg["type"] != RTN_UNICAST:
                    continue
                # Tables above 255 only fit the RTA_TABLE attribute, not the header field.
                if (msg.get_attr("RTA_TABLE") or msg["table"]) != self.table:
                    continue
                gateway = msg.get_attr("RTA_GATEWAY")
                dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                if gateway is None:
                    # Multipath or device routes with our number were not made by us
                    # (we only install single next hops): not ours to judge.
                    log.warning("ignoring route %s/%s with protocol %d but no single gateway",
                                dst, msg["dst_len"], self.protocol)
                    continue
                try:
                    route = KernelRoute(ip_network(f"{dst}/{msg['dst_len']}"), ip_address(gateway))
                except ValueError as exc:  # e.g. a link-local gateway: someone else's work
                    log.warning("ignoring route with protocol %d: %s", self.protocol, exc)
                    continue
                out.append(_OurRoute(route, msg.get_attr("RTA_PRIORITY") or 0))
        return out

    def _route_op(
        self, command: str, route: KernelRoute, metric: int
    ) -> Callable[[], Awaitable[object]]:
        spec: dict[str, Any] = {
            "dst": str(route.prefix),
            "gateway": str(route.next_hop),
            "family": socket.AF_INET if route.prefix.version == 4 else socket.AF_INET6,
            "table": self.table,
            # On a delete, protocol, next hop and metric make the kernel match only ours.
            "proto": self.protocol,
            "priority": metric,
        }
        if command != "del":
            spec["type"] = "unicast"
        # "add" is NLM_F_CREATE|NLM_F_EXCL: it fails on a foreign route in our slot.
        return lambda: self._ipr.route(command, **spec)

    # -- loopback addresses ---------------------------------------------------------------
    def read_addresses(self) -> set[LoopbackAddress]:
        """The addresses on the loopback interface that carry our protocol mark."""
        async def ours() -> set[LoopbackAddress]:
            return (await self._read_addresses())[0]

        return self._call(ours)

    def sync_addresses(self, desired: Iterable[LoopbackAddress]) -> AddressDiff:
        """Make our loopback addresses exactly `desired`; never touch others' addresses.

        Raises KernelSyncError after applying everything else if some changes failed.
        """
        wanted = tuple(desired)
        return self._call(lambda: self._sync_addresses(wanted))

    async def _sync_addresses(self, desired: tuple[LoopbackAddress, ...]) -> AddressDiff:
        ours, foreign, index = await self._read_addresses()
        plan = plan_addresses(desired, ours, foreign=foreign)
        for addr in plan.not_ours:
            log.warning("%s is already on %s but not ours (no protocol %d mark): leaving it",
                        addr, self.loopback, self.protocol)
        added, removed = _Applied(), _Applied()
        # Removes first: IPv6 refuses a second copy of an address at another prefix length.
        for addr in plan.remove:
            await self._try(removed, "remove", addr, f"address {addr} on {self.loopback}",
                            self._addr_op("del", index, addr))
        for addr in plan.add:
            await self._try(added, "add", addr, f"address {addr} on {self.loopback}",
                            self._addr_op("add", index, addr))
        if added.done:
            # A kernel older than 6.3 accepts IFA_PROTO and drops it: we could then never
            # remove the address again, so say so now instead of leaking it silently.
            marked = (await self._read_addresses())[0]
            for addr in [a for a in added.done if a not in marked]:
                added.done.remove(addr)
                added.failures.append(KernelOpError(
                    "add", f"address {addr} on {self.loopback}", errno_mod.EOPNOTSUPP,
                    "the kernel did not keep our protocol mark (IFA_PROTO needs Linux >= 6.3)"))
        applied = AddressDiff(
            add=tuple(added.done), remove=tuple(removed.done), not_ours=plan.not_ours
        )
        if applied:
            log.info("loopback addresses %s", applied.brief())
        failures = removed.failures + added.failures
        if failures:
            raise KernelSyncError(tuple(failures), applied)
        return applied

    async def _read_addresses(self) -> tuple[set[LoopbackAddress], set[LoopbackAddress], int]:
        found = await self._ipr.link_lookup(ifname=self.loopback)
        if not found:
            where = f" in namespace {self.netns!r}" if self.netns else ""
            raise KernelError(f"interface {self.loopback!r} not found{where}")
        index: int = found[0]
        ours: set[LoopbackAddress] = set()
        foreign: set[LoopbackAddress] = set()
        async for msg in await self._ipr.addr("dump", index=index):
            # IFA_LOCAL is the interface's own address for IPv4; IPv6 only has IFA_ADDRESS.
            ip = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            addr = ip_interface(f"{ip}/{msg['prefixlen']}")
            (ours if msg.get_attr("IFA_PROTO") == self.protocol else foreign).add(addr)
        return ours, foreign, index

    def _addr_op(
        self, command: str, index: int, addr: LoopbackAddress
    ) -> Callable[[], Awaitable[object]]:
        spec: dict[str, Any] = {
            "index": index,
            "address": str(addr.ip),
            "prefixlen": addr.network.prefixlen,
            "family": socket.AF_INET if addr.version == 4 else socket.AF_INET6,
        }
        if command == "add":
            spec["proto"] = self.protocol
        return lambda: self._ipr.addr(command, **spec)

    # -- shared --------------------------------------------------------------------------
    async def _try(
        self, into: _Applied, operation: str, value: object, item: str,
        op: Callable[[], Awaitable[object]],
    ) -> None:
        """Run one change; record it as done, or record its netlink error and go on."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            await op()
        except NetlinkError as exc:
            if operation == "remove" and exc.code in _GONE:
                into.done.append(value)
                return
            text = os.strerror(exc.code)
            hint = _ROUTE_HINTS.get(exc.code) if item.startswith("route") else None
            into.failures.append(
                KernelOpError(operation, item, exc.code, f"{text}: {hint}" if hint else text)
            )
        else:
            into.done.append(value)
