"""Where a run happened: machine, device and library versions (columns of every row)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from typing import Dict

import torch

from .impls import version_of

LIBRARIES = {
    "numpy": "numpy",
    "pot": "ot",
    "triton": "triton",
    "geomloss": "geomloss",
    "flash_sinkhorn": "flash_sinkhorn",
    "ott": "ott",
    "jax": "jax",
    "aplot_kernels": "aplot_kernels",
}


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model()


@functools.lru_cache(maxsize=None)
def columns(device: str) -> Dict[str, str]:
    """The metadata columns, identical for every row of one run."""
    versions = {name: version_of(module) for name, module in LIBRARIES.items()}
    cores = os.cpu_count() or 0
    return {
        "machine": f"{cpu_model()} ({cores} cores, {torch.get_num_threads()} torch threads)",
        "device_name": device_name(device),
        "torch": torch.__version__ + (f" cuda {torch.version.cuda}" if device == "cuda" else ""),
        "numpy": versions.pop("numpy"),
        "pot": versions.pop("pot"),
        "triton": versions.pop("triton"),
        "versions": ";".join(f"{k}={v}" for k, v in versions.items() if v),
        "commit": git_commit(),
    }
