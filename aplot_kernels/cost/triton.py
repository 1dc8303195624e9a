"""Triton kernels for the cost matrices (batched; see :mod:`aplot_kernels.cost`).

One fused kernel per cost, after a small pass (one launch) that computes, for
every row of both inputs in fp32, a power of two ``sigma`` with
``max |sigma x| ~ 1`` and the clamped norm of the scaled row,
``sigma max(||x||, eps)`` (the ``torch.nn.functional.normalize`` rule). Every
product and norm runs on ``sigma x``: scaling by a power of two is exact, so
the numbers are those of the unscaled rows wherever those do not overflow
(finite entries near 1e19 would overflow a float32 squared norm or product),
and stay finite where they would. float16 rows cannot overflow float32 sums
and keep ``sigma = 1`` (scaling them could push small entries into float16's
subnormals). A program owns a ``BLOCK_N x BLOCK_M`` tile of one
problem's ``[N, M]`` output and walks the embedding width ``D`` in
``BLOCK_D`` steps, accumulating the product ``x y^T`` (``tl.dot``: tensor
cores for fp16/bf16 with fp32 accumulation, exact fp32 FMA for float32, no
silent TF32). The epilogue divides by the norms and writes ``1 - S`` or the
APLOT combination. Output is float32.

The row pass is separate so that the product loop stays a plain matrix
product (row scaling aside) that the compiler can pipeline.

The backward passes (``cosine_cost_backward``, ``aplot_cost_backward``) are
in :mod:`aplot_kernels.cost.triton_backward`, re-exported here.

Launches go through ``torch.library.wrap_triton``, so ``torch.compile`` traces the ops of
:mod:`aplot_kernels._triton_ops`; host code reads shapes, dtypes and strides, never values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..backends import triton_interpreter_on
from .._precision import float32_or_wider
from ..triton_utils import LOG2E_K, MIN_DOT_BLOCK, block_size, cdiv
from . import reference

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
def _product_tile(
    x_base,
    y_base,
    x_scale,
    y_scale,
    row_ok,
    col_ok,
    D,
    stride_xd,
    stride_yd,
    IEEE_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(x_scale x) (y_scale y)^T`` for one tile, ``[BLOCK_N, BLOCK_M]`` fp32.

    ``x_base [BLOCK_N, 1]``, ``y_base [BLOCK_M, 1]``: pointers to the first
    element of each row; rows outside ``row_ok``/``col_ok`` read as zeros.
    ``x_scale [BLOCK_N]``, ``y_scale [BLOCK_M]``: the rows' powers of two from
    ``_clamped_row_norms`` (x and y share a dtype; float16 rows are not scaled).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        x = tl.load(x_base + ds[None, :] * stride_xd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(y_base + ds[None, :] * stride_yd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if x.dtype != tl.float16:  # exact (powers of two), in the operands' dtype
            x = (x.to(tl.float32) * x_scale[:, None]).to(x.dtype)
            y = (y.to(tl.float32) * y_scale[:, None]).to(y.dtype)
        if IEEE_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(y), acc)
    return acc


@triton.jit
def _normalized(product, x_norm, y_norm):
    """``S_ij = <x_i, y_j> / (|x_i|_eps |y_j|_eps)`` from the product tile and the clamped norms."""
    # Divide twice (not by the product) so that tiny norms cannot underflow the denominator.
    return (product / x_norm[:, None]) / y_norm[None, :]


@triton.jit
def _aplot_combine(s, rx, ry, alpha, inv_temperature, sim_weight, sim_offset):
    """The APLOT cost from the similarity tile ``s`` and the rewards ``rx [BLOCK_N]``, ``ry [BLOCK_M]`` (fp32).

    ``(1 - alpha) * sim = sim_weight * (sim_offset + s)`` (see ``reference.similarity_terms``).
    """
    gap = tl.abs(rx[:, None] - ry[None, :]) * inv_temperature
    # 1 - sigmoid(|delta| / T) = sigmoid(-|delta| / T) = e / (1 + e) with e = exp(-|delta| / T) in (0, 1]:
    # no overflow, and a huge gap underflows to exactly 0.
    e = tl.math.exp2(-gap * LOG2E_K)
    reward_term = e / (1.0 + e)
    return alpha * reward_term + sim_weight * (sim_offset + s)


@triton.jit
def _similarity_tile(
    x_ptr,
    y_ptr,
    x_norm_ptr,
    y_norm_ptr,
    pid_b,
    rows,
    cols,
    N,
    M,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_yb,
    stride_ym,
    stride_yd,
    IEEE_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``S`` for one tile: ``<x_i, y_j> / (|x_i|_eps |y_j|_eps)``, ``[BLOCK_N, BLOCK_M]`` fp32.

    ``x_norm_ptr``/``y_norm_ptr``: the rows' ``(sigma, sigma |x|_eps)`` from ``_row_norms``
    (``[B, N, 2]``/``[B, M, 2]`` contiguous fp32).
    """
    row_ok = rows < N
    col_ok = cols < M
    x_base = x_ptr + pid_b * stride_xb + rows[:, None] * stride_xn
    y_base = y_ptr + pid_b * stride_yb + cols[:, None] * stride_ym
    x_scale, x_norm = _load_row_norms(x_norm_ptr, pid_b * N + rows, row_ok)
    y_scale, y_norm = _load_row_norms(y_norm_ptr, pid_b * M + cols, col_ok)
    acc = _product_tile(
        x_base,
        y_base,
        x_scale,
        y_scale,
        row_ok,
        col_ok,
        D,
        stride_xd,
        stride_yd,
        IEEE_FP32,
        BLOCK_N,
        BLOCK_M,
        BLOCK_D,
    )
    return _normalized(acc, x_norm, y_norm)


@triton.jit
def _load_row_norms(ptr, index, ok):
    """``(sigma, sigma |x|_eps)`` of rows ``index`` from a ``[R, 2]`` buffer of ``_row_norms`` (1 where not ``ok``)."""
    scale = tl.load(ptr + 2 * index, mask=ok, other=1.0)
    norm = tl.load(ptr + 2 * index + 1, mask=ok, other=1.0)
    return scale, norm


@triton.jit
def _pow2_scale(peak):
    """A power of two ``sigma`` with ``sigma * peak`` in ``[1, 4)`` (``peak >= 0`` fp32), kept normal:
    ``2**127`` for zero or subnormal peaks, ``2**-126`` at the top of the range."""
    biased = (peak.to(tl.int32, bitcast=True) >> 23) & 0xFF  # peak = 1.f * 2**(biased - 127)
    return (tl.maximum(254 - biased, 1) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _clamped_row_norms(base, row_ok, D, stride_d, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(sigma, sigma max(|x_r|, eps))`` of ``BLOCK_R`` rows (``base [BLOCK_R]``: their first elements), fp32.

    ``sigma`` is a power of two with ``max |sigma x_r| ~ 1`` (1 for float16 rows), so the
    sum of squares of ``sigma x_r`` neither overflows nor underflows; being exact, the scaling
    changes no bit where the unscaled sum would not have.
    """
    scale = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
    if base.dtype.element_ty != tl.float16:
        peak = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(base[:, None] + ds[None, :] * stride_d, mask=row_ok[:, None] & (ds < D)[None, :], other=0.0)
            peak = tl.maximum(peak, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        scale = _pow2_scale(peak)
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base[:, None] + ds[None, :] * stride_d, mask=row_ok[:, None] & (ds < D)[None, :], other=0.0)
        x = x.to(tl.float32) * scale[:, None]
        sq += tl.sum(x * x, axis=1)
    # eps * sigma is exact; it overflows only for rows far below eps, whose x_hat then reads 0 (truly < 2**-126).
    return scale, tl.maximum(tl.sqrt_rn(sq), eps * scale)


@triton.jit
def _row_norms_block(
    x_ptr, out_ptr, block, R, N, D, stride_xb, stride_xn, stride_xd, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    """``(sigma, sigma max(|x_r|, eps))`` for rows ``block * BLOCK_R ..`` of the ``R = B * N`` rows of ``x``,
    into ``out [R, 2]``."""
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = x_ptr + (rows // N) * stride_xb + (rows % N) * stride_xn
    scale, norm = _clamped_row_norms(base, row_ok, D, stride_xd, eps, BLOCK_R, BLOCK_D)
    tl.store(out_ptr + 2 * rows, scale, mask=row_ok)
    tl.store(out_ptr + 2 * rows + 1, norm, mask=row_ok)


@triton.jit
def _row_norms_kernel(
    x_ptr,
    y_ptr,
    x_out_ptr,
    y_out_ptr,
    RX,
    NX,
    RY,
    NY,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_yb,
    stride_yn,
    stride_yd,
    eps,
    X_BLOCKS,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row scales and scaled clamped norms of ``x`` (the first ``X_BLOCKS`` programs) and of ``y`` (the others)."""
    pid = tl.program_id(0)
    if pid < X_BLOCKS:
        _row_norms_block(x_ptr, x_out_ptr, pid, RX, NX, D, stride_xb, stride_xn, stride_xd, eps, BLOCK_R, BLOCK_D)
    else:
        _row_norms_block(y_ptr, y_out_ptr, pid - X_BLOCKS, RY, NY, D, stride_yb, stride_yn, stride_yd, eps, BLOCK_R, BLOCK_D)


ROW_NORMS_BLOCK_R = 16


def _row_norms(x: torch.Tensor, y: torch.Tensor, eps: float):
    """Row scales and scaled clamped norms of ``x [B, N, D]`` and ``y [B, M, D]``: ``([B, N, 2], [B, M, 2])``
    float32 (``[..., 0]``: the powers of two ``sigma``, ``[..., 1]``: ``sigma max(|x_i|, eps)``), in one launch
    (at training sizes a launch costs more than the pass)."""
    batch, n, d = x.shape
    m = y.shape[1]
    # Two buffers, not views of one: a traced launch (wrap_triton) then writes two whole tensors.
    x_norm = torch.empty(batch, n, 2, dtype=torch.float32, device=x.device)
    y_norm = torch.empty(batch, m, 2, dtype=torch.float32, device=x.device)
    block_r, block_d = ROW_NORMS_BLOCK_R, block_size(d, lo=16, hi=256)
    x_blocks = cdiv(batch * n, block_r)
    wrap_triton(_row_norms_kernel)[(x_blocks + cdiv(batch * m, block_r),)](
        x,
        y,
        x_norm,
        y_norm,
        batch * n,
        n,
        batch * m,
        m,
        d,
        *x.stride(),
        *y.stride(),
        float(eps),
        x_blocks,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return x_norm, y_norm


@triton.jit
def _cosine_cost_kernel(
    x_ptr,
    y_ptr,
    x_norm_ptr,
    y_norm_ptr,
    out_ptr,
    N,
    M,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_yb,
    stride_ym,
    stride_yd,
    stride_ob,
    stride_on,
    stride_om,
    IEEE_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    s = _similarity_tile(
        x_ptr,
        y_ptr,
        x_norm_ptr,
        y_norm_ptr,
        pid_b,
        rows,
        cols,
        N,
        M,
        D,
        stride_xb,
        stride_xn,
        stride_xd,
        stride_yb,
        stride_ym,
        stride_yd,
        IEEE_FP32,
        BLOCK_N,
        BLOCK_M,
        BLOCK_D,
    )
    out = out_ptr + pid_b * stride_ob + rows[:, None] * stride_on + cols[None, :] * stride_om
    tl.store(out, 1.0 - s, mask=(rows < N)[:, None] & (cols < M)[None, :])


@triton.jit
def _aplot_cost_kernel(
    x_ptr,
    y_ptr,
    x_norm_ptr,
    y_norm_ptr,
    rx_ptr,
    ry_ptr,
    out_ptr,
    N,
    M,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_yb,
    stride_ym,
    stride_yd,
    stride_rxb,
    stride_rxn,
    stride_ryb,
    stride_rym,
    stride_ob,
    stride_on,
    stride_om,
    alpha,
    inv_temperature,
    sim_weight,
    sim_offset,
    IEEE_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < M
    s = _similarity_tile(
        x_ptr,
        y_ptr,
        x_norm_ptr,
        y_norm_ptr,
        pid_b,
        rows,
        cols,
        N,
        M,
        D,
        stride_xb,
        stride_xn,
        stride_xd,
        stride_yb,
        stride_ym,
        stride_yd,
        IEEE_FP32,
        BLOCK_N,
        BLOCK_M,
        BLOCK_D,
    )
    rx = tl.load(rx_ptr + pid_b * stride_rxb + rows * stride_rxn, mask=row_ok, other=0.0).to(tl.float32)
    ry = tl.load(ry_ptr + pid_b * stride_ryb + cols * stride_rym, mask=col_ok, other=0.0).to(tl.float32)
    cost = _aplot_combine(s, rx, ry, alpha, inv_temperature, sim_weight, sim_offset)
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
    programs = batch * cdiv(n, large[0]) * cdiv(m, large[1])
    return large if programs >= LARGE_TILE_MIN_PROGRAMS else HALF_TILES["small"]


def _launch(kernel, x, y, extra_args, extra_strides, scalars, eps, out_dtype):
    """The row pass, then ``kernel`` (``_cosine_cost_kernel`` or ``_aplot_cost_kernel``) into a new ``[B, N, M]``."""
    x, y = _dot_operands(x, y)
    batch, n, d = x.shape
    m = y.shape[1]
    x_norm, y_norm = _row_norms(x, y, eps)
    out = torch.empty(batch, n, m, dtype=out_dtype, device=x.device)
    tile_n, tile_m, tile_d, warps = _tile(x, batch, n, m)
    block_n = block_size(n, lo=MIN_DOT_BLOCK, hi=tile_n)
    block_m = block_size(m, lo=MIN_DOT_BLOCK, hi=tile_m)
    block_d = block_size(d, lo=MIN_DOT_BLOCK, hi=tile_d)
    grid = (batch, cdiv(n, block_n), cdiv(m, block_m))
    wrap_triton(kernel)[grid](
        x,
        y,
        x_norm,
        y_norm,
        *extra_args,
        out,
        n,
        m,
        d,
        *x.stride(),
        *y.stride(),
        *extra_strides,
        *out.stride(),
        *scalars,
        IEEE_FP32=_dot_in_float32(x),
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=warps,
        num_stages=NUM_STAGES,
    )
    return out


def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 - S``: ``x [B, N, D]``, ``y [B, M, D]`` -> ``[B, N, M]`` (float32 for half inputs)."""
    return _launch(_cosine_cost_kernel, x, y, (), (), (), eps, float32_or_wider(x, y))


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
    """APLOT cost ``[B, N, M]`` from embeddings ``[B, N, D]``, ``[B, M, D]`` and rewards ``[B, N]``, ``[B, M]``."""
    out_dtype = float32_or_wider(chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
    sim_weight, sim_offset = reference.similarity_terms(float(alpha), similarity)
    return _launch(
        _aplot_cost_kernel,
        chosen_emb,
        rejected_emb,
        (chosen_rewards, rejected_rewards),
        (*chosen_rewards.stride(), *rejected_rewards.stride()),
        (float(alpha), 1.0 / float(temperature), sim_weight, sim_offset),
        eps,
        out_dtype,
    )


# The backward passes live in triton_backward (which uses this module's row pass); their names are
# read through this module, as the dispatch and the tests do, and load it on first use.
_BACKWARD_NAMES = (
    "cosine_cost_backward",
    "aplot_cost_backward",
    "_grad_product_kernel",
    "_normalize_backward_kernel",
    "BACKWARD_TILE",
    "JACOBIAN_TILE",
)


def __getattr__(name: str):
    if name in _BACKWARD_NAMES:
        from . import triton_backward

        return getattr(triton_backward, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
