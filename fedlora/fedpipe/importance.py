"""Importance of the base weight matrices (|W·∂L/∂W|, EMA over warm-up batches), its aggregation over
clients and the choice of the modules that get LoRA (docs/fedpipe.md, "Importance").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedlora.quant import DEFAULT_SKIP, is_target


def _clean_name(name: str) -> str:
    name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def candidate_modules(model: nn.Module, targets=None, skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, nn.Module]:
    """Base linear layers (plain, bitsandbytes, or the ``base_layer`` of a PEFT wrapper) by clean name."""
    out = {}
    for n, m in model.named_modules():
        if not isinstance(m, nn.Linear) or ".lora_" in n or hasattr(m, "base_layer"):
            continue
        clean = _clean_name(n)
        if is_target(clean, targets, skip):
            out[clean] = m
    return out


def importance_scores(model: nn.Module, batches: Sequence[Mapping] | Iterable[Mapping], steps: int | None = None, *,
                      beta: float = 0.85, targets=None, skip: Iterable[str] = DEFAULT_SKIP,
                      loss_fn: Callable | None = None) -> dict[str, float]:
    """Sensitivity of every candidate weight matrix: S = Σ_ij |W_ij · ∂L/∂W_ij| per step, smoothed with an
    EMA over ``steps`` warm-up batches (Ī_1 = S_1, Ī_t = β·Ī_{t−1} + (1−β)·S_t). Since the sum over a matrix
    and the EMA are both linear, this equals the EMA of the element-wise scores summed per matrix.

    ∂L/∂W is formed from hooks, ``Σ_tokens δ_out ⊗ x_in`` in fp32, so it works for frozen and quantised
    (4/8-bit: W is the dequantised weight, formed one module at a time) bases; the weights are not updated
    (warm-up batches are evaluated on the same model) and the model runs in eval mode (no dropout).
    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``. Batches are cycled if fewer than ``steps``.
    """
    from fedlora.quant import dequantized_weight

    mods = candidate_modules(model, targets, skip)
    if not mods:
        raise ValueError("importance_scores: no candidate linear layers")
    batches = list(batches)
    steps = steps or len(batches)
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    step_score: dict[str, float] = {}
    handles = []

    def fwd_hook(name):
        def hook(mod, inputs, output):
            x = inputs[0].detach()
            if not output.requires_grad:
                output.requires_grad_(True)

            def grad_hook(g):
                gw = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                w = dequantized_weight(mod)  # transient fp32 copy, one module at a time
                step_score[name] = step_score.get(name, 0.0) + float((w.to(gw.device) * gw).abs().sum())

            output.register_hook(grad_hook)
            return output

        return hook

    was_training = model.training
    model.eval()
    ema: dict[str, float] = {}
    try:
        for n, m in mods.items():
            handles.append(m.register_forward_hook(fwd_hook(n)))
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None:  # activations then require grad everywhere (keeps bitsandbytes on its training path)
            handles.append(emb.register_forward_hook(
                lambda _m, _i, out: out.requires_grad_(True) if not out.requires_grad else out))
        for t in range(steps):
            step_score.clear()
            batch = batches[t % len(batches)]
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                loss.backward()
            for n in mods:
                s = step_score.get(n, 0.0)
                ema[n] = s if t == 0 else beta * ema[n] + (1 - beta) * s
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return ema


def aggregate_importance(client_scores: Sequence[Mapping[str, float]], weights: Sequence[float] | None = None,
                         normalize: bool = True) -> dict[str, float]:
    """Weighted mean of clients' scores. With ``normalize`` each client's scores are first divided by their
    sum (so a client with a larger loss scale does not dominate); ``weights`` (e.g. example counts) are
    normalised to sum 1. Modules missing from a client count 0 for it."""
    if not client_scores:
        raise ValueError("no client scores")
    w = np.ones(len(client_scores)) if weights is None else np.asarray(weights, dtype=float)
    if len(w) != len(client_scores) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per client, not all zero")
    w = w / w.sum()
    keys = sorted(set().union(*client_scores))
    out = dict.fromkeys(keys, 0.0)
    for wk, sc in zip(w, client_scores):
        tot = sum(sc.values()) if normalize else 1.0
        tot = tot if tot > 0 else 1.0
        for k, v in sc.items():
            out[k] += wk * float(v) / tot
    return out


def select_modules(scores: Mapping[str, float], budget: int | float, *,
                   sizes: Mapping[str, int] | None = None) -> list[str]:
    """Top modules by score (ties by name), best first.

    budget: int k >= 1: the k best modules; float in (0, 1]: that fraction of the modules (rounded up); with
    ``sizes`` ({module: parameters per unit rank, e.g. in+out}) a float/int budget > 1 is read as a parameter
    budget and modules are taken in score order while they fit.
    """
    order = sorted(scores, key=lambda k: (-scores[k], k))
    if sizes is not None and budget > 1:
        chosen, used = [], 0
        for k in order:
            if used + sizes[k] <= budget:
                chosen.append(k)
                used += sizes[k]
        return chosen
    if isinstance(budget, float) and 0 < budget <= 1:
        k = math.ceil(budget * len(order))
    elif isinstance(budget, int) and budget >= 1:
        k = budget
    else:
        raise ValueError(f"budget must be an int >= 1 or a float in (0, 1], got {budget!r}")
    return order[:k]
