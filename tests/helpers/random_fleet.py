"""Random fleets, commits and POP reports for the randomized differential tests (the
incremental planning engine, the controller's index, serving with hints)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from controller.config.desired import load_desired
from controller.config.desired_model import DesiredState, FleetVip, Preference, Steering
from controller.policy.model import OriginChecks, PopReport

ROOT = Path(__file__).resolve().parents[2]
BASE = load_desired(str(ROOT / "configs" / "controller"), "rev1")
POPS = ("sjc", "fra", "sin", "iad", "nrt", "gru")


def random_policy(fv: FleetVip, rng: random.Random) -> FleetVip:
    """Short timers so that every one of them runs out many times in a sequence."""
    p = fv.policy
    p = dataclasses.replace(
        p,
        failover=dataclasses.replace(p.failover, failback_hold_down=rng.choice((4.0, 8.0)),
                                     quorum=rng.choice((0.5, 0.34)), min_down_pops=rng.choice((1, 2))),
        safety=dataclasses.replace(p.safety, settle=rng.choice((1.0, 1.5)), withdraw_rate_window=rng.choice((6.0, 10.0)),
                                   withdraw_rate_max=rng.choice((1, 2)), report_stale_after=rng.choice((4.0, 6.0)),
                                   max_withdraw_fraction=rng.choice((0.5, 0.75))),
        drain=dataclasses.replace(p.drain, drain_time=rng.choice((3.0, 5.0))),
        dampening=dataclasses.replace(p.dampening, flaps=3, window=rng.choice((8.0, 12.0)), hold_down=2.0,
                                      max_hold_down=rng.choice((8.0, 16.0))))
    return dataclasses.replace(fv, policy=p)


def random_vip(i: int, rng: random.Random, steer: bool = False) -> FleetVip:
    template = BASE.vips[i % len(BASE.vips)]
    publish = tuple(sorted(rng.sample(POPS, rng.randint(1, len(POPS))), key=POPS.index))
    fv = FleetVip(dataclasses.replace(template.vip, name=f"v{i:02d}"), publish, rng.random() > 0.1, template.policy)
    fv = random_policy(fv, rng)
    return random_steering(fv, random.Random(i)) if steer else fv


def random_steering(fv: FleetVip, rng: random.Random) -> FleetVip:
    """Traffic steering on some VIPs (its own random stream: the others' sequences stay as they were)."""
    regions = [o.region for o in fv.vip.origins]
    kind = rng.choice(("none",) * 4 + ("preference", "weights", "both", "dial"))
    if kind == "none":
        return fv
    prefs = (Preference((fv.publish[0],), tuple(regions[::-1])),) if kind in ("preference", "both") else ()
    weights = tuple((r, rng.randint(1, 4)) for r in regions) if kind in ("weights", "both") else ()
    dials = ((regions[-1], rng.choice((0, 50))),) if kind == "dial" else ()
    return dataclasses.replace(fv, steering=Steering(prefs, weights), dials=dials)


def random_commit(desired: DesiredState, rng: random.Random, spare: list[FleetVip], serial: int) -> DesiredState:
    vips = list(desired.vips)
    k = rng.randrange(len(vips))
    fv = vips[k]
    change = rng.choice(("enabled", "publish", "policy", "origins", "remove", "add", "revision"))
    if change == "enabled":
        vips[k] = dataclasses.replace(fv, enabled=not fv.enabled)
    elif change == "publish":
        pop = rng.choice(POPS)
        publish = tuple(p for p in POPS if (p in fv.publish) != (p == pop))
        if publish:
            vips[k] = dataclasses.replace(fv, publish=publish)
    elif change == "policy":
        vips[k] = random_policy(fv, rng)
    elif change == "origins" and len(fv.vip.origins) > 1:
        vips[k] = dataclasses.replace(fv, vip=dataclasses.replace(fv.vip, origins=fv.vip.origins[::-1]))
    elif change == "remove" and len(vips) > 3:
        spare.append(vips.pop(k))
    elif change == "add" and spare:
        vips.insert(rng.randrange(len(vips) + 1), spare.pop(rng.randrange(len(spare))))
    return dataclasses.replace(desired, revision=f"rev{serial}", vips=tuple(vips))


class World:
    """The inputs: verdicts that walk (failures and recoveries that last a while)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.up: dict[tuple[str, str, str], bool] = {}
        self.flappy: dict[tuple[str, str, str], float] = {}  # -> flapping until
        self.chatty = {pop: rng.choice((0.9, 0.5, 0.15)) for pop in POPS}  # how often a POP reports

    def report(self, pop: str, desired: DesiredState, now: float) -> PopReport:
        rng = self.rng
        origins: dict[str, dict[str, bool | None]] = {}
        checks: dict[str, dict[str, OriginChecks]] = {}
        for fv in desired.vips:
            if pop not in fv.publish or rng.random() < 0.02:
                continue  # (a report may lack a VIP: no verdict)
            verdicts: dict[str, bool | None] = {}
            for j, o in enumerate(fv.vip.origins):
                key = (pop, fv.name, o.region)
                if j == 0 and rng.random() < 0.005:
                    self.flappy[key] = now + 30.0  # a flapping backend for a while (dampening)
                flip = 0.5 if self.flappy.get(key, 0.0) > now else (0.03 if j == 0 else 0.015)
                if rng.random() < flip:
                    self.up[key] = not self.up.get(key, True)
                verdicts[o.region] = None if rng.random() < 0.01 else self.up.get(key, True)
            origins[fv.name] = verdicts
            if rng.random() < 0.04:  # check times (the evidence-based settle), fresh or not
                checks[fv.name] = {
                    region: OriginChecks(now - rng.choice((0.05, 0.5, 3.0)) if v else None,
                                         now - rng.choice((0.1, 1.0, 4.0)) if v is False or rng.random() < 0.2 else None)
                    for region, v in verdicts.items()}
        # Now and then a VIP the POP does not announce: stale, it is presumed not to.
        return PopReport(pop, now, 1, origins, {name: rng.random() > 0.1 for name in origins}, checks)
