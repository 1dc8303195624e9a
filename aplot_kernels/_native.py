"""Loading the compiled extension built from ``csrc/`` (``aplot_kernels._C``).

The extension registers its kernels as ``torch.ops.aplot_kernels.*``
operators. ``status(device)`` says whether they can run on a device, and why
not.

Where it comes from, in order:

1. ``aplot_kernels._C``, compiled at install time
   (``pip install --no-build-isolation .`` with torch already installed);
2. otherwise it is compiled on first use with ``torch.utils.cpp_extension.load``
   (ninja and a C++ compiler needed; CUDA sources too when torch has CUDA and
   nvcc is found) into ``~/.cache/aplot_kernels/<torch version>-<key>``
   (``$XDG_CACHE_HOME`` if set), from ``csrc/`` of a source checkout or the
   copy installed with the package. The key hashes everything that changes
   the build: the sources' location and content, the compiler (path and
   version), nvcc, the flags, Python and torch (version and location), so two
   checkouts or environments never share, and rebuild, one folder. Any build
   announces itself (a warning on the ``aplot_kernels`` logger) before it
   starts. ``APLOT_KERNELS_NO_JIT=1`` switches this off.

This file is also read by ``setup.py`` (by path, before the package is
installed), so the sources and flags of both builds are defined once, here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

import torch

logger = logging.getLogger("aplot_kernels")

EXTENSION_NAME = "aplot_kernels._C"
JIT_MODULE_NAME = "aplot_kernels_native"
NO_JIT_ENV = "APLOT_KERNELS_NO_JIT"

# No -march=native: the binary must run on other CPUs of the architecture. The
# AVX2 loops are compiled through a target pragma and chosen at run time.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-psabi"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
CUDA_DEFINE = "-DAPLOT_WITH_CUDA"


def source_files(csrc_dir: str, with_cuda: bool) -> List[str]:
    """The translation units of the extension, relative to nothing (absolute if ``csrc_dir`` is)."""
    names = [
        "ops.cpp",
        "cpu/cpu_kernels.cpp",
        "cpu/sinkhorn_cpu.cpp",
        "cpu/cost_cpu.cpp",
        "cpu/margin_cpu.cpp",
        "cpu/checks_cpu.cpp",
    ]
    if with_cuda:
        names += ["cuda/sinkhorn_cuda.cu", "cuda/cost_cuda.cu"]
    return [os.path.join(csrc_dir, name) for name in names]


def compile_flags(with_cuda: bool) -> Tuple[List[str], List[str], List[str]]:
    """``(cxx flags, nvcc flags, linker flags)``."""
    define = [CUDA_DEFINE] if with_cuda else []
    return CXX_FLAGS + define, NVCC_FLAGS + define, list(LD_FLAGS)


def _csrc_dir() -> Optional[str]:
    package_dir = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.path.dirname(package_dir), "csrc"), os.path.join(package_dir, "csrc")):
        if os.path.isfile(os.path.join(candidate, "ops.cpp")):
            return candidate
    return None


def _cuda_buildable() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _tool_identity(command: List[str]) -> str:
    """``realpath | first line of --version`` of a compiler (``?`` where it cannot be run)."""
    path = shutil.which(command[0])
    try:
        out = subprocess.run(command + ["--version"], capture_output=True, text=True, timeout=60).stdout
        first = out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        first = "?"
    return f"{os.path.realpath(path) if path else command[0]}|{first}"


def build_key(csrc_dir: str, sources: List[str], flags, with_cuda: bool) -> str:
    """Hex digest of everything that changes the JIT build (see the module docstring).

    The ninja file torch writes holds absolute paths (sources, torch's and
    Python's headers), so the sources' absolute location is part of the key.
    """
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    identity = [
        os.path.realpath(csrc_dir),
        flags,
        sys.version,
        sys.executable,
        torch.__version__,
        getattr(torch.version, "git_version", ""),
        os.path.realpath(os.path.dirname(torch.__file__)),
        _tool_identity([os.environ.get("CXX", "c++")]),
    ]
    if with_cuda:
        identity += [
            torch.version.cuda,
            _tool_identity([os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")]),
            os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
        ]
    digest.update(repr(identity).encode())
    headers = []
    for root, _, files in os.walk(csrc_dir):
        headers += [os.path.join(root, f) for f in files if f.endswith((".h", ".cuh"))]
    if not with_cuda:  # CUDA headers do not change a CPU build
        headers = [path for path in headers if not path.endswith(".cuh")]
    for path in sorted(set(sources) | set(headers)):
        digest.update(os.path.relpath(path, csrc_dir).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def build_directory(csrc_dir: str, sources: List[str], flags, with_cuda: bool) -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = build_key(csrc_dir, sources, flags, with_cuda)[:16]
    return os.path.join(cache, "aplot_kernels", f"{torch.__version__}-{key}")


def needs_build(build_dir: str) -> bool:
    """Whether loading from ``build_dir`` will compile: no library yet, or ninja has work to do there."""
    if not os.path.exists(os.path.join(build_dir, f"{JIT_MODULE_NAME}.so")):
        return True
    if not os.path.exists(os.path.join(build_dir, "build.ninja")):
        return True
    try:  # ninja's dry run answers exactly what the build will do (stale objects, changed commands)
        out = subprocess.run(["ninja", "-n", "-C", build_dir], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True
    return out.returncode != 0 or "no work to do" not in out.stdout


def _jit_build():
    """Compile (or reuse a cached build of) the extension and import it."""
    from torch.utils import cpp_extension

    csrc_dir = _csrc_dir()
    if csrc_dir is None:
        raise RuntimeError("the C++ sources (csrc/) are not in this install")
    with_cuda = _cuda_buildable()
    sources = source_files(csrc_dir, with_cuda)
    cxx_flags, nvcc_flags, ld_flags = compile_flags(with_cuda)
    build_dir = build_directory(csrc_dir, sources, (cxx_flags, nvcc_flags, ld_flags), with_cuda)
    os.makedirs(build_dir, exist_ok=True)
    if needs_build(build_dir):
        logger.warning(
            "aplot_kernels: compiling the native extension%s from %s into %s (once per checkout and environment; about a minute)",
            " with CUDA kernels" if with_cuda else "",
            csrc_dir,
            build_dir,
        )
    return cpp_extension.load(
        name=JIT_MODULE_NAME,
        sources=sources,
        extra_cflags=cxx_flags,
        extra_cuda_cflags=nvcc_flags,
        extra_ldflags=ld_flags,
        extra_include_paths=[csrc_dir],
        build_directory=build_dir,
        is_python_module=True,
        verbose=False,
    )


_module = None


@torch.compiler.disable  # loads (or compiles) the extension: never traced by torch.compile
@functools.lru_cache(maxsize=None)
def _load() -> Tuple[bool, str]:
    global _module
    try:
        from . import _C

        _module = _C
        return _registered()
    except Exception as exc:  # not built at install time, or built for another torch
        prebuilt = f"aplot_kernels._C could not be imported ({exc})"
    if os.environ.get(NO_JIT_ENV, "0") not in ("", "0"):
        return False, f"{prebuilt}, and {NO_JIT_ENV}=1 disables compiling it on first use"
    try:
        _module = _jit_build()
    except Exception as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return False, (
            f"{prebuilt}, and compiling it on first use failed ({reason}); it needs ninja and a C++ compiler "
            f"(`pip install ninja`), or build it at install time: `pip install --no-build-isolation .`"
        )
    sys.modules.setdefault(EXTENSION_NAME, _module)
    return _registered()


def _registered() -> Tuple[bool, str]:
    from . import _native_registrations

    _native_registrations.register()
    return True, ""


_load_result: Optional[Tuple[bool, str]] = None


def _loaded() -> Tuple[bool, str]:
    """:func:`_load`'s answer; after the first call a plain read (its compile-disabling wrapper costs
    microseconds on every call, and every op asks)."""
    global _load_result
    if _load_result is None:
        _load_result = _load()
    return _load_result


@functools.lru_cache(maxsize=None)
def _has_cuda_kernels() -> bool:
    return bool(getattr(_module, "WITH_CUDA", False))


def status(device: torch.device) -> Tuple[bool, str]:
    ok, why = _loaded()
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
    """The registered operator namespace (loading the extension first if needed)."""
    ok, why = _loaded()
    if not ok:
        raise RuntimeError(f"the native extension is unavailable: {why}")
    return torch.ops.aplot_kernels


_OVERLOADS = {}


def op(name: str):
    """``ops().<name>.default``, looked up once (two attribute lookups less per call on the hot path)."""
    if torch.compiler.is_compiling():  # no guard on the cache, which the trace itself may fill
        return getattr(ops(), name).default
    overload = _OVERLOADS.get(name)
    if overload is None:
        overload = _OVERLOADS[name] = getattr(ops(), name).default
    return overload
