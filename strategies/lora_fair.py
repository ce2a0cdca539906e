"""LoRA-FAIR (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025): FedIT averaging, then a server-side correction ΔB so that (B̄+ΔB)Ā approaches
Σ p_k s_k B_k A_k while staying close to B̄ (:func:`fedlora.algebra.lora_fair`). Solver ``sgd`` (default) = the
paper's procedure, SGD from ΔB = 0 on 1 − cos + λ‖ΔB‖; ``cosine`` = the exact minimiser of that objective
(L-BFGS); ``closed_form`` = squared-error variant in r×r form. Clients restart from (Ā, B̄+ΔB).

Round metrics: ``fair_solver`` (which solver ran), ``fair_db_ratio`` = ‖ΔB‖/‖B̄‖, ``fair_cos_before`` /
``fair_cos_after`` = cosine of s·B̄Ā / s·(B̄+ΔB)Ā to ΔW*, ``fair_corrected_share`` = share of modules with
ΔB ≠ 0 (:func:`fedlora.diagnostics.lora_fair_report`), and ``cross_term_error`` of the served (corrected) product."""

from fedlora import algebra, diagnostics

from .base import LoraStrategy


class LoRAFAIR(LoraStrategy):
    name = "lora_fair"
    server_optimizer_refusal = ("lora_fair corrects B towards the clients' exact product after averaging, which a "
                                "server step on the average would undo")
    client_dp_refusal = ("lora_fair's server-side correction reads every client's un-noised factors, which "
                         "client-level DP does not cover")

    @classmethod
    def check_config(cls, cfg) -> None:
        """Also refuse an unknown ``strategy.solver`` or ``strategy.penalty`` before anything starts."""
        super().check_config(cfg)
        from fedlora.config import ConfigError

        s = cfg.strategy
        if str(s.solver) not in algebra.FAIR_SOLVERS:
            raise ConfigError(f"strategy.solver={s.solver} is not a LoRA-FAIR solver: choose one of "
                              f"{', '.join(algebra.FAIR_SOLVERS)}.")
        if str(s.get("penalty", "norm")) not in algebra.FAIR_PENALTIES:
            raise ConfigError(f"strategy.penalty={s.penalty} must be norm or squared.")
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not (num(s.lam) and s.lam >= 0):
            raise ConfigError(f"strategy.lam={s.lam} must be a number >= 0 (the weight of the correction's penalty).")
        steps = s.get("steps")
        if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ConfigError(f"strategy.steps={steps} must be an integer >= 1 (or null for the solver's default).")
        if not (num(s.get("solver_lr", 0.01)) and s.get("solver_lr", 0.01) > 0):
            raise ConfigError(f"strategy.solver_lr={s.solver_lr} must be a number > 0.")

    def aggregate(self, server_round, states, weights, updates):
        s = self.cfg.strategy
        steps = s.get("steps")
        new = algebra.lora_fair(states, weights, lam=float(s.lam), solver=str(s.solver),
                                steps=None if steps is None else int(steps), lr=float(s.get("solver_lr", 0.01)),
                                penalty=str(s.get("penalty", "norm")))
        delta = algebra.effective_update(new, self.state)
        self.state = new
        report = diagnostics.lora_fair_report(states, weights, new)
        self.round_diag = {"fair_solver": str(s.solver), **{f"fair_{k}": v for k, v in report.items()},
                           **self.cross_term(new, states, weights)}
        return delta

    def round_metrics(self, updates):
        """The correction's diagnostics of the round aggregated (see the module docstring)."""
        return self.__dict__.pop("round_diag", {})
