"""Fused LoRA kernels: torch backend maths, PEFT integration, a local round on a tiny Llama.

The Triton kernels (under TRITON_INTERPRET=1) are tested in tests/test_kernels_triton.py.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from fedlora.kernels import torch_backend as tb
from tolerances import assert_f64_close, float64_model

F64 = torch.float64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _factors(m_shape, k, n, r, dtype=F64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g, dtype=dtype).requires_grad_()
    W = torch.randn(n, k, generator=g, dtype=dtype) / k**0.5
    b = torch.randn(n, generator=g, dtype=dtype) if bias else None
    A = (torch.randn(r, k, generator=g, dtype=dtype) / k**0.5).requires_grad_()
    B = torch.randn(n, r, generator=g, dtype=dtype).requires_grad_()
    return x, W, b, A, B


def _reference(x, W, b, A, B, s, keep, q):
    """Plain float64 maths with an explicit keep mask (q: the drop probability used for rescaling)."""
    xd = x * keep / (1 - q) if keep is not None else x
    y = x @ W.T + s * (xd @ A.T) @ B.T
    return y + b if b is not None else y


# ---------------------------------------------------------------------------------------------------------
# torch backend: maths
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_float64(p, bias):
    x, W, b, A, B = _factors((2, 5), 11, 13, 3, bias=bias)  # ragged: 10 tokens, 11 -> 13, rank 3
    fn = lambda x, A, B: tb.lora_linear(x, W, b, A, B, 0.7, p, 123)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_reference_maths(p):
    x, W, b, A, B = _factors((3, 7), 19, 23, 5)
    y = tb.lora_linear(x, W, b, A, B, 2.0, p, 7)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B), dy)
    keep = tb.dropout_keep(7, (21, 19), p, dtype=F64).view(3, 7, 19) if p else None
    xr, Ar, Br = (t.detach().requires_grad_() for t in (x, A, B))
    yr = _reference(xr, W, b, Ar, Br, 2.0, keep, tb.quantised_p(p))
    want = torch.autograd.grad(yr, (xr, Ar, Br), dy)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_dropout_mask_is_a_function_of_the_seed():
    a = tb.dropout_keep(5, (300, 200), 0.1)
    assert torch.equal(a, tb.dropout_keep(5, (300, 200), 0.1))
    assert not torch.equal(a, tb.dropout_keep(6, (300, 200), 0.1))
    assert abs((1 - a.mean().item()) - 0.1) < 0.005
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert tb.quantised_p(0.1) == pytest.approx(0.1, abs=1e-5)


def test_same_seed_same_output_and_grads_bitwise():
    x, W, b, A, B = _factors((64,), 48, 40, 8, dtype=torch.float32)
    runs = []
    for _ in range(2):
        y = tb.lora_linear(x, W, b, A, B, 0.5, 0.2, 99)
        runs.append((y, *torch.autograd.grad(y.square().sum(), (x, A, B))))
    for u, v in zip(*runs):
        assert torch.equal(u, v)
    y3 = tb.lora_linear(x, W, b, A, B, 0.5, 0.2, 100)
    assert not torch.equal(runs[0][0], y3)


def test_saves_x_once_and_rank_r_only():
    """Saved for backward: x (the caller's tensor itself), S [m, r], and the parameters; no mask."""
    x, W, b, A, B = _factors((128,), 64, 64, 4, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        tb.lora_linear(x, W, b, A, B, 0.5, 0.1, 3)
    params = {t.data_ptr() for t in (W, A, B)}
    acts = [t for t in saved if t.data_ptr() not in params]
    assert any(t.data_ptr() == x.data_ptr() for t in acts)
    others = [t for t in acts if t.data_ptr() != x.data_ptr()]
    assert [tuple(t.shape) for t in others] == [(128, 4)]
    assert all(t.dtype != torch.bool for t in saved)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_grouped_matches_single_calls(p):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 17, generator=g, dtype=F64, requires_grad=True)
    Ws = [torch.randn(n, 17, generator=g, dtype=F64) for n in (13, 7, 7)]
    bs = [None, torch.randn(7, generator=g, dtype=F64), None]
    As = [torch.randn(r, 17, generator=g, dtype=F64, requires_grad=True) for r in (3, 2, 4)]
    Bs = [torch.randn(n, r, generator=g, dtype=F64, requires_grad=True) for n, r in ((13, 3), (7, 2), (7, 4))]
    scales = [0.5, 1.0, 2.0]
    outs = tb.grouped_lora_linear(x, Ws, bs, As, Bs, scales, p, 7)
    loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
    got = torch.autograd.grad(loss, (x, *As, *Bs))
    singles = [tb.lora_linear(x, Ws[i], bs[i], As[i], Bs[i], scales[i], p, 7 + i) for i in range(3)]
    want = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(singles)), (x, *As, *Bs))
    for o, s in zip(outs, singles):
        torch.testing.assert_close(o, s, rtol=1e-12, atol=1e-12)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    fn = lambda x, *ab: tb.grouped_lora_linear(x, Ws, bs, ab[:3], ab[3:], scales, p, 7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *As, *Bs))


def test_mixed_precision_returns_master_dtype_grads():
    x, W, b, A, B = _factors((32,), 24, 16, 4, dtype=torch.float32)
    xb, Wb, bb = x.detach().bfloat16().requires_grad_(), W.bfloat16(), b.bfloat16()
    y = tb.lora_linear(xb, Wb, bb, A, B, 0.5, 0.1, 1)
    dx, dA, dB = torch.autograd.grad(y.float().sum(), (xb, A, B))
    assert y.dtype == dx.dtype == torch.bfloat16 and dA.dtype == dB.dtype == torch.float32


def test_activation_checkpointing_regenerates_the_mask():
    """The per-call seed comes from the global RNG, which checkpointing restores before recomputing."""
    from fedlora.kernels import lora_linear
    from torch.utils.checkpoint import checkpoint

    x, W, b, A, B = _factors((40,), 16, 12, 4, dtype=torch.float32)
    fn = lambda x: lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5, backend="torch").sum()  # noqa: E731
    torch.manual_seed(0)
    plain = torch.autograd.grad(fn(x), (x, A, B))
    torch.manual_seed(0)
    ckpt = torch.autograd.grad(checkpoint(fn, x, use_reentrant=False), (x, A, B))
    for u, v in zip(plain, ckpt):
        assert torch.equal(u, v)


def test_import_does_not_touch_triton_or_cuda():
    code = ("import sys, torch, fedlora.kernels; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'peft' not in sys.modules, 'peft imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------
# PEFT integration
# ---------------------------------------------------------------------------------------------------------
def _tiny_llama(dropout=0.0, seed=0, **lora_kw):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4)
    model = LlamaForCausalLM(cfg)
    lora_kw.setdefault("target_modules", TARGETS)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, **lora_kw))
    model.train()
    return model


def _randomise_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _local_round(kernels: str, steps: int = 10):
    from fedlora.kernels import apply_fused_lora
    from fedlora.kernels.peft_integration import call_stats

    model = float64_model(_tiny_llama(dropout=0.0))  # float64: the two paths sum in other orders (tolerances.py)
    report = apply_fused_lora(model, mode=kernels)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 1000, (4, 32), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}  # float64 (from_peft: fp32)
    return lora, report, call_stats(model)


def test_local_round_torch_kernels_match_peft():
    fused, report, stats = _local_round("torch")
    plain, report_peft, _ = _local_round("peft")
    assert len(report.fused) == 14 and not report.skipped
    assert report_peft.backend == "peft" and not report_peft.fused
    assert stats["fused"] == 14 * 10 and set(stats) == {"fused"}
    assert set(fused) == set(plain) and sum("lora_A" in n for n in fused) == sum("lora_B" in n for n in fused) == 14
    moved = 0.0
    for name, f in fused.items():
        assert_f64_close(f, plain[name], what=name)
        if "lora_B" in name:
            moved = max(moved, plain[name].abs().max().item())
    assert moved > 1e-3  # the adapters did train


def test_report_state_dict_and_save_format_unchanged(tmp_path):
    from safetensors.torch import load_file

    from fedlora.kernels import apply_fused_lora, is_fused, remove_fused_lora

    model = _tiny_llama(dropout=0.1)
    plain_sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "plain")
    report = apply_fused_lora(model, mode="auto")
    assert report.backend == "torch"  # no CUDA here
    line = report.summary()
    assert "\n" not in line and "14/14" in line
    assert model.state_dict().keys() == plain_sd.keys()
    model.save_pretrained(tmp_path / "fused")
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    clone = copy.deepcopy(model)  # a deep copy keeps working (and calls its own layers)
    ids = torch.randint(0, 1000, (2, 8))
    clone.eval(), model.eval()
    torch.testing.assert_close(clone(ids).logits, model(ids).logits)
    assert remove_fused_lora(model) == 14 and not any(is_fused(m) for m in model.modules())
    assert apply_fused_lora(model, mode="peft").fused == []


def test_train_eval_dropout_and_fallbacks():
    from fedlora.kernels import apply_fused_lora, remove_fused_lora
    from fedlora.kernels.peft_integration import call_stats

    model = float64_model(_tiny_llama(dropout=0.2))  # float64: fused, PEFT and merged paths sum in other orders
    _randomise_B(model)
    ids = torch.randint(0, 1000, (2, 12))
    model.eval()
    with torch.no_grad():
        ref_eval = model(ids).logits
        with model.disable_adapter():
            ref_base = model(ids).logits
    apply_fused_lora(model, mode="torch")
    with torch.no_grad():
        assert_f64_close(model(ids).logits, ref_eval, what="fused eval")
        with model.disable_adapter():  # PEFT's disabled state: base model only
            assert_f64_close(model(ids).logits, ref_base, what="adapters disabled")
        model.merge_adapter()  # merged: PEFT's forward on the merged weight
        assert_f64_close(model(ids).logits, ref_eval, what="merged")
        model.unmerge_adapter()
    stats = call_stats(model)
    assert stats["adapters disabled"] == 14 and stats["adapter merged"] == 14 and stats["fused"] == 14

    model.train()  # dropout on: differs from eval, reproducible under the global seed
    torch.manual_seed(5)
    t1 = model(ids).logits
    torch.manual_seed(5)
    t2 = model(ids).logits
    assert torch.equal(t1, t2) and not torch.allclose(t1, ref_eval, atol=1e-4)
    t1.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)

    # hooks on a LoRA submodule (as Opacus registers) send that layer back to PEFT's forward
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = []
    h = layer.lora_A["default"].register_forward_hook(lambda *a: seen.append(1))
    model(ids)
    h.remove()
    assert seen == [1] and call_stats(model)["hooks on LoRA submodules"] == 1
    remove_fused_lora(model)


def test_unsupported_layers_are_reported():
    from fedlora.kernels import apply_fused_lora

    dora = _tiny_llama(use_dora=True, target_modules=["q_proj", "v_proj"])
    rep = apply_fused_lora(dora, mode="torch")
    assert not rep.fused and set(rep.skipped.values()) == {"DoRA"} and "DoRA: 4" in rep.summary()

    mixed = _tiny_llama(target_modules=["embed_tokens", "q_proj"])
    rep = apply_fused_lora(mixed, mode="torch")
    assert len(rep.fused) == 2
    assert rep.skipped == {"model.embed_tokens": "Embedding is not a peft lora.Linear"}

    with pytest.raises(ValueError):
        apply_fused_lora(mixed, mode="fast")


def test_fused_group_forward_matches_layers():
    from fedlora.kernels import apply_fused_lora, fused_group_forward

    model = float64_model(_tiny_llama(dropout=0.0))  # float64: grouped and per-layer GEMMs sum in other orders
    _randomise_B(model)
    apply_fused_lora(model, mode="torch")
    attn = model.base_model.model.model.layers[1].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(2, 9, 64, dtype=F64, requires_grad=True)
    grouped = fused_group_forward(layers, x)
    single = [layer(x) for layer in layers]
    params = [x] + [layer.lora_A["default"].weight for layer in layers] + [
        layer.lora_B["default"].weight for layer in layers]
    g1 = torch.autograd.grad(sum(o.square().sum() for o in grouped), params)
    g2 = torch.autograd.grad(sum(o.square().sum() for o in single), params)
    for i, (u, v) in enumerate(zip(grouped + tuple(g1), tuple(single) + tuple(g2))):
        assert_f64_close(u, v, what=f"output/grad {i}")


def test_saved_activation_memory_vs_peft():
    """Saved for backward per adapted linear (dropout on, CPU): PEFT keeps the dropout noise and the dropped
    copy of x (2·|x|; its frozen base GEMM keeps no x), the fused layer keeps x itself (the caller's input,
    no new memory) and S. With A frozen (FFA-LoRA) the fused layer keeps only S."""
    from peft import LoraConfig, get_peft_model

    from fedlora.kernels import apply_fused_lora, remove_fused_lora

    def saved(model, x):
        params = {p.data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        total = sum(seen.values())
        return total, total - seen.get(x.untyped_storage().data_ptr(), 0)  # (all, beyond the input itself)

    base = nn.Sequential(nn.Linear(256, 256, bias=False))
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["0"]))
    model.train()
    x = torch.randn(512, 256, requires_grad=True)
    S_bytes = 512 * 16 * 4
    peft_all, peft_new = saved(model, x)
    assert peft_all == peft_new == 2 * x.nbytes + S_bytes
    apply_fused_lora(model, mode="torch")
    fused_all, fused_new = saved(model, x)
    assert (fused_all, fused_new) == (x.nbytes + S_bytes, S_bytes)
    assert peft_new - fused_new >= 2 * x.nbytes
    # FFA-LoRA: A frozen -> no dA -> no x kept at all
    model.base_model.model[0].lora_A["default"].weight.requires_grad_(False)
    assert saved(model, x) == (S_bytes, S_bytes)
    model.base_model.model[0].lora_A["default"].weight.requires_grad_(True)
    remove_fused_lora(model)
    assert saved(model, x)[0] == peft_all


def test_mask_does_not_depend_on_the_block_size(monkeypatch):
    full = tb.dropout_keep(11, (103, 37), 0.3)
    monkeypatch.setattr(tb, "_BLOCK_ELEMS", 37 * 8)  # 8-row blocks
    assert len(tb.row_blocks(103, 37)) == 13
    assert torch.equal(full, tb.dropout_keep(11, (103, 37), 0.3))
    x, W, b, A, B = _factors((103,), 37, 9, 4)
    y = tb.lora_linear(x, W, b, A, B, 1.0, 0.3, 11)
    torch.testing.assert_close(y, _reference(x, W, b, A, B, 1.0, full.double(), tb.quantised_p(0.3)))


def test_trainable_base_weight_is_refused():
    x, W, b, A, B = _factors((8,), 6, 5, 2)
    with pytest.raises(ValueError, match="frozen"):
        tb.lora_linear(x, W.requires_grad_(), b, A, B, 1.0)
    W.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        tb.grouped_lora_linear(x, [W], [b.requires_grad_()], [A], [B], [1.0])


def _autocast_step(kernels: str, autocast: bool, device: str = "cpu", batch: tuple = (2, 16)):
    """Logits and LoRA gradients of one forward/backward of the tiny Llama (fp32 weights) on ``device``, with or
    without bf16 autocast (fedlora's CUDA default is fp32 weights under bf16 autocast: the same recipe)."""
    from fedlora.kernels import apply_fused_lora
    from fedlora.kernels.peft_integration import call_stats

    model = _tiny_llama(dropout=0.0)
    _randomise_B(model)
    model.to(device)
    apply_fused_lora(model, mode=kernels)
    ids = torch.randint(0, 1000, batch, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return out.logits.float().detach(), grads, call_stats(model)


def check_fused_under_autocast(kernels: str, device: str = "cpu", batch: tuple = (2, 16)) -> None:
    """``kernels`` under bf16 autocast runs fused in bf16 on every adapted layer (no fallback to PEFT), gives fp32
    gradients to the fp32 factors, and is as close to PEFT under autocast as PEFT under autocast is to fp32 (bf16
    rounding, summed in another order). Also run on CUDA with kernels=triton by test_kernels_cuda.py."""
    ref_logits, ref_grads, _ = _autocast_step("peft", False, device, batch)
    peft_logits, peft_grads, _ = _autocast_step("peft", True, device, batch)
    fused_logits, fused_grads, stats = _autocast_step(kernels, True, device, batch)
    assert stats["fused (autocast)"] == 14 and "fused" not in stats and not any("autocast to" in k for k in stats)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    bf16_noise = rel(peft_logits, ref_logits)
    assert 1e-4 < bf16_noise < 2e-2  # autocast really computed in bf16
    assert rel(fused_logits, peft_logits) < 3 * bf16_noise
    for n, g in fused_grads.items():
        assert g.dtype == torch.float32, n
        noise = rel(peft_grads[n], ref_grads[n])
        assert rel(g, peft_grads[n]) < max(3 * noise, 2e-2), n


def test_autocast_runs_fused_in_the_autocast_dtype():
    """Under CPU bf16 autocast the fused torch forward no longer falls back to PEFT: it runs in bf16 (x, W, bias, A,
    B cast, as every F.linear of PEFT's forward is), within PEFT's own bf16 noise (check_fused_under_autocast)."""
    check_fused_under_autocast("torch")
