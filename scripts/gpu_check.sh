#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a machine with a CUDA device, rebuild the extension for the local torch
# and run, each step time-boxed so that the whole takes under 9 minutes on an H100/H200:
#   env         what the machine has: GPU, python, torch, nvcc, compute-sanitizer, test modules
#   build       pip install --no-build-isolation --no-deps -e . for the local torch and GPU (setup.py build_ext
#               --inplace where that interpreter has no pip)
#   build_info  fisherext.build_info(): the CUDA kernels were compiled
#   tests       the test suite but the large cases (the device fixture of tests/conftest.py adds the CUDA cases
#               when torch sees a GPU)
#   large       tests/test_ops_large.py: every op past 2^31 elements, and its small twin
#   memcheck    compute-sanitizer --tool memcheck on the small twins (one quick test per op), where installed
#   racecheck   compute-sanitizer --tool racecheck on the same, fisherext's kernels only
#   bench       python -m bench.run --device cuda --quick
# A failing step does not stop the others. Each step's output goes to LOGDIR/<step>.log, and LOGDIR/summary.tsv
# holds one line per step: step, status (ok, FAIL, TIMEOUT, skip), exit code, wall seconds, limit seconds.
#
# Usage: bash scripts/gpu_check.sh [LOGDIR]
#   LOGDIR defaults to $OUT/gpu-check-logs when OUT is set, else ./gpu-check-logs (in the repository root).
# Environment:
#   PYTHON          the interpreter to use when its torch is a CUDA build (default python3), else VENV's
#   VENV            the Makefile's virtual environment (default .venv)
#   GPU_CHECK_JOBS  parallel compile jobs (default: the number of CPUs)
#   GPU_CHECK_BENCH_ARGS  arguments of bench.run after --device cuda (default --quick)
#   TORCH_CUDA_ARCH_LIST  the arches to build (default: the visible GPU's)
# Exit status: 0 every step passed (or was skipped), 1 a step failed or timed out, 2 no CUDA device (nothing run).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGDIR=${1:-${OUT:+$OUT/gpu-check-logs}}
LOGDIR=${LOGDIR:-$ROOT/gpu-check-logs}
mkdir -p "$LOGDIR" && LOGDIR=$(cd "$LOGDIR" && pwd) || exit 1
cd "$ROOT" || exit 1

# Seconds per step. Their sum with the kill grace of each (2 s) is 526 s: under 9 minutes if every step runs out.
declare -A LIMIT=([env]=10 [build]=170 [build_info]=15 [tests]=125 [large]=45 [memcheck]=50 [racecheck]=40
                  [bench]=55)
SUMMARY=$LOGDIR/summary.tsv
printf 'step\tstatus\trc\twall_s\tlimit_s\n' >"$SUMMARY"
FAILED=()

record() {  # record STEP STATUS RC WALL_S
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${LIMIT[$1]:--}" >>"$SUMMARY"
  printf 'gpu-check: %-10s %-7s rc=%-3s %6ss\n' "$1" "$2" "$3" "$4" >&2
  [[ $2 == ok || $2 == skip ]] || FAILED+=("$1")
}

step() {  # step NAME COMMAND...: runs COMMAND under the step's time limit, its output to LOGDIR/NAME.log
  local name=$1 start rc status wall
  shift
  printf '$ %s\n' "$*" >"$LOGDIR/$name.log"
  start=$(date +%s%N)
  timeout --kill-after=2 "${LIMIT[$name]}" "$@" >>"$LOGDIR/$name.log" 2>&1
  rc=$?
  wall=$(( ($(date +%s%N) - start) / 1000000 ))
  wall=$(printf '%d.%01d' $((wall / 1000)) $((wall % 1000 / 100)))
  case $rc in
    0) status=ok ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  record "$name" "$status" "$rc" "$wall"
}

skip() {  # skip NAME REASON
  printf 'skipped: %s\n' "$2" >"$LOGDIR/$1.log"
  record "$1" skip - 0
}

# The interpreter: PYTHON if its torch is a CUDA build (a GPU machine's own torch; nothing is downloaded), else
# the Makefile's venv.
cuda_torch() { "$1" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' >/dev/null 2>&1; }
PY=
for candidate in "${PYTHON:-python3}" "$ROOT/${VENV:-.venv}/bin/python"; do
  if command -v "$candidate" >/dev/null && cuda_torch "$candidate"; then
    PY=$(command -v "$candidate")
    break
  fi
done
if [[ -z $PY ]]; then
  echo "gpu-check: no CUDA device: no CUDA build of torch in ${PYTHON:-python3} or ${VENV:-.venv}" |
    tee "$LOGDIR/env.log" >&2
  record env FAIL 2 0
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; then
  echo "gpu-check: no CUDA device: torch.cuda.is_available() is False with $PY" | tee "$LOGDIR/env.log" >&2
  record env FAIL 2 0
  exit 2
fi

SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
[[ -x $SANITIZER ]] || SANITIZER=
export MAX_JOBS=${GPU_CHECK_JOBS:-$(nproc)}
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST
fi

env_report() {
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
  command -v nvcc && nvcc --version | tail -n 2
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  echo "python: $PY; MAX_JOBS=$MAX_JOBS; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  "$PY" - <<'EOF'
import importlib.util, sys, torch
print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)
print(torch.cuda.get_device_name(), "capability %d.%d" % torch.cuda.get_device_capability(),
      "free/total GiB %.1f/%.1f" % tuple(b / 2**30 for b in torch.cuda.mem_get_info()))
for name in ("setuptools", "ninja", "numpy", "pytest", "scipy", "sklearn", "torchvision"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'MISSING'}")
EOF
}

pytest_cmd=("$PY" -m pytest -q -p no:cacheprovider -o faulthandler_timeout=60)
# The small twins of tests/test_ops_large.py under compute-sanitizer. Without the caching allocator every tensor
# is its own allocation, so an access past a tensor's end is outside any allocation, where memcheck sees it.
small_cases=("${pytest_cmd[@]}" tests/test_ops_large.py -k small)
sanitizer=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --error-exitcode 99 --print-limit 50)

export -f env_report
export PY SANITIZER
step env bash -c env_report
if "$PY" -m pip --version >/dev/null 2>&1; then
  # No index, no dependencies: the machine may have no network. PIP_BREAK_SYSTEM_PACKAGES lets pip write into
  # a distribution's (externally managed) Python, whose torch is the one to build for.
  step build env PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -v --no-index --no-deps --no-build-isolation \
    --disable-pip-version-check -e .
else
  step build "$PY" setup.py build_ext --inplace
fi
step build_info "$PY" -c '
import sys, fisherext
info = fisherext.build_info()
print(fisherext.__file__, info, sep="\n")
sys.exit(0 if info["cuda_compiled"] else "fisherext was built without its CUDA kernels")'
step tests "${pytest_cmd[@]}" --durations=15 --junitxml="$LOGDIR/tests.xml" tests --ignore=tests/test_ops_large.py
step large "${pytest_cmd[@]}" --junitxml="$LOGDIR/large.xml" tests/test_ops_large.py
if [[ -n $SANITIZER ]]; then
  step memcheck "${sanitizer[@]}" --tool memcheck "${small_cases[@]}"
  step racecheck "${sanitizer[@]}" --tool racecheck --kernel-name kns=fisherext "${small_cases[@]}"
else
  skip memcheck "compute-sanitizer not found"
  skip racecheck "compute-sanitizer not found"
fi
# shellcheck disable=SC2086  # the arguments are meant to split
step bench "$PY" -m bench.run --device cuda ${GPU_CHECK_BENCH_ARGS:---quick} --json "$LOGDIR/bench.json"

echo >&2
column -t -s $'\t' "$SUMMARY" >&2 2>/dev/null || cat "$SUMMARY" >&2
for name in "${FAILED[@]}"; do
  printf '\n---- %s (last lines of %s) ----\n' "$name" "$LOGDIR/$name.log" >&2
  tail -n 25 "$LOGDIR/$name.log" >&2
done
echo "gpu-check: logs in $LOGDIR" >&2
[[ ${#FAILED[@]} -eq 0 ]]
