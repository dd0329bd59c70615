"""A lab topology declared in YAML (lab/topologies/*.yaml), as typed values with the
addresses derived from it. Errors name the file and the path.

A topology with an ``ipv6:`` section is dual-stack: every link also gets an IPv6 /64 from
the documentation prefix 2001:db8::/32 (the ``*6`` properties below), beside its IPv4
addresses, and the origins hold the IPv6 VIPs (/128) too."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml

from .netns import LabError

DEFAULT = Path(__file__).resolve().parent / "topologies" / "three-pops.yaml"


def _v6(address: str) -> str:
    """An IPv6 address as FRR and the kernel print it (2001:db8:100::1, not 2001:db8:100:0::1)."""
    return str(ipaddress.IPv6Address(address))


@dataclass(frozen=True)
class Origin:
    node: str
    region: str
    address: str
    ports: tuple[int, ...]
    address6: str | None = None  # its end of its backbone segment (a /64), dual-stack topologies


@dataclass(frozen=True)
class Transit:
    node: str
    asn: int


@dataclass(frozen=True)
class Pop:
    name: str
    asn: int
    transit: str
    index: int

    @property
    def router(self) -> str:
        return f"rtr-{self.name}"

    @property
    def agent(self) -> str:
        return f"pop-{self.name}"

    @property
    def uplink(self) -> tuple[str, str]:
        """(transit side, POP router side) addresses of the POP's link to its transit."""
        return f"100.100.{self.index}.1", f"100.100.{self.index}.2"

    def backbone_address(self, origin: Origin) -> str:
        """The agent host's address on an origin's backbone segment: what the origin sees as
        the source of client traffic (the agent host NATs), so it tells the ingress POP."""
        return f"{origin.address.rsplit('.', 1)[0]}.{11 + self.index}"

    @property
    def mgmt_address(self) -> str:
        return f"192.0.2.{11 + self.index}"

    @property
    def uplink6(self) -> tuple[str, str]:
        """``uplink`` in IPv6: (transit side, POP router side) of 2001:db8:100:INDEX::/64."""
        return _v6(f"2001:db8:100:{self.index}::1"), _v6(f"2001:db8:100:{self.index}::2")

    def backbone_address6(self, origin: Origin) -> str:
        """``backbone_address`` in IPv6: host ::(11+index) of the origin's /64 (hex, as written)."""
        if origin.address6 is None:
            raise LabError(f"origin {origin.node} has no IPv6 address")
        net = ipaddress.ip_interface(f"{origin.address6}/64").network
        return str(net.network_address + int(f"{11 + self.index}", 16))


@dataclass(frozen=True)
class Client:
    node: str
    region: str
    transit: str
    index: int

    @property
    def link(self) -> tuple[str, str]:
        """(transit side, client side)."""
        base = 128 + 4 * self.index
        return f"203.0.113.{base + 1}", f"203.0.113.{base + 2}"

    @property
    def link6(self) -> tuple[str, str]:
        """``link`` in IPv6: (transit side, client side) of 2001:db8:113:cINDEX::/64."""
        return _v6(f"2001:db8:113:c{self.index}::1"), _v6(f"2001:db8:113:c{self.index}::2")


@dataclass(frozen=True)
class Topology:
    name: str
    agent_asn: int
    controller_node: str
    controller_address: str
    vips: tuple[str, ...]
    origins: tuple[Origin, ...]
    transits: tuple[Transit, ...]
    transit_links: tuple[tuple[str, str], ...]
    pops: tuple[Pop, ...]
    clients: tuple[Client, ...]
    vips6: tuple[str, ...] = ()  # the IPv6 VIPs the origins hold; a dual-stack topology's
    ipv6: bool = False  # dual-stack: every link has IPv6 addresses too, and the BGP sessions IPv6 twins

    def transit(self, node: str) -> Transit:
        return next(t for t in self.transits if t.node == node)

    def pop(self, name: str) -> Pop:
        return next(p for p in self.pops if p.name == name)

    def pop_of_backbone_address(self, address: str) -> str | None:
        """The POP whose agent host has ``address`` (IPv4 or IPv6) on a backbone segment."""
        for p in self.pops:
            if any(p.backbone_address(o) == address for o in self.origins):
                return p.name
            if self.ipv6 and ":" in address and any(
                    ipaddress.ip_address(p.backbone_address6(o)) == ipaddress.ip_address(address)
                    for o in self.origins):
                return p.name
        return None

    def transit_link(self, k: int) -> tuple[str, str]:
        return f"203.0.113.{4 * k + 1}", f"203.0.113.{4 * k + 2}"

    def transit_link6(self, k: int) -> tuple[str, str]:
        return _v6(f"2001:db8:113:{k}::1"), _v6(f"2001:db8:113:{k}::2")


def load_topology(path: Path = DEFAULT) -> Topology:
    try:
        data = yaml.safe_load(path.read_text())
        transits = tuple(Transit(t["node"], int(t["asn"])) for t in data["transits"])
        names = {t.node for t in transits}
        links = tuple((a, b) for a, b in data["transit_links"])
        pops = tuple(Pop(p["name"], int(p["asn"]), p["transit"], i) for i, p in enumerate(data["pops"]))
        clients = tuple(Client(c["node"], c["region"], c["transit"], i) for i, c in enumerate(data["clients"]))
        v6 = data.get("ipv6")
        origins6 = dict(v6["origins"]) if v6 else {}
        origins = tuple(Origin(o["node"], o["region"], o["address"], tuple(o["ports"]), origins6.get(o["node"]))
                        for o in data["origins"])
        if v6:
            for o in origins:
                if o.address6 is None:
                    raise LabError(f"{path}: ipv6.origins: no address for origin {o.node!r}")
                ipaddress.IPv6Address(o.address6)
            for vip in v6["vips"]:
                ipaddress.IPv6Address(vip)
        for where, ref in [*(("transit_links", n) for link in links for n in link),
                           *((f"pops.{p.name}.transit", p.transit) for p in pops),
                           *((f"clients.{c.node}.transit", c.transit) for c in clients)]:
            if ref not in names:
                raise LabError(f"{path}: {where}: unknown transit {ref!r}")
        return Topology(
            name=data["name"], agent_asn=int(data["agent_asn"]), controller_node=data["controller"]["node"],
            controller_address=data["controller"]["address"], vips=tuple(data["vips"]),
            origins=origins, transits=transits, transit_links=links, pops=pops, clients=clients,
            vips6=tuple(v6["vips"]) if v6 else (), ipv6=bool(v6),
        )
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise LabError(f"{path}: cannot read the topology: {exc!r}") from None
