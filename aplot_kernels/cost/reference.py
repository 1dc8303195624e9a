"""Pure-PyTorch cost matrices: the ground truth every kernel is tested against.

All functions take batched inputs (``[B, N, D]`` embeddings, ``[B, N]``
rewards) and compute in the dtype they are given; the public functions in
:mod:`aplot_kernels.cost` upcast half precision first.
"""

from __future__ import annotations

from typing import Tuple

import torch


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / max(||x||, eps)`` along the last dimension (``torch.nn.functional.normalize``'s rule)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


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
) -> torch.Tensor:
    """``alpha * (1 - sigmoid(|delta| / T)) + (1 - alpha) * (1 + S) / 2``, ``[B, N, M]``."""
    similarity = cosine_similarity(chosen_emb, rejected_emb, eps)
    gap = reward_gap_cost(chosen_rewards, rejected_rewards, temperature)
    return alpha * gap + (1.0 - alpha) * 0.5 * (1.0 + similarity)


# ---------------------------------------------------------------------------
# Closed-form backward passes. Kernel backends that implement only a forward
# kernel use these; the tests hold them to autograd of the functions above.
# ---------------------------------------------------------------------------


def _normalize_backward(x: torch.Tensor, grad_x_hat: torch.Tensor, eps: float) -> torch.Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    clamped = norm.clamp_min(eps)
    x_hat = x / clamped
    # Above eps the norm divides (project out the radial part); below it, eps is a constant.
    radial = (x_hat * grad_x_hat).sum(-1, keepdim=True)
    return torch.where(norm > eps, (grad_x_hat - x_hat * radial) / clamped, grad_x_hat / clamped)


def similarity_backward(
    grad_s: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
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
):
    """Gradients ``(d_chosen_emb, d_rejected_emb, d_chosen_rewards, d_rejected_rewards)``."""
    grad_chosen_emb, grad_rejected_emb = similarity_backward(
        grad_cost * (0.5 * (1.0 - alpha)), chosen_emb, rejected_emb, eps
    )
    delta = chosen_rewards[..., :, None] - rejected_rewards[..., None, :]
    s = torch.sigmoid(-delta.abs() / temperature)
    # d/d delta of sigmoid(-|delta|/T) = -sign(delta) s (1 - s) / T
    grad_delta = grad_cost * (-alpha / temperature) * torch.sign(delta) * s * (1.0 - s)
    return grad_chosen_emb, grad_rejected_emb, grad_delta.sum(-1), -grad_delta.sum(-2)
