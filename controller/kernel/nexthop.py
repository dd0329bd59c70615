"""Linux next-hop objects and resilient groups over netlink (pyroute2 0.9 has no messages for them).

What the kernel does (measured on 6.18 in the lab's namespaces): a next-hop object is
``RTM_NEWNEXTHOP`` with an id, a gateway and an outgoing interface (the kernel refuses a
gateway without one); a group is an id and a list of (member id, weight - 1) structs, of
type resilient (``NHA_GROUP_TYPE`` 1) with a number of buckets and timers
(``NHA_RES_GROUP``, which must carry NLA_F_NESTED or the kernel answers EINVAL). A route
``nhid G`` forwards each flow by its hash to one bucket, each bucket to one member. The
point of resilience: replacing the group's member list in place moves only the buckets that
must move (a member leaving: its buckets; a weight change: as few as the new ratio needs),
so established connections on every other bucket keep their path. A route dump shows such a
route with ``RTA_NH_ID`` and, helpfully, its members in ``RTA_MULTIPATH`` (gateway and
weight - 1 in ``hops``), which is how ``netlink.KernelAdapter`` reads it back.

Buckets are moved on a weight change only once idle for ``idle_timer`` (a bucket that keeps
carrying packets is a live flow: it stays until ``unbalanced_timer`` forces the new split).
"""

from __future__ import annotations

import enum
import errno
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from .diff import MAX_KERNEL_WEIGHT, NextHop

RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
RTA_NH_ID = "RTA_NH_ID"
GROUP_RESILIENT = 1
NLA_F_NESTED = 0x8000
USER_HZ = 100  # the kernel's clock_t for the group's timers

# Ours: ids from here up (an id is global per namespace; others' ids are skipped).
ID_BASE = 0x63000000


class SplitFallback(enum.StrEnum):
    """Why the kernel refused a resilient group (``netlink.KernelAdapter.split_fallback``):
    split routes are then installed single-path toward their first next hop."""

    NOT_SUPPORTED = "not_supported"  # EOPNOTSUPP: no next-hop groups of this type
    INVALID = "invalid"  # EINVAL: the group's attributes are not understood (Linux < 5.13)
    FAMILY_NOT_SUPPORTED = "family_not_supported"  # EAFNOSUPPORT: no next-hop objects for the family


_FALLBACK_BY_ERRNO = {errno.EOPNOTSUPP: SplitFallback.NOT_SUPPORTED, errno.EINVAL: SplitFallback.INVALID,
                      errno.EAFNOSUPPORT: SplitFallback.FAMILY_NOT_SUPPORTED}


def split_fallback(code: int) -> SplitFallback | None:
    """The fallback a refusal with this errno means (None: a real error, raised as such)."""
    return _FALLBACK_BY_ERRNO.get(code)


@dataclass(frozen=True)
class ResilientSettings:
    """A resilient group's shape (``ip nexthop ... type resilient buckets B idle_timer I
    unbalanced_timer U``)."""

    buckets: int = 128  # 3:1 is exactly 96/32; a 10 % dial is within 1 %
    idle_timer: float = 10.0  # s: a bucket idle this long may move to a member that is under its share
    unbalanced_timer: float = 60.0  # s: after this long unbalanced, busy buckets move too (0: never)


@dataclass(frozen=True)
class Nexthop:
    """A next-hop object as the kernel holds it."""

    id: int
    protocol: int
    gateway: NextHop | None  # a single next hop's
    oif: int
    members: tuple[tuple[int, int], ...]  # a group's (member id, weight 1-256); () for a single one


SHADOW_WEIGHT = 1  # beside MAX_KERNEL_WEIGHT: its share of 128 buckets, 128/256, rounds to 0 (the kernel
# gives each member DIV_ROUND_CLOSEST(buckets * cumulative weight, total) minus the ones before it)


def single_path_members(real: int, shadow: int) -> tuple[tuple[int, int], ...]:
    """A single path's group: ``real`` (the next hop, every bucket) and ``shadow`` (another
    next-hop object with the same gateway, listed last: it owns no bucket, up to 128 of them).
    Why two: the kernel picks a bucket only for a group of two or more members (one member
    forwards as a plain route), so a one-member group's buckets would never be marked busy,
    and a member joining later would find every bucket idle and take busy ones too."""
    return ((real, MAX_KERNEL_WEIGHT), (shadow, SHADOW_WEIGHT))


def free_ids(used: Iterable[int], n: int) -> list[int]:
    """``n`` ids from ID_BASE up that nobody uses."""
    taken = set(used)
    out: list[int] = []
    candidate = ID_BASE
    while len(out) < n:
        if candidate not in taken:
            out.append(candidate)
        candidate += 1
    return out


def group_bytes(members: Iterable[tuple[int, int]]) -> bytes:
    """NHA_GROUP: struct nexthop_grp {u32 id; u8 weight-1; u8 weight_high; u16 resvd} per member."""
    return b"".join(struct.pack("=IBBH", i, w - 1, 0, 0) for i, w in members)


def parse_group(data: bytes) -> tuple[tuple[int, int], ...]:
    return tuple((i, w + 1) for i, w, _, _ in struct.iter_unpack("=IBBH", data))


def _classes() -> tuple[Any, Any]:
    """pyroute2 message classes for RTM_*NEXTHOP, and routes that know RTA_NH_ID (built once)."""
    global _CLASSES
    if _CLASSES is None:
        from pyroute2.netlink import nla, nlmsg  # type: ignore[import-untyped]
        from pyroute2.netlink.rtnl.rtmsg import rtmsg  # type: ignore[import-untyped]

        class nhmsg(nlmsg):  # type: ignore[misc]
            prefix = "NHA_"
            fields = (("family", "B"), ("scope", "B"), ("protocol", "B"), ("resvd", "B"), ("flags", "I"))
            nla_map = (("NHA_UNSPEC", "none"), ("NHA_ID", "uint32"), ("NHA_GROUP", "cdata"),
                       ("NHA_GROUP_TYPE", "uint16"), ("NHA_BLACKHOLE", "flag"), ("NHA_OIF", "uint32"),
                       ("NHA_GATEWAY", "target"), ("NHA_ENCAP_TYPE", "uint16"), ("NHA_ENCAP", "cdata"),
                       ("NHA_GROUPS", "flag"), ("NHA_MASTER", "uint32"), ("NHA_FDB", "flag"),
                       ("NHA_RES_GROUP", "res_group"), ("NHA_RES_BUCKET", "cdata"))

            class res_group(nla):  # type: ignore[misc]
                prefix = "NHA_RES_GROUP_"
                nla_flags = NLA_F_NESTED
                nla_map = (("NHA_RES_GROUP_PAD", "none"), ("NHA_RES_GROUP_BUCKETS", "uint16"),
                           ("NHA_RES_GROUP_IDLE_TIMER", "uint32"), ("NHA_RES_GROUP_UNBALANCED_TIMER", "uint32"),
                           ("NHA_RES_GROUP_UNBALANCED_TIME", "uint64"))

        class rtmsg_nh(rtmsg):  # type: ignore[misc]
            # rtmsg stops at RTA_EXPIRES (23); RTA_NH_ID is 30.
            nla_map = rtmsg.nla_map + (("RTA_PAD", "hex"), ("RTA_UID", "uint32"), ("RTA_TTL_PROPAGATE", "uint8"),
                                       ("RTA_IP_PROTO", "uint8"), ("RTA_SPORT", "uint16"), ("RTA_DPORT", "uint16"),
                                       ("RTA_NH_ID", "uint32"))

        # pyroute2 compiles a class's NLA table once and marks it compiled in a class
        # attribute that subclasses inherit: once plain rtmsg was compiled (any route
        # request), rtmsg_nh would use rtmsg's table and silently drop RTA_NH_ID (the kernel
        # then answers ENODEV). Each class of ours starts uncompiled.
        for cls in (nhmsg, nhmsg.res_group, rtmsg_nh):
            for attr in ("compiled_nla", "compiled_ft", "t_nla_map", "r_nla_map"):
                for owner in ("nlmsg_base",):
                    setattr(cls, f"_{owner}__{attr}", False if attr.startswith("compiled") else None)
        _CLASSES = (nhmsg, rtmsg_nh)
    return _CLASSES


_CLASSES: tuple[Any, Any] | None = None


def install_parsers(ipr: Any) -> None:
    """Have ``ipr`` parse next-hop messages, and routes with their RTA_NH_ID."""
    nhmsg, rtmsg_nh = _classes()
    ipr.marshal.msg_map[RTM_NEWNEXTHOP] = nhmsg
    ipr.marshal.msg_map[RTM_NEWROUTE] = rtmsg_nh


async def _request(ipr: Any, msg: Any, kind: int, flags: int) -> list[Any]:
    return [m async for m in await ipr.nlm_request(msg, kind, flags)]


async def dump(ipr: Any) -> list[Nexthop]:
    """Every next-hop object in the namespace (anyone's: the ids are shared)."""
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST

    nhmsg, _ = _classes()
    msg = nhmsg()
    msg["family"] = socket.AF_UNSPEC
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    try:
        answer = await _request(ipr, msg, RTM_GETNEXTHOP, NLM_F_REQUEST | NLM_F_DUMP)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):  # (what a namespace without any next-hop object answers)
            return []
        raise
    out = []
    for m in answer:
        if m.get("header", {}).get("type") != RTM_NEWNEXTHOP:
            continue
        gw = m.get_attr("NHA_GATEWAY")
        group = m.get_attr("NHA_GROUP")
        out.append(Nexthop(int(m.get_attr("NHA_ID")), int(m["protocol"]), ip_address(gw) if gw else None,
                           int(m.get_attr("NHA_OIF") or 0), parse_group(group) if group else ()))
    return out


async def add_single(ipr: Any, nh_id: int, gateway: NextHop, oif: int, protocol: int) -> None:
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST

    nhmsg, _ = _classes()
    msg = nhmsg()
    msg["family"] = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
    msg["protocol"] = protocol
    msg["attrs"] = [("NHA_ID", nh_id), ("NHA_OIF", oif), ("NHA_GATEWAY", str(gateway))]
    await _request(ipr, msg, RTM_NEWNEXTHOP, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)


async def set_group(ipr: Any, nh_id: int, members: tuple[tuple[int, int], ...], protocol: int, *,
                    replace: bool, settings: ResilientSettings) -> None:
    """Create the resilient group ``nh_id`` or (``replace``) give it these members in place."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST

    nhmsg, _ = _classes()
    msg = nhmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["protocol"] = protocol
    res = [("NHA_RES_GROUP_IDLE_TIMER", round(settings.idle_timer * USER_HZ)),
           ("NHA_RES_GROUP_UNBALANCED_TIMER", round(settings.unbalanced_timer * USER_HZ))]
    if not replace:  # the bucket count is fixed for the group's life
        res.insert(0, ("NHA_RES_GROUP_BUCKETS", settings.buckets))
    msg["attrs"] = [("NHA_ID", nh_id), ("NHA_GROUP", group_bytes(members)), ("NHA_GROUP_TYPE", GROUP_RESILIENT),
                    ("NHA_RES_GROUP", {"attrs": res})]
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
    await _request(ipr, msg, RTM_NEWNEXTHOP, flags)


async def delete(ipr: Any, nh_id: int) -> None:
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

    nhmsg, _ = _classes()
    msg = nhmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["attrs"] = [("NHA_ID", nh_id)]
    await _request(ipr, msg, RTM_DELNEXTHOP, NLM_F_REQUEST | NLM_F_ACK)


async def oif_toward(ipr: Any, gateway: NextHop) -> int | None:
    """The interface the kernel would send to ``gateway`` through (``ip route get``), 0 for none.
    (Not pyroute2's ``route("get")``: after it, the routes this module sends are refused with
    ENODEV, measured with pyroute2 0.9.7.)"""
    from pyroute2.netlink import NLM_F_REQUEST

    _, rtmsg_nh = _classes()
    msg = rtmsg_nh()
    msg["family"] = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
    msg["dst_len"] = gateway.max_prefixlen
    msg["attrs"] = [("RTA_DST", str(gateway))]
    for m in await _request(ipr, msg, RTM_GETROUTE, NLM_F_REQUEST):
        oif = m.get_attr("RTA_OIF")
        if oif:
            return int(oif)
    return 0


async def route_via_group(ipr: Any, command: str, dst: str, dst_len: int, family: int, nh_id: int, table: int,
                          protocol: int, metric: int) -> None:
    """``ip route add|replace DST nhid ID``: with our marks, like netlink.KernelAdapter's routes."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST

    _, rtmsg_nh = _classes()
    msg = rtmsg_nh()
    msg["family"] = family
    msg["dst_len"] = dst_len
    msg["table"] = table if table < 256 else 252  # RT_TABLE_COMPAT: the attribute carries the real one
    msg["proto"] = protocol
    msg["type"] = 1  # unicast
    msg["scope"] = 0
    msg["attrs"] = [("RTA_DST", dst), ("RTA_TABLE", table), ("RTA_PRIORITY", metric), ("RTA_NH_ID", nh_id)]
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | (NLM_F_REPLACE if command == "replace" else NLM_F_EXCL)
    await _request(ipr, msg, RTM_NEWROUTE, flags)
