"""The centralised bound: what one party holding everyone's data would reach with the same model, adapter and
budget, to read the federated runs against.

- Data: the union of all clients' partitions (:func:`pooled`), i.e. the training rows of :func:`fedlora.data.split`
  (the validation split is left out, as it is for clients); validation and test figures as in a federated run.
- Model: the same base, LoRA config (rank, alpha, targets), trained head and seed (:func:`fedlora.models.build`).
- Budget: the federated run's examples, num_rounds x clients per round (max(int(num_clients * fraction_train),
  min_train_nodes)) x local_steps x train.batch_size, taken as steps of train.batch_size from one seeded
  stream over the pooled rows (epoch-wise permutations).
- Optimizer: ONE AdamW (as :func:`fedlora.train.local_train`'s) for the whole budget, never restarted, with the
  run's scheduler (train.scheduler, train.warmup_steps) over all of it.
- Learning rate: each of ``centralised.lr_grid`` (default :data:`DEFAULT_LR_GRID`) is trained in full; the one
  with the best validation accuracy at the end wins (ties: the smaller lr; without accuracy, the lowest validation
  loss; without a validation split, the lowest final training loss). Its run is the one written. ``fedlora
  compare`` searches the grid on its first seed and trains the later seeds at the lr chosen there.
- Non-private: privacy settings and the strategy's lr multiplier are ignored.

The run directory holds what a federated run's does, in "round-equivalents" (a row after each round's worth of
examples, round 0 the starting model): ``config.yaml`` (train.lr set to the chosen lr), ``metrics.jsonl``
(``round``, ``eval_loss``, ``eval_accuracy`` (test), ``val_loss``, ``val_accuracy``, ``bytes_up`` = ``bytes_down``
= 0, ``wall_s``, ...), ``summary.json`` (the fields of :meth:`fedlora.report.Recorder.summary`, plus ``strategy:
centralised``, ``lr``, ``lr_val_accuracy`` per lr, the budget) and ``lr_search.jsonl`` (every lr's rows).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from . import batching, config, data, models, report, rundir, train

DEFAULT_LR_GRID = (3e-4, 1e-3, 3e-3)


def check(cfg) -> None:
    """The centralised run's pre-flight: its learning-rate grid (one sentence, before anything starts)."""
    grid_of(cfg)


def clients_per_round(cfg) -> int:
    """Clients a federated round samples: max(int(num_clients * fraction_train), min_train_nodes)."""
    return max(int(int(cfg.num_clients) * float(cfg.fraction_train)), int(cfg.min_train_nodes))


def budget(cfg, pooled_rows: int) -> dict:
    """The federated run's budget as steps of ``train.batch_size``: ``steps_per_round`` (clients per round x local
    steps), ``total_steps`` and ``examples``. With ``local_epochs``, a client's steps are those of a partition of
    average size (pooled rows / num_clients), as :mod:`fedlora.clients.client_app` counts them."""
    bs = int(cfg.train.batch_size)
    if cfg.get("local_epochs"):
        local = max(1, math.ceil(pooled_rows / int(cfg.num_clients) / bs * float(cfg.local_epochs)))
    else:
        local = int(cfg.local_steps)
    per_round = clients_per_round(cfg) * local
    total = per_round * int(cfg.num_rounds)
    return {"clients_per_round": clients_per_round(cfg), "steps_per_round": per_round, "total_steps": total,
            "examples": total * bs, "batch_size": bs}


def grid_of(cfg, given=None) -> list[float]:
    """The grid to search, ascending: ``given``, else ``centralised.lr_grid``, else :data:`DEFAULT_LR_GRID`."""
    grid = given if given is not None else (cfg.get("centralised") or {}).get("lr_grid") or DEFAULT_LR_GRID
    grid = sorted({float(x) for x in grid})
    if not grid or any(x <= 0 for x in grid):
        raise config.ConfigError(f"centralised.lr_grid={grid} must list learning rates > 0, e.g. [1e-4,1e-3].")
    return grid


def pick_lr(finals: dict[float, dict]) -> tuple[float, str]:
    """The winning lr from each lr's final row, and the figure it was chosen by: the highest ``val_accuracy``,
    else the lowest ``val_loss``, else the lowest ``train_loss``; ties go to the smaller lr."""
    order = sorted(finals)
    if all(finals[lr].get("val_accuracy") is not None for lr in order):
        return min(order, key=lambda lr: (-finals[lr]["val_accuracy"], lr)), "val_accuracy"
    if all(finals[lr].get("val_loss") is not None for lr in order):
        return min(order, key=lambda lr: (finals[lr]["val_loss"], lr)), "val_loss"
    return min(order, key=lambda lr: (_nan_last(finals[lr].get("train_loss")), lr)), "train_loss"


def _nan_last(x) -> float:
    """A loss to sort by: a missing or NaN one sorts last."""
    return math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def pooled(cfg):
    """The union of every client's partition (:func:`fedlora.data.partition`), in partition order: the training
    rows of :func:`fedlora.data.split` for partitioners that deal every row (iid, dirichlet), never a validation
    row."""
    import datasets

    parts = [data.partition(cfg, i) for i in range(int(cfg.num_clients))]
    return datasets.concatenate_datasets([p.flatten_indices() for p in parts])


def evaluate(model, splits: dict, collator, cfg, task: str) -> dict:
    """Test (``eval_*``) and validation (``val_*``) figures, capped at ``eval.max_examples`` as on the server."""
    return train.evaluate_splits(model, splits["test"], splits["validation"], collator, task=task,
                                 batch_size=int(cfg.eval.batch_size), max_examples=cfg.eval.max_examples)


def train_at(cfg, lr: float, splits: dict, plan: dict, initial: dict | None = None, echo=print) -> list[dict]:
    """One full run at ``lr``: rows for round-equivalents 0..num_rounds. A fresh model (same seed every time), one
    AdamW for all ``plan["total_steps"]`` steps, batches drawn once from the pooled rows and cut into rounds.
    ``initial``: round 0's figures if already measured (the starting model is the same for every lr)."""
    bundle = models.build(cfg)
    collator = batching.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))
    pooled, spr, total, seed = splits["pooled"], plan["steps_per_round"], plan["total_steps"], int(cfg.seed)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg.train.weight_decay))
    batches = train.batch_indices(len(pooled), plan["batch_size"], total, seed, 0)
    t0 = time.time()
    first = initial if initial is not None else evaluate(bundle.model, splits, collator, cfg, bundle.task)
    rows = [_row(0, lr, plan, {**first}, t0)]
    for rnd in range(1, int(cfg.num_rounds) + 1):
        res = train.local_train(
            bundle.model, pooled, collator, steps=spr, batch_size=plan["batch_size"], lr=lr,
            step_offset=(rnd - 1) * spr, total_steps=total, scheduler=cfg.train.scheduler,
            warmup=int(cfg.train.warmup_steps), weight_decay=float(cfg.train.weight_decay),
            max_grad_norm=cfg.train.max_grad_norm, seed=seed, round_idx=rnd, task=bundle.task, device=bundle.device,
            micro_batch_size=cfg.train.get("micro_batch_size"), optimizer=opt,
            batches=batches[(rnd - 1) * spr: rnd * spr])
        figures = {"train_loss": res["train_loss"], **evaluate(bundle.model, splits, collator, cfg, bundle.task)}
        rows.append(_row(rnd, lr, plan, figures, t0))
        echo(f"centralised lr {lr:g}  " + report.progress_line(rows[-1], int(cfg.num_rounds)))
    return rows


def _row(rnd: int, lr: float, plan: dict, figures: dict, t0: float) -> dict:
    """A metrics row in round-equivalents: no traffic, the steps and examples so far."""
    return {"round": rnd, "strategy": "centralised", "lr": lr, "steps": rnd * plan["steps_per_round"],
            "examples": rnd * plan["steps_per_round"] * plan["batch_size"], **figures,
            "bytes_up": 0, "bytes_down": 0, "wall_s": time.time() - t0, "unix": time.time()}


def run(cfg, run_dir, echo=print, lr_grid=None) -> dict:
    """Train the centralised bound for ``cfg`` (one seed: ``cfg.seed``) into ``run_dir``; returns the summary.
    ``lr_grid``: the learning rates to try (default ``centralised.lr_grid``)."""
    run_dir = Path(run_dir)
    rundir.check_fresh(run_dir)
    t_all = time.time()
    grid = grid_of(cfg, lr_grid)
    _, validation, test = data.split(cfg)
    splits = {"pooled": pooled(cfg), "validation": validation, "test": test}
    plan = budget(cfg, len(splits["pooled"]))
    echo(f"centralised: {len(splits['pooled'])} pooled rows, {len(validation)} validation, {len(test)} test; "
         f"{plan['total_steps']} steps of {plan['batch_size']}; lr grid {grid}")
    trials, initial = {}, None
    for lr in grid:
        trials[lr] = train_at(cfg, lr, splits, plan, initial=initial, echo=echo)
        initial = {k: v for k, v in trials[lr][0].items() if k.startswith(("eval_", "val_"))}
    return write(cfg, run_dir, trials, plan, time.time() - t_all, echo)


def write(cfg, run_dir: Path, trials: dict[float, list[dict]], plan: dict, grid_wall_s: float, echo=print) -> dict:
    """Pick the lr (:func:`pick_lr`) and write its run as the run directory (``config.yaml`` with that lr,
    ``metrics.jsonl``, ``summary.json``), every lr's rows in ``lr_search.jsonl``; returns the summary."""
    from omegaconf import OmegaConf

    lr, by = pick_lr({x: rows[-1] for x, rows in trials.items()})
    chosen = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(chosen, False)
    chosen.train.lr = lr
    chosen.centralised = {**(OmegaConf.to_container(chosen.get("centralised") or {})), "lr_grid": sorted(trials)}
    recorder = report.Recorder(run_dir, config.to_yaml(chosen), int(cfg.num_rounds), echo=lambda *_: None)
    for row in trials[lr]:
        recorder.log_round(row)
    report.atomic_write(run_dir / "lr_search.jsonl", "".join(json.dumps(r) + "\n" for x in sorted(trials)
                                                            for r in trials[x]))
    summary = recorder.summary({
        "strategy": "centralised", "model": cfg.model.name, "num_clients": cfg.num_clients,
        "num_rounds": cfg.num_rounds, "seed": cfg.seed, "status": "completed", "lr": lr, "lr_selected_by": by,
        "lr_val_accuracy": {f"{x:g}": trials[x][-1].get("val_accuracy") for x in sorted(trials)},
        "wall_s": trials[lr][-1]["wall_s"], "grid_wall_s": grid_wall_s, **plan})
    echo(f"centralised: lr {lr:g} chosen by {by}; final test accuracy {summary['final_eval_accuracy']}, "
         f"best round {summary['best_round']} (test {summary['test_at_best_val']})")
    return summary
