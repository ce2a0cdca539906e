"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024): stacking, exact for any mix of ranks, merged into the base through a versioned
log (:class:`~fedlora.strategies.rank_rules.Stacking`).

Every round each client draws a fresh A from its own seed (``fl.a_seed`` per partition, not nested): stacking
is exact whatever the A's are, so nothing is gained by sharing one. Round metrics besides the rule's
(``base_version``, ``base_sync_error``, ``export_rank``): ``downlink_ratio`` = this round's payload bytes over
what FedIT would send the same clients at their ranks (r_k(m+n) per module plus the head; raw tensor bytes)."""

from fedlora.adapters import array_bytes

from .base import LoraStrategy
from .rank_rules import Stacking


class FLoRA(LoraStrategy):
    name = "flora"
    supports_mixed_ranks = True
    client_dp_refusal = ("flora stacks each client's individual factors instead of averaging them, so there is no "
                         "noised sum for client-level DP to release")
    components = LoraStrategy.components + ("rule",)

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.rule = Stacking()
        self.state = Stacking.served(initial)
        self.downlink = (0, 0, 0)  # (round, payload bytes, FedIT-equivalent bytes) of the round being sent

    def payload(self, node, server_round):
        arrays = self.rule.payload(self.state, node)
        fedit = 4 * sum(node.rank * (m + n) for m, n in self.shapes.values()) + array_bytes(
            {k: v for k, v in arrays.items() if k.startswith("extra.")})
        rnd, sent, equiv = self.downlink if self.downlink[0] == server_round else (server_round, 0, 0)
        self.downlink = (rnd, sent + array_bytes(arrays), equiv + fedit)
        return arrays, {}

    def on_status(self, node, status, metrics):
        self.rule.on_status(node, status, metrics)

    def aggregate(self, server_round, states, weights, updates):
        return self.rule.aggregate(self.state, states, weights, updates)

    def round_metrics(self, updates):
        _, sent, equiv = self.downlink
        return {**self.rule.round_metrics(updates), "downlink_ratio": sent / equiv if equiv else 0.0}

    def base_delta(self):
        return self.rule.base_delta()

    def export_adapter(self):
        return self.rule.export(self.state, self.shapes)
