"""FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025;
code seanie12/fed-svd): clients train only B (and the head) with A frozen and shared, as FFA-LoRA, so the average is
exact (s·B̄·A = Σ p_k s B_k A); the server then re-factorises the aggregate B̄A = U S Vᵀ and serves A = Vᵀ
(orthonormal rows), B = U S, the same product (:func:`fedlora.lowrank.fedsvd`, low rank: QR of the factors and an
r x r SVD). A therefore adapts to the aggregate's principal input directions every round while each round stays
exact; ``cross_term_error`` (float rounding only) shows it. Under DP-SGD only B is trained, so only B's per-example
gradients are clipped and noised (A is frozen: ``requires_grad`` off, which is what Opacus goes by).

Round 1's A is FFA-LoRA's (``strategy.a_init``, :func:`fedlora.adapters.seeded_A` from the run seed; ``kaiming``, the
default, is PEFT's initialisation, which the paper's code uses too: not orthonormal); from round 2 on A is the
orthonormal factor of the previous aggregate. Both factors travel down every round (A changes), B and the head up.
Client-level DP (server-side clipping): the released noised mean of B with the public A, re-factorised, is
post-processing of the release.
"""

from __future__ import annotations

from fedlora import algebra, lowrank
from fedlora.adapters import LORA_A, LORA_B, from_arrays, to_arrays

from .base import LoraStrategy, to_record
from .rolora import check_seeded_a, seeded_state


class FedSVD(LoraStrategy):
    name = "fedsvd"
    client_sends = (LORA_B, "extra")
    privacy_modes = ("none", "dp_sgd", "client_dp")
    server_optimizer_refusal = ("fedsvd re-factorises the average by SVD every round, so A and B change basis and no "
                                "per-coordinate moment carries over")

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_seeded_a(cls, cfg)

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        from fedlora.config import ConfigError

        for name, (m, n) in shapes.items():
            r = initial.lora[name].rank
            if r > min(m, n):
                raise ConfigError(f"strategy fedsvd needs rank <= min(out, in) of every adapted module, but {name} is "
                                  f"{m} x {n} at rank {r}: use a rank of at most {min(m, n)}.")
        self.state = seeded_state(cfg, initial)

    def payload(self, node, server_round):
        return to_arrays(self.state), {"fl.train_factor": "B", "fl.freeze_a": True}

    def to_state(self, node, arrays):
        """A reply (B and the head) completed with the server's A."""
        full = dict(arrays)
        full.update({f"{n}.{LORA_A}": f.A for n, f in self.state.lora.items()})
        return from_arrays(full, node.scale)

    def aggregate(self, server_round, states, weights, updates):
        new = lowrank.fedsvd(states, weights)
        delta = algebra.effective_update(new, self.state)
        self.state = new
        # A is shared and the SVD keeps the product, so this is float rounding only (an invariant the tests check)
        self.round_diag = self.cross_term(new, states, weights)
        return delta

    def aggregate_round(self, server_round, replies, sent=None):
        """Client-level DP releases the noised mean of B (the privacy component sets ``state``); re-factorise it
        here, as :meth:`aggregate` does otherwise (post-processing: the product is unchanged)."""
        old = self.state
        res = super().aggregate_round(server_round, replies, sent)
        if self.privacy.mode == "client_dp" and res.arrays is not None:
            self.state = lowrank.orthonormal_refactor(self.state)
            res.arrays = to_record(to_arrays(self.state))
            res.delta = algebra.effective_update(self.state, old)
        return res

    def round_metrics(self, updates):
        """``cross_term_error`` of the round the strategy aggregated itself (none under client-level DP)."""
        return self.__dict__.pop("round_diag", {})
