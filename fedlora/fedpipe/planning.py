"""FedPipe's planning inputs read from a composed config (``cfg.strategy.*``): grids, time model, the spec of
the planned model, the memory calibration, the clients' profiles, and the plan itself (MILP or the uniform
baseline), with the one-sentence :class:`~fedlora.config.ConfigError` when a client cannot train at all.
Flower-free; the FedPipe strategy (``strategies/fedpipe.py``) calls these.
"""

from __future__ import annotations

import math

from fedlora.config import ConfigError

from .measure import calibrate_activations
from .memory import ActivationCalibration, ModelSpec, analytic_activations
from .plan import Grids, InfeasibleBudgetError, Plan, plan
from .profiles import assign_profiles
from .timing import TimeModel

# Shapes of modelled plan models (transformers LlamaConfig keywords), for ``strategy.plan_model``.
PLAN_MODELS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      vocab_size=32000),
}


def strategy_opt(cfg, key, default=None):
    v = cfg.strategy.get(key, default)
    return default if v in (None, "null") else v


RANK_PREFERENCES = ("largest", "smallest")


def grids(cfg) -> Grids:
    """The plan's options, and its rank tie-break (``strategy.rank_preference``: a client with slack takes the
    largest rank of the grid, or the smallest)."""
    g = strategy_opt(cfg, "grids", {}) or {}
    d = Grids()
    pref = strategy_opt(cfg, "rank_preference", "largest")  # a config saved before the option planned largest
    if pref not in RANK_PREFERENCES:
        raise ConfigError(f"strategy.rank_preference={pref} is not a rank tie-break: use largest (slack buys rank) or "
                          "smallest (clients keep the bottleneck's rank).")
    return Grids(tuple(int(x) for x in g.get("ranks", d.ranks)), tuple(int(x) for x in g.get("batches", d.batches)),
                 tuple(int(x) for x in g.get("bits", d.bits)), small_ranks_first=pref == "smallest")


def _positive_int(cfg, key):
    v = strategy_opt(cfg, key)
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ConfigError(f"strategy.{key}={v} must be an integer >= 1 (or null).")
    return v


def examples_per_round(cfg) -> int | None:
    """``strategy.examples_per_round``: None (default) plans equal optimizer steps per round; a number E plans equal
    examples per round (ceil(E / batch) steps, the plan before issue 21)."""
    e = _positive_int(cfg, "examples_per_round")
    if e is not None and _positive_int(cfg, "steps_per_round") is not None:
        raise ConfigError(f"strategy.steps_per_round={cfg.strategy.steps_per_round} and strategy.examples_per_round="
                          f"{e} contradict each other (equal steps or equal examples per round): set only one.")
    return e


def steps_per_round(cfg) -> int:
    """Optimizer steps every client takes per round: ``strategy.steps_per_round``, else ``local_steps``."""
    return int(_positive_int(cfg, "steps_per_round") or cfg.local_steps or 1)


def seq_len(cfg) -> int:
    return int(strategy_opt(cfg, "seq_len") or cfg.train.max_length)


def time_model(cfg) -> TimeModel:
    return TimeModel(steps_per_round=steps_per_round(cfg), examples_per_round=examples_per_round(cfg),
                     mfu=float(strategy_opt(cfg, "mfu", 0.4)),
                     download="stacked" if aggregation(cfg) == "stacking" else "own")


def aggregation(cfg) -> str:
    a = str(strategy_opt(cfg, "aggregation", "stacking"))
    if a not in ("stacking", "zero_pad"):
        raise ConfigError(f"strategy.aggregation={a} must be stacking or zero_pad.")
    return a


def lora_targets(cfg) -> list[str]:
    t = cfg.model.lora.target_modules
    return [t] if isinstance(t, str) else [str(x) for x in t]


def trained_spec(cfg, base=None) -> ModelSpec:
    """Spec of the model that trains (the base as :func:`fedlora.models.build_base` makes it)."""
    from fedlora import models

    if base is None:
        base, _ = models.build_base(cfg.model, int(cfg.seed))
    return ModelSpec.from_model(base, lora_targets(cfg), name=str(cfg.model.name),
                                modules_to_save=list(cfg.model.lora.get("modules_to_save") or []))


def plan_spec(cfg) -> tuple[ModelSpec, str]:
    """(spec the plan is made for, what it is)."""
    pm = strategy_opt(cfg, "plan_model")
    if pm is None:
        return trained_spec(cfg), f"trained model {cfg.model.name}"
    from transformers import LlamaConfig

    kw = PLAN_MODELS.get(str(pm)) if isinstance(pm, str) else dict(pm)
    if kw is None:
        raise ConfigError(f"strategy.plan_model={pm} is unknown: use one of {', '.join(PLAN_MODELS)} "
                          f"or a dict of LlamaConfig sizes.")
    name = str(pm) if isinstance(pm, str) else "llama-custom"
    spec = ModelSpec.from_config(LlamaConfig(**kw), ["q_proj", "v_proj"], name=name)
    return spec, f"modelled {name} (LlamaForCausalLM shape, q_proj/v_proj targets, meta device; not trained)"


def memory_method(cfg) -> str:
    m = str(strategy_opt(cfg, "memory_model", "auto"))
    if m not in ("auto", "dry_run", "analytic"):
        raise ConfigError(f"strategy.memory_model={m} must be auto, dry_run or analytic.")
    if m == "auto":
        return "analytic" if strategy_opt(cfg, "plan_model") is not None else "dry_run"
    if m == "dry_run" and strategy_opt(cfg, "plan_model") is not None:
        raise ConfigError("strategy.memory_model=dry_run cannot calibrate a modelled plan_model: use analytic.")
    return m


def calibration(cfg, spec: ModelSpec) -> ActivationCalibration:
    if memory_method(cfg) == "analytic":
        return analytic_activations(spec, seq_len(cfg))
    from fedlora import models

    g = grids(cfg)
    return calibrate_activations(
        lambda: models.build_base(cfg.model, int(cfg.seed))[0], spec, seq_len(cfg), targets=lora_targets(cfg),
        bits=sorted(set(g.bits)), rank=min(g.ranks), batches=(1, 2),
        modules_to_save=list(cfg.model.lora.get("modules_to_save") or []) or None)


def config_profiles(cfg) -> list[dict]:
    """Simulation: one profile per partition id, from ``strategy.profiles`` or ``strategy.mix``."""
    spec = strategy_opt(cfg, "profiles") or strategy_opt(cfg, "mix") or "mixed"
    if not isinstance(spec, str):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(spec, resolve=True)
    try:
        return assign_profiles(int(cfg.num_clients), spec, seed=int(cfg.seed))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"strategy.profiles / strategy.mix: {str(e).strip(chr(34))}.") from None


def make_plan(cfg, profiles, spec, calib, grid: Grids | None = None) -> Plan:
    if bool(strategy_opt(cfg, "uniform", False)) and grid is None:
        return uniform_plan(cfg, profiles, spec, calib)
    return plan(profiles, spec, grid or grids(cfg), seq_len=seq_len(cfg), calib=calib,
                time_model=time_model(cfg), mem_fraction=float(strategy_opt(cfg, "mem_fraction", 0.9)),
                server_mbps=strategy_opt(cfg, "server_mbps"))


def uniform_plan(cfg, profiles, spec, calib) -> Plan:
    """Baseline (``strategy.uniform=true``): one (rank, batch, bits) for every client, the one of the grid that
    fits every client (i.e. the smallest) with the lowest modelled round time (ties: larger rank, or smaller with
    ``strategy.rank_preference=smallest``; then more bits), under
    the same time model (equal steps by default: then every client takes the same steps at the same batch)."""
    g = grids(cfg)
    best, first_err = None, None
    for r, b, q in g.options():
        try:
            p = make_plan(cfg, profiles, spec, calib, Grids((r,), (b,), (q,)))
        except InfeasibleBudgetError as e:
            first_err = first_err or e
            continue
        key = (round(p.round_time_s, 9), r if g.small_ranks_first else -r, -q)
        if best is None or key < best[0]:
            best = (key, p)
    if best is None:
        raise first_err
    p = best[1]
    p.solver, p.notes = "uniform (grid search)", p.notes + ["uniform baseline: one (rank, batch, bits) for all clients"]
    return p


def infeasible_sentence(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    body = "; ".join(lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines)
    return (f"FedPipe cannot train on every client: {body}; give these clients more memory, a smaller model, "
            f"or drop them from strategy.profiles / strategy.mix.")


def check_feasible(cfg, profiles=None, spec=None) -> None:
    """Every client must at least hold the base at 4-bit with rank 1, batch 1 and no adapter (the plan's own
    floor check on a spec with nothing adapted: a lower bound for any module selection)."""
    spec = spec or plan_spec(cfg)[0]
    profiles = profiles or config_profiles(cfg)
    bare = spec.with_adapted([])
    calib = analytic_activations(bare, seq_len(cfg))
    try:
        make_plan(cfg, profiles, bare, calib)
    except InfeasibleBudgetError as e:
        raise ConfigError(infeasible_sentence(e)) from None


def modelled_selection(spec: ModelSpec, fraction: float) -> list[str]:
    """For a modelled plan_model: the same fraction of its targets, evenly spread over depth."""
    n = len(spec.adapted)
    k = max(1, math.ceil(fraction * n))
    idx = sorted({int(round(i * (n - 1) / max(1, k - 1))) for i in range(k)}) if k > 1 else [0]
    return [spec.adapted[i] for i in idx]
