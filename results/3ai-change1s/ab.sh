#!/bin/sh
# Section 3ai: main (a detached worktree) and the branch alternately, each run under the bench lock.
# usage: ab.sh OUTDIR ARM... (ARM: main | branch); run from anywhere.
out=$1; shift
n=0
for arm in "$@"; do
  n=$((n + 1))
  case $arm in main) tree=/work/wt/change1s-base ;; branch) tree=/work/wt/change1s ;; esac
  flock /tmp/anycast-bench.lock sh -c "
    cd $tree
    { uptime; git log --oneline -1; PYTHONPATH=$tree /work/main/.venv/bin/python -c 'from bench.report import calibrate; print(\"calibrate\", calibrate())'; } > $out/r$n-$arm.log 2>&1
    PYTHONPATH=$tree /work/main/.venv/bin/python -m bench.controller_scale cold --vips 100000 --pops 300 --files 100 --out $out/r$n-$arm.json >> $out/r$n-$arm.log 2>&1
    uptime >> $out/r$n-$arm.log"
done
