"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020),
option II of the paper's Algorithm 1, on the tensors a strategy averages (``train.scaffold``).

The server keeps a control variate c, each client i its own c_i (both start at 0), one tensor per averaged tensor
(flat keys as :func:`fedlora.adapters.to_arrays` names them: ``<module>.lora_A``, ``<module>.lora_B``,
``extra.<param>``). In a round a sampled client starts from x, takes K local steps, each followed by the correction
w ← w − η_k·(c − c_i) (:func:`apply_correction`), ends at y and updates (:func:`client_control`, paper eq. (4) II)

    c_i⁺ = c_i − c + (x − y) / (K·η),      Δc_i = c_i⁺ − c_i,

and the server, with S the accepted clients of the round and N = ``num_clients`` (:func:`server_control`),

    c ← c + (|S|/N)·mean_{i∈S} Δc_i = c + (1/N)·Σ_{i∈S} Δc_i.

**The learning rate.** The paper's local step is SGD, y ← y − η(g_i(y) + c − c_i), and K·η is the length of the
round's path in units of gradient. Here the lr follows a schedule, so K·η is the sum of the K steps' scheduled rates
(K times their mean, :func:`lr_sum`); with a constant schedule it is K·η exactly. With AdamW (the default optimizer) a
step moves a coordinate by about η whatever the gradient's size, so (x − y)/(K·η) is the client's mean *displacement
per unit lr*, not its mean gradient, and adding c − c_i (in those units) to the raw gradient before Adam would mix
units. We therefore follow OpenFedLLM (Ye et al., KDD 2024; its ``SCAFFOLD_Callback``): the correction is a separate
step −η_k·(c − c_i) taken right after each optimizer step, at that step's lr, outside Adam's preconditioning and after
the gradient clipping (which then bounds the data gradient alone). For plain SGD this is exactly the paper's
g + (c − c_i); under DP-SGD it comes after Opacus's clipping and noise and reads no example (it depends on c, sent by
the server, and c_i, the node's own state from earlier released steps): post-processing, ε unchanged.

Pure: torch tensors in, tensors out (maths in float64, results float32: the wire format and the node's state); no
Flower, no files.
"""

from __future__ import annotations

import torch

from .adapters import LORA_A, LORA_B, _strip, lora_layers

#: name of the ArrayRecord that carries c in a train message and Δc_i in its reply (``docs/messages.md``)
RECORD = "scaffold"
#: context.state record of a node's own control variate c_i (float32, one array per key)
NODE_STATE = "scaffold-c-i"


def enabled(cfg) -> bool:
    """``train.scaffold`` of a run config (a config saved before the key existed has none: off)."""
    train = cfg.get("train") if hasattr(cfg, "get") else None
    return bool(train.get("scaffold", False)) if train is not None else False


def _zeros_like(ref: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``held`` completed with zeros (float32) for every key of ``ref`` it lacks: a control variate not yet set."""
    return {k: held[k] if k in held else torch.zeros(tuple(v.shape), dtype=torch.float32) for k, v in ref.items()}


def client_control(c: dict, c_i: dict, x: dict, y: dict, steps: int, lr: float) -> tuple[dict, dict]:
    """A client's control update (option II): ``(c_i_new, delta)`` with c_i⁺ = c_i − c + (x − y)/(steps·lr) and
    Δc_i = c_i⁺ − c_i, per key of ``x`` (what the client received) and ``y`` (what it trained); ``lr`` is the mean
    scheduled lr of the round's steps (``steps·lr`` = :func:`lr_sum`). A key missing from ``c`` or ``c_i`` is 0.
    Computed in float64, returned float32."""
    if steps <= 0 or not lr > 0:
        raise ValueError(f"SCAFFOLD's control update needs steps > 0 and lr > 0, got steps={steps}, lr={lr}.")
    c, c_i = _zeros_like(x, c), _zeros_like(x, c_i)
    new, delta = {}, {}
    for k in x:
        cin = c_i[k].double()
        n = cin - c[k].double() + (x[k].double() - y[k].double()) / (float(steps) * float(lr))
        new[k], delta[k] = n.float(), (n - cin).float()
    return new, delta


def server_control(c: dict, deltas: list[dict], n_total: int) -> dict:
    """The server's control update: c + (|S|/N)·mean(Δc_i) = c + (1/N)·Σ Δc_i over the round's ``deltas`` (one dict
    per accepted client, |S| = len(deltas)); N = ``n_total`` (``num_clients``). Keys no delta has keep their value;
    a key first seen starts at 0. Computed in float64, returned float32."""
    if n_total < 1:
        raise ValueError(f"SCAFFOLD's server update needs N >= 1 clients, got {n_total}.")
    out = {k: v.double() for k, v in c.items()}
    for d in deltas:
        for k, v in d.items():
            out[k] = out.get(k, torch.zeros(tuple(v.shape), dtype=torch.float64)) + v.double() / float(n_total)
    return {k: v.float() for k, v in out.items()}


def lr_sum(step_offset: int, steps: int, total_steps: int, base_lr: float, scheduler: str, warmup: int = 0) -> float:
    """K·η of the control update: the sum of the scheduled lrs (:func:`fedlora.train.lr_at`) of the round's ``steps``
    steps, i.e. ``steps`` times their mean (exactly steps·lr with a constant schedule)."""
    from .train import lr_at

    return float(sum(lr_at(step_offset + i, total_steps, base_lr, scheduler, warmup) for i in range(steps)))


def params_of(model, keys) -> dict[str, torch.nn.Parameter]:
    """The PEFT model's parameters under the flat keys ``keys`` (``<module>.lora_A``/``lora_B`` of the active adapter
    ``default``, ``extra.<param>``). An unknown key raises KeyError (c names a tensor this model lacks)."""
    layers = lora_layers(model)
    named = {_strip(n): p for n, p in model.named_parameters()}
    out = {}
    for k in keys:
        if k.startswith("extra."):
            p = named.get(k[len("extra."):])
        else:
            name, part = k.rsplit(".", 1)
            layer = layers.get(name)
            p = None if layer is None or part not in (LORA_A, LORA_B) else getattr(layer, part)["default"].weight
        if p is None:
            raise KeyError(f"SCAFFOLD control variate {k!r} names no parameter of this model")
        out[k] = p
    return out


def corrections(params: dict[str, torch.nn.Parameter], c: dict, c_i: dict) -> list[tuple[torch.nn.Parameter,
                                                                                       torch.Tensor]]:
    """``[(parameter, c − c_i)]`` for every trainable parameter of ``params`` (frozen ones, e.g. FFA-LoRA's A or
    RoLoRA's factor of the other turn, get none) whose correction is not identically zero (a client with c = c_i,
    e.g. every client in round 1, gets none); in the parameter's dtype and device."""
    out = []
    for k, p in params.items():
        if not p.requires_grad:
            continue
        d = c[k].double() - c_i[k].double() if k in c_i else c[k].double()
        if bool(d.any()):
            out.append((p, d.to(dtype=p.dtype, device=p.device)))
    return out


@torch.no_grad()
def apply_correction(pairs, lr: float) -> None:
    """SCAFFOLD's correction after an optimizer step taken at ``lr``: w ← w − lr·(c − c_i) for every
    ``(parameter, c − c_i)`` of :func:`corrections` (for plain SGD the same as adding c − c_i to the gradient)."""
    for p, d in pairs:
        p.add_(d, alpha=-float(lr))
