"""SCAFFOLD on a node (``train.scaffold``; the maths is :mod:`fedlora.scaffold`): Flower glue only.

A train message that carries the server's control variate c (ArrayRecord ``scaffold``) makes the node correct its
local steps with c − c_i (:func:`start`) and reply with its control update Δc_i (:func:`finish`, the reply's record
``scaffold``). The node's own c_i lives in ``context.state`` (float32): it starts at 0 and is lost when the node
restarts, which puts the node back at the paper's initial state c_i = 0 (the server's c is unchanged: the next
Δc_i then measures from 0). A message without the record trains exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message

from fedlora import scaffold

RECORD = scaffold.RECORD  # the record of c in a train message and of Δc_i in its reply


@dataclass
class Started:
    """One round's SCAFFOLD on a node: c, the node's c_i as held, the trained parameters and their start x."""

    c: dict[str, torch.Tensor]
    held: dict[str, torch.Tensor]
    x: dict[str, torch.Tensor]
    params: dict[str, torch.nn.Parameter]
    control: list  # [(parameter, c − c_i)] for the training loop (empty: no correction)


def held_controls(context: Context) -> dict[str, torch.Tensor]:
    """This node's c_i (every key it has held, e.g. both RoLoRA factors), float32; {} before its first round."""
    if scaffold.NODE_STATE not in context.state:
        return {}
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in context.state[scaffold.NODE_STATE].items()}


def start(msg: Message, context: Context, model) -> Started | None:
    """After the model is set to the round's start: None when the message carries no c (SCAFFOLD off), else c,
    c_i (a held entry of another shape counts as 0), x and the corrections :func:`fedlora.train.local_train` takes."""
    if scaffold.RECORD not in msg.content:
        return None
    c = {k: torch.from_numpy(a.numpy().copy()) for k, a in msg.content[scaffold.RECORD].items()}
    held = held_controls(context)
    c_i = {k: held[k] for k in c if k in held and tuple(held[k].shape) == tuple(c[k].shape)}
    params = scaffold.params_of(model, c)
    x = {k: p.detach().float().cpu().clone() for k, p in params.items()}
    return Started(c, c_i, x, params, scaffold.corrections(params, c, c_i))


def finish(st: Started, context: Context, steps: int, lr_sum: float) -> ArrayRecord:
    """After training: keep c_i⁺ (:func:`fedlora.scaffold.client_control`, K·η = ``lr_sum``) in ``context.state``,
    beside the held entries this round did not touch, and return Δc_i as the reply's ``scaffold`` record."""
    y = {k: p.detach().float().cpu().clone() for k, p in st.params.items()}
    new, delta = scaffold.client_control(st.c, st.held, st.x, y, steps, lr_sum / steps)
    keep = {**held_controls(context), **new}
    context.state[scaffold.NODE_STATE] = _record(keep)
    return _record(delta)


def _record(arrays: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v.float().numpy())) for k, v in arrays.items()})


def lr_sum_of(cfg, rnd: int, steps: int) -> float:
    """K·η of this round on this node: the client's lr schedule (as :func:`fedlora.clients.client_app._train` and
    :func:`fedlora.clients.dp_sgd.dp_sgd_round` set it) summed over its ``steps`` steps."""
    lr = float(cfg.train.lr) * float(cfg.strategy.get("lr_multiplier", 1.0))
    return scaffold.lr_sum((rnd - 1) * steps, steps, int(cfg.num_rounds) * steps, lr, cfg.train.scheduler,
                           int(cfg.train.warmup_steps))
