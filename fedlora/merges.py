"""FLoRA's base merges, kept in sync between server and clients (pure; no Flower).

Every round the server folds the stacked update B_s·A_s into the base weights and appends it to a
versioned log. A client at version v (it merged rounds 1..v) receives exactly the merges v+1..V it
missed, each as stacked factors or as the dense m×n update, whichever is smaller on the wire, so every
client trains on the same base as the server — also with partial participation or a late join.

Wire keys: ``merge.<version>.<module>.A`` / ``.B`` (factors) or ``merge.<version>.<module>.dense``.
"""

from __future__ import annotations

import numpy as np
import torch

from .adapters import LoraFactors

PREFIX = "merge."


class OutOfSync(ValueError):
    """The client lacks merges that the payload does not carry (e.g. its node restarted)."""


class MergeLog:
    """Server side: the log of merged updates and their running (float64) sum."""

    def __init__(self):
        self.entries: list[dict[str, LoraFactors]] = []  # entries[v-1] = merge of version v
        self.total: dict[str, torch.Tensor] = {}

    @property
    def version(self) -> int:
        return len(self.entries)

    def append(self, update: dict[str, LoraFactors]) -> None:
        self.entries.append({k: LoraFactors(f.A.float().clone(), f.B.float().clone(), f.scale)
                             for k, f in update.items()})
        for name, f in update.items():
            d = f.delta()
            self.total[name] = self.total[name] + d if name in self.total else d

    def payload(self, since: int) -> dict[str, np.ndarray]:
        """Arrays that bring a client from version ``since`` to the current one (smallest form per module)."""
        out = {}
        for v in range(since + 1, self.version + 1):
            for name, f in self.entries[v - 1].items():
                m, n = f.B.shape[0], f.A.shape[1]
                if f.rank * (m + n) <= m * n:
                    out[f"{PREFIX}{v}.{name}.A"] = (f.A * f.scale).numpy()
                    out[f"{PREFIX}{v}.{name}.B"] = f.B.numpy()
                else:
                    out[f"{PREFIX}{v}.{name}.dense"] = f.delta().float().numpy()
        return out

    def state_dict(self) -> dict:
        return {"entries": [{k: (f.A, f.B, f.scale) for k, f in e.items()} for e in self.entries]}

    def load_state_dict(self, sd: dict) -> None:
        self.entries, self.total = [], {}
        for e in sd["entries"]:
            self.append({k: LoraFactors(a, b, s) for k, (a, b, s) in e.items()})


def parse_payload(arrays: dict[str, np.ndarray]) -> dict[int, dict[str, torch.Tensor]]:
    """{version: {module: dense update (float64)}} from a payload's merge keys."""
    parts: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for key, a in arrays.items():
        if not key.startswith(PREFIX):
            continue
        v, rest = key[len(PREFIX):].split(".", 1)
        name, kind = rest.rsplit(".", 1)
        parts.setdefault(int(v), {}).setdefault(name, {})[kind] = a
    out: dict[int, dict[str, torch.Tensor]] = {}
    for v, mods in parts.items():
        out[v] = {}
        for name, d in mods.items():
            if "dense" in d:
                out[v][name] = torch.from_numpy(np.asarray(d["dense"], dtype=np.float64))
            else:
                out[v][name] = torch.from_numpy(d["B"].astype(np.float64)) @ torch.from_numpy(d["A"].astype(np.float64))
    return out


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
