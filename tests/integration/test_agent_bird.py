"""The agent against BIRD 2 (Debian's bird2) as the upstream router, beside the FRR tests.

    bird (BIRD 2, AS 65001) 100.64.1.1 ---- 100.64.1.2 pop (ExaBGP + anycast-agent, AS 65101)
                                                       100.64.10.2 ---- 100.64.10.1 usw (origin us-west)

The agent runs configs/agent-sjc.yaml (its standby origin is absent here, which only fails
the standby's checks). Announce with the up attributes, withdraw on backend failure, come
back, the draining attributes, and a restart with graceful restart that leaves the route in
place at BIRD. Then IPv6 (the links are dual-stack: fd00:64:1::1 -- ::2, fd00:64:10::1 --
::2; BIRD's protocol ``agent6`` peers over IPv6 for IPv6 unicast): a /128 VIP over the IPv6
session, withdrawn on failure; and a TCP-MD5-protected session (BIRD's ``password``, the
agent's ``md5_password``: this kernel has TCP MD5 signatures, see LAB-NOTES). Assertions
read parsed ``birdc`` output (lab/bird.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from lab.bird import BirdRouter, bird_available
from lab.netns import Lab, Netns, add_addr, add_route, veth
from lab.nodes import AgentNode, start_backend
from lab.poll import wait_for
from lab.single_pop import AGENT_CONFIG, VIP

PREFIX = f"{VIP}/32"
pytestmark = pytest.mark.lab
AGENT = os.path.join(os.path.dirname(sys.executable), "anycast-agent")

BIRD_CONF = """\
router id 100.64.1.1;
log "{log}" all;
protocol device {{ }}
protocol bgp agent {{
  local 100.64.1.1 as 65001;
  neighbor 100.64.1.2 as 65101;
  hold time 3;
  connect retry time 1;
  graceful restart on;{password}
  ipv4 {{ import all; export none; }};
}}
protocol bgp agent6 {{
  local fd00:64:1::1 as 65001;
  neighbor fd00:64:1::2 as 65101;
  hold time 3;
  connect retry time 1;
  ipv6 {{ import all; export none; }};
}}
"""
VIP6, BIRD6, POP6, USW6 = "2001:db8:51::10", "fd00:64:1::1", "fd00:64:1::2", "fd00:64:10::1"
PREFIX6 = f"{VIP6}/128"
# '#' and '!' inside the quotes: the password reaches both ends intact or the session stays down.
MD5_PASSWORD = "s3cret!p#ss"


def bird_conf(log: object, password: str | None = None) -> str:
    return BIRD_CONF.format(log=log, password=f'\n  password "{password}";' if password else "")


class BirdPop:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.nodes: dict[str, Netns] = {n: lab.netns(n) for n in ("bird", "pop", "usw")}
        bird, pop, usw = self.nodes["bird"], self.nodes["pop"], self.nodes["usw"]
        veth(bird, "eth-pop", pop, "eth-rtr")
        add_addr(bird, "eth-pop", "100.64.1.1/30")
        add_addr(pop, "eth-rtr", "100.64.1.2/30")
        veth(pop, "eth-usw", usw, "eth-pop")
        add_addr(pop, "eth-usw", "100.64.10.2/30")
        add_addr(usw, "eth-pop", "100.64.10.1/30")
        add_route(usw, "default", "100.64.10.2")
        add_addr(bird, "eth-pop", f"{BIRD6}/64")
        add_addr(pop, "eth-rtr", f"{POP6}/64")
        add_addr(pop, "eth-usw", "fd00:64:10::2/64")
        add_addr(usw, "eth-pop", f"{USW6}/64")
        add_route(usw, "default", "fd00:64:10::2")
        workdir = lab.workdir("bird")
        self.bird_log = workdir / "bird.log"
        self.router = BirdRouter(bird, workdir, bird_conf(self.bird_log)).start()
        self.config = lab.workdir("pop") / "agent.yaml"
        shutil.copy(AGENT_CONFIG, self.config)
        self.agent: AgentNode | None = None
        self.backend: Any = None

    def start_backends(self) -> None:
        self.backend = start_backend(self.nodes["usw"], self.lab.workdir("usw"), "us-west",
                                     ["100.64.10.1:8080", "100.64.10.1:8081", f"[{USW6}]:8080"])

    def stop_backends(self) -> None:
        if self.backend is not None:
            self.nodes["usw"].terminate(self.backend.pid)
            self.backend = None

    def start_agent(self) -> None:
        self.agent = AgentNode(self.nodes["pop"], self.lab.workdir("pop"), self.config)
        self.agent.start()

    def stop_service(self) -> None:
        """systemd's stop: ExecStop (the agent first), then SIGTERM to ExaBGP."""
        if self.agent is None or not self.agent.running():
            return
        stop = self.nodes["pop"].popen([AGENT, "stop", "--config", str(self.config), "--state-dir",
                                        str(self.lab.workdir("pop") / "state"), "--timeout", "30"])
        stop.wait(60)
        self.agent.stop_exabgp(signal.SIGTERM, 60)

    def configure(self, **changes: Any) -> None:
        data = yaml.safe_load(AGENT_CONFIG.read_text())
        data["shutdown"] = changes.pop("shutdown", "withdraw")
        admin = changes.pop("admin", None)
        if admin:
            data["vips"][0]["admin"] = admin
        md5 = changes.pop("md5_password", None)
        if md5:
            data["bgp"]["neighbors"][0]["md5_password"] = md5
        if changes.pop("ipv6", False):
            data["bgp"]["neighbors"].append({"address": BIRD6, "local_address": POP6, "router_id": "100.64.1.2",
                                             "peer_as": 65001, "hold_time": 3})
            data["vips"].append({"name": "game-v6", "address": PREFIX6, "check": dict(data["vips"][0]["check"]),
                                 "origins": [{"region": "us-west", "next_hop": USW6, "backends": [f"[{USW6}]:8080"]}]})
        data["bgp"].update(changes)
        self.config.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def pop(lab_preflight: None) -> Iterator[BirdPop]:
    reason = bird_available()
    if reason:
        pytest.fail(f"BIRD tests cannot run here: {reason} (make system-deps)", pytrace=False)
    lab = Lab("t-bird-")
    try:
        topo = BirdPop(lab)
        topo.start_backends()
        yield topo
    finally:
        lab.teardown()


def announced(pop: BirdPop, timeout: float = 60.0) -> Any:
    return wait_for(lambda: pop.router.route(PREFIX), timeout, desc=f"{PREFIX} at BIRD")


def restart(pop: BirdPop) -> None:
    pop.stop_service()
    pop.start_agent()
    wait_for(lambda: pop.agent is not None and pop.agent.agent_pid(), 60, desc="agent running")


def test_announce_withdraw_on_backend_failure_and_back(pop: BirdPop) -> None:
    pop.configure()
    restart(pop)
    route = announced(pop)
    assert route.as_path == (65101,)
    assert route.med == 100
    assert route.communities == ((65101, 100),)
    assert pop.router.protocol_state("agent") == "Established"
    pop.stop_backends()
    wait_for(lambda: pop.router.route(PREFIX) is None, 60, desc="withdrawal reached BIRD")
    pop.start_backends()
    announced(pop)


def test_draining_attributes_reach_bird(pop: BirdPop) -> None:
    pop.configure(admin="drain")
    restart(pop)
    route = wait_for(lambda: (r := pop.router.route(PREFIX)) is not None and r.med == 1000 and r, 60,
                     desc="draining MED at BIRD")
    assert route.as_path == (65101, 65101, 65101, 65101)
    assert route.communities == ((65101, 666),)


def count_removals(pop: BirdPop, graceful_restart: int) -> int:
    pop.configure(shutdown="keep", graceful_restart=graceful_restart)
    restart(pop)
    announced(pop)
    time.sleep(1.0)  # past the End-of-RIB of this start
    removals, present, done = 0, True, threading.Event()

    def sample() -> None:
        nonlocal removals, present
        while not done.is_set():
            now = pop.router.route(PREFIX) is not None
            removals += 1 if present and not now else 0
            present = now
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        restart(pop)
        announced(pop)
        time.sleep(1.5)  # and it stays after the new agent's End-of-RIB
    finally:
        done.set()
        sampler.join()
    return removals


def test_restart_with_graceful_restart_does_not_remove_the_route_at_bird(pop: BirdPop) -> None:
    without = count_removals(pop, 0)
    with_gr = count_removals(pop, 60)
    print(f"\nremovals at BIRD during a unit restart: without GR {without}, with GR {with_gr}")
    assert without >= 1
    assert with_gr == 0
    pop.configure()
    pop.stop_service()


def test_ipv6_session_carries_a_128_vip_and_its_withdrawal(pop: BirdPop) -> None:
    pop.configure(ipv6=True)
    restart(pop)
    route = wait_for(lambda: pop.router.route(PREFIX6), 60, desc=f"{PREFIX6} at BIRD")
    assert (route.as_path, route.med, route.communities) == ((65101,), 100, ((65101, 100),))
    assert pop.router.protocol_state("agent6") == "Established"
    assert "via fd00:64:1::2" in route.raw  # learnt over the IPv6 session, next hop self
    announced(pop)  # and the IPv4 VIP over the IPv4 session, from the same agent
    pop.stop_backends()
    wait_for(lambda: pop.router.route(PREFIX6) is None, 60, desc=f"{PREFIX6} withdrawn at BIRD")
    pop.start_backends()
    wait_for(lambda: pop.router.route(PREFIX6), 60, desc=f"{PREFIX6} back at BIRD")


def test_an_md5_protected_session_comes_up_with_the_right_password_only(pop: BirdPop) -> None:
    pop.router.reconfigure(bird_conf(pop.bird_log, MD5_PASSWORD))
    try:
        pop.configure(md5_password=MD5_PASSWORD)
        restart(pop)
        route = announced(pop)
        assert route.med == 100
        assert pop.router.protocol_state("agent") == "Established"
        # The same session without the agent's password never comes up: BIRD really checks it.
        pop.configure()
        restart(pop)
        wait_for(lambda: pop.router.route(PREFIX) is None, 60, desc="the old session's route gone at BIRD")
        time.sleep(5.0)  # a lower bound, not a limit: five connect retries (connect retry time 1)
        assert pop.router.protocol_state("agent") != "Established"
        assert pop.router.route(PREFIX) is None
    finally:
        pop.router.reconfigure(bird_conf(pop.bird_log))
        pop.configure()
        pop.stop_service()
