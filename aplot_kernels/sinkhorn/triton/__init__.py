"""Log-domain Sinkhorn in Triton: ``solve`` and ``row_transport_costs``, dispatching on ``strategy=``.

The same iterates as :mod:`aplot_kernels.sinkhorn.reference`, in float32
whatever the dtype of ``C``. Strategies, one module each:

* ``"fused"`` (:mod:`.fused`): one program per problem, ``-C / eps`` in registers; small problems.
* ``"streamed"`` (:mod:`.streamed`): one program per problem streaming ``C`` each pass; many mid-sized
  problems without CUDA graphs.
* ``"tiled"`` (:mod:`.tiled`): a column and a row pass launched per iteration, replayed as a CUDA
  graph on a GPU; any size.
* ``"auto"`` (default): fused when the padded problem has at most ``FUSED_MAX_ELEMENTS`` entries,
  tiled where its loop runs as a CUDA graph, else streamed for at least ``STREAMED_MIN_BATCH``
  problems whose costs total at most ``STREAMED_MAX_BYTES``, tiled otherwise.
* ``"fused-scaling"``, ``"cooperative"``, ``"onepass"``: experimental (:mod:`.experimental`),
  never picked by "auto".

Shared pieces are in :mod:`.common`; the measurements behind the choice are in docs/design.md.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from ...triton_utils import block_size
from ..reference import SolveOutput
from .fused import FUSED_MAX_ELEMENTS, solve_fused
from .streamed import STREAMED_MAX_BYTES, STREAMED_MIN_BATCH, solve_streamed
from .tiled import solve_graphed, solve_tiled, use_graph

__all__ = ["solve", "row_transport_costs", "run", "auto_strategy", "STRATEGIES", "EXPERIMENTAL_STRATEGIES"]

# Experimental strategy -> (module under .experimental, its solve function).
_EXPERIMENTAL = {
    "fused-scaling": ("fused_scaling", "solve_fused_scaling"),
    "cooperative": ("cooperative", "solve_cooperative"),
    "onepass": ("onepass", "solve_onepass"),
}
EXPERIMENTAL_STRATEGIES = tuple(_EXPERIMENTAL)
STRATEGIES = ("auto", "fused", "streamed", "tiled", *EXPERIMENTAL_STRATEGIES)
_HOST_LOOPED = ("tiled", "onepass")  # strategies whose iteration loop runs on the host: graphed on a GPU


def auto_strategy(C: torch.Tensor) -> str:
    """The strategy ``"auto"`` runs for ``C [B, N, M]`` (the rule in the module docstring)."""
    batch, n, m = C.shape
    if block_size(n, hi=1 << 30) * block_size(m, hi=1 << 30) <= FUSED_MAX_ELEMENTS:
        return "fused"
    if use_graph(C):
        return "tiled"
    if batch >= STREAMED_MIN_BATCH and C.numel() * C.element_size() <= STREAMED_MAX_BYTES:
        return "streamed"
    return "tiled"


def _solver(strategy: str):
    if strategy in _EXPERIMENTAL:
        module, name = _EXPERIMENTAL[strategy]
        return getattr(importlib.import_module(f"{__name__}.experimental.{module}"), name)
    return {"fused": solve_fused, "streamed": solve_streamed, "tiled": solve_tiled}[strategy]


def run(C, a, b, eps, n_iters, tol, check_every, strategy, write_plan):
    """Check the inputs, pick the strategy and run it: the one path of :func:`solve` (``write_plan=True``)
    and :func:`row_transport_costs` (``False``), and the seam tests patch to see which ran."""
    if C.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton Sinkhorn reads float16, bfloat16 or float32 `C`, got {C.dtype}")
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    if strategy == "auto":
        strategy = auto_strategy(C)
    launch = _solver(strategy)
    if strategy in _HOST_LOOPED and use_graph(C):
        launch = functools.partial(solve_graphed, launch)
    return launch(C, a, b, float(eps), int(n_iters), tol, int(check_every), write_plan)


def solve(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    n_iters: int,
    tol: Optional[float],
    check_every: int,
    *,
    strategy: str = "auto",
) -> SolveOutput:
    """Log-domain Sinkhorn on a batch, the reference's ``solve`` in float32.

    Args:
        C: ``[B, N, M]`` float16, bfloat16 or float32 (read as is, computed in float32).
        a: ``[B, N]``, b: ``[B, M]`` float32 weights (stride-0 views are fine), zero for padding.
        eps, n_iters, tol, check_every: as :func:`aplot_kernels.sinkhorn.reference.solve`.
        strategy: one of :data:`STRATEGIES` (see the module docstring); ``"auto"``
            picks among the timed ones by size.

    Returns:
        :class:`SolveOutput` in float32 (``n_iters`` int64).
    """
    return run(C, a, b, eps, n_iters, tol, check_every, strategy, write_plan=True)


def row_transport_costs(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    n_iters: int,
    tol: Optional[float] = None,
    check_every: int = 10,
    *,
    strategy: str = "auto",
) -> torch.Tensor:
    """``sum_j P_ij C_ij`` per row of the Sinkhorn plan, without writing the plan.

    The same iterations as :func:`solve` (same arguments); only the epilogue
    differs: it forms each plan tile from the potentials and reduces it
    against ``C`` on chip, so no ``[B, N, M]`` plan is allocated or stored.
    This is what the APLOT margin needs (``scale * n * row cost``).

    Returns:
        ``[B, N]`` float32; 0 on zero-weight (padded) rows.
    """
    return run(C, a, b, eps, n_iters, tol, check_every, strategy, write_plan=False)
