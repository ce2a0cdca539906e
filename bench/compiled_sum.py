"""A trial for issue 18's unmet goal (aggregation within 2x the memory-bandwidth floor at 100 clients, with and
without codecs): FedIT's weighted sum compiled by torch.compile (inductor's C++ on CPU), one fused loop over a group
of clients' tensors that widens each value in registers, against the eager sum fedlora runs
(:func:`fedlora.algebra._wsums`: one multi-tensor call a client and group of outputs) and the floor of
``bench/aggregation.py`` (one ``torch.sum`` over the fp32 bytes). Not a fedlora feature: it measures whether one would
pay. Llama-7B-shaped adapters (64 modules, 4096 x 4096, r = 16; A and B of each module), 1 thread, replies in fp32,
fp16 and int8 as a summing server holds them (``codecs.decode(wide=False)``); the decode of the K replies is timed
apart, so "decode included" is the sum's time plus it.

For each client count K and group size G, the sum per tensor is ``out = acc(out, x[g:g+G], p[g:g+G])`` over the
groups, where ``acc`` adds G weighted inputs in one compiled loop (G = K: all clients in one loop; fp32 only). It is
compiled once per (G, tensor shape, dtype) and timed after that; the compile time is recorded.

    .venv/bin/python bench/compiled_sum.py   # writes bench/results/compiled_sum.json: about 2 minutes with
                                             # inductor's cache warm; a cold compile adds 5-18 s per case
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import equal_rank_states, make_buffer, measure, module_names  # noqa: E402

from fedlora import algebra, codecs  # noqa: E402
from fedlora.adapters import from_arrays, to_arrays  # noqa: E402


def acc(out, xs, w):
    for i in range(len(xs)):
        out = out + xs[i].float() * w[i]
    return out


def acc8(out, qs, ss, w):  # int8 codes, their block scales (a column) and the weights / 127
    for i in range(len(qs)):
        out = out + qs[i].float() * ss[i] * w[i]
    return out


def best(fn) -> float:
    """The least wall time of 3 runs (``bench/aggregation.py``'s :func:`measure`)."""
    return measure(fn, 3)[0]["min_s"]


def main() -> None:
    torch.set_num_threads(1)
    compiled, compiled8 = torch.compile(acc, dynamic=False), torch.compile(acc8, dynamic=False)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    names = module_names(32)
    out = {"command": ".venv/bin/python bench/compiled_sum.py", "threads": 1, "machine": machine, "runs": []}
    for K in (10, 100):
        buf = make_buffer(K, len(names), 16, seed=K)
        states = equal_rank_states(buf, names, 16, 2.0)
        p = algebra.normalize([100 + 7 * k for k in range(K)])
        pt = torch.tensor(p)
        floor = best(lambda: buf.sum())
        row = {"clients": K, "floor_s": floor, "codecs": {}}
        for name in ("fp32", "fp16", "int8"):
            c = codecs.Codec(name)
            enc = [codecs.encode(c, to_arrays(st)) for st in states]
            decode = lambda: [from_arrays(codecs.decode(c, e, wide=False), 2.0) for e in enc]  # noqa: E731
            held = decode()
            cols = [[getattr(st.lora[n], f) for st in held] for n in names for f in "AB"]
            eager = best(lambda: algebra._wsums(cols, p))
            ref = algebra._wsums(cols, p)
            res = {"decode_s": best(decode), "eager_s": eager, "eager_x_floor": eager / floor, "groups": []}
            for G in sorted({10, K} if name == "fp32" else {10}):
                def run():
                    sums = []
                    for col in cols:
                        if name == "int8":
                            o = torch.zeros(col[0].rows.shape)
                            for g in range(0, K, G):
                                o = compiled8(o, [b.rows for b in col[g:g + G]], [b.absmax for b in col[g:g + G]],
                                              pt[g:g + G] / 127)
                            o = o.view(-1)[:col[0].numel()].view(col[0].shape)
                        else:
                            o = torch.zeros(col[0].shape)
                            for g in range(0, K, G):
                                o = compiled(o, col[g:g + G], pt[g:g + G])
                        sums.append(o)
                    return sums
                t = time.time()
                got = run()  # compiles once per (G, shape)
                first = time.time() - t
                err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))
                s = best(run)
                res["groups"].append({"group": G, "first_call_s_with_compile": first, "s": s, "x_floor": s / floor,
                                      "x_floor_decode_included": (s + res["decode_s"]) / floor, "x_eager": s / eager,
                                      "max_rel_diff_vs_eager": err})
                print(f"K={K} {name} G={G}: compiled {s:.3f}s ({s / floor:.2f}x floor, decode included "
                      f"{(s + res['decode_s']) / floor:.2f}x); eager {eager:.3f}s ({eager / floor:.2f}x, decode "
                      f"included {(eager + res['decode_s']) / floor:.2f}x); first call {first:.1f}s, "
                      f"max rel diff {err:.1e}", flush=True)
            row["codecs"][name] = res
            del enc, held, cols
        out["runs"].append(row)
        del buf, states
    path = Path(__file__).resolve().parent / "results" / "compiled_sum.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
