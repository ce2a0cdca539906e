"""Centralised bound from the command line: a thin call to :func:`fedlora.centralised.run` (pooled training rows,
the same model, adapter, seed and example budget as the federated run, one AdamW for the whole budget, lr picked
from ``centralised.lr_grid`` by validation accuracy). Writes a run directory and, with ``--out``, one JSON file
(the summary and the chosen lr's curve).

  python bench/centralised.py model=minilm num_clients=10 num_rounds=10 local_steps=10 [--out FILE] [--run-dir DIR]
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedlora import centralised, config, report  # noqa: E402


def _option(argv: list[str], name: str):
    """(value of ``name`` or None, argv without it)."""
    if name not in argv:
        return None, argv
    i = argv.index(name)
    return argv[i + 1], argv[:i] + argv[i + 2:]


def main(argv: list[str]) -> dict:
    """Run the bound for the overrides in ``argv``; returns the summary."""
    out, argv = _option(argv, "--out")
    run_dir, argv = _option(argv, "--run-dir")
    cfg = config.load(argv)
    run_dir = Path(run_dir or ROOT / "runs" / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-centralised")
    summary = centralised.run(cfg, run_dir)
    if out:
        doc = {"command": "python bench/centralised.py " + " ".join(argv), "run_dir": str(run_dir), **summary,
               "curve": report.read_metrics(run_dir), "torch_threads": torch.get_num_threads()}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
