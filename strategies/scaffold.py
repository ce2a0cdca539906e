"""SCAFFOLD on the server (``train.scaffold``; the maths is :mod:`fedlora.scaffold`): the global control variate c,
a checkpointed component of the strategy (:attr:`fedlora.strategies.base.LoraStrategy.components`).

- :meth:`ServerControl.attach` puts c (the tensors the strategy averages this round: ``client_sends`` of its state;
  a key not yet set is 0) into every train message as the ArrayRecord ``scaffold``, and counts it in the round's
  ``bytes_down``;
- :meth:`ServerControl.check` takes each accepted reply's Δc_i (its ``scaffold`` record: the same keys and shapes,
  float32, finite, or the reply is rejected with the reason), counts it in ``bytes_up`` and updates
  c ← c + (1/N)·Σ Δc_i over the accepted replies (N = ``num_clients``), whether or not the round is then released:
  every accepted client has already kept its c_i⁺, and the paper's invariant c = mean_i c_i needs each Δc_i once.

Only strategies whose aggregate is an average of what every client started from declare ``supports_scaffold``
(fedit, ffa_lora, rolora: the set ``server.optimizer`` supports); :func:`check_config` refuses the others, and
client-level DP (Δc_i is an un-noised function of the client's data), in one sentence before anything starts.
RoLoRA: c holds entries for A, B and the head; a round sends and updates those of its trained factor (and the head),
the other factor's entries wait for its next turn, on the server as on the nodes.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedlora import privacy, scaffold, server_opt
from fedlora.config import ConfigError
from fedlora.validate import check_update


def check_config(cls, cfg) -> None:
    """Refuse ``train.scaffold=true`` for a strategy that does not declare ``supports_scaffold`` (its reason is
    ``server_optimizer_refusal``: the same condition) and under client-level DP, one sentence each."""
    if not scaffold.enabled(cfg):
        return
    if not getattr(cls, "supports_scaffold", False):
        from . import STRATEGIES

        able = [n for n, s in STRATEGIES.items() if getattr(s, "supports_scaffold", False)]
        raise ConfigError(f"train.scaffold=true is not defined for strategy {cls.name}: {cls.server_optimizer_refusal}"
                          f"; use train.scaffold=false or strategy {', '.join(able[:-1])} or {able[-1]}.")
    if privacy.mode_of(cfg) == "client_dp":
        raise ConfigError("train.scaffold=true cannot run under privacy=client_level: each client's control update "
                          "Δc_i is an un-noised function of its data that the server would see, so use "
                          "train.scaffold=false or privacy=dp_sgd.")


def _record(arrays: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().float().cpu().numpy())) for k, v in arrays.items()})


def _nbytes(record: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in record.values()))


class ServerControl:
    """The global control variate c (float32 per key, 0 until first set) and its update; inactive (every method the
    identity) unless ``train.scaffold`` is true."""

    def __init__(self, cfg):
        self.active = scaffold.enabled(cfg)
        self.n_total = int(cfg.num_clients)
        self.c: dict[str, torch.Tensor] = {}

    def current(self, strategy) -> dict[str, torch.Tensor]:
        """c over the tensors the strategy averages this round (``client_sends`` of its state), 0 where unset."""
        ref = server_opt.keys_of(strategy.state, strategy.client_sends)
        return {k: self.c.get(k, torch.zeros(tuple(v.shape), dtype=torch.float32)) for k, v in ref.items()}

    def attach(self, strategy, plan):
        """The round's plan with c in every message (record ``scaffold``) and in ``bytes_down``."""
        if not self.active:
            return plan
        c = self.current(strategy)
        for m in plan.messages:
            record = _record(c)
            m.content[scaffold.RECORD] = record
            plan.bytes_down += _nbytes(record)
        return plan

    def check(self, strategy, checked, replies):
        """``checked`` with the accepted replies whose Δc_i is malformed moved to ``rejected``, the Δc_i records'
        bytes added to ``bytes_up``, and c updated with the accepted Δc_i (:func:`fedlora.scaffold.server_control`)."""
        if not self.active:
            return checked
        by_node = {m.metadata.src_node_id: m for m in replies if not m.has_error()}
        for m in by_node.values():
            if scaffold.RECORD in m.content:
                checked.bytes_up += _nbytes(m.content[scaffold.RECORD])
        shapes = {k: tuple(v.shape) for k, v in self.current(strategy).items()}
        arrays_of = {}

        def reason_of(u):
            msg = by_node.get(u.node.node_id)
            if msg is None or scaffold.RECORD not in msg.content:
                return "the reply carries no SCAFFOLD control update (record 'scaffold') although train.scaffold=true"
            arrays_of[u.node.node_id] = {k: a.numpy() for k, a in msg.content[scaffold.RECORD].items()}
            reason = check_update(arrays_of[u.node.node_id], shapes, u.metrics.get("num-examples"), None)
            return f"SCAFFOLD control update: {reason}" if reason else None

        checked.reject_where(reason_of)
        deltas = [{k: torch.from_numpy(v.copy()) for k, v in arrays_of[u.node.node_id].items()}
                  for u in checked.accepted]
        self.c = scaffold.server_control(self.c, deltas, self.n_total)
        return checked

    def state_dict(self) -> dict:
        return {"active": self.active, "n_total": self.n_total, "c": dict(self.c)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue a checkpointed run's c; a checkpoint written with the other ``train.scaffold`` is refused."""
        was = bool(sd.get("active", False))
        if was != self.active:
            raise ConfigError(f"the checkpoint was written with train.scaffold={str(was).lower()} but this run has "
                              f"train.scaffold={str(self.active).lower()}: resume with the run's own setting or start "
                              "a new run.")
        self.c = {k: v.float() for k, v in sd.get("c", {}).items()}
