"""Loading the compiled extension built from ``csrc/`` (``aplot_kernels._C``).

The extension registers its kernels as ``torch.ops.aplot_kernels.*``
operators. ``status(device)`` says whether they can run on a device, and why
not.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[bool, str]:
    try:
        from . import _C  # noqa: F401  (importing registers the operators)
    except Exception as exc:
        return False, f"the compiled extension aplot_kernels._C could not be imported ({exc}); reinstall with `pip install .` and a C++ compiler"
    return True, ""


@functools.lru_cache(maxsize=None)
def _has_cuda_kernels() -> bool:
    from . import _C

    return bool(getattr(_C, "WITH_CUDA", False))


def status(device: torch.device) -> Tuple[bool, str]:
    ok, why = _load()
    if not ok:
        return False, why
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if _has_cuda_kernels():
            return True, ""
        return False, "the compiled extension was built without CUDA (no nvcc or a CPU-only torch at build time)"
    return False, f"the compiled extension has no kernels for {device.type} tensors"


def ops():
    """The registered operator namespace; call only after ``status`` said yes."""
    return torch.ops.aplot_kernels
