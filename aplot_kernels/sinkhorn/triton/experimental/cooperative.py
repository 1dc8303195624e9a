"""Experimental: the streamed loop with each problem split over programs (``strategy="cooperative"``).

Each of up to one program per SM (so that all are resident) owns every
``parts``-th block of rows and of columns; the parts meet at a barrier in
global memory (an atomic counter per problem) after every pass. A 512 x 512
problem spreads over 64 programs instead of one. Off a GPU each problem is one
program (the interpreter runs programs one after another). Not yet timed on a
GPU, so "auto" never picks it (docs/design.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ....triton_utils import LOG2E_K, cdiv, num_warps_for
from ..common import (
    NEG_INF,
    TILED_ENTRIES_PER_THREAD,
    column_lse,
    column_updates,
    finish,
    plan_buffer,
    plan_rows,
    potential,
    row_updates,
    split_reciprocal,
)

# Small blocks, so that a 512 x 512 problem spreads over 64 programs (8 rows and 8 columns each).
COOPERATIVE_BLOCKS = dict(row_block_n=8, row_block_m=128, col_block_n=128, col_block_m=8)


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
def cooperative_kernel(
    c_ptr,
    a_ptr,
    b_ptr,
    log_u_ptr,
    log_v_ptr,
    col_lse_ptr,
    partial_err_ptr,
    sync_ptr,
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
                column_updates(
                    c_ptr,
                    log_u_ptr,
                    b_ptr,
                    log_v_ptr,
                    part * COL_BLOCK_M,
                    parts * COL_BLOCK_M,
                    N,
                    M,
                    stride_cn,
                    stride_cm,
                    stride_bm,
                    neg_inv_hi,
                    neg_inv_lo,
                    COL_BLOCK_N,
                    COL_BLOCK_M,
                    True,
                )
                phase += 1
                _problem_barrier(sync_ptr, phase * parts)
            row_updates(
                c_ptr,
                log_v_ptr,
                a_ptr,
                log_u_ptr,
                part * ROW_BLOCK_N,
                parts * ROW_BLOCK_N,
                N,
                M,
                stride_cn,
                stride_cm,
                stride_an,
                neg_inv_hi,
                neg_inv_lo,
                ROW_BLOCK_N,
                ROW_BLOCK_M,
                True,
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
                        lse = column_lse(
                            c_ptr,
                            log_u_ptr,
                            cols,
                            N,
                            M,
                            stride_cn,
                            stride_cm,
                            neg_inv_hi,
                            neg_inv_lo,
                            COL_BLOCK_N,
                            COL_BLOCK_M,
                            True,
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
                            tl.store(log_v_ptr + cols, potential(wb, lse), mask=col_ok)
                        v_ready = 1
                        # The partial errors are rewritten at the next check, after this barrier and the
                        # row pass's: every part has summed them by then.
                        phase += 1
                        _problem_barrier(sync_ptr, phase * parts)
    for n0 in range(part * ROW_BLOCK_N, N, parts * ROW_BLOCK_N):
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
            True,
        )
        tl.store(row_cost_ptr + pid * N + rows, row_cost, mask=rows < N)
    if part == 0:
        tl.store(iters_ptr + pid, iters.to(tl.int64))
        tl.store(err_ptr + pid, err)


def resident_programs(device: torch.device) -> int:
    """Programs of one launch that surely run at the same time: one per SM on a GPU.

    Off a GPU, one: the Triton interpreter runs programs one after another, so
    a barrier between two of them would never open. Under MPS with a reduced
    share of the SMs the device still reports all of them, and a cooperative
    launch could wait forever: one reason the strategy is experimental.
    """
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def cooperative_parts(C: torch.Tensor) -> int:
    """Programs per problem: enough to cover the row and column blocks, all of them resident."""
    batch, n, m = C.shape
    blocks = COOPERATIVE_BLOCKS
    wanted = max(cdiv(n, blocks["row_block_n"]), cdiv(m, blocks["col_block_m"]))
    return max(1, min(wanted, resident_programs(C.device) // batch))


def solve_cooperative(C, a, b, eps, n_iters, tol, check_every, write_plan, parts=None):
    batch, n, m = C.shape
    dev = C.device
    parts = parts or cooperative_parts(C)
    if parts > 1 and batch * parts > resident_programs(dev):
        raise ValueError(
            f"the cooperative strategy needs all {batch * parts} programs resident at once; {resident_programs(dev)} are on {dev}"
        )
    blocks = COOPERATIVE_BLOCKS
    hi, lo = split_reciprocal(eps)
    log_u = torch.where(a > 0, 0.0, NEG_INF).contiguous()  # padded rows never enter a column update
    log_v = torch.zeros(batch, m, dtype=torch.float32, device=dev)
    col_lse = torch.empty(batch, m, dtype=torch.float32, device=dev)
    partial_err = torch.empty(batch, parts, dtype=torch.float32, device=dev)
    sync = torch.zeros(batch, dtype=torch.int32, device=dev)
    plan = plan_buffer(batch, n, m, dev, write_plan)
    row_cost = torch.empty(batch, n, dtype=torch.float32, device=dev)
    iters = torch.empty(batch, dtype=torch.int64, device=dev)
    err = torch.empty(batch, dtype=torch.float32, device=dev)
    tile = max(blocks["row_block_n"] * blocks["row_block_m"], blocks["col_block_n"] * blocks["col_block_m"])
    cooperative_kernel[(batch, parts)](
        C,
        a,
        b,
        log_u,
        log_v,
        col_lse,
        partial_err,
        sync,
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
