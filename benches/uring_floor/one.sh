#!/usr/bin/env bash
# One measurement: start a server on CPU 0, run fanout on CPU 1, stop the server.
# usage: one.sh MODE PORT N W [SECONDS]   (MODE: floor | write | uring | uring-fixed)
# Prints "MODE N W <fanout's JSON line> <server's stats line>". Callers wrap it in
# flock /tmp/wshub-bench.lock so measurements on this shared machine never overlap.
set -u
here=$(cd "$(dirname "$0")" && pwd)
cache=${WSHUB_BENCH_CACHE:-$HOME/.cache/wshub-bench}
mode=$1 port=$2 n=$3 w=$4 secs=${5:-5}
log=$(mktemp)
if [ "$mode" = floor ]; then
  taskset -c 0 "$cache/floor" "$port" >"$log" 2>&1 &
else
  taskset -c 0 "$here/target/release/uring_floor" "$port" --mode "$mode" >"$log" 2>&1 &
fi
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"' EXIT
trap 'exit 1' TERM INT
for _ in $(seq 1 200); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.05
done
sleep 0.3
samples=$(mktemp)
taskset -c 1 python3 "$here/sample.py" "$pid" "$samples" &
spid=$!
line=$(timeout $((secs + 60)) taskset -c 1 "$cache/fanout" "$port" "$n" "$w" 100 "$secs" 2>/dev/null | tail -1)
kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; wait $spid
# Over the measured window (the last SECONDS before fanout ended): server on-CPU share, CPU 0 busy
# share and CPU 0 softirq share (jiffies are 1/100 s).
cpu=$(python3 - "$samples" "$secs" <<'PY'
import sys
rows = [[float(x) for x in l.split()] for l in open(sys.argv[1])]
end = rows[-1]; start = min(rows, key=lambda r: abs(r[0] - (end[0] - float(sys.argv[2]))))
dt = end[0] - start[0]
print('{"srv_cpu":%.2f,"cpu0_busy":%.2f,"cpu0_softirq":%.2f}' % ((end[1] - start[1]) / 1e9 / dt, (end[2] - start[2]) / 100 / dt, (end[3] - start[3]) / 100 / dt))
PY
)
rm -f "$samples"
echo "$mode $n $w ${line:-{\"failed\":true\}} $cpu $(grep -h '^stats' "$log" | tr ' ' ',')"
