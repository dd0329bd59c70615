"""The controller with two real agents (ExaBGP + anycast-agent, each peering with its own
FRR router), over real HTTP between namespaces: plans reach the agents and their routers,
and the agents stay safe when the controller goes away."""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab.multi_pop import MultiPop
from lab.netns import Lab
from lab.poll import wait_for

pytestmark = pytest.mark.lab
GAME, API = "198.51.100.10", "198.51.100.20"


def no_dampening(config_dir: Path) -> None:
    """These tests break and heal sjc's checks several times a minute, which the example's
    dampening (3 changes in 60 s) would rightly hold down; dampening has its own unit tests."""
    path = config_dir / "controller.yaml"
    data = yaml.safe_load(path.read_text())
    data["policy"]["dampening"]["flaps"] = 100
    path.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def fleet(lab_preflight: None) -> Iterator[MultiPop]:
    lab = Lab("t-ctl-")
    try:
        f = MultiPop(lab).up()
        f.prepare_config(no_dampening)
        f.start_controller()
        for node in ("usw", "euc"):
            f.start_backends(node)
        for pop in f.pops:
            f.start_agent(pop)
        yield f
    finally:
        lab.teardown()


def metric_line(text: str, prefix: str) -> str:
    return next((line for line in text.splitlines() if line.startswith(prefix)), "")


def test_plans_reach_the_agents_and_their_routers(fleet: MultiPop) -> None:
    for pop in fleet.pops:  # game-global at sjc and fra, api-eu at fra and sjc
        wait_for(lambda: fleet.announced(pop, GAME) and fleet.announced(pop, API), 60,
                 desc=f"both VIPs at {pop}'s router")
    log = fleet.agents["sjc"].log()
    assert "following plan generation" in log and "from controller" in log
    assert 'anycast_agent_info{plan_source="controller",pop="sjc"' in fleet.agents["sjc"].metrics()


def test_a_committed_publish_change_moves_only_what_it_names(fleet: MultiPop) -> None:
    wait_for(lambda: fleet.announced("sjc", API) and fleet.announced("fra", API), 60, desc="api-eu at both")
    data = yaml.safe_load((fleet.config_dir / "vips.yaml").read_text())
    data["vips"][1]["publish"] = ["fra"]
    (fleet.config_dir / "vips.yaml").write_text(yaml.safe_dump(data))
    started = time.monotonic()
    fleet.commit("api-eu: fra only")
    fra_kept = True
    while fleet.announced("sjc", API):
        fra_kept = fra_kept and fleet.announced("fra", API) and fleet.announced("sjc", GAME)
        assert time.monotonic() - started < 60, "sjc still announces api-eu 60 s after the commit"
        time.sleep(0.05)
    took = time.monotonic() - started
    assert fra_kept, "fra's api-eu or sjc's game-global flapped during the change"
    assert fleet.announced("fra", API) and fleet.announced("sjc", GAME)
    assert "withdraw 198.51.100.20/32 (VIP 198.51.100.20), reason not_in_plan" in fleet.agents["sjc"].log()
    print(f"publish change: commit -> withdrawn at sjc's router in {took * 1000:.0f} ms")


def test_controller_down_agents_keep_announcing_and_still_withdraw_locally(fleet: MultiPop) -> None:
    wait_for(lambda: all(fleet.announced(p, GAME) for p in fleet.pops), 60, desc="game-global everywhere")
    fleet.stop_controller()
    try:
        wait_for(lambda: "anycast_controller_reachable 0.0" in fleet.agents["sjc"].metrics(), 60,
                 desc="sjc's agent noticed the controller is gone")
        assert all(fleet.announced(p, GAME) for p in fleet.pops)  # static stability
        fleet.stop_backends("usw")  # game-global's active origin fails, no controller to move it
        for pop in fleet.pops:
            wait_for(lambda: not fleet.announced(pop, GAME), 60, desc=f"{pop} withdraws game-global locally")
        assert fleet.announced("fra", API)  # api-eu's origin (eu-central) is fine: untouched
        fleet.start_backends("usw")
        for pop in fleet.pops:
            wait_for(lambda: fleet.announced(pop, GAME), 60, desc=f"{pop} re-announces after rise")
        # An agent restarted while the controller is down starts from its cached plan.
        fleet.agents["sjc"].stop_exabgp(signal.SIGTERM)
        wait_for(lambda: not fleet.announced("sjc", GAME), 60, desc="sjc down with its service")
        fleet.start_agent("sjc")
        wait_for(lambda: fleet.announced("sjc", GAME), 60, desc="sjc back from its cached plan")
        assert "starting from the cached plan generation" in fleet.agents["sjc"].log()
    finally:
        if fleet.controller is None:
            fleet.start_controller()
    for pop in fleet.pops:
        wait_for(lambda: "anycast_controller_reachable 1.0" in fleet.agents[pop].metrics(), 60,
                 desc=f"{pop} reconnected to the restarted controller")


def healthy_everywhere(fleet: MultiPop) -> None:
    """Every POP announces game-global because its checks pass (not on a safety hold left
    over from an earlier test), so what a test then breaks is a fresh failure."""
    for pop in fleet.pops:
        wait_for(lambda: re.search(r'anycast_vip_reason\{origin="[^"]+",reason="healthy",vip="game-global"\} 1.0',
                                   fleet.agents[pop].metrics()) and fleet.announced(pop, GAME), 60,
                 desc=f"game-global healthy and announced at {pop}")


def dump(fleet: MultiPop) -> None:
    print("=== controller ===\n" + "\n".join(fleet.controller_log().splitlines()[-60:]))
    for pop in fleet.pops:
        print(f"=== agent {pop} ===\n" + "\n".join(fleet.agents[pop].log().splitlines()[-60:]))


def cut_checks(fleet: MultiPop, pop: str) -> None:
    """Drop the agent host's health checks (ports 8080/8081) but nothing else: clients'
    traffic to the VIPs (port 80) still flows, like a backbone cut on the checks' path."""
    ns = fleet.nodes[f"pop-{pop}"]
    ns.run(["nft", "add table inet cutchecks"])
    ns.run(["nft", "add chain inet cutchecks out { type filter hook output priority 0 ; }"])
    ns.run(["nft", "add rule inet cutchecks out tcp dport { 8080, 8081 } drop"])


def restore_checks(fleet: MultiPop, pop: str) -> None:
    fleet.nodes[f"pop-{pop}"].run(["nft", "delete table inet cutchecks"], check=False)


def test_checks_failing_everywhere_do_not_withdraw_the_vip_anywhere(fleet: MultiPop) -> None:
    """The Oct 2021 failure mode: every POP's checks fail at once. The agents ask the
    controller before withdrawing, the controller sees it everywhere and holds."""
    healthy_everywhere(fleet)
    for pop in fleet.pops:
        cut_checks(fleet, pop)
    try:
        started = time.monotonic()
        missing = []
        while time.monotonic() - started < 5:  # fall is reached after ~0.4 s; watch well past it
            missing += [p for p in fleet.pops if not fleet.announced(p, GAME)]
            time.sleep(0.02)
        if missing:
            dump(fleet)
        assert missing == [], f"withdrawn at {sorted(set(missing))} although only the checks failed"
        assert "reason safety_hold" in fleet.agents["sjc"].log()
        alarms = fleet.nodes["mgmt"].run([sys.executable, "-c", (
            "import urllib.request;print(urllib.request.urlopen('http://192.0.2.1:9801/metrics').read().decode())")]).stdout
        assert 'anycast_controller_alarm{kind="checks_down_everywhere",vip="game-global"} 1.0' in alarms
        # The checks heal, each POP at its own moment: nobody is let go on the way back.
        for pop in fleet.pops:
            restore_checks(fleet, pop)
        started = time.monotonic()
        while time.monotonic() - started < 3:
            missing += [p for p in fleet.pops if not fleet.announced(p, GAME)]
            time.sleep(0.02)
        if missing:
            dump(fleet)
        assert missing == [], f"withdrawn at {sorted(set(missing))} while the checks recovered"
    finally:
        for pop in fleet.pops:
            restore_checks(fleet, pop)


def test_checks_failing_at_one_pop_withdraw_there_only(fleet: MultiPop) -> None:
    healthy_everywhere(fleet)
    cut_checks(fleet, "sjc")
    try:
        started = time.monotonic()
        try:
            wait_for(lambda: not fleet.announced("sjc", GAME), 60, desc="sjc withdraws game-global")
        except TimeoutError:
            dump(fleet)
            raise
        took = time.monotonic() - started
        assert fleet.announced("fra", GAME)
        log = fleet.agents["sjc"].log()
        assert "reason awaiting_controller" in log  # it asked first...
        assert "withdraw 198.51.100.10/32 (VIP game-global), reason backend_down" in log  # ...and was allowed
        print(f"one POP's checks cut -> withdrawn at its router in {took * 1000:.0f} ms (check 0.2 s x fall 2)")
    finally:
        restore_checks(fleet, "sjc")
    try:
        wait_for(lambda: fleet.announced("sjc", GAME), 60, desc="sjc back")
    except TimeoutError:
        dump(fleet)
        raise
