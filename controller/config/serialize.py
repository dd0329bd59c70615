"""A VIP definition as plain data, in the config's own format.

The controller sends each POP the full definition of the VIPs it publishes; the agent
parses it back with the same ``read_vip`` as its own config file, so a plan gets the same
validation (and the same path-naming errors) as a config.
"""

from __future__ import annotations

from typing import Any

from .model import FRESH_CONNECTION_EVERY, WATCH_DEFAULT, Attributes, Backend, HealthCheck, Origin, Vip


def vip_to_dict(vip: Vip) -> dict[str, Any]:
    return {
        "name": vip.name,
        "address": str(vip.prefix),
        "admin": str(vip.admin),
        "loopback": vip.loopback,
        "check": _check(vip.check),
        "origins": [_origin(o) for o in vip.origins],
        "attributes": {"up": _attrs(vip.attributes.up), "draining": _attrs(vip.attributes.draining)},
    }


def _check(c: HealthCheck) -> dict[str, Any]:
    d: dict[str, Any] = {"type": c.kind, "interval": c.interval, "timeout": c.timeout, "rise": c.rise, "fall": c.fall}
    if c.port is not None:
        d["port"] = c.port
    if c.watch != WATCH_DEFAULT[c.kind]:
        d["watch"] = c.watch  # only when set: plans of configs without it stay as they were
    if c.reuse_connection:  # only when set, as watch
        d["reuse_connection"] = True
        if c.fresh_connection_every != FRESH_CONNECTION_EVERY:
            d["fresh_connection_every"] = c.fresh_connection_every
    if c.kind != "tcp":
        d.update(path=c.path, expect_status=c.expect_status, tls_verify=c.tls_verify)
        if c.expect_body is not None:
            d["expect_body"] = c.expect_body
        if c.host_header is not None:
            d["host_header"] = c.host_header
    return d


def _origin(o: Origin) -> dict[str, Any]:
    return {"region": o.region, "next_hop": str(o.next_hop), "min_healthy": o.min_healthy,
            "backends": [_backend(b) for b in o.backends]}


def _backend(b: Backend) -> dict[str, Any]:
    return {"address": str(b.address), "port": b.port} if b.port else {"address": str(b.address)}


def _attrs(a: Attributes) -> dict[str, Any]:
    d: dict[str, Any] = {"as_path_prepend": a.as_path_prepend, "communities": list(a.communities),
                         "large_communities": list(a.large_communities)}
    if a.extended_communities:  # only when set: plans and hashes without them stay as they were
        d["extended_communities"] = list(a.extended_communities)
    if a.med is not None:
        d["med"] = a.med
    return d
