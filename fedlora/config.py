"""Compose the experiment config with Hydra (never ``@hydra.main``: it would parse Flower's argv) and
validate it once, up front. Anything wrong is a :class:`ConfigError` whose message is one sentence that
names the problem and the fix; the CLI prints it and exits 2.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Hydra's config tree: the checkout's ``conf/``, or the copy a wheel installs as ``fedlora/conf``.
CONF_DIR = next((d for d in (Path(__file__).resolve().parent / "conf", REPO_ROOT / "conf") if d.is_dir()),
                REPO_ROOT / "conf")


class ConfigError(ValueError):
    """A configuration problem, explained in one sentence."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): the reason a one-sentence
    refusal quotes from a library's multi-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


#: keys that were documented once and are gone, with what to do instead (a clearer refusal than "not a key")
REMOVED_KEYS = {
    "eval.client_side": "clients do not evaluate (client-side evaluation was never implemented); the server "
                        "evaluates the global model on the test and validation splits every round, so remove it",
}


#: keys users look for under another name, with the one to use (a clearer refusal than "not a key")
ELSEWHERE_KEYS = {
    "client.prox_mu": "FedProx's mu is a training setting, train.prox_mu (e.g. train.prox_mu=0.01); conf/client/ "
                      "holds hardware profiles",
    "client.scaffold": "SCAFFOLD is a training setting, train.scaffold (e.g. train.scaffold=true); conf/client/ holds "
                       "hardware profiles",
    "train.server_lr": "the server's learning rate is server.lr (with server.optimizer=avgm, adam, yogi or adagrad)",
}


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
        if key in REMOVED_KEYS:
            raise ConfigError(f"{key} is no longer a setting: {REMOVED_KEYS[key]}.")
        if key in ELSEWHERE_KEYS:
            raise ConfigError(f"{key} is not a key of the config: {ELSEWHERE_KEYS[key]}.")
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
        first = first_line(e)
        if first.startswith("Could not override '"):
            key = first.split("'")[1]
            raise ConfigError(f"invalid override: {key} is not a key of the config: check its spelling "
                              "(`fedlora run -h` lists the common keys; conf/ holds them all).") from None
        raise ConfigError(f"invalid override: {first}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def load(overrides: str | list[str] | None = None) -> DictConfig:
    """Compose, apply presets and defaults, and validate. The one entry point for a run's config."""
    overrides = split_overrides(overrides)
    cfg = compose(overrides)
    OmegaConf.set_struct(cfg, False)
    if cfg.get("out_dir") in (None, "", "null"):
        cfg.out_dir = None
    # the types of the defaults (with the same config groups): a number given as text is refused by its key
    check_types(cfg, compose([ov for ov in overrides if _is_group_override(ov)]))
    validate(cfg)
    ranks = client_ranks(cfg)
    if len(set(ranks)) == 1 and ranks[0] != cfg.model.lora.r:  # one rank for all: it is the model's LoRA rank
        cfg.model.lora.r, cfg.model.lora.alpha = ranks[0], rank_alpha(cfg, ranks[0])
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
               "partitioner", "train", "privacy", "strategy", "comm", "debug")
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


#: ``model.lora.rank_scaling``: the LoRA scale s_k = alpha_k / r_k of a client of rank r_k, given the model's
#: ``r`` and ``alpha`` (s = alpha / r):
#:   constant  s_k = s                 every rank at the model's scale (fedlora's rule before this option)
#:   rslora    s_k = s * sqrt(r / r_k) rank-stabilised (Kalajdzievski 2023, PEFT's ``use_rslora``: scale ∝ 1/sqrt(r_k)),
#:                                     anchored so that the model's own rank keeps its scale
#:   standard  s_k = alpha / r_k       alpha fixed (PEFT's default when only ``r`` changes)
#: Under Adam a rank-r_k step moves s_k B A by about s_k * sqrt(r_k): at ``constant`` a rank-32 client takes 2x the
#: steps of a rank-8 one, at ``rslora`` the same, at ``standard`` half.
RANK_SCALINGS = ("constant", "rslora", "standard")


def rank_alpha(cfg: DictConfig, rank: int) -> float:
    """The LoRA alpha of a client of ``rank`` (its scale is alpha / rank) under ``model.lora.rank_scaling`` (a config
    without the key: ``constant``). Consistent under a change of the model's rank: re-anchoring at (r_k, alpha_k)
    gives every rank the same alpha."""
    lora = cfg.model.lora
    r, alpha, how = float(lora.r), float(lora.alpha), str(lora.get("rank_scaling", "constant"))
    if how == "rslora":
        return alpha * math.sqrt(rank / r)
    if how == "standard":
        return alpha
    return alpha / r * rank


def client_ranks(cfg: DictConfig) -> list[int]:
    """One LoRA rank per client (partition id). ``client_ranks``: null (``model.lora.r`` for everyone), one rank, a
    list of at most ``num_clients`` ranks (a shorter list repeats: [4,8] over 4 clients gives 4,8,4,8), or
    ``profile`` (FedPipe only: its plan gives each client a rank from its hardware profile; until the plan, every
    client counts at ``model.lora.r``)."""
    r, n = cfg.client_ranks, int(cfg.num_clients)
    if r is None or r == "null":
        return [int(cfg.model.lora.r)] * n
    if r == "profile":
        if cfg.strategy.name != "fedpipe":
            raise ConfigError(f"client_ranks=profile plans each client's rank from its hardware profile, which only "
                              f"strategy=fedpipe does: give strategy {cfg.strategy.name} one rank or a list such as "
                              "client_ranks=[4,8,16].")
        return [int(cfg.model.lora.r)] * n
    if isinstance(r, int) and not isinstance(r, bool):
        return [r] * n
    if not (OmegaConf.is_list(r) or isinstance(r, (list, tuple))):  # text, a float, a flag, a mapping
        raise ConfigError(f"client_ranks={r} is not a rank, a list or profile: use e.g. client_ranks=[4,8,16].")
    if len(r) == 0 or any(not isinstance(x, int) or isinstance(x, bool) for x in r):
        raise ConfigError(f"client_ranks={list(r)} must be a non-empty list of integer ranks, e.g. client_ranks=[4,8,16].")
    ranks = [int(x) for x in r]
    if len(ranks) > n:
        raise ConfigError(f"client_ranks has {len(ranks)} ranks but num_clients={n}: give at most one rank per client "
                          "(a shorter list repeats over the clients).")
    return [ranks[i % len(ranks)] for i in range(n)]


def _is_group_override(ov: str) -> bool:
    key = ov.split("=", 1)[0].lstrip("+~")
    return "=" in ov and "." not in key and (CONF_DIR / key).is_dir()


def _leaves(node, prefix: str = ""):
    """``(dotted key, value)`` of every non-container value of a plain (resolved) config container."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]


def flat(cfg) -> dict:
    """A config as ``{dotted key: value}`` (lists are values), resolved."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        whole = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    except OmegaConfBaseException as e:
        raise ConfigError(f"the config does not resolve ({str(e).strip().splitlines()[0]}): fix the interpolation.")
    return dict(_leaves(whole))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_types(cfg, reference) -> None:
    """Refuse a value whose type is not the one ``reference`` (the defaults, or a resumed run's saved config) has
    for the same key: a number given as text (``train.lr=abc``) or a flag that is not true/false. null, lists and
    keys the reference lacks are left to :func:`validate` and the strategies' own checks."""
    ref = flat(reference)
    for key, v in flat(cfg).items():
        want = ref.get(key)
        if v is None or want is None or isinstance(v, (list, dict)):
            continue
        if isinstance(want, bool) and not isinstance(v, bool):
            raise ConfigError(f"{key}={v} must be true or false.")
        if _is_number(want) and not _is_number(v):
            raise ConfigError(f"{key}={v} is not a number: give e.g. {key}={want}.")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number_in(cfg, key: str, lo=None, hi=None, *, integer=False, lo_open=False, null=False, hint="") -> None:
    """Refuse ``key`` unless it is a number (an integer with ``integer``) within [lo, hi] (``lo_open``: (lo, hi]),
    or null where ``null`` allows it; the sentence names the key, its value and the fix (``hint``)."""
    import math

    v = OmegaConf.select(cfg, key)
    if v is None and null:
        return
    ok = _int(v) if integer else _is_number(v) and math.isfinite(v)
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
    if not ok:
        kind = "an integer" if integer else "a number"
        rng = ("" if lo is None else f" {'>' if lo_open else '>='} {lo}") + (
            "" if hi is None else f"{' and' if lo is not None else ''} <= {hi}")
        raise ConfigError(f"{key}={v} must be {kind}{rng}{' (or null)' if null else ''}{hint}.")


def validate(cfg: DictConfig) -> None:
    """The config's own rules, each refusal one sentence naming the key and the fix (what needs the data, the model
    or the strategy is checked by :mod:`fedlora.preflight`)."""
    names = group_options("strategy")  # conf/strategy/ names the methods; fedlora.strategies registers each
    _require(cfg.strategy.name in names, f"unknown strategy '{cfg.strategy.name}': choose one of {', '.join(names)}.")
    _require(_int(cfg.num_clients) and cfg.num_clients >= 1, "num_clients must be an integer >= 1.")
    _require(_int(cfg.num_rounds) and cfg.num_rounds >= 1, "num_rounds must be an integer >= 1.")
    _number_in(cfg, "seed", 0, integer=True)
    _require(
        _is_number(cfg.fraction_train) and 0 < cfg.fraction_train <= 1,
        f"fraction_train={cfg.fraction_train} is outside (0, 1]: use e.g. fraction_train=0.5.",
    )
    _require(
        _int(cfg.min_train_nodes) and 1 <= cfg.min_train_nodes <= cfg.num_clients,
        f"min_train_nodes={cfg.min_train_nodes} must be between 1 and num_clients={cfg.num_clients}.",
    )
    _require(cfg.local_steps is None or (_int(cfg.local_steps) and cfg.local_steps >= 1),
             f"local_steps={cfg.local_steps} must be an integer >= 1 (or null with local_epochs set).")
    _require(cfg.local_epochs is None or (_is_number(cfg.local_epochs) and cfg.local_epochs > 0),
             f"local_epochs={cfg.local_epochs} must be > 0 (or null).")
    _require(cfg.local_steps is not None or cfg.local_epochs is not None,
             "local_steps and local_epochs are both null, so clients would not know how long to train: set "
             "local_steps=N (optimizer steps per round) or local_epochs=E.")
    _number_in(cfg, "round_timeout", 0, lo_open=True, hint=": the seconds a round waits for replies")
    _number_in(cfg, "update_norm_factor", 0, hint=" (0 turns the norm check off)")
    from .rundir import min_aggregated_share

    min_aggregated_share(cfg)
    _require(isinstance(cfg.get("audit", False), bool), f"audit={cfg.get('audit')} must be true or false.")
    _require(isinstance(cfg.get("diagnostics", True), bool),
             f"diagnostics={cfg.get('diagnostics')} must be true or false (false: no cross_term_error each round).")
    _number_in(cfg, "train.batch_size", 1, integer=True)
    _require(_is_number(cfg.train.lr) and cfg.train.lr > 0, f"train.lr={cfg.train.lr} must be a number > 0.")
    _number_in(cfg, "train.weight_decay", 0)
    _number_in(cfg, "train.warmup_steps", 0, integer=True)
    _number_in(cfg, "train.max_grad_norm", 0, null=True, hint=" (0 or null: no clipping)")
    _number_in(cfg, "train.max_length", 2, integer=True, hint=" (tokens per example)")
    mb = cfg.train.get("micro_batch_size")
    _require(mb is None or (_int(mb) and mb >= 1),
             f"train.micro_batch_size={mb} must be an integer >= 1 (or null for the whole batch).")
    _require(cfg.train.scheduler in ("constant", "linear", "cosine"),
             "train.scheduler must be constant, linear or cosine.")
    if "prox_mu" in cfg.train:  # (a run saved before the key existed has none: 0)
        _number_in(cfg, "train.prox_mu", 0, hint=" (FedProx's proximal weight; 0 turns it off, e.g. train.prox_mu=0.01)")
    keep = cfg.train.get("keep_optimizer_state", False)  # (a run saved before the key existed: false)
    _require(isinstance(keep, bool), f"train.keep_optimizer_state={keep} must be true or false.")
    _require(not keep or (cfg.get("privacy") or {}).get("mode", "none") != "dp_sgd",
             "train.keep_optimizer_state=true is not supported with privacy=dp_sgd (Opacus wraps the optimizer each "
             "round): set train.keep_optimizer_state=false.")
    _require(isinstance(cfg.train.get("scaffold", False), bool),  # (a run saved before the key existed: false)
             f"train.scaffold={cfg.train.get('scaffold')} must be true or false (SCAFFOLD's control variates).")
    _check_server(cfg)
    _check_comm(cfg)
    _number_in(cfg, "eval.batch_size", 1, integer=True)
    _number_in(cfg, "eval.max_examples", 1, integer=True, null=True, hint=": null evaluates every row")
    _require(not cfg.eval.get("client_side"),  # a saved config of an older run may hold client_side: false
             f"eval.client_side is no longer a setting: {REMOVED_KEYS['eval.client_side']}.")
    _require(cfg.kernels in ("auto", "triton", "torch", "peft"), "kernels must be auto, triton, torch or peft.")
    _require(cfg.model.task in ("seq-cls", "causal-lm"), f"model.task='{cfg.model.task}' must be seq-cls or causal-lm.")
    if cfg.model.name == "hf":
        _require(not OmegaConf.is_missing(cfg.model, "source") and cfg.model.source,
                 "model=hf needs model.source=<local path or hub id>.")
    _require(cfg.model.name != "tiny_llama" or cfg.model.task == "causal-lm",
             f"model=tiny_llama is a causal LM, so model.task={cfg.model.task} cannot apply: keep model.task=causal-lm "
             "(or use model=minilm for seq-cls).")
    if cfg.model.task == "seq-cls":
        _number_in(cfg, "model.num_labels", 2, integer=True, hint=" (classes of the classification head)")
    lora = cfg.model.lora
    _require(_int(lora.r) and lora.r >= 1, f"model.lora.r={lora.r} must be an integer >= 1 (the LoRA rank).")
    _require(_is_number(lora.alpha) and lora.alpha > 0, f"model.lora.alpha={lora.alpha} must be > 0.")
    _require(_is_number(lora.dropout) and 0 <= lora.dropout < 1, f"model.lora.dropout={lora.dropout} must be in [0, 1).")
    _require(lora.get("rank_scaling", "constant") in RANK_SCALINGS,
             f"model.lora.rank_scaling={lora.get('rank_scaling')} is not a rule for the scale of other ranks: use one of "
             f"{', '.join(RANK_SCALINGS)}.")
    for r in client_ranks(cfg):
        _require(r >= 1, f"client rank {r} must be >= 1: fix client_ranks.")
    if OmegaConf.is_missing(cfg.data, "path"):
        raise ConfigError(f"data={cfg.data.name} needs data.path=<file or folder>.")
    _require(_is_number(cfg.simulation.client_cpus) and cfg.simulation.client_cpus >= 1
             and int(cfg.simulation.client_cpus) == cfg.simulation.client_cpus,
             "simulation.client_cpus must be a positive integer (Flower 1.42 requires it).")
    _number_in(cfg, "simulation.num_cpus", 1, integer=True, null=True, hint=": null uses every core")
    if cfg.partitioner.name == "label_skew":
        _check_label_skew(cfg)
    if cfg.partitioner.name == "dirichlet" and "redraws" in cfg.partitioner:  # (a run saved before the key: 10)
        _number_in(cfg, "partitioner.redraws", 0, integer=True, hint=" (times a failed Dirichlet draw starts again)")
    from . import privacy

    try:
        privacy.validate_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_comm(cfg) -> None:
    """``comm.*`` (:mod:`fedlora.codecs`; a config without the section sends fp32): the codecs, top-k's fraction and
    the block size; a lossy codec is refused under client-level DP (Flower's clipping wrappers read the arrays)."""
    from .codecs import CODECS

    if "comm" not in cfg:
        return
    for d in ("up", "down"):
        c = cfg.comm.get(d, "fp32")
        _require(c in CODECS, f"comm.{d}={c} is not a codec: choose one of {', '.join(CODECS)}.")
    _number_in(cfg, "comm.topk_fraction", 0, 1, lo_open=True, hint=" (the share of each tensor's entries topk sends)")
    bs = cfg.comm.get("blocksize", 64)
    _require(bs in (64, 128, 256, 512, 1024, 2048, 4096),
             f"comm.blocksize={bs} must be a power of 2 from 64 to 4096 (values per int8/nf4 scale).")
    lossy = [f"comm.{d}={cfg.comm.get(d)}" for d in ("up", "down") if cfg.comm.get(d, "fp32") != "fp32"]
    _require(not lossy or (cfg.get("privacy") or {}).get("mode", "none") != "client_dp",
             f"{' and '.join(lossy)} cannot run with privacy=client_level: Flower's clipping wrappers clip and noise "
             "the message arrays themselves, so keep comm.up=fp32 and comm.down=fp32 there.")


def _check_server(cfg) -> None:
    """``server.*`` (:mod:`fedlora.server_opt`; a config without the section averages): the optimizer's name and its
    numbers, one sentence each. Which strategies take an optimizer other than avg is the strategy's check."""
    from .server_opt import OPTIMIZERS

    srv = cfg.get("server")
    if srv is None:
        return
    opt = srv.get("optimizer", "avg")
    _require(opt in OPTIMIZERS,
             f"server.optimizer={opt} is not a server optimizer: choose one of {', '.join(OPTIMIZERS)}.")
    _number_in(cfg, "server.lr", 0, lo_open=True, null=True,
               hint=": the server learning rate, null for Flower's default of server.optimizer")
    for key, what in (("momentum", "avgm's momentum"), ("beta1", "the first-moment decay"),
                      ("beta2", "the second-moment decay")):
        v = srv.get(key)
        _require(_is_number(v) and 0 <= v < 1, f"server.{key}={v} must be a number in [0, 1) ({what}, e.g. "
                                               f"server.{key}={0.99 if key == 'beta2' else 0.9}).")
    _number_in(cfg, "server.tau", 0, lo_open=True, hint=" (the adaptivity in step = lr·m/(sqrt(v) + tau), e.g. 1e-3)")
    _require(isinstance(srv.get("compile", False), bool),
             f"server.compile={srv.get('compile')} must be true or false (true: fedit and ffa_lora sum "
             "16-bit and int8 replies with a compiled loop and quantise an int8 downlink in one compiled pass).")
    if srv.get("eps") is not None or opt == "fedexp":  # configs written before fedexp have no server.eps
        _number_in(cfg, "server.eps", 0, lo_open=True,
                   hint=" (fedexp's step max(1, spread / (2(|mean|^2 + eps))), e.g. 1e-3)")
    if opt == "fedexp":
        _require(srv.get("lr") is None, f"server.lr={srv.get('lr')} is not used by server.optimizer=fedexp (its step "
                                        "size is computed each round from the clients' updates): leave server.lr null.")
        _require((cfg.get("privacy") or {}).get("mode", "none") != "client_dp",
                 "server.optimizer=fedexp cannot run with privacy=client_level: its step size reads each client's "
                 "update, which client-level DP releases only as a noised sum; use another server.optimizer there.")


def _check_label_skew(cfg) -> None:
    """``partitioner.proportions``: one row per client, each a list of shares >= 0 of its share of the data, one per
    class, summing to at most 1 (the number of classes is checked against the data by
    :func:`fedlora.preflight.check_partitioner`)."""
    props = cfg.partitioner.get("proportions")
    ok = OmegaConf.is_list(props) and all(OmegaConf.is_list(row) and len(row) > 0 for row in props)
    _require(ok, f"partitioner.proportions={props} must be a list of rows, one per client, each a list of shares "
                 "per class, e.g. [[0.1,0.9],[0.9,0.1]].")
    rows = len(props)
    _require(rows == cfg.num_clients, f"partitioner label_skew has {rows} rows of proportions but "
                                      f"num_clients={cfg.num_clients}: give one row per client.")
    for k, row in enumerate(props):
        _require(all(_is_number(p) and p >= 0 for p in row),
                 f"partitioner.proportions row {k} ({list(row)}) must hold numbers >= 0 (a client's share of each class).")
        _require(sum(row) <= 1 + 1e-9, f"partitioner.proportions row {k} ({list(row)}) sums to {sum(row):g} > 1: a "
                                       "client's shares of its data must sum to at most 1.")
        _require(sum(row) > 0, f"partitioner.proportions row {k} is all zeros, so client {k} would get no data: "
                               "give it a share of some class.")
