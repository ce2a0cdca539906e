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
