"""The APLOT adaptive margin (docs/contract.md, "The loss"): its checks, dispatch and kernels.

``aplot_margin`` builds the APLOT cost between the batch's chosen and
rejected responses, solves entropic OT with uniform marginals, and gives
chosen response ``i`` the margin ``scale * n * sum_j P_ij C_ij``: its average
transport cost, large for pairs that are hard against the whole batch.

Pairs are ``(chosen[i], rejected[i])`` for ``i < n``. ``rejected`` may hold
``m > n`` responses (other ranks, earlier micro-steps): the extra ones only
enter the transport problem.

Layout: the math in :mod:`.reference`; the fused Triton kernel in
:mod:`.triton`; the native backend reduces plan rows inside its Sinkhorn
kernel (:func:`aplot_kernels.sinkhorn.native.row_transport_costs`).
``margin_and_plan`` is this op's internal seam (checked arguments, no host
synchronisation), used by :mod:`aplot_kernels.loss`.
"""

from __future__ import annotations

import torch

from .. import _checks, backends
from .._precision import autocast_off, float32_or_wider
from ..backends import BACKENDS
from ..cost import NORM_EPS, aplot_cost_checked
from ..cost.reference import SIMILARITIES
from ..sinkhorn import sinkhorn_checked
from . import native, reference

__all__ = ["aplot_margin"]


def check_rewards(chosen_rewards, rejected_rewards, *, same_length: bool) -> None:
    if _checks.plain(chosen_rewards, 1) and _checks.plain(rejected_rewards, 1):  # the common case, quickly
        n, m = chosen_rewards.shape[0], rejected_rewards.shape[0]
        if (m == n or (m > n and not same_length)) and _checks.same_place(chosen_rewards, rejected_rewards):
            _checks.finite_all(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
            return
    _checks.tensor("chosen_rewards", chosen_rewards, ndims=(1,))
    _checks.tensor("rejected_rewards", rejected_rewards, ndims=(1,))
    _checks.same_device(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    n, m = chosen_rewards.shape[0], rejected_rewards.shape[0]
    if same_length and m != n:
        raise ValueError(f"`chosen_rewards` and `rejected_rewards` must have the same length, got {n} and {m}")
    if m < n:
        raise ValueError(f"`rejected_rewards` must hold at least as many entries as `chosen_rewards` ({n}), got {m}")


DEFAULTS = dict(alpha=0.9, temperature=1.0, similarity="unit", eps=0.1, n_iters=50, scale=1.0, detach=True, backend="auto")


def check_options(options: dict) -> dict:
    """The options of :func:`aplot_margin`, checked before any kernel runs (the cost would run first)."""
    return dict(
        options,
        alpha=_checks.unit_interval("alpha", options["alpha"]),
        temperature=_checks.positive("temperature", options["temperature"]),
        similarity=_checks.choice("similarity", options["similarity"], SIMILARITIES),
        eps=_checks.positive("eps", options["eps"]),
        n_iters=_checks.positive_int("n_iters", options["n_iters"]),
        scale=_checks.finite_number("scale", options["scale"]),
        detach=_checks.boolean("detach", options["detach"]),
        backend=_checks.choice("backend", options["backend"], BACKENDS),
    )


_CHECKED: dict = {}  # options as given (names, types and values) -> checked options
_CHECKED_MAX = 256


def margin_options(given: dict) -> dict:
    """``given`` (a subset of :data:`DEFAULTS`, by name) completed with the defaults and checked (a shared
    dict: read it, never write to it). Options seen before are looked up, not checked again: the key holds each value's type, so that
    ``detach=1`` is not taken for an accepted ``detach=True``."""
    try:
        # Traced code checks every time (constants of the graph): a lookup would guard on the cache.
        key = None if torch.compiler.is_compiling() else tuple((name, value.__class__, value) for name, value in given.items())
        checked = None if key is None else _CHECKED.get(key)
    except TypeError:  # an unhashable value: the checks below name it
        key, checked = None, None
    if checked is None:
        unknown = set(given) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}; aplot_margin takes {sorted(DEFAULTS)}")
        checked = check_options({**DEFAULTS, **given})
        if key is not None and len(_CHECKED) < _CHECKED_MAX:
            _CHECKED[key] = checked
    return checked


def check_inputs(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb):
    """Shapes now; values (NaN/inf) at the end of the caller's ``one_sync`` block."""
    plain = _checks.plain
    if (  # the common case, in a few comparisons
        plain(chosen_emb, 2)
        and plain(rejected_emb, 2)
        and plain(chosen_rewards, 1)
        and plain(rejected_rewards, 1)
        and chosen_rewards.shape[0] == chosen_emb.shape[0] <= rejected_emb.shape[0] == rejected_rewards.shape[0]
        and chosen_emb.shape[1] == rejected_emb.shape[1]
        and _checks.same_place(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb)
    ):
        _checks.finite_all(
            chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, chosen_emb=chosen_emb, rejected_emb=rejected_emb
        )
        return
    # Find and name the problem (a quick accept above does no more than these).
    check_rewards(chosen_rewards, rejected_rewards, same_length=False)
    _checks.tensor("chosen_emb", chosen_emb, ndims=(2,))
    _checks.tensor("rejected_emb", rejected_emb, ndims=(2,))
    _checks.embeddings_pair("chosen_emb", chosen_emb, "rejected_emb", rejected_emb)
    _checks.rewards_for("chosen_rewards", chosen_rewards, "chosen_emb", chosen_emb)
    _checks.rewards_for("rejected_rewards", rejected_rewards, "rejected_emb", rejected_emb)


def margin_and_plan(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, options: dict, need_plan=True):
    """``(margins [n], plan [n, m], cost [n, m])``; arguments already checked (``options`` as
    :func:`margin_options` returns them), but for the option bounds that depend on the compute dtype (host
    arithmetic only: no host synchronisation here).

    With ``need_plan=False`` the plan and the cost may come back as ``None``:
    a detached margin on a kernel backend (Triton; native on the CPU) then
    reduces each plan row against the cost inside the Sinkhorn kernel, and the
    ``[n, m]`` plan is never written. On Triton a small problem runs as one
    kernel (:mod:`aplot_kernels.margin.triton`) that writes neither the plan
    nor the cost.
    """
    alpha, temperature, similarity, eps = options["alpha"], options["temperature"], options["similarity"], options["eps"]
    n_iters, scale, detach, backend = options["n_iters"], options["scale"], options["detach"], options["backend"]
    n = chosen_rewards.shape[0]
    dtype = float32_or_wider(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb)
    _dtype_bounds(temperature, eps, dtype)
    impl = backends.resolve(backend, chosen_emb.device, dtype)
    if detach and not need_plan and impl == "triton":
        from . import triton as loss_triton  # only importable where Triton is installed

        if loss_triton.fits(n, rejected_rewards.shape[0]) and loss_triton.available():
            try:
                from .. import _triton_ops

                with torch.no_grad():  # detached: the op has no autograd formula
                    margins = _triton_ops.aplot_margin(
                        chosen_rewards,
                        rejected_rewards,
                        chosen_emb,
                        rejected_emb,
                        alpha,
                        temperature,
                        NORM_EPS,
                        eps,
                        n_iters,
                        scale,
                        _triton_ops.similarity_code(similarity),
                    )
                return margins, None, None
            except loss_triton.KERNEL_UNAVAILABLE as exc:  # cannot run on this GPU: the two-kernel path below
                loss_triton.mark_unavailable(exc)
    if detach and not need_plan and impl == "native":
        # One extension op on CPU tensors (cost, row-cost Sinkhorn, scaling); the plan is never stored.
        margins = native.detached_margins(
            chosen_rewards,
            rejected_rewards,
            chosen_emb,
            rejected_emb,
            alpha,
            temperature,
            NORM_EPS,
            similarity,
            eps,
            n_iters,
            scale,
        )
        return margins, None, None
    if detach and not need_plan and impl == "triton":
        from .. import _triton_ops  # only importable where Triton is installed

        with torch.no_grad():
            cost = aplot_cost_checked(
                chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, NORM_EPS, impl, similarity
            )
            a, b = reference.uniform(n, cost.dtype, cost.device), reference.uniform(cost.shape[1], cost.dtype, cost.device)
            row_costs = _triton_ops.sinkhorn_row_costs(cost.unsqueeze(0), a, b, eps, n_iters)[0]
        return reference.margins_from_row_costs(row_costs, n, scale), None, cost
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        cost = aplot_cost_checked(
            chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, NORM_EPS, backend, similarity
        )
        result = sinkhorn_checked(cost, eps=eps, n_iters=n_iters, grad="none" if detach else "implicit", backend=backend)
        margins = reference.margins(result.plan, cost, scale)
    return margins, result.plan, cost


_BOUNDS_PASSED: set = set()  # (temperature, eps, dtype) that passed _dtype_bounds


def _dtype_bounds(temperature: float, eps: float, dtype: torch.dtype) -> None:
    """The option bounds that depend on the compute dtype (raise; remembered once they pass)."""
    key = (temperature, eps, dtype)
    if torch.compiler.is_compiling() or key not in _BOUNDS_PASSED:
        _checks.normal_number("temperature", temperature, dtype)
        _checks.sinkhorn_eps("eps", eps, dtype, max_cost=1.0)  # the APLOT cost lies in [-1, 1]
        if not torch.compiler.is_compiling() and len(_BOUNDS_PASSED) < 256:
            _BOUNDS_PASSED.add(key)


@autocast_off
def aplot_margin(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_emb: torch.Tensor,
    rejected_emb: torch.Tensor,
    *,
    alpha: float = 0.9,
    temperature: float = 1.0,
    similarity: str = "unit",
    eps: float = 0.1,
    n_iters: int = 50,
    scale: float = 1.0,
    detach: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """APLOT adaptive margins, one per chosen response.

    Args:
        chosen_rewards: ``[n]``.
        rejected_rewards: ``[m]``, ``m >= n`` (the first ``n`` pair with the chosen ones).
        chosen_emb: ``[n, D]``.
        rejected_emb: ``[m, D]``.
        alpha, temperature, similarity: options of :func:`aplot_kernels.aplot_cost`
            (``similarity``: ``"unit"``, ``(1 + S) / 2``, or ``"cosine"``, ``S``).
        eps, n_iters: Sinkhorn regularisation and iteration count.
        scale: multiplies the margins; ``0`` switches APLOT off.
        detach: ``True`` computes without gradient; ``False`` lets gradients
            flow through the cost and the plan (implicit differentiation).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.

    Returns:
        ``[n]`` margins ``scale * n * sum_j P_ij C_ij``.
    """
    with _checks.one_sync():
        check_inputs(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb)
    options = margin_options(
        dict(
            alpha=alpha,
            temperature=temperature,
            similarity=similarity,
            eps=eps,
            n_iters=n_iters,
            scale=scale,
            detach=detach,
            backend=backend,
        )
    )
    return margin_and_plan(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, options, need_plan=False)[0]
