"""The netlink adapter of the kernel side: VIP host routes and loopback addresses, via pyroute2.

Theory of operation
-------------------
``KernelAdapter`` is the real ``diff.Kernel``: each sync reads what the kernel holds of
ours, diffs it with the pure functions of ``diff`` and applies only the difference, one
netlink change at a time. This module holds only the I/O and what the kernel really does.

Ownership is decided by marks the kernel stores for us (``diff.KernelMarks``):
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

A split route (``KernelRoute.group``: traffic steering's weighted origins) is a resilient
next-hop group (``nexthop.py``): one next-hop object per next hop, one group per prefix,
all with our protocol number. A weight change or a next hop leaving replaces the group's
members *in place*, so only the flows that must move do; next-hop objects no route of ours
uses any more are deleted after each such sync. A prefix that has a group keeps it when it
goes down to a single path (a region dialed to 0 or failing): the group then holds that
next hop and its shadow, which owns no bucket (``nexthop.single_path_members``), and reads
back as the plain route it forwards like. So the region's return replaces members in place
again and only idle buckets move to it: a new group would hash every flow afresh and reset
about a quarter of the connections opened in the meantime (17 of 64 measured). The group
goes only with the route. (A route through a group is matched on delete without a gateway:
the kernel matches none against it, ESRCH.) A kernel without next-hop groups (before
5.3) or without resilient ones (before 5.13) refuses the group: the adapter then says so
once, loudly, and installs every split route as a plain route toward its first next hop
(``split_fallback`` says why; the agent exports it), which is what agents did before weights.

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
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface, ip_network
from typing import Any, TypeVar

from . import nexthop
from .diff import (
    DEFAULT_METRIC,
    DEFAULT_PROTOCOL,
    RT_TABLE_MAIN,
    AddressDiff,
    InstalledRoute,
    KernelError,
    KernelMarks,
    KernelOpError,
    KernelRoute,
    KernelSyncError,
    LoopbackAddress,
    RouteDiff,
    GONE as GONE_CODES,
    multipath,
    op_failure,
    plan_addresses,
    plan_route_sync,
)

log = logging.getLogger(__name__)

RTN_UNICAST = 1
T = TypeVar("T")


@dataclass
class _Applied:
    """Collects what succeeded and what failed while a diff is applied."""

    done: list[Any] = field(default_factory=list)
    failures: list[KernelOpError] = field(default_factory=list)


class KernelAdapter:
    """Keeps our VIP routes and loopback addresses right, through pyroute2 (a ``diff.Kernel``).

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
        resilient: nexthop.ResilientSettings = nexthop.ResilientSettings(),
    ) -> None:
        KernelMarks(protocol, table, metric)  # raises ValueError for marks not ours to use
        self.protocol, self.table, self.metric = protocol, table, metric
        self.loopback, self.netns = loopback, netns
        self.resilient = resilient
        # Set once the kernel refused a resilient group, with why (see the module doc; the
        # agent exports it as anycast_kernel_split_fallback{reason}).
        self.split_fallback: nexthop.SplitFallback | None = None
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
        nexthop.install_parsers(ipr)
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

    @property
    def resilient_ok(self) -> bool:
        """False once the kernel refused a resilient group: split routes go single-path."""
        return self.split_fallback is None

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
        # Routes of ours at another metric (the metric setting changed) are stale: they
        # are removed after the new ones are in, so forwarding never has a gap.
        if not self.resilient_ok:
            desired = tuple(KernelRoute(r.prefix, r.next_hop) for r in desired)
        installed = await self._read_ours()
        plan, stale = plan_route_sync(desired, installed, self.metric)
        groups = {r.route.prefix: r.nhid for r in installed if r.nhid and r.metric == self.metric}

        added, replaced, removed = _Applied(), _Applied(), _Applied()
        for route in plan.add:
            await self._try(added, "add", route, self._route_item(route),
                            self._route_op("add", route, self.metric))
        for rep in plan.replace:
            # NLM_F_REPLACE rewrites whatever holds the slot, whoever made it: safe only
            # because we just read our own route there. One atomic change: no gap.
            await self._try(replaced, "replace", rep, self._route_item(rep.new),
                            self._route_op("replace", rep.new, self.metric, groups.get(rep.new.prefix, 0)))
        for route in plan.remove:
            await self._try(removed, "remove", route, self._route_item(route),
                            self._route_op("del", route, self.metric, groups.get(route.prefix, 0)))
        for old in stale:
            await self._try(removed, "remove", old.route, self._route_item(old.route, old.metric),
                            self._route_op("del", old.route, old.metric, old.nhid))

        applied = RouteDiff(
            add=tuple(added.done), replace=tuple(replaced.done), remove=tuple(removed.done)
        )
        if groups or any(r.group for r in plan.add) or any(r.new.group or r.old.group for r in plan.replace):
            await self._forget_unused_nexthops()
        failures = added.failures + replaced.failures + removed.failures
        if applied:
            log.info("kernel routes %s", applied.brief())
        if failures:
            raise KernelSyncError(tuple(failures), applied)
        return applied

    def _route_item(self, route: KernelRoute, metric: int | None = None) -> str:
        shown = self.metric if metric is None else metric
        return f"route {route} (table {self.table}, metric {shown})"

    async def _read_ours(self) -> list[InstalledRoute]:
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST  # type: ignore[import-untyped]
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
        from pyroute2.netlink.rtnl import RTM_GETROUTE  # type: ignore[import-untyped]
        from pyroute2.netlink.rtnl.rtmsg import rtmsg  # type: ignore[import-untyped]

        out: list[InstalledRoute] = []
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
                nhid = msg.get_attr(nexthop.RTA_NH_ID)
                hops = msg.get_attr("RTA_MULTIPATH")
                if gateway is None and nhid and hops:
                    # A split route of ours: the kernel lists the group's members (weight - 1 in hops).
                    try:
                        route = multipath(ip_network(f"{dst}/{msg['dst_len']}"),
                                          [(ip_address(h.get_attr("RTA_GATEWAY")), h["hops"] + 1) for h in hops])
                    except (ValueError, TypeError) as exc:
                        log.warning("ignoring route %s/%s with protocol %d: %s", dst, msg["dst_len"], self.protocol, exc)
                        continue
                    out.append(InstalledRoute(route, msg.get_attr("RTA_PRIORITY") or 0, int(nhid)))
                    continue
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
                # (nhid: a group of ours down to one member, which the kernel shows as its gateway)
                out.append(InstalledRoute(route, msg.get_attr("RTA_PRIORITY") or 0, int(nhid or 0)))
        return out

    def _route_op(
        self, command: str, route: KernelRoute, metric: int, nhid: int = 0
    ) -> Callable[[], Awaitable[object]]:
        """The netlink change for ``route``; ``nhid``: the group the installed route forwards
        through (a replace keeps it, a delete then names no gateway), 0 for none."""
        if (route.group or nhid) and command != "del":
            return lambda: self._group_route(command, route, metric, nhid)
        spec: dict[str, Any] = {
            "dst": str(route.prefix),
            "family": socket.AF_INET if route.prefix.version == 4 else socket.AF_INET6,
            "table": self.table,
            # On a delete, protocol, next hop and metric make the kernel match only ours.
            "proto": self.protocol,
            "priority": metric,
        }
        if not route.group and not nhid:  # (a route through a group has no gateway to match on)
            spec["gateway"] = str(route.next_hop)
        if command != "del":
            spec["type"] = "unicast"
        # "add" is NLM_F_CREATE|NLM_F_EXCL: it fails on a foreign route in our slot.
        return lambda: self._ipr.route(command, **spec)

    async def _group_route(self, command: str, route: KernelRoute, metric: int, nhid: int) -> None:
        """A route through a resilient group: the group ``nhid`` (ours, the prefix's current
        one) gets the new members in place, one for a single path (see the module doc);
        without one a new group is made for a split route, a single path stays plain."""
        from pyroute2.netlink.exceptions import NetlinkError

        known = await nexthop.dump(self._ipr)
        ours = {n.id for n in known if n.protocol == self.protocol and n.members}
        replace = nhid in ours
        if not route.group and not replace:
            await self._route_op(command, route, metric)()
            return
        # Our next-hop objects per gateway: the first is the one the group uses, the second a
        # single path's shadow (see nexthop.single_path_members). The one holding the group's
        # buckets now (its heaviest member) must stay first: the lowest id can be a shadow
        # made in a freed slot, and swapping the two would move every bucket (and flow) of it.
        current = {m: w for n in known if n.id == nhid for m, w in n.members}
        by_gateway: dict[Any, list[int]] = {}
        for n in sorted(known, key=lambda n: (-current.get(n.id, 0), n.id)):
            if n.protocol == self.protocol and n.gateway is not None and not n.members:
                by_gateway.setdefault(n.gateway, []).append(n.id)
        wanted = [(h, 0) for h, _ in route.group] or [(route.next_hop, 0), (route.next_hop, 1)]
        missing = [(h, copy) for h, copy in wanted if len(by_gateway.get(h, ())) <= copy]
        fresh = iter(nexthop.free_ids((n.id for n in known), len(missing) + 1))
        for hop, _ in missing:
            nh_id = next(fresh)
            await nexthop.add_single(self._ipr, nh_id, hop, await self._oif(hop), self.protocol)
            by_gateway.setdefault(hop, []).append(nh_id)
        members = (tuple((by_gateway[h][0], w) for h, w in route.group) if route.group
                   else nexthop.single_path_members(by_gateway[route.next_hop][0], by_gateway[route.next_hop][1]))
        group_id = nhid if replace else next(fresh)
        try:
            await nexthop.set_group(self._ipr, group_id, members, self.protocol, replace=replace,
                                    settings=self.resilient)
        except NetlinkError as exc:
            reason = nexthop.split_fallback(exc.code)
            if reason is None:
                raise
            self.split_fallback = reason
            log.error("this kernel refused a resilient next-hop group (%s): split routes are installed "
                      "single-path toward their first next hop; traffic steering's weights are not applied "
                      "at this POP (needs Linux >= 5.13)", exc)
            await self._ipr.route(command, **{
                "dst": str(route.prefix), "gateway": str(route.next_hop), "table": self.table,
                "family": socket.AF_INET if route.prefix.version == 4 else socket.AF_INET6,
                "proto": self.protocol, "priority": metric, "type": "unicast"})
            return
        if not replace:
            await nexthop.route_via_group(
                self._ipr, command, str(route.prefix.network_address), route.prefix.prefixlen,
                socket.AF_INET if route.prefix.version == 4 else socket.AF_INET6, group_id, self.table,
                self.protocol, metric)

    async def _oif(self, hop: Any) -> int:
        """The interface the kernel reaches ``hop`` through (a next-hop object needs one)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            oif = await nexthop.oif_toward(self._ipr, hop)
        except NetlinkError as exc:
            raise NetlinkError(errno_mod.ENETUNREACH, f"no route to next hop {hop}: {exc}") from exc
        if not oif:
            raise NetlinkError(errno_mod.ENETUNREACH, f"no interface toward next hop {hop}")
        return int(oif)

    async def _forget_unused_nexthops(self) -> None:
        """Delete our groups no route of ours uses, then our next hops no group of ours uses."""
        from pyroute2.netlink.exceptions import NetlinkError

        used = {r.nhid for r in await self._read_ours() if r.nhid}
        known = [n for n in await nexthop.dump(self._ipr) if n.protocol == self.protocol]
        groups = [n for n in known if n.members]
        keep = {m for g in groups if g.id in used for m, _ in g.members}
        for n in [g for g in groups if g.id not in used] + [n for n in known if not n.members and n.id not in keep]:
            try:
                await nexthop.delete(self._ipr, n.id)
            except NetlinkError as exc:
                if exc.code not in GONE_CODES:
                    log.warning("cannot delete next-hop object %d of ours: %s", n.id, exc)

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
            failure = op_failure(operation, item, exc.code)
            if failure is not None:
                into.failures.append(failure)
                return
        into.done.append(value)
