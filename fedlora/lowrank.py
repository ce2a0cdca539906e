"""Aggregation maths that changes ranks or re-factorises by SVD: FlexLoRA's redistribution and HetLoRA's padding and
truncation (heterogeneous ranks), FedSVD's orthonormal re-factorisation, and the rank rules of an export (numerical
and tolerance ranks, factors vs dense). Pure functions, torch in, torch out, with the conventions of
:mod:`fedlora.algebra` (whose shared helpers they use): ``states`` one :class:`AdapterState` per client, ``weights``
example counts, ``dW* = sum_k p_k s_k B_k A_k``. Nothing forms an m x n matrix unless a ``dense`` flag, or the
name, says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapters import AdapterState, LoraFactors
from .algebra import _average_extra, _average_trained, _check, _stacked, normalize

__all__ = [
    "svd_of_sum", "flexlora_global", "flexlora", "hetlora", "truncate", "orthonormal_refactor", "fedsvd",
    "numerical_rank", "tolerance_rank", "tolerance_factors", "dense_is_smaller", "refactor_product", "factored_norm",
]


# ----------------------------------------------------------------------------------------------
# FlexLoRA
# ----------------------------------------------------------------------------------------------
def _product_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of B A (B: m x R, A: R x n) without the m x n product, in float64: B = Q_B R_B and
    A^T = Q_A R_A (reduced QR), the SVD of the small core R_B R_A^T = U' S V'^T, U = Q_B U', Vh = V'^T Q_A^T.
    Cost O(R^2 (m + n) + R^3)."""
    QB, RB = torch.linalg.qr(B.double())
    QA, RA = torch.linalg.qr(A.double().T)
    Uc, S, Vhc = torch.linalg.svd(RB @ RA.T, full_matrices=False)
    return QB @ Uc, S, Vhc @ QA.T


def svd_of_sum(states: Sequence[AdapterState], weights: Sequence[float], dense: bool = False,
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Thin SVD (U, S, Vh) of W_g = sum_k p_k s_k B_k A_k = B_s A_s per module.

    Low-rank path (default): B_s = Q_B R_B, A_s^T = Q_A R_A (reduced QR), so W_g = Q_B (R_B R_A^T) Q_A^T; the SVD
    of the small core R_B R_A^T = U' S V'^T gives U = Q_B U', V = Q_A V'. Cost O((sum r_k)^2 (m+n)), no m x n.
    ``dense``: torch.linalg.svd of the dense W_g (tests). Computed in float64.
    """
    p = _check(states, weights)
    out = {}
    for name in states[0].lora:
        B_s, A_s = _stacked([st.lora[name] for st in states], p, dtype=torch.float64)
        if dense:
            U, S, Vh = torch.linalg.svd(B_s @ A_s, full_matrices=False)
        else:
            U, S, Vh = _product_svd(B_s, A_s)
        out[name] = (U, S, Vh)
    return out


def _rank_r_factors(U, S, Vh, r: int, scale: float, dtype) -> LoraFactors:
    """B = U_r S_r / scale, A = V_r^T; if fewer than r directions exist, A gets orthonormal complement rows
    (deterministic) and B zero columns, so the extra ranks start like a fresh LoRA (B = 0, A != 0)."""
    k = min(r, S.shape[0])
    A, B = Vh[:k], U[:, :k] * (S[:k] / scale)
    if k < r:
        n, extra = Vh.shape[1], r - k
        if k + extra > n:
            raise ValueError(f"rank {r} exceeds the input dimension {n}")
        gen = torch.Generator().manual_seed(0)
        E = torch.randn(n, extra, generator=gen, dtype=Vh.dtype).to(Vh.device)
        E -= A.T @ (A @ E)
        Q, _ = torch.linalg.qr(E)
        A = torch.cat([A, Q.T], 0)
        B = torch.cat([B, B.new_zeros(B.shape[0], extra)], 1)
    return LoraFactors(A.to(dtype).contiguous(), B.to(dtype).contiguous(), float(scale))


def flexlora_global(states: Sequence[AdapterState], weights: Sequence[float], rank: int | None = None,
                    dense: bool = False) -> AdapterState:
    """W_g's SVD factors (B = U S, A = V^T, scale 1; truncated to ``rank`` if given) plus averaged extra:
    the global FlexLoRA model for evaluation (B A = W_g when untruncated)."""
    p = _check(states, weights)
    dtype = next(iter(states[0].lora.values())).A.dtype
    lora = {}
    for name, (U, S, Vh) in svd_of_sum(states, p, dense=dense).items():
        lora[name] = _rank_r_factors(U, S, Vh, rank if rank is not None else S.shape[0], 1.0, dtype)
    return AdapterState(lora, _average_extra(states, p))


def flexlora(states: Sequence[AdapterState], weights: Sequence[float], ranks: Sequence[int],
             scales: Sequence[float], dense: bool = False) -> list[AdapterState]:
    """FlexLoRA (Bai et al., "Federated Fine-tuning of LLMs under Heterogeneous Tasks and Client Resources",
    NeurIPS 2024): W_g = sum_k p_k s_k B_k A_k = U S V^T, and the client with rank r and scale s gets
    B = U_r S_r / s, A = V_r^T, so its PEFT layer's s B A is the best rank-r approximation of W_g
    (Eckart-Young). ``ranks``/``scales``: one per target client (may differ from the senders). Extra averaged.
    SVD via :func:`svd_of_sum` (QR of the stacked factors; ``dense`` for tests).
    """
    if len(ranks) != len(scales):
        raise ValueError(f"{len(ranks)} ranks but {len(scales)} scales")
    p = _check(states, weights)
    dtype = next(iter(states[0].lora.values())).A.dtype
    svds = svd_of_sum(states, p, dense=dense)
    extra = _average_extra(states, p)
    outs = []
    for r, s in zip(ranks, scales):
        lora = {name: _rank_r_factors(U, S, Vh, int(r), float(s), dtype) for name, (U, S, Vh) in svds.items()}
        outs.append(AdapterState(lora, {k: v.clone() for k, v in extra.items()}))
    return outs


# ----------------------------------------------------------------------------------------------
# HetLoRA
# ----------------------------------------------------------------------------------------------
def hetlora(states: Sequence[AdapterState], weights: Sequence[float], ranks: int | Sequence[int] | None = None,
            norm_weighted: bool = False, r_max: int | None = None) -> AdapterState:
    """HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
    EMNLP 2024): zero-pad every client's factors to rank R = max(``ranks``, ``r_max``, ranks sent) (``ranks``:
    every client's rank, or ``r_max`` directly, so that clients absent this round can still truncate), then
    A_g = sum_k w_k pad(A_k), B_g = sum_k w_k pad(s_k B_k), global scale 1 (scales folded into B so clients with
    different alpha/r mix consistently). w_k = p_k, or with ``norm_weighted`` w_k ∝ p_k ||s_k B_k A_k||_F per
    module (the paper's sparsity-weighted aggregation; norms from r x r Grams). Extra averaged by p_k.
    Padding is done by accumulating into the leading rows/columns (no padded copies). Way back: :func:`truncate`.
    """
    p = _check(states, weights)
    lora = {}
    for name in states[0].lora:
        fs = [st.lora[name] for st in states]
        wanted = [ranks] if isinstance(ranks, int) else list(ranks or [])
        R = max([f.rank for f in fs] + wanted + [r_max or 0])
        if norm_weighted:
            norms = [abs(f.scale) * float(((f.B.T @ f.B) * (f.A @ f.A.T)).sum().clamp_min(0).sqrt()) for f in fs]
            w = [pk * nk for pk, nk in zip(p, norms)]
            w = normalize(w) if sum(w) > 0 else p
        else:
            w = p
        A = fs[0].A.new_zeros(R, fs[0].A.shape[1])
        B = fs[0].B.new_zeros(fs[0].B.shape[0], R)
        for f, wk in zip(fs, w):
            A[: f.rank].add_(f.A, alpha=wk)
            B[:, : f.rank].add_(f.B, alpha=wk * f.scale)
        lora[name] = LoraFactors(A, B, 1.0)
    return AdapterState(lora, _average_extra(states, p))


def truncate(global_state: AdapterState, rank: int, scale: float) -> AdapterState:
    """HetLoRA's way back: a client of rank r and scale s gets A = A_g[:r], B = B_g[:, :r] / s (so s B A is the
    leading rank-r part of the global product). Extra is copied. ValueError if r exceeds the global rank."""
    lora = {}
    for name, f in global_state.lora.items():
        if rank > f.rank:
            raise ValueError(f"cannot truncate module {name!r} of rank {f.rank} to the larger rank {rank} "
                             f"(aggregate with hetlora(..., ranks=[..., {rank}]))")
        lora[name] = LoraFactors(f.A[:rank].clone(), f.B[:, :rank] * (f.scale / scale), float(scale))
    return AdapterState(lora, {k: v.clone() for k, v in global_state.extra.items()})


# ----------------------------------------------------------------------------------------------
# FedSVD
# ----------------------------------------------------------------------------------------------
def orthonormal_refactor(state: AdapterState) -> AdapterState:
    """Re-factorise every module's product by its SVD: B A = U S V^T (thin, rank r) gives A' = V^T (orthonormal
    rows, A' A'^T = I) and B' = U S, scale and extra kept, so s B' A' = s B A exactly (B A has rank <= r: nothing
    is truncated). Low rank, no m x n matrix: B = Q_B R_B, A^T = Q_A R_A (reduced QR), the r x r core
    R_B R_A^T = U' S V'^T, so U = Q_B U', V = Q_A V'; cost O(r^2 (m+n)), in float64, cast back. A' spans the row
    space of A (that of B A and, when B A has rank k < r, the rest of A's: A' is orthonormal whatever B is).
    Needs r <= min(m, n) (ValueError)."""
    lora = {}
    for name, f in state.lora.items():
        r, (m, n) = f.rank, (f.B.shape[0], f.A.shape[1])
        if r > min(m, n):
            raise ValueError(f"module {name!r}: rank {r} exceeds min(out, in) = {min(m, n)}, so its product has no "
                             f"rank-{r} orthonormal factorisation; use a rank of at most {min(m, n)}.")
        U, S, Vh = _product_svd(f.B, f.A)
        A, B = Vh, U * S
        lora[name] = LoraFactors(A.to(f.A.dtype).contiguous(), B.to(f.B.dtype).contiguous(), f.scale)
    return AdapterState(lora, dict(state.extra))


def fedsvd(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", NeurIPS
    2025): clients train B with the shared A frozen; the server averages B (s B_bar A = sum_k p_k s B_k A = dW*
    exactly, as FFA-LoRA) and re-factorises B_bar A = U S V^T by :func:`orthonormal_refactor`: the next round's
    A = V^T (orthonormal rows, the aggregate's principal input directions first) and B = U S, the same product.
    ValueError if A (torch.equal) or the scale differ between clients.
    """
    return orthonormal_refactor(_average_trained(states, weights, "B", "FedSVD"))


# ----------------------------------------------------------------------------------------------
# Rank rules (exports)
# ----------------------------------------------------------------------------------------------
def numerical_rank(S: torch.Tensor, rtol: float = 1e-10) -> int:
    """The number of singular values above ``rtol`` times the largest (0 for a zero matrix)."""
    if S.numel() == 0 or not bool(S[0] > 0):
        return 0
    return int((S > S[0] * rtol).sum())


def tolerance_rank(S: torch.Tensor, tol: float) -> int:
    """The smallest k whose discarded tail meets a relative Frobenius tolerance: ||S[k:]|| <= tol * ||S|| (S the
    singular values, descending; the tail's norm is the error of the best rank-k approximation). 0 for a zero matrix.
    Tail sums are accumulated from the smallest value up, in float64."""
    sq = S.detach().double().square()
    total = float(sq.sum()) if sq.numel() else 0.0
    if total == 0.0:
        return 0
    tails = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])  # tails[k] = sum_{i >= k} S_i^2
    return int((tails <= (float(tol) ** 2) * total).nonzero()[0])


def tolerance_factors(delta: torch.Tensor, tol: float) -> tuple[LoraFactors, int]:
    """A dense update dW (m x n) as float32 LoRA factors of the smallest rank k (at least 1) with
    ||B A - dW||_F <= tol * ||dW||_F: the SVD truncated at :func:`tolerance_rank`, A = Vh_k (orthonormal rows),
    B = U_k S_k, scale 1. When float32 rounding of the factors pushes the error past tol (a tail just under it), k
    grows until it does not; a tol below what float32 factors can hold (their rounding alone exceeds it, about
    1e-7 relative) keeps the smallest k of the exact factorisation. Returns (factors, k)."""
    d = delta.double()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    k, bound, first = max(1, tolerance_rank(S, tol)), float(tol) * float(torch.linalg.norm(d)), None
    while True:
        f = LoraFactors(Vh[:k].float().contiguous(), (U[:, :k] * S[:k]).float().contiguous(), 1.0)
        first, err = first or (f, k), float(torch.linalg.norm(f.delta() - d))
        if err <= bound:
            return f, k
        if k >= S.numel() or err * err - float(S[k:].square().sum()) > bound * bound:  # rounding: no k helps
            return first
        k += 1


def dense_is_smaller(rank: int, m: int, n: int) -> bool:
    """True when rank-r factors of an m x n update hold at least as many numbers as the update: r(m + n) >= m n."""
    return int(rank) * (int(m) + int(n)) >= int(m) * int(n)


# ----------------------------------------------------------------------------------------------
# Re-factorising a product given as factors (FLoRA's downlink)
# ----------------------------------------------------------------------------------------------
def refactor_product(B: torch.Tensor, A: torch.Tensor, tol: float = 0.0, rtol: float = 1e-10,
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """B A (B: m x R, A: R x n) re-factorised at a smaller rank without forming the m x n product: the
    low-rank SVD of :func:`svd_of_sum` (reduced QR B = Q_B R_B and A^T = Q_A R_A, SVD of the small core
    R_B R_A^T = U' S V'^T, so B A = (Q_B U') S (Q_A V')^T), cut at k singular values:

    * ``tol`` = 0 (default): the numerical rank (:func:`numerical_rank`, values above ``rtol`` times the largest),
      so B' A' = B A to rounding, e.g. FLoRA's stacked update of K clients sharing directions, or of sum r_k > m;
    * ``tol`` > 0: the smallest k whose discarded tail is within a relative Frobenius tolerance,
      ||B' A' - B A||_F = ||S[k:]|| <= tol ||B A||_F (:func:`tolerance_rank`, Eckart-Young: the best rank-k).

    Returns float64 ``(B', A', k)`` with the singular values all on B' (B' = U_k S_k, A' = V_k^T with orthonormal
    rows), as :func:`tolerance_factors` and :func:`orthonormal_refactor` do. k >= 1 when R >= 1 (a zero product keeps
    one zero column rather than empty arrays). Cost O(R^2 (m + n) + R^3), memory O(R (m + n))."""
    U, S, Vh = _product_svd(B, A)
    k = tolerance_rank(S, tol) if tol > 0 else numerical_rank(S, rtol)
    k = min(max(k, 1), S.numel())
    return U[:, :k] * S[:k], Vh[:k], k


def factored_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B A||_F from the factors (B: m x R, A: R x n) without the m x n product: ||R_B R_A^T||_F of the reduced QRs
    B = Q_B R_B, A^T = Q_A R_A (orthonormal Q's keep the norm), in float64. With B = [B_1, -B_2] and A = [A_1; A_2]
    it is the distance ||B_1 A_1 - B_2 A_2||_F, free of the cancellation of a difference of Gram traces."""
    _, RB = torch.linalg.qr(B.double())
    _, RA = torch.linalg.qr(A.double().T)
    return float(torch.linalg.norm(RB @ RA.T))
