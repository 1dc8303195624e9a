"""Reward-model losses (docs/contract.md, "The loss"): Bradley-Terry and the APLOT loss.

``aplot_loss`` is ``bt_loss`` with the APLOT margin of :mod:`aplot_kernels.margin`
added to each pair's logit; ``APLOTLoss`` holds its options and can widen the
transport problem with other ranks' pairs and earlier micro-steps
(:mod:`aplot_kernels.distributed`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from . import _checks
from ._precision import autocast_off, float32_or_wider
from .distributed import PairBank, Responses, concat_responses, gather_responses, is_distributed, mean_over_ranks
from .margin import check_inputs, check_rewards, margin_and_plan, margin_options

__all__ = ["bt_loss", "aplot_loss", "APLOTLoss", "APLOTOutput"]

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
        check_rewards(chosen_rewards, rejected_rewards, same_length=True)
        margin = _check_margin(margin, chosen_rewards.shape[0], chosen_rewards)
        _checks.choice("reduction", reduction, REDUCTIONS)
    return _bt_loss(chosen_rewards, rejected_rewards, margin, reduction)


def _bt_loss(chosen_rewards, rejected_rewards, margin, reduction: str) -> torch.Tensor:
    """:func:`bt_loss` on checked arguments, in float32 for half-precision rewards (float64 stays float64)."""
    dtype = float32_or_wider(chosen_rewards)
    # The difference of two bfloat16 rewards of ~1e3 is off by up to 4 when rounded to bfloat16 itself.
    if chosen_rewards.dtype != dtype or rejected_rewards.dtype != dtype:  # a no-op .to still costs a dispatch
        chosen_rewards, rejected_rewards = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return _reduce(-F.logsigmoid(logits), reduction)


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
    chosen_rewards,
    rejected_rewards,
    chosen_emb,
    rejected_emb,
    margin,
    reduction,
    given_options,
    need_plan=True,
) -> APLOTOutput:
    """The loss and, with ``need_plan``, the margins, plan and cost for logging (else plan and cost may be ``None``).

    ``given_options``: options of :func:`aplot_margin` by name (the others take their defaults)."""
    with _checks.one_sync():
        check_inputs(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb)
        n = chosen_rewards.shape[0]
        margin = _check_margin(margin, n, chosen_rewards)
    _checks.choice("reduction", reduction, REDUCTIONS)
    options = margin_options(given_options)
    pair_rejected = rejected_rewards if rejected_rewards.shape[0] == n else rejected_rewards[:n]
    if options["scale"] == 0 or (n == 1 and rejected_rewards.shape[0] == 1):
        if options["scale"] != 0:
            _warn_single_pair()
        return APLOTOutput(_bt_loss(chosen_rewards, pair_rejected, margin, reduction), None, None, None)
    ot_margin, plan, cost = margin_and_plan(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb, options, need_plan)
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
    (plan and cost ``None`` with ``with_plan=False``). Shapes: rewards ``[n]`` and ``[m >= n]``,
    embeddings ``[n, D]`` and ``[m, D]``, ``margin`` ``[n]`` or a scalar.

    The options ``alpha``, ``temperature``, ``similarity`` (``"unit"`` or ``"cosine"``), ``eps``,
    ``n_iters``, ``scale``, ``detach`` and ``backend`` are those of :func:`aplot_kernels.aplot_margin`.

    ``detach=True`` (the default) computes the margin without gradient: the
    loss's gradient reaches the rewards only, and ``chosen_emb.grad`` stays
    ``None``. ``detach=False`` differentiates through the cost and the plan.

    Two options widen the transport problem (design in :mod:`aplot_kernels.distributed`):

    * ``gather_across_devices=True``: rewards and embeddings of all ranks of
      ``process_group`` (ranks may hold different numbers of pairs) form one
      OT problem; each rank gets the margins of its own pairs. With
      ``reduction="mean"`` each rank returns ``world_size / N`` times the sum
      of its own pair losses (``N`` pairs over all ranks), so that DDP's
      gradient averaging gives exactly the gradient of the mean over all pairs;
      ``"sum"`` and ``"none"`` return this rank's pair losses as they are. The
      gather is differentiable when ``detach=False``. Without an initialised
      process group of two or more ranks it does nothing.
    * ``bank_size=K``: detached copies of the responses of the earlier calls
      of the current group of ``K + 1`` calls join the problem, banked chosen
      responses on the chosen side and banked rejected ones on the rejected
      side: call ``k = 0..K`` of a group sees calls ``0..k``, and the bank
      empties itself after call ``K``. With ``K = G - 1`` under ``G``
      gradient-accumulation steps a group is an effective batch, and no call
      sees responses from before an optimizer step (as long as the calls stay
      aligned with the optimizer steps; ``reset_bank()`` empties the bank, call
      it at the first micro-step of an effective batch when they may not be).
      The bank is used and filled only in training mode (``module.train()``,
      the default).

    In both cases ``margins`` holds this call's local pairs only, while
    ``plan`` and ``cost`` are those of the whole problem; the module's
    attribute ``local_offset`` (not a field of :class:`APLOTOutput`) gives the
    row of this call's first pair in them after each call.
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
        given = dict(
            alpha=alpha,
            temperature=temperature,
            similarity=similarity,
            eps=eps,
            n_iters=n_iters,
            scale=scale,
            detach=detach,
            backend=backend,
        )
        margin_options(given)  # the checks of aplot_margin's options
        _checks.choice("reduction", reduction, REDUCTIONS)
        _checks.positive_int("bank_size", bank_size, minimum=0)
        _checks.boolean("gather_across_devices", gather_across_devices)
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
            alpha=self.alpha,
            temperature=self.temperature,
            similarity=self.similarity,
            eps=self.eps,
            n_iters=self.n_iters,
            scale=self.scale,
            detach=self.detach,
            backend=self.backend,
        )

    @autocast_off
    def forward(
        self,
        chosen_rewards,
        rejected_rewards,
        chosen_emb,
        rejected_emb,
        margin=None,
        return_outputs: bool = False,
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
            if self.gather_across_devices and self.reduction == "mean":
                out = out._replace(loss=mean_over_ranks(out.loss, chosen_rewards.shape[0], self.process_group))
        else:
            self.local_offset = 0
            out = _aplot_loss(
                chosen_rewards,
                rejected_rewards,
                chosen_emb,
                rejected_emb,
                margin,
                self.reduction,
                self.margin_options(),
                need_plan=need_plan,
            )
        if return_outputs and not with_plan:
            out = out._replace(plan=None, cost=None)
        return out if return_outputs else out.loss

    def extra_repr(self) -> str:
        extras = f", gather_across_devices={self.gather_across_devices}, bank_size={self.bank.size}"
        return ", ".join(f"{k}={v!r}" for k, v in self.margin_options().items()) + f", reduction={self.reduction!r}" + extras


def _widened_aplot_loss(
    module: APLOTLoss,
    chosen_rewards,
    rejected_rewards,
    chosen_emb,
    rejected_emb,
    margin,
    need_plan=True,
) -> APLOTOutput:
    """:class:`APLOTLoss` with responses of other ranks and/or earlier micro-steps in the OT problem.

    The problem is ``[gathered current responses, banked responses]`` (see
    :func:`aplot_kernels.distributed.concat_responses`); this call's pairs sit
    at rows ``local_offset .. local_offset + n`` of the chosen side.
    """
    with _checks.one_sync():
        check_inputs(chosen_rewards, rejected_rewards, chosen_emb, rejected_emb)
        n = chosen_rewards.shape[0]
        margin = _check_margin(margin, n, chosen_rewards)
    options = margin_options(module.margin_options())
    if options["scale"] == 0:
        module.local_offset = 0
        return APLOTOutput(_bt_loss(chosen_rewards, rejected_rewards[:n], margin, module.reduction), None, None, None)
    current = Responses(chosen_rewards, chosen_emb, rejected_rewards, rejected_emb)
    offset = 0
    if module.gather_across_devices and is_distributed(module.process_group):
        current, offset = gather_responses(current, differentiable=not module.detach, group=module.process_group)
    use_bank = module.bank.size > 0 and module.training
    problem = concat_responses([current] + (module.bank.entries()[::-1] if use_bank else []))
    if use_bank:
        module.bank.push(current)
    module.local_offset = offset
    if problem.chosen_rewards.shape[0] == 1 and problem.rejected_rewards.shape[0] == 1:
        _warn_single_pair()
        return APLOTOutput(_bt_loss(chosen_rewards, rejected_rewards[:n], margin, module.reduction), None, None, None)
    margins, plan, cost = margin_and_plan(
        problem.chosen_rewards,
        problem.rejected_rewards,
        problem.chosen_emb,
        problem.rejected_emb,
        options,
        need_plan,
    )
    local = margins[offset : offset + n]
    total = local if margin is None else local + margin
    return APLOTOutput(_bt_loss(chosen_rewards, rejected_rewards[:n], total, module.reduction), local, plan, cost)
