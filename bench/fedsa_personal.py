"""FedSA-LoRA's personalised models beside the global ones, on the clients' own label mixes (issue 21).

FedSA-LoRA reports ``personal_accuracy``: each client's own model (its A_k, B_k and head, as it leaves local
training) on a held-out slice of its own partition that it never trains on (``strategy.holdout``), the
example-weighted mean over clients. With label-skewed clients a slice is mostly one class, so that figure is not
comparable with the global test accuracy, and a constant predictor already scores high on it. This script puts
references beside it, per seed, on the same clients' slices (rebuilt from the FedSA-LoRA run's own config: the
same partitions, seed and ``fedlora.data.holdout_indices``):

  majority   each slice's most frequent label predicted for all of its rows (no model);
  mix        a run's exported global model (FedIT's; FedSA-LoRA's (Ā, B̄)) scored on the clients' label mix: its
             accuracy on each class of the test split (never trained on by anyone), weighted by the classes'
             shares of the pooled slices. An unbiased estimate of that global model on the clients' own
             distributions, with the same example weighting as ``personal_accuracy``;
  slices     the same global model on the held-out rows themselves. FedSA-LoRA's clients never trained on them;
             FedIT's clients hold no slice out and did train on some of those rows, so FedIT's figure here is
             biased upwards (reported, not used for the verdict).

Reads a ``fedlora compare`` folder: ``seed_<s>/<name>/`` (or ``<name>/`` for one seed), each run with its
``config.yaml``, ``metrics.jsonl`` and ``adapter/``.

    .venv/bin/python bench/fedsa_personal.py bench/results/compare_label_skew --runs fedit fedsa_lora \
        --out bench/results/fedsa_personal.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def seed_dirs(folder: Path) -> dict[int, Path]:
    """{seed: folder holding that seed's runs}."""
    found = {int(p.name.split("_", 1)[1]): p for p in sorted(folder.glob("seed_*")) if p.is_dir()}
    if found:
        return found
    from fedlora import config

    one = next(p for p in folder.iterdir() if (p / "config.yaml").is_file())
    return {int(config.from_yaml((one / "config.yaml").read_text()).seed): folder}


def slices(cfg):
    """The clients' held-out slices as one dataset, and each client's labels on its slice."""
    from datasets import concatenate_datasets

    from fedlora import data

    fraction = float(cfg.strategy.holdout)
    parts, labels = [], []
    for k in range(int(cfg.num_clients)):
        ds = data.partition(cfg, k)
        _, held = data.holdout_indices(len(ds), fraction, int(cfg.seed), k)
        part = ds.select(held.tolist())
        parts.append(part)
        labels.append(np.asarray(part["label"]))
    return concatenate_datasets(parts), labels


def majority(labels: list[np.ndarray]) -> float:
    """Example-weighted accuracy of predicting each slice's most frequent label."""
    hits = sum(int(np.bincount(y).max()) for y in labels if len(y))
    return hits / sum(len(y) for y in labels)


def score(run_dir: Path, held, labels: list[np.ndarray]) -> dict:
    """A run's exported global model: per-class test accuracy, its mix-weighted figure and its accuracy on the
    slices."""
    from fedlora import batching, config, data, train
    from fedlora.generate import load

    cfg = config.from_yaml((run_dir / "config.yaml").read_text())
    model, tok = load(run_dir)
    collator = batching.Collator(tok, cfg.model.task, int(cfg.train.max_length), cfg.data.get("label_words"))
    test = data.split(cfg)[2]
    y_test = np.asarray(test["label"])
    classes = sorted(set(y_test.tolist()))
    per_class = {}
    for c in classes:
        rows = test.select(np.flatnonzero(y_test == c).tolist())
        per_class[c] = train.evaluate(model, rows, collator, task=cfg.model.task, batch_size=64)["eval_accuracy"]
    pooled = np.concatenate(labels)
    shares = {c: float(np.mean(pooled == c)) for c in classes}
    test_acc = sum(per_class[c] * float(np.mean(y_test == c)) for c in classes)
    return {"test_accuracy": test_acc, "per_class_test_accuracy": {str(c): a for c, a in per_class.items()},
            "mix": sum(per_class[c] * shares[c] for c in classes),
            "slices": train.evaluate(model, held, collator, task=cfg.model.task, batch_size=64)["eval_accuracy"]}


def last(run_dir: Path, key: str):
    from fedlora.report import read_metrics

    rows = read_metrics(run_dir)
    vals = [r[key] for r in rows if r.get(key) is not None]
    return vals[-1] if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--runs", nargs="+", default=["fedit", "fedsa_lora"],
                    help="runs whose exported global model is scored (fedsa_lora's own run is required)")
    ap.add_argument("--fedsa", default="fedsa_lora", help="the FedSA-LoRA run's name in the folder")
    ap.add_argument("--out", type=Path, default=Path("bench/results/fedsa_personal.json"))
    a = ap.parse_args()
    from fedlora import config

    t0 = time.time()
    per_seed = {}
    for seed, folder in seed_dirs(a.folder).items():
        fedsa = folder / a.fedsa
        if not (fedsa / "adapter").is_dir():
            print(f"seed {seed}: no finished {a.fedsa} run in {folder}, skipped")
            continue
        cfg = config.from_yaml((fedsa / "config.yaml").read_text())
        held, labels = slices(cfg)
        row = {"personal_accuracy": last(fedsa, "personal_accuracy"),
               "personal_examples": last(fedsa, "personal_examples"), "slice_rows": int(sum(map(len, labels))),
               "slice_positive_share": [round(float(np.mean(y)), 4) for y in labels],
               "majority": majority(labels), "runs": {}}
        for name in a.runs:
            if (folder / name / "adapter").is_dir():
                row["runs"][name] = score(folder / name, held, labels)
        per_seed[seed] = row
        print(f"seed {seed}: personal {row['personal_accuracy']:.4f}  majority {row['majority']:.4f}  " +
              "  ".join(f"{n} mix {r['mix']:.4f} slices {r['slices']:.4f} test {r['test_accuracy']:.4f}"
                        for n, r in row["runs"].items()), flush=True)

    from fedlora.report import mean_sd

    def over_seeds(get):
        vals = [v for v in (get(r) for r in per_seed.values()) if v is not None]
        mean, sd = mean_sd(vals)
        return {"mean": mean, "sd": sd, "n": len(vals)}

    summary = {"personal_accuracy": over_seeds(lambda r: r["personal_accuracy"]),
               "majority": over_seeds(lambda r: r["majority"])}
    for name in a.runs:
        for key in ("mix", "slices", "test_accuracy"):
            summary[f"{name}_{key}"] = over_seeds(lambda r, n=name, k=key: r["runs"].get(n, {}).get(k))
    for name in a.runs:  # personal minus a global model on the clients' mix, paired by seed
        diffs = [r["personal_accuracy"] - r["runs"][name]["mix"] for r in per_seed.values()
                 if name in r["runs"] and r["personal_accuracy"] is not None]
        if diffs:
            from fedlora.verdicts import verdict

            word, how = verdict(diffs, 0.05) if len(diffs) > 1 else ("one seed", "")
            summary[f"personal_minus_{name}_mix"] = {"diffs": diffs, "mean": mean_sd(diffs)[0],
                                                     "verdict": word, "verdict_how": how}
    out = {"command": "python bench/fedsa_personal.py " + " ".join(sys.argv[1:]), "folder": str(a.folder),
           "wall_s": round(time.time() - t0, 1), "per_seed": per_seed, "summary": summary}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
