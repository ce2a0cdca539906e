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
from tolerances import assert_within, f32_tol, magnitude

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


# Bounds from tests/tolerances.py: fp32 roundings on any path <= m + k + n + r (every reduction length) + 8 per
# adapter (scales, bias, mask rescale, adds); fp16 inputs add <= 4 fp16 roundings on any path (A or S·s or dS cast
# to a dot operand, B cast, the fp16 output), see the triton_backend docstring.
LOW = {torch.float32: 0, torch.float16: 4}


def _depth(m, k, n, r, groups=1):
    return m + k + n + r + 8 * groups


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


def _problem(m_shape, k, n, r, dtype, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on every device
    x = torch.randn(*m_shape, k, generator=g).to(device, dtype).requires_grad_()
    W = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    A = (torch.randn(r, k, generator=g) / k**0.5).to(device).requires_grad_()  # fp32 master factors
    B = (torch.randn(n, r, generator=g) * 0.5).to(device).requires_grad_()
    dy = torch.randn(*m_shape, n, generator=g).to(device, dtype)
    return x, W, b, A, B, dy


def _run(fn, x, A, B, dy):
    y = fn(x, A, B)
    return (y, *torch.autograd.grad(y, (x, A, B), dy))


def _check(got, want, mags, depth, what="", *, sides=1, dtype=torch.float32):
    """Each of got within the any-order rounding bound of want: mags are the sums of |terms| (tolerances.py)."""
    for i, (u, v, mag) in enumerate(zip(got, want, mags)):
        assert_within(u, v, f32_tol(depth, mag.detach(), sides=sides, low=LOW[dtype]), f"{what} [{i}]")


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
    # the reference: torch backend in float64 (so the bound is one on the kernels' own error)
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    Wr, br = W.double(), None if b is None else b.double()
    ref = lambda x, W, b, A, B, dy: _run(lambda x, A, B: tb.lora_linear(x, W, b, A, B, 0.5), x, A, B, dy)  # noqa: E731
    want = ref(xr, Wr, br, Ar, Br, dy.double())
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == got[3].dtype == torch.float32
    mags = magnitude(ref, x, W, b, A, B, dy)
    _check(got, want, mags, _depth(x.numel() // k, k, n, r), f"{dtype} {shape} y, dx, dA, dB", dtype=dtype)


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
    mags = magnitude(_reference_with_mask, x, W, b, A, B, dy, 1.5, keep, p)
    _check(got, want, mags, _depth(90, k, n, r), f"{dtype} y, dx, dA, dB", dtype=dtype)
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
    ref = lambda x, W, b, A, B, dy: _run(lambda x, A, B: tb.lora_linear(x, W, b, A, B, 2.0), x, A, B, dy)  # noqa: E731
    want = ref(x, W, b, A, B, dy)  # torch backend in fp32: two fp32 sides
    _check(got, want, magnitude(ref, x, W, b, A, B, dy), _depth(37, 40, 29, 3), "y, dx, dA, dB", sides=2)
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

    def grouped(x, Ws, bs, As, Bs, dys):  # the torch backend's group (fp32 in, so two fp32 sides)
        ref = tb.grouped_lora_linear(x, Ws, bs, As, Bs, scales, 0.0, seed)
        return (*ref, *torch.autograd.grad(ref, (x, *As, *Bs), dys))

    def singles(x, Ws, bs, As, Bs, dys):  # float64, each adapter g with its own mask, seed + g
        out = [_reference_with_mask(x, Ws[i], bs[i], As[i], Bs[i], dys[i], scales[i],
                                    trb.dropout_keep(seed + i, m, k, p), p) for i in range(3)]
        return (*[s[0] for s in out], sum(s[1] for s in out), *[s[2] for s in out], *[s[3] for s in out])

    ref = grouped if p == 0 else singles
    want = ref(x, Ws, bs, As, Bs, dys)
    mags = magnitude(lambda x, *t: ref(x, t[0:3], t[3:6], t[6:9], t[9:12], t[12:15]), x, *Ws, *bs, *As, *Bs, *dys)
    depth = _depth(m, k, sum(w.shape[0] for w in Ws), sum(a.shape[0] for a in As), groups=3)
    _check(got, want, mags, depth, "outputs, dx, dA, dB", sides=2 if p == 0 else 1)


@in_subprocess
def test_apply_fused_lora_triton_mode_matches_peft():
    """mode='triton' on a small PEFT model (interpreter, fp32): forward and LoRA grads match PEFT's.

    Checked layer by layer, on the inputs and output gradients each fused layer saw inside the model's forward and
    backward, against PEFT's own layer in float64: a worst-case bound through GELU and both layers at once would
    exceed the values themselves, one per layer stays far below them (tests/tolerances.py)."""
    import copy

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
        """The model's step; returns GELU's input z (layer 0's output), its output h (layer 2's input), y, grads."""
        seen = {}

        def keep(_module, inputs, out):
            inputs[0].retain_grad(), out.retain_grad()
            seen["z"], seen["h"] = inputs[0], out

        hook = model.base_model.model[1].register_forward_hook(keep)  # on GELU: the LoRA layers stay fused
        model.zero_grad()
        y = model(x)
        y.retain_grad()
        y.square().mean().backward()
        hook.remove()
        return seen["z"], seen["h"], y, {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    ref = copy.deepcopy(model).double()  # PEFT's layers in float64, and on |weights| for the sums of |terms|
    ref_abs = copy.deepcopy(ref)
    with torch.no_grad():
        for prm in ref_abs.parameters():
            prm.abs_()

    def peft_layer(model, i, x_l, dy_l):
        layer = model.base_model.model[i]
        out = layer(x_l)
        wrt = [x_l] * x_l.requires_grad + [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return (out, *torch.autograd.grad(out, wrt, dy_l))

    report = apply_fused_lora(model, mode="triton")
    assert report.backend == "triton" and len(report.fused) == 2, report.summary()
    z, h, y, grads = step()
    assert call_stats(model)["fused"] == 2
    lora = [[grads[f"base_model.model.{i}.lora_{f}.default.weight"] for f in "AB"] for i in (0, 2)]
    for i, x_l, got, dy_l in ((0, x, (z, *lora[0]), z.grad), (2, h, (y, h.grad, *lora[1]), y.grad)):
        x64 = x_l.detach().double().requires_grad_(x_l.requires_grad)
        want = peft_layer(ref, i, x64, dy_l.double())
        mags = magnitude(lambda x_l, dy_l, i=i: peft_layer(ref_abs, i, x_l, dy_l), x_l, dy_l)
        _check(got, want, mags, _depth(66, 48, 80, 4), f"layer {i}: output, (dx,) dA, dB")
    remove_fused_lora(model)
