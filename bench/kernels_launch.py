"""Where one LoRA linear's fwd+bwd time goes at a small model's shapes: PEFT vs the fused kernels.

SmolLM2-135M's attention projections (in 576, out 576 for q/o and 192 for k/v, r=8, alpha 16, no dropout: its
model config) at 768 tokens (batch 8 x length 96, what a local step moves) and 4x that, base weights bf16, LoRA
factors fp32. Per variant: wall seconds per step (median of timed steps, synchronised), and from torch.profiler the
GPU kernels launched per step and their summed time. Where wall time is far above kernel time, the step waits on
launches and Python rather than on the GPU, and fusing the maths into fewer, larger kernels cannot show.

    python bench/kernels_launch.py --out bench/results/kernels_launch_cuda.json    # CUDA: Triton vs PEFT
    python bench/kernels_launch.py --device cpu --out /tmp/launch_cpu.json        # CPU: torch backend (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (576, 192)}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(device, n_in: int, n_out: int, tokens: int, mode: str, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    from fedlora.kernels import apply_fused_lora

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(n_in, n_out, bias=False)).to(device=device, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["0"]))
    model.train()
    if mode != "peft":
        rep = apply_fused_lora(model, mode=mode, log=False)
        assert rep.fused, rep.summary()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n_out, device=device, dtype=dtype)

    def step():
        model(x).backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    for _ in range(10):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiled = 10
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            step()
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / profiled
    wall = statistics.median(times)
    return {"wall_s_per_step": wall, "kernels_per_step": len(kernels) / profiled,
            "kernel_s_per_step": kernel_s if kernels else None,
            "gpu_busy_share": kernel_s / wall if kernels else None,
            "kernel_names": sorted({e.name[:80] for e in kernels})}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--tokens", type=int, nargs="+", default=[768, 3072])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA device", file=sys.stderr)
        return 2
    fused = "triton" if device.type == "cuda" else "torch"
    t0 = time.time()
    rows = []
    for shape, (n_in, n_out) in SHAPES.items():
        for tokens in args.tokens:
            row = {"shape": shape, "in": n_in, "out": n_out, "tokens": tokens}
            for mode in ("peft", fused):
                row[mode] = measure(device, n_in, n_out, tokens, mode, args.steps)
            row["speedup"] = row["peft"]["wall_s_per_step"] / row[fused]["wall_s_per_step"]
            print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                                                                     if kk != "kernel_names"})
                              for k, v in row.items()}), flush=True)
            rows.append(row)
    out = {"benchmark": "kernels_launch", "command": " ".join(["python", "bench/kernels_launch.py", *sys.argv[1:]]),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "fused_backend": fused, "dtype": "bfloat16 base, fp32 LoRA factors" if device.type == "cuda" else "float32",
           "setting": "one LoRA linear (no bias, r=8, alpha 16, no dropout), fwd+bwd with dy given; wall: median "
                      "of synchronised steps after 10 warm-up steps; kernels: torch.profiler over 10 steps",
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "rows": rows, "wall_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
