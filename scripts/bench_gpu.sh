#!/bin/bash
# The GPU benchmarks of BENCHMARKS.md sections 2 and 3, in one go: Keras 3 on the JAX backend (GPU),
# tf.data on CPU TensorFlow. Run from the project root on a machine prepared by
# ../shared/gpu/README.md (staging, then setup_device.sh). Every result goes to OUT_DIR as it comes,
# so a run cut short keeps what it finished; each step has its own time limit.
#
#   bash scripts/bench_gpu.sh DATA_DIR OUT_DIR
set -uo pipefail
data_dir=${1:?usage: bench_gpu.sh DATA_DIR OUT_DIR}
out=${2:?usage: bench_gpu.sh DATA_DIR OUT_DIR}
mkdir -p "$out"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # PyTorch shares the GPU

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "   exit $?; $(grep '^|' "$out/$name.log" | tail -1)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/device.txt"
nproc >>"$out/device.txt"
step e2e_resnet50 160 python3 scripts/bench_end_to_end.py --model=resnet50 --data_dir="$data_dir" --output_dir=/tmp/runs
step step_resnet50 90 python3 scripts/bench_train_step.py --model=resnet50 --image_size=224 --batch_size=128 \
  --precision=bfloat16 --steps=20 --repeats=3
step e2e_densenet121 220 python3 scripts/bench_end_to_end.py --model=densenet121 --data_dir="$data_dir" \
  --output_dir=/tmp/runs
step step_densenet121 100 python3 scripts/bench_train_step.py --model=densenet121 --image_size=224 --batch_size=128 \
  --precision=bfloat16 --steps=20 --repeats=3
for model in resnet50 densenet121; do  # the runs' own records, for the per-epoch table
  cp "/tmp/runs/bench_$model/history.csv" "$out/history_$model.csv" 2>/dev/null
done
