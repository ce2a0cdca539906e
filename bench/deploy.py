"""Deployed vs simulated: the same fedlora run on a secured loopback federation and in Flower's simulation.

    .venv/bin/python bench/deploy.py [--out bench/results/deploy.json] [hydra overrides...]
    .venv/bin/python bench/deploy.py --model smollm2 --nodes 1 --skip-simulated   # -> deploy_smollm2.json

``--model smollm2``: SmolLM2-135M-Instruct (issue 19) instead of tiny_llama, 2 rounds of fedit at batch 8 and max
length 96 (SMOLLM2 below), written to bench/results/deploy_smollm2.json unless --out says otherwise; ``--nodes``
SuperNodes (default 3; num_clients and min_train_nodes follow it). ``--skip-simulated``: the deployed run alone.
Every process started (SuperLink, SuperNodes, the ClientApps below them) is stopped by PID at the end
(tests/federation.py ``LocalFederation.stop``) and the result records that none is left.

Deployed: a SuperLink (TLS + SuperNode authentication) and 3 SuperNodes with registered keys on 127.0.0.1,
started with `fedlora deploy superlink|supernode`, the run submitted with `flwr run . NAME` (the same path as
tests/test_deploy.py). Simulated: `fedlora run` with the same overrides (Ray backend, in one process tree).
Per-round bytes and wall time come from each run directory's metrics.jsonl (written by the ServerApp in both
cases); Flower's own accounting of the deployed run (`flwr ls`: network bytes, ServerApp/ClientApp seconds)
and the end-to-end time of each command are recorded beside them, with the load average (shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The loopback federation harness is test code (tests/federation.py), not part of the fedlora package.
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from federation import LocalFederation  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2"
DEFAULT = ["strategy=ffa_lora", "model=tiny_llama", "num_clients=3", "num_rounds=2", "local_steps=1",
           "train.batch_size=4", "eval.max_examples=32", "seed=0"]
NOTES = ("bytes_up/bytes_down are the serialized adapter arrays the strategy sends and receives (identical by "
         "construction in both modes); Flower's network-traffic of the deployed run adds the run config, message "
         "metadata and the QUERY handshake (round 0). Deployed rounds are slower because every ClientApp message "
         "starts a fresh process (imports torch/transformers, rebuilds the model and the partition) while simulation "
         "keeps Ray actors warm after round 1 (its round 1 includes actor start-up); all on 2 shared cores, see "
         "load_average_1min.")
SMOLLM2 = ["strategy=fedit", "model=smollm2", "num_rounds=2", "local_steps=2", "train.batch_size=8",
           "train.max_length=96", "eval.max_examples=32", "seed=0"]
KEYS = ("round", "num_clients", "bytes_up", "bytes_down", "round_s", "wall_s", "train_loss", "eval_loss",
        "eval_accuracy")


def rows(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: r[k] for k in KEYS if k in r})
    return out


def totals(rs: list[dict]) -> dict:
    rounds = [r for r in rs if r["round"] > 0]
    return {"bytes_up": sum(r["bytes_up"] for r in rounds), "bytes_down": sum(r["bytes_down"] for r in rounds),
            "rounds_wall_s": round(rounds[-1]["wall_s"], 2),
            "mean_round_s": round(sum(r["round_s"] for r in rounds) / len(rounds), 2),
            "final_eval_loss": rs[-1].get("eval_loss"), "final_eval_accuracy": rs[-1].get("eval_accuracy")}


def comparison(result: dict) -> dict:
    """Deployed vs simulated, from the recorded rounds (and Flower's accounting of the deployed run)."""
    dep, sim = result["deployed"]["rounds"], result["simulated"]["rounds"]
    dep_s = [round(r["round_s"], 2) for r in dep if r["round"] > 0]
    sim_s = [round(r["round_s"], 2) for r in sim if r["round"] > 0]
    arrays = result["deployed"]["totals"]["bytes_up"] + result["deployed"]["totals"]["bytes_down"]
    wire = (result["deployed"].get("flower_accounting") or {}).get("network-traffic", {}).get("total-bytes")
    return {
        "same_bytes_per_round": all(a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
                                    for a, b in zip(dep, sim)),
        "same_eval_loss_per_round": all(abs(a.get("eval_loss", 0) - b.get("eval_loss", 0)) < 1e-6
                                        for a, b in zip(dep, sim)),
        "round_s_deployed": dep_s, "round_s_simulated": sim_s,
        "last_round_s_ratio_deployed_over_simulated": round(dep_s[-1] / max(sim_s[-1], 1e-9), 1),
        "adapter_bytes_total": arrays, "flower_network_bytes_total": wire,
        "flower_network_overhead": round(wire / arrays - 1, 3) if wire else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="default: bench/results/deploy.json (tiny_llama), "
                                                "deploy_<model>.json otherwise")
    ap.add_argument("--keep", help="keep the work directory here (default: a temp dir, removed)")
    ap.add_argument("--model", choices=["tiny_llama", "smollm2"], default="tiny_llama")
    ap.add_argument("--nodes", type=int, default=3, help="SuperNodes (= num_clients)")
    ap.add_argument("--skip-simulated", action="store_true", help="only the deployed run")
    args, extra = ap.parse_known_args()
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / ("deploy.json" if args.model == "tiny_llama"
                                                     else f"deploy_{args.model}.json"))
    base = DEFAULT if args.model == "tiny_llama" else SMOLLM2
    base = [o for o in base if not o.startswith("num_clients=")] + [f"num_clients={args.nodes}"]
    if args.nodes < 2:
        base.append(f"min_train_nodes={args.nodes}")
    overrides = base + [f"data.path={SST2}"] + extra
    work = Path(args.keep or tempfile.mkdtemp(prefix="fedlora-bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    load = {"before": os.getloadavg()[0]}
    result: dict = {"command": " ".join([".venv/bin/python", "bench/deploy.py", *sys.argv[1:]]),
                    "overrides": " ".join(overrides), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        import flwr
        import torch

        result["versions"] = {"flwr": flwr.__version__, "torch": torch.__version__}
    except Exception:  # noqa: BLE001
        pass

    # Deployed ---------------------------------------------------------------------------------
    dep_dir = work / "deployed" / "run"
    t0 = time.time()
    with LocalFederation(work / "deployed", nodes=args.nodes, data=str(SST2), profile="cpu") as fed:
        fed.start()
        t_up = time.time() - t0
        t1 = time.time()
        run_id, info, log = fed.run(" ".join(overrides + [f"out_dir={dep_dir}"]))
        t_run = time.time() - t1
        if info.get("status") != "finished:completed":
            print(log[-3000:], file=sys.stderr)
            raise SystemExit(f"deployed run ended as {info.get('status')}")
        nodes = json.loads((dep_dir / "nodes.json").read_text())
        result["config"] = {**yaml.safe_load((dep_dir / "config.yaml").read_text()), "out_dir": "RUN_DIR"}
    started = sorted({p.pid for p in fed.procs} | {p.pid for p in fed._seen})
    result["processes"] = {"started_pids": started, "left_running_after_stop": fed.leftovers()}
    load["after_deployed"] = os.getloadavg()[0]
    dep_rows = rows(dep_dir)
    result["deployed"] = {
        "command": ("flwr run . rehearsal --run-config " + shlex.quote(
            "hydra-overrides=" + json.dumps(" ".join(overrides + ["out_dir=RUN_DIR"]))) + " --stream"),
        "federation": f"1 SuperLink (--ssl-* certs, --enable-supernode-auth) + {args.nodes} SuperNode(s) "
                      "(registered P-384 keys, "
                      "--root-certificates ca.crt, node config partition-id/num-partitions/data-path/profile) "
                      "on 127.0.0.1, started with `fedlora deploy superlink|supernode` "
                      "(bench uses LocalFederation from tests/federation.py)",
        "startup_s": round(t_up, 1), "flwr_run_s": round(t_run, 1),
        "flower_accounting": {k: info.get(k) for k in ("status", "elapsed", "network-traffic", "compute-time")},
        "nodes": [{k: n[k] for k in ("partition_id", "device")} | {"profile": n["extra"].get("profile")}
                  for n in nodes],
        "rounds": dep_rows, "totals": totals(dep_rows),
    }

    result["load_average_1min"] = load
    if args.skip_simulated:
        result["wall_s"] = round(time.time() - t0, 1)
        result["notes"] = ("deployed run only (--skip-simulated); every ClientApp message starts a fresh process "
                           "that loads the model; 2 shared CPU cores, see load_average_1min")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"deployed: {result['deployed']['totals']}; processes {result['processes']}\n-> {args.out}")
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        return 0

    # Simulated --------------------------------------------------------------------------------
    sim_dir = work / "simulated" / "run"
    cmd = [sys.executable, "-m", "fedlora.cli", "run", *overrides, f"out_dir={sim_dir}"]
    env = {**os.environ, "FLWR_HOME": str(work / "simulated" / "flwr_home")}
    t1 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    t_sim = time.time() - t1
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-2000:], file=sys.stderr)
        raise SystemExit("simulated run failed")
    load["after_simulated"] = os.getloadavg()[0]
    sim_rows = rows(sim_dir)
    result["simulated"] = {
        "command": "fedlora run " + " ".join(overrides + ["out_dir=RUN_DIR"]),
        "fedlora_run_s": round(t_sim, 1), "rounds": sim_rows, "totals": totals(sim_rows),
    }
    result["load_average_1min"] = load
    result["comparison"] = comparison(result)
    result["notes"] = NOTES
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("comparison", "load_average_1min")}, indent=2))
    print(f"deployed: {result['deployed']['totals']}\nsimulated: {result['simulated']['totals']}\n-> {args.out}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
