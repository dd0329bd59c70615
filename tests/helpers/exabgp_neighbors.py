"""The neighbour specs the ExaBGP config tests render: unit (golden file) and integration (real ExaBGP)."""

from __future__ import annotations

from controller.bgp.exabgp_config import NeighborSpec

# A dual-stack POP: one session per family (see NeighborSpec on why), one with a password.
NEIGHBORS = [
    NeighborSpec(
        address="100.64.1.1",
        local_address="100.64.1.2",
        router_id="100.64.1.2",
        local_as=65101,
        peer_as=65000,
        md5_password="s3cret pass!",
    ),
    NeighborSpec(
        address="fd00:64:1::1",
        local_address="fd00:64:1::2",
        router_id="100.64.1.2",
        local_as=65101,
        peer_as=65000,
        hold_time=3,
        passive=True,
    ),
]
