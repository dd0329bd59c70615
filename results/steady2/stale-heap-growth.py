"""The engine's stale heap and the CPU of a steady tick as the uptime grows (results 3ad).

    python results/steady2/stale-heap-growth.py CHECKOUT HOURS...

In process, the checkout's Engine on tests/helpers/random_fleet's 6 POPs and 14 VIPs: every
POP reports every 2 s, unchanged; the daemon's tick (Engine.mark, then a pass if anything is
dirty) every simulated second. Printed per HOURS mark: the heap's length and the CPU of the
ticks of the last simulated minute (ms per tick). 6 POPs reporting every 2 s push 3 entries a
second; 50 POPs push 25: an hour here is ~7 minutes of a 50-POP fleet.
"""
import dataclasses, json, random, sys, time

sys.path.insert(0, sys.argv[1])
from controller.config.desired_model import PopSpec  # noqa: E402
from controller.policy.engine import Engine, compact_report  # noqa: E402
from controller.policy.model import PlannerState  # noqa: E402
from tests.helpers.random_fleet import BASE, POPS, World, random_vip  # noqa: E402

rng = random.Random(1)
vips = tuple(random_vip(i, rng, False) for i in range(14))
desired = dataclasses.replace(BASE, pops=tuple(PopSpec(p, "0" * 64) for p in POPS), vips=vips)
world = World(rng)
engine = Engine(PlannerState.initial())
base = {p: world.report(p, desired, 1000.0) for p in POPS}
reports: dict = {}
now, step = 1000.0, 0
for hours in map(float, sys.argv[2:]):
    cpu = 0.0
    end = int(hours * 3600)
    while step < end:
        now += 1.0
        for i, pop in enumerate(POPS):
            if (step + i) % 2 == 0:
                reports[pop] = compact_report(dataclasses.replace(base[pop], received_at=now), reports.get(pop))
        t = time.process_time()
        engine.mark(desired, reports, {}, now)
        if engine.dirty():
            p = engine.begin(now)
            engine.compute(p)
            engine.commit(p)
        if end - step <= 60:
            cpu += time.process_time() - t
        step += 1
    print(json.dumps({"checkout": sys.argv[1], "hours": hours, "stale_heap": len(engine._stale_heap),
                      "ms_per_tick_last_minute": round(cpu / 60 * 1000, 3)}), flush=True)
