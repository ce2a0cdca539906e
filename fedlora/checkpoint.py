"""Checkpoints of a run, written by the server after every round: atomically (temp file, fsync, rename, directory
fsync), with a SHA-256 checksum, and the previous good checkpoint kept beside the newest. A run killed at any point
(even SIGKILL) loses at most the round in progress; a truncated or corrupted file is detected on resume and the
previous good checkpoint is used instead.

Reading a checkpoint runs no code: tensors are stored in safetensors, everything else as JSON, and the only objects
rebuilt are the types listed here (:data:`CLASSES`, ``random.Random``), chosen by a fixed tag, never by a class path
read from the file. Checkpoints of older fedlora versions (pickles, ``checkpoint.pt``) are refused.

One file, ``checkpoint.fedlora``::

    FEDLORA-CKPT2\\n
    <SHA-256 of the rest, hex> <length of the JSON> <length of the safetensors>\\n
    <JSON><safetensors>

In the JSON, null, booleans, ints, floats, strings, lists and objects with string keys stand for themselves; every
other value is an object whose key ``"$"`` names its type: ``tuple``, ``set``, ``frozenset``, ``dict`` (keys that
are not strings, as pairs), ``bytes``, ``tensor`` (a key of the safetensors), ``ndarray`` / ``npscalar`` (dtype,
shape and the raw bytes as a uint8 tensor), ``Random`` and the classes of :data:`CLASSES`. An object reached twice
(e.g. a dict two adapters share) is written once as an ``anchor`` and then as a ``ref``, so it stays shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .adapters import AdapterState, LoraFactors
from .merges import MergeLog

NAME, PREV = "checkpoint.fedlora", "checkpoint.prev.fedlora"
OLD_NAMES = ("checkpoint.pt", "checkpoint.prev.pt")  # pickles written by fedlora before this format
MAGIC, OLD_MAGIC = b"FEDLORA-CKPT2\n", b"FEDLORA-CKPT1\n"
#: the only classes a checkpoint rebuilds (without calling their ``__init__``), with the attributes saved for them.
#: A class may also name, in ``TRANSIENT``, attributes it keeps only in memory (caches): they are not saved, and a
#: rebuilt object gets them as None.
CLASSES = {"AdapterState": (AdapterState, ("lora", "extra")), "LoraFactors": (LoraFactors, ("A", "B", "scale")),
           "MergeLog": (MergeLog, ("entries", "total"))}
_TAG_OF = {cls: tag for tag, (cls, _) in CLASSES.items()}
_HEAD = re.compile(rb"([0-9a-f]{64}) ([0-9]{1,15}) ([0-9]{1,15})\n")
_NUMPY_DTYPE = re.compile(r"[<>|=][biufc][0-9]{1,2}")  # bool, int, uint, float, complex: never object dtypes


class CheckpointError(RuntimeError):
    """No usable checkpoint (one sentence)."""


class Corrupt(ValueError):
    """This file is not an intact checkpoint (truncated, corrupted, malformed, or not this format): the only error
    that makes :func:`load` fall back to the previous checkpoint."""


# ------------------------------------------------------------------------------------------------ writing
class _Encoder:
    """Payload -> JSON tree, with the tensors (and numpy arrays' bytes) collected in ``tensors``. Run twice: the
    counting pass (``shared=None``) finds the objects reached more than once; the second writes them as anchors."""

    def __init__(self, shared: set[int] | None = None):
        self.counting = shared is None
        self.shared = shared or set()
        self.seen: dict[int, int] = {}  # counting: id -> times reached; writing: id -> anchor number
        self.alive: list = []  # keeps every object counted alive, so that no id is reused
        self.open: set[int] = set()
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, obj):
        kind = type(obj)
        if obj is None or kind in (bool, int, float, str):
            return obj
        if kind is tuple:  # immutable: an equal tuple is as good as the same one
            return {"$": "tuple", "items": [self(x) for x in obj]}
        key = id(obj)
        if self.counting:
            self.alive.append(obj)
            self.seen[key] = self.seen.get(key, 0) + 1
            return self._node(obj) if self.seen[key] == 1 else None
        if key in self.seen:
            return {"$": "ref", "id": self.seen[key]}
        if key in self.open:
            raise TypeError(f"cannot checkpoint a {kind.__name__} that contains itself")
        self.open.add(key)
        node = self._node(obj)
        self.open.discard(key)
        if key not in self.shared:
            return node
        self.seen[key] = len(self.seen)
        return {"$": "anchor", "id": self.seen[key], "value": node}

    def _node(self, obj):
        kind = type(obj)
        if kind is list:
            return [self(x) for x in obj]
        if kind is dict:
            if "$" not in obj and all(type(k) is str for k in obj):
                return {k: self(v) for k, v in obj.items()}
            return {"$": "dict", "pairs": [[self(k), self(v)] for k, v in obj.items()]}
        if kind in (set, frozenset):
            return {"$": kind.__name__, "items": [self(x) for x in obj]}
        if kind is bytes:
            return {"$": "bytes", "hex": obj.hex()}
        if kind is torch.Tensor:
            return {"$": "tensor", "key": self._store(lambda: obj.detach().cpu().contiguous().clone())}
        if kind is np.ndarray or isinstance(obj, np.generic):
            arr = np.asarray(obj)
            if arr.dtype.kind not in "biufc":
                raise TypeError(f"cannot checkpoint a numpy value of dtype {arr.dtype} (numbers and booleans only)")
            key = self._store(lambda: torch.from_numpy(np.frombuffer(arr.tobytes(), dtype=np.uint8).copy()))
            return {"$": "ndarray" if kind is np.ndarray else "npscalar", "dtype": arr.dtype.str,
                    "shape": list(arr.shape), "key": key}
        if kind is random.Random:
            return {"$": "Random", "state": self(obj.getstate())}
        if kind in _TAG_OF:
            tag = _TAG_OF[kind]
            attrs = CLASSES[tag][1]
            if set(vars(obj)) - set(getattr(kind, "TRANSIENT", ())) != set(attrs):
                raise TypeError(f"cannot checkpoint a {tag} with attributes {sorted(vars(obj))}: "
                                f"fedlora.checkpoint.CLASSES saves {list(attrs)}")
            return {"$": tag, "attrs": {a: self(getattr(obj, a)) for a in attrs}}
        raise TypeError(f"cannot checkpoint a {kind.__module__}.{kind.__qualname__}: a checkpoint holds JSON values, "
                        f"tuples, sets, dicts, bytes, tensors, numpy numbers, random.Random and {sorted(CLASSES)} "
                        f"(fedlora.checkpoint.CLASSES)")

    def _store(self, make) -> str:
        key = f"t{len(self.tensors)}"
        if not self.counting:
            self.tensors[key] = make()
        return key


def encode(payload) -> bytes:
    """The bytes of a checkpoint file holding ``payload`` (TypeError for a value the format cannot hold)."""
    counter = _Encoder()
    counter(payload)
    writer = _Encoder(shared={k for k, n in counter.seen.items() if n > 1})
    doc = json.dumps(writer(payload), separators=(",", ":")).encode()
    tensors = safetensors_save(writer.tensors)
    body = doc + tensors
    return MAGIC + b"%s %d %d\n" % (hashlib.sha256(body).hexdigest().encode(), len(doc), len(tensors)) + body


def save(run_dir: Path, payload: dict) -> Path:
    """Write ``payload`` as the newest checkpoint of ``run_dir``; an intact newest one becomes the previous."""
    run_dir = Path(run_dir)
    blob = encode(payload)
    tmp = run_dir / (NAME + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    cur = run_dir / NAME
    if _intact(cur):  # an unusable newest (the one load fell back from) must not replace the good previous one
        os.replace(cur, run_dir / PREV)
    os.replace(tmp, cur)
    dfd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return cur


# ------------------------------------------------------------------------------------------------ reading
def _unpack(blob: bytes) -> tuple[bytes, bytes]:
    """(JSON, safetensors) of a checkpoint file whose header and checksum are right."""
    if blob.startswith(OLD_MAGIC):
        raise Corrupt("written by an older fedlora as a pickle, which cannot be loaded safely")
    if not blob.startswith(MAGIC):
        raise Corrupt("not a fedlora checkpoint")
    head = _HEAD.match(blob, len(MAGIC))
    if head is None:
        raise Corrupt("malformed header (truncated or corrupted)")
    digest, n_doc, n_tensors = head.group(1).decode(), int(head.group(2)), int(head.group(3))
    body = blob[head.end():]
    if len(body) != n_doc + n_tensors:
        raise Corrupt(f"checksum mismatch: {len(body)} bytes where the header says {n_doc + n_tensors} "
                      f"(truncated or corrupted)")
    if hashlib.sha256(body).hexdigest() != digest:
        raise Corrupt("checksum mismatch (corrupted)")
    return body[:n_doc], body[n_doc:]


def _intact(path: Path) -> bool:
    try:
        _unpack(path.read_bytes())
    except (Corrupt, FileNotFoundError):
        return False
    return True


class _Decoder:
    """JSON tree -> payload, with the tensors of the file; :class:`Corrupt` for anything it does not know."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.anchors: dict[int, object] = {}

    def __call__(self, node):
        kind = type(node)
        if node is None or kind in (bool, int, float, str):
            return node
        if kind is list:
            return [self(x) for x in node]
        if "$" not in node:
            return {k: self(v) for k, v in node.items()}
        tag = node["$"]
        if type(tag) is str and tag in self.BUILDERS:
            return self.BUILDERS[tag](self, node)
        if type(tag) is str and tag in CLASSES:
            return self._rebuild(tag, node)
        raise Corrupt(f"unknown type tag {str(tag)[:60]!r} (a checkpoint rebuilds only JSON values, tensors, numpy "
                      f"numbers, tuples, sets, dicts, bytes, random.Random and {sorted(CLASSES)})")

    @staticmethod
    def _parts(node: dict, **kinds):
        """The fields of ``node``, exactly those of ``kinds`` (name -> JSON type, None: any), in that order."""
        if set(node) != {"$", *kinds} or any(t is not None and type(node[k]) is not t for k, t in kinds.items()):
            raise Corrupt(f"malformed {node['$']!r} entry")
        return [node[k] for k in kinds]

    def _build_tuple(self, node):
        (items,) = self._parts(node, items=list)
        return tuple(self(x) for x in items)

    def _build_set(self, node, kind=set):
        (items,) = self._parts(node, items=list)
        items = [self(x) for x in items]
        try:
            return kind(items)
        except TypeError:  # an unhashable member
            raise Corrupt(f"malformed {node['$']!r} entry") from None

    def _build_frozenset(self, node):
        return self._build_set(node, kind=frozenset)

    def _build_dict(self, node):
        (pairs,) = self._parts(node, pairs=list)
        if any(type(p) is not list or len(p) != 2 for p in pairs):
            raise Corrupt("malformed 'dict' entry")
        items = [(self(k), self(v)) for k, v in pairs]
        try:
            return dict(items)
        except TypeError:  # an unhashable key
            raise Corrupt("malformed 'dict' entry") from None

    def _build_bytes(self, node):
        (text,) = self._parts(node, hex=str)
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise Corrupt("malformed 'bytes' entry") from None

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise Corrupt(f"tensor {key!r} is missing from the file")
        return self.tensors[key]

    def _build_tensor(self, node):
        (key,) = self._parts(node, key=str)
        return self._tensor(key)

    def _build_ndarray(self, node):
        dtype, shape, key = self._parts(node, dtype=str, shape=list, key=str)
        if not _NUMPY_DTYPE.fullmatch(dtype) or any(type(d) is not int or d < 0 for d in shape):
            raise Corrupt(f"malformed {node['$']!r} entry")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise Corrupt(f"malformed {node['$']!r} entry (dtype {dtype!r})") from None
        raw = self._tensor(key)
        if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != int(np.prod(shape)) * dtype.itemsize:
            raise Corrupt(f"malformed {node['$']!r} entry (its bytes do not match dtype and shape)")
        return np.frombuffer(raw.numpy().tobytes(), dtype=dtype).reshape(shape).copy()

    def _build_npscalar(self, node):
        if node.get("shape") != []:
            raise Corrupt("malformed 'npscalar' entry")
        return self._build_ndarray(node)[()]

    def _build_Random(self, node):
        (state,) = self._parts(node, state=dict)
        rng = random.Random()
        try:
            rng.setstate(self(state))
        except (TypeError, ValueError):
            raise Corrupt("malformed 'Random' entry") from None
        return rng

    def _build_anchor(self, node):
        number, value = self._parts(node, id=int, value=None)
        if number in self.anchors:
            raise Corrupt(f"object {number} is anchored twice")
        self.anchors[number] = self(value)
        return self.anchors[number]

    def _build_ref(self, node):
        (number,) = self._parts(node, id=int)
        if number not in self.anchors:
            raise Corrupt(f"reference to an unknown object {number}")
        return self.anchors[number]

    def _rebuild(self, tag: str, node):
        """An object of an allowed class, from its saved attributes (its ``__init__`` is not called)."""
        cls, names = CLASSES[tag]
        (attrs,) = self._parts(node, attrs=dict)
        if set(attrs) != set(names):
            raise Corrupt(f"malformed {tag!r} entry (attributes {sorted(attrs)}, expected {list(names)})")
        obj = cls.__new__(cls)
        vars(obj).update({a: None for a in getattr(cls, "TRANSIENT", ())})
        vars(obj).update({a: self(v) for a, v in attrs.items()})
        return obj

    BUILDERS = {"tuple": _build_tuple, "set": _build_set, "frozenset": _build_frozenset, "dict": _build_dict,
                "bytes": _build_bytes, "tensor": _build_tensor, "ndarray": _build_ndarray,
                "npscalar": _build_npscalar, "Random": _build_Random, "anchor": _build_anchor, "ref": _build_ref}


def _decode(tree, tensors: dict[str, torch.Tensor]):
    """The payload of a parsed checkpoint (JSON tree and its tensors)."""
    try:
        return _Decoder(tensors)(tree)
    except RecursionError:
        raise Corrupt("nested too deeply") from None


def decode(blob: bytes):
    """The payload of a checkpoint file's bytes; :class:`Corrupt` for anything but an intact checkpoint."""
    doc, raw = _unpack(blob)
    try:
        tree = json.loads(doc.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an int too long, nested too deeply
        raise Corrupt(f"malformed JSON ({str(e)[:200]})") from None
    try:
        tensors = {k: t.clone() for k, t in safetensors_load(raw).items()}
    except (SafetensorError, KeyError, AssertionError) as e:  # bad header, unknown dtype, bad sizes
        raise Corrupt(f"malformed safetensors ({e})") from None
    return _decode(tree, tensors)


def read(path: Path):
    """The payload of one checkpoint file (:class:`Corrupt` if it is not intact)."""
    return decode(Path(path).read_bytes())


def load(run_dir: Path, warn=print) -> dict:
    """The newest intact checkpoint of ``run_dir`` (falls back to the previous one, saying why). Only a file that is
    not intact (:class:`Corrupt`) falls back; any other error is a bug and propagates."""
    run_dir = Path(run_dir)
    errors = []
    for name in (NAME, PREV):
        path = run_dir / name
        if not path.exists():
            errors.append(f"{name} missing")
            continue
        try:
            payload = read(path)
            if type(payload) is not dict:
                raise Corrupt("its payload is not a dict")
            return payload
        except Corrupt as e:
            errors.append(f"{name}: {e}")
            if name == NAME:
                warn(f"warning: {path} is unusable ({e}); trying the previous checkpoint.")
    old = [run_dir / n for n in OLD_NAMES if (run_dir / n).exists()]
    if old and not any((run_dir / n).exists() for n in (NAME, PREV)):
        raise CheckpointError(f"{old[0]} was written by an older fedlora as a pickle and cannot be resumed safely "
                              f"(loading it could run code): start a new run instead.")
    raise CheckpointError(f"no usable checkpoint in {run_dir} ({'; '.join(errors)}): start a new run instead.")
