#!/usr/bin/env bash
# The GPU-only checks, as one short script for a CUDA machine (Triton kernels compiled for real, bf16, speed and
# memory). Needs python3 with CUDA torch, triton, peft, transformers and pytest (no fedlora venv: the kernels and
# their tests import only those). From the repo root:  OUT=/some/dir bash bench/gpu_checks.sh   (about 3 minutes)
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
rc=0
# kernels vs PEFT: forward/backward equality in fp32/fp16/bf16, dropout, odd shapes (Triton compiled on the GPU)
timeout 600 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels.py 2>&1 | tee "$OUT/gpu_tests.log" || rc=1
# speed and saved-activation memory: Triton backend vs PEFT, d=4096, r=16, bf16 -> bench/results/kernels_cuda.json
timeout 600 python3 bench/kernels.py --device cuda 2>&1 | tee "$OUT/gpu_kernels.log" || rc=1
[ -f bench/results/kernels_cuda.json ] && [ "$OUT" != bench/results ] && cp bench/results/kernels_cuda.json "$OUT/"
exit $rc
