"""FLoRA's downlink (issue 18) on a completed FLoRA run's real round updates, without a federated run.

The run's checkpoint holds its merge log: every round's stacked update B_s A_s (10 clients of rank 8: rank 80 per
module; MiniLM, conf/model/minilm.yaml: query and value of 6 layers and pooler.dense, all 384 x 384). For each
``strategy.downlink_tolerance`` (and ``comm.down`` codec) this re-factorises every logged round as the server now
does (:func:`fedlora.merges.compact`, then :func:`fedlora.merges.wire` and the codec) and reports:

* the bytes a 10-round run sends down, counted as ``bytes_down`` counts them (encoded ArrayRecords, Flower's
  per-array header included), with full participation: every client gets the head each round and merge v in round
  v + 1 (v = 1..9), against the legacy stacked merges (checked against the run's own ``bytes_down``) and FedIT
  (the global A and B at rank 8 and the head, every round);
* the kept rank per round (``downlink_rank``: mean over modules) and the merge error per round (``downlink_error``);
* the drift of the merged base after all 10 merges, ||Σ_v sent_v − Σ_v B_s A_s||_F / ||Σ_v B_s A_s||_F (open loop:
  in a real run clients would train on the truncated base, so accuracy needs a run to confirm).

    THREADS=1 .venv/bin/python bench/flora_downlink.py [--run runs/compare_seeds/seed_0/flora]   # writes
        bench/results/flora_downlink.json (about a minute; THREADS=1 on a busy 2-core machine, where two torch
        threads contending with other jobs made each small QR ~100x slower)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fedlora import checkpoint, codecs, merges  # noqa: E402
from fedlora.adapters import to_arrays  # noqa: E402
from fedlora.report import read_metrics  # noqa: E402
from fedlora.strategies.base import record_bytes, to_record  # noqa: E402

TOLERANCES = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 5e-2, 1e-1, 2e-1)
CODECS = (("bf16", (0.0, 1e-2, 5e-2)), ("int8", (0.0, 1e-2, 5e-2, 1e-1)), ("nf4", (0.0, 5e-2)))


def merge_arrays(entry, version: int, codec: codecs.Codec) -> dict[str, np.ndarray]:
    """One version's merge as the server's payload carries it (coded kinds under a lossy codec)."""
    mark = codecs.CODED_MERGE if codec.lossy else ""
    return {f"{merges.PREFIX}{version}.{name}.{mark}{kind}": a
            for name, f in entry.items() for kind, a in merges.wire(f).items()}


def down_bytes(arrays: dict, codec: codecs.Codec) -> int:
    return record_bytes(to_record(codecs.encode(codec, arrays)))


def measure(entries, head, tol: float | None, codec: codecs.Codec, clients: int, rounds: int) -> dict:
    """Bytes, ranks, errors and drift of one setting over the logged rounds (tol None: the stacked merges as logged)."""
    exact, sent, per_round = {}, {}, []
    total_bytes = clients * down_bytes(head, codec)  # round 1: the head only
    for v, stacked in enumerate(entries, start=1):
        t0 = time.perf_counter()
        if tol is None:
            entry, info = stacked, {n: (f.rank, 0.0, 1.0) for n, f in stacked.items()}
        else:
            entry, info = merges.compact(stacked, tol)
        secs = time.perf_counter() - t0
        arrays = merge_arrays(entry, v, codec)
        if v < rounds:  # merge v travels in round v + 1, with the head
            total_bytes += clients * down_bytes({**arrays, **head}, codec)
        got = merges.parse_payload(codecs.decode(codec, codecs.encode(codec, arrays)))[v]
        for name, f in stacked.items():
            exact[name] = exact.get(name, 0) + f.delta()
            sent[name] = sent.get(name, 0) + got[name]
        norm = sum(x[2] ** 2 for x in info.values()) ** 0.5
        per_round.append({"version": v, "downlink_rank": float(np.mean([x[0] for x in info.values()])),
                          "downlink_rank_max": max(x[0] for x in info.values()),
                          "downlink_error": (sum(x[1] ** 2 for x in info.values()) ** 0.5 / norm) if tol is not None
                          else 0.0,
                          "merge_bytes_per_client": down_bytes(arrays, codec), "refactor_s": round(secs, 4)})
    num = sum(float((sent[n] - exact[n]).square().sum()) for n in exact)
    den = sum(float(exact[n].square().sum()) for n in exact)
    return {"bytes_down_10_rounds": total_bytes, "merged_base_drift": (num / den) ** 0.5, "rounds": per_round}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/compare_seeds/seed_0/flora", help="a completed FLoRA run directory")
    ap.add_argument("--fedit-run", default="runs/compare_seeds/seed_0/fedit",
                    help="the FedIT run of the same comparison")
    ap.add_argument("--out", default="bench/results/flora_downlink.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    t_start = time.time()
    run = ROOT / args.run
    ck = checkpoint.load(run)
    summary = json.loads((run / "summary.json").read_text())
    rows = read_metrics(run)
    clients, rounds = int(summary["num_clients"]), int(summary["num_rounds"])
    assert summary["strategy"] == "flora" and ck["round"] == rounds, "a completed FLoRA run is needed"
    log = ck["strategy"]["rule"]["log"]
    entries = log.entries
    head = to_arrays(ck["strategy"]["state"], parts=("extra",))
    shapes = {n: (f.B.shape[0], f.A.shape[1]) for n, f in entries[0].items()}
    r = 8  # model.lora.r of the run (config.yaml), every client
    fp32 = codecs.Codec("fp32")

    def fedit_bytes(codec):
        g = {f"{n}.{k}": np.ones(s, np.float32) for n, (m, nn) in shapes.items()
             for k, s in (("lora_A", (r, nn)), ("lora_B", (m, r)))}
        return rounds * clients * down_bytes({**g, **head}, codec)

    command = f"THREADS={torch.get_num_threads()} .venv/bin/python bench/flora_downlink.py " + " ".join(sys.argv[1:])
    out = {"command": command.strip(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
           "run": args.run, "clients": clients, "rounds": rounds, "client_rank": r,
           "modules": {"count": len(shapes), "shapes": sorted({f"{m}x{n}" for m, n in shapes.values()})},
           "stacked_rank": sorted({f.rank for e in entries for f in e.values()}),
           "run_bytes_down": summary["bytes_down"], "run_final_eval_accuracy": summary["final_eval_accuracy"],
           "run_downlink_ratio_last": rows[-1].get("downlink_ratio")}
    fedit_run = ROOT / args.fedit_run
    if (fedit_run / "summary.json").exists():
        fs = json.loads((fedit_run / "summary.json").read_text())
        out["fedit_run_bytes_down"], out["fedit_run_final_eval_accuracy"] = fs["bytes_down"], fs["final_eval_accuracy"]
    out["fedit_bytes_down_10_rounds"] = {"fp32": fedit_bytes(fp32)}
    legacy = measure(entries, head, None, fp32, clients, rounds)
    out["stacked"] = {"bytes_down_10_rounds": legacy["bytes_down_10_rounds"],
                      "ratio_to_fedit": legacy["bytes_down_10_rounds"] / out["fedit_bytes_down_10_rounds"]["fp32"]}
    settings = [("fp32", t) for t in TOLERANCES] + [(c, t) for c, ts in CODECS for t in ts]
    out["refactored"] = []
    for name, tol in settings:
        c = codecs.Codec(name)
        if name not in out["fedit_bytes_down_10_rounds"]:
            out["fedit_bytes_down_10_rounds"][name] = fedit_bytes(c)
        res = measure(entries, head, tol, c, clients, rounds)
        row = {"codec": name, "downlink_tolerance": tol, "bytes_down_10_rounds": res["bytes_down_10_rounds"],
               "ratio_to_fedit_fp32": res["bytes_down_10_rounds"] / out["fedit_bytes_down_10_rounds"]["fp32"],
               "ratio_to_fedit_same_codec": res["bytes_down_10_rounds"] / out["fedit_bytes_down_10_rounds"][name],
               "downlink_rank_mean": float(np.mean([x["downlink_rank"] for x in res["rounds"]])),
               "downlink_error_max": max(x["downlink_error"] for x in res["rounds"]),
               "merged_base_drift": res["merged_base_drift"],
               "refactor_s_per_round": float(np.mean([x["refactor_s"] for x in res["rounds"]])),
               "rounds": res["rounds"]}
        out["refactored"].append(row)
        print(f"{name:5s} tol {tol:<7g} bytes {row['bytes_down_10_rounds']:>11,d}  x FedIT fp32 "
              f"{row['ratio_to_fedit_fp32']:6.2f}  rank {row['downlink_rank_mean']:6.1f}  "
              f"err max {row['downlink_error_max']:.2e}  drift {row['merged_base_drift']:.2e}", flush=True)
    out["wall_s"] = round(time.time() - t_start, 1)
    path = ROOT / args.out
    path.write_text(json.dumps(out, indent=1))
    print(f"stacked: {out['stacked']['bytes_down_10_rounds']:,d} bytes ({out['stacked']['ratio_to_fedit']:.2f}x FedIT; "
          f"the run counted {summary['bytes_down']:,d}); wrote {path}")


if __name__ == "__main__":
    main()
