"""FlexLoRA (Bai et al., NeurIPS 2024): the global update W_g = Σ p_k s_k B_k A_k is factorised by SVD
(from the stacked factors, never densely) and each client receives its own top-r_k factors
(:func:`fedlora.lowrank.flexlora`). Heterogeneous-rank baseline.

Nested start (``strategy.nested_init``, default true): in the first round every client draws the first r_k rows
of ONE seeded A of the run's largest rank. Round metrics: ``cross_term_error`` of the global adapter (its full
SVD: float rounding only) and ``truncation_error`` = {rank: ‖W_g − best rank-r part‖ / ‖W_g‖}, what each
client rank loses (:func:`fedlora.diagnostics.truncation_error`)."""

from fedlora import algebra, diagnostics, lowrank
from fedlora.adapters import to_arrays

from .base import LoraStrategy


class FlexLoRA(LoraStrategy):
    name = "flexlora"
    supports_mixed_ranks = True
    shares_fresh_A = True
    server_optimizer_refusal = ("flexlora serves each rank its own SVD truncation of the global product, not an "
                                "average of what the clients started from")
    client_dp_refusal = ("flexlora forms and decomposes sum_k p_k B_k A_k from every client's un-noised factors, "
                         "which client-level DP does not cover")
    persistent = LoraStrategy.persistent + ("per_client", "global_state")

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.per_client: dict[tuple[int, float], object] = {}
        self.global_state = None

    def prepare_run(self, grid, run_dir, echo=print, resume: bool = False) -> None:
        """Nested start: the initial adapter is the shared seeded A at the largest rank, B = 0."""
        if self.nested_init:
            self.state = self.fresh_state(1)

    def payload(self, node, server_round):
        st = self.per_client.get((node.rank, node.scale))
        if st is None:  # first round: a fresh LoRA of the client's rank (seeded A, B = 0) and the head
            return to_arrays(self.state, parts=("extra",)), {}
        return to_arrays(st), {}

    def aggregate(self, server_round, states, weights, updates):
        keys = sorted({(n.rank, n.scale) for n in self.nodes.values()})
        outs = lowrank.flexlora(states, weights, [r for r, _ in keys], [s for _, s in keys])
        self.per_client = dict(zip(keys, outs))
        new_global = lowrank.flexlora_global(states, weights)
        delta = algebra.effective_update(new_global, self.global_state)
        self.global_state = new_global
        self.state.extra = new_global.extra
        trunc = diagnostics.truncation_error(states, weights, [r for r, _ in keys])
        self.round_diag = {**self.cross_term(new_global, states, weights),
                           "truncation_error": {str(r): e for r, e in trunc.items()}}
        return delta

    def round_metrics(self, updates):
        return self.__dict__.pop("round_diag", {})

    def eval_adapter(self):
        return self.global_state if self.global_state is not None else self.state
