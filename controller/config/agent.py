"""Load a POP agent's YAML config into an :class:`AgentConfig`, reporting every error by path.

The same loader serves ``anycastctl validate``, agent start-up and SIGHUP reload, so
what validates is exactly what runs.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable

from .. import bgp_values
from .errors import ConfigError
from .model import (
    ADMIN_STATES, CHECK_KINDS, FRESH_CONNECTION_EVERY, MAX_ORIGINS, SHUTDOWN_MODES, WATCH_DEFAULT,
    AdminState, AgentConfig, Attributes, Backend, ClientTls, ControllerLink, HealthCheck, IPNetwork, KernelSettings,
    IPAddress, Neighbor, Origin, StateAttributes, Vip, is_loopback,
)
from .reader import Issues, Node, gc_paused, ip_address, parse_yaml, read_text

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

DEFAULT_CHECK = {"interval": 1.0, "timeout": 0.5, "rise": 3, "fall": 2}
DEFAULT_UP = Attributes(med=100)
DEFAULT_DRAINING = Attributes(med=1000, as_path_prepend=3)


def load_agent_config(path: str) -> AgentConfig:
    """Read and parse an agent config file. Raises ConfigError listing every problem."""
    return parse_agent_config(read_text(path), source=path)


def parse_agent_config(text: str, source: str = "<config>") -> AgentConfig:
    issues = Issues()
    with gc_paused():
        root = Node(parse_yaml(text, source), "", issues)
        config = _agent(root, source) if root.is_mapping() else None
    if issues.items or config is None:
        raise ConfigError(source, issues.items)
    return config


def _agent(root: Node, source: str) -> AgentConfig | None:
    pop = root.req("pop", read_name)
    allowed = tuple(
        p for n in _list(root, "allowed_prefixes", required=True) if (p := n.as_network()) is not None
    )
    refuse_empty(root, "allowed_prefixes")
    bgp = root.get("bgp", required=True)
    local_as, neighbors, attrs = _bgp(bgp) if bgp is not None and bgp.is_mapping() else (None, (), None)
    graceful_restart, graceful_shutdown = _graceful(bgp)
    kernel = _kernel(root.get("kernel"))
    metrics_listen = _metrics(root.get("metrics"))
    state_dir = root.opt("state_dir", Node.as_str, "/var/lib/anycast-agent")
    shutdown = root.opt("shutdown", lambda n: n.as_choice(SHUTDOWN_MODES), "withdraw")
    controller = _controller(root.get("controller"))
    check_defaults = root.get("check_defaults")
    defaults = read_check_defaults(check_defaults)
    vips = tuple(
        v for n in _list(root, "vips")
        if (v := read_vip(n, allowed, defaults, attrs or StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))) is not None
    )
    root.reject_unknown()
    _check_unique(root, "vips", [str(v.prefix) for v in vips], "VIP address")
    _check_unique(root, "vips", [v.name for v in vips], "VIP name")
    _check_families(root, neighbors, vips)
    if controller is not None and vips:
        root.issues.add("vips", "must be empty when a controller is configured: "
                        "the VIPs come from the controller's plan")
    if pop is None or local_as is None or attrs is None:
        return None
    return AgentConfig(
        source=source, pop=pop, local_as=local_as, allowed_prefixes=allowed,
        neighbors=neighbors, kernel=kernel, metrics_listen=metrics_listen,
        state_dir=state_dir, shutdown=shutdown, vips=vips, controller=controller,
        graceful_restart=graceful_restart, graceful_shutdown=graceful_shutdown,
    )


def _list(node: Node, key: str, required: bool = False) -> list[Node]:
    child = node.get(key, required=required)
    return [] if child is None else list(child.items())


def read_name(node: Node) -> str | None:
    s = node.as_str()
    if s is not None and not _NAME.match(s):
        node.error("must be 1-63 characters of letters, digits, '.', '_' or '-'")
        return None
    # Interned: a VIP's or POP's name is a key in many per-POP mappings (plans, reports,
    # indexes); reports intern theirs too (wire.decode_report), so all share one string.
    return sys.intern(s) if s is not None else None


def _check_unique(root: Node, key: str, values: list[str], what: str) -> None:
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in seen:
            root.issues.add(f"{key}[{i}]", f"duplicate {what} {value} (also vips[{seen[value]}])")
        else:
            seen[value] = i


def _check_families(root: Node, neighbors: tuple[Neighbor, ...], vips: tuple[Vip, ...]) -> None:
    """Each session carries its own family (``next-hop self`` is the session's local address),
    so a VIP needs a session of its family. Both families in one agent are fine: the agent
    sends each command to its family's sessions only."""
    families = {n.address.version for n in neighbors}
    for i, vip in enumerate(vips):
        if families and vip.prefix.version not in families:
            root.issues.add(f"vips[{i}].address", f"an IPv{vip.prefix.version} VIP needs an "
                            f"IPv{vip.prefix.version} BGP session; bgp.neighbors has none")


# --- bgp ---------------------------------------------------------------------------------
def _bgp(node: Node) -> tuple[int | None, tuple[Neighbor, ...], StateAttributes | None]:
    local_as = node.req("local_as", lambda n: n.as_int(1, 4294967295))
    neighbors = tuple(nb for n in _list(node, "neighbors", required=True) if (nb := _neighbor(n)) is not None)
    if node.has("neighbors") and not neighbors and not node.issues.items:
        node.error("at least one neighbour is needed", "neighbors")
    attrs = read_state_attributes(node.get("attributes"), StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))
    node.get("graceful_restart")  # read by _graceful; marked as known here
    node.get("graceful_shutdown")
    node.reject_unknown()
    return local_as, neighbors, attrs


def _graceful(bgp: Node | None) -> tuple[int, float]:
    if bgp is None or not isinstance(bgp.value, dict):
        return 0, 0.0
    # 4095: the restart time field of the GR capability is 12 bits.
    restart = bgp.opt("graceful_restart", lambda n: n.as_int(0, 4095), 0)
    shutdown = bgp.opt("graceful_shutdown", lambda n: n.as_float(0, 600), 0.0)
    return restart, shutdown


def _neighbor(node: Node) -> Neighbor | None:
    if not node.is_mapping():
        return None
    address: IPAddress | None = node.req("address", Node.as_address)
    local: IPAddress | None = node.req("local_address", Node.as_address)
    router_id: IPAddress | None = node.opt("router_id", _ipv4, None)
    peer_as = node.req("peer_as", lambda n: n.as_int(1, 4294967295))
    hold = node.opt("hold_time", lambda n: _hold_time(n), 9)
    md5 = node.opt("md5_password", _password, None)
    passive = node.opt("passive", Node.as_bool, False)
    node.reject_unknown()
    if address is None or local is None or peer_as is None:
        return None
    if address.version != local.version:
        node.error("address and local_address must be the same IP version")
        return None
    if address == local:
        node.error(f"the neighbour's address is local_address ({local}): a session with itself", "address")
        return None
    if router_id is None:
        if local.version != 4:
            node.error("required for an IPv6 session (a router id is an IPv4 address)", "router_id")
            return None
        router_id = local
    return Neighbor(address, local, router_id, peer_as, hold, md5, passive)


def _ipv4(node: Node) -> IPAddress | None:
    a = node.as_address()
    if a is not None and a.version != 4:
        node.error("a router id must be an IPv4 address")
        return None
    return a


def _hold_time(node: Node) -> int | None:
    v = node.as_int(0, 65535)
    if v is not None and 0 < v < 3:
        node.error("BGP hold time must be 0 or at least 3 seconds")
        return None
    return v


def _password(node: Node) -> str | None:
    # The same check as the ExaBGP config renderer's (bgp_values): what validates, launches.
    try:
        return bgp_values.check_md5_password(node.value)
    except ValueError as exc:
        node.error(str(exc))
        return None


def read_state_attributes(node: Node | None, base: StateAttributes) -> StateAttributes | None:
    if node is None:
        return base
    if not node.is_mapping():
        return None
    up = _attributes(node.get("up"), base.up)
    draining = _attributes(node.get("draining"), base.draining)
    node.reject_unknown()
    return StateAttributes(up, draining)


def _attributes(node: Node | None, base: Attributes) -> Attributes:
    if node is None or not node.is_mapping():
        return base
    med = node.opt("med", lambda n: n.as_int(0, 4294967295), base.med)
    prepend = node.opt("as_path_prepend", lambda n: n.as_int(0, 10), base.as_path_prepend)
    communities = node.opt("communities", _communities, base.communities)
    large = node.opt("large_communities", _large_communities, base.large_communities)
    extended = node.opt("extended_communities", _extended_communities, base.extended_communities)
    node.reject_unknown()
    return Attributes(med, prepend, communities, large, extended)


def _communities(node: Node) -> tuple[str, ...] | None:
    """Well-known names (``no-export``, ``graceful-shutdown``...) or ASN:VALUE, stored in the
    canonical numeric form the announce path sends (bgp_values: one parser for both)."""
    out: set[tuple[int, int]] = set()
    for item in node.items():
        try:
            out.add(bgp_values.parse_community(item.value))
        except ValueError as exc:
            item.error(str(exc))
    return tuple(f"{a}:{b}" for a, b in sorted(out))


def _large_communities(node: Node) -> tuple[str, ...] | None:
    out: set[tuple[int, int, int]] = set()
    for item in node.items():
        try:
            out.add(bgp_values.parse_large_community(item.value))
        except ValueError as exc:
            item.error(str(exc))
    return tuple(f"{a}:{b}:{c}" for a, b, c in sorted(out))


def _extended_communities(node: Node) -> tuple[str, ...] | None:
    values = []
    for item in node.items():
        try:
            bgp_values.parse_extended_community(item.value)
            values.append(item.value)
        except ValueError as exc:
            item.error(str(exc))
    return bgp_values.canonical_extended_communities(values)


# --- the central controller -------------------------------------------------------------
def _controller(node: Node | None) -> ControllerLink | None:
    if node is None or not node.is_mapping():
        return None
    # ``url`` (one controller) or ``urls`` (HA: each controller, tried in turn), not both.
    listed = node.get("urls")
    urls = tuple(u for n in (listed.items() if listed is not None else ()) if (u := _http_url(n)))
    if node.has("urls") and node.has("url"):
        node.error("give url or urls, not both", "urls")
    url = urls[0] if urls else node.req("url", _http_url)
    if node.has("urls") and not urls:
        node.error("must list at least one controller URL", "urls")
    token_file = node.req("token_file", Node.as_str)
    poll_wait = node.opt("poll_wait", lambda n: n.as_float(1, 300), 30.0)
    report_interval = node.opt("report_interval", lambda n: n.as_float(0.1, 300), 2.0)
    timeout = node.opt("timeout", lambda n: n.as_float(0.1, 60), 5.0)
    confirm_timeout = node.opt("confirm_timeout", lambda n: n.as_float(0, 60), 2.0)
    tls = ClientTls(node.opt("ca_file", read_absolute_path, None), node.opt("client_cert", read_absolute_path, None),
                    node.opt("client_key", read_absolute_path, None))
    max_plan_age = node.opt("max_plan_age", lambda n: n.as_float(60, 86400 * 365), 86400.0)
    keys_node = node.get("plan_keys")
    plan_keys = tuple(k for n in (keys_node.items() if keys_node else ()) if (k := read_absolute_path(n)) is not None)
    if (tls.cert is None) != (tls.key is None):
        node.error("client_cert and client_key go together", "client_cert" if tls.cert is None else "client_key")
    if (tls.ca_file or tls.cert) and any(u.startswith("http://") for u in (urls or (url,)) if u):
        node.error("ca_file and client_cert need an https:// URL", "urls" if urls else "url")
    insecure = node.opt("insecure_plain_http", Node.as_bool, False)
    for i, u in enumerate(urls or (url,)):
        if u and not insecure and (refusal := plain_http_url_refusal(u)) is not None:
            node.error(refusal, f"urls[{i}]" if urls else "url")
    node.reject_unknown()
    if url is None or token_file is None:
        return None
    return ControllerLink(url, token_file, poll_wait, report_interval, timeout, confirm_timeout, tls, plan_keys,
                          max_plan_age, urls or (url,), insecure)


def url_host(url: str) -> str:
    """The host of an http(s) URL (an IPv6 address without its brackets)."""
    authority = url.split("://", 1)[-1].split("/", 1)[0]
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0]


def insecure_urls(link: ControllerLink) -> tuple[str, ...]:
    """The controller URLs the agent reaches in plain HTTP beyond loopback (accepted only
    with controller.insecure_plain_http): its token and plans cross the network in clear."""
    return tuple(u for u in link.urls or (link.url,) if plain_http_url_refusal(u) is not None)


def plain_http_url_refusal(url: str) -> str | None:
    """Why the agent refuses the controller ``url`` without controller.insecure_plain_http
    (None: https://, or plain HTTP to this host only)."""
    if not url.startswith("http://") or is_loopback(url_host(url)):
        return None
    return (f"{url} is plain HTTP: the POP's token and plans would cross the network in clear; use https:// "
            "(with ca_file: README, Security) or, to accept that, insecure_plain_http: true")


def read_absolute_path(node: Node) -> str | None:
    """A file on this host, given absolutely (keys and certificates: never relative to a
    checkout, where they might be committed)."""
    s = node.as_str()
    if s is not None and not os.path.isabs(s):
        node.error(f"expected an absolute path, got {s!r}")
        return None
    return s


def _http_url(node: Node) -> str | None:
    s = node.as_str()
    if s is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", s):
        node.error(f"expected an http:// or https:// URL, got {s!r}")
        return None
    return s.rstrip("/") if s else None


# --- kernel and metrics --------------------------------------------------------------------
def _kernel(node: Node | None) -> KernelSettings:
    if node is None or not node.is_mapping():
        return KernelSettings(enabled=True, protocol=99, table=254)
    enabled = node.opt("enabled", Node.as_bool, True)
    # 0-4 are the kernel's own protocol numbers (unspec, redirect, kernel, boot, static).
    protocol = node.opt("route_protocol", lambda n: n.as_int(5, 255), 99)
    table = node.opt("table", lambda n: n.as_int(1, 4294967295), 254)
    node.reject_unknown()
    return KernelSettings(enabled, protocol, table)


def _metrics(node: Node | None) -> tuple[str, int] | None:
    if node is None or not node.is_mapping():
        return None
    listen = node.opt("listen", read_host_port, None)
    node.reject_unknown()
    return listen


def read_host_port(node: Node) -> tuple[str, int] | None:
    s = node.as_str()
    if s is None:
        return None
    host, sep, port = s.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        port_n = int(port)
        if not sep or not 0 < port_n < 65536:
            raise ValueError
    except ValueError:
        node.error(f"expected ADDRESS:PORT such as 127.0.0.1:9701 or [::1]:9701, got {s!r}")
        return None
    return host, port_n


# --- VIPs --------------------------------------------------------------------------------
def read_check_defaults(node: Node | None) -> dict[str, float | int]:
    defaults: dict[str, float | int] = dict(DEFAULT_CHECK)
    if node is None or not node.is_mapping():
        return defaults
    defaults["interval"] = node.opt("interval", lambda n: n.as_float(0.01, 3600), defaults["interval"])
    defaults["timeout"] = node.opt("timeout", lambda n: n.as_float(0.01, 600), defaults["timeout"])
    defaults["rise"] = node.opt("rise", lambda n: n.as_int(1, 100), defaults["rise"])
    defaults["fall"] = node.opt("fall", lambda n: n.as_int(1, 100), defaults["fall"])
    if node.has("watch"):
        # Only when set: unset, each check type keeps its own default (WATCH_DEFAULT).
        defaults["watch"] = node.opt("watch", Node.as_bool, False)
    node.reject_unknown()
    return defaults


def read_vip(node: Node, allowed: tuple[IPNetwork, ...], defaults: dict[str, float | int],
         attrs: StateAttributes) -> Vip | None:
    if not node.is_mapping():
        return None
    prefix: IPNetwork | None = node.req("address", _vip_prefix)
    if prefix is not None and allowed and not any(_within(prefix, a) for a in allowed):
        node.error(f"{prefix} is outside the allowed anycast prefixes "
                   f"({', '.join(map(str, allowed))}); the agent refuses to announce it", "address")
        prefix = None
    name = node.opt("name", read_name, str(prefix.network_address) if prefix else "")
    admin = AdminState(node.opt("admin", lambda n: n.as_choice(ADMIN_STATES), "up"))
    loopback = node.opt("loopback", Node.as_bool, False)
    check_node = node.get("check", required=True)
    check = _check(check_node, defaults) if check_node is not None else None
    origins = tuple(o for n in _list(node, "origins", required=True) if (o := _origin(n)) is not None)
    vip_attrs = read_state_attributes(node.get("attributes"), attrs)
    node.reject_unknown()
    origin_list = node.get("origins")
    if origin_list is not None and isinstance(origin_list.value, list):
        if not origin_list.value:
            origin_list.error("at least one origin region is needed")
        elif len(origin_list.value) > MAX_ORIGINS:
            origin_list.error(f"at most {MAX_ORIGINS} origin regions per VIP, got {len(origin_list.value)}")
        regions = [o.region for o in origins]
        for i, r in enumerate(regions):
            if r in regions[:i]:
                origin_list.error(f"duplicate origin region {r!r}", i)
    if check is not None and check.port is None:
        for i, o in enumerate(origins):
            if any(b.port == 0 for b in o.backends):
                node.error("a backend has no port and the check sets none", f"origins[{i}]")
    if prefix is None or check is None or vip_attrs is None or not origins or name is None:
        return None
    for o in origins:
        if o.next_hop.version != prefix.version:
            # The kernel route for a v6 VIP needs a v6 next hop (and v4 for v4).
            node.error(f"origin {o.region!r}: next_hop {o.next_hop} is not IPv{prefix.version} like the VIP")
            return None
    return Vip(name, prefix, admin, loopback, check, origins, vip_attrs)


def _within(prefix: IPNetwork, allowed: IPNetwork) -> bool:
    """``prefix.subnet_of(allowed)`` for networks of either family (False across families), on
    integers: subnet_of builds both broadcast addresses, a third of a VIP's build."""
    return (prefix.version == allowed.version and prefix.prefixlen >= allowed.prefixlen
            and int(prefix.network_address) & int(allowed.netmask) == int(allowed.network_address))


def _vip_prefix(node: Node) -> IPNetwork | None:
    """A VIP is a host prefix: 198.51.100.10, 198.51.100.10/32 or 2001:db8::10/128."""
    s = node.as_str()
    if s is None:
        return None
    try:
        net = ipaddress.ip_network(s, strict=True)
    except ValueError as exc:
        node.error(f"not an IP address or host prefix: {exc}")
        return None
    if net.prefixlen != net.max_prefixlen:
        node.error(f"a VIP must be a single address (/{net.max_prefixlen}), got {net}")
        return None
    return net


def _check(node: Node, defaults: dict[str, float | int]) -> HealthCheck | None:
    if not node.is_mapping():
        return None
    kind = node.req("type", lambda n: n.as_choice(CHECK_KINDS))
    port = node.opt("port", lambda n: n.as_int(1, 65535), None)
    path = node.opt("path", _http_path, "/")
    status = node.opt("expect_status", lambda n: n.as_int(100, 599), 200)
    body = node.opt("expect_body", Node.as_str, None)
    host_header = node.opt("host_header", _host_header, None)
    tls_verify = node.opt("tls_verify", Node.as_bool, False)
    interval = node.opt("interval", lambda n: n.as_float(0.01, 3600), float(defaults["interval"]))
    timeout = node.opt("timeout", lambda n: n.as_float(0.01, 600), float(defaults["timeout"]))
    rise = node.opt("rise", lambda n: n.as_int(1, 100), int(defaults["rise"]))
    fall = node.opt("fall", lambda n: n.as_int(1, 100), int(defaults["fall"]))
    watch = node.opt("watch", Node.as_bool,
                     bool(defaults["watch"]) if "watch" in defaults else WATCH_DEFAULT.get(kind or "", False))
    reuse = node.opt("reuse_connection", Node.as_bool, False)
    every = node.opt("fresh_connection_every", lambda n: n.as_int(1, 1_000_000), FRESH_CONNECTION_EVERY)
    node.reject_unknown()
    if kind == "tcp":
        for key in ("path", "expect_status", "expect_body", "host_header", "tls_verify"):
            if node.has(key):
                node.error("only for http/https checks", key)
    if reuse and kind in ("tcp", "https"):
        # TLS: a kept session would need its own close handling (close_notify); HTTPS checks
        # stay on the fresh-connection path.
        node.error(f"only for http checks ({kind} checks open a fresh connection every time)", "reuse_connection")
    if node.has("fresh_connection_every") and not reuse:
        node.error("only with reuse_connection: true", "fresh_connection_every")
    if timeout > interval:
        node.error(f"must not exceed interval ({interval}s), got {timeout}s", "timeout")
    if kind is None:
        return None
    return HealthCheck(kind, port, path, status, body, host_header, tls_verify, interval, timeout, rise, fall,
                       watch, reuse and kind == "http", every)


def _host_header(node: Node) -> str | None:
    s = node.as_str()
    if s is not None and (any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in s) or not s.isascii()):
        node.error(f"a Host header is ASCII without spaces or control characters, got {s!r}")
        return None
    return s


def _http_path(node: Node) -> str | None:
    s = node.as_str()
    if s is not None and (not s.startswith("/") or any(c.isspace() for c in s)):
        node.error(f"an HTTP path starts with '/' and has no spaces, got {s!r}")
        return None
    return s


def _origin(node: Node) -> Origin | None:
    if not node.is_mapping():
        return None
    region = node.req("region", read_name)
    next_hop: IPAddress | None = node.req("next_hop", _routable("next hop"))
    backends = tuple(b for n in _list(node, "backends", required=True) if (b := _backend(n)) is not None)
    min_healthy = node.opt("min_healthy", lambda n: n.as_int(1, 1000), 1)
    node.reject_unknown()
    bl = node.get("backends")
    if bl is not None and isinstance(bl.value, list):
        if not bl.value:
            bl.error("at least one backend is needed")
        elif min_healthy > len(bl.value):
            node.error(f"min_healthy {min_healthy} exceeds the {len(bl.value)} backend(s)", "min_healthy")
        seen: set[Backend] = set()  # equal Backends are the same ADDRESS:PORT text
        for i, b in enumerate(backends):
            if b in seen:
                bl.error(f"duplicate backend {b}", i)
            seen.add(b)
    if region is None or next_hop is None or not backends:
        return None
    return Origin(region, next_hop, backends, min_healthy)


def _routable(what: str, loopback_ok: bool = False) -> Callable[[Node], IPAddress | None]:
    """An address traffic can be sent to: not unspecified (0.0.0.0, ::) or multicast, and for
    a next hop not loopback (the kernel would route the VIP into this host)."""
    def read(node: Node) -> IPAddress | None:
        a = node.as_address()
        if a is not None and (a.is_unspecified or a.is_multicast or (a.is_loopback and not loopback_ok)):
            kind = "an unspecified" if a.is_unspecified else "a multicast" if a.is_multicast else "a loopback"
            node.error(f"{a} is {kind} address, not a {what}")
            return None
        return a
    return read


def refuse_empty(root: Node, key: str) -> None:
    """An empty ``allowed_prefixes`` is an error, not "no restriction"."""
    child = root.get(key)
    if child is not None and isinstance(child.value, list) and not child.value:
        child.error("at least one prefix is needed")


def _backend(node: Node) -> Backend | None:
    """A backend is ``ADDRESS:PORT``, ``[V6]:PORT``, a bare address, or a mapping."""
    if isinstance(node.value, dict):
        address: IPAddress | None = node.req("address", _routable("backend", loopback_ok=True))
        port = node.opt("port", lambda n: n.as_int(1, 65535), 0)
        node.reject_unknown()
        return Backend(address, port) if address is not None else None
    s = node.as_str()
    if s is None:
        return None
    host, port_text = s, "0"
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("0" if not rest else "x")
    elif s.count(":") == 1:
        host, port_text = s.split(":")
    try:
        parsed = ip_address(host)
        port_n = int(port_text)
        if not 0 <= port_n < 65536:
            raise ValueError
    except ValueError:
        node.error(f"expected ADDRESS, ADDRESS:PORT or [V6]:PORT, got {s!r}")
        return None
    if parsed.is_unspecified or parsed.is_multicast:
        node.error(f"{parsed} is {'an unspecified' if parsed.is_unspecified else 'a multicast'} address, "
                   "not a backend")
        return None
    return Backend(parsed, port_n)
