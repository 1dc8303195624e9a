"""The detached APLOT margin on the native backend.

On CPU tensors one extension op, ``aplot_margins``, computes the cost, the
Sinkhorn row transport costs and the scaling (``csrc/cpu/margin_cpu.cpp``);
on CUDA tensors the cost op, then Sinkhorn's row-cost op. Nothing here
records autograd (the margin is detached), so eager calls run the ops below
the autograd dispatch key: the cost op's Python autograd formula is not
entered at all. Compiled, the same ops are traced under ``no_grad``.
"""

from __future__ import annotations

import torch

from .. import _native
from ..cost.reference import similarity_terms
from ..sinkhorn.native import row_transport_costs
from .reference import uniform


def _margins(
    chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, alpha, temperature, norm_eps, similarity, eps, n_iters, scale
):
    sim_weight, sim_offset = similarity_terms(alpha, similarity)
    if chosen_emb.is_cpu:
        return _native.op("aplot_margins")(
            chosen_emb,
            rejected_emb,
            chosen_rewards,
            rejected_rewards,
            alpha,
            temperature,
            norm_eps,
            sim_weight,
            sim_offset,
            eps,
            n_iters,
            scale,
        )
    cost = _native.op("aplot_cost")(
        chosen_emb.unsqueeze(0),
        rejected_emb.unsqueeze(0),
        chosen_rewards.unsqueeze(0),
        rejected_rewards.unsqueeze(0),
        alpha,
        temperature,
        norm_eps,
        sim_weight,
        sim_offset,
    )
    n, m = cost.shape[1], cost.shape[2]
    a, b = uniform(n, cost.dtype, cost.device), uniform(m, cost.dtype, cost.device)
    row_costs = row_transport_costs(cost, a, b, eps, n_iters).squeeze(0)
    return row_costs.mul_(scale * n)  # a fresh tensor: scaled in place, one allocation less


def detached_margins(*args):
    """The margins ``[n]``, without gradient; arguments as :func:`_margins`, already checked."""
    if args[2].is_cpu and not torch.compiler.is_compiling():  # the op is detached in itself (autograd falls through)
        return _margins(*args)
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return _margins(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _margins(*args)
