"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024): stacking, exact for any mix of ranks, merged into the base through a versioned
log (:class:`~fedlora.strategies.rank_rules.Stacking`).

Every round each client draws a fresh A from its own seed (``fl.a_seed`` per partition, not nested): stacking
is exact whatever the A's are, so nothing is gained by sharing one. Round metrics besides the rule's
(``base_version``, ``base_sync_error``, ``export_rank``, ``downlink_rank``, ``downlink_error``): ``downlink_ratio`` =
this round's payload bytes over what FedIT would send the same clients at their ranks (r_k(m+n) per module plus the
head), both as ``comm.down`` encodes them (raw tensor bytes under fp32).

Downlink (issue 18): the stacked update of K clients has rank Σ r_k (10 clients of rank 8: 80 per module, ~10× FedIT's
downlink). Each round it is re-factorised once before it is logged and sent (:func:`fedlora.merges.compact`: QR of
the stacked factors and an SVD of the small core, never m×n) at its numerical rank when
``strategy.downlink_tolerance`` = 0 (default: exact to rounding), else at the smallest rank whose discarded tail is
within that relative Frobenius error of the round's update (lossy, in [0, 1)); a module whose kept rank r' has
r'(m+n) > m n goes dense. The log holds exactly what is sent (and, under a lossy ``comm.down``, merges what clients
decode), so server and clients keep the same base; clients that missed rounds still get every missed merge.

Export (:meth:`Stacking.export <fedlora.strategies.rank_rules.Stacking.export>`): the merged total of every module
re-factorised at the smallest rank whose discarded tail is within ``strategy.export_tolerance`` (relative Frobenius,
default 1e-6) of it; modules where those factors are no smaller than the dense update also get merged base weights
(``adapter/merged_weights.safetensors``). :meth:`export_summary` is what ``summary.json`` records of it."""

from logging import INFO

import numpy as np
from flwr.common.logger import log

from fedlora import codecs
from fedlora.adapters import array_bytes

from .base import LoraStrategy
from .rank_rules import EXPORT_TOLERANCE, Stacking

#: default ``strategy.downlink_tolerance``: each round's merge at its numerical rank (exact to rounding)
DOWNLINK_TOLERANCE = 0.0


class FLoRA(LoraStrategy):
    name = "flora"
    reports_cross_term = False  # (its aggregate is exact; no cross_term_error)
    supports_mixed_ranks = True
    client_dp_refusal = ("flora stacks each client's individual factors instead of averaging them, so there is no "
                         "noised sum for client-level DP to release")
    components = LoraStrategy.components + ("rule",)
    server_optimizer_refusal = ("flora stacks fresh client factors into a merge every round, so no averaged tensor "
                                "keeps a previous value to take a step from")

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.rule = Stacking(export_tolerance=self.tolerance(cfg), downlink_tolerance=self.downlink_tolerance(cfg),
                             codec=self.codec_down)
        self.state = Stacking.served(initial)
        self.downlink = (0, 0, 0)  # (round, payload bytes, FedIT-equivalent bytes) of the round being sent
        self.fedit_bytes: dict[int, int] = {}  # rank -> bytes of FedIT's factors under comm.down

    def payload(self, node, server_round):
        arrays = self.rule.payload(self.state, node)
        extra = {k: v for k, v in arrays.items() if k.startswith("extra.")}
        fedit = self.fedit_factor_bytes(node.rank) + array_bytes(codecs.encode(self.codec_down, extra))
        rnd, sent, equiv = self.downlink if self.downlink[0] == server_round else (server_round, 0, 0)
        self.downlink = (rnd, sent, equiv + fedit)
        return arrays, {}

    def encode_payload(self, arrs, encoded):
        """The base's encoding (one per distinct payload a round), whose bytes ``downlink_ratio`` counts as sent."""
        enc = super().encode_payload(arrs, encoded)
        rnd, sent, equiv = self.downlink
        self.downlink = (rnd, sent + array_bytes(enc), equiv)
        return enc

    def fedit_factor_bytes(self, rank: int) -> int:
        """Bytes of FedIT's A and B at ``rank`` for every module, as ``comm.down`` sends them (4 r (m+n) at fp32)."""
        if not self.codec_down.lossy:
            return 4 * sum(rank * (m + n) for m, n in self.shapes.values())
        if rank not in self.fedit_bytes:  # a codec's size depends on the shapes only
            ones = {f"{name}.{kind}": np.ones(shape, np.float32) for name, (m, n) in self.shapes.items()
                    for kind, shape in (("lora_A", (rank, n)), ("lora_B", (m, rank)))}
            self.fedit_bytes[rank] = array_bytes(codecs.encode(self.codec_down, ones))
        return self.fedit_bytes[rank]

    def on_status(self, node, status, metrics):
        self.rule.on_status(node, status, metrics)

    def aggregate(self, server_round, states, weights, updates):
        return self.rule.aggregate(self.state, states, weights, updates)

    def round_metrics(self, updates):
        _, sent, equiv = self.downlink
        return {**self.rule.round_metrics(updates), "downlink_ratio": sent / equiv if equiv else 0.0}

    def base_delta(self):
        return self.rule.base_delta()

    @staticmethod
    def tolerance(cfg) -> float:
        return cfg.strategy.get("export_tolerance", EXPORT_TOLERANCE)

    @staticmethod
    def downlink_tolerance(cfg) -> float:
        """``strategy.downlink_tolerance`` (0: every round's merge sent at its numerical rank, exact to rounding)."""
        return cfg.strategy.get("downlink_tolerance", DOWNLINK_TOLERANCE)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Also refuse an ``export_tolerance`` or a ``downlink_tolerance`` outside [0, 1)."""
        super().check_config(cfg)
        from fedlora.config import ConfigError

        for key, tol, what in (("export_tolerance", cls.tolerance(cfg), "in the exported adapter, e.g. 1e-6"),
                               ("downlink_tolerance", cls.downlink_tolerance(cfg),
                                "in each round's merge as sent, 0 for its numerical rank, e.g. 1e-3")):
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
                raise ConfigError(f"strategy.{key}={tol} must be a number in [0, 1) (the relative Frobenius error "
                                  f"allowed {what}).")

    def export_adapter(self):
        exported = self.rule.export(self.state, self.shapes)
        info = self.rule.export_summary()
        log(INFO, "flora export: tolerance %g, rank max %d / total %d over modules", info["export_tolerance"],
            info["export_rank_max"], info["export_rank_total"])
        if info["export_merged_modules"]:
            log(INFO, "flora export: %d module(s) are no larger dense than as factors (r(m+n) >= m*n): their merged "
                "base weights W + dW are also written to adapter/%s", len(info["export_merged_modules"]),
                info["export_merged_weights"])
        return exported

    def export_summary(self) -> dict:
        """``summary.json``'s record of the export: ``export_tolerance``, ``export_rank_max``, ``export_rank_total``,
        ``export_merged_modules`` and ``export_merged_weights`` (file name in the adapter folder, or None)."""
        return self.rule.export_summary()
