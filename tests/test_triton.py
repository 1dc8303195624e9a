"""Triton kernels against the PyTorch reference, through the kernel modules directly.

Runs on a GPU, or on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``,
set by conftest.py when there is no GPU); shapes stay small (N, M <= 24,
D <= 40) because the interpreter runs every program in Python. Covers the cost
kernels and their backward kernels (against the reference's closed forms), the three
Sinkhorn strategies (fused: one program per problem with C in registers;
streamed: one program per problem streaming C; tiled: passes launched per
iteration), the streaming ones with tiny tiles so that every loop runs over
several tiles, non-powers
of two, half-precision inputs, strided inputs, zero-weight padding, the
tolerance mode and its early exit.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import sys
import threading
import time

import pytest
import torch

from aplot_kernels import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_ok, _why = backends.triton_status(DEVICE)
pytestmark = pytest.mark.skipif(not _ok, reason=f"Triton unavailable: {_why}")

if _ok:
    from aplot_kernels.cost import reference as cost_reference
    from aplot_kernels.cost import triton_kernels as cost_kernels
    from aplot_kernels.sinkhorn import reference as sinkhorn_reference
    from aplot_kernels.sinkhorn import triton_kernels as sinkhorn_kernels

HALF = (torch.float16, torch.bfloat16)
STRATEGIES = ["fused", "fused-scaling", "streamed", "tiled", "cooperative", "onepass"]
PLAN_BOUND = 1e-5  # SPEC section 5: max |plan diff| <= 1e-5 * max plan entry (float32 vs float64 torch)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------


def _embeddings(batch, n, m, d, dtype, seed):
    gen = _generator(seed)
    x = torch.randn(batch, n, d, generator=gen).to(dtype)
    y = torch.randn(batch, m, d, generator=gen).to(dtype)
    x[0, 0] = 0  # a zero vector: cost 1 to everything, never NaN
    rx = torch.randn(batch, n, generator=gen).to(dtype)
    ry = torch.randn(batch, m, generator=gen).to(dtype)
    return tuple(t.to(DEVICE) for t in (x, y, rx, ry))


COST_SHAPES = [(1, 5, 7, 3), (2, 17, 24, 32), (3, 16, 16, 16), (1, 24, 9, 33)]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("shape", COST_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cost_kernels_match_reference(shape, dtype):
    x, y, rx, ry = _embeddings(*shape, dtype, seed=sum(shape))
    cosine = cost_kernels.cosine_cost(x, y, 1e-8)
    aplot = cost_kernels.aplot_cost(x, y, rx, ry, 0.7, 0.5, 1e-8)
    assert cosine.dtype == aplot.dtype == torch.float32
    # Reference on the same (rounded) inputs, in float64.
    x64, y64, rx64, ry64 = (t.double() for t in (x, y, rx, ry))
    torch.testing.assert_close(cosine.double(), cost_reference.cosine_cost(x64, y64, 1e-8), rtol=0, atol=5e-7)
    torch.testing.assert_close(
        aplot.double(), cost_reference.aplot_cost(x64, y64, rx64, ry64, 0.7, 0.5, 1e-8), rtol=0, atol=5e-7
    )
    assert bool((cosine[0, 0] == 1).all())


def test_cost_kernels_strided_and_mixed_inputs():
    x, y, rx, ry = _embeddings(2, 24, 20, 18, torch.float32, seed=3)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major rows
    y_half = y.half()
    rewards = torch.randn(2, 40, generator=_generator(4)).to(DEVICE)[:, ::2]  # stride 2
    got = cost_kernels.aplot_cost(x_t, y_half, rx, rewards, 0.9, 1.0, 1e-8)
    want = cost_reference.aplot_cost(x.double(), y_half.double(), rx.double(), rewards.double(), 0.9, 1.0, 1e-8)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-7)


def test_aplot_cost_extreme_reward_gaps():
    x, y, _, _ = _embeddings(1, 16, 16, 16, torch.float32, seed=5)
    rx = torch.tensor([[1e4, -1e4] + [0.0] * 14], device=DEVICE)
    ry = torch.zeros(1, 16, device=DEVICE)
    got = cost_kernels.aplot_cost(x, y, rx, ry, 0.9, 1e-3, 1e-8)
    assert bool(torch.isfinite(got).all())
    want = cost_reference.aplot_cost(x.double(), y.double(), rx.double(), ry.double(), 0.9, 1e-3, 1e-8)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-7)


def test_public_cost_dispatches_to_triton_and_differentiates():
    import aplot_kernels

    x, y, rx, ry = (t.requires_grad_() for t in _embeddings(1, 9, 11, 8, torch.float32, seed=6))
    got = aplot_kernels.aplot_cost(x[0], y[0], rx[0], ry[0], backend="triton")
    want = aplot_kernels.aplot_cost(x[0], y[0], rx[0], ry[0], backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    grads = torch.autograd.grad(got.square().sum(), (x, y, rx, ry))
    grads_ref = torch.autograd.grad(want.square().sum(), (x, y, rx, ry))
    for g, r in zip(grads, grads_ref):
        # Both float32: the zero row's gradient (of x / eps, ~1e6) cancels, so its error scales with the row.
        scale = r.abs().amax(-1, keepdim=True)
        torch.testing.assert_close(g / scale, r / scale, rtol=1e-4, atol=1e-5)


# Backward kernels: cosine_cost_backward / aplot_cost_backward against the reference's closed forms
# in float64 on the same (rounded) inputs.

BACKWARD_SHAPES = [(1, 7, 13, 33), (2, 24, 5, 40), (3, 16, 16, 16), (1, 1, 1, 1)]
ALPHA, TEMPERATURE = 0.7, 0.5


@pytest.fixture(params=["default", "tiny"])
def backward_tiles(request, monkeypatch):
    """The shipped tiles, and tiles smaller than the test problems so every loop runs over several."""
    if request.param == "tiny":
        monkeypatch.setattr(cost_kernels, "BACKWARD_TILE", (16, 16, 16, 4))
        monkeypatch.setattr(cost_kernels, "JACOBIAN_TILE", (4, 16, 4))
    return request.param


def _backward_inputs(batch, n, m, d, dtype, seed):
    """Embeddings with a zero row and a row below the norm clamp, rewards with a tie, and a non-contiguous
    float32 ``grad_cost [B, N, M]`` (a transposed ``[B, M, N]``)."""
    x, y, rx, ry = _embeddings(batch, n, m, d, dtype, seed)  # x[0, 0] = 0
    if m > 1:
        # Norm 0.9 eps, below the clamp (0 in float16): the gradient of y / eps, with no radial projection.
        y[-1, 1] = 0.9e-8 / d**0.5
    ry[0, m // 2] = rx[0, n // 2]  # r_c == r_r: torch.sign gives 0
    grad_cost = torch.randn(batch, m, n, generator=_generator(seed + 1)).to(DEVICE).transpose(1, 2)
    assert not grad_cost.is_contiguous() or min(n, m) == 1
    return grad_cost, x, y, rx, ry


def _assert_grad_close(got, want, rtol=1e-5):
    """Elementwise ``rtol`` of ``want``, plus ``rtol / 10`` of the largest entry in the same row (the
    projection ``p - x_hat <x_hat, p>`` cancels, so tiny entries carry absolute, not relative, error),
    plus float32's smallest normal number (float64 values below it are 0 in float32)."""
    assert got.shape == want.shape
    assert bool(torch.isfinite(got).all())
    row_scale = want.abs().amax(dim=-1, keepdim=True) if want.dim() == 3 else want.abs().amax()
    err = (got.double() - want).abs()
    bound = rtol * want.abs() + 0.1 * rtol * row_scale + torch.finfo(torch.float32).tiny
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cost_backward_kernels_match_reference(shape, dtype, backward_tiles):
    grad_cost, x, y, rx, ry = _backward_inputs(*shape, dtype, seed=sum(shape))
    x64, y64, rx64, ry64, g64 = (t.double() for t in (x, y, rx, ry, grad_cost))

    got = cost_kernels.cosine_cost_backward(grad_cost, x, y, 1e-8)
    want = cost_reference.cosine_cost_backward(g64, x64, y64, 1e-8)
    assert len(got) == 2
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        _assert_grad_close(g, w)

    got = cost_kernels.aplot_cost_backward(grad_cost, x, y, rx, ry, ALPHA, TEMPERATURE, 1e-8)
    want = cost_reference.aplot_cost_backward(g64, x64, y64, rx64, ry64, ALPHA, TEMPERATURE, 1e-8)
    assert len(got) == 4
    for g, w, t in zip(got, want, (x, y, rx, ry)):
        assert g.dtype == torch.float32 and g.shape == t.shape
        _assert_grad_close(g, w)


def test_aplot_backward_reward_ties_and_extreme_gaps():
    x, y, _, _ = _embeddings(1, 16, 9, 8, torch.float32, seed=31)
    rx = torch.tensor([[1e4, -1e4, 0.5, 0.5] + [0.0] * 12], device=DEVICE)
    ry = torch.tensor([[0.0, 0.5, 2.0, 0.0, 0.5, 3.0, -1.0, 0.0, 0.25]], device=DEVICE)
    grad_cost = torch.randn(1, 16, 9, generator=_generator(32)).to(DEVICE)
    for temperature in (1e-3, 1.0):
        got = cost_kernels.aplot_cost_backward(grad_cost, x, y, rx, ry, 0.9, temperature, 1e-8)
        want = cost_reference.aplot_cost_backward(
            grad_cost.double(), x.double(), y.double(), rx.double(), ry.double(), 0.9, temperature, 1e-8
        )
        for g, w in zip(got, want):
            _assert_grad_close(g, w)
    # Only ties with every rejected reward: no reward gradient at all (sign(0) = 0).
    tied = torch.zeros(1, 16, device=DEVICE)
    _, _, grad_rx, grad_ry = cost_kernels.aplot_cost_backward(grad_cost, x, y, tied, tied[:, :9], 0.9, 1.0, 1e-8)
    assert bool((grad_rx == 0).all()) and bool((grad_ry == 0).all())
    # alpha = 1: the similarity does not enter the cost.
    grad_x, grad_y, _, _ = cost_kernels.aplot_cost_backward(grad_cost, x, y, rx, ry, 1.0, 1.0, 1e-8)
    assert bool((grad_x == 0).all()) and bool((grad_y == 0).all())


def _no_reference_backward(monkeypatch):
    """Make the torch fallback fail, so the public functions must use the Triton backward."""

    def fail(*args, **kwargs):
        raise AssertionError("the torch closed-form backward ran instead of the Triton kernels")

    monkeypatch.setattr(cost_reference, "cosine_cost_backward", fail)
    monkeypatch.setattr(cost_reference, "aplot_cost_backward", fail)


@pytest.mark.parametrize("batched", [True, False], ids=["3d", "2d"])
def test_public_cost_gradients_use_triton_backward(batched, monkeypatch):
    import aplot_kernels

    _no_reference_backward(monkeypatch)
    grad_cost, x, y, rx, ry = _backward_inputs(2, 7, 13, 33, torch.float32, seed=41)
    if not batched:
        grad_cost, x, y, rx, ry = (t[0] for t in (grad_cost, x, y, rx, ry))
    inputs = [t.clone().requires_grad_() for t in (x, y, rx, ry)]
    inputs64 = [t.double().requires_grad_() for t in (x, y, rx, ry)]
    options = dict(alpha=ALPHA, temperature=TEMPERATURE)

    got = torch.autograd.grad(aplot_kernels.aplot_cost(*inputs, backend="triton", **options), inputs, grad_cost)
    want = torch.autograd.grad(aplot_kernels.aplot_cost(*inputs64, backend="torch", **options), inputs64, grad_cost.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        _assert_grad_close(g, w)

    got = torch.autograd.grad(aplot_kernels.cosine_cost(*inputs[:2], backend="triton"), inputs[:2], grad_cost)
    want = torch.autograd.grad(aplot_kernels.cosine_cost(*inputs64[:2], backend="torch"), inputs64[:2], grad_cost.double())
    for g, w in zip(got, want):
        _assert_grad_close(g, w)

    # y = None: the self cost, whose gradient sums both sides' contributions.
    square = torch.randn(*x.shape[:-1], x.shape[-2], generator=_generator(42)).to(DEVICE)
    (got,) = torch.autograd.grad(aplot_kernels.cosine_cost(inputs[0], backend="triton"), inputs[0], square)
    (want,) = torch.autograd.grad(aplot_kernels.cosine_cost(inputs64[0], backend="torch"), inputs64[0], square.double())
    _assert_grad_close(got, want)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_public_half_precision_gradients_use_triton_backward(dtype, monkeypatch):
    import aplot_kernels

    _no_reference_backward(monkeypatch)
    grad_cost, x, y, rx, ry = _backward_inputs(1, 9, 11, 24, dtype, seed=43)
    x[0, 0], y[0, 1] = 1.0, 1.0  # no rows at the clamp: their gradients (of x / eps) overflow float16
    inputs = [t.clone().requires_grad_() for t in (x, y, rx, ry)]
    # The reference on the same (rounded) inputs widened to float64; the results are rounded to dtype.
    inputs64 = [t.double().requires_grad_() for t in (x, y, rx, ry)]
    got = torch.autograd.grad(aplot_kernels.aplot_cost(*inputs, backend="triton"), inputs, grad_cost)
    want = torch.autograd.grad(aplot_kernels.aplot_cost(*inputs64, backend="torch"), inputs64, grad_cost.double())
    ulp = torch.finfo(dtype).eps
    for g, w in zip(got, want):
        assert g.dtype == dtype
        _assert_grad_close(g.double(), w, rtol=ulp)
    got = torch.autograd.grad(aplot_kernels.cosine_cost(*inputs[:2], backend="triton"), inputs[:2], grad_cost)
    want = torch.autograd.grad(aplot_kernels.cosine_cost(*inputs64[:2], backend="torch"), inputs64[:2], grad_cost.double())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        _assert_grad_close(g.double(), w, rtol=ulp)


# ---------------------------------------------------------------------------
# Sinkhorn
# ---------------------------------------------------------------------------


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Tiles smaller than the test problems, so every streaming loop runs over several tiles."""
    monkeypatch.setitem(sinkhorn_kernels.TILED_BLOCKS, "row_block_n", 8)
    monkeypatch.setitem(sinkhorn_kernels.TILED_BLOCKS, "row_block_m", 16)
    monkeypatch.setitem(sinkhorn_kernels.TILED_BLOCKS, "col_block_n", 16)
    monkeypatch.setitem(sinkhorn_kernels.TILED_BLOCKS, "col_block_m", 8)
    monkeypatch.setitem(sinkhorn_kernels.TILED_BLOCKS, "check_block", 8)
    monkeypatch.setattr(sinkhorn_kernels, "ONEPASS_TILE", 64)  # a few rows per block, several parts per problem
    monkeypatch.setattr(sinkhorn_kernels, "ONEPASS_SUM_BLOCK", 8)  # several column blocks per problem


def _problem(batch, n, m, dtype, seed, *, pad=False, cost_scale=2.0):
    gen = _generator(seed)
    C = (torch.rand(batch, n, m, generator=gen) * cost_scale).to(dtype)
    a = torch.rand(batch, n, generator=gen) + 0.1
    b = torch.rand(batch, m, generator=gen) + 0.1
    if pad:  # ragged problems: trailing and interior zero weights
        a[0, -3:] = 0
        a[-1, 1] = 0
        b[-1, :2] = 0
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    return C.to(DEVICE), a.to(DEVICE), b.to(DEVICE)


def _assert_matches_reference(out, C, a, b, eps, n_iters, tol, check_every):
    ref = sinkhorn_reference.solve(C.double(), a.double(), b.double(), eps, n_iters, tol, check_every)
    for name in out._fields:
        value = getattr(out, name)
        assert bool(torch.isfinite(value.double()).all()), f"non-finite {name}"
    scale = ref.plan.abs().max().item()
    plan_diff = (out.plan.double() - ref.plan).abs().max().item()
    assert plan_diff <= PLAN_BOUND * scale, f"plan differs by {plan_diff / scale:.2e} of its max entry"
    assert out.plan.dtype == out.f.dtype == out.cost.dtype == torch.float32
    assert out.n_iters.dtype == torch.int64
    assert out.n_iters.tolist() == ref.n_iters.tolist()
    torch.testing.assert_close(out.cost.double(), ref.cost, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.reg_cost.double(), ref.reg_cost, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.err.double(), ref.err, rtol=1e-3, atol=1e-6)
    # Potentials matter only up to rounding of eps * log(...); padded ones are reported as 0.
    torch.testing.assert_close(out.f.double(), ref.f, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.g.double(), ref.g, rtol=0, atol=1e-5)
    # Padding: exact zero rows and columns.
    assert bool((out.plan.transpose(1, 2)[b == 0] == 0).all())
    assert bool((out.plan[a == 0] == 0).all())
    assert bool((out.f[a == 0] == 0).all()) and bool((out.g[b == 0] == 0).all())
    return ref


FIXED_CASES = [
    # batch, n, m, eps, n_iters, pad
    (2, 5, 7, 0.1, 10, False),
    (2, 17, 24, 0.05, 12, True),
    (3, 24, 9, 0.01, 10, False),
    (1, 16, 16, 0.5, 5, True),
]


@pytest.mark.parametrize("case", FIXED_CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-eps{c[3]}-K{c[4]}{'-pad' if c[5] else ''}")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_fixed_iterations(strategy, case, tiny_tiles):
    batch, n, m, eps, n_iters, pad = case
    C, a, b = _problem(batch, n, m, torch.float32, seed=n * m, pad=pad)
    out = sinkhorn_kernels.solve(C, a, b, eps, n_iters, None, 10, strategy=strategy)
    _assert_matches_reference(out, C, a, b, eps, n_iters, None, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_accuracy_rule(strategy, dtype, tiny_tiles):
    """FlashAttention's rule for each strategy: error against float64 at most a small multiple of the
    float32 torch reference's, plan and costs, at eps=0.02 on costs in [0, 2]."""
    from conftest import assert_within_rule  # not at module level: the --compile-sm run must not load conftest

    batch, n, m = (3, 45, 71) if DEVICE.type == "cuda" else (2, 19, 26)
    C, a, b = _problem(batch, n, m, dtype, seed=n + m, pad=True)
    n_iters = 40 if DEVICE.type == "cuda" else 12
    reference64 = sinkhorn_reference.solve(C.double(), a.double(), b.double(), 0.02, n_iters, None, 10)
    plain = sinkhorn_reference.solve(C.float(), a, b, 0.02, n_iters, None, 10)
    out = sinkhorn_kernels.solve(C, a, b, 0.02, n_iters, None, 10, strategy=strategy)
    for field in ("plan", "cost", "reg_cost"):
        assert_within_rule(getattr(out, field), getattr(plain, field), getattr(reference64, field), f"{strategy} {field}")


@pytest.mark.parametrize("eps", [0.01, 0.03])
@pytest.mark.parametrize("shift", ["columns", "rows"])
def test_scaling_domain_falls_back_to_log_domain(shift, eps):
    """Costs that make exp(-C / eps) underflow whole columns (or rows): the scaling-domain loop must
    discard those iterations and run them in the log domain (SPEC: conformance down to eps = 0.01)."""
    gen = _generator(53)
    n, m = 21, 18
    C = torch.rand(1, n, m, generator=gen) * 0.2
    ramp = torch.linspace(0.0, 1.8, m if shift == "columns" else n)
    C = C + (ramp[None, None, :] if shift == "columns" else ramp[None, :, None])
    last = C[0, :, -1] if shift == "columns" else C[0, -1]
    if eps == 0.01:  # exp(-C / eps) of the last column (row) is below 2**-126 = exp(-87.3)
        assert last.min().item() / eps > 87.4
    a = torch.rand(1, n, generator=gen) + 0.1
    b = torch.rand(1, m, generator=gen) + 0.1
    a, b = (w / w.sum() for w in (a, b))
    C, a, b = C.to(DEVICE), a.to(DEVICE), b.to(DEVICE)
    for tol in (None, 1e-6):
        out = sinkhorn_kernels.solve(C, a, b, eps, 40, tol, 10, strategy="fused-scaling")
        _assert_matches_reference(out, C, a, b, eps, 40, tol, 10)


@pytest.mark.parametrize("tol", [None, 1e-4])
def test_onepass_exact_column_pass_when_sums_are_small(tol, tiny_tiles, monkeypatch):
    """The one-pass strategy's fallback: with the threshold raised above every column sum, each
    v-update comes from the log-sum-exp column pass instead of the row pass's sums; same iterates."""
    import triton.language as tl

    C, a, b = _problem(3, 20, 13, torch.float32, seed=89, pad=True)
    C = C * torch.tensor([0.2, 1.0, 3.0], device=DEVICE)[:, None, None]
    summed = sinkhorn_kernels.solve(C, a, b, 0.1, 28, tol, 7, strategy="onepass")
    _assert_matches_reference(summed, C, a, b, 0.1, 28, tol, 7)
    assert sinkhorn_kernels._onepass_parts(3, 20, 2, C.device) > 1
    monkeypatch.setattr(sinkhorn_kernels, "ONEPASS_MIN_SUM_K", tl.constexpr(2.0))
    exact = sinkhorn_kernels.solve(C, a, b, 0.1, 28, tol, 7, strategy="onepass")
    _assert_matches_reference(exact, C, a, b, 0.1, 28, tol, 7)
    torch.testing.assert_close(exact.plan, summed.plan, rtol=0, atol=2e-6 * summed.plan.max().item())
    with pytest.raises(ValueError, match="whole rows"):
        sinkhorn_kernels.solve(torch.rand(1, 4, 100, device=DEVICE), a[:1, :4] * 0 + 0.25,
                               torch.full((1, 100), 0.01, device=DEVICE), 0.1, 3, None, 10, strategy="onepass")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_reads_half_cost(strategy, dtype, tiny_tiles):
    C, a, b = _problem(2, 19, 13, dtype, seed=7, pad=True)
    out = sinkhorn_kernels.solve(C, a, b, 0.05, 15, None, 10, strategy=strategy)
    # The reference sees exactly the half-precision values, widened.
    _assert_matches_reference(out, C, a, b, 0.05, 15, None, 10)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_tolerance_stops_each_problem(strategy):
    # Different eps-to-cost ratios make the problems converge at different checks.
    C, a, b = _problem(3, 20, 20, torch.float32, seed=11)
    C = C * torch.tensor([0.2, 1.0, 3.0], device=DEVICE)[:, None, None]
    out = sinkhorn_kernels.solve(C, a, b, 0.1, 28, 1e-4, 7, strategy=strategy)
    ref = _assert_matches_reference(out, C, a, b, 0.1, 28, 1e-4, 7)
    assert len(set(ref.n_iters.tolist())) > 1, "the case should stop problems at different iterations"
    stopped = out.n_iters < 28
    assert bool(stopped.any()) and all(k % 7 == 0 for k in out.n_iters[stopped].tolist())
    assert bool((out.err[stopped] <= 1e-4).all())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_tolerance_cap_and_unchecked_err(strategy, tiny_tiles):
    C, a, b = _problem(2, 12, 10, torch.float32, seed=13, pad=True)
    # tol=0 never stops: the cap holds and err is the last measured value (iteration 8 of 11).
    out = sinkhorn_kernels.solve(C, a, b, 0.05, 11, 0.0, 4, strategy=strategy)
    _assert_matches_reference(out, C, a, b, 0.05, 11, 0.0, 4)
    assert out.n_iters.tolist() == [11, 11]
    # check_every beyond the cap: never measured, so err is computed at the end.
    out = sinkhorn_kernels.solve(C, a, b, 0.05, 6, 1e-3, 50, strategy=strategy)
    _assert_matches_reference(out, C, a, b, 0.05, 6, 1e-3, 50)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sinkhorn_strided_inputs(strategy, tiny_tiles):
    C, a, b = _problem(2, 10, 14, torch.float32, seed=17)
    C_t = C.transpose(1, 2).contiguous().transpose(1, 2)
    a_expanded = torch.full((1, 10), 0.1, device=DEVICE).expand(2, 10)
    b_expanded = torch.full((1, 14), 1 / 14, device=DEVICE).expand(2, 14)
    out = sinkhorn_kernels.solve(C_t, a_expanded, b_expanded, 0.1, 12, None, 10, strategy=strategy)
    _assert_matches_reference(out, C, a_expanded, b_expanded, 0.1, 12, None, 10)


def test_sinkhorn_auto_strategy_and_public_api():
    import aplot_kernels

    C, _, _ = _problem(2, 9, 11, torch.float32, seed=19)
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
        return sinkhorn_kernels._auto_strategy(torch.empty(batch, n, m, dtype=dtype, device="meta"))

    assert pick(64, 60, 128) == "fused"
    assert pick(64, 128, 128) == "fused"  # fastest there on an H100 (bench/results/gpu)
    # Where the tiled loop runs as a CUDA graph (GPU tensors) it is picked over streamed.
    assert pick(64, 200, 256) == "streamed"
    monkeypatch.setattr(sinkhorn_kernels, "_use_graph", lambda C: True)
    assert pick(64, 200, 256) == "tiled"
    assert pick(64, 100, 100) == "fused"
    monkeypatch.undo()
    assert pick(4, 4096, 4096) == "tiled"
    assert pick(1, 512, 512) == "tiled"
    assert pick(64, 1024, 1024) == "tiled"  # 268 MB of C: HBM-bound, spread over many programs
    # The variants not yet timed on a GPU, asked for by environment variables.
    monkeypatch.setenv("APLOT_KERNELS_TRITON_SCALING", "1")
    monkeypatch.setenv("APLOT_KERNELS_TRITON_COOPERATIVE", "1")
    assert pick(64, 128, 128) == "fused-scaling"
    assert pick(1, 512, 512) == "cooperative"
    monkeypatch.setenv("APLOT_KERNELS_TRITON_SCALING", "0")
    monkeypatch.delenv("APLOT_KERNELS_TRITON_COOPERATIVE")
    assert pick(64, 128, 128) == "fused" and pick(1, 512, 512) == "tiled"
    monkeypatch.setenv("APLOT_KERNELS_TRITON_ONEPASS", "1")
    assert pick(4, 4096, 4096) == "onepass"
    assert pick(1, 64, 20000) == "tiled", "rows longer than the one-pass tile"


def test_environment_selects_the_scaling_domain_margin(monkeypatch):
    """APLOT_KERNELS_TRITON_SCALING=1 reaches the fused margin kernel through the public API."""
    import aplot_kernels
    from aplot_kernels import loss_triton

    seen = []
    real = loss_triton._aplot_margin_kernel
    monkeypatch.setattr(loss_triton, "_aplot_margin_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: lambda *args, **kwargs: (seen.append(kwargs["SCALING"]), real[grid](*args, **kwargs)),
    })())
    x, y, rx, ry = (t[0] for t in _embeddings(1, 6, 6, 16, torch.float32, seed=83))
    plain = aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton", n_iters=10)
    monkeypatch.setenv("APLOT_KERNELS_TRITON_SCALING", "1")
    scaled = aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton", n_iters=10)
    assert seen == [False, True]
    torch.testing.assert_close(scaled, plain, rtol=2e-6, atol=1e-8)


def test_sinkhorn_rejects_float64():
    C, a, b = _problem(1, 4, 4, torch.float32, seed=23)
    with pytest.raises(ValueError, match="float64|float16"):
        sinkhorn_kernels.solve(C.double(), a, b, 0.1, 5, None, 10)


def test_margin_through_triton_matches_torch():
    import aplot_kernels

    x, y, rx, ry = (t[0] for t in _embeddings(1, 12, 12, 16, torch.float32, seed=29))
    got = aplot_kernels.aplot_margin(rx, ry, x, y, eps=0.05, n_iters=30, backend="triton")
    want = aplot_kernels.aplot_margin(rx.double(), ry.double(), x.double(), y.double(), eps=0.05, n_iters=30, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


ROW_COST_CASES = [
    # batch, n, m, C dtype, pad, tol
    (2, 7, 11, torch.float32, True, None),
    (1, 20, 24, torch.bfloat16, False, None),
    (3, 16, 16, torch.float32, False, 1e-4),
]


@pytest.mark.parametrize("case", ROW_COST_CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-{str(c[3])[6:]}{'-pad' if c[4] else ''}-tol{c[5]}")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_row_transport_costs_match_reference(strategy, case, tiny_tiles):
    batch, n, m, dtype, pad, tol = case
    C, a, b = _problem(batch, n, m, dtype, seed=n + m, pad=pad)
    got = sinkhorn_kernels.row_transport_costs(C, a, b, 0.05, 14, tol, 7, strategy=strategy)
    ref = sinkhorn_reference.solve(C.double(), a.double(), b.double(), 0.05, 14, tol, 7)
    want = (ref.plan * C.double()).sum(-1)
    assert got.shape == (batch, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    assert bool((got[a == 0] == 0).all()), "padded rows transport nothing"
    # The same numbers as the full solve's plan, reduced in torch.
    full = sinkhorn_kernels.solve(C, a, b, 0.05, 14, tol, 7, strategy=strategy)
    torch.testing.assert_close(got, (full.plan * C.float()).sum(-1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, m", [(7, 7), (16, 16), (20, 20), (7, 12), (16, 24)])
def test_detached_triton_margin_writes_no_plan(n, m, emb_dtype, monkeypatch):
    import aplot_kernels

    def no_full_solve(*args, **kwargs):
        raise AssertionError("the detached Triton margin should not run the plan-writing solve")

    x, y, rx, ry = (t[0] for t in _embeddings(1, n, m, 32, emb_dtype, seed=n * m))
    options = dict(alpha=0.8, temperature=0.7, eps=0.05, n_iters=20, scale=1.3)
    with monkeypatch.context() as patch:
        patch.setattr(sinkhorn_kernels, "solve", no_full_solve)
        got = aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton", **options)
    # The reference on the same (rounded) inputs, widened to float64.
    want = aplot_kernels.aplot_margin(*(t.double() for t in (rx, ry, x, y)), backend="torch", **options)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    # The plan-writing path (what APLOTLoss logs) gives the same margins.
    out = aplot_kernels.APLOTLoss(backend="triton", **options)(rx, ry, x, y, return_outputs=True)
    assert out.plan is not None and out.plan.shape == (n, m)
    torch.testing.assert_close(out.margins, got, rtol=1e-6, atol=1e-8)


MARGIN_CASES = [
    # n, m, D, embedding dtype
    (1, 3, 8, torch.float32),
    (7, 7, 33, torch.float32),
    (12, 20, 40, torch.bfloat16),
    (16, 16, 16, torch.float16),
    (5, 17, 24, torch.bfloat16),
]


def _forbid(patch, module, name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"the fused margin should not call {module.__name__}.{name}")

    patch.setattr(module, name, forbidden)


@pytest.mark.parametrize("case", MARGIN_CASES, ids=lambda c: f"{c[0]}x{c[1]}-D{c[2]}-{str(c[3])[6:]}")
def test_fused_margin_kernel_matches_reference(case, monkeypatch):
    """Cost, Sinkhorn and row costs in one kernel: no cost kernel, no solve, no C or P written."""
    import aplot_kernels

    n, m, d, dtype = case
    x, y, rx, ry = (t[0] for t in _embeddings(1, n, m, d, dtype, seed=7 * n + m + d))
    x = x.t().contiguous().t()  # column-major: the kernel takes any strides
    options = dict(alpha=0.8, temperature=0.7, eps=0.05, n_iters=20, scale=1.3)
    inputs = [t.clone() for t in (rx, ry, x, y)]
    with monkeypatch.context() as patch:
        _forbid(patch, cost_kernels, "aplot_cost")
        _forbid(patch, sinkhorn_kernels, "row_transport_costs")
        _forbid(patch, sinkhorn_kernels, "solve")
        got = aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton", **options)
        loss = aplot_kernels.aplot_loss(rx, ry, x, y, backend="triton", reduction="none", **options)
    for before, after in zip(inputs, (rx, ry, x, y)):
        assert torch.equal(before, after), "inputs are left untouched"
    # The reference on the same (rounded) inputs, widened to float64.
    want = aplot_kernels.aplot_margin(*(t.double() for t in (rx, ry, x, y)), backend="torch", **options)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)
    # The loss subtracts the float32 margin from the reward gap taken in the rewards' dtype.
    want_loss = aplot_kernels.bt_loss(rx, ry[:n], want.float(), reduction="none")
    torch.testing.assert_close(loss, want_loss, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("case", MARGIN_CASES[1:4], ids=lambda c: f"{c[0]}x{c[1]}-D{c[2]}-{str(c[3])[6:]}")
def test_fused_margin_kernel_in_scaling_domain(case):
    """The margin kernel with the scaling-domain loop (recomputing the cost on a fallback) matches the reference."""
    import aplot_kernels
    from aplot_kernels import loss_triton

    n, m, d, dtype = case
    x, y, rx, ry = (t[0] for t in _embeddings(1, n, m, d, dtype, seed=3 * n + m + d))
    got = loss_triton.aplot_margin(rx, ry, x, y, 0.8, 0.7, 1e-8, 0.05, 20, 1.3, scaling=True)
    want = aplot_kernels.aplot_margin(*(t.double() for t in (rx, ry, x, y)), alpha=0.8, temperature=0.7, eps=0.05,
                                      n_iters=20, scale=1.3, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("scaling", [False, True])
def test_fused_margin_with_underflowing_column(scaling):
    """A rejected response every chosen one nearly equals, with tied rewards: its cost column is about
    1 - alpha / 2 = 0.95 throughout, exp(-C / eps) underflows at eps = 0.01, and the scaling-domain loop
    must fall back to log-domain iterations (recomputing the cost tile from the embeddings)."""
    import aplot_kernels
    from aplot_kernels import loss_triton

    gen = _generator(73)
    n, m, d = 11, 14, 24
    anchor = torch.randn(d, generator=gen)
    x = anchor + 0.01 * torch.randn(n, d, generator=gen)
    y = torch.randn(m, d, generator=gen)
    y[-1] = anchor
    rx = torch.zeros(n)
    ry = torch.randn(m, generator=gen)
    ry[-1] = 0.0
    x, y, rx, ry = (t.to(DEVICE) for t in (x, y, rx, ry))
    options = dict(alpha=0.1, temperature=1.0, eps=0.01, n_iters=25, scale=1.0)
    want = aplot_kernels.aplot_margin(*(t.double() for t in (rx, ry, x, y)), backend="torch", **options)
    cost = aplot_kernels.aplot_cost(x.double(), y.double(), rx.double(), ry.double(), alpha=0.1)
    assert cost[:, -1].min().item() / 0.01 > 87.4, "the last column's kernel entries are below 2**-126"
    got = loss_triton.aplot_margin(rx, ry, x, y, 0.1, 1.0, 1e-8, 0.01, 25, 1.0, scaling=scaling)
    torch.testing.assert_close(got.double(), want, rtol=5e-6, atol=1e-7)


@pytest.mark.parametrize("scaling", [False, True])
@pytest.mark.parametrize("n, m, d, dtype", [(128, 128, 64, torch.bfloat16), (100, 113, 72, torch.float32)],
                         ids=["128x128-bf16", "100x113-fp32"])
def test_fused_margin_kernel_at_its_largest_size(n, m, d, dtype, scaling):
    """The sizes a training step uses (up to 128 pairs on a side), with the default 50 iterations."""
    import aplot_kernels
    from aplot_kernels import loss_triton

    x, y, rx, ry = (t[0] for t in _embeddings(1, n, m, d, dtype, seed=n + m + d))
    assert loss_triton.fits(n, m)
    got = loss_triton.aplot_margin(rx, ry, x, y, 0.9, 1.0, 1e-8, 0.1, 50, 1.0, scaling=scaling)
    want = aplot_kernels.aplot_margin(*(t.double() for t in (rx, ry, x, y)), backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)


def test_fused_margin_only_where_it_fits(monkeypatch):
    """Past the fused size the margin takes the cost kernel and the row-cost Sinkhorn, with the same numbers."""
    import aplot_kernels
    from aplot_kernels import loss_triton

    x, y, rx, ry = (t[0] for t in _embeddings(1, 20, 24, 16, torch.float32, seed=41))
    options = dict(eps=0.08, n_iters=15, backend="triton")
    fused = aplot_kernels.aplot_margin(rx, ry, x, y, **options)
    assert loss_triton.fits(20, 24) and loss_triton.fits(128, 128) and not loss_triton.fits(129, 128)
    assert not loss_triton.fits(8, 1024), "long operand tiles would not fit in shared memory"
    monkeypatch.setattr(sinkhorn_kernels, "FUSED_MAX_ELEMENTS", 16 * 16)
    assert not loss_triton.fits(20, 24)
    calls = []
    real = sinkhorn_kernels.row_transport_costs
    monkeypatch.setattr(sinkhorn_kernels, "row_transport_costs", lambda *a, **k: calls.append(1) or real(*a, **k))
    unfused = aplot_kernels.aplot_margin(rx, ry, x, y, **options)
    assert calls, "the large-problem path reduces rows in the Sinkhorn kernel"
    torch.testing.assert_close(fused, unfused, rtol=2e-6, atol=1e-8)
    with pytest.raises(ValueError, match="fused margin"):
        loss_triton.aplot_margin(rx, ry, x, y, 0.9, 1.0, 1e-8, 0.1, 5, 1.0)


def test_fused_margin_falls_back_when_it_cannot_launch(monkeypatch):
    """A GPU the fused kernel cannot run on (out of shared memory or registers, a ptxas error) gets
    the two-kernel margin, with one warning, instead of an exception in the training step."""
    import triton

    import aplot_kernels
    from aplot_kernels import loss_triton

    monkeypatch.setattr(loss_triton, "_unavailable_reason", None)
    launches = []

    def refuse(*args, **kwargs):
        launches.append(1)
        raise triton.OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(loss_triton, "_aplot_margin_kernel", type("Refuses", (), {"__getitem__": lambda self, grid: refuse})())
    x, y, rx, ry = (t[0] for t in _embeddings(1, 11, 13, 16, torch.float32, seed=43))
    options = dict(eps=0.08, n_iters=15)
    with pytest.warns(RuntimeWarning, match="fused Triton margin kernel could not run"):
        first = aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton", **options)
    second = aplot_kernels.aplot_loss(rx, ry, x, y, backend="triton", reduction="none", **options)
    assert launches == [1] and not loss_triton.available()  # tried once, then not again
    want = aplot_kernels.aplot_margin(rx.double(), ry.double(), x.double(), y.double(), backend="torch", **options)
    torch.testing.assert_close(first.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second.double(), -torch.nn.functional.logsigmoid((rx - ry[:11]).double() - want), rtol=1e-5,
                               atol=1e-6)


def test_fused_margin_call_runs_its_checks_and_one_kernel(monkeypatch):
    """Everything a fused-margin call launches besides its kernel: one reduction per checked tensor,
    their stack (read back once) and the output buffer. On a GPU each further op would be a launch
    of several microseconds, against a kernel of tens of microseconds at training sizes."""
    import aplot_kernels
    from conftest import DeviceOps

    from aplot_kernels import loss_triton

    launches = []
    monkeypatch.setattr(loss_triton, "_aplot_margin_kernel", type("Records", (), {
        "__getitem__": lambda self, grid: lambda *args, **kwargs: launches.append(grid)})())
    x, y, rx, ry = (t[0] for t in _embeddings(1, 11, 13, 16, torch.bfloat16, seed=47))
    aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton")  # a training step repeats the same call
    with DeviceOps() as recorded:
        aplot_kernels.aplot_margin(rx, ry, x, y, backend="triton")
    assert recorded.ops == ["aten.sum"] * 4 + ["aten.stack", "aten.empty"]
    assert launches == [(1,), (1,)]


def test_cost_call_launches_one_norm_pass_and_one_cost_kernel(monkeypatch):
    """The row norms of both inputs are one launch; with the cost kernel and the checks' sums and
    stack, that is all an ``aplot_cost`` call runs on the device."""
    import aplot_kernels
    from conftest import DeviceOps

    launches = []
    for name in ("_row_norms_kernel", "_aplot_cost_kernel"):
        monkeypatch.setattr(cost_kernels, name, type("Records", (), {
            "__getitem__": lambda self, grid, name=name: lambda *args, **kwargs: launches.append(name)})())
    x, y, rx, ry = _embeddings(2, 11, 13, 16, torch.bfloat16, seed=53)
    with DeviceOps() as recorded:
        aplot_kernels.aplot_cost(x, y, rx, ry, backend="triton")
    assert launches == ["_row_norms_kernel", "_aplot_cost_kernel"]
    assert [op for op in recorded.ops if op not in ("aten.slice", "aten.empty")] == ["aten.sum"] * 4 + ["aten.stack"]


def test_loss_forms_plan_only_when_returned(monkeypatch):
    """The loss alone (and margins for logging) never run the plan-writing solve; the outputs do."""
    import aplot_kernels

    x, y, rx, ry = (t[0] for t in _embeddings(1, 9, 9, 16, torch.float32, seed=43))
    module = aplot_kernels.APLOTLoss(backend="triton", eps=0.07, n_iters=12)
    with_plan = module(rx, ry, x, y, return_outputs=True)
    assert with_plan.plan is not None and with_plan.cost is not None
    with monkeypatch.context() as patch:
        _forbid(patch, sinkhorn_kernels, "solve")
        loss = module(rx, ry, x, y)
        margins_only = module(rx, ry, x, y, return_outputs=True, with_plan=False)
        functional = aplot_kernels.aplot_loss(rx, ry, x, y, backend="triton", eps=0.07, n_iters=12)
    assert margins_only.plan is None and margins_only.cost is None
    torch.testing.assert_close(margins_only.margins, with_plan.margins, rtol=2e-6, atol=1e-8)
    for value in (loss, margins_only.loss, functional):
        torch.testing.assert_close(value, with_plan.loss, rtol=2e-6, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("tol", [None, 1e-4])
def test_tiled_cuda_graph_replays_equal_plain_launches(tol):
    """The graphed tiled loop gives the plain loop's results bit for bit, also when the cached
    graph is replayed on new inputs of the same shape (stale buffers would show here)."""
    from aplot_kernels.sinkhorn import triton_kernels as tk

    gen = _generator(11)
    for _ in range(3):
        C = (2 * torch.rand(3, 70, 45, generator=gen)).to(DEVICE)
        a = (0.2 + torch.rand(3, 70, generator=gen)).to(DEVICE)
        b = (0.2 + torch.rand(3, 45, generator=gen)).to(DEVICE)
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
        assert tk._use_graph(C)
        graphed = tk.solve(C, a, b, 0.1, 30, tol, 10, strategy="tiled")
        plain = tk._solve_tiled(C, a, b, 0.1, 30, tol, 10, True)
        for got, want in zip(graphed, plain):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        rows = tk.row_transport_costs(C, a, b, 0.1, 30, tol, 10, strategy="tiled")
        torch.testing.assert_close(rows, tk._solve_tiled(C, a, b, 0.1, 30, tol, 10, False), rtol=0, atol=0)
    assert any((3, 70, 45) in key for key in tk._graphs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_aplot_loss_captures_in_a_cuda_graph():
    """A training step's loss (fused margin kernel, value checks skipped while capturing) replays as a CUDA graph."""
    import aplot_kernels

    x, y, rx, ry = (t[0] for t in _embeddings(1, 24, 24, 64, torch.bfloat16, seed=79))
    options = dict(backend="triton", eps=0.1, n_iters=30)
    eager = aplot_kernels.aplot_loss(rx, ry, x, y, **options)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernel) outside the capture
        aplot_kernels.aplot_loss(rx, ry, x, y, **options)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = aplot_kernels.aplot_loss(rx, ry, x, y, **options)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_tiled_cuda_graphs_are_kept_per_stream():
    """Solves queued on two streams at once each replay their own graph (own input/output buffers)."""
    tk = sinkhorn_kernels
    C, a, b = _problem(2, 70, 46, torch.float32, seed=59)
    C_other = C.flip(-1).contiguous()
    want = tk._solve_tiled(C, a, b, 0.1, 30, None, 10, True)
    want_other = tk._solve_tiled(C_other, a, b, 0.1, 30, None, 10, True)
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(main)
    got = tk.solve(C, a, b, 0.1, 30, None, 10, strategy="tiled")
    with torch.cuda.stream(side):
        got_other = tk.solve(C_other, a, b, 0.1, 30, None, 10, strategy="tiled")
    got_again = tk.solve(C, a, b, 0.1, 30, None, 10, strategy="tiled")
    torch.cuda.synchronize()
    for out, ref in ((got, want), (got_other, want_other), (got_again, want)):
        for value, expected in zip(out, ref):
            torch.testing.assert_close(value, expected, rtol=0, atol=0)
    streams = {key[1] for key in tk._graphs if (2, 70, 46) in key}
    assert streams == {main.cuda_stream, side.cuda_stream}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programs meeting at a barrier run concurrently only on a GPU")
@pytest.mark.skipif(os.environ.get("APLOT_TEST_SKIP_COOPERATIVE") == "1", reason="cooperative smoke check failed on this GPU")
@pytest.mark.parametrize("parts", [2, 3, 7, None])
@pytest.mark.parametrize("tol", [None, 1e-5])
def test_cooperative_parts_match_reference(parts, tol):
    """A problem split over several programs (row and column blocks strided over them) that meet at barriers."""
    C, a, b = _problem(3, 75, 52, torch.float32, seed=61, pad=True)
    C = C * torch.tensor([0.3, 1.0, 2.5], device=DEVICE)[:, None, None]  # checks stop the problems at different k
    out = sinkhorn_kernels._solve_cooperative(C, a, b, 0.08, 40, tol, 5, True, parts=parts)
    _assert_matches_reference(out, C, a, b, 0.08, 40, tol, 5)
    rows = sinkhorn_kernels._solve_cooperative(C, a, b, 0.08, 40, tol, 5, False, parts=parts)
    torch.testing.assert_close(rows, (out.plan * C).sum(-1), rtol=1e-6, atol=1e-9)


@contextlib.contextmanager
def _interpreter_programs_in_threads(timeout_s: float = 120.0):
    """Run each program of an interpreted launch in its own thread, all at once, as resident GPU programs run.

    The Triton interpreter runs a launch's programs one after another, so
    programs that wait for each other at a barrier would never meet. Here the
    interpreter's grid index becomes per thread and every program gets a
    thread; atomics are the interpreter's own (real host atomics). A launch
    whose programs are still waiting after ``timeout_s`` raises ``TimeoutError``.
    Relies on interpreter internals: skips the test where they differ.
    """
    try:
        from triton.runtime import interpreter as interp

        builder = interp.interpreter_builder
        original_call = interp.GridExecutor.__call__
        needed = (interp._patch_lang, interp._implicit_cvt, interp.GridExecutor._init_args_hst,
                  interp.GridExecutor._restore_args_dev, builder.set_grid_idx, builder.set_grid_dim)
    except AttributeError as exc:
        pytest.skip(f"Triton interpreter internals differ: {exc}")
    assert all(needed)
    builder_type = type(builder)
    per_thread = threading.local()

    def call(self, *args_dev, **kwargs):
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        patch_scope = interp._patch_lang(self.fn)
        errors = []
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {name: arg if name in self.constexprs else interp._implicit_cvt(arg) for name, arg in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            builder.set_grid_dim(*grid)

            def program(x, y, z):
                try:
                    builder.set_grid_idx(x, y, z)
                    self.fn(**args)
                except BaseException as exc:  # re-raised in the launching thread
                    errors.append(exc)

            threads = [threading.Thread(target=program, args=idx, daemon=True) for idx in itertools.product(*map(range, grid))]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + timeout_s
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if any(thread.is_alive() for thread in threads):
                raise TimeoutError(f"programs still waiting after {timeout_s} s: a barrier never opened")
        finally:
            patch_scope.restore()
        if errors:
            raise errors[0]
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    switch_interval = sys.getswitchinterval()
    builder_type.grid_idx = property(lambda self: getattr(per_thread, "idx", None),
                                     lambda self, value: setattr(per_thread, "idx", value))
    interp.GridExecutor.__call__ = call
    sys.setswitchinterval(1e-4)  # programs spinning at a barrier hand the interpreter over sooner
    try:
        yield
    finally:
        sys.setswitchinterval(switch_interval)
        interp.GridExecutor.__call__ = original_call
        del builder_type.grid_idx


@pytest.mark.skipif(DEVICE.type != "cpu", reason="on a GPU the programs run concurrently anyway")
@pytest.mark.parametrize("parts, tol", [(2, None), (3, 1e-5)])
def test_cooperative_parts_meet_at_barriers_in_threads(parts, tol, monkeypatch):
    """The cooperative kernel with each problem split over several programs, all running at once
    (threads under the interpreter), against the reference; without its barriers this fails."""
    monkeypatch.setattr(sinkhorn_kernels, "_resident_programs", lambda device: 64)
    C, a, b = _problem(2, 21, 17, torch.float32, seed=71, pad=True)
    C = C * torch.tensor([0.3, 2.0])[:, None, None]  # with tol: the problems stop at different checks
    with _interpreter_programs_in_threads():
        out = sinkhorn_kernels._solve_cooperative(C, a, b, 0.08, 15, tol, 5, True, parts=parts)
    _assert_matches_reference(out, C, a, b, 0.08, 15, tol, 5)


def test_cooperative_parts_off_gpu():
    """Off a GPU each problem is one program: parts > 1 could never meet at their barrier."""
    C, a, b = _problem(2, 30, 20, torch.float32, seed=67)
    if DEVICE.type == "cpu":
        assert sinkhorn_kernels._cooperative_parts(C) == 1
        with pytest.raises(ValueError, match="resident"):
            sinkhorn_kernels._solve_cooperative(C, a, b, 0.1, 5, None, 10, True, parts=2)
    else:
        parts = sinkhorn_kernels._cooperative_parts(C)
        assert 1 <= parts and 2 * parts <= torch.cuda.get_device_properties(DEVICE).multi_processor_count
        with pytest.raises(ValueError, match="resident"):
            sinkhorn_kernels._solve_cooperative(C, a, b, 0.1, 5, None, 10, True, parts=10_000)


# ---------------------------------------------------------------------------
# Ahead-of-time compilation for the H100 (sm_90) and the A100 (sm_80), without
# a GPU: catches what the interpreter accepts but the compiler rejects. Runs in
# a subprocess because kernels defined under TRITON_INTERPRET=1 cannot be
# compiled.
# ---------------------------------------------------------------------------


SHARED_MEMORY_PER_BLOCK = {90: 232448, 80: 166912}  # H100, A100: cudaDevAttrMaxSharedMemoryPerBlockOptin


def _compile_all(capability: int) -> None:
    from aplot_kernels import loss_triton as loss_mod
    from aplot_kernels._triton_utils import num_warps_for
    from aplot_kernels.cost import triton_kernels as cost_mod
    from aplot_kernels.sinkhorn import triton_kernels as sink_mod
    from bench.kernel_stats import compile_for

    # Largest shared memory one program may ask for (opt-in, per block): a kernel over it compiles
    # here but fails at launch on the GPU with "out of resource: shared memory".
    shared_limit = SHARED_MEMORY_PER_BLOCK[capability]

    def build(fn, pointers, floats, constexprs, num_warps):
        kernel = compile_for(fn, pointers, floats, constexprs, num_warps, capability,
                             num_stages=cost_mod.NUM_STAGES)  # as launched
        shared = kernel.metadata.shared
        print("compiled", fn.__name__, constexprs, f"shared memory {shared} B")
        assert shared <= shared_limit, f"{fn.__name__} {constexprs}: {shared} B of shared memory, sm_{capability} has {shared_limit}"

    f32 = "fp32"
    scaled = ("neg_inv_hi", "neg_inv_lo")
    for c_type in ("fp32", "bf16"):
        fused = dict(c_ptr=c_type, a_ptr=f32, b_ptr=f32, plan_ptr=f32, row_cost_ptr=f32, f_ptr=f32, g_ptr=f32, cost_ptr=f32,
                     reg_ptr=f32, iters_ptr="i64", err_ptr=f32)
        for write_plan in (True, False):
            for scaling in (False, True):
                build(sink_mod._solve_fused_kernel, fused, ("eps", "tol") + scaled,
                      dict(HAS_TOL=c_type == "fp32", WRITE_PLAN=write_plan, SCALING=scaling, BLOCK_N=64, BLOCK_M=128), 16)
        # Other shapes auto sends to the fused kernel (one row, small and oblong), with their warps.
        for block_n, block_m in ((1, 16), (32, 64), (128, 8)):
            warps = num_warps_for(block_n * block_m, per_thread=sink_mod.FUSED_ENTRIES_PER_THREAD)
            for scaling in (False, True):
                build(sink_mod._solve_fused_kernel, fused, ("eps", "tol") + scaled,
                      dict(HAS_TOL=True, WRITE_PLAN=True, SCALING=scaling, BLOCK_N=block_n, BLOCK_M=block_m), warps)
        build(sink_mod._column_pass_kernel, dict(c_ptr=c_type, log_u_ptr=f32, b_ptr=f32, out_ptr=f32, active_ptr="i32"), scaled,
              dict(WRITE_V=True, BLOCK_N=128, BLOCK_M=32), 8)
        build(sink_mod._row_pass_kernel, dict(c_ptr=c_type, log_v_ptr=f32, a_ptr=f32, log_u_ptr=f32, active_ptr="i32"), scaled,
              dict(BLOCK_N=32, BLOCK_M=128), 8)
    for write_plan in (True, False):  # the solve, and the row transport costs alone
        build(sink_mod._solve_streamed_kernel, dict(c_ptr="bf16", a_ptr=f32, b_ptr=f32, log_u_ptr=f32, log_v_ptr=f32, plan_ptr=f32,
              row_cost_ptr=f32, iters_ptr="i64", err_ptr=f32), ("tol",) + scaled,
              dict(HAS_TOL=True, WRITE_PLAN=write_plan, ROW_BLOCK_N=32, ROW_BLOCK_M=128, COL_BLOCK_N=128, COL_BLOCK_M=32), 8)
        build(sink_mod._plan_kernel, dict(c_ptr="fp16", log_u_ptr=f32, log_v_ptr=f32, plan_ptr=f32, row_cost_ptr=f32), scaled,
              dict(WRITE_PLAN=write_plan, BLOCK_N=32, BLOCK_M=128), 8)
    for has_tol in (True, False):
        build(sink_mod._solve_cooperative_kernel, dict(c_ptr="bf16", a_ptr=f32, b_ptr=f32, log_u_ptr=f32, log_v_ptr=f32,
              col_lse_ptr=f32, partial_err_ptr=f32, sync_ptr="i32", plan_ptr=f32, row_cost_ptr=f32, iters_ptr="i64",
              err_ptr=f32), ("tol",) + scaled,
              dict(HAS_TOL=has_tol, WRITE_PLAN=True, **{k.upper(): v for k, v in sink_mod.COOPERATIVE_BLOCKS.items()}), 4)
    for rows, block_m in ((2, 4096), (64, 128)):
        build(sink_mod._row_pass_partials_kernel, dict(c_ptr="fp32", log_v_ptr=f32, a_ptr=f32, log_u_ptr=f32,
              partial_ptr=f32, active_ptr="i32"), scaled, dict(ROWS=rows, BLOCK_M=block_m), 8)
    build(sink_mod._column_sums_kernel, dict(partial_ptr=f32, col_sum_ptr=f32, b_ptr=f32, block_err_ptr=f32,
          block_small_ptr="i32", active_ptr="i32"), (), dict(BLOCK=sink_mod.ONEPASS_SUM_BLOCK), 4)
    build(sink_mod._apply_column_sums_kernel, dict(col_sum_ptr=f32, log_v_ptr=f32, b_ptr=f32, block_err_ptr=f32,
          block_small_ptr="i32", active_ptr="i32", exact_ptr="i32", err_ptr=f32, iters_ptr="i64"), ("tol",),
          dict(BLOCK=sink_mod.ONEPASS_SUM_BLOCK, MAX_BLOCKS=16), 4)
    # The fused margin at its largest size and at smaller ones (with the warps they launch with):
    # wgmma for half inputs, exact FMA for float32.
    for emb_type, ieee, block_d in (("bf16", False, loss_mod.HALF_BLOCK_D), ("fp32", True, loss_mod.FP32_BLOCK_D)):
        for (block_n, block_m), scaling in itertools.product(((128, 128), (16, 16), (64, 32)), (False, True)):
            if (block_n, block_m) != (128, 128) and scaling:
                continue
            warps = num_warps_for(block_n * block_m, per_thread=sink_mod.FUSED_ENTRIES_PER_THREAD)
            build(loss_mod._aplot_margin_kernel, dict(x_ptr=emb_type, y_ptr=emb_type, rx_ptr=emb_type, ry_ptr=f32,
                  out_ptr=f32), ("alpha", "inv_temperature", "norm_eps", "eps", "row_weight", "col_weight", "margin_scale")
                  + scaled, dict(IEEE_FP32=ieee, SCALING=scaling, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d), warps)
    # k == 1 and flags of 0/1 may arrive as compile-time constants.
    build(sink_mod._check_kernel, dict(col_lse_ptr=f32, log_v_ptr=f32, b_ptr=f32, active_ptr="i32", err_ptr=f32, iters_ptr="i64"),
          ("tol",), dict(BLOCK=1024, k=1, apply_next_v=1), 4)
    for emb_type, ieee, tile in (("fp32", True, cost_mod.FP32_TILE), ("bf16", False, cost_mod.HALF_TILES["small"]),
                                 ("bf16", False, cost_mod.HALF_TILES["large"])):
        block_n, block_m, block_d, warps = tile
        build(cost_mod._aplot_cost_kernel, dict(x_ptr=emb_type, y_ptr=emb_type, x_norm_ptr=f32, y_norm_ptr=f32, rx_ptr=emb_type,
              ry_ptr=f32, out_ptr=f32), ("alpha", "inv_temperature"),
              dict(IEEE_FP32=ieee, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d), warps)
    build(cost_mod._cosine_cost_kernel, dict(x_ptr="fp16", y_ptr="fp16", x_norm_ptr=f32, y_norm_ptr=f32, out_ptr=f32), (),
          dict(IEEE_FP32=False, BLOCK_N=128, BLOCK_M=128, BLOCK_D=64), 8)
    build(cost_mod._row_norms_kernel, dict(x_ptr="bf16", y_ptr="bf16", x_out_ptr=f32, y_out_ptr=f32), ("eps",),
          dict(BLOCK_R=cost_mod.ROW_NORMS_BLOCK_R, BLOCK_D=256), 4)
    # Backward: the product with and without the reward reduction, and the row pass.
    block_n, block_m, block_d, warps = cost_mod.BACKWARD_TILE
    for emb_type, rewards in (("bf16", True), ("fp32", True), ("fp16", False)):
        build(cost_mod._grad_product_kernel, dict(g_ptr=f32, y_ptr=emb_type, y_norm_ptr=f32, rx_ptr=emb_type, ry_ptr=f32,
              p_ptr=f32, grad_rx_ptr=f32), ("reward_scale", "inv_temperature"),
              dict(REWARDS=rewards, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d), warps)
    block_r, block_d, warps = cost_mod.JACOBIAN_TILE
    for emb_type in ("bf16", "fp32"):
        build(cost_mod._normalize_backward_kernel, dict(x_ptr=emb_type, x_norm_ptr=f32, p_ptr=f32), ("scale", "eps"),
              dict(BLOCK_R=block_r, BLOCK_D=block_d), warps)


@pytest.mark.parametrize("capability", [90, 80], ids=["sm90", "sm80"])
def test_kernels_compile_for_gpu(capability):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("on a GPU every other test compiles and runs the kernels")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--compile-sm", str(capability)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__" and sys.argv[1:2] == ["--compile-sm"]:
    try:
        _compile_all(int(sys.argv[2]))
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" not in str(exc).lower():
            raise
        print(f"no ptxas for sm_{sys.argv[2]} compilation: {exc}")  # Triton installed without its CUDA tools
        raise SystemExit(3)
