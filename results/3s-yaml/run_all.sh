#!/bin/bash
set -u
cd /work/wt/yaml
R=results/3s-yaml
mkdir -p $R
echo "start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
for code in /work/wt/yaml-main /work/wt/yaml /work/wt/yaml-main /work/wt/yaml; do
  m=none; [ $code = /work/wt/yaml ] && m=copy
  .venv/bin/python /tmp/yaml-h/status_bench.py $code /tmp/yaml-h/racy $m >> $R/status-racy.jsonl
done
tail -4 $R/status-racy.jsonl | cut -c1-300
for code in /work/wt/yaml-main /work/wt/yaml /work/wt/yaml-main /work/wt/yaml; do
  n=$(basename $code)
  echo "10k $n $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python -m bench.desired_parse --dir /tmp/yaml-h/d10k --runs 1 --root $code 2>&1 | head -1 | sed "s|^|$n |" >> $R/desired-parse-10k.jsonl
  tail -1 $R/desired-parse-10k.jsonl
done
echo "100k branch $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
.venv/bin/python -m bench.desired_parse --dir /tmp/yaml-h/d100k --runs 1 --root /work/wt/yaml 2>&1 | head -1 >> $R/desired-parse-100k.jsonl
tail -1 $R/desired-parse-100k.jsonl
echo "end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
