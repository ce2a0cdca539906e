"""HetLoRA (Cho et al., EMNLP 2024): clients' factors zero-padded to the largest rank and averaged
(optionally weighted by ‖B_k A_k‖), truncated to each client's rank on the way back
(:func:`fedlora.algebra.hetlora` / :func:`fedlora.algebra.truncate`). Heterogeneous-rank baseline."""

from fedlora import algebra
from fedlora.adapters import to_arrays

from .base import LoraStrategy


class HetLoRA(LoraStrategy):
    name = "hetlora"
    supports_mixed_ranks = True
    persistent = LoraStrategy.persistent + ("global_state",)

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.global_state = None

    def payload(self, node, server_round):
        if self.global_state is None:  # first round: fresh LoRA of the client's rank
            return to_arrays(self.state, parts=("extra",)), {}
        return to_arrays(algebra.truncate(self.global_state, node.rank, node.scale)), {}

    def aggregate(self, server_round, states, weights, nodes):
        r_max = max(n.rank for n in self.nodes.values())
        new = algebra.hetlora(states, weights, r_max=r_max, norm_weighted=bool(self.cfg.strategy.norm_weighted))
        self.last_delta = algebra.effective_update(new, self.global_state)
        self.global_state = new
        self.state.extra = new.extra

    def eval_adapter(self):
        return self.global_state if self.global_state is not None else self.state
