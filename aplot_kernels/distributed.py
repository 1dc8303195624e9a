"""Enlarging the APLOT transport problem beyond one micro-batch on one device.

APLOT's margin for chosen response ``i`` is its average transport cost in an
OT problem between the batch's chosen and rejected responses. The more
responses that problem sees, the better it tells hard pairs from easy ones,
so :class:`aplot_kernels.APLOTLoss` can widen it in two ways:

* **Across devices** (``gather_across_devices=True``): every rank all-gathers
  the rewards and embeddings of all ranks (:func:`gather_rows`; ranks may
  hold different numbers of pairs), solves the same global problem, and keeps
  the margins of its own pairs. With ``reduction="mean"`` each rank returns
  ``world_size / N * (sum of its own pair losses)``, ``N`` the pair count of
  all ranks (:func:`mean_over_ranks`), so that DDP's gradient averaging
  gives exactly the gradient of the mean over all ``N`` pairs whatever the
  counts per rank (the plain local mean would weight a rank's pairs by
  ``1 / n_rank``). With ``detach=True`` the gather is a plain one (the margin
  carries no gradient); with ``detach=False`` it is differentiable: the
  gradient that rank ``k``'s loss sends to rank ``j``'s rows is summed over
  ranks and returned to rank ``j``, which back-propagates it through its own
  network.
* **Across micro-steps of one effective batch** (``bank_size=K``): a
  :class:`PairBank` keeps detached copies of the responses (embeddings and
  rewards) of the earlier micro-steps of the current group of ``K + 1``
  micro-steps. Banked chosen responses join the chosen side and banked
  rejected responses the rejected side, so micro-step ``k`` of a group
  (``k = 0..K``) solves the OT problem of micro-steps ``0..k`` (what one batch
  of those pairs would solve, with the banked entries held constant), and only
  its own pairs' margins are returned; micro-step ``K`` solves the problem of
  the whole group. After micro-step ``K`` the bank empties itself. Under
  gradient accumulation over ``G`` micro-steps, ``bank_size=G - 1`` makes a
  group an effective batch: the bank then never holds embeddings taken before
  an optimizer step, provided the calls stay aligned with the optimizer steps
  (call ``reset_bank()`` at the first micro-step of an effective batch when
  they may not be, e.g. after a shorter last batch of an epoch;
  :class:`aplot_kernels.trl.APLOTRewardTrainer` does this itself). Appending
  banked responses to the rejected side only would change the problem
  instead: with uniform marginals, each current chosen response would have to
  spread its whole mass over the larger rejected set.

Rows stay paired: in every enlarged problem the first ``N`` rejected rows
pair with the ``N`` chosen rows (the convention of
:func:`aplot_kernels.aplot_margin`), and extra rejected responses follow.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "rank_and_world_size",
    "gather_rows",
    "gather_responses",
    "mean_over_ranks",
    "PairBank",
    "Responses",
]


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


def mean_over_ranks(local_mean: torch.Tensor, n_local: int, group=None) -> torch.Tensor:
    """``local_mean * world_size * n_local / N``, ``N`` the pair count summed over the ranks of ``group``.

    ``local_mean`` is the mean of this rank's ``n_local`` pair losses. The
    result is ``world_size / N`` times their sum: DDP averages the gradients of
    these values over ranks, which gives the gradient of the mean of all ``N``
    pair losses for any counts per rank. Returns ``local_mean`` itself without
    a process group of two or more ranks. One small all-reduce, no host read.
    """
    if not is_distributed(group):
        return local_mean
    world = dist.get_world_size(group)
    # float32 holds pair counts exactly up to 2**24 and exists on every device; float64 losses stay float64.
    dtype = torch.float64 if local_mean.dtype == torch.float64 else torch.float32
    count = torch.tensor([float(n_local)], dtype=dtype, device=local_mean.device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    factor = (world * n_local) / count[0]
    return local_mean * factor.to(local_mean.dtype)


def _cat(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Concatenated on the first tensor's device in the widest dtype among them (never rounds a part down)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.cat([t.to(device=tensors[0].device, dtype=dtype) for t in tensors])


def concat_responses(parts: List[Responses]) -> Responses:
    """One OT problem from several: chosen rows concatenated; rejected rows paired ones first, then the extras.

    Rewards and embeddings keep their own dtypes (each the widest among the
    parts): float32 rewards beside bfloat16 embeddings stay float32.
    """
    if len(parts) == 1:
        return parts[0]
    width = parts[0].chosen_emb.shape[-1]
    for part in parts[1:]:
        if part.chosen_emb.shape[-1] != width:
            raise ValueError(
                f"`chosen_emb` has width {width} but the banked responses of earlier calls have width "
                f"{part.chosen_emb.shape[-1]}; the embeddings of one effective batch must have one width "
                f"(call reset_bank() when the embedding model changes)"
            )
    paired = lambda t, p: t[: p.n_pairs]  # noqa: E731
    extra = lambda t, p: t[p.n_pairs :]  # noqa: E731
    return Responses(
        _cat([p.chosen_rewards for p in parts]),
        _cat([p.chosen_emb for p in parts]),
        _cat([paired(p.rejected_rewards, p) for p in parts] + [extra(p.rejected_rewards, p) for p in parts]),
        _cat([paired(p.rejected_emb, p) for p in parts] + [extra(p.rejected_emb, p) for p in parts]),
    )


class PairBank:
    """Detached copies of the responses of the earlier micro-steps of the current group of ``size + 1``.

    :meth:`push` after the ``(size + 1)``-th micro-step of a group empties the
    bank instead of storing it (the group is complete), so that a bank of
    ``G - 1`` under ``G`` accumulation steps never holds responses from before
    an optimizer step. Entries are copies: a caller that refills its input
    buffers in place for the next micro-batch does not change them.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: List[Responses] = []

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> List[Responses]:
        """Oldest first."""
        return list(self._entries)

    def push(self, responses: Responses) -> None:
        if self.size <= 0:
            return
        if len(self._entries) >= self.size:  # this micro-step completed its group
            self._entries.clear()
            return
        self._entries.append(Responses(*(t.detach().clone() for t in responses)))

    def clear(self) -> None:
        self._entries.clear()

    def __repr__(self) -> str:
        return f"PairBank(size={self.size}, held={len(self)})"


def gather_responses(local: Responses, *, differentiable: bool, group):
    """All ranks' responses as one problem (paired rows of all ranks first, then their extra rejected rows)."""
    n = local.n_pairs
    chosen_rewards, offset, sizes = gather_rows(local.chosen_rewards, differentiable=differentiable, group=group)
    gather = lambda t, s=sizes: gather_rows(t, differentiable=differentiable, group=group, sizes=s)[0]  # noqa: E731
    chosen_emb = gather(local.chosen_emb)
    paired_rewards, paired_emb = gather(local.rejected_rewards[:n]), gather(local.rejected_emb[:n])
    extra_rewards, _, extra_sizes = gather_rows(local.rejected_rewards[n:], differentiable=differentiable, group=group)
    extra_emb = gather(local.rejected_emb[n:], extra_sizes)
    gathered = Responses(
        chosen_rewards,
        chosen_emb,
        torch.cat([paired_rewards, extra_rewards]) if extra_rewards.shape[0] else paired_rewards,
        torch.cat([paired_emb, extra_emb]) if extra_emb.shape[0] else paired_emb,
    )
    return gathered, offset
