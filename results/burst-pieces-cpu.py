"""The CPU of each piece of the pass after a burst of 50 first reports at 10,000 VIPs x 50 POPs, in
process (results 3o): a Controller on the benchmark's generated checkout, the 50 reports stored as the
API stores them, then mark, begin, the compute slices, the commit, _publish, the warm steps (the
branch) and the serve slices, each timed with time.thread_time(). Run from a worktree of the code
to measure: python results/burst-pieces-cpu.py."""
import sys, os, time, json, tempfile, dataclasses, gc, cProfile, pstats
sys.path.insert(0, os.getcwd())
gc.set_threshold(100_000, 50, 100)
from pathlib import Path
from bench import controller_scale as cs
from controller import wire
from controller.config.desired import load_desired
from controller.server.core import Controller
from controller.server import app as appmod
from controller.policy.model import PopReport
from controller.policy.engine import compact_report
tmp = Path(tempfile.mkdtemp(prefix="slices-"))
cs.generate(tmp / "d", 10000, 50, 1)
desired = dataclasses.replace(load_desired(str(tmp / "d")), state_dir=str(tmp / "state"))
names = [v.name for v in desired.vips]
regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
ctl = Controller(desired)
for i, p in enumerate(desired.pops):
    v = cs.verdicts(names, regions, i, 50, down_every=0)
    raw = json.dumps(wire.encode_report(wire.WireReport(ctl.served[p.name].generation, v, {n: True for n in names}, 1))).encode()
    parsed = appmod._parse_report(raw, ctl.published_regions(p.name))
    now = ctl.clock()
    ctl.reports[p.name] = compact_report(PopReport(p.name, now, parsed.plan_generation, parsed.origins, parsed.announced), ctl.reports.get(p.name))
eng = ctl._engine
_gcl = []
_gs = [0.0]
def _cb(phase, info):
    if phase == "start": _gs[0] = time.perf_counter()
    else:
        d = (time.perf_counter() - _gs[0]) * 1000
        if d > 3: _gcl.append((info["generation"], round(d, 1)))
gc.callbacks.append(_cb)
now = ctl.clock()
t = time.thread_time(); eng.mark(ctl.desired, ctl.reports, ctl.persisted.drains, now); print("mark", round((time.thread_time()-t)*1000,1))
t = time.thread_time(); pas = eng.begin(now, refresh=True); print("begin", round((time.thread_time()-t)*1000,1), len(pas.names))
sl = []
prof = cProfile.Profile() if "--prof" in sys.argv else None
while True:
    t = time.thread_time()
    if prof: prof.enable()
    done = eng.compute(pas, 0.004)
    if prof: prof.disable()
    sl.append((time.thread_time()-t)*1000)
    if done: break
sl_sorted = sorted(sl, reverse=True)
print("compute slices", len(sl), "sum", round(sum(sl),1), "top", [round(x,1) for x in sl_sorted[:5]], "index of max", sl.index(sl_sorted[0]))
t = time.thread_time(); ch = eng.commit(pas); print("commit", round((time.thread_time()-t)*1000,1), len(ch.pops))
t = time.thread_time(); ctl._publish(ch, now, defer=True); print("publish(defer)", round((time.thread_time()-t)*1000,1))
ws = []
it = ctl._warm_unserved() if hasattr(ctl, '_warm_unserved') else iter(())
while True:
    t = time.thread_time()
    try:
        next(it)
    except StopIteration:
        ws.append((time.thread_time()-t)*1000); break
    ws.append((time.thread_time()-t)*1000)
print("distinct new items", len({id(m) for m in eng.items.values()}), "distinct seen", len({id(pp.seen_items) for pp in ctl.served.values()}), "distinct seen specs", len({id(pp.seen_specs) for pp in ctl.served.values()}), len({id(pp.seen_token) for pp in ctl.served.values()}))
print("warm steps", len(ws), "sum", round(sum(ws),1), "max", round(max(ws),1))
ss = []
while True:
    t = time.thread_time(); done = ctl._serve_unserved(0.004); ss.append((time.thread_time()-t)*1000)
    if done: break
m = getattr(ctl.plans, '_memo', None)
print("memo", m is not None and (len(m.updates), m.token is ctl.desired))
print("serve slices", len(ss), "sum", round(sum(ss),1), "first", [round(x,1) for x in ss[:4]], "max", round(max(ss),1))
import hashlib
h = hashlib.sha256()
for p in sorted(ctl.served):
    pp = ctl.served[p]; h.update(f"{p}:{pp.generation}:{pp.digest}:{pp.wanted}:{pp.safety_holds}:{len(pp.entries)}".encode())
print("gc", _gcl)
print("served digest", h.hexdigest()[:16])
if prof:
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
ctl.close()
