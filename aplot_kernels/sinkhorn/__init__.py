"""Entropic optimal transport by log-domain Sinkhorn (docs/contract.md section 2).

This module is the one dispatch point for Sinkhorn: :func:`sinkhorn` checks
arguments, broadcasts marginals to a batch, picks the backend and the
gradient mode. The iteration itself lives in
:mod:`aplot_kernels.sinkhorn.reference` (the ground truth) and in the kernel
modules beside it (the ``triton`` package, ``native.py``), which all implement
``solve(C, a, b, eps, n_iters, tol, check_every) -> SolveOutput``. The
gradient modes that need no stored iterates are registered operators
(``ops.py``, formulas in ``gradients.py``) around any backend's solve.

The module itself is callable, so ``aplot_kernels.sinkhorn(C)`` and
``from aplot_kernels.sinkhorn import sinkhorn`` both work.
"""

from __future__ import annotations

import sys
import types
from typing import NamedTuple, Optional

import torch

from .. import _checks, backends
from .._precision import autocast_off, float32_or_wider
from . import native, ops

__all__ = ["sinkhorn", "SinkhornResult", "GRAD_MODES"]

GRAD_MODES = ("envelope", "implicit", "unrolled", "none")
MASS_RTOL = 1e-5


class SinkhornResult(NamedTuple):
    """Outputs of :func:`sinkhorn`; batch dimensions as the input cost.

    Attributes:
        plan: ``[.., N, M]`` transport plan ``exp((f_i + g_j - C_ij) / eps)``.
        f: ``[.., N]`` row potential (``eps * log_u`` in POT's terms; 0 on padding).
        g: ``[.., M]`` column potential (0 on padding).
        cost: ``[..]`` transport cost ``<P, C>``.
        reg_cost: ``[..]`` dual value ``<a, f> + <b, g>``.
        n_iters: ``[..]`` int64, iterations each problem ran.
        err: ``[..]`` last measured L1 column-marginal violation.
    """

    plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    cost: torch.Tensor
    reg_cost: torch.Tensor
    n_iters: torch.Tensor
    err: torch.Tensor


def _kernels(backend: str):
    """A kernel backend's module (Triton imported on first use: only importable where it is installed)."""
    if backend == "native":
        return native
    from . import triton

    return triton


def _marginal(name: str, weights: Optional[torch.Tensor], C: torch.Tensor, axis: int, dtype) -> torch.Tensor:
    """Check one marginal and broadcast it to ``[B, K]`` in ``dtype`` (uniform when ``None``)."""
    batch, size = C.shape[0], C.shape[axis]
    if weights is None:
        return torch.full((batch, size), 1.0 / size, dtype=dtype, device=C.device)
    _checks.tensor(name, weights, ndims=(1, 2))
    _checks.same_device(C=C, **{name: weights})
    if weights.shape[-1] != size or (weights.dim() == 2 and weights.shape[0] != batch):
        raise ValueError(
            f"`{name}` must have shape [{size}] or [{batch}, {size}] to match `C` dimension {axis}, got {tuple(weights.shape)}"
        )
    _checks.require(weights.min, lambda low: low >= 0, f"`{name}` must be non-negative")
    _checks.require(
        lambda: weights.sum(-1).min(), lambda mass: mass > 0, f"`{name}` must have positive total mass in every problem"
    )
    return weights.to(dtype).expand(batch, size)


@autocast_off
def sinkhorn(
    C: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    eps: float = 0.1,
    n_iters: int = 50,
    tol: Optional[float] = None,
    check_every: int = 10,
    grad: str = "envelope",
    backend: str = "auto",
) -> SinkhornResult:
    """Solve ``min_P <P, C> + eps * KL(P | a b^T)`` s.t. ``P 1 = a``, ``P^T 1 = b`` for every problem.

    Log-domain Sinkhorn from zero potentials, each iteration updating the
    column potential then the row potential (POT's ``sinkhorn_log`` order).

    Args:
        C: ``[N, M]`` or ``[B, N, M]`` cost.
        a: ``[N]`` or ``[B, N]`` non-negative row weights; ``None`` is uniform.
            Zero weights are padding: their plan rows are exactly zero.
        b: ``[M]`` or ``[B, M]`` column weights, same total as ``a`` per problem
            (within 1e-5 relative; within their own rounding for half-precision weights).
        eps: entropic regularisation, ``> 0``.
        n_iters: iterations (with ``tol``, the cap).
        tol: stop each problem once its L1 column-marginal violation, checked
            after every ``check_every``-th iteration, is ``<= tol``.
        grad: ``"envelope"``, ``"implicit"``, ``"unrolled"`` or ``"none"``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.

    Returns:
        :class:`SinkhornResult`. Half-precision inputs return float32.
    """
    with _checks.one_sync():
        _checks.tensor("C", C, ndims=(2, 3), check_finite=False)  # finite: checked with eps below
        eps = _checks.positive("eps", eps)
        n_iters = _checks.positive_int("n_iters", n_iters)
        check_every = _checks.positive_int("check_every", check_every)
        if tol is not None:
            tol = _checks.positive("tol", tol, allow_zero=True)
        _checks.choice("grad", grad, GRAD_MODES)
        compute_dtype = float32_or_wider(C)
        _checks.sinkhorn_eps("eps", eps, compute_dtype, C)
        impl = backends.resolve(backend, C.device, C.dtype, needs_reference=grad == "unrolled")

        unbatched = C.dim() == 2
        if unbatched:
            for name, w in (("a", a), ("b", b)):
                if isinstance(w, torch.Tensor) and w.dim() != 1:
                    raise ValueError(f"`{name}` must be 1-D for a 2-D cost `C`, got shape {tuple(w.shape)}")
        C3 = C.unsqueeze(0) if unbatched else C
        a_full = _marginal("a", a, C3, 1, compute_dtype)
        b_full = _marginal("b", b, C3, 2, compute_dtype)
        if a is not None or b is not None:  # uniform weights have equal masses by construction
            # Half-precision weights cannot sum to 1e-5 accuracy: allow their own rounding.
            mass_rtol = max([MASS_RTOL] + [torch.finfo(w.dtype).eps for w in (a, b) if w is not None])
            _checks.require(
                lambda: _mass_mismatch(a_full.sum(-1), b_full.sum(-1), mass_rtol),
                lambda excess: excess <= 0,
                f"`a` and `b` must have the same total mass in every problem (within {mass_rtol:g} relative)",
            )
    return _solve(C, a_full, b_full, impl, eps, n_iters, tol, check_every, grad)


def _mass_mismatch(mass_a: torch.Tensor, mass_b: torch.Tensor, rtol: float) -> torch.Tensor:
    """Largest ``|mass_a - mass_b| - rtol * max(mass_a, mass_b)`` over the problems: positive where they differ."""
    return ((mass_a - mass_b).abs() - rtol * torch.maximum(mass_a, mass_b)).max()


def sinkhorn_checked(C: torch.Tensor, *, eps: float, n_iters: int, grad: str, backend: str) -> SinkhornResult:
    """:func:`sinkhorn` with uniform marginals on a cost already known to be valid (one the library
    computed from checked inputs): no argument checks, hence no host synchronisation."""
    impl = backends.resolve(backend, C.device, C.dtype, needs_reference=grad == "unrolled")
    return _solve(C, None, None, impl, eps, n_iters, None, 1, grad)


def _solve(C, a_full, b_full, impl, eps, n_iters, tol, check_every, grad) -> SinkhornResult:
    """Run checked arguments: ``C`` ``[N, M]`` or ``[B, N, M]``; ``a_full [B, N]``, ``b_full [B, M]``
    in the compute dtype, or ``None`` for uniform weights."""
    compute_dtype = float32_or_wider(C)
    unbatched = C.dim() == 2
    if unbatched:
        C = C.unsqueeze(0)
    if a_full is None:
        a_full = _marginal("a", None, C, 1, compute_dtype)
    if b_full is None:
        b_full = _marginal("b", None, C, 2, compute_dtype)
    # Nothing to differentiate: the same outputs without an operator or autograd node (microseconds per call).
    untracked = not (torch.is_grad_enabled() and (C.requires_grad or a_full.requires_grad or b_full.requires_grad))
    if grad == "none":
        with torch.no_grad():
            out = tuple(ops.backend_solve(impl, C, a_full, b_full, eps, n_iters, tol, check_every))
    elif grad == "unrolled" or untracked:
        out = tuple(ops.backend_solve(impl, C, a_full, b_full, eps, n_iters, tol, check_every))
    elif grad == "envelope":
        out = ops.sinkhorn_envelope(C, a_full, b_full, eps, n_iters, tol, check_every, impl)
    else:
        out = ops.sinkhorn_implicit(C, a_full, b_full, eps, n_iters, tol, check_every, impl)
    if unbatched:
        out = tuple(t.squeeze(0) for t in out)
    return SinkhornResult(*out)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> SinkhornResult:
        return sinkhorn(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
