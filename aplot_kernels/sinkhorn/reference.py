"""Pure-PyTorch log-domain Sinkhorn: the ground truth for every kernel.

It follows POT's ``sinkhorn_log`` step for step (column potential first, then
row potential, from zero potentials) so that a fixed iteration count
reproduces POT's iterates. Written with differentiable torch ops only, so
``grad="unrolled"`` is plain autograd through this loop.

Every kernel backend implements :func:`solve` with the same signature and the
same outputs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class SolveOutput(NamedTuple):
    """What a backend's ``solve`` returns; all batched (leading ``B``)."""

    plan: torch.Tensor  # [B, N, M]
    f: torch.Tensor  # [B, N]
    g: torch.Tensor  # [B, M]
    cost: torch.Tensor  # [B]
    reg_cost: torch.Tensor  # [B]
    n_iters: torch.Tensor  # [B] int64
    err: torch.Tensor  # [B]


def empty_output(C: torch.Tensor, dtype: torch.dtype) -> SolveOutput:
    """An uninitialised :class:`SolveOutput` for ``C [B, N, M]`` in ``dtype``: what the solve ops' fake
    kernels return."""
    batch, n, m = C.shape
    new = C.new_empty
    return SolveOutput(
        new((batch, n, m), dtype=dtype),
        new((batch, n), dtype=dtype),
        new((batch, m), dtype=dtype),
        new((batch,), dtype=dtype),
        new((batch,), dtype=dtype),
        new((batch,), dtype=torch.int64),
        new((batch,), dtype=dtype),
    )


def column_violation(plan: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_j |(P^T 1)_j - b_j|`` per problem: ``[B, N, M], [B, M] -> [B]``."""
    return (plan.sum(-2) - b).abs().sum(-1)


def masked_log(weights: torch.Tensor) -> torch.Tensor:
    """``log(w)`` with ``-inf`` at zero weights and a zero (not NaN) gradient there."""
    positive = weights > 0
    return torch.where(positive, torch.log(torch.where(positive, weights, torch.ones_like(weights))), -torch.inf)


def finish(C, a, b, eps, log_u, log_v, n_iters, err) -> SolveOutput:
    """Plan, potentials and values from the scaled log potentials ``log_u = f / eps``, ``log_v = g / eps``.

    Potentials at zero-weight (padded) entries are reported as 0 and never
    reach ``reg_cost``, so padding cannot produce inf or NaN.
    """
    plan = torch.exp(log_u[:, :, None] + log_v[:, None, :] - C / eps)
    f = torch.where(a > 0, eps * log_u, torch.zeros_like(log_u))
    g = torch.where(b > 0, eps * log_v, torch.zeros_like(log_v))
    cost = (plan * C).sum((-2, -1))
    reg_cost = (a * f).sum(-1) + (b * g).sum(-1)
    if err is None:
        err = column_violation(plan, b)
    return SolveOutput(plan, f, g, cost, reg_cost, n_iters, err)


def solve(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    n_iters: int,
    tol: Optional[float],
    check_every: int,
) -> SolveOutput:
    """Run log-domain Sinkhorn on a batch of problems.

    Args:
        C: ``[B, N, M]`` cost, float32 or float64.
        a: ``[B, N]`` row weights, non-negative, zero for padding.
        b: ``[B, M]`` column weights, same total mass as ``a`` per problem.
        eps: entropic regularisation.
        n_iters: iterations to run (the cap when ``tol`` is set).
        tol: ``None`` for exactly ``n_iters`` iterations; otherwise each
            problem stops once its L1 column-marginal violation, measured
            after every ``check_every``-th iteration, is ``<= tol``.
    """
    batch, n, m = C.shape
    neg_c = -C / eps
    log_a, log_b = masked_log(a), masked_log(b)
    # Zero potentials, except -inf on padded rows: a padded row must not enter
    # the first column update, or a ragged problem would differ from itself alone.
    log_u = torch.where(a > 0, 0.0, -torch.inf).to(C.dtype)
    log_v = torch.zeros(batch, m, dtype=C.dtype, device=C.device)
    iters = torch.zeros(batch, dtype=torch.int64, device=C.device)
    active = torch.ones(batch, dtype=torch.bool, device=C.device)
    err = None
    for k in range(1, n_iters + 1):
        new_v = log_b - torch.logsumexp(neg_c + log_u[:, :, None], dim=1)
        new_u = log_a - torch.logsumexp(neg_c + new_v[:, None, :], dim=2)
        if tol is None:
            log_u, log_v = new_u, new_v
            continue
        log_v = torch.where(active[:, None], new_v, log_v)
        log_u = torch.where(active[:, None], new_u, log_u)
        iters = iters + active.long()
        if k % check_every == 0:
            plan = torch.exp(log_u[:, :, None] + log_v[:, None, :] + neg_c)
            measured = column_violation(plan, b)
            err = measured if err is None else torch.where(active, measured, err)
            active = active & (measured > tol)
            # Eager, the reference may synchronise to stop early (kernels must not). Compiled, it runs
            # the cap: converged problems are frozen above, so the results are the same.
            if not torch.compiler.is_compiling() and not bool(active.any()):
                break
    if tol is None:
        iters = torch.full((batch,), n_iters, dtype=torch.int64, device=C.device)
    return finish(C, a, b, eps, log_u, log_v, iters, err)
