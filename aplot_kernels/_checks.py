"""Argument checking shared by every public function.

Every check runs before any kernel: a bad argument raises a clear error that
names it. Wrong *types* (a list where a tensor is expected, an integer dtype)
raise :class:`ArgumentTypeError`, which is both a ``TypeError`` and a
``ValueError`` so that callers may catch either.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentTypeError(TypeError, ValueError):
    """An argument has the wrong type or dtype."""


def tensor(name: str, value, *, ndims: Sequence[int], allow_none: bool = False) -> Optional[torch.Tensor]:
    """Check that ``value`` is a finite floating tensor with one of ``ndims`` dimensions."""
    if value is None:
        if allow_none:
            return None
        raise ArgumentTypeError(f"`{name}` must be a tensor, got None")
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(
            f"`{name}` must have a floating dtype (float16, bfloat16, float32, float64), got {value.dtype}"
        )
    if value.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"`{name}` must be {want}, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"`{name}` must not have an empty dimension, got shape {tuple(value.shape)}")
    # One reduction pass in the common case: NaN and inf propagate into the sum.
    # A non-finite sum can also be an overflow of finite values, so confirm exactly.
    if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` contains NaN or inf")
    return value


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"`{name}` is on {t.device} but `{first_name}` is on {first.device}")


def positive(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"`{name}` must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be finite and {bound}, got {value}")
    return value


def finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"`{name}` must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"`{name}` must be finite, got {value}")
    return float(value)


def unit_interval(name: str, value) -> float:
    value = finite_number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1], got {value}")
    return value


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def embeddings_pair(x_name: str, x: torch.Tensor, y_name: str, y: torch.Tensor) -> None:
    """Two embedding tensors ``[.., N, D]`` and ``[.., M, D]`` with matching batch and width."""
    if x.dim() != y.dim():
        raise ValueError(
            f"`{x_name}` and `{y_name}` must both be 2-D or both be 3-D, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"`{x_name}` and `{y_name}` must have the same embedding width, got {x.shape[-1]} and {y.shape[-1]}"
        )
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(
            f"`{x_name}` and `{y_name}` must have the same batch size, got {x.shape[0]} and {y.shape[0]}"
        )
    same_device(**{x_name: x, y_name: y})


def rewards_for(name: str, rewards: torch.Tensor, emb_name: str, emb: torch.Tensor) -> None:
    """Rewards ``[.., N]`` that belong to embeddings ``[.., N, D]``."""
    if tuple(rewards.shape) != tuple(emb.shape[:-1]):
        raise ValueError(
            f"`{name}` must have shape {tuple(emb.shape[:-1])} to match `{emb_name}` {tuple(emb.shape)}, "
            f"got {tuple(rewards.shape)}"
        )
    same_device(**{emb_name: emb, name: rewards})
