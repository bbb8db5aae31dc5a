#!/usr/bin/env bash
# The CUDA checks, in one go, on a machine with an NVIDIA GPU and a CUDA build of torch:
#   1. the tests marked `gpu` (CUDA inference with fp16 autocast, a bf16 training step);
#   2. benchmarks/throughput.py on CUDA: forward-only against end to end on real tissue, seconds
#      per stage, replay ceiling (JSON in benchmarks/results/throughput-cuda*.json);
#   3. benchmarks/train_speed.py on CUDA: fp32 against bf16 training steps.
# The throughput slide is made from the MoNuSeg validation images next to the repository
# (../shared/data/monuseg-train); a benchmarks/work/throughput/mosaic-x4.svs made elsewhere is
# used as it is. Usage: bash benchmarks/cuda_check.sh [WORKERS] (default 4), PYTHON to choose
# the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORKERS=${1:-4}
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$(date +%s)
"$PY" -m pytest -q -m gpu -p no:cacheprovider
echo "gpu tests: $(( $(date +%s) - start )) s"
# the GPU's load while the benchmark runs, sampled every second (the share of time it is busy)
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -l 1 \
    > benchmarks/results/cuda-utilization.log 2>/dev/null &
  SMI=$!
  trap 'kill $SMI 2>/dev/null || true' EXIT
fi
"$PY" benchmarks/throughput.py --device cuda --repeat 4 --batch-size 32 --workers "$WORKERS"
echo "throughput: $(( $(date +%s) - start )) s"
"$PY" benchmarks/train_speed.py --device cuda --rounds 3 --steps 10
echo "total: $(( $(date +%s) - start )) s"
