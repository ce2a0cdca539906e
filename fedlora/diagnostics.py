"""Diagnostics of a round's aggregation: how far a served product is from the exact average dW* of the clients'
products (pure functions; the strategies put them in the round's metrics). Conventions: :mod:`fedlora.algebra`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .adapters import AdapterState
from .algebra import _check, _dense_ideal, _fair_common, _ideal_sq_norm, _stacked
from .lowrank import svd_of_sum

__all__ = ["cross_term_error", "product_cosine", "lora_fair_report", "truncation_error"]

#: modules with more elements (m n) than this are measured from Gram matrices of stacked factors, not densely
DENSE_LIMIT = 16_000_000
#: multiply-adds a second of :func:`cross_term_error`, measured on 2 cores in float64 (``bench/diagnostics_cost.py``)
MACS_PER_SECOND = 4.4e10


def cross_term_cost(shapes: dict[str, tuple[int, int]], ranks: Sequence[int], served_rank: int,
                    dense_limit: int = DENSE_LIMIT) -> float:
    """Multiply-adds of one :func:`cross_term_error` for clients of ``ranks`` on modules of ``shapes`` (out m, in n),
    served at rank ``served_rank``: densely (m n <= ``dense_limit``) (sum r_k + r) m n for dW* and the served
    product; else (R^2 + (sum r_k)^2)(m + n), R = sum r_k + r, for the Grams of the stacked difference and of dW*
    (every pair of clients: quadratic in their number; :data:`MACS_PER_SECOND`)."""
    total, R = float(sum(ranks)), float(sum(ranks) + served_rank)
    return sum(R * m * n if m * n <= dense_limit else (R * R + total * total) * (m + n) for m, n in shapes.values())


def _gram_sq_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B A||_F^2 = <B^T B, A A^T> (float64; clamped at 0 against rounding)."""
    B, A = B.double(), A.double()
    return max(0.0, float(((B.T @ B) * (A @ A.T)).sum()))


def _rss_ratio(num_sq: float, den_sq: float) -> float:
    """sqrt(num_sq / den_sq); 0 when both are 0, inf when only the denominator is."""
    if den_sq > 0:
        return math.sqrt(num_sq / den_sq)
    return 0.0 if num_sq == 0 else math.inf


def cross_term_error(served: AdapterState, states: Sequence[AdapterState], weights: Sequence[float],
                     dense_limit: int = DENSE_LIMIT) -> float:
    """The aggregation ("cross-term") error of a served adapter, summed over the clients' modules:
        sqrt(sum_modules ||s B A - dW*||_F^2) / sqrt(sum_modules ||dW*||_F^2),   dW* = sum_k p_k s_k B_k A_k
    (a ratio of root-sums-of-squares, i.e. the relative error of all modules' updates as one vector). ``served``
    holds (A, B, s) per module in any rank (FedIT's s B_bar A_bar, HetLoRA's padded global, ...). Per module in
    float64: densely when m n <= ``dense_limit``; else from the stacked difference B_d A_d = s B A - dW* as
    <B_d^T B_d, A_d A_d^T>, (r + sum r_k)^2 (m+n) work and no m x n matrix, whose rounding floor (~1e-8 relative:
    a difference of squares) hides errors below it."""
    p = _check(states, weights)
    err_sq = ideal_sq = 0.0
    for name in states[0].lora:
        fs, g = [st.lora[name] for st in states], served.lora[name]
        if g.B.shape[0] * g.A.shape[1] <= dense_limit:
            W = _dense_ideal(fs, p, torch.float64)
            ideal_sq += float(W.square().sum())
            err_sq += float(W.addmm_(g.B.double(), g.A.double(), alpha=-g.scale).square().sum())
        else:
            B_d, A_d = _stacked([g] + fs, [-1.0] + list(p), dtype=torch.float64)
            err_sq += _gram_sq_norm(B_d, A_d)
            ideal_sq += _ideal_sq_norm(fs, p)
    return _rss_ratio(err_sq, ideal_sq)


def product_cosine(served: AdapterState, states: Sequence[AdapterState], weights: Sequence[float]) -> float:
    """cos(vec(s B A), vec(dW*)) over all the clients' modules as one vector, from r x r_k Grams (no m x n):
    <B A, B_k A_k> = <B^T B_k, A A_k^T>, ||s B A||^2 = s^2 <B^T B, A A^T>, ||dW*||^2 as in :func:`lora_fair`.
    0 when either side is zero."""
    p = _check(states, weights)
    dot = served_sq = ideal_sq = 0.0
    for name in states[0].lora:
        fs, g = [st.lora[name] for st in states], served.lora[name]
        B, A = g.B.double(), g.A.double()
        for f, w in zip(fs, p):
            dot += g.scale * w * f.scale * float(((B.T @ f.B.double()) * (A @ f.A.double().T)).sum())
        served_sq += g.scale ** 2 * _gram_sq_norm(B, A)
        ideal_sq += _ideal_sq_norm(fs, p)
    return dot / math.sqrt(served_sq * ideal_sq) if served_sq > 0 and ideal_sq > 0 else 0.0


def lora_fair_report(states: Sequence[AdapterState], weights: Sequence[float], corrected: AdapterState) -> dict:
    """LoRA-FAIR's own diagnostics for a corrected state (:func:`lora_fair`'s output for these states):
    ``db_ratio`` = sqrt(sum ||dB||_F^2) / sqrt(sum ||B_bar||_F^2) over modules (how far the correction moved B),
    ``cos_before`` / ``cos_after`` = :func:`product_cosine` of FedIT's s B_bar A_bar and of s (B_bar + dB) A_bar,
    ``corrected_share`` = the share of modules whose dB is not exactly zero. B_bar is recomputed exactly as
    :func:`lora_fair` computes it, so an uncorrected module has dB = 0 bit for bit."""
    p, base = _fair_common(states, weights)
    db_sq = b_sq = 0.0
    nonzero = 0
    for name, g in base.lora.items():
        dB = corrected.lora[name].B.double() - g.B.double()
        nonzero += int(bool(dB.any()))
        db_sq += float(dB.square().sum())
        b_sq += float(g.B.double().square().sum())
    return {"db_ratio": _rss_ratio(db_sq, b_sq), "cos_before": product_cosine(base, states, p),
            "cos_after": product_cosine(corrected, states, p), "corrected_share": nonzero / max(1, len(base.lora))}


def truncation_error(states: Sequence[AdapterState], weights: Sequence[float],
                     ranks: Sequence[int]) -> dict[int, float]:
    """FlexLoRA's loss per client rank r: sqrt(sum_modules sum_{i >= r} S_i^2) / sqrt(sum_modules sum_i S_i^2),
    S the singular values of dW* (:func:`svd_of_sum`): the relative error of the best rank-r approximation a
    rank-r client receives (Eckart-Young), summed over modules as root-sums-of-squares."""
    svds = svd_of_sum(states, weights)
    total = sum(float(S.square().sum()) for _, S, _ in svds.values())
    out = {}
    for r in sorted({int(x) for x in ranks}):
        tail = sum(float(S[r:].square().sum()) for _, S, _ in svds.values())
        out[r] = _rss_ratio(tail, total)
    return out
