#!/bin/sh
# Round 2: A = main e903e1c (/work/main), B = this branch's code (speed 0.5 in exabgp_environment). A B x 6, one hold.
# Each arm runs from its own tree: python -m puts the working directory first on sys.path.
cd /work/wt/cold13c
flock /tmp/anycast-bench.lock sh -c '
for i in 1 2 3 4 5 6; do
  for arm in A B; do
    case $arm in A) pp=/work/main;; B) pp=/work/wt/cold13c;; esac
    echo "== $i $arm $pp $(date -u +%T) $(uptime)"
    (cd $pp && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$pp /work/main/.venv/bin/python -m bench announce --styles agent --json /work/wt/cold13c/results/19c-cold13c/r2-$i-$arm.json 2>&1 | grep -E "^announce  agent|^withdraw  agent|ExaBGP at rest")
  done
done
echo "== end $(date -u +%T) $(uptime)"'
