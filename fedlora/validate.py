"""Server-side checks of what a node sends before the server uses it: a handshake (:func:`check_handshake`),
the metrics of a reply (:func:`check_metrics`, :func:`check_train_metrics`) and its update
(:func:`check_update`). Pure functions, each answering ``None`` or one sentence; the callers leave out (and
record) whatever they reject."""

from __future__ import annotations

import math

import numpy as np
import torch

from .as_sent import AsSent
from .codecs import as_sent


def is_number(value) -> bool:
    """A finite real number (not a bool, a string or a list)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and math.isfinite(value))


def check_count(key: str, value, minimum: int) -> str | None:
    """``None`` when ``value`` is a whole number >= ``minimum``, else why not (naming ``key``)."""
    if not is_number(value) or int(value) != value:
        return f"{key} {value!r} is not an integer"
    if value < minimum:
        return f"{key} {int(value)} is below {minimum}"
    return None


#: optional metrics the server reads when present: whole numbers (key -> smallest value), finite numbers, integers
OPTIONAL_COUNTS = {"base-version": 0, "device-memory": 0}
OPTIONAL_NUMBERS = ("base-digest", "codec_error")
OPTIONAL_INTEGERS = ("a-fingerprint",)


def _check_optional(metrics: dict) -> str | None:
    """The optional keys a node may send, when present: the right kind of number."""
    for key, minimum in OPTIONAL_COUNTS.items():
        if key in metrics and (reason := check_count(key, metrics[key], minimum)):
            return reason
    for key in OPTIONAL_NUMBERS:
        if key in metrics and not is_number(metrics[key]):
            return f"{key} {metrics[key]!r} is not a finite number"
    for key in OPTIONAL_INTEGERS:
        if key in metrics and (not is_number(metrics[key]) or int(metrics[key]) != metrics[key]):
            return f"{key} {metrics[key]!r} is not an integer"
    return None


def check_handshake(metrics: dict) -> str | None:
    """``None`` when a handshake's metrics are usable: ``partition-id`` an integer >= 0, ``num-examples`` an
    integer >= 1, and ``base-version`` / ``device-memory`` integers >= 0 when present; else one sentence."""
    for key, minimum in (("partition-id", 0), ("num-examples", 1)):
        if key not in metrics:
            return f"the handshake has no {key}"
        if reason := check_count(key, metrics[key], minimum):
            return reason
    return _check_optional(metrics)


def check_metrics(metrics: dict, partition_id: int) -> str | None:
    """``None`` unless a reply of any kind names a partition other than the one its node claimed at the
    handshake, or carries a malformed optional key. ``partition-id`` may be absent (status replies omit it)."""
    if "partition-id" in metrics:
        if reason := check_count("partition-id", metrics["partition-id"], 0):
            return reason
        if int(metrics["partition-id"]) != int(partition_id):
            return (f"the reply names partition {int(metrics['partition-id'])}, but its node holds partition "
                    f"{partition_id}")
    return _check_optional(metrics)


def check_train_metrics(metrics: dict, partition_id: int) -> str | None:
    """``None`` when a trained reply's metrics are usable: ``train_loss`` a finite number >= 0 (NaN only when
    every step was an empty DP-SGD Poisson draw: ``empty_batches`` == ``steps``), ``partition-id`` this node's,
    ``num-examples`` present (its value: :func:`check_update`), the optional keys the right kind of number;
    else one sentence."""
    for key in ("train_loss", "partition-id", "num-examples"):
        if key not in metrics:
            return f"the reply has no {key}"
    loss = metrics["train_loss"]
    no_loss = (isinstance(loss, float) and math.isnan(loss) and is_number(metrics.get("steps"))
               and metrics.get("empty_batches") == metrics["steps"])
    if not no_loss and (not is_number(loss) or loss < 0):
        return f"train_loss {loss!r} is not a finite number >= 0"
    return check_metrics(metrics, partition_id)


def check_update(arrays: dict, expected: dict[str, tuple[int, ...]], num_examples,
                 max_examples: int | None, sums_sq: dict | None = None) -> str | None:
    """``None`` when the update is acceptable, else one sentence saying why not.

    ``expected`` maps every key the client must send to its shape (from the client's assigned rank). ``sums_sq``: a
    dict that receives each checked tensor's sum of squares (its NaN/Inf check), so an accepted update's norm is
    ``math.sqrt(sum(sums_sq.values()))`` without a second pass (:func:`update_norm` is the same sum)."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float, np.integer, np.floating)) \
            or not np.isfinite(num_examples):
        return f"num-examples {num_examples!r} is not a number"
    if num_examples <= 0 or int(num_examples) != num_examples:
        return f"num-examples {num_examples} is not a positive integer"
    if max_examples is not None and num_examples > max_examples:
        return f"num-examples {int(num_examples)} exceeds the client's partition size {max_examples}"
    missing = sorted(set(expected) - set(arrays))
    if missing:
        return f"missing key {missing[0]!r} ({len(missing)} missing)"
    extra = sorted(set(arrays) - set(expected))
    if extra:
        return f"unexpected key {extra[0]!r} ({len(extra)} unexpected)"
    for key, shape in expected.items():
        a = arrays[key]
        if str(a.dtype) != "float32" and not as_sent(a):
            return f"{key}: dtype {a.dtype} is not float32 (the wire format)"
        if tuple(a.shape) != tuple(shape):
            return f"{key}: shape {tuple(a.shape)} != expected {tuple(shape)}"
        sq = _sum_sq(a)
        if not math.isfinite(sq):
            return f"{key}: contains NaN or Inf"
        if sums_sq is not None:
            sums_sq[key] = sq
    return None


def _sum_sq(a) -> float:
    """sum(a**2) of a float32 or 16-bit tensor: one float32 dot product, so one pass (a 16-bit tensor widened in
    cache; int8 blocks and top-k entries as sent: their own ``sum_sq``). It is finite exactly when every value
    is: where the dot is not (a NaN or Inf, or squares beyond float32's range), it is redone in float64, where the
    squares of finite float32 values cannot overflow."""
    if isinstance(a, AsSent):
        s = a.sum_sq()
        return s if math.isfinite(s) else float(torch.linalg.vector_norm(a.float(), dtype=torch.float64)) ** 2
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a if a.flags.writeable else a.copy())
    t = t.reshape(-1).float()
    s = float(torch.dot(t, t))
    return s if math.isfinite(s) else float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


def update_norm(arrays: dict) -> float:
    return math.sqrt(sum(_sum_sq(a) for a in arrays.values()))


def norm_outliers(norms: dict, factor: float) -> dict:
    """Nodes whose update norm exceeds ``factor`` x the round's median norm (robust to one outlier)."""
    if factor <= 0 or len(norms) < 3:
        return {}
    med = float(np.median(list(norms.values())))
    return {n: f"update norm {v:.3g} exceeds {factor:g}x the round's median {med:.3g}"
            for n, v in norms.items() if med > 0 and v > factor * med}
