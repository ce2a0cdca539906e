"""Scale (issue 18): simulated federations of 10, 100 and 1,000 clients on tiny_llama, 10 / 50 / 100 of them
training per round (fraction_train 1.0 / 0.5 / 0.1), 2 local steps, for fedit, ffa_lora and flora. Per
(strategy, size): the server's aggregation time per round, its peak memory, bytes per round, start-up time and
the total wall time; then the growth exponent b of figure ~ a * x^b (least squares on log-log over the sizes; x:
clients per round, or total clients for start-up and memory).

  python bench/scale.py                                  -> bench/results/scale.json
  python bench/scale.py --sizes 10 20 --out /tmp/s.json  (smoke)

Each configuration runs in a fresh subprocess (so the peak RSS of one does not carry over to the next) through
the real ServerApp loop (:func:`fedlora.strategies.server_app.run_server`) and the real ClientApp functions in
the same process (the in-process grid of tests/harness.py: no Ray, no SuperLink). The simulated clients therefore
share the server's process: their time is measured (wrapped ``train_fn`` / ``query``) and taken out of the
server's, and what they keep in their ``context.state`` (FLoRA's merged base per node) is reported beside the
server's memory. Figures per round are the median over rounds 2..num_rounds (round 1 pays first-call costs);
with --repeats, seconds are the fastest repeat's and other figures the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {10: 1.0, 100: 0.5, 1000: 0.1}  # total clients -> fraction_train (10 / 50 / 100 train per round)
# small data per client: 8,000 rows, 5% of them the server's validation split, leave 7-8 rows per client at 1,000
BASE = ["model=tiny_llama", "local_steps=2", "num_rounds=3", "train.batch_size=4", "train.max_length=32",
        "eval.max_examples=16", "eval.batch_size=16", "data.max_train_examples=8000", "round_timeout=600"]


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def held_bytes(record_dict) -> int:
    """Bytes of the arrays a node keeps in its context.state (FLoRA: its merged base, float64)."""
    from flwr.app import ArrayRecord

    return sum(len(a.data) for r in record_dict.values() if isinstance(r, ArrayRecord) for a in r.values())


def child(strategy: str, clients: int, fraction: float, rounds: int, extra: list[str], spawned: float) -> dict:
    """One configuration, in this (fresh) process: the figures as a dict."""
    t_main = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import resource

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))  # the in-process grid lives in tests/harness.py (a test helper), used as is
    import harness  # noqa: E402

    import fedlora.clients.client_app as ca
    from fedlora import config, data, models, report
    from fedlora.strategies import base, server_app
    from fedlora.simulation import quiet_libraries

    quiet_libraries(verbose=False)
    t_imports = time.time()

    marks: dict = {"partition_s": 0.0, "partition_calls": 0}
    per_round: dict[int, dict] = {}
    cur = {"round": 0}

    def timed(obj, name, key, per_round_key=None):
        """Wrap obj.name: its seconds add up in marks[key] (and in the current round's per_round_key)."""
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                marks[key] = marks.get(key, 0.0) + dt
                if per_round_key:
                    r = per_round.setdefault(cur["round"], {})
                    r[per_round_key] = r.get(per_round_key, 0.0) + dt
        setattr(obj, name, wrapper)

    def count_partition(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                marks["partition_s"] += time.perf_counter() - t0
                marks["partition_calls"] += 1
        return wrapper

    data.partition = count_partition(data.partition)  # client_app calls data.partition(...) through the module
    timed(data, "split", "split_s")
    timed(models, "build", "model_build_s")
    timed(server_app, "discover", "handshake_s")
    timed(ca, "query", "client_query_s")
    timed(ca, "train_fn", "client_s", "client_s")  # the grid looks ca.train_fn up at every message
    timed(base.LoraStrategy, "release", "release_s", "release_s")  # to_state + the strategy's aggregate + record

    configure, aggregate = base.LoraStrategy.configure_round, base.LoraStrategy.aggregate_round

    def configure_round(self, server_round, grid):
        cur["round"] = server_round
        if server_round == 1:
            marks["round1_start"] = time.time()
        per_round.setdefault(server_round, {})["rss_start"] = rss_bytes()
        t0 = time.perf_counter()
        plan = configure(self, server_round, grid)
        per_round.setdefault(server_round, {})["configure_s"] = time.perf_counter() - t0
        return plan

    def aggregate_round(self, server_round, replies, sent=None):
        t0 = time.perf_counter()
        res = aggregate(self, server_round, replies, sent)
        per_round.setdefault(server_round, {})["aggregate_s"] = time.perf_counter() - t0
        return res

    base.LoraStrategy.configure_round, base.LoraStrategy.aggregate_round = configure_round, aggregate_round

    class Grid(harness.InProcessGrid):
        """The harness's grid without its record of every message sent (a test aid that would hold every payload)."""

        def send_and_receive(self, messages, timeout=None):
            out = super().send_and_receive(messages, timeout)
            self.sent.clear()
            return out

    overrides = BASE + [f"strategy={strategy}", f"num_clients={clients}", f"fraction_train={fraction}",
                        f"num_rounds={rounds}", "min_train_nodes=2"] + extra
    t0 = time.time()
    cfg = config.load(overrides)
    t_config = time.time()
    grid = Grid(clients)
    t_grid = time.time()
    # warm-up, so that the memory figure is what the run adds: the libraries a model build imports and the data set
    # (cached per process, the run reuses it) are loaded before the baseline RSS is read
    models.build(cfg)
    data.split(cfg)
    marks["model_build_s"] = marks["split_s"] = 0.0
    t_warm = time.time()
    rss0 = rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        summary = server_app.run_server(grid, cfg, Path(tmp) / "run", echo=lambda *_: None)
        rows = report.read_metrics(Path(tmp) / "run")
    t_end = time.time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    client_held = sum(held_bytes(c.state) for c in grid.contexts.values())

    later = [r for r in rows if r["round"] >= 2] or [r for r in rows if r["round"] >= 1]
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    pr = [per_round.get(r["round"], {}) for r in later]
    round_s = [r["round_s"] for r in later]
    server_s = [r["round_s"] - p.get("client_s", 0.0) - r.get("eval_s", 0.0) for r, p in zip(later, pr)]
    return {
        "strategy": strategy, "clients": clients, "fraction_train": fraction,
        "clients_per_round": med([r["num_clients"] for r in later]), "status": summary["status"],
        "aggregate_s": med([p["aggregate_s"] for p in pr]),  # aggregate_round: check replies + aggregate + metrics
        "release_s": med([p.get("release_s", 0.0) for p in pr]),  # of which the aggregation maths
        "configure_s": med([p["configure_s"] for p in pr]),  # sampling + building the round's messages
        "server_round_s": med(server_s),  # round_s - clients' time - evaluation
        "clients_round_s": med([p.get("client_s", 0.0) for p in pr]),
        "eval_s": med([r.get("eval_s", 0.0) for r in later]),
        "round_s": med(round_s),
        "bytes_up": med([r["bytes_up"] for r in later]), "bytes_down": med([r["bytes_down"] for r in later]),
        "peak_rss": peak, "rss_before_run": rss0, "peak_rss_growth": peak - rss0,
        "client_state_bytes": client_held,  # held by the simulated nodes (in a deployment: on the nodes)
        "server_peak_growth": peak - rss0 - client_held,
        "startup_s": marks["round1_start"] - spawned,  # process start to round 1 start
        "startup": {"interpreter_and_imports_s": t_imports - spawned, "config_s": t_config - t0,
                    "grid_s": t_grid - t_config, "warmup_s": t_warm - t_grid,
                    "model_build_s": marks.get("model_build_s", 0.0),
                    "data_split_s": marks.get("split_s", 0.0), "handshake_s": marks.get("handshake_s", 0.0),
                    "partition_s": marks["partition_s"], "partition_calls": marks["partition_calls"],
                    "round0_eval_s": rows[0].get("eval_s", 0.0),
                    "run_to_round1_s": marks["round1_start"] - t_warm},
        "by_round": {k: [r.get(k) for r in rows[1:]] for k in ("num_clients", "bytes_up", "bytes_down", "round_s")},
        "rss_at_round_start": [per_round[r].get("rss_start") for r in sorted(per_round) if r >= 1],
        "wall_s": t_end - spawned, "main_s": t_end - t_main,
    }


def combine(runs: list[dict]) -> dict:
    """The repeats of one configuration as one: seconds (keys ending in ``_s``, also inside ``startup``) the fastest
    repeat's (each a median over rounds; on a shared machine the other jobs only ever add time), other numbers
    the median, lists the first run's; ``repeats``: each run's main figures."""
    def pick(key, vals):
        if all(isinstance(v, dict) for v in vals):
            return {k: pick(k, [v[k] for v in vals]) for k in vals[0]}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return vals[0]
        if key.endswith("_s"):
            return min(vals)
        return statistics.median_low(vals) if all(isinstance(v, int) for v in vals) else statistics.median(vals)

    out = pick("", runs)
    out["handshake_s"] = out["startup"]["handshake_s"]
    out["repeats"] = {k: [r[k] for r in runs] for k in ("aggregate_s", "release_s", "configure_s", "server_round_s",
                                                        "startup_s", "peak_rss_growth", "wall_s")}
    return out


def fit(xs, ys) -> float | None:
    """b of y ~ a x^b by least squares on log-log (None with fewer than two positive points)."""
    import numpy as np

    pts = [(x, y) for x, y in zip(xs, ys) if y and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


#: figure -> what it is fitted against
FITTED = {"aggregate_s": "clients_per_round", "release_s": "clients_per_round", "configure_s": "clients_per_round",
          "server_round_s": "clients_per_round", "clients_round_s": "clients_per_round",
          "bytes_up": "clients_per_round", "bytes_down": "clients_per_round",
          "peak_rss_growth": "clients", "server_peak_growth": "clients", "client_state_bytes": "clients",
          "startup_s": "clients", "handshake_s": "clients", "wall_s": "clients_per_round"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--fractions", type=float, nargs="+", help="fraction_train per size (default 1.0 / 0.5 / 0.1)")
    ap.add_argument("--strategies", nargs="+", default=["fedit", "ffa_lora", "flora"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh processes per configuration (seconds: the fastest; others: the median)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. train.batch_size=8")
    ap.add_argument("--child", nargs=4, metavar=("STRATEGY", "CLIENTS", "FRACTION", "SPAWNED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        s, n, f, spawned = a.child
        print("RESULT " + json.dumps(child(s, int(n), float(f), a.rounds, a.overrides, float(spawned))))
        return

    fractions = a.fractions or [SIZES.get(n, 1.0) for n in a.sizes]
    load0, t0, results = os.getloadavg(), time.time(), []
    for strategy in a.strategies:
        for n, f in zip(a.sizes, fractions):
            runs = []
            for _ in range(a.repeats):
                cmd = [sys.executable, __file__, "--rounds", str(a.rounds), "--child", strategy, str(n), str(f),
                       repr(time.time()), *a.overrides]
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
                line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
                if p.returncode or line is None:
                    sys.exit(f"{strategy} with {n} clients failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
                runs.append(json.loads(line[len("RESULT "):]))
            r = combine(runs)
            results.append(r)
            print(f"{strategy:9s} {n:5d} clients: wall {r['wall_s']:.1f}s, start-up {r['startup_s']:.1f}s, "
                  f"aggregate {r['aggregate_s'] * 1e3:.1f} ms/round", flush=True)

    of = lambda s: [r for r in results if r["strategy"] == s]  # noqa: E731
    exponents = {s: {k: fit([r[x] for r in of(s)], [r[k] for r in of(s)]) for k, x in FITTED.items()}
                 for s in a.strategies}
    import torch

    out = {
        "command": " ".join([Path(sys.executable).name, "bench/scale.py", *sys.argv[1:]]),
        "settings": BASE + a.overrides, "sizes": dict(zip(a.sizes, fractions)), "rounds": a.rounds,
        "repeats": a.repeats,
        "per_round_figures": f"median over rounds 2..{a.rounds}; seconds: the fastest of {a.repeats} repeats (fresh "
                             "processes), other figures their median",
        "memory_method": "peak RSS (resource.getrusage ru_maxrss) of a fresh subprocess per configuration, minus its "
                         "RSS after imports, grid creation and a warm-up (one model build, the data set loaded) "
                         "(peak_rss_growth); server_peak_growth also subtracts "
                         "the arrays the simulated nodes keep in context.state (client_state_bytes). Simulated "
                         "clients run in the server's process, so their transient training memory is included.",
        "exponents_fitted_against": FITTED, "exponents": exponents, "results": results,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": 1, "loadavg_start": load0,
                    "loadavg_end": os.getloadavg(),
                    "note": "shared machine: other benchmark jobs ran at the same time, timings are inflated"},
        "wall_s": time.time() - t0,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")

    cols = ["aggregate_s", "configure_s", "server_round_s", "bytes_up", "bytes_down", "server_peak_growth",
            "startup_s"]
    print(f"\n{'strategy':9s} {'clients':>7s} {'/round':>6s} {'agg ms':>8s} {'conf ms':>8s} {'server ms':>9s} "
          f"{'up KB':>9s} {'down KB':>9s} {'mem MB':>7s} {'start s':>7s}")
    for r in results:
        print(f"{r['strategy']:9s} {r['clients']:7d} {r['clients_per_round']:6.0f} {r['aggregate_s'] * 1e3:8.1f} "
              f"{r['configure_s'] * 1e3:8.1f} {r['server_round_s'] * 1e3:9.1f} {r['bytes_up'] / 1024:9.1f} "
              f"{r['bytes_down'] / 1024:9.1f} {r['server_peak_growth'] / 2**20:7.1f} {r['startup_s']:7.1f}")
    for s in a.strategies:
        print(f"{s:9s} exponent b: " + ", ".join(f"{k} {exponents[s][k]:.2f}" for k in cols
                                                  if exponents[s][k] is not None))
    print("exponents vs clients per round (start-up and memory: vs total clients)")
    print(f"wrote {a.out} ({out['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
