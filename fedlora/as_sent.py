"""A reply's tensors as a summing server holds them: as sent (:func:`fedlora.codecs.decode` with ``wide=False``), not
decoded to float32. FedIT and FFA-LoRA only take weighted sums of the replies, so their server reads an int8 tensor
as its codes and block scales (:class:`Int8Blocks`) and a top-k tensor as its kept entries (:class:`TopkEntries`):
the reply check reads each one's sum of squares from what was sent, and the weighted sum adds it into float32
without a float32 copy of the reply (a server holding 100 top-k replies of Llama-7B-shaped adapters held 3.4 GB of
decoded tensors). Any other use sees the float32 decoding (:class:`AsSent`), so nothing can read codes or indices as
values. No Flower here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


class AsSent:
    """What a tensor as sent shares: its float32 decoding (:meth:`float`) serves ``.to``, ``.double``, numpy's
    ``asarray``, every torch function and every tensor attribute it does not define itself; ``shape``, ``dtype``,
    :meth:`numel` and :meth:`sum_sq` are its own. Few Python objects a tensor: a server holding 100 replies of 128
    tensors spent more time in the garbage collector than in decoding when each tensor held four."""

    __slots__ = ()
    shape: tuple[int, ...]

    def float(self) -> torch.Tensor:
        raise NotImplementedError

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.float().to(*args, **kwargs)

    def detach(self) -> AsSent:
        return self

    def numel(self) -> int:
        return math.prod(self.shape)

    def __array__(self, dtype=None, copy=None):
        return self.float().numpy().astype(dtype or np.float32, copy=False)

    def __getattr__(self, name):  # .double(), .numpy(), .reshape(...), ...: on the decoded tensor
        if name.startswith("_") or name in self.__slots__:  # (copy and pickle look before the fields are set)
            raise AttributeError(name)
        return getattr(self.float(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        wide = lambda a: a.float() if isinstance(a, AsSent) else [wide(b) for b in a] \
            if isinstance(a, (list, tuple)) else a  # noqa: E731
        return func(*wide(args), **{k: wide(v) for k, v in (kwargs or {}).items()})


@dataclass(slots=True)  # (not frozen: a frozen dataclass's __init__ costs 1.5 us, a server builds 12,800 a round)
class Int8Blocks(AsSent):
    """An int8 reply's tensor as sent: where its blocks lie in the message's codes (``#codes`` as rows of one block,
    on the reply's own bytes) and block scales (``#absmax``, a column), both one tensor a message, shared by its
    tensors. A summing server's weighted sum reads it without a float32 copy of the tensor (:meth:`add_all`; with
    ``server.compile``, from the messages' codes where every client's message lays its tensors out alike,
    :func:`fedlora.compiled.message_sums`) and its check reads its sum of squares (:meth:`sum_sq`)."""

    codes: torch.Tensor  # int8 [all blocks, blocksize]: the message's codes, each tensor's last block padded with 0
    scales: torch.Tensor  # float32 [all blocks, 1]: the message's block scales, a column
    first: int  # this tensor's first block among them
    blocks: int  # and how many it has
    shape: tuple[int, ...]

    @property
    def rows(self) -> torch.Tensor:
        """This tensor's codes, rows of one block (the last padded with zeros)."""
        return self.codes[self.first:self.first + self.blocks]

    @property
    def absmax(self) -> torch.Tensor:
        """This tensor's block scales, a column."""
        return self.scales[self.first:self.first + self.blocks]

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8

    def float(self) -> torch.Tensor:
        import bitsandbytes.functional as F

        decoded = F.int8_vectorwise_dequant(self.rows, self.absmax.view(-1))
        return decoded.flatten()[:self.numel()].reshape(self.shape)

    def sum_sq(self) -> float:
        """sum of the decoded values' squares: each block's sum of squared codes times (absmax / 127)^2."""
        q = self.rows.float()
        return float(torch.dot(torch.linalg.vecdot(q, q), (self.absmax.view(-1) / 127).square()))

    @staticmethod
    def add_all(outs: list[torch.Tensor], blocks: list[Int8Blocks], scratch: list[torch.Tensor], weight: float
                ) -> None:
        """``out += weight * decoded`` for each ``out`` (float32 rows of the same blocks) and tensor as sent, in two
        multi-tensor calls: the codes widened to float32 into ``scratch`` (the caller's, of the rows' shapes: reused
        from client to client, it stays in cache and needs no new memory), then ``addcmul_`` (code x its block's
        absmax x weight / 127). In cache, one thread, four 256 KiB outputs: 52 µs (19 to widen, 33 to add), against
        55 µs for ``addcmul_`` on the int8 codes themselves and 31 µs for a float32 ``add_``."""
        torch._foreach_copy_(scratch, [b.rows for b in blocks])
        torch._foreach_addcmul_(outs, scratch, [b.absmax for b in blocks], value=weight / 127)


@dataclass(slots=True)
class TopkEntries(AsSent):
    """A top-k reply's tensor as sent: the indices of its kept entries (int32, ascending, as :func:`fedlora.codecs.
    decode` checked them) and their values (float32), both on the reply's own bytes; every other entry is 0. Its
    check reads the values' sum of squares (:meth:`sum_sq`) and the weighted sum adds the values at their indices
    (:meth:`add_to`): a tenth of the reads of a dense reply, and no dense copy."""

    idx: torch.Tensor  # int32, ascending: where the kept entries are in the flattened tensor
    vals: torch.Tensor  # float32: their values
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.vals.device

    def float(self) -> torch.Tensor:
        dense = torch.zeros(self.numel())
        dense[self.idx.long()] = self.vals
        return dense.view(self.shape)

    def sum_sq(self) -> float:
        """sum of the decoded values' squares: the kept values' (the rest are 0)."""
        return float(torch.dot(self.vals, self.vals))

    def add_to(self, out: torch.Tensor, weight: float) -> None:
        """``out += weight * decoded`` (``out`` float32 of this tensor's size): the values added at their indices."""
        out.view(-1).index_add_(0, self.idx, self.vals, alpha=weight)
