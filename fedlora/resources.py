"""Resource-aware planning core of FedPipe (no Flower in here).

FedPipe (Fang et al., 2024) has no public code and its exact formulas are not published outside the paper;
this module is the general, documented version: an importance score to choose which weight matrices get
LoRA, a memory model, a time model, and a mixed-integer program that gives every client a (rank, batch size,
base bit width) that fits its memory and minimises the round time.

Hardware profiles
-----------------
A profile is a mapping ``name, memory_gb, bf16_tflops, mem_bandwidth_gbs, uplink_mbps, downlink_mbps, device``
(``conf/client/*.yaml``, Hydra group ``client``). ``memory_gb`` is read as GiB (2**30 bytes); the plan may use
``mem_fraction`` (0.9) of it. ``bf16_tflops`` is the dense (no sparsity) 16-bit tensor rate; link speeds are
in Mbit/s (10**6 bit/s). Optional ``client_id`` / ``mfu`` keys are honoured.

Memory model (bytes, per client; :func:`predict_memory`)
--------------------------------------------------------
For the quantisable base linears (every ``nn.Linear`` but the heads; N = out·in weights, m = out rows,
nb = ceil(N / 64) blocks of 64)::

    16-bit: 2·N
     8-bit: N + 4·m                                   (int8 codes + fp32 absmax per row, LLM.int8 storage)
     4-bit: ceil(N/2) + nb + 4·ceil(nb/256) + 4·256 + 4 + 4·16      (NF4 codes, uint8 block absmax,
            double-quantised: fp32 second-level absmax per 256 blocks, its 256-entry code, offset, NF4 code)
            without double quantisation: ceil(N/2) + 4·nb + 4·16

    M(r, b, q) = Σ_linears base(q) + other_bytes · P_other + buffers
               + 16 · r · Σ_adapted (in + out)                            (fp32 weight, grad, Adam m and v)
               + 4 · other_bytes · P_extra                      (trainable extras: weight, grad, m, v in 16-bit)
               + A_q + B_q · (b · s) + c · (r − r_ref) · (b · s)           (activations)
               + master_bytes_per_param · N_quantised                     (only when merge masters share memory)

``P_other`` = every parameter that is not a quantisable linear weight (embeddings, norms, biases, heads) in
16-bit (``other_bytes`` = 2; 4 after PEFT's ``prepare_model_for_kbit_training``), ``P_extra`` = trainable
non-LoRA parameters (e.g. a classification head in ``modules_to_save``: PEFT trains a copy in the model's
dtype and keeps the frozen original, counted in P_other). Activations ``A_q + B_q·tokens`` are calibrated per bit width by two short dry runs at
two token counts (:func:`calibrate_activations` fits the line through them after subtracting the exactly
known static bytes); ``c`` = 4 bytes × number of adapted modules is the analytic rank term (PEFT saves
``x·Aᵀ``, r fp32 values per token per adapted module, for the backward of ``lora_B``). Without a calibration
:func:`analytic_activations` gives a rough a-priori line (documented there).

Measuring (:func:`measure_peak`)
--------------------------------
CUDA: ``torch.cuda.max_memory_allocated`` over one steady-state step (forward, backward, optimizer step).
CPU: there is no allocator high-water mark, so the peak is *counted*: static bytes (parameters, buffers,
bitsandbytes quantisation state, optimizer state: every distinct storage reachable from the model and the
optimizer, exactly) plus the high-water mark of the bytes of every storage allocated during one steady-state
step, tracked with a ``TorchDispatchMode`` that sees every op's outputs (forward, backward and the optimizer
step, including bitsandbytes' custom ops; outputs that alias one of the op's inputs, i.e. views and in-place
results, are not new memory) and a ``weakref.finalize`` on each storage that subtracts it when it is freed. This counts allocations at tensor level; scratch memory that kernels allocate outside PyTorch's
dispatcher (none for the ops used here) and allocator fragmentation are not seen.

Time model (seconds per round; :func:`compute_time`, :func:`transfer_time`)
----------------------------------------------------------------------------
Each client processes a fixed ``examples_per_round`` E of length s per round, so batch b means ceil(E/b)
optimizer steps. Per step, with T_s = b·s tokens::

    FLOPs_step = T_s · (c_base · P_lin + c_lora · r · Σ_adapted(in+out) + c_attn · L · s · d)
    bytes_step = passes · (W_bytes(q) + [q < 16] · 4 · N_quantised) + 28 · P_trainable
    t_step     = FLOPs_step / (mfu · bf16_tflops · 1e12) + bytes_step / (mem_bandwidth_gbs · 1e9)
    compute    = ceil(E / b) · t_step

c_base = 4: a frozen base needs the forward GEMM (2 FLOPs per weight per token) and the input-gradient GEMM
(2) but no weight-gradient GEMM; the common 6·params·tokens estimate is the full fine-tuning figure (set
``base_flops_coef=6`` to model activation recomputation / gradient checkpointing). c_lora = 6 (LoRA weights do
get weight gradients), c_attn = 12 (QKᵀ and AV, 4·s·d per layer forward, twice that backward). P_lin counts
every linear weight including the head. ``passes`` = 2: every step reads every base weight once in the
forward and once in the backward; a 4/8-bit weight is additionally dequantised in each pass into a 16-bit copy
that the GEMM reads back (write + read of 2 bytes each: the dequantisation overhead, 4·N bytes per pass,
which is why small batches, i.e. more steps, cost quantised clients more). 28 bytes per trainable parameter:
Adam reads weight, grad, m, v and writes weight, m, v in fp32. mfu = 0.4 unless the profile gives one.
Communication: the client uploads its adapter, r·Σ(in+out) + P_extra values of ``payload_bytes`` (4: Flower
carries fp32) over ``uplink_mbps``, and downloads the global adapter at its own rank (``download="own"``:
FedIT, HetLoRA, FlexLoRA) or the stacked factors of all clients, Σ_k r_k·Σ(in+out) (``download="stacked"``:
FLoRA; this couples the clients' choices).

Plan (:func:`plan`): the MILP
-----------------------------
Binary x[k,o] per client k and option o = (r, b, q) of the grid; continuous T. ::

    minimise   T − ε · Σ_k Σ_o u_o x[k,o]
    s.t.       Σ_o x[k,o] = 1                                          for every client
               Σ_o M_k(o) x[k,o] ≤ mem_fraction · budget_k              for every client
               Σ_o t_k(o) x[k,o] + [stacked] Σ_j Σ_o r_o D_k x[j,o] ≤ T  for every client
               [server_mbps] Σ_k Σ_o up_bytes(o)/server_Bps x[k,o] ≤ T  (shared server link, optional)

t_k(o) = compute + upload (+ own download), D_k = seconds to download one rank of the stacked factors. The
tie-break u_o = (i_r + i_q / |Q|) / |R| ∈ [0, 1) (i_r, i_q: indices of r and q in the sorted grids) prefers
larger ranks first, then higher precision, and is distinct for distinct (r, q); ε = tie_break · T_lb / K with
T_lb = max_k min_o t_k(o) (a lower bound of T), so the tie-break term can never cost more than
``tie_break`` (default 1e-3) × T_lb of round time: clients that are not the bottleneck spend their slack on a
larger rank / higher precision. After solving, each client keeps its (r, q) and takes the fastest batch size
that fits ("polish"; the batch does not enter u, so this never worsens the objective and makes the choice
unique). Solved with ``scipy.optimize.milp`` (HiGHS, ``mip_rel_gap=0``). :func:`brute_force_plan` enumerates
every combination of the same options with the same objective (for tests).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedlora.quant import DEFAULT_SKIP, is_target

GiB = 2**30
PROFILE_KEYS = ("name", "memory_gb", "bf16_tflops", "mem_bandwidth_gbs", "uplink_mbps", "downlink_mbps", "device")
CONF_CLIENT_DIR = Path(__file__).resolve().parents[1] / "conf" / "client"


# ==============================================================================================
# Hardware profiles
# ==============================================================================================
def load_profile(profile: str | Mapping) -> dict:
    """A profile dict from a name in ``conf/client`` (``"rtx3060_12gb"``) or a mapping (checked)."""
    if isinstance(profile, str):
        path = CONF_CLIENT_DIR / f"{profile}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in CONF_CLIENT_DIR.glob("*.yaml"))
            raise KeyError(f"unknown client profile {profile!r}; known: {known}")
        import yaml

        data = yaml.safe_load(path.read_text())
        if "defaults" in data:  # default.yaml points at another profile
            for entry in data["defaults"]:
                if isinstance(entry, str) and entry != "_self_":
                    base = load_profile(entry.split("@")[0].split("/")[-1])
                    base.update({k: v for k, v in data.items() if k != "defaults"})
                    data = base
        profile = data
    prof = dict(profile)
    if "mix" in prof:
        return prof
    missing = [k for k in PROFILE_KEYS if k not in prof]
    if missing:
        raise ValueError(f"profile {prof.get('name')!r} lacks {missing}")
    return prof


def list_profiles() -> list[str]:
    return sorted(p.stem for p in CONF_CLIENT_DIR.glob("*.yaml") if p.stem not in ("default", "mixed"))


# Which public profile a detected CUDA device name most likely is (for its compute / bandwidth figures).
_DEVICE_MATCH = (
    ("A100", "a100_80gb"), ("4090", "rtx4090_24gb"), ("3060", "rtx3060_12gb"), ("L4", "l4_24gb"),
    ("T4", "t4_16gb"), ("AGX Orin", "jetson_agx_orin_64gb"), ("Orin NX", "jetson_orin_nx_16gb"),
    ("Orin Nano", "jetson_orin_nano_8gb"), ("Orin", "jetson_orin_nano_8gb"),
)


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def detect_profile() -> dict:
    """Profile of this machine. CUDA: free device memory (``torch.cuda.mem_get_info``) and the device name;
    compute / bandwidth figures come from the matching ``conf/client`` profile when the name matches one,
    else conservative guesses (``estimated: True``). CPU: ``MemAvailable`` RAM and the usable cores, with the
    ``cpu`` profile's per-core figures scaled by the core count. Link speeds cannot be measured offline: they
    are the matched (or ``cpu``) profile's."""
    cpu = load_profile("cpu")
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        dev_name = torch.cuda.get_device_name(0)
        match = next((p for key, p in _DEVICE_MATCH if key.lower() in dev_name.lower()), None)
        base = load_profile(match) if match else dict(cpu, bf16_tflops=10.0, mem_bandwidth_gbs=300.0)
        prof = dict(base, name=f"detected:{dev_name}", memory_gb=free / GiB, device="cuda",
                    estimated=match is None, matched=match)
        return prof
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    scale = cores / float(cpu.get("cores", 2))
    return dict(cpu, name=f"detected:cpu{cores}", memory_gb=_cpu_available_bytes() / GiB,
                bf16_tflops=cpu["bf16_tflops"] * scale, cores=cores, device="cpu", estimated=True)


def assign_profiles(num_clients: int, list_or_mix, seed: int = 0) -> list[dict]:
    """Profiles for ``num_clients`` clients.

    ``list_or_mix``: a list of profile names / mappings (cycled if shorter than ``num_clients``), a mix
    mapping ``{profile: fraction}`` (or a mapping with a ``mix`` key, or ``"mixed"`` for
    ``conf/client/mixed.yaml``), or a single profile name. A mix is apportioned by largest remainders (counts
    sum to ``num_clients``, ties by name) and the order shuffled with ``seed``. Each returned dict is a copy
    with ``client_id`` (0..num_clients-1) added.
    """
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    spec = list_or_mix
    if isinstance(spec, str):
        spec = load_profile(spec)
        if "mix" not in spec:
            spec = [spec]
    if isinstance(spec, Mapping) and "mix" in spec:
        spec = spec["mix"]
    if isinstance(spec, Mapping):
        fracs = {str(k): float(v) for k, v in spec.items()}
        if any(v < 0 for v in fracs.values()) or sum(fracs.values()) <= 0:
            raise ValueError(f"bad mix {fracs}")
        total = sum(fracs.values())
        exact = {k: num_clients * v / total for k, v in fracs.items()}
        counts = {k: int(math.floor(v)) for k, v in exact.items()}
        left = num_clients - sum(counts.values())
        for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), k))[:left]:
            counts[k] += 1
        names = [k for k in sorted(counts) for _ in range(counts[k])]
        random.Random(seed).shuffle(names)
        profiles = [load_profile(n) for n in names]
    else:
        items = list(spec)
        if not items:
            raise ValueError("empty profile list")
        profiles = [load_profile(items[i % len(items)]) for i in range(num_clients)]
    return [dict(p, client_id=i) for i, p in enumerate(profiles)]


# ==============================================================================================
# Model description
# ==============================================================================================
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
    """Bytes of one linear's weight at ``bits`` incl. quantisation constants (module docstring formula)."""
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
    """Activation bytes = a[q] + b[q]·tokens + c·(rank − rank_ref)·tokens (see module docstring)."""

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
    """Predicted peak training memory in bytes (formula in the module docstring)."""
    return memory_breakdown(model_spec, rank, batch, bits, seq_len, calib, **kw)["total"]


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
class _LiveBytes:
    """High-water mark of bytes of storages allocated while active (see module docstring, 'Measuring')."""

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
    """Measured peak memory of one steady-state LoRA training step (see 'Measuring' in the module docstring).

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


# ==============================================================================================
# Importance
# ==============================================================================================
def _clean_name(name: str) -> str:
    name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def candidate_modules(model: nn.Module, targets=None, skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, nn.Module]:
    """Base linear layers (plain, bitsandbytes, or the ``base_layer`` of a PEFT wrapper) by clean name."""
    out = {}
    for n, m in model.named_modules():
        if not isinstance(m, nn.Linear) or ".lora_" in n or hasattr(m, "base_layer"):
            continue
        clean = _clean_name(n)
        if is_target(clean, targets, skip):
            out[clean] = m
    return out


def importance_scores(model: nn.Module, batches: Sequence[Mapping] | Iterable[Mapping], steps: int | None = None, *,
                      beta: float = 0.85, targets=None, skip: Iterable[str] = DEFAULT_SKIP,
                      loss_fn: Callable | None = None) -> dict[str, float]:
    """Sensitivity of every candidate weight matrix: S = Σ_ij |W_ij · ∂L/∂W_ij| per step, smoothed with an
    EMA over ``steps`` warm-up batches (Ī_1 = S_1, Ī_t = β·Ī_{t−1} + (1−β)·S_t). Since the sum over a matrix
    and the EMA are both linear, this equals the EMA of the element-wise scores summed per matrix.

    ∂L/∂W is formed from hooks, ``Σ_tokens δ_out ⊗ x_in`` in fp32, so it works for frozen and quantised
    (4/8-bit: W is the dequantised weight, formed one module at a time) bases; the weights are not updated (warm-up batches are
    evaluated on the same model) and the model runs in eval mode (no dropout). ``loss_fn(model, batch)``
    defaults to ``model(**batch).loss``. Batches are cycled if fewer than ``steps``.
    """
    from fedlora.quant import dequantized_weight

    mods = candidate_modules(model, targets, skip)
    if not mods:
        raise ValueError("importance_scores: no candidate linear layers")
    batches = list(batches)
    steps = steps or len(batches)
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    step_score: dict[str, float] = {}
    handles = []

    def fwd_hook(name):
        def hook(mod, inputs, output):
            x = inputs[0].detach()
            if not output.requires_grad:
                output.requires_grad_(True)

            def grad_hook(g):
                gw = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                w = dequantized_weight(mod)  # transient fp32 copy, one module at a time
                step_score[name] = step_score.get(name, 0.0) + float((w.to(gw.device) * gw).abs().sum())

            output.register_hook(grad_hook)
            return output

        return hook

    was_training = model.training
    model.eval()
    ema: dict[str, float] = {}
    try:
        for n, m in mods.items():
            handles.append(m.register_forward_hook(fwd_hook(n)))
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None:  # activations then require grad everywhere (keeps bitsandbytes on its training path)
            handles.append(emb.register_forward_hook(
                lambda _m, _i, out: out.requires_grad_(True) if not out.requires_grad else out))
        for t in range(steps):
            step_score.clear()
            batch = batches[t % len(batches)]
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                loss.backward()
            for n in mods:
                s = step_score.get(n, 0.0)
                ema[n] = s if t == 0 else beta * ema[n] + (1 - beta) * s
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return ema


def aggregate_importance(client_scores: Sequence[Mapping[str, float]], weights: Sequence[float] | None = None,
                         normalize: bool = True) -> dict[str, float]:
    """Weighted mean of clients' scores. With ``normalize`` each client's scores are first divided by their
    sum (so a client with a larger loss scale does not dominate); ``weights`` (e.g. example counts) are
    normalised to sum 1. Modules missing from a client count 0 for it."""
    if not client_scores:
        raise ValueError("no client scores")
    w = np.ones(len(client_scores)) if weights is None else np.asarray(weights, dtype=float)
    if len(w) != len(client_scores) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per client, not all zero")
    w = w / w.sum()
    keys = sorted(set().union(*client_scores))
    out = dict.fromkeys(keys, 0.0)
    for wk, sc in zip(w, client_scores):
        tot = sum(sc.values()) if normalize else 1.0
        tot = tot if tot > 0 else 1.0
        for k, v in sc.items():
            out[k] += wk * float(v) / tot
    return out


def select_modules(scores: Mapping[str, float], budget: int | float, *, sizes: Mapping[str, int] | None = None) -> list[str]:
    """Top modules by score (ties by name), best first.

    budget: int k >= 1: the k best modules; float in (0, 1]: that fraction of the modules (rounded up); with
    ``sizes`` ({module: parameters per unit rank, e.g. in+out}) a float/int budget > 1 is read as a parameter
    budget and modules are taken in score order while they fit.
    """
    order = sorted(scores, key=lambda k: (-scores[k], k))
    if sizes is not None and budget > 1:
        chosen, used = [], 0
        for k in order:
            if used + sizes[k] <= budget:
                chosen.append(k)
                used += sizes[k]
        return chosen
    if isinstance(budget, float) and 0 < budget <= 1:
        k = math.ceil(budget * len(order))
    elif isinstance(budget, int) and budget >= 1:
        k = budget
    else:
        raise ValueError(f"budget must be an int >= 1 or a float in (0, 1], got {budget!r}")
    return order[:k]


# ==============================================================================================
# Time model
# ==============================================================================================
@dataclass
class TimeModel:
    """Constants of the time model (module docstring)."""

    examples_per_round: int = 256
    mfu: float = 0.4
    base_flops_coef: float = 4.0
    lora_flops_coef: float = 6.0
    attn_flops_coef: float = 12.0
    weight_passes: int = 2
    dequant_bytes_per_weight: float = 4.0
    adam_bytes_per_param: float = 28.0
    payload_bytes: int = 4
    download: str = "own"          # "own" | "stacked"


def compute_time(spec: ModelSpec, rank: int, batch: int, bits: int, profile: Mapping, seq_len: int,
                 tm: TimeModel | None = None) -> float:
    """Seconds of local training per round (module docstring, 'Time model')."""
    tm = tm or TimeModel()
    lin = spec._by_name()  # noqa: SLF001
    tokens = batch * seq_len
    flops = tokens * (tm.base_flops_coef * spec.linear_numel + tm.lora_flops_coef * spec.lora_params(rank)
                      + tm.attn_flops_coef * spec.num_layers * seq_len * spec.hidden_size)
    wbytes = sum(linear_weight_bytes(li, bits if li.name in spec.quantizable else 16, spec.double_quant)
                 for li in lin.values())
    deq = tm.dequant_bytes_per_weight * spec.quantized_numel if bits < 16 else 0.0
    mem = tm.weight_passes * (wbytes + deq) + tm.adam_bytes_per_param * spec.trainable_params(rank)
    mfu = float(profile.get("mfu", tm.mfu))
    t_step = flops / (mfu * float(profile["bf16_tflops"]) * 1e12) + mem / (float(profile["mem_bandwidth_gbs"]) * 1e9)
    return math.ceil(tm.examples_per_round / batch) * t_step


def _bytes_per_s(mbps: float) -> float:
    return float(mbps) * 1e6 / 8.0


def upload_bytes(spec: ModelSpec, rank: int, tm: TimeModel | None = None) -> float:
    tm = tm or TimeModel()
    return (spec.lora_params(rank) + spec.extra_trainable) * tm.payload_bytes


def transfer_time(spec: ModelSpec, rank: int, profile: Mapping, tm: TimeModel | None = None,
                  down_rank: int | None = None) -> float:
    """Upload of the client's adapter + download of the global one (at ``down_rank``, default own rank)."""
    tm = tm or TimeModel()
    up = upload_bytes(spec, rank, tm) / _bytes_per_s(profile["uplink_mbps"])
    dr = rank if down_rank is None else down_rank
    down = (spec.lora_params(dr) + spec.extra_trainable) * tm.payload_bytes / _bytes_per_s(profile["downlink_mbps"])
    return up + down


# ==============================================================================================
# Plan
# ==============================================================================================
class InfeasibleBudgetError(ValueError):
    """A client cannot train even the smallest configuration within its memory budget."""


@dataclass
class Grids:
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    bits: tuple[int, ...] = (16, 8, 4)

    def options(self) -> list[tuple[int, int, int]]:
        return [(r, b, q) for r in sorted(self.ranks) for b in sorted(self.batches) for q in sorted(self.bits)]

    def utility(self, rank: int, bits: int) -> float:
        rs, qs = sorted(set(self.ranks)), sorted(set(self.bits))
        return (rs.index(rank) + qs.index(bits) / len(qs)) / len(rs)


@dataclass
class ClientPlan:
    client_id: int | str
    profile: str
    rank: int
    batch: int
    bits: int
    memory_bytes: int
    budget_bytes: int
    compute_s: float
    transfer_s: float
    time_s: float
    steps: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    clients: list[ClientPlan]
    round_time_s: float
    objective: float
    solver: str
    model: str
    seq_len: int
    examples_per_round: int
    download: str
    mem_fraction: float
    tie_break: float
    status: str = "optimal"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clients"] = [c.to_dict() for c in self.clients]
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    def table(self) -> str:
        return plan_to_table(self)

    def assignment(self) -> list[tuple[int, int, int]]:
        return [(c.rank, c.batch, c.bits) for c in self.clients]


def plan_to_table(p: Plan) -> str:
    """Plain-text table of a plan."""
    head = ("client", "profile", "rank", "batch", "bits", "memory GiB", "budget GiB", "compute s", "comm s", "time s")
    rows = [(str(c.client_id), c.profile, str(c.rank), str(c.batch), str(c.bits), f"{c.memory_bytes / GiB:.3f}",
             f"{c.budget_bytes / GiB:.3f}", f"{c.compute_s:.3f}", f"{c.transfer_s:.3f}", f"{c.time_s:.3f}")
            for c in p.clients]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w if i < 2 else "{:>%d}" % w for i, w in enumerate(widths))
    lines = [f"FedPipe plan for {p.model}: round time {p.round_time_s:.3f} s ({p.solver}, {p.status}); "
             f"{p.examples_per_round} examples x {p.seq_len} tokens per round, download={p.download}",
             fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


@dataclass
class _Problem:
    profiles: list[dict]
    options: list[tuple[int, int, int]]
    mem: np.ndarray          # K x O bytes
    budget: np.ndarray       # K bytes (already × mem_fraction)
    comp: np.ndarray         # K x O seconds
    comm: np.ndarray         # K x O seconds (upload + own download; download part 0 when stacked)
    down_per_rank: np.ndarray  # K seconds per unit of Σ rank (stacked only; else 0)
    up_bytes: np.ndarray     # O
    util: np.ndarray         # O
    server_Bps: float | None
    eps: float
    t_lb: float
    tm: TimeModel


def _client_label(p: Mapping, k: int):
    return p.get("client_id", k)


def _prepare(profiles, spec, grids, seq_len, calib, tm, mem_fraction, tie_break, server_mbps, memory_kw) -> _Problem:
    grids = grids or Grids()
    tm = tm or TimeModel()
    if tm.download not in ("own", "stacked"):
        raise ValueError(f"download must be 'own' or 'stacked', got {tm.download!r}")
    profiles = [load_profile(p) for p in profiles]
    if not profiles:
        raise ValueError("no clients")
    opts = grids.options()
    K, O = len(profiles), len(opts)
    budget = np.array([math.floor(mem_fraction * float(p["memory_gb"]) * GiB) for p in profiles], float)
    mem_o = np.array([predict_memory(spec, r, b, q, seq_len, calib, **memory_kw) for r, b, q in opts], float)
    mem = np.tile(mem_o, (K, 1))

    # Infeasible budgets: not even 4-bit, rank 1, batch 1 fits.
    floor = predict_memory(spec, 1, 1, 4, seq_len, calib, **memory_kw)
    short = [(k, p) for k, p in enumerate(profiles) if floor > budget[k]]
    if short:
        lines = [f"client {_client_label(p, k)} ({p['name']}): needs {floor:,} bytes ({floor / GiB:.2f} GiB) at "
                 f"4-bit, rank 1, batch 1 x {seq_len} tokens, but {mem_fraction:.0%} of its {p['memory_gb']} GiB "
                 f"is {int(budget[k]):,} bytes: short by {int(floor - budget[k]):,} bytes"
                 for k, p in short]
        raise InfeasibleBudgetError(f"{spec.name} cannot be trained on {len(short)} client(s):\n" + "\n".join(lines))
    no_opt = [(k, p) for k, p in enumerate(profiles) if not (mem[k] <= budget[k]).any()]
    if no_opt:
        smallest = int(mem_o.min())
        lines = [f"client {_client_label(p, k)} ({p['name']}): no (rank, batch, bits) of the grid fits "
                 f"{int(budget[k]):,} bytes; the smallest grid option needs {smallest:,} bytes (short by "
                 f"{int(smallest - budget[k]):,}); add smaller ranks / batches / 4-bit to the grid"
                 for k, p in no_opt]
        raise InfeasibleBudgetError("\n".join(lines))

    comp = np.array([[compute_time(spec, r, b, q, p, seq_len, tm) for r, b, q in opts] for p in profiles])
    stacked = tm.download == "stacked"
    comm = np.array([[transfer_time(spec, r, p, tm, down_rank=None) if not stacked else
                      upload_bytes(spec, r, tm) / _bytes_per_s(p["uplink_mbps"])
                      + spec.extra_trainable * tm.payload_bytes / _bytes_per_s(p["downlink_mbps"])
                      for r, b, q in opts] for p in profiles])
    down_per_rank = np.array([spec.adapted_width * tm.payload_bytes / _bytes_per_s(p["downlink_mbps"]) if stacked
                              else 0.0 for p in profiles])
    up_b = np.array([upload_bytes(spec, r, tm) for r, b, q in opts])
    util = np.array([grids.utility(r, q) for r, b, q in opts])
    feas = mem <= budget[:, None]
    own = comp + comm
    t_lb = max(float(own[k][feas[k]].min()) for k in range(K))
    return _Problem(profiles, opts, mem, budget, comp, comm, down_per_rank, up_b, util,
                    _bytes_per_s(server_mbps) if server_mbps else None, tie_break * t_lb / K, t_lb, tm)


def _round_time(pb: _Problem, choice: Sequence[int]) -> tuple[float, np.ndarray]:
    K = len(pb.profiles)
    sum_r = sum(pb.options[o][0] for o in choice)
    t = np.array([pb.comp[k, choice[k]] + pb.comm[k, choice[k]] + pb.down_per_rank[k] * sum_r for k in range(K)])
    T = float(t.max())
    if pb.server_Bps:
        T = max(T, float(sum(pb.up_bytes[o] for o in choice)) / pb.server_Bps)
    return T, t


def _objective(pb: _Problem, choice: Sequence[int]) -> float:
    T, _ = _round_time(pb, choice)
    return T - pb.eps * float(sum(pb.util[o] for o in choice))


def _polish(pb: _Problem, choice: list[int]) -> list[int]:
    """Keep each client's (rank, bits); take its fastest batch size that fits (never worsens the objective)."""
    out = []
    for k, o in enumerate(choice):
        r, _, q = pb.options[o]
        cands = [j for j, (r2, _b2, q2) in enumerate(pb.options)
                 if r2 == r and q2 == q and pb.mem[k, j] <= pb.budget[k]]
        out.append(min(cands, key=lambda j: (pb.comp[k, j] + pb.comm[k, j], -pb.options[j][1])))
    return out


def _finish(pb: _Problem, choice: list[int], solver: str, spec: ModelSpec, seq_len: int, mem_fraction: float,
            tie_break: float, status: str = "optimal", notes=()) -> Plan:
    choice = _polish(pb, choice)
    T, t = _round_time(pb, choice)
    sum_r = sum(pb.options[o][0] for o in choice)
    clients = []
    for k, o in enumerate(choice):
        r, b, q = pb.options[o]
        p = pb.profiles[k]
        clients.append(ClientPlan(
            client_id=_client_label(p, k), profile=str(p["name"]), rank=r, batch=b, bits=q,
            memory_bytes=int(pb.mem[k, o]), budget_bytes=int(pb.budget[k]), compute_s=float(pb.comp[k, o]),
            transfer_s=float(pb.comm[k, o] + pb.down_per_rank[k] * sum_r), time_s=float(t[k]),
            steps=math.ceil(pb.tm.examples_per_round / b)))
    return Plan(clients, T, _objective(pb, choice), solver, spec.name, seq_len, pb.tm.examples_per_round,
                pb.tm.download, mem_fraction, tie_break, status, list(notes))


def plan(clients_profiles: Sequence[Mapping | str], model_spec: ModelSpec, grids: Grids | None = None, *,
         seq_len: int = 128, calib: ActivationCalibration | None = None, time_model: TimeModel | None = None,
         mem_fraction: float = 0.9, tie_break: float = 1e-3, server_mbps: float | None = None,
         time_limit: float = 60.0, memory_kw: Mapping | None = None) -> Plan:
    """Per-client (rank, batch, bits) minimising the round time under memory budgets: the MILP of the module
    docstring, solved with ``scipy.optimize.milp``. Raises :class:`InfeasibleBudgetError` first if a client
    cannot hold the 4-bit base at rank 1, batch 1 (or no grid option fits)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    pb = _prepare(clients_profiles, model_spec, grids, seq_len, calib, time_model, mem_fraction, tie_break,
                  server_mbps, dict(memory_kw or {}))
    K, O = len(pb.profiles), len(pb.options)
    n = K * O + 1  # x[k, o] then T
    iT = K * O
    s = 1.0 / pb.t_lb  # times in units of the lower bound
    c = np.zeros(n)
    c[iT] = 1.0
    for k in range(K):
        c[k * O:(k + 1) * O] = -pb.eps * s * pb.util
    c *= 1e3 * K  # same optimum; keeps the tie-break differences (~tie_break/K) far above HiGHS' absolute gap
    rows = 3 * K + (1 if pb.server_Bps else 0)
    ri, ci, vals = [], [], []

    def put(row: int, cols, values) -> None:
        cols = np.asarray(cols)
        ri.extend([row] * len(cols))
        ci.extend(cols.tolist())
        vals.extend(np.broadcast_to(values, cols.shape).tolist())

    lo, hi = np.full(rows, -np.inf), np.zeros(rows)
    r_o = np.array([o[0] for o in pb.options], float)
    for k in range(K):
        cols = np.arange(k * O, (k + 1) * O)
        put(k, cols, 1.0)                                   # one option per client
        lo[k] = hi[k] = 1.0
        put(K + k, cols, pb.mem[k] / pb.budget[k])          # memory <= budget (scaled to 1)
        hi[K + k] = 1.0
        row = 2 * K + k                                     # own time (+ stacked download) <= T
        coef = np.zeros((K, O))
        coef[k] += (pb.comp[k] + pb.comm[k]) * s
        if pb.down_per_rank[k] > 0:
            coef += r_o[None, :] * pb.down_per_rank[k] * s
        nz = np.flatnonzero(coef.ravel())
        put(row, nz, coef.ravel()[nz])
        put(row, [iT], -1.0)
    if pb.server_Bps:                                       # shared server link: Σ uploads / rate <= T
        put(3 * K, np.arange(K * O), np.tile(pb.up_bytes / pb.server_Bps * s, K))
        put(3 * K, [iT], -1.0)
    A = coo_matrix((vals, (ri, ci)), shape=(rows, n)).tocsr()
    integrality = np.ones(n)
    integrality[iT] = 0
    ub = np.ones(n)
    ub[iT] = np.inf
    feas = pb.mem <= pb.budget[:, None]
    ub[:iT] = feas.ravel().astype(float)  # memory-infeasible options fixed at 0 (the rows say the same)
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(0, ub),
               options={"mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True})
    if res.x is None:
        raise RuntimeError(f"MILP failed: {res.message}")
    x = res.x[:iT].reshape(K, O)
    choice = [int(np.argmax(x[k])) for k in range(K)]
    status = "optimal" if res.status == 0 else f"status {res.status}: {res.message}"
    return _finish(pb, choice, "scipy.milp/HiGHS", model_spec, seq_len, mem_fraction, tie_break, status)


def brute_force_plan(clients_profiles: Sequence[Mapping | str], model_spec: ModelSpec, grids: Grids | None = None, *,
                     seq_len: int = 128, calib: ActivationCalibration | None = None,
                     time_model: TimeModel | None = None, mem_fraction: float = 0.9, tie_break: float = 1e-3,
                     server_mbps: float | None = None, memory_kw: Mapping | None = None,
                     max_combinations: int = 2_000_000) -> Plan:
    """Same problem as :func:`plan`, by enumerating every combination of memory-feasible options."""
    pb = _prepare(clients_profiles, model_spec, grids, seq_len, calib, time_model, mem_fraction, tie_break,
                  server_mbps, dict(memory_kw or {}))
    K = len(pb.profiles)
    feas = [[o for o in range(len(pb.options)) if pb.mem[k, o] <= pb.budget[k]] for k in range(K)]
    if math.prod(len(f) for f in feas) > max_combinations:
        raise ValueError("too many combinations for brute force")
    best, best_obj = None, math.inf
    for choice in itertools.product(*feas):
        obj = _objective(pb, choice)
        if obj < best_obj:
            best, best_obj = list(choice), obj
    return _finish(pb, best, "brute force", model_spec, seq_len, mem_fraction, tie_break)


def brute_force_optima(clients_profiles, model_spec, grids=None, *, rel_tol: float = 1e-9, **kw) -> tuple[float, int]:
    """(best objective, number of combinations within ``rel_tol`` of it) - lets tests know if the optimum is
    unique. Takes :func:`brute_force_plan`'s keywords."""
    pb = _prepare(clients_profiles, model_spec, grids, kw.get("seq_len", 128), kw.get("calib"), kw.get("time_model"),
                  kw.get("mem_fraction", 0.9), kw.get("tie_break", 1e-3), kw.get("server_mbps"),
                  dict(kw.get("memory_kw") or {}))
    K = len(pb.profiles)
    feas = [[o for o in range(len(pb.options)) if pb.mem[k, o] <= pb.budget[k]] for k in range(K)]
    # compare on the polished choices (batch is not part of the objective's preference)
    objs = [_objective(pb, _polish(pb, list(ch))) for ch in itertools.product(*feas)]
    best = min(objs)
    uniq = {tuple(_polish(pb, list(ch))) for ch, ob in zip(itertools.product(*feas), objs)
            if ob <= best + rel_tol * abs(best)}
    return best, len(uniq)


__all__ = [
    "ActivationCalibration", "ClientPlan", "Grids", "InfeasibleBudgetError", "LinearInfo", "MemoryMeasurement",
    "ModelSpec", "Plan", "TimeModel", "aggregate_importance", "analytic_activations", "assign_profiles",
    "brute_force_plan", "calibrate_activations", "compute_time", "detect_profile", "importance_scores",
    "list_profiles", "load_profile", "measure_peak", "memory_breakdown", "plan", "plan_to_table",
    "predict_memory", "select_modules", "static_bytes", "transfer_time",
]
