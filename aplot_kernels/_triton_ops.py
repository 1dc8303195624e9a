"""The Triton backend's entry points as operators of the ``aplot_kernels`` namespace (``torch.library.custom_op``).

Each entry point (cost forward and backward, Sinkhorn solve and row costs,
the fused margin) chooses a strategy from shapes, may replay its own cached
CUDA graph, or host-loops over launches, so it is registered as an opaque
custom op rather than a ``triton_op``: ``torch.compile`` keeps it in the
graph as one node (no break) with the fake kernel below, and runs the entry
point as it runs eagerly. The cost ops carry their backward (the Triton
backward kernels) through ``register_autograd``, with tensors and numbers in
``ctx`` only. The implementations look the entry points up on their modules
at call time, so a test's monkeypatch of a kernel module still applies.

Imported on first use of the Triton backend (it imports Triton).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .cost import triton as cost_triton
from .cost import triton_backward as cost_triton_backward
from .margin import triton as margin_triton
from .sinkhorn import triton as sinkhorn_triton

_SIMILARITY = {"unit": 0, "cosine": 1}  # the schema carries the similarity as an int
_SIMILARITY_NAMES = {v: k for k, v in _SIMILARITY.items()}


def _out_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.custom_op("aplot_kernels::triton_cosine_cost", mutates_args=())
def cosine_cost(x: Tensor, y: Tensor, eps: float) -> Tensor:
    return cost_triton.cosine_cost(x, y, eps)


@cosine_cost.register_fake
def _(x, y, eps):
    return x.new_empty((x.shape[0], x.shape[1], y.shape[1]), dtype=_out_dtype(x, y))


@torch.library.custom_op("aplot_kernels::triton_cosine_cost_backward", mutates_args=())
def cosine_cost_backward(grad_cost: Tensor, x: Tensor, y: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    grad_x, grad_y = cost_triton_backward.cosine_cost_backward(grad_cost, x, y, eps)
    return grad_x.to(x.dtype), grad_y.to(y.dtype)


@cosine_cost_backward.register_fake
def _(grad_cost, x, y, eps):
    return torch.empty_like(x), torch.empty_like(y)


def _cosine_setup(ctx, inputs, output):
    x, y, eps = inputs
    ctx.save_for_backward(x, y)
    ctx.eps = eps


def _cosine_backward(ctx, grad_cost):
    x, y = ctx.saved_tensors
    return (*cosine_cost_backward(grad_cost, x, y, ctx.eps), None)


cosine_cost.register_autograd(_cosine_backward, setup_context=_cosine_setup)


@torch.library.custom_op("aplot_kernels::triton_aplot_cost", mutates_args=())
def aplot_cost(
    chosen_emb: Tensor,
    rejected_emb: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    alpha: float,
    temperature: float,
    eps: float,
    similarity: int,
) -> Tensor:
    return cost_triton.aplot_cost(
        chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, eps, _SIMILARITY_NAMES[similarity]
    )


@aplot_cost.register_fake
def _(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, eps, similarity):
    dtype = _out_dtype(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
    return chosen_emb.new_empty((chosen_emb.shape[0], chosen_emb.shape[1], rejected_emb.shape[1]), dtype=dtype)


@torch.library.custom_op("aplot_kernels::triton_aplot_cost_backward", mutates_args=())
def aplot_cost_backward(
    grad_cost: Tensor,
    chosen_emb: Tensor,
    rejected_emb: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    alpha: float,
    temperature: float,
    eps: float,
    similarity: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    inputs = (chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
    grads = cost_triton_backward.aplot_cost_backward(grad_cost, *inputs, alpha, temperature, eps, _SIMILARITY_NAMES[similarity])
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))


@aplot_cost_backward.register_fake
def _(grad_cost, chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, eps, similarity):
    return tuple(torch.empty_like(t) for t in (chosen_emb, rejected_emb, chosen_rewards, rejected_rewards))


def _aplot_setup(ctx, inputs, output):
    *tensors, alpha, temperature, eps, similarity = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = (alpha, temperature, eps, similarity)


def _aplot_backward(ctx, grad_cost):
    return (*aplot_cost_backward(grad_cost, *ctx.saved_tensors, *ctx.options), None, None, None, None)


aplot_cost.register_autograd(_aplot_backward, setup_context=_aplot_setup)


@torch.library.custom_op("aplot_kernels::triton_sinkhorn_solve", mutates_args=())
def sinkhorn_solve(
    C: Tensor, a: Tensor, b: Tensor, eps: float, n_iters: int, tol: Optional[float], check_every: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = sinkhorn_triton.solve(C, a, b, eps, n_iters, tol, check_every)
    # custom_op outputs may not alias inputs or each other: copy any that do (none in practice).
    return tuple(out)


@sinkhorn_solve.register_fake
def _(C, a, b, eps, n_iters, tol, check_every):
    batch, n, m = C.shape
    new = C.new_empty
    f32 = torch.float32
    return (
        new((batch, n, m), dtype=f32),
        new((batch, n), dtype=f32),
        new((batch, m), dtype=f32),
        new((batch,), dtype=f32),
        new((batch,), dtype=f32),
        new((batch,), dtype=torch.int64),
        new((batch,), dtype=f32),
    )


@torch.library.custom_op("aplot_kernels::triton_sinkhorn_row_costs", mutates_args=())
def sinkhorn_row_costs(C: Tensor, a: Tensor, b: Tensor, eps: float, n_iters: int) -> Tensor:
    return sinkhorn_triton.row_transport_costs(C, a, b, eps, n_iters)


@sinkhorn_row_costs.register_fake
def _(C, a, b, eps, n_iters):
    return C.new_empty(C.shape[:2], dtype=torch.float32)


@torch.library.custom_op("aplot_kernels::triton_aplot_margin", mutates_args=())
def aplot_margin(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_emb: Tensor,
    rejected_emb: Tensor,
    alpha: float,
    temperature: float,
    norm_eps: float,
    eps: float,
    n_iters: int,
    scale: float,
    similarity: int,
) -> Tensor:
    return margin_triton.aplot_margin(
        chosen_rewards,
        rejected_rewards,
        chosen_emb,
        rejected_emb,
        alpha,
        temperature,
        norm_eps,
        eps,
        n_iters,
        scale,
        similarity=_SIMILARITY_NAMES[similarity],
    )


@aplot_margin.register_fake
def _(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, alpha, temperature, norm_eps, eps, n_iters, scale, similarity):
    return chosen_emb.new_empty((chosen_emb.shape[0],), dtype=torch.float32)


def similarity_code(similarity: str) -> int:
    return _SIMILARITY[similarity]
