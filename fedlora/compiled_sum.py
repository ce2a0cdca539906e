"""The weighted sum of 16-bit replies compiled by torch.compile (``server.compiled_sum=true``; FedIT and FFA-LoRA).

A FedIT or FFA-LoRA server holds an fp16/bf16 reply as sent (:func:`fedlora.codecs.decode` with ``wide=False``) and
sums it in float32. torch's eager add of a 16-bit tensor into a float32 one converts each value on a slow path (1.75x
a float32 add, in cache), so the eager sum of 16-bit replies reads half the bytes of fp32 replies and still takes
longer. Compiled (inductor: C++ on the CPU, Triton on a GPU), one loop over a group of :data:`GROUP` clients widens each
value in registers: 1.22-1.42x the memory-bandwidth floor at 100 Llama-7B-shaped clients, against 2.6x eager
(``bench/compiled_sum.py``). fp32 and int8 tensors keep the eager sum (fp32: no faster compiled; int8: its Python
decode dominates). The first round pays the compile, a few seconds per group length and dtype (shapes are dynamic:
1-D views), and needs a C++ compiler on a CPU server (checked before the run starts).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

import torch

#: clients added by one compiled call (all 100 in one loop was 8x the floor: the unrolled loop spills)
GROUP = 10
COMPILERS = ("g++", "c++", "clang++")

_compiled = None


def _acc(out: torch.Tensor, xs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    for i in range(len(xs)):
        out = out + xs[i].float() * w[i]
    return out


def applies(column: Sequence) -> bool:
    """Whether a column of clients' tensors takes the compiled sum: all fp16, or all bf16, torch tensors."""
    dtype = getattr(column[0], "dtype", None)
    return dtype in (torch.float16, torch.bfloat16) and all(
        isinstance(t, torch.Tensor) and t.dtype == dtype for t in column)


def wsum(column: Sequence[torch.Tensor], p: Sequence[float]) -> torch.Tensor:
    """sum_k p_k t_k in float32 for a column :func:`applies` to, in groups of :data:`GROUP` clients."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_acc, dynamic=True)
    w = torch.tensor(p, dtype=torch.float32, device=column[0].device)
    flat = [t.reshape(-1) for t in column]
    out = torch.zeros(flat[0].numel(), device=column[0].device)
    for g in range(0, len(flat), GROUP):
        out = _compiled(out, flat[g:g + GROUP], w[g:g + GROUP])
    return out.view(column[0].shape)


def missing_compiler() -> str | None:
    """A sentence for a server without a C++ compiler for inductor (the replies are summed on the CPU), else None."""
    if any(shutil.which(c) for c in COMPILERS):
        return None
    return (f"server.compiled_sum=true needs a C++ compiler for torch.compile on the CPU, and none of "
            f"{', '.join(COMPILERS)} is on PATH: install one (e.g. apt install g++) or set server.compiled_sum=false.")
