"""What users see: the progress line per round, the run directory (config, metrics.jsonl, audit files,
summary), comparison tables and plots. The server is the single writer of a run directory."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from pathlib import Path


def default_run_dir(cfg) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.strategy.name}"


def check_fresh(run_dir) -> None:
    """A new run never writes into an earlier run's directory (its metrics would be mixed and its files lost)."""
    from .config import ConfigError

    if (Path(run_dir) / "metrics.jsonl").exists():
        raise ConfigError(f"out_dir {run_dir} already holds a run: pass resume={run_dir} to continue it, "
                          f"or choose a new out_dir.")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _fmt(v, spec=".4f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def progress_line(m: dict, num_rounds: int) -> str:
    acc = m.get("eval_accuracy")
    parts = [
        f"[round {m['round']:>3}/{num_rounds}]",
        f"clients {m.get('num_clients', 0):>3}",
        f"train_loss {_fmt(m.get('train_loss'))}",
        f"eval_loss {_fmt(m.get('eval_loss'))}",
    ]
    if acc is not None:
        parts.append(f"eval_acc {_fmt(acc)}")
    if "eval_perplexity" in m and acc is None:
        parts.append(f"ppl {_fmt(m['eval_perplexity'], '.2f')}")
    parts += [f"up {human_bytes(m.get('bytes_up', 0))}", f"down {human_bytes(m.get('bytes_down', 0))}",
              f"{m.get('wall_s', 0.0):.1f}s"]
    if m.get("rejected"):
        parts.append(f"rejected {len(m['rejected'])}")
    return "  ".join(parts)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Recorder:
    """Owns a run directory: ``config.yaml``, ``metrics.jsonl``, ``audit/``, ``adapter/``, ``summary.json``."""

    def __init__(self, run_dir: Path, cfg_yaml: str, num_rounds: int, echo=print):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "config.yaml", cfg_yaml)
        self.num_rounds, self.echo = num_rounds, echo
        self.rows: list[dict] = []
        self.t0 = time.time()

    def log_round(self, metrics: dict) -> None:
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self.rows.append(metrics)
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
            fh.flush()
        self.echo(progress_line(metrics, self.num_rounds))

    def restore(self, rows: list[dict]) -> None:
        """Resume: metrics up to the checkpointed round (rows of a round in progress are dropped)."""
        self.rows = list(rows)
        atomic_write(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    def audit_dir(self, rnd: int) -> Path:
        d = self.dir / "audit" / f"round_{rnd:04d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def summary(self, extra: dict) -> dict:
        evals = [r for r in self.rows if "eval_accuracy" in r]
        s = {
            "rounds": len([r for r in self.rows if r.get("round", 0) > 0]),
            "final_eval_loss": self.rows[-1].get("eval_loss") if self.rows else None,
            "final_eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
            "best_eval_accuracy": max((r["eval_accuracy"] for r in evals), default=None),
            "bytes_up": sum(r.get("bytes_up", 0) for r in self.rows),
            "bytes_down": sum(r.get("bytes_down", 0) for r in self.rows),
            "wall_s": time.time() - self.t0,
        }
        s.update(extra)
        atomic_write(self.dir / "summary.json", json.dumps(s, indent=2))
        return s


def read_metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------------------------
# Comparisons (``fedlora compare``): one row per strategy, a table (markdown, csv) and two plots
# ----------------------------------------------------------------------------------------------
COLUMNS = ["strategy", "final_accuracy", "best_accuracy", "rounds_to_target", "bytes_up", "bytes_down", "wall_s",
           "note"]


def rounds_to(rows: list[dict], target: float):
    """The first round whose eval accuracy reaches ``target`` (None if none does)."""
    for r in rows:
        if r.get("eval_accuracy") is not None and r["eval_accuracy"] >= target:
            return r["round"]
    return None


def summarise(name: str, run_dir: Path, target: float) -> dict:
    """A comparison row for a finished run, from its ``metrics.jsonl`` and ``summary.json``."""
    rows = read_metrics(run_dir)
    summ = json.loads((Path(run_dir) / "summary.json").read_text())
    return {"strategy": name, "final_accuracy": summ.get("final_eval_accuracy"),
            "best_accuracy": summ.get("best_eval_accuracy"), "rounds_to_target": rounds_to(rows, target),
            "bytes_up": summ["bytes_up"], "bytes_down": summ["bytes_down"], "wall_s": round(summ["wall_s"], 1),
            "note": ""}


def not_run_row(name: str, reason) -> dict:
    """A comparison row for a strategy the pre-flight refused for this setting."""
    return {c: None for c in COLUMNS} | {"strategy": name, "note": f"not run: {reason}"}


def markdown_table(rows: list[dict], target: float) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"| strategy | final acc | best acc | rounds to {target:g} | bytes up | bytes down | wall s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {f(r['final_accuracy'], '.4f')} | {f(r['best_accuracy'], '.4f')} | "
                     f"{f(r['rounds_to_target'], 'd')} | {human_bytes(r['bytes_up'] or 0)} | "
                     f"{human_bytes(r['bytes_down'] or 0)} | {f(r['wall_s'], '.0f')} | {r['note']} |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def plots(out: Path, runs: dict[str, Path]) -> None:
    """``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png`` in ``out``: one line per run directory."""
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


def write_comparison(out: Path, rows: list[dict], target: float, setting: str, runs: dict[str, Path]) -> str:
    """``comparison.csv``, ``comparison.md`` (``setting``: one sentence describing what was compared) and, when
    some run finished, the plots; returns the markdown table."""
    out = Path(out)
    write_csv(out / "comparison.csv", rows)
    table = markdown_table(rows, target)
    (out / "comparison.md").write_text(f"# fedlora compare\n\n{setting}\n\n{table}\n")
    if runs:
        plots(out, runs)
    return table
