"""The reports' intake alone at 100,000 VIPs x 300 POPs, as bench.controller_scale engine
takes it in (each body made by the bench, then json.loads, wire.decode_report against the
POP's published VIPs, engine.compact_report), CPU seconds per part. Run from the tree to
measure (the cwd's ``controller`` is imported): python intake-cpu.py VIPS POPS LABEL >> FILE"""
import dataclasses, gc, json, os, sys, time
sys.path.insert(0, os.getcwd())
from bench.controller_scale import ROOT, compact_report_body
from bench.report import load_average
from controller.config.desired import load_desired
from controller.config.desired_model import FleetVip, PopSpec
from controller.policy.engine import compact_report
from controller.policy.model import PopReport
from controller.server import core as server_core
from controller.wire import decode_report

gc.set_threshold(100_000, 50, 100)
nv, npops, label = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
base = load_desired(str(ROOT / "configs" / "controller"), "bench")
template = base.vip("game-global")
pops = tuple(PopSpec(f"p{i:03d}", "0" * 64) for i in range(npops))
publish = tuple(p.name for p in pops)
vips = tuple(FleetVip(dataclasses.replace(template.vip, name=f"vip-{i:06d}"), publish, True, template.policy)
             for i in range(nv))
desired = dataclasses.replace(base, pops=pops, vips=vips)
names = [v.name for v in vips]
regions = {v.name: tuple(o.region for o in v.vip.origins) for v in vips}
load = load_average()
c = time.process_time()
published = server_core.index(desired, None).by_pop
index_cpu = time.process_time() - c
parse = decode = store = 0.0
reports = {}
for i, p in enumerate(pops):
    raw = compact_report_body(names, regions, i, npops)
    c1 = time.process_time(); body = json.loads(raw)
    c2 = time.process_time(); parsed = decode_report(body, published[p.name])
    c3 = time.process_time()
    del body, raw
    reports[p.name] = compact_report(PopReport(p.name, 0.0, 1, parsed.origins, parsed.announced), reports.get(p.name))
    c4 = time.process_time()
    parse, decode, store = parse + c2 - c1, decode + c3 - c2, store + c4 - c3
print(json.dumps({"label": label, "vips": nv, "pops": npops, "at": time.strftime("%H:%M:%S", time.gmtime()),
                  "load_average_start": load, "index_cpu_s": round(index_cpu, 2), "parse_cpu_s": round(parse, 2),
                  "decode_cpu_s": round(decode, 2), "store_cpu_s": round(store, 2),
                  "intake_cpu_s": round(parse + decode + store, 2)}), flush=True)
