"""A drop-in replacement for ``trl.RewardTrainer`` that trains with the APLOT loss.

``trl.RewardTrainer`` (TRL >= 0.24) stacks a batch as ``[chosen; rejected]``
and runs one forward pass; its loss is ``-logsigmoid(r_c - r_r - margin)``
with the dataset's optional ``margin`` column. :class:`APLOTRewardTrainer`
keeps all of that (data preparation, collator, PEFT, metrics,
``center_rewards_coefficient``) and changes only the loss:

* during the same single forward pass, a hook on the score head records the
  final hidden states; they are pooled at the token the head scores (the
  rightmost non-pad token, as ``*ForSequenceClassification`` does, see
  :mod:`aplot_kernels.pooling`), giving one embedding per response;
* the loss is :class:`aplot_kernels.APLOTLoss` on the rewards and those
  embeddings, with the dataset margin added to the OT margin;
* the OT margins' mean, min and max are logged as ``aplot_margin_mean``,
  ``aplot_margin_min``, ``aplot_margin_max`` beside TRL's metrics.

Example::

    from aplot_kernels import APLOTLoss
    from aplot_kernels.trl import APLOTRewardTrainer

    trainer = APLOTRewardTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct", args=RewardConfig(...), train_dataset=dataset,
        aplot_loss=APLOTLoss(alpha=0.9, scale=1.0, gather_across_devices=True),
    )
    trainer.train()

APLOT options may also be given as keyword arguments (``alpha=0.9, eps=0.1, ...``).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import trl as _trl

from .loss import APLOTLoss
from .pooling import capture_head_input, pad_token_id_of

__all__ = ["APLOTRewardTrainer", "APLOT_OPTION_NAMES"]

APLOT_OPTION_NAMES = tuple(
    name for name in inspect.signature(APLOTLoss.__init__).parameters if name not in ("self", "reduction")
)


class APLOTRewardTrainer(_trl.RewardTrainer):
    """``trl.RewardTrainer`` with the APLOT loss.

    Args:
        *args, **kwargs: those of ``trl.RewardTrainer``.
        aplot_loss: an :class:`aplot_kernels.APLOTLoss` holding the options
            (its ``reduction`` must be ``"mean"``, TRL's).
        score_head_name: attribute of the score head when it is not one of
            ``score``/``classifier``/``v_head``/``value_head``/``reward_head``.
        **options: :class:`APLOTLoss` keyword arguments (``alpha``,
            ``temperature``, ``eps``, ``n_iters``, ``scale``, ``detach``,
            ``backend``, ``gather_across_devices``, ``bank_size``,
            ``process_group``), instead of ``aplot_loss``.
    """

    _tag_names = ["trl", "reward-trainer", "aplot"]

    def __init__(self, *args, aplot_loss: Optional[APLOTLoss] = None, score_head_name: Optional[str] = None, **kwargs):
        options = {name: kwargs.pop(name) for name in APLOT_OPTION_NAMES if name in kwargs}
        if aplot_loss is not None and options:
            raise ValueError(f"pass either `aplot_loss` or APLOT keyword arguments, not both (got {sorted(options)})")
        if aplot_loss is None:
            aplot_loss = APLOTLoss(**options)
        if not isinstance(aplot_loss, APLOTLoss):
            raise TypeError(f"`aplot_loss` must be an aplot_kernels.APLOTLoss, got {type(aplot_loss).__name__}")
        if aplot_loss.reduction != "mean":
            raise ValueError(f"`aplot_loss.reduction` must be 'mean' (TRL averages over pairs), got {aplot_loss.reduction!r}")
        self.aplot_loss = aplot_loss
        self.score_head_name = score_head_name
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"

        inputs["use_cache"] = False
        margin = inputs.get("margin")
        model_inputs = {key: value for key, value in inputs.items() if key != "margin"}
        with capture_head_input(model, self.score_head_name) as head_input:
            outputs = model(**model_inputs)

        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        embeddings = head_input.pooled(inputs.get("input_ids"), inputs.get("attention_mask"), pad_token_id_of(model))
        emb_chosen, emb_rejected = torch.chunk(embeddings, chunks=2)

        # The bank holds training micro-steps only.
        self.aplot_loss.train(mode == "train")
        result = self.aplot_loss(
            rewards_chosen, rewards_rejected, emb_chosen, emb_rejected,
            margin=None if margin is None else margin.to(rewards_chosen.dtype), return_outputs=True, with_plan=False,
        )
        loss = result.loss

        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)

        self._log_metrics(mode, inputs, outputs, rewards_chosen, rewards_rejected, result.margins)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode, inputs, outputs, rewards_chosen, rewards_rejected, ot_margins) -> None:
        """TRL's metrics (same names and reductions), plus the OT margin statistics."""
        tp_size = getattr(self, "_tp_size", 1)
        if hasattr(self, "_total_train_tokens"):
            if mode == "train":
                num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += num_tokens_in_batch // tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        with torch.no_grad():
            all_rewards = self.accelerator.gather(outputs.logits)
            self._metrics[mode]["min_reward"].append(all_rewards.min().item())
            self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
            self._metrics[mode]["max_reward"].append(all_rewards.max().item())

            mean_accuracy = (rewards_chosen > rewards_rejected).float().mean()
            mean_accuracy = self.accelerator.gather_for_metrics(mean_accuracy).mean().item()
            self._metrics[mode]["accuracy"].append(mean_accuracy)

            mean_margin = (rewards_chosen - rewards_rejected).mean()
            mean_margin = self.accelerator.gather_for_metrics(mean_margin).mean()
            self._metrics[mode]["margin"].append(mean_margin.item())

            # Every rank gathers, also when its OT step was skipped (zeros), so that the collectives stay matched.
            if ot_margins is None:
                ot_margins = torch.zeros_like(rewards_chosen, dtype=torch.float32)
            ot_margins = ot_margins.detach().float()
            stats = torch.stack([ot_margins.mean(), ot_margins.min(), ot_margins.max()]).view(1, 3)
            stats = self.accelerator.gather(stats).view(-1, 3)
            self._metrics[mode]["aplot_margin_mean"].append(stats[:, 0].mean().item())
            self._metrics[mode]["aplot_margin_min"].append(stats[:, 1].min().item())
            self._metrics[mode]["aplot_margin_max"].append(stats[:, 2].max().item())
