#!/usr/bin/env bash
# The one prepared GPU check (issue 17, item 3), for a session that is lent an
# accelerator for a few minutes: install, then every figure the README's
# Performance section asks for, written under $OUT (default gpu_out/).
#
#   OUT=/path bash scripts/gpu_session.sh [STEPS]      # STEPS: default 300
#   SKIP_INSTALL=1 SKIP_BENCH=1 RUN_TIMEOUT=20 OUT=/tmp/g bash scripts/gpu_session.sh 2
#                                          # a rehearsal on a CPU, in this venv
#
# 1. `pip install -e ".[cuda12]"` into .venv-gpu (its log in $OUT/pip.log);
# 2. `scripts/benchmark.py --suite=gpu` (JAX rows; PyTorch rows when
#    $MEDSEG_TORCH_PYTHON names a venv with torch + monai), $OUT/benchmarks/;
# 3. the full-size recipes on synthetic data for STEPS steps each, bf16:
#    unetpp (also float32, and augment_on=device), unet, transunet, unet3d;
#    each run capped by `timeout` so one slow run cannot eat the budget;
# 4. `scripts/summarize_runs.py` over the runs: $OUT/runs.md (images/s,
#    compile time, val Dice per run).
# Every step goes on after a failure of the one before and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
STEPS=${1:-300}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
mkdir -p "$OUT/runs"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/log.txt"; }

if [ "${SKIP_INSTALL:-0}" = 1 ]; then  # Rehearsal: the active venv.
  stamp "install skipped (SKIP_INSTALL=1)"
else
  stamp "install .[cuda12]"
  python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
  if ! pip install -q -e ".[cuda12]" > "$OUT/pip.log" 2>&1; then
    stamp "pip install failed (tail of $OUT/pip.log follows)"
    tail -20 "$OUT/pip.log"
    exit 1
  fi
fi
python -c "import jax; print(jax.devices())" 2>&1 | tee "$OUT/devices.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1

stamp "benchmark.py --suite=gpu"
[ "${SKIP_BENCH:-0}" = 1 ] || timeout 420 python scripts/benchmark.py --suite=gpu \
    --torch_python="${MEDSEG_TORCH_PYTHON:-none}" \
    --output_dir="$OUT/benchmarks" > "$OUT/benchmark.log" 2>&1 \
  || stamp "benchmark.py ended with status $? (see $OUT/benchmark.log)"

train() {  # name, config, extra flags...
  local name=$1 config=$2
  shift 2
  stamp "train $name"
  timeout "$RUN_TIMEOUT" python -m medseg_jax.main --config="$config" \
      --workdir="$OUT/runs/$name" --config.train.num_steps="$STEPS" \
      --config.train.log_every_steps=25 --config.train.progress_bar=False \
      --config.train.tensorboard=False --config.data.worker_count="$WORKERS" \
      "$@" > "$OUT/runs/$name.log" 2>&1 \
    || stamp "$name ended with status $? (see $OUT/runs/$name.log)"
}
train unetpp_bf16 configs/unetpp.py
train unetpp_f32 configs/unetpp.py --config.model.dtype=float32
train unetpp_bf16_device_aug configs/unetpp.py --config.data.augment_on=device
train unet_bf16 configs/unet.py
train transunet_bf16 configs/transunet.py
train unet3d_bf16 configs/unet3d.py

stamp "summary"
python scripts/summarize_runs.py "$OUT"/runs/*/ --output="$OUT/runs.md"
stamp "done"
