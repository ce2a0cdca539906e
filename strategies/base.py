"""The Flower glue shared by every fedlora strategy: a small subclass of Flower's ``FedAvg`` whose steps
(sampling, per-node payloads, reply checking, aggregation) are overridable one at a time. The maths of
each method lives in :mod:`fedlora.algebra`; a strategy file only says what to send and what to call.

What travels (one Message per node, since payloads differ per node):
- down: ``arrays`` (ArrayRecord: the factors this client starts from: ``<module>.lora_A``/``lora_B``/
  ``extra.<param>``, plus anything strategy-specific such as FLoRA merges) and ``config`` (ConfigRecord:
  the resolved run config as YAML, and the client's instructions ``fl.*``: rank, alpha, A seed, what to
  freeze and what to send back).
- up: ``arrays`` (the trained factors, only the parts the strategy asks for) and ``metrics``
  (``num-examples``, ``train_loss``, ``partition-id``, ...); a client that did not train (e.g. its privacy
  budget is spent) adds a ConfigRecord ``status`` = {"status": "<word>", "reason": "<sentence>"}.
- DP-SGD (``privacy=dp_sgd``) only: down, ``config["dp.accountant"]`` = the server's copy of this client's
  accountant (once it has one); up, a ConfigRecord ``dp-sgd`` = {"accountant": "<JSON>"} in every trained or
  budget-exhausted reply. The server keeps the latest copy per partition (``accountants``, checkpointed), see
  :mod:`fedlora.privacy`.
A client whose arrays is missing a factor starts it fresh: A from ``fl.a_seed`` (see
:func:`fedlora.adapters.seeded_A`), B zero.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedlora import privacy
from fedlora.adapters import LORA_A, LORA_B, AdapterState, LoraFactors, from_arrays, to_arrays
from fedlora.config import ConfigError, client_ranks, to_yaml
from fedlora.validate import check_update, norm_outliers, update_norm


@dataclass
class NodeInfo:
    """What the server knows about a connected client (from the handshake)."""

    node_id: int
    partition_id: int
    num_examples: int
    rank: int
    alpha: float
    device: str = "cpu"
    base_version: int = 0  # FLoRA merges the node already holds (reported in the handshake)
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def error_summary(reason: str, limit: int = 300) -> str:
    """The line of a client's error report that says what went wrong (Ray wraps it in a long traceback)."""
    import re

    lines = [l.strip() for l in re.sub(r"\x1b\[[0-9;]*m", "", str(reason)).splitlines() if l.strip()]
    named = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", l)]
    return (named[-1] if named else lines[-1] if lines else "unknown error")[:limit]


def record_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of an ArrayRecord (what crosses the wire for the tensors)."""
    return int(sum(len(a.data) for a in record.values()))


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class LoraStrategy(FedAvg):
    """Base class: FedIT-style plumbing. Subclasses override the hooks marked *hook*."""

    name = "base"
    #: which parts of the adapter clients send back
    client_sends: tuple[str, ...] = (LORA_A, LORA_B, "extra")
    #: whether clients may hold different ranks
    supports_mixed_ranks = False
    #: attributes that make up the strategy's state between rounds (checkpointed); the privacy books
    #: (``epsilon``, ``exhausted``, ``accountants``) are empty unless ``privacy=dp_sgd``
    persistent: tuple[str, ...] = ("state", "rng", "epsilon", "exhausted", "accountants")

    def __init__(self, cfg, initial: AdapterState, shapes: dict[str, tuple[int, int]]):
        import logging

        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.ERROR)  # FedAvg warns that client-side evaluation is off: it is, by design
        try:
            super().__init__(
                fraction_train=float(cfg.fraction_train), fraction_evaluate=0.0,
                min_train_nodes=int(cfg.min_train_nodes), min_available_nodes=int(cfg.num_clients),
            )
        finally:
            flwr_log.setLevel(level)
        self.cfg, self.cfg_yaml = cfg, to_yaml(cfg)
        self.state = initial  # the global adapter clients start from
        self.shapes = shapes  # module -> (out, in)
        self.nodes: dict[int, NodeInfo] = {}
        self.rng = random.Random(int(cfg.seed))
        self.norm_factor = float(cfg.get("update_norm_factor", 0) or 0)
        self.last: dict = {}  # stats of the last round (bytes, rejected, train loss), read by the server loop
        self.last_delta: dict[str, torch.Tensor] | None = None
        self.epsilon: dict[int, float] = {}  # partition -> epsilon so far, as DP-SGD clients report it
        self.exhausted: set[int] = set()  # partitions whose privacy budget is spent (no longer sampled)
        self.accountants: dict[int, str] = {}  # partition -> latest DP-SGD accountant (JSON) the client sent
        self.dp_sgd = privacy.mode_of(cfg) == "dp_sgd"
        self.check_config(cfg)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse settings this method does not support, in one sentence (before anything starts)."""
        ranks = client_ranks(cfg)
        if not cls.supports_mixed_ranks and len(set(ranks)) > 1:
            raise ConfigError(
                f"strategy {cls.name} needs one rank for every client but client_ranks gives {sorted(set(ranks))}: "
                f"use flora, flexlora or hetlora for mixed ranks."
            )

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.persistent}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)

    # ------------------------------------------------------------------ hooks
    def payload(self, node: NodeInfo, server_round: int) -> tuple[dict[str, np.ndarray], dict]:
        """*hook* What node starts from: (arrays, extra ``fl.*`` config). Default: the global adapter."""
        return to_arrays(self.state), {}

    def expected(self, node: NodeInfo) -> dict[str, tuple[int, ...]]:
        """*hook* Keys and shapes node must send back."""
        out = {}
        for name, (m, n) in self.shapes.items():
            if LORA_A in self.client_sends:
                out[f"{name}.{LORA_A}"] = (node.rank, n)
            if LORA_B in self.client_sends:
                out[f"{name}.{LORA_B}"] = (m, node.rank)
        if "extra" in self.client_sends:
            out.update({f"extra.{k}": tuple(v.shape) for k, v in self.state.extra.items()})
        return out

    def to_state(self, node: NodeInfo, arrays: dict[str, np.ndarray]) -> AdapterState:
        """*hook* A client's reply as an AdapterState."""
        return from_arrays(arrays, node.scale)

    def aggregate(self, server_round: int, states: list[AdapterState], weights: list[float],
                  nodes: list[NodeInfo]) -> None:
        """*hook* Update ``self.state`` (and ``self.last_delta``, the round's effective ΔW per module)."""
        raise NotImplementedError

    def on_status(self, node: NodeInfo, status: str, metrics: dict) -> None:
        """*hook* A client answered without training (``status`` ConfigRecord); default: nothing to do."""

    def eval_adapter(self) -> AdapterState:
        """*hook* The adapter the server evaluates and saves (default: the global one)."""
        return self.state

    def export_adapter(self) -> AdapterState:
        """*hook* The final model as one adapter on the pristine base (default: :meth:`eval_adapter`)."""
        return self.eval_adapter()

    def round_metrics(self) -> dict:
        """*hook* Strategy-specific numbers for this round's metrics line (e.g. FLoRA's base sync error)."""
        return {}

    def base_delta(self) -> dict[str, torch.Tensor]:
        """*hook* Updates merged into the base weights so far (FLoRA); empty when nothing is merged."""
        return {}

    # ------------------------------------------------------------------ Flower steps
    def sample(self, grid) -> list[int]:
        """Seeded sampling over clients ordered by partition id, so runs are reproducible."""
        ids = sorted((n for n in self.nodes if self.nodes[n].partition_id not in self.exhausted),
                     key=lambda n: self.nodes[n].partition_id)
        k = max(int(len(ids) * float(self.cfg.fraction_train)), self.min_train_nodes)
        return sorted(self.rng.sample(ids, min(k, len(ids))), key=lambda n: self.nodes[n].partition_id)

    def node_config(self, node: NodeInfo, server_round: int, extra: dict) -> ConfigRecord:
        conf = {
            "server-round": server_round,
            "fedlora-config": self.cfg_yaml,
            "fl.strategy": self.name,
            "fl.rank": node.rank,
            "fl.alpha": float(node.alpha),
            "fl.a_seed": int(self.cfg.seed) * 100_003 + server_round * 1009 + node.partition_id,
            "fl.freeze_a": False,
            "fl.send": ",".join(self.client_sends),
        }
        if self.dp_sgd and node.partition_id in self.accountants:  # the client restores it if it lost its own
            conf[privacy.ACCOUNTANT_CONFIG_KEY] = self.accountants[node.partition_id]
        conf.update(extra)
        return ConfigRecord(conf)

    def configure_train(self, server_round, arrays, config, grid):
        self.last = {"bytes_down": 0, "bytes_up": 0, "rejected": [], "sampled": []}
        messages = []
        for nid in self.sample(grid):
            node = self.nodes[nid]
            arrs, extra = self.payload(node, server_round)
            record = to_record(arrs)
            self.last["bytes_down"] += record_bytes(record)
            self.last["sampled"].append(node.partition_id)
            content = RecordDict({"arrays": record, "config": self.node_config(node, server_round, extra)})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid))
        return messages

    def check_replies(self, replies) -> list[tuple[NodeInfo, dict, dict]]:
        """Valid replies as (node, arrays, metrics); every rejection is recorded with its reason."""
        accepted, norms = [], {}
        for msg in replies:
            nid = msg.metadata.src_node_id
            node = self.nodes.get(nid)
            who = node.partition_id if node else nid
            if msg.has_error():
                self.last["rejected"].append({"node": who, "reason": f"client error: {error_summary(msg.error.reason)}"})
                continue
            try:
                arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
                metrics = dict(msg.content["metrics"])
            except Exception as e:  # malformed record
                self.last["rejected"].append({"node": who, "reason": f"malformed reply: {e}"[:300]})
                continue
            self.last["bytes_up"] += record_bytes(msg.content["arrays"])
            if node is None:
                self.last["rejected"].append({"node": who, "reason": "reply from an unknown node"})
                continue
            reason, accountant = self.check_accountant(node, msg, metrics)
            if reason:
                self.last["rejected"].append({"node": who, "reason": reason})
                continue
            self.note_privacy(node, msg, metrics, accountant)
            if "status" in msg.content and msg.content["status"].get("status", "ok") != "ok":
                st = msg.content["status"]
                self.on_status(node, str(st.get("status")), metrics)
                self.last["rejected"].append({"node": who, "reason": f"client status: {st.get('status')} {st.get('reason', '')}".strip()})
                continue
            reason = check_update(arrays, self.expected(node), metrics.get("num-examples"), node.num_examples)
            if reason:
                self.last["rejected"].append({"node": who, "reason": reason})
                continue
            norms[nid] = update_norm(arrays)
            accepted.append((node, arrays, metrics))
        accepted.sort(key=lambda a: a[0].partition_id)  # aggregation order independent of arrival order
        outliers = norm_outliers(norms, self.norm_factor)
        for node, _, _ in accepted:
            if node.node_id in outliers:
                self.last["rejected"].append({"node": node.partition_id, "reason": outliers[node.node_id]})
        return [a for a in accepted if a[0].node_id not in outliers]

    def check_accountant(self, node: NodeInfo, msg: Message, metrics: dict) -> tuple[str | None, str | None]:
        """DP-SGD: ``(reason, accountant)``: why the reply's accountant record makes the reply invalid (None when
        it does not), and the accountant as JSON (None when there is none). A trained or
        budget-exhausted reply must carry ConfigRecord ``dp-sgd`` = {"accountant": JSON} that
        :func:`fedlora.privacy.check_reported` accepts (parses, the run's mechanism, the reported epsilon, not
        less than the server's copy). Other statuses (e.g. FLoRA's out-of-sync) may omit it."""
        if not self.dp_sgd:
            return None, None
        content = msg.content
        status = str(content["status"].get("status", "ok")) if "status" in content else "ok"
        rec = content[privacy.ACCOUNTANT_RECORD] if privacy.ACCOUNTANT_RECORD in content else None
        if rec is None:
            if status in ("ok", "budget-exhausted"):
                return (f"invalid DP-SGD reply: no '{privacy.ACCOUNTANT_RECORD}' ConfigRecord with the client's "
                        "accountant"), None
            return None, None
        try:
            if not isinstance(rec, ConfigRecord):
                raise ValueError(f"'{privacy.ACCOUNTANT_RECORD}' must be a ConfigRecord, got a {type(rec).__name__}.")
            if set(rec.keys()) != {"accountant"}:
                raise ValueError(f"the record must hold exactly the key 'accountant', got {sorted(rec.keys())}.")
            dp = privacy.dp_config(self.cfg)
            state = privacy.check_reported(rec["accountant"], dp.accountant, dp.target_delta, metrics.get("epsilon"),
                                           stored=self.accountants.get(node.partition_id))
        except (ValueError, TypeError) as e:
            return f"invalid DP-SGD accountant record: {str(e).rstrip('.')}"[:300], None
        return None, state.to_json()

    def note_privacy(self, node: NodeInfo, msg: Message, metrics: dict, accountant: str | None = None) -> None:
        """The epsilon a DP-SGD client reports (kept while it sits rounds out), its accountant (the server's copy,
        checkpointed and sent back down) and whether its budget is spent."""
        if isinstance(metrics.get("epsilon"), (int, float)):
            self.epsilon[node.partition_id] = float(metrics["epsilon"])
        if accountant is not None:
            self.accountants[node.partition_id] = accountant
        if "status" in msg.content and msg.content["status"].get("status") == "budget-exhausted":
            self.exhausted.add(node.partition_id)

    def aggregate_train(self, server_round, replies):
        accepted = self.check_replies(list(replies))
        self.last["num_clients"] = len(accepted)
        self.last_delta = None
        if accepted:
            w = np.array([float(m["num-examples"]) for _, _, m in accepted])
            self.last["train_loss"] = float(np.average([m["train_loss"] for _, _, m in accepted], weights=w))
            self.last["client_metrics"] = [
                {"node": n.partition_id, **{k: v for k, v in m.items() if isinstance(v, (int, float))}}
                for n, _, m in accepted
            ]
        if len(accepted) < self.min_train_nodes:
            self.last["skipped"] = f"only {len(accepted)} valid updates (< min_train_nodes={self.min_train_nodes})"
            from flwr.common.logger import log

            log(WARNING, "round %d skipped: %s", server_round, self.last["skipped"])
            return None, None
        nodes = [n for n, _, _ in accepted]
        states = [self.to_state(n, a) for n, a, _ in accepted]
        weights = [float(m["num-examples"]) for _, _, m in accepted]
        self.last["client_states"] = list(zip(nodes, states, weights))
        self.last["accepted"] = accepted
        self.aggregate(server_round, states, weights, nodes)
        return to_record(to_arrays(self.state)), MetricRecord({"train_loss": self.last["train_loss"]})
