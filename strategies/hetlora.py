"""HetLoRA (Cho et al., EMNLP 2024): clients' factors zero-padded to the largest rank and averaged (optionally
weighted by ‖B_k A_k‖), truncated to each client's rank on the way back
(:class:`~fedlora.strategies.rank_rules.ZeroPadding`). Heterogeneous-rank baseline.

Nested start (``strategy.nested_init``, default true): in the first round every client draws the first r_k rows
of ONE seeded A of the run's largest rank (B = 0), and the server's initial global is that A, so the padded
average combines rows that began equal. Round metrics: ``cross_term_error`` of the padded average."""

from .base import LoraStrategy
from .rank_rules import ZeroPadding


class HetLoRA(LoraStrategy):
    name = "hetlora"
    supports_mixed_ranks = True
    shares_fresh_A = True
    server_optimizer_refusal = ("hetlora counts the padded rows a lower-rank client never trained as zeros in its "
                                "average, so the aggregate minus the previous global is not the clients' update")
    client_dp_refusal = ("hetlora clients have different ranks (and may be weighted by their update norms), so "
                         "there is no common update to clip and noise")
    components = LoraStrategy.components + ("rule",)

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.rule = ZeroPadding(self.cross_term, norm_weighted=bool(cfg.strategy.norm_weighted))

    def prepare_run(self, grid, run_dir, echo=print, resume: bool = False) -> None:
        """Nested start: the initial global adapter is the shared seeded A at the largest rank, B = 0."""
        if self.nested_init:
            self.state = self.fresh_state(1)

    def payload(self, node, server_round):
        return self.rule.payload(self.state, node), {}

    def aggregate(self, server_round, states, weights, updates):
        return self.rule.aggregate(self.state, states, weights, r_max=max(n.rank for n in self.nodes.values()))

    def round_metrics(self, updates):
        return self.rule.round_metrics(updates)

    def eval_adapter(self):
        return self.rule.current(self.state)
