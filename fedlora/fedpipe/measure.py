"""Measuring the peak memory of one LoRA training step (CUDA or counted on CPU) and calibrating the
activation line of the memory model from two dry runs per bit width (docs/fedpipe.md, "Measuring").
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .memory import ActivationCalibration, ModelSpec, memory_breakdown, rank_activation_coef


class _LiveBytes:
    """High-water mark of bytes of storages allocated while active (docs/fedpipe.md, 'Measuring')."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                # outputs that alias an input (views, in-place ops) are not new memory
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.device.type != "meta"}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        tracker._add(t, inputs)
                return out

        self.mode = _Mode()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _add(self, t: torch.Tensor, inputs: set[int]) -> None:
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or key in self.live or key in inputs:
            return
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        n = self.live.pop(key, None)
        if n is not None:
            self.current -= n

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _storage_tensors(obj):
    """Tensors reachable from a bitsandbytes quant state / nested containers."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _storage_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _storage_tensors(v)
    elif hasattr(obj, "absmax") and hasattr(obj, "code"):  # bitsandbytes QuantState
        for attr in ("absmax", "code", "offset"):
            v = getattr(obj, attr, None)
            if isinstance(v, torch.Tensor):
                yield v
        if getattr(obj, "state2", None) is not None:
            yield from _storage_tensors(obj.state2)


def static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Exact bytes of distinct storages held by the model (parameters, buffers, quantisation state) and the
    optimizer state. Returns {'model', 'optimizer', 'total'}."""
    seen: set[int] = set()

    def count(tensors) -> int:
        tot = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            if st.data_ptr() in seen or st.nbytes() == 0:
                continue
            seen.add(st.data_ptr())
            tot += st.nbytes()
        return tot

    def model_tensors():
        for mod in model.modules():
            for p in mod.parameters(recurse=False):
                yield p
                yield from _storage_tensors(getattr(p, "quant_state", None))
                for a in ("CB", "SCB"):
                    if getattr(p, a, None) is not None:
                        yield getattr(p, a)
            for b in mod.buffers(recurse=False):
                yield b
            st = getattr(mod, "state", None)  # Linear8bitLt's MatmulLtState
            if st is not None and hasattr(st, "CB"):
                for a in ("CB", "SCB"):
                    if getattr(st, a, None) is not None:
                        yield getattr(st, a)

    m = count(model_tensors())
    o = 0
    if optimizer is not None:
        o = count(t for s in optimizer.state.values() for t in _storage_tensors(s))
    return {"model": m, "optimizer": o, "total": m + o}


def build_lora(model: nn.Module, rank: int, targets, *, alpha: float | None = None,
               modules_to_save: Sequence[str] | None = None, dropout: float = 0.0):
    """PEFT LoRA on ``targets`` (fp32 adapters; ``modules_to_save`` copies keep the model dtype), train mode."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                     target_modules=list(targets) if not isinstance(targets, str) else targets,
                     modules_to_save=list(modules_to_save) if modules_to_save else None)
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    return peft_model


def synthetic_batch(model: nn.Module, batch: int, seq_len: int, seed: int = 0, device="cpu") -> dict:
    """Random token batch with labels for a causal LM or a sequence classifier."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    out = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "SequenceClassification" in type(inner).__name__:
        out["labels"] = torch.randint(0, max(2, cfg.num_labels), (batch,), generator=g).to(device)
    else:
        out["labels"] = ids.clone().to(device)
    return out


@dataclass
class MemoryMeasurement:
    rank: int
    batch: int
    bits: int
    seq_len: int
    total: int            # measured peak bytes
    static: int           # parameters, buffers, quantisation state, optimizer state (exact)
    dynamic_peak: int     # high-water mark of what one step allocates (activations, grads, temporaries)
    method: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _train_step(model, optimizer, batch):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure_peak(build_model: Callable[[], nn.Module], rank: int, batch: int, bits: int, seq_len: int, *,
                 targets, modules_to_save: Sequence[str] | None = None, device: str | None = None,
                 quant_kwargs: Mapping | None = None, lr: float = 1e-4, seed: int = 0,
                 make_batch: Callable | None = None) -> MemoryMeasurement:
    """Measured peak memory of one steady-state LoRA training step (docs/fedpipe.md, 'Measuring').

    ``build_model()`` returns a fresh 16-bit base model (e.g. bf16). It is quantised to ``bits`` (quantisable
    linears, heads kept), given rank-``rank`` LoRA on ``targets`` (+ ``modules_to_save``), and AdamW; one
    warm-up step creates the optimizer state, the next step is measured.
    """
    import time

    from fedlora.quant import prepare_for_lora, quantize_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = build_model().to(device)
    if bits < 16:
        quantize_model(model, bits, keep_master=False, **dict(quant_kwargs or {}))
    prepare_for_lora(model)
    model = build_lora(model, rank, targets, modules_to_save=modules_to_save)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    mk = make_batch or (lambda m, b, s, sd: synthetic_batch(m, b, s, sd, device))
    _train_step(model, opt, mk(model, batch, seq_len, seed))
    data = mk(model, batch, seq_len, seed + 1)
    static = static_bytes(model, opt)["total"]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
        _train_step(model, opt, data)
        torch.cuda.synchronize()
        total = int(torch.cuda.max_memory_allocated())
        dyn = total - base_alloc
        method = "cuda.max_memory_allocated"
    else:
        tracker = _LiveBytes()
        with tracker:
            _train_step(model, opt, data)
        dyn = tracker.peak
        total = static + dyn
        method = "cpu: exact static storages + dispatch-tracked high-water mark"
    return MemoryMeasurement(rank, batch, bits, seq_len, int(total), int(static), int(dyn), method,
                             time.perf_counter() - t0)


def calibrate_activations(build_model: Callable[[], nn.Module], spec: ModelSpec, seq_len: int, *,
                          targets, bits: Iterable[int] = (16, 8, 4), rank: int = 8,
                          batches: tuple[int, int] = (1, 4), modules_to_save=None, device=None,
                          other_bytes: int = 2, **measure_kw) -> ActivationCalibration:
    """Two dry runs per bit width at ``batches[0]·seq_len`` and ``batches[1]·seq_len`` tokens; the line through
    (tokens, measured peak − predicted static bytes) gives a[q], b[q]. c is the analytic rank term."""
    a, b, pts = {}, {}, []
    for q in bits:
        ys, xs = [], []
        for bs in batches:
            meas = measure_peak(build_model, rank, bs, q, seq_len, targets=targets, modules_to_save=modules_to_save,
                                device=device, **measure_kw)
            parts = memory_breakdown(spec, rank, bs, q, seq_len, _ZERO_ACT, other_bytes=other_bytes)
            static_pred = parts["total"] - parts["activations"]
            xs.append(bs * seq_len)
            ys.append(meas.total - static_pred)
            pts.append(meas.to_dict())
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        b[q] = float(slope)
        a[q] = float(ys[0] - slope * xs[0])
    return ActivationCalibration(a=a, b=b, rank_ref=rank, c=rank_activation_coef(spec), seq_len=seq_len,
                                 method="dry-run", points=pts)


_ZERO_ACT = ActivationCalibration(a={16: 0.0}, b={16: 0.0}, rank_ref=0, c=0.0, seq_len=0, method="zero")
