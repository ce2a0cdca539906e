"""One representation of a LoRA adapter, and its only conversions.

Everything that moves between clients and server, or is aggregated, is an :class:`AdapterState`:
``lora = {module_name: LoraFactors(A [r, in], B [out, r], scale)}`` plus ``extra`` (non-LoRA trainables
such as a classification head, keyed by their parameter name). Module names are the base model's module
paths (``model.layers.0.self_attn.q_proj``), free of PEFT's ``base_model.model.`` prefix and adapter names.

Conversions live here and nowhere else:
- PEFT model  <-> AdapterState   (``from_peft`` / ``load_into_peft``)
- flat arrays <-> AdapterState   (``to_arrays`` / ``from_arrays``; keys ``<module>.lora_A``, ``<module>.lora_B``,
  ``extra.<param>``; numpy float32, which is what Flower's ``ArrayRecord`` carries)
- safetensors files              (``save_file`` / ``load_file``)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .as_sent import AsSent

PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B, EXTRA = "lora_A", "lora_B", "extra."
_DOT_A, _DOT_B, _CUT = "." + LORA_A, "." + LORA_B, len(LORA_A) + 1


@dataclass
class LoraFactors:
    """LoRA factors of one adapted weight W (out x in): the update is ``scale * B @ A``."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense update scale * B @ A (out x in). Only for small modules, tests and audits."""
        return self.scale * (self.B.double() @ self.A.double())


@dataclass
class AdapterState:
    lora: dict[str, LoraFactors] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    # -- small helpers -------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.lora.items()}

    def num_parameters(self) -> int:
        return sum(f.A.numel() + f.B.numel() for f in self.lora.values()) + sum(
            t.numel() for t in self.extra.values()
        )

    def clone(self) -> AdapterState:
        return AdapterState(
            {n: LoraFactors(f.A.clone(), f.B.clone(), f.scale) for n, f in self.lora.items()},
            {n: t.clone() for n, t in self.extra.items()},
        )

    def map(self, fn) -> AdapterState:
        """Apply ``fn`` to every tensor (e.g. ``lambda t: t.float()``)."""
        return AdapterState(
            {n: LoraFactors(fn(f.A), fn(f.B), f.scale) for n, f in self.lora.items()},
            {n: fn(t) for n, t in self.extra.items()},
        )


@dataclass
class ExportedAdapter(AdapterState):
    """An adapter made for export (FLoRA's merged total, re-factorised at a tolerance): :func:`save_peft` writes
    ``metadata`` (str -> str) into the saved adapter's safetensors header, and for the modules in ``merged``
    ({module: dW}: those whose dense update is no larger than its factors) the merged base weights W + dW into
    :data:`MERGED_WEIGHTS` beside the adapter."""

    metadata: dict[str, str] = field(default_factory=dict)
    merged: dict[str, torch.Tensor] = field(default_factory=dict)


#: file name, inside a saved adapter folder, of the merged base weights of :attr:`ExportedAdapter.merged` modules
MERGED_WEIGHTS = "merged_weights.safetensors"


# ----------------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------------
def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """PEFT LoRA layers of ``model`` by base-module name."""
    from peft.tuners.lora import LoraLayer

    return {_strip(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def from_peft(model, adapter_name: str = "default", include_A: bool = True) -> AdapterState:
    """Read the active adapter (and trainable non-LoRA parameters) out of a PEFT model, detached, fp32."""
    state = AdapterState()
    for name, layer in lora_layers(model).items():
        if adapter_name not in layer.lora_A:
            continue
        A = layer.lora_A[adapter_name].weight.detach().float().cpu().clone()
        B = layer.lora_B[adapter_name].weight.detach().float().cpu().clone()
        state.lora[name] = LoraFactors(A, B, float(layer.scaling[adapter_name]))
    for pname, p in model.named_parameters():
        if p.requires_grad and ".lora_" not in pname:
            state.extra[_strip(pname)] = p.detach().float().cpu().clone()
    return state


@torch.no_grad()
def load_into_peft(model, state: AdapterState, adapter_name: str = "default", strict: bool = True) -> None:
    """Write ``state`` into a PEFT model. Ranks must match the model's (``resize_peft`` changes them)."""
    layers = lora_layers(model)
    for name, f in state.lora.items():
        if name not in layers:
            raise KeyError(f"adapter has module {name!r} that the model has no LoRA layer for")
        layer = layers[name]
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if a.shape != f.A.shape or b.shape != f.B.shape:
            raise ValueError(
                f"{name}: adapter shapes A{tuple(f.A.shape)} B{tuple(f.B.shape)} do not match the model's "
                f"A{tuple(a.shape)} B{tuple(b.shape)}"
            )
        a.copy_(f.A.to(a.dtype))
        b.copy_(f.B.to(b.dtype))
        layer.scaling[adapter_name] = f.scale
    if state.extra:
        params = {_strip(n): p for n, p in model.named_parameters()}
        for pname, t in state.extra.items():
            if pname not in params:
                raise KeyError(f"adapter has parameter {pname!r} that the model does not have")
            params[pname].copy_(t.to(params[pname].dtype))
    if strict:
        missing = set(layers) - set(state.lora)
        if missing and state.lora:
            raise KeyError(f"adapter lacks modules {sorted(missing)[:3]}...")


@torch.no_grad()
def resize_peft(model, ranks: dict[str, int] | int, alpha: float, adapter_name: str = "default") -> None:
    """Give every LoRA layer a fresh adapter of the given rank(s) (A Kaiming, B zero), scale alpha/r."""
    for name, layer in lora_layers(model).items():
        r = ranks if isinstance(ranks, int) else ranks[name]
        if layer.r[adapter_name] == r:
            continue
        dev = layer.lora_A[adapter_name].weight.device
        dtype = layer.lora_A[adapter_name].weight.dtype
        inf, outf = layer.in_features, layer.out_features
        layer.lora_A[adapter_name] = torch.nn.Linear(inf, r, bias=False, device=dev, dtype=dtype)
        layer.lora_B[adapter_name] = torch.nn.Linear(r, outf, bias=False, device=dev, dtype=dtype)
        torch.nn.init.zeros_(layer.lora_B[adapter_name].weight)
        layer.r[adapter_name] = r
        layer.lora_alpha[adapter_name] = alpha
        layer.scaling[adapter_name] = alpha / r


def train_A(model, trainable: bool) -> None:
    """Let every LoRA A factor train, or freeze it (FFA-LoRA: A is shared, fixed and never sent back)."""
    for layer in lora_layers(model).values():
        for a in layer.lora_A.values():
            a.weight.requires_grad_(trainable)


def train_B(model, trainable: bool) -> None:
    """Let every LoRA B factor train, or freeze it (RoLoRA's A rounds: B is shared, fixed and never sent back)."""
    for layer in lora_layers(model).values():
        for b in layer.lora_B.values():
            b.weight.requires_grad_(trainable)


#: what ``fl.train_factor`` of a train message may say: which LoRA factors a client trains this round (the others
#: are frozen at what the server sent and not sent back). A message without it means ``B`` when ``fl.freeze_a`` is
#: set (FFA-LoRA), else ``both``.
TRAIN_FACTORS = ("both", "A", "B")


# ----------------------------------------------------------------------------------------------
# Flat arrays (Flower ArrayRecord content) and files
# ----------------------------------------------------------------------------------------------
def to_arrays(state: AdapterState, parts: tuple[str, ...] = (LORA_A, LORA_B, "extra")) -> dict[str, np.ndarray]:
    """Flat ``{key: float32 ndarray}``. ``parts`` selects what is sent (FFA-LoRA sends only B and extra)."""
    out: dict[str, np.ndarray] = {}
    for name, f in state.lora.items():
        if LORA_A in parts:
            out[f"{name}.{LORA_A}"] = f.A.detach().float().cpu().numpy()
        if LORA_B in parts:
            out[f"{name}.{LORA_B}"] = f.B.detach().float().cpu().numpy()
    if "extra" in parts:
        for pname, t in state.extra.items():
            out[EXTRA + pname] = t.detach().float().cpu().numpy()
    return out


def from_arrays(arrays: dict[str, np.ndarray | torch.Tensor], scales: dict[str, float] | float) -> AdapterState:
    """Inverse of :func:`to_arrays` for states that carry both A and B (a reply's tensors as sent, torch tensors
    or :class:`~fedlora.as_sent.AsSent`, are kept as they are). Unknown key forms raise ValueError."""
    state = AdapterState()
    As, Bs = {}, {}
    held = (torch.Tensor, AsSent)
    for key, v in arrays.items():  # (a server reads 100 replies of 128 tensors a round: no work a key it can skip)
        t = v if isinstance(v, held) else torch.from_numpy(np.asarray(v))
        if key.startswith(EXTRA):
            state.extra[key[len(EXTRA):]] = t
        elif key.endswith(_DOT_A):
            As[key[:-_CUT]] = t
        elif key.endswith(_DOT_B):
            Bs[key[:-_CUT]] = t
        else:
            raise ValueError(f"unexpected array key {key!r} (expected '<module>.lora_A|lora_B' or 'extra.<name>')")
    if set(As) != set(Bs):
        raise ValueError(f"modules with only one factor: {sorted(set(As) ^ set(Bs))[:3]}")
    for name in As:
        s = scales if isinstance(scales, (int, float)) else scales[name]
        state.lora[name] = LoraFactors(As[name], Bs[name], float(s))
    return state


def array_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Payload bytes of a flat array dict (raw tensor bytes)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def fingerprint(t: torch.Tensor) -> str:
    """Short stable hash of a tensor's float32 bytes (used to check that frozen factors agree)."""
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def save_file(state: AdapterState, path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file as _save

    tensors = {k: torch.from_numpy(v).contiguous() for k, v in to_arrays(state).items()}
    meta = {f"scale.{n}": repr(f.scale) for n, f in state.lora.items()}
    meta.update(metadata or {})
    _save(tensors, str(path), metadata=meta)


def load_file(path) -> AdapterState:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    scales = {k[len("scale."):]: float(v) for k, v in meta.items() if k.startswith("scale.")}
    return from_arrays(arrays, scales)


#: The initialisations :func:`seeded_A` can draw A with (``strategy.a_init`` of FFA-LoRA, ``fl.a_init`` in a train
#: message). All three have the same expected squared row norm, 1/3 (Kaiming-uniform's: entries U(-b, b) with
#: b = 1/sqrt(in) have variance 1/(3 in)), so they differ in the *shape* of A only; its *scale* is the LoRA alpha's
#: (with A frozen, scaling A by c is exactly scaling alpha by c):
#:
#: - ``kaiming``: PEFT's default (``init_lora_weights=True``, kaiming-uniform with a = sqrt(5)): U(-1/sqrt(in),
#:   1/sqrt(in)). What every strategy drew before ``a_init`` existed, bit for bit;
#: - ``gaussian``: N(0, 1/(3 in)) (the LoRA paper's "random Gaussian" A, at Kaiming's variance; PEFT's
#:   ``init_lora_weights="gaussian"`` is N(0, 1/r^2), i.e. this one with alpha times sqrt(3 in)/r);
#: - ``orthogonal``: orthonormal rows (A A^T = I/3: rows of norm 1/sqrt(3)), the Gram-Schmidt orthonormalisation
#:   (QR with a positive diagonal) of the ``gaussian`` draw, so the rows are a Haar-random orthonormal frame.
#:   Needs r <= in.
A_INITS = ("kaiming", "gaussian", "orthogonal")
#: the initialisation a message without ``fl.a_init`` means (every strategy but FFA-LoRA, and older servers)
DEFAULT_A_INIT = "kaiming"


def check_a_init(init) -> str:
    """``init`` if it is one of :data:`A_INITS`, else ValueError in one sentence."""
    if init not in A_INITS:
        raise ValueError(f"a_init={init!r} is not an initialisation of A: choose one of {', '.join(A_INITS)}.")
    return str(init)


def seeded_A(seed: int, name: str, r: int, in_features: int, a_rank: int | None = None,
             init: str = DEFAULT_A_INIT) -> torch.Tensor:
    """A LoRA ``A`` (r x in) drawn from ``seed`` and the module name alone, Kaiming-uniform as PEFT's default
    (bound 1/sqrt(in)): every party that knows the seed gets the same A without sending it.

    Nested: the matrix is drawn at rank ``R = max(r, a_rank)`` and cut to its first r rows, so parties of
    different ranks that share a seed hold prefixes of ONE matrix (a rank-4 A is the first 4 rows of the rank-16
    A), and padded or truncated averages of their factors compare like with like. Row i never depends on R
    (the generator fills the R x in draw row by row), so ``a_rank`` <= r gives exactly the A drawn at rank r.

    ``init`` (:data:`A_INITS`, default ``kaiming``: the draw above, unchanged) chooses the distribution, always at
    the same expected row norm. ``gaussian`` is a Box-Muller transform of the same generator's uniforms (in float64,
    rounded to float32), so its rows too are prefixes; ``orthogonal`` orthonormalises the gaussian rows in order
    (row i depends on rows 0..i only: a prefix up to float rounding, and cut from the rank-R matrix here, so every
    party that passes the same ``a_rank`` holds the same bits). ``kaiming`` is exact arithmetic on the generator's
    output (the same bits on any machine); ``gaussian`` and ``orthogonal`` go through log/cos/QR in float64 before
    rounding, so they are the same bits on the same kind of machine (FFA-LoRA's A fingerprint refuses a client
    whose A differs, by any bit)."""
    import zlib

    init = check_a_init(init)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    bound = 1.0 / float(in_features) ** 0.5
    R = max(int(r), int(a_rank or 0))
    if init == "kaiming":
        A = (torch.rand(R, in_features, generator=g) * 2 - 1) * bound
    else:
        # Box-Muller from (R, in, 2) uniforms (row-major: row i's uniforms do not depend on R); 1 - u is in (0, 1]
        u = torch.rand(R, in_features, 2, generator=g, dtype=torch.float64)
        z = torch.sqrt(-2.0 * torch.log1p(-u[..., 0])) * torch.cos(2.0 * torch.pi * u[..., 1])
        if init == "gaussian":
            A = (z * (bound / 3.0 ** 0.5)).float()
        else:
            if R > in_features:
                raise ValueError(f"a_init='orthogonal' needs the rank ({R}) to be at most the module's input size "
                                 f"({in_features}) for {name}: use a_init=kaiming or gaussian, or a smaller rank.")
            q, rr = torch.linalg.qr(z.T)  # z.T = q rr, q: in x R with orthonormal columns
            q = q * torch.where(torch.diagonal(rr) < 0, -1.0, 1.0)  # the unique QR with a positive diagonal
            A = (q.T / 3.0 ** 0.5).float().contiguous()
    return A if R == r else A[:r].clone()


def save_peft(model, state: AdapterState, path, adapter_name: str = "default") -> None:
    """Write ``state`` into ``model`` and save it in PEFT's format, with the adapter config's ranks and alphas
    set to the state's (``rank_pattern``/``alpha_pattern`` where modules differ), so that plain
    ``PeftModel.from_pretrained(base, path)`` rebuilds exactly this adapter."""
    from collections import Counter

    ranks = state.ranks()
    alpha_of = {n: f.scale * f.rank for n, f in state.lora.items()}
    resize_peft(model, ranks, alpha=1.0, adapter_name=adapter_name)
    load_into_peft(model, state, adapter_name)
    conf = model.peft_config[adapter_name]
    r0 = Counter(ranks.values()).most_common(1)[0][0] if ranks else conf.r
    a0 = Counter(alpha_of[n] for n in ranks if ranks[n] == r0).most_common(1)[0][0] if ranks else conf.lora_alpha
    conf.r, conf.lora_alpha = int(r0), float(a0)
    conf.rank_pattern = {re.escape(n): int(r) for n, r in ranks.items() if r != r0}
    conf.alpha_pattern = {re.escape(n): float(alpha_of[n]) for n in ranks if alpha_of[n] != a0}
    model.save_pretrained(str(path), selected_adapters=[adapter_name])
    if isinstance(state, ExportedAdapter):
        _save_export_extras(model, state, Path(path) if adapter_name == "default" else Path(path) / adapter_name)


def _save_export_extras(model, state: ExportedAdapter, folder: Path) -> None:
    """:attr:`ExportedAdapter.metadata` into ``adapter_model.safetensors``' header; W + dW of the
    :attr:`ExportedAdapter.merged` modules (float32, keys ``<module>.weight`` as in the base model's state dict,
    loadable with ``load_state_dict(..., strict=False)``) into :data:`MERGED_WEIGHTS`."""
    from peft.utils.integrations import dequantize_module_weight
    from safetensors import safe_open
    from safetensors.torch import save_file as _save

    weights = folder / "adapter_model.safetensors"
    if state.metadata and weights.is_file():
        with safe_open(str(weights), framework="pt") as fh:
            meta, tensors = dict(fh.metadata() or {}), {k: fh.get_tensor(k) for k in fh.keys()}
        _save(tensors, str(weights), metadata={**meta, **{str(k): str(v) for k, v in state.metadata.items()}})
    if state.merged:
        layers = lora_layers(model)
        out = {f"{name}.weight": (dequantize_module_weight(layers[name].get_base_layer()).detach().double().cpu()
                                  + d.detach().double().cpu()).float().contiguous()
               for name, d in state.merged.items()}
        _save(out, str(folder / MERGED_WEIGHTS), metadata={
            "format": "pt", **{str(k): str(v) for k, v in state.metadata.items()},
            "content": "merged base weights W + dW of the modules whose dense update is no larger than its LoRA "
                       "factors (r(m+n) >= m*n); use them in place of the base weights and of the adapter's "
                       "factors for these modules"})


def a_fingerprint(state: AdapterState) -> int:
    """A non-negative int64 fingerprint of all A factors (FFA-LoRA clients report it; the server compares)."""
    return int(fingerprint(torch.cat([state.lora[n].A.flatten() for n in sorted(state.lora)])), 16) >> 4
