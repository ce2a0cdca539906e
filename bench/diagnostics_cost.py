"""What a round's ``cross_term_error`` (:func:`fedlora.diagnostics.cross_term_error`) costs the server as the clients
per round grow, beside the aggregation itself (FedIT), on Llama-7B-shaped modules (4096 x 4096, r = 16).

The exact error of a served product against dW* = sum_k p_k s_k B_k A_k reads every pair of clients' factors: from
Grams of the stacked factors, (sum r_k + r)^2 (m + n) multiply-adds a module (a dense dW* would be 2 (sum r_k) m n,
more up to 256 clients of rank 16 here). Timed on a few modules (every module costs the same) and scaled to the 64
q/v modules of Llama-7B; the growth exponent b of time ~ a K^b is fitted on log-log over the client counts. The
setting ``diagnostics=false`` skips it (``conf/config.yaml``).

    .venv/bin/python bench/diagnostics_cost.py   # writes bench/results/diagnostics_cost.json (about 2 minutes)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import equal_rank_states, make_buffer, module_names  # noqa: E402

from fedlora import algebra, diagnostics  # noqa: E402

CLIENTS, MODULES, LLAMA_MODULES, RANK = (10, 20, 50, 100), 4, 64, 16


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    names = module_names(MODULES // 2)
    rows = []
    for K in CLIENTS:
        buf = make_buffer(K, len(names), RANK, seed=K)
        states = equal_rank_states(buf, names, RANK, 2.0)
        p = algebra.normalize([100 + 7 * k for k in range(K)])
        served = algebra.fedit(states, p)
        diag = best(lambda: diagnostics.cross_term_error(served, states, p)) / MODULES
        agg = best(lambda: algebra.fedit(states, p)) / MODULES
        rows.append({"clients": K, "cross_term_error_s_per_module": diag, "fedit_s_per_module": agg,
                     "cross_term_error_s_per_round_64_modules": diag * LLAMA_MODULES,
                     "fedit_s_per_round_64_modules": agg * LLAMA_MODULES, "diagnostic_x_aggregation": diag / agg,
                     "gram_multiply_adds_per_module": ((K + 1) * RANK) ** 2 * 2 * 4096})
        print(f"{K} clients: cross_term_error {diag * LLAMA_MODULES:.2f} s a round of 64 modules, FedIT "
              f"{agg * LLAMA_MODULES:.3f} s ({diag / agg:.0f}x)", flush=True)
        del buf, states, served
    x = np.log([r["clients"] for r in rows])
    fit = {k: float(np.polyfit(x, np.log([r[k] for r in rows]), 1)[0])
           for k in ("cross_term_error_s_per_module", "fedit_s_per_module")}
    out = {"command": ".venv/bin/python bench/diagnostics_cost.py", "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "shape": {"m": 4096, "n": 4096, "rank": RANK, "modules_timed": MODULES, "scaled_to": LLAMA_MODULES},
           "rows": rows, "growth_exponent": fit}
    print(f"growth exponents: {fit}")
    path = Path(__file__).resolve().parent / "results" / "diagnostics_cost.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
