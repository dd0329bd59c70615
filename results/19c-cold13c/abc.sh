#!/bin/sh
# A = main e903e1c as is; B = the same with exabgp.reactor.speed=0.5; C = speed 0.2 (the bench's
# `tried` exabgp.* variables go to ExaBGP). One hold of the bench lock, A B C x 6.
cd /work/wt/cold13c
out=results/19c-cold13c
flock /tmp/anycast-bench.lock sh -c '
for i in 1 2 3 4 5 6; do
  for arm in A B C; do
    case $arm in A) sp="";; B) sp="exabgp.reactor.speed=0.5";; C) sp="exabgp.reactor.speed=0.2";; esac
    echo "== $i $arm $sp $(date -u +%T) $(uptime)"
    env $sp PYTHONPATH=/work/main /work/main/.venv/bin/python -m bench announce --styles agent --json '$out'/run-$i-$arm.json 2>&1 | grep -E "^announce  agent|^withdraw  agent|ExaBGP at rest"
  done
done
echo "== end $(date -u +%T) $(uptime)"'
