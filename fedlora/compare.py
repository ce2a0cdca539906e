"""``fedlora compare``: several strategies on identical partitions, seeds, model and budget, over one or more
seeds, then tables (``comparison.md``, ``comparison.csv``, ``comparison_seeds.csv``, ``comparison_rounds.csv``) and
plots (``accuracy_vs_round.png``, ``accuracy_vs_bytes.png``, ``cross_term_error_vs_round.png``).

  fedlora compare strategies=[fedit,flora,ffa_lora,lora_fair] seeds=[0,1,2] [run overrides] [target=0.8]
  fedlora compare preset=heterogeneous
  fedlora compare strategies=[fedit,ffa_lora] ffa_lora:model.lora.alpha=128 ffa_lora:strategy.a_init=orthogonal
  fedlora compare strategies=[fedit,fedit@prox,fedit@adam] fedit@prox:train.prox_mu=0.01 fedit@adam:server.optimizer=adam

:func:`compare` is a plain loop over the runs (for each seed: every strategy, then the centralised ceiling);
every run goes through the same pre-flight as ``fedlora run`` before the first one starts. Within a seed every
strategy gets the same config but for ``strategy=`` and its own hyper-parameters (``NAME:KEY=VALUE``, only
:data:`TUNABLE` keys), so the same partitions, initial adapter and client sampling (all drawn from ``seed``). Tables, verdicts and plots are :mod:`fedlora.report`'s and :mod:`fedlora.verdicts`'.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import re
import sys
from pathlib import Path

from . import config, preflight, report, rundir
from .config import ConfigError
from .simulation import quiet_libraries, simulate

HELP = """usage: fedlora compare [strategies=[a,b,...]] [seeds=[0,1,2]] [baseline=NAME] [target=ACC] [-v]
                       [run overrides...]

Run several strategies one after the other on identical partitions, initial weights, model and budget, once per
seed, then write
  OUT/<strategy>/            each run's directory (as `fedlora run` writes it), with one seed;
  OUT/seed_<s>/<strategy>/   with several seeds
  OUT/.../centralised/       the same model and adapter trained on the pooled client data (a ceiling), when
                             compare.centralised is true or strategies= lists centralised: one optimizer for the
                             whole budget, its lr chosen from centralised.lr_grid by validation accuracy on the
                             first seed and reused for the later seeds
  OUT/comparison.md, .csv    one row per strategy: final test accuracy, test accuracy at the best validation
                             round (best test accuracy when runs have no validation split), rounds to the target,
                             bytes up and down, wall time: mean ± sample sd (n-1) over seeds (plain values with
                             one seed); final accuracy minus the baseline's, paired by seed: mean and min..max,
                             and a verdict (better / worse / within seed noise: 2-4 seeds by the sign of every
                             seed's difference, >= 5 seeds by a paired t-test at 5%); the difference to the
                             centralised row; a strategy refused for this setting is a "not run: <reason>" row;
                             a pair whose runs of one seed were computed on different machines is noted
  OUT/comparison_seeds.csv   one row per (seed, strategy), with the machine it ran on (environment: torch,
                             transformers and peft versions, CPU, torch's CPU capability; fedlora.provenance)
  OUT/comparison_rounds.csv  one row per (strategy, round): test and validation accuracy and the cross-term error
                             of strategies that average factors, mean and sample sd over seeds
  OUT/accuracy_vs_round.png, accuracy_vs_bytes.png    one line per strategy, a band of ± one sd over seeds
  OUT/cross_term_error_vs_round.png                   the same for the cross-term error, where runs report it

  strategies=[a,b,...]   strategies to compare (default: compare.strategies in the config:
                         fedit, flora, ffa_lora, lora_fair; preset=heterogeneous picks its own). STRATEGY@TAG is
                         a variant: STRATEGY again, with settings of its own given as STRATEGY@TAG:KEY=VALUE
                         (e.g. fedit@prox fedit@prox:train.prox_mu=0.01), its own row and verdict
  seeds=[0,1,2]          seeds to run every strategy with; seeds=N means [0..N-1] (default: compare.seeds, or
                         when that is null the config's seed alone); replaces seed=
  baseline=NAME          the strategy the others are paired against (default: compare.baseline, fedit, or the
                         first strategy when that one is not compared)
  target=ACC             accuracy for the "rounds to target" column (default: compare.target_accuracy)
  out_dir=OUT            where to write (default: runs/<timestamp>-compare); must not hold these runs already
  compare.centralised=false    leave out the centralised row
  compare.reuse=true     tabulate a run directory that already holds the same run, finished, instead of refusing
                         it: an interrupted comparison, or one given more seeds, runs only what it lacks
  NAME:KEY=VALUE         a hyper-parameter of one compared strategy alone, applied after the shared overrides
                         (each strategy tuned on its own, e.g. ffa_lora:model.lora.alpha=128 flora:train.lr=1e-3,
                         ffa_lora:strategy.a_init=orthogonal); only a strategy's own knobs: train.lr,
                         train.weight_decay, train.scheduler, train.warmup_steps, train.max_grad_norm,
                         train.prox_mu, train.scaffold, train.keep_optimizer_state, model.lora.alpha,
                         model.lora.dropout, server.* (the server optimizer) and strategy.*; never what every
                         run must share (data, partitions, clients, rounds, local steps, batch, rank, seed).
                         comparison.md names them
  -v, --verbose          Flower's and Ray's logs too
  run overrides          anything `fedlora run` takes, applied to every run (model=, data=, num_rounds=, ...)

example: fedlora compare strategies=[fedit,ffa_lora] seeds=3 model=tiny_llama num_rounds=3 num_clients=4
"""


def _pop(argv: list[str], key: str):
    for a in argv:
        if a.startswith(key + "="):
            argv.remove(a)
            return a.split("=", 1)[1]
    return None


def _parse_list(text: str) -> list[str]:
    return [s.strip() for s in text.strip("[]").split(",") if s.strip()]


#: What ``NAME:KEY=VALUE`` may set for one strategy: its own hyper-parameters. The setting every strategy shares
#: (data, partitions, clients, rounds, local steps, batch size, rank, seed, model) is not among them, so a
#: comparison stays one of strategies, not of settings. ``strategy.`` covers every key of the strategy's own config;
#: the drift controls (FedProx, SCAFFOLD), the local AdamW kept across rounds and ``server.`` (the server
#: optimizer) are how a variant differs.
TUNABLE = ("train.lr", "train.weight_decay", "train.scheduler", "train.warmup_steps", "train.max_grad_norm",
           "train.prox_mu", "train.scaffold", "train.keep_optimizer_state", "model.lora.alpha", "model.lora.dropout",
           "model.lora.rank_scaling", "server.", "strategy.")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:@[A-Za-z0-9_-]+)?"  # a strategy, or a variant STRATEGY@TAG
_OWN = re.compile(rf"^({_NAME}):([+~]*)([^=]+)=(.*)$")


def strategy_of(name: str) -> str:
    """The strategy a compared entry runs: ``fedit@prox`` (a variant, with settings of its own) runs fedit."""
    return name.split("@", 1)[0]


def check_names(names: list[str], own: dict[str, list[str]]) -> None:
    """Every compared entry is a strategy or a variant ``STRATEGY@TAG`` of one, named once; a variant has settings
    of its own (else it would repeat its strategy). Else :class:`~fedlora.config.ConfigError`, one sentence."""
    options = config.group_options("strategy")
    for n in names:
        if not re.fullmatch(_NAME, n) or strategy_of(n) not in options:
            raise ConfigError(f"unknown strategy '{n}' in strategies=[...]: choose from {', '.join(options)} "
                              "(or centralised), or a variant of one as STRATEGY@TAG.")
        if "@" in n and not own.get(n):
            raise ConfigError(f"{n} in strategies=[...] is a variant of {strategy_of(n)} with no settings of its own: "
                              f"give it some, e.g. {n}:train.prox_mu=0.01, or compare {strategy_of(n)} itself.")
    if len(set(names)) != len(names):
        raise ConfigError(f"strategies=[{','.join(names)}] names a strategy twice: list each once (a variant of one "
                          "as STRATEGY@TAG).")


def pop_own_overrides(argv: list[str]) -> dict[str, list[str]]:
    """Take every ``NAME:KEY=VALUE`` out of ``argv`` (in place) and return ``{NAME: ["KEY=VALUE", ...]}``, in order.
    A key outside :data:`TUNABLE`, or the whole ``strategy`` group, raises :class:`~fedlora.config.ConfigError`;
    that NAME is a compared strategy is checked by :func:`compare`."""
    own: dict[str, list[str]] = {}
    for a in list(argv):
        m = _OWN.match(a)
        if not m:
            continue
        name, plus, key, value = m.groups()
        if not any(key == t or (t.endswith(".") and key.startswith(t)) for t in TUNABLE):
            raise ConfigError(f"{a}: {key} is not one strategy's own hyper-parameter, so every compared strategy "
                              f"must share it: set it for all as {key}=..., or give {name} one of "
                              f"{', '.join(t + '*' if t.endswith('.') else t for t in TUNABLE)}.")
        own.setdefault(name, []).append(f"{plus}{key}={value}")
        argv.remove(a)
    return own


def describe_own(own: dict[str, list[str]]) -> str:
    """The per-strategy hyper-parameters as one sentence for ``comparison.md`` ("" when there are none)."""
    if not own:
        return ""
    return "Per-strategy settings: " + "; ".join(f"{n}: {', '.join(o)}" for n, o in own.items()) + "."


def parse_seeds(value, default_seed: int) -> list[int]:
    """``seeds=`` (or ``compare.seeds``): a list of integers, or a count N meaning [0..N-1]; None: the config's
    seed alone."""
    if value is None:
        return [int(default_seed)]
    items = _parse_list(value) if isinstance(value, str) and value.strip().startswith("[") else value
    try:
        if isinstance(items, (str, int)):
            n = int(items)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(s) for s in items]
    except (TypeError, ValueError):
        raise ConfigError(f"seeds={value} is not a list of integers or a count: write e.g. seeds=[0,1,2] "
                          "or seeds=3.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={value} is empty or repeats a seed: list each seed once, e.g. seeds=[0,1,2].")
    return seeds


def pick_baseline(requested: str | None, names: list[str], configured: str | None) -> str | None:
    """The strategy every other one is paired against: ``requested`` (``baseline=``), which must be compared;
    else ``configured`` (``compare.baseline``) when compared, else the first strategy."""
    strategies = [n for n in names if n != report.CENTRALISED]
    if requested == report.CENTRALISED:
        raise ConfigError("baseline=centralised is a ceiling, not a baseline: choose one of the compared "
                          f"strategies ({', '.join(strategies)}).")
    if requested is not None and requested not in strategies:
        raise ConfigError(f"baseline={requested} is not among the compared strategies: choose one of "
                          f"{', '.join(strategies)} or add it to strategies=[...].")
    if requested is not None:
        return requested
    return configured if configured in strategies else (strategies[0] if strategies else None)


def describe(base, seeds: list[int] | None = None) -> str:
    """One sentence on the setting every strategy shares (the head of ``comparison.md``)."""
    seeds = seeds or [int(base.seed)]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    return (f"{base.model.name} on {base.data.name}, {base.num_clients} clients, partitioner "
            f"{base.partitioner.name}, {base.num_rounds} rounds, {seed_text}.")


def run_dir_of(out: Path, seed: int, name: str, multi: bool) -> Path:
    """``out/<name>`` with one seed, ``out/seed_<seed>/<name>`` with several."""
    return Path(out) / f"seed_{seed}" / name if multi else Path(out) / name


def run_config(base_overrides: list[str], name: str, seed: int, run_dir: Path, own: list[str] | None = None):
    """The config of one run of a comparison: the shared overrides, then the strategy, its own hyper-parameters
    ``own`` (``KEY=VALUE``, see :func:`pop_own_overrides`), seed and directory (the centralised run keeps the shared
    config's strategy, which it does not use)."""
    extra = [] if name == report.CENTRALISED else [f"strategy={strategy_of(name)}"] + list(own or [])
    return config.load(list(base_overrides) + extra + [f"seed={seed}", f"out_dir={run_dir}"])


def _centralised_module():
    """:mod:`fedlora.centralised`, looked up when used (a test may stand a fake in)."""
    return importlib.import_module("fedlora.centralised")


def centralised_runner():
    """:func:`fedlora.centralised.run` (``run(cfg, run_dir, echo=print, lr_grid=None) -> summary``)."""
    return _centralised_module().run


def _check_centralised(cfg) -> None:
    """The centralised run's own pre-flight (``check(cfg)``: its learning-rate grid), where it has one."""
    check = getattr(_centralised_module(), "check", None)
    if check is not None:
        check(cfg)


#: Config sections that do not change what a run computes: where it is written, how a comparison is laid out,
#: and the centralised run's learning-rate grid (a reused centralised run's lr is the one in its summary).
LAYOUT_KEYS = ("out_dir", "compare", "centralised")
#: Keys a centralised run sets itself: ``train.lr``, the learning rate it chose from the grid.
CENTRALISED_KEYS = ("train.lr",)
#: Keys that say where a simulation ran, not what it computes: the CPUs Ray was given and each client actor's, and
#: the cluster it joined (seeded per client and round, a run gives the same numbers on any of them, to float
#: rounding). A comparison extended with another ``simulation.num_cpus`` reuses its finished runs.
RESOURCE_KEYS = ("simulation.num_cpus", "simulation.client_cpus", "simulation.ray_address")


def _flat(cfg) -> dict:
    """A run's config as ``{dotted key: value}`` (:func:`fedlora.config.flat`) without :data:`LAYOUT_KEYS` and
    :data:`RESOURCE_KEYS`."""
    return {k: v for k, v in config.flat(cfg).items()
            if k.split(".", 1)[0] not in LAYOUT_KEYS and k not in RESOURCE_KEYS}


def same_setting(run_dir: Path, cfg, name: str | None = None) -> list[str]:
    """Whether ``run_dir``'s saved ``config.yaml`` is ``cfg``'s setting: :class:`~fedlora.config.ConfigError` when it
    differs on any key both have (besides :data:`LAYOUT_KEYS` and :data:`RESOURCE_KEYS`, and for the
    ``centralised`` run :data:`CENTRALISED_KEYS`), else the config keys the saved run lacks (written by an older
    fedlora, they take their defaults in the planned config), possibly none."""
    saved, planned = _flat(config.from_yaml((Path(run_dir) / "config.yaml").read_text())), _flat(cfg)
    own = CENTRALISED_KEYS if name == report.CENTRALISED else ()
    differ = sorted(k for k in saved.keys() & planned.keys() if saved[k] != planned[k] and k not in own)
    if differ:
        k = differ[0]
        raise ConfigError(f"compare.reuse: {run_dir} holds a run of another setting ({k}={saved[k]} there, "
                          f"{planned[k]} planned{f', and {len(differ) - 1} more keys' if len(differ) > 1 else ''}): "
                          "choose another out_dir or move that run away.")
    return sorted(planned.keys() - saved.keys())


def reusable(run_dir: Path, cfg, name: str | None = None) -> list[str] | None:
    """With ``compare.reuse``: whether ``run_dir`` already holds this planned run, finished. None when it holds
    no summary (the run is to be done); else :func:`same_setting`'s list of keys the saved run lacks. A summary whose
    status is not a successful one (``completed``, ``budget-exhausted``), or whose saved config is another setting,
    raises :class:`~fedlora.config.ConfigError`: that directory holds another run."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists():
        return None
    status = json.loads((run_dir / "summary.json").read_text()).get("status", "completed")
    if rundir.STATUSES.get(status) != 0 or not (run_dir / "config.yaml").exists():  # unknown or failed
        raise ConfigError(f"compare.reuse: {run_dir} holds a run that did not complete (status {status}) or has "
                          "no config.yaml: move it away to run it again.")
    return same_setting(run_dir, cfg, name)


def _check_own(base_overrides, names, own: dict[str, list[str]]) -> None:
    """Each strategy's own hyper-parameters name a compared strategy and compose with the shared setting; else
    :class:`~fedlora.config.ConfigError` naming the override, before anything starts. (A strategy the setting
    refuses is refused with or without them: its "not run" row says why.)"""
    for n, overrides in own.items():
        if n not in names:
            raise ConfigError(f"{n}:{overrides[0]} names {n}, which is not compared here: add it to "
                              f"strategies=[...] or drop the override (compared: {', '.join(names)}).")
        try:
            config.load(list(base_overrides) + [f"strategy={strategy_of(n)}"])
        except ConfigError:
            continue
        for o in overrides:
            try:
                config.load(list(base_overrides) + [f"strategy={strategy_of(n)}", o])
            except ConfigError as e:
                raise ConfigError(f"{n}:{o}: {e}") from None


def _plan(base_overrides, names, seeds, out, with_ceiling, reuse=False, own=None) -> list[tuple]:
    """Every run's (seed, name, run_dir, config, refusal, reused), after each seed's shared setting, each run
    directory and each strategy's config (with its ``own`` hyper-parameters) passed the pre-flight (a strategy
    refused for this setting gets its refusal). ``reused``: with ``reuse``, the keys :func:`reusable` reports for a
    finished run already there (None: the run is to be done)."""
    multi, plan, own = len(seeds) > 1, [], own or {}
    for seed in seeds:
        preflight.check_setting(config.load(list(base_overrides) + [f"seed={seed}"]))
        for n in names + ([report.CENTRALISED] if with_ceiling else []):
            d = run_dir_of(out, seed, n, multi)
            try:
                cfg = run_config(base_overrides, n, seed, d, own.get(n))
            except ConfigError as e:
                rundir.check_fresh(d)
                plan.append((seed, n, d, None, e, None))
                continue
            reused = reusable(d, cfg, n) if reuse else None
            if reused is None:
                rundir.check_fresh(d)
                try:
                    _check_centralised(cfg) if n == report.CENTRALISED else preflight.check(cfg)
                except ConfigError as e:
                    plan.append((seed, n, d, None, e, None))
                    continue
            plan.append((seed, n, d, cfg, None, reused))
    return plan


def compare(base_overrides: list[str], names: list[str], target: float, out: Path, verbose: bool = False,
            echo=print, seeds: list[int] | None = None, centralised: bool | None = None,
            reuse: bool | None = None, own: dict[str, list[str]] | None = None) -> list[dict]:
    """For each seed of ``seeds`` (default: the config's seed), run each strategy of ``names`` on the setting
    ``base_overrides`` describe, one after the other, into :func:`run_dir_of`, then (``centralised``, default:
    ``compare.centralised`` or ``centralised`` in ``names``) the centralised ceiling. Returns one row per
    (seed, run) (:data:`fedlora.report.COLUMNS`, ``run_dir`` relative to ``out``), seed by seed.

    Before anything starts: the shared setting is checked for every seed (an unknown strategy, unusable data or
    a run directory that already holds a run raise :class:`~fedlora.config.ConfigError`), then each run's config
    goes through :func:`fedlora.preflight.check`; a strategy refused for this setting (e.g. a single-rank method
    in a mixed-rank preset) becomes a ``not run: <reason>`` row. A run that fails raises RuntimeError.

    ``reuse`` (default ``compare.reuse``): a run directory that already holds this very run, finished (same
    config but for :data:`LAYOUT_KEYS` and :data:`RESOURCE_KEYS`, see :func:`reusable`), is tabulated as it is
    instead of refused, so an interrupted comparison, or one extended by more seeds, does only the runs it lacks.

    ``own``: per strategy, its own hyper-parameters (``{"ffa_lora": ["model.lora.alpha=128"]}``, from
    :func:`pop_own_overrides`), applied to that strategy's runs alone after the shared overrides."""
    base_overrides, out = list(base_overrides), Path(out).resolve()
    base = config.load(base_overrides)
    seeds = list(seeds) if seeds is not None else parse_seeds(base.compare.get("seeds"), base.seed)
    with_ceiling = bool(base.compare.get("centralised")) if centralised is None else centralised
    with_ceiling = with_ceiling or report.CENTRALISED in names
    names = [n for n in names if n != report.CENTRALISED]
    reuse = bool(base.compare.get("reuse")) if reuse is None else reuse
    own = dict(own or {})
    check_names(names, own)
    _check_own(base_overrides, names, own)
    plan = _plan(base_overrides, names, seeds, out, with_ceiling, reuse, own)
    out.mkdir(parents=True, exist_ok=True)
    echo(f"fedlora compare: {', '.join(names)}{' + centralised' if with_ceiling else ''} on {base.model.name}/"
         f"{base.data.name}, {base.num_clients} clients, {base.num_rounds} rounds, seeds {seeds} -> {out}"
         f"{(' (' + describe_own(own) + ')') if own else ''}", flush=True)
    rows, lr = [], None
    for seed, n, d, cfg, refusal, reused in plan:
        rows.append(_one(seed, n, d, cfg, refusal, out, target, verbose, echo, lr, reused))
        if n == report.CENTRALISED and lr is None and not rows[-1]["note"].startswith("not run"):
            lr = json.loads((d / "summary.json").read_text()).get("lr")
    return rows


def _one(seed, name, run_dir, cfg, refusal, out, target, verbose, echo, lr=None, reused=None) -> dict:
    """Run one planned run (or record its refusal, or take the finished run ``reused`` names) and return its
    row. ``lr``: the centralised run's learning rate when an earlier seed already chose it from the grid (the
    grid is searched on the first seed only)."""
    label = f"seed {seed}, {name}"
    if refusal is not None:
        echo(f"-- {label}: not run ({refusal})", flush=True)
        return report.not_run_row(name, refusal) | {"seed": seed}
    if reused is not None:
        lacks = f"; its config lacks {', '.join(reused)} (defaults assumed)" if reused else ""
        echo(f"-- {label}: reused, finished in {run_dir}{lacks}", flush=True)
    elif name == report.CENTRALISED:
        echo(f"-- {label}", flush=True)
        centralised_runner()(cfg, run_dir, echo=echo, lr_grid=None if lr is None else [lr])
    else:
        echo(f"-- {label}", flush=True)
        simulate(cfg, run_dir, verbose)
    row = report.summarise(name, run_dir, target)
    return row | {"seed": seed, "run_dir": str(run_dir.relative_to(out))}


def cmd_compare(argv: list[str]) -> int:
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    quiet_libraries(verbose)
    names, target = _pop(argv, "strategies"), _pop(argv, "target")
    seeds, baseline = _pop(argv, "seeds"), _pop(argv, "baseline")
    own = pop_own_overrides(argv)
    base = config.load(argv)
    names = _parse_list(names) if names else list(base.compare.strategies)
    target = float(target) if target else float(base.compare.target_accuracy)
    seeds = parse_seeds(seeds if seeds is not None else base.compare.get("seeds"), base.seed)
    baseline = pick_baseline(baseline, names, base.compare.get("baseline"))
    out = Path(base.out_dir) if base.out_dir else Path("runs") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-compare"
    out = out.resolve()
    rows = compare(argv, names, target, out, verbose, seeds=seeds, own=own)
    setting = " ".join(t for t in (describe(base, seeds), describe_own(own)) if t)
    table = report.write_comparison(out, rows, target, setting, baseline)
    written = [f for f in ("comparison.md", "comparison.csv", "comparison_seeds.csv", "comparison_rounds.csv",
                           "accuracy_vs_round.png", "accuracy_vs_bytes.png", "cross_term_error_vs_round.png")
               if (Path(out) / f).exists()]
    print("\n" + table + f"\n\nwritten: {out}/{', '.join(written)}")
    failed = [r for r in rows if report.failed(r)]
    if failed:  # tabulated and marked, but the comparison did not do what was asked of it
        print("error: " + "; ".join(f"seed {r['seed']}, {r['strategy']}: {r['note']}" for r in failed),
              file=sys.stderr)
        return rundir.EXIT_UNDERTRAINED
    return 0


if __name__ == "__main__":
    sys.exit(cmd_compare(sys.argv[1:]))
