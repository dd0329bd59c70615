"""Graceful shutdown (RFC 8326) and graceful restart (RFC 4724) with real ExaBGP and FRR.

- A planned stop (systemd's ExecStop, ``anycast-agent stop``) with ``bgp.graceful_shutdown``
  first re-announces the VIP with 65535:0 and the draining attributes, then withdraws it.
- A unit restart (ExecStop, SIGTERM to ExaBGP, start again) with ``shutdown: keep``: without
  ``bgp.graceful_restart`` the router removes the VIP and adds it back; with it, the router
  keeps the path (stale) and the new agent refreshes it: measured as removals seen at FRR,
  sampled every few ms through bgpd's vty socket, before/after.

Assertions read FRR's JSON and ``ip -j``. lab/single_pop.py builds the POP.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from lab.poll import wait_for
from lab.single_pop import AGENT_CONFIG, VIP, SinglePop, serving

PREFIX = f"{VIP}/32"
pytestmark = pytest.mark.lab
AGENT = os.path.join(os.path.dirname(sys.executable), "anycast-agent")


@pytest.fixture(scope="module")
def pop(lab_preflight: None) -> Iterator[SinglePop]:
    with serving("t-grace-", agent=False) as topo:
        yield topo


def configure(pop: SinglePop, **bgp: Any) -> None:
    data = yaml.safe_load(AGENT_CONFIG.read_text())
    data["shutdown"] = bgp.pop("shutdown", "withdraw")
    data["bgp"].update(bgp)
    pop.agent_config.write_text(yaml.safe_dump(data))


def path(pop: SinglePop) -> dict[str, Any] | None:
    entry = pop.router.bgp_route(PREFIX)
    return entry["paths"][0] if entry else None


def start(pop: SinglePop) -> None:
    pop.start_agent()
    wait_for(lambda: (p := path(pop)) is not None and not p.get("stale"), 60, desc=f"{PREFIX} announced")
    wait_for(pop.agent_pid, 60, desc="agent running")


def exec_stop(pop: SinglePop) -> Any:
    """systemd's ExecStop: returns the running ``anycast-agent stop``."""
    assert pop.agent is not None
    return pop.nodes["pop"].popen([AGENT, "stop", "--config", str(pop.agent_config),
                                   "--state-dir", str(pop.workdir("pop") / "state"), "--timeout", "30"])


def systemd_stop(pop: SinglePop) -> None:
    """ExecStop, then SIGTERM to what is left (ExaBGP and an idle respawned agent)."""
    exec_stop(pop).wait(60)
    pop.stop_exabgp(signal.SIGTERM, timeout=60)


def test_planned_stop_announces_graceful_shutdown_then_withdraws(pop: SinglePop) -> None:
    configure(pop, graceful_shutdown=1.5)
    start(pop)
    stopping = exec_stop(pop)
    marked = wait_for(lambda: (p := path(pop)) is not None and "gracefulShutdown" in p.get("community", {})
                      .get("list", []) and p, 60, desc="the VIP re-announced with GRACEFUL_SHUTDOWN")
    assert marked["metric"] == 1000  # the draining attributes
    assert marked["aspath"]["string"] == "65101 65101 65101 65101"
    assert "65101:666" in marked["community"]["list"]
    wait_for(lambda: path(pop) is None, 60, desc="then withdrawn")
    assert stopping.wait(60) == 0
    out = pop.nodes["pop"].run(["ip", "-j", "route", "show", "proto", "99"]).stdout
    assert out.strip() in ("", "[]")  # the kernel route went with it
    pop.stop_exabgp(signal.SIGTERM, timeout=60)


class RemovalCounter:
    """Samples FRR's table in a thread; counts the times the VIP disappeared."""

    def __init__(self, pop: SinglePop) -> None:
        self.pop, self.removals, self.samples, self.stale = pop, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        present = True
        while not self._stop.is_set():
            p = path(self.pop)
            self.samples += 1
            self.stale += 1 if p is not None and p.get("stale") else 0
            if present and p is None:
                self.removals += 1
            present = p is not None
            time.sleep(0.005)

    def __enter__(self) -> RemovalCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def restart_removals(pop: SinglePop, graceful_restart: int) -> RemovalCounter:
    configure(pop, shutdown="keep", graceful_restart=graceful_restart)
    start(pop)
    with RemovalCounter(pop) as counter:
        systemd_stop(pop)
        start(pop)
        time.sleep(1.0)  # and it stays after the End-of-RIB
    systemd_stop(pop)
    return counter


def test_restart_with_graceful_restart_keeps_the_route_at_the_router(pop: SinglePop) -> None:
    before = restart_removals(pop, 0)
    after = restart_removals(pop, 60)
    print(f"\nremovals at FRR during a unit restart: without GR {before.removals} "
          f"({before.samples} samples), with GR {after.removals} ({after.samples} samples, "
          f"{after.stale} stale)")
    assert before.removals >= 1  # the measurement sees a flap when there is one
    assert after.removals == 0
    assert after.stale > 0  # FRR kept the path as stale while ExaBGP was down
