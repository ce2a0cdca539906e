"""Message codecs (``comm.up``/``comm.down``, fedlora/codecs.py): bytes, error and CPU time.

1. MiniLM-shaped adapter (12 layers x query/value, 384 x 384, r = 8, and a 2 x 384 head), Gaussian factors: bytes of
   the encoded ArrayRecord (what ``bytes_up``/``bytes_down`` count: tensors, scales, indices and Flower's per-array
   header) as a ratio to fp32, and the relative error ||decode(encode(x)) - x|| / ||x||.
2. Llama-7B-shaped adapter (q and v of 32 layers, 4096 x 4096, r = 16: 8.4 M values a client), 10 clients: one
   round's codec work on the server and on one client (decode + encode), as a ratio to the server's FedIT
   aggregation of 10 fp32 replies in the same run (the issue's goal: <= 0.5). The server's codec work is what the
   server does: FedIT (``sums_replies``) reads an fp16, bf16 or int8 reply as sent (``codecs.decode(wide=False)``:
   a view, or int8 codes and scales), so its work is 10 such decodes + the aggregation's extra time on those
   replies over fp32 ones + the downlink's encode (``downlink_s``: the strategy's ``encode_payload`` for 10 nodes,
   less ``downlink_audit_s``, its decode of what it sent and the relative error per tensor, which
   ``server_ratio_with_audit`` adds back); nf4 and topk replies are decoded to fp32 first (10 decodes + the
   downlink's encode). ``*_compiled*``: the same with ``server.compile=true`` (the compiled sum, and int8's compiled
   quantiser on the downlink).
   ``traffic_ratio``: the least memory traffic of that codec work (a full decode reads a reply's encoded bytes and
   writes it at fp32; an aggregation of replies as sent reads fewer bytes than an fp32 one, so its extra traffic
   is none; the encode reads the fp32 payload and writes its bytes) over the least traffic of the aggregation
   (read 10 fp32 replies, write one). ``checks_s``: the server's reply checks (``validate.check_update``, whose
   sums of squares give the update norm) on the 10 replies as the server holds them (fp32, or as sent), beside
   ``checks_fp32_s``.

    .venv/bin/python bench/codecs.py               # writes bench/results/codecs.json
    .venv/bin/python bench/codecs.py --bytes-only  # part 1 only (seconds); keeps the file's timings of part 2
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedlora import algebra, codecs, compiled, validate  # noqa: E402
from fedlora.adapters import from_arrays  # noqa: E402
from fedlora.strategies.base import record_bytes, to_record  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import audit, downlink  # noqa: E402


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


def paired(fn_a, fn_b, repeats=11) -> tuple[float, float]:
    """Median times of ``fn_a`` and ``fn_b`` run alternately (so a change of load on the machine hits both)."""
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, a), (fn_b, b)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


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
    fedit = lambda replies: algebra.fedit([from_arrays(a, 2.0) for a in replies], [1.0] * 10)  # noqa: E731
    agg_s = timed(lambda: fedit(clients), repeats=5)
    expected = {k: tuple(v.shape) for k, v in clients[0].items()}
    def checks(replies):  # as the server checks a reply: its NaN/Inf check also gives the update norm's terms
        for a in replies:
            sums_sq = {}
            validate.check_update(a, expected, 1, None, sums_sq)
            math.sqrt(sum(sums_sq.values()))

    llama = {"aggregation_s": agg_s, "checks_fp32_s": timed(lambda: checks(clients))}
    fp32_b = 4 * sum(v.size for v in clients[0].values())
    for name in ("fp16", "bf16", "int8", "nf4", "topk"):
        c = codecs.Codec(name)
        encoded = [codecs.encode(c, a) for a in clients]
        enc_s = timed(lambda: codecs.encode(c, clients[0]))
        dec_s = timed(lambda: codecs.decode(c, encoded[0]))
        enc_b = record_bytes(to_record(encoded[0]))
        row = {"encode_s": enc_s, "decode_s": dec_s, "client_s": enc_s + dec_s,
               "downlink_s": timed(lambda: downlink(c, clients[0], 10)),  # as the strategy sends it to 10 nodes
               "downlink_audit_s": timed(lambda: audit(c, clients[0], encoded[0]))}  # (what of it is the audit's)
        if name in codecs.AS_SENT:  # what a summing server (FedIT) does with the replies
            as_sent = [codecs.decode(c, e, wide=False) for e in encoded]
            row["decode_as_sent_s"] = timed(lambda: codecs.decode(c, encoded[0], wide=False))
            row["aggregation_fp32_paired_s"], row["aggregation_as_sent_s"] = paired(lambda: fedit(clients),
                                                                                   lambda: fedit(as_sent))
            extra = row["aggregation_as_sent_s"] - row["aggregation_fp32_paired_s"]
            server = 10 * row["decode_as_sent_s"] + row["downlink_s"] - row["downlink_audit_s"] + extra
            base_s = row["aggregation_fp32_paired_s"]  # the ratio's denominator: paired with the as-sent runs
            traffic = (fp32_b + enc_b) / (11 * fp32_b)
            if name in compiled.CODECS:  # server.compile=true: the compiled sum, and int8's compiled quantiser
                fedit_c = lambda replies: algebra.fedit([from_arrays(a, 2.0) for a in replies], [1.0] * 10,  # noqa
                                                        compiled=True)
                fedit_c(as_sent), downlink(c, clients[0], 1, compiled=True)  # (compile)
                base_c, row["aggregation_as_sent_compiled_s"] = paired(lambda: fedit(clients),
                                                                       lambda: fedit_c(as_sent))
                row["downlink_compiled_s"] = timed(lambda: downlink(c, clients[0], 10, compiled=True))
                server_c = (10 * row["decode_as_sent_s"] + row["downlink_compiled_s"] - row["downlink_audit_s"]
                            + row["aggregation_as_sent_compiled_s"] - base_c)
                row |= {"server_round_codec_compiled_s": server_c, "server_ratio_compiled": server_c / base_c,
                        "server_ratio_compiled_with_audit": (server_c + row["downlink_audit_s"]) / base_c}
        else:
            as_sent = [codecs.decode(c, e) for e in encoded]
            server = 10 * dec_s + row["downlink_s"] - row["downlink_audit_s"]
            traffic = (10 * (enc_b + fp32_b) + (fp32_b + enc_b)) / (11 * fp32_b)
            base_s = agg_s
        row |= {"server_round_codec_s": server, "server_ratio_to_aggregation": server / base_s,
                "server_ratio_with_audit": (server + row["downlink_audit_s"]) / base_s,
                "traffic_ratio": traffic, "checks_s": timed(lambda: checks(as_sent))}
        llama[name] = row
        del as_sent, encoded
        print(name, json.dumps(llama[name]), flush=True)
    out = {"command": ".venv/bin/python bench/codecs.py", "wall_s": round(time.time() - t0, 1),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
           "minilm_shaped": minilm, "llama7b_shaped_10_clients": llama}
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(minilm, indent=1), f"\nwritten {path}")


if __name__ == "__main__":
    main()
