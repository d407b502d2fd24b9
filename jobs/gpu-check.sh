#!/bin/bash
# The GPU check of docs/gpu.md, sized for one GPU machine and about 8 minutes: the CUDA tests, then
# `bench gpu` (a 125M transformer at 1 and 2 ranks sharing the GPU, beside torch DDP with
# PowerSGD's hook). Run from the source checkout:
#
#   bash jobs/gpu-check.sh [OUT]
#
# A machine that cannot download takes MPICH and mpi4py as wheels in .whl/ (docs/gpu.md says how).
set -euo pipefail
out=${1:-bench/gpu}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mpitrain-site .whl/*.whl
  export PYTHONPATH=/tmp/mpitrain-site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/mpitrain-site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python3 -m mpitrain bench gpu --out "$out"
