"""Samples, every 50 ms until PID exits: time, PID's on-CPU ns (/proc/PID/schedstat), CPU 0's busy
and softirq jiffies (/proc/stat). one.sh uses it to see how busy the server was during the
measured window and whether something else ran on CPU 0 (this machine is shared)."""
import sys, time
pid, out = sys.argv[1], open(sys.argv[2], "w")
while True:
    try:
        run_ns = open("/proc/%s/schedstat" % pid).read().split()[0]
    except OSError:
        break
    for line in open("/proc/stat"):
        if line.startswith("cpu0 "):
            f = [int(x) for x in line.split()[1:]]
            busy = sum(f[:8]) - f[3] - f[4]  # all but idle and iowait
            softirq = f[6]
            break
    out.write("%.3f %s %d %d\n" % (time.monotonic(), run_ns, busy, softirq))
    out.flush()
    time.sleep(0.05)
