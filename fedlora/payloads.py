"""The payloads of a round's messages as they are sent, each encoded once (:class:`Payloads`): a server sends the
same payload to many nodes (FedIT's global adapter to all of them), and encoding it again for each, or serialising
it again, cost more than the round's aggregation at 100 nodes. No Flower here."""

from __future__ import annotations

import hashlib

import numpy as np


class Payloads:
    """The payloads of a round's messages as they are sent, each encoded once: a payload sent to many nodes (FedIT's
    global adapter) is found again, and :meth:`get` returns the same object for it. Found by identity (the same
    dict), else by the memory its arrays view (the state's tensors: 0.2 ms a payload; every payload is kept for the
    round, so that memory cannot be reused by another), else, when it is encoded, by content (a hash of each
    payload, 38 ms for 33.5 MB, taken only once two differ: for fp32 it would cost more than it saves)."""

    def __init__(self):
        self.found: dict = {}  # id of a payload, or where its arrays are -> [payload, as sent, its hash or None]

    def get(self, arrays: dict[str, np.ndarray], encode=None) -> dict[str, np.ndarray]:
        """``arrays`` as sent: ``encode()`` the first time they are seen (None: sent as they are)."""
        if id(arrays) in self.found:
            return self.found[id(arrays)][1]
        where = tuple((k, a.ctypes.data, a.shape, a.strides, a.dtype.str) for k, a in sorted(arrays.items()))
        if where not in self.found:
            same, h = None, None
            if encode is not None and self.found:
                for entry in self.found.values():
                    entry[2] = entry[2] or digest(entry[0])
                h = digest(arrays)
                same = next((e for e in self.found.values() if e[2] == h), None)
            self.found[where] = [arrays, same[1] if same else encode() if encode else arrays, h]
        self.found[id(arrays)] = self.found[where]
        return self.found[where][1]


def digest(arrays: dict[str, np.ndarray]) -> bytes:
    """A hash of a message's keys, dtypes, shapes and bytes (blake2b: 38 ms for 33.5 MB)."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(arrays):
        h.update(k.encode() + b"\0" + str(arrays[k].dtype).encode() + str(arrays[k].shape).encode())
        h.update(np.ascontiguousarray(arrays[k]).data)
    return h.digest()
