"""Fused LoRA kernels for local training.

One LoRA linear, ``y = x·Wᵀ (+bias) + s·drop(x)·Aᵀ·Bᵀ``, as a single autograd Function with a hand-written
backward (W and bias frozen), on two backends:

- ``torch``: addmm-style ordering (the LoRA product is accumulated into the base GEMM's output, the LoRA part
  of dx into the dy·W GEMM), only x and the rank-r S saved, the dropout mask regenerated from a seed. For CPU
  clients, and the reference. See :mod:`fedlora.kernels.torch_backend`.
- ``triton``: five GPU kernels (S, Y, dS+dB, dx, dA), fp16/bf16/fp32 inputs with fp32 accumulation and fp32
  master factors, dropout from ``tl.rand(seed, offsets)``. See :mod:`fedlora.kernels.triton_backend`.

Model builders call :func:`apply_fused_lora` once after ``get_peft_model``::

    from fedlora.kernels import apply_fused_lora
    report = apply_fused_lora(model, mode="auto")   # "auto" | "triton" | "torch" | "peft"

It swaps the forward of every qualifying ``peft.tuners.lora.Linear`` for the fused one and logs one line
(``report.summary()``) naming what was fused and why the rest was not. Parameters, state dicts and PEFT's save
format are untouched (the kernels read PEFT's own ``lora_A``/``lora_B`` weights at every call). A fused layer
falls back to PEFT's forward whenever PEFT's state asks for something the kernel does not do: adapters
disabled or merged, several active adapters, a LoRA variant, ``adapter_names``, autocast, hooks on the LoRA
submodules (e.g. Opacus), mismatched dtypes. Dropout follows ``model.train()``/``model.eval()``.

Layers that share an input (q/k/v, gate/up) can be run as one group with :func:`fused_group_forward` (x read
once for all their S and dA; one dx buffer); :func:`grouped_lora_linear` is the functional form.

Importing this package imports neither triton nor peft and does not touch CUDA; the hardware is probed on the
first call that needs it (:func:`triton_status`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from .peft_integration import (
    FusionReport,
    apply_fused_lora,
    fused_group_forward,
    is_fused,
    remove_fused_lora,
)

__all__ = [
    "FusionReport",
    "apply_fused_lora",
    "remove_fused_lora",
    "is_fused",
    "fused_group_forward",
    "lora_linear",
    "grouped_lora_linear",
    "triton_status",
    "backend_module",
]


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(usable, why): whether the Triton backend can run here. Probed lazily, once per process."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not interpret and not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        importlib.import_module("fedlora.kernels.triton_backend")
    except Exception as exc:  # a broken triton install must not break training: the caller falls back
        return False, f"triton backend failed to import ({type(exc).__name__}: {exc})"
    if interpret:
        return True, "TRITON_INTERPRET=1 (CPU interpreter)"
    return True, f"CUDA {torch.cuda.get_device_name()}"


def backend_module(name: str):
    """The module implementing backend ``name`` ("torch" or "triton"), imported on first use."""
    if name == "torch":
        from . import torch_backend

        return torch_backend
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"triton backend unavailable: {why}")
        from . import triton_backend

        return triton_backend
    raise ValueError(f"unknown backend {name!r} (expected 'torch' or 'triton')")


def _pick(backend: str, x: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if x.is_cuda and triton_status()[0] else "torch"
    return backend


def _seed(p: float, seed: int | None) -> int:
    if seed is not None:
        return int(seed)
    # Drawn from torch's global CPU generator: seeded runs stay reproducible, and activation checkpointing
    # (which restores the RNG state before recomputing) regenerates the same mask.
    return int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0


def lora_linear(x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0, seed: int | None = None,
                backend: str = "auto"):
    """``x·Wᵀ (+bias) + scale·drop(x)·Aᵀ·Bᵀ`` (W, bias frozen). ``dropout_p`` > 0 means training-mode
    dropout."""
    mod = backend_module(_pick(backend, x))
    return mod.lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, _seed(dropout_p, seed))


def grouped_lora_linear(x, weights, biases, As, Bs, scales, dropout_p: float = 0.0, seed: int | None = None,
                        backend: str = "auto") -> tuple:
    """Several LoRA linears on the same x (one tuple of outputs). Adapter g's dropout uses ``seed + g``."""
    mod = backend_module(_pick(backend, x))
    return tuple(mod.grouped_lora_linear(x, weights, biases, As, Bs, scales, dropout_p, _seed(dropout_p, seed)))
