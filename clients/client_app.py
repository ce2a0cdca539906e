"""The ClientApp: Flower glue only. Each message: rebuild the starting point the server asked for, train
locally (:func:`fedlora.train.local_train`), send back the parts of the adapter the strategy wants.

Per-node state that must outlive one message lives in ``context.state`` (e.g. FLoRA's merged base updates);
the model itself is cached per process (:func:`fedlora.models.cached`) and reset every message.
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

from fedlora import adapters, config, data, merges, models, privacy, train
from fedlora.messages import CONFIG_KEY, DIGEST_KEY, NEEDS_CONFIG

from .dp_sgd import DP_STATE, accountant_record, budget_exhausted_reply, dp_sgd_round

app = ClientApp()


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


#: context.state record holding the run config this node received at the handshake: {"yaml", "digest"}
RUN_CONFIG = "run-config"


@functools.lru_cache(maxsize=4)
def _parse(yaml_text: str):
    """The run config, read-only: a node never edits it (node-local settings are derived, see _dataset)."""
    from omegaconf import OmegaConf

    cfg = config.from_yaml(yaml_text)
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


def _dataset(cfg, context: Context):
    """This node's training examples. In simulation: partition ``partition-id`` of the configured data.
    In deployment a node may bring its own file (``--node-config "data-path=/data/reviews.tsv"``): its whole
    training split is used, or one partition of it when ``num-partitions`` is also given."""
    from omegaconf import OmegaConf

    nc = context.node_config
    if nc.get("data-path"):
        local = {"data": {"path": str(nc["data-path"])}}
        if "num-partitions" not in nc:
            return data.load(OmegaConf.merge(cfg, local).data)[0]
        cfg = OmegaConf.merge(cfg, local, {"num_clients": int(nc["num-partitions"])})
    return data.partition(cfg, _partition_id(context))


def device_info() -> dict:
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return {"device": torch.cuda.get_device_name(), "device-memory": int(total), "device-free": int(free)}
    return {"device": "cpu", "device-memory": 0, "device-free": 0}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Handshake: tell the server who we are (partition, examples, device)."""
    cfg = run_config(msg.content["config"], context)
    if "fl.importance-steps" in msg.content["config"]:  # FedPipe warm-up: importance scores of this node's base
        return importance_reply(msg, context, cfg)
    info = device_info()
    metrics = MetricRecord({"partition-id": _partition_id(context), "num-examples": len(_dataset(cfg, context)),
                            "device-memory": info["device-memory"], "base-version": node_base_delta(context)[1]})
    profile = str(context.node_config.get("profile", ""))
    if profile == "detect":  # FedPipe: this machine's profile (free memory, matched compute figures), as JSON
        import json

        from fedlora.fedpipe.profiles import detect_profile

        profile = json.dumps(detect_profile())
    conf = ConfigRecord({"device": info["device"], "profile": profile})
    return Message(RecordDict({"metrics": metrics, "config": conf}), reply_to=msg)


def importance_reply(msg: Message, context: Context, cfg) -> Message:
    """FedPipe warm-up: :func:`fedlora.fedpipe.importance.importance_scores` of every LoRA target on this node's
    base (quantised to ``fl.bits``, adapter at B = 0) over ``fl.importance-steps`` batches of ``fl.batch_size``."""
    from fedlora.fedpipe.importance import importance_scores

    conf = msg.content["config"]
    bundle = models.cached(cfg, bits=int(conf["fl.bits"]))
    ds = _dataset(cfg, context)
    pid = _partition_id(context)
    set_base(bundle, {})
    with torch.no_grad():
        for layer in adapters.lora_layers(bundle.model).values():
            for b in layer.lora_B.values():
                b.weight.zero_()
    collator = data.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))
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


@torch.no_grad()
def prepare(bundle: models.Bundle, arrays: dict[str, np.ndarray], conf, context: Context) -> None:
    """Set the model to the round's starting point: base (+ this node's merged updates), then the adapter:
    factors given in ``arrays`` are loaded, missing A is drawn from ``fl.a_seed``, missing B is zero."""
    delta = apply_merges(arrays, context)
    layers = adapters.lora_layers(bundle.model)
    set_base(bundle, delta)
    r, alpha = int(conf["fl.rank"]), float(conf["fl.alpha"])
    adapters.resize_peft(bundle.model, r, alpha=alpha)
    state = adapters.AdapterState()
    for name, layer in layers.items():
        A = arrays.get(f"{name}.lora_A")
        B = arrays.get(f"{name}.lora_B")
        if A is None:
            A = adapters.seeded_A(int(conf["fl.a_seed"]), name, r, layer.in_features)
        else:
            A = torch.from_numpy(A)
        B = torch.from_numpy(B) if B is not None else torch.zeros(layer.out_features, r)
        state.lora[name] = adapters.LoraFactors(A, B, alpha / r)
    state.extra = {k[len("extra."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("extra.")}
    adapters.load_into_peft(bundle.model, state)
    adapters.train_A(bundle.model, not bool(conf["fl.freeze_a"]))
    if conf.get("fl.modules"):  # FedPipe: LoRA only on the selected modules; the others stay at B = 0, frozen
        selected = set(str(conf["fl.modules"]).split(","))
        for name, layer in layers.items():
            if name not in selected:
                layer.lora_B["default"].weight.zero_()
                layer.lora_A["default"].weight.requires_grad_(False)
                layer.lora_B["default"].weight.requires_grad_(False)


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """Train and reply. Client-level DP with client-side clipping (the server's
    ``DifferentialPrivacyClientSideFixedClipping`` puts ``clipping_norm`` into the config): Flower's
    ``fixedclipping_mod`` clips the reply's update; applied here rather than registered on the app so the
    in-process test harness runs it too."""
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, _train)
    return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    cfg = run_config(conf, context)
    if cfg is None:  # restarted since the handshake: the server resends this message with the config
        status = ConfigRecord({"status": NEEDS_CONFIG, "reason": "this node does not hold the run config"})
        return Message(RecordDict({"status": status, "metrics": MetricRecord({}), "arrays": ArrayRecord()}),
                       reply_to=msg)
    rnd = int(conf["server-round"])
    _inject_faults(cfg, _partition_id(context))
    bundle = models.cached(cfg, bits=int(conf.get("fl.bits", 16)))
    ds = _dataset(cfg, context)
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    try:
        prepare(bundle, arrays, conf, context)
    except merges.OutOfSync as e:  # tell the server which merges we hold; it sends the rest next time
        status = ConfigRecord({"status": "out-of-sync", "reason": str(e)})
        metrics = MetricRecord({"num-examples": len(ds), "base-version": node_base_delta(context)[1]})
        return Message(RecordDict({"status": status, "metrics": metrics, "arrays": ArrayRecord()}), reply_to=msg)
    bs = int(conf.get("fl.batch_size", cfg.train.batch_size))  # FedPipe assigns batch size and steps per client
    steps = int(cfg.local_steps) if not cfg.local_epochs else max(1, math.ceil(len(ds) / bs * float(cfg.local_epochs)))
    steps = int(conf.get("fl.local_steps", steps))
    collator = data.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))
    pid = _partition_id(context)
    dp_metrics = {}
    if privacy.mode_of(cfg) == "dp_sgd":
        result, dp_metrics = dp_sgd_round(cfg, context, bundle, ds, collator, steps=steps, batch_size=bs, rnd=rnd,
                                          pid=pid, conf=conf)
        if result is None:
            return budget_exhausted_reply(msg, pid, len(ds), dp_metrics, accountant_record(context))
    else:
        result = train.local_train(
            bundle.model, ds, collator, steps=steps, batch_size=bs,
            lr=float(cfg.train.lr) * float(cfg.strategy.get("lr_multiplier", 1.0)),
            step_offset=(rnd - 1) * steps, total_steps=int(cfg.num_rounds) * steps, scheduler=cfg.train.scheduler,
            warmup=int(cfg.train.warmup_steps), weight_decay=float(cfg.train.weight_decay),
            max_grad_norm=cfg.train.max_grad_norm, seed=int(cfg.seed) * 1000 + pid, round_idx=rnd,
            task=bundle.task, device=bundle.device, micro_batch_size=cfg.train.get("micro_batch_size"),
        )
    state = adapters.from_peft(bundle.model)
    parts = tuple(str(conf["fl.send"]).split(","))
    out = adapters.to_arrays(state, parts=parts)
    if conf.get("fl.modules"):  # FedPipe: only the selected modules' factors travel
        selected = set(str(conf["fl.modules"]).split(","))
        out = {k: v for k, v in out.items() if k.startswith("extra.") or k.rsplit(".", 1)[0] in selected}
    metrics = {"num-examples": len(ds), "train_loss": result["train_loss"], "train_s": result["train_s"],
               "steps": result["steps"], "partition-id": pid, **_sync_metrics(context), **dp_metrics}
    if bool(conf["fl.freeze_a"]):
        metrics["a-fingerprint"] = adapters.a_fingerprint(state)
    reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in out.items()}), "metrics": MetricRecord(metrics)})
    if privacy.mode_of(cfg) == "dp_sgd":  # the accountant travels back: the server keeps a copy (docs/privacy.md)
        reply[DP_STATE] = accountant_record(context)
    return Message(reply, reply_to=msg)


def _inject_faults(cfg, pid: int) -> None:
    """``debug.raise_partitions`` / ``debug.sleep_partitions``: failure rehearsals (see conf/config.yaml)."""
    dbg = cfg.get("debug") or {}
    if pid in list(dbg.get("raise_partitions") or []):
        raise RuntimeError(f"injected failure on client {pid} (debug.raise_partitions)")
    if pid in list(dbg.get("sleep_partitions") or []):
        import time

        time.sleep(float(dbg.get("sleep_s", 0)))


def _sync_metrics(context: Context) -> dict:
    delta, version = node_base_delta(context)
    return {"base-digest": merges.base_digest(delta), "base-version": version} if delta else {}
