#!/usr/bin/env bash
# One-command GPU check (CUDA machine, e.g. one H100): build, run the GPU tests,
# time our kernels against POT and the PyTorch reference, write everything to OUT_DIR.
#
#   bash bench/gpu_check.sh [OUT_DIR]          (default bench/results)
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh OUT_DIR   (CPU: no build, no general
#       suite, the Triton tests and the benchmark's tiny interpreter shapes)
#   GPU_CHECK_SKIP_BUILD=1: no `pip install -e .` (run from the checkout; no native extension)
#
# POT wheels may be carried in .whl/ at the repository root (no network needed).
# Budget: under 8 minutes in all; every step has its own time limit and a
# failing step does not stop the later ones. The exit status is non-zero when a
# step failed. Files in OUT_DIR: env.txt, build.txt, pytest_triton.txt,
# pytest_suite.txt, gpu_check.csv, bench.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
BUDGET=${GPU_CHECK_BUDGET_S:-470}
status=0

# run LIMIT_S LOGFILE CMD...: run a step with min(LIMIT_S, what is left of the budget).
run() {
  local limit=$1 log=$2
  shift 2
  local left=$((BUDGET - SECONDS - 5))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "== skipped (time budget spent): $*" | tee -a "$OUT/$log"
    status=1
    return
  fi
  echo "== [$SECONDS s] $* (limit ${limit}s)" | tee -a "$OUT/$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  ((rc != 0)) && { echo "== exit status $rc" | tee -a "$OUT/$log"; status=1; }
  return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -c "import ot; print('POT', ot.__version__)" 2>&1 || echo "POT unavailable: POT rows are skipped"
} | tee "$OUT/env.txt"

DRY=${GPU_CHECK_DRY_RUN:-0}
BENCH_ARGS=()
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--dry-run)
elif [[ ${GPU_CHECK_SKIP_BUILD:-0} != 1 ]]; then
  run 200 build.txt "$PY" -m pip install -q -e . --no-build-isolation
fi
# Run from the checkout even when the editable install failed.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

run "$([[ $DRY == 1 ]] && echo 240 || echo 90)" pytest_triton.txt "$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py
run 150 bench.txt "$PY" bench/gpu_check.py --out "$OUT" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
# The general backend-parametrised suite (CUDA tensors where it uses them); last, as it is the largest.
[[ $DRY == 1 ]] || run 150 pytest_suite.txt "$PY" -m pytest -q -p no:cacheprovider --durations=10 tests

echo "== done in ${SECONDS}s, status $status; results in $OUT"
exit $status
