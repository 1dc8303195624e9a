"""Triton backward passes of the cost matrices: the closed forms of :mod:`aplot_kernels.cost.reference`.

``cosine_cost_backward`` and ``aplot_cost_backward`` take the row scales and
norms of :func:`aplot_kernels.cost.triton._row_norms`, then one tiled
product kernel launched twice: ``G @ y_hat`` and, with ``G``'s strides
swapped, ``G^T @ x_hat`` (``G`` the incoming ``[B, N, M]`` gradient; each
loaded tile of ``y`` is scaled and divided by its norms, so ``y_hat`` is never
stored). Its programs that own the first ``D`` tile also reduce ``G`` times
the reward term's derivative over the same loop, which gives the APLOT reward
gradients. A row pass then applies the normalisation's Jacobian in place.
Products are exact float32 (``G`` is float32 and would lose about three
digits in half precision), so the backward runs on FMA, not tensor cores, for
every input dtype. Gradients are float32 for float32 and half inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._precision import float32_or_wider
from ..triton_utils import LOG2E_K, MIN_DOT_BLOCK, block_size, cdiv
from . import reference

# Imported by name: a kernel's helpers must be plain globals for Inductor to copy them next to a
# traced kernel, and host functions plain names for torch.library.triton_op to find the kernels.
from .triton import NUM_STAGES, _load_row_norms, _row_norms

# Backward product G @ y_hat: a 64 x 64 float32 output tile (rows x embedding columns) walking the
# reduced side of G in steps of 32, the shape of FP32_TILE (exact float32 FMA, no TF32).
BACKWARD_TILE = (64, 32, 64, 8)  # BLOCK_N (output rows), BLOCK_M (reduced), BLOCK_D, warps
# Backward row pass (normalisation Jacobian): rows per program, widest D step, warps; as _row_norms.
JACOBIAN_TILE = (16, 256, 4)


@triton.jit
def _grad_product_kernel(
    g_ptr,
    y_ptr,
    y_norm_ptr,
    rx_ptr,
    ry_ptr,
    p_ptr,
    grad_rx_ptr,
    N,
    M,
    D,
    stride_gb,
    stride_gn,
    stride_gm,
    stride_yb,
    stride_ym,
    stride_yd,
    stride_rxb,
    stride_rxn,
    stride_ryb,
    stride_rym,
    stride_pb,
    stride_pn,
    stride_pd,
    reward_scale,
    inv_temperature,
    REWARDS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``P = G @ y_hat`` for one ``BLOCK_N x BLOCK_D`` tile of ``P [B, N, D]`` (fp32).

    ``G [B, N, M]`` (any strides), ``y [B, M, D]``, ``y_norm`` its rows'
    ``(sigma, sigma |y|_eps)`` ``[B, M, 2]`` contiguous fp32 (``y_hat = (sigma y) / (sigma |y|_eps)``).
    With ``REWARDS``, the programs of the first ``D`` tile also write ``grad_rx [B, N]`` (contiguous):
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
    x_ptr,
    x_norm_ptr,
    p_ptr,
    R,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_pb,
    stride_pn,
    stride_pd,
    scale,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    if not rewards:  # unused pointers and strides; not `out`, which a traced launch must see written alone
        rx = ry = grad_rx = out.new_empty(0)
    grid = (batch, cdiv(n, block_n), cdiv(d, block_d))
    wrap_triton(_grad_product_kernel)[grid](
        g,
        y,
        y_norm,
        rx,
        ry,
        out,
        grad_rx,
        n,
        m,
        d,
        *g_strides,
        *y.stride(),
        *(rx.stride() if rewards else (0, 0)),
        *(ry.stride() if rewards else (0, 0)),
        *out.stride(),
        float(reward_scale),
        float(inv_temperature),
        REWARDS=rewards,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=warps,
        num_stages=NUM_STAGES,
    )


def _normalize_backward(x, x_norm, p, scale, eps):
    """Launch ``_normalize_backward_kernel`` on ``p`` (in place) for the rows of ``x [B, N, D]``."""
    batch, n, d = x.shape
    block_r, max_block_d, warps = JACOBIAN_TILE
    block_d = block_size(d, lo=16, hi=max_block_d)
    wrap_triton(_normalize_backward_kernel)[(cdiv(batch * n, block_r),)](
        x,
        x_norm,
        p,
        batch * n,
        n,
        d,
        *x.stride(),
        *p.stride(),
        float(scale),
        float(eps),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=warps,
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


def cosine_cost_backward(grad_cost: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float):
    """``(grad_x [B, N, D], grad_y [B, M, D])`` of :func:`cosine_cost` for ``grad_cost [B, N, M]`` (float32 for half inputs)."""
    out_dtype = float32_or_wider(grad_cost, x, y)
    grad_x, grad_y, _, _ = _embedding_grads(grad_cost, x, y, None, None, -1.0, 1.0, 0.0, eps, out_dtype)
    return grad_x, grad_y


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
        grad_cost,
        chosen_emb,
        rejected_emb,
        chosen_rewards,
        rejected_rewards,
        sim_weight,
        1.0 / float(temperature),
        -float(alpha) / float(temperature),
        eps,
        out_dtype,
    )
