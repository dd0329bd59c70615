"""The central controller's desired state: typed, frozen, built by ``desired.load_desired``."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .model import IPNetwork, Vip, is_loopback

MAX_WEIGHT = 255  # an origin's weight in ``steering`` (the kernel's next-hop weights are 1-256)
FULL_DIAL = 100  # a traffic dial's default: the region gets its whole weight


@dataclass(frozen=True)
class FailoverPolicy:
    quorum: float = 0.5  # fraction of reporting POPs that must see an origin down
    min_reporting_pops: int = 1  # fewer verdicts than this: no failover on so little evidence
    failback_hold_down: float = 60.0  # a better origin must be healthy this long before moving back
    # distinct POPs that must see an origin down before it fails over (capped at the VIP's
    # publish domains): one POP's reports alone never move an origin for everyone
    min_down_pops: int = 2


@dataclass(frozen=True)
class SafetyPolicy:
    max_withdraw_fraction: float = 0.5  # of a VIP's publish domains, withdrawn at once
    min_announcing_pops: int = 1
    withdraw_rate_max: int = 2  # new health-induced withdrawals per VIP...
    withdraw_rate_window: float = 60.0  # ...per this many seconds
    report_stale_after: float = 15.0
    settle: float = 1.0  # a new health withdrawal waits this long for the other POPs' reports
    # ...or less: until a quorum of the other POPs report fresh healthy checks of the origin
    settle_on_evidence: bool = True


@dataclass(frozen=True)
class DrainPolicy:
    drain_time: float = 30.0  # announce less preferred this long, then withdraw


@dataclass(frozen=True)
class DampeningPolicy:
    flaps: int = 3  # verdict changes within `window` that hold a POP down
    window: float = 60.0
    hold_down: float = 30.0  # doubled on each repeat...
    max_hold_down: float = 600.0  # ...up to this


@dataclass(frozen=True)
class Policy:
    failover: FailoverPolicy = FailoverPolicy()
    safety: SafetyPolicy = SafetyPolicy()
    drain: DrainPolicy = DrainPolicy()
    dampening: DampeningPolicy = DampeningPolicy()


@dataclass(frozen=True)
class ChangePolicy:
    """The blast-radius budget and staged rollout of config changes (``change:`` in
    controller.yaml; see controller/policy/change.py)."""

    max_withdraw_fraction: float = 0.25  # of the announced (VIP, POP) pairs: more is held for a confirm
    max_removed_vips: int = 1  # VIPs removed or disabled by one revision: more is held
    bake: float = 30.0  # s each wave is watched before the next; 0: no waves (everything at once)
    first_wave: int = 1  # POPs in the first wave
    wave_fraction: float = 0.5  # of the POPs left, in each later wave (the last takes the rest)
    order: tuple[str, ...] = ()  # POPs first in this order; the others by fewest announced pairs


@dataclass(frozen=True)
class PopSpec:
    name: str
    token_sha256: str  # the agent's bearer token, hashed: the token itself never goes in git
    description: str = ""


class StoreKind(enum.StrEnum):
    """Where the controller keeps what it must not forget (``ha.store``)."""

    FILE = "file"  # the local journal in state_dir: one controller (the default)
    ETCD = "etcd"  # an etcd v3 cluster: several controllers, one leader (HA)


@dataclass(frozen=True)
class HaSettings:
    """``ha:`` in controller.yaml (read at start; a change takes effect on restart)."""

    store: StoreKind
    endpoints: tuple[str, ...] = ()  # etcd client URLs, http:// or https://
    prefix: str = "/anycast/"  # every key of this controller cluster lives under it
    lease_ttl: int = 5  # s: a dead leader is replaced after at most this (+ one poll)
    request_timeout: float = 1.0  # s per etcd request and endpoint
    ca_file: str | None = None  # TLS to etcd: the CA that signed etcd's server certificates
    cert_file: str | None = None  # client certificate (etcd --client-cert-auth)
    key_file: str | None = None


@dataclass(frozen=True)
class Preference:
    """Where some POPs send a VIP: their own origin order, and optionally their own weights."""

    pops: tuple[str, ...]
    origins: tuple[str, ...]  # every region of the VIP: the listed ones first, then the rest in the VIP's order
    weights: tuple[tuple[str, int], ...] | None = None  # None: the VIP's ``steering.weights``


@dataclass(frozen=True)
class Steering:
    """A VIP's traffic steering between its origin regions (controller-only: never in the spec
    an agent reads, so agents that predate it read the same spec).

    Without preferences every POP follows the VIP's origin order (one active origin, quorum
    failover, hold-down failback: as before). Without weights a POP sends everything to its
    active origin. With weights a POP splits traffic across the weighted origins that are
    healthy and not dialed to 0; when none is left it falls back to its active origin."""

    preferences: tuple[Preference, ...] = ()
    weights: tuple[tuple[str, int], ...] = ()  # region -> 0-255; () : single path

    def preference(self, pop: str) -> Preference | None:
        return next((p for p in self.preferences if pop in p.pops), None)


NO_STEERING = Steering()


@dataclass(frozen=True)
class FleetVip:
    vip: Vip  # the same definition an agent uses (origins, check, attributes)
    publish: tuple[str, ...]  # publish domains: the POPs that announce it
    enabled: bool  # False: deliberately withdrawn everywhere (no safety minimum)
    policy: Policy
    steering: Steering = NO_STEERING
    # The traffic dial of each of its regions that is not 100 (config dials with operator
    # dials over them: see policy.steering.with_dials); a dial scales the region's weight.
    dials: tuple[tuple[str, int], ...] = ()

    def dial(self, region: str) -> int:
        return next((pct for r, pct in self.dials if r == region), FULL_DIAL)

    @property
    def name(self) -> str:
        return self.vip.name


@dataclass(frozen=True)
class TlsSettings:
    """HTTPS for the API: files on the controller host (never in git), read at start and
    again at every reload (a renewed certificate is picked up by ``systemctl reload``)."""

    cert: str  # PEM certificate chain
    key: str  # PEM private key
    client_ca: str | None = None  # mTLS: agents must present a certificate from this CA naming their POP


class ApiTransport(enum.StrEnum):
    """How the API is served (``/v1/status`` ``api.transport``; README, Security)."""

    HTTPS = "https"  # api.tls
    LOOPBACK_HTTP = "http-loopback"  # plain HTTP on a loopback address only: nothing crosses a network
    INSECURE_HTTP = "http-insecure"  # plain HTTP beyond this host, by api.insecure_plain_http: true


@dataclass(frozen=True)
class ApiSettings:
    """Bounds that keep an unauthenticated peer from exhausting the API (controller.server.guard)."""

    header_timeout: float = 10.0  # request line and headers must arrive within this (also the keep-alive idle time)
    body_timeout: float = 30.0  # a report's body must arrive within this
    max_unauthenticated_connections: int = 1024  # at most half the process's file descriptor limit
    tls: TlsSettings | None = None  # None: plain HTTP, on loopback only unless insecure_plain_http
    # Plain HTTP beyond loopback, tokens and plans in clear: only when asked for by name (a
    # WARNING at every start, anycast_controller_api_insecure_http 1, status api.transport).
    insecure_plain_http: bool = False
    signing_key: str | None = None  # Ed25519 private key (PEM) that signs every plan served


@dataclass(frozen=True)
class DesiredState:
    revision: str
    directory: str
    listen: tuple[str, int]
    metrics_listen: tuple[str, int] | None
    state_dir: str
    operator_token_sha256: str | None
    allowed_prefixes: tuple[IPNetwork, ...]
    pops: tuple[PopSpec, ...]
    vips: tuple[FleetVip, ...]
    policy: Policy
    change: ChangePolicy = ChangePolicy()
    api: ApiSettings = ApiSettings()
    ha: HaSettings | None = None  # None: the embedded file journal
    dials: tuple[tuple[str, int], ...] = ()  # region -> 0-100, from controller.yaml ``dials`` (100s left out)

    def pop(self, name: str) -> PopSpec | None:
        return next((p for p in self.pops if p.name == name), None)

    def vip(self, name: str) -> FleetVip | None:
        return next((v for v in self.vips if v.name == name), None)

    def published_at(self, pop: str) -> tuple[FleetVip, ...]:
        return tuple(v for v in self.vips if pop in v.publish)


def with_dials(desired: DesiredState, operator: Mapping[str, int]) -> DesiredState:
    """``desired`` with each VIP's effective dials: the config's ``dials`` with the operator's
    (``anycastctl dial``) over them. A VIP whose dials are unchanged keeps its object, so the
    planning engine re-plans only the VIPs of a region whose dial moved."""
    dials = dict(desired.dials)
    dials.update(operator)
    if not dials and not any(fv.dials for fv in desired.vips):
        return desired  # no dial anywhere (the usual case): one cheap walk, no tuple per VIP
    vips = []
    for fv in desired.vips:
        own = tuple(sorted((o.region, dials[o.region]) for o in fv.vip.origins
                           if dials.get(o.region, FULL_DIAL) != FULL_DIAL))
        vips.append(fv if own == fv.dials else replace(fv, dials=own))
    if all(a is b for a, b in zip(vips, desired.vips)):
        return desired
    return replace(desired, vips=tuple(vips))


def common_ends(old: tuple[FleetVip, ...], new: tuple[FleetVip, ...]) -> tuple[int, int]:
    """How many VIPs at the head and at the tail of ``old`` and ``new`` are the same objects
    (not overlapping: head + tail <= the shorter length)."""
    n, m = len(old), len(new)
    i, short = 0, min(n, m)
    while i < short and old[i] is new[i]:
        i += 1
    j = 0
    while j < short - i and old[n - 1 - j] is new[m - 1 - j]:
        j += 1
    return i, j


def changed_vips(old: tuple[FleetVip, ...], new: tuple[FleetVip, ...]) -> set[str]:
    """The names of the VIPs added, removed or redefined (not equal) from ``old`` to ``new``.
    A reload keeps the objects of unchanged VIPs in their order, so the common head and tail
    (the same objects) are skipped by identity and only the middle is compared by name: a
    one-VIP commit at 10,000 VIPs looks at a few VIPs, not at two 10,000-name maps."""
    n, m = len(old), len(new)
    i, j = common_ends(old, new)
    before = {fv.vip.name: fv for fv in old[i:n - j]}
    after = {fv.vip.name: fv for fv in new[i:m - j]}
    return {name for name in before.keys() | after.keys()
            if (was := before.get(name)) is None or (now := after.get(name)) is None
            or not (now is was or now == was)}


def plain_http_refusal(api: ApiSettings, host: str) -> str | None:
    """Why serving the API on ``host`` with ``api`` is refused (None: it is not)."""
    if api.tls is not None or api.insecure_plain_http or is_loopback(host):
        return None
    return (f"the API would listen on {host} in plain HTTP (bearer tokens and plans in clear): set api.tls "
            "(cert, key: README, Security) or, to accept that, api.insecure_plain_http: true")


def api_transport(api: ApiSettings, host: str) -> ApiTransport:
    """How the API on ``host`` is served (once plain_http_refusal has said nothing)."""
    if api.tls is not None:
        return ApiTransport.HTTPS
    return ApiTransport.LOOPBACK_HTTP if is_loopback(host) and not api.insecure_plain_http else ApiTransport.INSECURE_HTTP
