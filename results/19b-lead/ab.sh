#!/bin/bash
# alternate base (706d9f9) and merged main, cold start of 10,000 VIPs
for i in 1 2 3 4 5 6; do
  for arm in base main; do
    if [ $arm = base ]; then dir=/work/wt/base; else dir=/work/main; fi
    cal=$(cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python -c "from bench.report import calibrate; print(calibrate())")
    up=$(uptime)
    (cd $dir && PYTHONPATH=$dir flock /tmp/anycast-bench.lock /work/main/.venv/bin/python -m bench announce --styles agent --json results/19b-lead/ab-$arm-$i.json (renamed after) > /work/quiet/ab/$arm-$i.log 2>&1)
    echo "$arm $i cal=$cal $up" >> /work/quiet/ab/index.txt
  done
done
echo done >> /work/quiet/ab/index.txt
