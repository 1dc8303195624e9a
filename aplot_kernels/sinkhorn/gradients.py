"""Gradients of Sinkhorn that need no stored iterates, for every backend: the formulas.

:func:`envelope_backward` and :func:`implicit_backward` use only the plan and
potentials a backend's ``solve`` returned (no second solve), so a kernel
backend gets them for free. They are the ``register_autograd`` formulas of the
operators ``aplot_kernels::sinkhorn_envelope``, ``sinkhorn_implicit`` and
``sinkhorn_implicit_from_solution`` (:mod:`aplot_kernels.sinkhorn.ops`),
which carry tensors and numbers only in their autograd context.

Gradients with respect to the marginals ``a`` and ``b`` are centred (mean
zero over each problem's support, zero on padding), as POT does: the value
only changes along directions that keep each marginal's mass, so constants
carry no information.
"""

from __future__ import annotations

import torch


# Above this many unknowns (N + M), or this many float64 system entries over the
# whole batch (256 MiB), the implicit backward solves iteratively.
DIRECT_SOLVE_MAX = 2048
DIRECT_SOLVE_MAX_ENTRIES = 1 << 25


def centred(potential: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``potential - mean`` over each problem's support, zero elsewhere: ``[B, K] -> [B, K]``."""
    count = support.sum(-1, keepdim=True).clamp_min(1)
    mean = torch.where(support, potential, 0).sum(-1, keepdim=True) / count
    return torch.where(support, potential - mean, 0)


def envelope_backward(grad_reg, plan, f, g, a, b, c_dtype, needs_input_grad):
    """Envelope theorem: only ``reg_cost`` carries gradient, ``d/dC = P``, ``d/da = f``, ``d/db = g`` (centred).

    ``grad_reg [B]``, ``plan [B, N, M]``, ``f, a [B, N]``, ``g, b [B, M]`` ->
    ``(grad_C in c_dtype, grad_a, grad_b)``, each ``None`` unless ``needs_input_grad``
    (flags for ``C, a, b``) asks for it.
    """
    grad_c = (grad_reg[:, None, None] * plan).to(c_dtype) if needs_input_grad[0] else None
    grad_a = grad_reg[:, None] * centred(f, a > 0) if needs_input_grad[1] else None
    grad_b = grad_reg[:, None] * centred(g, b > 0) if needs_input_grad[2] else None
    return grad_c, grad_a, grad_b


def implicit_backward(plan, f, g, C, a, b, eps, grads, needs_input_grad):
    """Exact gradients of plan, potentials, cost and reg_cost at the fixed point.

    ``grads = (grad_plan [B, N, M], grad_f [B, N], grad_g [B, M], grad_cost [B], grad_reg [B])``,
    any of them ``None`` (zero) -> ``(grad_C in C's dtype, grad_a, grad_b)``, each ``None`` unless
    ``needs_input_grad`` (flags for ``C, a, b``) asks for it.

    At the fixed point the marginal residuals ``P 1 - a`` and ``P^T 1 - b``
    vanish. Their Jacobian in ``(f, g)`` is ``H / eps`` with
    ``H = [[diag(a), P], [P^T, diag(b)]]``, singular along the gauge
    direction ``z = (1, -1)`` (``f + t, g - t`` gives the same plan). The
    backward solves ``H nu = h`` once per problem, with ``h`` projected onto
    ``range(H)``; potentials are only defined up to that gauge, so gradients
    through ``f`` and ``g`` are exact for gauge-invariant uses of them
    (centred potentials, ``f_i + g_j``, the plan), as with any solver.
    """
    grad_plan, grad_f, grad_g, grad_cost, grad_reg = grads
    c_dtype, C = C.dtype, C.to(plan.dtype)
    batch, n, m = plan.shape
    zeros = plan.new_zeros
    grad_plan = zeros(batch, n, m) if grad_plan is None else grad_plan
    grad_f = zeros(batch, n) if grad_f is None else grad_f
    grad_g = zeros(batch, m) if grad_g is None else grad_g
    grad_cost = zeros(batch) if grad_cost is None else grad_cost
    grad_reg = zeros(batch) if grad_reg is None else grad_reg
    rows, cols = a > 0, b > 0

    # Explicit dependence of the outputs on (f, g, C, a, b), P = exp((f + g - C) / eps).
    weighted = (grad_plan + grad_cost[:, None, None] * C) * plan
    h_f = grad_f + grad_reg[:, None] * a + weighted.sum(-1) / eps
    h_g = grad_g + grad_reg[:, None] * b + weighted.sum(-2) / eps
    grad_c = grad_cost[:, None, None] * plan - weighted / eps
    grad_a = grad_reg[:, None] * f
    grad_b = grad_reg[:, None] * g

    # Dependence through the fixed point.
    h_f, h_g = torch.where(rows, h_f, 0), torch.where(cols, h_g, 0)
    gauge = torch.cat([rows.to(plan.dtype), -cols.to(plan.dtype)], -1)
    h = torch.cat([h_f, h_g], -1)
    h = h - gauge * ((h * gauge).sum(-1, keepdim=True) / (gauge * gauge).sum(-1, keepdim=True))
    nu = _solve_fixed_point_system(plan, torch.where(rows, a, 1), torch.where(cols, b, 1), gauge, h)
    nu_f, nu_g = nu[:, :n], nu[:, n:]
    return (
        (grad_c + plan * (nu_f[:, :, None] + nu_g[:, None, :])).to(c_dtype) if needs_input_grad[0] else None,
        centred(grad_a + eps * nu_f, rows) if needs_input_grad[1] else None,
        centred(grad_b + eps * nu_g, cols) if needs_input_grad[2] else None,
    )


def _solve_fixed_point_system(plan, diag_a, diag_b, gauge, rhs):
    """Solve ``H nu = rhs`` for ``H = [[diag(a), P], [P^T, diag(b)]]``, ``rhs`` orthogonal to ``gauge``.

    Padded rows and columns of ``P`` are zero and carry a unit diagonal, so
    they decouple. Small systems: a direct solve of ``H + gauge gauge^T``
    (non-singular, same solution on ``range(H)``), by its Schur complement
    (:func:`_schur_solve`). Large ones: Jacobi-preconditioned conjugate
    gradients, which stay in ``range(H)``.
    """
    batch, n, m = plan.shape
    if n + m <= DIRECT_SOLVE_MAX and batch * (n + m) ** 2 <= DIRECT_SOLVE_MAX_ENTRIES:
        # float64 keeps the solve accurate when eps is small and H is ill-conditioned.
        if n < m:  # eliminate the longer side: the system left is min(n, m) wide
            nu_g, nu_f = _schur_solve(
                plan.transpose(-1, -2).double(),
                diag_b.double(),
                diag_a.double(),
                -gauge[:, n:].double(),
                -gauge[:, :n].double(),
                rhs[:, n:].double(),
                rhs[:, :n].double(),
            )
        else:
            nu_f, nu_g = _schur_solve(
                plan.double(),
                diag_a.double(),
                diag_b.double(),
                gauge[:, :n].double(),
                gauge[:, n:].double(),
                rhs[:, :n].double(),
                rhs[:, n:].double(),
            )
        return torch.cat([nu_f, nu_g], -1).to(plan.dtype)
    return _conjugate_gradients(plan, diag_a, diag_b, rhs)


def _schur_solve(plan, diag_a, diag_b, u, v, h_f, h_g):
    """``(nu_f, nu_g)`` solving ``(H + z z^T) nu = h`` with ``z = (u, v)``, by eliminating ``nu_f``.

    With ``A = diag(a) + u u^T``, ``B = P + u v^T`` and ``D = diag(b) + v v^T``
    the system is ``[[A, B], [B^T, D]]``; ``A^{-1} = diag(1/a) - w w^T / gamma``
    (``w = u / a``, ``gamma = 1 + u.w``), and ``nu_g`` solves the ``[M, M]``
    Schur complement ``D - B^T A^{-1} B``, which is positive definite because
    ``H + z z^T`` is. One ``N x M x M`` product and an ``M x M`` solve instead
    of factorising the ``(N + M)``-wide system: about a fifth of the work at
    ``N = M``.
    """
    batch, n, m = plan.shape
    w = u / diag_a
    gamma = 1.0 + (u * w).sum(-1, keepdim=True)

    def a_inverse(x):  # A^{-1} x for x [B, N] or [B, N, K]
        if x.dim() == 2:
            return x / diag_a - w * ((w * x).sum(-1, keepdim=True) / gamma)
        return x / diag_a[:, :, None] - w[:, :, None] * (torch.einsum("bn,bnk->bk", w, x)[:, None, :] / gamma[:, :, None])

    coupling = plan + u[:, :, None] * v[:, None, :]  # B
    schur = torch.diag_embed(diag_b) + v[:, :, None] * v[:, None, :] - torch.bmm(coupling.transpose(-1, -2), a_inverse(coupling))
    reduced = h_g - torch.bmm(coupling.transpose(-1, -2), a_inverse(h_f)[:, :, None])[..., 0]
    nu_g = torch.linalg.solve(schur, reduced)
    nu_f = a_inverse(h_f - torch.bmm(coupling, nu_g[:, :, None])[..., 0])
    return nu_f, nu_g


def _conjugate_gradients(plan, diag_a, diag_b, rhs, max_iters: int = 1000, rtol: float = 1e-10):
    n = plan.shape[1]
    inv_diag = 1.0 / torch.cat([diag_a, diag_b], -1)

    def apply(x):
        x_f, x_g = x[:, :n], x[:, n:]
        top = diag_a * x_f + torch.bmm(plan, x_g[:, :, None])[..., 0]
        bottom = torch.bmm(plan.transpose(-1, -2), x_f[:, :, None])[..., 0] + diag_b * x_g
        return torch.cat([top, bottom], -1)

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = inv_diag * r
    p = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    stop = (rtol * rtol) * (rhs * rhs).sum(-1, keepdim=True)
    for it in range(max_iters):
        # A problem whose residual has reached the tolerance is frozen: its later steps would divide
        # rounding noise by rounding noise (H is singular along the gauge, so p.Hp can reach 0 or
        # turn negative), which overflowed to NaN on CUDA. No host synchronisation here.
        active = (r * r).sum(-1, keepdim=True) > stop
        hp = apply(p)
        curvature = (p * hp).sum(-1, keepdim=True)
        step = active & (curvature > 0)
        alpha = torch.where(step, rz / torch.where(step, curvature, 1), 0)
        x = x + alpha * p
        r = r - alpha * hp
        z = inv_diag * r
        rz_new = (r * z).sum(-1, keepdim=True)
        keep = step & (rz > 0)
        p = z + torch.where(keep, rz_new / torch.where(keep, rz, 1), 0) * p
        rz = rz_new
        if it % 20 == 19 and bool(((r * r).sum(-1, keepdim=True) <= stop).all()):
            break
    return x
