"""Timing, peak memory and accuracy of one benchmark row.

Timing: a few warm-up calls, then timed calls that rotate over several
pre-generated inputs (so a cache holding the last input cannot flatter a
row). On CUDA each call is bracketed by ``torch.cuda.Event`` records; on the
CPU by ``time.perf_counter``. The row reports the median and the 20th/80th
percentiles.

Peak memory: on CUDA, ``max_memory_allocated`` during one call minus what was
allocated before it. On the CPU, ``tracemalloc`` does not see torch's
allocations, so a thread samples the process RSS (1 ms period) during one
call, after ``malloc_trim`` has handed the allocator's free memory back, and
the row reports the peak growth: a lower bound that includes the
temporaries of every library in the call. The allocator's settings are left
alone (pinning glibc's mmap threshold would make every large temporary a
fresh mmap and slow the torch and numpy rows down by page faults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

import numpy as np
import torch


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    first_ms: float  # the first warm-up call (compilation, autotuning, allocation)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cpu(fn: Callable, inputs: Sequence, reps: int) -> List[float]:
    times = []
    for i in range(reps):
        inp = inputs[i % len(inputs)]
        start = time.perf_counter()
        fn(inp)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _time_cuda(fn: Callable, inputs: Sequence, reps: int, device: torch.device) -> List[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for i in range(reps):
        inp = inputs[i % len(inputs)]
        starts[i].record()
        fn(inp)
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_call(
    fn: Callable,
    inputs: Sequence,
    device: torch.device,
    *,
    warmup: int,
    min_reps: int,
    max_reps: int,
    target_s: float,
    max_call_s: float,
    first: Optional[Callable] = None,
):
    """Time ``fn(inputs[i % len(inputs)])``.

    The number of timed calls is ``target_s`` divided by the last warm-up
    call's time, clamped to ``[min_reps, max_reps]``; a call slower than
    ``max_call_s`` (after a second warm-up call when the first was that slow)
    is not repeated: that second call is the single measurement (the row is
    then marked by the caller).
    ``first(inp)``, when given, replaces ``fn`` for the first warm-up call (to
    measure memory on the way). Returns ``(Timing, output of the first call)``.
    """
    warm, first_out = [], None
    # A slow first call may be compilation or lazy initialisation: judge by the second.
    while len(warm) < max(1, warmup) or (len(warm) == 1 and warm[0] > max_call_s):
        synchronize(device)
        start = time.perf_counter()
        if warm or first is None:
            fn(inputs[len(warm) % len(inputs)])
        else:
            first_out = first(inputs[0])
        synchronize(device)
        warm.append(time.perf_counter() - start)
        if len(warm) >= 2 and warm[-1] > max_call_s:
            break
    per_call = warm[-1]
    if per_call > max_call_s and len(warm) >= 2:
        # Too slow to repeat: the second (warm) call is the one measurement.
        times = [per_call * 1e3]
    else:
        reps = int(min(max_reps, max(min_reps, target_s / max(per_call, 1e-6))))
        times = _time_cuda(fn, inputs, reps, device) if device.type == "cuda" else _time_cpu(fn, inputs, reps)
    reps = len(times)
    p20, median, p80 = np.percentile(times, [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), reps, warm[0] * 1e3), first_out


@functools.lru_cache(maxsize=None)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand glibc's free heap memory back to the system, so that a call's growth shows in the RSS."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RSSPeak:
    """Samples the process RSS in a thread while the ``with`` block runs."""

    def __init__(self, period_s: float = 1e-3):
        self.period_s, self.peak, self.base = period_s, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period_s)

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def call_with_peak_memory(fn: Callable, inp, device: torch.device):
    """``(fn(inp), peak extra memory in MiB)`` (see the module docstring for what is measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(inp)
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type == "cpu":
        release_free_memory()
        with _RSSPeak() as rss:
            out = fn(inp)
        return out, max(0, rss.peak - rss.base) / 2**20
    return fn(inp), float("nan")


def as_float64(x) -> torch.Tensor:
    """A float64 CPU tensor from a torch tensor, numpy array or JAX array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def column_violation(plan, b) -> float:
    """Largest L1 column-marginal violation ``sum_j |(P^T 1)_j - b_j|`` over the batch (float64)."""
    plan, b = as_float64(plan), as_float64(b)
    if plan.dim() == 2:
        plan, b = plan[None], b.reshape(1, -1)
    return float((plan.sum(-2) - b).abs().sum(-1).max())


def relative_error(out, ref) -> float:
    """``max |out - ref| / max |ref|`` in float64."""
    out, ref = as_float64(out), as_float64(ref)
    if out.shape != ref.shape:
        out = out.reshape(ref.shape)
    scale = float(ref.abs().max())
    return float((out - ref).abs().max()) / (scale if scale > 0 else 1.0)
