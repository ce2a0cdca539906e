"""Quantised base weights (bitsandbytes NF4 / int8) for LoRA training, and exact merges into them.

What is here
------------
- :func:`quantize_model` swaps ``nn.Linear`` base layers for ``bitsandbytes`` ``Linear4bit`` (NF4 by default,
  blockwise with 64-element blocks, optional double quantisation of the block scales) or ``Linear8bitLt``
  (LLM.int8 storage: int8 codes plus one fp32 absmax per output row). Heads (``lm_head``, ``classifier``,
  ``score``, ``qa_outputs``) stay in 16-bit. Works on CPU (bitsandbytes >= 0.49) and CUDA; the weight is
  quantised on the device the original weight lives on.
- :func:`prepare_for_lora` freezes the base and optionally enables gradient checkpointing. ``mode="light"``
  (default) keeps embeddings / norms / heads in their 16-bit dtype, which is what the memory model in
  :mod:`fedlora.fedpipe.memory` assumes; ``mode="peft"`` calls PEFT's ``prepare_model_for_kbit_training``, which
  upcasts every non-4-bit 16-bit parameter to fp32 (predict with ``other_bytes=4`` then).
- :func:`merge_update` merges a dense update into a (possibly quantised) base layer **without accumulating
  requantisation error**.

Exact merges (the design choice)
--------------------------------
Naively merging round after round, ``W_k = deq(quant(W_{k-1} + Δ_k))``, re-rounds an already rounded weight:
updates smaller than half a quantisation step snap back and are lost, and the error of the chain grows with
the number of rounds. Instead every quantised layer keeps a *master* beside its quantised weight, on
``master_device`` (host memory by default, never the accelerator):

- ``w0``: the original weight in its original dtype (captured by :func:`quantize_model` before quantising),
- ``delta``: the fp32 running sum of all merged updates.

Each merge adds ``Δ`` to ``delta`` in fp32 and re-quantises from the exact sum:
``W_k = deq(quant(to_dtype(w0.float() + Σ_{i≤k} Δ_i)))``: one rounding of the exact sum, never a chain. The
cost is ``2 + 4`` bytes per quantised parameter of host memory (the ``master_bytes_per_param`` knob of the
memory model); with ``keep_master=False`` nothing is kept up front, and the first merge captures the
dequantised initial weight as ``w0`` (the merges are then exact with respect to ``deq(quant(W0))``).
16-bit layers get the same treatment (a bf16 weight updated in place would accumulate bf16 rounding).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_SKIP = ("lm_head", "classifier", "score", "qa_outputs")
PEFT_PREFIX = "base_model.model."
_MASTER_ATTR = "_fedlora_master"


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb  # noqa: PLC0415  (optional dependency; imported lazily)
    return bnb


@dataclass
class Master:
    """Exact reference of one layer: original weight ``w0`` and the fp32 sum of merged updates."""

    w0: torch.Tensor
    delta: torch.Tensor | None = None
    merges: int = 0

    def exact(self) -> torch.Tensor:
        w = self.w0.float()
        return w if self.delta is None else w + self.delta


# ----------------------------------------------------------------------------------------------
# Which layers
# ----------------------------------------------------------------------------------------------
def is_target(name: str, targets: Iterable[str] | str | None, skip: Iterable[str] = DEFAULT_SKIP) -> bool:
    """``targets``: None (every linear not in ``skip``), a regex (full match on the module path) or a list of
    names matched as PEFT matches ``target_modules`` (full path, or a dotted suffix such as ``pooler.dense``).
    ``skip`` entries match leaf names or path components."""
    parts = name.split(".")
    if any(s in parts for s in skip):
        return False
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    # PEFT's rule for a list: the full path, or a suffix of it at a module boundary ("dense", "pooler.dense")
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantizable_linears(model: nn.Module, targets=None, skip=DEFAULT_SKIP) -> list[str]:
    """Paths of plain ``nn.Linear`` layers :func:`quantize_model` would replace."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and is_target(n, targets, skip)]


# ----------------------------------------------------------------------------------------------
# Quantise
# ----------------------------------------------------------------------------------------------
def _make_4bit(weight: torch.Tensor, bias, *, quant_type, double_quant, blocksize, compute_dtype):
    bnb = _bnb()
    out_f, in_f = weight.shape
    dev = weight.device
    mod = bnb.nn.Linear4bit(
        in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, quant_type=quant_type,
        compress_statistics=double_quant, device="meta",
    )
    mod.weight = bnb.nn.Params4bit(
        weight.detach().contiguous(), requires_grad=False, quant_type=quant_type, blocksize=blocksize,
        compress_statistics=double_quant, module=mod,
    )
    if bias is not None:
        mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return mod.to(dev)  # quantisation happens here (bitsandbytes quantises on the first .to(device))


def _make_8bit(weight: torch.Tensor, bias):
    bnb = _bnb()
    out_f, in_f = weight.shape
    dev = weight.device
    mod = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=0.0,
                              device="meta")
    mod.weight = bnb.nn.Int8Params(weight.detach().contiguous().cpu(), requires_grad=False,
                                   has_fp16_weights=False)
    if bias is not None:
        mod.bias = nn.Parameter(bias.detach().clone().cpu(), requires_grad=False)
    return mod.to(dev)


def quantize_model(
    model: nn.Module,
    bits: int,
    *,
    targets=None,
    skip: Iterable[str] = DEFAULT_SKIP,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
    keep_master: bool = True,
    master_device: str | torch.device = "cpu",
) -> nn.Module:
    """Replace the base ``nn.Linear`` layers of ``model`` (in place) by ``bits``-bit bitsandbytes layers.

    bits: 16 (nothing replaced; masters are still attached so merges are exact), 8 (``Linear8bitLt``, int8
    row-wise absmax) or 4 (``Linear4bit``, ``quant_type`` "nf4" or "fp4"). ``compute_dtype`` defaults to the
    weight's dtype. Call before ``get_peft_model``; returns ``model``.
    """
    if bits not in (16, 8, 4):
        raise ValueError(f"bits must be 16, 8 or 4, got {bits}")
    names = quantizable_linears(model, targets, skip)
    if not names:
        raise ValueError("quantize_model: no nn.Linear layer matched the targets")
    for name in names:
        lin = model.get_submodule(name)
        w, b = lin.weight.data, (lin.bias.data if lin.bias is not None else None)
        master = Master(w.detach().to(master_device, copy=True)) if keep_master else None
        if bits == 16:
            new = lin
        elif bits == 8:
            new = _make_8bit(w, b)
        else:
            new = _make_4bit(w, b, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                             compute_dtype=compute_dtype or w.dtype)
        new.requires_grad_(False)
        if master is not None:
            setattr(new, _MASTER_ATTR, master)
        new._fedlora_bits = bits  # noqa: SLF001
        if new is not lin:
            new.train(lin.training)
            _set_module(model, name, new)
    model._fedlora_bits = bits  # noqa: SLF001
    return model


def prepare_for_lora(model: nn.Module, mode: str = "light", gradient_checkpointing: bool = False) -> nn.Module:
    """Freeze the base before ``get_peft_model``.

    "light": freeze every parameter, keep dtypes (the memory model's assumption); with gradient checkpointing
    also make the embedding output require grad (needed by reentrant checkpointing on a frozen base).
    "peft": PEFT's ``prepare_model_for_kbit_training`` (also upcasts 16-bit non-4-bit parameters to fp32).
    """
    if mode == "peft":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if mode != "light":
        raise ValueError(f"mode must be 'light' or 'peft', got {mode!r}")
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


# ----------------------------------------------------------------------------------------------
# Reading weights
# ----------------------------------------------------------------------------------------------
def base_layer(model: nn.Module, module_name: str) -> nn.Module:
    """The base linear layer at ``module_name`` (PEFT prefix optional; a PEFT LoRA wrapper's ``base_layer``)."""
    name = module_name[len(PEFT_PREFIX):] if module_name.startswith(PEFT_PREFIX) else module_name
    mod = None
    for cand in (name, PEFT_PREFIX + name):
        try:
            mod = model.get_submodule(cand)
            break
        except AttributeError:
            continue
    if mod is None:
        raise KeyError(f"model has no module {module_name!r}")
    while hasattr(mod, "base_layer"):
        mod = mod.base_layer
    return mod


def layer_bits(layer: nn.Module) -> int:
    bnb = _bnb()
    if isinstance(layer, bnb.nn.Linear4bit):
        return 4
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return 8
    return 16


def _int8_codes(layer):
    CB = layer.weight.CB if getattr(layer.weight, "CB", None) is not None else layer.state.CB
    SCB = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
    if CB is None:
        CB = layer.weight.data
    return CB, SCB


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer computes with, as fp32 (out x in)."""
    bnb = _bnb()
    bits = layer_bits(layer)
    if bits == 16:
        return layer.weight.detach().float()
    if bits == 8:
        CB, SCB = _int8_codes(layer)
        return CB.float() * (SCB.float().unsqueeze(1) / 127.0)
    qs = layer.weight.quant_state
    data = layer.weight.data
    if getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(data, qs)
        qs, data = layer.weight.quant_state, layer.weight.data
    return bnb.functional.dequantize_4bit(data, qs).float()


def effective_weight(model: nn.Module, module_name: str) -> torch.Tensor:
    """fp32 weight of the base layer at ``module_name`` (dequantised if quantised; LoRA not included)."""
    return dequantized_weight(base_layer(model, module_name))


def quantize_dequantize(w: torch.Tensor, bits: int, *, quant_type: str = "nf4", double_quant: bool = True,
                        blocksize: int = 64, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """deq(quant(w)) with exactly the storage :func:`quantize_model` uses (reference for tests / audits)."""
    w = w.detach().to(dtype)
    if bits == 16:
        return w.float()
    if bits == 8:
        layer = _make_8bit(w, None)
    else:
        layer = _make_4bit(w, None, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                           compute_dtype=dtype)
    return dequantized_weight(layer)


# ----------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _write_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Set a layer's weight to ``w`` (quantising with the layer's own settings)."""
    bnb = _bnb()
    bits = layer_bits(layer)
    dev = layer.weight.device
    if bits == 16:
        layer.weight.data.copy_(w.to(layer.weight.dtype))
        return
    if bits == 8:
        new = bnb.nn.Int8Params(w.detach().contiguous().cpu(), requires_grad=False, has_fp16_weights=False)
        layer.weight = new.to(dev)
        layer.state.CB = None
        layer.state.SCB = None
        return
    old = layer.weight
    old_qs = old.quant_state
    new = bnb.nn.Params4bit(
        w.detach().contiguous().to(dev), requires_grad=False, quant_type=old.quant_type, blocksize=old.blocksize,
        compress_statistics=old.compress_statistics, quant_storage=old.quant_storage, module=layer,
    )
    layer.weight = new.to(dev)
    if old_qs is not None and layer.weight.quant_state.dtype != old_qs.dtype:
        raise RuntimeError("requantisation changed the weight dtype")


@torch.no_grad()
def merge_update(model: nn.Module, module_name: str, delta: torch.Tensor) -> torch.Tensor:
    """Merge a dense update ``delta`` (out x in, e.g. ``B_s @ A_s`` of a stacked FLoRA round) into the base
    layer at ``module_name``, exactly: the layer ends up at ``deq(quant(dtype(w0 + Σ deltas)))``.

    Returns the new fp32 effective weight. See the module docstring for where ``w0`` and the sum live.
    """
    layer = base_layer(model, module_name)
    master: Master | None = getattr(layer, _MASTER_ATTR, None)
    if master is None:  # no original kept: start from what the layer computes with now (documented)
        master = Master(dequantized_weight(layer).to(master_dtype(layer)).cpu())
        setattr(layer, _MASTER_ATTR, master)
    if tuple(delta.shape) != tuple(master.w0.shape):
        raise ValueError(f"{module_name}: delta shape {tuple(delta.shape)} != weight shape {tuple(master.w0.shape)}")
    d = delta.detach().to(device=master.w0.device, dtype=torch.float32)
    master.delta = d.clone() if master.delta is None else master.delta.add_(d)
    master.merges += 1
    target = master.exact().to(master.w0.dtype)
    _write_weight(layer, target.to(layer.weight.device))
    return dequantized_weight(layer)


@torch.no_grad()
def naive_merge_update(model: nn.Module, module_name: str, delta: torch.Tensor) -> torch.Tensor:
    """The chain ``W <- deq(quant(W + Δ))`` (what not to do; kept for the precision test and benchmark)."""
    layer = base_layer(model, module_name)
    dtype = master_dtype(layer)
    w = (dequantized_weight(layer) + delta.detach().float().to(layer.weight.device)).to(dtype)
    _write_weight(layer, w)
    return dequantized_weight(layer)


def master_dtype(layer: nn.Module) -> torch.dtype:
    m = getattr(layer, _MASTER_ATTR, None)
    if m is not None:
        return m.w0.dtype
    bits = layer_bits(layer)
    if bits == 16:
        return layer.weight.dtype
    if bits == 4:
        return layer.weight.quant_state.dtype
    return torch.float16


def merged_delta(model: nn.Module, module_name: str) -> torch.Tensor | None:
    """The fp32 sum of updates merged so far into ``module_name`` (None before the first merge)."""
    m = getattr(base_layer(model, module_name), _MASTER_ATTR, None)
    return None if m is None else m.delta
