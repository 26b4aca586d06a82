#!/usr/bin/env bash
# The accelerator check, in one run of at most 8 minutes (docs/performance.md):
#
#   bash tools/device_check.sh            # on a GPU/TPU host
#   bash tools/device_check.sh --quick    # anywhere (CPU): tiny, about a minute
#
# 1. tools/bench_step.py: WRN-16-4 and WRN-40-4 at batch 256 and 1024, the
#    non-private step vs the DP step's "fast" and "vectorized" engines, in
#    float32 and mixed bfloat16: seconds per step, images/s, time ratios.
# 2. A short CIFAR-10 DP run of WRN-16-4 (configs/cifar10_wrn_16_4_eps8.gin,
#    shortened by gin bindings; augmult on) from
#    $DATA_DIR/cifar10-jpeg.tar.gz (DATA_DIR: $KERAS_DPSCALE_DATA_DIR, else
#    ../shared/data beside the repository): test accuracy and epsilon.
#    From its time per step, the whole recipe's wall time on this device
#    (tools/recipe_time.py; with --quick, from WRN-4-1: a check of the
#    arithmetic, not an estimate).
# 3. The same under --strategy mirrored.
#
# Each part has a time limit (the BENCH*_S, RUN_S and MIRRORED_S variables;
# their sum is 8 minutes), so the script always ends in time: a part that
# runs over prints "TIMED OUT" and the next part starts. --quick shrinks every
# part (WRN-4-1, on 8x8 images in the benchmark, batch 4, a few steps) and trains on a tiny
# synthetic ImageFolder instead of CIFAR-10. The exit code is 0 if every part
# finished, else 1. Lines starting with "device_check:" are the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "device_check: unknown argument $arg" >&2; exit 2 ;;
  esac
done
# TensorFlow's C++ INFO and WARNING logs off; without an NVIDIA driver also
# its ERROR "failed call to cuInit" (it only means: no GPU).
if ls /dev/nvidia* >/dev/null 2>&1; then
  export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
else
  export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
fi
PY="${PYTHON:-python3}"
DATA_DIR="${KERAS_DPSCALE_DATA_DIR:-$(cd .. && pwd)/shared/data}"
SCRATCH="$(mktemp -d /tmp/device_check.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT
STATUS=0
START=$(date +%s)

part() {  # part NAME LIMIT_S COMMAND...: runs COMMAND within LIMIT_S
  local name="$1" limit="$2"
  shift 2
  local t0=$(date +%s) rc=0
  echo "=== $name (limit ${limit} s)"
  if [ -n "${PART_OUT:-}" ]; then
    timeout --kill-after=10 "$limit" "$@" >"$PART_OUT" 2>"$PART_ERR" || rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" || rc=$?
  fi
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "device_check: $name TIMED OUT after ${took} s"
    STATUS=1
  elif [ "$rc" != 0 ]; then
    echo "device_check: $name FAILED (exit code $rc) after ${took} s"
    STATUS=1
  else
    echo "device_check: $name ok in ${took} s"
  fi
}

if [ "$QUICK" = 1 ]; then
  BENCH=(--image_size 8 --batch_sizes 4 --steps 2 --warmup 1)
  BENCH_MODELS=("4 1")  # WRN-4-1: stem, head, no residual block
  RUN_MODEL="WRN-4-1 (synthetic data)"
  RUN_BATCH=8 RUN_AUGMULT=2
  CONFIG_BINDINGS=(
    'build_model.model = "wrn_4_1"'
    "train_and_evaluate.batch_size = 8"
    "train_and_evaluate.epochs = 1"
    "build_data.augmult = 2"
    'build_data.image_folder = "synthetic"'
    "build_data.eval_batch_size = 16"
  )
  MIRRORED_BINDINGS=("${CONFIG_BINDINGS[@]}")
  # A tiny CIFAR-shaped ImageFolder: 2 classes x 16 (train), x 4 (test).
  "$PY" - "$SCRATCH/data/synthetic" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split, n in (("train", 16), ("test", 4)):
    for label in range(2):
        folder = os.path.join(sys.argv[1], split, f"class_{label}")
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
EOF
  DATA_DIR="$SCRATCH/data"
  echo "device_check: --quick: synthetic CIFAR-shaped data (32 images)"
  BENCH16_S=${BENCH16_S:-150} BENCH40_S=0 RUN_S=${RUN_S:-150}
  MIRRORED_S=${MIRRORED_S:-150}
else
  BENCH=(--image_size 32 --batch_sizes 256,1024 --steps 5 --warmup 2)
  BENCH_MODELS=("16 4" "40 4")
  RUN_MODEL="WRN-16-4"
  RUN_BATCH=512 RUN_AUGMULT=4
  # About 300 steps of B = 512 with 4 augmult views (98 steps per epoch),
  # the fast engine, no export: about 2 minutes on one GPU.
  CONFIG_BINDINGS=(
    "train_and_evaluate.batch_size = 512"
    "train_and_evaluate.accumulation_steps = 1"
    "train_and_evaluate.epochs = 3"
    "build_data.augmult = 4"
    "compile_model.microbatch_size = None"
    "run.export = False"
  )
  MIRRORED_BINDINGS=("${CONFIG_BINDINGS[@]/train_and_evaluate.epochs = 3/train_and_evaluate.epochs = 1}")
  BENCH16_S=${BENCH16_S:-120} BENCH40_S=${BENCH40_S:-130}
  RUN_S=${RUN_S:-130} MIRRORED_S=${MIRRORED_S:-80}
fi

"$PY" - <<'EOF'
import tensorflow as tf
devices = [f"{d.device_type}:{d.name.split(':')[-1]}"
           for d in tf.config.list_physical_devices() if d.device_type != "CPU"]
print(f"device_check: TensorFlow {tf.__version__}; accelerators: "
      f"{', '.join(devices) or 'none (CPU only)'}")
EOF

i=0
for model in "${BENCH_MODELS[@]}"; do
  read -r depth width <<<"$model"
  limit=$BENCH16_S
  [ "$i" = 1 ] && limit=$BENCH40_S
  i=$((i + 1))
  part "bench WRN-$depth-$width" "$limit" "$PY" tools/bench_step.py \
    --depth "$depth" --width "$width" "${BENCH[@]}" \
    --dtypes float32,bfloat16 --engines fast,vectorized --nomemory
done

run_cifar() {  # run_cifar NAME LIMIT STRATEGY BINDINGS...
  local name="$1" limit="$2" strategy="$3"
  shift 3
  local args=()
  for b in "$@"; do args+=(--gin_bindings "$b"); done
  PART_OUT="$SCRATCH/$strategy.log" PART_ERR="$SCRATCH/$strategy.err" \
    part "$name" "$limit" "$PY" tools/train.py \
    --config configs/cifar10_wrn_16_4_eps8.gin --strategy "$strategy" \
    --data_dir "$DATA_DIR" --model_dir "$SCRATCH/run_$strategy" "${args[@]}"
  # The progress bar's last state, then the result (or the error).
  tr '\r' '\n' <"$SCRATCH/$strategy.log" | sed 's/\x1b\[[0-9;]*m//g' \
    | grep -E " - epsilon: " | tail -n 1
  if grep -q "^test accuracy" "$SCRATCH/$strategy.log"; then
    grep "^test accuracy" "$SCRATCH/$strategy.log" | sed "s/^/device_check: $name: /"
  else
    grep -v "^\s*$" "$SCRATCH/$strategy.err" | tail -n 6
  fi
}

if [ "$QUICK" = 1 ] || [ -f "$DATA_DIR/cifar10-jpeg.tar.gz" ]; then
  run_cifar "CIFAR-10 $RUN_MODEL DP run" "$RUN_S" default "${CONFIG_BINDINGS[@]}"
  # The full recipe's wall time on this device, from the run's last epoch:
  # its seconds over its steps (Keras rounds s/step to whole seconds).
  EPOCH=$(tr '\r' '\n' <"$SCRATCH/default.log" | sed 's/\x1b\[[0-9;]*m//g' \
    | grep -E " - epsilon: " | tail -n 1 \
    | sed -nE 's#^ *([0-9]+)/[0-9]+ .* ([0-9]+)s [0-9.]+[mu]?s/step.*#\2 \1#p')
  if [ -n "$EPOCH" ]; then
    read -r seconds steps <<<"$EPOCH"
    value=$(awk "BEGIN {print $seconds / $steps}")
    echo "device_check: full recipe from $RUN_MODEL at $value s/step ($RUN_BATCH x $RUN_AUGMULT views):"
    "$PY" tools/recipe_time.py --config configs/cifar10_wrn_16_4_eps8.gin \
      --seconds_per_step "$value" --measured_batch "$RUN_BATCH" \
      --measured_augmult "$RUN_AUGMULT" | sed "s/^/device_check: /" || STATUS=1
  else
    echo "device_check: no time per step in the CIFAR-10 run's output: no estimate"
  fi
  run_cifar "CIFAR-10 $RUN_MODEL DP run, mirrored" "$MIRRORED_S" mirrored \
    "${MIRRORED_BINDINGS[@]}"
else
  echo "device_check: no $DATA_DIR/cifar10-jpeg.tar.gz: CIFAR-10 runs skipped"
fi
echo "device_check: done in $(( $(date +%s) - START )) s, exit code $STATUS"
exit "$STATUS"
