"""Sinkhorn in the compiled extension (``csrc/``): C++ on CPU tensors, CUDA on GPU tensors.

Implements :func:`aplot_kernels.sinkhorn.reference.solve` with the same
arguments and results; see ``csrc/cpu/sinkhorn_cpu.cpp`` and
``csrc/cuda/sinkhorn_cuda.cu``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _native
from .reference import SolveOutput

__all__ = ["solve"]


def solve(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    n_iters: int,
    tol: Optional[float],
    check_every: int,
) -> SolveOutput:
    """``C [B, N, M]`` (any float dtype; half precision is read directly and computed in float32),
    ``a [B, N]``, ``b [B, M]`` -> :class:`SolveOutput` (float64 for float64 ``C``, else float32)."""
    out = _native.ops().sinkhorn_solve(
        C, a, b, float(eps), int(n_iters), -1.0 if tol is None else float(tol), int(check_every)
    )
    return SolveOutput(*out)
