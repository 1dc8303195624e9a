"""The streamed strategy: one program per problem runs every iteration, streaming ``C`` in each pass.

The passes are the tiled strategy's, with the potentials in global scratch and
no per-iteration launches; the early exit happens on chip. It pays off over
plain tiled launches for many mid-sized problems whose costs stay in L2;
where the tiled loop replays as a CUDA graph, tiled is faster (docs/design.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...triton_utils import LOG2E_K, num_warps_for
from .common import (
    NEG_INF,
    TILED_BLOCKS,
    TILED_ENTRIES_PER_THREAD,
    column_lse,
    column_updates,
    finish,
    plan_buffer,
    plan_rows,
    row_updates,
    split_reciprocal,
)

# "auto" streams at least this many problems whose costs total at most STREAMED_MAX_BYTES (so that
# the batch's C stays in L2) when the tiled loop cannot run as a CUDA graph.
STREAMED_MIN_BATCH = 32
STREAMED_MAX_BYTES = 32 << 20


@triton.jit
def _column_violation(
    c_ptr,
    log_u_ptr,
    log_v_ptr,
    b_ptr,
    N,
    M,
    stride_cn,
    stride_cm,
    stride_bm,
    neg_inv_hi,
    neg_inv_lo,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``sum_j |(P^T 1)_j - b_j|`` of one problem, with ``(P^T 1)_j = exp(log_v_j + LSE_i(-C_ij / eps + log_u_i))``."""
    err = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        lse = column_lse(c_ptr, log_u_ptr, cols, N, M, stride_cn, stride_cm, neg_inv_hi, neg_inv_lo, BLOCK_N, BLOCK_M, False)
        log_v = tl.load(log_v_ptr + cols, mask=col_ok, other=float("-inf"))
        wb = tl.load(b_ptr + cols * stride_bm, mask=col_ok, other=0.0)
        err += tl.abs(tl.math.exp2((log_v + lse) * LOG2E_K) - wb)
    return tl.sum(err)


@triton.jit
def streamed_kernel(
    c_ptr,
    a_ptr,
    b_ptr,
    log_u_ptr,
    log_v_ptr,
    plan_ptr,
    row_cost_ptr,
    iters_ptr,
    err_ptr,
    N,
    M,
    stride_cb,
    stride_cn,
    stride_cm,
    stride_ab,
    stride_an,
    stride_bb,
    stride_bm,
    stride_pb,
    stride_pn,
    stride_pm,
    neg_inv_hi,
    neg_inv_lo,
    n_iters,
    check_every,
    tol,
    HAS_TOL: tl.constexpr,
    WRITE_PLAN: tl.constexpr,
    ROW_BLOCK_N: tl.constexpr,
    ROW_BLOCK_M: tl.constexpr,
    COL_BLOCK_N: tl.constexpr,
    COL_BLOCK_M: tl.constexpr,
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
            column_updates(
                c_ptr,
                log_u_ptr,
                b_ptr,
                log_v_ptr,
                0,
                COL_BLOCK_M,
                N,
                M,
                stride_cn,
                stride_cm,
                stride_bm,
                neg_inv_hi,
                neg_inv_lo,
                COL_BLOCK_N,
                COL_BLOCK_M,
                False,
            )
            tl.debug_barrier()
            row_updates(
                c_ptr,
                log_v_ptr,
                a_ptr,
                log_u_ptr,
                0,
                ROW_BLOCK_N,
                N,
                M,
                stride_cn,
                stride_cm,
                stride_an,
                neg_inv_hi,
                neg_inv_lo,
                ROW_BLOCK_N,
                ROW_BLOCK_M,
                False,
            )
            tl.debug_barrier()
            iters += 1
            if HAS_TOL:
                if k % check_every == 0:
                    err = _column_violation(
                        c_ptr,
                        log_u_ptr,
                        log_v_ptr,
                        b_ptr,
                        N,
                        M,
                        stride_cn,
                        stride_cm,
                        stride_bm,
                        neg_inv_hi,
                        neg_inv_lo,
                        COL_BLOCK_N,
                        COL_BLOCK_M,
                    )
                    active = (err > tol).to(tl.int32)
    for n0 in range(0, N, ROW_BLOCK_N):
        rows = n0 + tl.arange(0, ROW_BLOCK_N)
        row_cost = plan_rows(
            c_ptr,
            log_u_ptr,
            log_v_ptr,
            plan_ptr + pid * stride_pb,
            rows,
            N,
            M,
            stride_cn,
            stride_cm,
            stride_pn,
            stride_pm,
            neg_inv_hi,
            neg_inv_lo,
            WRITE_PLAN,
            ROW_BLOCK_N,
            ROW_BLOCK_M,
            False,
        )
        tl.store(row_cost_ptr + pid * N + rows, row_cost, mask=rows < N)
    tl.store(iters_ptr + pid, iters.to(tl.int64))
    tl.store(err_ptr + pid, err)


def solve_streamed(C, a, b, eps, n_iters, tol, check_every, write_plan):
    batch, n, m = C.shape
    dev = C.device
    blocks = TILED_BLOCKS
    hi, lo = split_reciprocal(eps)
    log_u = torch.where(a > 0, 0.0, NEG_INF).contiguous()  # padded rows never enter a column update
    log_v = torch.zeros(batch, m, dtype=torch.float32, device=dev)
    plan = plan_buffer(batch, n, m, dev, write_plan)
    row_cost = torch.empty(batch, n, dtype=torch.float32, device=dev)
    iters = torch.empty(batch, dtype=torch.int64, device=dev)
    err = torch.empty(batch, dtype=torch.float32, device=dev)
    tile = max(blocks["row_block_n"] * blocks["row_block_m"], blocks["col_block_n"] * blocks["col_block_m"])
    streamed_kernel[(batch,)](
        C,
        a,
        b,
        log_u,
        log_v,
        plan,
        row_cost,
        iters,
        err,
        n,
        m,
        *C.stride(),
        *a.stride(),
        *b.stride(),
        *plan.stride(),
        hi,
        lo,
        int(n_iters),
        int(check_every),
        float(tol if tol is not None else 0.0),
        HAS_TOL=tol is not None,
        WRITE_PLAN=write_plan,
        ROW_BLOCK_N=blocks["row_block_n"],
        ROW_BLOCK_M=blocks["row_block_m"],
        COL_BLOCK_N=blocks["col_block_n"],
        COL_BLOCK_M=blocks["col_block_m"],
        num_warps=num_warps_for(tile, per_thread=TILED_ENTRIES_PER_THREAD),
    )
    return finish(a, b, eps, log_u, log_v, plan, row_cost, iters, err) if write_plan else row_cost
