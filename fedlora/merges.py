"""FLoRA's base merges, kept in sync between server and clients (pure; no Flower).

Every round the server folds the stacked update B_s·A_s into the base weights and appends it to a
versioned log. A client at version v (it merged rounds 1..v) receives what brings it from v to the current version V,
each merge as factors or as the dense m×n update, whichever is smaller on the wire (:func:`wire`), so every
client trains on the same base as the server — also with partial participation or a late join.

FLoRA's downlink (issue 18): :func:`compact` re-factorises a round's stacked update once, at append time, at its
numerical rank (or at ``strategy.downlink_tolerance``) by :func:`fedlora.lowrank.refactor_product`, never forming
m×n; the log stores exactly those float32 factors. What the log's ``total`` accumulates (the server's base, export,
digest) is what a client computes from the arrays it receives (:func:`received` of :func:`wire`), after the
``comm.down`` codec's decode(encode(·)) when the log's merges are coded, so server and clients hold the same base.

Capped catch-up (issue 18, "Scale"): with partial participation a sampled client has missed about 1/fraction_train
merges, and sending each of them makes its download grow with the total number of clients. :meth:`MergeLog.payload`
therefore picks, per module, the cheapest on the wire of

* the missed merges one by one (as above, through the codec when coded);
* the module's **merged base** at V, ``total[module]`` itself (float64 m×n; the node *replaces* its merged update
  with it), whatever the node's version: one array, shared by every node of the round; and
* the **sum of the missed merges as factors** (float64), the concatenated factors of what clients decode of merges
  v+1..V re-factorised by :func:`fedlora.lowrank.refactor_product` at their numerical rank, never forming m×n; tried
  only when every missed merge of the module travels as factors and their stacked rank R is below the dense
  break-even (R (m+n) < m n), where the QR costs less than a dense product and the stack can be rank-deficient.

So a node's catch-up is bounded by one float64 m×n per module (twice a float32 dense update), however many merges
it missed. Why float64 and not a float32 dense update: the server's base is a float64 sum of what clients decode of
each merge, which no float32 array reproduces; a float32 catch-up would leave every late node ~1e-7 (relative) off
the server's base for good, where the merges one by one keep it bit for bit. The merged base is exact by
construction (the node holds ``total`` bit for bit after it) and costs no memory (it is the log's own running total,
an array view, no per-version snapshot; the m×n dense difference of two totals is never formed). The factored sum
is what ``total`` moved by from v to V to float64 rounding (a sum of the same decoded factors, also under a lossy
codec). Both combined forms travel uncoded (plain keys: a lossy ``comm.down`` passes them through, so clients merge
exactly what the server did); under a lossy codec the merges one by one are costed as the codec sends them, so the
combined forms only win once they are smaller than the coded merges (about 8 missed int8 merges). The choice and
the arrays are cached per (since, V) until the next merge, so the nodes of a round at the same version share one
payload; each logged merge's wire form (the dense product included) is computed once, on append.

Wire keys: ``merge.<version>.<module>.A`` / ``.B`` (factors, scale folded into A) or ``merge.<version>.<module>.dense``;
coded merges (lossy ``comm.down``) use the kinds ``coded_A``, ``coded_B``, ``coded_dense``
(:data:`fedlora.codecs.CODED_MERGE`), the only merge keys a codec encodes. A combined catch-up of versions a..b
(a = since + 1, b = V) is ``merge.<a>-<b>.<module>.A`` / ``.B`` (float64 factors of the sum, added) or
``merge.<a>-<b>.<module>.base`` (float64, the merged base at b, replacing the node's); :func:`apply` takes a span
only from version a − 1 (a base span also from inside a..b) and raises :class:`OutOfSync` for a gap as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import codecs, lowrank
from .adapters import LoraFactors

PREFIX = "merge."
#: kind of a span key that carries the module's merged base (replaces what the node holds)
BASE = "base"


def wire(f: LoraFactors) -> dict[str, np.ndarray]:
    """How one module's merge travels (float32): ``{"A": scale·A, "B": B}``, or ``{"dense": scale·B A}`` when the
    factors hold more numbers than the update (r(m+n) > m n; the product is formed only then). :meth:`MergeLog.sent`
    caches it per logged merge."""
    m, n = f.B.shape[0], f.A.shape[1]
    if f.rank * (m + n) <= m * n:
        A = f.A.float() if f.scale == 1.0 else f.A.float() * f.scale
        return {"A": A.numpy(), "B": f.B.float().numpy()}
    return {"dense": f.delta().float().numpy()}


def received(parts: dict[str, np.ndarray]) -> torch.Tensor:
    """The float64 update a node merges from one module's arrays (:func:`wire`'s kinds): B·A or the dense update."""
    if "dense" in parts:
        return torch.from_numpy(np.asarray(parts["dense"], dtype=np.float64))
    return torch.from_numpy(parts["B"].astype(np.float64)) @ torch.from_numpy(parts["A"].astype(np.float64))


def _through(codec: codecs.Codec | None, parts: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """``parts`` as a client decodes them under ``codec`` and the bytes they take on the wire (encoded)."""
    if codec is None or not codec.lossy:
        return parts, int(sum(a.nbytes for a in parts.values()))
    keys = {kind: f"{PREFIX}0.m.{codecs.CODED_MERGE}{kind}" for kind in parts}
    enc = codecs.encode(codec, {keys[kind]: a for kind, a in parts.items()})
    dec = codecs.decode(codec, enc)
    return {kind: dec[key] for kind, key in keys.items()}, int(sum(a.nbytes for a in enc.values()))


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


class _Memo:
    """What a :class:`MergeLog` computes once and keeps out of its (checkpointed) attributes: per version the wire
    arrays of its merge (with the entry they were made from, so a replaced entry is recomputed) and their bytes per
    codec; per round (until the next merge) the payloads by (since, coded, codec, combine) and the decoded factors."""

    def __init__(self):
        self.sent: dict[int, tuple[dict, dict[str, dict[str, np.ndarray]]]] = {}
        self.cost: dict[tuple[int, codecs.Codec | None], tuple[dict, dict[str, int]]] = {}
        self.clear_round()

    def clear_round(self) -> None:
        self.version, self.last = -1, None
        self.payloads: dict[tuple, dict[str, np.ndarray]] = {}
        self.decoded: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        self.bases: dict[str, np.ndarray] = {}


class MergeLog:
    """Server side: the log of merged updates (what is sent, float32) and their running (float64) sum (what every
    base merges: :func:`received` of :func:`wire`, through :func:`_through` when the log's merges are coded).
    A checkpoint saves ``entries`` and ``total``; the caches (``memo``, transient) are rebuilt on demand."""

    TRANSIENT = ("memo",)

    def __init__(self):
        self.entries: list[dict[str, LoraFactors]] = []  # entries[v-1] = merge of version v
        self.total: dict[str, torch.Tensor] = {}
        self.memo: _Memo | None = None

    @property
    def version(self) -> int:
        return len(self.entries)

    def _memo(self) -> _Memo:
        if self.memo is None:
            self.memo = _Memo()
        return self.memo

    def sent(self, v: int) -> dict[str, dict[str, np.ndarray]]:
        """Per module, the float32 arrays merge ``v`` travels as (:func:`wire`), computed once per logged entry
        (the dense product of a module sent dense included). Shared by every payload: never modify them."""
        memo, entry = self._memo(), self.entries[v - 1]
        held = memo.sent.get(v)
        if held is None or held[0] is not entry:
            held = memo.sent[v] = (entry, {name: wire(f) for name, f in entry.items()})
        return held[1]

    def _cost(self, v: int, codec: codecs.Codec | None) -> dict[str, int]:
        """Per module, the bytes merge ``v`` takes on the wire (encoded under ``codec``; None: as sent, float32)."""
        memo, entry = self._memo(), self.entries[v - 1]
        held = memo.cost.get((v, codec))
        if held is None or held[0] is not entry:
            held = memo.cost[(v, codec)] = (entry, {n: _through(codec, p)[1] for n, p in self.sent(v).items()})
        return held[1]

    def append(self, update: dict[str, LoraFactors], codec: codecs.Codec | None = None) -> None:
        """Log ``update`` as the next version; ``codec``: the lossy ``comm.down`` its merges go through (then
        :meth:`payload` must be called with ``coded=True``), so ``total`` adds what clients decode."""
        entry = {k: LoraFactors(f.A.float().clone(), f.B.float().clone(), f.scale) for k, f in update.items()}
        self.entries.append(entry)
        memo, v = self._memo(), self.version
        memo.clear_round()
        costs = {}
        for name, parts in self.sent(v).items():
            dec, costs[name] = _through(codec, parts)
            d = received(dec)
            self.total[name] = self.total[name] + d if name in self.total else d
        memo.cost[(v, codec if codec is not None and codec.lossy else None)] = (entry, costs)

    def payload(self, since: int, coded: bool = False, codec: codecs.Codec | None = None,
                combine: bool = True) -> dict[str, np.ndarray]:
        """Arrays that bring a client from version ``since`` to the current one V: per module the cheapest on the
        wire of the merges since+1..V one by one (smallest form each, :func:`wire`), the module's merged base at V
        and the factored sum of the missed merges (see the module docstring; ``combine=False``: one by one only, as
        before issue 18's cap). ``coded``: the merges one by one under the kinds a lossy ``comm.down`` encodes
        (``coded_A``, ...); ``codec``: that codec, to cost them and to sum what clients decode (without it a coded
        payload is never combined). Cached per (since, V): nodes at the same version share the arrays; the dict
        returned is the caller's."""
        V = self.version
        if since >= V:
            return {}
        memo = self._memo()
        last = self.entries[-1]
        if memo.version != V or memo.last is not last:
            memo.clear_round()
            memo.version, memo.last = V, last
        combine = combine and V - since >= 2 and (not coded or (codec is not None and codec.lossy))
        key = (since, bool(coded), codec if coded else None, combine)
        if key not in memo.payloads:
            memo.payloads[key] = self._build(since, coded, codec if coded else None, combine)
        return dict(memo.payloads[key])

    def _build(self, since: int, coded: bool, codec: codecs.Codec | None, combine: bool) -> dict[str, np.ndarray]:
        V, memo = self.version, self._memo()
        mark = codecs.CODED_MERGE if coded else ""
        span = f"{PREFIX}{since + 1}-{V}."
        one_by_one, out = set(), {}
        names = list(dict.fromkeys(n for v in range(since + 1, V + 1) for n in self.entries[v - 1]))
        for name in names:
            if not combine:
                one_by_one.add(name)
                continue
            missed = [v for v in range(since + 1, V + 1) if name in self.entries[v - 1]]
            each = sum(self._cost(v, codec)[name] for v in missed)
            m, n = self.total[name].shape
            best, form = each, None
            if 8 * m * n < best:
                best, form = 8 * m * n, BASE
            parts = [self.sent(v)[name] for v in missed]
            R = sum(p["A"].shape[0] for p in parts) if all("A" in p for p in parts) else None
            if len(missed) >= 2 and R is not None and R * (m + n) < m * n and 8 * (m + n) < best:
                dec = [self._decoded(v, codec)[name] for v in missed]
                B, A, k = lowrank.refactor_product(
                    torch.cat([torch.from_numpy(d["B"].astype(np.float64)) for d in dec], 1),
                    torch.cat([torch.from_numpy(d["A"].astype(np.float64)) for d in dec], 0))
                if 8 * k * (m + n) < best:
                    best, form = 8 * k * (m + n), (B.contiguous().numpy(), A.contiguous().numpy())
            if form is None:
                one_by_one.add(name)
            elif form == BASE:
                if name not in memo.bases:
                    a = self.total[name].numpy()  # a view of the total at V (append replaces, never modifies, it)
                    a.flags.writeable = False
                    memo.bases[name] = a
                out[span + f"{name}.{BASE}"] = memo.bases[name]
            else:
                out[span + f"{name}.B"], out[span + f"{name}.A"] = form
        for v in range(since + 1, V + 1):
            for name, parts in self.sent(v).items():
                if name in one_by_one:
                    for kind, a in parts.items():
                        out[f"{PREFIX}{v}.{name}.{mark}{kind}"] = a
        return out

    def _decoded(self, v: int, codec: codecs.Codec | None) -> dict[str, dict[str, np.ndarray]]:
        """Merge ``v`` as clients decode it (cached until the next merge; the sent arrays without a lossy codec)."""
        if codec is None or not codec.lossy:
            return self.sent(v)
        memo = self._memo()
        if v not in memo.decoded:
            memo.decoded[v] = {n: _through(codec, p)[0] for n, p in self.sent(v).items()}
        return memo.decoded[v]

    def state_dict(self) -> dict:
        return {"entries": [{k: (f.A, f.B, f.scale) for k, f in e.items()} for e in self.entries]}

    def load_state_dict(self, sd: dict, codec: codecs.Codec | None = None) -> None:
        self.entries, self.total = [], {}
        _MEMOS.pop(self, None)
        for e in sd["entries"]:
            self.append({k: LoraFactors(a, b, s) for k, (a, b, s) in e.items()}, codec)


@dataclass(frozen=True)
class Step:
    """One module's part of a payload: versions ``first``..``last`` (equal for one merge) and the float64 update,
    added to what the node holds, or (``replace``: a merged base) put in its place."""

    first: int
    last: int
    name: str
    update: torch.Tensor
    replace: bool = False


def steps(arrays: dict[str, np.ndarray]) -> list[Step]:
    """The merge keys of a payload (coded kinds already decoded) as :class:`Step`\\ s, ordered by versions."""
    parts: dict[tuple[int, int, str], dict[str, np.ndarray]] = {}
    for key, a in arrays.items():
        if not key.startswith(PREFIX):
            continue
        v, rest = key[len(PREFIX):].split(".", 1)
        first, _, last = v.partition("-")
        first, last = int(first), int(last or first)
        if not 1 <= first <= last:
            raise ValueError(f"{key}: versions {v} are not a range of merges")
        name, kind = rest.rsplit(".", 1)
        parts.setdefault((first, last, name), {})[kind.removeprefix(codecs.CODED_MERGE)] = a
    out = []
    for (first, last, name), d in sorted(parts.items(), key=lambda kv: kv[0][:2]):
        if BASE in d:
            out.append(Step(first, last, name, torch.from_numpy(np.array(d[BASE], dtype=np.float64)), True))
        else:
            out.append(Step(first, last, name, received(d)))
    return out


def parse_payload(arrays: dict[str, np.ndarray]) -> dict[int, dict[str, torch.Tensor]]:
    """{version: {module: dense update (float64)}} from a payload's one-version merge keys (coded kinds already
    decoded); a payload with combined catch-ups (``merge.<a>-<b>.…``) is read with :func:`steps`."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for s in steps(arrays):
        if s.first != s.last or s.replace:
            raise ValueError(f"merge.{s.first}-{s.last}.{s.name}: a combined catch-up; read it with merges.steps")
        out.setdefault(s.first, {})[s.name] = s.update
    return out


def apply(delta: dict[str, torch.Tensor], version: int,
          arrays: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], int]:
    """Client side: bring ``delta`` (the merged updates, version ``version``) to the payload's version: the merges and
    combined catch-ups in ``arrays`` in version order (those already held are skipped; a merged base replaces the
    module's update). :class:`OutOfSync` when the payload does not cover every version after ``version``, or adds a
    sum of versions the node holds only part of."""
    todo = []
    for s in steps(arrays):
        if s.last <= version:  # already merged (e.g. the client failed after merging last time)
            continue
        if s.first <= version and not s.replace:
            raise OutOfSync(f"merges {s.first}-{s.last} arrived as one sum while the client is at version {version}: "
                            "it holds part of them")
        todo.append(s)
    if not todo:
        return delta, version
    expect = version + 1
    for first, last in sorted({(max(s.first, version + 1), s.last) for s in todo}):
        if first > expect:
            raise OutOfSync(f"merge version {first} arrived while the client is at version {expect - 1}: "
                            f"a merge is missing")
        expect = max(expect, last + 1)
    for s in todo:
        if s.replace:
            delta[s.name] = s.update
        else:
            delta[s.name] = delta[s.name].double() + s.update if s.name in delta else s.update
    return delta, expect - 1


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
