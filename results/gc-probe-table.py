"""Per run of bench.commit_latency with the gc probe (gc-probe-sitecustomize.py): the one-VIP
samples and the collections of the daemon and the watcher that fell inside them (results 3r)."""
import json, glob, gzip, os, sys
def load(d, role):
    ev = []
    for f in glob.glob(os.path.join(d, f"{role}-*.log*")):
        for line in (gzip.open(f, "rt") if f.endswith(".gz") else open(f)):
            p = line.split(); ev.append((float(p[0]), float(p[1]), int(p[2])))
    return sorted(ev)
def pct(v, q):
    v = sorted(v); return v[min(len(v) - 1, int(q * len(v)))]
# python results/gc-probe-table.py results/epyc-2vcpu-vm-controller-gc-main-f100-r1 ...
# (each: the run's JSON without .json; its probe logs in the directory of that name + "-probe")
for label in sys.argv[1:]:
    r = json.load(open(label + ".json"))
    base = label + "-probe"
    s = r["change_samples"]
    tot = [x["total_s"] for x in s]; hold = [x["total_s"] - x["answer_arrived_s"] for x in s]
    a, b = s[0]["t0"] - 1, s[-1]["t0"] + s[-1]["total_s"]
    out = {"label": label, "p50": pct(tot, .5), "p90": pct(tot, .9), "max": max(tot),
           "answer_p50": pct([x["answer_arrived_s"] for x in s], .5), "hold_after_answer_p50": round(pct(hold, .5), 3),
           "loaded_p50": pct([x.get("loaded_s", 0) for x in s], .5), "served_p50": pct([x.get("served_s", 0) for x in s], .5)}
    for role in ("daemon", "watcher"):
        ev = load(base, role)
        inw = [e for e in ev if a <= e[0] <= b]
        out[role + "_gc_changes"] = [[sum(1 for e in inw if e[2] == g), round(max([e[1] for e in inw if e[2] == g], default=0) * 1000, 1)] for g in range(3)]
        out[role + "_gc_ms_per_sample"] = round(sum(e[1] for e in inw) * 1000 / len(s), 1)
        g2 = [round(e[1] * 1000) for e in ev if e[2] == 2]; out[role + "_gen2_all_run_ms"] = g2 if len(g2) < 6 else f"{len(g2)} up to {max(g2)}"
        after = [e for e in ev if e[0] > b]
        out[role + "_longest_after_changes_ms"] = round(max([e[1] for e in after], default=0) * 1000)
    out["everywhere"] = r.get("everywhere_all_hold_s", {}).get("max") if isinstance(r.get("everywhere_all_hold_s"), dict) else r.get("everywhere_all_hold_s")
    out["everywhere_samples"] = [x.get("all_hold_s") for x in r.get("everywhere_samples", [])] if r.get("everywhere_samples") else None
    for k in ("change_rss_mb", "rss_mb_end", "change_load_average", "change_stall_ms", "watcher_answers", "change_cpu_s"):
        out[k] = r.get(k)
    print(json.dumps(out))
