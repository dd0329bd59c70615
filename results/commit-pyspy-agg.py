import gzip, sys, re, collections
rows = []
for line in gzip.open(sys.argv[1], "rt"):
    stack, _, n = line.rstrip("\n").rpartition(" ")
    if "controller_main" not in stack: continue
    rows.append((stack.split(";"), int(n)))
def fn(f): return re.sub(r" \(.*", "", f)
def under(name, depth=2, top=12):
    c = collections.Counter(); tot = 0
    for fr, n in rows:
        idx = next((i for i, f in enumerate(fr) if fn(f) == name), None)
        if idx is None: continue
        tot += n
        c[" > ".join(fn(f) for f in fr[idx+1:idx+1+depth]) or "(self)"] += n
    print(f"== {name}: {tot} samples (5 ms each)")
    for k, v in c.most_common(top): print(f"  {v:5d} {k}")
for name, d in [("Watcher.reload", 2), ("Watcher._load", 1), ("_load", 1), ("Controller.apply_config", 2)]:
    under(name, d)
tot = sum(n for _, n in rows); print("daemon total", tot)
print("---- within reloads only")
def under2(anchor, name, depth=1, top=10):
    c = collections.Counter(); tot = 0
    for fr, n in rows:
        fns = [fn(f) for f in fr]
        if anchor not in fns: continue
        idx = next((i for i, f in enumerate(fns) if f == name), None)
        if idx is None: continue
        tot += n; c[" > ".join(fns[idx+1:idx+1+depth]) or "(self)"] += n
    print(f"== {anchor} / {name}: {tot}")
    for k, v in c.most_common(top): print(f"  {v:5d} {k}")
under2("Watcher.reload", "_load", 1)
under2("Watcher.reload", "_parse_vips_file", 2)
under2("Watcher.reload", "_build", 1)
under2("Watcher.reload", "fingerprint", 2)
under2("Watcher.reload", "read_bytes", 1)
