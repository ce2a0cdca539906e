"""End to end: `fedlora run` on tiny_llama writes the run directory, the saved adapter reloads with plain
PEFT and reproduces the final accuracy, audit files let anyone recompute the aggregation, and no process
is left behind."""

import json
import subprocess

import pytest
from conftest import ROOT, fedlora_cmd, tagged_env, tagged_pids
from safetensors.torch import load_file
from tolerances import assert_within, f32_tol

from fedlora import adapters, batching, config, data, models, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "fedit"
    p = subprocess.run(fedlora_cmd("run", "model=tiny_llama", "data=sst2", "num_clients=4", "num_rounds=2",
                                   "local_steps=3", "audit=true", "eval.max_examples=200", f"out_dir={out}"),
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env=tagged_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not tagged_pids(), "the run left processes behind (Ray's raylet, GCS or workers)"
    return out, p.stdout


def test_run_directory_layout(run_dir):
    out, stdout = run_dir
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / f).exists(), f
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("round", "strategy", "num_clients", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down", "wall_s"):
            assert key in r, key
        assert r["num_clients"] == 4 and r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert "[round   2/2]" in stdout
    cfg = config.from_yaml((out / "config.yaml").read_text())
    assert cfg.model.name == "tiny_llama" and cfg.num_rounds == 2
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_bytes_are_the_serialized_arrays(run_dir):
    out, _ = run_dir
    r = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    cfg = config.from_yaml((out / "config.yaml").read_text())
    n_mod = 2 * cfg.model.num_hidden_layers  # q_proj, v_proj
    raw = 4 * n_mod * 2 * cfg.model.lora.r * cfg.model.hidden_size * 4  # 4 clients, A and B, fp32
    assert raw < r["bytes_up"] < raw * 1.2  # + npy headers


def test_saved_adapter_reloads_with_plain_peft(run_dir):
    from peft import PeftModel

    out, _ = run_dir
    cfg = config.from_yaml((out / "config.yaml").read_text())
    base, tok = models.build_base(cfg.model, int(cfg.seed))
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    _, test = data.load(cfg.data)
    coll = batching.Collator(tok, cfg.model.task, cfg.train.max_length, cfg.data.label_words)
    res = train.evaluate(model, test, coll, task=cfg.model.task, max_examples=cfg.eval.max_examples)
    summary = json.loads((out / "summary.json").read_text())
    assert abs(res["eval_accuracy"] - summary["final_eval_accuracy"]) <= 0.002
    assert abs(res["eval_loss"] - summary["final_eval_loss"]) <= 1e-4


def test_audit_recomputes_fedit(run_dir):
    """Recompute each round's ΔW from the written client tensors alone (no strategy code)."""
    out, _ = run_dir
    for rnd in (1, 2):
        d = out / "audit" / f"round_{rnd:04d}"
        clients = sorted(d.glob("client_*.safetensors"))
        assert len(clients) == 4
        states = [adapters.load_file(c) for c in clients]
        from safetensors import safe_open

        n = []
        for c in clients:
            with safe_open(str(c), "pt") as fh:
                n.append(float(fh.metadata()["num_examples"]))
        p = [x / sum(n) for x in n]
        written = load_file(str(d / "delta.safetensors"))
        prev = None
        if rnd > 1:  # the previous global: its clients' average
            pd = out / "audit" / f"round_{rnd - 1:04d}"
            pcl = sorted(pd.glob("client_*.safetensors"))
            pn = []
            for c in pcl:
                with safe_open(str(c), "pt") as fh:
                    pn.append(float(fh.metadata()["num_examples"]))
            pp = [x / sum(pn) for x in pn]
            pst = [adapters.load_file(c) for c in pcl]
            prev = {m: (sum(w * s.lora[m].B.double() for w, s in zip(pp, pst)), sum(w * s.lora[m].A.double() for w, s in zip(pp, pst)), pst[0].lora[m].scale) for m in pst[0].lora}
        def magnitude(ws, sts, m):  # s (sum_k p_k |B_k|)(sum_k p_k |A_k|): the sum of |terms| of s B_bar A_bar
            return sts[0].lora[m].scale * (sum(w * s.lora[m].B.double().abs() for w, s in zip(ws, sts))
                                           @ sum(w * s.lora[m].A.double().abs() for w, s in zip(ws, sts)))

        for m, dW in written.items():
            Abar = sum(w * s.lora[m].A.double() for w, s in zip(p, states))
            Bbar = sum(w * s.lora[m].B.double() for w, s in zip(p, states))
            mine = states[0].lora[m].scale * Bbar @ Abar
            if prev is not None:
                mine = mine - prev[m][2] * prev[m][0] @ prev[m][1]
            else:  # round 1 starts from B = 0
                pass
            # the server averages A and B in float32 (<= K + 3 roundings each, scale included), its ΔW is rounded
            # once to float32: any order within gamma_{2K+7} of the sums of |terms| (tests/tolerances.py)
            mag = magnitude(p, states, m) + (magnitude(pp, pst, m) if prev is not None else 0)
            assert_within(dW, mine, f32_tol(2 * len(states) + 7, mag, sides=1), m)
