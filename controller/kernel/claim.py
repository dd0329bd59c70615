"""One agent per ``kernel.route_protocol`` per network namespace: a clash is refused at start.

Two agents with the same protocol mark in one network namespace would each see the other's
routes and loopback addresses as their own and delete them on every pass. The claim is an
abstract Unix socket named after the mark: the kernel scopes abstract names to the network
namespace (exactly where routes are shared), frees the name when its holder dies however it
dies (no stale lock file), and a second bind fails with EADDRINUSE.
"""

from __future__ import annotations

import errno
import socket


class RouteProtocolInUse(Exception):
    """Another agent in this network namespace already manages this protocol mark."""


def claim_name(protocol: int) -> str:
    return f"\0anycast-agent/route-protocol/{protocol}"


def claim_route_protocol(protocol: int) -> socket.socket:
    """Hold the claim for ``protocol`` for as long as the returned socket is open."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(claim_name(protocol))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise RouteProtocolInUse(
                f"kernel.route_protocol {protocol} is already used by another anycast agent in this network "
                f"namespace: two agents with one mark delete each other's routes; give each its own "
                f"route_protocol (5-255)") from None
        raise
    return sock
