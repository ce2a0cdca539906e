"""Message codecs (``comm.up``/``comm.down``, fedlora/codecs.py): bytes, error and CPU time.

1. MiniLM-shaped adapter (12 layers x query/value, 384 x 384, r = 8, and a 2 x 384 head), Gaussian factors: bytes of
   the encoded ArrayRecord (what ``bytes_up``/``bytes_down`` count: tensors, scales, indices and Flower's per-array
   header) as a ratio to fp32, and the relative error ||decode(encode(x)) - x|| / ||x||.
2. Llama-7B-shaped adapter (q and v of 32 layers, 4096 x 4096, r = 16: 8.4 M values a client), 10 clients: one
   round's codec work on the server (decode 10 replies + encode 1 payload) and on one client (decode + encode), as a
   ratio to the server's FedIT aggregation of the 10 decoded replies in the same run (the issue's goal: <= 0.5).
   Beside each measured ratio, ``traffic_ratio``: the least memory traffic of the server's codec work (each decode
   reads a reply's encoded bytes and writes it at fp32; the encode reads the fp32 payload and writes its bytes)
   over the least traffic of the aggregation (read 10 fp32 replies, write one). Where both run at the same share of
   the memory bandwidth, the time ratio is this number; a decode that writes each reply out at fp32 before the
   average reads it is above 1 for every codec here.

    .venv/bin/python bench/codecs.py               # writes bench/results/codecs.json
    .venv/bin/python bench/codecs.py --bytes-only  # part 1 only (seconds); keeps the file's timings of part 2
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedlora import algebra, codecs  # noqa: E402
from fedlora.adapters import from_arrays  # noqa: E402
from fedlora.strategies.base import record_bytes, to_record  # noqa: E402


def adapter(modules: int, m: int, n: int, r: int, seed: int, head: tuple | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(modules):
        out[f"layers.{i}.lora_A"] = (rng.standard_normal((r, n)) / np.sqrt(n)).astype(np.float32)
        out[f"layers.{i}.lora_B"] = (rng.standard_normal((m, r)) * 0.01).astype(np.float32)
    if head:
        out["extra.head.weight"] = rng.standard_normal(head).astype(np.float32)
    return out


def timed(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    bytes_only = "--bytes-only" in sys.argv[1:]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    t0 = time.time()
    small = adapter(24, 384, 384, 8, 0, head=(2, 384))
    fp32 = record_bytes(to_record(small))
    minilm = {}
    for name in codecs.CODECS:
        c = codecs.Codec(name)
        enc = codecs.encode(c, small)
        minilm[name] = {"bytes": record_bytes(to_record(enc)), "fewer_bytes_than_fp32": fp32 / record_bytes(to_record(enc)),
                        "relative_error": codecs.relative_error(small, codecs.decode(c, enc))}
    path = Path(__file__).resolve().parent / "results" / "codecs.json"
    if bytes_only:
        out = json.loads(path.read_text())
        out["minilm_shaped"] = minilm
        out["minilm_shaped_command"] = ".venv/bin/python bench/codecs.py --bytes-only"
        path.write_text(json.dumps(out, indent=1))
        print(json.dumps(minilm, indent=1), f"\nwritten {path} (part 1 only)")
        return
    clients = [adapter(64, 4096, 4096, 16, s) for s in range(10)]
    agg_s = timed(lambda: algebra.fedit([from_arrays(a, 2.0) for a in clients], [1.0] * 10))
    llama = {"aggregation_s": agg_s}
    fp32_b = 4 * sum(v.size for v in clients[0].values())
    for name in ("fp16", "bf16", "int8", "nf4", "topk"):
        c = codecs.Codec(name)
        encoded = [codecs.encode(c, a) for a in clients]
        enc_s = timed(lambda: codecs.encode(c, clients[0]))
        dec_s = timed(lambda: codecs.decode(c, encoded[0]))
        server = 10 * dec_s + enc_s
        enc_b = record_bytes(to_record(encoded[0]))
        traffic = (10 * (enc_b + fp32_b) + (fp32_b + enc_b)) / (11 * fp32_b)
        llama[name] = {"encode_s": enc_s, "decode_s": dec_s, "server_round_codec_s": server,
                       "server_ratio_to_aggregation": server / agg_s, "client_s": enc_s + dec_s,
                       "traffic_ratio": traffic}
        print(name, json.dumps(llama[name]), flush=True)
    out = {"command": ".venv/bin/python bench/codecs.py", "wall_s": round(time.time() - t0, 1),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
           "minilm_shaped": minilm, "llama7b_shaped_10_clients": llama}
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(minilm, indent=1), f"\nwritten {path}")


if __name__ == "__main__":
    main()
