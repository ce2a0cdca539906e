"""What ``server.compile=true`` compiles with torch.compile (FedIT and FFA-LoRA): the weighted sum of 16-bit and int8
replies, and the int8 quantiser of the downlink.

A FedIT or FFA-LoRA server holds an fp16/bf16/int8 reply as sent (:func:`fedlora.codecs.decode` with ``wide=False``)
and sums it in float32. torch's eager add of a 16-bit tensor into a float32 one converts each value on a slow path
(1.75x a float32 add, in cache), and int8 codes take a widening copy before they are scaled and added, so the eager sum
of 16-bit or int8 replies reads half or a quarter of the bytes of fp32 replies and still takes longer. Compiled
(inductor: C++ on the CPU, Triton on a GPU), one loop over a group of :data:`GROUP` clients widens each value in
registers (and, for int8, scales it by its block's absmax there): 1.2-1.4x the memory-bandwidth floor at 100
Llama-7B-shaped clients, against 2-2.6x eager (``bench/compiled_sum.py``). The tensors go to it as they are: as 1-D
views (12,800 views a round at 100 clients) the sum took 0.15-0.25x the floor longer. int8 replies are summed from
their messages' codes (:func:`message_sums`: 80 calls a round at 100 clients instead of 1,280, 1.01-1.08x the floor
with the decode, ``bench/aggregation.py``). fp32 tensors keep the eager sum (no faster compiled).

bitsandbytes' int8 quantiser (``int8_vectorwise_quant``) runs on the CPU as six torch passes over each tensor, with
fresh memory for each: 240 us for a 4096 x 16 factor, so an int8 downlink of Llama-7B-shaped adapters takes 18 ms to
encode, 0.9x FedIT's whole aggregation of 10 replies. :func:`int8_quantise` is its arithmetic in one compiled pass
(absmax of each block, then ``round(x * (127 / absmax))``, as its CPU kernel writes it), equal to it bit for bit
(tested on 1.28 M values over 60 orders of magnitude, ties and all-zero blocks; 128 M in a trial), written straight
into the message's codes: 7.8 ms for the payload.

The first round pays the compile, a few seconds per group length and dtype (shapes are dynamic), and needs a C++
compiler on a CPU server (checked before the run starts).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

import torch

from .as_sent import Int8Blocks

#: the uplink codecs whose replies the compiled sum reads (as sent; fp32 and top-k keep the eager sum)
CODECS = ("fp16", "bf16", "int8")
#: clients added by one compiled call (all 100 in one loop was 8x the floor: the unrolled loop spills)
GROUP = 10
#: output of one run of :func:`message_sums`, in bytes: a whole message (33.5 MB for Llama-7B-shaped adapters) is
#: fresh memory each round (above glibc's mmap threshold), and a float32 sum in cache is read and written once a group
CHUNK_BYTES = 4 << 20
COMPILERS = ("g++", "c++", "clang++")

_compiled: dict = {}


def _acc(out: torch.Tensor, xs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    for i in range(len(xs)):
        out = out + xs[i].float() * w[i]
    return out


def _acc_int8(out: torch.Tensor, codes: list[torch.Tensor], absmax: list[torch.Tensor], w: torch.Tensor) -> None:
    """out += sum_i codes_i * absmax_i * w_i, in place: int8 codes [blocks, blocksize], their block scales a column
    [blocks, 1], and the weights over 127 (an int8 code's value is code * absmax / 127). In place because a new
    output a call is fresh memory each time where it is large (above glibc's mmap threshold its pages are faulted in
    and zeroed anew: 2.4-4.3x slower on whole messages in a trial)."""
    for i in range(len(codes)):
        out += codes[i].float() * absmax[i] * w[i]


def _quant_int8(rows: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """bitsandbytes' row-wise int8 quantiser on float32 rows of one block each, written into ``codes`` and ``absmax``
    (the absmax of each row), with codes 0 in an all-zero row (where bitsandbytes divides 0 by 0)."""
    a = rows.abs().amax(dim=1, keepdim=True)
    codes.copy_(torch.where(a == 0, 0.0, torch.round(rows * (127.0 / a))).to(torch.int8))
    absmax.copy_(a.view(-1))


def _fn(name: str):
    if name not in _compiled:
        _compiled[name] = torch.compile({"16": _acc, "int8": _acc_int8, "quant_int8": _quant_int8}[name],
                                        dynamic=True, options={"size_asserts": False})
    return _compiled[name]


def int8_quantise(rows: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """:func:`fedlora.codecs`' int8 quantiser (bitsandbytes' ``int8_vectorwise_quant`` on rows of one block, an
    all-zero block's codes 0), compiled, written into ``codes`` (int8, the rows' shape) and ``absmax`` (one a row):
    the same codes and scales, bit for bit."""
    _fn("quant_int8")(rows, codes, absmax)


def applies(column: Sequence) -> bool:
    """Whether a column of clients' tensors takes the compiled sum: all fp16, all bf16 torch tensors, or all int8
    blocks (:class:`fedlora.codecs.Int8Blocks`) of one shape."""
    first = column[0]
    if isinstance(first, Int8Blocks):
        return all(isinstance(t, Int8Blocks) and t.rows.shape == first.rows.shape for t in column)
    dtype = getattr(first, "dtype", None)
    return dtype in (torch.float16, torch.bfloat16) and all(
        isinstance(t, torch.Tensor) and t.dtype == dtype for t in column)


def wsum(column: Sequence, p: Sequence[float]) -> torch.Tensor:
    """sum_k p_k t_k in float32 for a column :func:`applies` to, in groups of :data:`GROUP` clients."""
    if isinstance(column[0], Int8Blocks):
        acc, w = _fn("int8"), torch.tensor(p, dtype=torch.float32) / 127
        codes, absmax = [b.rows for b in column], [b.absmax for b in column]
        out = torch.zeros(codes[0].shape)
        for g in range(0, len(codes), GROUP):
            acc(out, codes[g:g + GROUP], absmax[g:g + GROUP], w[g:g + GROUP])
        return out.view(-1)[:column[0].numel()].view(column[0].shape)
    acc, w = _fn("16"), torch.tensor(p, dtype=torch.float32, device=column[0].device)
    out = torch.zeros(column[0].shape, device=column[0].device)
    for g in range(0, len(column), GROUP):
        out = acc(out, column[g:g + GROUP], w[g:g + GROUP])
    return out


def message_sums(columns: Sequence[Sequence], p: Sequence[float]) -> dict[int, torch.Tensor]:
    """{index: sum_k p_k t_k} for the int8 columns of ``columns`` whose tensors lie at the same blocks of every
    client's message (``#codes``; the same keys and shapes, as the reply checks require): their blocks are summed in
    runs of adjacent tensors of up to :data:`CHUNK_BYTES` of output, by one compiled call (in place) over a run of
    :data:`GROUP` clients' messages, and each tensor is a view of its blocks of its run's sum. For 100 clients of
    Llama-7B-shaped adapters that is 80 calls instead of one a tensor and group (1,280). {} where the layouts
    differ (then :func:`wsum` a column)."""
    idx = [j for j, col in enumerate(columns) if isinstance(col[0], Int8Blocks)]
    if not idx:
        return {}
    codes, scales = [b.codes for b in columns[idx[0]]], [b.scales for b in columns[idx[0]]]
    heads = sorted(((columns[j][0], j) for j in idx), key=lambda hj: hj[0].first)
    for h, j in heads:
        for b, c, s in zip(columns[j], codes, scales):
            if b.__class__ is not Int8Blocks or b.codes is not c or b.scales is not s or b.first != h.first \
                    or b.shape != h.shape:
                return {}
    runs, row_bytes = [], codes[0].shape[1] * 4  # [[first block, end block, [(head, index)]]]
    for h, j in heads:
        if runs and runs[-1][1] == h.first and (h.first + h.blocks - runs[-1][0]) * row_bytes <= CHUNK_BYTES:
            runs[-1][1] = h.first + h.blocks
            runs[-1][2].append((h, j))
        else:
            runs.append([h.first, h.first + h.blocks, [(h, j)]])
    acc, w, sums = _fn("int8"), torch.tensor(p, dtype=torch.float32) / 127, {}
    for lo, hi, members in runs:
        out = torch.zeros(hi - lo, codes[0].shape[1])
        for g in range(0, len(codes), GROUP):
            acc(out, [c[lo:hi] for c in codes[g:g + GROUP]], [s[lo:hi] for s in scales[g:g + GROUP]], w[g:g + GROUP])
        sums.update((j, out[h.first - lo:h.first - lo + h.blocks].view(-1)[:h.numel()].view(h.shape))
                    for h, j in members)
    return sums


def enabled(cfg) -> bool:
    """Whether a run config sets ``server.compile=true``."""
    return bool((cfg.get("server") or {}).get("compile", False))


def missing_compiler() -> str | None:
    """A sentence for a server without a C++ compiler for inductor (the replies are summed on the CPU), else None."""
    if any(shutil.which(c) for c in COMPILERS):
        return None
    return (f"server.compile=true needs a C++ compiler for torch.compile on the CPU, and none of "
            f"{', '.join(COMPILERS)} is on PATH: install one (e.g. apt install g++) or set server.compile=false.")
