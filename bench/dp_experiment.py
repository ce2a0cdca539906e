"""FFA-LoRA vs LoRA (FedIT) under sample-level DP-SGD, the FFA-LoRA paper's setting at our scale.

MiniLM (all-MiniLM-L6-v2, LoRA r=8 on query/value/pooler + trained classifier head) on SST-2, 3 clients with label
skew [0.1,0.9], [0.9,0.1], [0.5,0.5] (partitioner=label_skew), delta = 1e-5, epsilon in {1, 3, 6, inf}
(inf = no DP at all, the paper's non-private column). Every client runs DP-SGD (Opacus: Poisson batches of
expected size --batch, per-example clipping at max_grad_norm, noise planned once for the whole run from
target_epsilon; one accountant per client across rounds). Metric: accuracy of the global model on the SST-2
dev set (872 examples) after the last round, mean and spread over seeds.

Runs go through the real ServerApp loop and ClientApp functions on the in-process grid of tests/harness.py
(no Ray). Results are appended to the JSON after every run, and runs already there are skipped, so the grid
can be stopped and resumed.

    nice -n 19 .venv/bin/python bench/dp_experiment.py                     # the grid (README table)
    nice -n 19 .venv/bin/python bench/dp_experiment.py --tune              # the one-off lr sweep at epsilon=3

The README's DP table (12 rounds x 4 steps, batch 1024, top layer: :data:`README_TABLE`) over seeds 0, 1, 2 with
FFA-LoRA at the alpha and A initialisation chosen on the validation split by bench/ffa_tune.py (its ``dp`` choice
for the private columns, its ``dp_nodp`` choice for epsilon = inf), FedIT as in the README (not re-tuned), then
mean +- sd and the paired verdict of :mod:`fedlora.verdicts` (FFA-LoRA minus FedIT, seed by seed):

    nice -n 19 .venv/bin/python bench/dp_experiment.py --readme-table --ffa-tuned bench/results/ffa_tune.json \\
        --seeds 0 1 2 --eps inf 6 3 1 --out bench/results/dp_experiment_r12_ffa_tuned.json
    .venv/bin/python bench/dp_experiment.py --smoke [--ffa-tuned PATH]     # the same path on a tiny setting (~1 min)

(``--ffa-alpha``/``--ffa-a-init``/``--ffa-multiplier`` give FFA-LoRA's settings by hand instead of
``--ffa-tuned``.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# not bench/ itself: bench/kernels.py would shadow the `kernels` package bitsandbytes probes for
sys.path[:] = [str(ROOT), str(ROOT / "tests")] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedlora.adapters import A_INITS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EPSILONS = ("1", "3", "6", "inf")
CONTROL = "clip"  # control runs: the DP-SGD path (Poisson batches, per-example clipping, DP optimizer and lr) with sigma = 0
STRATEGIES = ("ffa_lora", "fedit", "fedsvd")  # fedsvd (B only, like FFA-LoRA; issue 21) on request: --strategies
NAMES = {"ffa_lora": "FFA-LoRA", "fedit": "LoRA (FedIT)", "fedsvd": "FedSVD"}
#: The README's DP table ("FFA-LoRA vs LoRA under DP"): its command's settings, for ``--readme-table`` (options given
#: after it on the command line win; ``--ffa-tuned`` replaces FFA-LoRA's alpha and multiplier)
README_TABLE = ["--rounds", "12", "--steps", "4", "--batch", "1024", "--micro", "64", "--lr-fedit", "2e-2",
                "--lr-ffa", "2e-2", "--ffa-multiplier", "1", "--ffa-alpha", "128", "--dp-optimizer", "adamw",
                "--dp-lr-fedit", "2e-2", "--dp-lr-ffa", "2e-2",
                "--targets", r".*layer\.5\.attention\.self\.(query|value)"]
#: ``--smoke``: the same code path on a tiny model and data (seconds per run), into a temporary directory
SMOKE = ["--rounds", "1", "--steps", "1", "--batch", "8", "--round-eval", "16", "--final-eval", "32",
         "--threads", "1", "--seeds", "0", "1", "2", "--eps", "inf", "3"]
SMOKE_OVERRIDES = ["model=tiny_llama", "train.max_length=24", "data.max_train_examples=300"]


def ffa_setting(a, eps: str) -> dict:
    """FFA-LoRA's ``alpha`` (None: the model config's), ``a_init`` (None: the strategy config's) and
    ``lr_multiplier`` for the column ``eps``: with ``--ffa-tuned``, the choice bench/ffa_tune.py made on the
    validation split (its ``dp`` block for the private columns and the control, ``dp_nodp`` for inf), else the
    command line's."""
    if a.ffa_tuned_choice:
        return dict(a.ffa_tuned_choice["dp_nodp" if eps == "inf" else "dp"])
    return {"alpha": a.ffa_alpha, "a_init": a.ffa_a_init, "lr_multiplier": a.ffa_multiplier}


def load_tuned(path: str) -> dict:
    """``{"dp": {alpha, a_init, lr_multiplier}, "dp_nodp": {...}}`` from bench/ffa_tune.py's JSON (its ``chosen``);
    SystemExit naming what is missing."""
    doc = json.loads(Path(path).read_text())
    chosen = doc.get("chosen") or {}
    missing = [b for b in ("dp", "dp_nodp") if b not in chosen]
    if missing:
        raise SystemExit(f"{path} has no choice for block(s) {', '.join(missing)}: run bench/ffa_tune.py "
                         f"--blocks {' '.join(missing)} first, or give --ffa-alpha/--ffa-a-init by hand.")
    return {b: {k: chosen[b][k] for k in ("alpha", "a_init", "lr_multiplier")} for b in ("dp", "dp_nodp")}


def overrides(strategy: str, eps: str, seed: int, a) -> list[str]:
    ov = ["model=minilm", "data=sst2", "partitioner=label_skew", "num_clients=3", "min_train_nodes=3",
          "fraction_train=1.0", f"num_rounds={a.rounds}", f"local_steps={a.steps}", f"train.batch_size={a.batch}",
          "train.max_length=64", f"eval.max_examples={a.round_eval}", f"strategy={strategy}", f"seed={seed}",
          f"train.lr={a.lr[strategy]}", "update_norm_factor=0"]
    if a.targets:
        ov.append(f"model.lora.target_modules='{a.targets}'")
    if a.micro:
        ov.append(f"train.micro_batch_size={a.micro}")
    if strategy == "ffa_lora":
        f = ffa_setting(a, eps)
        ov.append(f"strategy.lr_multiplier={f['lr_multiplier']}")
        if f["alpha"]:
            ov.append(f"model.lora.alpha={f['alpha']}")
        if f["a_init"]:
            ov.append(f"strategy.a_init={f['a_init']}")
    if eps == CONTROL:
        ov += ["privacy=dp_sgd", "privacy.target_epsilon=null", "privacy.noise_multiplier=0.0",
               f"privacy.max_grad_norm={a.clip}", "privacy.reproducible=true", f"privacy.optimizer={a.dp_optimizer}",
               f"train.lr={a.dp_lr[strategy]}"]
    elif eps != "inf":
        ov += ["privacy=dp_sgd", f"privacy.target_epsilon={eps}", "privacy.target_delta=1e-5",
               f"privacy.max_grad_norm={a.clip}", "privacy.reproducible=true", f"privacy.optimizer={a.dp_optimizer}",
               f"train.lr={a.dp_lr[strategy]}"]
    return ov + list(a.extra)


def run_one(ov: list[str], out_dir: Path, final_eval: int | None = None) -> dict:
    """One federated run; the rounds are evaluated on the first ``--round-eval`` dev examples (progress only),
    the final global model on the whole dev split (its first ``final_eval`` examples when given: ``--smoke``)."""
    import shutil

    from harness import InProcessGrid

    from fedlora import strategies
    from fedlora import batching, config, data, models
    from fedlora.strategies.server_app import evaluate_global, run_server

    cfg = config.load(ov)
    shutil.rmtree(out_dir, ignore_errors=True)
    captured = {}
    cls = strategies.STRATEGIES[cfg.strategy.name]

    class Keep(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["strategy"] = self

    strategies.STRATEGIES[cfg.strategy.name] = Keep
    t0 = time.time()
    try:
        summary = run_server(InProcessGrid(cfg.num_clients), cfg, out_dir, echo=lambda s: print("   ", s, flush=True))
    finally:
        strategies.STRATEGIES[cfg.strategy.name] = cls
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    full = config.load(ov + [f"eval.max_examples={final_eval or 'null'}"])
    bundle = models.cached(full)
    _, test = data.load(full.data)
    collator = batching.Collator(bundle.tokenizer, bundle.task, int(full.train.max_length), full.data.get("label_words"))
    final = evaluate_global(bundle, captured["strategy"], test, collator, full)
    return {
        "final_accuracy": final["eval_accuracy"], "final_loss": final["eval_loss"], "dev_examples": len(test),
        "round_accuracy_on_subset": [r.get("eval_accuracy") for r in rows], "status": summary["status"],
        "epsilon_max": summary.get("epsilon_max"), "epsilon": summary.get("epsilon"),
        "rounds": summary["rounds"],
        "wall_s": round(time.time() - t0, 1),
    }


def noise_table(a) -> dict:
    """Each client's planned noise multiplier per epsilon (sampling rate 1/ceil(n/batch), rounds x steps)."""
    from fedlora import config, data
    from fedlora import privacy as P

    cfg = config.load(overrides("fedit", "3", 0, a))
    sizes = [len(data.partition(cfg, i)) for i in range(cfg.num_clients)]
    out = {"client_sizes": sizes}
    for e in EPSILONS[:-1]:
        dp = P.DPConfig(target_epsilon=float(e), target_delta=1e-5, max_grad_norm=a.clip)
        out[e] = [round(P.plan_noise(dp, 1.0 / math.ceil(n / a.batch), a.rounds * a.steps), 4) for n in sizes]
    return out


def probe(lrs: list[float], steps: int = 30, batch: int = 32) -> dict:
    """Centralised, non-private learning speed (balanced SST-2 train, one model): which AdamW lr learns within
    the few steps a run has. Dev accuracy on the first 160 dev examples every 10 steps."""
    from fedlora import batching, config, data, models, train

    cfg = config.load(["model=minilm", "num_clients=2"])
    b = models.build(cfg)
    train_ds, test = data.load(cfg.data)
    col = batching.Collator(b.tokenizer, b.task, 64, None)
    init = {k: v.detach().clone() for k, v in b.model.state_dict().items()}
    sub = test.select(range(160))
    out = {}
    for lr in lrs:
        b.model.load_state_dict(init)
        curve = []
        for chunk in range(steps // 10):
            r = train.local_train(b.model, train_ds, col, steps=10, batch_size=batch, lr=lr, step_offset=chunk * 10,
                                  total_steps=steps, scheduler="cosine", seed=0, round_idx=chunk, task=b.task)
            e = train.evaluate(b.model, sub, col, task=b.task)
            curve.append({"step": (chunk + 1) * 10, "train_loss": round(r["train_loss"], 4),
                          "dev160_accuracy": round(e["eval_accuracy"], 4)})
            print(lr, curve[-1], flush=True)
        out[f"{lr:g}"] = curve
    return out


def centralised(a) -> dict:
    """The same model, optimizer and DP-SGD steps without federation or label skew: one model trained on a shuffled
    22,000-row sample of SST-2 train (the size of one client) for rounds x steps steps in one go, then evaluated on
    the whole dev split. Separates what DP costs at this compute from what the label-skewed federation adds."""
    from fedlora import adapters, batching, config, data, models, train
    from fedlora import privacy as P

    out = {}
    for s in a.strategies:
        for e in a.eps:
            cfg = config.load(overrides(s, e, a.seeds[0], a))
            bundle = models.build(cfg)
            if s in ("ffa_lora", "fedsvd"):  # B only (FedSVD: A orthonormal, frozen in a round)
                adapters.train_A(bundle.model, False)
            tr, dev = data.load(cfg.data)
            tr = tr.shuffle(seed=a.seeds[0]).select(range(22000))
            col = batching.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), None)
            steps, lr = a.rounds * a.steps, float(cfg.train.lr) * float(cfg.strategy.get("lr_multiplier", 1.0))
            common = dict(steps=steps, batch_size=a.batch, lr=lr, step_offset=0, total_steps=steps, task=bundle.task,
                          micro_batch_size=a.micro)
            t0 = time.time()
            if e == "inf":
                train.local_train(bundle.model, tr, col, seed=a.seeds[0], **common)
                sigma = eps_spent = None
            else:
                dp = P.dp_config(cfg)
                sigma = dp.noise_multiplier if e == CONTROL else P.plan_noise(dp, 1.0 / math.ceil(len(tr) / a.batch), steps)
                r = train.local_train_dp(bundle.model, tr, col, dp_cfg=dp, noise_multiplier=sigma, accountant_state=None,
                                         rng_seed=(a.seeds[0], 0, 0), optimizer=a.dp_optimizer, **common)
                eps_spent = r["epsilon"] if e != CONTROL else None
            ev = train.evaluate(bundle.model, dev, col, task=bundle.task)
            key = f"{s}/eps={e}/seed={a.seeds[0]}"
            out[key] = {"dev_accuracy": ev["eval_accuracy"], "dev_loss": ev["eval_loss"], "noise_multiplier": sigma,
                        "epsilon": eps_spent, "steps": steps, "wall_s": round(time.time() - t0, 1)}
            print(key, out[key], flush=True)
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def table(doc: dict, seeds: list[int]) -> str:
    import numpy as np

    runs = doc["runs"]
    cols = list(EPSILONS) + ([CONTROL] if any(f"/eps={CONTROL}/" in k for k in runs) else [])
    names = {"inf": "ε = ∞ (no DP)", CONTROL: "control: DP-SGD path, σ = 0"}
    head = "| method | " + " | ".join(names.get(e, f"ε = {e}") for e in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for s in (n for n in STRATEGIES if any(k.startswith(f"{n}/") for k in runs)):
        cells = []
        for e in cols:
            accs = [runs[k]["final_accuracy"] for k in (f"{s}/eps={e}/seed={sd}" for sd in seeds) if k in runs]
            if not accs:
                cells.append("–")
                continue
            m = 100 * float(np.mean(accs))
            spread = f" ± {100 * float(np.std(accs, ddof=1)):.1f}" if len(accs) > 1 else ""
            cells.append(f"{m:.1f}{spread} (n={len(accs)})")
        lines.append(f"| {NAMES[s]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _minus_fedit(runs: dict, name: str, e: str, seeds: list[int]) -> list[float]:
    """``name``'s final accuracy minus FedIT's at ε = ``e``, in points, for each seed where both ran."""
    pairs = [(runs.get(f"fedit/eps={e}/seed={sd}"), runs.get(f"{name}/eps={e}/seed={sd}")) for sd in seeds]
    return [100 * (g["final_accuracy"] - f["final_accuracy"]) for f, g in pairs if f and g]


def paired(doc: dict, seeds: list[int]) -> str:
    """FedIT minus FFA-LoRA, seed by seed (same data, same partition): the comparison the issue asks about, with
    :func:`fedlora.verdicts.verdict` on FFA-LoRA minus FedIT (2-4 seeds: "better"/"worse" only when every seed
    agrees; from 5 seeds a paired t-test); then FedSVD minus FedIT the same way, when it ran."""
    from fedlora.verdicts import verdict

    runs, parts, svd = doc["runs"], [], []
    for e in EPSILONS:
        diffs = [-d for d in _minus_fedit(runs, "ffa_lora", e, seeds)]  # FedIT minus FFA-LoRA
        if diffs:
            ahead = sum(d > 0 for d in diffs)
            word, how = verdict([-d for d in diffs])
            parts.append(f"ε={e}: {sum(diffs) / len(diffs):+.1f} points (FedIT ahead in {ahead} of {len(diffs)} seeds; "
                         f"range {min(diffs):+.1f} to {max(diffs):+.1f}; FFA-LoRA vs FedIT: {word}, {how})")
        diffs = _minus_fedit(runs, "fedsvd", e, seeds)
        if diffs:
            word, how = verdict(diffs)
            svd.append(f"ε={e}: {sum(diffs) / len(diffs):+.1f} points (range {min(diffs):+.1f} to {max(diffs):+.1f}; "
                       f"{word}, {how})")
    out = ["FedIT minus FFA-LoRA, paired by seed: " + "; ".join(parts) + "." if parts else "",
           "FedSVD minus FedIT, paired by seed: " + "; ".join(svd) + "." if svd else ""]
    return " ".join(t for t in out if t)


def parse_args(argv: list[str] | None = None):
    """The command line (``--readme-table`` and ``--smoke`` put their settings in front of the options given, which
    win), with ``lr``/``dp_lr`` per strategy, ``ffa_tuned_choice`` (:func:`load_tuned`) and ``extra`` (overrides
    appended to every run's: ``--smoke``'s tiny model) filled in."""
    argv = list(sys.argv[1:] if argv is None else argv)
    front = (README_TABLE if "--readme-table" in argv else []) + (SMOKE if "--smoke" in argv else [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eps", nargs="+", default=list(EPSILONS), choices=EPSILONS + (CONTROL,),
                    help=f"'{CONTROL}': the DP-SGD path without noise (a control)")
    ap.add_argument("--strategies", nargs="+", default=["ffa_lora", "fedit"], choices=STRATEGIES)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr-fedit", type=float, default=2e-3)
    ap.add_argument("--lr-ffa", type=float, default=2e-3, help="base lr of FFA-LoRA (times --ffa-multiplier)")
    ap.add_argument("--ffa-multiplier", type=float, default=5.0)
    ap.add_argument("--ffa-alpha", type=float, default=None,
                    help="LoRA alpha of FFA-LoRA (default: the model config's). With A frozen at its small random "
                         "init, alpha/r is the only scale of A's side of the update; Adam's steps on B do not see it")
    ap.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm")
    ap.add_argument("--dp-optimizer", default="sgd", choices=("sgd", "adamw"), help="optimizer of the DP runs")
    ap.add_argument("--dp-lr-fedit", type=float, default=0.1, help="lr of FedIT's DP runs")
    ap.add_argument("--dp-lr-ffa", type=float, default=0.1, help="base lr of FFA-LoRA's DP runs (x --ffa-multiplier)")
    ap.add_argument("--lr-fedsvd", type=float, default=None, help="lr of FedSVD (default: --lr-fedit, untuned)")
    ap.add_argument("--dp-lr-fedsvd", type=float, default=None, help="lr of FedSVD's DP runs (default: --dp-lr-fedit)")
    ap.add_argument("--targets", default=None,
                    help="LoRA target modules as a PEFT regex (default: the model config's list), e.g. "
                         r"'.*layer\.5\.attention\.self\.(query|value)' for the top layer only")
    ap.add_argument("--micro", type=int, default=None, help="train.micro_batch_size (length-ordered pieces)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--round-eval", type=int, default=64, help="dev examples evaluated after each round (progress)")
    ap.add_argument("--tune", action="store_true", help="lr sweep at epsilon=3, seed 0 (writes dp_experiment_tune.json)")
    ap.add_argument("--tune-lrs", type=float, nargs="+", default=[1e-3, 4e-3],
                    help="effective lrs of the sweep (both methods)")
    ap.add_argument("--probe", type=float, nargs="+", help="centralised non-private lr probe (30 steps) instead")
    ap.add_argument("--centralised", action="store_true",
                    help="one model, no federation, no label skew (first seed only); writes <out>_centralised.json")
    ap.add_argument("--ffa-a-init", default=None, choices=A_INITS,
                    help="strategy.a_init of FFA-LoRA (default: the strategy config's, kaiming)")
    ap.add_argument("--ffa-tuned", default=None, metavar="PATH",
                    help="FFA-LoRA's alpha, a_init and lr multiplier from bench/ffa_tune.py's JSON (its 'dp' choice "
                         "for the private columns and the control, 'dp_nodp' for inf), instead of --ffa-alpha, "
                         "--ffa-a-init and --ffa-multiplier")
    ap.add_argument("--readme-table", action="store_true",
                    help="the settings of the README's DP table (README_TABLE; options given as well win)")
    ap.add_argument("--smoke", action="store_true",
                    help="the same path on a tiny model, 1 round x 1 step, seeds 0 1 2, eps inf 3, into a temporary "
                         "directory: checks the script, measures nothing")
    ap.add_argument("--final-eval", type=int, default=None,
                    help="dev examples of the final evaluation (default: all of them)")
    ap.add_argument("--runs-dir", default=None, help="where the run directories go (default /tmp/fedlora_dp_experiment)")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/dp_experiment.json)")
    a = ap.parse_args(front + argv)
    a.lr = {"fedit": a.lr_fedit, "ffa_lora": a.lr_ffa,
            "fedsvd": a.lr_fedit if a.lr_fedsvd is None else a.lr_fedsvd}
    a.dp_lr = {"fedit": a.dp_lr_fedit, "ffa_lora": a.dp_lr_ffa,
               "fedsvd": a.dp_lr_fedit if a.dp_lr_fedsvd is None else a.dp_lr_fedsvd}
    a.ffa_tuned_choice = load_tuned(a.ffa_tuned) if a.ffa_tuned else None
    a.extra = []
    if a.smoke:
        import tempfile

        a.extra, a.targets, a.micro = list(SMOKE_OVERRIDES), None, None  # the tiny model has other module names
        tmp = Path(tempfile.mkdtemp(prefix="fedlora_dp_smoke_"))
        a.out, a.runs_dir = a.out or str(tmp / "dp_smoke.json"), a.runs_dir or str(tmp / "runs")
    a.out = a.out or str(RESULTS / "dp_experiment.json")
    a.runs_dir = a.runs_dir or "/tmp/fedlora_dp_experiment"
    return a


def main() -> int:
    a = parse_args()

    import torch

    torch.set_num_threads(a.threads)
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)

    if a.probe:
        path = RESULTS / "dp_experiment_tune.json"
        doc = load(path) or {"runs": {}}
        doc["centralised_probe"] = {"command": ".venv/bin/python bench/dp_experiment.py --probe "
                                    + " ".join(f"{x:g}" for x in a.probe), "curves": probe(a.probe)}
        save(path, doc)
        return 0
    command = ".venv/bin/python bench/" + " ".join(shlex.quote(x) for x in [Path(__file__).name, *sys.argv[1:]])
    if a.centralised:
        path = Path(a.out).with_name(Path(a.out).stem + "_centralised.json")
        doc = load(path)
        doc.setdefault("runs", {}).update(centralised(a))
        doc.update({"command": command, "what": centralised.__doc__.strip().replace("\n    ", " ")})
        save(path, doc)
        return 0
    if a.tune:
        path = RESULTS / "dp_experiment_tune.json"
        doc = load(path) or {"command": command, "runs": {}}
        a.ffa_multiplier = 1.0  # the sweep is over effective lrs; pick --lr-ffa x --ffa-multiplier from it
        grid = [(s, lr) for s in a.strategies for lr in a.tune_lrs]
        for s, lr in grid:
            key = f"{s}/lr={lr:g}/rounds={a.rounds}/eps=3/seed=0"
            if key in doc["runs"]:
                continue
            a.lr = {s: lr}
            a.dp_lr = {s: lr}
            print(f"== {key}", flush=True)
            res = run_one(overrides(s, "3", 0, a), Path("/tmp/fedlora_dp_tune") / key.replace("/", "_"), a.final_eval)
            res["lr"] = lr
            doc["runs"][key] = res
            save(path, doc)
            print(f"   -> final acc {res['final_accuracy']:.4f} eps {res['epsilon_max']}", flush=True)
        return 0

    path = Path(a.out)
    doc = load(path)
    settings = {"rounds": a.rounds, "local_steps": a.steps, "batch_size": a.batch, "lr": a.lr, "dp_lr": a.dp_lr,
                "dp_optimizer": a.dp_optimizer, "lora_targets": a.targets or "model config", "micro_batch_size": a.micro,
                "ffa_lr_multiplier": a.ffa_multiplier, "ffa_alpha": a.ffa_alpha, "max_grad_norm": a.clip, "delta": 1e-5}
    # keys added since the README's tables were measured: only when used, so those files still resume
    settings.update({k: v for k, v in (("ffa_a_init", a.ffa_a_init), ("ffa_tuned", a.ffa_tuned_choice),
                                        ("extra_overrides", a.extra)) if v})
    if doc.get("settings") not in (None, settings):
        print(f"{path} holds runs with other settings {doc['settings']}: move it away first.", file=sys.stderr)
        return 2
    doc.setdefault("runs", {})
    doc.update({"command": command, "settings": settings, "setting": {
        "model": "minilm (all-MiniLM-L6-v2, LoRA r=8 alpha=16 on "
                 + (f"the modules matching {a.targets}" if a.targets else "query/value/pooler.dense")
                 + ", classifier head trained)",
        "data": "SST-2 train split over 3 clients, label skew [[0.1,0.9],[0.9,0.1],[0.5,0.5]]; dev split (872) for accuracy",
        "dp": "sample-level DP-SGD on every client (Opacus RDP, Poisson sampling, noise planned once for rounds x steps)",
        "optimizer": "AdamW, cosine schedule over the run", "metric": "final dev accuracy of the global model"},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": a.threads, "platform": platform.platform()}})
    doc["noise_multipliers"] = noise_table(a)
    save(path, doc)  # the settings and command too when every run is already there (a merged or finished grid)
    t_all = time.time()
    for seed in a.seeds:
        for e in a.eps:
            for s in a.strategies:
                key = f"{s}/eps={e}/seed={seed}"
                if key in doc["runs"]:
                    continue
                print(f"== {key}", flush=True)
                res = run_one(overrides(s, e, seed, a), Path(a.runs_dir) / key.replace("/", "_"), a.final_eval)
                doc["runs"][key] = res
                save(path, doc)
                print(f"   -> final acc {res['final_accuracy']:.4f} eps {res['epsilon_max']} ({res['wall_s']} s)", flush=True)
    seeds = sorted({int(k.rsplit("=", 1)[1]) for k in doc["runs"]})
    ffa_mult = lambda eps: f"{ffa_setting(a, eps)['lr_multiplier']:g}"  # noqa: E731
    md = [
        "# FFA-LoRA vs LoRA under DP-SGD (MiniLM, SST-2, 3 label-skewed clients)",
        "",
        f"Final SST-2 dev accuracy (%) of the global model, mean ± sample standard deviation (n - 1) over seeds {seeds}; δ = 1e-5 per client.",
        f"{a.rounds} rounds × {a.steps} local steps, expected batch {a.batch}, per-example clipping norm {a.clip}, "
        f"AdamW lr {a.lr['fedit']:g} (FedIT) / {a.lr['ffa_lora']:g} × {ffa_mult('inf')} (FFA-LoRA), cosine schedule; "
        f"DP runs: {a.dp_optimizer} at lr {a.dp_lr['fedit']:g} (FedIT) / {a.dp_lr['ffa_lora']:g} × {ffa_mult('3')} "
        "(FFA-LoRA)"
        + (f"; FFA-LoRA's LoRA alpha {a.ffa_alpha:g} (A is frozen at its small random init, so alpha/r is the scale of "
           "A's side of the update)" if a.ffa_alpha and not a.ffa_tuned_choice else "")
        + (f"; FFA-LoRA's A initialisation {a.ffa_a_init}" if a.ffa_a_init and not a.ffa_tuned_choice else "")
        + (f"; FFA-LoRA at the settings bench/ffa_tune.py chose on the validation split (seed 0, `{a.ffa_tuned}`): "
           + "; ".join(f"{cols}: alpha {c['alpha']:g}, A init {c['a_init']}, lr multiplier {c['lr_multiplier']:g}"
                       for cols, c in (("private columns", a.ffa_tuned_choice["dp"]),
                                       ("ε = ∞", a.ffa_tuned_choice["dp_nodp"])))
           + "; FedIT as in the README, not re-tuned" if a.ffa_tuned_choice else "")
        + "; LoRA on " + (f"`{a.targets}`" if a.targets else "the model config's targets") + " plus the classifier head"
        + (f"; micro-batches of {a.micro} rows (train.micro_batch_size)" if a.micro else "") + ".",
        "",
        table(doc, seeds),
        "",
        paired(doc, seeds),
        "",
        "Per-client noise multipliers (σ, planned once for the whole run from ε at the client's sampling rate "
        f"1/⌈n/{a.batch}⌉): " + "; ".join(f"ε={e}: {doc['noise_multipliers'][e]}" for e in EPSILONS[:-1])
        + f" (client sizes {doc['noise_multipliers']['client_sizes']}). ε = ∞ is plain training (no clipping per "
        "example, no noise), as the paper's non-private column.",
        "",
        "Notes: one accountant per client for the whole run (restored from the node's state every round); each "
        "client ends at ε ≤ target (it takes part in every round, which is what the noise is planned for). "
        f"Each run is short ({a.rounds * a.steps} DP-SGD steps per client) and the learning rates were not tuned "
        "per ε; differences below about one std are not meaningful. The control column runs the DP-SGD path "
        "(Poisson batches, per-example clipping, the DP optimizer) with σ = 0: what clipping alone costs. "
        "Earlier settings: bench/results/dp_experiment_b64.json (expected batch 64, all layers) and "
        "dp_experiment_tune.json; one model without federation: dp_experiment_centralised.json (--centralised).",
        "",
        "How to run it yourself: `fedlora run privacy=dp_sgd privacy.target_epsilon=3 ...` (sample-level, every "
        "client; metrics carry every client's ε each round, clients stop at their budget and the run stops "
        "cleanly with status budget-exhausted) or `privacy=client_level` (client-level DP through Flower's "
        "DifferentialPrivacy{Server,Client}SideFixedClipping with an accountant, fedit/ffa_lora only). Flower's "
        "conditions for the accounted client-level mode: fixed clipping (adaptive clipping has no accountant and "
        "is refused), equal client weights (an unweighted mean; privacy.weighting=num_examples is refused), a "
        "fixed number of sampled clients per round (a round with fewer valid updates is not released), "
        "no-amplification accounting, and an element-wise-mean aggregate (flora, lora_fair, flexlora, hetlora "
        "are refused). See docs/privacy.md, fedlora/privacy/ and strategies/privacy.py.",
        "",
        "Reproduce (resumes: runs already in the JSON are skipped):",
        "",
        f"    nice -n 19 {command}",
        "",
    ]
    (path.with_suffix(".md")).write_text("\n".join(md))
    print("\n".join(md))
    print(f"total {time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
