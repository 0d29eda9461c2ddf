#!/usr/bin/env bash
# Alternates floor.c, write, uring and uring-fixed on each scenario, ROUNDS times, rotating the
# order each round; every single measurement holds /tmp/wshub-bench.lock (the machine is shared).
# usage: run.sh [ROUNDS] [SCENARIOS] > results.txt     then: python3 summarize.py results.txt
set -u
here=$(cd "$(dirname "$0")" && pwd)
rounds=${1:-3}
scenarios=${2:-"1000:1 1000:16 10000:16"}
modes=(floor write uring uring-fixed)
port=19500
for sc in $scenarios; do
  n=${sc%%:*} w=${sc##*:}
  for r in $(seq 1 "$rounds"); do
    for k in 0 1 2 3; do
      m=${modes[$(((k + r) % 4))]}
      port=$((port + 1))
      flock -w 900 /tmp/wshub-bench.lock -c "timeout 120 '$here/one.sh' $m $port $n $w 5"
    done
  done
done
