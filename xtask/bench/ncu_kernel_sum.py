"""Sums an Nsight Compute CSV of `gpu__time_duration.sum` per kernel name.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        --log-file run.csv fastlora bench ... --steps 1 --warmup 1
    python3 ncu_kernel_sum.py run.csv SKIP

SKIP drops the first SKIP kernels (the warm-up step's: count them with a `--warmup 0` run), so
what is summed is one steady step. Prints the total and the 45 largest names.
"""
import collections
import csv
import sys

lines = (line for line in open(sys.argv[1]) if not line.startswith("=="))
rows = [r for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
rows = rows[int(sys.argv[2]) if len(sys.argv) > 2 else 0:]
total = collections.defaultdict(float)
calls = collections.Counter()
for r in rows:
    total[r["Kernel Name"]] += float(r["Metric Value"].replace(",", ""))
    calls[r["Kernel Name"]] += 1
print(f"kernels {len(rows)}  total {sum(total.values()) / 1e6:.3f} ms")
for name, ns in sorted(total.items(), key=lambda kv: -kv[1])[:45]:
    print(f"{ns / 1e6:9.3f} ms {calls[name]:6d}  {ns / calls[name] / 1e3:8.1f} us  {name[:150]}")
