"""Torch backend of the fused LoRA linear: the maths of the Triton kernels, written with addmm-style ordering.

It is the backend for CPU clients and the reference the Triton kernels are tested against.

    y  = x·Wᵀ (+ bias) + s·S·Bᵀ,        S = drop(x)·Aᵀ,   drop(x) = M⊙x/(1−p)
    dB = s·dyᵀ·S                         dS = s·dy·B
    dx = dy·W + M⊙(dS·A)/(1−p)           dA = dSᵀ·drop(x)

What this buys over PEFT's ``result + lora_B(lora_A(dropout(x))) * scaling`` on a CPU:
- the LoRA term goes into the base GEMM's output with ``addmm_`` (no m×n LoRA output, no scaled copy, no
  separate add); backward folds ``dS·A`` into the ``dy·W`` GEMM the same way;
- for backward only x (which the base GEMM needs anyway) and the rank-r S are saved: PEFT also keeps the
  dropout noise and the dropped-out copy of x (2·|x| per adapted linear on CPU);
- the dropout mask is regenerated from a seed: 16 random bits per element from ``int64.random_`` with a
  ``torch.Generator`` seeded from the saved seed (about 5× cheaper than ``bernoulli_`` on a CPU, so drawing it
  twice still costs less than PEFT's one ``nn.Dropout``). The drop probability is therefore quantised to
  multiples of 2⁻¹⁶ (0.1 → 0.100006); the 1/(1−p) rescaling uses that exact value, so E[drop(x)] = x.
- Frozen base: W and bias get no gradient (the callers only fuse layers whose base is frozen).
- Deterministic: no atomics; the same inputs and seed give bit-identical outputs and gradients.

Mixed dtypes (fp32 LoRA factors on a fp16/bf16 base) are computed in the input's dtype with the factors cast
to it (BLAS accumulates in fp32); gradients come back in the factors' own dtype.
"""

from __future__ import annotations

import math

import torch

_LANES = 1 << 16  # a 16-bit random lane per element


def quantised_p(p: float) -> float:
    """The drop probability the torch backend actually uses: ``round(p·2¹⁶)/2¹⁶``."""
    return round(float(p) * _LANES) / _LANES


def dropout_keep(seed: int, shape, p: float, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """0/1 keep mask (values in ``dtype``) for ``drop(x)``, a pure function of ``(seed, shape, p, device)``.

    P(drop) = :func:`quantised_p` (p). Element i uses 16-bit lane i of a stream of int64 words drawn by a
    ``torch.Generator`` seeded with ``seed``; forward and backward call this with the same seed and get the same
    mask, so no mask is ever stored.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1, generator=gen)  # full 64-bit words: 4 uniform 16-bit lanes each
    lanes = words.view(torch.int16)[:numel].view(shape)
    threshold = round(float(p) * _LANES) - (_LANES // 2)  # lanes are uniform on [-2¹⁵, 2¹⁵)
    return torch.ge(lanes, threshold, out=torch.empty(shape, dtype=dtype, device=device))


def _check_p(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    q = quantised_p(p)
    if p > 0 and q == 0.0:
        return 0.0
    return q


class LoraLinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ (+bias) + s·drop(x)·Aᵀ·Bᵀ`` with a hand-written backward (W and bias frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float, p: float, seed: int):
        p = _check_p(p)
        k, n = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, k)
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        if p > 0.0:
            xd = dropout_keep(seed, x2.shape, p, dtype=x.dtype, device=x.device).mul_(x2)  # M⊙x, a temporary
            S = torch.mm(xd, A.t()).mul_(1.0 / (1.0 - p))  # S = drop(x)·Aᵀ  (m×r)
            del xd
        else:
            S = torch.mm(x2, A.t())
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        out.addmm_(S, B.t(), alpha=scale)  # LoRA term accumulated onto the base GEMM's output
        need_A, need_B = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        # x only when dA is needed (a frozen A, as in FFA-LoRA, keeps no m×k activation at all), S only for dB
        ctx.save_for_backward(x if need_A else None, S if need_B else None, weight, lora_A, lora_B)
        ctx.scale, ctx.p, ctx.seed, ctx.x_shape = float(scale), p, int(seed), x.shape
        return out.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x, S, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        s, p = ctx.scale, ctx.p
        k, n = weight.shape[1], weight.shape[0]
        dy2 = dy.reshape(-1, n)
        m = dy2.shape[0]
        A, B = lora_A.to(dy.dtype), lora_B.to(dy.dtype)
        inv_keep = 1.0 / (1.0 - p)
        dx = dA = dB = None
        if need_B:
            dB = torch.mm(dy2.t(), S).mul_(s).to(lora_B.dtype)  # dB = s·dyᵀ·S
        if need_x or need_A:
            dS = torch.mm(dy2, B).mul_(s * inv_keep)  # s·dy·B/(1−p): the 1/(1−p) of dx and dA folded in
            keep = dropout_keep(ctx.seed, (m, k), p, dtype=dy.dtype, device=dy.device) if p > 0.0 else None
            if need_x:
                if keep is not None:
                    dx = torch.mm(dS, A).mul_(keep)  # M⊙(dS·A)/(1−p)
                    dx.addmm_(dy2, weight)  # + dy·W, accumulated by the GEMM
                else:
                    dx = torch.mm(dy2, weight)
                    dx.addmm_(dS, A)
                dx = dx.view(ctx.x_shape)
            if need_A:
                x2 = x.reshape(-1, k)
                xd = keep.mul_(x2) if keep is not None else x2  # M⊙x (in the mask's buffer)
                dA = torch.mm(dS.t(), xd).to(lora_A.dtype)  # dA = dSᵀ·drop(x)
        return dx, None, None, dA, dB, None, None, None


class GroupedLoraLinearFunction(torch.autograd.Function):
    """G LoRA linears that share their input x (q/k/v, gate/up), x read and saved once.

    ``params`` is ``W_0, bias_0, A_0, B_0, W_1, ...`` (bias may be None); adapter g uses dropout seed
    ``seed + g``, so it reproduces :class:`LoraLinearFunction` called with that seed. Without dropout the
    adapters' S come from one GEMM ``x·[A_0; A_1; ...]ᵀ`` and backward folds all LoRA terms of dx into one
    ``addmm_`` and all dA into one GEMM; the base GEMMs' dx terms accumulate into the same buffer.
    """

    @staticmethod
    def forward(ctx, x, scales, p: float, seed: int, *params):
        p = _check_p(p)
        G = len(params) // 4
        Ws, bs, As, Bs = params[0::4], params[1::4], params[2::4], params[3::4]
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        ranks = [int(a.shape[0]) for a in As]
        if p > 0.0:
            S_cat = torch.cat(
                [
                    torch.mm(dropout_keep(seed + g, x2.shape, p, dtype=x.dtype, device=x.device).mul_(x2),
                             As[g].to(x.dtype).t())
                    for g in range(G)
                ],
                dim=1,
            ).mul_(1.0 / (1.0 - p))
        else:
            A_cat = torch.cat([a.to(x.dtype) for a in As], dim=0)
            S_cat = torch.mm(x2, A_cat.t())  # one read of x for all adapters
        S = S_cat.split(ranks, dim=1)
        outs = []
        for g in range(G):
            W, b = Ws[g], bs[g]
            out = torch.addmm(b, x2, W.t()) if b is not None else torch.mm(x2, W.t())
            out.addmm_(S[g], Bs[g].to(x.dtype).t(), alpha=float(scales[g]))
            outs.append(out.view(*x.shape[:-1], W.shape[0]))
        need_A = any(ctx.needs_input_grad[4 + 4 * g + 2] for g in range(G))
        ctx.save_for_backward(x if need_A else None, S_cat, *params)
        ctx.scales, ctx.p, ctx.seed, ctx.ranks, ctx.G = [float(v) for v in scales], p, int(seed), ranks, G
        ctx.x_shape, ctx.x_meta = x.shape, (x.dtype, x.device)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x, S_cat, *params = ctx.saved_tensors
        G, p, ranks = ctx.G, ctx.p, ctx.ranks
        Ws, As, Bs = params[0::4], params[2::4], params[3::4]
        dtype, device = ctx.x_meta
        k = ctx.x_shape[-1]
        x2 = x.reshape(-1, k) if x is not None else None
        m = S_cat.shape[0]
        S = S_cat.split(ranks, dim=1)
        inv_keep = 1.0 / (1.0 - p)
        need_x = ctx.needs_input_grad[0]
        grads: list = [None] * (4 * G)
        dy2s = [None if dy is None else dy.reshape(-1, Ws[g].shape[0]) for g, dy in enumerate(dys)]
        dS = []
        for g, dy2 in enumerate(dy2s):
            if dy2 is None:
                dS.append(torch.zeros(m, ranks[g], dtype=dtype, device=device))
                continue
            s = ctx.scales[g]
            if ctx.needs_input_grad[4 + 4 * g + 3]:
                grads[4 * g + 3] = torch.mm(dy2.t(), S[g]).mul_(s).to(Bs[g].dtype)  # dB_g = s·dy_gᵀ·S_g
            dS.append(torch.mm(dy2, Bs[g].to(dtype)).mul_(s * inv_keep))  # s·dy_g·B_g/(1−p)
        dx = None
        need_A = [ctx.needs_input_grad[4 + 4 * g + 2] for g in range(G)]
        if p > 0.0:
            for g in range(G):
                if not (need_x or need_A[g]) or dy2s[g] is None:
                    continue
                keep = dropout_keep(ctx.seed + g, (m, k), p, dtype=dtype, device=device)
                if need_x:
                    term = torch.mm(dS[g], As[g].to(dtype)).mul_(keep)
                    dx = term if dx is None else dx.add_(term)
                if need_A[g]:
                    grads[4 * g + 2] = torch.mm(dS[g].t(), keep.mul_(x2)).to(As[g].dtype)
            if need_x:
                for g, dy2 in enumerate(dy2s):
                    if dy2 is not None:
                        dx = torch.mm(dy2, Ws[g]) if dx is None else dx.addmm_(dy2, Ws[g])
        else:
            A_cat = torch.cat([a.to(dtype) for a in As], dim=0)
            if need_x:
                for g, dy2 in enumerate(dy2s):
                    if dy2 is not None:
                        dx = torch.mm(dy2, Ws[g]) if dx is None else dx.addmm_(dy2, Ws[g])
            dS_cat = torch.cat(dS, dim=1)
            if need_x:
                dx = torch.mm(dS_cat, A_cat) if dx is None else dx.addmm_(dS_cat, A_cat)
            if any(need_A):
                dA_cat = torch.mm(dS_cat.t(), x2)  # one read of x for all adapters
                for g, dA in enumerate(dA_cat.split(ranks, dim=0)):
                    if need_A[g]:
                        grads[4 * g + 2] = dA.to(As[g].dtype)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        elif need_x:
            dx = torch.zeros(ctx.x_shape, dtype=dtype, device=device)
        return (dx, None, None, None, *grads)


def lora_linear(x, weight, bias, lora_A, lora_B, scale: float, p: float = 0.0, seed: int = 0):
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), float(p), int(seed))


def grouped_lora_linear(x, weights, biases, As, Bs, scales, p: float = 0.0, seed: int = 0):
    params = []
    for W, b, A, B in zip(weights, biases, As, Bs, strict=True):
        params += [W, b, A, B]
    return GroupedLoraLinearFunction.apply(x, tuple(float(s) for s in scales), float(p), int(seed), *params)
