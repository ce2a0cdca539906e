"""Triton LoRA kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1), against the torch backend.

The interpreter must be on before triton (and our kernels) are imported, and it must not leak into the rest
of a pytest session (on a GPU machine it would turn every Triton kernel of the session into the interpreter).
So unless this process was started with TRITON_INTERPRET=1 (``TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py``),
the file's tests run in one fresh subprocess that sets it before anything imports triton.
Interpreter blind spots respected here: fp32/fp16 only (bf16 tl.dot is garbage under the interpreter), one
launch configuration per kernel (no autotune), shapes ≤ 256.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

_IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" and "fedlora.kernels.triton_backend" not in sys.modules
if os.environ.get("FEDLORA_TRITON_CHILD") == "1":
    _IN_PROCESS = True

in_subprocess = pytest.mark.skipif(not _IN_PROCESS, reason="runs in a subprocess with TRITON_INTERPRET=1")


@pytest.mark.skipif(_IN_PROCESS, reason="tests run in this process")
def test_interpreter_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", FEDLORA_TRITON_CHILD="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


TOL = {torch.float32: dict(rtol=1e-5), torch.float16: dict(rtol=2e-3)}


@pytest.fixture(autouse=True)
def _fresh_config():
    if not _IN_PROCESS:
        yield
        return
    from fedlora.kernels import triton_backend as trb

    trb.CONFIG_OVERRIDE.clear()
    trb.LAUNCH_LOG.clear()
    yield
    trb.CONFIG_OVERRIDE.clear()


def _problem(m_shape, k, n, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    A = (torch.randn(r, k, generator=g) / k**0.5).requires_grad_()  # fp32 master factors
    B = (torch.randn(n, r, generator=g) * 0.5).requires_grad_()
    dy = torch.randn(*m_shape, n, generator=g).to(dtype)
    return x, W, b, A, B, dy


def _run(fn, x, A, B, dy):
    y = fn(x, A, B)
    return (y, *torch.autograd.grad(y, (x, A, B), dy))


def _assert_rel(got, want, rtol, what=""):
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def _reference_with_mask(x, W, b, A, B, dy, s, keep, p):
    """float64 maths with an explicit keep mask."""
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    k = x.shape[-1]
    xd = xr * keep.view(*x.shape[:-1], k).double() / (1 - p)
    y = xr @ W.double().T + s * (xd @ Ar.T) @ Br.T
    if b is not None:
        y = y + b.double()
    return (y, *torch.autograd.grad(y, (xr, Ar, Br), dy.double()))


@in_subprocess
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [((67,), 45, 83, 5), ((2, 65), 96, 200, 16), ((256,), 256, 256, 16)])
def test_matches_torch_backend(dtype, shape):
    from fedlora.kernels import torch_backend as tb
    from fedlora.kernels import triton_backend as trb

    m_shape, k, n, r = shape
    x, W, b, A, B, dy = _problem(m_shape, k, n, r, dtype, bias=k != 256)
    got = _run(lambda x, A, B: trb.lora_linear(x, W, b, A, B, 0.5), x, A, B, dy)
    # the reference: torch backend in float64 (fp32 tolerance 1e-5 is then a bound on the kernels' own error)
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    Wr, br = W.double(), None if b is None else b.double()
    want = _run(lambda x, A, B: tb.lora_linear(x, Wr, br, A, B, 0.5), xr, Ar, Br, dy.double())
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == got[3].dtype == torch.float32
    for what, u, v in zip(("y", "dx", "dA", "dB"), got, want):
        _assert_rel(u, v, TOL[dtype]["rtol"], f"{dtype} {shape} {what}")


@in_subprocess
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_same_mask_forward_and_backward(dtype):
    """y, dx and dA all agree with one mask: the one tl.rand(seed, offsets) gives for that seed."""
    from fedlora.kernels import triton_backend as trb

    m_shape, k, n, r, p, seed = (3, 30), 72, 50, 8, 0.3, 4242
    x, W, b, A, B, dy = _problem(m_shape, k, n, r, dtype)
    got = _run(lambda x, A, B: trb.lora_linear(x, W, b, A, B, 1.5, p, seed), x, A, B, dy)
    keep = trb.dropout_keep(seed, 90, k, p)
    assert torch.equal(keep, trb.dropout_keep(seed, 90, k, p))
    assert not torch.equal(keep, trb.dropout_keep(seed + 1, 90, k, p))
    assert abs((1 - keep.float().mean().item()) - p) < 0.05
    want = _reference_with_mask(x, W, b, A, B, dy, 1.5, keep, p)
    for what, u, v in zip(("y", "dx", "dA", "dB"), got, want):
        _assert_rel(u, v, TOL[dtype]["rtol"], what)
    again = _run(lambda x, A, B: trb.lora_linear(x, W, b, A, B, 1.5, p, seed), x, A, B, dy)
    for u, v in zip(got, again):  # deterministic: bit-identical
        assert torch.equal(u, v)


@in_subprocess
def test_small_blocks_splits_and_block_dims():
    """16-wide blocks, split reductions and rank 3 (padded to 16): same results, and every tl.dot dim ≥ 16."""
    from fedlora.kernels import torch_backend as tb
    from fedlora.kernels import triton_backend as trb

    x, W, b, A, B, dy = _problem((37,), 40, 29, 3, torch.float32)
    trb.CONFIG_OVERRIDE.update(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=2)
    got = _run(lambda x, A, B: trb.lora_linear(x, W, b, A, B, 2.0), x, A, B, dy)
    want = _run(lambda x, A, B: tb.lora_linear(x, W, b, A, B, 2.0), x, A, B, dy)
    for u, v in zip(got, want):
        _assert_rel(u, v, 1e-5)
    names = {name for name, _ in trb.LAUNCH_LOG}
    assert names == {"s_fwd", "out_fwd", "dy_bwd", "dx_bwd", "da_bwd"}
    splits = {name: meta.get("SPLIT_K", meta.get("SPLIT_N", meta.get("SPLIT_M"))) for name, meta in trb.LAUNCH_LOG}
    assert splits["s_fwd"] == splits["dy_bwd"] == splits["da_bwd"] == 2
    for name, meta in trb.LAUNCH_LOG:
        for key in trb.DOT_BLOCKS:
            if key in meta:
                assert meta[key] >= 16, (name, key, meta[key])
    with pytest.raises(ValueError, match=">= 16"):
        trb.check_dot_blocks("x", {"BLOCK_K": 8})


@in_subprocess
def test_block_dims_default_configs_tiny_problem():
    from fedlora.kernels import triton_backend as trb

    x, W, b, A, B, dy = _problem((5,), 7, 9, 2, torch.float16)
    _run(lambda x, A, B: trb.lora_linear(x, W, b, A, B, 1.0, 0.1, 3), x, A, B, dy)
    assert len(trb.LAUNCH_LOG) == 5
    assert all(meta[key] >= 16 for _, meta in trb.LAUNCH_LOG for key in trb.DOT_BLOCKS if key in meta)


@in_subprocess
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_grouped_reads_x_once_and_matches(p):
    """q/k/v-like group (GQA widths): one S launch and one dA launch for all three adapters."""
    from fedlora.kernels import torch_backend as tb
    from fedlora.kernels import triton_backend as trb

    g = torch.Generator().manual_seed(3)
    dtype, k, m = torch.float32, 64, 50
    x = torch.randn(m, k, generator=g).requires_grad_()
    Ws = [torch.randn(n, k, generator=g) / 8 for n in (64, 32, 32)]
    bs = [None, None, torch.randn(32, generator=g)]
    As = [(torch.randn(r, k, generator=g) / 8).requires_grad_() for r in (8, 4, 16)]
    Bs = [torch.randn(n, r, generator=g).requires_grad_() for n, r in ((64, 8), (32, 4), (32, 16))]
    scales, seed = [2.0, 1.0, 0.5], 77
    outs = trb.grouped_lora_linear(x, Ws, bs, As, Bs, scales, p, seed)
    dys = [torch.randn(o.shape, generator=g) for o in outs]
    got = (*outs, *torch.autograd.grad(outs, (x, *As, *Bs), dys))
    names = [name for name, _ in trb.LAUNCH_LOG]
    assert names.count("s_fwd") == 1 and names.count("da_bwd") == 1 and names.count("out_fwd") == 3
    if p == 0:
        ref = tb.grouped_lora_linear(x, Ws, bs, As, Bs, scales, 0.0, seed)
        want = (*ref, *torch.autograd.grad(ref, (x, *As, *Bs), dys))
    else:  # each adapter g with its own mask, seed + g
        singles, grads = [], None
        for i in range(3):
            keep = trb.dropout_keep(seed + i, m, k, p)
            y, dx, dA, dB = _reference_with_mask(x, Ws[i], bs[i], As[i], Bs[i], dys[i], scales[i], keep, p)
            singles.append((y, dx, dA, dB))
        want = (*[s[0] for s in singles], sum(s[1] for s in singles), *[s[2] for s in singles],
                *[s[3] for s in singles])
    for i, (u, v) in enumerate(zip(got, want)):
        _assert_rel(u, v, 1e-5, f"output/grad {i}")


@in_subprocess
def test_apply_fused_lora_triton_mode_matches_peft():
    """mode='triton' on a small PEFT model (interpreter, fp32): forward and LoRA grads match PEFT's."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from fedlora.kernels import apply_fused_lora, remove_fused_lora
    from fedlora.kernels.peft_integration import call_stats

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 48))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_()
    x = torch.randn(2, 33, 48)

    def step():
        model.zero_grad()
        y = model(x)
        y.square().mean().backward()
        return [y.detach()] + [prm.grad.clone() for name, prm in model.named_parameters() if "lora_" in name]

    want = step()
    report = apply_fused_lora(model, mode="triton")
    assert report.backend == "triton" and len(report.fused) == 2, report.summary()
    got = step()
    assert call_stats(model)["fused"] == 2
    for u, v in zip(got, want):
        _assert_rel(u, v, 1e-5)
    remove_fused_lora(model)
