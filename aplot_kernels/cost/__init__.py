"""Cost matrices between two sets of embeddings (docs/contract.md section 1).

This module is the one dispatch point for the costs: it checks arguments,
turns 2-D inputs into a batch of one, picks the backend, and calls the
kernel backends' registered operators, which carry their own backward
(:mod:`aplot_kernels._native_registrations`, :mod:`aplot_kernels._triton_ops`).
The math lives in :mod:`aplot_kernels.cost.reference`; kernels live beside it
(``triton.py``, ``native.py``) and implement the same functions.

Half-precision inputs are computed with float32 accumulation and return
float32 (the dtype Sinkhorn consumes); float32 and float64 return their own
dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _checks, backends
from .._precision import autocast_off, float32_or_wider
from . import native, reference

__all__ = ["cosine_cost", "aplot_cost"]

NORM_EPS = 1e-8  # the default norm clamp of both costs


def _triton_ops():
    """The Triton backend's registered ops (imported on first use: only importable where Triton is installed)."""
    from .. import _triton_ops

    return _triton_ops


@autocast_off
def cosine_cost(
    x: torch.Tensor, y: Optional[torch.Tensor] = None, *, eps: float = NORM_EPS, backend: str = "auto"
) -> torch.Tensor:
    """Cosine cost ``C[i, j] = 1 - <x_hat_i, y_hat_j>``.

    Args:
        x: ``[N, D]`` or ``[B, N, D]``.
        y: ``[M, D]`` or ``[B, M, D]``; ``None`` means ``y = x``.
        eps: norms are clamped below at ``eps`` (a zero vector costs 1 to everything).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.

    Returns:
        ``[N, M]`` or ``[B, N, M]``; float32 for half-precision inputs.
    """
    with _checks.one_sync():
        _checks.tensor("x", x, ndims=(2, 3))
        _checks.tensor("y", y, ndims=(2, 3), allow_none=True)
        eps = _checks.positive("eps", eps)
        _checks.normal_number("eps", eps, _checks.compute_dtype(x, y))
        y_given = y is not None
        if y is None:
            y = x
        _checks.embeddings_pair("x", x, "y", y)
    dtype = float32_or_wider(x, y)
    impl = backends.resolve(backend, x.device, dtype)
    unbatched = x.dim() == 2
    if unbatched:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if impl == "torch":
        cost = reference.cosine_cost(x.to(dtype), y.to(dtype) if y_given else x.to(dtype), eps)
    elif impl == "native":
        cost = native.cosine_cost(x, y, eps)  # an op with its own autograd formula
    else:
        cost = _triton_ops().cosine_cost(x, y, eps)
    return cost.squeeze(0) if unbatched else cost


@autocast_off
def aplot_cost(
    chosen_emb: torch.Tensor,
    rejected_emb: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    alpha: float = 0.9,
    temperature: float = 1.0,
    similarity: str = "unit",
    eps: float = NORM_EPS,
    backend: str = "auto",
) -> torch.Tensor:
    """APLOT cost between chosen and rejected responses.

    ``C[i, j] = alpha * (1 - sigmoid(|r_c[i] - r_r[j]| / temperature)) + (1 - alpha) * sim[i, j]``
    with ``S`` the cosine similarity of the embeddings and ``sim = (1 + S) / 2``
    (``similarity="unit"``: ``C`` in ``[0, 1]``) or ``sim = S`` (``"cosine"``:
    ``C`` in ``[-(1 - alpha), 1]``). ``C`` is high for hard pairs (similar
    responses, small reward gap).

    Args:
        chosen_emb: ``[N, D]`` or ``[B, N, D]``.
        rejected_emb: ``[M, D]`` or ``[B, M, D]``.
        chosen_rewards: ``[N]`` or ``[B, N]``.
        rejected_rewards: ``[M]`` or ``[B, M]``.
        alpha: weight of the reward-gap term, in ``[0, 1]``.
        temperature: scale of the reward gap, ``> 0``.
        similarity: ``"unit"`` (``(1 + S) / 2``) or ``"cosine"`` (``S``).
        eps: norm clamp of the cosine similarity.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.

    Returns:
        ``[N, M]`` or ``[B, N, M]``; float32 for half-precision inputs.
    """
    with _checks.one_sync():
        _checks.tensor("chosen_emb", chosen_emb, ndims=(2, 3))
        _checks.tensor("rejected_emb", rejected_emb, ndims=(2, 3))
        _checks.tensor("chosen_rewards", chosen_rewards, ndims=(1, 2))
        _checks.tensor("rejected_rewards", rejected_rewards, ndims=(1, 2))
        _checks.embeddings_pair("chosen_emb", chosen_emb, "rejected_emb", rejected_emb)
        _checks.rewards_for("chosen_rewards", chosen_rewards, "chosen_emb", chosen_emb)
        _checks.rewards_for("rejected_rewards", rejected_rewards, "rejected_emb", rejected_emb)
        alpha = _checks.unit_interval("alpha", alpha)
        temperature = _checks.positive("temperature", temperature)
        eps = _checks.positive("eps", eps)
        similarity = _checks.choice("similarity", similarity, reference.SIMILARITIES)
        compute = _checks.compute_dtype(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
        _checks.normal_number("temperature", temperature, compute)
        _checks.normal_number("eps", eps, compute)
    return aplot_cost_checked(
        chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, eps, backend, similarity
    )


def aplot_cost_checked(
    chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, eps, backend, similarity="unit"
):
    """:func:`aplot_cost` on arguments already checked (the loss checks its inputs once for all its steps)."""
    inputs = (chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
    dtype = float32_or_wider(*inputs)
    impl = backends.resolve(backend, chosen_emb.device, dtype)
    unbatched = chosen_emb.dim() == 2
    if unbatched:
        inputs = tuple(t.unsqueeze(0) for t in inputs)
    if impl == "torch":
        cost = reference.aplot_cost(*(t.to(dtype) for t in inputs), alpha, temperature, eps, similarity)
    elif impl == "native":
        cost = native.aplot_cost(*inputs, alpha, temperature, eps, similarity)
    else:
        ops = _triton_ops()
        cost = ops.aplot_cost(*inputs, alpha, temperature, eps, ops.similarity_code(similarity))
    return cost.squeeze(0) if unbatched else cost
