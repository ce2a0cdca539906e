"""FedEx-LoRA (Singhal et al., "Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models",
ACL 2025): FedIT's averages made exact by a residual folded into the frozen base weights.

Every round the clients start from the served (Ā, B̄) on their merged base, as in FedIT; the server averages
Ā = Σ p_k A_k, B̄ = Σ p_k B_k (exactly FedIT's) and merges the residual R = Σ p_k s B_k A_k − s B̄Ā
(:func:`fedlora.algebra.fedex`) into the base, so base + s·B̄Ā moves by exactly ΔW* = Σ p_k s B_k A_k − s B̄₀Ā₀
(the product the clients started from). The residuals are FLoRA's versioned merge log (one entry per aggregated
round, :class:`~fedlora.strategies.rank_rules.Stacking`, :mod:`fedlora.merges`): a client receives the merges it
lacks before it trains, so under partial participation, failures or a restarted node (``out-of-sync``) every
client still starts from the server's base. Each entry travels as stacked factors (rank Σ r_k + r) or as the dense
m×n update, whichever is smaller (:meth:`fedlora.merges.MergeLog.payload`). Uplink = FedIT's; downlink = FedIT's
plus the residuals a client lacks.

Round metrics: ``cross_term_error`` (of FedIT's averages: ‖R‖/‖ΔW*‖, what the residual corrected;
:func:`fedlora.diagnostics.cross_term_error`), ``residual_rank`` (largest stacked rank of the round's residual),
``residual_bytes`` (merge arrays sent this round, all clients), ``downlink_ratio`` (this round's payload bytes
over FedIT's: the global adapter and head per client), ``base_version`` and ``base_sync_error`` (as FLoRA's).

Export (:meth:`export_adapter`): per module the whole learned update dW = Σ_t R_t + s·B̄Ā (every merged residual
plus the final served product), re-factorised as FLoRA's merged total is (:meth:`Stacking.export
<fedlora.strategies.rank_rules.Stacking.export>`): the SVD of dW cut at the smallest rank k with
‖B A − dW‖_F ≤ ``strategy.export_tolerance``·‖dW‖_F, scale 1 (alpha = k), head = the served head. So plain
``PeftModel.from_pretrained(pristine base, adapter/)`` is the model the server evaluated (base + Σ R_t + s B̄Ā) to
that tolerance. Modules where those factors are no smaller than dW (k(m+n) ≥ mn) also get W + dW in
``adapter/merged_weights.safetensors``, to use instead of the base weight and that module's factors. Before any
round is aggregated the served adapter itself is exported.

Privacy: DP-SGD on clients is fine (the residual is post-processing of privatised factors). Client-level DP is
refused: it releases only noised means of A and B, and R needs the clients' individual products.
Equal ranks only, as FedIT."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.common.logger import log

from fedlora import algebra
from fedlora.adapters import LORA_A, LORA_B, LoraFactors, array_bytes

from .base import LoraStrategy
from .flora import FLoRA
from .rank_rules import Stacking

#: the parts of the global adapter every client is served (FedIT's payload)
SERVED = (LORA_A, LORA_B, "extra")


class FedExLoRA(LoraStrategy):
    name = "fedex_lora"
    privacy_modes = ("none", "dp_sgd")
    client_dp_refusal = ("fedex_lora folds the residual Σp_k s B_k A_k − s B̄Ā into the base, which needs each "
                         "client's own product, not the noised means of A and B that client-level DP releases")
    components = LoraStrategy.components + ("rule",)
    server_optimizer_refusal = ("fedex_lora folds the residual of the exact average into the base weights, which a "
                                "server step on the averaged factors would no longer match")

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.rule = Stacking(export_tolerance=FLoRA.tolerance(cfg))
        self.downlink = (0, 0, 0)  # (round, payload bytes, merge bytes) of the round being sent

    @classmethod
    def check_config(cls, cfg) -> None:
        """Also refuse an ``export_tolerance`` outside [0, 1) (as FLoRA does)."""
        super().check_config(cfg)
        from fedlora.config import ConfigError

        tol = FLoRA.tolerance(cfg)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
            raise ConfigError(f"strategy.export_tolerance={tol} must be a number in [0, 1) (the relative Frobenius "
                              "error allowed in the exported adapter, e.g. 1e-6).")

    def payload(self, node, server_round):
        arrays = self.rule.payload(self.state, node, parts=SERVED)
        merged = array_bytes({k: v for k, v in arrays.items() if k.startswith("merge.")})
        rnd, sent, res = self.downlink if self.downlink[0] == server_round else (server_round, 0, 0)
        self.downlink = (rnd, sent + array_bytes(arrays), res + merged)
        return arrays, {}

    def on_status(self, node, status, metrics):
        self.rule.on_status(node, status, metrics)

    def aggregate(self, server_round, states, weights, updates):
        """FedIT's averages become the served adapter, the residual the log's next merge (stored, sent and summed
        as float32 factors, so server and clients merge the same numbers). Returns the round's effective update
        per module, float64 factors: R + s B̄Ā − s B̄₀Ā₀ (base merge plus the change of the served product)."""
        new, residual = algebra.fedex(states, weights)
        merge = {n: LoraFactors(f.A.float(), f.B.float(), 1.0) for n, f in residual.items()}
        self.rule.merge(merge, updates)
        delta = {}
        for name, r in merge.items():
            g, old = new.lora[name], self.state.lora.get(name)
            As, Bs = [r.A.double(), g.A.double()], [r.B.double(), g.B.double() * g.scale]
            if old is not None:
                As.append(old.A.double())
                Bs.append(old.B.double() * -old.scale)
            delta[name] = LoraFactors(torch.cat(As, 0), torch.cat(Bs, 1), 1.0)
        self.state = new
        self.round_diag = {**self.cross_term(new, states, weights),
                           "residual_rank": max((f.rank for f in merge.values()), default=0)}
        return delta

    def round_metrics(self, updates):
        _, sent, res = self.downlink
        equiv = sent - res  # what FedIT sends the same clients: the global adapter and head
        return {**self.__dict__.pop("round_diag", {}), **self.rule.sync_metrics(updates), "residual_bytes": res,
                "downlink_ratio": sent / equiv if equiv else 0.0}

    def base_delta(self):
        return self.rule.base_delta()

    def export_adapter(self):
        """The whole learned update as one adapter on the pristine base (see the module docstring)."""
        if not self.rule.log.version:
            return self.state
        totals = {}
        for name, f in self.state.lora.items():
            merged = self.rule.log.total.get(name)
            totals[name] = f.delta() if merged is None else merged + f.delta()
        exported = self.rule.export(self.state, self.shapes, totals=totals)
        info = self.rule.export_summary()
        log(INFO, "fedex_lora export: merged residuals + s·B̄Ā at tolerance %g, rank max %d / total %d over modules",
            info["export_tolerance"], info["export_rank_max"], info["export_rank_total"])
        if info["export_merged_modules"]:
            log(INFO, "fedex_lora export: %d module(s) are no larger dense than as factors: their merged base "
                "weights W + dW are also written to adapter/%s", len(info["export_merged_modules"]),
                info["export_merged_weights"])
        return exported

    def export_summary(self) -> dict:
        """``summary.json``'s record of the export (as FLoRA's; {} when the served adapter was exported as is)."""
        return self.rule.export_summary()
