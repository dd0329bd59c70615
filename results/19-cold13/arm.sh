#!/bin/bash
# arm.sh ARM TREE TAG : one `bench announce --styles agent` run (the caller holds the bench lock)
arm=$1; tree=$2; tag=$3
out=/tmp/cold13/runs/$tag-$arm.json
cd $tree
cal() { PYTHONPATH=$tree /work/main/.venv/bin/python -c 'from bench.report import calibrate; print(round(calibrate(),1))'; }
echo "$tag $arm start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) cal $(cal)"
PYTHONPATH=$tree /work/main/.venv/bin/python -m bench announce --styles agent --json $out > /tmp/cold13/runs/$tag-$arm.log 2>&1
echo "$tag $arm end $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) cal $(cal)"
/work/main/.venv/bin/python -c "
import json;r=json.load(open('$out'));b=r['benchmarks']['announce'];b=b.get('result',b);ph=b['phases']
for p in ph: print('$tag $arm',p['action'],'fib',p['fib_s'],'acked',p['acked_s'],'cpu',p['cpu_s'],'sleeps',p['exabgp_sleeps'],p.get('agent'))
"
