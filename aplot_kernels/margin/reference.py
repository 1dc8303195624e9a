"""The APLOT margin from a transport plan, in plain PyTorch: the one definition the kernels follow."""

from __future__ import annotations

import torch


def margins(plan: torch.Tensor, cost: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * n * sum_j P_ij C_ij`` for ``plan``, ``cost`` ``[n, m]``; returns ``[n]``.

    With uniform weights each row of ``P`` holds mass ``1 / n``, so ``n * sum_j P_ij C_ij``
    is chosen response ``i``'s average transport cost.
    """
    return margins_from_row_costs((plan * cost).sum(-1), plan.shape[-2], scale)


def margins_from_row_costs(row_costs: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """The margins from the row transport costs ``sum_j P_ij C_ij`` (``[n]``) that a kernel reduced."""
    return scale * n * row_costs
