"""Compose the experiment config with Hydra (never ``@hydra.main``: it would parse Flower's argv) and
validate it once, up front. Anything wrong is a :class:`ConfigError` whose message is one sentence that
names the problem and the fix; the CLI prints it and exits 2.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A configuration problem, explained in one sentence."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def split_overrides(text: str | list[str] | None) -> list[str]:
    if text is None:
        return []
    if isinstance(text, str):
        return shlex.split(text)
    return list(text)


def compose(overrides: str | list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides (``["strategy=flora", "num_rounds=5"]``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = split_overrides(overrides)
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if "=" in ov and "." not in key and (CONF_DIR / key).is_dir():
            value = ov.split("=", 1)[1]
            if value not in group_options(key):
                raise ConfigError(
                    f"unknown {key} '{value}': choose one of {', '.join(group_options(key))}."
                )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"invalid override: {first}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def load(overrides: str | list[str] | None = None) -> DictConfig:
    """Compose, apply presets and defaults, and validate. The one entry point for a run's config."""
    cfg = compose(overrides)
    OmegaConf.set_struct(cfg, False)
    if cfg.get("out_dir") in (None, "", "null"):
        cfg.out_dir = None
    validate(cfg)
    ranks = client_ranks(cfg)
    if len(set(ranks)) == 1 and ranks[0] != cfg.model.lora.r:  # one rank for all: it is the model's LoRA rank
        scale = float(cfg.model.lora.alpha) / float(cfg.model.lora.r)
        cfg.model.lora.r, cfg.model.lora.alpha = ranks[0], scale * ranks[0]
    return cfg


def from_yaml(text: str) -> DictConfig:
    """The resolved config as the server sends it to clients."""
    cfg = OmegaConf.create(text)
    OmegaConf.set_struct(cfg, False)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


#: What a node needs of the run config, and all it is sent (docs/messages.md): these top-level keys, with
#: ``strategy`` cut to the keys in :data:`CLIENT_STRATEGY_KEYS` and ``data`` without its ``path`` (a path on the
#: server: a deployed node reads its own ``data-path``, a simulated one is given it by the simulation). Output
#: paths, evaluation, simulation and comparison settings never leave the server.
CLIENT_KEYS = ("seed", "num_clients", "num_rounds", "local_steps", "local_epochs", "kernels", "model", "data",
               "partitioner", "train", "privacy", "strategy", "debug")
CLIENT_STRATEGY_KEYS = ("name", "lr_multiplier")


def for_clients(cfg: DictConfig) -> DictConfig:
    """The part of a run config a node receives (:data:`CLIENT_KEYS`). The server sends it and a node applies it
    again to what it receives, so a key outside the list has no effect on a node whatever a message holds."""
    whole = OmegaConf.to_container(cfg, resolve=True)
    out = OmegaConf.create({k: whole[k] for k in CLIENT_KEYS if k in whole})
    OmegaConf.set_struct(out, False)
    if "strategy" in out:
        out.strategy = {k: out.strategy[k] for k in CLIENT_STRATEGY_KEYS if k in out.strategy}
    if "data" in out and "path" in out.data:
        del out.data["path"]
    return out


def config_digest(text: str) -> str:
    """A short digest of a resolved config's YAML: what every train message names instead of the config."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def client_ranks(cfg: DictConfig) -> list[int]:
    """One LoRA rank per client (partition id)."""
    r = cfg.client_ranks
    if r is None or r == "null":
        return [int(cfg.model.lora.r)] * int(cfg.num_clients)
    if isinstance(r, int):
        return [r] * int(cfg.num_clients)
    if isinstance(r, str):
        raise ConfigError(f"client_ranks='{r}' is not a list or integer: use e.g. client_ranks=[4,8,16].")
    ranks = [int(x) for x in r]
    if len(ranks) != int(cfg.num_clients):
        # A shorter list repeats: [4,8] over 4 clients -> 4,8,4,8 (users write the pattern once).
        ranks = [ranks[i % len(ranks)] for i in range(int(cfg.num_clients))]
    return ranks


def validate(cfg: DictConfig) -> None:
    names = group_options("strategy")  # conf/strategy/ names the methods; fedlora.strategies registers each
    _require(cfg.strategy.name in names, f"unknown strategy '{cfg.strategy.name}': choose one of {', '.join(names)}.")
    _require(isinstance(cfg.num_clients, int) and cfg.num_clients >= 1, "num_clients must be an integer >= 1.")
    _require(isinstance(cfg.num_rounds, int) and cfg.num_rounds >= 1, "num_rounds must be an integer >= 1.")
    _require(
        isinstance(cfg.fraction_train, (int, float)) and 0 < cfg.fraction_train <= 1,
        f"fraction_train={cfg.fraction_train} is outside (0, 1]: use e.g. fraction_train=0.5.",
    )
    _require(
        1 <= cfg.min_train_nodes <= cfg.num_clients,
        f"min_train_nodes={cfg.min_train_nodes} must be between 1 and num_clients={cfg.num_clients}.",
    )
    _require(cfg.local_steps is None or cfg.local_steps >= 1, "local_steps must be >= 1.")
    _require(cfg.local_epochs is None or cfg.local_epochs > 0, "local_epochs must be > 0 (or null).")
    _require(cfg.train.batch_size >= 1, "train.batch_size must be >= 1.")
    _require(cfg.train.lr > 0, "train.lr must be > 0.")
    mb = cfg.train.get("micro_batch_size")
    _require(mb is None or (isinstance(mb, int) and mb >= 1),
             f"train.micro_batch_size={mb} must be an integer >= 1 (or null for the whole batch).")
    _require(cfg.train.scheduler in ("constant", "linear", "cosine"),
             "train.scheduler must be constant, linear or cosine.")
    _require(cfg.kernels in ("auto", "triton", "torch", "peft"), "kernels must be auto, triton, torch or peft.")
    _require(cfg.model.task in ("seq-cls", "causal-lm"), f"model.task='{cfg.model.task}' must be seq-cls or causal-lm.")
    if cfg.model.name == "hf":
        _require(not OmegaConf.is_missing(cfg.model, "source") and cfg.model.source,
                 "model=hf needs model.source=<local path or hub id>.")
    lora = cfg.model.lora
    _require(isinstance(lora.r, int) and lora.r >= 1, f"model.lora.r={lora.r} must be an integer >= 1 (the LoRA rank).")
    _require(lora.alpha > 0, "model.lora.alpha must be > 0.")
    _require(0 <= lora.dropout < 1, "model.lora.dropout must be in [0, 1).")
    for r in client_ranks(cfg):
        _require(r >= 1, f"client rank {r} must be >= 1: fix client_ranks.")
    if OmegaConf.is_missing(cfg.data, "path"):
        raise ConfigError(f"data={cfg.data.name} needs data.path=<file or folder>.")
    _require(cfg.simulation.client_cpus >= 1 and int(cfg.simulation.client_cpus) == cfg.simulation.client_cpus,
             "simulation.client_cpus must be a positive integer (Flower 1.42 requires it).")
    if cfg.partitioner.name == "label_skew":
        rows = len(cfg.partitioner.proportions)
        _require(rows == cfg.num_clients, f"partitioner label_skew has {rows} rows of proportions but "
                                          f"num_clients={cfg.num_clients}: give one row per client.")
    from . import privacy

    try:
        privacy.validate_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
