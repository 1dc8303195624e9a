"""Sinkhorn gradient modes (docs/contract.md section 2, ``grad=``) against finite differences and each other.

Potentials are defined up to a constant (``f + t, g - t`` gives the same
plan), so only gauge-invariant functions of ``f`` and ``g`` have well-defined
derivatives; gradients with respect to ``a`` and ``b`` are centred, so they
are compared along mass-preserving (sum-zero) directions.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_finite, random_cost, random_marginal, small, widest_dtype

import aplot_kernels.sinkhorn as sinkhorn_module
from aplot_kernels import sinkhorn
from aplot_kernels.sinkhorn import reference
from aplot_kernels.sinkhorn.gradients import centred

EPS = 0.1
CONVERGED = dict(eps=EPS, n_iters=3000, tol=1e-14, check_every=5)


def _problem(gen, batch=2, n=6, m=5, dtype=torch.float64):
    C = random_cost(gen, batch, n, m, dtype=dtype)
    a = random_marginal(gen, batch, n, mass=1.2, dtype=dtype)
    b = random_marginal(gen, batch, m, mass=1.2, dtype=dtype)
    return C, a, b


def _weights(gen, like):
    return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like)


def _sum_zero(gen, like):
    d = _weights(gen, like)
    return d - d.mean(-1, keepdim=True)


def _outputs(gen, n, m, batch):
    """Scalar functions of the result: plan, cost, reg_cost, and gauge-invariant ones of f and g."""
    w_plan = torch.randn(batch, n, m, generator=gen, dtype=torch.float64).to(DEVICE)
    w_f = torch.randn(batch, n, generator=gen, dtype=torch.float64).to(DEVICE)
    w_g = torch.randn(batch, m, generator=gen, dtype=torch.float64).to(DEVICE)
    # sum(w_f) == sum(w_g) per problem makes <w_f, f> + <w_g, g> blind to f + t, g - t.
    w_g = w_g - w_g.mean(-1, keepdim=True) + w_f.sum(-1, keepdim=True) / m
    return {
        "plan": lambda r: (w_plan * r.plan).sum(),
        "cost": lambda r: (r.cost * torch.arange(1, batch + 1).to(r.cost)).sum(),
        "reg_cost": lambda r: r.reg_cost.sum(),
        "potentials": lambda r: (w_f * r.f).sum() + (w_g * r.g).sum(),
        "centred_f": lambda r: ((r.f - r.f.mean(-1, keepdim=True)) ** 2).sum(),
    }


def _directional_fd(fn, inputs, directions, step=1e-5):
    """Central differences of ``fn(*inputs)`` along ``directions`` (one per input, ``None`` to hold fixed)."""

    def at(t):
        return fn(*(x if d is None else x + t * d for x, d in zip(inputs, directions)))

    with torch.no_grad():
        return float((at(step) - at(-step)) / (2 * step))


def _assert_directional(grads, fn, inputs, gen, rtol, n_dirs=3, sum_zero=(False, True, True)):
    """``<grad, d>`` vs central differences along random directions of each input separately."""
    for k, (x, grad, centre) in enumerate(zip(inputs, grads, sum_zero)):
        if grad is None:
            continue
        predicted, measured = [], []
        for _ in range(n_dirs):
            d = _sum_zero(gen, x) if centre else _weights(gen, x)
            dirs = [None] * len(inputs)
            dirs[k] = d
            predicted.append(float((grad * d).sum()))
            measured.append(_directional_fd(fn, inputs, dirs))
        predicted, measured = torch.tensor(predicted), torch.tensor(measured)
        error = (predicted - measured).norm() / measured.norm().clamp_min(1e-12)
        assert error <= rtol, f"input {k}: relative error {error:.2e}, predicted {predicted}, measured {measured}"


# ---------------------------------------------------------------------------
# Envelope
# ---------------------------------------------------------------------------


def test_envelope_matches_finite_differences(float64_backend, gen):
    C, a, b = _problem(gen)
    inputs = [t.clone().requires_grad_() for t in (C, a, b)]
    r = sinkhorn(*inputs, grad="envelope", backend=float64_backend, **CONVERGED)
    grads = torch.autograd.grad(r.reg_cost.sum(), inputs)

    def value(C, a, b):
        return sinkhorn(C, a, b, grad="none", backend=float64_backend, **CONVERGED).reg_cost.sum()

    _assert_directional(grads, value, (C, a, b), gen, rtol=1e-5)
    torch.testing.assert_close(grads[0], r.plan, rtol=0, atol=0)
    for grad in grads[1:]:
        torch.testing.assert_close(grad.sum(-1), torch.zeros(2, dtype=grad.dtype, device=DEVICE), rtol=0, atol=1e-12)


def test_envelope_second_derivatives(sinkhorn_backend, gen):
    """``create_graph=True`` through the envelope gradient gives the implicit second derivatives
    (a gradient that silently stopped at ``P`` was off by 1e-2), checked by finite differences."""
    dtype = widest_dtype(sinkhorn_backend)
    C, a, b = _problem(gen, n=5, m=7, dtype=dtype)
    W = _weights(gen, C)
    options = dict(eps=0.5, n_iters=small(sinkhorn_backend, 400, 60), tol=1e-14, check_every=1)

    def loss(C, a, grad, create_graph, backend=sinkhorn_backend):
        r = sinkhorn(C, a, b.to(C.dtype), grad=grad, backend=backend, **options)
        grad_c, grad_a = torch.autograd.grad(r.reg_cost.sum(), (C, a), create_graph=create_graph)
        return (grad_c * W).sum() + grad_a.square().sum()

    second = {}
    for grad in ("envelope", "implicit"):
        inputs = [C.clone().requires_grad_(), a.clone().requires_grad_()]
        value = loss(*inputs, grad, True)
        assert value.requires_grad, grad
        second[grad] = torch.autograd.grad(value, inputs)
    # Finite differences of the first derivatives in float64 on the reference.
    d_c, d_a, step = _weights(gen, C).double(), _sum_zero(gen, a).double(), 1e-4
    C64, a64 = C.double(), a.double()
    measured = loss((C64 + step * d_c).requires_grad_(), (a64 + step * d_a).requires_grad_(), "envelope", False, "torch") - loss(
        (C64 - step * d_c).requires_grad_(), (a64 - step * d_a).requires_grad_(), "envelope", False, "torch"
    )
    measured = float(measured) / (2 * step)
    rtol = 1e-6 if dtype == torch.float64 else 1e-3
    for grad, (g_c, g_a) in second.items():
        predicted = float((g_c.double() * d_c).sum() + (g_a.double() * d_a).sum())
        assert abs(predicted - measured) <= rtol * max(1.0, abs(measured)), (grad, predicted, measured)
    tight = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(second["envelope"][0], second["implicit"][0], rtol=tight, atol=tight * float(W.abs().max()))


def test_envelope_only_reg_cost_carries_gradient(sinkhorn_backend, gen):
    dtype = widest_dtype(sinkhorn_backend)
    C = random_cost(gen, 2, 5, 4, dtype=dtype).requires_grad_()
    r = sinkhorn(C, eps=EPS, n_iters=10, backend=sinkhorn_backend)
    assert r.reg_cost.requires_grad
    for name in ("plan", "f", "g", "cost", "n_iters", "err"):
        assert not getattr(r, name).requires_grad, name


def test_none_gives_no_gradient(sinkhorn_backend, gen):
    dtype = widest_dtype(sinkhorn_backend)
    C = random_cost(gen, 2, 5, 4, dtype=dtype).requires_grad_()
    a = random_marginal(gen, 2, 5, dtype=dtype).requires_grad_()
    r = sinkhorn(C, a, eps=EPS, n_iters=10, grad="none", backend=sinkhorn_backend)
    for name, value in r._asdict().items():
        assert not value.requires_grad, name
        assert value.grad_fn is None, name


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_autograd_node_only_where_a_gradient_can_flow(gen, monkeypatch, grad):
    """A solve that nothing differentiates (no input requires grad, or grad is disabled) runs without
    the operator or an autograd node, which costs microseconds per call, and returns the same values."""
    from aplot_kernels.sinkhorn import ops

    name = f"sinkhorn_{grad}"
    applied = []
    real_op = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *args: applied.append(1) or real_op(*args))
    C, a, b = _problem(gen)
    options = dict(eps=EPS, n_iters=30, grad=grad, backend="torch")
    plain = sinkhorn(C, a, b, **options)
    with torch.no_grad():
        sinkhorn(C.requires_grad_(), a, b, **options)
    assert applied == [] and plain.reg_cost.grad_fn is None
    tracked = sinkhorn(C, a, b, **options)
    assert applied == [1] and tracked.reg_cost.requires_grad
    for name in plain._fields:
        torch.testing.assert_close(getattr(tracked, name).detach(), getattr(plain, name), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_backward_runs_no_sinkhorn_iterations(sinkhorn_backend, gen, monkeypatch, grad):
    module = reference if sinkhorn_backend == "torch" else sinkhorn_module._kernels(sinkhorn_backend)
    calls = []
    original = module.solve

    def counting_solve(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "solve", counting_solve)
    dtype = widest_dtype(sinkhorn_backend)
    C, a, b = (t.requires_grad_() for t in _problem(gen, dtype=dtype))
    r = sinkhorn(C, a, b, eps=EPS, n_iters=small(sinkhorn_backend, 50, 20), grad=grad, backend=sinkhorn_backend)
    assert len(calls) == 1
    loss = r.reg_cost.sum() if grad == "envelope" else r.reg_cost.sum() + r.cost.sum() + r.plan.square().sum()
    loss.backward()
    assert len(calls) == 1, "backward ran the solver again"
    assert_finite(grad_c=C.grad, grad_a=a.grad, grad_b=b.grad)


# ---------------------------------------------------------------------------
# Implicit
# ---------------------------------------------------------------------------

OUTPUTS = ["plan", "cost", "reg_cost", "potentials", "centred_f"]


@pytest.mark.parametrize("output", OUTPUTS)
def test_implicit_matches_finite_differences(float64_backend, gen, output):
    C, a, b = _problem(gen)
    fn = _outputs(gen, 6, 5, 2)[output]
    inputs = [t.clone().requires_grad_() for t in (C, a, b)]
    r = sinkhorn(*inputs, grad="implicit", backend=float64_backend, **CONVERGED)
    grads = torch.autograd.grad(fn(r), inputs)

    def value(C, a, b):
        return fn(sinkhorn(C, a, b, grad="none", backend=float64_backend, **CONVERGED))

    _assert_directional(grads, value, (C, a, b), gen, rtol=1e-5)


@pytest.mark.parametrize("output", OUTPUTS)
def test_implicit_matches_unrolled(gen, output):
    C, a, b = _problem(gen, batch=2, n=7, m=4)
    fn = _outputs(gen, 7, 4, 2)[output]

    def grads(mode, n_iters):
        inputs = [t.clone().requires_grad_() for t in (C, a, b)]
        r = sinkhorn(*inputs, eps=EPS, n_iters=n_iters, grad=mode, backend="torch")
        g = torch.autograd.grad(fn(r), inputs)
        # Only mass-preserving changes of a, b are meaningful: centre the unrolled ones too.
        return g[0], g[1] - g[1].mean(-1, keepdim=True), g[2] - g[2].mean(-1, keepdim=True)

    implicit = grads("implicit", 400)
    unrolled = grads("unrolled", 400)
    for name, x, y in zip("Cab", implicit, unrolled):
        scale = y.abs().max().clamp_min(1e-12)
        assert float((x - y).abs().max() / scale) <= 1e-7, name


def test_envelope_equals_implicit_for_reg_cost(float64_backend, gen):
    C, a, b = _problem(gen, batch=3, n=5, m=8)

    def grads(mode):
        inputs = [t.clone().requires_grad_() for t in (C, a, b)]
        r = sinkhorn(*inputs, grad=mode, backend=float64_backend, **CONVERGED)
        return torch.autograd.grad((r.reg_cost * torch.tensor([1.0, -2.0, 0.5]).to(r.reg_cost)).sum(), inputs)

    for x, y in zip(grads("envelope"), grads("implicit")):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_implicit_large_system_uses_iterative_solve(gen, monkeypatch):
    """Above the direct-solve size the conjugate-gradient path gives the same gradient."""
    from aplot_kernels.sinkhorn import gradients

    C, a, b = _problem(gen, batch=2, n=9, m=7)

    def grads():
        inputs = [t.clone().requires_grad_() for t in (C, a, b)]
        r = sinkhorn(*inputs, grad="implicit", backend="torch", **CONVERGED)
        return torch.autograd.grad(r.cost.sum() + (r.plan * C).square().sum(), inputs)

    direct = grads()
    monkeypatch.setattr(gradients, "DIRECT_SOLVE_MAX", 4)
    iterative = grads()
    for x, y in zip(direct, iterative):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_kernel_gradients_match_reference(sinkhorn_backend, gen, grad):
    """Every backend's plan feeds the same backward: float32 gradients close to the float64 reference."""
    dtype = torch.float32
    C, a, b = _problem(gen, batch=2, n=6, m=5, dtype=dtype)
    fn = _outputs(gen, 6, 5, 2)["reg_cost" if grad == "envelope" else "plan"]
    kwargs = dict(eps=EPS, n_iters=small(sinkhorn_backend, 300, 100), tol=1e-6, check_every=5, grad=grad)

    def grads(backend, dt):
        inputs = [t.to(dt).requires_grad_() for t in (C, a, b)]
        r = sinkhorn(*inputs, backend=backend, **kwargs)
        return torch.autograd.grad(fn(r), inputs)

    for x, y in zip(grads(sinkhorn_backend, dtype), grads("torch", torch.float64)):
        assert x.dtype == dtype
        torch.testing.assert_close(x.double(), y, rtol=2e-3, atol=2e-3 * float(y.abs().max()))


def test_implicit_matches_unrolled_with_padding(gen):
    """Zero weights: gradients on the support equal the unrolled ones, padding gets exactly zero."""
    C, a, b = _problem(gen, batch=2, n=7, m=6)
    a[0, [1, 4]] = 0.0
    b[1, [0, 5]] = 0.0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    fn = _outputs(gen, 7, 6, 2)["plan"]
    rows, cols = a > 0, b > 0

    def grads(mode):
        inputs = [t.clone().requires_grad_() for t in (C, a, b)]
        r = sinkhorn(*inputs, eps=EPS, n_iters=400, grad=mode, backend="torch")
        g_c, g_a, g_b = torch.autograd.grad(fn(r), inputs)
        assert_finite(grad_c=g_c, grad_a=g_a, grad_b=g_b)
        return g_c, centred(g_a, rows), centred(g_b, cols)

    implicit, unrolled = grads("implicit"), grads("unrolled")
    for name, x, y in zip("Cab", implicit, unrolled):
        scale = y.abs().max().clamp_min(1e-12)
        assert float((x - y).abs().max() / scale) <= 1e-7, name
    assert bool((implicit[0][0][~rows[0]] == 0).all()) and bool((implicit[0][1][:, ~cols[1]] == 0).all())


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_half_precision_gradients(sinkhorn_backend, gen, grad):
    """bfloat16 inputs: float32 results, gradients in the inputs' dtype, finite, close to float32's."""
    C = random_cost(gen, 2, 5, 4, dtype=torch.bfloat16)
    a = random_marginal(gen, 1, 5, dtype=torch.float64)[0]
    a = a.to(torch.bfloat16)
    b = (random_marginal(gen, 1, 4, dtype=torch.float64)[0] * a.double().sum()).to(torch.bfloat16)

    def grads(dt):
        # float32 copies of the bfloat16 weights keep their (rounding-level) mass mismatch: rebalance b.
        a_dt, b_dt = a.to(dt), b.to(dt) if dt == torch.bfloat16 else b.to(dt) * (a.to(dt).sum() / b.to(dt).sum())
        inputs = [C.to(dt).requires_grad_(), a_dt.requires_grad_(), b_dt.requires_grad_()]
        r = sinkhorn(*inputs, eps=EPS, n_iters=20, grad=grad, backend=sinkhorn_backend)
        loss = r.reg_cost.sum() if grad == "envelope" else r.reg_cost.sum() + r.plan.square().sum()
        return torch.autograd.grad(loss, inputs)

    half, single = grads(torch.bfloat16), grads(torch.float32)
    for h, s in zip(half, single):
        assert h.dtype == torch.bfloat16
        assert_finite(grad=h.float())
        torch.testing.assert_close(h.float(), s.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("n, m", [(9, 14), (14, 9), (16, 16)])
def test_fixed_point_solve_matches_dense_system(gen, n, m):
    """The Schur-complement direct solve against a dense solve of ``H + z z^T`` (padding on both sides)."""
    from aplot_kernels.sinkhorn import gradients

    C, a, b = _problem(gen, batch=3, n=n, m=m)
    a[1, [0, n - 1]] = 0.0
    b[2, [1, 2]] = 0.0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    plan = sinkhorn(C, a, b, grad="none", backend="torch", **CONVERGED).plan
    rows, cols = a > 0, b > 0
    diag_a, diag_b = torch.where(rows, a, 1), torch.where(cols, b, 1)
    gauge = torch.cat([rows.double(), -cols.double()], -1)
    rhs = torch.randn(3, n + m, generator=gen, dtype=torch.float64) * torch.cat([rows, cols], -1)
    rhs = rhs - gauge * ((rhs * gauge).sum(-1, keepdim=True) / (gauge * gauge).sum(-1, keepdim=True))

    dense = torch.zeros(3, n + m, n + m, dtype=torch.float64)
    dense[:, :n, :n] = torch.diag_embed(diag_a)
    dense[:, n:, n:] = torch.diag_embed(diag_b)
    dense[:, :n, n:] = plan
    dense[:, n:, :n] = plan.transpose(-1, -2)
    want = torch.linalg.solve(dense + gauge[:, :, None] * gauge[:, None, :], rhs)
    got = gradients._solve_fixed_point_system(plan, diag_a, diag_b, gauge, rhs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    # and it solves H nu = rhs itself on range(H)
    torch.testing.assert_close(torch.bmm(dense, got[:, :, None])[..., 0], rhs, rtol=1e-9, atol=1e-10)
