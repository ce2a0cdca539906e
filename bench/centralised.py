"""Centralised reference: the same model, LoRA config and total optimizer steps as a federated run, on the
pooled training data. Writes JSON (accuracy curve) so federated results can be read against it.

  python bench/centralised.py model=minilm num_clients=10 num_rounds=10 local_steps=10 [--out FILE]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedlora import config, data, models, train  # noqa: E402


def main(argv: list[str]) -> dict:
    out = ROOT / "bench" / "results" / "centralised.json"
    if "--out" in argv:
        i = argv.index("--out")
        out = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    cfg = config.load(argv)
    steps_per_round = int(cfg.local_steps) * int(cfg.num_clients)  # same total steps as the federation
    bundle = models.build(cfg)
    tr, te = data.load(cfg.data)
    coll = data.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))
    total = steps_per_round * int(cfg.num_rounds)
    curve, t0 = [], time.time()
    opt_state = None
    for rnd in range(1, int(cfg.num_rounds) + 1):
        res = train.local_train(bundle.model, tr, coll, steps=steps_per_round, batch_size=int(cfg.train.batch_size),
                                lr=float(cfg.train.lr), step_offset=(rnd - 1) * steps_per_round, total_steps=total,
                                scheduler=cfg.train.scheduler, warmup=int(cfg.train.warmup_steps),
                                max_grad_norm=cfg.train.max_grad_norm, seed=int(cfg.seed), round_idx=rnd,
                                task=bundle.task, device=bundle.device)
        ev = train.evaluate(bundle.model, te, coll, task=bundle.task, batch_size=int(cfg.eval.batch_size))
        curve.append({"round": rnd, "steps": rnd * steps_per_round, "train_loss": res["train_loss"], **ev,
                      "wall_s": time.time() - t0})
        print(json.dumps(curve[-1]), flush=True)
    result = {"command": "python bench/centralised.py " + " ".join(argv), "model": cfg.model.name,
              "total_steps": total, "batch_size": int(cfg.train.batch_size), "lr": float(cfg.train.lr),
              "final_eval_accuracy": curve[-1].get("eval_accuracy"), "curve": curve,
              "torch_threads": torch.get_num_threads()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
