"""Pieces shared by the Triton Sinkhorn strategies: tile sizes, the scaled cost, log-sum-exp and the passes.

Every strategy computes the reference's iterates (POT's ``sinkhorn_log`` order:
column potential, then row potential, from zero) in float32 on scaled
potentials ``log_u = f / eps``, ``log_v = g / eps``. Exponentials are
``exp2((x - max) * log2(e))``; ``-C / eps`` is formed with a split reciprocal,
within about half an ulp of the quotient without a division. Zero weights
(padding) give ``-inf`` potentials, hence exact zero plan rows and columns.
Why each strategy exists and what it costs: docs/design.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...triton_utils import LN2_K, LOG2E_K
from ..reference import SolveOutput, column_violation

# Tile shapes of the streaming passes (tiled and streamed): a row pass reads BLOCK_N rows x BLOCK_M
# columns per step (128 contiguous fp32 = 512 B per row), a column pass a tall tile; 16 entries per
# thread keep the passes free of register spills on sm_90 (docs/design.md).
TILED_BLOCKS = dict(row_block_n=32, row_block_m=128, col_block_n=128, col_block_m=32, check_block=1024)
TILED_ENTRIES_PER_THREAD = 16

NEG_INF = float("-inf")


@functools.lru_cache(maxsize=64)  # one eps per training run; rounding through torch costs dispatches
def split_reciprocal(eps: float):
    """``-1 / eps`` as a float32 pair ``hi + lo`` (so ``c * hi + c * lo`` ~ ``-c / eps`` to ~0.5 ulp)."""
    exact = -1.0 / float(eps)
    hi = float(torch.tensor(exact, dtype=torch.float32))
    lo = float(torch.tensor(exact - hi, dtype=torch.float32))
    return hi, lo


@triton.jit
def scaled_neg_cost(c, neg_inv_hi, neg_inv_lo):
    """``-c / eps`` in float32 from the split reciprocal."""
    return tl.fma(c, neg_inv_hi, c * neg_inv_lo)


@triton.jit
def lse_value(peak, total):
    """``peak + log(total)`` of a log-sum-exp; ``-inf`` where every term was ``-inf`` (then ``total`` is 0)."""
    empty = peak == float("-inf")
    return tl.where(empty, float("-inf"), peak + tl.math.log2(tl.where(empty, 1.0, total)) * LN2_K)


@triton.jit
def logsumexp(z, AXIS: tl.constexpr):
    """``log(sum(exp(z)))`` along ``AXIS``; all ``-inf`` gives ``-inf`` (never NaN)."""
    peak = tl.max(z, axis=AXIS)
    safe = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.sum(tl.math.exp2((z - tl.expand_dims(safe, AXIS)) * LOG2E_K), axis=AXIS)
    return lse_value(peak, total)


@triton.jit
def log_weight(w):
    """``log(w)`` where ``w > 0`` (the value elsewhere is never used)."""
    return tl.log(tl.where(w > 0, w, 1.0))


@triton.jit
def load_neg_cost(c_tile, inside, neg_inv_hi, neg_inv_lo):
    """``-C / eps`` of one problem's tile in float32, ``-inf`` outside the problem."""
    c = tl.load(c_tile, mask=inside, other=0.0).to(tl.float32)
    return tl.where(inside, scaled_neg_cost(c, neg_inv_hi, neg_inv_lo), float("-inf"))


@triton.jit
def absorbed_kernel(neg_c, log_u, log_v):
    """``exp(-C / eps + log_u_i + log_v_j)``: the Gibbs kernel with the potentials absorbed (0 on padding)."""
    return tl.math.exp2(((log_u[:, None] + log_v[None, :]) + neg_c) * LOG2E_K)


def plan_buffer(batch, n, m, device, write_plan):
    """The ``[B, N, M]`` float32 plan, or a one-element stand-in (never written) when only row costs are wanted."""
    if write_plan:
        return torch.empty(batch, n, m, dtype=torch.float32, device=device)
    return torch.empty(1, 1, 1, dtype=torch.float32, device=device).expand(batch, n, m)


def finish(a, b, eps, log_u, log_v, plan, row_cost, iters, err) -> SolveOutput:
    """Potentials (0 on padding), values, and ``err`` where no check measured it (``err < 0``)."""
    f = torch.where(a > 0, eps * log_u, 0.0)
    g = torch.where(b > 0, eps * log_v, 0.0)
    reg_cost = (a * f).sum(-1) + (b * g).sum(-1)
    err = torch.where(err >= 0, err, column_violation(plan, b))
    return SolveOutput(plan, f, g, row_cost.sum(-1), reg_cost, iters, err)


# ---------------------------------------------------------------------------
# Streaming passes over C (tiled, streamed and the experimental strategies):
# online log-sum-exp along rows or columns, one tile at a time.
# ---------------------------------------------------------------------------


@triton.jit
def online_lse_step(peak, total, z, AXIS: tl.constexpr):
    """Fold a tile ``z`` into running ``(peak, total)`` along ``AXIS`` (log-sum-exp = peak + log(total))."""
    new_peak = tl.maximum(peak, tl.max(z, axis=AXIS))
    safe = tl.where(new_peak == float("-inf"), 0.0, new_peak)
    total = total * tl.math.exp2((peak - safe) * LOG2E_K) + tl.sum(
        tl.math.exp2((z - tl.expand_dims(safe, AXIS)) * LOG2E_K), axis=AXIS
    )
    return new_peak, total


@triton.jit
def potential(weight, lse):
    """A Sinkhorn update ``log w - lse`` (``log_u = log a - LSE_j``, ``log_v = log b - LSE_i``); ``-inf`` for padding."""
    return tl.where(weight > 0, log_weight(weight) - lse, float("-inf"))


@triton.jit
def load_potential(ptr, mask, FROM_L2: tl.constexpr):
    """Log potentials (``-inf`` outside ``mask``); ``FROM_L2``: written by other programs, so read past L1."""
    if FROM_L2:
        value = tl.load(ptr, mask=mask, other=float("-inf"), cache_modifier=".cg")
    else:
        value = tl.load(ptr, mask=mask, other=float("-inf"))
    return value


@triton.jit
def column_lse(
    c_ptr,
    log_u_ptr,
    cols,
    N,
    M,
    stride_cn,
    stride_cm,
    neg_inv_hi,
    neg_inv_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FROM_L2: tl.constexpr,
):
    """``LSE_i(-C_ij / eps + log_u_i)`` for one problem's columns ``cols`` (``[BLOCK_M]``), streaming rows."""
    col_ok = cols < M
    peak = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        inside = row_ok[:, None] & col_ok[None, :]
        c = tl.load(c_ptr + rows[:, None] * stride_cn + cols[None, :] * stride_cm, mask=inside, other=0.0).to(tl.float32)
        log_u = load_potential(log_u_ptr + rows, row_ok, FROM_L2)
        z = tl.where(inside, scaled_neg_cost(c, neg_inv_hi, neg_inv_lo), float("-inf")) + log_u[:, None]
        peak, total = online_lse_step(peak, total, z, 0)
    return lse_value(peak, total)


@triton.jit
def row_lse(
    c_ptr,
    log_v_ptr,
    rows,
    N,
    M,
    stride_cn,
    stride_cm,
    neg_inv_hi,
    neg_inv_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FROM_L2: tl.constexpr,
):
    """``LSE_j(-C_ij / eps + log_v_j)`` for one problem's rows ``rows`` (``[BLOCK_N]``), streaming columns."""
    row_ok = rows < N
    peak = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        inside = row_ok[:, None] & col_ok[None, :]
        c = tl.load(c_ptr + rows[:, None] * stride_cn + cols[None, :] * stride_cm, mask=inside, other=0.0).to(tl.float32)
        log_v = load_potential(log_v_ptr + cols, col_ok, FROM_L2)
        z = tl.where(inside, scaled_neg_cost(c, neg_inv_hi, neg_inv_lo), float("-inf")) + log_v[None, :]
        peak, total = online_lse_step(peak, total, z, 1)
    return lse_value(peak, total)


@triton.jit
def column_updates(
    c_ptr,
    log_u_ptr,
    b_ptr,
    log_v_ptr,
    first,
    step,
    N,
    M,
    stride_cn,
    stride_cm,
    stride_bm,
    neg_inv_hi,
    neg_inv_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FROM_L2: tl.constexpr,
):
    """The v-update ``log_v_j = log b_j - LSE_i(-C_ij / eps + log_u_i)`` of one problem's column blocks
    starting at columns ``first, first + step, ...``."""
    for m0 in range(first, M, step):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        lse = column_lse(c_ptr, log_u_ptr, cols, N, M, stride_cn, stride_cm, neg_inv_hi, neg_inv_lo, BLOCK_N, BLOCK_M, FROM_L2)
        wb = tl.load(b_ptr + cols * stride_bm, mask=col_ok, other=0.0)
        tl.store(log_v_ptr + cols, potential(wb, lse), mask=col_ok)


@triton.jit
def row_updates(
    c_ptr,
    log_v_ptr,
    a_ptr,
    log_u_ptr,
    first,
    step,
    N,
    M,
    stride_cn,
    stride_cm,
    stride_an,
    neg_inv_hi,
    neg_inv_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FROM_L2: tl.constexpr,
):
    """The u-update ``log_u_i = log a_i - LSE_j(-C_ij / eps + log_v_j)`` of one problem's row blocks
    starting at rows ``first, first + step, ...``."""
    for n0 in range(first, N, step):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        lse = row_lse(c_ptr, log_v_ptr, rows, N, M, stride_cn, stride_cm, neg_inv_hi, neg_inv_lo, BLOCK_N, BLOCK_M, FROM_L2)
        wa = tl.load(a_ptr + rows * stride_an, mask=row_ok, other=0.0)
        tl.store(log_u_ptr + rows, potential(wa, lse), mask=row_ok)


@triton.jit
def plan_rows(
    c_ptr,
    log_u_ptr,
    log_v_ptr,
    plan_ptr,
    rows,
    N,
    M,
    stride_cn,
    stride_cm,
    stride_pn,
    stride_pm,
    neg_inv_hi,
    neg_inv_lo,
    WRITE_PLAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FROM_L2: tl.constexpr,
):
    """``sum_j P_ij C_ij`` of one problem's rows, with ``P_ij = exp(log_u_i + log_v_j - C_ij / eps)``.

    The plan rows are written too when ``WRITE_PLAN``.
    """
    row_ok = rows < N
    log_u = tl.load(log_u_ptr + rows, mask=row_ok, other=float("-inf"))
    row_cost = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        inside = row_ok[:, None] & col_ok[None, :]
        c = tl.load(c_ptr + rows[:, None] * stride_cn + cols[None, :] * stride_cm, mask=inside, other=0.0).to(tl.float32)
        log_v = load_potential(log_v_ptr + cols, col_ok, FROM_L2)
        neg_c = tl.where(inside, scaled_neg_cost(c, neg_inv_hi, neg_inv_lo), float("-inf"))
        plan = tl.math.exp2(((log_u[:, None] + log_v[None, :]) + neg_c) * LOG2E_K)
        if WRITE_PLAN:
            tl.store(plan_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pm, plan, mask=inside)
        row_cost += tl.sum(plan * c, axis=1)
    return row_cost
