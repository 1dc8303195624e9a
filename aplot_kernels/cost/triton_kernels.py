"""Triton kernels for the cost matrices (batched; see :mod:`aplot_kernels.cost`).

One fused kernel per cost, after a small pass that computes the clamped row
norms (``max(||x||, eps)``, the ``torch.nn.functional.normalize`` rule) of
both inputs in fp32. A program owns a ``BLOCK_N x BLOCK_M`` tile of one
problem's ``[N, M]`` output and walks the embedding width ``D`` in
``BLOCK_D`` steps, accumulating the product ``x y^T`` (``tl.dot``: tensor
cores for fp16/bf16 with fp32 accumulation, exact fp32 FMA for float32, no
silent TF32). The epilogue divides by the norms and writes ``1 - S`` or the
APLOT combination. Output is float32.

The norms were first accumulated inside the product loop; on an H100 that
loop ran at a small fraction of the tensor cores' rate (a 512 x 512 x 4096
bf16 APLOT cost took about 1 ms), so they are now a separate pass and the
loop is a plain matrix product.

The backward passes are the reference's closed forms (this module defines no
``*_backward``), run by :mod:`aplot_kernels.cost` in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreter_on
from .._triton_utils import LOG2E_K, MIN_DOT_BLOCK, block_size, float32_out

# Tiles. Half-precision products run on the tensor cores (wgmma on sm_90): 128 x 128 output tiles
# with BLOCK_D = 64 once the grid has enough tiles to fill the GPU, 64 x 64 below that (a 512 x 512
# cost has 64 of them). Exact float32 products use FMA: 64 x 64 x 32 with 8 warps (146 registers
# on sm_90, no spill). The row norms are one pass before the product (see _row_norms), so the main
# loop is a plain matrix product the compiler can pipeline.
HALF_TILES = dict(small=(64, 64, 64, 4), large=(128, 128, 64, 8))  # BLOCK_N, BLOCK_M, BLOCK_D, warps
FP32_TILE = (64, 64, 32, 8)
LARGE_TILE_MIN_PROGRAMS = 256  # about two waves of 128 x 128 tiles on an H100's 132 SMs
NUM_STAGES = 3


@triton.jit
def _similarity_tile(
    x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, pid_b, rows, cols, N, M, D,
    stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
    IEEE_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``S`` for one tile: ``<x_i, y_j> / (|x_i|_eps |y_j|_eps)``, ``[BLOCK_N, BLOCK_M]`` fp32.

    ``x_norm_ptr``/``y_norm_ptr``: the clamped row norms, ``[B, N]``/``[B, M]`` contiguous fp32.
    """
    row_ok = rows < N
    col_ok = cols < M
    x_base = x_ptr + pid_b * stride_xb + rows[:, None] * stride_xn
    y_base = y_ptr + pid_b * stride_yb + cols[:, None] * stride_ym
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        x = tl.load(x_base + ds[None, :] * stride_xd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(y_base + ds[None, :] * stride_yd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(y), acc)
    x_norm = tl.load(x_norm_ptr + pid_b * N + rows, mask=row_ok, other=1.0)
    y_norm = tl.load(y_norm_ptr + pid_b * M + cols, mask=col_ok, other=1.0)
    # Divide twice (not by the product) so that tiny norms cannot underflow the denominator.
    return (acc / x_norm[:, None]) / y_norm[None, :]


@triton.jit
def _row_norms_kernel(
    x_ptr, out_ptr, R, N, D, stride_xb, stride_xn, stride_xd, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``max(|x_r|, eps)`` for ``BLOCK_R`` of the ``R = B * N`` rows, accumulated in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = x_ptr + (rows // N) * stride_xb + (rows % N) * stride_xn
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base[:, None] + ds[None, :] * stride_xd, mask=row_ok[:, None] & (ds < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, tl.maximum(tl.sqrt_rn(sq), eps), mask=row_ok)


def _row_norms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clamped row norms ``max(|x_i|, eps)`` of ``x [B, N, D]``: ``[B, N]`` float32."""
    batch, n, d = x.shape
    out = torch.empty(batch, n, dtype=torch.float32, device=x.device)
    block_r, block_d = 16, block_size(d, lo=16, hi=256)
    _row_norms_kernel[(triton.cdiv(batch * n, block_r),)](
        x, out, batch * n, n, d, *x.stride(), float(eps), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out


@triton.jit
def _cosine_cost_kernel(
    x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, out_ptr, N, M, D,
    stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
    stride_ob, stride_on, stride_om,
    IEEE_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    s = _similarity_tile(
        x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, pid_b, rows, cols, N, M, D,
        stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
        IEEE_FP32, BLOCK_N, BLOCK_M, BLOCK_D,
    )
    out = out_ptr + pid_b * stride_ob + rows[:, None] * stride_on + cols[None, :] * stride_om
    tl.store(out, 1.0 - s, mask=(rows < N)[:, None] & (cols < M)[None, :])


@triton.jit
def _aplot_cost_kernel(
    x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, rx_ptr, ry_ptr, out_ptr, N, M, D,
    stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
    stride_rxb, stride_rxn, stride_ryb, stride_rym,
    stride_ob, stride_on, stride_om,
    alpha, inv_temperature,
    IEEE_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < M
    s = _similarity_tile(
        x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, pid_b, rows, cols, N, M, D,
        stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
        IEEE_FP32, BLOCK_N, BLOCK_M, BLOCK_D,
    )
    rx = tl.load(rx_ptr + pid_b * stride_rxb + rows * stride_rxn, mask=row_ok, other=0.0).to(tl.float32)
    ry = tl.load(ry_ptr + pid_b * stride_ryb + cols * stride_rym, mask=col_ok, other=0.0).to(tl.float32)
    gap = tl.abs(rx[:, None] - ry[None, :]) * inv_temperature
    # 1 - sigmoid(|delta| / T) = sigmoid(-|delta| / T) = e / (1 + e) with e = exp(-|delta| / T) in (0, 1]:
    # no overflow, and a huge gap underflows to exactly 0.
    e = tl.math.exp2(-gap * LOG2E_K)
    reward_term = e / (1.0 + e)
    cost = alpha * reward_term + (1.0 - alpha) * 0.5 * (1.0 + s)
    out = out_ptr + pid_b * stride_ob + rows[:, None] * stride_on + cols[None, :] * stride_om
    tl.store(out, cost, mask=row_ok[:, None] & col_ok[None, :])


def _dot_operands(x: torch.Tensor, y: torch.Tensor):
    """Both embeddings in one dtype ``tl.dot`` accepts: their own if they agree, else float32."""
    if x.dtype == y.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return x, y
    return x.float(), y.float()


def _dot_in_float32(x: torch.Tensor) -> bool:
    """Whether ``tl.dot`` runs on float32 operands (exact IEEE products, no TF32).

    True for float32 inputs; also for bfloat16 under the Triton interpreter,
    whose bfloat16 ``tl.dot`` returns garbage (triton 3.9): widening bfloat16
    to float32 is exact, so this changes no result.
    """
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and triton_interpreter_on())


def _tile(x: torch.Tensor, batch: int, n: int, m: int):
    """``(BLOCK_N, BLOCK_M, BLOCK_D, num_warps)`` for the product of ``x``'s dtype."""
    if _dot_in_float32(x):
        return FP32_TILE
    large = HALF_TILES["large"]
    programs = batch * triton.cdiv(n, large[0]) * triton.cdiv(m, large[1])
    return large if programs >= LARGE_TILE_MIN_PROGRAMS else HALF_TILES["small"]


def _launch(kernel, x, y, extra_args, extra_strides, scalars, eps, out_dtype):
    x, y = _dot_operands(x, y)
    batch, n, d = x.shape
    m = y.shape[1]
    x_norm, y_norm = _row_norms(x, eps), _row_norms(y, eps)
    out = torch.empty(batch, n, m, dtype=out_dtype, device=x.device)
    tile_n, tile_m, tile_d, warps = _tile(x, batch, n, m)
    block_n = block_size(n, lo=MIN_DOT_BLOCK, hi=tile_n)
    block_m = block_size(m, lo=MIN_DOT_BLOCK, hi=tile_m)
    block_d = block_size(d, lo=MIN_DOT_BLOCK, hi=tile_d)
    grid = (batch, triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    kernel[grid](
        x, y, x_norm, y_norm, *extra_args, out, n, m, d,
        *x.stride(), *y.stride(), *extra_strides, *out.stride(),
        *scalars,
        IEEE_FP32=_dot_in_float32(x), BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=warps, num_stages=NUM_STAGES,
    )
    return out


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 - S``: ``x [B, N, D]``, ``y [B, M, D]`` -> ``[B, N, M]`` (float32 for half inputs)."""
    return _launch(_cosine_cost_kernel, x, y, (), (), (), eps, float32_out(x, y))


def aplot_cost(
    chosen_emb: torch.Tensor,
    rejected_emb: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    alpha: float,
    temperature: float,
    eps: float,
) -> torch.Tensor:
    """APLOT cost ``[B, N, M]`` from embeddings ``[B, N, D]``, ``[B, M, D]`` and rewards ``[B, N]``, ``[B, M]``."""
    out_dtype = float32_out(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
    return _launch(
        _aplot_cost_kernel, chosen_emb, rejected_emb,
        (chosen_rewards, rejected_rewards), (*chosen_rewards.stride(), *rejected_rewards.stride()),
        (float(alpha), 1.0 / float(temperature)), eps, out_dtype,
    )
