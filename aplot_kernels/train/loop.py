"""Training and evaluation of one reward model with one loss: Bradley-Terry, or APLOT with given options.

Runs with the same seed get the same initial weights and the same batch order,
whatever the loss, so that two losses trained with one seed differ only by the
loss (a paired comparison). Accuracy is pairwise: the fraction of pairs whose
chosen response gets the higher reward.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..loss import APLOTLoss, bt_loss
from .model import Features, RewardNet

__all__ = ["TrainConfig", "SplitFeatures", "train_run", "evaluate"]


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32  # pairs per step
    lr: float = 3e-3  # head
    lr_layers: float = 3e-5  # trainable encoder layers
    weight_decay: float = 0.01
    eval_every: int = 10
    train_layers: int = 0
    target_accuracy: float = 0.8

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SplitFeatures:
    """A split's pairs after the frozen encoder: rows ``[0, n)`` chosen, ``[n, 2n)`` rejected."""

    features: Features
    n: int
    hard: torch.Tensor  # [n] bool
    margin: Optional[torch.Tensor] = None  # [n] dataset margins

    def pairs(self, index: torch.Tensor) -> Features:
        return self.features.rows(torch.cat([index, index + self.n]))


@torch.no_grad()
def evaluate(net: RewardNet, split: SplitFeatures, batch_pairs: int = 512) -> Dict[str, float]:
    """``{"accuracy", "hard", "easy"}`` pairwise accuracies (NaN where a kind is absent)."""
    net.eval()
    correct = []
    for start in range(0, split.n, batch_pairs):
        index = torch.arange(start, min(start + batch_pairs, split.n))
        rewards, _ = net(split.pairs(index))
        chosen, rejected = rewards.chunk(2)
        correct.append(chosen > rejected)
    correct = torch.cat(correct).float()
    out = {"accuracy": correct.mean().item()}
    for kind, rows in (("hard", split.hard), ("easy", ~split.hard)):
        out[kind] = correct[rows].mean().item() if bool(rows.any()) else float("nan")
    return out


def _optimizer(net: RewardNet, config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(net.head.parameters()), "lr": config.lr}]
    if len(net.top):
        groups.append({"params": list(net.top.parameters()), "lr": config.lr_layers})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def train_run(
    make_net: Callable[[], RewardNet],
    train: SplitFeatures,
    evals: Dict[str, SplitFeatures],
    config: TrainConfig,
    *,
    seed: int,
    aplot: Optional[dict] = None,
    bar=None,
) -> dict:
    """Train a fresh net with seed ``seed``; returns its accuracy curves, final metrics and timing.

    ``aplot=None`` trains with the Bradley-Terry loss, a dict with :class:`~aplot_kernels.loss.APLOTLoss`
    with those options; APLOT compares the net's representation (the input of its score layer).
    ``bar``: a tqdm-like progress bar (``update``, ``set_postfix``) advanced once per step.
    """
    torch.manual_seed(seed)
    net = make_net()
    optimizer = _optimizer(net, config)
    aplot_loss = APLOTLoss(**aplot) if aplot is not None else None
    # The batch order has its own generator, seeded from the seed alone: the same for every loss.
    order = torch.Generator().manual_seed(seed + 7919)
    curves: Dict[str, List[float]] = {"step": []}
    margins_seen: List[float] = []

    def record(step: int) -> None:
        curves["step"].append(step)
        for name, split in evals.items():
            metrics = evaluate(net, split)
            for key, value in metrics.items():
                curves.setdefault(f"{name}/{key}", []).append(value)

    record(0)
    train_seconds = 0.0
    batch = min(config.batch_size, train.n)
    for step in range(1, config.steps + 1):
        started = time.perf_counter()
        net.train()
        index = torch.randperm(train.n, generator=order)[:batch]
        rewards, representation = net(train.pairs(index))
        chosen, rejected = rewards.chunk(2)
        margin = None if train.margin is None else train.margin[index]
        if aplot_loss is None:
            loss = bt_loss(chosen, rejected, margin)
        else:
            emb_chosen, emb_rejected = representation.chunk(2)
            out = aplot_loss(chosen, rejected, emb_chosen, emb_rejected, margin, return_outputs=True)
            loss = out.loss
            if out.margins is not None:
                margins_seen.append(out.margins.mean().item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_seconds += time.perf_counter() - started
        if step % config.eval_every == 0 or step == config.steps:
            record(step)
            if bar is not None and evals:
                first = next(iter(evals))
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{curves[f'{first}/accuracy'][-1]:.3f}", refresh=False)
        if bar is not None:
            bar.update(1)

    final = {name: {key: curves[f"{name}/{key}"][-1] for key in ("accuracy", "hard", "easy")} for name in evals}
    target_split = "test_id" if "test_id" in evals else next(iter(evals), None)
    steps_to_target = None
    if target_split is not None:
        for step, acc in zip(curves["step"], curves[f"{target_split}/accuracy"]):
            if acc >= config.target_accuracy:
                steps_to_target = step
                break
    return {
        "seed": seed,
        "curves": curves,
        "final": final,
        "best": {name: max(curves[f"{name}/accuracy"]) for name in evals},
        "steps_to_target": steps_to_target,
        "target_split": target_split,
        "train_seconds": train_seconds,
        "mean_aplot_margin": sum(margins_seen) / len(margins_seen) if margins_seen else None,
    }
