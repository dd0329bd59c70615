"""A committed change that only moves traffic rolls out in waves, and a failed gate rolls it
back: the controller as a real process on a git checkout of the example config, over real
HTTP on loopback, with reporters standing in for the three POPs' agents (each reports about
the plan it was last served). Loopback only: no lab lock needed.

Assertions read JSON only (``/v1/status``'s change section, each POP's ``/v1/plans``), and
polls are hang guards, never timing bounds. What a user of a POP sees is game-global's
active origin in its plan: the POPs whose wave has not come must keep the base's."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.poll import wait_for
from tests.helpers.controller_process import ControllerProcess, GitConfig, git

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "configs" / "controller"
TOKENS = {p: (EXAMPLE / "lab-tokens" / f"{p}.token").read_text().strip() for p in ("sjc", "fra", "sin", "operator")}
POPS = ("sin", "fra", "sjc")  # the waves' order: sin announces the fewest pairs, then fra (ties by name)
HANG = 120.0
BAKE = 4.0
HEALTHY = {"us-west": True, "eu-central": True}


class Fleet(GitConfig, ControllerProcess):
    """The controller on a git checkout, and one reporter thread per POP."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "desired"
        shutil.copytree(EXAMPLE, self.dir)

        def policy(c: dict[str, Any]) -> None:
            c["policy"]["failover"]["failback_hold_down"] = 1  # a reorder moves as soon as its wave comes
            c["change"] = {"rollout": {"bake": BAKE}}
        self.edit("controller.yaml", policy)
        git(self.dir, "init", "-q")
        git(self.dir, "add", "-A")
        git(self.dir, "commit", "-qm", "initial")
        super().__init__(self.dir, tmp / "state", tmp / "controller.log", TOKENS["operator"])
        self.must_be_up()
        self.origins: dict[str, dict[str, dict[str, bool]]] = {
            pop: {"game-global": dict(HEALTHY), **({"api-eu": dict(HEALTHY)} if pop != "sin" else {})} for pop in POPS}
        self.seen: dict[str, set[str]] = {pop: set() for pop in POPS}  # game-global's active origins served
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._report, args=(pop,), daemon=True) for pop in POPS]
        for t in self._threads:
            t.start()

    def plan(self, pop: str) -> dict[str, Any]:
        code, body = self.request("GET", f"/v1/plans/{pop}", token=TOKENS[pop])
        assert code == 200, body
        return body

    def active(self, pop: str) -> str:
        return str(next(v["active_origin"] for v in self.plan(pop)["vips"] if v["name"] == "game-global"))

    def change(self) -> dict[str, Any]:
        code, body = self.request("GET", "/v1/status", token=TOKENS["operator"])
        assert code == 200, body
        return body["change"]  # type: ignore[no-any-return]

    def _report(self, pop: str) -> None:
        """What an agent does: report its checks about the plan it was last served."""
        while not self._stop.wait(0.3):
            try:
                plan = self.plan(pop)
                for v in plan["vips"]:
                    if v["name"] == "game-global":
                        self.seen[pop].add(v["active_origin"])
                body = {"plan_generation": plan["generation"], "origins": self.origins[pop],
                        "announced": {v["name"]: v["wanted"] for v in plan["vips"]}}
                self.request("POST", f"/v1/reports/{pop}", json.dumps(body).encode(), token=TOKENS[pop])
            except (OSError, AssertionError, ValueError):
                continue  # the controller is busy or restarting: report next time

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        super().stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f  # (pytest runs the rest whatever the test's outcome)
    f.stop()


def reorder(fleet: Fleet) -> str:
    """Commit game-global's origins the other way round (eu-central first); the revision."""
    fleet.edit("vips.yaml", lambda v: next(x for x in v["vips"] if x["name"] == "game-global")["origins"].reverse())
    return fleet.commit("game-global: eu-central first")


def settled(fleet: Fleet) -> str:
    """Every POP on us-west, each having reported about its current plan; the base revision."""
    wait_for(lambda: all(fleet.active(p) == "us-west" for p in POPS), HANG, desc="every POP on us-west")
    wait_for(lambda: all(s["reported_plan_generation"] == s["plan_generation"]
                         for s in fleet.request("GET", "/v1/status", token=TOKENS["operator"])[1]["pops"]),
             HANG, desc="every POP reporting about its plan")
    for pop in POPS:
        fleet.seen[pop].clear()
    return str(fleet.change()["applied_revision"])


def test_a_commit_reordering_origins_rolls_out_one_wave_at_a_time(fleet: Fleet) -> None:
    base = settled(fleet)
    target = reorder(fleet)
    waves_seen: set[int] = set()

    def one_look() -> bool:
        """One consistent look (the wave did not move while the plans were read): the POPs of
        the waves so far on eu-central, the others still on us-west."""
        before = fleet.change()
        if before["target"] != target:
            return False
        if before["phase"] == "steady":
            return True
        assert before["phase"] == "rolling", before
        active = {pop: fleet.active(pop) for pop in POPS}
        after = fleet.change()
        if (after["phase"], after["wave"]) == ("rolling", before["wave"]):
            rolled = set(before["rolled"])
            assert {p for p, o in active.items() if o == "us-west"} >= set(POPS) - rolled, (active, before)
            if all(active[p] == "eu-central" for p in rolled):
                waves_seen.add(before["wave"])
        return False

    wait_for(one_look, HANG, 0.1, desc="the reorder rolled out")
    done = fleet.change()
    assert (done["phase"], done["base"], done["applied_revision"]) == ("steady", target, target)
    assert waves_seen == {0, 1, 2}, waves_seen  # each wave seen on its own: sin, then fra, then sjc
    wait_for(lambda: all(fleet.active(p) == "eu-central" for p in POPS), HANG, desc="every POP on eu-central")
    assert base != target


def test_a_reorder_whose_new_origin_fails_at_the_first_wave_is_rolled_back(fleet: Fleet) -> None:
    """sin's checks see eu-central down (us-west fine there: no quorum sees it down, nothing
    fails over). The reorder sends sin to eu-central in the first wave; sin's report fails
    the gate; the controller serves the base again, with an alarm; fra and sjc, whose waves
    never came, stayed on us-west throughout."""
    fleet.origins["sin"]["game-global"] = {"us-west": True, "eu-central": False}
    base = settled(fleet)
    target = reorder(fleet)
    back = wait_for(lambda: (c := fleet.change())["target"] == target and c["phase"] == "rolled_back" and c, HANG,
                    desc="the rollout rolled back")
    assert (back["applied_revision"], back["rolled"]) == (base, [])
    assert back["waves"][0] == ["sin"] and "sin reports game-global's new active origin eu-central down" in back[
        "detail"], back
    code, status = fleet.request("GET", "/v1/status", token=TOKENS["operator"])
    assert code == 200 and status["alarms"][0]["kind"] == "rollout_rolled_back"
    wait_for(lambda: fleet.active("sin") == "us-west", HANG, desc="sin back on us-west")
    assert fleet.seen["fra"] == {"us-west"} and fleet.seen["sjc"] == {"us-west"}  # never touched
