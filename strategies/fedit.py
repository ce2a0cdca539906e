"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024):
FedAvg applied to the LoRA factors, A and B averaged separately (weighted by examples), head averaged.
The baseline: s·B̄Ā is not the average of the clients' updates (cross terms); see ALGORITHMS.md. Each round's
metrics give that error, ``cross_term_error`` = ‖s·B̄Ā − ΔW*‖ / ‖ΔW*‖
(:func:`fedlora.diagnostics.cross_term_error`)."""

from fedlora import algebra

from .base import LoraStrategy


class FedIT(LoraStrategy):
    name = "fedit"
    privacy_modes = ("none", "dp_sgd", "client_dp")
    supports_server_optimizer = True  # on A, B and the head (all averaged)
    supports_scaffold = True  # c on A, B and the head
    sums_replies = True  # an fp16/bf16/int8/top-k reply is averaged as sent (algebra._wsums, float32 sums)

    def aggregate(self, server_round, states, weights, updates):
        new = algebra.fedit(states, weights, compiled=self.compiled)
        delta = algebra.effective_update(new, self.state)
        self.state = new
        self.round_diag = self.cross_term(new, states, weights)
        return delta

    def round_metrics(self, updates):
        """``cross_term_error`` of the round the strategy aggregated itself (none under client-level DP)."""
        return self.__dict__.pop("round_diag", {})
