"""Server-side optimisers (``server.optimizer``): what the server does with a round's aggregate.

The strategy averages what the clients send (FedIT: A, B and the head; FFA-LoRA: B and the head; RoLoRA: the round's
trained factor and the head). Per averaged tensor the round's pseudo-gradient is Δ = aggregate − x, with x the value
the clients started from, and the server serves x + step(Δ):

- ``avg``: step(Δ) = Δ, i.e. the aggregate itself (plain averaging; :func:`apply` returns the aggregate untouched).
- ``avgm`` (FedAvgM, Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification", 2019): v ← momentum·v + Δ, step = lr·v.
- ``adam``, ``yogi``, ``adagrad`` (FedAdam / FedYogi / FedAdagrad, Reddi et al., "Adaptive Federated Optimization",
  ICLR 2021): m ← β1·m + (1 − β1)·Δ and
    adam:    v ← β2·v + (1 − β2)·Δ²,                 step = η_t·m / (√v + τ), η_t = η·√(1 − β2^(t+1)) / (1 − β1^(t+1))
    yogi:    v ← v − (1 − β2)·Δ²·sign(v − Δ²),       step = η·m / (√v + τ)
    adagrad: v ← v + Δ² (and m = Δ: β1 = 0),          step = η·m / (√v + τ)
  with m, v starting at zero and t the server round.
- ``fedexp`` (FedExP, Jhunjhunwala, Wang and Joshi, "FedExP: Speeding Up Federated Averaging via Extrapolation", ICLR
  2023, Algorithm 1): one step size for the whole round, step = η_g·Δ with
    η_g = max(1, Σ_k p_k‖Δ_k‖² / (2(‖Δ‖² + ε)))
  over the round's client updates Δ_k = x_k − x (all averaged tensors together) and their weights p_k (Δ = Σ_k p_k Δ_k).
  With equal weights this is the paper's Σ_i‖Δ_i‖² / (2M(‖Δ̄‖² + ε)): when the clients' updates disagree their
  average shrinks, and the server extrapolates along it. No state; it needs each client's update
  (:meth:`ServerOptimizer.apply`'s ``clients``), so it is no post-processing of a client-level DP release.

These are the update rules and defaults of Flower 1.42's ``FedAvgM``, ``FedAdam``, ``FedYogi`` and ``FedAdagrad``
(``flwr/serverapp/strategy/``), including FedAdam's bias correction with exponent t + 1 over the server round and
FedAdagrad's β1 = 0. Defaults of ``lr`` (null): Flower's η per optimizer (:data:`DEFAULT_LR`); ``momentum`` 0.9 is
Hsu et al.'s (Flower's FedAvgM defaults to 0, which is plain averaging with a learning rate); β1 = 0.9, β2 = 0.99,
τ = 1e-3 are Flower's FedAdam/FedYogi defaults (Reddi et al. tune τ over 1e-1…1e-5).

The maths is in float64 (moments kept in float64); each new value is cast back to the tensor's own dtype. Pure: torch
tensors in, tensors out; no Flower, no files. :class:`ServerOptimizer` is the strategy's checkpointed component
(``fedlora.strategies.base.LoraStrategy.components``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import LORA_A, LORA_B, AdapterState, LoraFactors

OPTIMIZERS = ("avg", "avgm", "adam", "yogi", "adagrad", "fedexp")
#: η when ``server.lr`` is null: Flower 1.42's defaults (FedAvgM server_learning_rate; FedAdam/FedYogi/FedAdagrad eta)
DEFAULT_LR = {"avg": 1.0, "avgm": 1.0, "adam": 0.1, "yogi": 0.01, "adagrad": 0.1, "fedexp": 1.0}


@dataclass(frozen=True)
class ServerOptConfig:
    """``server.*`` of a run config (:func:`config_of`)."""

    optimizer: str = "avg"
    lr: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    eps: float = 1e-3  # fedexp's ε

    @property
    def eta(self) -> float:
        """The server learning rate: ``lr``, or the optimizer's default (:data:`DEFAULT_LR`) when it is null."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.optimizer]


def config_of(cfg) -> ServerOptConfig:
    """The server optimizer of a run config; a config without a ``server`` section (runs saved before it existed)
    averages (``avg``)."""
    srv = cfg.get("server") if hasattr(cfg, "get") else None
    if not srv:
        return ServerOptConfig()
    d = ServerOptConfig()
    get = lambda k: srv.get(k, getattr(d, k))  # noqa: E731
    return ServerOptConfig(optimizer=str(get("optimizer")), lr=None if get("lr") is None else float(get("lr")),
                           momentum=float(get("momentum")), beta1=float(get("beta1")), beta2=float(get("beta2")),
                           tau=float(get("tau")), eps=float(get("eps")))


def check_supported(cfg, strategy: str, supported: bool, reason: str, able: list[str]) -> None:
    """Refuse, in one sentence naming the fix, a ``server.optimizer`` other than avg for a strategy whose aggregate is
    not an average of what its clients started from (``reason``: why, one clause; ``able``: the strategies that
    support it)."""
    opt = config_of(cfg).optimizer
    if opt != "avg" and not supported:
        from .config import ConfigError

        raise ConfigError(f"server.optimizer={opt} is not defined for strategy {strategy}: {reason}; use "
                          f"server.optimizer=avg or strategy {', '.join(able[:-1])} or {able[-1]}.")


def step(state: dict[str, torch.Tensor], delta: torch.Tensor, cfg: ServerOptConfig,
         t: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One server step on one tensor: ``(update, new_state)``; the served value is ``x + update`` where
    ``delta = aggregate − x``. ``state`` holds this tensor's moments (``{}`` before its first step; not modified),
    ``t`` is the server round (FedAdam's bias correction). ``avg``: ``(delta, state)`` (the identity on the
    aggregate). Computed in float64."""
    name = cfg.optimizer
    if name == "avg":
        return delta, state
    d = delta.double()
    zero = lambda: torch.zeros_like(d)  # noqa: E731
    if name == "avgm":
        v = cfg.momentum * state.get("v", zero()) + d
        return cfg.eta * v, {"v": v}
    if name not in ("adam", "yogi", "adagrad"):
        raise ValueError(f"server.optimizer={name} is not one of {', '.join(OPTIMIZERS)}.")
    beta1 = 0.0 if name == "adagrad" else cfg.beta1
    m = beta1 * state.get("m", zero()) + (1.0 - beta1) * d
    v = state.get("v", zero())
    d2 = d * d
    if name == "adam":
        v = cfg.beta2 * v + (1.0 - cfg.beta2) * d2
        eta = cfg.eta * math.sqrt(1.0 - cfg.beta2 ** (t + 1.0)) / (1.0 - cfg.beta1 ** (t + 1.0))
    elif name == "yogi":
        v = v - (1.0 - cfg.beta2) * d2 * torch.sign(v - d2)
        eta = cfg.eta
    else:
        v = v + d2
        eta = cfg.eta
    return eta * m / (torch.sqrt(v) + cfg.tau), {"m": m, "v": v}


def fedexp_lr(client_sq: list[float], weights: list[float], mean_sq: float, eps: float) -> float:
    """FedExP's server step size η_g = max(1, Σ_k p_k·client_sq[k] / (2·(mean_sq + eps))), with p_k = weights[k] / Σ
    weights, ``client_sq[k]`` = ‖Δ_k‖² and ``mean_sq`` = ‖Σ_k p_k Δ_k‖² (module docstring)."""
    total = float(sum(weights))
    if not client_sq or total <= 0:
        raise ValueError("fedexp needs at least one client update with a positive weight.")
    spread = sum(float(w) / total * float(q) for w, q in zip(weights, client_sq))
    return max(1.0, spread / (2.0 * (float(mean_sq) + float(eps))))


def keys_of(state: AdapterState, parts) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` named by ``parts`` (``lora_A``, ``lora_B``, ``extra``), under their flat keys
    (``<module>.lora_A``, ``extra.<param>``, as :func:`fedlora.adapters.to_arrays` names them)."""
    out = {}
    for name, f in state.lora.items():
        if LORA_A in parts:
            out[f"{name}.{LORA_A}"] = f.A
        if LORA_B in parts:
            out[f"{name}.{LORA_B}"] = f.B
    if "extra" in parts:
        out.update({f"extra.{k}": v for k, v in state.extra.items()})
    return out


class ServerOptimizer:
    """The server optimizer of a strategy, with its state: per tensor key its moments (float64). Checkpointed
    (:meth:`state_dict`), so a resumed run continues the same moments."""

    def __init__(self, cfg: ServerOptConfig | None = None):
        self.cfg = cfg or ServerOptConfig()
        self.moments: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0  # rounds stepped so far
        self.last_lr: float | None = None  # fedexp: the last round's η_g (the round's metrics)

    @property
    def active(self) -> bool:
        return self.cfg.optimizer != "avg"

    def apply(self, old: AdapterState, new: AdapterState, parts, t: int,
              clients: list[tuple[AdapterState, float]] | None = None) -> AdapterState:
        """The served adapter after round ``t``: ``new`` (the aggregate) with every tensor of ``parts`` replaced by
        old + step(new − old); the rest of ``new`` (e.g. FFA-LoRA's frozen A) as it is. ``avg``: ``new`` itself.
        ``clients``: the round's client states and weights, of which ``new`` is the weighted average (``fedexp``)."""
        if not self.active:
            return new
        before, after = keys_of(old, parts), keys_of(new, parts)
        if set(before) != set(after) or any(before[k].shape != after[k].shape for k in before):
            raise ValueError("the server optimizer needs the aggregate to hold the same tensors, of the same shapes, "
                             "as the adapter the clients started from.")
        served, moments = {}, dict(self.moments)
        if self.cfg.optimizer == "fedexp":
            if not clients:
                raise ValueError("server.optimizer=fedexp needs the round's client updates.")
            sq = lambda d: sum(float((d[k].double() - x.double()).pow(2).sum()) for k, x in before.items())  # noqa
            self.last_lr = fedexp_lr([sq(keys_of(s, parts)) for s, _ in clients], [w for _, w in clients], sq(after),
                                     self.cfg.eps)
            served = {k: (x.double() + self.last_lr * (after[k].double() - x.double())).to(x.dtype)
                      for k, x in before.items()}
        else:
            for k, x in before.items():
                upd, moments[k] = step(self.moments.get(k, {}), after[k].double() - x.double(), self.cfg, int(t))
                served[k] = (x.double() + upd).to(x.dtype)
        self.moments, self.steps = moments, self.steps + 1
        lora = {name: LoraFactors(served.get(f"{name}.{LORA_A}", f.A), served.get(f"{name}.{LORA_B}", f.B), f.scale)
                for name, f in new.lora.items()}
        extra = {k: served.get(f"extra.{k}", v) for k, v in new.extra.items()}
        return AdapterState(lora, extra)

    def round_metrics(self) -> dict:
        """This round's server step size where it is computed per round (fedexp: ``server_lr``), else nothing."""
        return {"server_lr": self.last_lr} if self.last_lr is not None else {}

    def state_dict(self) -> dict:
        return {"optimizer": self.cfg.optimizer, "moments": self.moments, "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        """Continue a checkpointed run's moments; a checkpoint of another optimizer is refused (one sentence)."""
        was = sd.get("optimizer", "avg")
        if was != self.cfg.optimizer:
            from .config import ConfigError

            raise ConfigError(f"the checkpoint was written with server.optimizer={was} but this run has "
                              f"server.optimizer={self.cfg.optimizer}: resume with the run's own server settings or "
                              "start a new run.")
        self.moments = {k: dict(v) for k, v in sd.get("moments", {}).items()}
        self.steps = int(sd.get("steps", 0))
