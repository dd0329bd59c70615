"""Typed, frozen config values. Built once by a loader; never mutated afterwards."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_ORIGINS = 5


class AdminState(enum.StrEnum):
    """A VIP's admin state in the config: announce it, drain it (less preferred), or not."""

    UP = "up"
    DRAIN = "drain"
    DOWN = "down"


ADMIN_STATES = tuple(a.value for a in AdminState)
CHECK_KINDS = ("tcp", "http", "https")
SHUTDOWN_MODES = ("withdraw", "keep")


@dataclass(frozen=True)
class Backend:
    """One CLB backend of an origin region, checked over the backbone."""

    address: IPAddress
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Origin:
    """An origin region: where the VIP's servers are, and how the POP reaches it."""

    region: str
    next_hop: IPAddress
    backends: tuple[Backend, ...]
    min_healthy: int = 1


# With check.reuse_connection: the most checks one kept connection serves (README, check keys).
FRESH_CONNECTION_EVERY = 10


@dataclass(frozen=True)
class HealthCheck:
    kind: str  # tcp | http | https
    port: int | None  # None: each backend's own port
    path: str
    expect_status: int
    expect_body: str | None
    host_header: str | None
    tls_verify: bool
    interval: float
    timeout: float
    rise: int
    fall: int
    # A watch connection per backend; its loss triggers `fall` confirmation probes at once
    # (health.watch). The reader defaults it to WATCH_DEFAULT[kind].
    watch: bool = False
    # Plain HTTP only: keep the connection between checks (HTTP/1.1 keep-alive), and open a
    # new one at least every `fresh_connection_every` checks (health.probes). Off by default:
    # a fresh connection per check is what proves that the listener accepts new clients.
    reuse_connection: bool = False
    fresh_connection_every: int = FRESH_CONNECTION_EVERY


# Where a watch is on by default: an idle TCP connection is harmless to a TCP or plain
# HTTP server; to a TLS server it is a handshake that never starts (a logged error each
# time its handshake timeout closes it), so HTTPS checks opt in.
WATCH_DEFAULT = {"tcp": True, "http": True, "https": False}


@dataclass(frozen=True)
class Attributes:
    """BGP attributes a VIP is announced with in one state."""

    med: int | None = None
    as_path_prepend: int = 0
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    extended_communities: tuple[str, ...] = ()  # target:/origin: (RFC 4360), canonical


@dataclass(frozen=True)
class StateAttributes:
    up: Attributes
    draining: Attributes


@dataclass(frozen=True)
class Vip:
    name: str
    prefix: IPNetwork
    admin: AdminState
    loopback: bool
    check: HealthCheck
    origins: tuple[Origin, ...]
    attributes: StateAttributes

    def origin(self, region: str) -> Origin | None:
        return next((o for o in self.origins if o.region == region), None)


@dataclass(frozen=True)
class Neighbor:
    """An ExaBGP neighbour: the POP router(s) the agent announces to."""

    address: IPAddress
    local_address: IPAddress
    router_id: IPAddress
    peer_as: int
    hold_time: int
    md5_password: str | None
    passive: bool


@dataclass(frozen=True)
class KernelSettings:
    enabled: bool
    protocol: int
    table: int


@dataclass(frozen=True)
class ClientTls:
    """How the agent checks the controller's HTTPS certificate, and the one it presents."""

    ca_file: str | None = None  # a private CA's PEM bundle; None: the system's trust store
    cert: str | None = None  # mTLS: a client certificate naming the POP (CN or DNS subjectAltName)
    key: str | None = None


@dataclass(frozen=True)
class ControllerLink:
    """Where the agent gets its plan. Without it the agent follows its own config."""

    url: str
    token_file: str
    poll_wait: float = 30.0  # long-poll: the controller answers at once on a change
    report_interval: float = 2.0
    timeout: float = 5.0
    confirm_timeout: float = 2.0  # wait this long for the controller to confirm a withdrawal
    tls: ClientTls = ClientTls()
    plan_keys: tuple[str, ...] = ()  # the controller's Ed25519 public keys: plans must be signed by one
    max_plan_age: float = 86400.0  # a plan not confirmed by the controller for longer raises an alarm (never a withdrawal)
    urls: tuple[str, ...] = ()  # every controller (HA), tried in turn; ``url`` is the first
    insecure_plain_http: bool = False  # http:// beyond loopback accepted (a WARNING at every start)


@dataclass(frozen=True)
class AgentConfig:
    source: str
    pop: str
    local_as: int
    allowed_prefixes: tuple[IPNetwork, ...]
    neighbors: tuple[Neighbor, ...]
    kernel: KernelSettings
    metrics_listen: tuple[str, int] | None
    state_dir: str
    shutdown: str  # withdraw | keep
    vips: tuple[Vip, ...]
    controller: ControllerLink | None = None
    # RFC 4724: seconds the routers keep our routes (stale) after the session drops without
    # a NOTIFICATION, as when ExaBGP stops with it negotiated; 0: not offered.
    graceful_restart: int = 0
    # RFC 8326: before a planned withdrawal, re-announce with GRACEFUL_SHUTDOWN (65535:0) and
    # the draining attributes, and wait this long for traffic to move; 0: withdraw at once.
    graceful_shutdown: float = 0.0

    def vip(self, name: str) -> Vip | None:
        return next((v for v in self.vips if v.name == name), None)


def is_loopback(host: str) -> bool:
    """``host`` (an address or ``localhost``) reaches this machine only: what crosses it never
    crosses a network (only root on this host could read it, and root can read the token files)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
