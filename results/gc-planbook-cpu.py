"""results 3r: the agent's PlanBook applying one-VIP deltas to a 10,000-VIP plan, in process:
CPU per apply (decode included) and the collections it causes, the Plan built from the last
one (the branch) against built from every entry (``incremental = False``: main's way), twice
each, alternately, Python's default collector thresholds (the agent's). From the repo root:
    python results/gc-planbook-cpu.py"""
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from controller.agent.plan_wire import PlanBook  # noqa: E402
from controller.config.desired import load_desired  # noqa: E402
from controller.config.serialize import vip_to_dict  # noqa: E402
from controller.policy.model import PlanItem  # noqa: E402
from controller.server.plans import PlanStore  # noqa: E402
from controller.wire import decode_plan_answer  # noqa: E402

D = load_desired(str(Path(__file__).resolve().parents[1] / "configs" / "controller"), "rev")
GAME = vip_to_dict(D.vip("game-global").vip)  # type: ignore[union-attr]
specs = {}
for i in range(10000):
    s = copy.deepcopy(GAME)
    s["name"], s["address"] = f"vip-{i:05d}", f"198.51.100.{i % 250 + 1}/32"
    specs[s["name"]] = s
items = {n: PlanItem(n, True, "us-west") for n in specs}
store = PlanStore()
gen = store.serve("sjc", dict(items), dict(specs), "r0", 0)
full = json.loads(store.body("sjc", None))
deltas = []
for k in range(40):  # vip-05000 leaves and comes back, as in bench.commit_latency
    if k % 2 == 0:
        del items["vip-05000"]
    else:
        items["vip-05000"] = PlanItem("vip-05000", True, "us-west")
    new = store.serve("sjc", dict(items), dict(specs), f"r{k + 1}", gen)
    deltas.append(json.loads(store.body("sjc", gen)))
    gen = new
counts = [0, 0, 0]
gc.callbacks.append(lambda phase, info: counts.__setitem__(info["generation"], counts[info["generation"]] + 1)
                    if phase == "stop" else None)
for incremental in (False, True, False, True):
    PlanBook.incremental = incremental
    book = PlanBook("sjc", D.allowed_prefixes)
    book.apply(decode_plan_answer(full, "sjc"))
    gc.collect()
    gc.freeze()  # as the agent after start-up
    counts[:] = [0, 0, 0]
    cpu = []
    for d in deltas:
        t = time.thread_time()
        book.apply(decode_plan_answer(d, "sjc"))
        cpu.append(time.thread_time() - t)
    gc.unfreeze()
    print(f"{'built from the last Plan' if incremental else 'built from every entry'}: CPU per delta p50 "
          f"{statistics.median(cpu) * 1000:.2f} ms, max {max(cpu) * 1000:.2f} ms; collections over 40 deltas gen 0/1/2 "
          f"{counts[0]}/{counts[1]}/{counts[2]}")
