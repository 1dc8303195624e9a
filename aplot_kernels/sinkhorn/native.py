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

__all__ = ["solve", "row_transport_costs"]


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
    out = _native.op("sinkhorn_solve")(C, a, b, float(eps), int(n_iters), -1.0 if tol is None else float(tol), int(check_every))
    return SolveOutput(*out)


def row_transport_costs(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    n_iters: int,
    tol: Optional[float] = None,
    check_every: int = 10,
) -> torch.Tensor:
    """``sum_j P_ij C_ij`` per row ``[B, N]`` after :func:`solve`'s iterations (what the APLOT margin needs).

    On CPU tensors the plan is never stored: the final pass reduces each plan
    row against ``C`` as it forms it. The CUDA kernels have no such variant;
    there the plan of :func:`solve` is reduced.
    """
    tol_arg = -1.0 if tol is None else float(tol)
    if C.device.type == "cpu":
        return _native.op("sinkhorn_row_costs")(C, a, b, float(eps), int(n_iters), tol_arg, int(check_every))
    out = solve(C, a, b, eps, n_iters, tol, check_every)
    return (out.plan * C.to(out.plan.dtype)).sum(-1)
