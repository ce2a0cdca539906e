"""FlexLoRA (Bai et al., NeurIPS 2024): the global update W_g = Σ p_k s_k B_k A_k is factorised by SVD
(from the stacked factors, never densely) and each client receives its own top-r_k factors
(:func:`fedlora.algebra.flexlora`). Heterogeneous-rank baseline."""

from fedlora import algebra
from fedlora.adapters import to_arrays

from .base import LoraStrategy


class FlexLoRA(LoraStrategy):
    name = "flexlora"
    supports_mixed_ranks = True
    client_dp_refusal = ("flexlora forms and decomposes sum_k p_k B_k A_k from every client's un-noised factors, "
                         "which client-level DP does not cover")
    persistent = LoraStrategy.persistent + ("per_client", "global_state")

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.per_client: dict[tuple[int, float], object] = {}
        self.global_state = None

    def payload(self, node, server_round):
        st = self.per_client.get((node.rank, node.scale))
        if st is None:  # first round: a fresh LoRA of the client's rank (seeded A, B = 0) and the head
            return to_arrays(self.state, parts=("extra",)), {}
        return to_arrays(st), {}

    def aggregate(self, server_round, states, weights, updates):
        keys = sorted({(n.rank, n.scale) for n in self.nodes.values()})
        outs = algebra.flexlora(states, weights, [r for r, _ in keys], [s for _, s in keys])
        self.per_client = dict(zip(keys, outs))
        new_global = algebra.flexlora_global(states, weights)
        delta = algebra.effective_update(new_global, self.global_state)
        self.global_state = new_global
        self.state.extra = new_global.extra
        return delta

    def eval_adapter(self):
        return self.global_state if self.global_state is not None else self.state
