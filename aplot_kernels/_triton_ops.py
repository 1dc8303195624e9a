"""The Triton backend's entry points as operators of the ``aplot_kernels`` namespace.

Two kinds, by what ``torch.compile`` may see of them:

* The cost ops (``triton_cosine_cost``, ``triton_aplot_cost`` and their
  ``_backward`` ops) are ``torch.library.triton_op`` ops. Their host code
  allocates with torch and launches ``@triton.jit`` kernels through
  ``torch.library.wrap_triton``, choosing tiles from shapes, dtypes and
  strides only, never from tensor values. Eagerly they run as before; under
  ``torch.compile`` AOTAutograd traces that host code (it also serves as the
  fake kernel), so the graph holds the kernel launches themselves and
  Inductor compiles them with the rest of the graph (and plans their
  buffers with the graph's). Their backward is wired with ``register_autograd``
  (tensors and numbers in ``ctx``), and the backward op is a ``triton_op``
  too. Tiles depend on sizes only through comparisons (power-of-two
  brackets, the half-precision large-tile threshold), so with dynamic sizes
  a compiled graph is guarded on those (a size across one recompiles).
* The Sinkhorn solve and row costs stay opaque ``torch.library.custom_op``
  ops with the fake kernels below: they pick a strategy, and the tiled one
  launches two kernels per iteration from a host loop (``n_iters`` of them
  in a trace) that on a GPU it captures once as its own CUDA graph, cached
  across calls and replayed; a trace can hold neither the capture nor the
  cache. The fused margin (in :mod:`aplot_kernels.margin.triton`) is one
  launch of a single program that runs the whole Sinkhorn loop: Inductor
  would have nothing to fuse or reorder around it, so it stays opaque too
  (traced, its kernel would also need the cost helpers it calls as
  ``cost_kernels.<name>`` imported by name: Inductor's copy of a traced
  kernel brings along only the plain global names it uses).
  ``torch.compile`` keeps each as one node (no graph break).

Under ``TRITON_INTERPRET=1`` (the CPU test mode) ``@triton.jit`` returns
interpreted functions, which ``wrap_triton`` hands back untraced
(torch/_library/triton.py), and those cannot run on fake tensors. There the
cost ops get shape-only fake kernels and stay opaque nodes under AOTAutograd,
as custom ops are; eager values are the same code either way.

The implementations are the kernel modules' functions, imported by name
(``triton_op`` finds the kernels an op launches by reading its source,
following plain names; the AOTAutograd cache keys on those kernels' source).
Kernels and tiles are still read from their modules at call time, so a
test's monkeypatch of them applies. Imported on first use of the Triton
backend (it imports Triton).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .backends import triton_interpreter_on
from .cost.triton import aplot_cost as _aplot_cost_forward
from .cost.triton import cosine_cost as _cosine_cost_forward
from .cost.triton_backward import aplot_cost_backward as _aplot_cost_backward
from .cost.triton_backward import cosine_cost_backward as _cosine_cost_backward
from .margin import triton as margin_triton
from .sinkhorn import reference as sinkhorn_reference
from .sinkhorn import triton as sinkhorn_triton

_SIMILARITY = {"unit": 0, "cosine": 1}  # the schema carries the similarity as an int
_SIMILARITY_NAMES = {v: k for k, v in _SIMILARITY.items()}


def _out_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _opaque_under_functionalization(mode, op, types, args, kwargs):
    """``triton_op``'s own rule runs the op's body under AOTAutograd; this keeps the op as one node."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


def _interpreted(op, fake):
    """Under the interpreter: ``fake`` as the fake kernel and no tracing into the op (see the module docstring)."""
    if triton_interpreter_on():
        op.register_fake(fake)
        op.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)


@torch.library.triton_op("aplot_kernels::triton_cosine_cost", mutates_args=())
def cosine_cost(x: Tensor, y: Tensor, eps: float) -> Tensor:
    return _cosine_cost_forward(x, y, eps)


def _cosine_cost_fake(x, y, eps):
    return x.new_empty((x.shape[0], x.shape[1], y.shape[1]), dtype=_out_dtype(x, y))


_interpreted(cosine_cost, _cosine_cost_fake)


@torch.library.triton_op("aplot_kernels::triton_cosine_cost_backward", mutates_args=())
def cosine_cost_backward(grad_cost: Tensor, x: Tensor, y: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    grad_x, grad_y = _cosine_cost_backward(grad_cost, x, y, eps)
    return grad_x.to(x.dtype), grad_y.to(y.dtype)


def _cosine_cost_backward_fake(grad_cost, x, y, eps):
    return torch.empty_like(x), torch.empty_like(y)


_interpreted(cosine_cost_backward, _cosine_cost_backward_fake)


def _cosine_setup(ctx, inputs, output):
    x, y, eps = inputs
    ctx.save_for_backward(x, y)
    ctx.eps = eps


def _cosine_backward(ctx, grad_cost):
    x, y = ctx.saved_tensors
    return (*cosine_cost_backward(grad_cost, x, y, ctx.eps), None)


cosine_cost.register_autograd(_cosine_backward, setup_context=_cosine_setup)


@torch.library.triton_op("aplot_kernels::triton_aplot_cost", mutates_args=())
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
    return _aplot_cost_forward(
        chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, eps, _SIMILARITY_NAMES[similarity]
    )


def _aplot_cost_fake(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, eps, similarity):
    dtype = _out_dtype(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
    return chosen_emb.new_empty((chosen_emb.shape[0], chosen_emb.shape[1], rejected_emb.shape[1]), dtype=dtype)


_interpreted(aplot_cost, _aplot_cost_fake)


@torch.library.triton_op("aplot_kernels::triton_aplot_cost_backward", mutates_args=())
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
    grads = _aplot_cost_backward(grad_cost, *inputs, alpha, temperature, eps, _SIMILARITY_NAMES[similarity])
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))


def _aplot_cost_backward_fake(
    grad_cost, chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, eps, similarity
):
    return tuple(torch.empty_like(t) for t in (chosen_emb, rejected_emb, chosen_rewards, rejected_rewards))


_interpreted(aplot_cost_backward, _aplot_cost_backward_fake)


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
    return tuple(sinkhorn_reference.empty_output(C, torch.float32))


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
