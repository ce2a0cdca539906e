"""The client side of sample-level DP-SGD (``privacy=dp_sgd``): one accountant per node for the whole run, kept
in ``context.state`` and restored from the server's copy after a restart, noise planned once, the budget
checked before each round. The maths is :mod:`fedlora.privacy`; the local loop :func:`fedlora.train.local_train_dp`.
"""

from __future__ import annotations

import functools
import math

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora import privacy, train

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
                 conf=None, seed=None, control=None):
    """One round of sample-level DP-SGD on this node: ``(result of train.local_train_dp, metrics)``, or
    ``(None, metrics)`` when ``steps`` more steps would take the node past ``privacy.target_epsilon``.

    One accountant per node for the whole run, restored from ``context.state`` or the server's copy in the
    train config ``conf`` (:func:`restore_accountant`) and saved to ``context.state``. The noise is
    planned once for ``privacy.planned_rounds`` (default ``num_rounds``) x ``steps`` at this node's sampling
    rate, the worst case of a node sampled every round: with ``fraction_train < 1`` a node trains fewer rounds
    and ends below the target. ``seed``: the round's noise and sampling seed, which only the node decides
    (:meth:`fedlora.clients.node.NodeSettings.dp_seed`); None draws them from the operating system.
    ``control``: SCAFFOLD's corrections (:func:`fedlora.train.local_train_dp`), None: off.
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
        device=bundle.device, rng_seed=seed,
        optimizer=str(cfg.privacy.get("optimizer", "adamw")),
        micro_batch_size=cfg.train.get("micro_batch_size"), prox_mu=float(cfg.train.get("prox_mu", 0.0)),
        control=control,
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
    reply = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": num_examples,
                                                                        "partition-id": pid,
                                                                        "steps": 0, **dp_metrics}),
                        "status": ConfigRecord({"status": "budget-exhausted", "reason": reason}),
                        DP_STATE: accountant})
    return Message(reply, reply_to=msg)
