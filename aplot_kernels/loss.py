"""Reward-model losses (SPEC section 3): Bradley-Terry and its APLOT adaptive margin.

``aplot_margin`` builds the APLOT cost between the batch's chosen and
rejected responses, solves entropic OT with uniform marginals, and gives
chosen response ``i`` the margin ``scale * n * sum_j P_ij C_ij``: its average
transport cost, large for pairs that are hard against the whole batch.

Pairs are ``(chosen[i], rejected[i])`` for ``i < n``. ``rejected`` may hold
``m > n`` responses (other ranks, earlier micro-steps): the extra ones only
enter the transport problem.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from . import _checks, backends
from ._precision import autocast_off, float32_or_wider
from .backends import BACKENDS
from .cost import NORM_EPS, aplot_cost_checked
from .cost.reference import SIMILARITIES
from .distributed import PairBank, Responses, concat_responses, gather_rows, is_distributed
from .sinkhorn import sinkhorn_checked

__all__ = ["bt_loss", "aplot_margin", "aplot_loss", "APLOTLoss", "APLOTOutput"]

REDUCTIONS = ("mean", "sum", "none")


class APLOTOutput(NamedTuple):
    """What :class:`APLOTLoss` returns with ``return_outputs=True``."""

    loss: torch.Tensor  # reduced as asked
    margins: Optional[torch.Tensor]  # [n] OT margins (None when the OT step was skipped)
    plan: Optional[torch.Tensor]  # [n, m] transport plan (None when skipped)
    cost: Optional[torch.Tensor]  # [n, m] APLOT cost (None when skipped)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _check_rewards(chosen_rewards, rejected_rewards, *, same_length: bool) -> None:
    _checks.tensor("chosen_rewards", chosen_rewards, ndims=(1,))
    _checks.tensor("rejected_rewards", rejected_rewards, ndims=(1,))
    _checks.same_device(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    n, m = chosen_rewards.shape[0], rejected_rewards.shape[0]
    if same_length and m != n:
        raise ValueError(f"`chosen_rewards` and `rejected_rewards` must have the same length, got {n} and {m}")
    if m < n:
        raise ValueError(f"`rejected_rewards` must hold at least as many entries as `chosen_rewards` ({n}), got {m}")


def _check_margin(margin, n: int, like: torch.Tensor):
    if margin is None or isinstance(margin, (int, float)) and not isinstance(margin, bool):
        return None if margin is None else _checks.finite_number("margin", margin)
    _checks.tensor("margin", margin, ndims=(0, 1))
    _checks.same_device(chosen_rewards=like, margin=margin)
    if margin.dim() == 1 and margin.shape[0] != n:
        raise ValueError(f"`margin` must have shape [{n}] (one per pair), got {tuple(margin.shape)}")
    return margin


@autocast_off
def bt_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Union[torch.Tensor, float, None] = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Bradley-Terry loss ``-logsigmoid(r_c - r_r - margin)``.

    Args:
        chosen_rewards: ``[n]``.
        rejected_rewards: ``[n]``.
        margin: ``[n]``, a scalar, or ``None`` (zero).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (returns ``[n]``).

    Returns:
        float32 for float32 or half-precision rewards (computed in float32), float64 for float64.
    """
    with _checks.one_sync():
        _check_rewards(chosen_rewards, rejected_rewards, same_length=True)
        margin = _check_margin(margin, chosen_rewards.shape[0], chosen_rewards)
        _checks.choice("reduction", reduction, REDUCTIONS)
    return _bt_loss(chosen_rewards, rejected_rewards, margin, reduction)


def _bt_loss(chosen_rewards, rejected_rewards, margin, reduction: str) -> torch.Tensor:
    """:func:`bt_loss` on checked arguments, in float32 for half-precision rewards (float64 stays float64)."""
    dtype = float32_or_wider(chosen_rewards)
    # The difference of two bfloat16 rewards of ~1e3 is off by up to 4 when rounded to bfloat16 itself.
    logits = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is not None:
        logits = logits - margin
    return _reduce(-F.logsigmoid(logits), reduction)


def _check_margin_options(options: dict) -> dict:
    """The options of :func:`aplot_margin`, checked before any kernel runs (the cost would run first)."""
    return dict(
        options,
        alpha=_checks.unit_interval("alpha", options["alpha"]),
        temperature=_checks.positive("temperature", options["temperature"]),
        similarity=_checks.choice("similarity", options["similarity"], SIMILARITIES),
        eps=_checks.positive("eps", options["eps"]),
        n_iters=_checks.positive_int("n_iters", options["n_iters"]),
        scale=_checks.finite_number("scale", options["scale"]),
        detach=bool(options["detach"]),
        backend=_checks.choice("backend", options["backend"], BACKENDS),
    )


def _check_margin_inputs(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb):
    """Shapes now; values (NaN/inf) at the end of the caller's ``one_sync`` block."""
    _check_rewards(chosen_rewards, rejected_rewards, same_length=False)
    _checks.tensor("chosen_emb", chosen_emb, ndims=(2,))
    _checks.tensor("rejected_emb", rejected_emb, ndims=(2,))
    _checks.embeddings_pair("chosen_emb", chosen_emb, "rejected_emb", rejected_emb)
    _checks.rewards_for("chosen_rewards", chosen_rewards, "chosen_emb", chosen_emb)
    _checks.rewards_for("rejected_rewards", rejected_rewards, "rejected_emb", rejected_emb)


def _margin_and_plan(
    chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, *, alpha, temperature, similarity, eps, n_iters, scale,
    detach, backend, need_plan=True,
):
    """``(margins [n], plan [n, m], cost [n, m])``; arguments already checked (no check, no host sync here).

    With ``need_plan=False`` the plan and the cost may come back as ``None``:
    a detached margin on a kernel backend (Triton; native on the CPU) then
    reduces each plan row against the cost inside the Sinkhorn kernel, and the
    ``[n, m]`` plan is never written. On Triton a small problem runs as one
    kernel (:mod:`aplot_kernels.loss_triton`) that writes neither the plan
    nor the cost.
    """
    n = chosen_rewards.shape[0]
    dtype = float32_or_wider(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb)
    impl = backends.resolve(backend, chosen_emb.device, dtype)
    if detach and not need_plan and impl == "triton":
        from . import loss_triton  # only importable where Triton is installed

        if loss_triton.fits(n, rejected_rewards.shape[0]) and loss_triton.available():
            try:
                margins = loss_triton.aplot_margin(
                    chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, alpha, temperature, NORM_EPS, eps, n_iters,
                    scale, similarity=similarity,
                )
                return margins, None, None
            except loss_triton.KERNEL_UNAVAILABLE as exc:  # cannot run on this GPU: the two-kernel path below
                loss_triton.mark_unavailable(exc)
    if detach and not need_plan and impl in ("triton", "native"):
        # The kernel backends reduce each plan row against the cost as they form it.
        if impl == "triton":
            from .sinkhorn import triton_kernels as kernels  # only importable where Triton is installed
        else:
            from .sinkhorn import native as kernels
        with torch.no_grad():
            cost = aplot_cost_checked(
                chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, NORM_EPS, impl, similarity
            )
            m = cost.shape[1]
            weights_dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
            a = torch.full((1, n), 1.0 / n, dtype=weights_dtype, device=cost.device)
            b = torch.full((1, m), 1.0 / m, dtype=weights_dtype, device=cost.device)
            row_costs = kernels.row_transport_costs(cost.unsqueeze(0), a, b, eps, n_iters)[0]
        return scale * n * row_costs, None, cost
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        cost = aplot_cost_checked(
            chosen_emb, rejected_emb, chosen_rewards, rejected_rewards, alpha, temperature, NORM_EPS, backend, similarity
        )
        result = sinkhorn_checked(cost, eps=eps, n_iters=n_iters, grad="none" if detach else "implicit", backend=backend)
        margins = scale * n * (result.plan * cost).sum(-1)
    return margins, result.plan, cost


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
        _check_margin_inputs(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb)
    options = _check_margin_options(dict(
        alpha=alpha, temperature=temperature, similarity=similarity, eps=eps, n_iters=n_iters, scale=scale,
        detach=detach, backend=backend,
    ))
    return _margin_and_plan(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, **options, need_plan=False)[0]


_warned_single_pair = False


def _warn_single_pair() -> None:
    global _warned_single_pair
    if not _warned_single_pair:
        _warned_single_pair = True
        warnings.warn(
            "aplot_loss got a single pair: the transport problem is degenerate, so the loss falls back to "
            "bt_loss. Gather pairs across devices or keep a bank of earlier pairs (APLOTLoss) to use APLOT.",
            RuntimeWarning,
            stacklevel=3,
        )


def _aplot_loss(
    chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, margin, reduction, margin_kwargs, need_plan=True,
) -> APLOTOutput:
    """The loss and, with ``need_plan``, the margins, plan and cost for logging (else plan and cost may be ``None``)."""
    with _checks.one_sync():
        _check_margin_inputs(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb)
        n = chosen_rewards.shape[0]
        margin = _check_margin(margin, n, chosen_rewards)
    _checks.choice("reduction", reduction, REDUCTIONS)
    options = dict(
        alpha=0.9, temperature=1.0, similarity="unit", eps=0.1, n_iters=50, scale=1.0, detach=True, backend="auto"
    )
    unknown = set(margin_kwargs) - set(options)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}; aplot_margin takes {sorted(options)}")
    options.update(margin_kwargs)
    options = _check_margin_options(options)
    pair_rejected = rejected_rewards[:n]
    if options["scale"] == 0 or (n == 1 and rejected_rewards.shape[0] == 1):
        if options["scale"] != 0:
            _warn_single_pair()
        return APLOTOutput(_bt_loss(chosen_rewards, pair_rejected, margin, reduction), None, None, None)
    ot_margin, plan, cost = _margin_and_plan(
        chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, **options, need_plan=need_plan
    )
    total = ot_margin if margin is None else ot_margin + margin
    return APLOTOutput(_bt_loss(chosen_rewards, pair_rejected, total, reduction), ot_margin, plan, cost)


@autocast_off
def aplot_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_emb: torch.Tensor,
    rejected_emb: torch.Tensor,
    margin: Union[torch.Tensor, float, None] = None,
    *,
    reduction: str = "mean",
    **margin_kwargs,
) -> torch.Tensor:
    """``bt_loss(r_c, r_r, margin + aplot_margin(...))``.

    Args:
        chosen_rewards: ``[n]``; rejected_rewards: ``[m >= n]``.
        chosen_emb: ``[n, D]``; rejected_emb: ``[m, D]``.
        margin: optional per-pair dataset margin ``[n]`` (TRL's ``margin`` column), added to the OT margin.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        **margin_kwargs: options of :func:`aplot_margin`.

    With ``scale=0`` this is exactly ``bt_loss``; with a single pair it falls
    back to ``bt_loss`` with a one-time warning.
    """
    return _aplot_loss(
        chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, margin, reduction, margin_kwargs, need_plan=False
    ).loss


class APLOTLoss(torch.nn.Module):
    """The APLOT loss as a module, holding its options.

    ``forward(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, margin=None, return_outputs=False,
    with_plan=True)`` returns the loss, or an :class:`APLOTOutput` (loss, margins, plan, cost) for logging
    (plan and cost ``None`` with ``with_plan=False``).

    Two options widen the transport problem (design in :mod:`aplot_kernels.distributed`):

    * ``gather_across_devices=True``: rewards and embeddings of all ranks of
      ``process_group`` (ranks may hold different numbers of pairs) form one
      OT problem; each rank gets the margins of its own pairs and the loss
      over its own pairs. The gather is differentiable when ``detach=False``.
      Without an initialised process group of two or more ranks it does nothing.
    * ``bank_size=K``: the responses of the last ``K`` calls (detached) join
      the problem, banked chosen responses on the chosen side and banked
      rejected ones on the rejected side. The bank is used and filled only in
      training mode (``module.train()``, the default); ``reset_bank()`` empties it.

    In both cases ``margins`` holds this call's local pairs only, while
    ``plan`` and ``cost`` are those of the whole problem (local rows at
    ``local_offset``).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.9,
        temperature: float = 1.0,
        similarity: str = "unit",
        eps: float = 0.1,
        n_iters: int = 50,
        scale: float = 1.0,
        detach: bool = True,
        backend: str = "auto",
        reduction: str = "mean",
        gather_across_devices: bool = False,
        bank_size: int = 0,
        process_group=None,
    ) -> None:
        super().__init__()
        _checks.unit_interval("alpha", alpha)
        _checks.positive("temperature", temperature)
        _checks.choice("similarity", similarity, SIMILARITIES)
        _checks.positive("eps", eps)
        _checks.positive_int("n_iters", n_iters)
        _checks.finite_number("scale", scale)
        _checks.choice("reduction", reduction, REDUCTIONS)
        _checks.positive_int("bank_size", bank_size, minimum=0)
        self.alpha, self.temperature, self.eps, self.n_iters = alpha, temperature, eps, n_iters
        self.similarity = similarity
        self.scale, self.detach, self.backend, self.reduction = scale, detach, backend, reduction
        self.gather_across_devices, self.process_group = bool(gather_across_devices), process_group
        self.bank = PairBank(bank_size)
        self.local_offset = 0

    @property
    def bank_size(self) -> int:
        return self.bank.size

    def reset_bank(self) -> None:
        self.bank.clear()

    def margin_options(self) -> dict:
        return dict(
            alpha=self.alpha, temperature=self.temperature, similarity=self.similarity, eps=self.eps, n_iters=self.n_iters,
            scale=self.scale, detach=self.detach, backend=self.backend,
        )

    @autocast_off
    def forward(
        self, chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, margin=None, return_outputs: bool = False,
        with_plan: bool = True,
    ):
        """The loss; with ``return_outputs``, an :class:`APLOTOutput`.

        ``with_plan=False`` (with ``return_outputs``) returns the margins but
        ``None`` for plan and cost, which lets the detached margin run as
        kernels that never form them (what a trainer logging margin
        statistics needs).
        """
        need_plan = return_outputs and with_plan
        widen = self.gather_across_devices or (self.bank.size > 0 and self.training)
        if widen:
            out = _widened_aplot_loss(
                self, chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, margin, need_plan=need_plan
            )
        else:
            self.local_offset = 0
            out = _aplot_loss(
                chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, margin, self.reduction, self.margin_options(),
                need_plan=need_plan,
            )
        if return_outputs and not with_plan:
            out = out._replace(plan=None, cost=None)
        return out if return_outputs else out.loss

    def extra_repr(self) -> str:
        extras = f", gather_across_devices={self.gather_across_devices}, bank_size={self.bank.size}"
        return ", ".join(f"{k}={v!r}" for k, v in self.margin_options().items()) + f", reduction={self.reduction!r}" + extras


def _widened_aplot_loss(
    module: APLOTLoss, chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, margin, need_plan=True,
) -> APLOTOutput:
    """:class:`APLOTLoss` with responses of other ranks and/or earlier micro-steps in the OT problem.

    The problem is ``[gathered current responses, banked responses]`` (see
    :func:`aplot_kernels.distributed.concat_responses`); this call's pairs sit
    at rows ``local_offset .. local_offset + n`` of the chosen side.
    """
    with _checks.one_sync():
        _check_margin_inputs(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb)
        n = chosen_rewards.shape[0]
        margin = _check_margin(margin, n, chosen_rewards)
    options = _check_margin_options(module.margin_options())
    if options["scale"] == 0:
        module.local_offset = 0
        return APLOTOutput(_bt_loss(chosen_rewards, rejected_rewards[:n], margin, module.reduction), None, None, None)
    current = Responses(chosen_rewards, chosen_emb, rejected_rewards, rejected_emb)
    offset = 0
    if module.gather_across_devices and is_distributed(module.process_group):
        current, offset = _gather_responses(current, differentiable=not module.detach, group=module.process_group)
    use_bank = module.bank.size > 0 and module.training
    problem = concat_responses([current] + (module.bank.entries()[::-1] if use_bank else []))
    if use_bank:
        module.bank.push(current)
    module.local_offset = offset
    if problem.chosen_rewards.shape[0] == 1 and problem.rejected_rewards.shape[0] == 1:
        _warn_single_pair()
        return APLOTOutput(_bt_loss(chosen_rewards, rejected_rewards[:n], margin, module.reduction), None, None, None)
    margins, plan, cost = _margin_and_plan(
        problem.chosen_rewards, problem.rejected_rewards, problem.chosen_emb, problem.rejected_emb, **options,
        need_plan=need_plan,
    )
    local = margins[offset: offset + n]
    total = local if margin is None else local + margin
    return APLOTOutput(_bt_loss(chosen_rewards, rejected_rewards[:n], total, module.reduction), local, plan, cost)


def _gather_responses(local: Responses, *, differentiable: bool, group):
    """All ranks' responses as one problem (paired rows of all ranks first, then their extra rejected rows)."""
    n = local.n_pairs
    chosen_rewards, offset, sizes = gather_rows(local.chosen_rewards, differentiable=differentiable, group=group)
    gather = lambda t, s=sizes: gather_rows(t, differentiable=differentiable, group=group, sizes=s)[0]  # noqa: E731
    chosen_emb = gather(local.chosen_emb)
    paired_rewards, paired_emb = gather(local.rejected_rewards[:n]), gather(local.rejected_emb[:n])
    extra_rewards, _, extra_sizes = gather_rows(local.rejected_rewards[n:], differentiable=differentiable, group=group)
    extra_emb = gather(local.rejected_emb[n:], extra_sizes)
    gathered = Responses(
        chosen_rewards, chosen_emb,
        torch.cat([paired_rewards, extra_rewards]) if extra_rewards.shape[0] else paired_rewards,
        torch.cat([paired_emb, extra_emb]) if extra_emb.shape[0] else paired_emb,
    )
    return gathered, offset
