"""The ServerApp: compose the config, discover clients, run the rounds, evaluate the global model on the
held-out split, and write the run directory (the server is its single writer).

The round loop is written out here instead of calling ``Strategy.start`` because it also owns the things
Flower's loop does not do: the per-round progress line and metrics, audit files, and the final PEFT adapter.
Each strategy still exposes Flower's ``configure_train`` / ``aggregate_train`` and works with ``start``.
"""

from __future__ import annotations

import random
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedlora import adapters, batching, checkpoint, config, data, models, rundir, train
from fedlora.centralised import clients_per_round
from fedlora.report import Recorder
from fedlora.validate import check_handshake

from . import get as get_strategy
from fedlora.messages import CONFIG_KEY, DIGEST_KEY, NEEDS_CONFIG

from .base import NodeInfo, RoundResult
from .replies import attribute

app = ServerApp()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def discover(grid: Grid, strategy, cfg, timeout: float) -> dict[int, NodeInfo]:
    """Wait for ``num_clients`` nodes, then ask each for its partition, size, device (a QUERY message). The
    handshake carries the run config, which each node keeps for the run (train messages name its digest).

    A node is left out, with its reason logged, when it fails the handshake, answers with malformed metrics
    (:func:`fedlora.validate.check_handshake`) or claims a partition an earlier answer already claimed (two
    nodes would share its DP accountant, FLoRA version and audit files); the run goes on without it if at
    least ``min_train_nodes`` remain."""
    t0 = time.time()
    while len(ids := sorted(grid.get_node_ids())) < cfg.num_clients:
        if time.time() - t0 > timeout:
            raise RuntimeError(f"only {len(ids)} of {cfg.num_clients} clients connected within {timeout:.0f}s")
        time.sleep(0.5)
    conf = {CONFIG_KEY: strategy.cfg_yaml, DIGEST_KEY: strategy.config_digest}
    msgs = [Message(RecordDict({"config": ConfigRecord(conf)}), message_type=MessageType.QUERY, dst_node_id=nid)
            for nid in ids]
    ranks = config.client_ranks(cfg)
    nodes, holder = {}, {}  # node id -> NodeInfo; partition id -> the node id that claimed it first
    att = attribute(grid.send_and_receive(msgs, timeout=timeout), msgs, {})  # replies matched to their message
    asked = set(ids)  # a set: 1,000s of nodes are looked up once per reply
    for lost in att.rejected:  # e.g. the SuperLink answering for a node that stopped sending heartbeats
        log(WARNING, "node %s failed the handshake: %s", lost["node_id"], lost["reason"])
    for rep in att.replies:
        nid = rep.metadata.src_node_id
        if rep.has_error():
            log(WARNING, "node %s failed the handshake: %s", nid, rep.error.reason)
            continue
        m = dict(rep.content["metrics"]) if "metrics" in rep.content else {}
        if nid not in asked or nid in nodes:
            reason = "it was not asked, or it answered twice"
        else:
            reason = check_handshake(m) if "metrics" in rep.content else "the handshake has no metrics"
        if reason is None and int(m["partition-id"]) in holder:
            reason = f"it claims partition {int(m['partition-id'])}, which node {holder[int(m['partition-id'])]} holds"
        if reason:
            log(WARNING, "node %s is left out of the run: %s.", nid, reason)
            continue
        pid = int(m["partition-id"])
        holder[pid] = nid
        r = ranks[pid % len(ranks)]
        c = rep.content["config"] if "config" in rep.content else {}
        nodes[nid] = NodeInfo(node_id=nid, partition_id=pid, num_examples=int(m["num-examples"]), rank=r,
                              alpha=config.rank_alpha(cfg, r), base_version=int(m.get("base-version", 0)),
                              device=str(c.get("device", "cpu")))
        nodes[nid].extra.update({  # what each node runs on (nodes.json in the run dir)
            "device-memory": int(m.get("device-memory", 0)), "profile": str(c.get("profile", ""))})
    if len(nodes) < cfg.min_train_nodes:
        raise RuntimeError(f"only {len(nodes)} clients answered the handshake "
                           f"(< min_train_nodes={cfg.min_train_nodes})")
    return nodes


def exchange(grid: Grid, strategy, messages: list[Message], timeout: float) -> tuple[list[Message], list[Message]]:
    """Send a round's messages and collect the replies: ``(replies, sent)``, ``sent`` every message sent (the grid
    set their ids), which the replies are matched against (:func:`fedlora.strategies.replies.attribute`). A node that
    no longer holds the run config (it restarted since the handshake) answers ``needs-config`` and gets its
    message again, this time with the config."""
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    asked = {m.metadata.dst_node_id for m in messages}
    stale = [r for r in replies if not r.has_error() and r.metadata.src_node_id in asked and "status" in r.content
             and r.content["status"].get("status") == NEEDS_CONFIG]
    if not stale:
        return replies, list(messages)
    lost = {r.metadata.src_node_id for r in stale}
    log(INFO, "resending the run config to %d node(s) that restarted since the handshake", len(lost))
    again = [Message(RecordDict({**dict(m.content.items()),
                                 "config": ConfigRecord({**dict(m.content["config"]), CONFIG_KEY: strategy.cfg_yaml})}),
                     message_type=m.metadata.message_type, dst_node_id=m.metadata.dst_node_id)
             for m in messages if m.metadata.dst_node_id in lost]
    kept = [r for r in replies if not any(r is x for x in stale)]
    return kept + list(grid.send_and_receive(again, timeout=timeout)), list(messages) + again


def write_nodes(path: Path, nodes: dict) -> None:
    """Who took part: node id, partition, examples, rank, device (GPU name or cpu), device memory, profile."""
    import dataclasses
    import json

    from fedlora.report import atomic_write

    atomic_write(Path(path), json.dumps([dataclasses.asdict(n) for n in nodes.values()], indent=2))


def prepare_eval_model(bundle: models.Bundle, strategy) -> None:
    """Put the global model into ``bundle.model``: base + merged updates, then the global adapter."""
    merged = strategy.base_delta()
    with torch.no_grad():
        for name, layer in adapters.lora_layers(bundle.model).items():
            w = bundle.base_weights[name]
            layer.base_layer.weight.copy_(w + merged[name].to(w) if name in merged else w)
    state = strategy.eval_adapter()
    adapters.resize_peft(bundle.model, state.ranks(), alpha=float(strategy.cfg.model.lora.alpha))
    adapters.load_into_peft(bundle.model, state)


def evaluate_global(bundle, strategy, test, collator, cfg, validation=None) -> dict:
    """The global model on the test split (``eval_*``: reported only) and, given one, the validation split
    (``val_*``: tuning, early stop, "best"), both capped at ``eval.max_examples``
    (:func:`fedlora.train.evaluate_splits`); ``eval_s``: the seconds of both."""
    t0 = time.time()
    prepare_eval_model(bundle, strategy)
    res = train.evaluate_splits(bundle.model, test, validation, collator, task=bundle.task,
                                batch_size=int(cfg.eval.batch_size), max_examples=cfg.eval.max_examples)
    res["eval_s"] = time.time() - t0
    return res


def write_audit(recorder: Recorder, rnd: int, strategy, result: RoundResult) -> None:
    """Every accepted client update and the round's effective ΔW, so anyone can recompute the round."""
    d = recorder.audit_dir(rnd)
    for node, state, n in result.client_states:
        adapters.save_file(state, d / f"client_{node.partition_id:03d}.safetensors",
                           metadata={"num_examples": str(int(n)), "rank": str(node.rank), "round": str(rnd)})
    if result.delta:
        from safetensors.torch import save_file

        save_file({k: f.delta().float().contiguous() for k, f in result.delta.items()}, str(d / "delta.safetensors"),
                  metadata={"strategy": strategy.name, "round": str(rnd)})
    if result.codec:  # a lossy comm.*: ||decoded - sent|| / ||sent|| per payload tensor (down) and per client (up)
        import json

        (d / "codec.json").write_text(json.dumps({"up_codec": strategy.codec_up.name,
                                                 "down_codec": strategy.codec_down.name, **result.codec}, indent=1))


def save_adapter(bundle, strategy, path: Path) -> None:
    """The final global model as a plain PEFT adapter on the pristine base (merged updates folded in)."""
    with torch.no_grad():
        for name, layer in adapters.lora_layers(bundle.model).items():
            layer.base_layer.weight.copy_(bundle.base_weights[name])
    adapters.save_peft(bundle.model, strategy.export_adapter(), path)


def config_warnings(cfg) -> list[str]:
    """fedlora's warnings about the run's config (e.g. that a reported epsilon is only an upper bound), in the
    run's log (Flower's, ``flwr log`` in deployment) and its summary, whatever the process's warning filters."""
    import warnings

    from fedlora import preflight, privacy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        privacy.validate_config(cfg)
    notes = [str(w.message) for w in caught] + [n for n in (preflight.compile_note(cfg),) if n]
    for note in notes:
        log(WARNING, "%s", note)
    return notes


def run_server(grid: Grid, cfg, run_dir: Path, echo=print, resume: bool = False) -> dict:
    """The whole run: handshake, rounds, evaluation, checkpoints, the final adapter and summary. The run
    directory is claimed first (:func:`fedlora.rundir.claim_run_dir`; a new run's must hold no run,
    :func:`fedlora.rundir.check_fresh`), whichever entry point started the run, and released at the end.
    ``summary["status"]`` says how the run ended (:data:`fedlora.rundir.STATUSES`)."""
    rundir.min_aggregated_share(cfg)  # a bad value is refused before anything starts
    if resume:
        rundir.claim_run_dir(run_dir)
    else:
        rundir.check_fresh(run_dir)
    try:
        return _run(grid, cfg, Path(run_dir), echo, resume)
    finally:
        rundir.release_run_dir(run_dir)


def _run(grid: Grid, cfg, run_dir: Path, echo=print, resume: bool = False) -> dict:
    seed_everything(int(cfg.seed))
    notes = config_warnings(cfg)
    # resume: an unusable checkpoint is refused before anything starts, and the saved config.yaml is rewritten
    # only once the checkpoint's state has accepted this config (e.g. client-level DP's spent budget)
    ck = checkpoint.load(run_dir, warn=echo) if resume else None
    recorder = None if resume else Recorder(run_dir, config.to_yaml(cfg), int(cfg.num_rounds), echo=echo)
    bundle = models.build(cfg)
    _, validation, test = data.split(cfg)  # validation: server-only, never dealt to a client
    collator = batching.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))
    initial = adapters.from_peft(bundle.model)
    shapes = {n: (l.out_features, l.in_features) for n, l in adapters.lora_layers(bundle.model).items()}
    strategy = get_strategy(cfg.strategy.name)(cfg, initial, shapes)
    if (note := strategy.diagnostics_note(clients_per_round(cfg))) is not None:  # a costly diagnostic, said once
        log(WARNING, "%s", note)
        notes.append(note)
    # the handshake includes each client's first data and model load: give it more than a round
    strategy.nodes = discover(grid, strategy, cfg, timeout=max(600.0, float(cfg.round_timeout)))
    strategy.prepare_run(grid, run_dir, echo=echo, resume=resume)  # FedPipe: warm-up, module selection, plan
    strategy.privacy.start(strategy)
    stop = None  # why the run stopped before its last round (the privacy budget)
    t0, start = time.time(), 1
    if ck is not None:
        strategy.load_state_dict(ck["strategy"])
        recorder = Recorder(run_dir, config.to_yaml(cfg), int(cfg.num_rounds), echo=echo)
        random.setstate(ck["rng"]["python"])
        np.random.set_state(ck["rng"]["numpy"])
        torch.set_rng_state(ck["rng"]["torch"])
        recorder.restore(ck["rows"])
        start, t0 = ck["round"] + 1, time.time() - ck["rows"][-1].get("wall_s", 0.0)
        echo(f"resumed {run_dir} after round {ck['round']}")
    else:
        recorder.log_round({"round": 0, "strategy": strategy.name, "num_clients": 0, "bytes_up": 0, "bytes_down": 0,
                            "wall_s": 0.0, "unix": time.time(),
                            **evaluate_global(bundle, strategy, test, collator, cfg, validation)})
    write_nodes(run_dir / "nodes.json", strategy.nodes)
    for rnd in range(start, int(cfg.num_rounds) + 1):
        t_round = time.time()
        stop = strategy.privacy.stop_reason(strategy)
        if stop is None:
            try:
                plan = strategy.configure_round(rnd, grid)
            except PrivacyBudgetExhausted as e:
                stop = f"the next release would exceed privacy.target_epsilon ({e})"
        if stop:
            log(INFO, "stopping before round %d: %s", rnd, stop)
            echo(f"stopping before round {rnd}: {stop}")
            break
        replies, sent = exchange(grid, strategy, plan.messages, float(cfg.round_timeout))
        result = strategy.aggregate_round(rnd, replies, sent)  # every sampled node accounted for once
        if cfg.audit:
            write_audit(recorder, rnd, strategy, result)
        round_metrics = dict(result.metrics)
        metrics = {"round": rnd, "strategy": strategy.name, "num_clients": round_metrics.pop("num_clients"),
                   "train_loss": round_metrics.pop("train_loss", None),
                   **evaluate_global(bundle, strategy, test, collator, cfg, validation),
                   "bytes_up": result.bytes_up, "bytes_down": plan.bytes_down,
                   "round_s": time.time() - t_round, "wall_s": time.time() - t0,
                   "sampled": plan.sampled, "rejected": result.rejected, "skipped": result.skipped,
                   **round_metrics, **strategy.privacy.round_metrics(strategy)}
        recorder.log_round(metrics)
        checkpoint.save(run_dir, {"round": rnd, "strategy": strategy.state_dict(), "rows": recorder.rows,
                                  "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                          "torch": torch.get_rng_state()}})
    save_adapter(bundle, strategy, run_dir / "adapter")
    ended = rundir.run_status(recorder.rows, rundir.min_aggregated_share(cfg), stop)  # status, and why
    if ended["status_reason"]:
        log(WARNING, "run %s: %s", ended["status"], ended["status_reason"])
    summary = recorder.summary({"strategy": strategy.name, "model": cfg.model.name, "num_clients": cfg.num_clients,
                                "num_rounds": cfg.num_rounds, "seed": cfg.seed,
                                "adapter": str(run_dir / "adapter"), **ended, "stop_reason": stop,
                                "warnings": notes,
                                **strategy.privacy.summary(strategy),
                                **strategy.export_summary()})
    return summary


def make_app(cfg, run_dir: Path, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a config that was already checked (:func:`fedlora.preflight.prepare`) and its run
    directory: what ``fedlora run`` and ``fedlora compare`` hand to the simulation. Data flows in through the
    arguments, never through the environment."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, Path(run_dir).resolve(), resume=resume)

    return bound


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run .``: the config comes from the run config (``hydra-overrides``, ``run-dir``, ``resume``) and
    goes through the same pre-flight as ``fedlora run``."""
    from fedlora import preflight

    rc = context.run_config
    overrides = config.split_overrides(str(rc.get("hydra-overrides", "")))
    if rc.get("resume"):
        overrides.append(f"resume={rc['resume']}")
    cfg, run_dir, resume = preflight.prepare(overrides, run_dir=str(rc.get("run-dir", "") or "") or None)
    summary = run_server(grid, cfg, run_dir, resume=resume)
    if summary["status"] in rundir.FAILED_STATUSES:  # Flower records the run as failed (`flwr ls`); the results stay
        raise RuntimeError(f"run {summary['status']}: {summary['status_reason']}; results in {run_dir}")
