"""The HA shell's answer for everything a follower (or a term that ended) does not serve."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from controller.server.etcd import LeaderInfo
from controller.server.ha import Shell


def test_not_the_leader_names_the_leader_and_closes_the_connection() -> None:
    lead = SimpleNamespace(name="ctl-b", leader=LeaderInfo("ctl-c", "https://192.0.2.103:9800", 1.0))
    response = Shell(cast(Any, lead)).not_leader()
    assert response.status == 503
    assert response.text is not None and "https://192.0.2.103:9800" in response.text
    # kept alive, the connection would stay with the app that answered, not with the one
    # listening on the port next (the agent's next request must reach that one)
    assert response.keep_alive is False
