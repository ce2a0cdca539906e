"""Checkpoints of a run, written by the server after every round: atomically (temp file, fsync, rename),
with a SHA-256 checksum, and the previous good checkpoint kept beside the newest. A run killed at any point
(even SIGKILL) loses at most the round in progress; a corrupted or truncated file is detected on resume
and the previous good checkpoint is used instead."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

NAME, PREV = "checkpoint.pt", "checkpoint.prev.pt"
MAGIC = b"FEDLORA-CKPT1\n"


class CheckpointError(RuntimeError):
    """No usable checkpoint (one sentence)."""


def save(run_dir: Path, payload: dict) -> Path:
    run_dir = Path(run_dir)
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    blob = MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body
    tmp = run_dir / (NAME + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    cur = run_dir / NAME
    if cur.exists():
        os.replace(cur, run_dir / PREV)
    os.replace(tmp, cur)
    dfd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return cur


def _read(path: Path) -> dict:
    blob = path.read_bytes()
    if not blob.startswith(MAGIC):
        raise ValueError("not a fedlora checkpoint")
    head, _, body = blob[len(MAGIC):].partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != head:
        raise ValueError("checksum mismatch (truncated or corrupted)")
    return torch.load(io.BytesIO(body), weights_only=False)


def load(run_dir: Path, warn=print) -> dict:
    """The newest valid checkpoint of ``run_dir`` (falls back to the previous one, saying why)."""
    run_dir = Path(run_dir)
    errors = []
    for name in (NAME, PREV):
        p = run_dir / name
        if not p.exists():
            errors.append(f"{name} missing")
            continue
        try:
            payload = _read(p)
        except Exception as e:  # any decoding problem means this file is unusable
            errors.append(f"{name}: {e}")
            warn(f"warning: {p} is unusable ({e}); trying the previous checkpoint.")
            continue
        return payload
    raise CheckpointError(f"no usable checkpoint in {run_dir} ({'; '.join(errors)}): start a new run instead.")
