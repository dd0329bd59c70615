import sys, collections, re
incl = collections.Counter(); selfc = collections.Counter(); total = 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n)
    frames = stack.split(";")
    # drop idle
    if any("idle" in f for f in frames[-1:]): pass
    total += n
    seen = set()
    for f in frames:
        f2 = re.sub(r":\d+\)", ")", f)
        if f2 not in seen:
            incl[f2] += n; seen.add(f2)
    selfc[re.sub(r":\d+\)", ")", frames[-1])] += n
print("total", total)
for f, n in incl.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 40):
    print(f"{n:6d} {100*n/total:5.1f}% {f[:150]}")
print("--- self")
for f, n in selfc.most_common(15):
    print(f"{n:6d} {100*n/total:5.1f}% {f[:150]}")
