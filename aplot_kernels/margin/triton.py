"""Triton kernel of the detached APLOT margin: cost, Sinkhorn and row costs in one program.

``aplot_margin(..., detach=True)`` on a small problem (up to 128 x 128
pairs, see :func:`fits`) runs as this single kernel: one program computes the row
norms and the product ``chosen_emb @ rejected_emb^T`` (tensor cores for
half inputs, exact fp32 FMA for float32), forms the APLOT cost tile in
registers (the epilogue of :mod:`aplot_kernels.cost.triton`), runs
every Sinkhorn iteration on it (the fused strategy's loop, uniform weights)
and writes only the ``[n]`` margins. Neither the ``[n, m]`` cost nor the
plan touches memory, and the step is one launch instead of four (two norm
passes, the cost, the solve). Larger problems take the cost kernel and the
row-cost Sinkhorn (:func:`aplot_kernels.sinkhorn.triton.row_transport_costs`).

The math is that of the separate kernels, whose jit helpers it calls; the
only difference is the last reduction, ``sum_j P_ij C_ij``, which takes
``C_ij`` back from the ``-C / eps`` tile (``-eps`` times it, within two
ulps) rather than keeping a second tile live through the loop.

``scaling=True`` runs the loop of the ``"fused-scaling"`` Sinkhorn strategy
(no ``exp`` per iteration); where that loop falls back to a log-domain
iteration it needs ``-C / eps`` again, and this kernel recomputes the tile
from the embeddings instead of storing it. Off by default until a GPU run
has timed it against the log-domain loop (``bench/gpu_check.py`` does); only
the explicit argument switches it on.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from ..cost import reference as cost_reference
from ..cost import triton as cost_kernels
from ..sinkhorn.triton import common, fused
from ..sinkhorn.triton.experimental import fused_scaling
from ..triton_utils import MIN_DOT_BLOCK, block_size, num_warps_for

# The product's step along D: as the cost kernels' tiles (tensor cores for half, FMA for float32).
HALF_BLOCK_D = cost_kernels.HALF_TILES["large"][2]
FP32_BLOCK_D = cost_kernels.FP32_TILE[2]


@triton.jit
def _margin_neg_cost(source, IEEE_FP32: tl.constexpr, BLOCK_D: tl.constexpr):
    """``-C / eps`` of the APLOT cost tile from the embeddings (``-inf`` outside the problem).

    ``source``: ``(x_rows, y_rows, row_ok, col_ok, D, stride_xd, stride_yd, x_scale, x_norm, y_scale, y_norm,
    rx, ry, alpha, inv_temperature, sim_weight, sim_offset, neg_inv_hi, neg_inv_lo)`` (row scales and
    scaled clamped norms as the cost kernels' ``_clamped_row_norms``); also the ``RELOAD`` of the
    scaling-domain loop, which recomputes the tile rather than keep it.
    """
    (
        x_rows,
        y_rows,
        row_ok,
        col_ok,
        D,
        stride_xd,
        stride_yd,
        x_scale,
        x_norm,
        y_scale,
        y_norm,
        rx,
        ry,
        alpha,
        inv_temperature,
        sim_weight,
        sim_offset,
        neg_inv_hi,
        neg_inv_lo,
    ) = source
    product = cost_kernels._product_tile(
        x_rows[:, None],
        y_rows[:, None],
        x_scale,
        y_scale,
        row_ok,
        col_ok,
        D,
        stride_xd,
        stride_yd,
        IEEE_FP32,
        row_ok.shape[0],
        col_ok.shape[0],
        BLOCK_D,
    )
    s = cost_kernels._normalized(product, x_norm, y_norm)
    c = cost_kernels._aplot_combine(s, rx, ry, alpha, inv_temperature, sim_weight, sim_offset)
    inside = row_ok[:, None] & col_ok[None, :]
    return tl.where(inside, common.scaled_neg_cost(c, neg_inv_hi, neg_inv_lo), float("-inf"))


@triton.jit
def _aplot_margin_kernel(
    x_ptr,
    y_ptr,
    rx_ptr,
    ry_ptr,
    out_ptr,
    N,
    M,
    D,
    stride_xn,
    stride_xd,
    stride_ym,
    stride_yd,
    stride_rx,
    stride_ry,
    alpha,
    inv_temperature,
    sim_weight,
    sim_offset,
    norm_eps,
    eps,
    neg_inv_hi,
    neg_inv_lo,
    n_iters,
    row_weight,
    col_weight,
    margin_scale,
    IEEE_FP32: tl.constexpr,
    SCALING: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < M
    inside = row_ok[:, None] & col_ok[None, :]
    x_rows = x_ptr + rows * stride_xn
    y_rows = y_ptr + cols * stride_ym
    x_scale, x_norm = cost_kernels._clamped_row_norms(x_rows, row_ok, D, stride_xd, norm_eps, BLOCK_N, BLOCK_D)
    y_scale, y_norm = cost_kernels._clamped_row_norms(y_rows, col_ok, D, stride_yd, norm_eps, BLOCK_M, BLOCK_D)
    rx = tl.load(rx_ptr + rows * stride_rx, mask=row_ok, other=0.0).to(tl.float32)
    ry = tl.load(ry_ptr + cols * stride_ry, mask=col_ok, other=0.0).to(tl.float32)
    source = (
        x_rows,
        y_rows,
        row_ok,
        col_ok,
        D,
        stride_xd,
        stride_yd,
        x_scale,
        x_norm,
        y_scale,
        y_norm,
        rx,
        ry,
        alpha,
        inv_temperature,
        sim_weight,
        sim_offset,
        neg_inv_hi,
        neg_inv_lo,
    )
    neg_c = _margin_neg_cost(source, IEEE_FP32, BLOCK_D)
    wa = tl.where(row_ok, row_weight, 0.0)
    wb = tl.where(col_ok, col_weight, 0.0)
    if SCALING:
        log_u, log_v, iters, err, plan = fused_scaling.scaling_iterations(
            neg_c,
            _margin_neg_cost,
            source,
            IEEE_FP32,
            BLOCK_D,
            wa,
            wb,
            n_iters,
            1,
            0.0,
            False,
        )
        neg_c = _margin_neg_cost(source, IEEE_FP32, BLOCK_D)  # not kept through the loop: formed again
    else:
        log_u, log_v, iters, err = fused.fused_iterations(neg_c, wa, wb, n_iters, 1, 0.0, False)
        plan = common.absorbed_kernel(neg_c, log_u, log_v)
    row_cost = tl.sum(plan * tl.where(inside, neg_c * -eps, 0.0), axis=1)
    tl.store(out_ptr + rows, margin_scale * row_cost, mask=row_ok)


# Launch-time failures that mean "this kernel cannot run here" (too much shared memory or too many
# registers for the GPU, a compiler or ptxas error), as opposed to a wrong input. The margin then
# takes the cost kernel and the row-cost Sinkhorn, which ran on the GPUs we have measured.
KERNEL_UNAVAILABLE = tuple(
    error
    for error in (
        getattr(triton, "OutOfResources", None),
        getattr(triton, "CompilationError", None),
        getattr(getattr(triton.runtime, "errors", None), "PTXASError", None),
    )
    if isinstance(error, type)
)
_unavailable_reason: Optional[str] = None


def available() -> bool:
    """False once the fused kernel has failed to compile or launch in this process."""
    return _unavailable_reason is None


def mark_unavailable(error: BaseException) -> None:
    """Stop using the fused kernel in this process, with one warning that says why."""
    global _unavailable_reason
    _unavailable_reason = f"{type(error).__name__}: {error}"
    warnings.warn(
        "aplot_kernels: the fused Triton margin kernel could not run on this GPU "
        f"({_unavailable_reason}); the margin uses the Triton cost kernel and the row-cost Sinkhorn instead",
        RuntimeWarning,
        stacklevel=3,
    )


# Longest side of the fused problem: the product streams [side, BLOCK_D] operand tiles through shared
# memory (3 stages of 128 x 64 bf16 per side fit; 1024-row tiles would not).
MAX_SIDE = 128


def fits(n: int, m: int) -> bool:
    """Whether an ``n x m`` margin problem runs as the single fused kernel."""
    block_n = block_size(n, lo=MIN_DOT_BLOCK, hi=1 << 30)
    block_m = block_size(m, lo=MIN_DOT_BLOCK, hi=1 << 30)
    return max(block_n, block_m) <= MAX_SIDE and block_n * block_m <= fused.FUSED_MAX_ELEMENTS


def aplot_margin(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_emb: torch.Tensor,
    rejected_emb: torch.Tensor,
    alpha: float,
    temperature: float,
    norm_eps: float,
    eps: float,
    n_iters: int,
    scale: float,
    scaling: bool = False,
    similarity: str = "unit",
) -> torch.Tensor:
    """Detached APLOT margins ``scale * n * sum_j P_ij C_ij`` in one kernel (arguments already checked).

    Args:
        chosen_rewards: ``[n]``; rejected_rewards: ``[m]``.
        chosen_emb: ``[n, D]``; rejected_emb: ``[m, D]`` (float32, float16 or bfloat16; any strides).
        alpha, temperature, norm_eps, similarity: the APLOT cost's options.
        eps, n_iters: Sinkhorn's (fixed iterations, uniform weights).
        scale: the margin scale.
        scaling: run the Sinkhorn loop in the scaling domain (the ``"fused-scaling"``
            strategy's loop; on a fallback it recomputes the cost tile from the embeddings).

    Returns:
        ``[n]`` float32 margins. Requires ``fits(n, m)``.
    """
    n, d = chosen_emb.shape
    m = rejected_emb.shape[0]
    if not fits(n, m):
        raise ValueError(f"the fused margin kernel takes problems of up to {MAX_SIDE} x {MAX_SIDE}, got {n} x {m}")
    x, y = cost_kernels._dot_operands(chosen_emb, rejected_emb)
    ieee = cost_kernels._dot_in_float32(x)
    block_n = block_size(n, lo=MIN_DOT_BLOCK, hi=1 << 30)
    block_m = block_size(m, lo=MIN_DOT_BLOCK, hi=1 << 30)
    block_d = block_size(d, lo=MIN_DOT_BLOCK, hi=FP32_BLOCK_D if ieee else HALF_BLOCK_D)
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    hi, lo = common.split_reciprocal(eps)
    sim_weight, sim_offset = cost_reference.similarity_terms(float(alpha), similarity)
    _aplot_margin_kernel[(1,)](
        x,
        y,
        chosen_rewards,
        rejected_rewards,
        out,
        n,
        m,
        d,
        *x.stride(),
        *y.stride(),
        chosen_rewards.stride(0),
        rejected_rewards.stride(0),
        float(alpha),
        1.0 / float(temperature),
        sim_weight,
        sim_offset,
        float(norm_eps),
        float(eps),
        hi,
        lo,
        int(n_iters),
        1.0 / n,
        1.0 / m,
        float(scale) * n,
        IEEE_FP32=ieee,
        SCALING=scaling,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps_for(block_n * block_m, per_thread=fused.FUSED_ENTRIES_PER_THREAD),
        num_stages=cost_kernels.NUM_STAGES,
    )
    return out
