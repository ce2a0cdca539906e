"""HetLoRA's aggregation error with and without the nested start of heterogeneous ranks.

    .venv/bin/python bench/nested_init.py [--model tiny_llama] [--ranks 4 8 16] [--rounds 2] [--local-steps 10]
                                          [--seeds 0 1 2] [--out bench/results/nested_init.json]

Each run is a whole federation in-process (the real ServerApp loop and ClientApp functions on the in-process
grid of ``tests/harness.py``): HetLoRA, one client per rank, seeded. ``strategy.nested_init=true``: in the
first round every client starts from the first r_k rows of ONE seeded A of the largest rank;
``false``: each client draws its own A from its own seed at its own rank (the behaviour before nesting).
Reported per round: ``cross_term_error`` = ‖B_g A_g − ΔW*‖_F / ‖ΔW*‖_F over all modules (root-sums-of-squares;
B_g A_g the zero-padded average, ΔW* = Σ p_k s_k B_k A_k), computed by the server from the accepted updates,
and the eval loss. Minutes of CPU on tiny_llama.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # bench/kernels.py is not `kernels`
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def overrides(args, nested: bool, seed: int) -> list[str]:
    """The run's config overrides."""
    ranks = ",".join(str(r) for r in args.ranks)
    return [f"model={args.model}", "strategy=hetlora", f"num_clients={len(args.ranks)}", f"client_ranks=[{ranks}]",
            f"num_rounds={args.rounds}", f"local_steps={args.local_steps}", "train.batch_size=8",
            "train.max_length=32", "eval.max_examples=64", f"data.max_train_examples={args.examples}",
            f"seed={seed}", f"strategy.nested_init={str(nested).lower()}"]


def run(args, nested: bool, seed: int) -> list[dict]:
    """Per round: cross_term_error and eval loss of one federation."""
    from harness import InProcessGrid

    from fedlora import config
    from fedlora.strategies.server_app import run_server

    cfg = config.load(overrides(args, nested, seed))
    with tempfile.TemporaryDirectory() as tmp:
        run_server(InProcessGrid(cfg.num_clients), cfg, Path(tmp), echo=lambda *_: None)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [{"round": r["round"], "cross_term_error": r["cross_term_error"], "eval_loss": r["eval_loss"]}
            for r in rows if r["round"] > 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_llama")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--examples", type=int, default=240, help="training examples in all (data.max_train_examples)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "nested_init.json"))
    args = ap.parse_args()
    t0 = time.time()
    runs = {}
    for nested in (False, True):
        key = "nested" if nested else "independent"
        runs[key] = {str(s): run(args, nested, s) for s in args.seeds}
        print(key, json.dumps(runs[key]), flush=True)
    summary = {}
    for key, by_seed in runs.items():
        for rnd in range(1, args.rounds + 1):
            errs = [rows[rnd - 1]["cross_term_error"] for rows in by_seed.values()]
            summary[f"{key}_round{rnd}_mean"] = statistics.fmean(errs)
    doc = {"what": "HetLoRA cross_term_error per round, nested vs independent first-round A (bench/nested_init.py)",
           "command": "python bench/nested_init.py " + " ".join(sys.argv[1:]), "overrides": overrides(args, True, 0),
           "summary": summary, "runs": runs, "wall_s": round(time.time() - t0, 1),
           "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
