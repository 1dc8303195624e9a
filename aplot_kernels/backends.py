"""Which implementation runs an op: ``"torch"``, ``"triton"`` or ``"native"``.

``resolve`` is the single place that turns the user's ``backend=`` argument
into a concrete backend for a tensor's device and dtype:

* ``"torch"``: the pure-PyTorch reference, always available, the ground truth.
* ``"triton"``: Triton kernels on CUDA tensors; on CPU tensors only when the
  Triton interpreter is switched on (``TRITON_INTERPRET=1``), which is how CI
  runs them. No float64.
* ``"native"``: the compiled extension built from ``csrc/`` (C++ on CPU
  tensors, CUDA on GPU tensors).
* ``"auto"``: the fastest available for the device and dtype; never fails
  where ``"torch"`` works.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Dict, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "native")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this install or for this tensor."""


@functools.lru_cache(maxsize=None)
def _triton_importable() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the `triton` package is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return False, f"`import triton` failed: {exc}"
    return True, ""


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_status(device: torch.device) -> Tuple[bool, str]:
    ok, why = _triton_importable()
    if not ok:
        return False, why
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpreter_on():
        return True, ""
    return False, f"Triton kernels run on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), got a {device.type} tensor"


def native_status(device: torch.device) -> Tuple[bool, str]:
    from . import _native

    return _native.status(device)


_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# (backend, device type, dtype, needs_reference) -> concrete backend. Filled on first use of a key;
# the environment and the extension are probed once per key, never again on the hot path.
_TABLE: Dict[Tuple[str, str, torch.dtype, bool], str] = {}


def resolve(backend: str, device: torch.device, dtype: torch.dtype, *, needs_reference: bool = False) -> str:
    """Return the concrete backend (``"torch"``, ``"triton"`` or ``"native"``) to run.

    ``needs_reference`` is set by callers that need autograd through the
    iterations (``grad="unrolled"``), which only the reference provides.
    Raises ``ValueError`` for an unknown name and ``BackendUnavailableError``
    when an explicitly requested backend cannot run here.

    A dictionary lookup once a key has been seen. Under ``torch.compile`` the
    first resolution of a key runs at trace time and its answer is a constant
    of the graph (no break, no probe at run time).
    """
    if torch.compiler.is_compiling():  # no guard on the table, which the trace itself may fill
        impl = _resolve_constant(backend, device.type, dtype, needs_reference)
        if not impl:  # raise the eager error from traced code (dynamo would wrap one raised at trace time)
            _decide(backend, device, dtype, needs_reference)
        return impl
    impl = _TABLE.get((backend, device.type, dtype, needs_reference))
    if impl is None:
        impl = _resolve_and_store(backend, device.type, dtype, needs_reference)
    return impl


@torch.compiler.assume_constant_result  # dynamo calls it while tracing and keeps the answer
def _resolve_constant(backend: str, device_type: str, dtype: torch.dtype, needs_reference: bool) -> str:
    """The table's answer, or ``""`` where resolution raises."""
    impl = _TABLE.get((backend, device_type, dtype, needs_reference))
    if impl is not None:
        return impl
    try:
        return _resolve_and_store(backend, device_type, dtype, needs_reference)
    except (ValueError, BackendUnavailableError):
        return ""


def _resolve_and_store(backend: str, device_type: str, dtype: torch.dtype, needs_reference: bool) -> str:
    impl = _decide(backend, torch.device(device_type), dtype, needs_reference)
    _TABLE[(backend, device_type, dtype, needs_reference)] = impl
    return impl


def _decide(backend: str, device: torch.device, dtype: torch.dtype, needs_reference: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if needs_reference:
            return "torch"
        if device.type == "cuda" and dtype == torch.float64:
            return "torch"  # float64 is promised by the torch and native CPU backends only
        if device.type == "cuda" and triton_status(device)[0]:
            return "triton"
        ok, why = native_status(device)
        if ok:
            return "native"
        if device.type == "cpu":
            _warn_once(
                "native-cpu", f"aplot_kernels: the native CPU extension is unavailable ({why}); using the PyTorch reference"
            )
        return "torch"
    if needs_reference:
        raise ValueError(f"grad='unrolled' differentiates through the iterations and needs backend='torch', got {backend!r}")
    if backend == "triton":
        ok, why = triton_status(device)
        if not ok:
            raise BackendUnavailableError(f"backend='triton' is not available: {why}")
        if dtype == torch.float64:
            raise ValueError(
                "backend='triton' computes float16/bfloat16/float32 inputs; use backend='torch' or 'native' for float64"
            )
        return "triton"
    ok, why = native_status(device)
    if not ok:
        raise BackendUnavailableError(f"backend='native' is not available: {why}")
    return "native"


def available_backends(device: torch.device | str = "cpu") -> Tuple[str, ...]:
    """The concrete backends that can run on ``device`` in this process."""
    device = torch.device(device)
    names = ["torch"]
    if triton_status(device)[0]:
        names.append("triton")
    if native_status(device)[0]:
        names.append("native")
    return tuple(names)
