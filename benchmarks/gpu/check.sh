#!/bin/sh
# Every GPU check in one run, for a lent accelerator with a short time budget (see README "GPU").
#   OUT=results/gpu sh benchmarks/gpu/check.sh   # from the repository root; OUT defaults to results/gpu
# 1. the Pallas kernels: bitwise agreement with the reference, throughput against copy bandwidth
#    and the XLA codec (benchmarks/gpu/kernels.py);
# 2. training steps: step-time ratios (baseline, jax.checkpoint, jact 2 bits with either codec)
#    and real peak memory per fresh process (benchmarks/gpu/steps.py).
# Each part saves its JSON as it finishes, so a run cut short keeps what it measured.
set -u
cd "$(dirname "$0")/../.."
export OUT="${OUT:-results/gpu}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
$PYTHON -c "import jax; print(jax.__version__, jax.devices())" | tee "$OUT/devices.txt"
$PYTHON benchmarks/gpu/kernels.py 2>&1 | tee "$OUT/gpu_kernels.log"
$PYTHON benchmarks/gpu/steps.py 2>&1 | tee "$OUT/gpu_steps.log"
