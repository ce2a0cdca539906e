"""Framework overhead per round: a simulated federation (Flower simulation, Ray backend) against the same
local training done in a plain loop in one process. Ray start-up is reported separately.

  python bench/overhead.py [num_clients=8 local_steps=20 num_rounds=3 ...]   -> bench/results/overhead.json

Per round, the framework's time is ``round_s - eval_s`` (the server's evaluation is product work that the plain
loop does not do; it is reported beside). The plain loop trains the same clients (same partitions, steps, batch
size, model) one after the other with every core. overhead = framework / plain - 1.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedlora import adapters, batching, config, data, models, preflight, train  # noqa: E402
from fedlora.report import read_metrics  # noqa: E402
from fedlora.simulation import quiet_libraries, simulate  # noqa: E402

DEFAULTS = ["model=tiny_llama", "num_clients=8", "local_steps=20", "num_rounds=4", "eval.max_examples=200"]


def plain_round(cfg, bundle, rnd: int) -> float:
    """The local training of one round, all clients one after the other, no Flower."""
    coll = batching.Collator(bundle.tokenizer, bundle.task, int(cfg.train.max_length), cfg.data.get("label_words"))
    init = adapters.from_peft(bundle.model)
    t0 = time.perf_counter()
    for pid in range(int(cfg.num_clients)):
        adapters.load_into_peft(bundle.model, init)
        ds = data.partition(cfg, pid)
        steps = int(cfg.local_steps)
        train.local_train(bundle.model, ds, coll, steps=steps, batch_size=int(cfg.train.batch_size),
                          lr=float(cfg.train.lr), step_offset=(rnd - 1) * steps,
                          total_steps=int(cfg.num_rounds) * steps, scheduler=cfg.train.scheduler,
                          max_grad_norm=cfg.train.max_grad_norm,
                          seed=int(cfg.seed) * 1000 + pid, round_idx=rnd, task=bundle.task, device=bundle.device)
    return time.perf_counter() - t0


def ray_startup_s() -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    dt = time.perf_counter() - t0
    ray.shutdown()
    return dt


def main(argv: list[str]) -> dict:
    quiet_libraries(False)
    cfg = config.load(DEFAULTS + argv)
    preflight.check(cfg)
    out = ROOT / "bench" / "results" / "overhead.json"
    startup = ray_startup_s()
    with tempfile.TemporaryDirectory() as tmp:
        t_call = time.time()
        simulate(cfg, Path(tmp) / "run")
        rows = read_metrics(Path(tmp) / "run")
    first_round_ready = rows[0]["unix"] - t_call
    fed = [r["round_s"] - r["eval_s"] for r in rows[1:]]
    evals = [r["eval_s"] for r in rows[1:]]
    bundle = models.build(cfg)
    plain = [plain_round(cfg, bundle, rnd) for rnd in range(1, int(cfg.num_rounds) + 1)]
    # the first round of each includes warm-up (imports, first batch); medians over rounds 2..N
    fed_m, plain_m = statistics.median(fed[1:] or fed), statistics.median(plain[1:] or plain)
    result = {
        "command": "python bench/overhead.py " + " ".join(argv),
        "setting": {"model": cfg.model.name, "num_clients": cfg.num_clients, "local_steps": cfg.local_steps,
                    "num_rounds": cfg.num_rounds, "batch_size": cfg.train.batch_size,
                    "client_cpus": cfg.simulation.client_cpus, "cpus": os.cpu_count()},
        "ray_init_s": round(startup, 2),
        "startup_to_first_round_s": round(first_round_ready, 2),
        "framework_round_s": [round(x, 3) for x in fed],
        "plain_round_s": [round(x, 3) for x in plain],
        "server_eval_s": [round(x, 3) for x in evals],
        "framework_round_median_s": round(fed_m, 3),
        "plain_round_median_s": round(plain_m, 3),
        "overhead": round(fed_m / plain_m - 1.0, 4),
        "target": "overhead <= 0.15",
        "met": fed_m / plain_m - 1.0 <= 0.15,
        "torch": torch.__version__, "python": platform.python_version(),
        "note": "medians over rounds 2..N; framework time excludes the server's evaluation (listed separately)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
