"""Print the README headline table (markdown) from a results CSV.

    python -m bench.table bench/results/cpu/results.csv [--dtype float32]

For every op and every (B, D) series, the largest size at which our backends
and the POT baseline both ran (the largest for ours alone where POT has no
such op or never ran): the median time of each of our backends, of the POT baseline, and of
the fastest other library, and the speed-up of our fastest backend over POT.
The line above the table names the machine the CSV came from.
"""

from __future__ import annotations

import argparse
import collections
import math
from typing import Dict, List, Optional

from .cases import OPS
from .impls import POT_BASELINE
from .plots import read_rows


def _ms(row: Optional[Dict]) -> str:
    if row is None:
        return "-"
    v = float(row["median_ms"])
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def _shape(r: Dict) -> str:
    size = f"{r['N']}x{r['M']}" if r["B"] == "1" else f"{r['B']}x{r['N']}x{r['M']}"
    return f"{size}, D={r['D']}"


def _series(r: Dict) -> tuple:
    """Rows that differ only in ``N, M`` (same op, batch, width, eps and iteration cap)."""
    return (r["op"], int(r["B"]), int(r["D"]), float(r["eps"] or "nan"), int(float(r["iter_cap"] or 0)))


def targets(rows: List[Dict], shapes) -> str:
    """Our backends against the torch reference and POT at the given ``(op, B, N, M, D, overrides)`` shapes."""
    lines = [
        "| op | problem | eps | K | ours-native | ours-torch (reference) | POT solve_batch | native vs reference | native vs POT |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for op, B, N, M, D, overrides in shapes:
        eps = overrides.get("eps_override")
        impls = {
            r["impl"]: r
            for r in rows
            if r["op"] == op
            and r["dtype"] == "float32"
            and (int(r["B"]), int(r["N"]), int(r["M"]), int(r["D"])) == (B, N, M, D)
            and (eps is None or math.isclose(float(r["eps"]), eps))
            and ("iters_override" not in overrides or int(float(r["iter_cap"])) == overrides["iters_override"])
        }
        native, ref, pot = impls.get("ours-native"), impls.get("ours-torch"), impls.get(POT_BASELINE.get(op, ""))
        if native is None:
            continue

        def ratio(other):
            return f"{float(other['median_ms']) / float(native['median_ms']):.1f}x" if other else "-"

        first = native
        lines.append(
            f"| {op} | {_shape(native)} | {float(first['eps']):g} | {int(float(first['iter_cap'] or 0)) or '-'} | {_ms(native)} | {_ms(ref)} | {_ms(pot)} "
            f"| {ratio(ref)} | {ratio(pot)} |"
        )
    return "\n".join(lines)


def headline(rows: List[Dict], dtype: str = "float32") -> str:
    rows = [r for r in rows if r["dtype"] == dtype]
    if not rows:
        return f"(no {dtype} rows)"
    ours = sorted({r["impl"] for r in rows if r["impl"].startswith("ours-") and "@" not in r["impl"]})
    first = rows[0]
    lines = [
        f"Measured on {first['device_name']} ({first['device']}; {first['machine']}), torch {first['torch']}, "
        f"POT {first['pot']}, commit {first['commit'] or '?'}, {first['timestamp'][:10]}; {dtype}, median ms.",
        "",
        "| op | problem | " + " | ".join(ours) + " | POT | fastest other | best ours vs POT |",
        "| --- | --- | " + " | ".join("---:" for _ in ours) + " | ---: | --- | ---: |",
    ]
    by_case = collections.defaultdict(dict)
    for r in rows:
        by_case[_series(r) + (int(r["N"]), int(r["M"]))][r["impl"]] = r
    order = {op: i for i, op in enumerate(OPS)}
    largest = {}  # series -> (has the POT baseline, N * M, N, M), the best shape to show
    for (*series, N, M), impls in by_case.items():
        op = series[0]
        if any(name in impls for name in ours):
            rank = (POT_BASELINE.get(op) in impls, N * M, N, M)
            key = tuple(series)
            largest[key] = max(largest.get(key, rank), rank)
    largest = {key: rank[2:] for key, rank in largest.items()}
    for series, (N, M) in sorted(largest.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1:])):
        op = series[0]
        impls = by_case[series + (N, M)]
        pot = impls.get(POT_BASELINE.get(op, ""))
        others = [r for name, r in impls.items() if not name.startswith("ours-") and r is not pot]
        fastest_other = min(others, key=lambda r: float(r["median_ms"]), default=None)
        mine = [impls[name] for name in ours if name in impls]
        best = min(mine, key=lambda r: float(r["median_ms"]))
        speedup = float(pot["median_ms"]) / float(best["median_ms"]) if pot else math.nan
        cells = [_ms(impls.get(name)) for name in ours]
        pot_cell = f"{_ms(pot)} ({pot['impl']})" if pot else "-"
        other_cell = f"{fastest_other['impl']} {_ms(fastest_other)}" if fastest_other else "-"
        speed_cell = "-" if math.isnan(speedup) else f"{speedup:.1f}x ({best['impl']})"
        lines.append(f"| {op} | {_shape(best)} | " + " | ".join(cells) + f" | {pot_cell} | {other_cell} | {speed_cell} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table", description="Print the headline table of a results CSV.")
    parser.add_argument("csv", help="a results.csv written by python -m bench")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    print(headline(rows, args.dtype))
    if any(r["device"] == "cpu" for r in rows):
        from .cases import CPU_TARGETS

        print("\nNative CPU targets (same run):\n")
        print(targets(rows, CPU_TARGETS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
