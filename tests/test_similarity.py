"""``similarity="cosine"`` (SPEC section 1): ``sim = S`` instead of ``(1 + S) / 2``, on every backend and in the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import COST_BACKENDS, SINKHORN_BACKENDS, assert_finite, max_abs, random_embeddings, small, widest_dtype

from aplot_kernels import APLOTLoss, aplot_cost, aplot_loss, aplot_margin
from aplot_kernels.cost import reference

LOSS_BACKENDS = [b for b in SINKHORN_BACKENDS if b in COST_BACKENDS]


def _inputs(gen, batch, n, m, d, dtype=torch.float64):
    shape = () if batch is None else (batch,)
    return (
        random_embeddings(gen, *shape, n, d, dtype=dtype),
        random_embeddings(gen, *shape, m, d, dtype=dtype),
        random_embeddings(gen, *shape, n, dtype=dtype),
        random_embeddings(gen, *shape, m, dtype=dtype),
    )


def _by_spec(c, r, rc, rr, alpha, temperature, similarity, eps=1e-8):
    """SPEC section 1 written out in float64."""
    c, r, rc, rr = (t.double() for t in (c, r, rc, rr))
    s = F.normalize(c, dim=-1, eps=eps) @ F.normalize(r, dim=-1, eps=eps).transpose(-1, -2)
    sim = (1 + s) / 2 if similarity == "unit" else s
    delta = rc[..., :, None] - rr[..., None, :]
    return alpha * (1 - torch.sigmoid(delta.abs() / temperature)) + (1 - alpha) * sim


@pytest.mark.parametrize("similarity", ["unit", "cosine"])
@pytest.mark.parametrize("alpha,temperature", [(0.9, 1.0), (0.3, 0.05)])
@pytest.mark.parametrize("batch,n,m,d", [(None, 1, 1, 1), (None, 6, 9, 4), (3, 17, 13, 24), (2, 16, 8, 32)])
@pytest.mark.parametrize("width", ["widest", "float32"])
def test_aplot_cost_similarity_follows_spec(cost_backend, gen, batch, n, m, d, alpha, temperature, similarity, width):
    dtype = widest_dtype(cost_backend) if width == "widest" else torch.float32
    if dtype == torch.float32 and width == "widest":
        pytest.skip("float32 is the widest dtype here: the float32 parametrisation covers it")
    inputs = _inputs(gen, batch, n, m, d, dtype=dtype)
    cost = aplot_cost(*inputs, alpha=alpha, temperature=temperature, similarity=similarity, backend=cost_backend)
    shape = () if batch is None else (batch,)
    assert cost.shape == shape + (n, m) and cost.dtype == dtype
    assert max_abs(cost, _by_spec(*inputs, alpha, temperature, similarity)) <= (1e-12 if dtype == torch.float64 else 1e-6)
    low = 0.0 if similarity == "unit" else -(1 - alpha)
    assert float(cost.min()) >= low - 1e-6 and float(cost.max()) <= 1.0 + 1e-6


def test_cosine_minus_unit_is_half_the_semantic_term(cost_backend, gen):
    """``C_cosine - C_unit = (1 - alpha) (S - 1) / 2``: the two forms differ by the semantic weight and a constant."""
    dtype = widest_dtype(cost_backend)
    c, r, rc, rr = _inputs(gen, 2, 7, 5, 6, dtype=dtype)
    unit = aplot_cost(c, r, rc, rr, alpha=0.6, backend=cost_backend)
    cosine = aplot_cost(c, r, rc, rr, alpha=0.6, similarity="cosine", backend=cost_backend)
    s = reference.cosine_similarity(c.double(), r.double(), 1e-8)
    assert max_abs(cosine.double() - unit.double(), 0.4 * (s - 1) / 2) <= (1e-12 if dtype == torch.float64 else 2e-6)


@pytest.mark.float64_only
def test_gradcheck_aplot_cost_cosine(cost_backend, gen):
    inputs = [t.requires_grad_() for t in _inputs(gen, 2, 4, 3, 5)]
    assert torch.autograd.gradcheck(
        lambda *t: aplot_cost(*t, alpha=0.4, temperature=0.3, similarity="cosine", backend=cost_backend), inputs
    )


def test_closed_form_backward_cosine_matches_autograd(gen):
    c, r, rc, rr = _inputs(gen, 3, 6, 5, 7)
    c[0, 1] = 0.0
    rr[1, 2] = rc[1, 0]  # reward tie
    grad_out = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (c, r, rc, rr)]
    expected = torch.autograd.grad(reference.aplot_cost(*inputs, 0.7, 0.4, 1e-8, "cosine"), inputs, grad_out)
    got = reference.aplot_cost_backward(grad_out, c, r, rc, rr, 0.7, 0.4, 1e-8, "cosine")
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_kernel_cosine_gradients_match_reference(cost_backend, gen):
    """float32 gradients of every backend against float64 autograd of the reference, at non-power-of-two sizes."""
    c, r, rc, rr = _inputs(gen, 2, 7, 6, 9, dtype=torch.float32)
    c[1, 0] = 0.0
    grad_out = torch.randn(2, 7, 6, generator=gen)
    inputs = [t.clone().requires_grad_() for t in (c, r, rc, rr)]
    got = torch.autograd.grad(
        aplot_cost(*inputs, alpha=0.6, temperature=0.7, similarity="cosine", backend=cost_backend), inputs, grad_out
    )
    wide = [t.double().requires_grad_() for t in (c, r, rc, rr)]
    want = torch.autograd.grad(reference.aplot_cost(*wide, 0.6, 0.7, 1e-8, "cosine"), wide, grad_out.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cosine_form(cost_backend, gen, dtype):
    c, r, rc, rr = _inputs(gen, 2, 9, 7, 16, dtype=dtype)
    cost = aplot_cost(c, r, rc, rr, similarity="cosine", backend=cost_backend)
    assert cost.dtype == torch.float32
    assert max_abs(cost, _by_spec(c, r, rc, rr, 0.9, 1.0, "cosine")) <= 1e-5


@pytest.mark.parametrize("bad", ["Unit", "cos", None, 1])
def test_bad_similarity_is_a_value_error(gen, bad):
    c, r, rc, rr = _inputs(gen, None, 3, 3, 4)
    with pytest.raises(ValueError, match="similarity"):
        aplot_cost(c, r, rc, rr, similarity=bad)
    with pytest.raises(ValueError, match="similarity"):
        aplot_margin(rc, rr, c, r, similarity=bad)
    with pytest.raises(ValueError, match="similarity"):
        aplot_loss(rc, rr, c, r, similarity=bad)
    with pytest.raises(ValueError, match="similarity"):
        APLOTLoss(similarity=bad)


@pytest.fixture(params=LOSS_BACKENDS)
def loss_backend(request):
    return request.param


def test_margin_and_loss_take_similarity(loss_backend, gen):
    """The margin with ``similarity="cosine"`` is the reference OT margin of the cosine-form cost."""
    from aplot_kernels import sinkhorn

    n, m = 6, 9
    c, r, rc, rr = (t.float() for t in _inputs(gen, None, n, m, 16))
    n_iters = small(loss_backend, 40, 12)
    options = dict(alpha=0.7, temperature=0.5, eps=0.2, n_iters=n_iters, similarity="cosine")
    got = aplot_margin(rc, rr, c, r, backend=loss_backend, **options)
    cost = aplot_cost(c.double(), r.double(), rc.double(), rr.double(), alpha=0.7, temperature=0.5, similarity="cosine")
    plan = sinkhorn(cost, eps=0.2, n_iters=n_iters, backend="torch").plan
    want = n * (plan * cost).sum(-1)
    assert_finite(margin=got)
    assert max_abs(got, want) <= 2e-5
    unit = aplot_margin(rc, rr, c, r, backend=loss_backend, **dict(options, similarity="unit"))
    assert max_abs(got, unit) > 1e-3  # the option reaches the cost
    loss = aplot_loss(rc[:n], rr[:n], c, r[:n], backend=loss_backend, **options)
    module = APLOTLoss(backend=loss_backend, **options)
    assert module.similarity == "cosine" and "similarity='cosine'" in repr(module)
    out = module(rc[:n], rr[:n], c, r[:n], return_outputs=True)
    torch.testing.assert_close(out.loss, loss)
    if out.cost is not None:
        assert max_abs(out.cost, cost[:, :n]) <= 1e-5


def test_undetached_cosine_margin_gradients_flow(gen):
    c, r, rc, rr = (t.requires_grad_() for t in _inputs(gen, None, 5, 5, 8))
    loss = aplot_loss(rc, rr, c, r, similarity="cosine", detach=False, backend="torch")
    grads = torch.autograd.grad(loss, (rc, rr, c, r))
    assert_finite(**{f"grad_{i}": g for i, g in enumerate(grads)})
    assert all(float(g.abs().max()) > 0 for g in grads)
