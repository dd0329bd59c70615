"""The route-protocol claim: a second agent with the same mark in a namespace is refused."""

from __future__ import annotations

import pytest

from controller.kernel.claim import RouteProtocolInUse, claim_route_protocol


def test_a_second_claim_of_one_mark_is_refused_until_the_first_is_released() -> None:
    first = claim_route_protocol(251)
    try:
        with pytest.raises(RouteProtocolInUse, match="kernel.route_protocol 251 is already used"):
            claim_route_protocol(251)
        other = claim_route_protocol(252)  # another mark is another agent's business
        other.close()
    finally:
        first.close()
    claim_route_protocol(251).close()  # released with its holder, no stale lock left
