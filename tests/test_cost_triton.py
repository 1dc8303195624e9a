"""The Triton cost kernels and their backward kernels against the reference's closed forms.

Forward: ``cosine_cost`` and ``aplot_cost`` in float32 and half precision, on
the same (rounded) inputs widened to float64. Backward: the product kernels
with default and tiny tiles (so every loop covers several tiles), and the
public gradients through them.
"""

from __future__ import annotations

import pytest
import torch

from triton_cases import DEVICE, HALF, TRITON_OK, embeddings, generator

pytestmark = pytest.mark.skipif(not TRITON_OK, reason="Triton unavailable")

if TRITON_OK:
    from aplot_kernels.cost import reference as cost_reference
    from aplot_kernels.cost import triton as cost_kernels
    from aplot_kernels.cost import triton_backward as cost_kernels_backward


COST_SHAPES = [(1, 5, 7, 3), (2, 17, 24, 32), (3, 16, 16, 16), (1, 24, 9, 33)]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("shape", COST_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cost_kernels_match_reference(shape, dtype):
    x, y, rx, ry = embeddings(*shape, dtype, seed=sum(shape))
    cosine = cost_kernels.cosine_cost(x, y, 1e-8)
    aplot = cost_kernels.aplot_cost(x, y, rx, ry, 0.7, 0.5, 1e-8)
    assert cosine.dtype == aplot.dtype == torch.float32
    # Reference on the same (rounded) inputs, in float64.
    x64, y64, rx64, ry64 = (t.double() for t in (x, y, rx, ry))
    torch.testing.assert_close(cosine.double(), cost_reference.cosine_cost(x64, y64, 1e-8), rtol=0, atol=5e-7)
    torch.testing.assert_close(aplot.double(), cost_reference.aplot_cost(x64, y64, rx64, ry64, 0.7, 0.5, 1e-8), rtol=0, atol=5e-7)
    assert bool((cosine[0, 0] == 1).all())


def test_cost_kernels_strided_and_mixed_inputs():
    x, y, rx, ry = embeddings(2, 24, 20, 18, torch.float32, seed=3)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major rows
    y_half = y.half()
    rewards = torch.randn(2, 40, generator=generator(4)).to(DEVICE)[:, ::2]  # stride 2
    got = cost_kernels.aplot_cost(x_t, y_half, rx, rewards, 0.9, 1.0, 1e-8)
    want = cost_reference.aplot_cost(x.double(), y_half.double(), rx.double(), rewards.double(), 0.9, 1.0, 1e-8)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-7)


def test_aplot_cost_extreme_reward_gaps():
    x, y, _, _ = embeddings(1, 16, 16, 16, torch.float32, seed=5)
    rx = torch.tensor([[1e4, -1e4] + [0.0] * 14], device=DEVICE)
    ry = torch.zeros(1, 16, device=DEVICE)
    got = cost_kernels.aplot_cost(x, y, rx, ry, 0.9, 1e-3, 1e-8)
    assert bool(torch.isfinite(got).all())
    want = cost_reference.aplot_cost(x.double(), y.double(), rx.double(), ry.double(), 0.9, 1e-3, 1e-8)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-7)


def test_public_cost_dispatches_to_triton_and_differentiates():
    import aplot_kernels

    x, y, rx, ry = (t.requires_grad_() for t in embeddings(1, 9, 11, 8, torch.float32, seed=6))
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
    if request.param == "tiny":  # on the module that reads them (cost_kernels only re-exports them)
        monkeypatch.setattr(cost_kernels_backward, "BACKWARD_TILE", (16, 16, 16, 4))
        monkeypatch.setattr(cost_kernels_backward, "JACOBIAN_TILE", (4, 16, 4))
    return request.param


def _backward_inputs(batch, n, m, d, dtype, seed):
    """Embeddings with a zero row and a row below the norm clamp, rewards with a tie, and a non-contiguous
    float32 ``grad_cost [B, N, M]`` (a transposed ``[B, M, N]``)."""
    x, y, rx, ry = embeddings(batch, n, m, d, dtype, seed)  # x[0, 0] = 0
    if m > 1:
        # Norm 0.9 eps, below the clamp (0 in float16): the gradient of y / eps, with no radial projection.
        y[-1, 1] = 0.9e-8 / d**0.5
    ry[0, m // 2] = rx[0, n // 2]  # r_c == r_r: torch.sign gives 0
    grad_cost = torch.randn(batch, m, n, generator=generator(seed + 1)).to(DEVICE).transpose(1, 2)
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
    x, y, _, _ = embeddings(1, 16, 9, 8, torch.float32, seed=31)
    rx = torch.tensor([[1e4, -1e4, 0.5, 0.5] + [0.0] * 12], device=DEVICE)
    ry = torch.tensor([[0.0, 0.5, 2.0, 0.0, 0.5, 3.0, -1.0, 0.0, 0.25]], device=DEVICE)
    grad_cost = torch.randn(1, 16, 9, generator=generator(32)).to(DEVICE)
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
    square = torch.randn(*x.shape[:-1], x.shape[-2], generator=generator(42)).to(DEVICE)
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
