"""The tiled strategy: per iteration the host launches a column pass and a row pass over ``C``.

Each pass streams ``C`` tile by tile with an online log-sum-exp, so any size
fits. No host synchronisation in the loop: per-problem ``active`` flags live on
the device, and a check kernel (every ``check_every``-th iteration) measures the
column-marginal violation and clears them. The check's column log-sum-exp is
the next v-update, so the check kernel applies it too and tolerance checks cost
no extra pass over ``C``. On a GPU, problems up to ``GRAPH_MAX_ENTRIES``
entries replay the loop as a CUDA graph, since their passes are shorter than a
launch from Python (docs/design.md).
"""

from __future__ import annotations

import collections
import os
import threading

import torch
import triton
import triton.language as tl

from ...triton_utils import LOG2E_K, block_size, cdiv, num_warps_for
from ..reference import SolveOutput
from .common import (
    NEG_INF,
    TILED_BLOCKS,
    TILED_ENTRIES_PER_THREAD,
    column_lse,
    finish,
    plan_buffer,
    plan_rows,
    potential,
    row_lse,
    split_reciprocal,
)

# CUDA graphs of the host loop: each cached graph keeps a copy of its inputs and outputs on the
# device, so only problems of at most GRAPH_MAX_ENTRIES entries (32 MiB of float32 C) are captured;
# larger ones take longer per pass than a launch, which then overlaps. APLOT_KERNELS_CUDA_GRAPHS=0
# turns the graphs off (README).
GRAPH_MAX_ENTRIES = 1 << 23
GRAPH_CACHE_SIZE = 8


@triton.jit
def column_pass_kernel(
    c_ptr,
    log_u_ptr,
    b_ptr,
    out_ptr,
    active_ptr,
    N,
    M,
    stride_cb,
    stride_cn,
    stride_cm,
    stride_bb,
    stride_bm,
    neg_inv_hi,
    neg_inv_lo,
    WRITE_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``lse_j = LSE_i(-C_ij / eps + log_u_i)``; writes ``log_v = log b - lse`` (``WRITE_V``) or ``lse``."""
    pid_b = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + pid_b) != 0:
        cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        lse = column_lse(
            c_ptr + pid_b * stride_cb,
            log_u_ptr + pid_b * N,
            cols,
            N,
            M,
            stride_cn,
            stride_cm,
            neg_inv_hi,
            neg_inv_lo,
            BLOCK_N,
            BLOCK_M,
            False,
        )
        if WRITE_V:
            wb = tl.load(b_ptr + pid_b * stride_bb + cols * stride_bm, mask=col_ok, other=0.0)
            lse = potential(wb, lse)
        tl.store(out_ptr + pid_b * M + cols, lse, mask=col_ok)


@triton.jit
def row_pass_kernel(
    c_ptr,
    log_v_ptr,
    a_ptr,
    log_u_ptr,
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
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``log_u_i = log a_i - LSE_j(-C_ij / eps + log_v_j)``."""
    pid_b = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + pid_b) != 0:
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        lse = row_lse(
            c_ptr + pid_b * stride_cb,
            log_v_ptr + pid_b * M,
            rows,
            N,
            M,
            stride_cn,
            stride_cm,
            neg_inv_hi,
            neg_inv_lo,
            BLOCK_N,
            BLOCK_M,
            False,
        )
        wa = tl.load(a_ptr + pid_b * stride_ab + rows * stride_an, mask=row_ok, other=0.0)
        tl.store(log_u_ptr + pid_b * N + rows, potential(wa, lse), mask=row_ok)


@triton.jit
def check_kernel(
    col_lse_ptr,
    log_v_ptr,
    b_ptr,
    active_ptr,
    err_ptr,
    iters_ptr,
    M,
    stride_bb,
    stride_bm,
    tol,
    k,
    apply_next_v,
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
                tl.store(log_v_ptr + pid_b * M + cols, potential(wb, lse), mask=col_ok)


@triton.jit
def plan_kernel(
    c_ptr,
    log_u_ptr,
    log_v_ptr,
    plan_ptr,
    row_cost_ptr,
    N,
    M,
    stride_cb,
    stride_cn,
    stride_cm,
    stride_pb,
    stride_pn,
    stride_pm,
    neg_inv_hi,
    neg_inv_lo,
    WRITE_PLAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The row sums of ``P * C`` and, when ``WRITE_PLAN``, the plan; one block of rows per program."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_cost = plan_rows(
        c_ptr + pid_b * stride_cb,
        log_u_ptr + pid_b * N,
        log_v_ptr + pid_b * M,
        plan_ptr + pid_b * stride_pb,
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
        BLOCK_N,
        BLOCK_M,
        False,
    )
    tl.store(row_cost_ptr + pid_b * N + rows, row_cost, mask=rows < N)


def solve_tiled(C, a, b, eps, n_iters, tol, check_every, write_plan):
    batch, n, m = C.shape
    dev = C.device
    blocks = TILED_BLOCKS
    hi, lo = split_reciprocal(eps)
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
        column_pass_kernel[col_grid](
            C,
            log_u,
            b,
            out,
            active,
            n,
            m,
            *C.stride(),
            *b.stride(),
            hi,
            lo,
            WRITE_V=write_v,
            BLOCK_N=blocks["col_block_n"],
            BLOCK_M=blocks["col_block_m"],
            num_warps=col_warps,
        )

    v_ready = False  # the check kernel already applied this iteration's v-update
    for k in range(1, n_iters + 1):
        if not v_ready:
            column_pass(log_v, True)
        row_pass_kernel[row_grid](
            C,
            log_v,
            a,
            log_u,
            active,
            n,
            m,
            *C.stride(),
            *a.stride(),
            hi,
            lo,
            BLOCK_N=blocks["row_block_n"],
            BLOCK_M=blocks["row_block_m"],
            num_warps=row_warps,
        )
        v_ready = tol is not None and k % check_every == 0
        if v_ready:
            column_pass(col_lse, False)
            check_kernel[(batch,)](
                col_lse,
                log_v,
                b,
                active,
                err,
                iters,
                m,
                *b.stride(),
                float(tol),
                k,
                int(k < n_iters),
                BLOCK=min(blocks["check_block"], block_size(m, hi=1 << 30)),
                num_warps=4,
            )

    return plan_epilogue(C, a, b, eps, log_u, log_v, iters, err, write_plan)


def plan_epilogue(C, a, b, eps, log_u, log_v, iters, err, write_plan):
    """The host-looped strategies' end: plan (when ``write_plan``) and row costs from the potentials."""
    batch, n, m = C.shape
    blocks = TILED_BLOCKS
    hi, lo = split_reciprocal(eps)
    plan = plan_buffer(batch, n, m, C.device, write_plan)
    row_cost = torch.empty(batch, n, dtype=torch.float32, device=C.device)
    plan_kernel[(batch, cdiv(n, blocks["row_block_n"]))](
        C,
        log_u,
        log_v,
        plan,
        row_cost,
        n,
        m,
        *C.stride(),
        *plan.stride(),
        hi,
        lo,
        WRITE_PLAN=write_plan,
        BLOCK_N=blocks["row_block_n"],
        BLOCK_M=blocks["row_block_m"],
        num_warps=num_warps_for(blocks["row_block_n"] * blocks["row_block_m"], per_thread=TILED_ENTRIES_PER_THREAD),
    )
    return finish(a, b, eps, log_u, log_v, plan, row_cost, iters, err) if write_plan else row_cost


def use_graph(C: torch.Tensor) -> bool:
    return (
        C.is_cuda
        and C.numel() <= GRAPH_MAX_ENTRIES
        and os.environ.get("APLOT_KERNELS_CUDA_GRAPHS", "1") not in ("", "0")
        and not torch.cuda.is_current_stream_capturing()  # inside a caller's capture: launch into it
    )


class GraphedSolve:
    """A host-looped solve (``solve_tiled``, the experimental ``solve_onepass``) on fixed input buffers, captured once as a
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


graphs: "collections.OrderedDict[tuple, GraphedSolve]" = collections.OrderedDict()
ungraphable: set = set()
# A cached graph owns fixed input and output buffers. Graphs are kept per stream, so that a replay
# on one stream never overwrites the buffers of a replay still running on another; the lock keeps
# two threads on one stream from interleaving their copy-in, replay and copy-out.
graphs_lock = threading.Lock()


def solve_graphed(solve, C, a, b, eps, n_iters, tol, check_every, write_plan):
    options = (eps, n_iters, tol, check_every, write_plan)
    stream = torch.cuda.current_stream(C.device)
    key = (solve.__name__, C.device, stream.cuda_stream, tuple(C.shape), C.dtype, options)
    with graphs_lock:
        if key in ungraphable:
            return solve(C, a, b, *options)
        graphed = graphs.get(key)
        if graphed is None:
            try:
                graphed = GraphedSolve(solve, C, a, b, options)
            except RuntimeError:  # capture refused (e.g. by another capture on this device): plain launches
                ungraphable.add(key)
                return solve(C, a, b, *options)
            graphs[key] = graphed
            while len(graphs) > GRAPH_CACHE_SIZE:
                graphs.popitem(last=False)
        graphs.move_to_end(key)
        return graphed(C, a, b)
