#!/usr/bin/env bash
# One-shot GPU check of freezebench: GPU tests, one short real training per policy, the step / cache /
# compile benchmarks and the policy overheads, all into one JSON file, within a total time budget.
#
#   benchmarks/gpu_check.sh --wheels .whl --out gpu_check.json          # on the GPU machine (default 360 s)
#   benchmarks/gpu_check.sh --cpu-smoke --out /tmp/smoke.json           # every section at tiny size on the CPU
#
# Options:
#   --wheels DIR   install every wheel in DIR first (pip --no-index --no-deps), then freezebench itself
#                  (editable, no build isolation): for a machine without the internet where MLflow, Optuna
#                  and OmegaConf are not installed. Prepare DIR where pip reaches PyPI (see BENCHMARKS.md,
#                  "One-shot GPU check"): benchmarks/gpu_wheels.sh DIR
#   --out FILE     the JSON written at the end (default gpu_check.json); the logs go to FILE's folder
#                  under gpu_check_logs/
#   --budget S     total seconds for everything (default 360); each section gets at most its own cap and
#                  what is left; a section that no longer fits is recorded as skipped
#   --cpu-smoke    run every section on the CPU at tiny sizes (resnet20 / tiny models, 8-16 px, a few
#                  steps, the aot_eager compile backend), to check that the script and the benchmark
#                  flags work before a GPU is spent on them
#   --python PY    the interpreter (default: python3)
#
# Sections fail soft: a failure (non-zero exit, timeout) is recorded with its exit status and the tail of
# its log, and the next section runs. The JSON holds per section {status, rc, seconds, result} (result:
# the benchmark's RESULT json, or pytest's counts) and a summary of the figures against the targets of
# issue 15 (trainer/bare <= 1.03, prefix freeze efficiency >= 0.9, cached/suffix <= 1.1, compiled/eager
# <= 0.8 at resnet50, SmartFRZ overhead <= 0.5 %, AutoFreeze <= 3 %).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

WHEELS="" OUT="gpu_check.json" BUDGET=360 SMOKE=0 PY=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    --python) PY="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
LOGS="$(dirname "$OUT")/gpu_check_logs"
mkdir -p "$LOGS"
: > "$LOGS/sections.tsv"
START=$(date +%s)
export PYTHONUNBUFFERED=1 MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false GIT_PYTHON_REFRESH=quiet
export TQDM_DISABLE=1

elapsed() { echo $(( $(date +%s) - START )); }

# run_section NAME CAP_SECONDS COMMAND...: run with a timeout of min(CAP, what is left of the budget)
run_section() {
  local name="$1" cap=$(( $2 * CAP_SCALE )); shift 2
  local left=$(( BUDGET - $(elapsed) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    printf '%s\tskipped\t-\t0\t%s\n' "$name" "budget: ${left}s left" >> "$LOGS/sections.tsv"
    echo "== $name: skipped (budget: ${left}s left)"
    return 0
  fi
  echo "== $name (at most ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status=failed; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" "$*" >> "$LOGS/sections.tsv"
  echo "   $status (rc $rc, ${dt}s); log $LOGS/$name.log"
  [ "$status" = ok ] || tail -n 5 "$LOGS/$name.log" | sed 's/^/   | /'
  return 0
}

# --- sizes -------------------------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
  DEV=cpu BIG=resnet20 BIG_PX=16 BIG_BS=8 SMALL=tiny SMALL_PX=8 SMALL_BS=8 STEPS=2 REPEATS=1 BACKEND=aot_eager
  PREC=bf16 PX_POL=16 POL_STEPS=2
  CAP_SCALE=8  # the CPU is far slower: every section's cap (and the default budget) scaled up
  [ "$BUDGET" = 360 ] && BUDGET=$(( 360 * CAP_SCALE ))
  TESTS_MARK=gpu  # all skipped on the CPU: checks that they are collected
else
  DEV=cuda BIG=resnet50 BIG_PX=224 BIG_BS=64 SMALL=resnet20 SMALL_PX=32 SMALL_BS=128 STEPS=8 REPEATS=3
  BACKEND=inductor PREC=bf16 PX_POL=224 POL_STEPS=4 TESTS_MARK=gpu CAP_SCALE=1
fi

# --- setup: wheels and freezebench ---------------------------------------------------------------------------
setup() {
  if [ -n "$WHEELS" ]; then
    ls "$WHEELS"/*.whl > /dev/null || { echo "no wheels in $WHEELS"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl || return 1
  fi
  if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if any(e.name == 'smartfrz' for e in \
      m.entry_points(group='freezebench.policies')) else 1)" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
  fi
  "$PY" - <<'EOF'
import torch, mlflow, optuna, omegaconf, freezebench
from freezebench.registry import POLICIES
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
print("mlflow", mlflow.__version__, "optuna", optuna.__version__, "omegaconf", omegaconf.__version__)
print("policies", ",".join(POLICIES.names()))
EOF
}
export -f setup
export WHEELS PY
run_section setup 90 bash -c setup

if [ "$SMOKE" = 0 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || echo "WARNING: no CUDA device visible; the GPU sections will fail (use --cpu-smoke on a CPU machine)"
fi

# --- sections, most important first (a later one is skipped when the budget runs out) -----------------------
# only the files holding GPU-marked tests: the others may import packages the GPU host lacks (selenium)
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
run_section gpu_tests 45 "$PY" -m pytest -q -m "$TESTS_MARK" "${GPU_TESTS[@]}" -p no:cacheprovider

POLICY_SET=(--set data.name=synthetic --set "data.synthetic_size=$PX_POL" --set data.synthetic_channels=3
  --set data.synthetic_classes=10 --set "data.synthetic_samples=$(( (POL_STEPS + 1) * BIG_BS + 40 ))"
  --set "data.batch_size=$BIG_BS" --set "trainer.max_steps_per_epoch=$POL_STEPS" --set "trainer.precision=$PREC"
  --set trainer.channels_last=true --set trainer.checkpoint_every=0 --set trainer.probe_batch_size=32)

# resnet50 224 px first (the targets are stated there), then every policy once, then resnet20 32 px
run_section compile_big 150 "$PY" benchmarks/bench_compile.py --device "$DEV" --model "$BIG" \
  --image-size "$BIG_PX" --batch-size "$BIG_BS" --steps "$STEPS" --repeats "$REPEATS" --precision "$PREC" \
  --channels-last --backend "$BACKEND" --patterns full --quick
run_section step_big 75 "$PY" benchmarks/bench_step.py --device "$DEV" --models "$BIG" --image-size "$BIG_PX" \
  --batch-size "$BIG_BS" --steps "$STEPS" --repeats "$REPEATS" --warmup 1 --retries 0
run_section cache_big 60 "$PY" benchmarks/bench_cache.py --device "$DEV" --models "$BIG" --image-size "$BIG_PX" \
  --batch-size "$BIG_BS" --steps "$STEPS" --repeats "$REPEATS" --warmup 2 --precision "$PREC" --channels-last
run_section policies 90 "$PY" benchmarks/bench_policy_overhead.py --device "$DEV" --model "$BIG" --epochs 1 \
  "${POLICY_SET[@]}"
run_section overhead 45 "$PY" benchmarks/bench_policy_overhead.py --device "$DEV" --model "$BIG" --epochs 3 \
  --policies smartfrz,autofreeze "${POLICY_SET[@]}" --set "trainer.max_steps_per_epoch=$(( POL_STEPS * 3 ))" \
  --set "data.synthetic_samples=$(( (POL_STEPS * 3 + 1) * BIG_BS + 40 ))"
run_section step_small 40 "$PY" benchmarks/bench_step.py --device "$DEV" --models "$SMALL" \
  --image-size "$SMALL_PX" --batch-size "$SMALL_BS" --steps "$STEPS" --repeats "$REPEATS" --warmup 1 --retries 0
run_section cache_small 40 "$PY" benchmarks/bench_cache.py --device "$DEV" --models "$SMALL" \
  --image-size "$SMALL_PX" --batch-size "$SMALL_BS" --steps "$STEPS" --repeats "$REPEATS" --warmup 2 \
  --precision "$PREC" --channels-last
run_section compile_small 90 "$PY" benchmarks/bench_compile.py --device "$DEV" --model "$SMALL" \
  --image-size "$SMALL_PX" --batch-size "$SMALL_BS" --steps "$STEPS" --repeats "$REPEATS" --precision "$PREC" \
  --channels-last --backend "$BACKEND" --quick

# --- one JSON ---------------------------------------------------------------------------------------------
"$PY" benchmarks/gpu_check_report.py --logs "$LOGS" --out "$OUT" --budget "$BUDGET" --elapsed "$(elapsed)" \
  --mode "$([ "$SMOKE" = 1 ] && echo cpu-smoke || echo gpu)"
echo "wrote $OUT ($(elapsed)s)"
