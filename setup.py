"""Build of the compiled extension ``aplot_kernels._C`` (metadata is in pyproject.toml).

* ``pip install --no-build-isolation .`` (torch installed): compiles the C++
  kernels now, and the CUDA kernels too when torch has CUDA and nvcc is found
  (``APLOT_KERNELS_CUDA=0``/``1`` forces it off/on).
* ``pip install .`` (isolated build, no torch): installs the pure-Python
  package; the extension is then compiled on first use (see
  ``aplot_kernels/_native.py``), from the copy of ``csrc/`` installed with it.
"""

import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


class BuildPyWithSources(build_py):
    """Also installs csrc/ as aplot_kernels/csrc, for the build on first use."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "aplot_kernels", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, CSRC), target, ignore=shutil.ignore_patterns("*.sh", "*.o", "__pycache__"))


def native_build_config():
    """aplot_kernels/_native.py, loaded by path: the one definition of sources and flags."""
    spec = importlib.util.spec_from_file_location("_aplot_native_config", os.path.join(ROOT, "aplot_kernels", "_native.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "aplot-kernels: torch is not importable in this build environment; installing without the compiled "
            "extension (it is compiled on first use instead; or use `pip install --no-build-isolation .`)"
        )
        return [], {}
    config = native_build_config()
    forced = os.environ.get("APLOT_KERNELS_CUDA")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced is not None:
        with_cuda = forced not in ("", "0")
    cxx_flags, nvcc_flags, ld_flags = config.compile_flags(with_cuda)
    sources = config.source_files(CSRC, with_cuda)
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = kind(
        name="aplot_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=ld_flags,
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
