"""Config-level privacy rules: :class:`DPConfig`, which privacy settings are refused
(:func:`check_compatible`, :func:`validate_config`, one sentence each; per-strategy rules are on the
strategies), and reading the run config's ``privacy``
group (:func:`mode_of`, :func:`planned_rounds`, :func:`dp_config`). Why each refusal: ``docs/privacy.md``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from .accounting import ACCOUNTANTS, AccountantState, epsilon, plan_noise

PRIVACY_MODES = ("none", "dp_sgd", "client_dp", "client_dp_adaptive")


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD settings of one run (identical on every client).

    Give exactly one of ``noise_multiplier`` (fixed sigma; no budget check) or ``target_epsilon`` (sigma is
    planned once for the whole run by :func:`plan_noise`; rounds that would exceed it are refused).
    ``train_head=False`` freezes every trainable non-LoRA parameter (e.g. a ``modules_to_save`` classifier)
    in :func:`make_private`.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    poisson: bool = True
    train_head: bool = True

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "DPConfig needs exactly one of noise_multiplier (fixed noise) or target_epsilon "
                "(noise planned for the run), got "
                f"noise_multiplier={self.noise_multiplier} and target_epsilon={self.target_epsilon}."
            )
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}.")
        if self.target_epsilon is not None and not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon}.")
        if not (0.0 < self.target_delta < 1.0):
            raise ValueError(f"target_delta must lie strictly between 0 and 1, got {self.target_delta}.")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm (the per-example clipping norm) must be > 0, got {self.max_grad_norm}.")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}.")


def check_compatible(privacy_mode: str, *, weighting: str = "num_examples") -> None:
    """Refuse privacy settings that make no sense for any strategy, with one sentence (see docs/privacy.md).
    Which strategy supports which mode is declared on the strategy classes (``privacy_modes``) and checked by
    their ``check_config``.

    ``weighting``: how the server weights clients, ``"num_examples"`` or ``"uniform"``.
    """
    if privacy_mode not in PRIVACY_MODES:
        raise ValueError(f"Unknown privacy mode {privacy_mode!r}; expected one of {', '.join(PRIVACY_MODES)}.")
    if weighting not in ("num_examples", "uniform"):
        raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}.")
    if privacy_mode == "client_dp_adaptive":
        raise ValueError(
            "client_dp_adaptive is refused because Flower 1.42 has no privacy accountant for adaptive "
            "clipping, so no epsilon could be reported; use client_dp (fixed clipping) instead."
        )
    if privacy_mode == "client_dp" and weighting != "uniform":
        raise ValueError(
            "client_dp needs equal client weights (weighting='uniform'): weighting by example counts lets "
            "one client's clipped update count for more than the sensitivity the noise is calibrated for."
        )


def mode_of(cfg) -> str:
    """The run's privacy mode (``none`` when the config has no ``privacy`` group)."""
    priv = cfg.get("privacy") if hasattr(cfg, "get") else None
    return str(priv.get("mode", "none")) if priv else "none"


def planned_rounds(cfg) -> int:
    """Rounds the noise is planned for: ``privacy.planned_rounds``, default ``num_rounds`` (the worst case:
    a client sampled in every round)."""
    r = cfg.privacy.get("planned_rounds")
    return int(r) if r not in (None, "null") else int(cfg.num_rounds)


def dp_config(cfg) -> DPConfig:
    """The :class:`DPConfig` of a run. ``dp_sgd``: per-example clipping at ``privacy.max_grad_norm``.
    ``client_dp``: the same object describes the client-level Gaussian mechanism: ``max_grad_norm`` is the
    clipping norm of a client's whole update (``privacy.clipping_norm``), the accountant is RDP."""
    priv = cfg.privacy
    mode = str(priv.get("mode"))

    def _opt(key):
        v = priv.get(key)
        return None if v in (None, "null") else float(v)

    if mode == "dp_sgd":
        return DPConfig(noise_multiplier=_opt("noise_multiplier"), target_epsilon=_opt("target_epsilon"),
                        target_delta=float(priv.get("target_delta", 1e-5)),
                        max_grad_norm=float(priv.get("max_grad_norm", 1.0)),
                        accountant=str(priv.get("accountant", "rdp")), poisson=bool(priv.get("poisson", True)),
                        train_head=bool(priv.get("train_head", True)))
    if mode == "client_dp":
        return DPConfig(noise_multiplier=_opt("noise_multiplier"), target_epsilon=_opt("target_epsilon"),
                        target_delta=float(priv.get("target_delta", 1e-5)),
                        max_grad_norm=float(priv.get("clipping_norm", 1.0)), accountant="rdp")
    raise ValueError(f"privacy mode {mode!r} has no DP configuration.")


def client_level_noise(cfg: DPConfig, releases: int) -> float:
    """Noise multiplier of client-level DP (Flower's fixed-clipping wrappers): ``cfg.noise_multiplier``, or the
    one that spends ``cfg.target_epsilon`` over ``releases`` Gaussian releases without sampling amplification
    (Flower's accounted mode; each round's noised mean is one release)."""
    return plan_noise(cfg, 1.0, releases)


#: client-level DP settings a resumed run may not change (the epsilon already spent was accounted with them)
RESUME_FIXED = ("target_epsilon", "target_delta", "noise_multiplier", "planned_rounds")


def _client_level_settings(cfg) -> dict:
    """The ``privacy`` settings of :data:`RESUME_FIXED` as given (None: not set), as plain values."""
    dp = dp_config(cfg)
    r = cfg.privacy.get("planned_rounds")
    return {"target_epsilon": dp.target_epsilon, "target_delta": dp.target_delta,
            "noise_multiplier": dp.noise_multiplier, "planned_rounds": None if r in (None, "null") else int(r)}


def client_level_plan(cfg) -> dict:
    """What a client-level DP run's accounting rests on, as JSON-able values (checkpointed with its accountant):
    ``settings`` (:data:`RESUME_FIXED` as configured), ``noise_multiplier`` (the sigma they give, planned once
    for ``planned_rounds`` releases) and ``num_rounds`` (the most rounds the run was agreed for)."""
    return {"settings": _client_level_settings(cfg),
            "noise_multiplier": client_level_noise(dp_config(cfg), planned_rounds(cfg)),
            "num_rounds": int(cfg.num_rounds)}


def releases_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` no-amplification Gaussian releases at ``noise_multiplier`` (client-level DP)."""
    if releases <= 0:
        return 0.0
    return epsilon(AccountantState("rdp", ((float(noise_multiplier), 1.0, int(releases)),)), delta)


def releases_within(noise_multiplier: float, delta: float, target_epsilon: float, upto: int) -> int:
    """The most releases (at most ``upto``) whose epsilon stays within ``target_epsilon`` (binary search)."""
    lo, hi = 0, int(upto)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if releases_epsilon(noise_multiplier, mid, delta) <= target_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_client_level_resume(saved: dict, cfg) -> None:
    """``ValueError`` (one sentence) unless ``cfg`` may resume a client-level DP run planned as ``saved`` (a
    :func:`client_level_plan`). The resumed run keeps the saved noise multiplier, so the settings of
    :data:`RESUME_FIXED` may not change, and a ``num_rounds`` above the saved one is allowed only if that many
    releases at the saved noise stay within ``target_epsilon`` (a run with fixed noise has no budget to check)."""
    now, was = _client_level_settings(cfg), saved["settings"]
    sigma = float(saved["noise_multiplier"])
    for key in RESUME_FIXED:
        if now[key] != was[key]:
            raise ValueError(
                f"resume cannot change privacy.{key} from {was[key]} to {now[key]}: the epsilon already spent was "
                f"accounted with the run's noise multiplier {sigma:.6g}, target and delta, so resume with "
                f"privacy.{key}={'null' if was[key] is None else was[key]} or start a new run.")
    n, agreed, target = int(cfg.num_rounds), int(saved["num_rounds"]), was["target_epsilon"]
    if target is None or n <= agreed:
        return
    delta = float(was["target_delta"])
    eps = releases_epsilon(sigma, n, delta)
    if eps > target:
        fit = releases_within(sigma, delta, target, n)
        raise ValueError(
            f"resume with num_rounds={n} asks for more rounds than the privacy budget can pay for: at the run's "
            f"noise multiplier {sigma:.6g}, {n} releases would spend epsilon {eps:.4g} > privacy.target_epsilon="
            f"{target:g} (at most {fit} fit), so resume with num_rounds<={max(agreed, fit)} or start a new run "
            "planned for more rounds.")


def check_resume(saved_cfg, cfg) -> None:
    """Resume-time privacy rules (``ValueError``, one sentence): the privacy mode stays what the checkpointed
    rounds ran under; client-level DP: :func:`check_client_level_resume` against the saved config's plan."""
    was, now = mode_of(saved_cfg), mode_of(cfg)
    if was != now:
        raise ValueError(f"resume cannot change the privacy mode from {was} to {now}: the checkpointed rounds were "
                         f"trained and accounted under {was}, so resume with the run's own privacy settings or start "
                         "a new run.")
    if now == "client_dp":
        check_client_level_resume(client_level_plan(saved_cfg), cfg)


def validate_config(cfg) -> None:
    """Config-time checks of the ``privacy`` group against the rest of the run config; ``ValueError`` with
    one sentence (``fedlora.config.validate`` turns it into a ConfigError, exit 2)."""
    mode = mode_of(cfg)
    if mode not in PRIVACY_MODES:
        raise ValueError(f"privacy.mode={mode!r} is unknown: choose one of {', '.join(PRIVACY_MODES)}.")
    if mode == "none":
        return
    priv = cfg.privacy
    weighting = str(priv.get("weighting", "uniform" if mode.startswith("client_dp") else "num_examples"))
    check_compatible(mode, weighting=weighting)
    r = priv.get("planned_rounds")
    if r not in (None, "null") and not (isinstance(r, int) and r >= 1):
        raise ValueError(f"privacy.planned_rounds={r} must be an integer >= 1 (or null for num_rounds).")
    given = [k for k in ("noise_multiplier", "target_epsilon") if priv.get(k) not in (None, "null")]
    if len(given) != 1:
        raise ValueError(
            f"privacy={mode} needs exactly one of privacy.target_epsilon (noise planned for the run) or "
            "privacy.noise_multiplier (fixed noise), "
            + ("got neither: set one of them." if not given else "got both: set one of them to null.")
        )
    try:
        dp = dp_config(cfg)
    except ValueError as e:
        raise ValueError(f"privacy: {str(e).rstrip('.')}; set it in conf/privacy/"
                         f"{'dp_sgd' if mode == 'dp_sgd' else 'client_level'}.yaml or as privacy.<key>=...") from None
    if mode == "dp_sgd":
        if str(priv.get("optimizer", "adamw")) not in ("adamw", "sgd"):
            raise ValueError(f"privacy.optimizer={priv.get('optimizer')!r} must be adamw or sgd.")
        if str(cfg.get("kernels", "peft")) != "peft":
            raise ValueError(
                f"dp_sgd needs kernels=peft: the fused LoRA kernels (kernels={cfg.kernels}) bypass the nn.Linear "
                "forward that Opacus hooks to compute per-example gradients."
            )
        if not dp.poisson:  # said here too: the clients' own warning stays in their (Ray actor) logs without -v
            warnings.warn(
                "dp_sgd with privacy.poisson=false: the reported epsilon assumes Poisson sampling, so it is only "
                "an approximation.",
                stacklevel=2,
            )
        return
    # client_dp: Flower's fixed-clipping wrappers with accounting
    if str(priv.get("clipping", "server")) not in ("server", "client"):
        raise ValueError(f"privacy.clipping={priv.get('clipping')!r} must be server or client "
                         "(which side clips each update).")
    if dp.noise_multiplier is not None and dp.noise_multiplier <= 0:
        raise ValueError("client_dp needs privacy.noise_multiplier > 0 "
                         "(Flower's accountant refuses noise-free releases).")
    if float(cfg.fraction_train) < 1.0:
        warnings.warn(
            "client_dp with fraction_train < 1: Flower's accountant takes no amplification from sampling, "
            "so the reported epsilon is an upper bound.",
            stacklevel=2,
        )
