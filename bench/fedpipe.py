"""FedPipe vs a uniform setting on simulated federations of mixed hardware profiles, over seeds.

FedPipe: Fang et al., "Automated federated pipeline for parameter-efficient fine-tuning of large language models",
2024 (the general documented version of ``fedlora.fedpipe``). Two settings, same everything else (data,
partitions, seed, importance-selected modules, zero-pad aggregation, optimizer steps per round): ``fedpipe``
(the MILP's per-client rank / batch / bits) and ``uniform`` (``strategy.uniform=true``: one (rank, batch, bits)
for every client, the fastest of the grid that fits every client). Every client takes the same optimizer steps
per round in both (``strategy.steps_per_round``); a client's examples per round are steps x its batch.

Federations (``--federations``):
- ``mixed``: 10 clients, 4x jetson_orin_nano_8gb, 4x rtx3060_12gb, 2x a100_80gb (partition order). The Jetsons
  bound the round in both settings; FedPipe spends the others' slack on larger batches, bases and ranks.
- ``short``: 10 clients, 5x t4_16gb, 5x jetson_agx_orin_64gb. The uniform setting must fit the T4s (no 16-bit
  7B), which makes the AGX Orins (memory-bandwidth bound: dequantising costs them more than it saves) the
  bottleneck; FedPipe gives them a 16-bit base and so shortens the modelled round.

What is modelled and what is measured:
- *Modelled* (plan tables, round times): the plan is made for a Llama-7B-shaped model (``strategy.plan_model=
  llama-7b``, meta device, analytic memory model, 512-token examples): the trained models here are so small that
  any profile holds them at any grid point. Round times are the time model's seconds, not wall clock.
- *Measured* (test accuracy, the SST-2 dev split capped at ``eval.max_examples``): the configured small model
  trains in the in-process grid (the real ServerApp loop and ClientApp code, no Ray) with the planned ranks,
  batch sizes, steps and base bit widths (bitsandbytes NF4 / int8 on CPU), with importance-selected modules.

Run (each run in its own process, ``--jobs`` at a time, ``--threads`` torch threads each)::

    nice -n 19 .venv/bin/python bench/fedpipe.py --models minilm --seeds 0 1 2 --jobs 2 --threads 1
    .venv/bin/python bench/fedpipe.py --plans-only --federations short     # plan tables only, seconds

Results merge into bench/results/fedpipe.json (one entry per federation/model/setting/seed, written as each run
ends) and bench/results/fedpipe.md is rewritten from it: per-seed and mean ± std accuracy, the paired verdict of
:func:`fedlora.verdicts.verdict` (the one ``fedlora compare`` uses), plan tables and modelled round times.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the in-process grid
OUT_JSON = ROOT / "bench" / "results" / "fedpipe.json"
OUT_MD = ROOT / "bench" / "results" / "fedpipe.md"

J, R, A, T, G = "jetson_orin_nano_8gb", "rtx3060_12gb", "a100_80gb", "t4_16gb", "jetson_agx_orin_64gb"
FEDERATIONS = {"mixed": [J] * 4 + [R] * 4 + [A] * 2, "short": [T] * 5 + [G] * 5}
COMMON = ["num_clients=10", "strategy=fedpipe", "strategy.plan_model=llama-7b", "strategy.seq_len=512",
          "strategy.aggregation=zero_pad", "strategy.importance.warmup_steps=2", "strategy.importance.budget=0.5",
          "min_train_nodes=2"]
MODELS = {
    "tiny_llama": ["model=tiny_llama", "num_rounds=3", "strategy.steps_per_round=8", "train.max_length=32",
                   "eval.max_examples=128"],
    "minilm": ["model=minilm", "num_rounds=8", "strategy.steps_per_round=32", "train.max_length=64",
               "eval.max_examples=300"],
}
SETTINGS = {"fedpipe": [], "uniform": ["strategy.uniform=true"],
            # the plan before 2026-12-04: clients with slack take the grid's largest rank
            "fedpipe_largest": ["strategy.rank_preference=largest"],
            # diagnostics: the rank grid cut to the uniform setting's rank (bases and batches as planned), or every
            # client at rank 32: what the planned ranks cost or earn, apart from what the planned bases do
            "fedpipe_rank4": ["strategy.grids.ranks=[4]"],
            "fedpipe_rank32": ["strategy.grids.ranks=[32]"],
            # the largest-rank plan and uniform with rank-stabilised scales (model.lora.rank_scaling=rslora:
            # s_k = s sqrt(8 / r_k))
            "fedpipe_rslora": ["model.lora.rank_scaling=rslora", "strategy.rank_preference=largest"],
            "uniform_rslora": ["strategy.uniform=true", "model.lora.rank_scaling=rslora"]}
DEFAULT_SETTINGS = ["fedpipe", "uniform"]


def overrides(fed: str, model: str, setting: str, seed: int) -> list[str]:
    return (COMMON + [f"strategy.profiles=[{','.join(FEDERATIONS[fed])}]", f"seed={seed}"] + MODELS[model]
            + SETTINGS[setting])


def _worker_init(threads: int) -> None:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)


def run_one(ov: list[str]) -> dict:
    """One federated run in the in-process grid: its plan and its measured accuracy."""
    from harness import InProcessGrid

    from fedlora import config
    from fedlora.strategies.server_app import run_server

    cfg = config.load(ov)
    d = Path(tempfile.mkdtemp(prefix="fedpipe-bench-"))
    t0 = time.time()
    try:
        summary = run_server(InProcessGrid(cfg.num_clients), cfg, d / "run", echo=lambda *_: None)
        plan = json.loads((d / "run" / "plan.json").read_text())
        rows = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    p = plan["plan"]
    return {"overrides": ov, "wall_s": time.time() - t0, "modelled_round_s": p["round_time_s"],
            "modelled_client_s_sum": sum(c["time_s"] for c in p["clients"]),
            "modelled_idle_s_sum": sum(p["round_time_s"] - c["time_s"] for c in p["clients"]),
            "examples_per_round": sum(c["examples"] for c in p["clients"]),
            "final_eval_accuracy": rows[-1].get("eval_accuracy"), "final_eval_loss": rows[-1].get("eval_loss"),
            "final_val_accuracy": rows[-1].get("val_accuracy"),
            "eval_accuracy_by_round": [r.get("eval_accuracy") for r in rows],
            "bytes_up": sum(r.get("bytes_up", 0) for r in rows), "selected_modules": plan["selected_modules"],
            "plan": p, "table": plan["table"], "planned_for": plan["planned_for"],
            "memory_model": plan["memory_model"], "summary_status": summary.get("status")}


def plans_only(fed: str, model: str) -> dict:
    """The two plans of a run without training: the plan_model's spec with the same fraction of its targets
    adapted as the run's importance budget keeps (as ``FedPipe.plan_run`` does for a modelled plan_model)."""
    from fedlora import config
    from fedlora.fedpipe import planning
    from fedlora.fedpipe.memory import analytic_activations

    out = {}
    for setting in DEFAULT_SETTINGS:
        cfg = config.load(overrides(fed, model, setting, 0))
        n = len(planning.trained_spec(cfg).adapted)
        k = math.ceil(float(cfg.strategy.importance.budget) * n)
        spec = planning.plan_spec(cfg)[0]
        spec = spec.with_adapted(planning.modelled_selection(spec, k / n))
        p = planning.make_plan(cfg, planning.config_profiles(cfg), spec, analytic_activations(spec,
                                                                                              planning.seq_len(cfg)))
        out[setting] = {"modelled_round_s": p.round_time_s, "plan": p.to_dict(), "table": p.table()}
    return out


def save(res: dict) -> dict:
    """Merge ``res`` into the JSON on disk (another invocation may have added runs meanwhile), write it and the
    markdown; returns the merged results."""
    disk = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    for key in ("runs", "plans"):
        disk[key] = {**disk.get(key, {}), **res.get(key, {})}
    disk["commands"] = disk.get("commands", []) + [c for c in res.get("commands", [])
                                                    if c not in disk.get("commands", [])]
    disk["federations"] = FEDERATIONS
    OUT_JSON.write_text(json.dumps(disk, indent=2))
    write_md(disk, OUT_MD)
    return disk


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm"], choices=list(MODELS))
    ap.add_argument("--federations", nargs="+", default=["mixed"], choices=list(FEDERATIONS))
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--plans-only", action="store_true", help="plan tables and modelled round times, no training")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    if old.get("runs") and not any(k.count("/") == 3 for k in old["runs"]):
        OUT_JSON.unlink()  # the single-seed layout before issue 21 (model/setting keys): replaced
    res = {"runs": {}, "plans": {}, "commands": []}
    cmd = "nice -n 19 .venv/bin/python bench/fedpipe.py " + " ".join(argv)
    t0 = time.time()
    if a.plans_only:
        for fed in a.federations:
            for m in a.models:
                res["plans"][f"{fed}/{m}"] = plans_only(fed, m)
                print(res["plans"][f"{fed}/{m}"]["fedpipe"]["table"], flush=True)
    else:
        # seed-major order: a paired (fedpipe, uniform) result per seed as early as possible
        tasks = [(fed, m, s, seed) for seed in a.seeds for fed in a.federations for m in a.models
                 for s in a.settings]
        with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(a.threads,)) as pool:
            futs = {pool.submit(run_one, overrides(*t)): t for t in tasks}
            for f in as_completed(futs):
                fed, m, s, seed = futs[f]
                r = f.result()
                r["threads"], r["jobs"] = a.threads, a.jobs
                res["runs"][f"{fed}/{m}/{s}/{seed}"] = r
                print(f"[fedpipe bench] {fed}/{m}/{s}/seed {seed}: modelled round {r['modelled_round_s']:.1f} s, "
                      f"final accuracy {r['final_eval_accuracy']}, wall {r['wall_s']:.0f} s", flush=True)
                save(res)
    res["commands"].append({"command": cmd, "wall_s": round(time.time() - t0, 1),
                            "machine": "2 shared CPU cores (another nice-19 benchmark running)"})
    save(res)
    return 0


def summarise(runs: dict, fed: str, model: str, setting: str = "fedpipe") -> dict | None:
    """Per seed accuracies of ``setting`` and uniform, mean ± std, and the paired verdict over seeds with both."""
    from fedlora.verdicts import verdict

    acc = {s: {int(k.rsplit("/", 1)[1]): r["final_eval_accuracy"] for k, r in runs.items()
               if k.startswith(f"{fed}/{model}/{s}/")} for s in SETTINGS}
    base = "uniform_rslora" if setting.endswith("_rslora") else "uniform"  # the baseline with the same scales
    paired = sorted(set(acc[setting]) & set(acc[base]))
    if not acc[setting] and not acc[base]:
        return None
    diffs = [acc[setting][s] - acc[base][s] for s in paired]
    word, how = verdict(diffs) if diffs else ("no verdict", "no paired seed")
    return {"acc": acc, "base": base, "paired": paired, "diffs": diffs, "verdict": word, "how": how}


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.4f} (n=1)"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.4f} ± {sd:.4f} (n={len(xs)})"


def write_md(res: dict, path: Path) -> None:
    runs = res["runs"]
    L = ["# FedPipe vs uniform on mixed federations (equal optimizer steps per round)", "",
         "Written by `bench/fedpipe.py` from `bench/results/fedpipe.json`. Commands and wall times on this 2-core "
         "machine (shared with another nice-19 benchmark and, at times, other jobs at nice 5):", ""]
    L += [f"- `{c['command']}`: {c['wall_s'] / 60:.1f} min" + (f" ({c['note']})" if c.get("note") else "")
          for c in res.get("commands", [])]
    if res.get("relabelled"):
        L += ["", f"Relabelled: {res['relabelled']}."]
    L += ["", "**Modelled** (plan tables, round times): planned for a Llama-7B-shaped model (meta device, analytic "
          "memory model, 512-token examples, the time model of `fedlora.fedpipe.timing`); seconds are the time "
          "model's, not wall clock. **Measured** (accuracy): the named small model trained in the in-process grid "
          "(real ServerApp/ClientApp code) with the planned ranks, batch sizes, steps and base bit widths "
          "(bitsandbytes NF4/int8 on CPU); aggregation zero_pad (HetLoRA, nested start), half of the LoRA targets "
          "kept by importance; same data, partitions, seed and optimizer steps per round (32) for both settings. "
          "Accuracy: SST-2 dev split, first 300 examples, after the last round. Verdict: `fedlora.verdicts.verdict` "
          "on the paired differences fedpipe − uniform (2-4 seeds: better/worse only if every seed agrees).", ""]
    keys = sorted({k.rsplit("/", 2)[0] for k in runs})
    if keys:
        L += ["| federation/model | setting | seed | modelled round s | examples/round (all clients) | final accuracy "
              "| final loss | uploaded | wall min |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k in sorted(runs):
            fm, s, seed = k.rsplit("/", 2)
            r = runs[k]
            L.append(f"| {fm} | {s} | {seed} | {r['modelled_round_s']:.3f} | {r['examples_per_round']} | "
                     f"{r['final_eval_accuracy']:.4f} | {r['final_eval_loss']:.4f} | {r['bytes_up'] / 1024:.0f} KiB | "
                     f"{r['wall_s'] / 60:.1f} |")
        L += ["", "| federation/model | setting | mean ± std | baseline (uniform, same scales) mean ± std | paired diffs "
              "(setting − baseline) "
              "| verdict |", "|---|---|---|---|---|---|"]
        for fm in keys:
            for setting in (x for x in SETTINGS if not x.startswith("uniform")):
                sm = summarise(runs, *fm.split("/"), setting)
                if sm and sm["acc"][setting]:
                    L.append(f"| {fm} | {setting} | {_ms(list(sm['acc'][setting].values()))} | "
                             f"{_ms(list(sm['acc'][sm['base']].values()))} | "
                             f"{', '.join(f'{d:+.4f}' for d in sm['diffs']) or '-'} | {sm['verdict']} ({sm['how']}) |")
        L += ["", "Accuracy by round (round 0 = before training):", ""]
        L += [f"- {k}: " + ", ".join("-" if x is None else f"{x:.3f}" for x in r["eval_accuracy_by_round"])
              for k, r in sorted(runs.items())]
        seen = set()
        for k in sorted(runs):
            fm, s, _ = k.rsplit("/", 2)
            if (fm, s) not in seen:
                seen.add((fm, s))
                L += ["", f"## Plan table: {fm}, {s} (modelled llama-7b)", "", "```", runs[k]["table"], "```"]
    for fm, pl in sorted(res.get("plans", {}).items()):
        f, u = pl["fedpipe"]["modelled_round_s"], pl["uniform"]["modelled_round_s"]
        L += ["", f"## Plans only: {fm} (modelled llama-7b; no training)", "",
              f"Modelled round: fedpipe {f:.3f} s, uniform {u:.3f} s ({(1 - f / u) * 100:+.1f}% shorter with "
              f"fedpipe).", ""]
        for s in DEFAULT_SETTINGS:
            L += ["```", pl[s]["table"], "```", ""]
    path.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
