"""Hardware floor of a GPU row: the least time the work could take (model in ``bench/FLOOR.md``).

``floor_ms = max(exp count / exp rate, flops / flop rate, compulsory bytes / bandwidth)``;
the ``over_floor`` column is ``median_ms / floor_ms`` (1 would be perfect).
CPU rows get NaN.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from .cases import COST_OPS, SINKHORN_OPS, Case

SFU_EXP_PER_CLOCK_PER_SM = 16  # MUFU.EX2 throughput, compute capability 7.0 to 9.0


class GPUSpec(NamedTuple):
    bandwidth: float  # bytes/s, HBM
    clock: float  # Hz, boost
    fp32_flops: float  # FLOP/s, CUDA cores (non-tensor)
    half_flops: float  # FLOP/s, dense fp16/bf16 tensor cores
    note: str


# Datasheet figures (dense, boost clock), matched by substring of the device name, most specific first.
KNOWN = (
    ("H200", GPUSpec(4.8e12, 1.98e9, 67e12, 989e12, "H200 SXM datasheet")),
    ("H100 NVL", GPUSpec(3.9e12, 1.785e9, 60e12, 835e12, "H100 NVL datasheet")),
    ("H100 PCIe", GPUSpec(2.0e12, 1.755e9, 51e12, 756e12, "H100 PCIe datasheet")),
    ("H100", GPUSpec(3.35e12, 1.98e9, 67e12, 989e12, "H100 SXM datasheet")),
    ("A100-SXM4-80GB", GPUSpec(2.039e12, 1.41e9, 19.5e12, 312e12, "A100 80GB SXM datasheet")),
    ("A100", GPUSpec(1.555e12, 1.41e9, 19.5e12, 312e12, "A100 40GB datasheet")),
    ("L40S", GPUSpec(0.864e12, 2.52e9, 91.6e12, 362e12, "L40S datasheet")),
    ("L4", GPUSpec(0.3e12, 2.04e9, 30.3e12, 121e12, "L4 datasheet")),
)


@functools.lru_cache(maxsize=None)
def gpu_spec() -> Optional[GPUSpec]:
    """The current CUDA device's figures, or ``None`` without a GPU or for an unknown one."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, spec in KNOWN:
        if key in name:
            return spec
    return None


def exp_rate(spec: GPUSpec) -> float:
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return sms * SFU_EXP_PER_CLOCK_PER_SM * spec.clock


def work(case: Case, n_iters: Optional[float]):
    """``(exps, flops, bytes)`` of one call; ``None`` for ops without a model (losses)."""
    B, N, M, D = case.B, case.N, case.M, case.D
    elem = torch.empty((), dtype=case.torch_dtype).element_size()
    entries = B * N * M
    if case.op in COST_OPS:
        exps = entries if case.op == "aplot_cost" else 0  # the sigmoid of the reward gap
        return exps, 2.0 * entries * D, B * (N + M) * D * elem + entries * 4
    if case.op in SINKHORN_OPS:
        k = n_iters if n_iters is not None and not math.isnan(n_iters) else case.n_iters
        # two log-sum-exp passes per iteration plus the final plan; read C, write the float32 plan
        return (2 * k + 1) * entries, 0.0, entries * (elem + 4)
    if case.op == "aplot_margin":
        k = case.n_iters
        return (2 * k + 2) * entries, 2.0 * entries * D, (N + M) * D * elem + 4 * (N + M)
    return None


def floor_ms(case: Case, n_iters: Optional[float]) -> float:
    """The model's least time in milliseconds, NaN where there is no model or no GPU."""
    spec = gpu_spec() if case.device == "cuda" else None
    w = work(case, n_iters)
    if spec is None or w is None:
        return math.nan
    exps, flops, nbytes = w
    flop_rate = spec.fp32_flops if case.dtype == "float32" else spec.half_flops
    return 1e3 * max(exps / exp_rate(spec), flops / flop_rate, nbytes / spec.bandwidth)
