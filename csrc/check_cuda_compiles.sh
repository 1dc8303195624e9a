#!/usr/bin/env bash
# Compiles every CUDA source of the extension (nvcc -c, no link) against the
# installed torch's headers, so that CI without a GPU still catches CUDA
# build errors. Needs nvcc and an importable torch.
#
# A CPU-only torch wheel ships the ATen/c10 CUDA headers except one generated
# at CUDA build time, c10/cuda/impl/cuda_cmake_macros.h (one #define); when it
# is missing this script supplies that line from a temporary directory. The
# sources include nothing from cuBLAS/cuSPARSE, so a bare nvcc suffices.
#
#   bash csrc/check_cuda_compiles.sh            # sm_90 and sm_80
#   ARCHS="90" STD=c++20 bash csrc/check_cuda_compiles.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
ARCHS=${ARCHS:-"90 80"}
STD=${STD:-c++17}

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compiles: nvcc not found; skipped" >&2
  exit 0
fi
"$NVCC" --version | tail -n 1

mapfile -t INCLUDES < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
mapfile -t DEFINES < <("$PY" -c "
import torch
print('-DTORCH_EXTENSION_NAME=aplot_kernels_native')
print('-D_GLIBCXX_USE_CXX11_ABI=%d' % int(torch._C._GLIBCXX_USE_CXX11_ABI))")
INCLUDE_FLAGS=()
for dir in "${INCLUDES[@]}"; do INCLUDE_FLAGS+=("-I$dir"); done

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
missing=1
for dir in "${INCLUDES[@]}"; do
  [ -f "$dir/c10/cuda/impl/cuda_cmake_macros.h" ] && missing=0
done
if [ "$missing" = 1 ]; then
  echo "note: this torch has no c10/cuda/impl/cuda_cmake_macros.h (CPU-only build); using a one-line stand-in"
  mkdir -p "$OUT/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  INCLUDE_FLAGS+=("-I$OUT/stub")
fi
status=0
for arch in $ARCHS; do
  for source in cuda/*.cu; do
    name=$(basename "$source" .cu)
    if "$NVCC" -c "$source" -o "$OUT/$name.sm$arch.o" -std=$STD -O3 --expt-relaxed-constexpr -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions \
        -gencode "arch=compute_$arch,code=sm_$arch" -Xcompiler -fPIC -DAPLOT_WITH_CUDA \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ "${DEFINES[@]}" -I. "${INCLUDE_FLAGS[@]}"; then
      echo "ok   $source (sm_$arch)"
    else
      echo "FAIL $source (sm_$arch)"
      status=1
    fi
  done
done
exit $status
