"""Embeddings for APLOT from a reward model: the hidden state its score head reads.

APLOT compares responses by the cosine similarity of their embeddings. The
embedding that matches the reward best is the vector the reward head scores,
so this module finds that vector:

* :func:`pool_last_token` picks, per sequence, the token a Hugging Face
  ``*ForSequenceClassification`` model scores (the rightmost token that is not
  padding), from final hidden states ``[B, T, H]``.
* :func:`capture_head_input` hooks a model's score head and records its input
  during a forward pass (through ``DistributedDataParallel`` and PEFT wrappers).
* :func:`split_pairs` / :func:`join_pairs` convert between a batch of ``2n``
  sequences and its ``n`` chosen and ``n`` rejected halves, for the two
  layouts trainers use: ``"stacked"`` ``[c_0..c_{n-1}, r_0..r_{n-1}]`` (TRL,
  OpenRLHF) and ``"interleaved"`` ``[c_0, r_0, c_1, r_1, ...]``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch

from . import _checks

__all__ = [
    "last_token_index",
    "pool_last_token",
    "find_score_head",
    "capture_head_input",
    "HeadInput",
    "split_pairs",
    "join_pairs",
    "LAYOUTS",
]

LAYOUTS = ("stacked", "interleaved")
SCORE_HEAD_NAMES = ("score", "classifier", "v_head", "value_head", "reward_head")


def _check_token_tensor(name: str, value: torch.Tensor, batch: int, seq_len: Optional[int]) -> None:
    if not isinstance(value, torch.Tensor):
        raise _checks.ArgumentTypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2 or value.shape[0] != batch or (seq_len is not None and value.shape[1] != seq_len):
        want = f"[{batch}, {seq_len if seq_len is not None else 'T'}]"
        raise ValueError(f"`{name}` must have shape {want}, got {tuple(value.shape)}")


def last_token_index(
    attention_mask: Optional[torch.Tensor] = None,
    input_ids: Optional[torch.Tensor] = None,
    pad_token_id: Optional[int] = None,
    *,
    seq_len: Optional[int] = None,
) -> torch.Tensor:
    """Index of the scored token of each sequence, ``[B]`` int64.

    * ``input_ids`` and ``pad_token_id`` given: the rightmost token that is not
      ``pad_token_id`` -- exactly the rule of Hugging Face's
      ``*ForSequenceClassification`` (left or right padding; when the pad token
      is also the EOS token, the trailing EOS counts as padding, as it does
      there).
    * otherwise ``attention_mask`` given: the rightmost attended position
      (OpenRLHF's rule).

    A row with no such token (only padding, or no attended position) raises
    ``ValueError`` naming the argument: there is no token to pool (Hugging
    Face would silently score token 0).
    * neither: the last position ``seq_len - 1`` (a ``[1]`` tensor, broadcast over the batch).
    """
    if input_ids is not None and pad_token_id is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be 2-D [B, T], got shape {tuple(input_ids.shape)}")
        keep = input_ids != pad_token_id
        empty = f"`input_ids` has a row made only of pad_token_id={pad_token_id}: it has no token to pool"
    elif attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"`attention_mask` must be 2-D [B, T], got shape {tuple(attention_mask.shape)}")
        keep = attention_mask != 0
        empty = "`attention_mask` has a row with no attended position: it has no token to pool"
    else:
        if seq_len is None:
            raise ValueError("give `attention_mask`, `input_ids` with `pad_token_id`, or `seq_len`")
        return torch.full((1,), seq_len - 1, dtype=torch.long)
    # A value check: one host read, skipped when value checks are off (aplot_kernels.set_value_checks).
    _checks.require(lambda: keep.any(-1).all().float(), lambda every_row: every_row == 1.0, empty)
    positions = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.long)
    return (positions * keep.long()).argmax(-1)


def pool_last_token(
    hidden_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    input_ids: Optional[torch.Tensor] = None,
    pad_token_id: Optional[int] = None,
) -> torch.Tensor:
    """The hidden state of each sequence's scored token.

    Args:
        hidden_states: ``[B, T, H]`` final hidden states (the score head's input).
        attention_mask: ``[B, T]``, used when ``input_ids``/``pad_token_id`` are not given.
        input_ids: ``[B, T]``; with ``pad_token_id`` it selects the token the
            way ``*ForSequenceClassification`` does (see :func:`last_token_index`).
        pad_token_id: the model's ``config.pad_token_id``.

    Returns:
        ``[B, H]``; differentiable in ``hidden_states``.
    """
    if not isinstance(hidden_states, torch.Tensor):
        raise _checks.ArgumentTypeError(f"`hidden_states` must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3:
        raise ValueError(f"`hidden_states` must be 3-D [B, T, H], got shape {tuple(hidden_states.shape)}")
    batch, seq_len = hidden_states.shape[:2]
    if input_ids is not None:
        _check_token_tensor("input_ids", input_ids, batch, seq_len)
    if attention_mask is not None:
        _check_token_tensor("attention_mask", attention_mask, batch, seq_len)
    if input_ids is not None and pad_token_id is None and attention_mask is None:
        raise ValueError("`input_ids` needs `pad_token_id` to locate the padding (or pass `attention_mask`)")
    index = last_token_index(attention_mask, input_ids, pad_token_id, seq_len=seq_len).to(hidden_states.device)
    rows = torch.arange(batch, device=hidden_states.device)
    return hidden_states[rows, index.expand(batch)]


# ---------------------------------------------------------------------------
# Capturing the score head's input
# ---------------------------------------------------------------------------


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under ``DistributedDataParallel``/``DataParallel``/``torch.compile`` and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
    return model


def _is_linear_like(module: torch.nn.Module) -> bool:
    # PEFT replaces a Linear by a LoRA layer (``base_layer``) or a ModulesToSaveWrapper (``original_module``);
    # both are called with the Linear's input.
    return isinstance(module, torch.nn.Linear) or hasattr(module, "base_layer") or hasattr(module, "original_module")


def _last_linear(head: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The last linear-like module of a head block, not descending into PEFT wrappers."""
    if _is_linear_like(head):
        return head
    found = None
    for child in head.children():
        inner = _last_linear(child)
        if inner is not None:
            found = inner
    return found


def find_score_head(model: torch.nn.Module, name: Optional[str] = None) -> torch.nn.Module:
    """The final linear layer that turns a hidden state into the reward.

    Looks through wrappers (DDP, PEFT) for an attribute named ``name`` or one of
    ``score``, ``classifier``, ``v_head``, ``value_head``, ``reward_head``. A
    head that is a block (e.g. RoBERTa's dense-tanh-out_proj) gives its last
    linear layer, whose input is the vector the reward is read from.
    """
    plain = unwrap_model(model)
    names = (name,) if name is not None else SCORE_HEAD_NAMES
    for candidate in names:
        head = getattr(plain, candidate, None)
        if isinstance(head, torch.nn.Module):
            linear = _last_linear(head)
            if linear is not None:
                return linear
    raise ValueError(
        f"could not find the score head of {type(plain).__name__}: no linear module at attribute "
        f"{' / '.join(map(repr, names))}; pass `score_head_name`"
    )


class HeadInput:
    """What :func:`capture_head_input` records: the head's last input and how to pool it."""

    def __init__(self) -> None:
        self.value: Optional[torch.Tensor] = None

    def pooled(self, input_ids=None, attention_mask=None, pad_token_id=None) -> torch.Tensor:
        """``[B, H]``: the head input as is when the model pooled before the head, else the scored token's.

        For a head applied to every token, the token is chosen as
        ``*ForSequenceClassification`` chooses it: the rightmost token that is
        not ``pad_token_id``, or the last position when there is no pad token
        or no ``input_ids`` (``attention_mask`` is not what those models read,
        so it is used only when ``input_ids`` is missing but a pad token is known).
        """
        if self.value is None:
            raise RuntimeError("the score head was not called during the forward pass")
        if self.value.dim() == 2:
            return self.value
        if self.value.dim() != 3:
            raise RuntimeError(f"unexpected score head input of shape {tuple(self.value.shape)}")
        if pad_token_id is None or (input_ids is None and attention_mask is None):
            return self.value[:, -1]
        return pool_last_token(self.value, attention_mask, input_ids, pad_token_id)


@contextlib.contextmanager
def capture_head_input(model: torch.nn.Module, head_name: Optional[str] = None) -> Iterator[HeadInput]:
    """Record the score head's input while the block runs.

    >>> with capture_head_input(model) as head_input:
    ...     logits = model(input_ids=ids, attention_mask=mask).logits
    >>> emb = head_input.pooled(ids, mask, model.config.pad_token_id)  # [B, H]
    """
    head = find_score_head(model, head_name)
    captured = HeadInput()

    def hook(_module, args, kwargs):
        captured.value = args[0] if args else next(iter(kwargs.values()))

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def pad_token_id_of(model: torch.nn.Module) -> Optional[int]:
    """``config.pad_token_id`` of a (wrapped) Hugging Face model, where the sequence classifier reads it."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "pad_token_id", None)


# ---------------------------------------------------------------------------
# Pair layouts
# ---------------------------------------------------------------------------


def split_pairs(values: torch.Tensor, layout: str = "stacked") -> Tuple[torch.Tensor, torch.Tensor]:
    """``[2n, ...] -> (chosen [n, ...], rejected [n, ...])``.

    ``layout="stacked"``: ``[c; r]`` (first half chosen: TRL >= 0.24, OpenRLHF).
    ``layout="interleaved"``: ``[c_0, r_0, c_1, r_1, ...]``.
    """
    _checks.choice("layout", layout, LAYOUTS)
    if not isinstance(values, torch.Tensor):
        raise _checks.ArgumentTypeError(f"`values` must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() < 1 or values.shape[0] % 2 or values.shape[0] == 0:
        raise ValueError(f"`values` must have an even, non-zero first dimension (2n), got shape {tuple(values.shape)}")
    if layout == "stacked":
        n = values.shape[0] // 2
        return values[:n], values[n:]
    return values[0::2], values[1::2]


def join_pairs(chosen: torch.Tensor, rejected: torch.Tensor, layout: str = "stacked") -> torch.Tensor:
    """Inverse of :func:`split_pairs`: ``(chosen [n, ...], rejected [n, ...]) -> [2n, ...]``."""
    _checks.choice("layout", layout, LAYOUTS)
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"`chosen` and `rejected` must have the same shape, got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    if layout == "stacked":
        return torch.cat([chosen, rejected])
    return torch.stack([chosen, rejected], dim=1).flatten(0, 1)
