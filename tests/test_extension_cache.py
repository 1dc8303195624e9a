"""The JIT build cache of the native extension: one folder per build configuration, never a silent rebuild.

Two copies of ``csrc/`` (two checkouts) must get two build folders, as must
a change of the sources, the flags or the compiler; the same copy must get
the same folder. Whether a load will compile is ninja's own dry-run answer,
checked here on a tiny ninja project. A real double compile is in the slow run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from aplot_kernels import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FLAGS = _native.compile_flags(False)


def copy_csrc(where) -> str:
    target = os.path.join(str(where), "csrc")
    shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "__pycache__"))
    return target


def directory(csrc_dir, flags=FLAGS) -> str:
    return _native.build_directory(csrc_dir, _native.source_files(csrc_dir, False), flags, False)


def test_two_checkouts_get_two_build_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, second = copy_csrc(tmp_path / "a"), copy_csrc(tmp_path / "b")
    assert directory(first) != directory(second)
    assert directory(first) == directory(first)  # stable: the same checkout reuses its build
    assert directory(first).startswith(str(tmp_path / "cache"))


def test_key_covers_sources_flags_and_compiler(tmp_path, monkeypatch):
    csrc_dir = copy_csrc(tmp_path)
    base = directory(csrc_dir)
    assert directory(csrc_dir, (FLAGS[0] + ["-DEXTRA"], FLAGS[1], FLAGS[2])) != base
    header = next(os.path.join(r, f) for r, _, fs in os.walk(csrc_dir) for f in fs if f.endswith(".h"))
    with open(header, "a") as handle:
        handle.write("\n// changed\n")
    changed = directory(csrc_dir)
    assert changed != base
    # Another compiler (here the same binary reached through a link of another name and path).
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    link = tmp_path / "bin" / "g++-other"
    link.parent.mkdir()
    link.write_text(f'#!/bin/sh\nexec {compiler} "$@"\n')
    link.chmod(0o755)
    monkeypatch.setenv("CXX", str(link))
    assert directory(csrc_dir) != changed


@pytest.mark.skipif(shutil.which("ninja") is None, reason="ninja is not installed")
def test_needs_build_is_ninjas_answer(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    (tmp_path / "src.txt").write_text("one")
    (build / "build.ninja").write_text(
        f"rule copy\n  command = cp $in $out\nbuild {_native.JIT_MODULE_NAME}.so: copy {tmp_path / 'src.txt'}\n"
    )
    assert _native.needs_build(str(build))  # nothing built yet
    subprocess.run(["ninja", "-C", str(build)], check=True, capture_output=True)
    assert not _native.needs_build(str(build))
    later = os.path.getmtime(build / f"{_native.JIT_MODULE_NAME}.so") + 10
    os.utime(tmp_path / "src.txt", (later, later))  # a source newer than the build
    assert _native.needs_build(str(build))
    shutil.rmtree(build)
    build.mkdir()
    assert _native.needs_build(str(build))


@pytest.mark.slow
def test_two_checkouts_each_build_once(tmp_path):
    """Two checkouts side by side: each compiles once (announced), then loads without compiling."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), APLOT_KERNELS_NO_JIT="0")
    script = (
        "import logging, sys, torch; logging.basicConfig(level=logging.WARNING, stream=sys.stdout);"
        "sys.modules['aplot_kernels._C'] = None; from aplot_kernels import _native;"
        "print('loaded', _native.status(torch.device('cpu')))"
    )
    outputs = {}
    for name in ("a", "b"):
        package = tmp_path / name / "aplot_kernels"
        shutil.copytree(os.path.join(ROOT, "aplot_kernels"), package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        copy_csrc(tmp_path / name)
        for attempt in range(2):
            out = subprocess.run(
                [sys.executable, "-c", script],
                cwd=str(tmp_path / name),
                env=dict(env, PYTHONPATH=str(tmp_path / name)),
                capture_output=True,
                text=True,
                timeout=1200,
            )
            assert "loaded (True" in out.stdout, out.stdout + out.stderr
            outputs[name, attempt] = out.stdout
    for name in ("a", "b"):
        assert "compiling the native extension" in outputs[name, 0]
        assert "compiling the native extension" not in outputs[name, 1]
    assert len(os.listdir(tmp_path / "cache" / "aplot_kernels")) == 2
