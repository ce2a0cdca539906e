"""FFA-LoRA tuned as its paper sets it (issue 17, item 7): the LoRA alpha (``model.lora.alpha``) and the frozen A's
initialisation (``strategy.a_init``), chosen on the validation split, separately without and with DP.

Why alpha, with ``strategy.lr_multiplier=1.0``. With A frozen, the update is ΔW = (alpha/r)·B·A, and scaling alpha
by c scales the gradient of B by c. Adam(W) normalises that scale away, so B moves by the same steps and every
step of ΔW is c times larger: alpha is B's learning rate, exactly the knob ``strategy.lr_multiplier`` also turns
(the FFA-LoRA paper's point: with A frozen alpha acts like a learning rate, FFA-LoRA being LoRA with alpha → ∞).
Sweeping both would sweep one knob twice, so the multiplier stays at 1.0 (the train.lr FedIT uses) and alpha moves.
They still differ where alpha is the better knob to tune: the multiplier also scales the classifier head's lr
(alpha does not touch the head), AdamW's decoupled weight decay and Adam's epsilon; under DP-SGD alpha also sets
B's share of the per-example clipping norm (B's gradients grow with alpha, the head's do not), which a learning
rate cannot. The init's scale is alpha's too (scaling a frozen A by c is scaling alpha by c): every
``a_init`` has Kaiming-uniform's expected row norm, so the init sweep compares shapes only.

Plan, per block (seed 0; each block's runs in order, one after the other):
  1. alpha stage: alpha in ALPHAS = 32, 64, 128, 256, 512 (alpha/r = 4..64 at r = 8; factor-2 steps bracketing
     the current default, alpha 16 x lr multiplier 2 ≈ alpha 32 x 1, and the README DP table's alpha 128) at the
     default init (kaiming). If the best alpha is at an end of the grid, the grid is extended past it by factor-2
     steps (at most --max-extend, default 2) until it is not;
  2. init stage: gaussian and orthogonal at the best alpha (kaiming there is stage 1's run).
Selection: the final round's validation accuracy (``val_accuracy`` of the last metrics row; the validation split is
carved from the training data and never reaches a client); ties: the smaller alpha, then the earlier init of
kaiming, gaussian, orthogonal. Test accuracy is recorded, never used.

Blocks (``--blocks``, default all three):
  nodp     the default setting: MiniLM, SST-2, 10 clients, partitioner=dirichlet partitioner.alpha=0.5,
           10 rounds x 10 local steps of batch 16, AdamW 5e-3 (the README strategy comparison's, seed 0);
  dp       the README DP table's setting (bench/dp_experiment.py README_TABLE: 3 label-skewed clients, 12 rounds
           x 4 steps, expected batch 1024, micro-batches 64, LoRA on the top layer's query/value, AdamW 2e-2,
           clip 1) under DP-SGD at epsilon = 3, delta = 1e-5: the table's private columns take this choice;
  dp_nodp  the same setting without DP: the table's epsilon = inf column takes this choice.
(The DP blocks run in the DP table's own setting, not the 10-client one: that is the table the choice is for, and
the 10-client setting at batch 16 stays at chance under DP; see the README.) Every run evaluates the whole
validation and test splits each round (eval.max_examples=null).

Runs go through fedlora's own machinery: config.load, preflight.check, the real ServerApp loop
(strategies.server_app.run_server) and ClientApp functions on the in-process grid of tests/harness.py (no Ray;
the messages Flower would carry). Resumable: a run whose directory already holds a finished run of the same
config (fedlora.compare.same_setting) is read, not rerun; an interrupted one (no summary.json) is started again.
A finished run already in the results JSON with the same overrides is taken from there (``"reused": "json"``), so
the tuning resumes on a machine without the run directories (a fresh clone, or runs made by another invocation
with ``--out`` elsewhere and merged in).
Results: bench/results/ffa_tune.json (every run: block, stage, alpha, a_init, validation and test accuracy per
round and final, status, wall s; the choice per block), rewritten after every run.

    nice -n 19 .venv/bin/python bench/ffa_tune.py                       # all three blocks (~2.7 h on 2 cores)
    nice -n 19 .venv/bin/python bench/ffa_tune.py --blocks nodp         # one block (~1 h)
    .venv/bin/python bench/ffa_tune.py --smoke                          # the whole plan on a tiny setting (<1 min)

Estimated on this project's 2-core machines without other load: nodp ~5.5-8 min a run (FFA-LoRA's unloaded
comparison run took 325 s), dp ~8-9 min and dp_nodp ~7-8 min (the README's DP table runs took ~6 min evaluating
64 rows a round; the whole validation and test splits take ~11 s an evaluation, 13 evaluations a run); 7 runs a
block without grid extensions: about 50 + 60 + 50 min, ~2.7 h in all; each grid extension adds one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# not bench/ itself: bench/kernels.py would shadow the `kernels` package bitsandbytes probes for
sys.path[:] = [str(ROOT), str(ROOT / "tests")] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedlora.adapters import A_INITS as INITS  # noqa: E402  (the default, kaiming, first)

RESULTS = ROOT / "bench" / "results"
ALPHAS = (32, 64, 128, 256, 512)
BLOCKS = ("nodp", "dp", "dp_nodp")
DP_EPSILON = "3"
#: the README strategy comparison's setting (`fedlora compare ... partitioner=dirichlet partitioner.alpha=0.5`)
DEFAULT_SETTING = ["model=minilm", "data=sst2", "num_clients=10", "partitioner=dirichlet", "partitioner.alpha=0.5",
                   "num_rounds=10"]
#: --smoke: the same plan on a tiny model, 2 clients, 1 round of 1 step
SMOKE_SETTING = ["model=tiny_llama", "num_clients=2", "min_train_nodes=2", "num_rounds=1", "local_steps=1",
                 "train.batch_size=4", "train.max_length=24", "data.max_train_examples=200", "eval.max_examples=16",
                 "train.micro_batch_size=null", "partitioner.proportions=[[0.1,0.9],[0.9,0.1]]"]
SMOKE_DP_ARGS = ["--rounds", "1", "--steps", "1", "--batch", "8"]


def dp_experiment():
    """bench/dp_experiment.py as a module (it is a script beside this one, not a package)."""
    spec = importlib.util.spec_from_file_location("dp_experiment", ROOT / "bench" / "dp_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def merge(overrides: list[str], extra: list[str]) -> list[str]:
    """``overrides`` then ``extra``, an earlier override of a key ``extra`` sets again dropped (Hydra takes the last
    one anyway: this keeps the recorded list readable)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(extra)


def block_setting(block: str, smoke: bool) -> list[str]:
    """The overrides every run of ``block`` shares (seed 0, FFA-LoRA, lr multiplier 1, full evaluation)."""
    if block == "nodp":
        base = DEFAULT_SETTING + ["privacy=none"]
        if smoke:
            base = merge(base, [o for o in SMOKE_SETTING if not o.startswith("partitioner.proportions")])
    else:
        dpe = dp_experiment()
        a = dpe.parse_args(["--readme-table"] + (SMOKE_DP_ARGS if smoke else []))
        if smoke:
            a.targets, a.micro = None, None
        base = dpe.overrides("ffa_lora", DP_EPSILON if block == "dp" else "inf", 0, a)
        if smoke:
            base = merge(base, SMOKE_SETTING)
    return merge(base, ["strategy=ffa_lora", "seed=0", "strategy.lr_multiplier=1.0", "eval.max_examples=null"]
                 if not smoke else ["strategy=ffa_lora", "seed=0", "strategy.lr_multiplier=1.0"])


def run_key(alpha, init) -> str:
    """A run's name: its directory under the block's (no '=': the path travels in an ``out_dir=`` override)."""
    return f"alpha{alpha:g}_{init}"


def finished(run_dir: Path, cfg) -> dict | None:
    """The summary of a finished run of ``cfg`` in ``run_dir``, successful or not (None: none there; a directory
    without summary.json is an interrupted run and is removed). ConfigError when the directory holds a run of
    another config (:func:`fedlora.compare.same_setting`)."""
    from fedlora.compare import same_setting

    if not (run_dir / "summary.json").exists():
        if run_dir.exists():
            shutil.rmtree(run_dir)  # interrupted: nothing finished is lost
        return None
    same_setting(run_dir, cfg)  # a failed run (degraded, no round aggregated) is still this config's outcome
    return json.loads((run_dir / "summary.json").read_text())


def run_one(ov: list[str], run_dir: Path, echo) -> tuple[dict, list[dict], bool]:
    """One run (or the finished one already in ``run_dir``): its summary, metrics rows and whether it was reused."""
    from harness import InProcessGrid

    from fedlora import config, preflight
    from fedlora.strategies.server_app import run_server

    cfg = config.load(ov + [f"out_dir={run_dir}"])
    summary = finished(run_dir, cfg)
    reused = summary is not None
    if not reused:
        preflight.check(cfg)
        summary = run_server(InProcessGrid(int(cfg.num_clients)), cfg, run_dir, echo=echo)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, rows, reused


def record(block: str, stage: str, alpha, init, ov: list[str], run_dir: Path, summary: dict, rows: list[dict],
           reused: bool) -> dict:
    last = rows[-1] if rows else {}
    return {
        "block": block, "stage": stage, "alpha": alpha, "a_init": init, "lr_multiplier": 1.0,
        "val_accuracy_final": last.get("val_accuracy"), "test_accuracy_final": last.get("eval_accuracy"),
        "best_val_accuracy": summary.get("best_val_accuracy"), "best_round": summary.get("best_round"),
        "test_at_best_val": summary.get("test_at_best_val"),
        "val_accuracy": [r.get("val_accuracy") for r in rows], "test_accuracy": [r.get("eval_accuracy") for r in rows],
        "rounds": summary.get("rounds"), "status": summary.get("status"), "epsilon_max": summary.get("epsilon_max"),
        "wall_s": round(float(summary.get("wall_s") or 0.0), 1), "reused": reused, "run_dir": str(run_dir),
        "overrides": ov,
    }


def best(runs: list[dict], key) -> dict:
    """The run with the highest final validation accuracy; ties: the smallest ``key``."""
    return min(runs, key=lambda r: (-(r["val_accuracy_final"] if r["val_accuracy_final"] is not None else -1.0),
                                    key(r)))


def tune_block(block: str, a, doc: dict, save, echo) -> dict:
    """Stage 1 (alpha at kaiming, extended past an edge), stage 2 (inits at the best alpha); returns the choice."""
    base = block_setting(block, a.smoke)
    out = doc["blocks"].setdefault(block, {})
    out.update({"setting": base, "runs": out.get("runs", []), "dp_epsilon": DP_EPSILON if block == "dp" else None})
    runs: dict[str, dict] = {}
    recorded = {run_key(r["alpha"], r["a_init"]): r for r in out["runs"] if r.get("status")}

    def keep():  # the block's runs in the JSON: this invocation's and those recorded before it, in plan order
        out["runs"] = sorted({**recorded, **runs}.values(), key=lambda r: (INITS.index(r["a_init"]), r["alpha"]))

    def go(stage, alpha, init):
        key = run_key(alpha, init)
        if key in runs:
            return runs[key]
        ov = merge(base, [f"model.lora.alpha={alpha:g}", f"strategy.a_init={init}"])
        if key in recorded and recorded[key].get("overrides") == ov:
            runs[key] = {**recorded[key], "stage": stage, "reused": "json"}
            keep()
            echo(f"== {block} {stage}: alpha {alpha:g}, a_init {init}: in the results JSON, "
                 f"val {recorded[key]['val_accuracy_final']}")
            return runs[key]
        run_dir = Path(a.runs_dir) / block / key
        echo(f"== {block} {stage}: alpha {alpha:g}, a_init {init} -> {run_dir}")
        t0 = time.time()
        summary, rows, reused = run_one(ov, run_dir, echo=(lambda *_: None) if a.quiet else echo)
        runs[key] = record(block, stage, alpha, init, ov, run_dir, summary, rows, reused)
        keep()
        save()
        r = runs[key]
        echo(f"   val {r['val_accuracy_final']} (test {r['test_accuracy_final']}, {r['status']}, "
             f"{'reused' if reused else f'{time.time() - t0:.0f} s'})")
        return r

    grid = list(a.alphas)
    for alpha in grid:
        go("alpha", alpha, INITS[0])
    extended = []
    for _ in range(a.max_extend):
        top = best([runs[run_key(x, INITS[0])] for x in grid], key=lambda r: r["alpha"])["alpha"]
        if top == max(grid):
            nxt = max(grid) * 2
        elif top == min(grid) and min(grid) / 2 >= 1:
            nxt = min(grid) / 2
            nxt = int(nxt) if float(nxt).is_integer() else nxt
        else:
            break
        grid.append(nxt)
        extended.append(nxt)
        go("alpha-extend", nxt, INITS[0])
    alpha_runs = [runs[run_key(x, INITS[0])] for x in grid]
    chosen_alpha = best(alpha_runs, key=lambda r: r["alpha"])["alpha"]
    for init in INITS[1:]:
        go("init", chosen_alpha, init)
    init_runs = [runs[run_key(chosen_alpha, i)] for i in INITS]
    pick = best(init_runs, key=lambda r: INITS.index(r["a_init"]))
    choice = {"alpha": pick["alpha"], "a_init": pick["a_init"], "lr_multiplier": 1.0,
              "val_accuracy": pick["val_accuracy_final"], "test_accuracy": pick["test_accuracy_final"],
              "overrides": [f"model.lora.alpha={pick['alpha']:g}", f"strategy.a_init={pick['a_init']}",
                            "strategy.lr_multiplier=1.0"]}
    out.update({"alpha_grid": sorted(grid), "extended": extended, "chosen_alpha_at_kaiming": chosen_alpha,
                "chosen": choice})
    doc["chosen"][block] = choice
    save()
    return choice


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=BLOCKS)
    ap.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="stage 1's alpha grid")
    ap.add_argument("--max-extend", type=int, default=2,
                    help="factor-2 steps the alpha grid may grow past an edge that wins (0: never)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--runs-dir", default=None, help="run directories (default runs/ffa_tune)")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/ffa_tune.json)")
    ap.add_argument("--smoke", action="store_true",
                    help="the whole plan on a tiny setting (tiny_llama, 2 clients, 1 round of 1 step) into a "
                         "temporary directory: checks the script, measures nothing")
    ap.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    a = ap.parse_args(argv)
    a.alphas = [int(x) if float(x).is_integer() else x for x in a.alphas]
    if a.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="fedlora_ffa_tune_smoke_"))
        a.runs_dir, a.out = a.runs_dir or str(tmp / "runs"), a.out or str(tmp / "ffa_tune.json")
        a.threads, a.quiet = 1, True
    a.runs_dir = str(Path(a.runs_dir or ROOT / "runs" / "ffa_tune").resolve())
    a.out = a.out or str(RESULTS / "ffa_tune.json")

    import logging
    import warnings

    import torch

    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("flwr").setLevel(logging.WARNING)

    given = list(sys.argv[1:] if argv is None else argv)
    command = ".venv/bin/python bench/" + " ".join(shlex.quote(x) for x in [Path(__file__).name, *given])
    path = Path(a.out)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("blocks", {})
    doc.setdefault("chosen", {})
    doc.update({
        "command": command,
        "what": "FFA-LoRA's LoRA alpha (stage 1, at the default A init) then A's initialisation (stage 2, at the "
                "best alpha), chosen by the final round's validation accuracy (ties: smaller alpha, then kaiming, "
                "gaussian, orthogonal), seed 0, strategy.lr_multiplier=1.0; per block: nodp (the default 10-client "
                "Dirichlet(0.5) setting), dp (the README DP table's setting at epsilon=3), dp_nodp (that setting "
                "without DP). Test accuracy is recorded, never used to choose.",
        "grid": {"alpha": list(a.alphas), "a_init": list(INITS), "max_extend": a.max_extend},
        "smoke": a.smoke,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": a.threads, "platform": platform.platform()},
    })

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(path)

    echo = lambda s="": print(s, flush=True)  # noqa: E731
    t0 = time.time()
    for block in a.blocks:
        c = tune_block(block, a, doc, save, echo)
        echo(f"** {block}: alpha {c['alpha']:g}, a_init {c['a_init']} (final val {c['val_accuracy']})")
    doc["wall_s_this_invocation"] = round(time.time() - t0, 1)
    save()
    echo(f"\nwritten {path} ({time.time() - t0:.0f} s)")
    echo("chosen: " + "; ".join(f"{b}: " + " ".join(c["overrides"]) for b, c in doc["chosen"].items()))
    if a.smoke and "--runs-dir" not in command:
        command += f" --runs-dir {shlex.quote(a.runs_dir)} --out {shlex.quote(str(path))}"
    echo(f"reproduce (resumes: finished runs in {a.runs_dir} are read, not rerun):\n    nice -n 19 {command}")
    if "dp" in doc["chosen"] and "dp_nodp" in doc["chosen"]:
        echo("the README DP table with these settings, seeds 0 1 2:\n    nice -n 19 .venv/bin/python "
             f"bench/dp_experiment.py --readme-table --ffa-tuned {shlex.quote(str(path))} --seeds 0 1 2 --eps inf 6 3 1"
             + (" --smoke" if a.smoke else " --out bench/results/dp_experiment_r12_ffa_tuned.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
