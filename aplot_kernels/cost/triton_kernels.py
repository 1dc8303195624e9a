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

The norms were first accumulated inside the product loop; on an H100 that
loop ran at a small fraction of the tensor cores' rate (a 512 x 512 x 4096
bf16 APLOT cost took about 1 ms), so they are now a separate pass and the
loop is a plain matrix product.

The backward passes (``cosine_cost_backward``, ``aplot_cost_backward``) take
the same row norms, then one tiled product kernel launched twice: ``G @ y_hat``
and, with ``G``'s strides swapped, ``G^T @ x_hat`` (``G`` the incoming
``[B, N, M]`` gradient; each loaded tile of ``y`` is divided by its norms, so
``y_hat`` is never stored). Its programs that own the first ``D`` tile also
reduce ``G`` times the reward term's derivative over the same loop, which
gives the APLOT reward gradients. A row pass then applies the normalisation's
Jacobian in place. Products are exact float32 (``G`` is float32 and would
lose about three digits in half precision), so the backward runs on FMA, not
tensor cores, for every input dtype. Gradients are float32 for float32 and
half inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import kernel_entry, triton_interpreter_on
from .._precision import float32_or_wider
from .._triton_utils import LOG2E_K, MIN_DOT_BLOCK, block_size, cdiv
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
# Backward product G @ y_hat: a 64 x 64 float32 output tile (rows x embedding columns) walking the
# reduced side of G in steps of 32, the shape of FP32_TILE (exact float32 FMA, no TF32).
BACKWARD_TILE = (64, 32, 64, 8)  # BLOCK_N (output rows), BLOCK_M (reduced), BLOCK_D, warps
# Backward row pass (normalisation Jacobian): rows per program, widest D step, warps; as _row_norms.
JACOBIAN_TILE = (16, 256, 4)


@triton.jit
def _product_tile(
    x_base, y_base, x_scale, y_scale, row_ok, col_ok, D, stride_xd, stride_yd,
    IEEE_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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
    x_ptr, y_ptr, x_norm_ptr, y_norm_ptr, pid_b, rows, cols, N, M, D,
    stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
    IEEE_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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
        x_base, y_base, x_scale, y_scale, row_ok, col_ok, D, stride_xd, stride_yd, IEEE_FP32,
        BLOCK_N, BLOCK_M, BLOCK_D,
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
def _row_norms_block(x_ptr, out_ptr, block, R, N, D, stride_xb, stride_xn, stride_xd, eps,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
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
    x_ptr, y_ptr, x_out_ptr, y_out_ptr, RX, NX, RY, NY, D,
    stride_xb, stride_xn, stride_xd, stride_yb, stride_yn, stride_yd, eps, X_BLOCKS,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row scales and scaled clamped norms of ``x`` (the first ``X_BLOCKS`` programs) and of ``y`` (the others)."""
    pid = tl.program_id(0)
    if pid < X_BLOCKS:
        _row_norms_block(x_ptr, x_out_ptr, pid, RX, NX, D, stride_xb, stride_xn, stride_xd, eps, BLOCK_R, BLOCK_D)
    else:
        _row_norms_block(y_ptr, y_out_ptr, pid - X_BLOCKS, RY, NY, D, stride_yb, stride_yn, stride_yd, eps,
                         BLOCK_R, BLOCK_D)


ROW_NORMS_BLOCK_R = 16


def _row_norms(x: torch.Tensor, y: torch.Tensor, eps: float):
    """Row scales and scaled clamped norms of ``x [B, N, D]`` and ``y [B, M, D]``: ``([B, N, 2], [B, M, 2])``
    float32 (``[..., 0]``: the powers of two ``sigma``, ``[..., 1]``: ``sigma max(|x_i|, eps)``), in one launch
    (at training sizes a launch costs more than the pass)."""
    batch, n, d = x.shape
    m = y.shape[1]
    out = torch.empty(2 * batch * (n + m), dtype=torch.float32, device=x.device)
    x_norm, y_norm = out[:2 * batch * n].view(batch, n, 2), out[2 * batch * n:].view(batch, m, 2)
    block_r, block_d = ROW_NORMS_BLOCK_R, block_size(d, lo=16, hi=256)
    x_blocks = cdiv(batch * n, block_r)
    _row_norms_kernel[(x_blocks + cdiv(batch * m, block_r),)](
        x, y, x_norm, y_norm, batch * n, n, batch * m, m, d, *x.stride(), *y.stride(), float(eps), x_blocks,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return x_norm, y_norm


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
    alpha, inv_temperature, sim_weight, sim_offset,
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
    kernel[grid](
        x, y, x_norm, y_norm, *extra_args, out, n, m, d,
        *x.stride(), *y.stride(), *extra_strides, *out.stride(),
        *scalars,
        IEEE_FP32=_dot_in_float32(x), BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=warps, num_stages=NUM_STAGES,
    )
    return out


@kernel_entry
def cosine_cost(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 - S``: ``x [B, N, D]``, ``y [B, M, D]`` -> ``[B, N, M]`` (float32 for half inputs)."""
    return _launch(_cosine_cost_kernel, x, y, (), (), (), eps, float32_or_wider(x, y))


@kernel_entry
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
        _aplot_cost_kernel, chosen_emb, rejected_emb,
        (chosen_rewards, rejected_rewards), (*chosen_rewards.stride(), *rejected_rewards.stride()),
        (float(alpha), 1.0 / float(temperature), sim_weight, sim_offset), eps, out_dtype,
    )


# ---------------------------------------------------------------------------
# Backward passes: the closed forms of :mod:`aplot_kernels.cost.reference`.
# ---------------------------------------------------------------------------


@triton.jit
def _grad_product_kernel(
    g_ptr, y_ptr, y_norm_ptr, rx_ptr, ry_ptr, p_ptr, grad_rx_ptr, N, M, D,
    stride_gb, stride_gn, stride_gm, stride_yb, stride_ym, stride_yd,
    stride_rxb, stride_rxn, stride_ryb, stride_rym,
    stride_pb, stride_pn, stride_pd,
    reward_scale, inv_temperature,
    REWARDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``P = G @ y_hat`` for one ``BLOCK_N x BLOCK_D`` tile of ``P [B, N, D]`` (fp32).

    ``G [B, N, M]`` (any strides), ``y [B, M, D]``, ``y_norm`` its rows'
    ``(sigma, sigma |y|_eps)`` ``[B, M, 2]`` contiguous fp32 (``y_hat = (sigma y) / (sigma |y|_eps)``). With ``REWARDS``, the programs of the
    first ``D`` tile also write ``grad_rx [B, N]`` (contiguous):
    ``reward_scale * sum_j G[i, j] sign(rx_i - ry_j) s (1 - s)`` with
    ``s = sigmoid(-|rx_i - ry_j| / T)``, the derivative of the reward term with
    respect to ``rx_i`` up to the factor ``reward_scale = -alpha / T``. Launched
    with ``G``'s strides swapped and the inputs exchanged, the same kernel gives
    ``G^T @ x_hat`` and the gradient of ``ry`` (``sign(ry_j - rx_i)`` carries
    the ``-1`` of ``d delta / d ry``).
    """
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = ds < D
    g_base = g_ptr + pid_b * stride_gb + rows[:, None] * stride_gn
    y_base = y_ptr + pid_b * stride_yb + ds[None, :] * stride_yd
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if REWARDS:
        rx = tl.load(rx_ptr + pid_b * stride_rxb + rows * stride_rxn, mask=row_ok, other=0.0).to(tl.float32)
        grad_rx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        # Masked entries of G are 0, so padding adds nothing to either product.
        g = tl.load(g_base + cols[None, :] * stride_gm, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        y = tl.load(y_base + cols[:, None] * stride_ym, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        y_scale, y_norm = _load_row_norms(y_norm_ptr, pid_b * M + cols, col_ok)
        acc = tl.dot(g, (y.to(tl.float32) * y_scale[:, None]) / y_norm[:, None], acc, input_precision="ieee")
        if REWARDS:
            if pid_d == 0:  # one program per row block reduces the rewards' part of G
                ry = tl.load(ry_ptr + pid_b * stride_ryb + cols * stride_rym, mask=col_ok, other=0.0).to(tl.float32)
                delta = rx[:, None] - ry[None, :]
                # s (1 - s) = e / (1 + e)^2 with e = exp(-|delta| / T) in (0, 1]: no overflow.
                e = tl.math.exp2(-tl.abs(delta) * inv_temperature * LOG2E_K)
                one_e = 1.0 + e
                sign = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0))  # torch.sign: 0 at a tie
                grad_rx += tl.sum(g * sign * (e / (one_e * one_e)), axis=1)
    p = p_ptr + pid_b * stride_pb + rows[:, None] * stride_pn + ds[None, :] * stride_pd
    tl.store(p, acc, mask=row_ok[:, None] & d_ok[None, :])
    if REWARDS:
        if pid_d == 0:
            tl.store(grad_rx_ptr + pid_b * N + rows, grad_rx * reward_scale, mask=row_ok)


@triton.jit
def _normalize_backward_kernel(
    x_ptr, x_norm_ptr, p_ptr, R, N, D, stride_xb, stride_xn, stride_xd, stride_pb, stride_pn, stride_pd,
    scale, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """In place on ``P [B, N, D]`` (``dL/dx_hat`` up to ``scale``), for ``BLOCK_R`` of the ``R = B * N`` rows:
    ``scale * (p - x_hat <x_hat, p>) / |x|_eps`` where ``|x| > eps``, else ``scale * p / eps``.

    ``x_norm``: the rows' ``(sigma, sigma |x|_eps)`` ``[B, N, 2]`` contiguous fp32, from ``_row_norms``
    with the same ``eps``; ``1 / |x|_eps`` is taken as ``sigma / (sigma |x|_eps)`` (no overflow).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    x_base = x_ptr + (rows // N) * stride_xb + (rows % N) * stride_xn
    p_base = p_ptr + (rows // N) * stride_pb + (rows % N) * stride_pn
    sigma, norm = _load_row_norms(x_norm_ptr, rows, row_ok)
    # The row dot needs all of D before any output, so the row is read twice.
    radial = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (ds < D)[None, :]
        x = tl.load(x_base[:, None] + ds[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_base[:, None] + ds[None, :] * stride_pd, mask=mask, other=0.0)
        radial += tl.sum(((x * sigma[:, None]) / norm[:, None]) * p, axis=1)
    # Above eps the norm divides (project out the radial part); at the clamp eps is a constant.
    # The norms were clamped in fp32 at sigma * eps (exact), so "clamped > sigma * eps" is "|x| > eps".
    radial = tl.where(norm > eps * sigma, radial, 0.0)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (ds < D)[None, :]
        x = tl.load(x_base[:, None] + ds[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_base[:, None] + ds[None, :] * stride_pd, mask=mask, other=0.0)
        grad = ((p - ((x * sigma[:, None]) / norm[:, None]) * radial[:, None]) / norm[:, None]) * sigma[:, None]
        tl.store(p_base[:, None] + ds[None, :] * stride_pd, grad * scale, mask=mask)


def _grad_product(g, g_strides, y, y_norm, rx, ry, out, grad_rx, n, m, inv_temperature, reward_scale):
    """Launch ``_grad_product_kernel``: ``out [B, n, D] = G @ y_hat``, ``G`` read from ``g`` as ``[B, n, m]`` through ``g_strides``."""
    batch, _, d = y.shape
    tile_n, tile_m, tile_d, warps = BACKWARD_TILE
    block_n = block_size(n, lo=MIN_DOT_BLOCK, hi=tile_n)
    block_m = block_size(m, lo=MIN_DOT_BLOCK, hi=tile_m)
    block_d = block_size(d, lo=MIN_DOT_BLOCK, hi=tile_d)
    rewards = rx is not None
    if not rewards:  # unused pointers and strides
        rx, ry, grad_rx = out, out, out
    grid = (batch, cdiv(n, block_n), cdiv(d, block_d))
    _grad_product_kernel[grid](
        g, y, y_norm, rx, ry, out, grad_rx, n, m, d,
        *g_strides, *y.stride(),
        *(rx.stride() if rewards else (0, 0)), *(ry.stride() if rewards else (0, 0)),
        *out.stride(),
        float(reward_scale), float(inv_temperature),
        REWARDS=rewards, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=warps, num_stages=NUM_STAGES,
    )


def _normalize_backward(x, x_norm, p, scale, eps):
    """Launch ``_normalize_backward_kernel`` on ``p`` (in place) for the rows of ``x [B, N, D]``."""
    batch, n, d = x.shape
    block_r, max_block_d, warps = JACOBIAN_TILE
    block_d = block_size(d, lo=16, hi=max_block_d)
    _normalize_backward_kernel[(cdiv(batch * n, block_r),)](
        x, x_norm, p, batch * n, n, d, *x.stride(), *p.stride(), float(scale), float(eps),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )


def _embedding_grads(grad_cost, x, y, rx, ry, scale, inv_temperature, reward_scale, eps, out_dtype):
    """Gradients of ``scale * S`` (and of the reward term when ``rx``/``ry`` are given) for ``dL/dC = grad_cost``.

    Returns ``(grad_x [B, N, D], grad_y [B, M, D], grad_rx [B, N] or None, grad_ry [B, M] or None)``.
    """
    batch, n, d = x.shape
    m = y.shape[1]
    x_norm, y_norm = _row_norms(x, y, eps)
    grad_x = torch.empty(batch, n, d, dtype=out_dtype, device=x.device)
    grad_y = torch.empty(batch, m, d, dtype=out_dtype, device=x.device)
    rewards = rx is not None
    grad_rx = torch.empty(batch, n, dtype=out_dtype, device=x.device) if rewards else None
    grad_ry = torch.empty(batch, m, dtype=out_dtype, device=x.device) if rewards else None
    sb, sn, sm = grad_cost.stride()
    _grad_product(grad_cost, (sb, sn, sm), y, y_norm, rx, ry, grad_x, grad_rx, n, m, inv_temperature, reward_scale)
    # G^T @ x_hat: the same kernel on G with its row and column strides exchanged.
    _grad_product(grad_cost, (sb, sm, sn), x, x_norm, ry, rx, grad_y, grad_ry, m, n, inv_temperature, reward_scale)
    _normalize_backward(x, x_norm, grad_x, scale, eps)
    _normalize_backward(y, y_norm, grad_y, scale, eps)
    return grad_x, grad_y, grad_rx, grad_ry


@kernel_entry
def cosine_cost_backward(grad_cost: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float):
    """``(grad_x [B, N, D], grad_y [B, M, D])`` of :func:`cosine_cost` for ``grad_cost [B, N, M]`` (float32 for half inputs)."""
    out_dtype = float32_or_wider(grad_cost, x, y)
    grad_x, grad_y, _, _ = _embedding_grads(grad_cost, x, y, None, None, -1.0, 1.0, 0.0, eps, out_dtype)
    return grad_x, grad_y


@kernel_entry
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
    """Gradients ``(d_chosen_emb [B, N, D], d_rejected_emb [B, M, D], d_chosen_rewards [B, N], d_rejected_rewards [B, M])``
    of :func:`aplot_cost` for ``grad_cost [B, N, M]`` (float32 for half inputs)."""
    out_dtype = float32_or_wider(grad_cost, chosen_emb, rejected_emb, chosen_rewards, rejected_rewards)
    sim_weight, _ = reference.similarity_terms(float(alpha), similarity)
    return _embedding_grads(
        grad_cost, chosen_emb, rejected_emb, chosen_rewards, rejected_rewards,
        sim_weight, 1.0 / float(temperature), -float(alpha) / float(temperature), eps, out_dtype,
    )
