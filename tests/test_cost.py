"""``cosine_cost`` and ``aplot_cost`` (docs/contract.md section 1): values, shapes, dtypes and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_finite, max_abs, random_embeddings, small, to_np, widest_dtype

from aplot_kernels import aplot_cost, cosine_cost
from aplot_kernels.cost import reference


def _aplot_inputs(gen, batch, n, m, d, dtype=torch.float64):
    shape = () if batch is None else (batch,)
    return (
        random_embeddings(gen, *shape, n, d, dtype=dtype),
        random_embeddings(gen, *shape, m, d, dtype=dtype),
        random_embeddings(gen, *shape, n, dtype=dtype),
        random_embeddings(gen, *shape, m, dtype=dtype),
    )


def _aplot_by_spec(c, r, rc, rr, alpha, temperature, eps=1e-8):
    """docs/contract.md section 1 written out in float64."""
    c, r, rc, rr = (t.double() for t in (c, r, rc, rr))
    s = F.normalize(c, dim=-1, eps=eps) @ F.normalize(r, dim=-1, eps=eps).transpose(-1, -2)
    delta = rc[..., :, None] - rr[..., None, :]
    return alpha * (1 - torch.sigmoid(delta.abs() / temperature)) + (1 - alpha) * (1 + s) / 2


# ---------------------------------------------------------------------------
# cosine_cost
# ---------------------------------------------------------------------------


@pytest.mark.float64_only
@pytest.mark.parametrize("batch,n,m,d", [(None, 1, 1, 1), (None, 7, 5, 3), (2, 13, 17, 8), (3, 33, 31, 65), (1, 64, 64, 32)])
def test_cosine_cost_matches_pot(cost_backend, gen, batch, n, m, d):
    import ot

    shape = () if batch is None else (batch,)
    x, y = random_embeddings(gen, *shape, n, d), random_embeddings(gen, *shape, m, d)
    cost = cosine_cost(x, y, backend=cost_backend)
    assert cost.shape == shape + (n, m) and cost.dtype == torch.float64
    for xi, yi, ci in zip(x.reshape(-1, n, d), y.reshape(-1, m, d), cost.reshape(-1, n, m)):
        assert max_abs(ci, ot.dist(to_np(xi), to_np(yi), metric="cosine")) <= 1e-12


@pytest.mark.parametrize("batch,n,m,d", [(None, 1, 1, 1), (None, 7, 5, 3), (2, 13, 17, 8), (3, 24, 23, 32), (2, 64, 48, 100)])
def test_cosine_cost_float32_matches_float64(cost_backend, gen, batch, n, m, d):
    if small(cost_backend, False, max(n, m) > 24 or d > 32):
        pytest.skip("large shape: too slow for the Triton interpreter")
    shape = () if batch is None else (batch,)
    x, y = random_embeddings(gen, *shape, n, d, dtype=torch.float32), random_embeddings(gen, *shape, m, d, dtype=torch.float32)
    cost = cosine_cost(x, y, backend=cost_backend)
    assert cost.dtype == torch.float32 and cost.shape == shape + (n, m)
    assert max_abs(cost, cosine_cost(x.double(), y.double(), backend="torch")) <= 1e-6


def test_zero_vectors_cost_one(cost_backend, gen):
    dtype = widest_dtype(cost_backend)
    x, y = random_embeddings(gen, 2, 5, 6, dtype=dtype), random_embeddings(gen, 2, 4, 6, dtype=dtype)
    x[0, 1] = 0.0
    y[1, 3] = 0.0
    y[0, 0] = 1e-13  # below the norm clamp: almost a zero vector
    x, y = x.requires_grad_(), y.requires_grad_()
    cost = cosine_cost(x, y, backend=cost_backend)
    assert_finite(cost=cost)
    assert bool((cost[0, 1] == 1).all()) and bool((cost[1, :, 3] == 1).all())
    assert max_abs(cost[0, :, 0], 1.0) <= 1e-4
    grad_x, grad_y = torch.autograd.grad((cost * torch.randn(cost.shape, generator=gen).to(cost)).sum(), (x, y))
    assert_finite(grad_x=grad_x, grad_y=grad_y)
    # A zero vector's cost is the constant 1 at 0, but its gradient is that of x / eps.
    assert (
        max_abs(cost, 1 - F.normalize(x.double(), dim=-1, eps=1e-8) @ F.normalize(y.double(), dim=-1, eps=1e-8).transpose(-1, -2))
        <= 1e-6
    )


def test_cosine_cost_y_none_is_self_cost(cost_backend, gen):
    dtype = widest_dtype(cost_backend)
    x = random_embeddings(gen, 2, 9, 5, dtype=dtype)
    assert torch.equal(cosine_cost(x, backend=cost_backend), cosine_cost(x, x, backend=cost_backend))
    assert cosine_cost(x[0], backend=cost_backend).shape == (9, 9)
    # Gradient with y=None flows through both arguments of the self cost.
    w = torch.randn(2, 9, 9, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    x_self, x_left, x_right = (x.clone().requires_grad_() for _ in range(3))
    (grad_self,) = torch.autograd.grad((cosine_cost(x_self, backend=cost_backend) * w).sum(), (x_self,))
    gx, gy = torch.autograd.grad((cosine_cost(x_left, x_right, backend=cost_backend) * w).sum(), (x_left, x_right))
    torch.testing.assert_close(grad_self, gx + gy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_costs_return_float32(cost_backend, gen, dtype):
    c, r, rc, rr = _aplot_inputs(gen, 2, 9, 7, 16, dtype=dtype)
    cost = cosine_cost(c, r, backend=cost_backend)
    as_float = cosine_cost(c.float(), r.float(), backend=cost_backend)
    assert cost.dtype == torch.float32
    assert max_abs(cost, as_float) <= 1e-5
    cost = aplot_cost(c, r, rc, rr, backend=cost_backend)
    as_float = aplot_cost(c.float(), r.float(), rc.float(), rr.float(), backend=cost_backend)
    assert cost.dtype == torch.float32
    assert max_abs(cost, as_float) <= 1e-5


# ---------------------------------------------------------------------------
# aplot_cost
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,temperature", [(0.9, 1.0), (0.0, 0.5), (1.0, 2.0), (0.3, 0.05)])
@pytest.mark.parametrize("batch,n,m,d", [(None, 1, 1, 1), (None, 6, 9, 4), (3, 17, 13, 24)])
def test_aplot_cost_follows_spec(cost_backend, gen, batch, n, m, d, alpha, temperature):
    dtype = widest_dtype(cost_backend)
    inputs = _aplot_inputs(gen, batch, n, m, d, dtype=dtype)
    cost = aplot_cost(*inputs, alpha=alpha, temperature=temperature, backend=cost_backend)
    expected = _aplot_by_spec(*inputs, alpha, temperature)
    shape = () if batch is None else (batch,)
    assert cost.shape == shape + (n, m) and cost.dtype == dtype
    assert max_abs(cost, expected) <= (1e-12 if dtype == torch.float64 else 1e-6)
    assert float(cost.min()) >= 0.0 and float(cost.max()) <= 1.0


def test_aplot_cost_is_high_for_hard_pairs(gen):
    """Near-duplicate embeddings with equal rewards cost more than distant ones with a large reward gap."""
    c = random_embeddings(gen, 2, 8)
    r = torch.stack([c[0] + 1e-3 * random_embeddings(gen, 8), -c[1]])
    rewards_c = torch.tensor([0.5, 3.0], dtype=torch.float64, device=DEVICE)
    rewards_r = torch.tensor([0.5, -3.0], dtype=torch.float64, device=DEVICE)
    cost = aplot_cost(c, r, rewards_c, rewards_r, backend="torch")
    # The reward term is at most 1 - sigmoid(0) = 1/2, so the hardest cost is alpha / 2 + 1 - alpha.
    assert float(cost[0, 0]) > 0.9 / 2 + 0.1 - 1e-6 and float(cost[1, 1]) < 0.01


def test_aplot_cost_zero_vectors_and_ties_are_finite(cost_backend, gen):
    dtype = widest_dtype(cost_backend)
    c, r, rc, rr = (t.requires_grad_(False) for t in _aplot_inputs(gen, 2, 4, 5, 6, dtype=dtype))
    c[0, 2] = 0.0
    r[1, 0] = 0.0
    rr[0, 1] = rc[0, 3]  # a reward tie: |delta| has a kink at 0
    inputs = [t.clone().requires_grad_() for t in (c, r, rc, rr)]
    cost = aplot_cost(*inputs, backend=cost_backend)
    assert_finite(cost=cost)
    grads = torch.autograd.grad((cost * torch.randn(cost.shape, generator=gen).to(cost)).sum(), inputs)
    assert_finite(**{f"grad_{i}": g for i, g in enumerate(grads)})
    assert max_abs(cost, _aplot_by_spec(c, r, rc, rr, 0.9, 1.0)) <= (1e-12 if dtype == torch.float64 else 1e-6)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.float64_only
def test_gradcheck_cosine_cost(cost_backend, gen):
    x = random_embeddings(gen, 2, 4, 5).requires_grad_()
    y = random_embeddings(gen, 2, 3, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: cosine_cost(x, y, backend=cost_backend), (x, y))
    assert torch.autograd.gradcheck(lambda x: cosine_cost(x, backend=cost_backend), (x,))
    assert torch.autograd.gradcheck(lambda x, y: cosine_cost(x[0], y[0], backend=cost_backend), (x, y))


@pytest.mark.float64_only
def test_gradcheck_aplot_cost(cost_backend, gen):
    inputs = [t.requires_grad_() for t in _aplot_inputs(gen, 2, 4, 3, 5)]
    for alpha, temperature in ((0.9, 1.0), (0.4, 0.3)):
        assert torch.autograd.gradcheck(
            lambda *t: aplot_cost(*t, alpha=alpha, temperature=temperature, backend=cost_backend), inputs
        )


def _autograd_grads(fn, inputs, grad_out):
    inputs = [t.clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs), inputs, grad_out)


def test_closed_form_backward_matches_autograd(gen):
    """The reference's hand-written backward passes (used by kernel backends) equal autograd."""
    c, r, rc, rr = _aplot_inputs(gen, 3, 6, 5, 7)
    c[0, 1] = 0.0  # below the norm clamp
    r[2, 4] = 1e-10
    rr[1, 2] = rc[1, 0]  # reward tie
    eps, alpha, temperature = 1e-8, 0.7, 0.4
    grad_out = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64).to(DEVICE)

    expected = _autograd_grads(lambda x, y: reference.cosine_cost(x, y, eps), (c, r), grad_out)
    for got, want in zip(reference.cosine_cost_backward(grad_out, c, r, eps), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    fn = lambda *t: reference.aplot_cost(*t, alpha, temperature, eps)  # noqa: E731
    expected = _autograd_grads(fn, (c, r, rc, rr), grad_out)
    for got, want in zip(reference.aplot_cost_backward(grad_out, c, r, rc, rr, alpha, temperature, eps), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_kernel_cost_gradients_match_reference(cost_backend, gen):
    """float32 gradients of every backend against float64 autograd of the reference."""
    c, r, rc, rr = _aplot_inputs(gen, 2, 7, 6, 9, dtype=torch.float32)
    c[1, 0] = 0.0
    grad_out = torch.randn(2, 7, 6, generator=gen).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (c, r, rc, rr)]
    got = torch.autograd.grad(aplot_cost(*inputs, alpha=0.6, temperature=0.7, backend=cost_backend), inputs, grad_out)
    want = _autograd_grads(
        lambda *t: aplot_cost(*t, alpha=0.6, temperature=0.7, backend="torch"),
        [t.double() for t in (c, r, rc, rr)],
        grad_out.double(),
    )
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    x, y = c.clone().requires_grad_(), r.clone().requires_grad_()
    got = torch.autograd.grad(cosine_cost(x, y, backend=cost_backend), (x, y), grad_out)
    want = _autograd_grads(lambda x, y: cosine_cost(x, y, backend="torch"), (c.double(), r.double()), grad_out.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


def test_half_precision_gradients_keep_input_dtype(cost_backend, gen):
    c, r, rc, rr = _aplot_inputs(gen, 2, 5, 4, 8, dtype=torch.bfloat16)
    inputs = [t.clone().requires_grad_() for t in (c, r, rc, rr)]
    grads = torch.autograd.grad(aplot_cost(*inputs, backend=cost_backend).sum(), inputs)
    for g, t in zip(grads, inputs):
        assert g.dtype == torch.bfloat16 and g.shape == t.shape
    assert_finite(**{f"grad_{i}": g.float() for i, g in enumerate(grads)})


def test_strided_inputs(cost_backend, gen):
    """Sliced embeddings and rewards (non-unit strides) give the same costs as contiguous copies."""
    dtype = widest_dtype(cost_backend)
    big = random_embeddings(gen, 2, 12, 16, dtype=dtype)
    x, y = big[:, ::2, ::2], big[:, 1::3, ::2]
    rc = random_embeddings(gen, 2, 12, dtype=dtype)[:, ::2]
    rr = random_embeddings(gen, 4, 2, dtype=dtype).t()
    tight = 1e-12 if dtype == torch.float64 else 1e-6
    contiguous = [t.contiguous() for t in (x, y, rc, rr)]
    assert max_abs(cosine_cost(x, y, backend=cost_backend), cosine_cost(*contiguous[:2], backend="torch")) <= tight
    assert max_abs(aplot_cost(x, y, rc, rr, backend=cost_backend), aplot_cost(*contiguous, backend="torch")) <= tight
