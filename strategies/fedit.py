"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024):
FedAvg applied to the LoRA factors, A and B averaged separately (weighted by examples), head averaged.
The baseline: s·B̄Ā is not the average of the clients' updates (cross terms); see ALGORITHMS.md."""

from fedlora import algebra

from .base import LoraStrategy


class FedIT(LoraStrategy):
    name = "fedit"
    privacy_modes = ("none", "dp_sgd", "client_dp")

    def aggregate(self, server_round, states, weights, updates):
        new = algebra.fedit(states, weights)
        delta = algebra.effective_update(new, self.state)
        self.state = new
        return delta
