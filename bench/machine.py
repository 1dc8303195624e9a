"""Where a run happened: machine, device and library versions (columns of every row)."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
from typing import Dict, Iterator

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


def _native_pool_threads() -> Dict[str, int]:
    """Threads of each native pool loaded in this process (OpenBLAS, MKL, OpenMP, ...) by library."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    pools: Dict[str, int] = {}
    for pool in threadpool_info():
        name = pool.get("internal_api", "?")
        pools[name] = max(pools.get(name, 0), int(pool.get("num_threads", 0)))
    return pools


# Read once, when each native library loads: covers the pools loaded after the limit is set
# (POT imports scipy, whose OpenBLAS is not numpy's, and brings its own OpenMP runtime).
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """Give every implementation the same ``threads`` CPU threads for the ``with`` block.

    ``torch.set_num_threads`` alone leaves numpy's BLAS (POT's numpy rows, ``ot.dist``)
    on all cores, which made an OpenBLAS matrix product look twice as fast as ours at
    "one thread". ``threadpoolctl`` caps the BLAS and OpenMP pools already loaded; the
    ``*_NUM_THREADS`` variables cap those that load during the block (they keep that
    cap afterwards); JAX reads its thread count from ``XLA_FLAGS`` when first imported.
    ``threads <= 0``: leave every library at its default.
    """
    if threads <= 0:
        yield
        return
    previous_torch = torch.get_num_threads()
    previous_env = {name: os.environ.get(name) for name in _THREAD_ENV + ("XLA_FLAGS",)}
    torch.set_num_threads(threads)
    for name in _THREAD_ENV:
        os.environ[name] = str(threads)
    if "jax" not in sys.modules and "intra_op_parallelism_threads" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
        ).strip()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the bench extra installs it; without it numpy keeps the threads it started with
        limiter = contextlib.nullcontext()
    else:
        limiter = threadpool_limits(limits=threads)
    try:
        with limiter:
            yield
    finally:
        torch.set_num_threads(previous_torch)
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def threads_summary() -> str:
    """``"1 torch thread, openblas 1"``: the thread counts a row was measured with."""
    torch_threads = torch.get_num_threads()
    parts = [f"{torch_threads} torch thread{'s' if torch_threads != 1 else ''}"]
    parts += [f"{name} {n}" for name, n in sorted(_native_pool_threads().items())]
    return ", ".join(parts)


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
def _versions() -> Dict[str, str]:
    return {name: version_of(module) for name, module in LIBRARIES.items()}


def columns(device: str) -> Dict[str, str]:
    """The metadata columns of a row: machine and thread counts, device, versions, commit."""
    versions = dict(_versions())
    cores = os.cpu_count() or 0
    return {
        "machine": f"{cpu_model()} ({cores} cores; {threads_summary()})",
        "device_name": device_name(device),
        "torch": torch.__version__ + (f" cuda {torch.version.cuda}" if device == "cuda" else ""),
        "numpy": versions.pop("numpy"),
        "pot": versions.pop("pot"),
        "triton": versions.pop("triton"),
        "versions": ";".join(f"{k}={v}" for k, v in versions.items() if v),
        "commit": git_commit(),
    }
