"""Swap the forward of qualifying PEFT ``lora.Linear`` layers for the fused LoRA linear.

A layer qualifies when: it is a ``peft.tuners.lora.Linear`` over a plain ``nn.Linear`` (no fan_in_fan_out),
exactly one adapter is active, that adapter is vanilla LoRA (no DoRA or other variant, no ``lora_bias``),
its dropout is ``nn.Identity`` or ``nn.Dropout``, the base weight has a supported dtype and base weight and
bias are frozen. The swap is an instance attribute ``forward`` (``functools.partial`` of
:func:`_fused_forward`), so parameters, state dicts, ``save_pretrained`` and deep copies are unaffected;
:func:`remove_fused_lora` deletes it again.

At every call the fused forward re-checks the cheap runtime conditions and otherwise calls PEFT's own
``Linear.forward``: adapters disabled or merged, extra arguments (``adapter_names``), a changed active
adapter, hooks on the layer's LoRA submodules (Opacus per-sample gradients hook ``lora_A``/``lora_B``
and must see them run), input dtype different from the base weight's (without autocast). Under autocast the
fused kernel runs in autocast's dtype: x, W, bias, A and B are cast to it, as every F.linear of PEFT's forward is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger("fedlora.kernels")

PEFT_PREFIX = "base_model.model."
MODES = ("auto", "triton", "torch", "peft")
_DTYPES = {
    "torch": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
_FUSED_ATTR = "_fedlora_fused"  # backend name on a patched layer
_STATS_ATTR = "_fedlora_calls"  # Counter of "fused" / fallback reasons on a patched layer


@dataclass
class FusionReport:
    """What :func:`apply_fused_lora` did: backend used, layers fused, layers left on PEFT's forward and why."""

    mode: str
    backend: str  # "torch" | "triton" | "peft"
    why: str  # why this backend (e.g. "no CUDA device")
    fused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def num_lora_layers(self) -> int:
        return len(self.fused) + len(self.skipped)

    def summary(self) -> str:
        """One line for the start-up log."""
        head = (f"fused LoRA kernels: backend={self.backend} (mode={self.mode}; {self.why}): "
                f"{len(self.fused)}/{self.num_lora_layers} LoRA layers fused")
        if not self.skipped:
            return head
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(name)
        parts = [f"{reason}: {len(names)} (e.g. {names[0]})" for reason, names in by_reason.items()]
        return head + "; PEFT forward kept for " + "; ".join(parts)

    __str__ = summary

    def as_dict(self) -> dict:
        return {"mode": self.mode, "backend": self.backend, "why": self.why, "fused": list(self.fused),
                "skipped": dict(self.skipped)}


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def is_fused(layer: nn.Module) -> bool:
    return _FUSED_ATTR in layer.__dict__


def call_stats(model: nn.Module) -> Counter:
    """How often fused layers ran fused vs fell back (by reason), summed over the model."""
    total: Counter = Counter()
    for m in model.modules():
        total.update(m.__dict__.get(_STATS_ATTR, {}))
    return total


# ---------------------------------------------------------------------------------------------------------
# qualification
# ---------------------------------------------------------------------------------------------------------
def qualify(layer: nn.Module, backend: str) -> str | None:
    """None if ``layer`` can run fused on ``backend``, else the reason it cannot (static checks)."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(layer, LoraLinear):
        return f"{type(layer).__name__} is not a peft lora.Linear"
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not nn.Linear"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    reason = _adapter_reason(layer)
    if reason:
        return reason
    name = layer.active_adapters[0]
    dtype = base.weight.dtype
    if dtype not in _DTYPES[backend]:
        return f"base weight dtype {dtype} unsupported by {backend} backend"
    for factor in (layer.lora_A[name].weight, layer.lora_B[name].weight):
        if factor.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"LoRA factor dtype {factor.dtype}"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "base weight or bias trainable (kernels assume a frozen base)"
    return None


def _adapter_reason(layer) -> str | None:
    active = list(layer.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters (needs exactly one)"
    name = active[0]
    if name not in layer.lora_A:
        return f"active adapter {name!r} not on this layer"
    if layer.use_dora.get(name, False) or name in layer.lora_magnitude_vector:
        return "DoRA"
    if name in layer.lora_variant:
        return f"LoRA variant {type(layer.lora_variant[name]).__name__}"
    if layer.lora_bias.get(name, False) or layer.lora_B[name].bias is not None:
        return "lora_bias"
    if type(layer.lora_dropout[name]) not in (nn.Identity, nn.Dropout):
        return f"dropout is {type(layer.lora_dropout[name]).__name__}"
    return None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _runtime_reason(layer, x, args, kwargs) -> str | None:
    """Cheap per-call checks; a reason means: use PEFT's forward for this call."""
    if args or kwargs:
        return "extra forward arguments"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged"
    reason = _adapter_reason(layer)
    if reason:
        return reason
    name = layer.active_adapters[0]
    if _has_hooks(layer.lora_A[name]) or _has_hooks(layer.lora_B[name]) or _has_hooks(layer.lora_dropout[name]):
        return "hooks on LoRA submodules"
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return "input is not a tensor"
    base = layer.get_base_layer()
    cast = _autocast_dtype(x)
    if cast is not None:  # autocast: x, W, bias, A and B are all cast to its dtype, as F.linear would cast them
        if x.device != base.weight.device:
            return "input device differs from the base weight's"
        if not {x.dtype, base.weight.dtype} <= _AUTOCAST_FROM or cast not in _DTYPES[_call_backend(layer)]:
            return f"autocast to {cast} from {x.dtype} input and {base.weight.dtype} weight"
    elif x.dtype != base.weight.dtype or x.device != base.weight.device:
        return "input dtype/device differs from the base weight's"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "base weight or bias trainable"
    return None


_AUTOCAST_FROM = {torch.float32, torch.float16, torch.bfloat16}  # what autocast casts (never float64)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes a linear layer in for ``x``'s device, or None when autocast is off there."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _cast(t, cast: torch.dtype | None):
    """``t`` in autocast's dtype (None and non-tensors unchanged). Differentiable: fp32 LoRA factors get fp32 grads."""
    return t.to(cast) if cast is not None and isinstance(t, torch.Tensor) else t


def _kernel_context(x: torch.Tensor, cast: torch.dtype | None):
    """Autocast off inside the kernel call when the inputs were cast by hand (so one dtype runs throughout, as every
    F.linear of PEFT's forward does under autocast); nothing otherwise."""
    return torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext()


def _dropout_p(layer, name: str) -> float:
    drop = layer.lora_dropout[name]
    return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0


def _call_backend(layer) -> str:
    return layer.__dict__[_FUSED_ATTR]


def _backend_for(backend: str, x: torch.Tensor, cast: torch.dtype | None = None) -> str:
    if backend == "triton" and (cast or x.dtype) in _DTYPES["triton"]:
        from . import triton_backend

        if x.is_cuda or triton_backend.interpreting():
            return "triton"
    return "torch"


def _fused_forward(layer, x, *args, **kwargs):
    stats = layer.__dict__.setdefault(_STATS_ATTR, Counter())
    reason = _runtime_reason(layer, x, args, kwargs)
    if reason is not None:
        stats[reason] += 1
        return type(layer).forward(layer, x, *args, **kwargs)  # PEFT's own forward
    from . import _seed, backend_module

    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    p = _dropout_p(layer, name)
    cast = _autocast_dtype(x)
    backend = _backend_for(_call_backend(layer), x, cast)
    stats["fused" if cast is None else "fused (autocast)"] += 1
    with _kernel_context(x, cast):
        return backend_module(backend).lora_linear(
            _cast(x, cast), _cast(base.weight, cast), _cast(base.bias, cast), _cast(layer.lora_A[name].weight, cast),
            _cast(layer.lora_B[name].weight, cast), float(layer.scaling[name]), p, _seed(p, None),
        )


def fused_group_forward(layers, x) -> tuple:
    """Outputs of several fused LoRA layers that take the same ``x`` (q/k/v or gate/up), as one group.

    One kernel call computes every adapter's S from a single read of x and saves x once; backward gives one dx
    and every dA from a single read of x. Falls back to calling each layer (``layer(x)``) when any of them is
    not fused, fails a runtime check, has module hooks, or their dropout probabilities differ.
    """
    layers = list(layers)
    if len(layers) < 2 or not all(is_fused(layer) for layer in layers):
        return tuple(layer(x) for layer in layers)
    if any(_has_hooks(layer) or _runtime_reason(layer, x, (), {}) for layer in layers):
        return tuple(layer(x) for layer in layers)
    names = [layer.active_adapters[0] for layer in layers]
    ps = {_dropout_p(layer, n) for layer, n in zip(layers, names)}
    cast = _autocast_dtype(x)
    backends = {_backend_for(_call_backend(layer), x, cast) for layer in layers}
    if len(ps) != 1 or len(backends) != 1:
        return tuple(layer(x) for layer in layers)
    from . import _seed, backend_module

    p = ps.pop()
    bases = [layer.get_base_layer() for layer in layers]
    for layer in layers:
        layer.__dict__.setdefault(_STATS_ATTR, Counter())["fused (group)" if cast is None else
                                                           "fused (group, autocast)"] += 1
    with _kernel_context(x, cast):
        return tuple(backend_module(backends.pop()).grouped_lora_linear(
            _cast(x, cast), [_cast(b.weight, cast) for b in bases], [_cast(b.bias, cast) for b in bases],
            [_cast(layer.lora_A[n].weight, cast) for layer, n in zip(layers, names)],
            [_cast(layer.lora_B[n].weight, cast) for layer, n in zip(layers, names)],
            [float(layer.scaling[n]) for layer, n in zip(layers, names)], p, _seed(p, None),
        ))


# ---------------------------------------------------------------------------------------------------------
# model-level API
# ---------------------------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _resolve(mode: str, device: torch.device) -> tuple[str, str]:
    from . import triton_status

    if mode == "peft":
        return "peft", "fusion disabled"
    if mode == "torch":
        return "torch", "requested"
    ok, why = triton_status()
    if mode == "triton":
        if not ok:
            raise RuntimeError(f"mode='triton' but the triton backend is unavailable: {why}")
        return "triton", why
    # auto: never the (test-only) interpreter; triton only for a model on a CUDA device
    if device.type != "cuda":
        return "torch", f"model on {device.type}" if ok else why
    if not ok:
        return "torch", why
    return "triton", why


def remove_fused_lora(model: nn.Module) -> int:
    """Restore PEFT's forward on every patched layer; returns how many were patched."""
    n = 0
    for m in model.modules():
        if is_fused(m):
            del m.forward
            del m.__dict__[_FUSED_ATTR]
            m.__dict__.pop(_STATS_ATTR, None)
            n += 1
    return n


def apply_fused_lora(model: nn.Module, mode: str = "auto", *, log: bool = True) -> FusionReport:
    """Fuse every qualifying PEFT LoRA linear of ``model``; returns (and logs, one line) a :class:`FusionReport`.

    ``mode``: ``"auto"`` (triton when CUDA + triton are available and the model is on the GPU, else torch),
    ``"triton"`` (error if unavailable), ``"torch"``, or ``"peft"`` (no fusion; undoes an earlier call).
    Calling it again re-evaluates every layer (e.g. after adding adapters).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    from peft.tuners.lora import LoraLayer

    remove_fused_lora(model)
    backend, why = _resolve(mode, _model_device(model))
    if backend == "triton":
        err = _triton_selfcheck(model)
        if err:
            if mode == "triton":
                raise RuntimeError(f"triton backend failed its self-check: {err}")
            backend, why = "torch", f"triton self-check failed ({err})"
    report = FusionReport(mode=mode, backend=backend, why=why)
    for qname, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = _strip(qname)
        if backend == "peft":
            report.skipped[name] = "mode=peft"
            continue
        reason = qualify(module, backend)
        if reason:
            report.skipped[name] = reason
            continue
        module.forward = functools.partial(_fused_forward, module)
        module.__dict__[_FUSED_ATTR] = backend
        report.fused.append(name)
    if log:
        logger.info(report.summary())
    return report


def _triton_selfcheck(model: nn.Module) -> str | None:
    """Compile and run the Triton kernels once on a tiny problem in the model's dtype; error text or None."""
    from . import triton_backend

    dtypes = {p.dtype for p in model.parameters() if p.dtype in _DTYPES["triton"]} or {torch.float32}
    device = _model_device(model)
    if device.type != "cuda" and not triton_backend.interpreting():
        return None
    try:
        for dtype in sorted(dtypes, key=str):
            err = triton_backend.selfcheck(device, dtype)
            if err:
                return err
    except Exception as exc:  # compilation / driver problems: fall back rather than crash mid-training
        return f"{type(exc).__name__}: {exc}"
    return None
