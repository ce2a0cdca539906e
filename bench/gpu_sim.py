"""GPU accounting of the simulation (issue 20, item 8), for ``bench/gpu_checks.sh`` on a CUDA machine: a 2-client
federation of tiny_llama on generated data with ``simulation.client_gpus=0.5``, so Ray places both ClientApp
actors on one GPU (each with its own ``CUDA_VISIBLE_DEVICES``). Every actor records, after each message it
handled, its PID, ``CUDA_VISIBLE_DEVICES``, the device it computes on (``cuda:0`` inside the actor is the GPU Ray
gave it; its UUID names the physical one) and ``torch.cuda.max_memory_allocated``/``max_memory_reserved``; a
sampler reads each process's GPU memory from ``nvidia-smi`` (CUDA context included). The records come from a
Flower mod wrapped around fedlora's ClientApp here, in the benchmark only: the ClientApp is unchanged.

    OUT=/some/dir python bench/gpu_sim.py --out $OUT/gpu_sim.json          # the GPU check (exit 1 if it fails)
    python bench/gpu_sim.py --client-gpus 0 --out /tmp/gpu_sim_cpu.json    # the same on a CPU-only machine

Checks (``ok`` in the JSON): the run completed; at least two distinct actor processes trained; with
``client_gpus > 0`` each of them saw exactly one GPU (the same one for 0.5 on a 1-GPU machine), computed on
``cuda:0`` and allocated memory there; with ``client_gpus = 0`` none saw a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_data(folder: Path, rows: int = 240, seed: int = 0) -> Path:
    """A small SST-2-shaped folder (train.tsv, dev.tsv; sentence, label) with a learnable signal."""
    rnd = random.Random(seed)
    pos, neg = ["good", "great", "fine", "lovely", "superb"], ["bad", "awful", "poor", "dull", "terrible"]
    filler = ["the", "film", "was", "quite", "and", "plot", "acting", "really", "story", "a"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", rows), ("dev.tsv", rows // 4)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            y = rnd.randint(0, 1)
            words = rnd.sample(filler, 5) + [rnd.choice(pos if y else neg)]
            rnd.shuffle(words)
            lines.append(f"{' '.join(words)}\t{y}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def recording_mod(records: str):
    """A Flower client mod that appends, after each message, what this actor process sees to
    ``records/<pid>.jsonl`` (the actors run on this machine)."""

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        import torch

        rec = {"pid": os.getpid(), "message": msg.metadata.message_type,
               "partition": int(ctx.node_config.get("partition-id", -1)),
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "time": time.time()}
        if torch.cuda.is_available():
            i = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(i)
            rec.update(device=f"cuda:{i}", device_count=torch.cuda.device_count(), device_name=props.name,
                       gpu_uuid=str(getattr(props, "uuid", "")),
                       max_memory_allocated=int(torch.cuda.max_memory_allocated(i)),
                       max_memory_reserved=int(torch.cuda.max_memory_reserved(i)))
        else:
            rec.update(device="cpu", device_count=0)
        with open(os.path.join(records, f"{os.getpid()}.jsonl"), "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        return reply

    return mod


def wrap_client_app(records: str):
    """Make ``fedlora.clients.client_app.make_app`` (what :func:`fedlora.simulation.simulate` calls) return fedlora's
    ClientApp behind :func:`recording_mod`."""
    from flwr.clientapp import ClientApp

    from fedlora.clients import client_app

    original = client_app.make_app

    def make_app(node_defaults=None):
        inner = original(node_defaults)
        outer = ClientApp(mods=[recording_mod(records)])

        @outer.query()
        def _query(msg, ctx):
            return inner(msg, ctx)

        @outer.train()
        def _train(msg, ctx):
            return inner(msg, ctx)

        return outer

    client_app.make_app = make_app


class SmiSampler(threading.Thread):
    """Peak GPU memory per process (MiB, CUDA context included) from ``nvidia-smi``, every ``period`` s."""

    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        self.period, self.peak, self.stop_flag = period, {}, threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def run(self):
        while self.available and not self.stop_flag.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                for line in out.stdout.strip().splitlines():
                    pid, uuid, mib = (x.strip() for x in line.split(","))
                    key = int(pid)
                    if mib.isdigit() and int(mib) >= self.peak.get(key, (0, ""))[0]:
                        self.peak[key] = (int(mib), uuid)
            except Exception:
                pass
            self.stop_flag.wait(self.period)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "gpu_sim.json"))
    ap.add_argument("--client-gpus", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from fedlora import config, preflight, simulation
    from fedlora.simulation import backend_config

    simulation.quiet_libraries(verbose=False)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_sim_"))
    records = tmp / "records"
    records.mkdir()
    cfg = config.load(["model=tiny_llama", "num_clients=2", f"num_rounds={args.rounds}", "local_steps=3",
                       f"data.path={write_data(tmp / 'data')}", "eval.max_examples=60", "train.batch_size=8",
                       f"simulation.client_gpus={args.client_gpus}", f"out_dir={tmp / 'run'}"])
    preflight.check(cfg)
    simulation.check_simulation(cfg)
    wrap_client_app(str(records))
    import torch

    result = {"client_gpus": args.client_gpus, "backend_config": backend_config(cfg),
              "cuda_available": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
    sampler = SmiSampler()
    sampler.start()
    t0 = time.time()
    try:
        summary = simulation.simulate(cfg, tmp / "run")
        result["status"] = summary.get("status")
    except Exception as e:  # the check fails below, with the reason in the JSON
        result["status"] = f"failed: {type(e).__name__}: {e}"
    result["wall_s"] = round(time.time() - t0, 1)
    sampler.stop_flag.set()
    sampler.join(timeout=15)
    if torch.cuda.is_available():
        result["driver"] = {"pid": os.getpid(), "max_memory_allocated": int(torch.cuda.max_memory_allocated()),
                            "note": "the ServerApp (global evaluation) runs in this process, outside Ray's accounting"}
    actors = {}
    for f in sorted(records.glob("*.jsonl")):
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        last = recs[-1]
        actors[last["pid"]] = {**{k: v for k, v in last.items() if k not in ("message", "time", "partition")},
                               "messages": [r["message"] for r in recs],
                               "partitions": sorted({r["partition"] for r in recs}),
                               "smi_peak_mib": sampler.peak.get(last["pid"], (None, None))[0]}
    result["actors"] = list(actors.values())
    trained = [a for a in actors.values() if "train" in a["messages"]]
    checks = {"completed": result["status"] == "completed", "two_actors_trained": len(trained) >= 2}
    if args.client_gpus > 0:
        checks["one_gpu_each"] = all(a["device_count"] == 1 and a["device"] == "cuda:0" for a in trained)
        checks["memory_on_gpu"] = all(a.get("max_memory_allocated", 0) > 0 for a in trained)
        if result["gpus"] == 1 and args.client_gpus == 0.5:
            checks["shared_one_gpu"] = len({a.get("gpu_uuid") for a in trained}) == 1
    else:
        checks["no_gpu_seen"] = all(a["device"] == "cpu" for a in trained)
    result["checks"], result["ok"] = checks, all(checks.values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("client_gpus", "status", "checks", "ok", "wall_s")}))
    for a in result["actors"]:
        print(f"  actor pid {a['pid']}: {a['device']} (CUDA_VISIBLE_DEVICES={a['cuda_visible_devices']}), "
              f"partitions {a['partitions']}, peak allocated {a.get('max_memory_allocated', 0) / 2**20:.1f} MiB, "
              f"nvidia-smi peak {a['smi_peak_mib']} MiB")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
