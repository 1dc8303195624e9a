"""Costs of finite embeddings with very large or very small norms (docs/contract.md sections 1 and 4).

``x = [[3e19, 4e19]]`` is finite in float32 but its squared norm is not: the
costs must still be those of the normalised vectors, ``x_hat = x / max(||x||, eps)``,
on every backend, forward and backward, and in the loss. The property tests
draw embeddings whose entries span many orders of magnitude (with zeros and
non-contiguous or expanded layouts) and hold every backend to an independent
float64 computation that normalises each row by its largest entry first.
"""

from __future__ import annotations

import pytest
import torch
from conftest import COST_BACKENDS, SINKHORN_BACKENDS, assert_finite, has_float64, interpreted, small
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aplot_kernels import aplot_cost, aplot_loss, aplot_margin, cosine_cost, sinkhorn

LOSS_BACKENDS = [b for b in SINKHORN_BACKENDS if b in COST_BACKENDS]


def _normalize_by_peak(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(||x||, eps)`` in float64 as ``(x / p) / max(||x / p||, eps / p)``, ``p = max |x|`` per row."""
    x = x.double()
    peak = x.detach().abs().amax(-1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    unit = x / peak
    return unit / torch.maximum(unit.norm(dim=-1, keepdim=True), eps / peak)


def _true_similarity(x, y, eps=1e-8):
    return _normalize_by_peak(x, eps) @ _normalize_by_peak(y, eps).transpose(-1, -2)


def _true_aplot(c, r, rc, rr, alpha, temperature, similarity, eps=1e-8):
    s = _true_similarity(c, r, eps)
    sim = (1 + s) / 2 if similarity == "unit" else s
    delta = rc.double()[..., :, None] - rr.double()[..., None, :]
    return alpha * torch.sigmoid(-delta.abs() / temperature) + (1 - alpha) * sim


def _unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


# ---------------------------------------------------------------------------
# The reported case, on every backend
# ---------------------------------------------------------------------------


def _large_pair(dtype=torch.float32):
    x = torch.tensor([[3e19, 4e19]], dtype=dtype)
    y = torch.tensor([[4e19, 3e19], [1.0, 0.0]], dtype=dtype)
    return x, y


def test_large_norm_costs_are_those_of_the_unit_vectors(cost_backend):
    x, y = _large_pair()
    before = (x.clone(), y.clone())
    cost = cosine_cost(x, y, backend=cost_backend)
    assert_finite(cost=cost)
    # float64 truth: <(0.6, 0.8), (0.8, 0.6)> = 0.96, <(0.6, 0.8), (1, 0)> = 0.6.
    torch.testing.assert_close(cost.double(), torch.tensor([[0.04, 0.4]], dtype=torch.float64), rtol=0, atol=1e-6)
    rc, rr = torch.tensor([0.3]), torch.tensor([0.1, -2.0])
    for similarity in ("unit", "cosine"):
        got = aplot_cost(x, y, rc, rr, alpha=0.7, similarity=similarity, backend=cost_backend)
        want = _true_aplot(x, y, rc, rr, 0.7, 1.0, similarity)
        assert float((got.double() - want).abs().max()) <= 1e-6
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])


def test_large_norm_gradients_match_float64(cost_backend, gen):
    """Gradients of huge rows are tiny (about 1 / ||x||) but exact up to rounding, never NaN."""
    x, y = _large_pair()
    y = torch.cat([y, 1e-30 * torch.randn(2, 2, generator=gen), torch.zeros(1, 2)])
    rc, rr = torch.tensor([0.3]), torch.randn(5, generator=gen)
    grad_out = torch.randn(1, 5, generator=gen)
    inputs = [t.clone().requires_grad_() for t in (x, y, rc, rr)]
    got = torch.autograd.grad(aplot_cost(*inputs, alpha=0.6, similarity="cosine", backend=cost_backend), inputs, grad_out)
    wide = [t.double().requires_grad_() for t in (x, y, rc, rr)]
    want = torch.autograd.grad(_true_aplot(*wide, 0.6, 1.0, "cosine"), wide, grad_out.double())
    for g, w in zip(got, want):
        assert_finite(grad=g)
        # Per row: rounding relative to the row's gradient scale (|G| / max(||row||, eps) for embeddings).
        scale = w.abs().amax(-1, keepdim=True) if w.dim() > 1 else w.abs().max()
        assert bool(((g.double() - w).abs() <= 1e-5 * scale + 1e-45).all()), (g, w)


def test_loss_on_large_embeddings_is_finite_and_right(loss_backend_for_magnitudes, gen):
    """The reported NaN: ``aplot_loss`` on finite embeddings with squared norms past float32's range."""
    backend = loss_backend_for_magnitudes
    n = 5
    rc, rr = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    ce = torch.randn(n, 8, generator=gen) * 3e19
    re = torch.randn(n, 8, generator=gen) * 1e-25
    re[2] = 0.0
    n_iters = small(backend, 30, 10)
    loss = aplot_loss(rc, rr, ce, re, backend=backend, n_iters=n_iters)
    margins = aplot_margin(rc, rr, ce, re, backend=backend, n_iters=n_iters)
    assert_finite(loss=loss, margins=margins)
    cost = _true_aplot(ce, re, rc, rr, 0.9, 1.0, "unit")
    plan = sinkhorn(cost, eps=0.1, n_iters=n_iters, backend="torch").plan
    torch.testing.assert_close(margins.double(), n * (plan * cost).sum(-1), rtol=0, atol=2e-5)
    # The same loss as for chosen embeddings of ordinary norms (above eps the cost depends on directions only;
    # the rejected ones stay below the norm clamp, where it does not).
    ordinary = aplot_loss(rc, rr, ce / 3e19, re, backend=backend, n_iters=n_iters)
    torch.testing.assert_close(loss, ordinary, rtol=1e-5, atol=1e-6)


@pytest.fixture(params=LOSS_BACKENDS)
def loss_backend_for_magnitudes(request):
    return request.param


# ---------------------------------------------------------------------------
# Property: any finite magnitudes, any layout
# ---------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "strided", "expanded")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t [B, R, D]`` as the same values in another memory layout."""
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded":  # every problem of the batch reads the first one's rows (stride 0)
        return t[:1].expand(t.shape)
    return t


@st.composite
def embeddings(draw, rows, width, dtype):
    """``[B, rows, width]`` with each entry ``N(0, 1) * 10**k``, ``k`` drawn per row and per entry from the
    dtype's range of finite normal magnitudes (squares and products of such rows overflow); some rows
    and entries zero."""
    top = 30 if dtype == torch.float32 else 300
    seed = draw(st.integers(0, 2**31 - 1))
    row_exp = draw(st.lists(st.integers(-top, top), min_size=rows, max_size=rows))
    spread = draw(st.sampled_from([0, 3, 2 * top]))  # entries within a row: alike, a few orders, any
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(2, rows, width, generator=gen, dtype=torch.float64)
    entry_exp = torch.randint(-spread, spread + 1, (2, rows, width), generator=gen).double() if spread else 0.0
    exps = (torch.tensor(row_exp, dtype=torch.float64)[None, :, None] + entry_exp).clamp(-top, top)
    values = base * torch.pow(10.0, exps)
    zero_rows = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    values[:, torch.tensor(zero_rows, dtype=torch.bool)] = 0.0
    values[torch.rand(values.shape, generator=gen) < 0.1] = 0.0
    return _layout(values.to(dtype), draw(st.sampled_from(LAYOUTS)))


def _check_magnitudes(backend, data, dtype, max_side):
    n = data.draw(st.integers(1, max_side), label="n")
    m = data.draw(st.integers(1, max_side), label="m")
    d = data.draw(st.integers(1, 6), label="d")
    x = data.draw(embeddings(n, d, dtype), label="x")
    y = data.draw(embeddings(m, d, dtype), label="y")
    eps = data.draw(st.sampled_from([1e-8, 1e-20]), label="eps")
    similarity = data.draw(st.sampled_from(["unit", "cosine"]), label="similarity")
    rc = torch.randn(2, n, dtype=torch.float64).to(dtype)
    rr = torch.randn(2, m, dtype=torch.float64).to(dtype)
    snapshot = [t.clone() for t in (x, y, rc, rr)]

    # Both costs are affine in S = <x_hat, y_hat>; every entry of it is a dot product of two rows of norm
    # at most 1, each normalised with a few roundings: within (d + 8) unit roundoffs (a factor 4 of margin).
    bound = 4 * (d + 8) * _unit_roundoff(dtype)
    cost = cosine_cost(x, y, eps=eps, backend=backend)
    assert_finite(cost=cost)
    assert float((cost.double() - (1 - _true_similarity(x, y, eps))).abs().max()) <= bound

    inputs = [t.clone().requires_grad_() for t in (x, y, rc, rr)]
    cost = aplot_cost(*inputs, alpha=0.6, similarity=similarity, eps=eps, backend=backend)
    want = _true_aplot(x, y, rc, rr, 0.6, 1.0, similarity, eps)
    assert_finite(cost=cost)
    assert float((cost.detach().double() - want).abs().max()) <= bound
    grads = torch.autograd.grad(cost, inputs, torch.ones_like(cost))
    assert_finite(**{f"grad_{i}": g for i, g in enumerate(grads)})
    for before, after in zip(snapshot, (x, y, rc, rr)):
        assert torch.equal(before, after)


MAGNITUDE_BACKENDS = [
    (b, dtype) for b in COST_BACKENDS for dtype in (torch.float32, torch.float64) if dtype == torch.float32 or has_float64(b)
]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("backend,dtype", MAGNITUDE_BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
@settings(max_examples=8, derandomize=True, **SETTINGS)
@given(data=st.data())
def test_costs_of_any_finite_magnitudes(backend, dtype, data):
    _check_magnitudes(backend, data, dtype, max_side=3 if interpreted(backend) else 5)


@pytest.mark.slow
@pytest.mark.parametrize("backend,dtype", MAGNITUDE_BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_costs_of_any_finite_magnitudes_many(backend, dtype, data):
    _check_magnitudes(backend, data, dtype, max_side=4 if interpreted(backend) else 9)
