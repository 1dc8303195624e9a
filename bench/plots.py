"""Time against problem size, one PNG per op (``<out>/<op>.png``).

One panel per (device, dtype, B, D); inside it one line per implementation,
median time against ``N = M`` with the p20-p80 band, both axes logarithmic.
"""

from __future__ import annotations

import collections
import csv
import math
import os
from typing import Dict, List

KEY = ("op", "impl", "device", "dtype", "B", "N", "M", "D", "eps", "iter_cap")


def read_rows(csv_path: str) -> List[Dict]:
    """Rows of a results CSV; a shape measured twice (``--append``) keeps its last row."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    latest = {tuple(r[k] for k in KEY): r for r in rows}
    return list(latest.values())


def _float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_csv(csv_path: str, out_dir: str) -> List[str]:
    """Write ``<out_dir>/<op>.png`` for every op in the CSV; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    by_op = collections.defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    written = []
    for op, op_rows in by_op.items():
        panels = collections.defaultdict(list)
        for r in op_rows:
            panels[(r["device"], r["dtype"], int(r["B"]), int(r["D"]), r["eps"], r["iter_cap"])].append(r)
        keys = sorted(panels)
        cols = min(3, len(keys))
        nrows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            lines = collections.defaultdict(list)
            for r in panels[key]:
                lines[r["impl"]].append((int(r["N"]), _float(r["median_ms"]), _float(r["p20_ms"]), _float(r["p80_ms"])))
            for impl in sorted(lines):
                pts = sorted(lines[impl])
                n = [p[0] for p in pts]
                style = "-o" if impl.startswith("ours-") else "--s"
                ax.plot(n, [p[1] for p in pts], style, label=impl, markersize=4)
                ax.fill_between(n, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15)
            device, dtype, B, D, eps, iter_cap = key
            ax.set_title(f"{device} {dtype}  B={B}  D={D}  eps={eps}  K={iter_cap}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N = M")
            ax.set_ylabel("median time (ms)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        machine = op_rows[0].get("device_name", "")
        fig.suptitle(f"{op}  ({machine})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
