"""A trial for issue 18's unmet goal (aggregation within 2x the memory-bandwidth floor at 100 clients): FedIT's
weighted sum compiled by torch.compile (inductor's C++ on CPU), one fused loop over a group of clients' tensors,
against the eager sum fedlora runs (:func:`fedlora.algebra.fedit`: one in-place ``add_`` a client and tensor) and
the floor of ``bench/aggregation.py`` (one ``torch.sum`` over the same bytes). Not a fedlora feature: it measures
whether one would pay. Llama-7B-shaped adapters (64 modules, 4096 x 4096, r = 16; A and B of each module), 1 thread.

For each client count K and group size G, the sum per tensor is ``out = acc(out, x[g:g+G], p[g:g+G])`` over the
groups, where ``acc`` adds G weighted inputs in one compiled loop (G = K: all clients in one loop). It is compiled
once per (G, tensor shape) and timed after that; the compile time is recorded.

    .venv/bin/python bench/compiled_sum.py   # writes bench/results/compiled_sum.json: 25 s with inductor's
                                             # cache warm; a cold compile adds 7-18 s per group size and shape
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

from fedlora import algebra  # noqa: E402


def acc(out, xs, w):
    for i in range(len(xs)):
        out = out + xs[i] * w[i]
    return out


def best(fn) -> float:
    """The least wall time of 3 runs (``bench/aggregation.py``'s :func:`measure`)."""
    return measure(fn, 3)[0]["min_s"]


def main() -> None:
    torch.set_num_threads(1)
    compiled = torch.compile(acc, dynamic=False)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    names = module_names(32)
    out = {"command": ".venv/bin/python bench/compiled_sum.py", "threads": 1, "machine": machine, "runs": []}
    for K in (10, 100):
        buf = make_buffer(K, len(names), 16, seed=K)
        states = equal_rank_states(buf, names, 16, 2.0)
        p = torch.tensor(algebra.normalize([100 + 7 * k for k in range(K)]))
        by_tensor = [[st.lora[n].A for st in states] for n in names] + [[st.lora[n].B for st in states] for n in names]
        floor = best(lambda: buf.sum())
        eager = best(lambda: algebra.fedit(states, p.tolist()))
        row = {"clients": K, "floor_s": floor, "eager_fedit_s": eager, "eager_x_floor": eager / floor, "groups": []}
        for G in sorted({10, K}):
            def run():
                for xs in by_tensor:
                    o = torch.zeros_like(xs[0])
                    for g in range(0, K, G):
                        o = compiled(o, xs[g:g + G], p[g:g + G])
            t = time.time()
            run()  # compiles once per (G, shape)
            first = time.time() - t
            got = best(run)
            ref = algebra.fedit(states, p.tolist())
            o = torch.zeros_like(by_tensor[0][0])
            for g in range(0, K, G):
                o = compiled(o, by_tensor[0][g:g + G], p[g:g + G])
            err = float((o - ref.lora[names[0]].A).abs().max() / ref.lora[names[0]].A.abs().max())
            row["groups"].append({"group": G, "first_call_s_with_compile": first, "s": got, "x_floor": got / floor,
                                  "x_eager": got / eager, "max_rel_diff_vs_eager_first_tensor": err})
            print(f"K={K} G={G}: compiled {got:.3f}s ({got / floor:.2f}x floor; eager {eager:.3f}s, "
                  f"{eager / floor:.2f}x), first call {first:.1f}s, max rel diff {err:.1e}", flush=True)
        out["runs"].append(row)
        del buf, states, by_tensor
    path = Path(__file__).resolve().parent / "results" / "compiled_sum.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
