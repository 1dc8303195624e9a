"""Enlarging the APLOT transport problem beyond one micro-batch on one device.

APLOT's margin for chosen response ``i`` is its average transport cost in an
OT problem between the batch's chosen and rejected responses. The more
responses that problem sees, the better it tells hard pairs from easy ones,
so :class:`aplot_kernels.APLOTLoss` can widen it in two ways:

* **Across devices** (``gather_across_devices=True``): every rank all-gathers
  the rewards and embeddings of all ranks (:func:`gather_rows`; ranks may
  hold different numbers of pairs), solves the same global problem, and keeps
  the margins of its own pairs; its loss is the mean over its own pairs, so
  DDP's gradient averaging gives the mean over all pairs. With
  ``detach=True`` the gather is a plain one (the margin carries no gradient);
  with ``detach=False`` it is differentiable: the gradient that rank ``k``'s
  loss sends to rank ``j``'s rows is summed over ranks and returned to rank
  ``j``, which back-propagates it through its own network.
* **Across micro-steps** (``bank_size=K``): a :class:`PairBank` keeps the
  responses of the last ``K`` micro-steps (embeddings and rewards, detached).
  Banked chosen responses join the chosen side and banked rejected responses
  the rejected side, so the OT problem is the one of the effective batch
  (current pairs plus the ``K`` previous micro-batches, exactly what one
  large batch would solve, with the banked entries held constant), and only
  the current pairs' margins are returned. Appending banked responses to the
  rejected side only would change the problem instead: with uniform
  marginals, each current chosen response would have to spread its whole
  mass over the larger rejected set. Under gradient accumulation over ``G``
  micro-steps, ``bank_size=G - 1`` lets every micro-step see a full
  effective batch; banked entries from before the last optimizer step are
  one update stale, like any memory bank.

Rows stay paired: in every enlarged problem the first ``N`` rejected rows
pair with the ``N`` chosen rows (the convention of
:func:`aplot_kernels.aplot_margin`), and extra rejected responses follow.
"""

from __future__ import annotations

import collections
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world_size", "gather_rows", "PairBank", "Responses"]


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world_size(group=None) -> Tuple[int, int]:
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_sizes(local_size: int, device: torch.device, group) -> List[int]:
    world = dist.get_world_size(group)
    size = torch.tensor([local_size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """All-gather rows of different counts: pad each rank's rows to the largest count, gather, trim, concatenate."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """Differentiable all-gather of rows: each rank gets back the sum over ranks of the gradient of its rows."""

    @staticmethod
    def forward(ctx, tensor, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad_output):
        sizes, rank = ctx.sizes, ctx.rank
        longest = max(sizes)
        padded = grad_output.new_zeros((len(sizes), longest) + tuple(grad_output.shape[1:]))
        for r, part in enumerate(torch.split(grad_output, sizes)):
            padded[r, : sizes[r]] = part
        dist.all_reduce(padded, op=dist.ReduceOp.SUM, group=ctx.group)
        return padded[rank, : sizes[rank]], None, None, None


def gather_rows(
    tensor: torch.Tensor, *, differentiable: bool = False, group=None, sizes: Optional[List[int]] = None
) -> Tuple[torch.Tensor, int, List[int]]:
    """All-gather ``tensor [n_r, ...]`` of every rank along dim 0.

    Ranks may hold different ``n_r`` (sizes are gathered first). Without a
    process group of more than one rank, returns ``tensor`` itself.

    Args:
        tensor: ``[n_r, ...]`` this rank's rows.
        differentiable: gradient flows back to every rank's rows (see module docstring).
        group: the process group (default: the world).
        sizes: the row counts of all ranks when already known (skips one collective).

    Returns:
        ``(gathered [sum_r n_r, ...], offset of this rank's rows, sizes)``.
    """
    if not is_distributed(group):
        return tensor, 0, [tensor.shape[0]]
    rank = dist.get_rank(group)
    if sizes is None:
        sizes = _gather_sizes(tensor.shape[0], tensor.device, group)
    offset = sum(sizes[:rank])
    if max(sizes) == 0:
        return tensor, 0, sizes
    if differentiable and tensor.requires_grad:
        return _GatherRows.apply(tensor, sizes, rank, group), offset, sizes
    with torch.no_grad():
        return _gather_padded(tensor.detach(), sizes, group), offset, sizes


class Responses(NamedTuple):
    """One micro-step's responses: ``n`` pairs and ``e`` extra rejected responses."""

    chosen_rewards: torch.Tensor  # [n]
    chosen_emb: torch.Tensor  # [n, D]
    rejected_rewards: torch.Tensor  # [n + e], the first n paired with the chosen ones
    rejected_emb: torch.Tensor  # [n + e, D]

    @property
    def n_pairs(self) -> int:
        return self.chosen_rewards.shape[0]

    def detach(self) -> "Responses":
        return Responses(*(t.detach() for t in self))


def concat_responses(parts: List[Responses]) -> Responses:
    """One OT problem from several: chosen rows concatenated; rejected rows paired ones first, then the extras."""
    if len(parts) == 1:
        return parts[0]
    like = parts[0].chosen_emb
    parts = [Responses(*(t.to(device=like.device, dtype=like.dtype) for t in p)) for p in parts]
    paired = lambda t, p: t[: p.n_pairs]  # noqa: E731
    extra = lambda t, p: t[p.n_pairs:]  # noqa: E731
    return Responses(
        torch.cat([p.chosen_rewards for p in parts]),
        torch.cat([p.chosen_emb for p in parts]),
        torch.cat([paired(p.rejected_rewards, p) for p in parts] + [extra(p.rejected_rewards, p) for p in parts]),
        torch.cat([paired(p.rejected_emb, p) for p in parts] + [extra(p.rejected_emb, p) for p in parts]),
    )


class PairBank:
    """The responses of the last ``size`` micro-steps, detached (a FIFO)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.deque = collections.deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> List[Responses]:
        """Oldest first."""
        return list(self._entries)

    def push(self, responses: Responses) -> None:
        if self.size > 0:
            self._entries.append(responses.detach())

    def clear(self) -> None:
        self._entries.clear()

    def __repr__(self) -> str:
        return f"PairBank(size={self.size}, held={len(self)})"
