#!/bin/bash
# The GPU benchmarks of BENCHMARKS.md sections 3-5: Keras 3 on the JAX backend (GPU), tf.data
# on CPU TensorFlow. Run from the repository root on a machine prepared by ../shared/gpu/README.md
# (staging, then setup_device.sh). Every result goes to OUT_DIR as it comes, so a run cut short
# keeps what it finished; each step has its own time limit. Name steps to run only those (one
# command may run for at most 10 minutes on the lent machine; all steps together take longer).
#
#   bash benchmarks/bench_gpu.sh DATA_DIR OUT_DIR [STEP ...]
#   steps: e2e_resnet50 step_resnet50 step_resnet50_tob step_resnet50_b32 e2e_densenet121 e2e_densenet121_3ep
#          step_densenet121 overhead_resnet50 pipeline
#          step_densenet121_autotune1 step_densenet121_autotune0 e2e_resnet50_cold (these only when named)
# The train steps time Keras against PyTorch eager and torch.compile; the end-to-end steps run the
# PyTorch recipe (benchmarks/end_to_end_torch.py) after the Keras runs, on the same card in the same call.
# What fits one 10-minute call: step_resnet50 e2e_resnet50_cold step_densenet121.
# DATA_DIR is the CoronaHack folder; the pipeline step also reads DATA_DIR/../fullres, which the
# staging's c3 part does not hold: copy ../shared/data/fullres into an ignored folder (e.g. .gpu/fullres)
# and carry it in a call of its own, since together with c3 the tree is over the 64 MiB a call carries.
set -uo pipefail
data_dir=${1:?usage: bench_gpu.sh DATA_DIR OUT_DIR [STEP ...]}
out=${2:?usage: bench_gpu.sh DATA_DIR OUT_DIR [STEP ...]}
shift 2
steps=${*:-e2e_resnet50 step_resnet50 step_resnet50_tob step_resnet50_b32 e2e_densenet121 step_densenet121 overhead_resnet50 pipeline}
mkdir -p "$out"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # PyTorch shares the GPU

step() {  # step NAME SECONDS COMMAND...: if NAME was asked for, run it with a time limit into OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "   exit $?"
  grep '^|' "$out/$name.log" | tail -2
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/device.txt"
nproc >>"$out/device.txt"
# End to end: a cold run (empty compilation cache), then the same run with the cache it filled.
step e2e_resnet50 420 python3 -m benchmarks.end_to_end --model=resnet50 --data_dir="$data_dir" \
  --output_dir=/tmp/runs --warm_rerun --torch_reference
step e2e_resnet50_cold 270 python3 -m benchmarks.end_to_end --model=resnet50 --data_dir="$data_dir" \
  --output_dir=/tmp/runs_cold --torch_reference
step step_resnet50 170 python3 -m benchmarks.train_step --model=resnet50 --image_size=224 --batch_size=128 \
  --precision=bfloat16 --steps=20 --repeats=3 --torch=eager --torch=compile
# The same with Keras driven by train_on_batch, which waits for every step.
step step_resnet50_tob 90 python3 -m benchmarks.train_step --model=resnet50 --image_size=224 --batch_size=128 \
  --precision=bfloat16 --steps=20 --repeats=3 --keras_loop=train_on_batch
# The end-to-end batch size: the step time a 20-epoch run can at best reach.
step step_resnet50_b32 90 python3 -m benchmarks.train_step --model=resnet50 --image_size=224 --batch_size=32 \
  --precision=bfloat16 --steps=40 --repeats=3
step e2e_densenet121 600 python3 -m benchmarks.end_to_end --model=densenet121 --data_dir="$data_dir" \
  --output_dir=/tmp/runs --warm_rerun --torch_reference
# A cold DenseNet121 run cut to 3 epochs: its start-up, compile, finish and median epoch in the time
# one command may take; the 20-epoch total is then about total + 17 x median epoch.
step e2e_densenet121_3ep 240 python3 -m benchmarks.end_to_end --model=densenet121 --data_dir="$data_dir" \
  --output_dir=/tmp/runs3 -- --epochs=3
step step_densenet121 130 python3 -m benchmarks.train_step --model=densenet121 --image_size=224 --batch_size=128 \
  --precision=bfloat16 --steps=20 --repeats=3
# DenseNet121 with less convolution autotuning, trading compile time against img/s: XLA's default
# level 4 times every candidate algorithm on initialised, checked buffers; level 1 times them on
# uninitialised buffers, level 0 does not time them.
for level in 1 0; do
  step step_densenet121_autotune$level 100 env XLA_FLAGS="--xla_gpu_autotune_level=$level" python3 \
    -m benchmarks.train_step --model=densenet121 --image_size=224 --batch_size=128 --precision=bfloat16 \
    --steps=20 --repeats=3
done
# Where a ResNet50 epoch at batch 32 goes: device steps, Keras' per-step host work or the pipeline.
# Then one epoch traced with jax.profiler: how busy the GPU's streams were and with what.
step overhead_resnet50 180 python3 -m benchmarks.fit_overhead --data_dir="$data_dir" --model=resnet50 \
  --precision=bfloat16 --profile_dir="$out/profile"
# Section 1 on this host's cores: tf.data against a DataLoader with as many workers.
step pipeline 120 python3 -m benchmarks.pipeline --shared="$data_dir/.." --repeats=3
exit 0
