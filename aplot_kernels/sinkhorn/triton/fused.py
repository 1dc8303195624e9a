"""The fused strategy: one program per problem holds ``-C / eps`` in registers and runs every iteration.

The tolerance check and early exit happen on chip; the epilogue writes plan,
potentials, cost, dual value, iteration count and error. For small problems
only (``FUSED_MAX_ELEMENTS``); docs/design.md has the register budget.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...triton_utils import LOG2E_K, block_size, num_warps_for
from ..reference import SolveOutput
from .common import absorbed_kernel, load_neg_cost, log_weight, logsumexp, plan_buffer, split_reciprocal

# Largest padded problem (next_pow2(N) * next_pow2(M)) one program holds in registers: 128 x 128
# in 16 warps compiles without spills for sm_90 (python -m bench.kernel_stats; docs/design.md).
FUSED_MAX_ELEMENTS = 128 * 128
FUSED_ENTRIES_PER_THREAD = 16


@triton.jit
def fused_iterations(neg_c, wa, wb, n_iters, check_every, tol, HAS_TOL: tl.constexpr):
    """Every Sinkhorn iteration of one problem held on chip.

    ``neg_c [BLOCK_N, BLOCK_M]``: ``-C / eps``, ``-inf`` outside the problem;
    ``wa [BLOCK_N]``, ``wb [BLOCK_M]``: the weights, 0 for padding. Returns
    ``(log_u, log_v, iters, err)``; ``err < 0`` when it was never measured.
    """
    log_a = log_weight(wa)
    log_b = log_weight(wb)

    # Zero potentials, except -inf on zero-weight rows: as in the reference, a padded row never
    # enters a column update, so a ragged problem equals itself alone.
    log_u = tl.where(wa > 0, 0.0, float("-inf"))
    log_v = tl.zeros_like(wb)
    # Column log-sum-exp of the current log_u: the next v-update and the marginal check both use it.
    col_lse = logsumexp(neg_c + log_u[:, None], 0)
    active = tl.full((), 1, tl.int32)
    iters = tl.full((), 0, tl.int32)
    err = tl.full((), -1.0, tl.float32)  # < 0: never measured
    for k in range(1, n_iters + 1):
        if active != 0:
            log_v = tl.where(wb > 0, log_b - col_lse, float("-inf"))
            log_u = tl.where(wa > 0, log_a - logsumexp(neg_c + log_v[None, :], 1), float("-inf"))
            col_lse = logsumexp(neg_c + log_u[:, None], 0)
            iters += 1
            if HAS_TOL:
                if k % check_every == 0:
                    # (P^T 1)_j = exp(log_v_j + col_lse_j)
                    err = tl.sum(tl.abs(tl.math.exp2((log_v + col_lse) * LOG2E_K) - wb))
                    active = (err > tol).to(tl.int32)
    return log_u, log_v, iters, err


@triton.jit
def fused_kernel(
    c_ptr,
    a_ptr,
    b_ptr,
    plan_ptr,
    row_cost_ptr,
    f_ptr,
    g_ptr,
    cost_ptr,
    reg_ptr,
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
    eps,
    neg_inv_hi,
    neg_inv_lo,
    n_iters,
    check_every,
    tol,
    HAS_TOL: tl.constexpr,
    WRITE_PLAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Problem ``program_id(0)``: every iteration and the epilogue, ``BLOCK_N x BLOCK_M`` >= the problem."""
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < M
    inside = row_ok[:, None] & col_ok[None, :]
    c_tile = c_ptr + pid * stride_cb + rows[:, None] * stride_cn + cols[None, :] * stride_cm
    wa = tl.load(a_ptr + pid * stride_ab + rows * stride_an, mask=row_ok, other=0.0).to(tl.float32)
    wb = tl.load(b_ptr + pid * stride_bb + cols * stride_bm, mask=col_ok, other=0.0).to(tl.float32)
    neg_c = load_neg_cost(c_tile, inside, neg_inv_hi, neg_inv_lo)
    log_u, log_v, iters, err = fused_iterations(neg_c, wa, wb, n_iters, check_every, tol, HAS_TOL)
    plan = absorbed_kernel(neg_c, log_u, log_v)
    store_outputs(
        plan,
        log_u,
        log_v,
        iters,
        err,
        wa,
        wb,
        c_tile,
        inside,
        rows,
        cols,
        row_ok,
        col_ok,
        pid,
        plan_ptr,
        row_cost_ptr,
        f_ptr,
        g_ptr,
        cost_ptr,
        reg_ptr,
        iters_ptr,
        err_ptr,
        N,
        M,
        stride_pb,
        stride_pn,
        stride_pm,
        eps,
        WRITE_PLAN,
    )


@triton.jit
def store_outputs(
    plan,
    log_u,
    log_v,
    iters,
    err,
    wa,
    wb,
    c_tile,
    inside,
    rows,
    cols,
    row_ok,
    col_ok,
    pid,
    plan_ptr,
    row_cost_ptr,
    f_ptr,
    g_ptr,
    cost_ptr,
    reg_ptr,
    iters_ptr,
    err_ptr,
    N,
    M,
    stride_pb,
    stride_pn,
    stride_pm,
    eps,
    WRITE_PLAN: tl.constexpr,
):
    """The fused kernels' epilogue: plan, potentials (0 on padding), row costs, cost, dual value, count, error."""
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


def solve_fused(C, a, b, eps, n_iters, tol, check_every, write_plan, num_warps=None, kernel=None):
    """Launch ``kernel`` (default :func:`fused_kernel`; the experimental scaling-domain kernel shares this host code)."""
    batch, n, m = C.shape
    block_n, block_m = block_size(n, hi=1 << 30), block_size(m, hi=1 << 30)
    dev = C.device
    plan = plan_buffer(batch, n, m, dev, write_plan)
    row_cost = torch.empty(batch, n, dtype=torch.float32, device=dev)
    f = torch.empty(batch, n, dtype=torch.float32, device=dev)
    g = torch.empty(batch, m, dtype=torch.float32, device=dev)
    cost, reg_cost, err = (torch.empty(batch, dtype=torch.float32, device=dev) for _ in range(3))
    iters = torch.empty(batch, dtype=torch.int64, device=dev)
    hi, lo = split_reciprocal(eps)
    (kernel or fused_kernel)[(batch,)](
        C,
        a,
        b,
        plan,
        row_cost,
        f,
        g,
        cost,
        reg_cost,
        iters,
        err,
        n,
        m,
        *C.stride(),
        *a.stride(),
        *b.stride(),
        *plan.stride(),
        float(eps),
        hi,
        lo,
        int(n_iters),
        int(check_every),
        float(tol if tol is not None else 0.0),
        HAS_TOL=tol is not None,
        WRITE_PLAN=write_plan,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        num_warps=num_warps or num_warps_for(block_n * block_m, per_thread=FUSED_ENTRIES_PER_THREAD),
    )
    if not write_plan:
        return row_cost
    return SolveOutput(plan, f, g, cost, reg_cost, iters, err)
