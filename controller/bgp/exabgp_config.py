"""Render the ExaBGP 5 configuration and environment a POP agent runs under.

ExaBGP starts the agent itself (``process`` block) and sends it neighbour changes and
received updates as JSON. Every value is validated here because ExaBGP's tokeniser
gives special meaning to whitespace, quotes, ``; { } [ ] , #`` and backslashes, and a
stray one would silently change the configuration instead of failing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .. import bgp_values

_SUPPORTED_FAMILIES: Final = ("ipv4 unicast", "ipv6 unicast")
_U32_MAX: Final = 0xFFFF_FFFF
_HOLD_TIME_MAX: Final = 0xFFFF
BGP_PORT: Final = 179
_GR_TIME_MAX: Final = 4095  # the GR capability's restart time is 12 bits
# Characters ExaBGP's tokeniser treats as syntax, plus whitespace and quotes.
_UNSAFE_ARG: Final = re.compile(r"""[\s"';{}\[\],#\\]""")
_PROCESS_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class NeighborSpec:
    """One BGP session from the agent's ExaBGP to a POP router.

    `families` defaults to the session's own family (``ipv4 unicast`` for an IPv4
    neighbour, ``ipv6 unicast`` for an IPv6 one). ExaBGP resolves ``next-hop self`` to
    the session's local address, so an IPv6 VIP announced with ``next-hop self`` on an
    IPv4 session that carries ``ipv6 unicast`` makes ExaBGP reject the whole command
    (no neighbour gets it). Dual-stack POPs use one session per family.
    """

    address: str
    local_address: str
    router_id: str
    local_as: int
    peer_as: int
    hold_time: int = 9
    md5_password: str | None = None
    passive: bool = False
    families: tuple[str, ...] | None = None
    graceful_restart: int = 0  # RFC 4724 restart time offered, seconds; 0: not offered

    def __post_init__(self) -> None:
        peer = _ip("address", self.address)
        local = _ip("local_address", self.local_address)
        if peer.version != local.version:
            raise ValueError(f"local_address: {self.local_address} is not of the same family as {self.address}")
        if _ip("router_id", self.router_id).version != 4:
            raise ValueError(f"router_id: {self.router_id} is not an IPv4 address")
        for name, asn in (("local_as", self.local_as), ("peer_as", self.peer_as)):
            if not 1 <= asn <= _U32_MAX:
                raise ValueError(f"{name}: {asn} is not a valid AS number")
        # ExaBGP refuses 1 and 2 (RFC 4271: zero or at least three seconds).
        if self.hold_time != 0 and not 3 <= self.hold_time <= _HOLD_TIME_MAX:
            raise ValueError(f"hold_time: {self.hold_time} is neither 0 nor in 3..{_HOLD_TIME_MAX}")
        if self.md5_password is not None:
            _check_md5(self.md5_password)
        if not 0 <= self.graceful_restart <= _GR_TIME_MAX:
            raise ValueError(f"graceful_restart: {self.graceful_restart} is not in 0..{_GR_TIME_MAX}")
        if self.families is not None:
            if isinstance(self.families, str) or not self.families:
                raise ValueError(f"families: expected a non-empty tuple, got {self.families!r}")
            for family in self.families:
                if family not in _SUPPORTED_FAMILIES:
                    raise ValueError(f"families: {family!r} is not one of {', '.join(_SUPPORTED_FAMILIES)}")

    def effective_families(self) -> tuple[str, ...]:
        """The address families this session negotiates."""
        if self.families is not None:
            return tuple(dict.fromkeys(self.families))
        return ("ipv4 unicast",) if ipaddress.ip_address(self.address).version == 4 else ("ipv6 unicast",)


def _ip(name: str, value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not an IP address") from None


def _check_md5(password: str) -> None:
    # The config validator runs the same check (bgp_values): rendered inside double quotes,
    # measured in bytes, ASCII because ExaBGP encodes it so.
    try:
        bgp_values.check_md5_password(password)
    except ValueError as exc:
        raise ValueError(f"md5_password: {exc}") from None


def render_exabgp_config(neighbors: Sequence[NeighborSpec], process_name: str, run_argv: Sequence[str]) -> str:
    """The ExaBGP config that runs `run_argv` as API process `process_name` for `neighbors`."""
    if not _PROCESS_NAME.fullmatch(process_name):
        raise ValueError(f"process_name: {process_name!r} must be letters, digits, '_', '.', '-'")
    _check_argv(run_argv)
    if not neighbors:
        raise ValueError("neighbors: at least one is needed")
    seen: set[str] = set()
    for i, neighbor in enumerate(neighbors):
        key = str(ipaddress.ip_address(neighbor.address))
        if key in seen:
            raise ValueError(f"neighbors[{i}].address: {neighbor.address} is listed twice")
        seen.add(key)

    lines = [
        "# Rendered by controller.bgp.exabgp_config; edits are overwritten.",
        f"process {process_name} {{",
        f"    run {' '.join(run_argv)};",
        "    encoder json;",
        "}",
    ]
    for neighbor in neighbors:
        lines += ["", *_neighbor_block(neighbor, process_name)]
    return "\n".join(lines) + "\n"


def _check_argv(run_argv: Sequence[str]) -> None:
    if isinstance(run_argv, str) or not run_argv:
        raise ValueError(f"run_argv: expected a non-empty list of arguments, got {run_argv!r}")
    if not run_argv[0].startswith("/"):
        # ExaBGP would search /etc/exabgp, the config's folder and PATH for a relative name.
        raise ValueError(f"run_argv[0]: {run_argv[0]!r} is not an absolute path")
    for i, arg in enumerate(run_argv):
        # ExaBGP splits the run line on whitespace and does not honour shell quoting.
        if not arg or _UNSAFE_ARG.search(arg):
            raise ValueError(
                f"run_argv[{i}]: {arg!r} is empty or contains whitespace, a quote or one of ;{{}}[],#\\"
            )


def _neighbor_block(neighbor: NeighborSpec, process_name: str) -> list[str]:
    lines = [
        f"neighbor {neighbor.address} {{",
        f"    router-id {neighbor.router_id};",
        f"    local-address {neighbor.local_address};",
        f"    local-as {neighbor.local_as};",
        f"    peer-as {neighbor.peer_as};",
        f"    hold-time {neighbor.hold_time};",
    ]
    if neighbor.md5_password is not None:
        lines.append(f'    md5-password "{neighbor.md5_password}";')
    if neighbor.passive:
        # ExaBGP 5 opens no listening socket for `passive true` alone (it would wait for a
        # connection nobody can make): `listen 179` binds local-address:179 for this peer.
        lines.append("    passive true;")
        lines.append(f"    listen {BGP_PORT};")
    if neighbor.graceful_restart:
        # With GR negotiated ExaBGP closes the session without a NOTIFICATION when it stops,
        # so the router keeps our routes (stale) for this long: a restart re-announces them
        # without a withdrawal. A planned stop withdraws first (the agent), so nothing is left stale.
        lines += ["    capability {", f"        graceful-restart {neighbor.graceful_restart};", "    }"]
        # ExaBGP would send End-of-RIB as soon as the session is up, before the restarted
        # agent has re-announced anything, and the router would drop the stale routes at
        # once: the agent sends End-of-RIB itself, after its first verdicts.
        lines.append("    manual-eor true;")
    lines.append("    family {")
    lines += [f"        {family};" for family in neighbor.effective_families()]
    lines += [
        "    }",
        "    api {",
        f"        processes [ {process_name} ];",
        "        receive {",
        "            parsed;",
        "            update;",
        "        }",
        "        neighbor-changes;",
        "    }",
        "}",
    ]
    return lines


def exabgp_environment(log_file: str | None = None) -> dict[str, str]:
    """Environment variables for the agent's ExaBGP (systemd unit and lab).

    Underscore names (``exabgp_api_ack``) are what ExaBGP reads besides the dotted ones,
    and unlike those they are valid in shells and unit files. Settings whose defaults we
    rely on are still set, so an ``exabgp.env`` file cannot change them under us.
    """
    return {
        # As root, a respawned agent keeps root (drop=false alone only covers the first
        # start) and can still open the log file; the agent needs root for netlink anyway.
        "exabgp_daemon_user": "root",
        "exabgp_daemon_drop": "false",
        "exabgp_daemon_daemonize": "false",
        # The CLI wants named pipes, one set per instance; the agent does not use it.
        "exabgp_api_cli": "false",
        # The speaker matches one done/error per command.
        "exabgp_api_ack": "true",
        "exabgp_api_encoder": "json",
        # A crashed agent is restarted and ExaBGP keeps its routes meanwhile; after
        # repeated crashes ExaBGP exits and the routes are withdrawn.
        "exabgp_api_respawn": "true",
        "exabgp_api_terminate": "false",
        "exabgp_log_destination": log_file if log_file is not None else "stdout",
        "exabgp_log_level": "INFO",
        # ExaBGP logs per-peer packet counters every second by default: noise in the journal
        # that buries the session changes.
        "exabgp_log_statistics": "false",
        # One INFO line per route change ("route added to neighbor ..."): 10,000 lines at a
        # cold start with 10,000 VIPs, each a formatted record, a stat and a flush of the log: up to
        # ~40 % of ExaBGP's CPU for those routes on a busy host, little on a quiet one
        # (results/README.md section 11); the agent logs its route changes
        # itself. Nothing else is lost: ExaBGP 5.0.15 logs this source's failures at level
        # "ERR", which its logger never enables, so a refused command never showed its reason.
        "exabgp_log_processes": "false",
        # ExaBGP's loop polls for reactor.speed / 100 s whenever a pass read no new command,
        # even with commands it has already read still queued (50 routes a pass): at the
        # default 1.0 each such nap is up to 10 ms, ended early only by our next write. 0.5
        # caps it at 5 ms: a cold start's 10,000 routes reach the upstream FIB ~0.3 s sooner
        # at a cost of ~0.5 % of a core at rest (results/README.md section 19c). It sets
        # nothing else in 5.0.15 but the pause after a hung-up descriptor (spin prevention).
        "exabgp_reactor_speed": "0.5",
        # Timestamps in a file; journald adds its own to stdout.
        "exabgp_log_short": "true" if log_file is None else "false",
    }
