"""Experimental: the fused strategy iterating in the scaling domain (``strategy="fused-scaling"``).

It holds the Gibbs kernel ``exp(-C / eps + lu + lv)`` for absorbed log
potentials and updates the scalings ``v = b / K^T u``, ``u = a / K v``: two
matrix-vector products per iteration and no ``exp``. An iteration whose
scalings leave ``[2**-32, 2**32]`` runs again in the log domain and is absorbed
into a new kernel, which keeps small ``eps`` exact. Fewer instructions per
iteration than "fused" when compiled, but not yet timed on a GPU, so "auto"
never picks it (docs/design.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common import absorbed_kernel, load_neg_cost, log_weight, logsumexp
from ..fused import solve_fused, store_outputs

# Scalings of non-zero weights stay within [SCALING_LO, SCALING_HI]; an iteration that leaves the
# range runs again in the log domain (see scaling_iterations).
SCALING_LO_K = tl.constexpr(2.0**-32)
SCALING_HI_K = tl.constexpr(2.0**32)


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
def reload_neg_cost(source, RELOAD_FLAG: tl.constexpr, RELOAD_BLOCK: tl.constexpr):
    """``RELOAD`` of :func:`scaling_iterations` for a cost in memory: ``source = (c_tile, inside, hi, lo)``."""
    c_tile, inside, neg_inv_hi, neg_inv_lo = source
    return load_neg_cost(c_tile, inside, neg_inv_hi, neg_inv_lo)


@triton.jit
def scaling_iterations(
    neg_c,
    RELOAD: tl.constexpr,
    source,
    RELOAD_FLAG: tl.constexpr,
    RELOAD_BLOCK: tl.constexpr,
    wa,
    wb,
    n_iters,
    check_every,
    tol,
    HAS_TOL: tl.constexpr,
):
    """:func:`..fused.fused_iterations` in the scaling domain: the same iterates without an ``exp`` per iteration.

    Holds ``K = exp(-C / eps + lu_i + lv_j)`` for absorbed log potentials
    ``(lu, lv)`` and iterates the scalings ``v = b / (K^T u)``, ``u = a / (K v)``,
    so ``log_u = lu + log(u)``: an iteration is two matrix-vector products.
    An iteration whose scalings leave ``[SCALING_LO, SCALING_HI]`` (or
    overflow, or divide by an underflowed sum) is discarded: the state before
    it is absorbed into ``(lu, lv)``, ``-C / eps`` is formed again by
    ``RELOAD(source, RELOAD_FLAG, RELOAD_BLOCK)`` (the caller's: read from
    memory, or recomputed from the embeddings; the two compile-time arguments
    are passed through for it, as a tuple would not keep them constant), the iteration runs in the log domain as in
    :func:`..fused.fused_iterations`, and its result is absorbed into a new ``K``.
    ``neg_c``: the first ``-C / eps`` tile, ``-inf`` outside the problem; it is
    not kept through the loop.
    Entries of ``K`` that underflow are below ``2**-126``; times scalings of at
    most ``SCALING_HI`` each they stay below ``2**-62`` of the plan.

    Returns ``(log_u, log_v, iters, err, plan)`` as :func:`..fused.fused_iterations` plus the plan tile.
    """
    log_a = log_weight(wa)
    log_b = log_weight(wb)
    real_row = wa > 0
    real_col = wb > 0
    lu = tl.where(real_row, 0.0, float("-inf"))
    lv = tl.zeros_like(wb)
    kernel = absorbed_kernel(neg_c, lu, lv)
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
                lv = tl.where(real_col, log_b - logsumexp(neg_c + lu[:, None], 0), float("-inf"))
                lu = tl.where(real_row, log_a - logsumexp(neg_c + lv[None, :], 1), float("-inf"))
                kernel = absorbed_kernel(neg_c, lu, lv)
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
def fused_scaling_kernel(
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
    """:func:`..fused.fused_kernel` with :func:`scaling_iterations` as its loop (same arguments)."""
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
    log_u, log_v, iters, err, plan = scaling_iterations(
        neg_c,
        reload_neg_cost,
        (c_tile, inside, neg_inv_hi, neg_inv_lo),
        False,
        1,
        wa,
        wb,
        n_iters,
        check_every,
        tol,
        HAS_TOL,
    )
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


def solve_fused_scaling(C, a, b, eps, n_iters, tol, check_every, write_plan, num_warps=None):
    return solve_fused(C, a, b, eps, n_iters, tol, check_every, write_plan, num_warps, kernel=fused_scaling_kernel)
