"""The APLOT margin from a transport plan, in plain PyTorch (the one definition the kernels follow), and the
uniform marginals of its transport problem."""

from __future__ import annotations

from typing import Dict, Tuple

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
