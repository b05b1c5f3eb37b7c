"""Summarise `ncu --csv --metrics gpu__time_duration.sum` output: GPU time per kernel name.

Usage: python3 ncu_summary.py ncu.csv [top]. Prints the total GPU time of the profiled range,
the kernel count, and the kernels grouped by name (template arguments cut), largest first.
"""
import csv
import sys
from collections import defaultdict

UNITS = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    rows = list(csv.DictReader(lines))
    by_name = defaultdict(lambda: [0.0, 0])
    total, count = 0.0, 0
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ms = float(r["Metric Value"].replace(",", "")) * UNITS.get(r["Metric Unit"], 1e-6)
        name = r["Kernel Name"].split("(")[0].split("<")[0].strip()[:70]
        by_name[name][0] += ms
        by_name[name][1] += 1
        total += ms
        count += 1
    print(f"{path}: {count} kernels, {total:.2f} ms of GPU time")
    print(f"{'kernel':<70} {'ms':>8} {'%':>6} {'calls':>6}")
    for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{name:<70} {ms:8.3f} {100 * ms / max(total, 1e-9):6.1f} {n:6d}")


if __name__ == "__main__":
    main()
