"""Experimental: the tiled loop reading ``C`` once per iteration instead of twice (``strategy="onepass"``).

The row pass holds whole rows (up to ``ONEPASS_TILE`` entries) in registers:
it updates their potentials and adds their plan entries, at most ``a_i`` after
the row update, into per-part column sums ``S_j = (P^T 1)_j``. Two small
kernels add the parts and apply ``log_v_j += log b_j - log S_j``, which is the
log-sum-exp update exactly; the same sums give the tolerance check. A sum can
only get small for extreme weights; a problem with a sum below ``2**-80`` takes
its v-update from a column pass. Aimed at ``C`` larger than L2; not yet timed
on a GPU, so "auto" never picks it (docs/design.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ....triton_utils import LOG2E_K, block_size, cdiv, num_warps_for
from ..common import (
    NEG_INF,
    TILED_BLOCKS,
    TILED_ENTRIES_PER_THREAD,
    load_neg_cost,
    log_weight,
    logsumexp,
    potential,
    split_reciprocal,
)
from ..tiled import column_pass_kernel, plan_epilogue
from .cooperative import resident_programs

# Entries of whole rows one row-pass program holds (32 per thread); a column whose sum of plan
# entries falls below ONEPASS_MIN_SUM (2**-80) gets its v-update from a log-sum-exp pass.
ONEPASS_TILE = 8192
ONEPASS_ENTRIES_PER_THREAD = 32
ONEPASS_MIN_SUM_K = tl.constexpr(2.0**-80)
ONEPASS_SUM_BLOCK = 256  # columns per program of the column-sum kernels


@triton.jit
def row_pass_partials_kernel(
    c_ptr,
    log_v_ptr,
    a_ptr,
    log_u_ptr,
    partial_ptr,
    active_ptr,
    N,
    M,
    stride_cb,
    stride_cn,
    stride_cm,
    stride_ab,
    stride_an,
    neg_inv_hi,
    neg_inv_lo,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
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
            z = load_neg_cost(c_tile, inside, neg_inv_hi, neg_inv_lo) + log_v[None, :]
            wa = tl.load(a_ptr + pid_b * stride_ab + rows * stride_an, mask=row_ok, other=0.0)
            log_u = potential(wa, logsumexp(z, 1))
            tl.store(log_u_ptr + pid_b * N + rows, log_u, mask=row_ok)
            partial += tl.sum(tl.math.exp2((z + log_u[:, None]) * LOG2E_K), axis=0)
        tl.store(partial_ptr + (pid_b * parts + part) * M + cols, partial, mask=col_ok)


@triton.jit
def column_sums_kernel(
    partial_ptr,
    col_sum_ptr,
    b_ptr,
    block_err_ptr,
    block_small_ptr,
    active_ptr,
    M,
    parts,
    stride_bb,
    stride_bm,
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
def apply_column_sums_kernel(
    col_sum_ptr,
    log_v_ptr,
    b_ptr,
    block_err_ptr,
    block_small_ptr,
    active_ptr,
    exact_ptr,
    err_ptr,
    iters_ptr,
    M,
    stride_bb,
    stride_bm,
    tol,
    k,
    check,
    apply_next_v,
    BLOCK: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,
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
            next_v = log_v + log_weight(wb) - tl.log(tl.where(wb > 0, total, 1.0))
            tl.store(log_v_ptr + pid_b * M + cols, tl.where(wb > 0, next_v, float("-inf")), mask=col_ok)


def onepass_fits(m: int) -> bool:
    """Whether rows of ``m`` entries fit the one-pass row kernel (whole rows in registers)."""
    return block_size(m, hi=1 << 30) <= ONEPASS_TILE


def onepass_parts(batch: int, n: int, rows: int, device: torch.device) -> int:
    """Programs per problem in the row pass: enough to fill the GPU a few times over, at most one per row block."""
    if device.type == "cuda":
        per_problem = 4 * resident_programs(device) // batch
    else:
        per_problem = 3  # under the interpreter: a few, so that the column sums add several parts
    return max(1, min(cdiv(n, rows), per_problem))


def solve_onepass(C, a, b, eps, n_iters, tol, check_every, write_plan):
    batch, n, m = C.shape
    if not onepass_fits(m):
        raise ValueError(f"the one-pass strategy holds whole rows of at most {ONEPASS_TILE} entries, got {m}")
    dev = C.device
    hi, lo = split_reciprocal(eps)
    block_m = block_size(m, hi=1 << 30)
    rows = max(1, ONEPASS_TILE // block_m)
    parts = onepass_parts(batch, n, rows, dev)
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
        column_pass_kernel[col_grid](
            C,
            log_u,
            b,
            log_v,
            exact,
            n,
            m,
            *C.stride(),
            *b.stride(),
            hi,
            lo,
            WRITE_V=True,
            BLOCK_N=blocks["col_block_n"],
            BLOCK_M=blocks["col_block_m"],
            num_warps=col_warps,
        )
        row_pass_partials_kernel[(batch, parts)](
            C,
            log_v,
            a,
            log_u,
            partial,
            active,
            n,
            m,
            *C.stride(),
            *a.stride(),
            hi,
            lo,
            ROWS=rows,
            BLOCK_M=block_m,
            num_warps=row_warps,
        )
        check = tol is not None and k % check_every == 0
        column_sums_kernel[sum_grid](
            partial,
            col_sum,
            b,
            block_err,
            block_small,
            active,
            m,
            parts,
            *b.stride(),
            BLOCK=sum_block,
            num_warps=4,
        )
        apply_column_sums_kernel[sum_grid](
            col_sum,
            log_v,
            b,
            block_err,
            block_small,
            active,
            exact,
            err,
            iters,
            m,
            *b.stride(),
            float(tol if tol is not None else 0.0),
            k,
            int(check),
            int(k < n_iters),
            BLOCK=sum_block,
            MAX_BLOCKS=block_size(sum_grid[1], hi=1 << 30),
            num_warps=4,
        )
    return plan_epilogue(C, a, b, eps, log_u, log_v, iters, err, write_plan)
