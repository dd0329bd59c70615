"""Which kernel routes and loopback addresses the agent wants, from its decisions. Pure.

A route exists for every VIP this POP announces, toward the active origin's next hop (or,
with traffic steering's weights, split across the healthy weighted origins' next hops).
While a VIP is HOLD (no verdict yet, e.g. right after a restart) whatever is installed
stays, so a restart does not black-hole traffic that ExaBGP still attracts.

Applying happens in two steps around the BGP commands: first only additions and
next-hop changes (``before_bgp``), so the route exists before traffic is attracted; then
the exact set (``after_bgp``), so a route goes only after its withdrawal was sent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from ..config.model import IPNetwork, Vip
from ..kernel.diff import KernelRoute, multipath
from .decide import Action, Decision

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def desired_routes(decisions: Iterable[Decision], actual: Iterable[KernelRoute]) -> set[KernelRoute]:
    held = {d.prefix for d in decisions if d.action is Action.HOLD}
    want = {multipath(d.prefix, d.next_hops) if d.next_hops else KernelRoute(d.prefix, d.next_hop)
            for d in decisions if d.action is Action.ANNOUNCE and d.next_hop is not None}
    return want | {r for r in actual if r.prefix in held}


def before_bgp(desired: set[KernelRoute], actual: Iterable[KernelRoute]) -> set[KernelRoute]:
    """Desired plus every installed route whose prefix is not desired (nothing removed yet)."""
    desired_prefixes = {r.prefix for r in desired}
    return desired | {r for r in actual if r.prefix not in desired_prefixes}


def desired_addresses(decisions: Iterable[Decision], vips: Mapping[str, Vip],
                      actual: Iterable[IPInterface]) -> set[IPInterface]:
    """The VIP on the loopback for VIPs configured with ``loopback: true``, while announced."""
    decided: dict[IPNetwork, Action] = {}
    want: set[IPInterface] = set()
    for d in decisions:
        vip = vips.get(d.vip)
        if vip is None or not vip.loopback:
            continue
        decided[d.prefix] = d.action
        if d.action is Action.ANNOUNCE:
            want.add(ipaddress.ip_interface(str(d.prefix)))
    held = {a for a in actual if decided.get(ipaddress.ip_network(a.network)) is Action.HOLD}
    return want | held
