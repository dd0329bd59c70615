#!/bin/bash
# series.sh : p2..p6 alternating (branch first in p2, p4, p6), one hold of the bench lock (~5.5 min)
flock /tmp/anycast-bench.lock bash -c '
for spec in "p2 branch main" "p3 main branch" "p4 branch main" "p5 main branch" "p6 branch main"; do
  set -- $spec
  for a in $2 $3; do
    if [ $a = main ]; then t=/work/wt/cold13-base; else t=/work/wt/cold13-run; fi
    /tmp/cold13/arm.sh $a $t $1
  done
done'
