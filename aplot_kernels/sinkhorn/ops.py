"""Sinkhorn with a gradient: operators of the ``aplot_kernels`` namespace (``torch.library.custom_op``).

``sinkhorn_envelope`` and ``sinkhorn_implicit`` run one backend's ``solve``
(``backend`` is the resolved name: ``"torch"``, ``"native"`` or ``"triton"``)
and differ only in their ``register_autograd`` formula, from
:mod:`aplot_kernels.sinkhorn.gradients`. ``sinkhorn_implicit_from_solution``
returns copies of a solution already computed with the implicit gradient
attached: the envelope's backward goes through it under ``create_graph=True``,
so second derivatives are implicit's, with no new solve. Their autograd
contexts hold the saved tensors and ``eps`` only.

Each op is opaque to ``torch.compile`` (one node, the fake kernel below): the
reference's loop is not traced. ``grad="unrolled"`` and calls with nothing to
differentiate use :func:`backend_solve` directly, without an op.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._precision import autocast_off, float32_or_wider
from . import gradients, native, reference
from .reference import SolveOutput

__all__ = ["backend_solve", "sinkhorn_envelope", "sinkhorn_implicit", "sinkhorn_implicit_from_solution"]

_Outputs = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_NO_OPTION_GRADS = (None,) * 5  # eps, n_iters, tol, check_every, backend


def backend_solve(backend: str, C, a, b, eps: float, n_iters: int, tol: Optional[float], check_every: int) -> SolveOutput:
    """One backend's ``solve(C [B, N, M], a [B, N], b [B, M])`` (``backend`` already resolved)."""
    if backend == "torch":
        return reference.solve(C.to(float32_or_wider(C)), a, b, eps, n_iters, tol, check_every)
    if backend == "native":
        return native.solve(C, a, b, eps, n_iters, tol, check_every)
    from .. import _triton_ops  # the registered op around the Triton solve (imports Triton)

    return SolveOutput(*_triton_ops.sinkhorn_solve(C, a, b, eps, n_iters, tol, check_every))


def _solve_fake(C, a, b, eps, n_iters, tol, check_every, backend):
    dtype = torch.float32 if backend == "triton" else float32_or_wider(C)  # the Triton solve computes in float32
    return tuple(reference.empty_output(C, dtype))


@torch.library.custom_op("aplot_kernels::sinkhorn_envelope", mutates_args=())
def sinkhorn_envelope(
    C: Tensor, a: Tensor, b: Tensor, eps: float, n_iters: int, tol: Optional[float], check_every: int, backend: str
) -> _Outputs:
    """:class:`SolveOutput` of ``backend``'s solve; only ``reg_cost`` is differentiable (envelope theorem)."""
    return tuple(backend_solve(backend, C, a, b, eps, n_iters, tol, check_every))


@torch.library.custom_op("aplot_kernels::sinkhorn_implicit", mutates_args=())
def sinkhorn_implicit(
    C: Tensor, a: Tensor, b: Tensor, eps: float, n_iters: int, tol: Optional[float], check_every: int, backend: str
) -> _Outputs:
    """:class:`SolveOutput` of ``backend``'s solve; plan, potentials and values differentiable at the fixed point."""
    return tuple(backend_solve(backend, C, a, b, eps, n_iters, tol, check_every))


@torch.library.custom_op("aplot_kernels::sinkhorn_implicit_from_solution", mutates_args=())
def sinkhorn_implicit_from_solution(
    C: Tensor, a: Tensor, b: Tensor, plan: Tensor, f: Tensor, g: Tensor, eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Copies of ``plan [B, N, M]``, ``f [B, N]``, ``g [B, M]`` (the solution for ``C, a, b, eps``),
    differentiable in ``C, a, b`` as the implicit gradient says."""
    return plan.clone(), f.clone(), g.clone()


sinkhorn_envelope.register_fake(_solve_fake)
sinkhorn_implicit.register_fake(_solve_fake)


@sinkhorn_implicit_from_solution.register_fake
def _(C, a, b, plan, f, g, eps):
    return torch.empty_like(plan), torch.empty_like(f), torch.empty_like(g)


def _envelope_setup(ctx, inputs, output):
    C, a, b, eps = inputs[:4]
    plan, f, g, cost, _reg_cost, iters, err = output
    ctx.save_for_backward(plan, f, g, C, a, b)
    ctx.eps = eps
    ctx.mark_non_differentiable(plan, f, g, cost, iters, err)


@autocast_off
def _envelope_backward(ctx, _plan, _f, _g, _cost, grad_reg, _n, _err):
    plan, f, g, C, a, b = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the gradient must carry the solution's own derivative
        plan, f, g = sinkhorn_implicit_from_solution(C, a, b, plan, f, g, ctx.eps)
    return (*gradients.envelope_backward(grad_reg, plan, f, g, a, b, C.dtype, ctx.needs_input_grad), *_NO_OPTION_GRADS)


def _implicit_setup(ctx, inputs, output):
    C, a, b, eps = inputs[:4]
    plan, f, g, _cost, _reg_cost, iters, err = output
    ctx.save_for_backward(plan, f, g, C, a, b)
    ctx.eps = eps
    ctx.mark_non_differentiable(iters, err)


@autocast_off
def _implicit_backward(ctx, grad_plan, grad_f, grad_g, grad_cost, grad_reg, _n, _err):
    plan, f, g, C, a, b = ctx.saved_tensors
    grads = (grad_plan, grad_f, grad_g, grad_cost, grad_reg)
    return (*gradients.implicit_backward(plan, f, g, C, a, b, ctx.eps, grads, ctx.needs_input_grad), *_NO_OPTION_GRADS)


def _from_solution_setup(ctx, inputs, output):
    C, a, b, plan, f, g, eps = inputs
    ctx.save_for_backward(plan, f, g, C, a, b)
    ctx.eps = eps


@autocast_off
def _from_solution_backward(ctx, grad_plan, grad_f, grad_g):
    plan, f, g, C, a, b = ctx.saved_tensors
    grads = (grad_plan, grad_f, grad_g, None, None)
    # The solution is a function of (C, a, b): no gradient to the copies' sources.
    return (*gradients.implicit_backward(plan, f, g, C, a, b, ctx.eps, grads, ctx.needs_input_grad), None, None, None, None)


sinkhorn_envelope.register_autograd(_envelope_backward, setup_context=_envelope_setup)
sinkhorn_implicit.register_autograd(_implicit_backward, setup_context=_implicit_setup)
sinkhorn_implicit_from_solution.register_autograd(_from_solution_backward, setup_context=_from_solution_setup)
