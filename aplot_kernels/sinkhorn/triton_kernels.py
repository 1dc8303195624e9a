"""Triton kernels for log-domain Sinkhorn: ``solve`` as in :mod:`aplot_kernels.sinkhorn.reference`.

Same iterates as the reference (POT's ``sinkhorn_log`` order: column
potential, then row potential, from zero), computed in float32 whatever the
dtype of ``C`` (float16/bfloat16/float32 are read as they are). Scaled
potentials ``log_u = f / eps``, ``log_v = g / eps`` are kept in natural-log
units; every exponential is ``exp2((x - max) * log2(e))`` (the MUFU ``ex2``
instruction; ``tl.exp`` would lower to the same) and ``-C / eps`` is formed
with a split reciprocal (``c * hi + c * lo`` in one FMA) so that it is
within about half an ulp of the true quotient without a division.

Six strategies (``solve(..., strategy="auto")`` picks among "fused", "streamed" and "tiled" by size):

* ``"fused"`` (small problems, ``next_pow2(N) * next_pow2(M) <=
  FUSED_MAX_ELEMENTS``): one program per problem holds ``-C / eps`` in
  registers and runs every iteration in the kernel. The tolerance check and
  the early exit happen on chip; the epilogue writes plan, potentials, cost,
  dual value, iteration count and error.
* ``"fused-scaling"`` (opt-in, same sizes): the fused kernel iterating in
  the scaling domain. It holds the Gibbs kernel ``exp(-C / eps + lu + lv)``
  for absorbed log potentials and updates the scalings ``v = b / K^T u``,
  ``u = a / K v``: two matrix-vector products per iteration and no ``exp``.
  An iteration whose scalings leave ``[2**-32, 2**32]`` (or overflow) runs
  again in the log domain and is absorbed into a new kernel, which is how
  small ``eps`` stays exact (see ``_scaling_iterations``). Compiled for
  sm_90 its loop issues about 440 instructions per thread per iteration at
  128 x 128 (16 warps) against 1044 for ``"fused"``, 12 MUFU (reciprocals)
  against 64 ``ex2``. ``"auto"`` does not pick it until a GPU run has timed it.
* ``"streamed"`` (many mid-sized problems): one program per problem runs every
  iteration in the kernel, streaming ``C`` tile by tile in each pass (online
  log-sum-exp) with the potentials in global scratch; no per-iteration
  launches, early exit on chip.
* ``"tiled"`` (large problems): the host launches, per iteration, a column
  log-sum-exp kernel (v-update) and a row log-sum-exp kernel (u-update), each
  streaming ``C`` tile by tile with an online (running max) log-sum-exp. No
  host synchronisation in the loop: per-problem ``active`` flags live on the
  device and a check kernel (every ``check_every``-th iteration) measures the
  column-marginal violation and clears them; stopped problems' programs do no
  work. The check's column log-sum-exp is exactly the next v-update's, so the
  check kernel also applies that update and the next iteration skips its
  column pass: tolerance checks cost no extra pass over ``C``.
  On a GPU, problems of up to ``GRAPH_MAX_ENTRIES`` entries replay the loop
  as a CUDA graph (captured once per shape and options, ``GRAPH_CACHE_SIZE``
  kept): their passes take a few microseconds, less than a launch from
  Python, so without the graph the loop measured launch-bound on an H100
  (about 4 ms for K=50 at any size up to 1024 x 1024).

* ``"cooperative"`` (opt-in, few mid-sized problems): the streamed loop
  with each problem split over several programs (at most one per SM, so
  that all are resident), each owning every ``parts``-th block of rows and
  of columns; the parts meet at a barrier in global memory (an atomic
  counter per problem) after every pass. One launch for all iterations, as
  in "streamed", but a 512 x 512 problem is spread over 64 programs instead
  of one. Off a GPU (the interpreter runs programs one after another) each
  problem is a single program; the tests also run it split over several
  programs at once, in threads under the interpreter. Not yet timed on a
  GPU; ``"auto"`` does not pick it.

* ``"onepass"`` (opt-in, rows of up to ``ONEPASS_TILE`` entries): the
  tiled loop with one read of ``C`` per iteration instead of two. The row
  pass holds whole rows in registers: it updates their potentials and adds
  their plan entries, which after the row update are at most ``a_i``, into
  per-part column sums ``S_j = (P^T 1)_j``. Two small kernels add the parts
  and apply ``log_v_j += log b_j - log S_j``, which is the log-sum-exp
  update exactly; the same sums give the tolerance check for free. A row
  update scales row ``i`` by ``a_i / (its sum) >= a_i / mass``, so
  ``S_j >= b_j min_i a_i / mass``: a sum can only get small for extreme weights; a
  problem with a sum below ``2**-80`` takes its v-update from a column
  pass. Aimed at ``C`` larger than L2 (B=4, 4096 x 4096 read ``C`` twice
  per iteration from HBM); not yet timed on a GPU.

``row_transport_costs`` runs the same iterations with any strategy but
replaces the plan store by a per-row reduction ``sum_j P_ij C_ij`` (the
APLOT margin before scaling): the plan is formed tile by tile and never
written to memory.

Zero weights (padding) give ``-inf`` potentials, hence exact zero plan rows
and columns; ``f`` and ``g`` are reported as 0 there. Block padding beyond
``N``/``M`` is masked the same way.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import kernel_entry
from .._triton_utils import LN2_K, LOG2E_K, block_size, cdiv, num_warps_for
from .reference import SolveOutput, column_violation

# Largest padded problem (next_pow2(N) * next_pow2(M)) solved by one program with C in registers.
# Compiled for sm_90 as a launch specialises it (unit strides, aligned pointers; triton 3.9), the
# fused kernel fits 128 x 128 in 16 warps without spilling (128 registers; 98 at 64 x 128), and one
# iteration issues 1044 instructions per thread (`python -m bench.kernel_stats`). Without the
# specialisation the same tile spills 384 bytes. On an H100 the
# fused kernel was the fastest strategy at B=64, 128 x 128 (0.50 ms for K=50 against 0.78 ms
# streamed), and the slowest at 256 x 256 (3.4 ms against 2.2 ms streamed). Larger problems are
# streamed or tiled.
FUSED_MAX_ELEMENTS = 128 * 128
FUSED_ENTRIES_PER_THREAD = 16

# Tile shapes of the streaming passes (tiled and streamed strategies): a row pass reads BLOCK_N
# rows x BLOCK_M columns per step (128 contiguous fp32 = 512 B per row), a column pass a tall
# BLOCK_N x BLOCK_M tile. With 16 tile entries per thread the 32 x 128 row pass uses 148
# registers on sm_90 (242 with 4 warps), the streamed kernel 211, none spill.
TILED_BLOCKS = dict(row_block_n=32, row_block_m=128, col_block_n=128, col_block_m=32, check_block=1024)
TILED_ENTRIES_PER_THREAD = 16

# The streamed strategy (one program per problem, C streamed each pass) pays off over plain
# (ungraphed) tiled launches when there are enough problems to occupy the GPU and the whole batch's
# C stays in L2 (50 MB on an H100). With the tiled loop replayed as a CUDA graph, tiled was faster
# at every size measured on an H100 (B=64 at 256 x 256: 0.93 ms against 2.1 ms streamed; B=16 at
# 512 x 512: 0.97 against 7.0 ms), so "auto" picks streamed only where no graph is used.
STREAMED_MIN_BATCH = 32
STREAMED_MAX_BYTES = 32 << 20

# CUDA graphs of the tiled loop (see the module docstring); APLOT_KERNELS_CUDA_GRAPHS=0 switches
# them off. Each cached graph keeps a copy of its inputs and its outputs on the device, so only
# problems of at most GRAPH_MAX_ENTRIES entries (32 MiB of float32 C) are captured. Measured on an
# H100 up to 4M entries (B=1, 2048 x 2048: 1.96 ms graphed, 3.76 ms launched); at 8M entries
# (B=8, 1024 x 1024) the plain launches took 3.9 ms; at 67M (B=4, 4096 x 4096) the passes take
# longer than the launches, which then overlap them.
# Cooperative strategy (opt-in, not timed on a GPU yet): a problem's passes are split over up to
# one program per SM, which meet at a barrier in global memory; small blocks so that a 512 x 512
# problem spreads over 64 programs (8 rows and 8 columns each).
COOPERATIVE_BLOCKS = dict(row_block_n=8, row_block_m=128, col_block_n=128, col_block_m=8)

# One-pass strategy (opt-in, not timed on a GPU yet): the row pass holds ONEPASS_TILE entries
# (whole rows, ONEPASS_TILE // next_pow2(M) of them) in registers, 32 per thread; a column whose sum
# of plan entries falls below ONEPASS_MIN_SUM (2**-80) gets its v-update from a log-sum-exp pass.
ONEPASS_TILE = 8192
ONEPASS_ENTRIES_PER_THREAD = 32
ONEPASS_MIN_SUM_K = tl.constexpr(2.0 ** -80)
ONEPASS_SUM_BLOCK = 256  # columns per program of the column-sum kernels

GRAPH_MAX_ENTRIES = 1 << 23
GRAPH_CACHE_SIZE = 8

# The scaling-domain fused loop (strategy "fused-scaling") keeps its scalings u, v within
# [2**-32, 2**32]; an iteration that leaves the range runs again in the log domain (see
# _scaling_iterations).
SCALING_LO_K = tl.constexpr(2.0 ** -32)
SCALING_HI_K = tl.constexpr(2.0 ** 32)

NEG_INF = float("-inf")


@functools.lru_cache(maxsize=64)  # a training run uses one eps; rounding it through torch costs a few dispatches
def _split_reciprocal(eps: float):
    """``-1 / eps`` as a float32 pair ``hi + lo`` (so ``c * hi + c * lo`` ~ ``-c / eps`` to ~0.5 ulp)."""
    exact = -1.0 / float(eps)
    hi = float(torch.tensor(exact, dtype=torch.float32))
    lo = float(torch.tensor(exact - hi, dtype=torch.float32))
    return hi, lo


@triton.jit
def _scaled_neg_cost(c, neg_inv_hi, neg_inv_lo):
    """``-c / eps`` in float32 from the split reciprocal."""
    return tl.fma(c, neg_inv_hi, c * neg_inv_lo)


@triton.jit
def _lse_value(peak, total):
    """``peak + log(total)`` of a log-sum-exp; ``-inf`` where every term was ``-inf`` (then ``total`` is 0)."""
    empty = peak == float("-inf")
    return tl.where(empty, float("-inf"), peak + tl.math.log2(tl.where(empty, 1.0, total)) * LN2_K)


@triton.jit
def _lse(z, AXIS: tl.constexpr):
    """``log(sum(exp(z)))`` along ``AXIS``; all ``-inf`` gives ``-inf`` (never NaN)."""
    peak = tl.max(z, axis=AXIS)
    safe = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.sum(tl.math.exp2((z - tl.expand_dims(safe, AXIS)) * LOG2E_K), axis=AXIS)
    return _lse_value(peak, total)


@triton.jit
def _log_weight(w):
    """``log(w)`` where ``w > 0`` (the value elsewhere is never used)."""
    return tl.log(tl.where(w > 0, w, 1.0))


# ---------------------------------------------------------------------------
# Fused strategy: one program per problem, everything on chip.
# ---------------------------------------------------------------------------


@triton.jit
def _fused_iterations(neg_c, wa, wb, n_iters, check_every, tol, HAS_TOL: tl.constexpr):
    """Every Sinkhorn iteration of one problem held on chip.

    ``neg_c [BLOCK_N, BLOCK_M]``: ``-C / eps``, ``-inf`` outside the problem;
    ``wa [BLOCK_N]``, ``wb [BLOCK_M]``: the weights, 0 for padding. Returns
    ``(log_u, log_v, iters, err)``; ``err < 0`` when it was never measured.
    """
    log_a = _log_weight(wa)
    log_b = _log_weight(wb)

    # Zero potentials, except -inf on zero-weight rows: as in the reference, a padded row never
    # enters a column update, so a ragged problem equals itself alone.
    log_u = tl.where(wa > 0, 0.0, float("-inf"))
    log_v = tl.zeros_like(wb)
    # Column log-sum-exp of the current log_u: the next v-update and the marginal check both use it.
    col_lse = _lse(neg_c + log_u[:, None], 0)
    active = tl.full((), 1, tl.int32)
    iters = tl.full((), 0, tl.int32)
    err = tl.full((), -1.0, tl.float32)  # < 0: never measured
    for k in range(1, n_iters + 1):
        if active != 0:
            log_v = tl.where(wb > 0, log_b - col_lse, float("-inf"))
            log_u = tl.where(wa > 0, log_a - _lse(neg_c + log_v[None, :], 1), float("-inf"))
            col_lse = _lse(neg_c + log_u[:, None], 0)
            iters += 1
            if HAS_TOL:
                if k % check_every == 0:
                    # (P^T 1)_j = exp(log_v_j + col_lse_j)
                    err = tl.sum(tl.abs(tl.math.exp2((log_v + col_lse) * LOG2E_K) - wb))
                    active = (err > tol).to(tl.int32)
    return log_u, log_v, iters, err


@triton.jit
def _load_neg_cost(c_tile, inside, neg_inv_hi, neg_inv_lo):
    """``-C / eps`` of one problem's tile in float32, ``-inf`` outside the problem."""
    c = tl.load(c_tile, mask=inside, other=0.0).to(tl.float32)
    return tl.where(inside, _scaled_neg_cost(c, neg_inv_hi, neg_inv_lo), float("-inf"))


@triton.jit
def _absorbed_kernel(neg_c, log_u, log_v):
    """``exp(-C / eps + log_u_i + log_v_j)``: the Gibbs kernel with the potentials absorbed (0 on padding)."""
    return tl.math.exp2(((log_u[:, None] + log_v[None, :]) + neg_c) * LOG2E_K)


@triton.jit
def _scaling_update(weight, total):
    """``weight / total``, 0 on zero weights (padding).

    A sum that underflowed (below ``2**-100``, possibly 0) gives a huge but
    finite ratio, which fails the range check: no inf or NaN is ever formed.
    """
    return tl.where(weight > 0, weight / tl.maximum(total, 7.888609052210118e-31), 0.0)


@triton.jit
def _all_in_range(scaling, weight):
    """Whether every scaling of a non-zero weight lies in ``[SCALING_LO, SCALING_HI]`` (NaN does not)."""
    ok = ((scaling >= SCALING_LO_K) & (scaling <= SCALING_HI_K)) | (weight == 0)
    return tl.min(ok.to(tl.int32), axis=0) != 0


@triton.jit
def _reload_neg_cost(source, RELOAD_FLAG: tl.constexpr, RELOAD_BLOCK: tl.constexpr):
    """``RELOAD`` of :func:`_scaling_iterations` for a cost in memory: ``source = (c_tile, inside, hi, lo)``."""
    c_tile, inside, neg_inv_hi, neg_inv_lo = source
    return _load_neg_cost(c_tile, inside, neg_inv_hi, neg_inv_lo)


@triton.jit
def _scaling_iterations(
    neg_c, RELOAD: tl.constexpr, source, RELOAD_FLAG: tl.constexpr, RELOAD_BLOCK: tl.constexpr,
    wa, wb, n_iters, check_every, tol, HAS_TOL: tl.constexpr,
):
    """:func:`_fused_iterations` in the scaling domain: the same iterates without an ``exp`` per iteration.

    Holds ``K = exp(-C / eps + lu_i + lv_j)`` for absorbed log potentials
    ``(lu, lv)`` and iterates the scalings ``v = b / (K^T u)``, ``u = a / (K v)``,
    so ``log_u = lu + log(u)``: an iteration is two matrix-vector products.
    An iteration whose scalings leave ``[SCALING_LO, SCALING_HI]`` (or
    overflow, or divide by an underflowed sum) is discarded: the state before
    it is absorbed into ``(lu, lv)``, ``-C / eps`` is formed again by
    ``RELOAD(source, RELOAD_FLAG, RELOAD_BLOCK)`` (the caller's: read from
    memory, or recomputed from the embeddings; the two compile-time arguments
    are passed through for it, as a tuple would not keep them constant), the iteration runs in the log domain as in
    :func:`_fused_iterations`, and its result is absorbed into a new ``K``.
    ``neg_c``: the first ``-C / eps`` tile, ``-inf`` outside the problem; it is
    not kept through the loop.
    Entries of ``K`` that underflow are below ``2**-126``; times scalings of at
    most ``SCALING_HI`` each they stay below ``2**-62`` of the plan.

    Returns ``(log_u, log_v, iters, err, plan)`` as :func:`_fused_iterations` plus the plan tile.
    """
    log_a = _log_weight(wa)
    log_b = _log_weight(wb)
    real_row = wa > 0
    real_col = wb > 0
    lu = tl.where(real_row, 0.0, float("-inf"))
    lv = tl.zeros_like(wb)
    kernel = _absorbed_kernel(neg_c, lu, lv)
    u = tl.where(real_row, 1.0, 0.0)
    v = tl.where(real_col, 1.0, 0.0)
    col_sum = tl.sum(kernel * u[:, None], axis=0)  # (K^T u)_j: the next v-update and the marginal check
    active = tl.full((), 1, tl.int32)
    iters = tl.full((), 0, tl.int32)
    err = tl.full((), -1.0, tl.float32)  # < 0: never measured
    for k in range(1, n_iters + 1):
        if active != 0:
            next_v = _scaling_update(wb, col_sum)
            next_u = _scaling_update(wa, tl.sum(kernel * next_v[None, :], axis=1))
            if _all_in_range(next_u, wa) & _all_in_range(next_v, wb):
                u = next_u
                v = next_v
            else:
                lu = tl.where(real_row, lu + tl.log(tl.where(real_row, u, 1.0)), float("-inf"))
                lv = tl.where(real_col, lv + tl.log(tl.where(real_col, v, 1.0)), float("-inf"))
                neg_c = RELOAD(source, RELOAD_FLAG, RELOAD_BLOCK)
                lv = tl.where(real_col, log_b - _lse(neg_c + lu[:, None], 0), float("-inf"))
                lu = tl.where(real_row, log_a - _lse(neg_c + lv[None, :], 1), float("-inf"))
                kernel = _absorbed_kernel(neg_c, lu, lv)
                u = tl.where(real_row, 1.0, 0.0)
                v = tl.where(real_col, 1.0, 0.0)
            col_sum = tl.sum(kernel * u[:, None], axis=0)
            iters += 1
            if HAS_TOL:
                if k % check_every == 0:
                    # (P^T 1)_j = v_j (K^T u)_j
                    err = tl.sum(tl.abs(v * col_sum - wb))
                    active = (err > tol).to(tl.int32)
    log_u = tl.where(real_row, lu + tl.log(tl.where(real_row, u, 1.0)), float("-inf"))
    log_v = tl.where(real_col, lv + tl.log(tl.where(real_col, v, 1.0)), float("-inf"))
    plan = (kernel * u[:, None]) * v[None, :]
    return log_u, log_v, iters, err, plan


@triton.jit
def _solve_fused_kernel(
    c_ptr, a_ptr, b_ptr, plan_ptr, row_cost_ptr, f_ptr, g_ptr, cost_ptr, reg_ptr, iters_ptr, err_ptr,
    N, M,
    stride_cb, stride_cn, stride_cm, stride_ab, stride_an, stride_bb, stride_bm,
    stride_pb, stride_pn, stride_pm,
    eps, neg_inv_hi, neg_inv_lo, n_iters, check_every, tol,
    HAS_TOL: tl.constexpr, WRITE_PLAN: tl.constexpr, SCALING: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < M
    inside = row_ok[:, None] & col_ok[None, :]
    c_tile = c_ptr + pid * stride_cb + rows[:, None] * stride_cn + cols[None, :] * stride_cm
    wa = tl.load(a_ptr + pid * stride_ab + rows * stride_an, mask=row_ok, other=0.0).to(tl.float32)
    wb = tl.load(b_ptr + pid * stride_bb + cols * stride_bm, mask=col_ok, other=0.0).to(tl.float32)
    neg_c = _load_neg_cost(c_tile, inside, neg_inv_hi, neg_inv_lo)
    if SCALING:
        log_u, log_v, iters, err, plan = _scaling_iterations(
            neg_c, _reload_neg_cost, (c_tile, inside, neg_inv_hi, neg_inv_lo), False, 1, wa, wb, n_iters, check_every,
            tol, HAS_TOL,
        )
    else:
        log_u, log_v, iters, err = _fused_iterations(neg_c, wa, wb, n_iters, check_every, tol, HAS_TOL)
        plan = _absorbed_kernel(neg_c, log_u, log_v)
    if WRITE_PLAN:
        tl.store(plan_ptr + pid * stride_pb + rows[:, None] * stride_pn + cols[None, :] * stride_pm, plan, mask=inside)
    f = tl.where(wa > 0, eps * log_u, 0.0)
    g = tl.where(wb > 0, eps * log_v, 0.0)
    tl.store(f_ptr + pid * N + rows, f, mask=row_ok)
    tl.store(g_ptr + pid * M + cols, g, mask=col_ok)
    # C is read again rather than kept live through the loop: registers hold one tile, -C / eps.
    c = tl.load(c_tile, mask=inside, other=0.0).to(tl.float32)
    row_cost = tl.sum(plan * c, axis=1)
    tl.store(row_cost_ptr + pid * N + rows, row_cost, mask=row_ok)
    tl.store(cost_ptr + pid, tl.sum(row_cost, axis=0))
    tl.store(reg_ptr + pid, tl.sum(wa * f) + tl.sum(wb * g))
    tl.store(iters_ptr + pid, iters.to(tl.int64))
    if err < 0:
        err = tl.sum(tl.abs(tl.sum(plan, axis=0) - wb))
    tl.store(err_ptr + pid, err)


def _solve_fused(C, a, b, eps, n_iters, tol, check_every, write_plan, num_warps=None, scaling=False):
    batch, n, m = C.shape
    block_n, block_m = block_size(n, hi=1 << 30), block_size(m, hi=1 << 30)
    dev = C.device
    plan = _plan_buffer(batch, n, m, dev, write_plan)
    row_cost = torch.empty(batch, n, dtype=torch.float32, device=dev)
    f = torch.empty(batch, n, dtype=torch.float32, device=dev)
    g = torch.empty(batch, m, dtype=torch.float32, device=dev)
    cost, reg_cost, err = (torch.empty(batch, dtype=torch.float32, device=dev) for _ in range(3))
    iters = torch.empty(batch, dtype=torch.int64, device=dev)
    hi, lo = _split_reciprocal(eps)
    _solve_fused_kernel[(batch,)](
        C, a, b, plan, row_cost, f, g, cost, reg_cost, iters, err, n, m,
        *C.stride(), *a.stride(), *b.stride(), *plan.stride(),
        float(eps), hi, lo, int(n_iters), int(check_every), float(tol if tol is not None else 0.0),
        HAS_TOL=tol is not None, WRITE_PLAN=write_plan, SCALING=scaling, BLOCK_N=block_n, BLOCK_M=block_m,
        num_warps=num_warps or num_warps_for(block_n * block_m, per_thread=FUSED_ENTRIES_PER_THREAD),
    )
    if not write_plan:
        return row_cost
    return SolveOutput(plan, f, g, cost, reg_cost, iters, err)


def _plan_buffer(batch, n, m, device, write_plan):
    """The ``[B, N, M]`` float32 plan, or a one-element stand-in (never written) when only row costs are wanted."""
    if write_plan:
        return torch.empty(batch, n, m, dtype=torch.float32, device=device)
    return torch.empty(1, 1, 1, dtype=torch.float32, device=device).expand(batch, n, m)


# ---------------------------------------------------------------------------
# Tiled strategy: streaming log-sum-exp passes launched from a host loop.
# ---------------------------------------------------------------------------


@triton.jit
def _online_lse_step(peak, total, z, AXIS: tl.constexpr):
    """Fold a tile ``z`` into running ``(peak, total)`` along ``AXIS`` (log-sum-exp = peak + log(total))."""
    new_peak = tl.maximum(peak, tl.max(z, axis=AXIS))
    safe = tl.where(new_peak == float("-inf"), 0.0, new_peak)
    total = total * tl.math.exp2((peak - safe) * LOG2E_K) + tl.sum(
        tl.math.exp2((z - tl.expand_dims(safe, AXIS)) * LOG2E_K), axis=AXIS
    )
    return new_peak, total


@triton.jit
def _potential(weight, lse):
    """A Sinkhorn update ``log w - lse`` (``log_u = log a - LSE_j``, ``log_v = log b - LSE_i``); ``-inf`` for padding."""
    return tl.where(weight > 0, _log_weight(weight) - lse, float("-inf"))


@triton.jit
def _load_potential(ptr, mask, FROM_L2: tl.constexpr):
    """Log potentials (``-inf`` outside ``mask``); ``FROM_L2``: written by other programs, so read past L1."""
    if FROM_L2:
        value = tl.load(ptr, mask=mask, other=float("-inf"), cache_modifier=".cg")
    else:
        value = tl.load(ptr, mask=mask, other=float("-inf"))
    return value


@triton.jit
def _column_lse(
    c_ptr, log_u_ptr, cols, N, M, stride_cn, stride_cm, neg_inv_hi, neg_inv_lo,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, FROM_L2: tl.constexpr,
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
        log_u = _load_potential(log_u_ptr + rows, row_ok, FROM_L2)
        z = tl.where(inside, _scaled_neg_cost(c, neg_inv_hi, neg_inv_lo), float("-inf")) + log_u[:, None]
        peak, total = _online_lse_step(peak, total, z, 0)
    return _lse_value(peak, total)


@triton.jit
def _row_lse(
    c_ptr, log_v_ptr, rows, N, M, stride_cn, stride_cm, neg_inv_hi, neg_inv_lo,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, FROM_L2: tl.constexpr,
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
        log_v = _load_potential(log_v_ptr + cols, col_ok, FROM_L2)
        z = tl.where(inside, _scaled_neg_cost(c, neg_inv_hi, neg_inv_lo), float("-inf")) + log_v[None, :]
        peak, total = _online_lse_step(peak, total, z, 1)
    return _lse_value(peak, total)


@triton.jit
def _column_updates(
    c_ptr, log_u_ptr, b_ptr, log_v_ptr, first, step, N, M, stride_cn, stride_cm, stride_bm, neg_inv_hi, neg_inv_lo,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, FROM_L2: tl.constexpr,
):
    """The v-update ``log_v_j = log b_j - LSE_i(-C_ij / eps + log_u_i)`` of one problem's column blocks
    starting at columns ``first, first + step, ...``."""
    for m0 in range(first, M, step):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        lse = _column_lse(c_ptr, log_u_ptr, cols, N, M, stride_cn, stride_cm, neg_inv_hi, neg_inv_lo, BLOCK_N, BLOCK_M, FROM_L2)
        wb = tl.load(b_ptr + cols * stride_bm, mask=col_ok, other=0.0)
        tl.store(log_v_ptr + cols, _potential(wb, lse), mask=col_ok)


@triton.jit
def _row_updates(
    c_ptr, log_v_ptr, a_ptr, log_u_ptr, first, step, N, M, stride_cn, stride_cm, stride_an, neg_inv_hi, neg_inv_lo,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, FROM_L2: tl.constexpr,
):
    """The u-update ``log_u_i = log a_i - LSE_j(-C_ij / eps + log_v_j)`` of one problem's row blocks
    starting at rows ``first, first + step, ...``."""
    for n0 in range(first, N, step):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        lse = _row_lse(c_ptr, log_v_ptr, rows, N, M, stride_cn, stride_cm, neg_inv_hi, neg_inv_lo, BLOCK_N, BLOCK_M, FROM_L2)
        wa = tl.load(a_ptr + rows * stride_an, mask=row_ok, other=0.0)
        tl.store(log_u_ptr + rows, _potential(wa, lse), mask=row_ok)


@triton.jit
def _column_pass_kernel(
    c_ptr, log_u_ptr, b_ptr, out_ptr, active_ptr,
    N, M, stride_cb, stride_cn, stride_cm, stride_bb, stride_bm,
    neg_inv_hi, neg_inv_lo,
    WRITE_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``lse_j = LSE_i(-C_ij / eps + log_u_i)``; writes ``log_v = log b - lse`` (``WRITE_V``) or ``lse``."""
    pid_b = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + pid_b) != 0:
        cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        lse = _column_lse(
            c_ptr + pid_b * stride_cb, log_u_ptr + pid_b * N, cols, N, M, stride_cn, stride_cm,
            neg_inv_hi, neg_inv_lo, BLOCK_N, BLOCK_M, False,
        )
        if WRITE_V:
            wb = tl.load(b_ptr + pid_b * stride_bb + cols * stride_bm, mask=col_ok, other=0.0)
            lse = _potential(wb, lse)
        tl.store(out_ptr + pid_b * M + cols, lse, mask=col_ok)


@triton.jit
def _row_pass_kernel(
    c_ptr, log_v_ptr, a_ptr, log_u_ptr, active_ptr,
    N, M, stride_cb, stride_cn, stride_cm, stride_ab, stride_an,
    neg_inv_hi, neg_inv_lo,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``log_u_i = log a_i - LSE_j(-C_ij / eps + log_v_j)``."""
    pid_b = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + pid_b) != 0:
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        lse = _row_lse(
            c_ptr + pid_b * stride_cb, log_v_ptr + pid_b * M, rows, N, M, stride_cn, stride_cm,
            neg_inv_hi, neg_inv_lo, BLOCK_N, BLOCK_M, False,
        )
        wa = tl.load(a_ptr + pid_b * stride_ab + rows * stride_an, mask=row_ok, other=0.0)
        tl.store(log_u_ptr + pid_b * N + rows, _potential(wa, lse), mask=row_ok)


@triton.jit
def _check_kernel(
    col_lse_ptr, log_v_ptr, b_ptr, active_ptr, err_ptr, iters_ptr,
    M, stride_bb, stride_bm, tol, k, apply_next_v,
    BLOCK: tl.constexpr,
):
    """After iteration ``k``: ``err = sum_j |exp(log_v_j + lse_j) - b_j|``; stop the problem once ``err <= tol``.

    A problem that goes on gets the next iteration's v-update ``log b - lse``
    when ``apply_next_v`` (the host then skips that column pass).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + pid_b) != 0:
        err = tl.zeros((BLOCK,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK):
            cols = m0 + tl.arange(0, BLOCK)
            col_ok = cols < M
            lse = tl.load(col_lse_ptr + pid_b * M + cols, mask=col_ok, other=float("-inf"))
            log_v = tl.load(log_v_ptr + pid_b * M + cols, mask=col_ok, other=float("-inf"))
            wb = tl.load(b_ptr + pid_b * stride_bb + cols * stride_bm, mask=col_ok, other=0.0)
            err += tl.abs(tl.math.exp2((log_v + lse) * LOG2E_K) - wb)
        total = tl.sum(err)
        tl.store(err_ptr + pid_b, total)
        if total <= tol:
            tl.store(active_ptr + pid_b, 0)
            tl.store(iters_ptr + pid_b, k)  # stored as int64; k may arrive as the constant 1
        elif apply_next_v != 0:
            for m0 in range(0, M, BLOCK):
                cols = m0 + tl.arange(0, BLOCK)
                col_ok = cols < M
                lse = tl.load(col_lse_ptr + pid_b * M + cols, mask=col_ok, other=0.0)
                wb = tl.load(b_ptr + pid_b * stride_bb + cols * stride_bm, mask=col_ok, other=0.0)
                tl.store(log_v_ptr + pid_b * M + cols, _potential(wb, lse), mask=col_ok)


@triton.jit
def _plan_rows(
    c_ptr, log_u_ptr, log_v_ptr, plan_ptr, rows, N, M, stride_cn, stride_cm, stride_pn, stride_pm,
    neg_inv_hi, neg_inv_lo, WRITE_PLAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
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
        log_v = _load_potential(log_v_ptr + cols, col_ok, FROM_L2)
        neg_c = tl.where(inside, _scaled_neg_cost(c, neg_inv_hi, neg_inv_lo), float("-inf"))
        plan = tl.math.exp2(((log_u[:, None] + log_v[None, :]) + neg_c) * LOG2E_K)
        if WRITE_PLAN:
            tl.store(plan_ptr + rows[:, None] * stride_pn + cols[None, :] * stride_pm, plan, mask=inside)
        row_cost += tl.sum(plan * c, axis=1)
    return row_cost


@triton.jit
def _plan_kernel(
    c_ptr, log_u_ptr, log_v_ptr, plan_ptr, row_cost_ptr,
    N, M, stride_cb, stride_cn, stride_cm, stride_pb, stride_pn, stride_pm,
    neg_inv_hi, neg_inv_lo,
    WRITE_PLAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The row sums of ``P * C`` and, when ``WRITE_PLAN``, the plan; one block of rows per program."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_cost = _plan_rows(
        c_ptr + pid_b * stride_cb, log_u_ptr + pid_b * N, log_v_ptr + pid_b * M, plan_ptr + pid_b * stride_pb,
        rows, N, M, stride_cn, stride_cm, stride_pn, stride_pm, neg_inv_hi, neg_inv_lo, WRITE_PLAN, BLOCK_N, BLOCK_M,
        False,
    )
    tl.store(row_cost_ptr + pid_b * N + rows, row_cost, mask=rows < N)


def _solve_tiled(C, a, b, eps, n_iters, tol, check_every, write_plan):
    batch, n, m = C.shape
    dev = C.device
    blocks = TILED_BLOCKS
    hi, lo = _split_reciprocal(eps)
    log_u = torch.where(a > 0, 0.0, NEG_INF).contiguous()  # padded rows never enter a column update
    log_v = torch.zeros(batch, m, dtype=torch.float32, device=dev)
    col_lse = torch.empty(batch, m, dtype=torch.float32, device=dev)
    active = torch.ones(batch, dtype=torch.int32, device=dev)
    iters = torch.full((batch,), n_iters, dtype=torch.int64, device=dev)
    err = torch.full((batch,), -1.0, dtype=torch.float32, device=dev)  # < 0: never measured
    row_grid = (batch, cdiv(n, blocks["row_block_n"]))
    col_grid = (batch, cdiv(m, blocks["col_block_m"]))
    row_warps = num_warps_for(blocks["row_block_n"] * blocks["row_block_m"], per_thread=TILED_ENTRIES_PER_THREAD)
    col_warps = num_warps_for(blocks["col_block_n"] * blocks["col_block_m"], per_thread=TILED_ENTRIES_PER_THREAD)

    def column_pass(out, write_v):
        _column_pass_kernel[col_grid](
            C, log_u, b, out, active, n, m, *C.stride(), *b.stride(), hi, lo,
            WRITE_V=write_v, BLOCK_N=blocks["col_block_n"], BLOCK_M=blocks["col_block_m"], num_warps=col_warps,
        )

    v_ready = False  # the check kernel already applied this iteration's v-update
    for k in range(1, n_iters + 1):
        if not v_ready:
            column_pass(log_v, True)
        _row_pass_kernel[row_grid](
            C, log_v, a, log_u, active, n, m, *C.stride(), *a.stride(), hi, lo,
            BLOCK_N=blocks["row_block_n"], BLOCK_M=blocks["row_block_m"], num_warps=row_warps,
        )
        v_ready = tol is not None and k % check_every == 0
        if v_ready:
            column_pass(col_lse, False)
            _check_kernel[(batch,)](
                col_lse, log_v, b, active, err, iters, m, *b.stride(), float(tol), k, int(k < n_iters),
                BLOCK=min(blocks["check_block"], block_size(m, hi=1 << 30)), num_warps=4,
            )

    return _plan_epilogue(C, a, b, eps, log_u, log_v, iters, err, write_plan)


def _plan_epilogue(C, a, b, eps, log_u, log_v, iters, err, write_plan):
    """The host-looped strategies' end: plan (when ``write_plan``) and row costs from the potentials."""
    batch, n, m = C.shape
    blocks = TILED_BLOCKS
    hi, lo = _split_reciprocal(eps)
    plan = _plan_buffer(batch, n, m, C.device, write_plan)
    row_cost = torch.empty(batch, n, dtype=torch.float32, device=C.device)
    _plan_kernel[(batch, cdiv(n, blocks["row_block_n"]))](
        C, log_u, log_v, plan, row_cost, n, m, *C.stride(), *plan.stride(), hi, lo,
        WRITE_PLAN=write_plan, BLOCK_N=blocks["row_block_n"], BLOCK_M=blocks["row_block_m"],
        num_warps=num_warps_for(blocks["row_block_n"] * blocks["row_block_m"], per_thread=TILED_ENTRIES_PER_THREAD),
    )
    return _finish(a, b, eps, log_u, log_v, plan, row_cost, iters, err) if write_plan else row_cost


# ---------------------------------------------------------------------------
# One-pass strategy: each iteration reads C once. The row pass holds whole rows
# in registers, updates their potentials and adds their plan entries into the
# next column sums; a small kernel then turns the sums into the v-update.
# ---------------------------------------------------------------------------


@triton.jit
def _row_pass_partials_kernel(
    c_ptr, log_v_ptr, a_ptr, log_u_ptr, partial_ptr, active_ptr,
    N, M, stride_cb, stride_cn, stride_cm, stride_ab, stride_an,
    neg_inv_hi, neg_inv_lo,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Row update ``log_u_i = log a_i - LSE_j(-C_ij / eps + log_v_j)`` of the ``ROWS``-row blocks
    ``part, part + parts, ...`` of problem ``program_id(0)`` (``part = program_id(1)``), whole rows at a
    time, and this part's share of the next column sums,
    ``partial_j = sum_i exp(-C_ij / eps + log_u_i + log_v_j)`` over its rows: entries of the plan
    after the row update, so each is at most ``a_i`` and the sum cannot overflow.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    if tl.load(active_ptr + pid_b) != 0:
        cols = tl.arange(0, BLOCK_M)
        col_ok = cols < M
        log_v = tl.load(log_v_ptr + pid_b * M + cols, mask=col_ok, other=float("-inf"))
        partial = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(part * ROWS, N, parts * ROWS):
            rows = n0 + tl.arange(0, ROWS)
            row_ok = rows < N
            inside = row_ok[:, None] & col_ok[None, :]
            c_tile = c_ptr + pid_b * stride_cb + rows[:, None] * stride_cn + cols[None, :] * stride_cm
            z = _load_neg_cost(c_tile, inside, neg_inv_hi, neg_inv_lo) + log_v[None, :]
            wa = tl.load(a_ptr + pid_b * stride_ab + rows * stride_an, mask=row_ok, other=0.0)
            log_u = _potential(wa, _lse(z, 1))
            tl.store(log_u_ptr + pid_b * N + rows, log_u, mask=row_ok)
            partial += tl.sum(tl.math.exp2((z + log_u[:, None]) * LOG2E_K), axis=0)
        tl.store(partial_ptr + (pid_b * parts + part) * M + cols, partial, mask=col_ok)


@triton.jit
def _column_sums_kernel(
    partial_ptr, col_sum_ptr, b_ptr, block_err_ptr, block_small_ptr, active_ptr,
    M, parts, stride_bb, stride_bm,
    BLOCK: tl.constexpr,
):
    """After a row pass: the column sums ``S_j = (P^T 1)_j`` of one block of columns (the parts' sums
    added in a fixed order), the block's share of ``err = sum_j |S_j - b_j|``, and whether one of its
    columns sums to less than ``ONEPASS_MIN_SUM`` (its v-update would then lose digits)."""
    pid_b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    if tl.load(active_ptr + pid_b) != 0:
        cols = block * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < M
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for q in range(0, parts):
            total += tl.load(partial_ptr + (pid_b * parts + q) * M + cols, mask=col_ok, other=0.0)
        tl.store(col_sum_ptr + pid_b * M + cols, total, mask=col_ok)
        wb = tl.load(b_ptr + pid_b * stride_bb + cols * stride_bm, mask=col_ok, other=0.0)
        small = (wb > 0) & ~(total >= ONEPASS_MIN_SUM_K)
        blocks = tl.num_programs(1)
        tl.store(block_err_ptr + pid_b * blocks + block, tl.sum(tl.abs(total - wb), axis=0))
        tl.store(block_small_ptr + pid_b * blocks + block, tl.max(small.to(tl.int32), axis=0))


@triton.jit
def _apply_column_sums_kernel(
    col_sum_ptr, log_v_ptr, b_ptr, block_err_ptr, block_small_ptr, active_ptr, exact_ptr, err_ptr, iters_ptr,
    M, stride_bb, stride_bm, tol, k, check, apply_next_v,
    BLOCK: tl.constexpr, MAX_BLOCKS: tl.constexpr,
):
    """The check of iteration ``k`` (when ``check``) and, for a problem that goes on (when
    ``apply_next_v``), the next v-update ``log_v_j += log b_j - log S_j`` of one block of columns.

    Every block reads all blocks' errors and flags (in a fixed order: the same decision everywhere);
    block 0 records it. A problem with a column sum below ``ONEPASS_MIN_SUM`` gets ``exact = 1``
    instead, and the column pass computes its v-update as a log-sum-exp.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    blocks = tl.num_programs(1)
    if tl.load(active_ptr + pid_b) != 0:
        ids = tl.arange(0, MAX_BLOCKS)
        err = tl.sum(tl.load(block_err_ptr + pid_b * blocks + ids, mask=ids < blocks, other=0.0), axis=0)
        small = tl.max(tl.load(block_small_ptr + pid_b * blocks + ids, mask=ids < blocks, other=0), axis=0)
        stop = (check != 0) & (err <= tol)
        go_on = (stop == 0) & (apply_next_v != 0)
        if block == 0:
            if check != 0:
                tl.store(err_ptr + pid_b, err)
            if stop:
                tl.store(active_ptr + pid_b, 0)  # the other blocks read it before or skip: no v-update either way
                tl.store(iters_ptr + pid_b, k)  # stored as int64; k may arrive as the constant 1
            tl.store(exact_ptr + pid_b, (go_on & (small != 0)).to(tl.int32))
        if go_on & (small == 0):
            cols = block * BLOCK + tl.arange(0, BLOCK)
            col_ok = cols < M
            total = tl.load(col_sum_ptr + pid_b * M + cols, mask=col_ok, other=1.0)
            wb = tl.load(b_ptr + pid_b * stride_bb + cols * stride_bm, mask=col_ok, other=0.0)
            log_v = tl.load(log_v_ptr + pid_b * M + cols, mask=col_ok, other=0.0)
            next_v = log_v + _log_weight(wb) - tl.log(tl.where(wb > 0, total, 1.0))
            tl.store(log_v_ptr + pid_b * M + cols, tl.where(wb > 0, next_v, float("-inf")), mask=col_ok)


def onepass_fits(m: int) -> bool:
    """Whether rows of ``m`` entries fit the one-pass row kernel (whole rows in registers)."""
    return block_size(m, hi=1 << 30) <= ONEPASS_TILE


def _onepass_parts(batch: int, n: int, rows: int, device: torch.device) -> int:
    """Programs per problem in the row pass: enough to fill the GPU a few times over, at most one per row block."""
    if device.type == "cuda":
        per_problem = 4 * _resident_programs(device) // batch
    else:
        per_problem = 3  # under the interpreter: a few, so that the column sums add several parts
    return max(1, min(cdiv(n, rows), per_problem))


def _solve_onepass(C, a, b, eps, n_iters, tol, check_every, write_plan):
    batch, n, m = C.shape
    if not onepass_fits(m):
        raise ValueError(f"the one-pass strategy holds whole rows of at most {ONEPASS_TILE} entries, got {m}")
    dev = C.device
    hi, lo = _split_reciprocal(eps)
    block_m = block_size(m, hi=1 << 30)
    rows = max(1, ONEPASS_TILE // block_m)
    parts = _onepass_parts(batch, n, rows, dev)
    log_u = torch.where(a > 0, 0.0, NEG_INF).contiguous()  # padded rows never enter a column update
    log_v = torch.zeros(batch, m, dtype=torch.float32, device=dev)
    partial = torch.empty(batch, parts, m, dtype=torch.float32, device=dev)
    col_sum = torch.empty(batch, m, dtype=torch.float32, device=dev)
    sum_block = min(ONEPASS_SUM_BLOCK, block_m)
    sum_grid = (batch, cdiv(m, sum_block))
    block_err = torch.empty(batch, sum_grid[1], dtype=torch.float32, device=dev)
    block_small = torch.empty(batch, sum_grid[1], dtype=torch.int32, device=dev)
    active = torch.ones(batch, dtype=torch.int32, device=dev)
    exact = torch.ones(batch, dtype=torch.int32, device=dev)  # the first v-update is a column pass
    iters = torch.full((batch,), n_iters, dtype=torch.int64, device=dev)
    err = torch.full((batch,), -1.0, dtype=torch.float32, device=dev)  # < 0: never measured
    blocks = TILED_BLOCKS
    col_grid = (batch, cdiv(m, blocks["col_block_m"]))
    col_warps = num_warps_for(blocks["col_block_n"] * blocks["col_block_m"], per_thread=TILED_ENTRIES_PER_THREAD)
    row_warps = num_warps_for(rows * block_m, per_thread=ONEPASS_ENTRIES_PER_THREAD)
    for k in range(1, n_iters + 1):
        # The v-update as a log-sum-exp: the first iteration, and problems whose sums the last check flagged.
        _column_pass_kernel[col_grid](
            C, log_u, b, log_v, exact, n, m, *C.stride(), *b.stride(), hi, lo,
            WRITE_V=True, BLOCK_N=blocks["col_block_n"], BLOCK_M=blocks["col_block_m"], num_warps=col_warps,
        )
        _row_pass_partials_kernel[(batch, parts)](
            C, log_v, a, log_u, partial, active, n, m, *C.stride(), *a.stride(), hi, lo,
            ROWS=rows, BLOCK_M=block_m, num_warps=row_warps,
        )
        check = tol is not None and k % check_every == 0
        _column_sums_kernel[sum_grid](
            partial, col_sum, b, block_err, block_small, active, m, parts, *b.stride(), BLOCK=sum_block, num_warps=4,
        )
        _apply_column_sums_kernel[sum_grid](
            col_sum, log_v, b, block_err, block_small, active, exact, err, iters, m, *b.stride(),
            float(tol if tol is not None else 0.0), k, int(check), int(k < n_iters),
            BLOCK=sum_block, MAX_BLOCKS=block_size(sum_grid[1], hi=1 << 30), num_warps=4,
        )
    return _plan_epilogue(C, a, b, eps, log_u, log_v, iters, err, write_plan)


def _use_graph(C: torch.Tensor) -> bool:
    return (
        C.is_cuda
        and C.numel() <= GRAPH_MAX_ENTRIES
        and os.environ.get("APLOT_KERNELS_CUDA_GRAPHS", "1") not in ("", "0")
        and not torch.cuda.is_current_stream_capturing()  # inside a caller's capture: launch into it
    )


class _GraphedSolve:
    """A host-looped solve (``_solve_tiled``, ``_solve_onepass``) on fixed input buffers, captured once as a
    CUDA graph and replayed."""

    def __init__(self, solve, C, a, b, options):
        self.inputs = (C.clone(), a.clone(), b.clone())
        device = C.device
        # Compile and load the kernels first, on a side stream, as graph capture requires.
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            solve(*self.inputs, *options)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = solve(*self.inputs, *options)

    def __call__(self, C, a, b):
        for buffer, value in zip(self.inputs, (C, a, b)):
            buffer.copy_(value)
        self.graph.replay()
        # The graph's outputs are overwritten by its next replay: return copies.
        if isinstance(self.outputs, torch.Tensor):
            return self.outputs.clone()
        return SolveOutput(*(t.clone() for t in self.outputs))


_graphs: "collections.OrderedDict[tuple, _GraphedSolve]" = collections.OrderedDict()
_ungraphable: set = set()
# A cached graph owns fixed input and output buffers. Graphs are kept per stream, so that a replay
# on one stream never overwrites the buffers of a replay still running on another; the lock keeps
# two threads on one stream from interleaving their copy-in, replay and copy-out.
_graphs_lock = threading.Lock()


def _solve_graphed(solve, C, a, b, eps, n_iters, tol, check_every, write_plan):
    options = (eps, n_iters, tol, check_every, write_plan)
    stream = torch.cuda.current_stream(C.device)
    key = (solve.__name__, C.device, stream.cuda_stream, tuple(C.shape), C.dtype, options)
    with _graphs_lock:
        if key in _ungraphable:
            return solve(C, a, b, *options)
        graphed = _graphs.get(key)
        if graphed is None:
            try:
                graphed = _GraphedSolve(solve, C, a, b, options)
            except RuntimeError:  # capture refused (e.g. by another capture on this device): plain launches
                _ungraphable.add(key)
                return solve(C, a, b, *options)
            _graphs[key] = graphed
            while len(_graphs) > GRAPH_CACHE_SIZE:
                _graphs.popitem(last=False)
        _graphs.move_to_end(key)
        return graphed(C, a, b)


def _finish(a, b, eps, log_u, log_v, plan, row_cost, iters, err) -> SolveOutput:
    """Potentials (0 on padding), values, and ``err`` where no check measured it (``err < 0``)."""
    f = torch.where(a > 0, eps * log_u, 0.0)
    g = torch.where(b > 0, eps * log_v, 0.0)
    reg_cost = (a * f).sum(-1) + (b * g).sum(-1)
    err = torch.where(err >= 0, err, column_violation(plan, b))
    return SolveOutput(plan, f, g, row_cost.sum(-1), reg_cost, iters, err)


# ---------------------------------------------------------------------------
# Streamed strategy: one program per problem runs every iteration, streaming C
# (from L2 when the batch's C fits there) with the same passes as "tiled".
# ---------------------------------------------------------------------------


@triton.jit
def _column_violation(
    c_ptr, log_u_ptr, log_v_ptr, b_ptr, N, M, stride_cn, stride_cm, stride_bm, neg_inv_hi, neg_inv_lo,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``sum_j |(P^T 1)_j - b_j|`` of one problem, with ``(P^T 1)_j = exp(log_v_j + LSE_i(-C_ij / eps + log_u_i))``."""
    err = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        lse = _column_lse(
            c_ptr, log_u_ptr, cols, N, M, stride_cn, stride_cm, neg_inv_hi, neg_inv_lo, BLOCK_N, BLOCK_M, False
        )
        log_v = tl.load(log_v_ptr + cols, mask=col_ok, other=float("-inf"))
        wb = tl.load(b_ptr + cols * stride_bm, mask=col_ok, other=0.0)
        err += tl.abs(tl.math.exp2((log_v + lse) * LOG2E_K) - wb)
    return tl.sum(err)


@triton.jit
def _solve_streamed_kernel(
    c_ptr, a_ptr, b_ptr, log_u_ptr, log_v_ptr, plan_ptr, row_cost_ptr, iters_ptr, err_ptr,
    N, M, stride_cb, stride_cn, stride_cm, stride_ab, stride_an, stride_bb, stride_bm,
    stride_pb, stride_pn, stride_pm,
    neg_inv_hi, neg_inv_lo, n_iters, check_every, tol,
    HAS_TOL: tl.constexpr, WRITE_PLAN: tl.constexpr, ROW_BLOCK_N: tl.constexpr, ROW_BLOCK_M: tl.constexpr,
    COL_BLOCK_N: tl.constexpr, COL_BLOCK_M: tl.constexpr,
):
    """All iterations of one problem; ``log_u``/``log_v`` (initialised by the host) live in global scratch.

    The potentials written by one pass are read by other threads of this
    program in the next, hence the barriers between passes.
    """
    pid = tl.program_id(0).to(tl.int64)
    c_ptr += pid * stride_cb
    a_ptr += pid * stride_ab
    b_ptr += pid * stride_bb
    log_u_ptr += pid * N
    log_v_ptr += pid * M
    active = tl.full((), 1, tl.int32)
    iters = tl.full((), 0, tl.int32)
    err = tl.full((), -1.0, tl.float32)  # < 0: never measured
    for k in range(1, n_iters + 1):
        if active != 0:
            _column_updates(
                c_ptr, log_u_ptr, b_ptr, log_v_ptr, 0, COL_BLOCK_M, N, M, stride_cn, stride_cm, stride_bm,
                neg_inv_hi, neg_inv_lo, COL_BLOCK_N, COL_BLOCK_M, False,
            )
            tl.debug_barrier()
            _row_updates(
                c_ptr, log_v_ptr, a_ptr, log_u_ptr, 0, ROW_BLOCK_N, N, M, stride_cn, stride_cm, stride_an,
                neg_inv_hi, neg_inv_lo, ROW_BLOCK_N, ROW_BLOCK_M, False,
            )
            tl.debug_barrier()
            iters += 1
            if HAS_TOL:
                if k % check_every == 0:
                    err = _column_violation(
                        c_ptr, log_u_ptr, log_v_ptr, b_ptr, N, M, stride_cn, stride_cm, stride_bm,
                        neg_inv_hi, neg_inv_lo, COL_BLOCK_N, COL_BLOCK_M,
                    )
                    active = (err > tol).to(tl.int32)
    for n0 in range(0, N, ROW_BLOCK_N):
        rows = n0 + tl.arange(0, ROW_BLOCK_N)
        row_cost = _plan_rows(
            c_ptr, log_u_ptr, log_v_ptr, plan_ptr + pid * stride_pb, rows, N, M, stride_cn, stride_cm,
            stride_pn, stride_pm, neg_inv_hi, neg_inv_lo, WRITE_PLAN, ROW_BLOCK_N, ROW_BLOCK_M, False,
        )
        tl.store(row_cost_ptr + pid * N + rows, row_cost, mask=rows < N)
    tl.store(iters_ptr + pid, iters.to(tl.int64))
    tl.store(err_ptr + pid, err)


def _solve_streamed(C, a, b, eps, n_iters, tol, check_every, write_plan):
    batch, n, m = C.shape
    dev = C.device
    blocks = TILED_BLOCKS
    hi, lo = _split_reciprocal(eps)
    log_u = torch.where(a > 0, 0.0, NEG_INF).contiguous()  # padded rows never enter a column update
    log_v = torch.zeros(batch, m, dtype=torch.float32, device=dev)
    plan = _plan_buffer(batch, n, m, dev, write_plan)
    row_cost = torch.empty(batch, n, dtype=torch.float32, device=dev)
    iters = torch.empty(batch, dtype=torch.int64, device=dev)
    err = torch.empty(batch, dtype=torch.float32, device=dev)
    tile = max(blocks["row_block_n"] * blocks["row_block_m"], blocks["col_block_n"] * blocks["col_block_m"])
    _solve_streamed_kernel[(batch,)](
        C, a, b, log_u, log_v, plan, row_cost, iters, err, n, m,
        *C.stride(), *a.stride(), *b.stride(), *plan.stride(),
        hi, lo, int(n_iters), int(check_every), float(tol if tol is not None else 0.0),
        HAS_TOL=tol is not None, WRITE_PLAN=write_plan,
        ROW_BLOCK_N=blocks["row_block_n"], ROW_BLOCK_M=blocks["row_block_m"],
        COL_BLOCK_N=blocks["col_block_n"], COL_BLOCK_M=blocks["col_block_m"],
        num_warps=num_warps_for(tile, per_thread=TILED_ENTRIES_PER_THREAD),
    )
    return _finish(a, b, eps, log_u, log_v, plan, row_cost, iters, err) if write_plan else row_cost


# ---------------------------------------------------------------------------
# Cooperative strategy: the streamed loop with each problem split over several
# programs that meet at a barrier in global memory between passes.
# ---------------------------------------------------------------------------


@triton.jit
def _problem_barrier(sync_ptr, target):
    """Wait until ``target`` arrivals (all programs of this problem, all phases so far) are counted at ``sync_ptr``.

    The CTA barrier orders this program's stores before its release; the
    acquire on the counter orders the other programs' stores before what
    follows (their potentials are then read past L1, ``FROM_L2``).
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu") + 1
    while arrived < target:
        arrived = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _solve_cooperative_kernel(
    c_ptr, a_ptr, b_ptr, log_u_ptr, log_v_ptr, col_lse_ptr, partial_err_ptr, sync_ptr,
    plan_ptr, row_cost_ptr, iters_ptr, err_ptr,
    N, M, stride_cb, stride_cn, stride_cm, stride_ab, stride_an, stride_bb, stride_bm,
    stride_pb, stride_pn, stride_pm,
    neg_inv_hi, neg_inv_lo, n_iters, check_every, tol,
    HAS_TOL: tl.constexpr, WRITE_PLAN: tl.constexpr, ROW_BLOCK_N: tl.constexpr, ROW_BLOCK_M: tl.constexpr,
    COL_BLOCK_N: tl.constexpr, COL_BLOCK_M: tl.constexpr,
):
    """Problem ``program_id(0)``, part ``program_id(1)`` of ``num_programs(1)``.

    A part owns every ``parts``-th block of columns (column passes) and of
    rows (row passes); the parts of a problem meet at ``_problem_barrier``
    after each pass, with a counter per problem (``sync_ptr``, zeroed by the
    host). A tolerance check sums the parts' column violations in a fixed
    order (every part reads the same total and takes the same branch); its
    column log-sum-exp is the next v-update, as in the tiled strategy.
    Every program of the launch must be resident at once: the host launches
    at most one program per SM.
    """
    pid = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    c_ptr += pid * stride_cb
    a_ptr += pid * stride_ab
    b_ptr += pid * stride_bb
    log_u_ptr += pid * N
    log_v_ptr += pid * M
    col_lse_ptr += pid * M
    partial_err_ptr += pid * parts
    sync_ptr += pid
    phase = 0
    active = tl.full((), 1, tl.int32)
    v_ready = tl.full((), 0, tl.int32)  # the last check already applied this iteration's v-update
    iters = tl.full((), 0, tl.int32)
    err = tl.full((), -1.0, tl.float32)  # < 0: never measured
    for k in range(1, n_iters + 1):
        if active != 0:
            if v_ready == 0:
                _column_updates(
                    c_ptr, log_u_ptr, b_ptr, log_v_ptr, part * COL_BLOCK_M, parts * COL_BLOCK_M, N, M,
                    stride_cn, stride_cm, stride_bm, neg_inv_hi, neg_inv_lo, COL_BLOCK_N, COL_BLOCK_M, True,
                )
                phase += 1
                _problem_barrier(sync_ptr, phase * parts)
            _row_updates(
                c_ptr, log_v_ptr, a_ptr, log_u_ptr, part * ROW_BLOCK_N, parts * ROW_BLOCK_N, N, M,
                stride_cn, stride_cm, stride_an, neg_inv_hi, neg_inv_lo, ROW_BLOCK_N, ROW_BLOCK_M, True,
            )
            phase += 1
            _problem_barrier(sync_ptr, phase * parts)
            iters += 1
            v_ready = 0
            if HAS_TOL:
                if k % check_every == 0:
                    violation = tl.zeros((COL_BLOCK_M,), dtype=tl.float32)
                    for m0 in range(part * COL_BLOCK_M, M, parts * COL_BLOCK_M):
                        cols = m0 + tl.arange(0, COL_BLOCK_M)
                        col_ok = cols < M
                        lse = _column_lse(
                            c_ptr, log_u_ptr, cols, N, M, stride_cn, stride_cm, neg_inv_hi, neg_inv_lo,
                            COL_BLOCK_N, COL_BLOCK_M, True,
                        )
                        tl.store(col_lse_ptr + cols, lse, mask=col_ok)  # read back by this program only
                        log_v = tl.load(log_v_ptr + cols, mask=col_ok, other=float("-inf"))  # this part's columns
                        wb = tl.load(b_ptr + cols * stride_bm, mask=col_ok, other=0.0)
                        violation += tl.abs(tl.math.exp2((log_v + lse) * LOG2E_K) - wb)
                    tl.store(partial_err_ptr + part, tl.sum(violation))
                    phase += 1
                    _problem_barrier(sync_ptr, phase * parts)
                    err = tl.full((), 0.0, tl.float32)
                    for q in range(0, parts):  # the same order in every part: the same total
                        err += tl.load(partial_err_ptr + q, cache_modifier=".cg")
                    active = (err > tol).to(tl.int32)
                    if (active != 0) & (k < n_iters):
                        for m0 in range(part * COL_BLOCK_M, M, parts * COL_BLOCK_M):
                            cols = m0 + tl.arange(0, COL_BLOCK_M)
                            col_ok = cols < M
                            lse = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0)
                            wb = tl.load(b_ptr + cols * stride_bm, mask=col_ok, other=0.0)
                            tl.store(log_v_ptr + cols, _potential(wb, lse), mask=col_ok)
                        v_ready = 1
                        # The partial errors are rewritten at the next check, after this barrier and the
                        # row pass's: every part has summed them by then.
                        phase += 1
                        _problem_barrier(sync_ptr, phase * parts)
    for n0 in range(part * ROW_BLOCK_N, N, parts * ROW_BLOCK_N):
        rows = n0 + tl.arange(0, ROW_BLOCK_N)
        row_cost = _plan_rows(
            c_ptr, log_u_ptr, log_v_ptr, plan_ptr + pid * stride_pb, rows, N, M, stride_cn, stride_cm,
            stride_pn, stride_pm, neg_inv_hi, neg_inv_lo, WRITE_PLAN, ROW_BLOCK_N, ROW_BLOCK_M, True,
        )
        tl.store(row_cost_ptr + pid * N + rows, row_cost, mask=rows < N)
    if part == 0:
        tl.store(iters_ptr + pid, iters.to(tl.int64))
        tl.store(err_ptr + pid, err)


def _resident_programs(device: torch.device) -> int:
    """Programs of one launch that surely run at the same time: one per SM on a GPU.

    Off a GPU, one: the Triton interpreter runs programs one after another, so
    a barrier between two of them would never open. Under MPS with a reduced
    share of the SMs the device still reports all of them, and a cooperative
    launch could wait forever: that is one reason the strategy is opt-in.
    """
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cooperative_parts(C: torch.Tensor) -> int:
    """Programs per problem: enough to cover the row and column blocks, all of them resident."""
    batch, n, m = C.shape
    blocks = COOPERATIVE_BLOCKS
    wanted = max(cdiv(n, blocks["row_block_n"]), cdiv(m, blocks["col_block_m"]))
    return max(1, min(wanted, _resident_programs(C.device) // batch))


def _solve_cooperative(C, a, b, eps, n_iters, tol, check_every, write_plan, parts=None):
    batch, n, m = C.shape
    dev = C.device
    parts = parts or _cooperative_parts(C)
    if parts > 1 and batch * parts > _resident_programs(dev):
        raise ValueError(f"the cooperative strategy needs all {batch * parts} programs resident at once; "
                         f"{_resident_programs(dev)} are on {dev}")
    blocks = COOPERATIVE_BLOCKS
    hi, lo = _split_reciprocal(eps)
    log_u = torch.where(a > 0, 0.0, NEG_INF).contiguous()  # padded rows never enter a column update
    log_v = torch.zeros(batch, m, dtype=torch.float32, device=dev)
    col_lse = torch.empty(batch, m, dtype=torch.float32, device=dev)
    partial_err = torch.empty(batch, parts, dtype=torch.float32, device=dev)
    sync = torch.zeros(batch, dtype=torch.int32, device=dev)
    plan = _plan_buffer(batch, n, m, dev, write_plan)
    row_cost = torch.empty(batch, n, dtype=torch.float32, device=dev)
    iters = torch.empty(batch, dtype=torch.int64, device=dev)
    err = torch.empty(batch, dtype=torch.float32, device=dev)
    tile = max(blocks["row_block_n"] * blocks["row_block_m"], blocks["col_block_n"] * blocks["col_block_m"])
    _solve_cooperative_kernel[(batch, parts)](
        C, a, b, log_u, log_v, col_lse, partial_err, sync, plan, row_cost, iters, err, n, m,
        *C.stride(), *a.stride(), *b.stride(), *plan.stride(),
        hi, lo, int(n_iters), int(check_every), float(tol if tol is not None else 0.0),
        HAS_TOL=tol is not None, WRITE_PLAN=write_plan,
        ROW_BLOCK_N=blocks["row_block_n"], ROW_BLOCK_M=blocks["row_block_m"],
        COL_BLOCK_N=blocks["col_block_n"], COL_BLOCK_M=blocks["col_block_m"],
        num_warps=num_warps_for(tile, per_thread=TILED_ENTRIES_PER_THREAD),
    )
    return _finish(a, b, eps, log_u, log_v, plan, row_cost, iters, err) if write_plan else row_cost


STRATEGIES = ("auto", "fused", "fused-scaling", "streamed", "tiled", "cooperative", "onepass")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def use_scaling_domain() -> bool:
    """``APLOT_KERNELS_TRITON_SCALING=1``: "auto" takes the scaling-domain fused loop (Sinkhorn and margin)."""
    return _env_flag("APLOT_KERNELS_TRITON_SCALING")


def _auto_strategy(C: torch.Tensor) -> str:
    """The measured choice (see the module docstring); the opt-in variants where their variables ask for them.

    ``APLOT_KERNELS_TRITON_SCALING=1`` turns "fused" into "fused-scaling";
    ``APLOT_KERNELS_TRITON_COOPERATIVE=1`` takes "cooperative" for every
    larger problem, ``APLOT_KERNELS_TRITON_ONEPASS=1`` "onepass" where its
    rows fit. They are untimed on a GPU, hence off by default.
    """
    batch, n, m = C.shape
    if block_size(n, hi=1 << 30) * block_size(m, hi=1 << 30) <= FUSED_MAX_ELEMENTS:
        return "fused-scaling" if use_scaling_domain() else "fused"
    if _env_flag("APLOT_KERNELS_TRITON_COOPERATIVE"):
        return "cooperative"
    if _env_flag("APLOT_KERNELS_TRITON_ONEPASS") and onepass_fits(m):
        return "onepass"
    if _use_graph(C):
        return "tiled"
    if batch >= STREAMED_MIN_BATCH and C.numel() * C.element_size() <= STREAMED_MAX_BYTES:
        return "streamed"
    return "tiled"


def _run(C, a, b, eps, n_iters, tol, check_every, strategy, write_plan):
    """Check the inputs, pick the strategy and run it (see :func:`solve` and :func:`row_transport_costs`)."""
    if C.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton Sinkhorn reads float16, bfloat16 or float32 `C`, got {C.dtype}")
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    if strategy == "auto":
        strategy = _auto_strategy(C)
    run = {
        "fused": _solve_fused, "fused-scaling": functools.partial(_solve_fused, scaling=True),
        "streamed": _solve_streamed, "tiled": _solve_tiled, "cooperative": _solve_cooperative,
        "onepass": _solve_onepass,
    }[strategy]
    if strategy in ("tiled", "onepass") and _use_graph(C):
        run = functools.partial(_solve_graphed, run)
    return run(C, a, b, float(eps), int(n_iters), tol, int(check_every), write_plan)


@kernel_entry
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
        strategy: ``"fused"`` (one program per problem, C in registers),
            ``"fused-scaling"`` (the same in the scaling domain),
            ``"streamed"`` (one program per problem, C streamed), ``"tiled"``
            (streaming passes launched per iteration), ``"cooperative"``
            (streamed, each problem split over programs that meet at barriers),
            ``"onepass"`` (tiled, one read of ``C`` per iteration)
            or ``"auto"``: fused when
            the padded problem has at most ``FUSED_MAX_ELEMENTS`` entries,
            tiled where its loop runs as a CUDA graph, else streamed for at
            least ``STREAMED_MIN_BATCH`` problems whose costs total at most
            ``STREAMED_MAX_BYTES``, tiled otherwise.

    Returns:
        :class:`SolveOutput` in float32 (``n_iters`` int64).
    """
    return _run(C, a, b, eps, n_iters, tol, check_every, strategy, write_plan=True)


@kernel_entry
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
    return _run(C, a, b, eps, n_iters, tol, check_every, strategy, write_plan=False)
