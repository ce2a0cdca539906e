"""LoRA-FAIR (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025): FedIT averaging, then a server-side correction ΔB so that (B̄+ΔB)Ā approaches
Σ p_k s_k B_k A_k while staying close to B̄ (:func:`fedlora.algebra.lora_fair`, solver ``cosine`` = the
paper's objective, or ``closed_form`` = squared-error variant in r×r form). Clients restart from (Ā, B̄+ΔB)."""

from fedlora import algebra

from .base import LoraStrategy


class LoRAFAIR(LoraStrategy):
    name = "lora_fair"
    client_dp_refusal = ("lora_fair's server-side correction reads every client's un-noised factors, which "
                         "client-level DP does not cover")

    def aggregate(self, server_round, states, weights, updates):
        s = self.cfg.strategy
        new = algebra.lora_fair(states, weights, lam=float(s.lam), solver=str(s.solver), steps=int(s.steps))
        delta = algebra.effective_update(new, self.state)
        self.state = new
        return delta
