"""The server's message building on Llama-7B-shaped adapters: ``LoraStrategy.build_messages`` (one TRAIN message a
node: the payload, its ``comm.down`` encoding and its serialised ArrayRecord) for FedIT at 10 and 100 nodes, fp32,
fp16 and int8 downlinks, 1 torch thread, the fastest of 3 rounds built. Nodes that get the same payload share one
encoding and one serialised record, so the time should not grow with the nodes beyond a small cost a node.

    .venv/bin/python bench/messages.py   # writes bench/results/messages.json (about 30 s)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedlora import config, strategies  # noqa: E402
from fedlora.adapters import AdapterState, LoraFactors  # noqa: E402
from strategies.base import NodeInfo  # noqa: E402

SHAPES = {f"layers.{layer}.{m}": (4096, 4096) for layer in range(32) for m in ("q", "v")}


def build_time(nodes: int, down: str) -> dict:
    cfg = config.load(["strategy=fedit", f"num_clients={nodes}", "fraction_train=1.0", f"comm.down={down}"])
    g = torch.Generator().manual_seed(0)
    init = AdapterState({n: LoraFactors(torch.randn(16, 4096, generator=g), torch.randn(4096, 16, generator=g), 2.0)
                         for n in SHAPES}, {})
    s = strategies.get("fedit")(cfg, init, SHAPES)
    s.nodes = {100 + i: NodeInfo(100 + i, i, 50, 16, 32.0) for i in range(nodes)}
    times = []
    for _ in range(3):
        t = time.perf_counter()
        plan = s.build_messages(1)
        times.append(time.perf_counter() - t)
    return {"nodes": nodes, "comm_down": down, "build_messages_s": min(times), "messages": len(plan.messages),
            "bytes_down": plan.bytes_down, "records": len({id(m.content["arrays"]) for m in plan.messages})}


def main() -> None:
    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # (a Message needs a run outside Flower)
    rows = []
    for nodes in (10, 100):
        for down in ("fp32", "fp16", "int8"):
            rows.append(build_time(nodes, down))
            print(json.dumps(rows[-1]), flush=True)
    out = {"command": ".venv/bin/python bench/messages.py", "threads": 1,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", "runs": rows}
    path = Path(__file__).resolve().parent / "results" / "messages.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
