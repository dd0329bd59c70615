"""In process: the burst pass's journal write at 10,000 VIPs x 50 POPs: _DurableMemory.saved's step (CPU, wall)
and what freeing the old records costs."""
import sys, os, time, json, tempfile, dataclasses, gc
sys.path.insert(0, os.getcwd())
gc.set_threshold(100_000, 50, 100)
from pathlib import Path
from bench import controller_scale as cs
from controller import wire
from controller.config.desired import load_desired
from controller.server import core
from controller.server.core import Controller
from controller.server import app as appmod
from controller.policy.model import PopReport
from controller.policy.engine import compact_report
tmp = Path(tempfile.mkdtemp(prefix="saved-"))
cs.generate(tmp / "d", 10000, 50, 1)
desired = dataclasses.replace(load_desired(str(tmp / "d")), state_dir=str(tmp / "state"))
names = [v.name for v in desired.vips]
regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
ctl = Controller(desired)
times = []
pieces = []
HAND = "--hand" in sys.argv
real = core._DurableMemory.saved
def timed(self, records, *a, **k):
    if HAND: a = ([],)
    g0 = gc.get_count()
    t, c = time.perf_counter(), time.thread_time()
    r = real(self, records, *a, **k)
    if HAND:
        ps = []
        c2 = time.thread_time(); lst = a[0]
        while lst:
            c3 = time.thread_time(); del lst[-256:]; ps.append(round((time.thread_time() - c3) * 1000, 2))
        pieces.append(ps)
    times.append((len(records.kept), round((time.perf_counter() - t) * 1000, 1), round((time.thread_time() - c) * 1000, 1)))
    return r
core._DurableMemory.saved = timed
for rep in range(3):
    for i, p in enumerate(desired.pops):
        v = cs.verdicts(names, regions, (i + rep) % 50, 50, down_every=0 if rep == 0 else 3)
        raw = json.dumps(wire.encode_report(wire.WireReport(ctl.served[p.name].generation, v, {n: True for n in names}, 1))).encode()
        parsed = appmod._parse_report(raw, ctl.published_regions(p.name))
        now = ctl.clock()
        ctl.reports[p.name] = compact_report(PopReport(p.name, now, parsed.plan_generation, parsed.origins, parsed.announced), ctl.reports.get(p.name))
    ctl.replan()
    if ctl._writing is not None:
        ctl._finish_write()
print("saved (records, wall ms, cpu ms):", times)
print("pieces:", [ (len(p), max(p) if p else 0, round(sum(p),1)) for p in pieces])
