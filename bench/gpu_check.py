"""Time the Triton kernels against POT and the PyTorch reference on one GPU; write a CSV.

Run by ``bench/gpu_check.sh`` (which also builds and runs the GPU tests), or::

    python bench/gpu_check.py --out DIR          # CUDA: the real shapes, CUDA-event timing
    python bench/gpu_check.py --out DIR --dry-run  # CPU, Triton interpreter, tiny shapes

Cases (``K`` = Sinkhorn iterations, fixed count, ``tol=None``; costs in [0, 2]):

* ``sinkhorn_small``: B=64, N=M=128, K=50, float32 ``C`` (every Triton
  strategy, the experimental ones included, so that ``strategy="auto"`` can be
  set from the numbers; 128 x 128 is the fused kernel's largest tile);
* ``aplot_margin``: n=512, D=4096, K=50, bfloat16 embeddings (cost kernel +
  Sinkhorn + row costs, ``detach=True``);
* ``sinkhorn_large``: B=4, N=M=4096, K=50, float32 ``C`` (tiled strategy).

Competitors: ``torch`` (our reference, float32), POT's batched solver
``ot.batch.solve_batch(M, reg, method="log_sinkhorn")`` (row update first, so
it runs the same iteration count, not the same iterates) and POT's
``ot.sinkhorn(method="sinkhorn_log")`` looped over the batch, all on the same
CUDA tensors. POT rows are skipped with a note when ``import ot`` fails. Each
timing is the median of ``repeats`` CUDA-event measurements after warm-up; the
CSV also records the plan error of our kernels against the float64 reference.

Hardware floor for ``sinkhorn_large`` (B=4, N=M=4096, K=50) on an H100 SXM
----------------------------------------------------------------------------
One iteration is a column pass (v-update) and a row pass (u-update), each
reading all of ``C`` once; ``C`` (268 MB in float32) is far larger than the
50 MB L2, so every pass streams it from HBM.

* Bytes: ``2 passes x B N M x 4 B = 2 x 4 x 4096^2 x 4 B = 537 MB`` per
  iteration; at ~3.35 TB/s HBM3 that is ~160 us per iteration, **~8.0 ms for
  K=50** (half that, ~4.0 ms, for a bfloat16/float16 ``C``). The epilogue
  (read ``C``, write the float32 plan: another 537 MB) adds ~0.16 ms.
* Exponentials: ``2 x B N M = 134 M`` ``ex2`` per iteration. The MUFU unit
  does 16 per SM per clock: ``16 x 132 SMs x ~1.75 GHz = 3.7e12 /s``, so
  ~36 us per iteration, ~1.8 ms for K=50.
* The floor is therefore ``max(8.0, 1.8) ~ 8 ms`` (fp32 ``C``): memory-bound
  by ~4.4x (2.2x with a half-precision ``C``). Beating it needs fewer bytes
  per iteration, e.g. recomputing ``C`` tile by tile from the embeddings
  inside each pass (then compute-bound: the exp floor plus the ``tl.dot``
  work), not faster arithmetic. The split-reciprocal ``-C/eps`` (2 FMA) and
  the online log-sum-exp rescaling stay far below the FMA pipe's
  128/SM/clock.

For ``sinkhorn_small`` ``C`` (4.2 MB) sits in L2; the exp count is 2.1 M per
iteration (~0.6 us at full MUFU rate over all SMs), so the one-program-per-problem
strategies ("fused", "streamed": 64 programs on 64 of the 132 SMs) have an exp
floor near 1.1 us per iteration (~57 us for K=50; "streamed" also reads its
64 KB of C from L2 twice per iteration, ~8 MB per iteration for the batch,
~1.5 us at ~5.5 TB/s of L2 bandwidth), while the tiled strategy is bound by
its two passes per iteration, launched from a CUDA graph (docs/design.md has the measurements).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

try:  # run as a script (bench/gpu_check.py) or as a module (python -m bench.gpu_check)
    from gpu_cases import CaseBuilders
except ImportError:
    from bench.gpu_cases import CaseBuilders

_ROOT = Path(__file__).resolve().parent.parent

FIELDS = [
    "case",
    "impl",
    "shape",
    "dtype",
    "n_iters",
    "median_ms",
    "min_ms",
    "repeats",
    "plan_rel_err_vs_torch64",
    "note",
    "device",
    "torch",
    "triton",
    "pot",
]


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(_ROOT / "bench" / "results"), help="directory for gpu_check.csv")
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes: checks this script only")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 10, dry run 1)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run for the CPU check of this script", file=sys.stderr)
        return 2
    # POT warns on every fixed-iteration run that it did not converge; that is the point here.
    warnings.filterwarnings("ignore", module=r"ot(\.|$)")
    runner = Runner(torch.device("cpu" if args.dry_run else "cuda"), args)
    try:
        runner.run_all()
    finally:
        path = runner.write()
    print(f"gpu_check: wrote {path}")
    return 0


class Runner(CaseBuilders):
    def __init__(self, device, args):
        import torch

        self.torch, self.device, self.dry = torch, device, args.dry_run
        self.repeats = args.repeats or (1 if self.dry else 10)
        self.out_dir = Path(args.out)
        self.rows = []
        try:
            import ot
            import ot.batch  # noqa: F401

            self.ot, self.pot_version, self.pot_note = ot, ot.__version__, ""
        except Exception as exc:  # POT is optional on the GPU machine
            self.ot, self.pot_version, self.pot_note = None, "", f"POT unavailable ({type(exc).__name__}: {exc})"
        import triton

        from aplot_kernels import backends

        # The CUDA kernels of the compiled extension (csrc/cuda) are timed beside Triton when they load.
        self.native_ok, self.native_why = backends.native_status(device)
        if device.type != "cuda":
            self.native_ok, self.native_why = False, "the dry run times the Triton kernels only"
        # gpu_check.sh sets this when the cooperative smoke run failed or hung on this GPU.
        self.cooperative_ok = os.environ.get("APLOT_TEST_SKIP_COOPERATIVE") != "1"

        self.meta = dict(
            device=torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)",
            torch=torch.__version__,
            triton=triton.__version__,
            pot=self.pot_version,
        )

    # -- timing ---------------------------------------------------------------

    def time(self, fn, repeats=None, warmup=None):
        """``(median_ms, min_ms, n)`` of ``fn()`` (CUDA events on the GPU, perf_counter on the CPU)."""
        torch = self.torch
        repeats = repeats or self.repeats
        warmup = (0 if self.dry else 2) if warmup is None else warmup
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times), len(times)

    def add(self, case, impl, shape, dtype, n_iters, fn, *, reference_plan=None, plan_of=None, note="", repeats=None):
        print(f"  {case:15s} {impl:28s}", end="", flush=True)
        try:
            median, best, n = self.time(fn, repeats)
            err = ""
            if reference_plan is not None and plan_of is not None:
                plan = plan_of().double()
                err = f"{((plan - reference_plan).abs().max() / reference_plan.abs().max()).item():.3e}"
        except Exception as exc:  # one failing competitor must not lose the other rows
            median = best = float("nan")
            n, err = 0, ""
            note = (note + "; " if note else "") + f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        print(f" median {median:10.3f} ms  min {best:10.3f} ms  {err} {note}")
        self.rows.append(
            dict(
                case=case,
                impl=impl,
                shape=shape,
                dtype=str(dtype).replace("torch.", ""),
                n_iters=n_iters,
                median_ms=f"{median:.4f}",
                min_ms=f"{best:.4f}",
                repeats=n,
                plan_rel_err_vs_torch64=err,
                note=note,
                **self.meta,
            )
        )
        self.write()  # after every row: a run stopped by its time limit keeps what it measured

    def skip(self, case, impl, shape, dtype, n_iters, note):
        print(f"  {case:15s} {impl:28s} skipped: {note}")
        self.rows.append(
            dict(
                case=case,
                impl=impl,
                shape=shape,
                dtype=str(dtype).replace("torch.", ""),
                n_iters=n_iters,
                median_ms="",
                min_ms="",
                repeats=0,
                plan_rel_err_vs_torch64="",
                note=note,
                **self.meta,
            )
        )
        self.write()

    # -- cases ----------------------------------------------------------------

    def run_all(self):
        print(
            f"gpu_check on {self.meta['device']}: torch {self.meta['torch']}, triton {self.meta['triton']}, POT {self.pot_version or '-'}"
        )
        if self.dry:
            self.sinkhorn_case(
                "sinkhorn_small",
                batch=2,
                n=16,
                m=16,
                n_iters=5,
                strategies=("fused", "fused-scaling", "streamed", "tiled", "cooperative"),
            )
            self.margin_case(n=16, d=32, n_iters=5)
            self.sinkhorn_case("sinkhorn_large", batch=1, n=40, m=24, n_iters=3, strategies=("tiled", "onepass"), pot_loop=False)
        else:
            self.sinkhorn_case(
                "sinkhorn_small",
                batch=64,
                n=128,
                m=128,
                n_iters=50,
                strategies=("fused", "fused-scaling", "streamed", "tiled", "auto")
                + (("cooperative",) if self.cooperative_ok else ()),
            )
            self.margin_case(n=512, d=4096, n_iters=50)
            self.margin_case(n=128, d=4096, n_iters=50)  # fused into one kernel
            self.margin_case(n=32, d=4096, n_iters=50)
            self.sinkhorn_case(
                "sinkhorn_large",
                batch=4,
                n=4096,
                m=4096,
                n_iters=50,
                repeats=5,
                strategies=("tiled", "onepass") + (("cooperative",) if self.cooperative_ok else ()),
            )
            self.strategy_sweep()
        try:
            self.summary()
        except Exception as exc:  # the rows are what counts; the summary only reads them
            print(f"gpu_check: no summary ({type(exc).__name__}: {exc})")

    def strategy_sweep(self):
        """Every Triton strategy (and native) over sizes, to place the thresholds of ``strategy="auto"``.

        ``triton-tiled`` replays its loop as a CUDA graph up to ``GRAPH_MAX_ENTRIES``;
        ``triton-tiled no graph`` launches every pass from Python. The fused kernel
        is also timed at several warp counts at B=64, 128 x 128.
        """
        torch = self.torch
        from aplot_kernels.sinkhorn.triton import fused, solve, tiled
        from aplot_kernels.sinkhorn.triton.experimental import fused_scaling

        def problem(batch, n):
            gen = torch.Generator(device=self.device).manual_seed(2)
            C = torch.rand(batch, n, n, device=self.device, generator=gen) * 2
            return C, torch.full((batch, n), 1.0 / n, device=self.device)

        C, a = problem(64, 128)
        for warps in (4, 8, 16, 32):
            for name, launch in (
                ("triton-fused", fused.solve_fused),
                ("triton-fused-scaling", fused_scaling.solve_fused_scaling),
            ):
                self.add(
                    "fused_warps",
                    f"{name} num_warps={warps}",
                    "B=64 N=128 M=128",
                    torch.float32,
                    50,
                    lambda w=warps, f=launch: f(C, a, a, 0.1, 50, None, 10, True, num_warps=w),
                    repeats=5,
                )
        # Per-iteration cost: K=1 and K=101 at the default warps (the difference / 100 is one iteration).
        for n_iters in (1, 101):
            for strategy in ("fused", "fused-scaling"):
                self.add(
                    "fused_iteration",
                    f"triton-{strategy}",
                    "B=64 N=128 M=128",
                    torch.float32,
                    n_iters,
                    lambda k=n_iters, s=strategy: solve(C, a, a, 0.1, k, None, 10, strategy=s),
                    repeats=5,
                )
        for batch, n in ((64, 64), (64, 256), (16, 512), (1, 512), (8, 1024), (1, 1024), (1, 2048)):
            C, a = problem(batch, n)
            shape = f"B={batch} N={n} M={n}"
            runs = {
                "triton-streamed": lambda: solve(C, a, a, 0.1, 50, None, 10, strategy="streamed"),
                "triton-tiled": lambda: solve(C, a, a, 0.1, 50, None, 10, strategy="tiled"),
                "triton-tiled no graph": lambda: tiled.solve_tiled(C, a, a, 0.1, 50, None, 10, True),
                "triton-auto": lambda: solve(C, a, a, 0.1, 50, None, 10),
            }
            if n * n <= 128 * 256:  # larger fused programs take minutes to compile and spill heavily
                runs["triton-fused"] = lambda: solve(C, a, a, 0.1, 50, None, 10, strategy="fused")
                runs["triton-fused-scaling"] = lambda: solve(C, a, a, 0.1, 50, None, 10, strategy="fused-scaling")
            if self.cooperative_ok:
                runs["triton-cooperative"] = lambda: solve(C, a, a, 0.1, 50, None, 10, strategy="cooperative")
            runs["triton-onepass"] = lambda: solve(C, a, a, 0.1, 50, None, 10, strategy="onepass")
            if self.native_ok:
                from aplot_kernels.sinkhorn import native

                runs["native (CUDA)"] = lambda: native.solve(C, a, a, 0.1, 50, None, 10)
            for impl, run in runs.items():
                self.add("strategy_sweep", impl, shape, torch.float32, 50, run, repeats=5)

    def summary(self):
        """The issue's three GPU targets, read off the rows above (printed last)."""

        def median(case, impl, shape=None):
            for row in self.rows:
                if (
                    row["case"] == case
                    and row["impl"] == impl
                    and row["median_ms"] not in ("", "nan")
                    and shape in (None, row["shape"])
                ):
                    return float(row["median_ms"])
            return math.nan

        lines = ["", "== targets (medians of this run)"]
        pot = median("sinkhorn_small", "POT solve_batch log_sinkhorn")
        ref = median("sinkhorn_small", "torch reference (fp32)")
        for impl in (
            "sinkhorn(backend='triton')",
            "triton-auto",
            "triton-fused",
            "triton-fused-scaling",
            "triton-streamed",
            "triton-cooperative",
            "native (CUDA)",
        ):
            ours = median("sinkhorn_small", impl)
            lines.append(
                f"B=64 N=M=128 K=50 {impl:16s} {ours * 1e3:9.1f} us: {pot / ours:7.1f}x POT solve_batch "
                f"(target 100x), {ref / ours:6.1f}x torch reference (target 20x)"
            )
        for impl in ("triton aplot_margin", "native aplot_margin", "triton cost + cooperative row-cost solve"):
            lines.append(
                f"aplot_margin n=512 D=4096 bf16 {impl:20s} "
                f"{median('aplot_margin', impl, 'n=512 D=4096') * 1e3:9.1f} us (target <= 150 us)"
            )
        for n in (128, 32):
            fused = median("aplot_margin", "triton aplot_margin", f"n={n} D=4096")
            unfused = median("aplot_margin", "triton cost + row-cost solve (unfused)", f"n={n} D=4096")
            scaling = median("aplot_margin", "triton fused margin, scaling domain", f"n={n} D=4096")
            direct = median("aplot_margin", "triton fused margin kernel (direct)", f"n={n} D=4096")
            unchecked = median("aplot_margin", "triton aplot_margin, value checks off", f"n={n} D=4096")
            lines.append(
                f"aplot_margin n={n} D=4096 bf16 fused kernel {fused * 1e3:9.1f} us, scaling domain "
                f"{scaling * 1e3:9.1f} us, cost kernel + solve {unfused * 1e3:9.1f} us"
            )
            lines.append(
                f"aplot_margin n={n} D=4096 bf16 host work: public call {fused * 1e3:9.1f} us, value checks off "
                f"{unchecked * 1e3:9.1f} us, kernel entry alone {direct * 1e3:9.1f} us"
            )
        large = median("sinkhorn_large", "triton-tiled")
        streamed_floor, exp_floor = _large_floors(self.torch, 4, 4096, 4096, 50)
        lines.append(
            f"B=4 N=M=4096 K=50 triton-tiled {large:.2f} ms: {large / streamed_floor:.2f}x the streaming floor "
            f"({streamed_floor:.2f} ms, C read twice per iteration), {large / exp_floor:.2f}x the exp floor "
            f"({exp_floor:.2f} ms) (target 2x)"
        )
        lines.append(
            f"B=4 N=M=4096 K=50 native (CUDA) {median('sinkhorn_large', 'native (CUDA)'):.2f} ms, "
            f"triton-cooperative {median('sinkhorn_large', 'triton-cooperative'):.2f} ms"
        )
        onepass = median("sinkhorn_large", "triton-onepass")
        one_read = streamed_floor / 2
        lines.append(
            f"B=4 N=M=4096 K=50 triton-onepass {onepass:.2f} ms: {onepass / one_read:.2f}x the floor of one read "
            f"of C per iteration ({one_read:.2f} ms), {onepass / exp_floor:.2f}x the exp floor"
        )
        print("\n".join(lines))

    def write(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / ("gpu_check_dry_run.csv" if self.dry else "gpu_check.csv")
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        return path


def _large_floors(torch, batch, n, m, n_iters):
    """``(streaming floor, exp floor)`` in ms for a float32 ``C`` on this GPU (see the module docstring)."""
    if not torch.cuda.is_available():
        return math.nan, math.nan
    sys.path.insert(0, str(_ROOT))
    from bench import floor

    spec = floor.gpu_spec()
    if spec is None:
        return math.nan, math.nan
    entries = batch * n * m
    streaming = 2 * n_iters * entries * 4 / spec.bandwidth
    exps = (2 * n_iters + 1) * entries / floor.exp_rate(spec)
    return 1e3 * max(streaming, exps), 1e3 * exps


if __name__ == "__main__":
    sys.exit(main())
