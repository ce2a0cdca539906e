"""FLoRA's base merges, kept in sync between server and clients (pure; no Flower).

Every round the server folds the stacked update B_s·A_s into the base weights and appends it to a
versioned log. A client at version v (it merged rounds 1..v) receives exactly the merges v+1..V it
missed, each as factors or as the dense m×n update, whichever is smaller on the wire (:func:`wire`), so every
client trains on the same base as the server — also with partial participation or a late join.

FLoRA's downlink (issue 18): :func:`compact` re-factorises a round's stacked update once, at append time, at its
numerical rank (or at ``strategy.downlink_tolerance``) by :func:`fedlora.lowrank.refactor_product`, never forming
m×n; the log stores exactly those float32 factors. What the log's ``total`` accumulates (the server's base, export,
digest) is what a client computes from the arrays it receives (:func:`received` of :func:`wire`), after the
``comm.down`` codec's decode(encode(·)) when the log's merges are coded, so server and clients hold the same base.

Wire keys: ``merge.<version>.<module>.A`` / ``.B`` (factors, scale folded into A) or ``merge.<version>.<module>.dense``;
coded merges (lossy ``comm.down``) use the kinds ``coded_A``, ``coded_B``, ``coded_dense``
(:data:`fedlora.codecs.CODED_MERGE`), the only merge keys a codec encodes.
"""

from __future__ import annotations

import numpy as np
import torch

from . import codecs, lowrank
from .adapters import LoraFactors

PREFIX = "merge."


def wire(f: LoraFactors) -> dict[str, np.ndarray]:
    """How one module's merge travels (float32): ``{"A": scale·A, "B": B}``, or ``{"dense": scale·B A}`` when the
    factors hold more numbers than the update (r(m+n) > m n; the product is formed only then)."""
    m, n = f.B.shape[0], f.A.shape[1]
    if f.rank * (m + n) <= m * n:
        return {"A": (f.A.float() * f.scale).numpy(), "B": f.B.float().numpy()}
    return {"dense": f.delta().float().numpy()}


def received(parts: dict[str, np.ndarray]) -> torch.Tensor:
    """The float64 update a node merges from one module's arrays (:func:`wire`'s kinds): B·A or the dense update."""
    if "dense" in parts:
        return torch.from_numpy(np.asarray(parts["dense"], dtype=np.float64))
    return torch.from_numpy(parts["B"].astype(np.float64)) @ torch.from_numpy(parts["A"].astype(np.float64))


def decoded(codec: codecs.Codec | None, parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``parts`` as a client decodes them under ``codec`` (decode(encode(x)); unchanged without a lossy codec)."""
    if codec is None or not codec.lossy:
        return parts
    keys = {kind: f"{PREFIX}0.m.{codecs.CODED_MERGE}{kind}" for kind in parts}
    dec = codecs.decode(codec, codecs.encode(codec, {keys[kind]: a for kind, a in parts.items()}))
    return {kind: dec[key] for kind, key in keys.items()}


def compact(update: dict[str, LoraFactors], tol: float = 0.0
            ) -> tuple[dict[str, LoraFactors], dict[str, tuple[int, float, float]]]:
    """FLoRA's downlink: every module's stacked update s·B_s A_s re-factorised once (:func:`fedlora.lowrank.
    refactor_product`: QR of the stacked factors and an SVD of the R×R core, no m×n) at its numerical rank
    (``tol`` = 0: equal to rounding) or at the smallest rank within a relative Frobenius ``tol``. Returns the entry to
    log (float32 factors, B' = U_k S_k, A' = V_k^T, scale 1: exactly what is sent) and, per module, ``(k, error,
    norm)``: the kept rank, ||B'A' − s B_s A_s||_F of the float32 entry and ||s B_s A_s||_F (float64, from the
    factors)."""
    entry, info = {}, {}
    for name, f in update.items():
        Bs = f.B.double() * f.scale
        B, A, k = lowrank.refactor_product(Bs, f.A, tol)
        e = LoraFactors(A.float().contiguous(), B.float().contiguous(), 1.0)
        err = lowrank.factored_norm(torch.cat([e.B.double(), -Bs], 1), torch.cat([e.A.double(), f.A.double()], 0))
        entry[name], info[name] = e, (k, err, lowrank.factored_norm(Bs, f.A))
    return entry, info


class OutOfSync(ValueError):
    """The client lacks merges that the payload does not carry (e.g. its node restarted)."""


class MergeLog:
    """Server side: the log of merged updates (what is sent, float32) and their running (float64) sum (what every
    base merges: :func:`received` of :func:`wire`, through :func:`decoded` when the log's merges are coded)."""

    def __init__(self):
        self.entries: list[dict[str, LoraFactors]] = []  # entries[v-1] = merge of version v
        self.total: dict[str, torch.Tensor] = {}

    @property
    def version(self) -> int:
        return len(self.entries)

    def append(self, update: dict[str, LoraFactors], codec: codecs.Codec | None = None) -> None:
        """Log ``update`` as the next version; ``codec``: the lossy ``comm.down`` its merges go through (then
        :meth:`payload` must be called with ``coded=True``), so ``total`` adds what clients decode."""
        entry = {k: LoraFactors(f.A.float().clone(), f.B.float().clone(), f.scale) for k, f in update.items()}
        self.entries.append(entry)
        for name, f in entry.items():
            d = received(decoded(codec, wire(f)))
            self.total[name] = self.total[name] + d if name in self.total else d

    def payload(self, since: int, coded: bool = False) -> dict[str, np.ndarray]:
        """Arrays that bring a client from version ``since`` to the current one (smallest form per module,
        :func:`wire`); ``coded``: under the kinds a lossy ``comm.down`` encodes (``coded_A``, ...)."""
        mark = codecs.CODED_MERGE if coded else ""
        out = {}
        for v in range(since + 1, self.version + 1):
            for name, f in self.entries[v - 1].items():
                for kind, a in wire(f).items():
                    out[f"{PREFIX}{v}.{name}.{mark}{kind}"] = a
        return out

    def state_dict(self) -> dict:
        return {"entries": [{k: (f.A, f.B, f.scale) for k, f in e.items()} for e in self.entries]}

    def load_state_dict(self, sd: dict, codec: codecs.Codec | None = None) -> None:
        self.entries, self.total = [], {}
        for e in sd["entries"]:
            self.append({k: LoraFactors(a, b, s) for k, (a, b, s) in e.items()}, codec)


def parse_payload(arrays: dict[str, np.ndarray]) -> dict[int, dict[str, torch.Tensor]]:
    """{version: {module: dense update (float64)}} from a payload's merge keys (coded kinds already decoded)."""
    parts: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for key, a in arrays.items():
        if not key.startswith(PREFIX):
            continue
        v, rest = key[len(PREFIX):].split(".", 1)
        name, kind = rest.rsplit(".", 1)
        parts.setdefault(int(v), {}).setdefault(name, {})[kind.removeprefix(codecs.CODED_MERGE)] = a
    return {v: {name: received(d) for name, d in mods.items()} for v, mods in parts.items()}


def apply(delta: dict[str, torch.Tensor], version: int,
          arrays: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], int]:
    """Client side: add the merges in ``arrays`` (versions version+1..) to ``delta`` in order."""
    merges = parse_payload(arrays)
    for v in sorted(merges):
        if v <= version:  # already merged (e.g. the client failed after merging last time)
            continue
        if v != version + 1:
            raise OutOfSync(f"merge version {v} arrived while the client is at version {version}: a merge is missing")
        for name, d in merges[v].items():
            delta[name] = delta[name].double() + d if name in delta else d
        version = v
    return delta, version


def base_digest(delta: dict[str, torch.Tensor]) -> float:
    """A float64 fingerprint of merged base updates: Σ_modules <Δ, P_module> with fixed pseudo-random
    probes. Server and client digests agree to rounding iff their merged bases agree."""
    import zlib

    total = 0.0
    for name in sorted(delta):
        d = delta[name].double()
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        total += float((d * torch.randn(d.shape, generator=g, dtype=torch.float64)).sum())
    return total
