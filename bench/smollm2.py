"""Issue 19, "everything works with it": measurements on SmolLM2-135M-Instruct (model=smollm2), one subcommand each.

    .venv/bin/python bench/smollm2.py kernels  # s per whole local step, kernels=peft vs torch, peak RSS, profile
    .venv/bin/python bench/smollm2.py dp       # `fedlora run ... privacy=dp_sgd` vs without; s per step; epsilon
    .venv/bin/python bench/smollm2.py alpaca   # an Alpaca-format JSONL built from SST-2 rows: held-out perplexity
    python bench/smollm2.py gpu --out DIR      # CUDA: a small federated run, kernels=triton vs peft (gpu_checks.sh)

Each writes bench/results/smollm2_<subcommand>.json (gpu: DIR/smollm2_gpu.json) with its command, wall time and
a machine note. The local step is the one clients take (fedlora.train): SST-2 as instruction (chat template, the
label word as the answer), batch 8, max length 96, LoRA r=8 on q,k,v,o, AdamW, gradient clipping."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):  # tests/harness.py: the in-process grid (test code, not the fedlora package)
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = ROOT / "bench" / "results"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
SHAPE = ["model=smollm2", "data=sst2", "train.batch_size=8", "train.max_length=96", "seed=0"]
SHARED = ("2 CPU cores shared with other jobs (a long benchmark at nice 19 and a `fedlora compare` on smollm2 at "
          "nice 5) while this ran at nice 5: times are upper bounds for a quiet machine; see load_average.")


def _command() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/smollm2.py", *sys.argv[1:]])


def _machine(t0: float, load0: float) -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "load_average": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
            "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ},
            "note": SHARED if not torch.cuda.is_available() else "CUDA device", "wall_s": round(time.time() - t0, 1)}


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}", flush=True)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def _reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _rss("VmRSS")


# kernels: seconds per whole local step, kernels=peft vs kernels=torch (same model, swapped in and out) ----------------
def _category(name: str, shapes) -> str:
    """Where an op's self time goes, from its name and input shapes (SmolLM2: d=576, kv 192, MLP 1536, vocab
    49152, LoRA rank 8)."""
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention core (SDPA fwd+bwd)"
    if any(k in name for k in ("log_softmax", "nll_loss", "cross_entropy")):
        return "lm_head + loss"
    dims = {d for s in shapes or [] for d in (s if isinstance(s, (list, tuple)) else [])}
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_"):
        if 49152 in dims:
            return "lm_head + loss"
        if 1536 in dims:
            return "MLP GEMMs (gate/up/down)"
        if 8 in dims:
            return "LoRA factor GEMMs (rank 8)"
        return "attention projection GEMMs (q/k/v/o base)"
    if name.startswith("aten::_foreach") or "adam" in name.lower():
        return "optimizer"
    return "other (norms, rotary, elementwise, copies, autograd)"


def flop_shares(rows: int, seq: int, rank: int = 8) -> dict:
    """Multiply-accumulates of one local step (forward + backward, frozen base: only dX through the base GEMMs,
    dX, dA and dB through LoRA) by part of SmolLM2-135M (d 576, 30 layers, 9 heads / 3 KV heads of 64, MLP 1536,
    vocab 49152, tied lm_head), for ``rows`` rows padded to ``seq`` tokens; and what fusing q,k,v,o can gain at
    most (Amdahl: the adapted linears' share, if made s times faster). A noise-free complement to the profile."""
    d, kv, ff, vocab, layers = 576, 192, 1536, 49152, 30
    tok = rows * seq
    base_attn = (2 * d * d + 2 * d * kv) * layers
    lora = rank * ((d + d) * 2 + (d + kv) * 2) * layers
    mlp = 3 * d * ff * layers
    core = 2 * seq * d * layers  # QK^T and AV per token (causal: half of it is masked, counted in full)
    macs = {"attention projection GEMMs (q/k/v/o base)": 2 * base_attn * tok, "LoRA factors": 3 * lora * tok,
            "MLP GEMMs (gate/up/down)": 2 * mlp * tok, "lm_head": 2 * d * vocab * tok, "attention core": 3 * core * tok}
    total = sum(macs.values())
    adapted = (macs["attention projection GEMMs (q/k/v/o base)"] + macs["LoRA factors"]) / total
    return {"rows": rows, "seq": seq, "total_gmac": round(total / 1e9, 1),
            "share": {k: round(v / total, 4) for k, v in macs.items()},
            "adapted_linears_share": round(adapted, 4),
            "max_whole_step_speedup_if_adapted_linears_s_times_faster": {
                str(sp): round(1 / (1 - adapted + adapted / sp), 3) for sp in (1.24, 1.5, 2.0, float("inf"))},
            "adapted_linear_speedup_needed_for_1.15x": (round(1 / ((1 / 1.15 - (1 - adapted)) / adapted), 2)
                                                         if 1 / 1.15 > 1 - adapted else None)}


def _profile_step(step, batch) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(batch)
    cats: dict[str, float] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        c = _category(e.key, e.input_shapes)
        cats[c] = cats.get(c, 0.0) + e.self_cpu_time_total / 1e3
    total = sum(cats.values())
    return {"total_self_ms": round(total, 1), "by_category_ms": {k: round(v, 1) for k, v in
                                                                  sorted(cats.items(), key=lambda kv: -kv[1])},
            "share": {k: round(v / total, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}}


def cmd_kernels(args) -> None:
    import numpy as np
    import torch

    from fedlora import batching, config, data, models, train
    from fedlora.kernels import apply_fused_lora, is_fused, remove_fused_lora
    from fedlora.kernels.peft_integration import call_stats

    t0, load0 = time.time(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    cfg = config.load(SHAPE + ["kernels=peft"])
    bundle = models.build(cfg)
    model, tok = bundle.model, bundle.tokenizer
    train_ds, _, _ = data.split(cfg)
    coll = batching.Collator(tok, "causal-lm", int(cfg.train.max_length), cfg.data.label_words)
    rng = np.random.default_rng(0)
    n = args.warmup + args.steps
    batches = [coll([train_ds[int(j)] for j in rng.choice(len(train_ds), 8, replace=False)]) for _ in range(n)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.train.lr))
    model.train()

    def step(batch, phases=None):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = train.model_loss(model, batch, "causal-lm")
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t3 = time.perf_counter()
        if phases is not None:
            phases.append({"forward_loss": t1 - t, "backward": t2 - t1, "clip_optimizer": t3 - t2})

    from collections import Counter

    fused_calls: Counter = Counter()  # fused / fallback calls, read before remove_fused_lora drops the counts

    def to_peft():
        fused_calls.update(call_stats(model)), remove_fused_lora(model)

    def to_torch():  # applied again on a fused model it would reset the counts
        any(map(is_fused, model.modules())) or apply_fused_lora(model, "torch", log=False)

    variants = {"peft": to_peft, "torch": to_torch}
    report = apply_fused_lora(model, "torch", log=False)
    remove_fused_lora(model)
    res = {v: {"step_s": [], "phases": [], "peak_rss_above_start_bytes": [], "peak_rss_bytes": []} for v in variants}
    for i, batch in enumerate(batches):
        order = list(variants) if i % 2 == 0 else list(variants)[::-1]  # interleaved: both see the same load
        for v in order:
            variants[v]()
            base = _reset_peak_rss()
            ph: list = []
            t = time.perf_counter()
            step(batch, ph)
            dt = time.perf_counter() - t
            if i >= args.warmup:
                r = res[v]
                r["step_s"].append(round(dt, 3))
                r["phases"].append({k: round(x, 3) for k, x in ph[0].items()})
                r["peak_rss_above_start_bytes"].append(_rss("VmHWM") - base)
                r["peak_rss_bytes"].append(_rss("VmHWM"))
            print(f"step {i} {v:5s} {dt:6.2f} s  tokens {int(batch['attention_mask'].sum())}", flush=True)
    fused_calls.update(call_stats(model))
    stats_fused = dict(fused_calls)
    for v, r in res.items():
        r["median_step_s"] = statistics.median(r["step_s"])
        r["median_phases_s"] = {k: round(statistics.median(p[k] for p in r["phases"]), 3) for k in r["phases"][0]}
        r["max_peak_rss_above_start_bytes"] = max(r["peak_rss_above_start_bytes"])
        r["max_peak_rss_bytes"] = max(r["peak_rss_bytes"])
    profiles = {}
    if args.profile:
        for v in variants:
            variants[v]()
            profiles[v] = _profile_step(step, batches[-1])
    speedup = res["peft"]["median_step_s"] / res["torch"]["median_step_s"]
    tokens = [int(b["attention_mask"].sum()) for b in batches[args.warmup:]]
    out = {
        "benchmark": "smollm2 kernels", "command": _command(),
        "setting": {"model": "SmolLM2-135M-Instruct (float32)", "lora": "r=8, alpha 16, q,k,v,o (120 layers)",
                    "batch": 8, "max_length": 96, "data": "SST-2 train rows as instruction (chat template)",
                    "tokens_per_batch": tokens, "threads": args.threads, "warmup_steps": args.warmup,
                    "timed_steps": args.steps,
                    "step": "zero_grad, forward + loss (fedlora.train.model_loss), backward, clip_grad_norm_, AdamW",
                    "order": "peft and torch interleaved on the same batches (alternating which goes first)"},
        "speedup_whole_step": round(speedup, 3), "goal": ">= 1.15", "goal_met": speedup >= 1.15,
        "variants": res, "fusion_report": report.summary(), "fused_call_stats": stats_fused,
        "memory_method": ("process peak RSS (VmHWM, reset through /proc/self/clear_refs before each step) above the "
                          "RSS at the step's start, with glibc's mmap threshold pinned at 64 KiB (freed tensors go "
                          "back to the OS, so RSS follows live tensor memory); also the absolute VmHWM"),
        "profile": profiles, "profile_method": ("torch.profiler (CPU), one step per variant; self CPU time per op, "
                                                "attributed by op name and input shapes; profiler overhead included"),
    }
    out["setting"]["padded_lengths"] = [int(b["input_ids"].shape[1]) for b in batches[args.warmup:]]
    out["flops"] = flop_shares(8, max(out["setting"]["padded_lengths"]))
    out["machine"] = _machine(t0, load0)
    out["wall_s"] = out["machine"]["wall_s"]
    _write(Path(args.out or RESULTS / "smollm2_kernels.json"), out)
    print(f"speedup {speedup:.3f}; peft {res['peft']['median_step_s']} s, torch {res['torch']['median_step_s']} s")


# dp: the CLI run with and without DP-SGD, and the per-step cost in process ------------------------------------
DP_RUN = ["model=smollm2", "data=sst2", "num_clients=2", "num_rounds=1", "local_steps=2", "train.batch_size=8",
          "train.max_length=96", "eval.max_examples=64", "seed=0"]


def _cli_run(overrides: list[str], work: Path, name: str) -> dict:
    out_dir = work / name
    cmd = [sys.executable, "-m", "fedlora.cli", "run", *overrides, f"out_dir={out_dir}"]
    env = {**os.environ, "FLWR_HOME": str(work / "flwr_home")}
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    wall = time.time() - t
    rows = []
    if (out_dir / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    keep = ("round", "train_loss", "eval_loss", "eval_accuracy", "round_s", "wall_s", "epsilon", "epsilon_max",
            "delta", "bytes_up", "bytes_down")
    res = {"command": "fedlora run " + " ".join(overrides), "rc": p.returncode, "wall_s": round(wall, 1),
           "rounds": [{k: r[k] for k in keep if k in r} for r in rows]}
    if p.returncode != 0:
        res["stderr_tail"] = p.stderr[-3000:]
    print(f"{name}: rc={p.returncode} {wall:.0f} s", flush=True)
    return res


def cmd_dp(args) -> None:
    import torch

    from fedlora import batching, config, data, models, privacy, train

    t0, load0 = time.time(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="fedlora-smollm2-dp-"))
    path = Path(args.out or RESULTS / "smollm2_dp.json")  # parts not redone this time are kept from the file
    out: dict = json.loads(path.read_text()) if path.exists() else {"benchmark": "smollm2 dp"}
    runs = {"dp_sgd": DP_RUN + ["privacy=dp_sgd"], "no_dp": DP_RUN}
    out.setdefault("cli", {}).update({v: {**_cli_run(runs[v], work, v), "by": _command()} for v in args.cli})
    if args.cli and args.steps == 0:
        out["machine_cli"] = _machine(t0, load0)
        _write(path, out)
        return
    out["command"] = _command()
    # per local step, in this process: the same model, local_train vs local_train_dp one step at a time
    torch.set_num_threads(args.threads)
    cfg = config.load(SHAPE + ["privacy=dp_sgd", "kernels=peft"])
    bundle = models.build(cfg)
    train_ds, _, _ = data.split(cfg)
    ds = train_ds.select(range(args.rows))
    coll = batching.Collator(bundle.tokenizer, "causal-lm", 96, cfg.data.label_words)
    dp_cfg = privacy.dp_config(cfg)
    kw = dict(steps=1, batch_size=8, lr=float(cfg.train.lr), total_steps=100, task="causal-lm")
    times: dict[str, list] = {"no_dp": [], "dp_sgd": []}
    for i in range(args.warmup + args.steps):
        for v in (["no_dp", "dp_sgd"] if i % 2 == 0 else ["dp_sgd", "no_dp"]):
            if v == "no_dp":
                r = train.local_train(bundle.model, ds, coll, step_offset=i, seed=i, **kw)
            else:
                r = train.local_train_dp(bundle.model, ds, coll, dp_cfg=dp_cfg, noise_multiplier=1.0,
                                         accountant_state=None, step_offset=i, rng_seed=i, **kw)
            if i >= args.warmup:
                times[v].append(round(r["train_s"], 3))
            print(f"step {i} {v:6s} {r['train_s']:.2f} s", flush=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    # the Poisson batch each timed DP step drew (Opacus' sampler: rand(n) < 1/len(loader), from the round's generator)
    q = 1.0 / -(-len(ds) // 8)
    sizes = [int((torch.rand(len(ds), generator=privacy.fresh_generators(i)[0]) < q).sum())
             for i in range(args.warmup, args.warmup + args.steps)]
    per_ex = [t / max(b, 1) for t, b in zip(times["dp_sgd"], sizes)]
    out["per_step"] = {
        "method": (f"fedlora.train.local_train vs local_train_dp, one step per call (Opacus attached per call, "
                   f"outside the timing), interleaved, {args.warmup} warm-up + {args.steps} timed each, median; "
                   f"{args.rows} SST-2 rows, batch 8 (DP: Poisson, expected 8), max length 96, "
                   f"noise_multiplier 1.0, {args.threads} threads"),
        "step_s": times, "median_step_s": med, "dp_over_no_dp": round(med["dp_sgd"] / med["no_dp"], 3),
        "dp_batch_sizes": sizes, "median_s_per_example": {"no_dp": round(med["no_dp"] / 8, 3),
                                                          "dp_sgd": round(statistics.median(per_ex), 3)}}
    out["per_step"]["dp_over_no_dp_per_example"] = round(statistics.median(per_ex) / (med["no_dp"] / 8), 3)
    out["machine"] = _machine(t0, load0)
    out["wall_s"] = out["machine"]["wall_s"]
    _write(path, out)
    shutil.rmtree(work, ignore_errors=True)


# alpaca: SST-2 rows rephrased as an Alpaca-format file, held-out perplexity before and after a short run -------
INSTRUCTION = "Is the sentiment of this review positive or negative?"


def build_alpaca(path: Path, rows: int, seed: int = 0) -> int:
    """An Alpaca JSONL (instruction, input, output) from SST-2 training rows: the review is the input and a short
    answer sentence the output. It is SST-2 rephrased, not Alpaca's data."""
    import pandas as pd

    df = pd.read_csv(SST2 / "train.tsv", sep="\t", quoting=3).sample(n=rows, random_state=seed)
    with open(path, "w") as f:
        for s, y in zip(df["sentence"], df["label"]):
            f.write(json.dumps({"instruction": INSTRUCTION, "input": str(s).strip(), "output": "The sentiment of "
                                f"this review is {'positive' if int(y) == 1 else 'negative'}."}) + "\n")
    return len(df)


def cmd_alpaca(args) -> None:
    t0, load0 = time.time(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="fedlora-smollm2-alpaca-"))
    path = work / "alpaca_sst2.jsonl"
    n = build_alpaca(path, args.rows)
    overrides = ["model=smollm2", "data=alpaca", f"data.path={path}", "num_clients=2", "num_rounds=2",
                 "local_steps=3", "train.batch_size=8", "train.max_length=96", "eval.max_examples=100", "seed=0"]
    run = _cli_run(overrides, work, "run")
    run["command"] = run["command"].replace(str(path), "ALPACA_SST2.jsonl")
    ppl = {}
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()] \
        if (work / "run" / "metrics.jsonl").exists() else []
    for r in rows:
        ppl[r["round"]] = {k: r.get(k) for k in ("eval_perplexity", "eval_loss", "val_perplexity")}
    out = {"benchmark": "smollm2 alpaca", "command": _command(), "run": run,
           "data": {"rows": n, "source": "SST-2 train.tsv rows (seeded sample), rephrased in Alpaca format",
                    "instruction": INSTRUCTION, "output": "The sentiment of this review is <positive|negative>.",
                    "held_out": "data/alpaca's test_fraction 0.05 of the file (no test split), capped by "
                                "eval.max_examples=100; validation: min(5%, 2000) of the training rows",
                    "honesty": "this is SST-2 in Alpaca format, not the Alpaca dataset (nothing may be downloaded)"},
           "perplexity_by_round": ppl}
    if rows:
        out["round0_perplexity"], out["final_perplexity"] = rows[0].get("eval_perplexity"), rows[-1].get(
            "eval_perplexity")
    out["machine"] = _machine(t0, load0)
    out["wall_s"] = out["machine"]["wall_s"]
    _write(Path(args.out or RESULTS / "smollm2_alpaca.json"), out)
    shutil.rmtree(work, ignore_errors=True)


# gpu: the small federated run on one device, kernels=triton vs peft (bench/gpu_checks.sh) -----------------------------
def _federated(overrides: list[str], out_dir: Path, no_autocast: bool) -> dict:
    import contextlib

    import torch

    from harness import InProcessGrid

    from fedlora import config, models, train
    from fedlora.kernels.peft_integration import call_stats
    from fedlora.strategies.server_app import run_server

    cfg = config.load(overrides + [f"out_dir={out_dir}"])
    tally = {"train_s": 0.0, "steps": 0, "tokens": 0}

    class Grid(InProcessGrid):  # every client in this process: its train time from the replies
        def send_and_receive(self, messages, timeout=None):
            out = super().send_and_receive(messages, timeout)
            for rep in out:
                if rep.has_content() and "metrics" in rep.content and "train_s" in rep.content["metrics"]:
                    tally["train_s"] += float(rep.content["metrics"]["train_s"])
                    tally["steps"] += int(rep.content["metrics"]["steps"])
            return out

    real_loss, real_autocast = train.model_loss, train.autocast

    def counting_loss(model, batch, task):
        tally["tokens"] += int(batch["attention_mask"].sum())
        return real_loss(model, batch, task)

    train.model_loss = counting_loss
    if no_autocast:
        train.autocast = lambda dev: contextlib.nullcontext()
    models._cached.cache_clear()  # the earlier runs' client models off the device: each peak is its own run's
    gc.collect()
    if (cuda := torch.cuda.is_available()):
        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
    start_bytes = int(torch.cuda.memory_allocated()) if cuda else None
    t = time.time()
    try:
        run_server(Grid(int(cfg.num_clients)), cfg, out_dir, echo=lambda *_: None)
    finally:
        train.model_loss, train.autocast = real_loss, real_autocast
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    stats = dict(call_stats(models.cached(cfg).model))
    return {"overrides": " ".join(overrides), "autocast": "off (weights in model.dtype)" if no_autocast else
            "bf16 on CUDA (fedlora's default)", "wall_s": round(time.time() - t, 1), **tally,
            "train_tokens_per_s": round(tally["tokens"] / max(tally["train_s"], 1e-9), 1),
            "peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "gpu_memory_left_at_start_bytes": start_bytes,
            "fused_call_stats": stats, "final_eval_accuracy": rows[-1].get("eval_accuracy")}


def cmd_gpu(args) -> None:
    import torch

    t0, load0 = time.time(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="fedlora-smollm2-gpu-"))
    base = SHAPE + ["num_clients=2", "num_rounds=2", f"local_steps={args.local_steps}",
                    f"eval.max_examples={args.eval_max}", "data.max_train_examples=2000"]
    runs = {}
    for precision in args.precision:
        for k in args.kernels:
            extra = ["model.dtype=bfloat16"] if precision == "bf16_weights" else []
            name = f"{k}/{precision}"
            try:
                runs[name] = _federated(base + extra + [f"kernels={k}"], work / name.replace("/", "_"),
                                        no_autocast=precision == "bf16_weights")
            except Exception as e:  # noqa: BLE001 - one failed variant must not hide the others
                runs[name] = {"error": f"{type(e).__name__}: {e}"}
            print(name, json.dumps(runs[name])[:400], flush=True)
    out = {"benchmark": "smollm2 gpu", "command": _command(), "device": "cuda" if torch.cuda.is_available() else "cpu",
           "setting": "2 clients, 2 rounds, in-process grid (tests/harness.py), batch 8, max length 96, LoRA r=8 "
                      "q,k,v,o; tokens = non-padding tokens of the training batches; train_s = the clients' own "
                      "local-training time; the peak includes the server's evaluation model (same process)",
           "precisions": {"autocast": "fedlora's CUDA default: fp32 weights, bf16 autocast (the fused forward "
                                      "runs in bf16: fused_call_stats counts 'fused (autocast)')",
                          "bf16_weights": "model.dtype=bfloat16 and autocast off, so the Triton kernels run"},
           "runs": runs, "ok": all("error" not in r for r in runs.values())}
    out["machine"] = _machine(t0, load0)
    out["wall_s"] = out["machine"]["wall_s"]
    _write(Path(args.out) / "smollm2_gpu.json", out)
    shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--warmup", type=int, default=2)
    k.add_argument("--steps", type=int, default=6)
    k.add_argument("--no-profile", dest="profile", action="store_false")
    k.add_argument("--flops-only", action="store_true", help="only add the analytic MAC breakdown to --out")
    k.add_argument("--seq", type=int, default=96, help="--flops-only: padded length (default: max length 96)")
    k.add_argument("--out")
    d = sub.add_parser("dp")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--warmup", type=int, default=1)
    d.add_argument("--steps", type=int, default=5)
    d.add_argument("--rows", type=int, default=2000)
    d.add_argument("--cli", nargs="*", choices=["dp_sgd", "no_dp"], default=["dp_sgd", "no_dp"],
                   help="`fedlora run`s to do (none: the per-step part alone)")
    d.add_argument("--out")
    a = sub.add_parser("alpaca")
    a.add_argument("--rows", type=int, default=2000)
    a.add_argument("--out")
    g = sub.add_parser("gpu")
    g.add_argument("--out", required=True, help="folder for smollm2_gpu.json")
    g.add_argument("--kernels", nargs="+", default=["peft", "triton"])
    g.add_argument("--precision", nargs="+", default=["autocast", "bf16_weights"],
                   choices=["autocast", "bf16_weights"])
    g.add_argument("--local-steps", type=int, default=5)
    g.add_argument("--eval-max", type=int, default=64, help="eval.max_examples (a CPU smoke test: a few)")
    args = ap.parse_args(argv)
    if args.cmd == "kernels" and args.flops_only:  # add the analytic breakdown to an existing result
        path = Path(args.out or RESULTS / "smollm2_kernels.json")
        res = json.loads(path.read_text())
        res["flops"] = flop_shares(8, args.seq)
        if not res.get("fused_call_stats"):
            res["fused_call_stats_note"] = ("not recorded by this run: the counts were read after remove_fused_lora "
                                            "had dropped them (fixed since); fusion_report and the profile show it ran")
        res["flops_command"] = _command()
        _write(path, res)
        return 0
    if args.cmd == "kernels" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform == "linux":
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    {"kernels": cmd_kernels, "dp": cmd_dp, "alpaca": cmd_alpaca, "gpu": cmd_gpu}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
