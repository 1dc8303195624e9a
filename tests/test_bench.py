"""Benchmarks of the hot paths (pytest-benchmark, small shapes) and a smoke test of ``python -m bench``.

The timed tests run a handful of rounds so the suite stays short; run them
alone with ``pytest tests/test_bench.py --benchmark-only`` for figures, or
with ``--benchmark-disable`` to run each body once.
"""

from __future__ import annotations

import csv
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import aplot_kernels as ak
from bench import cases, impls, machine, measure, run, table

BACKENDS = impls.our_backends("cpu")
ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)


def _points(B, N, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, N, D, generator=gen), dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_cosine_cost(benchmark, backend):
    x, y = _points(8, 64, 256), _points(8, 64, 256, seed=1)
    out = benchmark.pedantic(ak.cosine_cost, args=(x, y), kwargs=dict(backend=backend), **ROUNDS)
    assert out.shape == (8, 64, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_aplot_cost(benchmark, backend):
    x, y = _points(8, 64, 256), _points(8, 64, 256, seed=1)
    rc, rr = torch.randn(8, 64), torch.randn(8, 64)
    out = benchmark.pedantic(ak.aplot_cost, args=(x, y, rc, rr), kwargs=dict(backend=backend), **ROUNDS)
    assert out.shape == (8, 64, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_sinkhorn_fixed(benchmark, backend):
    C = ak.cosine_cost(_points(8, 64, 8), _points(8, 64, 8, seed=1), backend="torch")
    res = benchmark.pedantic(ak.sinkhorn, args=(C,), kwargs=dict(n_iters=20, grad="none", backend=backend), **ROUNDS)
    assert res.plan.shape == (8, 64, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_sinkhorn_tol(benchmark, backend):
    C = ak.cosine_cost(_points(8, 64, 8), _points(8, 64, 8, seed=1), backend="torch")
    res = benchmark.pedantic(
        ak.sinkhorn, args=(C,), kwargs=dict(n_iters=500, tol=1e-4, eps=0.05, grad="none", backend=backend), **ROUNDS
    )
    assert float(res.err.max()) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_aplot_margin(benchmark, backend):
    x, y = torch.randn(64, 128), torch.randn(64, 128)
    rc, rr = torch.randn(64), torch.randn(64)
    margins = benchmark.pedantic(ak.aplot_margin, args=(rc, rr, x, y), kwargs=dict(backend=backend), **ROUNDS)
    assert margins.shape == (64,)


@pytest.mark.parametrize("detach", [True, False], ids=["detach", "implicit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_aplot_loss_fwd_bwd(benchmark, backend, detach):
    inp = {"x": torch.randn(64, 128), "y": torch.randn(64, 128), "rc": torch.randn(64), "rr": torch.randn(64)}
    grads = benchmark.pedantic(cases.loss_gradients, args=(inp,), kwargs=dict(backend=backend, detach=detach), **ROUNDS)
    assert all(torch.isfinite(g).all() for g in grads)


def test_bench_pot_solve_batch_baseline(benchmark):
    ot_batch = pytest.importorskip("ot.batch")
    C = ak.cosine_cost(_points(8, 64, 8), _points(8, 64, 8, seed=1), backend="torch")
    res = benchmark.pedantic(
        ot_batch.solve_batch, args=(C, 0.1), kwargs=dict(max_iter=20, tol=0.0, method="log_sinkhorn", grad="detach"), **ROUNDS
    )
    assert res.plan.shape == (8, 64, 64)


# ---------------------------------------------------------------- the harness itself


def test_measures():
    plan = torch.full((2, 3, 4), 1.0 / 12, dtype=torch.float64)
    b = torch.full((2, 4), 0.25)
    assert measure.column_violation(plan, b) == pytest.approx(0.0, abs=1e-12)
    assert measure.column_violation(plan * 2, b) == pytest.approx(1.0)
    assert measure.relative_error(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0])) == pytest.approx(0.05)
    timing, first = measure.time_call(
        lambda i: i + 1,
        [1, 2],
        torch.device("cpu"),
        warmup=1,
        min_reps=3,
        max_reps=4,
        target_s=0.0,
        max_call_s=1.0,
        first=lambda i: i + 10,
    )
    assert timing.reps == 3 and timing.p20_ms <= timing.median_ms <= timing.p80_ms and first == 11


def test_missing_library_is_a_note_not_an_error(tmp_path, monkeypatch):
    real = impls.installed
    monkeypatch.setattr(impls, "installed", lambda name: False if name == "geomloss" else real(name))
    out = tmp_path / "b"
    assert run.main(["--quick", "--out", str(out), "--ops", "sinkhorn_tol", "--impls", "geomloss", "--no-plots"]) == 0
    assert "geomloss is not installed" in (out / "notes.txt").read_text()


def test_threads_flag_limits_every_library(tmp_path):
    """``--threads 1`` holds for numpy's BLAS and OpenMP too, not only torch, and is undone after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = torch.get_num_threads()
    seen = []
    real = machine.columns

    def spy(device):
        seen.append([p["num_threads"] for p in threadpoolctl.threadpool_info()])
        return real(device)

    out = tmp_path / "t"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(machine, "columns", spy)
        assert (
            run.main(
                [
                    "--quick",
                    "--threads",
                    "1",
                    "--out",
                    str(out),
                    "--ops",
                    "cosine_cost",
                    "--impls",
                    "ours-torch,pot-dist-numpy",
                    "--no-plots",
                ]
            )
            == 0
        )
    assert seen and all(n == 1 for pools in seen for n in pools)
    assert torch.get_num_threads() == before
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["impl"] for r in rows} == {"ours-torch", "pot-dist-numpy"}
    assert all("1 torch thread" in r["machine"] for r in rows)


def test_thread_limit_holds_for_libraries_loaded_later():
    """A BLAS or OpenMP runtime first loaded inside the limit (POT brings scipy's) starts capped too."""
    import subprocess
    import sys

    pytest.importorskip("threadpoolctl")
    probe = "import numpy, threadpoolctl; print(max(p['num_threads'] for p in threadpoolctl.threadpool_info()))"
    with machine.limit_threads(1):
        inside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert inside.strip() == "1"


REQUIRED = [
    "op",
    "impl",
    "device",
    "dtype",
    "B",
    "N",
    "M",
    "D",
    "n_iters",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_mb",
    "marginal_err",
    "plan_err",
    "speedup_vs_pot",
    "machine",
    "torch",
    "pot",
]


def test_quick_run_writes_results_and_plots(tmp_path):
    out = tmp_path / "bench"
    argv = [
        "--quick",
        "--out",
        str(out),
        "--ops",
        "cosine_cost,sinkhorn_fixed",
        "--impls",
        "ours-torch,pot-batch-torch,pot-dist-torch",
    ]
    assert run.main(argv) == 0
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert set(REQUIRED) <= set(reader.fieldnames)
        rows = list(reader)
    assert {r["op"] for r in rows} == {"cosine_cost", "sinkhorn_fixed"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
        assert float(r["plan_err"]) < 1e-4
        if r["impl"] in ("pot-batch-torch", "pot-dist-torch"):
            assert float(r["speedup_vs_pot"]) == 1.0
    sinkhorn = [r for r in rows if r["op"] == "sinkhorn_fixed"]
    assert all(float(r["marginal_err"]) < 1.0 for r in sinkhorn)
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.exists(out / "sinkhorn_fixed.png") and os.path.exists(out / "cosine_cost.png")
    # a fresh --out starts a new file; --append adds to it
    assert run.main(argv[:3] + ["--ops", "cosine_cost", "--impls", "ours-torch", "--no-plots"]) == 0
    with open(out / "results.csv", newline="") as f:
        assert {r["op"] for r in csv.DictReader(f)} == {"cosine_cost"}
    text = table.headline(table.read_rows(str(out / "results.csv")))
    assert text.startswith("Measured on") and "| cosine_cost |" in text


SASS_LOOPS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/                   MUFU.EX2 R4, R2 ;
        /*0030*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   FFMA R5, R5, R6, R7 ;
        /*0050*/                   FFMA R5, R5, R6, R7 ;
        /*0060*/                   FFMA R5, R5, R6, R7 ;
        /*0070*/              @!P1 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
"""


def test_kernel_stats_counts_the_loop_with_the_exponentials():
    """Of two loops, the Sinkhorn one is that with MUFU (the other is longer); its body is counted
    from its label to its backward branch, branch included."""
    from bench import kernel_stats

    length, counts = kernel_stats.main_loop(SASS_LOOPS)
    assert length == 3 and counts == {"FADD": 1, "MUFU": 1, "BRA": 1}


@pytest.mark.slow  # compiles for sm_90 without a GPU, as tests/test_triton_compile.py does
def test_fused_sinkhorn_loop_compiled_for_sm90_as_launched():
    """The largest fused tile (128 x 128, 16 warps) fits in registers without spilling, and one
    iteration issues one exp2 per entry and pass: 32 entries per thread, two passes."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels are compiled for the device by every other test")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernel_stats", "--only", "sinkhorn fused 128x128"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, row = [line.split() for line in proc.stdout.splitlines() if line.startswith(("kernel ", "sinkhorn fused 128x128"))]
    values = dict(zip(header[1:], row[3:]))  # the row's name is three words
    assert values["spill_st/ld_B"] == "0/0" and int(values["MUFU"]) == 64, proc.stdout
