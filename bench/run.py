"""``python -m bench``: run the benchmark matrix and write ``results.csv`` and plots.

Examples::

    python -m bench --quick --out /tmp/bench-quick          # CI smoke, < 2 min on 2 CPU cores
    python -m bench --out bench/results/cpu                  # the committed CPU results
    python -m bench --device cuda --out bench/results/h100   # GPU: float32, bfloat16, float16
    python -m bench --ops sinkhorn_fixed,sinkhorn_tol --impls ours-torch,pot-batch-torch

Every row is one (op, shape, dtype, implementation); the columns are listed
in ``COLUMNS`` and explained in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import math
import os
import sys
import time
import warnings
from typing import Dict, List, NamedTuple, Optional

import torch

from . import cases as C_
from . import floor, impls, machine
from .measure import call_with_peak_memory, column_violation, relative_error, time_call

COLUMNS = [
    "op",
    "impl",
    "device",
    "dtype",
    "B",
    "N",
    "M",
    "D",
    "n_iters",
    "iter_cap",
    "eps",
    "tol",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "first_ms",
    "peak_mem_mb",
    "marginal_err",
    "plan_err",
    "speedup_vs_pot",
    "floor_ms",
    "over_floor",
    "note",
    "load_avg",
    "machine",
    "device_name",
    "torch",
    "numpy",
    "pot",
    "triton",
    "versions",
    "commit",
    "timestamp",
]


class Settings(NamedTuple):
    """How hard each row is timed."""

    inputs: int  # pre-generated input sets rotated through
    warmup: int
    min_reps: int
    max_reps: int
    target_s: float  # timed calls per row ~ target_s / (time of one call)
    max_call_s: float  # one call slower than this: one timed rep, and larger shapes of that impl are skipped


SETTINGS = {
    ("cpu", True): Settings(inputs=2, warmup=1, min_reps=3, max_reps=5, target_s=0.05, max_call_s=1.0),
    ("cpu", False): Settings(inputs=3, warmup=1, min_reps=3, max_reps=15, target_s=0.4, max_call_s=2.5),
    ("cuda", True): Settings(inputs=2, warmup=2, min_reps=5, max_reps=20, target_s=0.1, max_call_s=2.0),
    ("cuda", False): Settings(inputs=4, warmup=3, min_reps=10, max_reps=100, target_s=0.5, max_call_s=5.0),
}


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results", help="output folder (results.csv, PNG plots); default %(default)s")
    parser.add_argument("--quick", action="store_true", help="a few tiny shapes: a smoke run (< 2 min on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default %(default)s")
    parser.add_argument("--ops", default="", help=f"comma-separated subset of: {', '.join(C_.OPS)}")
    parser.add_argument("--impls", default="", help="comma-separated implementation names (e.g. ours-torch,pot-batch-torch)")
    parser.add_argument(
        "--dtypes", default="", help="comma-separated: float32,bfloat16,float16 (default: float32 on CPU, all three on CUDA)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for every implementation: torch, numpy's BLAS, OpenMP, JAX (default: each library's "
        "choice); 1 is steadier on a shared machine",
    )
    parser.add_argument("--targets", action="store_true", help="only the native CPU target shapes (bench.cases.CPU_TARGETS)")
    parser.add_argument("--append", action="store_true", help="append to an existing results.csv instead of starting a new one")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    args.ops = [s for s in args.ops.split(",") if s]
    args.impls = [s for s in args.impls.split(",") if s]
    args.dtypes = [s for s in args.dtypes.split(",") if s]
    for op in args.ops:
        if op not in C_.OPS:
            parser.error(f"--ops: unknown op {op!r}; choose from {', '.join(C_.OPS)}")
    for dt in args.dtypes:
        if dt not in C_.DTYPES:
            parser.error(f"--dtypes: unknown dtype {dt!r}; choose from {', '.join(C_.DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def _nan_if_none(x) -> float:
    return math.nan if x is None else float(x)


def _row(case: C_.Case, impl: str, **values) -> Dict:
    row = {
        "op": case.op,
        "impl": impl,
        "device": case.device,
        "dtype": case.dtype,
        "B": case.B,
        "N": case.N,
        "M": case.M,
        "D": case.D,
        "iter_cap": case.n_iters,
        "eps": case.eps,
        "tol": _nan_if_none(case.tol),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    row.update(machine.columns(case.device))
    row.update(values)
    return row


class Runner:
    """Runs cases one after another, remembering which implementations ran out of time."""

    def __init__(self, settings: Settings, impl_filter: List[str], log=print):
        self.settings, self.impl_filter, self.log = settings, impl_filter, log
        self.too_slow: Dict[tuple, float] = {}  # (op, impl, dtype) -> work of the first too-slow case
        self.last: Dict[tuple, tuple] = {}  # (op, impl, dtype) -> (work, seconds per call) of the last case run
        self.notes: List[str] = []
        self.failures: List[str] = []

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            self.log(f"  note: {text}")

    def run_case(self, case: C_.Case) -> List[Dict]:
        s = self.settings
        device = torch.device(case.device)
        inputs = C_.make_inputs(case, s.inputs)
        ref = None  # computed once the first implementation has run
        _, b = C_.uniform_weights(case, device=torch.device("cpu"), dtype=torch.float64)
        rows = []
        for name, factory in impls.implementations(case.op, case.device).items():
            if self.impl_filter and name not in self.impl_filter:
                continue
            key = (case.op, name, case.dtype)
            if key in self.too_slow and case.work >= self.too_slow[key]:
                self._note(
                    f"{case.op} {name} {case.dtype}: shapes from B={case.B} N={case.N} D={case.D} skipped (a smaller one took, or was predicted to take, too long per call)"
                )
                continue
            if key in self.last:
                work, seconds = self.last[key]
                predicted = seconds * case.work / work
                if predicted > 2 * s.max_call_s:
                    self.too_slow[key] = case.work
                    self._note(
                        f"{case.op} {name} {case.dtype}: shapes from B={case.B} N={case.N} D={case.D} skipped (predicted {predicted:.0f} s per call from the last shape)"
                    )
                    continue
            try:
                runner = impls.build(factory, case, inputs)
            except impls.Unavailable as why:
                self._note(f"{case.op} {name}: skipped: {why}")
                continue
            except Exception as exc:  # a foreign library failing on this case is a note
                self._failed(case, name, exc)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    timing, out, peak_mb = self._time(runner, device)
                    probe = runner.extract(out, inputs[0])
                except Exception as exc:
                    self._failed(case, name, exc)
                    continue
            del out
            self.last[key] = (case.work, timing.median_ms / 1e3)
            note = runner.note
            if timing.reps == 1:
                self.too_slow[key] = case.work
                note = "; ".join(filter(None, [note, f"one timed call (over {s.max_call_s} s)"]))
            marginal = column_violation(probe.plan, b) if probe.plan is not None else math.nan
            ref = ref or C_.reference(case, inputs[0])
            plan_err = (
                relative_error(probe.output, ref.output) if probe.output is not None and ref.output is not None else math.nan
            )
            n_iters = probe.n_iters if probe.n_iters is not None else (case.n_iters if case.tol is None else math.nan)
            fl = floor.floor_ms(case, n_iters)
            rows.append(
                _row(
                    case,
                    name,
                    n_iters=n_iters,
                    median_ms=timing.median_ms,
                    p20_ms=timing.p20_ms,
                    p80_ms=timing.p80_ms,
                    reps=timing.reps,
                    first_ms=timing.first_ms,
                    peak_mem_mb=peak_mb,
                    marginal_err=marginal,
                    plan_err=plan_err,
                    speedup_vs_pot=math.nan,
                    floor_ms=fl,
                    over_floor=timing.median_ms / fl,
                    note=note,
                )
            )
        _fill_speedups(rows, case.op)
        return rows

    def _time(self, runner, device: torch.device):
        """``(Timing, output on inputs[0], peak MiB)``.

        On the CPU the first warm-up call doubles as the memory and output
        call (a call fewer per row); on CUDA a separate call after the timed
        ones keeps compilation and autotuning out of the memory figure.
        """
        s = self.settings
        options = dict(warmup=s.warmup, min_reps=s.min_reps, max_reps=s.max_reps, target_s=s.target_s, max_call_s=s.max_call_s)
        if device.type == "cpu":
            memory = {}

            def first(inp):
                out, memory["peak"] = call_with_peak_memory(runner.call, inp, device)
                return out

            timing, out = time_call(runner.call, runner.inputs, device, first=first, **options)
            return timing, out, memory["peak"]
        timing, _ = time_call(runner.call, runner.inputs, device, **options)
        out, peak_mb = call_with_peak_memory(runner.call, runner.inputs[0], device)
        return timing, out, peak_mb

    def _failed(self, case: C_.Case, name: str, exc: Exception) -> None:
        text = f"{case.op} {name} {case.dtype} B={case.B} N={case.N} D={case.D}: {type(exc).__name__}: {exc}"
        if name.startswith("ours-"):
            self.failures.append(text)
            self.log(f"  FAILED: {text}")
        else:
            self._note(f"failed (foreign library): {text}")


def _fill_speedups(rows: List[Dict], op: str) -> None:
    """``speedup_vs_pot = POT baseline median / this median`` for rows of one case."""
    baseline = impls.POT_BASELINE.get(op)
    base = next((r["median_ms"] for r in rows if r["impl"] == baseline), None)
    for r in rows:
        # "@" rows ran at another accuracy than the POT row: no speed-up against it.
        if base is not None and "@" not in r["impl"]:
            r["speedup_vs_pot"] = base / r["median_ms"]


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_rows(path: str, rows: List[Dict]) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(r.get(k, math.nan)) for k in COLUMNS})


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m bench`` (and of the package CLI's ``bench`` subcommand)."""
    args = _parse(argv)
    with machine.limit_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    if not args.append and os.path.exists(csv_path):
        os.remove(csv_path)
    todo = C_.cases(args.device, args.quick, args.ops, args.dtypes)
    if args.targets:
        todo = [c for c in todo if C_.is_cpu_target(c)]
    runner = Runner(SETTINGS[(args.device, args.quick)], args.impls)
    meta = machine.columns(args.device)
    print(
        f"bench: {len(todo)} cases on {meta['device_name']} ({meta['machine']}); "
        f"our backends: {', '.join(impls.our_backends(args.device))}; writing {csv_path}",
        flush=True,
    )
    for i, case in enumerate(todo, 1):
        t0 = time.perf_counter()
        rows = runner.run_case(case)
        write_rows(csv_path, rows)
        summary = ", ".join(f"{r['impl']} {r['median_ms']:.3g}" for r in rows)
        print(
            f"[{i}/{len(todo)}] {case.op} {case.dtype} B={case.B} N={case.N} M={case.M} D={case.D} "
            f"({time.perf_counter() - t0:.1f} s): {summary} ms",
            flush=True,
        )
    if not args.no_plots and os.path.exists(csv_path):
        if importlib.util.find_spec("matplotlib") is None:
            runner.notes.append("plots skipped: matplotlib is not installed (pip install .[bench])")
        else:
            from . import plots

            for path in plots.plot_csv(csv_path, args.out):
                print(f"wrote {path}")
    if runner.notes:
        with open(os.path.join(args.out, "notes.txt"), "w") as f:
            f.write("\n".join(runner.notes) + "\n")
    print(f"bench: done in {time.perf_counter() - started:.0f} s; {csv_path}", flush=True)
    if runner.failures:
        print("bench: our implementation failed on:\n  " + "\n  ".join(runner.failures), file=sys.stderr)
        return 1
    return 0
