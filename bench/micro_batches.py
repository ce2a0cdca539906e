"""What train.micro_batch_size buys on real text: time per example of a local step on SST-2 with MiniLM, the whole
batch in one pass vs length-ordered micro-batches that drop the padding they do not need.

    .venv/bin/python bench/micro_batches.py [--batch 512] [--micro 32 64 128] [--steps 3] [--out bench/results/micro_batches.json]

Both loops of fedlora.train are timed: local_train (no DP, gradient accumulation) and local_train_dp (Opacus
per-example clipping and noise, sigma 0.9). The model is the config's MiniLM (LoRA r=8 on query/value/pooler.dense
plus the classifier head, max_length 64); batches are random SST-2 training rows (Poisson batches under DP), so
their padded length is set by the longest row while most rows are short (median 10 tokens). Each setting runs one
warm-up step and ``--steps`` more, all timed (the warm-up is the same for every setting); wall time per example
is reported, with the process CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--micro", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "micro_batches.json"))
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from fedlora import batching, config, data, models, train
    from fedlora import privacy as P

    cfg = config.load(["model=minilm"])
    bundle = models.build(cfg)
    tr, _ = data.load(cfg.data)
    tr = tr.shuffle(seed=0).select(range(20000))
    col = batching.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), None)
    start = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
    dp = P.DPConfig(noise_multiplier=0.9, target_delta=1e-5)

    def timed(dp_on: bool, micro):
        bundle.model.load_state_dict(start)
        common = dict(steps=a.steps + 1, batch_size=a.batch, lr=1e-3, step_offset=0, total_steps=a.steps + 1,
                      task=bundle.task, micro_batch_size=micro)
        t0, c0 = time.perf_counter(), time.process_time()
        if dp_on:
            train.local_train_dp(bundle.model, tr, col, dp_cfg=dp, noise_multiplier=0.9, accountant_state=None,
                                 rng_seed=(0,), **common)
        else:
            train.local_train(bundle.model, tr, col, seed=0, **common)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu

    rows = []
    for dp_on in (False, True):
        for micro in [None, *a.micro]:
            wall, cpu = timed(dp_on, micro)
            n = (a.steps + 1) * a.batch
            rows.append({"loop": "local_train_dp" if dp_on else "local_train", "micro_batch_size": micro,
                         "batch": a.batch, "wall_ms_per_example": round(1000 * wall / n, 3),
                         "cpu_ms_per_example": round(1000 * cpu / n, 3)})
            print(rows[-1], flush=True)
    for r in rows:
        base = next(b for b in rows if b["loop"] == r["loop"] and b["micro_batch_size"] is None)
        r["speedup_vs_whole_batch"] = round(base["wall_ms_per_example"] / r["wall_ms_per_example"], 2)
    import opacus
    import transformers

    doc = {"command": ".venv/bin/python bench/micro_batches.py " + " ".join(sys.argv[1:]),
           "setting": "MiniLM (LoRA r=8 on query/value/pooler.dense + classifier head), SST-2 train rows, max_length 64, "
                      f"batch {a.batch}, {a.steps + 1} steps per setting (one is warm-up, included)",
           "machine": {"cpu_count": os.cpu_count(), "torch_threads": a.threads, "platform": platform.platform(),
                       "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
           "versions": {"torch": torch.__version__, "opacus": opacus.__version__, "transformers": transformers.__version__},
           "results": rows}
    Path(a.out).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
