"""Fake (meta) kernels and autograd formulas of the extension's ``torch.ops.aplot_kernels.*`` operators.

The schemas and the CPU/CUDA kernels are registered in C++ (``csrc/ops.cpp``);
what ``torch.compile`` and ``torch.library.opcheck`` also need is written here,
in Python, against those schemas: a fake kernel per op (output shapes and
dtypes without running it) and the cost ops' backward formulas (the
reference's closed form). They are registered by :func:`register`, which
:mod:`aplot_kernels._native` calls once the extension has loaded: registering
against a schema that does not exist yet would fail, and the extension is
compiled lazily, on first use. Python rather than C++ keeps the backward
formulas in one place (:mod:`aplot_kernels.cost.reference`) for every backend.

``aplot_margins`` (the detached margin, CPU only) has no autograd formula: it
is only called without gradient. ``first_nonfinite`` (the eager value check
of CPU tensors, returning an int) has no fake: compiled code checks no values.
The Sinkhorn solves carry no autograd formula of their own: their gradient
mode (envelope or implicit) is chosen per call by the operators of
:mod:`aplot_kernels.sinkhorn.ops`, around any backend's solve.
"""

from __future__ import annotations

import torch

_registered = False


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _cosine_cost_fake(x, y, eps):
    return x.new_empty((x.shape[0], x.shape[1], y.shape[1]), dtype=_compute_dtype(x, y))


def _aplot_cost_fake(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, eps, sim_weight, sim_offset):
    dtype = _compute_dtype(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
    return chosen_emb.new_empty((chosen_emb.shape[0], chosen_emb.shape[1], rejected_emb.shape[1]), dtype=dtype)


def _sinkhorn_solve_fake(C, a, b, eps, n_iters, tol, check_every):
    from .sinkhorn.reference import empty_output

    return tuple(empty_output(C, _compute_dtype(C)))


def _sinkhorn_row_costs_fake(C, a, b, eps, n_iters, tol, check_every):
    return C.new_empty(C.shape[:2], dtype=_compute_dtype(C))


def _aplot_margins_fake(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, *options):
    dtype = _compute_dtype(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
    return chosen_emb.new_empty(chosen_emb.shape[:-1], dtype=dtype)


def _cosine_cost_setup(ctx, inputs, output):
    x, y, eps = inputs
    ctx.save_for_backward(x, y)
    ctx.eps = eps


def _cosine_cost_backward(ctx, grad_cost):
    from .cost import reference

    x, y = ctx.saved_tensors
    dtype = _compute_dtype(x, y)
    grad_x, grad_y = reference.cosine_cost_backward(grad_cost.to(dtype), x.to(dtype), y.to(dtype), ctx.eps)
    return grad_x.to(x.dtype), grad_y.to(y.dtype), None


def _aplot_cost_setup(ctx, inputs, output):
    *tensors, alpha, temperature, eps, sim_weight, sim_offset = inputs
    ctx.save_for_backward(*tensors)
    # The schema carries the similarity as (weight, offset); the reference's backward takes its name.
    ctx.options = (alpha, temperature, eps, "unit" if sim_offset != 0 else "cosine")


def _aplot_cost_backward(ctx, grad_cost):
    from .cost import reference

    inputs = ctx.saved_tensors
    dtype = _compute_dtype(*inputs)
    grads = reference.aplot_cost_backward(grad_cost.to(dtype), *(t.to(dtype) for t in inputs), *ctx.options)
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs)) + (None,) * 5


def register() -> None:
    """Register the fakes and the cost backwards (once; the schemas must exist)."""
    global _registered
    if _registered:
        return
    _registered = True
    lib = torch.library
    lib.register_fake("aplot_kernels::cosine_cost", _cosine_cost_fake)
    lib.register_fake("aplot_kernels::aplot_cost", _aplot_cost_fake)
    lib.register_fake("aplot_kernels::sinkhorn_solve", _sinkhorn_solve_fake)
    lib.register_fake("aplot_kernels::sinkhorn_row_costs", _sinkhorn_row_costs_fake)
    lib.register_fake("aplot_kernels::aplot_margins", _aplot_margins_fake)
    lib.register_autograd("aplot_kernels::cosine_cost", _cosine_cost_backward, setup_context=_cosine_cost_setup)
    lib.register_autograd("aplot_kernels::aplot_cost", _aplot_cost_backward, setup_context=_aplot_cost_setup)
