"""Triton LoRA kernels compiled for a CUDA device, against float64 references (skipped without one; run by
bench/gpu_checks.sh). tests/test_kernels_triton.py checks the same kernels through Triton's interpreter on the CPU,
which cannot run bf16 dots, autotuned launch configurations or real block sizes; here they run as a GPU runs them:
fp32 (IEEE dots, no TF32), fp16 and bf16, odd and large shapes, dropout with the device's own mask, the grouped
q/k/v launch, and fedlora's CUDA recipe (fp32 weights under bf16 autocast) through ``apply_fused_lora``.

Bounds are tests/tolerances.py's: fp32 roundings on the longest path, plus at most 4 roundings to the input dtype
(unit roundoff 2^-11 for fp16, 2^-8 for bf16) on any path (see test_kernels_triton.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from test_kernels_triton import _depth, _problem, _reference_with_mask, _run  # the interpreter suite's helpers
from tolerances import U16, assert_within, f32_tol, magnitude

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None
    or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and compiled Triton (not the interpreter)")

DEV = "cuda"
LOW = {torch.float32: (0, U16), torch.float16: (4, U16), torch.bfloat16: (4, 2.0**-8)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(got, want, mags, depth, what, dtype):
    low, u_low = LOW[dtype]
    for i, (u, v, mag) in enumerate(zip(got, want, mags)):
        assert_within(u, v, f32_tol(depth, mag.detach(), sides=1, low=low, u_low=u_low), f"{what} [{i}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((67,), 45, 83, 5), ((2, 65), 96, 200, 16), ((4096,), 1024, 1024, 16),
                                   ((3, 1000), 576, 192, 8)])
def test_compiled_matches_float64(dtype, shape):
    from fedlora.kernels import torch_backend as tb
    from fedlora.kernels import triton_backend as trb

    m_shape, k, n, r = shape
    x, W, b, A, B, dy = _problem(m_shape, k, n, r, dtype, bias=k != 1024, device=DEV)
    got = _run(lambda x, A, B: trb.lora_linear(x, W, b, A, B, 0.5), x, A, B, dy)
    ref = lambda x, W, b, A, B, dy: _run(lambda x, A, B: tb.lora_linear(x, W, b, A, B, 0.5), x, A, B, dy)  # noqa: E731
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    want = ref(xr, W.double(), None if b is None else b.double(), Ar, Br, dy.double())
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == got[3].dtype == torch.float32
    assert all(t.device.type == DEV for t in got)
    mags = magnitude(ref, x, W, b, A, B, dy)
    _check(got, want, mags, _depth(x.numel() // k, k, n, r), f"{dtype} {shape} y, dx, dA, dB", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_dropout_one_mask_forward_and_backward(dtype):
    """y, dx and dA agree with the one mask the device's tl.rand(seed, offsets) gives; the same seed gives
    bit-identical results, another seed another mask, and the kept share is 1 - p."""
    from fedlora.kernels import triton_backend as trb

    m_shape, k, n, r, p, seed = (3, 300), 264, 130, 8, 0.3, 4242
    m = 900
    x, W, b, A, B, dy = _problem(m_shape, k, n, r, dtype, device=DEV)
    got = _run(lambda x, A, B: trb.lora_linear(x, W, b, A, B, 1.5, p, seed), x, A, B, dy)
    keep = trb.dropout_keep(seed, m, k, p, DEV)
    assert keep.device.type == DEV and torch.equal(keep, trb.dropout_keep(seed, m, k, p, DEV))
    assert not torch.equal(keep, trb.dropout_keep(seed + 1, m, k, p, DEV))
    assert abs((1 - keep.float().mean().item()) - p) < 0.01
    want = _reference_with_mask(x, W, b, A, B, dy, 1.5, keep, p)
    mags = magnitude(_reference_with_mask, x, W, b, A, B, dy, 1.5, keep, p)
    _check(got, want, mags, _depth(m, k, n, r), f"{dtype} y, dx, dA, dB", dtype)
    again = _run(lambda x, A, B: trb.lora_linear(x, W, b, A, B, 1.5, p, seed), x, A, B, dy)
    for u, v in zip(got, again):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_grouped_qkv(dtype):
    """A q/k/v group with GQA widths and dropout: one S launch and one dA launch for the three adapters, each
    adapter with its own mask (seed + g), within the bound of three float64 singles."""
    from fedlora.kernels import triton_backend as trb

    g = torch.Generator().manual_seed(3)
    k, m, p, seed, scales = 576, 700, 0.1, 77, [2.0, 1.0, 0.5]
    widths, ranks = (576, 192, 192), (8, 4, 16)
    x = torch.randn(m, k, generator=g).to(DEV, dtype).requires_grad_()
    Ws = [(torch.randn(n, k, generator=g) / 24).to(DEV, dtype) for n in widths]
    bs = [None, None, torch.randn(192, generator=g).to(DEV, dtype)]
    As = [(torch.randn(r, k, generator=g) / 24).to(DEV).requires_grad_() for r in ranks]
    Bs = [torch.randn(n, r, generator=g).to(DEV).requires_grad_() for n, r in zip(widths, ranks)]
    trb.LAUNCH_LOG.clear()
    outs = trb.grouped_lora_linear(x, Ws, bs, As, Bs, scales, p, seed)
    dys = [torch.randn(o.shape, generator=g).to(DEV, dtype) for o in outs]
    got = (*outs, *torch.autograd.grad(outs, (x, *As, *Bs), dys))
    names = [name for name, _ in trb.LAUNCH_LOG]
    assert names.count("s_fwd") == 1 and names.count("da_bwd") == 1 and names.count("out_fwd") == 3

    def singles(x, Ws, bs, As, Bs, dys):
        out = [_reference_with_mask(x, Ws[i], bs[i], As[i], Bs[i], dys[i], scales[i],
                                    trb.dropout_keep(seed + i, m, k, p, DEV), p) for i in range(3)]
        return (*[s[0] for s in out], sum(s[1] for s in out), *[s[2] for s in out], *[s[3] for s in out])

    want = singles(x, Ws, bs, As, Bs, dys)
    mags = magnitude(lambda x, *t: singles(x, t[0:3], t[3:6], t[6:9], t[9:12], t[12:15]), x, *Ws, *bs, *As, *Bs,
                     *dys)
    _check(got, want, mags, _depth(m, k, sum(widths), sum(ranks), groups=3), f"{dtype} outputs, dx, dA, dB", dtype)


def test_triton_under_bf16_autocast_matches_peft():
    """kernels=triton under bf16 autocast runs the compiled kernels in bf16 (14 'fused (autocast)' calls, no
    fallback to PEFT), gives fp32 gradients to the fp32 factors, and is as close to PEFT under autocast as PEFT
    under autocast is to fp32: test_kernels.py's check, on the device with a larger batch."""
    from test_kernels import check_fused_under_autocast

    check_fused_under_autocast("triton", DEV, (4, 64))
