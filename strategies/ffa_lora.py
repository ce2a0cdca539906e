"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024): A is drawn
once from the run seed (identical on every client, and checked), frozen; only B (and the head) is trained
and exchanged, so aggregation is exact (s·B̄·A = Σ p_k s B_k A) and the traffic is half of FedIT's. The round's
``cross_term_error`` (:func:`fedlora.diagnostics.cross_term_error`) shows it: float rounding only.

``strategy.a_init`` chooses A's distribution (:data:`fedlora.adapters.A_INITS`: ``kaiming``, PEFT's default and
the default here, ``gaussian`` or ``orthogonal``, all at the same expected row norm). It travels in every train
message as ``fl.a_init`` next to ``fl.a_seed``; a client rebuilds A from both (:func:`fedlora.adapters.seeded_A`)
and reports its fingerprint, which must match the server's. With A frozen, the LoRA alpha (``model.lora.alpha``)
is the only scale of the update's A side: scaling it by c scales every step of ΔW = (alpha/r)·B·A by c, so it
acts as B's learning rate (bench/ffa_tune.py tunes it, with and without DP)."""

import torch

from fedlora import algebra
from fedlora.adapters import (A_INITS, DEFAULT_A_INIT, LORA_B, AdapterState, LoraFactors, a_fingerprint, from_arrays,
                              seeded_A)

from .base import LoraStrategy


def a_init_of(cfg) -> str:
    """``strategy.a_init`` of a config (default :data:`~fedlora.adapters.DEFAULT_A_INIT`: what FFA-LoRA drew before
    the key existed)."""
    return cfg.strategy.get("a_init", DEFAULT_A_INIT)


class FFALoRA(LoraStrategy):
    name = "ffa_lora"
    client_sends = (LORA_B, "extra")
    privacy_modes = ("none", "dp_sgd", "client_dp")
    supports_server_optimizer = True  # on B and the head (A is frozen, never averaged)
    supports_scaffold = True  # c on B and the head
    sums_replies = True  # an fp16/bf16/int8/top-k reply is averaged as sent (algebra._wsums, float32 sums)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Also refuse an unknown ``strategy.a_init`` before anything starts."""
        super().check_config(cfg)
        from fedlora.config import ConfigError

        init = a_init_of(cfg)
        if init not in A_INITS:
            raise ConfigError(f"strategy.a_init={init} is not an initialisation of FFA-LoRA's frozen A: choose one of "
                              f"{', '.join(A_INITS)}.")

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.a_seed = int(cfg.seed)
        self.a_init = str(a_init_of(cfg))
        self.state = AdapterState(
            {n: LoraFactors(seeded_A(self.a_seed, n, f.rank, f.A.shape[1], init=self.a_init),
                            torch.zeros_like(f.B), f.scale)
             for n, f in initial.lora.items()}, initial.extra)
        self.a_fingerprint = a_fingerprint(self.state)

    def payload(self, node, server_round):
        return self.state_arrays((LORA_B, "extra")), {"fl.a_seed": self.a_seed, "fl.a_init": self.a_init,
                                                       "fl.freeze_a": True}

    def check_replies(self, replies):
        checked = super().check_replies(replies)
        checked.reject_where(lambda u: int(u.metrics.get("a-fingerprint", -1)) != self.a_fingerprint
                             and "frozen A differs from the server's (seed or a_init mismatch)")
        return checked

    def to_state(self, node, arrays):
        full = dict(arrays)
        full.update({f"{n}.lora_A": f.A for n, f in self.state.lora.items()})
        return from_arrays(full, node.scale)

    def aggregate(self, server_round, states, weights, updates):
        new = algebra.ffa_average(states, weights, compiled=self.compiled)
        delta = algebra.effective_update(new, self.state)
        self.state = new
        # A is shared and frozen, so s·B̄·A = ΔW*: this is float rounding only (an invariant the tests check)
        self.round_diag = self.cross_term(new, states, weights)
        return delta

    def round_metrics(self, updates):
        """``cross_term_error`` of the round the strategy aggregated itself (none under client-level DP)."""
        return self.__dict__.pop("round_diag", {})
