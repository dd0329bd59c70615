#!/bin/bash
# alternating main / branch runs of the cold mode, each under the bench lock
OUT=/work/wt/coldchange/results/3ab-coldchange
PY=/work/wt/coldchange/.venv/bin/python
run() { # tree tag vips pops files
  local tree=$1 tag=$2
  cd $tree
  flock /tmp/anycast-bench.lock bash -c "
    echo \"\$(date -u +%H:%M:%S) calibrate \$(PYTHONPATH=$tree $PY -c 'from bench.report import calibrate; print(calibrate())') ms; \$(uptime)\" > $OUT/$tag.log
    PYTHONPATH=$tree $PY -m bench.controller_scale cold --vips $3 --pops $4 --files $5 --out $OUT/$tag.json >> $OUT/$tag.log 2>&1
    echo \"\$(date -u +%H:%M:%S) done; \$(uptime)\" >> $OUT/$tag.log"
}
for r in 1 2; do
  run /work/wt/coldchange-main main-20k-r$r 20000 300 20
  run /work/wt/coldchange branch-20k-r$r 20000 300 20
  run /work/wt/coldchange-main main-10k-r$r 10000 50 100
  run /work/wt/coldchange branch-10k-r$r 10000 50 100
done
echo all done > $OUT/.ab-done
