"""The Flower glue shared by every fedlora strategy: a small subclass of Flower's ``FedAvg`` whose round is split
into overridable steps (sample, payload, check replies, aggregate), each declared here with a default. The
maths of each method lives in :mod:`fedlora.algebra`; a strategy file only says what to send and what to call.
A round's outcome is returned as a :class:`RoundResult`, never left on attributes for the caller to read.
Privacy is a component the strategy holds (:mod:`fedlora.strategies.privacy`). What travels is described in
``docs/messages.md``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedlora import algebra, codecs, compiled, diagnostics, payloads, server_opt
from fedlora.adapters import LORA_A, LORA_B, AdapterState, from_arrays, to_arrays
from fedlora.config import ConfigError, client_ranks, config_digest, for_clients, to_yaml
from fedlora.messages import DIGEST_KEY
from fedlora.validate import check_metrics, check_train_metrics, check_update, norm_outliers

from . import privacy as privacy_modes, scaffold
from .replies import Checked, Update, attribute, error_summary, rejection


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


@dataclass
class RoundPlan:
    """What :meth:`LoraStrategy.configure_round` sends: one message per sampled node."""

    messages: list[Message]
    sampled: list[int]  # partition ids, in partition order
    bytes_down: int


@dataclass
class RoundResult:
    """What one round's aggregation produced."""

    arrays: ArrayRecord | None  # the new global arrays; None when the round was skipped
    metrics: dict  # train_loss, num_clients and the strategy's and privacy's numbers for the metrics line
    rejected: list[dict]
    bytes_up: int
    client_states: list[tuple[NodeInfo, AdapterState, float]] = field(default_factory=list)
    delta: dict | None = None  # the round's effective update per module (LoraFactors), for the audit
    skipped: str | None = None
    codec: dict = field(default_factory=dict)  # lossy comm.*: relative errors, {"down": {key}, "up": {partition}}


def record_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of an ArrayRecord (what crosses the wire for the tensors)."""
    return int(sum(len(a.data) for a in record.values()))


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def train_metrics(accepted: list[Update]) -> dict:
    """``num_clients`` and the example-weighted mean ``train_loss`` of the accepted updates (over those that
    measured one: a DP-SGD client whose every Poisson draw was empty reports NaN; NaN when none did)."""
    out = {"num_clients": len(accepted)}
    if accepted:
        measured = [u for u in accepted if np.isfinite(u.metrics["train_loss"])]
        out["train_loss"] = float(np.average([u.metrics["train_loss"] for u in measured],
                                             weights=[u.weight for u in measured])) if measured else float("nan")
    return out


#: multiply-adds of a round's cross_term_error above which the run's log says so (about 2 s on 2 cores)
DIAGNOSTICS_NOTE_MACS = 1e11


class LoraStrategy(FedAvg):
    """Base class: FedIT-style plumbing. Subclasses override the hooks marked *hook*."""

    _round_arrays: dict | None = None  # :meth:`state_arrays` while :meth:`build_messages` runs

    name = "base"
    #: which parts of the adapter clients send back
    client_sends: tuple[str, ...] = (LORA_A, LORA_B, "extra")
    #: whether clients may hold different ranks
    supports_mixed_ranks = False
    #: whether clients that start a fresh LoRA in a round share one seeded A, nested by rank (see ``nested_init``)
    shares_fresh_A = False
    #: privacy modes this method supports (``client_dp`` needs an element-wise mean of same-shaped updates)
    privacy_modes: tuple[str, ...] = ("none", "dp_sgd")
    #: why client-level DP is refused for this method (one clause; see :meth:`check_config`)
    client_dp_refusal = ""
    #: attributes that make up the strategy's state between rounds (checkpointed)
    persistent: tuple[str, ...] = ("state", "rng")
    #: components with a state of their own (``state_dict``/``load_state_dict``), checkpointed under their name
    components: tuple[str, ...] = ("privacy", "server_opt", "scaffold")
    #: whether a ``server.optimizer`` other than avg is defined (the aggregate averages ``client_sends``, all started
    #: from ``state``: :meth:`aggregate_round`), else why not (one clause, :meth:`check_config`)
    supports_server_optimizer, server_optimizer_refusal = False, "its aggregate is no average of a common start"
    supports_scaffold = False  # train.scaffold (strategies/scaffold.py): the same condition, the same refusal
    #: whether :meth:`aggregate` only takes example-weighted sums of the replies (float32 accumulation:
    #: :func:`fedlora.algebra.fedit`), so a ``comm.up=fp16|bf16|int8|topk`` reply reaches it as sent (16-bit torch
    #: tensors, :mod:`fedlora.as_sent`; ``codecs.decode(wide=False)``) and is never written out at float32; every
    #: other strategy gets float32
    sums_replies = False
    #: whether :meth:`aggregate` reports ``cross_term_error`` (:meth:`cross_term`), which ``diagnostics`` governs
    reports_cross_term = True

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
        self.cfg = cfg
        self.state = initial  # the global adapter clients start from
        self.shapes = shapes  # module -> (out, in)
        self.nodes: dict[int, NodeInfo] = {}
        self.rng = random.Random(int(cfg.seed))
        self.norm_factor = float(cfg.get("update_norm_factor", 0) or 0)
        self.privacy = privacy_modes.for_config(cfg)
        self.server_opt = server_opt.ServerOptimizer(server_opt.config_of(cfg))  # server.optimizer (avg: as before)
        self.scaffold = scaffold.ServerControl(cfg)  # train.scaffold: the control variate c (off: as before)
        self.codec_up, self.codec_down = codecs.of_config(cfg, "up"), codecs.of_config(cfg, "down")  # comm.*
        self.diagnostics = bool(cfg.get("diagnostics", True))  # the round's cross_term_error (see cross_term)
        self.compiled = compiled.enabled(cfg)  # server.compile (fedit, ffa_lora)
        self.down_errors: dict[str, float] = {}  # lossy comm.down: this round's largest error per payload tensor
        # what every node needs of the run config (fedlora.config.for_clients: no server paths): sent once, in
        # the handshake, then named by its digest
        self.cfg_yaml = to_yaml(for_clients(cfg))
        self.config_digest = config_digest(self.cfg_yaml)
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
        mode = privacy_modes.mode_of(cfg)
        if mode == "client_dp" and mode not in cls.privacy_modes:
            from . import STRATEGIES

            able = [n for n, s in STRATEGIES.items() if mode in s.privacy_modes]
            raise ConfigError(f"{cls.client_dp_refusal}; client_dp works with {' or '.join(able)} only.")
        from . import STRATEGIES

        server_opt.check_supported(cfg, cls.name, cls.supports_server_optimizer, cls.server_optimizer_refusal,
                                   [n for n, s in STRATEGIES.items() if s.supports_server_optimizer])
        scaffold.check_config(cls, cfg)
        m = cfg.strategy.get("lr_multiplier", 1.0)
        if not (isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0):
            raise ConfigError(f"strategy.lr_multiplier={m} must be a number > 0 (it scales train.lr on the clients).")

    def diagnostics_note(self, clients: int) -> str | None:
        """A sentence for the run's log when the round's ``cross_term_error`` will cost much (at least
        :data:`DIAGNOSTICS_NOTE_MACS` multiply-adds with ``clients`` replies of the run's largest ranks), else None."""
        if not (self.diagnostics and self.reports_cross_term):
            return None
        ranks = sorted(client_ranks(self.cfg), reverse=True)[:clients]
        macs = diagnostics.cross_term_cost(self.shapes, ranks, max(ranks))
        if macs < DIAGNOSTICS_NOTE_MACS:
            return None
        seconds = macs / diagnostics.MACS_PER_SECOND
        return (f"diagnostics=true: each round's cross_term_error reads every pair of the {clients} clients' "
                f"factors, about {macs:.1e} multiply-adds (some {seconds:.0f} s on a 2-core server); set "
                f"diagnostics=false to skip it.")

    def cross_term(self, served: AdapterState, states, weights) -> dict:
        """``{"cross_term_error": ...}`` of the round's served adapter (:func:`fedlora.diagnostics.cross_term_error`),
        or nothing with ``diagnostics=false``: the exact error reads every pair of the clients' factors, so its cost
        grows with the square of the clients per round (a minute a round at 100 Llama-7B-shaped clients)."""
        return {"cross_term_error": diagnostics.cross_term_error(served, states, weights)} if self.diagnostics else {}

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.persistent},
                **{c: getattr(self, c).state_dict() for c in self.components}}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            if k in self.components:
                getattr(self, k).load_state_dict(v)
            else:
                setattr(self, k, v)

    # ------------------------------------------------------------------ hooks
    def start_round(self, server_round: int) -> None:
        """*hook* Set what this round trains and sends back (e.g. ``client_sends``), before any message or privacy
        step reads it (RoLoRA: the round's factor; FedSA-LoRA: the final B upload). Called by
        :meth:`configure_round` and :meth:`build_messages`, so it must be idempotent. Default: nothing."""

    def prepare_run(self, grid, run_dir, echo=print, resume: bool = False) -> None:
        """*hook* Work before the first round, once the nodes are known (FedPipe: warm-up and plan)."""

    def payload(self, node: NodeInfo, server_round: int) -> tuple[dict[str, np.ndarray], dict]:
        """*hook* What node starts from: (arrays, extra ``fl.*`` config). Default: the global adapter."""
        return self.state_arrays(), {}

    def state_arrays(self, parts: tuple[str, ...] = (LORA_A, LORA_B, "extra")) -> dict[str, np.ndarray]:
        """``to_arrays(self.state, parts)``: while :meth:`build_messages` runs (the state does not change), one dict
        for every node, which :meth:`encode_payload` finds again by identity."""
        memo = self._round_arrays  # (a dict while build_messages runs, else None)
        if memo is None:
            return to_arrays(self.state, parts)
        if parts not in memo:
            memo[parts] = to_arrays(self.state, parts)
        return memo[parts]

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
                  updates: list[Update]) -> dict | None:
        """*hook* Update ``self.state`` from the accepted updates; return the round's effective update per
        module (``{name: LoraFactors}``, for the audit) or None."""
        raise NotImplementedError

    def on_status(self, node: NodeInfo, status: str, metrics: dict) -> None:
        """*hook* A client answered without training (``status`` ConfigRecord); default: nothing to do."""

    def eval_adapter(self) -> AdapterState:
        """*hook* The adapter the server evaluates and saves (default: the global one)."""
        return self.state

    def export_adapter(self) -> AdapterState:
        """*hook* The final model as one adapter on the pristine base (default: :meth:`eval_adapter`)."""
        return self.eval_adapter()

    def export_summary(self) -> dict:
        """*hook* What ``summary.json`` records of :meth:`export_adapter` (default: nothing; FLoRA: its tolerance,
        ranks and merged modules)."""
        return {}

    def round_metrics(self, updates: list[Update]) -> dict:
        """*hook* Strategy-specific numbers for this round's metrics line (e.g. FLoRA's base sync error)."""
        return {}

    def base_delta(self) -> dict[str, torch.Tensor]:
        """*hook* Updates merged into the base weights so far (FLoRA); empty when nothing is merged."""
        return {}

    # ------------------------------------------------------------------ a round
    def sample(self) -> list[int]:
        """Seeded sampling over clients ordered by partition id, so runs are reproducible."""
        ids = sorted((n for n, info in self.nodes.items() if self.privacy.can_train(info)),
                     key=lambda n: self.nodes[n].partition_id)
        k = max(int(len(ids) * float(self.cfg.fraction_train)), self.min_train_nodes)
        return sorted(self.rng.sample(ids, min(k, len(ids))), key=lambda n: self.nodes[n].partition_id)

    # ------------------------------------------------------------------ fresh A factors
    @property
    def nested_init(self) -> bool:
        """Whether clients that start a fresh LoRA in the same round share ONE seeded A (``shares_fresh_A`` and
        ``strategy.nested_init``, default true): each takes its first r_k rows, so mixed ranks start nested."""
        return bool(self.shares_fresh_A) and bool(self.cfg.strategy.get("nested_init", True))

    def a_rank(self) -> int:
        """The rank shared fresh A factors are drawn at: the largest rank in the run (config before the
        handshake)."""
        if self.nodes:
            return max(n.rank for n in self.nodes.values())
        return max(client_ranks(self.cfg))

    def fresh_a(self, node: NodeInfo, server_round: int) -> tuple[int, int]:
        """``(fl.a_seed, fl.a_rank)`` of a client that draws a fresh A this round. Nested: one seed for the round
        and the run's largest rank; otherwise the client's own seed (partition) and rank."""
        seed = int(self.cfg.seed) * 100_003 + server_round * 1009
        if self.nested_init:
            return seed, self.a_rank()
        return seed + node.partition_id, node.rank

    def fresh_state(self, server_round: int = 1) -> AdapterState:
        """The adapter nested clients start from in ``server_round``: the shared seeded A at :meth:`a_rank`,
        B = 0, scale 1 (the global scale of the mixed-rank rules), extra as the current state's."""
        from fedlora.adapters import LoraFactors, seeded_A

        seed, R = int(self.cfg.seed) * 100_003 + server_round * 1009, self.a_rank()
        lora = {name: LoraFactors(seeded_A(seed, name, R, n), torch.zeros(m, R), 1.0)
                for name, (m, n) in self.shapes.items()}
        return AdapterState(lora, self.state.extra)

    def node_config(self, node: NodeInfo, server_round: int, extra: dict) -> ConfigRecord:
        a_seed, a_rank = self.fresh_a(node, server_round)
        conf = {
            "server-round": server_round,
            "fl.strategy": self.name,
            "fl.rank": node.rank,
            "fl.alpha": float(node.alpha),
            "fl.a_seed": a_seed,
            "fl.a_rank": a_rank,
            "fl.freeze_a": False,
            "fl.send": ",".join(self.client_sends),
            DIGEST_KEY: self.config_digest,
            **self.privacy.node_config(node),
        }
        conf.update(extra)
        return ConfigRecord(conf)

    def build_messages(self, server_round: int) -> RoundPlan:
        """One TRAIN message per sampled node, with its payload and instructions."""
        self.start_round(server_round)
        messages, sampled, down = [], [], 0
        self.down_errors, encoded, records, self._round_arrays = {}, payloads.Payloads(), {}, {}
        try:
            for nid in self.sample():
                node = self.nodes[nid]
                arrs, extra = self.payload(node, server_round)
                enc = self.encode_payload(arrs, encoded)  # (the same object for nodes that get the same payload)
                if id(enc) not in records:  # one ArrayRecord a payload: serialising 33.6 MB takes 25 ms
                    records[id(enc)] = to_record(enc)
                down += record_bytes(records[id(enc)])
                sampled.append(node.partition_id)
                config = self.node_config(node, server_round, extra)
                content = RecordDict({"arrays": records[id(enc)], "config": config})
                messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nid))
        finally:  # (state_arrays holds the state's arrays only while the messages are built)
            self._round_arrays = None
        return RoundPlan(messages, sampled, down)

    def encode_payload(self, arrs: dict[str, np.ndarray], encoded: payloads.Payloads) -> dict[str, np.ndarray]:
        """A payload as ``comm.down`` sends it, encoded and checked once a round (``encoded``: the round's
        :class:`fedlora.payloads.Payloads`, which returns the same object for every node that gets the same payload, so
        :meth:`build_messages` serialises it once). A lossy codec's relative error per tensor goes to ``down_errors``
        (the largest over this round's payloads: the metrics line and the audit)."""
        def encode():
            enc = codecs.encode(self.codec_down, arrs, compiled=self.compiled)
            sent = codecs.decode(self.codec_down, enc)
            for k, v in arrs.items():
                if codecs.applies_to(k):
                    self.down_errors[k] = max(self.down_errors.get(k, 0.0), codecs.relative_error({k: v}, sent))
            return enc
        return encoded.get(arrs, encode if self.codec_down.lossy else None)

    def configure_round(self, server_round: int, grid) -> RoundPlan:
        """The round's messages, through the privacy component (client-level DP: Flower's wrapper, which raises
        ``PrivacyBudgetExhausted`` when the next release would exceed the budget)."""
        self.start_round(server_round)  # client-level DP reads client_sends before it builds the messages
        return self.scaffold.attach(self, self.privacy.configure(self, server_round, grid))  # SCAFFOLD: c goes too

    def check_replies(self, replies) -> Checked:
        """Valid replies as updates (in partition order); every rejection is recorded with its reason."""
        accepted, rejected, bytes_up, norms = [], [], 0, {}
        for msg in replies:
            nid = msg.metadata.src_node_id  # the node the reply speaks for (:func:`attribute` ran before)
            node = self.nodes.get(nid)
            refuse = lambda reason: rejected.append(rejection(self.nodes, nid, reason))  # noqa: E731
            if msg.has_error():
                refuse(f"client error: {error_summary(msg.error.reason)}")
                continue
            try:
                arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
                metrics = dict(msg.content["metrics"])
            except Exception as e:  # malformed record
                refuse(f"malformed reply: {e}"[:300])
                continue
            try:  # comm.up: every check below sees the decoded values
                arrays = codecs.decode(self.codec_up, arrays, wide=not self.sums_replies)
            except codecs.CodecError as e:
                refuse(f"undecodable reply (comm.up={self.codec_up.name}): {e}"[:300])
                continue
            bytes_up += record_bytes(msg.content["arrays"])
            if node is None:
                refuse("reply from an unknown node")
                continue
            # a reply naming another node's partition, or with malformed numbers, is refused before anything reads it
            reason = check_metrics(metrics, node.partition_id) or self.privacy.check_reply(self, node, msg, metrics)
            if reason:
                refuse(reason)
                continue
            if "status" in msg.content and msg.content["status"].get("status", "ok") != "ok":
                st = msg.content["status"]
                self.on_status(node, str(st.get("status")), metrics)
                reason = f"client status: {st.get('status')} {st.get('reason', '')}".strip()
                refuse(reason)
                continue
            sums_sq = {}  # each tensor's sum of squares, from its NaN/Inf check: the update norm's terms
            reason = (check_train_metrics(metrics, node.partition_id)
                      or check_update(arrays, self.expected(node), metrics.get("num-examples"), node.num_examples,
                                      sums_sq))
            if reason:
                refuse(reason)
                continue
            norms[nid] = math.sqrt(sum(sums_sq.values()))  # = update_norm(arrays): every key was checked
            accepted.append(Update(node, arrays, metrics))
        accepted.sort(key=lambda u: u.node.partition_id)  # aggregation order independent of arrival order
        outliers = norm_outliers(norms, self.norm_factor if self.privacy.outlier_check else 0.0)
        for u in accepted:
            if u.node.node_id in outliers:
                rejected.append(rejection(self.nodes, u.node.node_id, outliers[u.node.node_id]))
        return Checked([u for u in accepted if u.node.node_id not in outliers], rejected, bytes_up)

    def release(self, server_round: int, accepted: list[Update]) -> tuple[ArrayRecord | None, list, dict | None,
                                                                            str | None]:
        """Aggregate the accepted updates: ``(arrays, client_states, delta, skipped)``. A round with fewer than
        ``min_train_nodes`` valid updates is skipped and changes nothing."""
        if len(accepted) < self.min_train_nodes:
            return None, [], None, f"only {len(accepted)} valid updates (< min_train_nodes={self.min_train_nodes})"
        states = [self.to_state(u.node, u.arrays) for u in accepted]
        weights = [u.weight for u in accepted]
        delta = self.aggregate(server_round, states, weights, accepted)
        client_states = [(u.node, s, w) for u, s, w in zip(accepted, states, weights)]
        return to_record(to_arrays(self.state)), client_states, delta, None

    def aggregate_round(self, server_round: int, replies, sent=None) -> RoundResult:
        """Match the replies to the messages ``sent`` (:func:`attribute`), check them, aggregate (through the
        privacy component) and say what happened. Every node ``sent`` went to and whose update was not accepted is
        in ``rejected`` once, under its own partition and node id: its refusal or error, its loss (the SuperLink
        answered for it), or, with nothing at all for it, no reply within ``round_timeout``. ``sent`` None (unit
        tests): each reply speaks for its sender and silent nodes are not looked for. ``server.optimizer`` other than
        avg then serves started + step(aggregate − started) on what was averaged (:mod:`fedlora.server_opt`)."""
        att = attribute(replies, sent, self.nodes)
        checked = self.scaffold.check(self, self.check_replies(att.replies), att.replies)  # SCAFFOLD: Δc_i, then c
        started = self.state  # what the round's clients started from
        arrays, client_states, delta, skipped = self.privacy.release(self, server_round, checked.accepted,
                                                                     att.replies)
        if arrays is not None and self.server_opt.active:  # server.optimizer (post-processing of the release)
            self.state = self.server_opt.apply(started, self.state, self.client_sends, server_round,
                                               [(s, w) for _, s, w in client_states])
            arrays = to_record({k: to_arrays(self.state)[k] for k in arrays.keys()})  # the release's keys
            delta = algebra.effective_update(self.state, started)
        if skipped:
            from flwr.common.logger import log

            log(WARNING, "round %d skipped: %s", server_round, skipped)
        codec = self.codec_errors(checked.accepted)
        metrics = {**train_metrics(checked.accepted), **self.round_metrics(checked.accepted),
                   **(self.server_opt.round_metrics() if arrays is not None else {}),
                   **{f"codec_{d}_error": max(e.values()) for d, e in codec.items()}}
        rejected = att.rejected + checked.rejected
        for nid in dict.fromkeys(m.metadata.dst_node_id for m in sent or []):
            if nid not in att.answered:
                rejected.append(rejection(self.nodes, nid, f"no reply within round_timeout={self.cfg.round_timeout}s"))
        by_partition = {n.partition_id: n.node_id for n in self.nodes.values()}
        for r in rejected:  # a subclass's own rejections name the partition only
            r.setdefault("node_id", by_partition.get(r["node"]))
        return RoundResult(arrays, metrics, rejected, checked.bytes_up, client_states, delta, skipped, codec)

    def codec_errors(self, accepted: list[Update]) -> dict:
        """With a lossy codec, this round's relative errors: ``down`` per payload tensor (the largest over the
        payloads), ``up`` per partition (what each accepted client reported for its reply, error feedback included).
        Only the non-empty ones; the metrics line takes the largest of each (``codec_down_error``,
        ``codec_up_error``), the audit all of them."""
        up = {u.node.partition_id: float(u.metrics["codec_error"]) for u in accepted
              if self.codec_up.lossy and "codec_error" in u.metrics}
        return {d: e for d, e in (("down", self.down_errors if self.codec_down.lossy else {}), ("up", up)) if e}

    # ------------------------------------------------------------------ Flower's interface
    def configure_train(self, server_round, arrays, config, grid):
        self._flower_sent = self.configure_round(server_round, grid).messages  # the grid sets their ids
        return self._flower_sent

    def aggregate_train(self, server_round, replies):
        res = self.aggregate_round(server_round, replies, getattr(self, "_flower_sent", None))
        if res.arrays is None:
            return None, None
        return res.arrays, MetricRecord({"train_loss": res.metrics["train_loss"]})
