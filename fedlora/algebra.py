"""Server-side aggregation maths of the federated-LoRA methods: pure functions, torch in, torch out.

Conventions (see ``shared/ALGORITHMS.md``): a client's update of weight W (out m x in n) is ``s_k B_k A_k`` with
``A_k`` [r_k, n], ``B_k`` [m, r_k], ``s_k = alpha_k / r_k``; p_k = n_k / sum_j n_j; the ideal update of a round is
``dW* = sum_k p_k s_k B_k A_k``. Every function takes ``states`` (one :class:`AdapterState` per client, same
modules and extra keys) and ``weights`` (example counts or any non-negative numbers; normalised here).

Nothing here forms an m x n matrix unless its name or a ``dense`` flag says so: low-rank paths work on the
factors and on small r x r Gram matrices. What changes or re-factorises ranks by SVD (FlexLoRA, HetLoRA, FedSVD,
the rank rules of an export) is in :mod:`fedlora.lowrank`. LoRA-FAIR's solvers are in :mod:`fedlora.fair_solvers`; how far a
served product is from dW* (the strategies' diagnostics) in :mod:`fedlora.diagnostics`. Equations are written
out in each docstring; equation numbers of the papers are not quoted (the formulas are).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import compiled as inductor  # (the module; ``compiled`` is the flag of the functions below)
from . import fair_solvers
from .adapters import AdapterState, LoraFactors
from .as_sent import Int8Blocks, TopkEntries

__all__ = [
    "normalize", "ideal_update", "effective_update", "fedit", "flora_stack", "dense_or_stacked_bytes",
    "ffa_average", "fedex", "lora_fair", "lora_fair_dense", "rolora",
]


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def normalize(num_examples: Sequence[float]) -> list[float]:
    """p_k = n_k / sum_j n_j as Python floats (idempotent: normalised weights come back unchanged)."""
    n = [float(x) for x in num_examples]
    if not n or any(x < 0 or not math.isfinite(x) for x in n) or sum(n) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {n}")
    total = math.fsum(n)
    return [x / total for x in n]


def _check(states: Sequence[AdapterState], weights: Sequence[float]) -> list[float]:
    if not states:
        raise ValueError("no client states to aggregate")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    mods, extra = set(states[0].lora), set(states[0].extra)
    for i, st in enumerate(states[1:], 1):
        if set(st.lora) != mods:
            raise ValueError(f"client {i} has different LoRA modules: {sorted(set(st.lora) ^ mods)[:3]}")
        if set(st.extra) != extra:
            raise ValueError(f"client {i} has different extra parameters: {sorted(set(st.extra) ^ extra)[:3]}")
    for name in mods:  # (shapes read once a factor: this loop runs K x modules times a round)
        n, m = states[0].lora[name].A.shape[1], states[0].lora[name].B.shape[0]
        for i, st in enumerate(states):
            f = st.lora[name]
            a, b = f.A.shape, f.B.shape
            if a[1] != n or b[0] != m or a[0] != b[1]:
                A0, B0 = states[0].lora[name].A, states[0].lora[name].B
                raise ValueError(f"{name}: client {i} has A{tuple(a)} B{tuple(b)}, inconsistent "
                                 f"with client 0's A{tuple(A0.shape)} B{tuple(B0.shape)}")
    return normalize(weights)


#: Outputs summed together (:func:`_wsums`), in bytes: a core's L2 cache or two. On the 2-core EPYC measured (1 MiB
#: of L2 a core), 2, 4 and 8 MiB were equally fast and 1 MiB 5-10% slower (``bench/aggregation.py``, 100 clients).
GROUP_BYTES = 2 << 20


def _wsum(tensors: Sequence[torch.Tensor], p: Sequence[float]) -> torch.Tensor:
    """sum_k p_k t_k (:func:`_wsums` of one column)."""
    return _wsums([tensors], p)[0]


def _wsums(columns: Sequence[Sequence[torch.Tensor]], p: Sequence[float], compiled: bool = False
           ) -> list[torch.Tensor]:
    """[sum_k p_k t_k for each column (t_1 .. t_K) of the clients' tensors], in float32 or wider, in one pass over
    the inputs (in-place accumulation, no stacking copy). The outputs are taken in groups of about
    :data:`GROUP_BYTES`; each client's tensors of a group are added by one multi-tensor call of torch
    (``_foreach_add_``), so the cost of a call is shared by the group while its outputs stay in cache: 1.6-1.8x a
    ``torch.sum`` over the same bytes with 100 clients of Llama-7B-shaped adapters, against 1.9-2.3x with an
    ``add_`` a tensor (``bench/aggregation.py``). A 16-bit input (an fp16/bf16 reply as sent, :func:`fedlora.codecs.
    decode` with ``wide=False``) is widened exactly as it is read, so the sum is the one over its float32 decoding;
    int8 blocks as sent are widened in cache and scaled as they are added (:meth:`fedlora.as_sent.Int8Blocks.add_all`:
    the same sum within float32 rounding); top-k entries as sent are added at their indices (``index_add_``).
    ``compiled`` (``server.compile``; the same sums within float32 rounding): int8 replies from their messages where
    they are laid out alike (:func:`fedlora.compiled.message_sums`), and the other columns of fp16, bf16 or int8
    tensors a column at a time (:func:`fedlora.compiled.wsum`)."""
    if compiled:  # int8 messages summed whole where they can be, then each fp16, bf16 or int8 column
        done = inductor.message_sums(columns, p)
        done.update((j, inductor.wsum(c, p)) for j, c in enumerate(columns) if j not in done and inductor.applies(c))
        if done:
            rest = iter(_wsums([c for j, c in enumerate(columns) if j not in done], p))
            return [done[j] if j in done else next(rest) for j in range(len(columns))]
    sums, group, size = [], [], 0
    for col in columns:
        out_bytes = col[0].numel() * 4
        if group and size + out_bytes > GROUP_BYTES:
            sums += _wsum_group(group, p)
            group, size = [], 0
        group.append(col)
        size += out_bytes
    return sums + (_wsum_group(group, p) if group else [])


def _wsum_group(columns: Sequence[Sequence[torch.Tensor]], p: Sequence[float]) -> list[torch.Tensor]:
    coded = [any(isinstance(t, Int8Blocks) for t in col) for col in columns]
    outs = [torch.zeros(next(t for t in col if isinstance(t, Int8Blocks)).rows.shape) if c else
            torch.zeros(col[0].shape, dtype=torch.promote_types(col[0].dtype, torch.float32), device=col[0].device)
            for col, c in zip(columns, coded)]  # int8 blocks: rows of blocks, the last padded
    scratch = [torch.empty_like(o) if c else None for o, c in zip(outs, coded)]  # their codes widened
    special = any(coded) or any(isinstance(t, TopkEntries) for col in columns for t in col)
    for k, w in enumerate(p):
        xs = [col[k] for col in columns]
        if not special:
            torch._foreach_add_(outs, xs, alpha=w)
            continue
        blocks = [(o, x, s) for o, x, s in zip(outs, xs, scratch) if isinstance(x, Int8Blocks)]
        plain = [(o.view(-1)[:x.numel()].view(x.shape) if c else o, x)
                 for o, x, c in zip(outs, xs, coded) if not isinstance(x, (Int8Blocks, TopkEntries))]
        if blocks:
            Int8Blocks.add_all(*map(list, zip(*blocks)), w)
        if plain:
            torch._foreach_add_([o for o, _ in plain], [x for _, x in plain], alpha=w)
        for o, x, c in zip(outs, xs, coded):
            if isinstance(x, TopkEntries):
                x.add_to(o.view(-1)[:x.numel()] if c else o, w)
    return [o.view(-1)[:col[0].numel()].reshape(col[0].shape) if c else o
            for o, col, c in zip(outs, columns, coded)]


def _average_extra(states: Sequence[AdapterState], p: Sequence[float], compiled: bool = False
                   ) -> dict[str, torch.Tensor]:
    keys = list(states[0].extra)
    return dict(zip(keys, _wsums([[st.extra[k] for st in states] for k in keys], p, compiled)))


def _wsum_factors(states: Sequence[AdapterState], p: Sequence[float], which: str = "AB", compiled: bool = False
                  ) -> dict[str, list]:
    """{module: [sum_k p_k A_k and/or sum_k p_k B_k, as ``which`` names them]}, every module in one :func:`_wsums`."""
    names = list(states[0].lora)
    sums = iter(_wsums([[getattr(st.lora[n], f) for st in states] for n in names for f in which], p, compiled))
    return {n: [next(sums) for _ in which] for n in names}


def _equal_rank_and_scale(states: Sequence[AdapterState], method: str) -> None:
    for name, f0 in states[0].lora.items():
        r0 = f0.A.shape[0]
        for i, st in enumerate(states[1:], 1):
            f = st.lora[name]
            if f.A.shape[0] != r0:
                raise ValueError(f"{method} needs equal ranks, but module {name!r} has rank {f0.rank} on client 0 "
                                 f"and {f.rank} on client {i} (use flora_stack, hetlora or flexlora for mixed ranks)")
            if f.scale != f0.scale and not math.isclose(f.scale, f0.scale, rel_tol=1e-9):
                raise ValueError(f"{method} needs equal scales (alpha/r), but module {name!r} has scale {f0.scale} "
                                 f"on client 0 and {f.scale} on client {i}")


def _stacked(fs: Sequence[LoraFactors], p, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_s, A_s) with B_s A_s = sum_k p_k s_k B_k A_k: B_s = [B_1 ... B_K], A_s = [p_1 s_1 A_1; ...]."""
    dtype = dtype or fs[0].A.dtype
    R, n = sum(f.rank for f in fs), fs[0].A.shape[1]
    A_s = torch.empty(R, n, dtype=dtype, device=fs[0].A.device)
    off = 0
    for f, w in zip(fs, p):
        torch.mul(f.A.to(dtype), w * f.scale, out=A_s[off: off + f.rank])
        off += f.rank
    B_s = torch.cat([f.B.to(dtype) for f in fs], dim=1)
    return B_s, A_s


# ----------------------------------------------------------------------------------------------
# Reference quantities
# ----------------------------------------------------------------------------------------------
def ideal_update(states: Sequence[AdapterState], weights: Sequence[float],
                 dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Dense dW* = sum_k p_k s_k B_k A_k per module (m x n, float64 by default). Tests and audits only."""
    p = _check(states, weights)
    return {name: _dense_ideal([st.lora[name] for st in states], p, dtype) for name in states[0].lora}


def _dense_ideal(fs: Sequence[LoraFactors], p, dtype) -> torch.Tensor:
    W = torch.zeros(fs[0].B.shape[0], fs[0].A.shape[1], dtype=dtype, device=fs[0].A.device)
    for f, w in zip(fs, p):
        W.addmm_(f.B.to(dtype), f.A.to(dtype), alpha=w * f.scale)
    return W


def effective_update(new: AdapterState, old: AdapterState | None = None,
                     dense: bool = False) -> dict[str, LoraFactors] | dict[str, torch.Tensor]:
    """The change of the served product in a round, per module: s'B'A' - s B A (``old`` None: just s'B'A').

    FedIT / FFA-LoRA / LoRA-FAIR / HetLoRA: pass the new and the previous global state. FLoRA: pass the stacked
    state alone (its scale is 1, so the result is B_s A_s, the merge into the base). Returned factored, as
    ``LoraFactors(A=[A'; A], B=[s'B', -sB], scale=1)`` (``.delta()`` densifies), or dense float64 if ``dense``.
    """
    out: dict = {}
    for name, f in new.lora.items():
        Bs, As = [f.B * f.scale], [f.A]
        if old is not None and name in old.lora:
            g = old.lora[name]
            Bs.append(g.B * (-g.scale))
            As.append(g.A)
        fac = LoraFactors(torch.cat(As, 0), torch.cat(Bs, 1), 1.0)
        out[name] = fac.delta() if dense else fac
    return out


# ----------------------------------------------------------------------------------------------
# FedIT
# ----------------------------------------------------------------------------------------------
def fedit(states: Sequence[AdapterState], weights: Sequence[float], compiled: bool = False) -> AdapterState:
    """FedIT (Zhang et al., "Towards Building the Federated GPT", ICASSP 2024): FedAvg on the factors.

    A_bar = sum_k p_k A_k, B_bar = sum_k p_k B_k, extra averaged; served product s B_bar A_bar, which differs
    from dW* by the cross terms sum_{k != l} p_k p_l B_k A_l. Needs equal ranks and scales (ValueError otherwise).
    ``compiled``: 16-bit and int8 replies as sent are summed by :mod:`fedlora.compiled` (``server.compile``).
    """
    p = _check(states, weights)
    _equal_rank_and_scale(states, "FedIT")
    sums = _wsum_factors(states, p, compiled=compiled)
    lora = {name: LoraFactors(*sums[name], f0.scale) for name, f0 in states[0].lora.items()}
    return AdapterState(lora, _average_extra(states, p, compiled))


# ----------------------------------------------------------------------------------------------
# FLoRA
# ----------------------------------------------------------------------------------------------
def flora_stack(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """FLoRA (Wang et al., NeurIPS 2024): stacking, exact for any mix of ranks.

    A_s = [p_1 s_1 A_1; ...; p_K s_K A_K] ((sum r_k) x n), B_s = [B_1 ... B_K] (m x sum r_k), scale 1, so
    B_s A_s = sum_k p_k s_k B_k A_k = dW* with no cross terms. Extra (e.g. a head) averaged by p_k. The result
    is merged into the base (W <- W + B_s A_s) by server and every client; see :func:`dense_or_stacked_bytes`.
    """
    p = _check(states, weights)
    lora = {}
    for name in states[0].lora:
        B_s, A_s = _stacked([st.lora[name] for st in states], p)
        lora[name] = LoraFactors(A_s, B_s, 1.0)
    return AdapterState(lora, _average_extra(states, p))


def dense_or_stacked_bytes(state: AdapterState, bytes_per_element: int = 4) -> dict[str, tuple[str, int]]:
    """Per module, the cheaper download of a FLoRA merge: ``("stacked", R(m+n)·b)`` or ``("dense", m·n·b)``."""
    out = {}
    for name, f in state.lora.items():
        m, n, R = f.B.shape[0], f.A.shape[1], f.rank
        stacked, dense = R * (m + n) * bytes_per_element, m * n * bytes_per_element
        out[name] = ("stacked", stacked) if stacked <= dense else ("dense", dense)
    return out


# ----------------------------------------------------------------------------------------------
# FFA-LoRA
# ----------------------------------------------------------------------------------------------
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                  and a.dtype == b.dtype):
        return True
    return a.shape == b.shape and torch.equal(a, b)


def ffa_average(states: Sequence[AdapterState], weights: Sequence[float], compiled: bool = False) -> AdapterState:
    """FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

    A is frozen and identical on all clients; B_bar = sum_k p_k B_k, extra averaged, A kept (the first state's
    tensor itself, not a copy: a strategy can fill every client's A with its one frozen copy). Served product
    s B_bar A = sum_k p_k s B_k A = dW* exactly (linear, so it composes with secure aggregation and DP noise).
    ValueError naming the module if A (compared with torch.equal) or the scale differ between clients.
    ``compiled``: as :func:`fedit`'s.
    """
    p = _check(states, weights)
    for name, f0 in states[0].lora.items():
        fs = [st.lora[name] for st in states]
        for i, f in enumerate(fs[1:], 1):
            if not _same(f.A, f0.A):
                raise ValueError(f"FFA-LoRA needs the same frozen A on every client, but module {name!r} has a "
                                 f"different A on client {i} (shape {tuple(f.A.shape)} vs {tuple(f0.A.shape)})")
            if not math.isclose(f.scale, f0.scale, rel_tol=1e-9):
                raise ValueError(f"FFA-LoRA needs equal scales, module {name!r}: {f0.scale} vs {f.scale} (client {i})")
    sums = _wsum_factors(states, p, "B", compiled)
    lora = {name: LoraFactors(f0.A, *sums[name], f0.scale) for name, f0 in states[0].lora.items()}
    return AdapterState(lora, _average_extra(states, p, compiled))


# ----------------------------------------------------------------------------------------------
# FedEx-LoRA
# ----------------------------------------------------------------------------------------------
def fedex(states: Sequence[AdapterState], weights: Sequence[float]) -> tuple[AdapterState, dict[str, LoraFactors]]:
    """FedEx-LoRA (Singhal et al., "Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models",
    ACL 2025): FedIT's averages plus the residual that makes the round exact, folded into the base weights.

    Returns ``(avg, residual)``: ``avg`` is :func:`fedit` itself (A_bar = sum_k p_k A_k, B_bar = sum_k p_k B_k, extra
    averaged; equal ranks and scales), ``residual[name]`` the stacked factors (scale 1, float64) of
        R = sum_k p_k s B_k A_k - s B_bar A_bar = sum_k p_k s B_k (A_k - A_bar) + s c A_bar,  c = sum_k p_k B_k - B_bar,
    i.e. B_R = [B_1 ... B_K  c], A_R = [p_1 s (A_1 - A_bar); ...; p_K s (A_K - A_bar); s A_bar], rank sum r_k + r.
    c is zero in exact arithmetic; it carries the rounding of the served (input-dtype) B_bar, so that
    s B_bar A_bar + R = dW* holds for the B_bar, A_bar clients are actually served. R is FedIT's cross-term gap
    (:func:`fedlora.diagnostics.cross_term_error` is ||R|| / ||dW*||). No m x n matrix is formed.
    """
    p = _check(states, weights)
    avg = fedit(states, p)
    residual = {}
    for name, g in avg.lora.items():
        fs = [st.lora[name] for st in states]
        A_bar, B_bar = g.A.double(), g.B.double()
        c = _wsum([f.B.double() for f in fs], p) - B_bar
        A_R = torch.cat([(f.A.double() - A_bar) * (w * f.scale) for f, w in zip(fs, p)] + [A_bar * g.scale], 0)
        B_R = torch.cat([f.B.double() for f in fs] + [c], 1)
        residual[name] = LoraFactors(A_R, B_R, 1.0)
    return avg, residual


# ----------------------------------------------------------------------------------------------
# LoRA-FAIR
# ----------------------------------------------------------------------------------------------
def fedsa(states: Sequence[AdapterState], weights: Sequence[float], personal: Sequence[str] = ("B",)) -> AdapterState:
    """FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025):
    A_bar = sum_k p_k A_k. The parts named in ``personal`` ("B", "extra") stay on the clients and are not uploaded:
    the first state's are kept (the strategy fills every state with the server's own). The others are averaged:
    B_bar = sum_k p_k B_k (the final upload), so s B_bar A_bar = sum_k p_k s B_k A_bar, the mean of the clients'
    personalised updates on A_bar; extra likewise. Equal ranks and scales (ValueError otherwise)."""
    p = _check(states, weights)
    _equal_rank_and_scale(states, "FedSA-LoRA")
    lora = {}
    for name, f0 in states[0].lora.items():
        fs = [st.lora[name] for st in states]
        B = f0.B if "B" in personal else _wsum([f.B for f in fs], p)
        lora[name] = LoraFactors(_wsum([f.A for f in fs], p), B, f0.scale)
    return AdapterState(lora, dict(states[0].extra) if "extra" in personal else _average_extra(states, p))


def _projected_ideal(fs, p, Abar) -> torch.Tensor:
    """G = dW* Abar^T = sum_k p_k s_k B_k (A_k Abar^T), m x r, from r_k x r products only."""
    G = torch.zeros(fs[0].B.shape[0], Abar.shape[0], dtype=Abar.dtype, device=Abar.device)
    for f, w in zip(fs, p):
        G.addmm_(f.B, f.A @ Abar.T, alpha=w * f.scale)
    return G


def _ideal_sq_norm(fs, p) -> float:
    """||dW*||_F^2 = <B_s^T B_s, A_s A_s^T> from (sum r_k)^2 Grams (cost (sum r_k)^2 (m+n), no m x n)."""
    B_s, A_s = _stacked(fs, p, dtype=torch.float64)
    return float(((B_s.T @ B_s) * (A_s @ A_s.T)).sum())


#: iterations of the iterative LoRA-FAIR solvers when not given: SGD steps (third-party re-implementations of
#: the paper use 1,000 steps at lr 1e-2) and L-BFGS iterations
FAIR_STEPS = {"sgd": 1000, "cosine": 200}
FAIR_SOLVERS = ("sgd", "cosine", "closed_form")
FAIR_PENALTIES = ("norm", "squared")


def _fair_common(states, weights, solver: str = "closed_form", penalty: str = "norm"):
    if solver not in FAIR_SOLVERS:
        raise ValueError(f"unknown LoRA-FAIR solver {solver!r} (expected one of {', '.join(FAIR_SOLVERS)})")
    if penalty not in FAIR_PENALTIES:
        raise ValueError(f"unknown LoRA-FAIR penalty {penalty!r} (expected 'norm' or 'squared')")
    p = _check(states, weights)
    _equal_rank_and_scale(states, "LoRA-FAIR")
    return p, fedit(states, p)


def lora_fair(states: Sequence[AdapterState], weights: Sequence[float], lam: float = 0.01,
              solver: str = "sgd", steps: int | None = None, lr: float = 0.01, penalty: str = "norm",
              solve_dtype: torch.dtype = torch.float64) -> AdapterState:
    """LoRA-FAIR (Bian et al., ICCV 2025): FedIT averages plus a server correction dB of B_bar.

    Clients restart from (A_bar, B_bar + dB); A_bar, scale and extra are FedIT's. Scale: all clients share s
    (checked); the served product is s (B_bar + dB) A_bar, so the target in B's units is dW*/s, and dB and lam
    are in B's units whatever alpha is. The paper's server-side refinement problem is
        dB = argmin_dB  1 - cos(vec((B_bar + dB) A_bar), vec(dW*)) + lam ||dB||_F        (the cosine is scale-free)
    and it is solved without any m x n matrix: with X = B_bar + dB, C = A_bar A_bar^T (r x r), G = dW* A_bar^T
    (m x r),
        <X A_bar, dW*>  = sum_k p_k s_k tr(A_bar^T X^T B_k A_k) = sum_k p_k s_k tr((X^T B_k)(A_k A_bar^T)) = <X, G>
        ||X A_bar||_F^2 = tr(A_bar^T X^T X A_bar) = <X^T X, C>
        ||dW*||_F^2     = sum_{k,l} p_k p_l s_k s_l tr((B_k^T B_l)(A_l A_k^T)) = <B_s^T B_s, A_s A_s^T>
    G costs r r_k (m+n) per client, ||dW*|| (sum r_k)^2 (m+n) once per module.

    ``solver="sgd"`` (default; the paper's procedure): ``steps`` (default 1000) plain SGD steps of size ``lr``
    from dB = 0 (:func:`fedlora.fair_solvers.sgd_dB`); ``penalty="squared"`` uses lam ||dB||_F^2 instead of
    lam ||dB||_F. ``solver="cosine"``: the exact minimiser of the same objective, by autograd + L-BFGS (at most
    ``steps`` iterations, default 200, strong-Wolfe line search) in span[G, B_bar]
    (:func:`fedlora.fair_solvers.cosine_dB`). With the non-squared norm it is dB = 0 whenever ||grad of cos at 0|| <= lam: then LoRA-FAIR equals FedIT.
    Both: modules with dW* = 0 or B_bar = 0 (cosine undefined) are left uncorrected; solved in ``solve_dtype``.

    ``solver="closed_form"`` (squared-error variant, ALGORITHMS.md):
        dB = argmin ||dW*/s - (B_bar + dB) A_bar||_F^2 + lam ||dB||_F^2 = (G/s - B_bar C)(C + lam I)^{-1},
    an r x r solve in ``solve_dtype``; G is accumulated in the input dtype.
    """
    p, base = _fair_common(states, weights, solver, penalty)
    steps = FAIR_STEPS.get(solver, 0) if steps is None else int(steps)
    for name, g in base.lora.items():
        fs = [st.lora[name] for st in states]
        G = _projected_ideal(fs, p, g.A)
        C = g.A @ g.A.T
        if solver == "closed_form":
            dB = fair_solvers.closed_form_dB(G, g.B, C, g.scale, lam, solve_dtype)
        else:
            w_norm = math.sqrt(_ideal_sq_norm(fs, p))
            if w_norm == 0 or not bool(g.B.any()):
                continue  # cosine undefined (dW* = 0 or B_bar = 0): no correction for this module
            args = (g.B.to(solve_dtype), G.to(solve_dtype), C.to(solve_dtype), w_norm, lam, steps)
            dB = fair_solvers.sgd_dB(*args, lr, penalty) if solver == "sgd" else fair_solvers.cosine_dB(*args)
        g.B = g.B + dB.to(g.B.dtype)
    return base


def lora_fair_dense(states: Sequence[AdapterState], weights: Sequence[float], lam: float = 0.01,
                    solver: str = "closed_form", steps: int | None = None, lr: float = 0.01,
                    penalty: str = "norm", dtype: torch.dtype = torch.float64) -> AdapterState:
    """Dense reference for :func:`lora_fair` (tests and benchmark): forms dW* (m x n) per module in ``dtype``.

    closed_form: dB = (dW*/s - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^{-1} with the dense residual.
    cosine: L-BFGS (same settings) over the full m x r matrix dB = ||B_bar||_F E, on
    -cos(vec((B_bar + dB) A_bar), vec(dW*)) + lam ||dB||_F computed from the dense matrices by autograd.
    sgd: torch.optim.SGD (step ``lr``) on the full m x r dB from 0, the same loss (1 - cos, ``penalty``) by
    autograd: the paper's procedure, written as its re-implementations write it.
    """
    p, base = _fair_common(states, weights, solver, penalty)
    steps = FAIR_STEPS.get(solver, 0) if steps is None else int(steps)
    for name, g in base.lora.items():
        W = _dense_ideal([st.lora[name] for st in states], p, dtype)  # one module's m x n at a time
        A, Bbar = g.A.to(dtype), g.B.to(dtype)
        if solver == "closed_form":
            R = W / g.scale - Bbar @ A
            M = A @ A.T + lam * torch.eye(A.shape[0], dtype=dtype, device=A.device)
            dB = torch.linalg.solve(M, (R @ A.T).T).T
        else:
            w_norm, c = torch.linalg.vector_norm(W), torch.linalg.vector_norm(Bbar)
            if w_norm == 0 or c == 0:
                continue
            dB = (fair_solvers.dense_sgd(W, A, Bbar, lam, steps, lr, penalty) if solver == "sgd"
                  else fair_solvers.dense_cosine(W, A, Bbar, w_norm, c, lam, steps))
        g.B = g.B + dB.to(g.B.dtype)
    return base


# ----------------------------------------------------------------------------------------------
# RoLoRA (and FedSVD's average: fedlora.lowrank.fedsvd)
# ----------------------------------------------------------------------------------------------
def _average_trained(states: Sequence[AdapterState], weights: Sequence[float], trained: str,
                     method: str) -> AdapterState:
    """Average the factor ``trained`` ("A" or "B") and keep the other, which every client must hold identically
    (compared with torch.equal; the first state's tensor is kept, not copied), with equal scales; extra averaged."""
    if trained not in ("A", "B"):
        raise ValueError(f"{method}: trained must be 'A' or 'B', got {trained!r}")
    p = _check(states, weights)
    frozen = "B" if trained == "A" else "A"
    lora = {}
    for name, f0 in states[0].lora.items():
        fs = [st.lora[name] for st in states]
        for i, f in enumerate(fs[1:], 1):
            if not _same(getattr(f, frozen), getattr(f0, frozen)):
                raise ValueError(f"{method} needs the same frozen {frozen} on every client, but module {name!r} has a "
                                 f"different {frozen} on client {i} (shape {tuple(getattr(f, frozen).shape)} vs "
                                 f"{tuple(getattr(f0, frozen).shape)})")
            if not math.isclose(f.scale, f0.scale, rel_tol=1e-9):
                raise ValueError(f"{method} needs equal scales, module {name!r}: {f0.scale} vs {f.scale} (client {i})")
        avg = _wsum([getattr(f, trained) for f in fs], p)
        lora[name] = LoraFactors(avg, f0.B, f0.scale) if trained == "A" else LoraFactors(f0.A, avg, f0.scale)
    return AdapterState(lora, _average_extra(states, p))


def rolora(states: Sequence[AdapterState], weights: Sequence[float], trained: str) -> AdapterState:
    """RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS
    2025): every client starts from the same (A, B) and trains one factor, the other frozen and shared.

    ``trained="B"``: B_bar = sum_k p_k B_k, A kept, so s B_bar A = sum_k p_k s B_k A = dW* exactly (FFA-LoRA's rule);
    ``trained="A"``: A_bar = sum_k p_k A_k, B kept, so s B A_bar = sum_k p_k s B A_k = dW* exactly. Extra averaged.
    Linear in the trained factor, so it composes with secure aggregation and DP noise. ValueError naming the module
    if the frozen factor (torch.equal; so also its rank) or the scale differ between clients.
    """
    return _average_trained(states, weights, trained, "RoLoRA")
