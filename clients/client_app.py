"""The ClientApp: Flower glue only. Each message: rebuild the starting point the server asked for, train
locally (:func:`fedlora.train.local_train`), send back the parts of the adapter the strategy wants.

Per-node state that must outlive one message lives in ``context.state`` (e.g. FLoRA's merged base updates);
the model itself is cached per process (:func:`fedlora.models.cached`) and reset every message. What the node
decides for itself (its data, its privacy floor, fault injection) comes from its node config
(:mod:`fedlora.clients.node`), never from a message; of the run config it keeps only
:func:`fedlora.config.for_clients`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedlora import adapters, batching, config, data, merges, models, privacy, train
from fedlora.messages import CONFIG_KEY, DIGEST_KEY, NEEDS_CONFIG

from . import comm, local_optimizer, scaffold as node_scaffold
from .dp_sgd import DP_STATE, accountant_record, budget_exhausted_reply, dp_sgd_round
from .node import NodeSettings


def settings(context: Context, node_defaults=None) -> NodeSettings:
    """This node's own settings: its node config, over the defaults its app was made with (a simulation's)."""
    return NodeSettings.of({**(node_defaults or {}), **context.node_config})


#: context.state record holding the run config this node received at the handshake: {"yaml", "digest"}
RUN_CONFIG = "run-config"


@functools.lru_cache(maxsize=4)
def _parse(yaml_text: str):
    """The run config as this node uses it: only the keys :func:`fedlora.config.for_clients` lists (whatever else
    the message holds), read-only (node-local settings are derived, see _dataset)."""
    from omegaconf import OmegaConf

    cfg = config.for_clients(config.from_yaml(yaml_text))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def run_config(conf, context: Context):
    """The run config for a message: the one the message carries (the handshake, or a resent message after a
    node restart), which the node keeps in ``context.state`` for the run, else the one kept; None when the node
    holds none or not the one the message names by digest."""
    if CONFIG_KEY in conf:
        text = str(conf[CONFIG_KEY])
        context.state[RUN_CONFIG] = ConfigRecord({"yaml": text, "digest": config.config_digest(text)})
    if RUN_CONFIG not in context.state:
        return None
    held = context.state[RUN_CONFIG]
    if DIGEST_KEY in conf and str(conf[DIGEST_KEY]) != str(held["digest"]):
        return None
    return _parse(str(held["yaml"]))


def _dataset(cfg, node: NodeSettings):
    """This node's training examples: from its own ``data-path`` (``--node-config "data-path=/data/reviews.tsv"``;
    a simulation gives its nodes the run's data path), the whole training split, or partition ``partition-id``
    of it when ``num-partitions`` is also given. Without a ``data-path``, the default location of the run's data
    set (SST-2), resolved on this node: a path named by the server is never followed."""
    from omegaconf import OmegaConf

    if node.data_path:
        local = {"data": {"path": node.data_path}}
        if node.num_partitions is None:
            return data.load(OmegaConf.merge(cfg, local).data)[0]
        cfg = OmegaConf.merge(cfg, local, {"num_clients": node.num_partitions})
    elif cfg.data.name != "sst2":
        raise data.DataError(f"this node has no data-path in its node config and data={cfg.data.name} has no "
                             "default location: start the node with --node-config \"data-path=<file or folder>\".")
    return data.partition(cfg, node.partition_id)


def device_info() -> dict:
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return {"device": torch.cuda.get_device_name(), "device-memory": int(total), "device-free": int(free)}
    return {"device": "cpu", "device-memory": 0, "device-free": 0}


def query(msg: Message, context: Context, node_defaults=None) -> Message:
    """Handshake: tell the server who we are (partition, examples, device)."""
    cfg = run_config(msg.content["config"], context)
    node = settings(context, node_defaults)
    if "fl.importance-steps" in msg.content["config"]:  # FedPipe warm-up: importance scores of this node's base
        return importance_reply(msg, context, cfg, node)
    info = device_info()
    metrics = MetricRecord({"partition-id": node.partition_id, "num-examples": len(_dataset(cfg, node)),
                            "device-memory": info["device-memory"], "base-version": node_base_delta(context)[1]})
    profile = str(context.node_config.get("profile", ""))
    if profile == "detect":  # FedPipe: this machine's profile (free memory, matched compute figures), as JSON
        import json

        from fedlora.fedpipe.profiles import detect_profile

        profile = json.dumps(detect_profile())
    conf = ConfigRecord({"device": info["device"], "profile": profile})
    return Message(RecordDict({"metrics": metrics, "config": conf}), reply_to=msg)


def importance_reply(msg: Message, context: Context, cfg, node: NodeSettings) -> Message:
    """FedPipe warm-up: :func:`fedlora.fedpipe.importance.importance_scores` of every LoRA target on this node's
    base (quantised to ``fl.bits``, adapter at B = 0) over ``fl.importance-steps`` batches of ``fl.batch_size``."""
    from fedlora.fedpipe.importance import importance_scores

    conf = msg.content["config"]
    bundle = models.cached(cfg, bits=int(conf["fl.bits"]))
    ds = _dataset(cfg, node)
    pid = node.partition_id
    set_base(bundle, {})
    with torch.no_grad():
        for layer in adapters.lora_layers(bundle.model).values():
            for b in layer.lora_B.values():
                b.weight.zero_()
    collator = batching.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))
    steps = int(conf["fl.importance-steps"])
    batches = [{k: v.to(bundle.device) for k, v in collator([ds[int(j)] for j in idx]).items()}
               for idx in train.batch_indices(len(ds), int(conf["fl.batch_size"]), steps,
                                              int(cfg.seed) * 1000 + pid, 0)]
    t = cfg.model.lora.target_modules
    scores = importance_scores(bundle.model, batches, steps, beta=float(conf["fl.importance-beta"]),
                               targets=[t] if isinstance(t, str) else list(t),
                               loss_fn=lambda m, b: train.model_loss(m, b, bundle.task))
    metrics = {f"importance.{k}": float(v) for k, v in scores.items()}
    metrics.update({"num-examples": len(ds), "partition-id": pid})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@torch.no_grad()
def set_base(bundle: models.Bundle, delta: dict[str, torch.Tensor]) -> None:
    """Base = pristine + ``delta`` (this node's merged updates). A quantised base (FedPipe, ``bundle.bits`` < 16)
    is re-quantised from its fp32 master ``w0 + delta`` through :func:`fedlora.quant.merge_update` (one
    rounding of the exact sum, never a chain); layers already at this node's delta are left alone."""
    layers = adapters.lora_layers(bundle.model)
    if bundle.bits >= 16:
        for name, layer in layers.items():
            w = bundle.base_weights[name]
            layer.base_layer.weight.copy_(w + delta[name].to(w) if name in delta else w)
        return
    from fedlora import quant

    for name in layers:
        cur = quant.merged_delta(bundle.model, name)
        want = delta[name].float() if name in delta else None
        if want is None and (cur is None or not bool(cur.any())):
            continue
        if want is not None and cur is not None and torch.equal(cur, want):
            continue
        quant.merge_update(bundle.model, name, (want if want is not None else 0) - (cur if cur is not None else 0))


def node_base_delta(context: Context) -> tuple[dict[str, torch.Tensor], int]:
    """Updates this node has merged into its base weights so far (FLoRA), and their version; kept in
    ``context.state`` (float64, so merging never rounds)."""
    if "base-delta" not in context.state:
        return {}, 0
    version = int(context.state["base-version"]["version"])
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in context.state["base-delta"].items()}, version


def apply_merges(arrays: dict[str, np.ndarray], context: Context) -> dict[str, torch.Tensor]:
    delta, version = node_base_delta(context)
    delta, new_version = merges.apply(delta, version, arrays)
    if new_version != version:
        context.state["base-delta"] = ArrayRecord({k: Array(v.double().numpy()) for k, v in delta.items()})
        context.state["base-version"] = ConfigRecord({"version": new_version})
    return delta


def train_factor(conf) -> str:
    """Which LoRA factors this round trains (:data:`fedlora.adapters.TRAIN_FACTORS`): ``fl.train_factor``
    (RoLoRA, FedSVD), or, in a message without it, ``B`` when ``fl.freeze_a`` is set (FFA-LoRA), else ``both``.
    An unknown value, or one that contradicts ``fl.freeze_a``, is refused in one sentence (ValueError)."""
    freeze_a = bool(conf["fl.freeze_a"])
    factor = conf.get("fl.train_factor")
    if factor is None:
        return "B" if freeze_a else "both"
    if factor not in adapters.TRAIN_FACTORS:
        raise ValueError(f"fl.train_factor={factor!r} in the train message is not a choice of factors this client "
                         f"knows ({', '.join(adapters.TRAIN_FACTORS)}): update the client's fedlora to the server's.")
    if freeze_a != (factor == "B"):
        raise ValueError(f"fl.train_factor={factor!r} contradicts fl.freeze_a={freeze_a} in the train message "
                         "(A is frozen exactly when only B trains): the server's message is malformed.")
    return str(factor)


@torch.no_grad()
def prepare(bundle: models.Bundle, arrays: dict[str, np.ndarray], conf, context: Context) -> None:
    """Set the model to the round's starting point: base (+ this node's merged updates), then the adapter:
    factors given in ``arrays`` are loaded, missing A is drawn from ``fl.a_seed`` (at rank ``fl.a_rank``, the
    largest in the run when the strategy nests fresh factors, and cut to this client's rank: the first r rows of
    one seeded matrix, :func:`fedlora.adapters.seeded_A`, with the initialisation ``fl.a_init``: FFA-LoRA's
    ``strategy.a_init``, ``kaiming`` when absent), missing B is zero. The factors :func:`train_factor` names
    train; the other one is frozen (FFA-LoRA and FedSVD: A; RoLoRA: A or B by round)."""
    factor = train_factor(conf)  # before anything changes, like fl.a_init below
    a_init = conf.get("fl.a_init", adapters.DEFAULT_A_INIT)
    if a_init not in adapters.A_INITS:  # before anything changes: an unknown name is refused, never guessed
        raise ValueError(f"fl.a_init={a_init!r} in the train message is not an initialisation of A this client "
                         f"knows ({', '.join(adapters.A_INITS)}): update the client's fedlora to the server's.")
    delta = apply_merges(arrays, context)
    layers = adapters.lora_layers(bundle.model)
    set_base(bundle, delta)
    r, alpha = int(conf["fl.rank"]), float(conf["fl.alpha"])
    a_rank = int(conf.get("fl.a_rank", r))
    adapters.resize_peft(bundle.model, r, alpha=alpha)
    state = adapters.AdapterState()
    for name, layer in layers.items():
        A = arrays.get(f"{name}.lora_A")
        B = arrays.get(f"{name}.lora_B")
        if A is None:
            A = adapters.seeded_A(int(conf["fl.a_seed"]), name, r, layer.in_features, a_rank=a_rank, init=a_init)
        else:
            A = torch.from_numpy(A)
        B = torch.from_numpy(B) if B is not None else torch.zeros(layer.out_features, r)
        state.lora[name] = adapters.LoraFactors(A, B, alpha / r)
    state.extra = {k[len("extra."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("extra.")}
    adapters.load_into_peft(bundle.model, state)
    adapters.train_A(bundle.model, factor != "B")
    adapters.train_B(bundle.model, factor != "A")  # also undoes an earlier A round's freeze (the model is cached)
    if conf.get("fl.modules"):  # FedPipe: LoRA only on the selected modules; the others stay at B = 0, frozen
        selected = set(str(conf["fl.modules"]).split(","))
        for name, layer in layers.items():
            if name not in selected:
                layer.lora_B["default"].weight.zero_()
                layer.lora_A["default"].weight.requires_grad_(False)
                layer.lora_B["default"].weight.requires_grad_(False)


#: context.state record of the adapter parts a node keeps for itself (FedSA-LoRA: its B, and its head when local)
PERSONAL = "personal"


def personal_holdout(ds, conf, cfg, node: NodeSettings):
    """(training rows, held-out rows): with ``fl.holdout`` > 0 (FedSA-LoRA) a seeded slice of this node's partition
    (:func:`fedlora.data.holdout_indices`) that only the personalised evaluation reads; else all rows, none held."""
    fraction = float(conf.get("fl.holdout", 0.0))
    if fraction <= 0:
        return ds, ds.select([])
    rows, held = data.holdout_indices(len(ds), fraction, int(cfg.seed), node.partition_id)
    return ds.select(rows.tolist()), ds.select(held.tolist())


def with_personal(arrays: dict[str, np.ndarray], conf, context: Context) -> dict[str, np.ndarray]:
    """``arrays`` with this node's own parts (``fl.personal``, e.g. ``lora_B,extra``) put over the message's, as
    it last trained them (float32), from ``context.state``. A node that holds none (its first round, a restart, a
    resumed run) or holds them at another rank starts them fresh: B zero, the head as the server sent it."""
    if not conf.get("fl.personal") or PERSONAL not in context.state:
        return arrays
    held = {k: a.numpy().copy() for k, a in context.state[PERSONAL].items()}
    if any(k.endswith(".lora_B") and v.shape[1] != int(conf["fl.rank"]) for k, v in held.items()):
        return arrays
    return {**arrays, **held}


def keep_personal(state: adapters.AdapterState, conf, context: Context, bundle, held, cfg) -> dict:
    """With ``fl.personal``: keep the trained personal parts in ``context.state`` for the next round, and evaluate
    the personalised model as it leaves training on the held-out rows: ``personal_examples`` and, with any,
    ``personal_loss`` and ``personal_accuracy`` (labelled data), over the first ``fl.eval_max_examples`` of them
    when the message caps it. Without ``fl.personal``: nothing, ``{}``."""
    parts = tuple(p for p in str(conf.get("fl.personal", "")).split(",") if p)
    if not parts:
        return {}
    context.state[PERSONAL] = ArrayRecord({k: Array(v) for k, v in adapters.to_arrays(state, parts=parts).items()})
    if not len(held):
        return {"personal_examples": 0}
    n = min(len(held), int(conf.get("fl.eval_max_examples", 0)) or len(held))  # the server's eval.max_examples
    res = train.evaluate(bundle.model, held, collator_of(bundle, cfg), task=bundle.task,
                         batch_size=int(cfg.train.batch_size), max_examples=n, device=bundle.device)
    out = {"personal_examples": n, "personal_loss": float(res["eval_loss"])}
    if "eval_accuracy" in res:
        out["personal_accuracy"] = float(res["eval_accuracy"])
    return out


def collator_of(bundle: models.Bundle, cfg) -> batching.Collator:
    return batching.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))


def train_fn(msg: Message, context: Context, node_defaults=None) -> Message:
    """Train and reply. Client-level DP with client-side clipping (the server's
    ``DifferentialPrivacyClientSideFixedClipping`` puts ``clipping_norm`` into the config): Flower's
    ``fixedclipping_mod`` clips the reply's update; applied here rather than registered on the app so the
    in-process test harness runs it too."""
    inner = functools.partial(_train, node_defaults=node_defaults)
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, inner)
    return inner(msg, context)


def _status_reply(msg: Message, status: str, reason: str, metrics: dict | None = None) -> Message:
    content = {"status": ConfigRecord({"status": status, "reason": reason}),
               "metrics": MetricRecord(metrics or {}), "arrays": ArrayRecord()}
    return Message(RecordDict(content), reply_to=msg)


def _train(msg: Message, context: Context, node_defaults=None) -> Message:
    conf = msg.content["config"]
    cfg = run_config(conf, context)
    if cfg is None:  # restarted since the handshake: the server resends this message with the config
        return _status_reply(msg, NEEDS_CONFIG, "this node does not hold the run config")
    node = settings(context, node_defaults)
    refusal = node.refusal(cfg)
    if refusal:  # the node's own privacy floor: the server records the reason in the round's `rejected`
        from logging import WARNING

        from flwr.common.logger import log

        log(WARNING, "client %d refuses round %s: %s", node.partition_id, conf.get("server-round"), refusal)
        return _status_reply(msg, "refused", refusal, {"partition-id": node.partition_id})
    rnd = int(conf["server-round"])
    _inject_faults(cfg, node)
    bundle = models.cached(cfg, bits=int(conf.get("fl.bits", 16)))
    ds = _dataset(cfg, node)
    ds, held = personal_holdout(ds, conf, cfg, node)  # FedSA-LoRA: a slice of the partition never trained on
    arrays = with_personal(comm.payload(msg, cfg), conf, context)  # comm.down decoded
    try:
        prepare(bundle, arrays, conf, context)
    except merges.OutOfSync as e:  # tell the server which merges we hold; it sends the rest next time
        status = ConfigRecord({"status": "out-of-sync", "reason": str(e)})
        metrics = MetricRecord({"num-examples": len(ds), "base-version": node_base_delta(context)[1]})
        return Message(RecordDict({"status": status, "metrics": metrics, "arrays": ArrayRecord()}), reply_to=msg)
    ctl = node_scaffold.start(msg, context, bundle.model)  # SCAFFOLD: None unless the message carries c
    bs = int(conf.get("fl.batch_size", cfg.train.batch_size))  # FedPipe assigns batch size and steps per client
    steps = int(cfg.local_steps) if not cfg.local_epochs else max(1, math.ceil(len(ds) / bs * float(cfg.local_epochs)))
    steps = int(conf.get("fl.local_steps", steps))
    collator = batching.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))
    pid = node.partition_id
    dp_metrics = {}
    if privacy.mode_of(cfg) == "dp_sgd":
        result, dp_metrics = dp_sgd_round(cfg, context, bundle, ds, collator, steps=steps, batch_size=bs, rnd=rnd,
                                          pid=pid, conf=conf, seed=node.dp_seed(cfg, rnd), control=ctl and ctl.control)
        if result is None:
            return budget_exhausted_reply(msg, pid, len(ds), dp_metrics, accountant_record(context))
    else:
        digest = str(context.state[RUN_CONFIG]["digest"])  # the run this round belongs to
        opt = local_optimizer.optimizer([p for p in bundle.model.parameters() if p.requires_grad],
                                        float(cfg.train.lr), float(cfg.train.weight_decay), context, digest
                                        ) if cfg.train.get("keep_optimizer_state", False) else None
        result = train.local_train(
            bundle.model, ds, collator, steps=steps, batch_size=bs, optimizer=opt,  # None: a fresh AdamW
            lr=float(cfg.train.lr) * float(cfg.strategy.get("lr_multiplier", 1.0)),
            step_offset=(rnd - 1) * steps, total_steps=int(cfg.num_rounds) * steps, scheduler=cfg.train.scheduler,
            warmup=int(cfg.train.warmup_steps), weight_decay=float(cfg.train.weight_decay),
            max_grad_norm=cfg.train.max_grad_norm, seed=int(cfg.seed) * 1000 + pid, round_idx=rnd,
            task=bundle.task, device=bundle.device, micro_batch_size=cfg.train.get("micro_batch_size"),
            prox_mu=float(cfg.train.get("prox_mu", 0.0)),  # FedProx: from the run config the node holds
            control=ctl and ctl.control,
        )
        if opt is not None:  # train.keep_optimizer_state: the moments stay on the node for the next round
            local_optimizer.keep(opt, context, digest)
    state = adapters.from_peft(bundle.model)
    personal = keep_personal(state, conf, context, bundle, held, cfg)  # {} unless the strategy keeps parts local
    parts = tuple(str(conf["fl.send"]).split(","))
    out = adapters.to_arrays(state, parts=parts)
    if conf.get("fl.modules"):  # FedPipe: only the selected modules' factors travel
        selected = set(str(conf["fl.modules"]).split(","))
        out = {k: v for k, v in out.items() if k.startswith("extra.") or k.rsplit(".", 1)[0] in selected}
    metrics = {"num-examples": len(ds), "train_loss": result["train_loss"], "train_s": result["train_s"],
               "steps": result["steps"], "partition-id": pid, **personal, **_sync_metrics(context), **dp_metrics}
    if bool(conf["fl.freeze_a"]):
        metrics["a-fingerprint"] = adapters.a_fingerprint(state)
    record, codec_metrics = comm.reply(out, cfg, context, conf)  # comm.up, with error feedback when lossy
    reply = RecordDict({"arrays": record, "metrics": MetricRecord({**metrics, **codec_metrics})})
    if ctl is not None:  # SCAFFOLD: Δc_i travels back, c_i⁺ stays on the node
        reply[node_scaffold.RECORD] = node_scaffold.finish(ctl, context, steps,
                                                           node_scaffold.lr_sum_of(cfg, rnd, steps))
    if privacy.mode_of(cfg) == "dp_sgd":  # the accountant travels back: the server keeps a copy (docs/privacy.md)
        reply[DP_STATE] = accountant_record(context)
    return Message(reply, reply_to=msg)


def _inject_faults(cfg, node: NodeSettings) -> None:
    """``debug.raise_partitions`` / ``debug.sleep_partitions``: failure rehearsals (see conf/config.yaml), obeyed
    only by a node that allows them in its own node config (``allow-faults=true``; a simulation's nodes do)."""
    fail, sleep_s = node.faults(cfg)
    if fail:
        raise RuntimeError(f"injected failure on client {node.partition_id} (debug.raise_partitions)")
    if sleep_s:
        import time

        time.sleep(sleep_s)


def make_app(node_defaults=None) -> ClientApp:
    """A ClientApp whose nodes have ``node_defaults`` under their own node config: ``fedlora run`` gives its
    simulated nodes :func:`fedlora.clients.node.simulated` (the run's data path, fault injection allowed)."""
    bound = ClientApp()
    defaults = dict(node_defaults or {})

    @bound.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context, defaults)

    @bound.train()
    def _train_msg(msg: Message, context: Context) -> Message:
        return train_fn(msg, context, defaults)

    return bound


#: the ClientApp of deployed SuperNodes and ``flwr run .``: settings from the node config alone
app = make_app()


def _sync_metrics(context: Context) -> dict:
    delta, version = node_base_delta(context)
    return {"base-digest": merges.base_digest(delta), "base-version": version} if delta else {}
