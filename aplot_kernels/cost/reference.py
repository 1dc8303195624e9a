"""Pure-PyTorch cost matrices: the ground truth every kernel is tested against.

All functions take batched inputs (``[B, N, D]`` embeddings, ``[B, N]``
rewards) and compute in the dtype they are given; the public functions in
:mod:`aplot_kernels.cost` upcast half precision first.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch


SIMILARITIES = ("unit", "cosine")


def similarity_terms(alpha: float, similarity: str) -> Tuple[float, float]:
    """``(weight, offset)`` with ``(1 - alpha) * sim = weight * (offset + S)``.

    ``"unit"``: ``sim = (1 + S) / 2`` (weight ``(1 - alpha) / 2``, offset 1);
    ``"cosine"``: ``sim = S`` (weight ``1 - alpha``, offset 0).
    """
    if similarity == "unit":
        return (1.0 - alpha) * 0.5, 1.0
    if similarity == "cosine":
        return 1.0 - alpha, 0.0
    raise ValueError(f"`similarity` must be one of {', '.join(map(repr, SIMILARITIES))}; got {similarity!r}")


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """A power of two ``sigma [.., 1]`` per row with ``max |sigma x| ~ 1`` (no gradient).

    Scaling by a power of two is exact and commutes with rounding, so
    ``||sigma x||`` is ``sigma ||x||`` to the bit wherever the unscaled sum of
    squares neither overflows nor underflows; where it would, the scaled one
    does not. ``sigma`` stays a normal number of the dtype (the exponent is
    clamped), so it is never flushed to zero.
    """
    peak = x.detach().abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(peak)  # peak = mantissa * 2**exponent, mantissa in [0.5, 1)
    info = torch.finfo(x.dtype)
    # 2**-exponent stays a normal number: exponent in [-floor(log2 max), -log2 tiny].
    lo, hi = -int(math.log2(info.max)), -int(math.log2(info.tiny))
    return torch.ldexp(torch.ones_like(peak), -exponent.clamp(lo, hi))


def scaled_norms(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sigma, clamped)`` ``[.., 1]`` each with ``x_hat = (sigma x) / clamped``, ``clamped = sigma max(||x||, eps)``."""
    sigma = row_scale(x)
    scaled = x * sigma
    norm = scaled.norm(dim=-1, keepdim=True)
    floor = sigma * eps
    return sigma, torch.where(norm > floor, norm, floor)


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(||x||, eps)`` along the last dimension (``torch.nn.functional.normalize``'s rule).

    Computed as ``(sigma x) / (sigma max(||x||, eps))`` with the power of two
    ``sigma`` of :func:`row_scale`: the same numbers, without overflow of the
    squared norm for large finite entries (or underflow for tiny ones).
    """
    sigma, clamped = scaled_norms(x, eps)
    return (x * sigma) / clamped


def cosine_similarity(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``S[b, i, j] = <x_hat[b, i], y_hat[b, j]>``: ``[B, N, D] x [B, M, D] -> [B, N, M]``."""
    return normalize(x, eps) @ normalize(y, eps).transpose(-1, -2)


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 - S``: ``[B, N, D] x [B, M, D] -> [B, N, M]``."""
    return 1.0 - cosine_similarity(x, y, eps)


def reward_gap_cost(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """``1 - sigmoid(|r_c[i] - r_r[j]| / T)``, written as ``sigmoid(-|.|/T)`` for accuracy: ``[B, N], [B, M] -> [B, N, M]``."""
    delta = chosen_rewards[..., :, None] - rejected_rewards[..., None, :]
    return torch.sigmoid(-delta.abs() / temperature)


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
    """``alpha * (1 - sigmoid(|delta| / T)) + (1 - alpha) * sim``, ``[B, N, M]``.

    ``sim = (1 + S) / 2`` for ``similarity="unit"``, ``S`` for ``"cosine"``.
    """
    weight, offset = similarity_terms(alpha, similarity)
    s = cosine_similarity(chosen_emb, rejected_emb, eps)
    gap = reward_gap_cost(chosen_rewards, rejected_rewards, temperature)
    return alpha * gap + weight * (offset + s)


# ---------------------------------------------------------------------------
# Closed-form backward passes. Kernel backends that implement only a forward
# kernel use these; the tests hold them to autograd of the functions above.
# ---------------------------------------------------------------------------


def _normalize_backward(x: torch.Tensor, grad_x_hat: torch.Tensor, eps: float) -> torch.Tensor:
    # With x_hat = (sigma x) / clamped (see normalize): dL/dx = sigma * (g - x_hat <x_hat, g>) / clamped above
    # eps (project out the radial part), sigma * g / clamped at the clamp (eps is a constant there).
    sigma, clamped = scaled_norms(x, eps)
    x_hat = (x * sigma) / clamped
    radial = (x_hat * grad_x_hat).sum(-1, keepdim=True)
    radial = torch.where(clamped > sigma * eps, radial, torch.zeros_like(radial))
    return ((grad_x_hat - x_hat * radial) / clamped) * sigma


def similarity_backward(grad_s: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``cosine_similarity(x, y)`` given ``dL/dS`` ``[B, N, M]``."""
    x_hat, y_hat = normalize(x, eps), normalize(y, eps)
    grad_x_hat = grad_s @ y_hat
    grad_y_hat = grad_s.transpose(-1, -2) @ x_hat
    return _normalize_backward(x, grad_x_hat, eps), _normalize_backward(y, grad_y_hat, eps)


def cosine_cost_backward(grad_cost: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float):
    return similarity_backward(-grad_cost, x, y, eps)


def aplot_cost_backward(
    grad_cost: torch.Tensor,
    chosen_emb: torch.Tensor,
    rejected_emb: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    alpha: float,
    temperature: float,
    eps: float,
    similarity: str = "unit",
):
    """Gradients ``(d_chosen_emb, d_rejected_emb, d_chosen_rewards, d_rejected_rewards)``."""
    weight, _ = similarity_terms(alpha, similarity)
    grad_chosen_emb, grad_rejected_emb = similarity_backward(grad_cost * weight, chosen_emb, rejected_emb, eps)
    delta = chosen_rewards[..., :, None] - rejected_rewards[..., None, :]
    s = torch.sigmoid(-delta.abs() / temperature)
    # d/d delta of sigmoid(-|delta|/T) = -sign(delta) s (1 - s) / T
    grad_delta = grad_cost * (-alpha / temperature) * torch.sign(delta) * s * (1.0 - s)
    return grad_chosen_emb, grad_rejected_emb, grad_delta.sum(-1), -grad_delta.sum(-2)
