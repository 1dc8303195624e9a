"""The ops compute in the precision docs/contract.md gives, inside or outside an autocast region.

A training step usually runs under ``torch.autocast``; its rewards and
embeddings then reach the loss as float32 or bfloat16/float16 tensors, which
every op accepts (half inputs are computed with float32 accumulation). What an
op must not do is let autocast recast its own internal steps: the reference's
similarity product would then run in bfloat16 (about 1e-2 error in the cost
instead of float32 rounding), and the compiled extension's GEMM would hand a
bfloat16 result to a float32 kernel. :func:`autocast_off` switches autocast off
for the duration of a call.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_DEVICE_TYPES = ("cpu", "cuda")


def float32_or_wider(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype an op computes and returns in: ``promote_types(float32, inputs...)`` for floating inputs.

    Half-precision inputs compute in float32; float64 stays float64. (Written out rather than
    through ``torch.promote_types``, a dispatcher call per input, several times per op call.)
    """
    for t in tensors:  # a loop, not any(...): no generator per call
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def autocast_off(fn):
    """Decorate a public op (or an autograd backward) to run with autocast disabled; inputs keep their dtypes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enabled = [t for t in _DEVICE_TYPES if torch.is_autocast_enabled(t)]
        if not enabled:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in enabled:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper
