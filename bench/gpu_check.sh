#!/usr/bin/env bash
# One-command GPU check (CUDA machine, e.g. one H100): build the extension, run
# the GPU tests, time our kernels against POT and the PyTorch reference, and
# write everything to OUT_DIR.
#
#   bash bench/gpu_check.sh [OUT_DIR]          (default bench/results/gpu)
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh OUT_DIR   (CPU: no build, no general
#       suite, the Triton tests and the benchmark's tiny interpreter shapes)
#   GPU_CHECK_SKIP_BUILD=1: no build (run from the checkout; no native extension)
#   GPU_CHECK_BUDGET_S: the whole run's time budget in seconds (default 450)
#
# Competitor wheels (POT, GeomLoss, FlashSinkhorn, OTT-JAX) may be carried in
# .whl/ at the repository root; they are installed offline into /tmp/site.
#
# Steps, each with its own time limit (a failing step does not stop the later
# ones; the exit status is non-zero when one failed):
#   1. the C++/CUDA extension is compiled in place (setup.py build_ext), in the
#      background while step 2 runs;
#   2. the test suite on the GPU for the torch and Triton backends (with
#      pytest-xdist when installed; else the Triton test files alone), the experimental
#      strategies' tests included;
#   3. once the build is done, the native backend's tests on the GPU;
#   4. bench/gpu_check.py: the issue-level shapes, every Triton strategy, the
#      CUDA kernels, the torch reference and POT -> gpu_check.csv, then a summary;
#   5. `python -m bench --device cuda` for Sinkhorn and aplot_margin in float32
#      (every library that is installed) with what is left of the budget.
# Before step 2, a 512 x 512 solve with the cooperative strategy runs under a timeout
# (cooperative.txt); if it hangs or fails, the later steps leave that strategy out.
# Files in OUT_DIR: env.txt, build.txt, cooperative.txt, pytest_suite.txt, pytest_native.txt,
# bench.txt, gpu_check.csv, matrix.txt, matrix/results.csv (dry run:
# pytest_triton.txt instead of the pytest files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
BUDGET=${GPU_CHECK_BUDGET_S:-450}
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
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  for module in ot geomloss flash_sinkhorn ott xdist; do
    "$PY" -c "import $module; print('$module', getattr($module, '__version__', 'installed'))" 2>/dev/null || echo "$module unavailable"
  done
  nproc
} | tee "$OUT/env.txt"

DRY=${GPU_CHECK_DRY_RUN:-0}
BENCH_ARGS=()
BUILD_PID=
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--dry-run)
elif [[ ${GPU_CHECK_SKIP_BUILD:-0} != 1 ]]; then
  # This GPU's architecture only; in the background (low priority) while the Triton tests run.
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  (
    echo "== [$SECONDS s] setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=$ARCH)"
    TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-12} timeout 300 nice -n 10 "$PY" setup.py -q build_ext --inplace
    echo "== build exit status $? at $SECONDS s"
  ) >"$OUT/build.txt" 2>&1 &
  BUILD_PID=$!
fi
# Run from the checkout (the extension, if built, lies in aplot_kernels/).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# The cooperative strategy's programs wait for each other at barriers: if they could not all be
# resident they would wait forever. A short smoke run under a timeout first; if it fails, the
# suite and the timings leave that strategy out (APLOT_TEST_SKIP_COOPERATIVE=1).
if [[ $DRY != 1 ]]; then
  run 90 cooperative.txt "$PY" -c "
import torch
from aplot_kernels.sinkhorn.triton import solve
from aplot_kernels.sinkhorn.triton.experimental import cooperative
C = torch.rand(1, 512, 512, device='cuda')
a = torch.full((1, 512), 1 / 512, device='cuda')
out = solve(C, a, a, 0.1, 20, 1e-9, 5, strategy='cooperative')
ref = solve(C, a, a, 0.1, 20, 1e-9, 5, strategy='tiled')
torch.cuda.synchronize()
diff = (out.plan - ref.plan).abs().max().item() / ref.plan.max().item()
print('cooperative smoke: parts', cooperative.cooperative_parts(C), 'plan vs tiled', diff)
assert diff < 1e-5, diff
"
  grep -q "cooperative smoke: parts" "$OUT/cooperative.txt" || export APLOT_TEST_SKIP_COOPERATIVE=1
fi

XDIST=()
[[ $DRY != 1 ]] && "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
if [[ $DRY == 1 ]]; then
  run 240 pytest_triton.txt "$PY" -m pytest -q -p no:cacheprovider tests/test_sinkhorn_triton.py tests/test_margin_triton.py tests/test_cost_triton.py
elif ((${#XDIST[@]})); then
  # The whole suite on the GPU except the native backend, whose build is still running.
  # The experimental strategies' tests too (-m replaces the default "not slow and not experimental").
  run 150 pytest_suite.txt env APLOT_TEST_BACKENDS=triton APLOT_KERNELS_NO_JIT=1 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${XDIST[@]}" --durations=10 tests
else
  run 100 pytest_suite.txt "$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_sinkhorn_triton.py tests/test_sinkhorn_triton_experimental.py tests/test_margin_triton.py tests/test_cost_triton.py
fi
if [[ -n $BUILD_PID ]]; then
  wait "$BUILD_PID"
  tail -n 3 "$OUT/build.txt"
  grep -q "build exit status 0" "$OUT/build.txt" || status=1
  "$PY" -c "import torch; from aplot_kernels import backends; print('native on cuda:', backends.native_status(torch.device('cuda')))" 2>&1 | tee -a "$OUT/build.txt"
  # The native backend's share of the suite (its own tests and every case parametrised with it).
  run 100 pytest_native.txt env APLOT_KERNELS_NO_JIT=1 "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} -k native tests
fi
run 210 bench.txt "$PY" bench/gpu_check.py --out "$OUT" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
if [[ $DRY != 1 ]]; then
  run 120 matrix.txt "$PY" -m bench --device cuda --dtypes float32 --ops sinkhorn_fixed,aplot_margin --no-plots --out "$OUT/matrix"
fi
# The summary of step 4 again, last, where a truncated log still shows it.
sed -n '/== targets/,$p' "$OUT/bench.txt"
grep -h -E "passed|failed|error" "$OUT"/pytest_*.txt | tail -n 4
echo "== done in ${SECONDS}s, status $status; results in $OUT"
exit $status
