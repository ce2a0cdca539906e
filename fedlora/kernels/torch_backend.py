"""Torch backend of the fused LoRA linear: the maths of the Triton kernels, written with addmm-style ordering.

It is the backend for CPU clients and the reference the Triton kernels are tested against.

    y  = s·S·Bᵀ (+ bias) + x·Wᵀ,        S = drop(x)·Aᵀ,   drop(x) = M⊙x/(1−p)
    dB = s·dyᵀ·S                         dS = s·dy·B
    dx = M⊙(dS·A)/(1−p) + dy·W           dA = dSᵀ·drop(x)

What this buys over PEFT's ``result + lora_B(lora_A(dropout(x))) * scaling`` on a CPU:
- the rank-r LoRA product initialises the output and the base GEMM accumulates onto it (``addmm_``, beta=1),
  as the Triton kernel's accumulator prologue does: no m×n LoRA output, no scaled copy, no separate add.
  Backward does the same for dx: the masked ``dS·A`` first, then ``dx.addmm_(dy, W)``;
- for backward only x (and only when A is trainable) and the rank-r S are saved: PEFT keeps the dropout noise
  and the dropped-out copy of x instead (2·|x| per adapted linear on CPU; its frozen base GEMM keeps no x);
- the dropout mask is regenerated from a seed, never stored: 16 random bits per element, drawn as ``int64``
  words by a ``torch.Generator`` seeded from the saved seed (about 5× cheaper than ``bernoulli_`` on a CPU, so
  drawing it twice costs less than PEFT's one ``nn.Dropout``). It is produced in row blocks (cache-sized on
  one thread) that are applied while they are in cache; the mask does not depend on the block size. The drop
  probability is quantised to multiples of 2⁻¹⁶ (0.1 → 0.100006); the 1/(1−p) rescaling uses that exact value,
  so E[drop(x)] = x.
- Frozen base: W and bias get no gradient (the callers only fuse layers whose base is frozen).
- Deterministic: no atomics; the same inputs and seed give bit-identical outputs and gradients.

Mixed dtypes (fp32 LoRA factors on a fp16/bf16 base) are computed in the input's dtype with the factors cast
to it (BLAS accumulates in fp32); gradients come back in the factors' own dtype.
"""

from __future__ import annotations

import torch

_LANES = 1 << 16  # a 16-bit random lane per element
_BLOCK_ELEMS = None  # mask block size override (tests); None: :func:`_block_elems`


def quantised_p(p: float) -> float:
    """The drop probability the torch backend actually uses: ``round(p·2¹⁶)/2¹⁶``."""
    return round(float(p) * _LANES) / _LANES


def _check_frozen(needs_grad) -> None:
    if any(needs_grad):
        raise ValueError("fused LoRA linear: the base weight and bias must be frozen (requires_grad=False)")


def _check_p(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return quantised_p(p)


def _block_elems() -> int:
    """Elements per mask block. The mask does not depend on it (see :class:`MaskStream`), only speed does.

    One thread: ~1 MiB fp32 blocks, used while they are in L2 (measured ~10-25% faster fwd+bwd than
    whole-tensor passes at 4096×1024). Several threads: few large blocks, because every block adds parallel
    regions and on a shared, oversubscribed machine each one can stall on a descheduled thread (measured 2×
    slower with 1 MiB blocks on 2 threads sharing 2 cores with other jobs).
    """
    if _BLOCK_ELEMS is not None:
        return _BLOCK_ELEMS
    return 1 << 18 if torch.get_num_threads() == 1 else 1 << 22


def row_blocks(m: int, k: int) -> list[tuple[int, int]]:
    """Row ranges of the mask blocks; rows per block a multiple of 4."""
    rows = max(4, (_block_elems() // max(k, 1)) // 4 * 4)
    return [(i, min(m, i + rows)) for i in range(0, m, rows)]


class MaskStream:
    """Keep masks (0/1 in ``dtype``) of consecutive row blocks of an [m, k] input, for one seed.

    Element (i, j) uses 16-bit lane i·k + j of the int64 words a ``torch.Generator`` seeded with ``seed`` draws
    (the blocks draw consecutively, and every block but the last covers a multiple of 4 lanes, so the mask does
    not depend on the block size). Each returned block is a view of a reused buffer, valid until the next call.
    """

    def __init__(self, seed: int, m: int, k: int, p: float, dtype, device):
        self.k = k
        self.blocks = row_blocks(m, k)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(int(seed))
        rows = self.blocks[0][1] - self.blocks[0][0] if self.blocks else 0
        self.words = torch.empty((rows * k + 3) // 4, dtype=torch.int64, device=device)
        self.buf = torch.empty(rows, k, dtype=dtype, device=device)
        self.threshold = round(float(p) * _LANES) - (_LANES // 2)  # lanes are uniform on [-2¹⁵, 2¹⁵)

    def __iter__(self):
        for i, j in self.blocks:
            n = (j - i) * self.k
            words = self.words[: (n + 3) // 4]
            words.random_(-(2**63), 2**63 - 1, generator=self.gen)  # full 64-bit words: 4 uniform lanes each
            lanes = words.view(torch.int16)[:n].view(j - i, self.k)
            yield i, j, torch.ge(lanes, self.threshold, out=self.buf[: j - i])


def dropout_keep(seed: int, shape, p: float, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The whole keep mask [m, k] for ``seed`` (tests and references; the Functions never materialise it)."""
    m, k = shape
    out = torch.empty(m, k, dtype=dtype, device=device)
    for i, j, keep in MaskStream(seed, m, k, _check_p(p), dtype, device):
        out[i:j] = keep
    return out


def _dropped_S(x2, A, p: float, seed: int) -> torch.Tensor:
    """S = drop(x)·Aᵀ block by block (the dropped-out x exists one cache-sized block at a time)."""
    m, k = x2.shape
    S = torch.empty(m, A.shape[0], dtype=x2.dtype, device=x2.device)
    for i, j, keep in MaskStream(seed, m, k, p, x2.dtype, x2.device):
        torch.mm(keep.mul_(x2[i:j]), A.t(), out=S[i:j])
    return S.mul_(1.0 / (1.0 - p))


def _lora_first_out(x2, weight, bias, S, B, scale: float) -> torch.Tensor:
    """Y = s·S·Bᵀ (+bias), then the base GEMM accumulates x·Wᵀ onto it (beta=1)."""
    Ss = S * scale  # m×r
    out = torch.addmm(bias, Ss, B.t()) if bias is not None else torch.mm(Ss, B.t())
    return out.addmm_(x2, weight.t())


def _masked_backward(dS, A, x2, p: float, seed: int, dx, dA) -> None:
    """dx[rows] = M⊙(dS·A) and dA += dSᵀ·(M⊙x), block by block with the regenerated mask (dS carries
    1/(1−p))."""
    m, k = dS.shape[0], A.shape[1]
    for i, j, keep in MaskStream(seed, m, k, p, dS.dtype, dS.device):
        if dx is not None:
            torch.mm(dS[i:j], A, out=dx[i:j]).mul_(keep)
        if dA is not None:
            dA.addmm_(dS[i:j].t(), keep.mul_(x2[i:j]))


class LoraLinearFunction(torch.autograd.Function):
    """``y = x·Wᵀ (+bias) + s·drop(x)·Aᵀ·Bᵀ`` with a hand-written backward (W and bias frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float, p: float, seed: int):
        _check_frozen(ctx.needs_input_grad[1:3])
        p = _check_p(p)
        k, n = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, k)
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        S = _dropped_S(x2, A, p, seed) if p > 0.0 else torch.mm(x2, A.t())  # rank-r intermediate
        out = _lora_first_out(x2, weight, bias, S, B, scale)
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
        n, k = weight.shape
        dy2 = dy.reshape(-1, n)
        m = dy2.shape[0]
        A, B = lora_A.to(dy.dtype), lora_B.to(dy.dtype)
        dx = dA = dB = None
        if need_B:
            dB = torch.mm(dy2.t(), S).mul_(s).to(lora_B.dtype)  # dB = s·dyᵀ·S
        if need_x or need_A:
            dS = torch.mm(dy2, B).mul_(s / (1.0 - p))  # s·dy·B/(1−p): the 1/(1−p) of dx and dA folded in
            x2 = x.reshape(-1, k) if need_A else None
            if p > 0.0:
                dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device) if need_x else None
                dA = torch.zeros(A.shape, dtype=dy.dtype, device=dy.device) if need_A else None
                _masked_backward(dS, A, x2, p, ctx.seed, dx, dA)
            else:
                dx = torch.mm(dS, A) if need_x else None
                dA = torch.mm(dS.t(), x2) if need_A else None
            if need_x:
                dx = dx.addmm_(dy2, weight).view(ctx.x_shape)  # + dy·W, accumulated by the GEMM
            if need_A:
                dA = dA.to(lora_A.dtype)
        return dx, None, None, dA, dB, None, None, None


class GroupedLoraLinearFunction(torch.autograd.Function):
    """G LoRA linears that share their input x (q/k/v, gate/up), x saved once.

    ``params`` is ``W_0, bias_0, A_0, B_0, W_1, ...`` (bias may be None); adapter g uses dropout seed
    ``seed + g``, so it reproduces :class:`LoraLinearFunction` called with that seed. Without dropout the
    adapters' S come from one GEMM ``x·[A_0; A_1; ...]ᵀ`` (one read of x), backward folds all LoRA terms of dx
    into one GEMM and all dA into one GEMM (one more read of x); the base GEMMs' dx terms accumulate into the
    same buffer.
    """

    @staticmethod
    def forward(ctx, x, scales, p: float, seed: int, *params):
        p = _check_p(p)
        G = len(params) // 4
        _check_frozen([ctx.needs_input_grad[4 + 4 * g + j] for g in range(G) for j in (0, 1)])
        Ws, bs, As, Bs = params[0::4], params[1::4], params[2::4], params[3::4]
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        ranks = [int(a.shape[0]) for a in As]
        if p > 0.0:
            S_cat = torch.cat([_dropped_S(x2, As[g].to(x.dtype), p, seed + g) for g in range(G)], dim=1)
        else:
            S_cat = torch.mm(x2, torch.cat([a.to(x.dtype) for a in As], dim=0).t())  # one read of x for all
        S = S_cat.split(ranks, dim=1)
        outs = []
        for g in range(G):
            out = _lora_first_out(x2, Ws[g], bs[g], S[g], Bs[g].to(x.dtype), float(scales[g]))
            outs.append(out.view(*x.shape[:-1], Ws[g].shape[0]))
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
        need_x = ctx.needs_input_grad[0]
        need_A = [ctx.needs_input_grad[4 + 4 * g + 2] for g in range(G)]
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
            dS.append(torch.mm(dy2, Bs[g].to(dtype)).mul_(s / (1.0 - p)))  # s·dy_g·B_g/(1−p)
        dx = None
        if p > 0.0:
            term = torch.empty(m, k, dtype=dtype, device=device) if need_x and G > 1 else None
            for g in range(G):
                if dy2s[g] is None or not (need_x or need_A[g]):
                    continue
                dA = torch.zeros(ranks[g], k, dtype=dtype, device=device) if need_A[g] else None
                target = None
                if need_x:
                    target = torch.empty(m, k, dtype=dtype, device=device) if dx is None else term
                _masked_backward(dS[g], As[g].to(dtype), x2, p, ctx.seed + g, target, dA)
                if need_x:
                    dx = target if dx is None else dx.add_(term)
                if dA is not None:
                    grads[4 * g + 2] = dA.to(As[g].dtype)
        else:
            dS_cat = torch.cat(dS, dim=1)
            if need_x:
                dx = torch.mm(dS_cat, torch.cat([a.to(dtype) for a in As], dim=0))  # all LoRA terms, one GEMM
            if any(need_A):
                dA_cat = torch.mm(dS_cat.t(), x2)  # one read of x for all adapters
                for g, dA in enumerate(dA_cat.split(ranks, dim=0)):
                    if need_A[g]:
                        grads[4 * g + 2] = dA.to(As[g].dtype)
        if need_x:
            for g, dy2 in enumerate(dy2s):
                if dy2 is not None:
                    dx = torch.mm(dy2, Ws[g]) if dx is None else dx.addmm_(dy2, Ws[g])
            dx = dx.view(ctx.x_shape) if dx is not None else torch.zeros(ctx.x_shape, dtype=dtype, device=device)
        return (dx, None, None, None, *grads)


def lora_linear(x, weight, bias, lora_A, lora_B, scale: float, p: float = 0.0, seed: int = 0):
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), float(p), int(seed))


def grouped_lora_linear(x, weights, biases, As, Bs, scales, p: float = 0.0, seed: int = 0):
    params = []
    for W, b, A, B in zip(weights, biases, As, Bs, strict=True):
        params += [W, b, A, B]
    return GroupedLoraLinearFunction.apply(x, tuple(float(s) for s in scales), float(p), int(seed), *params)
