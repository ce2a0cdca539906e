"""Triton backend of the fused LoRA linear (GPU; also runs on CPU tensors under ``TRITON_INTERPRET=1``).

Importing this module imports triton; :mod:`fedlora.kernels` imports it only when the Triton backend is chosen.

Kernels (every ``tl.dot`` operand dimension is one of the launch's BLOCK_* values, all ≥ 16; the rank is padded
to BLOCK_R = max(16, next power of two ≥ r) with zero rows of A, so ranks 1..16 all use 16-wide dots):

forward
  1. ``_s_fwd_kernel``   S_g = drop_g(x)·A_gᵀ for up to 4 adapters sharing x (q/k/v, gate/up): each x tile is
                          loaded once, masked per adapter with ``tl.rand(seed + g, row·K + col)`` and multiplied
                          by every A_g. Split over K for occupancy; partials summed in a fixed order. S is fp32.
  2. ``_out_fwd_kernel`` Y = x·Wᵀ (+bias) + s·S·Bᵀ: the LoRA product is the accumulator's prologue, so no m×n
                          LoRA intermediate exists. One launch per adapter (each has its own W).
backward
  3. ``_dy_bwd_kernel``  one pass over dy gives dS = s·dy·B/(1−p) (kept in registers per row block) and the
                          per-row-block partials of dB = s·dyᵀ·S (written once, summed in a fixed order).
  4. ``_dx_bwd_kernel``  dx = M⊙(dS·A) + dy·W: the masked LoRA term (mask regenerated from the seed) is the
                          prologue of the dy·W GEMM. For a group, launches accumulate into one fp32 dx in order.
  5. ``_da_bwd_kernel``  dA_g = dS_gᵀ·drop_g(x) for all adapters of a group from one read of x (split over M,
                          partials summed in a fixed order).

No atomics anywhere: results are bit-reproducible for a given launch configuration. The configuration is a
fixed function of dtype and shape (no autotuning), so it does not change between runs either.

Precision: fp16/bf16 inputs use tensor-core dots with fp32 accumulation; the LoRA factors are fp32 master
copies (the PEFT parameters) cast to the input dtype per tile; S and dS are kept in fp32 and cast to the input
dtype only as dot operands. fp32 inputs use ``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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
# kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _keep_mask(seed, rm, rk, K, p, OFFS64: tl.constexpr):
    """Dropout keep mask of the tile rows rm × cols rk: a pure function of (seed, row·K + col)."""
    if OFFS64:
        offs = rm[:, None].to(tl.int64) * K + rk[None, :]
    else:
        offs = rm[:, None] * K + rk[None, :]
    return tl.rand(seed, offs) >= p


@triton.jit
def _s_acc(acc, x, A, g, seed, p, rm, rk, rr, K, sag, sar, sak,
           HAS_DROPOUT: tl.constexpr, OFFS64: tl.constexpr, PRECISION: tl.constexpr):
    # A is stacked and zero-padded: [G, BLOCK_R, K]; load the [BLOCK_K, BLOCK_R] tile of A_gᵀ.
    a_t = tl.load(A + g * sag + rk[:, None] * sak + rr[None, :] * sar, mask=rk[:, None] < K, other=0.0)
    if HAS_DROPOUT:
        keep = _keep_mask(seed + g, rm, rk, K, p, OFFS64)
        x = tl.where(keep, x, tl.zeros_like(x))
    return tl.dot(x, a_t.to(x.dtype), acc, input_precision=PRECISION)


@triton.jit
def _s_store(S, acc, g, pid_k, rm, rr, M, ssp, ssg, ssm, ssr):
    tl.store(S + pid_k * ssp + g * ssg + rm[:, None] * ssm + rr[None, :] * ssr, acc, mask=rm[:, None] < M)


@triton.jit(do_not_specialize=["seed"])
def _s_fwd_kernel(X, A, S, M, K, seed, p,
                  sxm, sxk, sag, sar, sak, ssp, ssg, ssm, ssr,
                  G: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFS64: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr):
    """S_partial[pid_k, g] = (M_g⊙x)[rows, K-slice]·A_gᵀ   (dot dims: BLOCK_M, BLOCK_K, BLOCK_R)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # read once for all adapters
        acc0 = _s_acc(acc0, x, A, 0, seed, p, rm, rk, rr, K, sag, sar, sak, HAS_DROPOUT, OFFS64, PRECISION)
        if G > 1:
            acc1 = _s_acc(acc1, x, A, 1, seed, p, rm, rk, rr, K, sag, sar, sak, HAS_DROPOUT, OFFS64, PRECISION)
        if G > 2:
            acc2 = _s_acc(acc2, x, A, 2, seed, p, rm, rk, rr, K, sag, sar, sak, HAS_DROPOUT, OFFS64, PRECISION)
        if G > 3:
            acc3 = _s_acc(acc3, x, A, 3, seed, p, rm, rk, rr, K, sag, sar, sak, HAS_DROPOUT, OFFS64, PRECISION)
    _s_store(S, acc0, 0, pid_k, rm, rr, M, ssp, ssg, ssm, ssr)
    if G > 1:
        _s_store(S, acc1, 1, pid_k, rm, rr, M, ssp, ssg, ssm, ssr)
    if G > 2:
        _s_store(S, acc2, 2, pid_k, rm, rr, M, ssp, ssg, ssm, ssr)
    if G > 3:
        _s_store(S, acc3, 3, pid_k, rm, rr, M, ssp, ssg, ssm, ssr)


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped program order (GROUP_M row blocks share their column tiles in L2)."""
    width = GROUP_M * num_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@triton.jit
def _out_fwd_kernel(X, W, BIAS, S, B, Y, M, N, K, R, scale,
                    sxm, sxk, swn, swk, ssm, ssr, sbn, sbr, sym, syn,
                    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """Y = s·S·Bᵀ + x·Wᵀ (+bias)   (dot dims: BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    cdt = X.dtype.element_ty
    # prologue: the LoRA term starts the accumulator
    s_tile = tl.load(S + rm[:, None] * ssm + rr[None, :] * ssr, mask=rm[:, None] < M, other=0.0)
    b_t = tl.load(B + rr[:, None] * sbr + rn[None, :] * sbn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    acc = tl.dot((s_tile * scale).to(cdt), b_t.to(cdt), input_precision=PRECISION)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w_t = tl.load(W + rk[:, None] * swk + rn[None, :] * swn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dy_bwd_kernel(DY, B, S, DS, DBP, M, N, R, ds_scale,
                   sdym, sdyn, sbn, sbr, ssm, ssr, sdsp, sdsm, sdsr, sdbp, sdbn, sdbr,
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_N: tl.constexpr):
    """One pass over dy: dS_partial[pid_n] = ds_scale·dy·B, dB_partial[pid_m] = dyᵀ·S.

    dot dims: BLOCK_M, BLOCK_N, BLOCK_R. Each dy tile is read exactly once.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    cdt = DY.dtype.element_ty
    s_tile = tl.load(S + rm[:, None] * ssm + rr[None, :] * ssr, mask=rm[:, None] < M, other=0.0).to(cdt)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(pid_n * BLOCK_N, N, SPLIT_N * BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rm[:, None] * sdym + rn[None, :] * sdyn, mask=(rm[:, None] < M) & (rn[None, :] < N),
                     other=0.0)
        b = tl.load(B + rn[:, None] * sbn + rr[None, :] * sbr, mask=(rn[:, None] < N) & (rr[None, :] < R),
                    other=0.0).to(cdt)
        acc = tl.dot(dy, b, acc, input_precision=PRECISION)
        db = tl.dot(tl.trans(dy), s_tile, input_precision=PRECISION)  # [BLOCK_N, BLOCK_R]
        tl.store(DBP + pid_m * sdbp + rn[:, None] * sdbn + rr[None, :] * sdbr, db, mask=rn[:, None] < N)
    tl.store(DS + pid_n * sdsp + rm[:, None] * sdsm + rr[None, :] * sdsr, acc * ds_scale, mask=rm[:, None] < M)


@triton.jit(do_not_specialize=["seed"])
def _dx_bwd_kernel(DY, W, DS, A, DX, M, N, K, seed, p,
                   sdym, sdyn, swn, swk, sdsm, sdsr, sar, sak, sdxm, sdxk,
                   HAS_DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr, OFFS64: tl.constexpr,
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """dx (+)= M⊙(dS·A) + dy·W   (dS already carries s/(1−p); dot dims: BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)."""
    pid_m, pid_k = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    cdt = DY.dtype.element_ty
    ds = tl.load(DS + rm[:, None] * sdsm + rr[None, :] * sdsr, mask=rm[:, None] < M, other=0.0).to(cdt)
    a = tl.load(A + rr[:, None] * sar + rk[None, :] * sak, mask=rk[None, :] < K, other=0.0).to(cdt)
    acc = tl.dot(ds, a, input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, rm, rk, K, p, OFFS64)  # the forward's mask, regenerated
        acc = tl.where(keep, acc, tl.zeros_like(acc))
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rm[:, None] * sdym + rn[None, :] * sdyn, mask=(rm[:, None] < M) & (rn[None, :] < N),
                     other=0.0)
        w = tl.load(W + rn[:, None] * swn + rk[None, :] * swk, mask=(rn[:, None] < N) & (rk[None, :] < K),
                    other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    dx_ptr = DX + rm[:, None] * sdxm + rk[None, :] * sdxk
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    if ACCUMULATE:
        acc += tl.load(dx_ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr, acc.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _da_acc(acc, x, DS, g, seed, p, rm, rk, rr, M, K, sdsg, sdsm, sdsr,
            HAS_DROPOUT: tl.constexpr, OFFS64: tl.constexpr, PRECISION: tl.constexpr):
    ds_t = tl.load(DS + g * sdsg + rr[:, None] * sdsr + rm[None, :] * sdsm, mask=rm[None, :] < M, other=0.0)
    if HAS_DROPOUT:
        keep = _keep_mask(seed + g, rm, rk, K, p, OFFS64)
        x = tl.where(keep, x, tl.zeros_like(x))
    return tl.dot(ds_t.to(x.dtype), x, acc, input_precision=PRECISION)


@triton.jit
def _da_store(DAP, acc, g, pid_s, rr, rk, K, sdap, sdag, sdar, sdak):
    tl.store(DAP + pid_s * sdap + g * sdag + rr[:, None] * sdar + rk[None, :] * sdak, acc, mask=rk[None, :] < K)


@triton.jit(do_not_specialize=["seed"])
def _da_bwd_kernel(DS, X, DAP, M, K, seed, p,
                   sdsg, sdsm, sdsr, sxm, sxk, sdap, sdag, sdar, sdak,
                   G: tl.constexpr, HAS_DROPOUT: tl.constexpr, OFFS64: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_M: tl.constexpr):
    """dA_partial[pid_s, g] = dS_gᵀ·(M_g⊙x) over an M-slice; x tiles read once for all adapters.

    dot dims: BLOCK_R, BLOCK_M, BLOCK_K.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc0 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, SPLIT_M * BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        acc0 = _da_acc(acc0, x, DS, 0, seed, p, rm, rk, rr, M, K, sdsg, sdsm, sdsr, HAS_DROPOUT, OFFS64, PRECISION)
        if G > 1:
            acc1 = _da_acc(acc1, x, DS, 1, seed, p, rm, rk, rr, M, K, sdsg, sdsm, sdsr, HAS_DROPOUT, OFFS64,
                           PRECISION)
        if G > 2:
            acc2 = _da_acc(acc2, x, DS, 2, seed, p, rm, rk, rr, M, K, sdsg, sdsm, sdsr, HAS_DROPOUT, OFFS64,
                           PRECISION)
        if G > 3:
            acc3 = _da_acc(acc3, x, DS, 3, seed, p, rm, rk, rr, M, K, sdsg, sdsm, sdsr, HAS_DROPOUT, OFFS64,
                           PRECISION)
    _da_store(DAP, acc0, 0, pid_s, rr, rk, K, sdap, sdag, sdar, sdak)
    if G > 1:
        _da_store(DAP, acc1, 1, pid_s, rr, rk, K, sdap, sdag, sdar, sdak)
    if G > 2:
        _da_store(DAP, acc2, 2, pid_s, rr, rk, K, sdap, sdag, sdar, sdak)
    if G > 3:
        _da_store(DAP, acc3, 3, pid_s, rr, rk, K, sdap, sdag, sdar, sdak)


@triton.jit(do_not_specialize=["seed"])
def _mask_kernel(OUT, M, K, seed, p, OFFS64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep mask itself (tests and debugging only; the training kernels never materialise it)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rm, rk, K, p, OFFS64)
    tl.store(OUT + rm[:, None] * K + rk[None, :], keep.to(tl.int8), mask=(rm[:, None] < M) & (rk[None, :] < K))


# ---------------------------------------------------------------------------------------------------------
# launch configuration (fixed function of dtype and shape: deterministic, no autotuning)
# ---------------------------------------------------------------------------------------------------------
DOT_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R")


def block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(int(r)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _config(kind: str, dtype: torch.dtype, device: torch.device) -> dict:
    if interpreting() or device.type != "cuda":
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
    cfg.update({k: v for k, v in CONFIG_OVERRIDE.items() if k in cfg or k == "SPLIT"})
    return cfg


def _split(cfg: dict, programs: int, steps: int, device) -> int:
    """How many ways to split a reduction so that there are ≥ 2 programs per SM (fixed, not tuned)."""
    if "SPLIT" in cfg:
        return max(1, min(int(cfg["SPLIT"]), steps))
    want = triton.cdiv(2 * _num_sms(device), max(programs, 1))
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
    split = _split(cfg, triton.cdiv(M, BM), triton.cdiv(K, BK), x2.device)
    part = torch.empty(split, G, M, BR, dtype=torch.float32, device=x2.device)
    meta = dict(G=G, HAS_DROPOUT=p > 0, OFFS64=_offs64(M, K), PRECISION=_precision(x2.dtype),
                BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR, SPLIT_K=split)
    _launch(_s_fwd_kernel, "s_fwd", (triton.cdiv(M, BM), split),
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
    _launch(_out_fwd_kernel, "out_fwd", (triton.cdiv(M, BM) * triton.cdiv(N, BN),),
            (x2, W, bias if bias is not None else W, S_g, B, y, M, N, K, R, float(scale),
             *x2.stride(), *W.stride(), *S_g.stride(), *B.stride(), *y.stride()), meta, cfg)
    return y


def dy_backward(dy2, B, S_g, scale: float, p: float):
    """(dS [M, BLOCK_R] fp32 = s·dy·B/(1−p), dB [N, r] fp32 = s·dyᵀ·S) from one pass over dy."""
    M, N = dy2.shape
    R, BR = B.shape[1], S_g.shape[1]
    cfg = _config("dy", dy2.dtype, dy2.device)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_m = triton.cdiv(M, BM)
    split = _split(cfg, num_m, triton.cdiv(N, BN), dy2.device)
    dsp = torch.empty(split, M, BR, dtype=torch.float32, device=dy2.device)
    dbp = torch.empty(num_m, N, BR, dtype=torch.float32, device=dy2.device)
    meta = dict(PRECISION=_precision(dy2.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR, SPLIT_N=split)
    _launch(_dy_bwd_kernel, "dy_bwd", (num_m, split),
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
    _launch(_dx_bwd_kernel, "dx_bwd", (triton.cdiv(M, BM) * triton.cdiv(K, BK),),
            (dy2, W, dS_g, A_g, dx, M, N, K, seed, p,
             *dy2.stride(), *W.stride(), *dS_g.stride(), *A_g.stride(), *dx.stride()), meta, cfg)


def da_backward(dS, x2, p: float, seed: int) -> torch.Tensor:
    """dA [G, BLOCK_R, K] fp32 = dS_gᵀ·drop_g(x) (dS already carries s/(1−p))."""
    G, M, BR = dS.shape
    K = x2.shape[1]
    cfg = _config("da", x2.dtype, x2.device)
    BM, BK = cfg["BLOCK_M"], cfg["BLOCK_K"]
    split = _split(cfg, triton.cdiv(K, BK), triton.cdiv(M, BM), x2.device)
    part = torch.empty(split, G, BR, K, dtype=torch.float32, device=x2.device)
    meta = dict(G=G, HAS_DROPOUT=p > 0, OFFS64=_offs64(M, K), PRECISION=_precision(x2.dtype),
                BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR, SPLIT_M=split)
    _launch(_da_bwd_kernel, "da_bwd", (triton.cdiv(K, BK), split),
            (dS, x2, part, M, K, seed, p, *dS.stride(), *x2.stride(), *part.stride()), meta, cfg)
    return part[0] if split == 1 else part.sum(0)


def dropout_keep(seed: int, m: int, k: int, p: float, device="cpu") -> torch.Tensor:
    """The keep mask (bool [m, k]) the kernels use for ``seed``: ``tl.rand(seed, row·k + col) >= p``."""
    out = torch.empty(m, k, dtype=torch.int8, device=device)
    _mask_kernel[(triton.cdiv(m, 32), triton.cdiv(k, 32))](out, m, k, int(seed), float(p), OFFS64=_offs64(m, k),
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
        S = s_forward(x2, _stack_A(As, BR, x.dtype), p, seed)  # [G, M, BR] fp32
        outs = []
        for g in range(G):
            W = Ws[g]
            if W.dtype != x.dtype:
                raise TypeError(f"base weight dtype {W.dtype} != input dtype {x.dtype}")
            y = out_forward(x2, W, bs[g], S[g], Bs[g], scales[g])
            outs.append(y.view(*x.shape[:-1], W.shape[0]))
        need_A = any(ctx.needs_input_grad[4 + 4 * g + 2] for g in range(G))
        ctx.save_for_backward(x if need_A else None, S, *params)  # x only if some dA is needed
        ctx.scales, ctx.p, ctx.seed, ctx.G, ctx.BR = tuple(float(s) for s in scales), float(p), int(seed), G, BR
        ctx.x_shape, ctx.x_meta = x.shape, (x.dtype, x.device)
        return outs[0] if G == 1 else tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x, S, *params = ctx.saved_tensors
        G, p, seed, BR = ctx.G, ctx.p, ctx.seed, ctx.BR
        Ws, As, Bs = params[0::4], params[2::4], params[3::4]
        dtype, device = ctx.x_meta
        K = ctx.x_shape[-1]
        M = S.shape[1]
        need_x = ctx.needs_input_grad[0]
        grads: list = [None] * (4 * G)
        dS = torch.zeros(G, M, BR, dtype=torch.float32, device=device)
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
            dS[g].copy_(dS_g)
            if ctx.needs_input_grad[4 + 4 * g + 3]:
                grads[4 * g + 3] = dB_g.to(Bs[g].dtype)
        A_stack = _stack_A(As, BR, dtype)
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
