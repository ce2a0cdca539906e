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

app = ClientApp()


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def _dataset(cfg, context: Context):
    """This node's training examples. In simulation: partition ``partition-id`` of the configured data.
    In deployment a node may bring its own file (``--node-config "data-path=/data/reviews.tsv"``): its whole
    training split is used, or one partition of it when ``num-partitions`` is also given."""
    nc = context.node_config
    if nc.get("data-path"):
        cfg.data.path = str(nc["data-path"])
        if "num-partitions" not in nc:
            return data.load(cfg.data)[0]
        cfg.num_clients = int(nc["num-partitions"])
    return data.partition(cfg, _partition_id(context))


def device_info() -> dict:
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return {"device": torch.cuda.get_device_name(), "device-memory": int(total), "device-free": int(free)}
    return {"device": "cpu", "device-memory": 0, "device-free": 0}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Handshake: tell the server who we are (partition, examples, device)."""
    cfg = config.from_yaml(msg.content["config"]["fedlora-config"])
    if "fl.importance-steps" in msg.content["config"]:  # FedPipe warm-up: importance scores of this node's base
        return importance_reply(msg, context, cfg)
    info = device_info()
    metrics = MetricRecord({"partition-id": _partition_id(context), "num-examples": len(_dataset(cfg, context)),
                            "device-memory": info["device-memory"], "base-version": node_base_delta(context)[1]})
    profile = str(context.node_config.get("profile", ""))
    if profile == "detect":  # FedPipe: this machine's profile (free memory, matched compute figures), as JSON
        import json

        from fedlora import resources

        profile = json.dumps(resources.detect_profile())
    return Message(RecordDict({"metrics": metrics, "config": ConfigRecord({"device": info["device"], "profile": profile})}), reply_to=msg)


def importance_reply(msg: Message, context: Context, cfg) -> Message:
    """FedPipe warm-up: :func:`fedlora.resources.importance_scores` of every LoRA target on this node's base
    (quantised to ``fl.bits``, adapter at B = 0) over ``fl.importance-steps`` batches of ``fl.batch_size``."""
    from fedlora import resources

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
               for idx in train.batch_indices(len(ds), int(conf["fl.batch_size"]), steps, int(cfg.seed) * 1000 + pid, 0)]
    t = cfg.model.lora.target_modules
    scores = resources.importance_scores(bundle.model, batches, steps, beta=float(conf["fl.importance-beta"]),
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
        A = torch.from_numpy(A) if A is not None else adapters.seeded_A(int(conf["fl.a_seed"]), name, r, layer.in_features)
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
    cfg = config.from_yaml(conf["fedlora-config"])
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
        result, dp_metrics = dp_sgd_round(cfg, context, bundle, ds, collator, steps=steps, batch_size=bs, rnd=rnd, pid=pid,
                                          conf=conf)
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
    if privacy.mode_of(cfg) == "dp_sgd":  # the accountant travels back, so the server keeps a copy (see fedlora.privacy)
        reply[DP_STATE] = accountant_record(context)
    return Message(reply, reply_to=msg)


# context.state key and reply record: ConfigRecord {"accountant": JSON of fedlora.privacy.AccountantState}
DP_STATE = privacy.ACCOUNTANT_RECORD


def accountant_record(context: Context) -> ConfigRecord:
    """This node's accountant as it stands (a copy of ``context.state[DP_STATE]``), for the reply."""
    return ConfigRecord({"accountant": str(context.state[DP_STATE]["accountant"])})


def restore_accountant(context: Context, conf, dp_cfg: privacy.DPConfig, pid: int) -> privacy.AccountantState:
    """The node's accountant for this round: its own (``context.state``) or the server's copy sent in the train
    config, by :func:`fedlora.privacy.restore_accountant` (the one that has spent more; the server's alone when
    the node has none). The choice is saved to ``context.state`` at once."""
    from logging import INFO, WARNING

    from flwr.common.logger import log

    local = str(context.state[DP_STATE]["accountant"]) if DP_STATE in context.state else None
    server_copy = conf.get(privacy.ACCOUNTANT_CONFIG_KEY) if hasattr(conf, "get") else None
    server_copy = str(server_copy) if server_copy not in (None, "") else None
    state, source, problem = privacy.restore_accountant(local, server_copy, dp_cfg.accountant, dp_cfg.target_delta)
    if problem:
        log(WARNING, "client %d: %s; keeping the local accountant", pid, problem)
    if source == "server":
        eps = privacy.epsilon(state, dp_cfg.target_delta)
        if local:
            log(WARNING, "client %d: the server's accountant copy has spent more than the local one; continuing from "
                "the server's (%d steps, epsilon %.4g)", pid, state.steps, eps)
        else:
            log(INFO, "client %d: no local accountant (restarted node); restored the server's copy (%d steps, "
                "epsilon %.4g)", pid, state.steps, eps)
    context.state[DP_STATE] = ConfigRecord({"accountant": state.to_json()})
    return state


@functools.lru_cache(maxsize=64)
def _planned_noise(dp_cfg: privacy.DPConfig, sample_rate: float, total_steps: int) -> float:
    return privacy.plan_noise(dp_cfg, sample_rate, total_steps)


def dp_sgd_round(cfg, context: Context, bundle, ds, collator, *, steps: int, batch_size: int, rnd: int, pid: int,
                 conf=None):
    """One round of sample-level DP-SGD on this node: ``(result of train.local_train_dp, metrics)``, or
    ``(None, metrics)`` when ``steps`` more steps would take the node past ``privacy.target_epsilon``.

    One accountant per node for the whole run, restored from ``context.state`` or the server's copy in the
    train config ``conf`` (:func:`restore_accountant`) and saved to ``context.state``. The noise is
    planned once for ``privacy.planned_rounds`` (default ``num_rounds``) x ``steps`` at this node's sampling
    rate, the worst case of a node sampled every round: with ``fraction_train < 1`` a node trains fewer rounds
    and ends below the target.
    """
    dp_cfg = privacy.dp_config(cfg)
    q = 1.0 / math.ceil(len(ds) / batch_size)  # privacy.sample_rate of the loader local_train_dp builds
    sigma = _planned_noise(dp_cfg, q, privacy.planned_rounds(cfg) * steps)
    state = restore_accountant(context, conf, dp_cfg, pid)
    info = {"noise_multiplier": sigma, "sample_rate": q, "delta": dp_cfg.target_delta}
    if privacy.would_exceed(state, dp_cfg, sigma, q, steps):
        return None, {"epsilon": privacy.epsilon(state, dp_cfg.target_delta), **info}
    result = train.local_train_dp(
        bundle.model, ds, collator, dp_cfg=dp_cfg, noise_multiplier=sigma, accountant_state=state, steps=steps,
        batch_size=batch_size, lr=float(cfg.train.lr) * float(cfg.strategy.get("lr_multiplier", 1.0)),
        step_offset=(rnd - 1) * steps, total_steps=int(cfg.num_rounds) * steps, scheduler=cfg.train.scheduler,
        warmup=int(cfg.train.warmup_steps), weight_decay=float(cfg.train.weight_decay), task=bundle.task,
        device=bundle.device, rng_seed=(int(cfg.seed), pid, rnd) if cfg.privacy.get("reproducible") else None,
        optimizer=str(cfg.privacy.get("optimizer", "adamw")),
        micro_batch_size=cfg.train.get("micro_batch_size"),
    )
    context.state[DP_STATE] = ConfigRecord({"accountant": result["accountant"]})
    return result, {"epsilon": result["epsilon"], "empty_batches": result["empty_batches"], **info}


def budget_exhausted_reply(msg: Message, pid: int, num_examples: int, dp_metrics: dict,
                           accountant: ConfigRecord) -> Message:
    """A reply without training: no arrays, the epsilon spent so far (and the accountant), status
    ``budget-exhausted``."""
    eps = dp_metrics["epsilon"]
    reason = (f"another round would take epsilon from {eps:.4g} past privacy.target_epsilon "
              f"at delta={dp_metrics['delta']:g}")
    reply = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": num_examples, "partition-id": pid,
                                                                        "steps": 0, **dp_metrics}),
                        "status": ConfigRecord({"status": "budget-exhausted", "reason": reason}),
                        DP_STATE: accountant})
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
