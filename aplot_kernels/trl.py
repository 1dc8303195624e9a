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

The APLOT options live in :class:`APLOTRewardConfig`, a ``trl.RewardConfig``
with ``aplot_*`` fields, so that a script, a YAML config or ``trl.TrlParser``
can set them (``examples/train_reward_model.py``)::

    from aplot_kernels.trl import APLOTRewardConfig, APLOTRewardTrainer

    args = APLOTRewardConfig(output_dir="rm", aplot_alpha=0.9, aplot_gather=True, aplot_bank=True,
                             gradient_accumulation_steps=4)
    trainer = APLOTRewardTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset)
    trainer.train()

With a plain ``RewardConfig``, the options are given as an
:class:`aplot_kernels.APLOTLoss` (``aplot_loss=...``) or as its keyword
arguments (``alpha=0.9, eps=0.1, ...``).

With a bank (``aplot_bank=True``: ``bank_size = gradient_accumulation_steps - 1``),
the trainer empties the bank at the first micro-step of every optimizer step:
micro-step ``k`` of an effective batch solves the OT problem of micro-steps
``0..k`` of that batch, the last one that of the whole effective batch, and
no micro-step sees responses embedded before an optimizer step (also when an
epoch ends with a shorter effective batch).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
import trl as _trl

from .loss import APLOTLoss
from .pooling import capture_head_input, pad_token_id_of

__all__ = ["APLOTRewardConfig", "APLOTRewardTrainer", "APLOT_OPTION_NAMES"]

APLOT_OPTION_NAMES = tuple(name for name in inspect.signature(APLOTLoss.__init__).parameters if name not in ("self", "reduction"))


@dataclasses.dataclass
class APLOTRewardConfig(_trl.RewardConfig):
    """``trl.RewardConfig`` plus the options of :class:`aplot_kernels.APLOTLoss`, read by :class:`APLOTRewardTrainer`.

    Checked when the config is made (a bad value raises ``ValueError``/``TypeError`` naming the field).
    """

    aplot_alpha: float = dataclasses.field(
        default=0.9,
        metadata={
            "help": "APLOT: weight of the reward-gap term of the cost (1 - alpha weighs the embedding similarity), in [0, 1]."
        },
    )
    aplot_temperature: float = dataclasses.field(
        default=1.0, metadata={"help": "APLOT: temperature of the reward gap in the cost (> 0)."}
    )
    aplot_similarity: str = dataclasses.field(
        default="unit",
        metadata={"help": "APLOT: the cost's semantic term, 'unit' ((1 + S) / 2) or 'cosine' (S, the authors' form)."},
    )
    aplot_eps: float = dataclasses.field(default=0.1, metadata={"help": "APLOT: Sinkhorn entropic regularisation (> 0)."})
    aplot_n_iters: int = dataclasses.field(default=50, metadata={"help": "APLOT: Sinkhorn iterations."})
    aplot_scale: float = dataclasses.field(
        default=1.0, metadata={"help": "APLOT: multiplies the OT margins; 0 gives TRL's loss."}
    )
    aplot_detach: bool = dataclasses.field(
        default=True, metadata={"help": "APLOT: compute the OT margin without gradient (False: differentiate through it)."}
    )
    aplot_backend: str = dataclasses.field(default="auto", metadata={"help": "APLOT: 'auto', 'torch', 'triton' or 'native'."})
    aplot_gather: bool = dataclasses.field(
        default=False, metadata={"help": "APLOT: one OT problem over the pairs of all processes (DDP)."}
    )
    aplot_bank: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "APLOT: one OT problem over the micro-steps of each effective batch so far "
            "(bank of gradient_accumulation_steps - 1 micro-steps, emptied at every optimizer step)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.aplot_bank and self.gradient_accumulation_steps < 2:
            raise ValueError(
                "`aplot_bank` needs `gradient_accumulation_steps` >= 2 (the bank holds the earlier "
                f"micro-steps of an effective batch), got {self.gradient_accumulation_steps}"
            )
        try:
            APLOTLoss(**self.aplot_loss_kwargs())
        except (TypeError, ValueError) as exc:  # name the config field, not the APLOTLoss argument
            for option, field in _CONFIG_FIELDS.items():
                message = str(exc).replace(f"`{option}`", f"`{field}`")
                if message != str(exc):
                    raise type(exc)(message) from None
            raise

    def aplot_loss_kwargs(self) -> dict:
        """The :class:`aplot_kernels.APLOTLoss` keyword arguments these fields give."""
        kwargs = {option: getattr(self, field) for option, field in _CONFIG_FIELDS.items() if option != "bank_size"}
        kwargs["bank_size"] = self.gradient_accumulation_steps - 1 if self.aplot_bank else 0
        return kwargs


# APLOTLoss argument -> APLOTRewardConfig field.
_CONFIG_FIELDS = {
    "alpha": "aplot_alpha",
    "temperature": "aplot_temperature",
    "similarity": "aplot_similarity",
    "eps": "aplot_eps",
    "n_iters": "aplot_n_iters",
    "scale": "aplot_scale",
    "detach": "aplot_detach",
    "backend": "aplot_backend",
    "gather_across_devices": "aplot_gather",
    "bank_size": "aplot_bank",
}


class APLOTRewardTrainer(_trl.RewardTrainer):
    """``trl.RewardTrainer`` with the APLOT loss.

    Args:
        *args, **kwargs: those of ``trl.RewardTrainer``. With ``args`` an
            :class:`APLOTRewardConfig`, the APLOT options are its ``aplot_*``
            fields (then neither ``aplot_loss`` nor option keywords may be given).
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
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if isinstance(config, APLOTRewardConfig):
            if aplot_loss is not None or options:
                given = ["aplot_loss"] if aplot_loss is not None else sorted(options)
                raise ValueError(f"with an APLOTRewardConfig the APLOT options are its aplot_* fields; got {given} as well")
            aplot_loss = APLOTLoss(**config.aplot_loss_kwargs())
        if aplot_loss is None:
            aplot_loss = APLOTLoss(**options)
        if not isinstance(aplot_loss, APLOTLoss):
            raise TypeError(f"`aplot_loss` must be an aplot_kernels.APLOTLoss, got {type(aplot_loss).__name__}")
        if aplot_loss.reduction != "mean":
            raise ValueError(f"`aplot_loss.reduction` must be 'mean' (TRL averages over pairs), got {aplot_loss.reduction!r}")
        self.aplot_loss = aplot_loss
        self.score_head_name = score_head_name
        self._bank_step: Optional[int] = None  # the optimizer step whose micro-steps the bank holds
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

        # The bank holds training micro-steps only, of the current optimizer step only: global_step
        # changes after each optimizer step, so its first micro-step starts from an empty bank.
        self.aplot_loss.train(mode == "train")
        if mode == "train" and self.aplot_loss.bank_size > 0 and self._bank_step != self.state.global_step:
            self.aplot_loss.reset_bank()
            self._bank_step = self.state.global_step
        result = self.aplot_loss(
            rewards_chosen,
            rewards_rejected,
            emb_chosen,
            emb_rejected,
            margin=None if margin is None else margin.to(rewards_chosen.dtype),
            return_outputs=True,
            with_plan=False,
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
