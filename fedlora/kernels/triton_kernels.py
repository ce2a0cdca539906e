"""The Triton kernels of the fused LoRA linear (``@triton.jit`` functions only). What each computes, and why the
results are bit-reproducible: the docstring of :mod:`fedlora.kernels.triton_backend`, which launches them."""

import triton
import triton.language as tl


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
def s_fwd_kernel(X, A, S, M, K, seed, p,
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
def out_fwd_kernel(X, W, BIAS, S, B, Y, M, N, K, R, scale,
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
def dy_bwd_kernel(DY, B, S, DS, DBP, M, N, R, ds_scale,
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
def dx_bwd_kernel(DY, W, DS, A, DX, M, N, K, seed, p,
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
def da_bwd_kernel(DS, X, DAP, M, K, seed, p,
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
def mask_kernel(OUT, M, K, seed, p, OFFS64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep mask itself (tests and debugging only; the training kernels never materialise it)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rm, rk, K, p, OFFS64)
    tl.store(OUT + rm[:, None] * K + rk[None, :], keep.to(tl.int8), mask=(rm[:, None] < M) & (rk[None, :] < K))
