"""Argument checking shared by every public function.

Every check runs before any kernel: a bad argument raises a clear error that
names it. Wrong *types* (a list where a tensor is expected, an integer dtype)
raise :class:`ArgumentTypeError`, which is both a ``TypeError`` and a
``ValueError`` so that callers may catch either.

Checks of tensor *values* (NaN/inf, signs, masses) need the device's answer,
and each answer read on the host is a synchronisation: on an H100 a call with
four checked tensors spent most of a millisecond waiting on them. Inside a
``with one_sync():`` block they are collected (:func:`require`: one reduction
on the device per check, its test on the host) and read back together, one
device-to-host copy, at the end of the block, which raises the first failed
check's error, in the order the checks were made. :func:`set_value_checks` (or the
:func:`value_checks` context) switches them off, for callers who would rather
not synchronise at all.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentTypeError(TypeError, ValueError):
    """An argument has the wrong type or dtype."""


_Check = Tuple[torch.Tensor, Callable[[float], bool], str, Optional[Callable[[], bool]]]
_collecting = threading.local()
_value_checks_on = True


def set_value_checks(enabled: bool) -> bool:
    """Switch the checks of tensor *values* (NaN/inf, signs, masses) on or off for the process; returns the old setting.

    They are on by default. Off, a call makes no host synchronisation (the
    shape, dtype, device and option checks stay), so a training step can run
    without waiting on the device, at the price of NaN or bad marginals going
    through unreported. While a CUDA graph is being captured the values cannot
    be read, and their checks are skipped whatever this setting.
    """
    global _value_checks_on
    previous, _value_checks_on = _value_checks_on, bool(enabled)
    return previous


@contextlib.contextmanager
def value_checks(enabled: bool):
    """:func:`set_value_checks` for the duration of a ``with`` block."""
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


class one_sync:
    """Collect the value checks made inside the block; read them with one synchronisation at its end.

    A class rather than a generator context: it is entered on every call of every op.
    """

    __slots__ = ("outer",)

    def __enter__(self):
        self.outer = getattr(_collecting, "checks", None)
        _collecting.checks = []

    def __exit__(self, exc_type, exc, tb):
        checks, _collecting.checks = _collecting.checks, self.outer
        if exc_type is None:
            _run(checks)
        return False


def require(
    value: Callable[[], torch.Tensor],
    ok: Callable[[float], bool],
    message: str,
    confirm: Optional[Callable[[], bool]] = None,
) -> None:
    """Raise ``ValueError(message)`` unless ``ok(v)`` holds for the value ``v`` of the 0-d tensor ``value()``.

    The test runs on the host, on the number read back, so that a check
    launches only the reduction that makes ``value()``: at training sizes a
    check costs its launches, not its arithmetic. ``value`` is only called
    while value checks are on (:func:`set_value_checks`). ``confirm`` (run
    only when the test failed) can overrule a cheap test that may report false
    alarms. Deferred to the end of an enclosing :func:`one_sync` block,
    immediate otherwise.
    """
    if not _value_checks_on or torch.compiler.is_compiling():
        return  # compiled code never reads values back (see the README's check policy)
    value = value()
    if value.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # a value cannot be read back while a CUDA graph is being captured
    checks: Optional[List[_Check]] = getattr(_collecting, "checks", None)
    if checks is None:
        _run([(value, ok, message, confirm)])
    else:
        checks.append((value, ok, message, confirm))


def _read_back(values: list) -> List[float]:
    """The 0-d tensors among ``values`` as numbers, with one device-to-host copy (one synchronisation);
    numbers (checks already answered on the host) pass through.

    Values of one dtype are stacked as they are; a mix is read in float64 if it
    holds any (float32 would round a float64 of 1e-300 to 0), else in float32,
    which holds every half-precision value exactly (and exists on every device).
    """
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return values
    if len(tensors) == 1:
        numbers = [tensors[0].item()]
    else:
        dtypes = {v.dtype for v in tensors}
        if len(dtypes) > 1:
            wide = torch.float64 if torch.float64 in dtypes else torch.float32
            tensors = [v.to(wide) for v in tensors]
        numbers = torch.stack(tensors).tolist()
    answers = iter(numbers)
    return [next(answers) if isinstance(v, torch.Tensor) else v for v in values]


# Finite checks of small tensors in one block share one reduction (one launch instead of one per tensor);
# larger ones are reduced one by one (no concatenated copy of large embeddings).
GROUP_MAX_NUMEL = 1 << 16


class _Finite:
    """A deferred finiteness check of ``tensor``: grouped with the block's other small ones at :func:`_run`."""

    __slots__ = ("name", "tensor")

    def __init__(self, name: str, tensor: torch.Tensor):
        self.name, self.tensor = name, tensor

    def check(self) -> _Check:
        return _finite_check(self.name, self.tensor)


def _group_finite(checks: list) -> list:
    """Replace the small :class:`_Finite` entries of each device by one check of them all, placed at the
    first one's position; if it fails, the members are confirmed one by one, in order. On the CPU, with
    the extension loaded, its ``first_nonfinite`` op checks every member (any size) in one call."""
    groups: dict = {}
    cpu_op = _cpu_finite_op()
    for index, c in enumerate(checks):
        if isinstance(c, _Finite):
            device = c.tensor.device
            if (cpu_op is not None and device.type == "cpu") or c.tensor.numel() <= GROUP_MAX_NUMEL:
                groups.setdefault(device, []).append(index)
    out = list(checks)
    for device, indices in groups.items():
        members = [checks[i] for i in indices]
        if cpu_op is not None and device.type == "cpu":
            first = cpu_op([m.tensor for m in members])  # an int: no read-back needed
            out[indices[0]] = (float(first), _is_negative, members, None)
        elif len(members) == 1:
            continue
        else:
            dtype = torch.float64 if any(m.tensor.dtype == torch.float64 for m in members) else torch.float32
            total = torch.cat([m.tensor.reshape(-1) for m in members]).sum(dtype=dtype)
            out[indices[0]] = (total, math.isfinite, members, None)
        for i in indices[1:]:
            out[i] = None
    return [c.check() if isinstance(c, _Finite) else c for c in out if c is not None]


def _is_negative(index: float) -> bool:
    return index < 0


_first_nonfinite = None


def _cpu_finite_op():
    """The extension's ``first_nonfinite`` op if the extension has already loaded, else ``None``
    (a check never loads, let alone compiles, it)."""
    global _first_nonfinite
    if _first_nonfinite is None:
        from . import _native

        loaded = _native._load_result
        if loaded is None or not loaded[0] or not hasattr(torch.ops.aplot_kernels, "first_nonfinite"):
            return None
        _first_nonfinite = torch.ops.aplot_kernels.first_nonfinite.default
    return _first_nonfinite


def _run(checks: list) -> None:
    if not checks:
        return
    if len(checks) == 1 and type(checks[0]) is _CpuFinite:  # the common case: one call, no read-back
        checks[0].run()
        return
    checks = [m for c in checks for m in (c.members() if type(c) is _CpuFinite else (c,))]
    checks = _group_finite(checks)
    for number, (_, ok, message, confirm) in zip(_read_back([c[0] for c in checks]), checks):
        if ok(number):
            continue
        if isinstance(message, list):  # a group of finite checks: the first non-finite member's error
            for member in message:
                if not bool(torch.isfinite(member.tensor).all()):
                    raise ValueError(f"`{member.name}` contains NaN or inf")
            continue  # a finite overflow of the sum
        if confirm is None or confirm():
            raise ValueError(message)


def tensor(
    name: str, value, *, ndims: Sequence[int], allow_none: bool = False, check_finite: bool = True
) -> Optional[torch.Tensor]:
    """Check that ``value`` is a finite floating tensor with one of ``ndims`` dimensions (``check_finite=False``:
    the caller checks finiteness itself, e.g. :func:`sinkhorn_eps` with the reduction it needs anyway)."""
    if value is None:
        if allow_none:
            return None
        raise ArgumentTypeError(f"`{name}` must be a tensor, got None")
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"`{name}` must have a floating dtype (float16, bfloat16, float32, float64), got {value.dtype}")
    if value.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"`{name}` must be {want}, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"`{name}` must not have an empty dimension, got shape {tuple(value.shape)}")
    if check_finite:
        _finite(name, value)
    return value


def _finite(name: str, value: torch.Tensor) -> None:
    finite_all(**{name: value})


def finite_all(**tensors: torch.Tensor) -> None:
    """Check that each tensor (by its argument name) is finite: deferred to the end of an enclosing
    :func:`one_sync` block, immediate otherwise."""
    if not _value_checks_on or torch.compiler.is_compiling():
        return
    checks = getattr(_collecting, "checks", None)
    if checks is not None and _cpu_finite_op() is not None and all(t.is_cpu for t in tensors.values()):
        checks.append(_CpuFinite(tensors))
        return
    for name, value in tensors.items():
        if checks is None:
            require(**_finite_kwargs(name, value))
        elif not (value.is_cuda and torch.cuda.is_current_stream_capturing()):
            checks.append(_Finite(name, value))


class _CpuFinite:
    """Deferred finiteness checks of CPU tensors (by name), made by the extension's ``first_nonfinite`` op in
    one call when they are a block's only checks, else checked as :class:`_Finite` members."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def run(self) -> None:
        first = _first_nonfinite(list(self.tensors.values()))
        if first >= 0:
            raise ValueError(f"`{list(self.tensors)[first]}` contains NaN or inf")

    def members(self) -> list:
        return [_Finite(name, value) for name, value in self.tensors.items()]


_FLOATS = frozenset(FLOAT_DTYPES)


def same_place(*tensors: torch.Tensor) -> bool:
    """Whether the tensors are on one device (CPU tensors answer without building device objects)."""
    for t in tensors:
        if not t.is_cpu:
            first = tensors[0].device
            return all(t.device == first for t in tensors)
    return True


def plain(value, ndim: int) -> bool:
    """A quick yes for a floating tensor with ``ndim`` dimensions, none empty (what :func:`tensor` accepts
    for ``ndims=(ndim,)``); on no, :func:`tensor` says what is wrong."""
    return isinstance(value, torch.Tensor) and value.dtype in _FLOATS and value.dim() == ndim and value.numel() > 0


def _finite_kwargs(name: str, value: torch.Tensor) -> dict:
    # One reduction on the device: NaN and inf propagate into the sum, whose finiteness is tested on
    # the host. A non-finite sum can also be an overflow of finite values, so confirm exactly.
    return dict(
        value=lambda: value.sum(dtype=_sum_dtype(value.dtype)),
        ok=math.isfinite,
        message=f"`{name}` contains NaN or inf",
        confirm=lambda: not bool(torch.isfinite(value).all()),
    )


def _finite_check(name: str, value: torch.Tensor) -> _Check:
    kwargs = _finite_kwargs(name, value)
    return (kwargs["value"](), kwargs["ok"], kwargs["message"], kwargs["confirm"])


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision values are summed into float32 (fewer overflows of finite values to confirm)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype an op computes in for these inputs (``None`` skipped): float64 if any is, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def normal_number(name: str, value: float, dtype: torch.dtype) -> float:
    """``value`` (a positive option the computation divides by: eps, temperature, a norm clamp) must be a
    normal number of the compute ``dtype``: below that, ``1 / value`` overflows, and below the smallest
    subnormal the value itself rounds to 0, so that ``0 / value`` is NaN."""
    tiny = torch.finfo(dtype).tiny
    if value < tiny:
        raise ValueError(
            f"`{name}` must be at least {tiny:.4g}, the smallest normal {_dtype_name(dtype)} number "
            f"(smaller values give NaN or inf in {_dtype_name(dtype)} arithmetic), got {value:g}"
        )
    return value


def sinkhorn_eps(name: str, eps: float, dtype: torch.dtype, C: Optional[torch.Tensor] = None, max_cost: float = 1.0):
    """``eps`` must be normal in ``dtype`` and resolve the cost: ``max |C| / eps <= 1 / machine epsilon``
    (2^23 in float32, 2^52 in float64). Beyond that, ``-C / eps`` is rounded by more than 1, the plan's
    exponents are wrong by more than a factor e, and overflow to inf and NaN follows. ``C`` (a tensor,
    also checked finite: one reduction gives both) or ``max_cost`` (a known bound, checked now) gives
    ``max |C|``."""
    normal_number(name, eps, dtype)
    limit = 1.0 / torch.finfo(dtype).eps
    if C is None:  # the common case of the loss: no message formatted unless it fails
        if max_cost / eps > limit:
            message = _resolution_message(name, dtype, limit)
            raise ValueError(f"{message}; got {name}={eps:g} with max|C| up to {max_cost:g}")
        return eps
    message = _resolution_message(name, dtype, limit)
    if torch.finfo(C.dtype).max / eps > limit:  # only a large enough C can fail: read its magnitude
        magnitude = _once(lambda: _max_abs(C))
        require(magnitude, math.isfinite, "`C` contains NaN or inf")
        require(magnitude, lambda largest: largest / eps <= limit, message)
    else:
        _finite("C", C)
    return eps


def _resolution_message(name: str, dtype: torch.dtype, limit: float) -> str:
    return (
        f"`{name}` is too small for the magnitude of `C` in {_dtype_name(dtype)}: max|C| / {name} must be at most "
        f"{limit:.4g} (1 / machine epsilon); pass a larger `{name}` or a rescaled `C`"
        + (", or float64 inputs" if dtype != torch.float64 else "")
    )


def _once(make: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``make`` called on first use only: two checks of one reduction launch it once."""
    made: List[torch.Tensor] = []
    return lambda: made[0] if made else made.append(make()) or made[0]


def _max_abs(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` in one reduction (no ``|t|`` temporary); NaN and inf propagate."""
    return torch.linalg.vector_norm(t, ord=math.inf)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def boolean(name: str, value) -> bool:
    """A real ``bool``: a string such as ``"no"`` would be truthy, so it is rejected rather than converted."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}")
    return value


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def embeddings_pair(x_name: str, x: torch.Tensor, y_name: str, y: torch.Tensor) -> None:
    """Two embedding tensors ``[.., N, D]`` and ``[.., M, D]`` with matching batch and width."""
    if x.dim() != y.dim():
        raise ValueError(
            f"`{x_name}` and `{y_name}` must both be 2-D or both be 3-D, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"`{x_name}` and `{y_name}` must have the same embedding width, got {x.shape[-1]} and {y.shape[-1]}")
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"`{x_name}` and `{y_name}` must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
    same_device(**{x_name: x, y_name: y})


def rewards_for(name: str, rewards: torch.Tensor, emb_name: str, emb: torch.Tensor) -> None:
    """Rewards ``[.., N]`` that belong to embeddings ``[.., N, D]``."""
    if tuple(rewards.shape) != tuple(emb.shape[:-1]):
        raise ValueError(
            f"`{name}` must have shape {tuple(emb.shape[:-1])} to match `{emb_name}` {tuple(emb.shape)}, "
            f"got {tuple(rewards.shape)}"
        )
    same_device(**{emb_name: emb, name: rewards})
