"""The Sinkhorn gradient operators (``aplot_kernels.sinkhorn.ops``): opcheck, gradcheck, double backward.

``sinkhorn_envelope`` and ``sinkhorn_implicit`` carry the ``grad="envelope"``
and ``grad="implicit"`` modes of :func:`sinkhorn` as ``torch.library`` custom
ops with ``register_autograd``; ``sinkhorn_implicit_from_solution`` carries
the envelope's second derivatives. ``torch.library.opcheck`` runs the schema
check (no mutation, no aliasing), the fake kernel against the real one, the
autograd registration and AOT autograd with dynamic shapes; gradcheck compares
the registered backward formulas with finite differences of converged solves
in float64. Shapes are small and not powers of two.
"""

from __future__ import annotations

import pytest
import torch

from aplot_kernels.sinkhorn import ops, sinkhorn

from conftest import DEVICE, SINKHORN_BACKENDS

CPU_BACKENDS = [b for b in SINKHORN_BACKENDS if b in ("torch", "native")]  # backends that compute float64
CONVERGED = dict(eps=0.5, n_iters=2000, tol=1e-14, check_every=1)


def _problem(seed, batch=2, n=5, m=7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    C = torch.rand(batch, n, m, generator=gen, dtype=dtype)
    a = torch.softmax(torch.randn(batch, n, generator=gen, dtype=dtype), -1)
    b = torch.softmax(torch.randn(batch, m, generator=gen, dtype=dtype), -1)
    return C.to(DEVICE), a.to(DEVICE), b.to(DEVICE)


def _opcheck_cases():
    """Every (backend, dtype, requires_grad); with gradients (AOT autograd, seconds each) the default run
    keeps native in float64, the backward formulas being the same for every backend."""
    for backend in CPU_BACKENDS:
        for dtype in (torch.float32, torch.float64):
            for requires_grad in (False, True):
                fast = not requires_grad or (backend, dtype) == ("native", torch.float64)
                marks = () if fast else pytest.mark.slow
                yield pytest.param(backend, dtype, requires_grad, marks=marks, id=f"{backend}-{str(dtype)[6:]}-{requires_grad}")


@pytest.mark.parametrize("backend, dtype, requires_grad", list(_opcheck_cases()))
def test_opcheck(backend, dtype, requires_grad):
    C, a, b = (t.requires_grad_(requires_grad) for t in _problem(0, dtype=dtype))
    for op in (ops.sinkhorn_envelope, ops.sinkhorn_implicit):
        torch.library.opcheck(op, (C, a, b, 0.3, 20, None, 1, backend))
    if not requires_grad:  # tol changes the forward only
        torch.library.opcheck(ops.sinkhorn_implicit, (C, a, b, 0.3, 40, 1e-6, 3, backend))
    plan, f, g = (t.detach() for t in ops.sinkhorn_implicit(C, a, b, 0.3, 20, None, 1, backend)[:3])
    torch.library.opcheck(ops.sinkhorn_implicit_from_solution, (C, a, b, plan, f, g, 0.3))


def test_opcheck_triton():
    if "triton" not in SINKHORN_BACKENDS:
        pytest.skip("Triton cannot run here")
    C, a, b = (t.float().requires_grad_() for t in _problem(1, batch=1, n=3))
    # The float32 fake kernel and the Triton op inside; the backward formulas are checked on native.
    torch.library.opcheck(ops.sinkhorn_implicit, (C, a, b, 0.3, 10, 1e-6, 5, "triton"))


def _through_sinkhorn(grad, backend, outputs):
    """``(C, logits_a, logits_b) -> outputs of sinkhorn``: softmax keeps each marginal's mass at 1,
    so finite differences only move ``a`` and ``b`` along mass-preserving directions."""

    def fn(C, logits_a, logits_b):
        r = sinkhorn(C, torch.softmax(logits_a, -1), torch.softmax(logits_b, -1), grad=grad, backend=backend, **CONVERGED)
        centred_f = r.f - r.f.mean(-1, keepdim=True)  # potentials only up to the gauge f + t, g - t
        return {"reg_cost": (r.reg_cost,), "all": (r.plan, centred_f, r.cost, r.reg_cost)}[outputs]

    return fn


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grad, outputs", [("envelope", "reg_cost"), ("implicit", "all")])
def test_gradcheck(backend, grad, outputs):
    C, a, b = _problem(2, n=3, m=5)
    inputs = [C.requires_grad_(), a.log().requires_grad_(), b.log().requires_grad_()]
    assert torch.autograd.gradcheck(_through_sinkhorn(grad, backend, outputs), inputs, atol=1e-6, rtol=1e-5)


def _reg_cost_gradient(grad, backend):
    """``(C, logits_a) -> d reg_cost / d(C, logits_a)``, itself differentiable (``create_graph=True``)."""

    def fn(C, logits_a):
        r = sinkhorn(C, torch.softmax(logits_a, -1), grad=grad, backend=backend, **CONVERGED)
        return torch.autograd.grad(r.reg_cost.sum(), (C, logits_a), create_graph=True)

    return fn


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_envelope_double_backward(backend):
    """Second derivatives of the envelope: finite differences of its gradient, and equal to implicit's."""
    C, a, _ = _problem(3, n=3, m=5)
    inputs = [C.requires_grad_(), a.log().requires_grad_()]
    envelope = _reg_cost_gradient("envelope", backend)
    assert torch.autograd.gradcheck(envelope, inputs, atol=1e-6, rtol=1e-5)

    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(DEVICE) for t in inputs]

    def hessian_vector(grad):
        first = _reg_cost_gradient(grad, backend)(*inputs)
        return torch.autograd.grad(sum((w * g).sum() for w, g in zip(weights, first)), inputs)

    for x, y in zip(hessian_vector("envelope"), hessian_vector("implicit")):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_autograd_context_holds_numbers_only(grad):
    """The node's context: saved tensors, and eps as a float (no solver object, no callable)."""
    C, a, b = (t.requires_grad_() for t in _problem(5))
    node = sinkhorn(C, a, b, grad=grad, backend="torch", n_iters=5).reg_cost.grad_fn
    assert "sinkhorn_" + grad in type(node).__name__
    assert vars(node) == {"eps": 0.1}
    assert all(isinstance(t, torch.Tensor) for t in node.saved_tensors)


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_gradient_of_some_inputs(grad):
    """Inputs that do not require grad get none computed; the others' gradients are unchanged."""
    C, a, b = _problem(6)

    def grads(flags):
        inputs = [t.clone().requires_grad_(flag) for t, flag in zip((C, a, b), flags)]
        r = sinkhorn(*inputs, grad=grad, backend="torch", n_iters=30)
        wanted = [t for t in inputs if t.requires_grad]
        return torch.autograd.grad(r.reg_cost.sum() + (r.plan.square().sum() if grad == "implicit" else 0), wanted)

    everything = grads((True, True, True))
    for flags in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        some = grads(flags)
        expected = [g for g, flag in zip(everything, flags) if flag]
        for x, y in zip(some, expected):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
