"""The CPU of each piece of one large report's intake as the daemon now takes it (results 3t): the
50 first full reports at 10,000 VIPs x 50 POPs (the benchmark's generated checkout, healthy, the
form before compact), each: json.loads, decode_report_steps' slices (core.SLICE_S), and the
store (app._take_report's accept_report: compact_report). time.thread_time(). Run from a
worktree of the code to measure: python results/report-pieces-cpu.py."""
import sys, os, time, json, tempfile, dataclasses, asyncio
sys.path.insert(0, os.getcwd())
from pathlib import Path
from bench import controller_scale as cs
from controller import wire
from controller.config.desired import load_desired
from controller.server.core import Controller, SLICE_S
from controller.policy.model import PopReport
tmp = Path(tempfile.mkdtemp(prefix="report-pieces-"))
cs.generate(tmp / "d", 10000, 50, 1)
desired = dataclasses.replace(load_desired(str(tmp / "d")), state_dir=str(tmp / "state"))
names = [v.name for v in desired.vips]
regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
ctl = Controller(desired)
rows = []


async def main() -> None:
    for i, p in enumerate(desired.pops):
        v = cs.verdicts(names, regions, i, 50, down_every=0)
        raw = json.dumps(wire.encode_report(wire.WireReport(ctl.served[p.name].generation, v, {n: True for n in names}, 1))).encode()
        published = ctl.published_regions(p.name)
        t = time.thread_time(); body = json.loads(raw); loads = time.thread_time() - t
        steps = wire.decode_report_steps(body, published, SLICE_S)
        slices = []
        while True:
            t = time.thread_time()
            try:
                next(steps)
            except StopIteration as done:
                slices.append(time.thread_time() - t); parsed = done.value; break
            slices.append(time.thread_time() - t)
        now = ctl.clock()
        t = time.thread_time()
        ctl.accept_report(PopReport(p.name, now, parsed.plan_generation, parsed.origins, parsed.announced))
        store = time.thread_time() - t
        rows.append((len(raw), loads, slices, store))


asyncio.run(main())
ms = lambda x: round(x * 1000, 1)
for n, (size, loads, slices, store) in enumerate(rows):
    if n < 3 or n % 10 == 9:
        print(f"report {n}: {size} B, json.loads {ms(loads)} ms, {len(slices)} slices max {ms(max(slices))} "
              f"sum {ms(sum(slices))} ms, accept_report {ms(store)} ms")
print("json.loads max", ms(max(r[1] for r in rows)), "slice max", ms(max(max(r[2]) for r in rows)),
      "accept_report max", ms(max(r[3] for r in rows)), "of", len(rows))
