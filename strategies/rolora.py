"""RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS 2025;
no public code): alternating optimisation of the two LoRA factors. Odd rounds train B with A frozen and shared,
even rounds train A with B frozen and shared; only the trained factor (and the head) travels up, so the uplink is
half of FedIT's, and every round's average is exact because the other factor is common to all clients:
s·B̄·A = Σ p_k s B_k A (B rounds), s·B·Ā = Σ p_k s B A_k (A rounds) (:func:`fedlora.algebra.rolora`). The round's
``cross_term_error`` shows it (float rounding only) and ``trained_factor`` says which factor it was ("A"/"B").

Round 1 trains B: B starts at zero (PEFT's initialisation), so an A round first would have zero gradient for A.
A starts as FFA-LoRA's (``strategy.a_init``, :func:`fedlora.adapters.seeded_A` from the run seed), so RoLoRA's
round 1 is FFA-LoRA's round 1. Both factors travel down every round (A changes in A rounds); the train message says
which one trains (``fl.train_factor``). The schedule follows the round number: a skipped round does not shift it.
"""

from __future__ import annotations

import torch

from fedlora import algebra
from fedlora.adapters import A_INITS, LORA_A, LORA_B, AdapterState, LoraFactors, from_arrays, seeded_A, to_arrays

from .base import LoraStrategy
from .ffa_lora import a_init_of


def check_seeded_a(cls, cfg) -> None:
    """Refuse an unknown ``strategy.a_init`` and, for client-level DP, client-side clipping (one sentence each):
    clients get both factors and send back one, while Flower's ``fixedclipping_mod`` needs the reply to carry
    exactly the arrays it was sent."""
    from fedlora import privacy
    from fedlora.config import ConfigError

    init = a_init_of(cfg)
    if init not in A_INITS:
        raise ConfigError(f"strategy.a_init={init} is not an initialisation of {cls.name}'s first A: choose one of "
                          f"{', '.join(A_INITS)}.")
    if privacy.mode_of(cfg) == "client_dp" and str(cfg.privacy.get("clipping", "server")) != "server":
        raise ConfigError(f"strategy {cls.name} sends clients both factors but takes back only the trained one, which "
                          "client-side clipping (Flower's fixedclipping_mod) cannot clip: use privacy.clipping=server.")


def seeded_state(cfg, initial: AdapterState) -> AdapterState:
    """FFA-LoRA's starting adapter: A from the run seed and ``strategy.a_init``, B = 0, the initial scale and head."""
    return AdapterState(
        {n: LoraFactors(seeded_A(int(cfg.seed), n, f.rank, f.A.shape[1], init=str(a_init_of(cfg))),
                        torch.zeros_like(f.B), f.scale)
         for n, f in initial.lora.items()}, initial.extra)


def factor_of(server_round: int) -> str:
    """The factor round ``server_round`` trains: ``B`` on odd rounds (round 1 first: B starts at zero), ``A`` on even."""
    return "B" if int(server_round) % 2 == 1 else "A"


class RoLoRA(LoraStrategy):
    name = "rolora"
    #: what a B round (odd rounds, round 1 first) takes back; an A round takes (LORA_A, "extra") (:meth:`start_round`)
    client_sends = (LORA_B, "extra")
    # client-level DP: the noised mean of the trained factor is released; keeping the other (already public) factor
    # and alternating are post-processing of it (server-side clipping only: :func:`check_seeded_a`)
    privacy_modes = ("none", "dp_sgd", "client_dp")
    # on the round's trained factor and the head (client_sends); the frozen factor keeps its moments until its turn
    supports_server_optimizer = True
    supports_scaffold = True  # c on A, B and the head; a round sends and updates its factor's (and the head's)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        check_seeded_a(cls, cfg)

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.state = seeded_state(cfg, initial)
        self.trained = "B"

    def start_round(self, server_round: int) -> None:
        """Set the round's trained factor and what clients send back (before any message or privacy step)."""
        self.trained = factor_of(server_round)
        self.client_sends = (LORA_B if self.trained == "B" else LORA_A, "extra")

    def payload(self, node, server_round):
        return to_arrays(self.state), {"fl.train_factor": self.trained, "fl.freeze_a": self.trained == "B"}

    def to_state(self, node, arrays):
        """A reply (the trained factor and the head) completed with the server's frozen factor."""
        full = dict(arrays)
        if self.trained == "B":
            full.update({f"{n}.{LORA_A}": f.A for n, f in self.state.lora.items()})
        else:
            full.update({f"{n}.{LORA_B}": f.B for n, f in self.state.lora.items()})
        return from_arrays(full, node.scale)

    def aggregate(self, server_round, states, weights, updates):
        new = algebra.rolora(states, weights, self.trained)
        delta = algebra.effective_update(new, self.state)
        self.state = new
        # one factor is shared, so the served product is ΔW*: float rounding only (an invariant the tests check)
        self.round_diag = self.cross_term(new, states, weights)
        return delta

    def round_metrics(self, updates):
        """``trained_factor`` ("A"/"B") and the ``cross_term_error`` of a round the strategy aggregated itself
        (none under client-level DP)."""
        return {"trained_factor": self.trained, **self.__dict__.pop("round_diag", {})}
