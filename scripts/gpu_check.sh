#!/usr/bin/env bash
# Everything GPU-specific, in one go (about 9 minutes at most on one H100/H200):
#
#   1. the machine: nvidia-smi, jax.devices(), versions                    -> env.txt
#   2. the test suite on the GPU (float64: tests/conftest.py enables x64, so the equivalence
#      tests compare in float64 and TF32 matmuls cannot hide anything)     -> tests.txt
#   3. scripts/bench_backward.py --json                                     -> bench_backward.json
#   4. scripts/bench_per_example.py --gpu --conv --json --markdown          -> bench_per_example.json
#      (the GPU MLP preset, then the MNIST-1D CNN at B=256)
#   5. scripts/bench_conv.py --json --markdown (conv step: hand vs jax.grad) -> bench_conv.json
#   6. scripts/bench_private.py (private step vs plain, no peers)           -> results.md only
#   7. the multi-device benchmark (scripts/bench_parallel.py)                -> multi_device.json
#   8. the per-example cost experiment at full size                         -> experiments.json
#   and results.md: the stage table and every Markdown table, for the README.
#
# Usage: scripts/gpu_check.sh [RESULTS_DIR]
#   RESULTS_DIR defaults to $OUT (the device tool's output folder), else ./gpu_results.
#   At most 8 files come back from $OUT: keep the stages' outputs to the files named above.
#
# It installs and downloads nothing: the GPU machines have JAX (CUDA), optax, chex and pytest
# but maybe not hypothesis, orbax, scikit-learn or mnist1d. Test files whose imports are missing
# are skipped and listed; without hypothesis, tests/conftest.py (which imports it) is replaced
# by the same settings through environment variables. Each stage has its own time limit
# (override with TESTS_TIMEOUT, BACKWARD_TIMEOUT, PER_EXAMPLE_TIMEOUT, CONV_TIMEOUT,
# PRIVATE_TIMEOUT, MULTI_TIMEOUT, EXPERIMENTS_TIMEOUT, in seconds; defaults
# 150 + 45 + 120 + 45 + 60 + 45 + 90 = 555 s plus ~10 s of env, inside one 10-minute device
# command); a failing or timed-out stage is
# recorded and the next runs.
# Set GPU_TESTS to a list of test files to run those instead of the default selection.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
RESULTS=${1:-${OUT:-./gpu_results}}
mkdir -p "$RESULTS" || exit 1
RESULTS=$(cd "$RESULTS" && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset JAX_PLATFORMS                      # let JAX find the GPU
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
STAGES="$SCRATCH/stages.md"
echo "| stage | exit status | seconds | output |" >"$STAGES"
echo "|---|---|---|---|" >>"$STAGES"
START=$SECONDS

stage() {  # stage NAME TIMEOUT_S OUTPUT_FILE -- command...
  local name=$1 limit=$2 out=$3 t0=$SECONDS rc
  shift 4
  echo "=== $name (limit ${limit}s) ==="
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && rc="$rc (timed out)"
  echo "| $name | $rc | $((SECONDS - t0)) | $out |" >>"$STAGES"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s ==="
}

# --- 1. the machine ---------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)"
  echo; echo "\$ nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi not available"
  echo; echo "\$ python -c 'import jax; print(jax.devices())'"
  "$PY" -c 'import jax; print(jax.devices())' 2>&1
  echo; "$PY" - <<'EOF' 2>&1
import importlib, platform, os
print("python", platform.python_version(), "| cpus", os.cpu_count())
for m in ("jax", "jaxlib", "optax", "chex", "numpy", "pytest", "hypothesis", "orbax.checkpoint",
          "sklearn", "mnist1d", "matplotlib", "tqdm"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:18s} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001 - report anything
        print(f"{m:18s} missing ({type(e).__name__})")
try:
    import fnbackprop
    print("fnbackprop imports:", ", ".join(sorted(n for n in fnbackprop.__all__)))
except Exception as e:  # noqa: BLE001
    print("fnbackprop FAILED to import:", repr(e))
EOF
} >"$RESULTS/env.txt" 2>&1
echo "| env | 0 | $((SECONDS - START)) | env.txt |" >>"$STAGES"
cat "$RESULTS/env.txt"

# --- 2. the test suite on the GPU ------------------------------------------------------------
# Priority order: if the limit cuts the run short, the equivalence tests have run.
PRIORITY="tests/test_equivalence.py tests/test_conv.py tests/test_per_example.py tests/test_per_example_conv.py tests/test_gradcheck.py tests/test_losses.py tests/test_inputs.py"
# test_parallel_grad.py checks 8 *simulated CPU* devices (jax.device_count() == 8), which a GPU
# process does not have; stage 5 is where sharding on GPUs belongs.
EXCLUDE="tests/test_parallel_grad.py"
if [ -n "${GPU_TESTS:-}" ]; then
  CANDIDATES=$GPU_TESTS
else
  CANDIDATES=$PRIORITY
  for f in tests/test_*.py; do
    case " $PRIORITY $EXCLUDE " in *" $f "*) ;; *) CANDIDATES="$CANDIDATES $f" ;; esac
  done
fi
# Keep the files whose top-level imports are all available here.
SELECTED=$("$PY" - $CANDIDATES <<'EOF'
import ast, importlib.util, sys
keep, skip = [], []
for path in sys.argv[1:]:
    try:
        tree = ast.parse(open(path).read())
    except OSError:
        continue
    mods = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    missing = sorted(m for m in mods if importlib.util.find_spec(m) is None)
    (skip if missing else keep).append((path, missing))
for path, missing in skip:
    print(f"skipped {path}: missing {', '.join(missing)}", file=sys.stderr)
print(" ".join(p for p, _ in keep))
EOF
2>"$SCRATCH/skipped.txt")
PYTEST_ARGS=(-v -m "not slow" -p no:cacheprovider --durations=15 -rfEs)
if ! "$PY" -c "import hypothesis" 2>/dev/null; then
  # tests/conftest.py imports hypothesis: give pytest its settings through the environment.
  echo "hypothesis missing: running with --noconftest, x64 and rank promotion set by env" >>"$SCRATCH/skipped.txt"
  export JAX_ENABLE_X64=1 JAX_NUMPY_RANK_PROMOTION=raise
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
  PYTEST_ARGS+=(--noconftest)
fi
{
  cat "$SCRATCH/skipped.txt"
  echo "selected: $SELECTED"
  echo
} >"$RESULTS/tests.txt"
# shellcheck disable=SC2086
stage tests "${TESTS_TIMEOUT:-150}" tests.txt -- \
  bash -c '"$0" -m pytest "${@}" 2>&1 | tee -a "'"$RESULTS"'/tests.txt"; exit ${PIPESTATUS[0]}' \
  "$PY" "${PYTEST_ARGS[@]}" $SELECTED
unset JAX_ENABLE_X64 JAX_NUMPY_RANK_PROMOTION

# --- 3. backward benchmark ---------------------------------------------------------------------
if [ -f scripts/bench_backward.py ]; then
  ARGS=(--json "$RESULTS/bench_backward.json")
  HELP=$("$PY" scripts/bench_backward.py --help 2>&1 || true)
  case "$HELP" in *--gpu*) ARGS+=(--gpu) ;; esac
  case "$HELP" in *--markdown*) ARGS+=(--markdown "$SCRATCH/bench_backward.md") ;; esac
  stage bench_backward "${BACKWARD_TIMEOUT:-45}" bench_backward.json -- \
    "$PY" scripts/bench_backward.py "${ARGS[@]}"
else
  echo "| bench_backward | not found | 0 | — |" >>"$STAGES"
fi

# --- 4. per-example clipping benchmark -------------------------------------------------------
stage bench_per_example "${PER_EXAMPLE_TIMEOUT:-120}" bench_per_example.json -- \
  "$PY" scripts/bench_per_example.py --gpu --conv --json "$RESULTS/bench_per_example.json" \
  --markdown "$SCRATCH/bench_per_example.md"

# --- 5. conv training step: hand-derived (lax convolutions on GPU) vs jax.grad ------------------
stage bench_conv "${CONV_TIMEOUT:-45}" bench_conv.json -- \
  "$PY" scripts/bench_conv.py --reps 20 --json "$RESULTS/bench_conv.json" \
  --markdown "$SCRATCH/bench_conv.md"

# --- 6. private step (Poisson, padded, clipped, noised) vs plain, at the CPU goal's size ------
stage bench_private "${PRIVATE_TIMEOUT:-60}" results.md -- \
  "$PY" scripts/bench_private.py --peers "" --reps 7 --json "$SCRATCH/bench_private.json" \
  --markdown "$SCRATCH/bench_private.md"

# --- 7. multi-device benchmark (steps/s vs number of devices; 1 GPU: the 1-device row only) ---
stage multi_device "${MULTI_TIMEOUT:-45}" multi_device.json -- \
  "$PY" scripts/bench_parallel.py --dataset mnist1d --hidden 1024,1024 --batch-size 1024 \
  --epochs 5 --json "$RESULTS/multi_device.json"

# --- 8. experiments at full size: the per-example cost curve (the GPU-specific one) ----------
stage experiments "${EXPERIMENTS_TIMEOUT:-90}" experiments.json -- \
  bash -c '"$0" experiments/per_example_cost.py --out "$1/per_example_cost" && cp "$1/per_example_cost/results.json" "$2/experiments.json" && cp "$1/per_example_cost/table.md" "$1/experiments.md"' \
  "$PY" "$SCRATCH" "$RESULTS"

# --- results.md ----------------------------------------------------------------------------
{
  echo "# GPU check"
  echo
  grep -m1 "^gpu:" "$RESULTS/env.txt" || true
  echo
  cat "$STAGES"
  echo
  echo "Tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$RESULTS/tests.txt" | tail -1)"
  for md in "$SCRATCH"/bench_backward.md "$SCRATCH"/bench_per_example.md "$SCRATCH"/bench_conv.md "$SCRATCH"/bench_private.md "$SCRATCH"/multi_device.md "$SCRATCH"/experiments.md; do
    [ -f "$md" ] && { echo; echo "## $(basename "$md" .md)"; echo; cat "$md"; }
  done
} >"$RESULTS/results.md"
echo
cat "$RESULTS/results.md"
echo "total $((SECONDS - START)) s; results in $RESULTS:"
ls -l "$RESULTS"
