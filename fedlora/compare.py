"""``fedlora compare``: several strategies on identical partitions, seeds, model and budget, then one table
(``comparison.csv``, ``comparison.md``) and two plots (``accuracy_vs_round.png``, ``accuracy_vs_bytes.png``).

  fedlora compare strategies=[fedit,flora,ffa_lora,lora_fair] [run overrides] [target=0.8]
  fedlora compare preset=heterogeneous

:func:`compare` is a plain loop over the runs; every run goes through the same pre-flight as ``fedlora run``
before the first one starts. Tables and plots are :mod:`fedlora.report`'s.
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path

from . import config, preflight, report
from .config import ConfigError
from .simulation import quiet_libraries, simulate

HELP = """usage: fedlora compare [strategies=[a,b,...]] [target=ACC] [-v] [run overrides...]

Run several strategies one after the other on identical partitions, seeds, model and budget, then write
  OUT/<strategy>/            each run's directory (as `fedlora run` writes it)
  OUT/comparison.md, .csv    one row per strategy: final and best accuracy, rounds to the target accuracy,
                             bytes up and down, wall time; a strategy refused for this setting is a
                             "not run: <reason>" row
  OUT/accuracy_vs_round.png, accuracy_vs_bytes.png

  strategies=[a,b,...]   strategies to compare (default: compare.strategies in the config:
                         fedit, flora, ffa_lora, lora_fair; preset=heterogeneous picks its own)
  target=ACC             accuracy for the "rounds to target" column (default: compare.target_accuracy)
  out_dir=OUT            where to write (default: runs/<timestamp>-compare); must not hold these runs already
  -v, --verbose          Flower's and Ray's logs too
  run overrides          anything `fedlora run` takes, applied to every run (model=, data=, num_rounds=, ...)

example: fedlora compare strategies=[fedit,ffa_lora] model=tiny_llama num_rounds=3 num_clients=4
"""


def _pop(argv: list[str], key: str):
    for a in argv:
        if a.startswith(key + "="):
            argv.remove(a)
            return a.split("=", 1)[1]
    return None


def _parse_list(text: str) -> list[str]:
    return [s.strip() for s in text.strip("[]").split(",") if s.strip()]


def describe(base) -> str:
    """One sentence on the setting every strategy shares (the head of ``comparison.md``)."""
    return (f"{base.model.name} on {base.data.name}, {base.num_clients} clients, partitioner "
            f"{base.partitioner.name}, {base.num_rounds} rounds, seed {base.seed}.")


def compare(base_overrides: list[str], names: list[str], target: float, out: Path, verbose: bool = False,
            echo=print) -> list[dict]:
    """Run each strategy of ``names`` on the setting ``base_overrides`` describe, one after the other, into
    ``out/<name>``; returns one row per strategy (:data:`fedlora.report.COLUMNS`), in the order of ``names``.

    Before anything starts: the shared setting is checked (an unknown strategy, unusable data or a run directory
    that already holds a run raise :class:`~fedlora.config.ConfigError`), then each strategy's config goes
    through :func:`fedlora.preflight.check`; a strategy refused for this setting (e.g. a single-rank method in a
    mixed-rank preset) becomes a ``not run: <reason>`` row. A run that fails raises RuntimeError."""
    base_overrides, out = list(base_overrides), Path(out).resolve()
    base = config.load(base_overrides)
    for n in names:
        if n not in config.group_options("strategy"):
            raise ConfigError(f"unknown strategy '{n}' in strategies=[...]: "
                              f"choose from {', '.join(config.group_options('strategy'))}.")
    preflight.check_setting(base)
    for n in names:
        report.check_fresh(out / n)
    plan = []  # (name, config, refusal)
    for n in names:
        try:
            cfg = config.load(base_overrides + [f"strategy={n}", f"out_dir={out / n}"])
            preflight.check(cfg)
            plan.append((n, cfg, None))
        except ConfigError as e:
            plan.append((n, None, e))
    out.mkdir(parents=True, exist_ok=True)
    echo(f"fedlora compare: {', '.join(names)} on {base.model.name}/{base.data.name}, {base.num_clients} clients, "
         f"{base.num_rounds} rounds -> {out}", flush=True)
    rows = []
    for n, cfg, refusal in plan:
        if refusal is not None:
            rows.append(report.not_run_row(n, refusal))
            echo(f"-- {n}: not run ({refusal})", flush=True)
            continue
        echo(f"-- {n}", flush=True)
        simulate(cfg, out / n, verbose)
        rows.append(report.summarise(n, out / n, target))
    return rows


def cmd_compare(argv: list[str]) -> int:
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    quiet_libraries(verbose)
    names = _pop(argv, "strategies")
    target = _pop(argv, "target")
    base = config.load(argv)
    names = _parse_list(names) if names else list(base.compare.strategies)
    target = float(target) if target else float(base.compare.target_accuracy)
    out = Path(base.out_dir) if base.out_dir else Path("runs") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-compare"
    out = out.resolve()
    rows = compare(argv, names, target, out, verbose)
    runs = {r["strategy"]: out / r["strategy"] for r in rows if not r["note"]}  # the runs that finished
    table = report.write_comparison(out, rows, target, describe(base), runs)
    print("\n" + table + f"\n\nwritten: {out}/comparison.md, comparison.csv, accuracy_vs_round.png, "
          "accuracy_vs_bytes.png")
    return 0


if __name__ == "__main__":
    sys.exit(cmd_compare(sys.argv[1:]))
