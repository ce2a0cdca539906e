"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024): stacking, exact for any mix of ranks, merged into the base through a versioned
log (:class:`~fedlora.strategies.rank_rules.Stacking`)."""

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

    def payload(self, node, server_round):
        return self.rule.payload(self.state, node), {}

    def on_status(self, node, status, metrics):
        self.rule.on_status(node, status, metrics)

    def aggregate(self, server_round, states, weights, updates):
        return self.rule.aggregate(self.state, states, weights, updates)

    def round_metrics(self, updates):
        return self.rule.round_metrics(updates)

    def base_delta(self):
        return self.rule.base_delta()

    def export_adapter(self):
        return self.rule.export(self.state, self.shapes)
