"""Evaluation time of the server's per-round evaluation (test + validation split) with rows batched in dataset
order vs by text length (fedlora.train.evaluate's ``by_length``), on the default model and data. Writes JSON.

  python bench/eval_speed.py [--out bench/results/eval_speed.json] [run overrides...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedlora import batching, config, data, models, train  # noqa: E402


def main(argv: list[str]) -> dict:
    out = ROOT / "bench" / "results" / "eval_speed.json"
    if "--out" in argv:
        i = argv.index("--out")
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    cfg = config.load(argv)
    bundle = models.build(cfg)
    _, validation, test = data.split(cfg)
    coll = batching.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))
    res = {"model": cfg.model.name, "test_rows": len(test), "validation_rows": len(validation),
           "batch_size": int(cfg.eval.batch_size), "load_avg_before": os.getloadavg()[0]}
    for by_length in (False, True):
        t0 = time.time()
        figures = train.evaluate_splits(bundle.model, test, validation, coll, task=bundle.task,
                                        batch_size=int(cfg.eval.batch_size), by_length=by_length)
        res["sorted" if by_length else "dataset_order"] = {"seconds": time.time() - t0, **figures}
    res["speedup"] = res["dataset_order"]["seconds"] / res["sorted"]["seconds"]
    res["load_avg_after"] = os.getloadavg()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
