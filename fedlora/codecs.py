"""Message codecs: how the adapter tensors of a message are encoded on the wire (``comm.up``: clients' replies,
``comm.down``: the server's payloads). Like NVIDIA FLARE's quantisation filters, a codec encodes the message's
tensors themselves (the factors and the head a node sends or receives), not a difference. FLoRA's merges into the
base go through ``comm.down`` too (keys marked ``coded_``): the server merges the decode(encode(x)) of what it sends,
which every client decodes bit for bit (the codecs are deterministic), so all bases stay the same; every other merge
goes as fp32 (:func:`applies_to`).

  fp32   exact (the default: what fedlora always sent)
  fp16   IEEE half precision (torch dtype); relative error per element <= 2^-11 (normal range)
  bf16   bfloat16 (torch dtype, sent as its 16 raw bits); relative error per element <= 2^-8
  int8   blocks of ``blocksize`` values, each scaled by its absmax to the integers -127..127 (bitsandbytes' row-wise
         quantiser of LLM.int8(), ``int8_vectorwise_quant``, on the tensor as rows of one block); error per element
         <= absmax / 254
  nf4    bitsandbytes' 4-bit NormalFloat blocks (two values a byte, one absmax per block)
  topk   the ``topk_fraction`` largest-magnitude entries of each tensor (values in fp32, indices int32); the rest 0

Blocks, scales and maps are bitsandbytes' (``int8_vectorwise_quant``/``quantize_4bit`` and their inverses) and
torch's dtypes, not arithmetic written here. An encoded tensor ``k`` is the array ``k`` (and ``k#idx`` for top-k);
the block scales and the shapes of all the message's encoded tensors travel as two message-level arrays, ``#absmax``
(float32) and ``#shape`` (int64: each tensor's ndim, then its sizes), in the sorted order of the tensors' keys. One
array per scale or shape would carry a serialization header each (Flower's arrays are ``.npy`` bytes, 128-byte
headers), which at 4 bits per value and 64 values per block cost more than the scales themselves. int8 sends the
codes of all its tensors in one array too, ``#codes`` (each tensor's values in whole blocks, the last padded with
0), with their keys, ``#keys`` (UTF-8, one a line): a server reads a message's codes as one tensor, and sums 100
clients' messages in 80 compiled calls instead of one a tensor and group, 1,280
(:func:`fedlora.compiled.message_sums`). Everything crosses the wire, so the bytes a message is counted at include
the scales, shapes and headers. :func:`decode` checks what it
reads and raises :class:`CodecError` (one sentence naming the tensor) on a malformed payload, so a bad reply is
refused, never a crash. :func:`encode_with_feedback` is error feedback: what the codec dropped is added to the next
encoding of the same tensor. No Flower here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .as_sent import AsSent, Int8Blocks, TopkEntries  # noqa: F401  (codecs.Int8Blocks: what decode returns)

CODECS = ("fp32", "fp16", "bf16", "int8", "nf4", "topk")
SEP = "#"  # in a companion's key: <tensor key>#idx (top-k), and the message-level arrays #absmax, #shape, ...
ABSMAX, SHAPES = SEP + "absmax", SEP + "shape"  # every encoded tensor's block scales / shapes, in sorted key order
KEYS, CODES = SEP + "keys", SEP + "codes"  # int8: the tensors' keys (sorted), and all their codes in one array


class CodecError(ValueError):
    """A payload that does not decode under the configured codec (the message says which tensor and why)."""


@dataclass(frozen=True)
class Codec:
    """A codec and its parameters (``comm.up``/``comm.down``, ``comm.topk_fraction``, ``comm.blocksize``)."""

    name: str = "fp32"
    topk_fraction: float = 0.1
    blocksize: int = 64

    def __post_init__(self):
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}: one of {', '.join(CODECS)}")

    @property
    def lossy(self) -> bool:
        return self.name != "fp32"


def of_config(cfg, direction: str) -> Codec:
    """The codec of ``direction`` ("up" or "down") in a run config (fp32 when it has no ``comm`` section)."""
    comm = cfg.get("comm") or {}
    return Codec(str(comm.get(direction, "fp32")), float(comm.get("topk_fraction", 0.1)),
                 int(comm.get("blocksize", 64)))


#: the kind prefix of a merge array that a codec encodes (``merge.<v>.<module>.coded_A``, ``coded_B``, ``coded_dense``)
CODED_MERGE = "coded_"


def applies_to(key: str) -> bool:
    """Whether a message key is a tensor a codec encodes: the adapter's factors and head, and the merges the server
    marked coded (FLoRA with a lossy ``comm.down``: its :class:`fedlora.merges.MergeLog` merges decode(encode(x)) of
    each array x it sends, exactly what every client decodes). Every other merge (FedEx-LoRA's, FedPipe's) goes as
    fp32: a merge must reach every base as the server merged it for the bases to stay in sync."""
    return (key.endswith((".lora_A", ".lora_B")) or key.startswith("extra.")
            or (key.startswith("merge.") and key.rsplit(".", 1)[-1].startswith(CODED_MERGE)))


def _bnb():
    import bitsandbytes.functional as F

    return F


def _int8_pack(keys: list[str], arrays: dict[str, np.ndarray], blocksize: int, compiled: bool = False
               ) -> dict[str, np.ndarray]:
    """The int8 arrays of the tensors ``keys`` (sorted) of ``arrays``: each tensor as rows of one block (a view, or
    its last block padded with zeros) through bitsandbytes' row-wise absmax quantiser, its codes and scales written
    into the message's ``#codes`` and ``#absmax`` (``compiled``: the quantiser's arithmetic compiled in one pass,
    :func:`fedlora.compiled.int8_quantise`, writing there itself; the same bits). A tensor at a time, not the whole
    message in one call: a message-sized float32 copy is fresh memory (above glibc's mmap threshold) each time, 2.5x
    slower for Llama-7B-shaped adapters. An all-zero block has absmax 0 and codes 0 (the quantiser would divide 0 by
    0)."""
    xs = [torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)).view(-1) for k in keys]
    blocks = [-(-x.numel() // blocksize) for x in xs]
    codes, absmax = torch.empty(sum(blocks), blocksize, dtype=torch.int8), torch.empty(sum(blocks))
    if compiled:
        from .compiled import int8_quantise
    at = 0
    for x, b in zip(xs, blocks):
        if not b:  # (an empty tensor: no blocks, nothing to quantise)
            continue
        rows = (x if x.numel() == b * blocksize else torch.nn.functional.pad(x, (0, b * blocksize - x.numel()))
                ).view(b, blocksize)
        if compiled:
            int8_quantise(rows, codes[at:at + b], absmax[at:at + b])
        else:
            q, scale, _ = _bnb().int8_vectorwise_quant(rows)
            if not scale.all():  # (a boolean index costs as much as the quantiser: only where a block is zero)
                q[scale == 0] = 0
            codes[at:at + b], absmax[at:at + b] = q, scale
        at += b
    return {KEYS: _key_array(keys), CODES: codes.view(-1).numpy(), ABSMAX: absmax.numpy(),
            SHAPES: _shape_array([arrays[k].shape for k in keys])}


def _largest(x: np.ndarray, kept: int) -> np.ndarray:
    """The ascending indices of the ``kept`` entries of largest magnitude of the flat ``x`` (of equal magnitudes at
    the cut, the first): the kept-th largest magnitude by a selection (``np.partition``), then the entries at or
    above it in index order, less the last of those equal to it where too many are. 0.45 ms for 65,536 values at
    10% where ``torch.topk`` and a sort of its indices took 0.7 ms. A tensor with a NaN goes through ``torch.topk``,
    which keeps the NaN (the server then refuses the update as not finite)."""
    a = np.abs(x)
    if kept in (0, a.size) or np.isnan(a[np.argmax(a)]):
        if kept == a.size:
            return np.arange(a.size)
        return np.sort(torch.topk(torch.from_numpy(a), kept, sorted=False).indices.numpy())
    cut = np.partition(a, a.size - kept)[a.size - kept]
    idx = np.flatnonzero(a >= cut)
    if idx.size > kept:  # more entries equal to the cut than fit: the last of them go
        ties = np.flatnonzero(a[idx] == cut)
        idx = np.delete(idx, ties[ties.size - (idx.size - kept):])
    return idx


def _key_array(keys: list[str]) -> np.ndarray:
    """The ``#keys`` array: the tensors' keys in sorted order, UTF-8, one a line."""
    return np.frombuffer("\n".join(keys).encode(), np.uint8).copy()


def _shape_array(shapes: list) -> np.ndarray:
    """The ``#shape`` array: each tensor's ndim, then its sizes."""
    return np.asarray([d for s in shapes for d in (len(s), *s)], dtype=np.int64)


def encode(codec: Codec, arrays: dict[str, np.ndarray], compiled: bool = False) -> dict[str, np.ndarray]:
    """``arrays`` (float tensors) as the codec sends them; keys :func:`applies_to` rejects pass unchanged.
    ``compiled``: int8 through the compiled quantiser (``server.compile``; the same bits)."""
    if codec.name == "fp32":
        return dict(arrays)
    coded = sorted(k for k in arrays if applies_to(k))
    if codec.name == "int8":
        return {**{k: v for k, v in arrays.items() if not applies_to(k)},
                **_int8_pack(coded, arrays, codec.blocksize, compiled)}
    out, scales, shapes = dict(arrays), [], []
    for k in coded:
        x = torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32))
        if codec.name == "fp16":
            out[k] = x.half().numpy()
        elif codec.name == "bf16":
            out[k] = x.bfloat16().view(torch.int16).numpy()
        elif codec.name == "nf4":
            q, state = _bnb().quantize_4bit(x.flatten(), blocksize=codec.blocksize, quant_type="nf4")
            out[k] = q.flatten().numpy()
            scales.append(state.absmax.float().numpy())
            shapes.append(x.shape)
        else:  # topk
            flat = x.flatten()
            kept = min(flat.numel(), max(1, math.ceil(codec.topk_fraction * flat.numel()))) if flat.numel() else 0
            idx = _largest(flat.numpy(), kept)
            out[k], out[k + SEP + "idx"] = flat.numpy()[idx], idx.astype(np.int32)
            shapes.append(x.shape)
    if codec.name == "nf4":
        out[ABSMAX] = np.concatenate(scales).astype(np.float32) if scales else np.zeros(0, np.float32)
    if codec.name in ("nf4", "topk"):
        out[SHAPES] = _shape_array(shapes)
    return out


def _want(enc: dict, key: str, dtype, what: str, codec: Codec, tensor: str | None = None) -> np.ndarray:
    a = enc.get(key)
    if a is None:
        raise CodecError(f"{tensor or key.split(SEP)[0]}: the {codec.name} payload lacks its {what} ({key})")
    if a.dtype != dtype or (SEP in key and a.ndim != 1):
        raise CodecError(f"{tensor + ': ' if tensor else ''}{key} is {a.dtype} of shape {a.shape} where the "
                         f"{codec.name} codec sends {np.dtype(dtype)}" + (" in one dimension" if SEP in key else ""))
    return a


class _Stream:
    """A cursor over a message-level companion (``#absmax`` or ``#shape``): each encoded tensor, in sorted key
    order, takes its part; what is left over at the end is an error too."""

    def __init__(self, enc: dict, key: str, dtype, what: str, codec: Codec, first: str):
        self.a, self.at, self.key, self.what = _want(enc, key, dtype, what, codec, first), 0, key, what

    def take(self, k: str, n: int) -> np.ndarray:
        if self.at + n > len(self.a):
            raise CodecError(f"{k}: {self.key} ends after {len(self.a)} values, before this tensor's {self.what} "
                             f"(values {self.at}..{self.at + n - 1})")
        self.at += n
        return self.a[self.at - n:self.at]

    def done(self, last: str) -> None:
        if self.at != len(self.a):
            raise CodecError(f"{last}: {self.key} holds {len(self.a)} values where the payload's tensors (the last "
                             f"in key order is this one) take {self.at}")


def _shapes(enc: dict, codec: Codec, keys: list[str]) -> list[tuple[int, ...]]:
    """The shape of each tensor ``keys`` names, in order, from the message's ``#shape`` (read as one list: a few
    Python operations a tensor)."""
    first = keys[0] if keys else "the payload"
    v, at, out = _want(enc, SHAPES, np.int64, "shapes", codec, first).tolist(), 0, []
    for k in keys:
        ndim = v[at] if at < len(v) else None
        if ndim is None or at + 1 + ndim > len(v):
            raise CodecError(f"{k}: {SHAPES} ends after {len(v)} values, before this tensor's shape (from value {at})")
        if not 0 <= ndim <= 4:
            raise CodecError(f"{k}: {ndim} dimensions in {SHAPES} (a tensor has 0 to 4)")
        s = v[at + 1:at + 1 + ndim]
        if s and (min(s) < 0 or max(s) > 2**31):
            raise CodecError(f"{k}: shape {s} is not a tensor shape")
        out.append(tuple(s))
        at += 1 + ndim
    if at != len(v):
        raise CodecError(f"{keys[-1] if keys else first}: {SHAPES} holds {len(v)} values where the payload's tensors "
                         f"(the last in key order is this one) take {at}")
    return out


def _keys(enc: dict, codec: Codec) -> list[str]:
    """The tensors' keys from the message's ``#keys``: UTF-8, distinct, sorted, each a tensor the codec encodes and
    not also sent as an array of its own."""
    a = _want(enc, KEYS, np.uint8, "tensor keys", codec, "the payload")
    try:
        keys = bytes(a).decode("utf-8").split("\n") if a.size else []
    except UnicodeDecodeError:
        raise CodecError(f"the {codec.name} payload's {KEYS} is not UTF-8 text") from None
    bad = next((k for k in keys if SEP in k or k in enc or not applies_to(k)), None)
    if bad is not None:
        raise CodecError(f"{bad!r} in the {codec.name} payload's {KEYS} is not an adapter tensor it encodes (or is "
                         f"also sent as an array of its own)")
    if any(x >= y for x, y in zip(keys, keys[1:])):
        raise CodecError(f"the {codec.name} payload's {KEYS} are not distinct and sorted ({keys[0]}, ...)")
    return keys


class _Scales(_Stream):
    """The ``#absmax`` stream, checked in one pass (finite and >= 0) and copied once into a torch tensor, of which
    each tensor takes a view: a message's 128 tensors cost one check, not 128."""

    def __init__(self, enc: dict, codec: Codec, first: str):
        super().__init__(enc, ABSMAX, np.float32, "block scales", codec, first)
        bad = np.flatnonzero(~np.isfinite(self.a) | (self.a < 0))
        self.first_bad = int(bad[0]) if len(bad) else len(self.a)
        self.t = torch.from_numpy(self.a.copy())
        self.col = self.t.unsqueeze(1)

    def check(self, k: str, n: int, codec: Codec) -> int:
        """Take the block scales of tensor ``k`` of ``n`` values; where they start."""
        lo, blocks = self.at, -(-n // codec.blocksize)
        if lo + blocks > len(self.a) or lo <= self.first_bad < lo + blocks:
            self.take(k, blocks)  # (raises: past the end)
            raise CodecError(f"{k}: its {blocks} block scales in {ABSMAX} are not all finite and >= 0")
        self.at = lo + blocks
        return lo

    def absmax(self, k: str, n: int, codec: Codec) -> torch.Tensor:
        lo = self.check(k, n, codec)
        return self.t[lo:lo + math.ceil(n / codec.blocksize)]


#: the codecs whose values are those of a torch dtype (widening them to float32 is exact)
WIRE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


_SENT_AS = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.int16)}

#: the codecs whose replies a summing server reads as sent (``decode(..., wide=False)``), not decoded to float32
AS_SENT = (*WIRE_DTYPES, "int8", "topk")


def as_sent(a) -> bool:
    """Whether ``a`` is a reply's tensor as :func:`decode` leaves it with ``wide=False`` (a 16-bit torch tensor, whose
    values are the decoded ones, :class:`Int8Blocks` or :class:`TopkEntries`) rather than float32."""
    return isinstance(a, AsSent) or (isinstance(a, torch.Tensor) and a.dtype in WIRE_DTYPES.values())


def decode(codec: Codec, enc: dict[str, np.ndarray], wide: bool = True) -> dict[str, np.ndarray | torch.Tensor]:
    """The float32 tensors an encoded message carries (inverse of :func:`encode`). A missing or extra companion,
    a wrong dtype, size or index raises :class:`CodecError` naming the tensor.

    ``wide=False``: fp16 and bf16 tensors come back as torch tensors of their dtype (:data:`WIRE_DTYPES`) on the
    payload's own bytes, the same values without a float32 copy, and int8 tensors as :class:`Int8Blocks` (codes and
    scales as sent, on the message's ``#codes``), and top-k tensors as :class:`TopkEntries` (the kept entries). A
    server whose aggregation only takes weighted sums reads them so (:attr:`fedlora.strategies.base.LoraStrategy.
    sums_replies`: each value widened once, in cache, as the float32 sum reads it; top-k's values added at their
    indices), which is what keeps a 16-bit, int8 or top-k uplink cheaper than fp32 on the server. nf4 decodes to
    float32 either way."""
    if codec.name == "fp32":
        return dict(enc)
    if codec.name == "int8":
        return _int8_unpack(codec, enc, wide)
    coded = sorted(k for k in enc if SEP not in k and applies_to(k))
    first, last = (coded[0], coded[-1]) if coded else ("the payload", "the payload")
    streams = {ABSMAX: codec.name == "nf4", SHAPES: codec.name in ("nf4", "topk")}
    for k in enc:
        if k in streams:
            if not streams[k]:
                raise CodecError(f"{first}: {k} in a {codec.name} payload, which sends none")
        elif SEP in k and (k.split(SEP, 1)[0] not in enc or not k.endswith(SEP + "idx") or codec.name != "topk"):
            raise CodecError(f"{k}: a companion array without its tensor {k.split(SEP, 1)[0]} under {codec.name}")
    scales = _Scales(enc, codec, first) if streams[ABSMAX] else None
    shapes = dict(zip(coded, _shapes(enc, codec, coded))) if streams[SHAPES] else None
    out = {k: v for k, v in enc.items() if SEP not in k}
    for k in coded:
        if codec.name in WIRE_DTYPES:  # (the lean path of a summing server: a few Python calls a tensor)
            a = enc[k]
            if a.dtype is not _SENT_AS[codec.name]:
                a = _want(enc, k, _SENT_AS[codec.name], "values", codec)  # (raises unless an equal dtype object)
            a = a if a.flags.writeable else a.copy()
            # through torch: numpy's float16 -> float32 is slow, and it has no bfloat16
            x = torch.from_numpy(a) if codec.name == "fp16" else torch.from_numpy(a).view(torch.bfloat16)
            if not wide:
                out[k] = x
                continue
            x = x.float()
        elif codec.name == "nf4":
            shape = shapes[k]
            n = math.prod(shape)
            q = torch.from_numpy(_want(enc, k, np.uint8, "values", codec).copy())
            if q.shape != ((n + 1) // 2,):
                raise CodecError(f"{k}: {q.numel()} bytes of 4-bit values for a tensor of {n} (want {(n + 1) // 2})")
            F = _bnb()
            state = F.QuantState(absmax=scales.absmax(k, n, codec), shape=torch.Size([n]),
                                 blocksize=codec.blocksize, code=F.get_4bit_type("nf4", device="cpu"), quant_type="nf4",
                                 dtype=torch.float32)
            x = F.dequantize_4bit(q.reshape(-1, 1), state).reshape(shape) if n else torch.zeros(shape)
        else:  # topk
            shape = shapes[k]
            n = math.prod(shape)
            vals = _want(enc, k, np.float32, "values", codec)
            idx = _want(enc, k + SEP + "idx", np.int32, "indices", codec)
            if vals.shape != idx.shape or vals.ndim != 1 or (idx.size and (idx[0] < 0 or idx[-1] >= n)) \
                    or not (idx[1:] > idx[:-1]).all():  # (ascending: distinct in O(k), where np.unique sorted)
                raise CodecError(f"{k}: {idx.size} indices and {vals.size} values do not place distinct entries in "
                                 f"ascending order in a tensor of {n}")
            x = TopkEntries(torch.from_numpy(idx if idx.flags.writeable else idx.copy()),
                            torch.from_numpy(vals if vals.flags.writeable else vals.copy()), shape)
            if not wide:
                out[k] = x
                continue
            x = x.float()
        out[k] = x.numpy()
    if scales is not None:
        scales.done(last)
    return out


def _int8_unpack(codec: Codec, enc: dict[str, np.ndarray], wide: bool) -> dict[str, np.ndarray | Int8Blocks]:
    """:func:`decode` of an int8 message: its tensors' keys (``#keys``) and shapes (``#shape``) place each tensor's
    blocks in ``#codes`` and ``#absmax``; ``wide=False``: each tensor as :class:`Int8Blocks` on the message's codes,
    else each tensor's blocks dequantised by bitsandbytes."""
    for k in enc:
        if SEP in k and k not in (KEYS, CODES, ABSMAX, SHAPES):
            raise CodecError(f"{k}: an array the int8 codec does not send")
        if SEP not in k and applies_to(k):
            raise CodecError(f"{k}: an adapter tensor outside {CODES} in an int8 payload")
    keys = _keys(enc, codec)
    shapes = _shapes(enc, codec, keys)
    first, bs = keys[0] if keys else "the payload", codec.blocksize
    codes = _want(enc, CODES, np.int8, "codes", codec, first)
    scales = _Scales(enc, codec, first)
    sizes = [math.prod(s) for s in shapes]
    blocks = [-(-n // bs) for n in sizes]
    if codes.size != sum(blocks) * bs:
        raise CodecError(f"{first}: {CODES} holds {codes.size} codes where the payload's {len(keys)} tensors take "
                         f"{sum(blocks)} blocks of {bs}")
    rows = torch.from_numpy(codes if codes.flags.writeable else codes.copy()).view(-1, bs)
    out, place = {k: v for k, v in enc.items() if SEP not in k}, []
    for k, n, b in zip(keys, sizes, blocks):
        lo = scales.check(k, n, codec)  # (where its blocks start)
        if n % bs and rows[lo + b - 1, n % bs:].any():
            raise CodecError(f"{k}: the padding of its last block in {CODES} is not 0")
        place.append(lo)
    scales.done(keys[-1] if keys else first)
    if not wide:
        out.update((k, Int8Blocks(rows, scales.col, lo, b, s)) for k, lo, b, s in zip(keys, place, blocks, shapes))
        return out
    dequant = _bnb().int8_vectorwise_dequant  # (a tensor at a time: its output stays in memory malloc reuses)
    out.update((k, dequant(rows[lo:lo + b], scales.t[lo:lo + b]).view(-1)[:n].view(s).numpy())
               for k, lo, b, n, s in zip(keys, place, blocks, sizes, shapes))
    return out


def _sq(x: np.ndarray) -> float:
    """sum of squares: a float32 dot product (BLAS; 17 us for 64k values, where a float64 copy took 95), in float64
    where float32 would overflow."""
    flat = np.ravel(x)
    got = float(np.dot(flat, flat))
    return got if math.isfinite(got) else float(np.sum(flat.astype(np.float64) ** 2))


def relative_error(true: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> float:
    """||sent - true|| / ||true|| over every tensor of ``true`` (0 when ``true`` is 0), to float32's precision."""
    num = sum(_sq(np.asarray(sent[k], np.float32) - np.asarray(v, np.float32)) for k, v in true.items())
    den = sum(_sq(np.asarray(v, np.float32)) for v in true.values())
    return math.sqrt(num / den) if den > 0 else 0.0


def encode_with_feedback(codec: Codec, arrays: dict[str, np.ndarray], residual: dict[str, np.ndarray]
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Error feedback (Seide et al. 2014; Karimireddy et al., ICML 2019): encode ``arrays + residual`` and keep what
    the codec dropped, ``arrays + residual - decode(encoded)``, as the next residual, so the sum of what is sent over
    rounds tracks the sum of the true tensors within one residual. Returns ``(encoded, new residual, relative error
    of this message)``. A residual whose shape no longer matches its tensor is dropped; the new residual holds the
    tensors of ``arrays`` the codec encodes (bounded by one message's size)."""
    target = {k: (v + residual[k] if k in residual and residual[k].shape == v.shape and applies_to(k) else v)
              for k, v in arrays.items()}
    enc = encode(codec, target)
    sent = decode(codec, enc)
    new = {k: (target[k] - sent[k]).astype(np.float32) for k in target if applies_to(k)} if codec.lossy else {}
    return enc, new, relative_error({k: v for k, v in arrays.items() if applies_to(k)}, sent)
