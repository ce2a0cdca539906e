"""The memory model: a model's shapes (:class:`ModelSpec`) and its predicted peak training memory in bytes.

Formulas in docs/fedpipe.md ("Memory model"); measuring real peaks lives in :mod:`fedlora.fedpipe.measure`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from fedlora.quant import DEFAULT_SKIP, is_target


@dataclass(frozen=True)
class LinearInfo:
    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelSpec:
    """What the memory and time models need to know about a model (shapes only; JSON-able)."""

    name: str
    linears: list[LinearInfo]          # every nn.Linear (heads too)
    quantizable: list[str]             # the ones a q < 16 plan quantises
    adapted: list[str]                 # the ones that get LoRA
    total_params: int
    extra_trainable: int = 0           # trainable non-LoRA parameters (modules_to_save)
    buffer_bytes: int = 0
    num_layers: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    double_quant: bool = True

    # -- derived -----------------------------------------------------------------------------
    def _by_name(self) -> dict[str, LinearInfo]:
        return {li.name: li for li in self.linears}

    @property
    def adapted_width(self) -> int:
        """Σ over adapted modules of (in + out): LoRA parameters per unit of rank."""
        lin = self._by_name()
        return sum(lin[n].in_features + lin[n].out_features for n in self.adapted)

    @property
    def quantized_numel(self) -> int:
        lin = self._by_name()
        return sum(lin[n].numel for n in self.quantizable)

    @property
    def linear_numel(self) -> int:
        return sum(li.numel for li in self.linears)

    @property
    def other_params(self) -> int:
        return self.total_params - self.quantized_numel

    def lora_params(self, rank: int) -> int:
        return rank * self.adapted_width

    def trainable_params(self, rank: int) -> int:
        return self.lora_params(rank) + self.extra_trainable

    def with_adapted(self, modules: Iterable[str]) -> ModelSpec:
        """Copy with LoRA on ``modules`` (e.g. the output of :func:`select_modules`)."""
        mods = list(modules)
        unknown = set(mods) - set(self._by_name())
        if unknown:
            raise KeyError(f"not linear layers of {self.name}: {sorted(unknown)[:3]}")
        return replace(self, adapted=mods)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["linears"] = [asdict(li) for li in self.linears]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelSpec:
        d = dict(d)
        d["linears"] = [LinearInfo(**li) for li in d["linears"]]
        return cls(**d)

    @classmethod
    def from_model(cls, model: nn.Module, lora_targets: Iterable[str] | str | None, *, name: str | None = None,
                   skip: Iterable[str] = DEFAULT_SKIP, quant_targets=None,
                   modules_to_save: Iterable[str] = (), double_quant: bool = True) -> ModelSpec:
        """Read the spec off a (16-bit, un-quantised, un-PEFTed) model; a model on the meta device works."""
        linears = [LinearInfo(n, m.in_features, m.out_features, m.bias is not None)
                   for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        quantizable = [li.name for li in linears if is_target(li.name, quant_targets, skip)]
        adapted = [li.name for li in linears if is_target(li.name, lora_targets, skip)] \
            if lora_targets is not None else list(quantizable)
        total = sum(p.numel() for p in model.parameters())
        mts = tuple(modules_to_save)
        extra = sum(p.numel() for n, p in model.named_parameters()
                    if mts and any(s in n.split(".") for s in mts))
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        cfg = getattr(model, "config", None)
        return cls(
            name=name or type(model).__name__, linears=linears, quantizable=quantizable, adapted=adapted,
            total_params=int(total), extra_trainable=int(extra), buffer_bytes=int(buffers),
            num_layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
            hidden_size=int(getattr(cfg, "hidden_size", 0) or 0),
            vocab_size=int(getattr(cfg, "vocab_size", 0) or 0), double_quant=double_quant,
        )

    @classmethod
    def from_config(cls, config, lora_targets, *, auto_class: str = "AutoModelForCausalLM", **kw) -> ModelSpec:
        """Spec of a transformers config without allocating weights (built on the meta device)."""
        import transformers

        with torch.device("meta"):
            model = getattr(transformers, auto_class).from_config(config)
        return cls.from_model(model, lora_targets, name=kw.pop("name", getattr(config, "model_type", None)), **kw)


# ==============================================================================================
# Memory model
# ==============================================================================================
def linear_weight_bytes(li: LinearInfo, bits: int, double_quant: bool = True) -> int:
    """Bytes of one linear's weight at ``bits`` incl. quantisation constants (docs/fedpipe.md formula)."""
    n, m = li.numel, li.out_features
    if bits == 16:
        return 2 * n
    if bits == 8:
        return n + 4 * m
    if bits == 4:
        nb = math.ceil(n / 64)
        if double_quant:
            return math.ceil(n / 2) + nb + 4 * math.ceil(nb / 256) + 4 * 256 + 4 + 4 * 16
        return math.ceil(n / 2) + 4 * nb + 4 * 16
    raise ValueError(f"bits must be 16, 8 or 4, got {bits}")


@dataclass
class ActivationCalibration:
    """Activation bytes = a[q] + b[q]·tokens + c·(rank − rank_ref)·tokens (docs/fedpipe.md)."""

    a: dict[int, float]
    b: dict[int, float]
    rank_ref: int
    c: float
    seq_len: int
    method: str = "dry-run"
    points: list = field(default_factory=list)

    def _key(self, bits: int) -> int:
        if bits in self.a:
            return bits
        return min(self.a, key=lambda q: (abs(q - bits), q))  # nearest calibrated bit width

    def bytes(self, rank: int, tokens: int, bits: int) -> float:
        q = self._key(bits)
        return self.a[q] + self.b[q] * tokens + self.c * (rank - self.rank_ref) * tokens

    def to_dict(self) -> dict:
        return {"a": {str(k): v for k, v in self.a.items()}, "b": {str(k): v for k, v in self.b.items()},
                "rank_ref": self.rank_ref, "c": self.c, "seq_len": self.seq_len, "method": self.method,
                "points": self.points}

    @classmethod
    def from_dict(cls, d: Mapping) -> ActivationCalibration:
        return cls(a={int(k): float(v) for k, v in d["a"].items()}, b={int(k): float(v) for k, v in d["b"].items()},
                   rank_ref=int(d["rank_ref"]), c=float(d["c"]), seq_len=int(d["seq_len"]),
                   method=d.get("method", "dry-run"), points=list(d.get("points", [])))


def rank_activation_coef(spec: ModelSpec, adapter_bytes: int = 4) -> float:
    """c: bytes per token per unit of rank (PEFT saves x·Aᵀ, r values per token per adapted module)."""
    return float(adapter_bytes * len(spec.adapted))


def analytic_activations(spec: ModelSpec, seq_len: int, act_bytes: int = 2) -> ActivationCalibration:
    """A-priori activation line when no dry run is possible (rough; say so when you use it).

    Per token: every linear saves its input (act_bytes·in); every adapted module also saves an fp32 copy of its
    input (PEFT casts to the adapter dtype) and r fp32 values; per layer ~8·d more for norms, residuals,
    rotary and attention outputs (SDPA, no s² scores); the head's logits in 16-bit plus an fp32 copy and its
    gradient (2 + 8 bytes per vocabulary entry). Intercept: one transient dequantised copy of the largest
    quantised weight. Validated against dry runs in ``bench/memory_model.py``.
    """
    lin = spec._by_name()  # noqa: SLF001
    per_tok = sum(act_bytes * li.in_features for li in spec.linears)
    per_tok += sum(4 * lin[n].in_features for n in spec.adapted)
    per_tok += spec.num_layers * 8 * spec.hidden_size * act_bytes
    head_out = max((li.out_features for li in spec.linears if li.name not in spec.quantizable), default=0)
    per_tok += 10 * head_out
    largest = max((lin[n].numel for n in spec.quantizable), default=0)
    a = {16: 0.0, 8: 2.0 * largest, 4: 2.0 * largest}
    return ActivationCalibration(a=a, b={q: float(per_tok) for q in a}, rank_ref=0,
                                 c=rank_activation_coef(spec), seq_len=seq_len, method="analytic")


def memory_breakdown(spec: ModelSpec, rank: int, batch: int, bits: int, seq_len: int,
                     calib: ActivationCalibration | None = None, *, other_bytes: int = 2,
                     trainable_bytes: int = 16, master_bytes_per_param: float = 0.0) -> dict[str, int]:
    """The terms of :func:`predict_memory` (bytes)."""
    lin = spec._by_name()  # noqa: SLF001
    base = sum(linear_weight_bytes(lin[n], bits, spec.double_quant) for n in spec.quantizable)
    other = other_bytes * spec.other_params + spec.buffer_bytes
    trainable = trainable_bytes * spec.lora_params(rank) + 4 * other_bytes * spec.extra_trainable
    calib = calib or analytic_activations(spec, seq_len)
    act = calib.bytes(rank, batch * seq_len, bits)
    master = master_bytes_per_param * spec.quantized_numel
    parts = {"base_linears": base, "other": other, "trainable": trainable, "activations": act, "master": master}
    parts = {k: int(round(v)) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def predict_memory(model_spec: ModelSpec, rank: int, batch: int, bits: int, seq_len: int,
                   calib: ActivationCalibration | None = None, **kw) -> int:
    """Predicted peak training memory in bytes (formula in docs/fedpipe.md)."""
    return memory_breakdown(model_spec, rank, batch, bits, seq_len, calib, **kw)["total"]
