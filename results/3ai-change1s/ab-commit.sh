#!/bin/sh
# Section 3ai: bench.commit_latency (10,000 VIPs x 50 POPs, 100 files), main and the branch alternately,
# each run under the bench lock. usage: ab-commit.sh OUTDIR ARM...
out=$1; shift
n=0
for arm in "$@"; do
  n=$((n + 1))
  case $arm in main) tree=/work/wt/change1s-base ;; branch) tree=/work/wt/change1s ;; esac
  flock /tmp/anycast-bench.lock sh -c "
    cd $tree
    { uptime; git log --oneline -1; PYTHONPATH=$tree /work/main/.venv/bin/python -c 'from bench.report import calibrate; print(\"calibrate\", calibrate())'; } > $out/commit-r$n-$arm.log 2>&1
    PYTHONPATH=$tree /work/main/.venv/bin/python -m bench.commit_latency --files 100 --changes 20 --everywhere 3 --label $arm --out $out/commit-r$n-$arm.json >> $out/commit-r$n-$arm.log 2>&1
    uptime >> $out/commit-r$n-$arm.log"
done
