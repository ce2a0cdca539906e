"""Triton backend of the fused LoRA linear (GPU; also runs on CPU tensors under ``TRITON_INTERPRET=1``).

Importing this module imports triton; :mod:`fedlora.kernels` imports it only when the Triton backend is chosen.

Kernels (every ``tl.dot`` operand dimension is one of the launch's BLOCK_* values, all ≥ 16; the rank is padded
to BLOCK_R = max(16, next power of two ≥ r) with zero rows of A, so ranks 1..16 all use 16-wide dots):

forward
  1. ``s_fwd_kernel``   S_g = drop_g(x)·A_gᵀ for up to 4 adapters sharing x (q/k/v, gate/up): each x tile is
                          loaded once, masked per adapter with ``tl.rand(seed + g, row·K + col)`` and multiplied
                          by every A_g. Split over K for occupancy; partials summed in a fixed order. S is fp32.
  2. ``out_fwd_kernel`` Y = x·Wᵀ (+bias) + s·S·Bᵀ: the LoRA product is the accumulator's prologue, so no m×n
                          LoRA intermediate exists. One launch per adapter (each has its own W).
backward
  3. ``dy_bwd_kernel``  one pass over dy gives dS = s·dy·B/(1−p) (kept in registers per row block) and the
                          per-row-block partials of dB = s·dyᵀ·S (written once, summed in a fixed order).
  4. ``dx_bwd_kernel``  dx = M⊙(dS·A) + dy·W: the masked LoRA term (mask regenerated from the seed) is the
                          prologue of the dy·W GEMM. For a group, launches accumulate into one fp32 dx in order.
  5. ``da_bwd_kernel``  dA_g = dS_gᵀ·drop_g(x) for all adapters of a group from one read of x (split over M,
                          partials summed in a fixed order).

No atomics anywhere: results are bit-reproducible for a given launch configuration. The configuration is a
fixed function of dtype and shape (no autotuning), so it does not change between runs either.

Precision: fp16/bf16 inputs use tensor-core dots with fp32 accumulation; the LoRA factors are fp32 master
copies (the PEFT parameters) cast to the input dtype per tile; S and dS are kept in fp32 and cast to the input
dtype only as dot operands. fp32 inputs use ``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .triton_kernels import (
    s_fwd_kernel,
    out_fwd_kernel,
    dy_bwd_kernel,
    dx_bwd_kernel,
    da_bwd_kernel,
    mask_kernel,
)

MAX_GROUP = 4
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)

# Every launch appends (kernel name, {BLOCK_*: value}) here; tests check the tl.dot block sizes from it.
LAUNCH_LOG: list[tuple[str, dict]] = []
_LOG_LIMIT = 256

# Tests may pin block sizes, e.g. CONFIG_OVERRIDE.update(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=2).
CONFIG_OVERRIDE: dict = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------------------
# launch configuration (fixed function of dtype and shape: deterministic, no autotuning)
# ---------------------------------------------------------------------------------------------------------
DOT_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R")


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python: host code, where triton.cdiv (a constexpr function) costs microseconds a call."""
    return -(-a // b)


def block_r(r: int) -> int:
    return max(16, 1 << (int(r) - 1).bit_length())  # the next power of two (triton.next_power_of_2, on the host)


@functools.lru_cache(maxsize=None)
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sms_of(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def _config(kind: str, dtype: torch.dtype, device: torch.device) -> dict:
    """The launch configuration (read-only: cached per kind, dtype, target and CONFIG_OVERRIDE)."""
    return _config_of(kind, dtype, interpreting() or device.type != "cuda", tuple(sorted(CONFIG_OVERRIDE.items())))


@functools.lru_cache(maxsize=256)
def _config_of(kind: str, dtype: torch.dtype, generic: bool, override: tuple) -> dict:
    if generic:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    elif kind == "out":  # GEMM: output tile BLOCK_M×BLOCK_N, reduction step BLOCK_K (A100/H100-class defaults)
        wide = dtype != torch.float32
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if wide else 32, GROUP_M=8, num_warps=8, num_stages=3)
    elif kind == "dx":  # GEMM: output tile BLOCK_M×BLOCK_K, reduction step BLOCK_N
        wide = dtype != torch.float32
        cfg = dict(BLOCK_M=128, BLOCK_N=64 if wide else 32, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    elif kind == "dy":
        cfg = dict(BLOCK_M=128, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=3)
    else:  # "s", "da": bandwidth-bound skinny products
        cfg = dict(BLOCK_M=64, BLOCK_K=64 if dtype != torch.float32 else 32, GROUP_M=1, num_warps=4, num_stages=3)
    cfg.update({k: v for k, v in override if k in cfg or k == "SPLIT"})
    return cfg


def _split(cfg: dict, programs: int, steps: int, device) -> int:
    """How many ways to split a reduction so that there are ≥ 2 programs per SM (fixed, not tuned)."""
    if "SPLIT" in cfg:
        return max(1, min(int(cfg["SPLIT"]), steps))
    want = _cdiv(2 * _num_sms(device), max(programs, 1))
    return max(1, min(want, steps, 16))


def check_dot_blocks(name: str, meta: dict) -> None:
    bad = {k: v for k, v in meta.items() if k in DOT_BLOCKS and v < 16}
    if bad:
        raise ValueError(f"{name}: tl.dot block dims must be >= 16 (GPUs reject smaller), got {bad}")


def _launch(kernel, name, grid, args, meta: dict, cfg: dict):
    check_dot_blocks(name, meta)
    if len(LAUNCH_LOG) >= _LOG_LIMIT:
        del LAUNCH_LOG[: _LOG_LIMIT // 2]
    LAUNCH_LOG.append((name, dict(meta)))
    kw = {} if interpreting() else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    kernel[grid](*args, **meta, **kw)


def _precision(dtype):
    """fp32 dots in full precision (no TF32); fp16/bf16 dots use the target's default (the only option)."""
    return "ieee" if dtype == torch.float32 else None


def _offs64(m: int, k: int) -> bool:
    return m * k >= 2**31 - 1


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------
def _stack_A(As, BR: int, dtype) -> torch.Tensor:
    """[G, BLOCK_R, K] zero-padded copy of the factors in the compute dtype (r×K each: small)."""
    G, K = len(As), As[0].shape[1]
    out = torch.zeros(G, BR, K, dtype=dtype, device=As[0].device)
    for g, a in enumerate(As):
        out[g, : a.shape[0]].copy_(a)
    return out


def s_forward(x2, A_stack, p: float, seed: int) -> torch.Tensor:
    """S [G, M, BLOCK_R] fp32 = drop_g(x)·A_gᵀ (with the 1/(1−p))."""
    M, K = x2.shape
    G, BR, _ = A_stack.shape
    cfg = _config("s", x2.dtype, x2.device)
    BM, BK = cfg["BLOCK_M"], cfg["BLOCK_K"]
    split = _split(cfg, _cdiv(M, BM), _cdiv(K, BK), x2.device)
    part = torch.empty(split, G, M, BR, dtype=torch.float32, device=x2.device)
    meta = dict(G=G, HAS_DROPOUT=p > 0, OFFS64=_offs64(M, K), PRECISION=_precision(x2.dtype),
                BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR, SPLIT_K=split)
    _launch(s_fwd_kernel, "s_fwd", (_cdiv(M, BM), split),
            (x2, A_stack, part, M, K, seed, p, *x2.stride(), *A_stack.stride(), *part.stride()), meta, cfg)
    S = part[0] if split == 1 else part.sum(0)
    if p > 0:
        S.mul_(1.0 / (1.0 - p))
    return S


def out_forward(x2, W, bias, S_g, B, scale: float) -> torch.Tensor:
    M, K = x2.shape
    N, R = W.shape[0], B.shape[1]
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    cfg = _config("out", x2.dtype, x2.device)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    meta = dict(HAS_BIAS=bias is not None, PRECISION=_precision(x2.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                BLOCK_R=S_g.shape[1], GROUP_M=cfg["GROUP_M"])
    _launch(out_fwd_kernel, "out_fwd", (_cdiv(M, BM) * _cdiv(N, BN),),
            (x2, W, bias if bias is not None else W, S_g, B, y, M, N, K, R, float(scale),
             *x2.stride(), *W.stride(), *S_g.stride(), *B.stride(), *y.stride()), meta, cfg)
    return y


def dy_backward(dy2, B, S_g, scale: float, p: float):
    """(dS [M, BLOCK_R] fp32 = s·dy·B/(1−p), dB [N, r] fp32 = s·dyᵀ·S) from one pass over dy."""
    M, N = dy2.shape
    R, BR = B.shape[1], S_g.shape[1]
    cfg = _config("dy", dy2.dtype, dy2.device)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_m = _cdiv(M, BM)
    split = _split(cfg, num_m, _cdiv(N, BN), dy2.device)
    dsp = torch.empty(split, M, BR, dtype=torch.float32, device=dy2.device)
    dbp = torch.empty(num_m, N, BR, dtype=torch.float32, device=dy2.device)
    meta = dict(PRECISION=_precision(dy2.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR, SPLIT_N=split)
    _launch(dy_bwd_kernel, "dy_bwd", (num_m, split),
            (dy2, B, S_g, dsp, dbp, M, N, R, float(scale) / (1.0 - p),
             *dy2.stride(), *B.stride(), *S_g.stride(), *dsp.stride(), *dbp.stride()), meta, cfg)
    dS = dsp[0] if split == 1 else dsp.sum(0)
    dB = (dbp[0] if num_m == 1 else dbp.sum(0))[:, :R].mul_(float(scale))
    return dS, dB


def dx_backward(dy2, W, dS_g, A_g, dx, seed: int, p: float, accumulate: bool) -> None:
    M, N = dy2.shape
    K = W.shape[1]
    cfg = _config("dx", dy2.dtype, dy2.device)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    meta = dict(HAS_DROPOUT=p > 0, ACCUMULATE=accumulate, OFFS64=_offs64(M, K), PRECISION=_precision(dy2.dtype),
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=dS_g.shape[1], GROUP_M=cfg["GROUP_M"])
    _launch(dx_bwd_kernel, "dx_bwd", (_cdiv(M, BM) * _cdiv(K, BK),),
            (dy2, W, dS_g, A_g, dx, M, N, K, seed, p,
             *dy2.stride(), *W.stride(), *dS_g.stride(), *A_g.stride(), *dx.stride()), meta, cfg)


def da_backward(dS, x2, p: float, seed: int) -> torch.Tensor:
    """dA [G, BLOCK_R, K] fp32 = dS_gᵀ·drop_g(x) (dS already carries s/(1−p))."""
    G, M, BR = dS.shape
    K = x2.shape[1]
    cfg = _config("da", x2.dtype, x2.device)
    BM, BK = cfg["BLOCK_M"], cfg["BLOCK_K"]
    split = _split(cfg, _cdiv(K, BK), _cdiv(M, BM), x2.device)
    part = torch.empty(split, G, BR, K, dtype=torch.float32, device=x2.device)
    meta = dict(G=G, HAS_DROPOUT=p > 0, OFFS64=_offs64(M, K), PRECISION=_precision(x2.dtype),
                BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR, SPLIT_M=split)
    _launch(da_bwd_kernel, "da_bwd", (_cdiv(K, BK), split),
            (dS, x2, part, M, K, seed, p, *dS.stride(), *x2.stride(), *part.stride()), meta, cfg)
    return part[0] if split == 1 else part.sum(0)


def dropout_keep(seed: int, m: int, k: int, p: float, device="cpu") -> torch.Tensor:
    """The keep mask (bool [m, k]) the kernels use for ``seed``: ``tl.rand(seed, row·k + col) >= p``."""
    out = torch.empty(m, k, dtype=torch.int8, device=device)
    mask_kernel[(_cdiv(m, 32), _cdiv(k, 32))](out, m, k, int(seed), float(p), OFFS64=_offs64(m, k),
                                                            BLOCK_M=32, BLOCK_K=32)
    return out.bool()


# ---------------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------------
class TritonLoraFunction(torch.autograd.Function):
    """G ∈ [1, 4] LoRA linears sharing x: params = W_0, bias_0, A_0, B_0, W_1, ... (W and bias frozen).

    Returns one tensor for G = 1, else a tuple. Adapter g draws its dropout mask from seed + g.
    Saved for backward: x (once), S (fp32, rank-r), and the parameters themselves.
    """

    @staticmethod
    def forward(ctx, x, scales, p: float, seed: int, *params):
        G = len(params) // 4
        if not 1 <= G <= MAX_GROUP:
            raise ValueError(f"1..{MAX_GROUP} adapters per group, got {G}")
        if x.dtype not in _SUPPORTED:
            raise TypeError(f"triton backend supports {_SUPPORTED}, got {x.dtype}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        if any(ctx.needs_input_grad[4 + 4 * g + j] for g in range(G) for j in (0, 1)):
            raise ValueError("fused LoRA linear: the base weight and bias must be frozen (requires_grad=False)")
        Ws, bs, As, Bs = params[0::4], params[1::4], params[2::4], params[3::4]
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        BR = block_r(max(a.shape[0] for a in As))
        A_stack = _stack_A(As, BR, x.dtype)  # small (G × BR × K): kept for backward's dx
        S = s_forward(x2, A_stack, p, seed)  # [G, M, BR] fp32
        outs = []
        for g in range(G):
            W = Ws[g]
            if W.dtype != x.dtype:
                raise TypeError(f"base weight dtype {W.dtype} != input dtype {x.dtype}")
            y = out_forward(x2, W, bs[g], S[g], Bs[g], scales[g])
            outs.append(y.view(*x.shape[:-1], W.shape[0]))
        need_A = any(ctx.needs_input_grad[4 + 4 * g + 2] for g in range(G))
        ctx.save_for_backward(x if need_A else None, S, A_stack, *params)  # x only if some dA is needed
        ctx.scales, ctx.p, ctx.seed, ctx.G, ctx.BR = tuple(float(s) for s in scales), float(p), int(seed), G, BR
        ctx.x_shape, ctx.x_meta = x.shape, (x.dtype, x.device)
        return outs[0] if G == 1 else tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x, S, A_stack, *params = ctx.saved_tensors
        G, p, seed, BR = ctx.G, ctx.p, ctx.seed, ctx.BR
        Ws, As, Bs = params[0::4], params[2::4], params[3::4]
        dtype, device = ctx.x_meta
        K = ctx.x_shape[-1]
        M = S.shape[1]
        need_x = ctx.needs_input_grad[0]
        grads: list = [None] * (4 * G)
        dS = None if G == 1 else torch.zeros(G, M, BR, dtype=torch.float32, device=device)
        dy2s = []
        for g, dy in enumerate(dys):
            if dy is None:
                dy2s.append(None)
                continue
            dy2 = dy.reshape(-1, Ws[g].shape[0])
            if dy2.stride(-1) != 1:
                dy2 = dy2.contiguous()
            dy2s.append(dy2)
            dS_g, dB_g = dy_backward(dy2, Bs[g], S[g], ctx.scales[g], p)
            if G == 1:
                dS = dS_g.unsqueeze(0)  # one adapter: its dS is the stack (no zero fill, no copy)
            else:
                dS[g].copy_(dS_g)
            if ctx.needs_input_grad[4 + 4 * g + 3]:
                grads[4 * g + 3] = dB_g.to(Bs[g].dtype)
        if dS is None:  # one adapter and no gradient for its output
            dS = torch.zeros(1, M, BR, dtype=torch.float32, device=device)
        dx = None
        if need_x:
            live = [g for g in range(G) if dy2s[g] is not None]
            alloc = torch.empty if live else torch.zeros  # the first launch overwrites every element
            dx = alloc(M, K, dtype=dtype if len(live) <= 1 else torch.float32, device=device)
            for i, g in enumerate(live):
                dx_backward(dy2s[g], Ws[g], dS[g], A_stack[g], dx, seed + g, p, accumulate=i > 0)
            dx = dx.to(dtype).view(ctx.x_shape)
        if any(ctx.needs_input_grad[4 + 4 * g + 2] for g in range(G)):
            dA = da_backward(dS, x.reshape(-1, K), p, seed)
            for g in range(G):
                if ctx.needs_input_grad[4 + 4 * g + 2]:
                    grads[4 * g + 2] = dA[g, : As[g].shape[0]].to(As[g].dtype)
        return (dx, None, None, None, *grads)


def lora_linear(x, weight, bias, lora_A, lora_B, scale: float, p: float = 0.0, seed: int = 0):
    return TritonLoraFunction.apply(x, (float(scale),), float(p), int(seed), weight, bias, lora_A, lora_B)


def grouped_lora_linear(x, weights, biases, As, Bs, scales, p: float = 0.0, seed: int = 0):
    outs = []
    G = len(weights)
    for g0 in range(0, G, MAX_GROUP):  # groups larger than MAX_GROUP run in chunks of MAX_GROUP
        params = []
        sl = slice(g0, min(G, g0 + MAX_GROUP))
        for W, b, A, B in zip(weights[sl], biases[sl], As[sl], Bs[sl], strict=True):
            params += [W, b, A, B]
        res = TritonLoraFunction.apply(x, tuple(float(s) for s in scales[sl]), float(p), int(seed) + g0, *params)
        outs += [res] if len(params) == 4 else list(res)
    return tuple(outs)


_SELFCHECK: dict = {}


def selfcheck(device, dtype) -> str | None:
    """Run all five kernels once on a tiny problem and compare with a float64 reference (cached per
    device and dtype). Returns None when they agree, else a description of what went wrong."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _SELFCHECK:
        _SELFCHECK[key] = _selfcheck(device, dtype)
    return _SELFCHECK[key]


def _selfcheck(device, dtype) -> str | None:
    gen = torch.Generator().manual_seed(0)
    m, k, n, r, p, seed, s = 40, 48, 24, 4, 0.25, 1234, 0.5
    x = (torch.randn(m, k, generator=gen)).to(device, dtype).requires_grad_()
    W = (torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype)
    A = (torch.randn(r, k, generator=gen) / k**0.5).to(device).requires_grad_()
    B = torch.randn(n, r, generator=gen).to(device).requires_grad_()
    y = lora_linear(x, W, b, A, B, s, p, seed)
    dy = torch.randn(m, n, generator=gen).to(device, dtype)
    got = (y, *torch.autograd.grad(y, (x, A, B), dy))
    keep = dropout_keep(seed, m, k, p, device).double()
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    yr = xr @ W.double().T + b.double() + s * ((xr * keep / (1 - p)) @ Ar.T) @ Br.T
    ref = (yr, *torch.autograd.grad(yr, (xr, Ar, Br), dy.double()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for what, g, want in zip(("y", "dx", "dA", "dB"), got, ref):
        err = ((g.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if not err <= tol:
            return f"{what} off by {err:.2e} (relative) for {dtype} on {device}"
    return None
