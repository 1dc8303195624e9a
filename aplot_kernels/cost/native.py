"""Cost matrices in the compiled extension (``csrc/``): C++ on CPU tensors, CUDA on GPU tensors.

Registered operators (``torch.ops.aplot_kernels.*``) whose fake kernels and
backward formulas (the reference's closed form) are in
:mod:`aplot_kernels._native_registrations`, so they trace under
``torch.compile``. Inputs may be any float dtype; the result has
``torch.promote_types(input dtypes, float32)``.
"""

from __future__ import annotations

import torch

from .. import _native
from . import reference

__all__ = ["cosine_cost", "aplot_cost"]


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``[B, N, D] x [B, M, D] -> [B, N, M]``: ``1 - <x_hat_i, y_hat_j>``."""
    return _native.op("cosine_cost")(x, y, float(eps))


def aplot_cost(
    chosen_emb: torch.Tensor,
    rejected_emb: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    alpha: float,
    temperature: float,
    eps: float,
    similarity: str = "unit",
) -> torch.Tensor:
    """``[B, N, D], [B, M, D], [B, N], [B, M] -> [B, N, M]``: the APLOT cost."""
    sim_weight, sim_offset = reference.similarity_terms(float(alpha), similarity)
    return _native.op("aplot_cost")(
        chosen_emb,
        rejected_emb,
        chosen_rewards,
        rejected_rewards,
        float(alpha),
        float(temperature),
        float(eps),
        sim_weight,
        sim_offset,
    )
