"""Fleet.ingress_fib: the POP a client's packets reach, read hop by hop from the transits'
kernel routes (fakes here; the lab's wait_converged runs it against real ones)."""

from __future__ import annotations

from typing import Any

from lab.fleet import Fleet
from lab.topology import load_topology

TOPO = load_topology()
VIP = "198.51.100.10"


class FakeRouter:
    def __init__(self, routes: list[dict[str, Any]]) -> None:
        self.routes = routes

    def fib_routes(self, prefix: str) -> list[dict[str, Any]]:
        assert prefix == f"{VIP}/32"
        return self.routes


def fleet(**fibs: list[dict[str, Any]]) -> Fleet:
    """A Fleet with only its topology and its transits' FIBs (``t_na=[...]``: t-na's routes)."""
    f = Fleet.__new__(Fleet)
    f.topo = TOPO
    f.routers = {t.node: FakeRouter(fibs.get(t.node.replace("-", "_"), [])) for t in TOPO.transits}  # type: ignore[misc]
    return f


def bgp(dev: str) -> dict[str, Any]:
    return {"dst": VIP, "gateway": "203.0.113.1", "dev": dev, "protocol": "bgp"}


def test_the_pop_on_the_clients_own_transit() -> None:
    assert fleet(t_na=[bgp("to-sjc")]).ingress_fib("c-na", VIP) == "sjc"


def test_through_another_transit_to_its_pop() -> None:
    f = fleet(t_na=[bgp("to-t-eu")], t_eu=[bgp("to-fra")])
    assert f.ingress_fib("c-na", VIP) == "fra"


def test_no_route_yet_is_none_not_a_guess() -> None:
    # bgpd may already have the best path while zebra has not installed it: no kernel route.
    assert fleet().ingress_fib("c-na", VIP) is None
    assert fleet(t_na=[bgp("to-t-eu")]).ingress_fib("c-na", VIP) is None  # the next hop's FIB lags
    # A route not from BGP (a connected or static one) is not the VIP's path.
    assert fleet(t_na=[{**bgp("to-sjc"), "protocol": "static"}]).ingress_fib("c-na", VIP) is None


def test_a_multipath_route_or_a_loop_is_none() -> None:
    assert fleet(t_na=[bgp("to-sjc"), bgp("to-t-eu")]).ingress_fib("c-na", VIP) is None
    assert fleet(t_na=[{"dst": VIP, "protocol": "bgp", "nexthops": []}]).ingress_fib("c-na", VIP) is None
    looping = fleet(t_na=[bgp("to-t-eu")], t_eu=[bgp("to-t-na")])
    assert looping.ingress_fib("c-na", VIP) is None


def test_a_pop_behind_another_transit_is_not_reached_through_this_one() -> None:
    # t-na's interface to fra does not exist: a route naming it is nothing this walk trusts.
    assert fleet(t_na=[bgp("to-fra")]).ingress_fib("c-na", VIP) is None
