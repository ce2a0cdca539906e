"""Server-side checks of one client update before it is aggregated. Pure functions; the strategies
call :func:`check_update` and leave out (and record) whatever it rejects."""

from __future__ import annotations

import numpy as np


def check_update(arrays: dict, expected: dict[str, tuple[int, ...]], num_examples,
                 max_examples: int | None) -> str | None:
    """``None`` when the update is acceptable, else one sentence saying why not.

    ``expected`` maps every key the client must send to its shape (from the client's assigned rank)."""
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
        if str(a.dtype) != "float32":
            return f"{key}: dtype {a.dtype} is not float32 (the wire format)"
        if tuple(a.shape) != tuple(shape):
            return f"{key}: shape {tuple(a.shape)} != expected {tuple(shape)}"
        if not np.isfinite(a).all():
            return f"{key}: contains NaN or Inf"
    return None


def update_norm(arrays: dict) -> float:
    return float(np.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays.values())))


def norm_outliers(norms: dict, factor: float) -> dict:
    """Nodes whose update norm exceeds ``factor`` x the round's median norm (robust to one outlier)."""
    if factor <= 0 or len(norms) < 3:
        return {}
    med = float(np.median(list(norms.values())))
    return {n: f"update norm {v:.3g} exceeds {factor:g}x the round's median {med:.3g}"
            for n, v in norms.items() if med > 0 and v > factor * med}
