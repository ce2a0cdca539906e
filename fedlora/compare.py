"""``fedlora compare``: several strategies on identical partitions, seeds, model and budget, then one table
(``comparison.csv``, ``comparison.md``) and two plots (``accuracy_vs_round.png``, ``accuracy_vs_bytes.png``).

  fedlora compare strategies=[fedit,flora,ffa_lora,lora_fair] [run overrides] [target=0.8]
  fedlora compare preset=heterogeneous
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import sys
from pathlib import Path

from . import config, data
from .config import ConfigError
from .report import check_fresh, human_bytes, read_metrics

COLUMNS = ["strategy", "final_accuracy", "best_accuracy", "rounds_to_target", "bytes_up", "bytes_down", "wall_s", "note"]


def _pop(argv: list[str], key: str):
    for a in argv:
        if a.startswith(key + "="):
            argv.remove(a)
            return a.split("=", 1)[1]
    return None


def _parse_list(text: str) -> list[str]:
    return [s.strip() for s in text.strip("[]").split(",") if s.strip()]


def rounds_to(rows: list[dict], target: float):
    for r in rows:
        if r.get("eval_accuracy") is not None and r["eval_accuracy"] >= target:
            return r["round"]
    return None


def summarise(name: str, run_dir: Path, target: float) -> dict:
    rows = read_metrics(run_dir)
    summ = json.loads((run_dir / "summary.json").read_text())
    return {"strategy": name, "final_accuracy": summ.get("final_eval_accuracy"), "best_accuracy": summ.get("best_eval_accuracy"),
            "rounds_to_target": rounds_to(rows, target), "bytes_up": summ["bytes_up"], "bytes_down": summ["bytes_down"],
            "wall_s": round(summ["wall_s"], 1), "note": ""}


def markdown_table(rows: list[dict], target: float) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"| strategy | final acc | best acc | rounds to {target:g} | bytes up | bytes down | wall s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {f(r['final_accuracy'], '.4f')} | {f(r['best_accuracy'], '.4f')} | "
                     f"{f(r['rounds_to_target'], 'd')} | {human_bytes(r['bytes_up'] or 0)} | {human_bytes(r['bytes_down'] or 0)} | "
                     f"{f(r['wall_s'], '.0f')} | {r['note']} |")
    return "\n".join(lines)


def plots(out: Path, runs: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for xkey, fname, xlabel in (("round", "accuracy_vs_round.png", "round"),
                                ("bytes", "accuracy_vs_bytes.png", "cumulative bytes (up + down, MB)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, d in runs.items():
            rows = [r for r in read_metrics(d) if "eval_accuracy" in r]
            if not rows:
                continue
            if xkey == "round":
                xs = [r["round"] for r in rows]
            else:
                tot, xs = 0, []
                for r in rows:
                    tot += r.get("bytes_up", 0) + r.get("bytes_down", 0)
                    xs.append(tot / 1e6)
            ax.plot(xs, [r["eval_accuracy"] for r in rows], marker="o", ms=3, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("dev accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def cmd_compare(argv: list[str]) -> int:
    from .cli import _quiet_libraries, simulate

    argv = list(argv)
    verbose = "-v" in argv
    argv = [a for a in argv if a != "-v"]
    _quiet_libraries(verbose)
    names = _pop(argv, "strategies")
    target = _pop(argv, "target")
    base = config.load(argv)
    names = _parse_list(names) if names else list(base.compare.strategies)
    target = float(target) if target else float(base.compare.target_accuracy)
    for n in names:
        if n not in config.STRATEGIES:
            raise ConfigError(f"unknown strategy '{n}' in strategies=[...]: choose from {', '.join(config.STRATEGIES)}.")
    data.check_partitions(base)
    out = Path(base.out_dir) if base.out_dir else Path("runs") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-compare"
    out = out.resolve()
    for n in names:
        check_fresh(out / n)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fedlora compare: {', '.join(names)} on {base.model.name}/{base.data.name}, {base.num_clients} clients, "
          f"{base.num_rounds} rounds -> {out}", flush=True)
    rows, runs = [], {}
    for n in names:
        try:
            cfg = config.load(argv + [f"strategy={n}", f"out_dir={out / n}"])
            from fedlora import strategies

            strategies.get(n).check_config(cfg)
        except ConfigError as e:  # e.g. a single-rank method in a mixed-rank preset
            rows.append({c: None for c in COLUMNS} | {"strategy": n, "note": f"not run: {e}"})
            print(f"-- {n}: not run ({e})", flush=True)
            continue
        print(f"-- {n}", flush=True)
        simulate(cfg, out / n, verbose)
        runs[n] = out / n
        rows.append(summarise(n, out / n, target))
    with open(out / "comparison.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    table = markdown_table(rows, target)
    (out / "comparison.md").write_text(
        f"# fedlora compare\n\n{base.model.name} on {base.data.name}, {base.num_clients} clients, partitioner "
        f"{base.partitioner.name}, {base.num_rounds} rounds, seed {base.seed}.\n\n{table}\n")
    if runs:
        plots(out, runs)
    print("\n" + table + f"\n\nwritten: {out}/comparison.md, comparison.csv, accuracy_vs_round.png, accuracy_vs_bytes.png")
    return 0


if __name__ == "__main__":
    sys.exit(cmd_compare(sys.argv[1:]))
