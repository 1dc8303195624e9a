"""The detached APLOT margin on the native backend: the extension's cost op, then its Sinkhorn row-cost op.

Nothing here records autograd (the margin is detached), so eager calls run
the ops below the autograd dispatch key: the cost op's Python autograd
formula is not entered at all. Compiled, the same two ops are traced under
``no_grad``. Uniform marginals are made once per shape and reused (the
kernels only read them).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .. import _native
from ..cost.reference import similarity_terms
from ..sinkhorn.native import row_transport_costs

_UNIFORM: Dict[Tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
_UNIFORM_MAX = 64  # distinct shapes kept; more are made per call


def uniform(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[1, size]`` of ``1 / size``; shared between calls, never written to."""
    if torch.compiler.is_compiling():
        return torch.full((1, size), 1.0 / size, dtype=dtype, device=device)
    key = (size, dtype, device)
    weights = _UNIFORM.get(key)
    if weights is None:
        weights = torch.full((1, size), 1.0 / size, dtype=dtype, device=device)
        # Made inside a CUDA graph capture, the fill only runs at replay: never keep such a tensor.
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if len(_UNIFORM) < _UNIFORM_MAX and not capturing:
            _UNIFORM[key] = weights
    return weights


def _margins(
    chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, alpha, temperature, norm_eps, similarity, eps, n_iters, scale
):
    sim_weight, sim_offset = similarity_terms(alpha, similarity)
    cost = _native.ops().aplot_cost.default(
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
    weights_dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    a, b = uniform(n, weights_dtype, cost.device), uniform(m, weights_dtype, cost.device)
    row_costs = row_transport_costs(cost, a, b, eps, n_iters).squeeze(0)
    return row_costs.mul_(scale * n)  # a fresh tensor: scaled in place, one allocation less


def detached_margins(*args):
    """The margins ``[n]``, without gradient; arguments as :func:`_margins`, already checked."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return _margins(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _margins(*args)
