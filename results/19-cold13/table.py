import json, glob, os
rows = []
for f in sorted(glob.glob('results/19-cold13/p*-*.json'), key=os.path.getmtime):
    r = json.load(open(f)); m = r['machine']; b = r['benchmarks']['announce']; b = b.get('result', b)
    tag, arm = os.path.basename(f)[:-5].split('-')
    ph = {p['action']: p for p in b['phases']}
    a, w = ph['announce'], ph['withdraw']
    ag = a.get('agent', {})
    rows.append((tag, arm, m['git_revision'][:7], r['started_utc'][11:16], m['load_average_before'][0], m['load_average_after'][0],
                 m['python_loop_ms_before'], m['python_loop_ms_after'], a, w, ag))
print("| pair, UTC | arm | load before / after | calibrate ms | announce: FIB s | acked s | first command s | ExaBGP CPU s | API CPU s | ExaBGP sleeps | withdraw: FIB s |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for tag, arm, rev, t, l0, l1, c0, c1, a, w, ag in rows:
    name = "main `706d9f9`" if arm == "main" else f"h/cold13 `{rev}`"
    print(f"| {tag}, {t} | {name} | {l0:.1f} / {l1:.1f} | {c0:.0f} / {c1:.0f} | **{a['fib_s']:.2f}** | {a['acked_s']:.2f} | {ag.get('first_command_s', '-')} | {a['cpu_s']['exabgp']:.2f} | {a['cpu_s']['api']:.2f} | {a['exabgp_sleeps']} | {w['fib_s']:.2f} |")
