"""Table of every run and the median ratios, from run.sh's output.

ns/msg is the server's on-CPU time per delivered message over the measured window: less disturbed
than delivered/s when something else shares the machine."""
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
print("%-12s %-9s %12s %9s %8s %8s %9s  %s" % ("mode", "N:W", "delivered/s", "p50 us", "srv_cpu", "cpu0", "ns/msg", "server counters"))
for line in open(sys.argv[1]):
    mode, n, w, js, cpu, *stats = line.split(" ", 5)
    r = json.loads(js)
    r.update(json.loads(cpu))
    if "delivered_per_s" in r:
        r["ns_per_msg"] = r["srv_cpu"] * 1e9 / r["delivered_per_s"]
    runs[(n, w, mode)].append(r)
    print("%-12s %-9s %12s %9s %8.2f %8.2f %9.0f  %s" % (mode, n + ":" + w, r.get("delivered_per_s", "failed"),
          r.get("round_us_p50", "-"), r["srv_cpu"], r["cpu0_busy"], r.get("ns_per_msg", 0), (stats or [""])[0].strip()))
print()
def med(n, w, m, k):
    return statistics.median(r[k] for r in runs[(n, w, m)] if k in r)
def paired(n, w, a, b, k):  # run i of mode a against run i of mode b: same round of the alternation
    return statistics.median(x[k] / y[k] for x, y in zip(runs[(n, w, a)], runs[(n, w, b)]) if k in x and k in y)
modes = ["floor", "write", "uring", "uring-fixed"]
for n, w in sorted({(k[0], k[1]) for k in runs}, key=lambda c: (int(c[0]), int(c[1]))):
    print("%s:%s medians: " % (n, w) + "  ".join("%s %.0f/s %.0f ns/msg" % (m, med(n, w, m, "delivered_per_s"), med(n, w, m, "ns_per_msg")) for m in modes if runs[(n, w, m)]))
    for k, label in (("delivered_per_s", "delivered/s"), ("ns_per_msg", "ns/msg")):
        print("    %-12s ratio of medians: uring/write %.3f  uring-fixed/write %.3f  write/floor %.3f" % (label,
              med(n, w, "uring", k) / med(n, w, "write", k), med(n, w, "uring-fixed", k) / med(n, w, "write", k), med(n, w, "write", k) / med(n, w, "floor", k)))
        print("    %-12s median paired ratio: uring/write %.3f  uring-fixed/write %.3f  write/floor %.3f" % (label,
              paired(n, w, "uring", "write", k), paired(n, w, "uring-fixed", "write", k), paired(n, w, "write", "floor", k)))
