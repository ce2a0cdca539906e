"""Benchmark: fused LoRA kernels vs PEFT's LoRA forward, fwd+bwd time and activation memory.

    python bench/kernels.py                 # CPU: torch backend vs PEFT, d=1024, r=16, dropout 0.1, 4096 tokens
    python bench/kernels.py --device cuda   # GPU: Triton backend vs PEFT, d=4096, r=16, bf16, dropout 0.1,
                                            #      2k/4k/8k tokens (one short run, a few minutes at most)

Two measurements, each PEFT vs fused on the same module (the fused forward is swapped in and out between
interleaved repetitions, so both see the same machine load):
1. one LoRA linear (d×d, frozen base without bias, LoRA factors fp32): forward + backward (dy given);
2. one full local training step (forward, loss, backward, AdamW) of a small Llama with LoRA on all seven
   projections.

Memory, per variant:
- ``saved_bytes``: bytes of the tensors autograd keeps for backward (``saved_tensors_hooks``, deduplicated by
  storage, parameters excluded); ``saved_beyond_input_bytes`` leaves out the layer's input x, which the caller
  holds anyway (in a network it is the previous layer's output);
- peak: CUDA ``max_memory_allocated`` above the resident baseline; on CPU the process's peak RSS (VmHWM,
  reset through /proc/self/clear_refs) above the baseline, with glibc's mmap threshold pinned at 64 KiB so that
  freed tensors go back to the OS and RSS follows live tensor memory.

Writes ``bench/results/kernels_<device>.json`` with the top-level ``speedup`` (PEFT median time / fused median
time for the single-linear fwd+bwd), its ``setting``, and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def _reexec_with_pinned_mmap_threshold(device: str) -> None:
    """glibc reads its mmap threshold at start-up: re-exec once with it pinned (CPU memory measurements)."""
    if device == "cpu" and os.environ.get(_MMAP_ENV) is None and sys.platform.startswith("linux"):
        env = dict(os.environ, **{_MMAP_ENV: "65536"})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dim", type=int, default=None, help="d (default: 1024 cpu, 4096 cuda)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="default: 4096 cpu; 2048 4096 8192 cuda")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="base weight/activation dtype (default: float32 cpu, bfloat16 cuda); LoRA factors fp32")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant (interleaved)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch CPU thread counts to measure the linear at (default on cpu: 1 2; the first one "
                         "gives the top-level speedup and runs the model step)")
    ap.add_argument("--skip-model", action="store_true", help="only the single-linear benchmark")
    ap.add_argument("--out", type=str, default=None)
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# memory helpers
# ---------------------------------------------------------------------------------------------------------
def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


class PeakMemory:
    """Peak memory above the baseline at entry (CUDA allocator, or CPU peak RSS)."""

    def __init__(self, device):
        self.device = device
        self.peak = None

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _proc_status("VmHWM") - self.base


def _saved_bytes(fn, params, inputs=()):
    """(all saved-for-backward bytes, bytes beyond the given inputs) of one call of ``fn``."""
    import torch

    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    beyond = total - sum(seen.get(x.untyped_storage().data_ptr(), 0) for x in inputs)
    del out
    return total, beyond


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _interleaved(variants: dict, device, warmup: int, repeats: int) -> dict:
    """Median/min seconds per variant; each variant is (enter, step, exit) and they alternate per repetition."""
    times = {name: [] for name in variants}
    for rep in range(warmup + repeats):
        order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
        for name in order:
            enter, step, leave = variants[name]
            enter()
            t = _timed(step, device)
            leave()
            if rep >= warmup:
                times[name].append(t)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "n": len(ts)} for name, ts in times.items()}


# ---------------------------------------------------------------------------------------------------------
# 1. one LoRA linear
# ---------------------------------------------------------------------------------------------------------
def bench_linear(args, device, dtype, tokens: int, mode: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from fedlora.kernels import apply_fused_lora, remove_fused_lora

    d, r = args.dim, args.rank
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d, d, bias=False)).to(device=device, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=args.dropout, target_modules=["0"]))
    model.train()
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, d, device=device, dtype=dtype)

    def step():
        y = model(x)
        y.backward(dy)
        x.grad = None
        for p in lora_params:
            p.grad = None

    def fuse():
        rep = apply_fused_lora(model, mode=mode, log=False)
        assert rep.fused, rep.summary()

    nothing = lambda: None  # noqa: E731
    variants = {"peft": (nothing, step, nothing), "fused": (fuse, step, lambda: remove_fused_lora(model))}
    warmup = 2 if device.type == "cpu" else 3
    repeats = args.repeats or (15 if device.type == "cpu" else 20)
    timing = _interleaved(variants, device, warmup, repeats)

    # correctness on the benchmark shapes (dropout off: same maths, different rounding only)
    model.eval()
    with torch.enable_grad():
        outs = {}
        for name in ("peft", "fused"):
            if name == "fused":
                fuse()
            y = model(x)
            outs[name] = [y.detach().float(), *[g.float() for g in torch.autograd.grad(y, [x, *lora_params], dy)]]
            remove_fused_lora(model)
    model.train()
    max_rel = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs["fused"], outs["peft"]))

    memory = {}
    for name in ("peft", "fused"):
        if name == "fused":
            fuse()
        saved, beyond = _saved_bytes(lambda: model(x), [*model.parameters()], [x])
        with PeakMemory(device) as pm:
            step()
        memory[name] = {"saved_bytes": saved, "saved_beyond_input_bytes": beyond, "peak_fwd_bwd_bytes": pm.peak}
        remove_fused_lora(model)
    xb = x.numel() * x.element_size()
    res = {
        "tokens": tokens,
        "timing": timing,
        "speedup": timing["peft"]["median_s"] / timing["fused"]["median_s"],
        "speedup_min_times": timing["peft"]["min_s"] / timing["fused"]["min_s"],
        "max_rel_err_vs_peft_dropout_off": max_rel,
        "x_bytes": xb,
        "memory": memory,
        "saved_saving_x": (memory["peft"]["saved_bytes"] - memory["fused"]["saved_bytes"]) / xb,
        "saved_beyond_input_saving_x": (memory["peft"]["saved_beyond_input_bytes"]
                                        - memory["fused"]["saved_beyond_input_bytes"]) / xb,
        "peak_saving_x": (memory["peft"]["peak_fwd_bwd_bytes"] - memory["fused"]["peak_fwd_bwd_bytes"]) / xb,
    }
    del model, base, x, dy
    return res


# ---------------------------------------------------------------------------------------------------------
# 2. a full local training step of a small Llama
# ---------------------------------------------------------------------------------------------------------
MODEL_PRESETS = {
    # CPU: small enough for a few seconds a step on 2 cores
    "cpu": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=4000, batch=4, seq=256),
    # GPU: a ~0.5B-shaped slice (4 layers of a 2k-wide model), 8k tokens a step
    "cuda": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000, batch=4, seq=2048),
}


def bench_model_step(args, device, dtype, mode: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.kernels import apply_fused_lora, remove_fused_lora

    preset = dict(MODEL_PRESETS[device.type])
    batch, seq = preset.pop("batch"), preset.pop("seq")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**preset)).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, preset["vocab_size"], (batch, seq), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    report = {}

    def fuse():
        report["r"] = apply_fused_lora(model, mode=mode, log=False)

    nothing = lambda: None  # noqa: E731
    variants = {"peft": (nothing, step, nothing), "fused": (fuse, step, lambda: remove_fused_lora(model))}
    timing = _interleaved(variants, device, warmup=1, repeats=3 if device.type == "cpu" else 8)
    memory = {}
    for name in ("peft", "fused"):
        if name == "fused":
            fuse()
        saved, _ = _saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, [*model.parameters()])
        with PeakMemory(device) as pm:
            step()
        memory[name] = {"saved_bytes": saved, "peak_step_bytes": pm.peak}
        remove_fused_lora(model)
    tokens = batch * seq
    x_bytes = tokens * preset["hidden_size"] * torch.finfo(dtype).bits // 8
    n_linears = 7 * preset["num_hidden_layers"]
    out = {
        "config": dict(preset, batch=batch, seq=seq, tokens=tokens, dtype=str(dtype).replace("torch.", ""),
                       lora_rank=args.rank, lora_dropout=args.dropout, adapted_linears=n_linears),
        "fused_layers": len(report["r"].fused),
        "fusion_summary": report["r"].summary(),
        "timing": timing,
        "speedup": timing["peft"]["median_s"] / timing["fused"]["median_s"],
        "memory": memory,
        "saved_saving_per_adapted_linear_x": (memory["peft"]["saved_bytes"] - memory["fused"]["saved_bytes"])
        / n_linears / x_bytes,
        "x_bytes": x_bytes,
    }
    del model, opt
    return out


# ---------------------------------------------------------------------------------------------------------
def _notes(result: dict, gpu: bool) -> list[str]:
    notes = [
        "speedup = PEFT median / fused median seconds for one forward+backward of the adapted linear; the two "
        "variants alternate within each repetition so both see the same machine load.",
        "Memory metrics per adapted linear, in units of |x| (the layer input's bytes): 'saved_beyond_input' = "
        "bytes autograd keeps for backward, deduplicated by storage, parameters and the layer input x itself "
        "excluded (x is the caller's tensor, alive anyway in this benchmark). PEFT keeps the dropout noise (on "
        "CPU a full float tensor; a bool mask on CUDA) and the dropped-out copy of x (its frozen base GEMM keeps "
        "no x); the fused layer keeps only the rank-r S and regenerates the mask from a seed. 'saved_all' "
        "includes x, which the fused layer keeps for dA (not at all when lora_A is frozen, as in FFA-LoRA). "
        "'peak_fwd_bwd' = peak memory above the resident baseline during one forward+backward (CPU: VmHWM with "
        "glibc's mmap threshold pinned so freed tensors leave RSS), which also counts PEFT's transient m×n "
        "LoRA output, its scaled copy and the extra add.",
    ]
    if result.get("train_step"):
        notes.append(
            "train_step: one full local step (forward, loss, backward, AdamW) of a small Llama with LoRA on all "
            "seven projections, PEFT vs apply_fused_lora; 'saved_saving_per_adapted_linear_x' divides the "
            "saved-bytes difference of the whole step by the number of adapted linears and the hidden-size |x| "
            "(q/k/v and gate/up share their input, which the fused layers keep once; down_proj's input is "
            "intermediate-size).")
    if not gpu:
        by_threads = result.get("speedup_by_threads", {})
        notes.append(
            f"CPU threads: fused vs PEFT speedup {by_threads.get('1', 'n/a')}x with one torch thread, "
            f"{by_threads.get('2', 'n/a')}x with two. When the 2 cores are shared with other jobs (see "
            "load_average in environment), a 2-thread run of either variant stalls in every parallel region "
            "(each GEMM and elementwise op) whenever one of its threads is descheduled; those stalls dominate "
            "both variants and hide the elementwise/RNG work the fused layer removes (a 1-thread run is also "
            "faster in absolute terms then). The top-level speedup is the first thread count measured "
            "(setting.threads).")
        notes.append(
            "The torch backend's dropout draws 16 random bits per element with int64 random_ (mt19937) and "
            "thresholds them; bernoulli_ on this CPU costs ~5x more, so drawing the mask twice (forward and "
            "backward) still costs less than PEFT's single nn.Dropout. The drop probability is quantised to "
            "2^-16 (0.1 -> 0.100006).")
    return notes


def main(argv=None) -> int:
    args = _parse(argv)
    _reexec_with_pinned_mmap_threshold(args.device)
    import torch

    default_threads = torch.get_num_threads()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        print(json.dumps({"error": "--device cuda but no CUDA device"}))
        return 2
    args.dim = args.dim or (4096 if gpu else 1024)
    args.tokens = args.tokens or ([2048, 4096, 8192] if gpu else [4096])
    args.threads = args.threads or ([default_threads] if gpu else [1, 2])
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    mode = "triton" if gpu else "torch"

    from fedlora.kernels import triton_status

    cmd = "python bench/kernels.py " + " ".join(sys.argv[1:])
    result = {
        "benchmark": "kernels",
        "command": cmd.strip(),
        "device": args.device,
        "backend": mode,
        "speedup": None,
        "setting": {"op": "one LoRA linear, forward+backward (dy given), median of interleaved repetitions",
                    "d": args.dim, "rank": args.rank, "dropout": args.dropout,
                    "tokens": args.tokens[len(args.tokens) // 2], "threads": args.threads[0],
                    "dtype": str(dtype).replace("torch.", ""),
                    "lora_factor_dtype": "float32", "bias": False, "baseline": "PEFT 0.21 lora.Linear forward"},
        "target": ({"speedup": 1.15, "activation_saving_per_linear_x": 2.0, "metric": "saved_beyond_input"} if not gpu else
                   {"speedup_reference": "LoRAFusion reports 1.27x mean kernel-level on H100"}),
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "torch_default_threads": default_threads, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if gpu else None,
            "triton": triton_status()[1] if gpu else "not used (CPU run)",
            "load_average_at_start": os.getloadavg(),
            "malloc_mmap_threshold": os.environ.get(_MMAP_ENV),
        },
        "linear": [],
        "train_step": None,
        "errors": [],
    }
    t_start = time.time()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for tokens in args.tokens:
            try:
                res = bench_linear(args, device, dtype, tokens, mode)
                res["threads"] = threads
                result["linear"].append(res)
                print(f"[linear] threads={threads} tokens={tokens} speedup={res['speedup']:.3f} "
                      f"peft={res['timing']['peft']['median_s'] * 1e3:.2f}ms "
                      f"fused={res['timing']['fused']['median_s'] * 1e3:.2f}ms "
                      f"saved-beyond-input saving={res['saved_beyond_input_saving_x']:.2f}|x| "
                      f"peak saving={res['peak_saving_x']:.2f}|x|", file=sys.stderr, flush=True)
            except Exception as exc:  # keep going: one JSON at the end whatever happens
                result["errors"].append({"part": f"linear threads={threads} tokens={tokens}", "error": repr(exc),
                                         "trace": traceback.format_exc()[-2000:]})
                print(f"[linear] threads={threads} tokens={tokens} failed: {exc!r}", file=sys.stderr)
            if gpu:
                torch.cuda.empty_cache()
    torch.set_num_threads(args.threads[0])
    first = [r for r in result["linear"] if r["threads"] == args.threads[0]]
    central = [r for r in first if r["tokens"] == result["setting"]["tokens"]] or first
    if central:
        c = central[0]
        result["speedup"] = round(c["speedup"], 4)
        result["setting"]["tokens"] = c["tokens"]
        result["speedup_by_tokens"] = {str(r["tokens"]): round(r["speedup"], 4) for r in first}
        result["speedup_by_threads"] = {str(r["threads"]): round(r["speedup"], 4) for r in result["linear"]
                                        if r["tokens"] == c["tokens"]}
        result["activation_memory"] = {
            "x_bytes": c["x_bytes"],
            "saved_bytes": {k: v["saved_bytes"] for k, v in c["memory"].items()},
            "saved_beyond_input_bytes": {k: v["saved_beyond_input_bytes"] for k, v in c["memory"].items()},
            "peak_fwd_bwd_bytes": {k: v["peak_fwd_bwd_bytes"] for k, v in c["memory"].items()},
            "saving_x": {"saved_beyond_input": round(c["saved_beyond_input_saving_x"], 3),
                         "saved_all": round(c["saved_saving_x"], 3),
                         "peak_fwd_bwd": round(c["peak_saving_x"], 3)},
        }
        if not gpu:
            result["target_met"] = {
                "speedup": c["speedup"] >= 1.15,
                "activation_saving_saved_beyond_input": c["saved_beyond_input_saving_x"] >= 2.0 - 1e-9,
                "activation_saving_saved_all": c["saved_saving_x"] >= 2.0 - 1e-9,
                "activation_saving_peak": c["peak_saving_x"] >= 2.0,
            }
    if not args.skip_model:
        try:
            result["train_step"] = bench_model_step(args, device, dtype, mode)
            ts = result["train_step"]
            print(f"[model] speedup={ts['speedup']:.3f} peft={ts['timing']['peft']['median_s']:.3f}s "
                  f"fused={ts['timing']['fused']['median_s']:.3f}s", file=sys.stderr, flush=True)
        except Exception as exc:
            result["errors"].append({"part": "train_step", "error": repr(exc), "trace": traceback.format_exc()[-2000:]})
            print(f"[model] failed: {exc!r}", file=sys.stderr)
    result["notes"] = _notes(result, gpu)
    result["wall_s"] = round(time.time() - t_start, 1)
    result["environment"]["load_average_at_end"] = os.getloadavg()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"kernels_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("benchmark", "device", "speedup", "setting", "command")}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if result["speedup"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
