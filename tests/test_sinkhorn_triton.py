"""The Triton Sinkhorn, every strategy against the float64 torch reference.

Each test runs over the strategies: "fused", "streamed", "tiled" in the default
run, the experimental ones (``strategy="fused-scaling"``, ``"cooperative"``,
``"onepass"``) under ``pytest -m experimental``. The streaming strategies run
with tiny tiles so that every loop covers several tiles; shapes include
non-powers of two, half-precision costs, strided inputs, zero-weight padding
and the tolerance mode with its per-problem early exit. The experimental
strategies' own mechanisms are tested in test_sinkhorn_triton_experimental.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_within_rule
from triton_cases import DEVICE, HALF, PLAN_BOUND, TRITON_OK, assert_matches_reference, generator, problem, shrink_tiles

pytestmark = pytest.mark.skipif(not TRITON_OK, reason="Triton unavailable")

if TRITON_OK:
    from aplot_kernels.sinkhorn import reference
    from aplot_kernels.sinkhorn import triton as triton_sinkhorn
    from aplot_kernels.sinkhorn.triton import tiled

DEFAULT_STRATEGIES = ["fused", "streamed", "tiled"]
STRATEGIES = DEFAULT_STRATEGIES + [
    pytest.param(name, marks=pytest.mark.experimental) for name in ("fused-scaling", "cooperative", "onepass")
]


@pytest.fixture
def small_tiles(monkeypatch):
    shrink_tiles(monkeypatch)


FIXED_CASES = [
    # batch, n, m, eps, n_iters, pad
    (2, 5, 7, 0.1, 10, False),
    (2, 17, 24, 0.05, 12, True),
    (3, 24, 9, 0.01, 10, False),
    (1, 16, 16, 0.5, 5, True),
]


@pytest.mark.parametrize("case", FIXED_CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-eps{c[3]}-K{c[4]}{'-pad' if c[5] else ''}")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_fixed_iterations(strategy, case, small_tiles):
    batch, n, m, eps, n_iters, pad = case
    C, a, b = problem(batch, n, m, torch.float32, seed=n * m, pad=pad)
    out = triton_sinkhorn.solve(C, a, b, eps, n_iters, None, 10, strategy=strategy)
    assert_matches_reference(out, C, a, b, eps, n_iters, None, 10)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_accuracy_rule(strategy, dtype, small_tiles):
    """FlashAttention's rule for each strategy: error against float64 at most a small multiple of the
    float32 torch reference's, plan and costs, at eps=0.02 on costs in [0, 2]."""
    batch, n, m = (3, 45, 71) if DEVICE.type == "cuda" else (2, 19, 26)
    C, a, b = problem(batch, n, m, dtype, seed=n + m, pad=True)
    n_iters = 40 if DEVICE.type == "cuda" else 12
    reference64 = reference.solve(C.double(), a.double(), b.double(), 0.02, n_iters, None, 10)
    plain = reference.solve(C.float(), a, b, 0.02, n_iters, None, 10)
    out = triton_sinkhorn.solve(C, a, b, 0.02, n_iters, None, 10, strategy=strategy)
    for field in ("plan", "cost", "reg_cost"):
        assert_within_rule(getattr(out, field), getattr(plain, field), getattr(reference64, field), f"{strategy} {field}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_reads_half_cost(strategy, dtype, small_tiles):
    C, a, b = problem(2, 19, 13, dtype, seed=7, pad=True)
    out = triton_sinkhorn.solve(C, a, b, 0.05, 15, None, 10, strategy=strategy)
    # The reference sees exactly the half-precision values, widened.
    assert_matches_reference(out, C, a, b, 0.05, 15, None, 10)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_tolerance_stops_each_problem(strategy):
    # Different eps-to-cost ratios make the problems converge at different checks.
    C, a, b = problem(3, 20, 20, torch.float32, seed=11)
    C = C * torch.tensor([0.2, 1.0, 3.0], device=DEVICE)[:, None, None]
    out = triton_sinkhorn.solve(C, a, b, 0.1, 28, 1e-4, 7, strategy=strategy)
    ref = assert_matches_reference(out, C, a, b, 0.1, 28, 1e-4, 7)
    assert len(set(ref.n_iters.tolist())) > 1, "the case should stop problems at different iterations"
    stopped = out.n_iters < 28
    assert bool(stopped.any()) and all(k % 7 == 0 for k in out.n_iters[stopped].tolist())
    assert bool((out.err[stopped] <= 1e-4).all())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_tolerance_cap_and_unchecked_err(strategy, small_tiles):
    C, a, b = problem(2, 12, 10, torch.float32, seed=13, pad=True)
    # tol=0 never stops: the cap holds and err is the last measured value (iteration 8 of 11).
    out = triton_sinkhorn.solve(C, a, b, 0.05, 11, 0.0, 4, strategy=strategy)
    assert_matches_reference(out, C, a, b, 0.05, 11, 0.0, 4)
    assert out.n_iters.tolist() == [11, 11]
    # check_every beyond the cap: never measured, so err is computed at the end.
    out = triton_sinkhorn.solve(C, a, b, 0.05, 6, 1e-3, 50, strategy=strategy)
    assert_matches_reference(out, C, a, b, 0.05, 6, 1e-3, 50)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_strided_inputs(strategy, small_tiles):
    C, a, b = problem(2, 10, 14, torch.float32, seed=17)
    C_t = C.transpose(1, 2).contiguous().transpose(1, 2)
    a_expanded = torch.full((1, 10), 0.1, device=DEVICE).expand(2, 10)
    b_expanded = torch.full((1, 14), 1 / 14, device=DEVICE).expand(2, 14)
    out = triton_sinkhorn.solve(C_t, a_expanded, b_expanded, 0.1, 12, None, 10, strategy=strategy)
    assert_matches_reference(out, C, a_expanded, b_expanded, 0.1, 12, None, 10)


def test_sinkhorn_auto_strategy_and_public_api():
    import aplot_kernels

    C, _, _ = problem(2, 9, 11, torch.float32, seed=19)
    got = aplot_kernels.sinkhorn(C, eps=0.1, n_iters=20, tol=1e-6, check_every=5, backend="triton")
    want = aplot_kernels.sinkhorn(C.double(), eps=0.1, n_iters=20, tol=1e-6, check_every=5, backend="torch")
    assert got.n_iters.tolist() == want.n_iters.tolist()
    assert (got.plan.double() - want.plan).abs().max() <= PLAN_BOUND * want.plan.max()
    # Envelope gradient: d reg_cost / d C = P, from any backend.
    C.requires_grad_()
    (grad,) = torch.autograd.grad(aplot_kernels.sinkhorn(C, eps=0.1, n_iters=20, backend="triton").reg_cost.sum(), C)
    torch.testing.assert_close(grad, got.plan, rtol=1e-5, atol=1e-7)


def test_auto_strategy_choice(monkeypatch):
    def pick(batch, n, m, dtype=torch.float32):
        return triton_sinkhorn.auto_strategy(torch.empty(batch, n, m, dtype=dtype, device="meta"))

    assert pick(64, 60, 128) == "fused"
    assert pick(64, 128, 128) == "fused"  # docs/design.md: the fused kernel's largest tile
    # Where the tiled loop runs as a CUDA graph (GPU tensors) it is picked over streamed.
    assert pick(64, 200, 256) == "streamed"
    monkeypatch.setattr(triton_sinkhorn, "use_graph", lambda C: True)
    assert pick(64, 200, 256) == "tiled"
    assert pick(64, 100, 100) == "fused"
    monkeypatch.undo()
    assert pick(4, 4096, 4096) == "tiled"
    assert pick(1, 512, 512) == "tiled"
    assert pick(64, 1024, 1024) == "tiled"  # 268 MB of C: HBM-bound, spread over many programs
    # The experimental strategies run only when named.
    for name in triton_sinkhorn.EXPERIMENTAL_STRATEGIES:
        assert name in triton_sinkhorn.STRATEGIES
        assert all(pick(*shape) != name for shape in ((64, 128, 128), (1, 512, 512), (4, 4096, 4096)))


def test_unknown_strategy_is_refused():
    C, a, b = problem(1, 4, 4, torch.float32, seed=29)
    with pytest.raises(ValueError, match="strategy"):
        triton_sinkhorn.solve(C, a, b, 0.1, 5, None, 10, strategy="scaling")


def test_sinkhorn_rejects_float64():
    C, a, b = problem(1, 4, 4, torch.float32, seed=23)
    with pytest.raises(ValueError, match="float64|float16"):
        triton_sinkhorn.solve(C.double(), a, b, 0.1, 5, None, 10)


ROW_COST_CASES = [
    # batch, n, m, C dtype, pad, tol; the larger cases are interpreter sweeps (slow)
    (2, 7, 11, torch.float32, True, None),
    pytest.param(1, 20, 24, torch.bfloat16, False, None, marks=pytest.mark.slow),
    pytest.param(3, 16, 16, torch.float32, False, 1e-4, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("batch, n, m, dtype, pad, tol", ROW_COST_CASES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_row_transport_costs_match_reference(strategy, batch, n, m, dtype, pad, tol, small_tiles):
    C, a, b = problem(batch, n, m, dtype, seed=n + m, pad=pad)
    got = triton_sinkhorn.row_transport_costs(C, a, b, 0.05, 14, tol, 7, strategy=strategy)
    ref = reference.solve(C.double(), a.double(), b.double(), 0.05, 14, tol, 7)
    want = (ref.plan * C.double()).sum(-1)
    assert got.shape == (batch, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    assert bool((got[a == 0] == 0).all()), "padded rows transport nothing"
    # The same numbers as the full solve's plan, reduced in torch.
    full = triton_sinkhorn.solve(C, a, b, 0.05, 14, tol, 7, strategy=strategy)
    torch.testing.assert_close(got, (full.plan * C.float()).sum(-1), rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("tol", [None, 1e-4])
def test_tiled_cuda_graph_replays_equal_plain_launches(tol):
    """The graphed tiled loop gives the plain loop's results bit for bit, also when the cached
    graph is replayed on new inputs of the same shape (stale buffers would show here)."""
    gen = generator(11)
    for _ in range(3):
        C = (2 * torch.rand(3, 70, 45, generator=gen)).to(DEVICE)
        a = (0.2 + torch.rand(3, 70, generator=gen)).to(DEVICE)
        b = (0.2 + torch.rand(3, 45, generator=gen)).to(DEVICE)
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
        assert tiled.use_graph(C)
        graphed = triton_sinkhorn.solve(C, a, b, 0.1, 30, tol, 10, strategy="tiled")
        plain = tiled.solve_tiled(C, a, b, 0.1, 30, tol, 10, True)
        for got, want in zip(graphed, plain):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        rows = triton_sinkhorn.row_transport_costs(C, a, b, 0.1, 30, tol, 10, strategy="tiled")
        torch.testing.assert_close(rows, tiled.solve_tiled(C, a, b, 0.1, 30, tol, 10, False), rtol=0, atol=0)
    assert any((3, 70, 45) in key for key in tiled.graphs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_tiled_cuda_graphs_are_kept_per_stream():
    """Solves queued on two streams at once each replay their own graph (own input/output buffers)."""
    C, a, b = problem(2, 70, 46, torch.float32, seed=59)
    C_other = C.flip(-1).contiguous()
    want = tiled.solve_tiled(C, a, b, 0.1, 30, None, 10, True)
    want_other = tiled.solve_tiled(C_other, a, b, 0.1, 30, None, 10, True)
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(main)
    got = triton_sinkhorn.solve(C, a, b, 0.1, 30, None, 10, strategy="tiled")
    with torch.cuda.stream(side):
        got_other = triton_sinkhorn.solve(C_other, a, b, 0.1, 30, None, 10, strategy="tiled")
    got_again = triton_sinkhorn.solve(C, a, b, 0.1, 30, None, 10, strategy="tiled")
    torch.cuda.synchronize()
    for out, ref in ((got, want), (got_other, want_other), (got_again, want)):
        for value, expected in zip(out, ref):
            torch.testing.assert_close(value, expected, rtol=0, atol=0)
    streams = {key[2] for key in tiled.graphs if (2, 70, 46) in key}
    assert streams == {main.cuda_stream, side.cuda_stream}
