"""Checkpoint/resume: a run stopped after round k of N and resumed ends with the same adapter and metrics
as an uninterrupted run with the same seed; a corrupted checkpoint falls back to the previous good one;
and a real SIGKILL of a Ray simulation loses at most the round in progress."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, fedlora_cmd, tagged_env, tagged_pids
from harness import InProcessGrid, Killed, KillingGrid
from safetensors.torch import load_file

from fedlora import checkpoint, config
from fedlora.strategies.server_app import run_server

FAST = ["model=tiny_llama", "num_clients=4", "local_steps=2", "train.batch_size=4", "eval.max_examples=16",
        "train.max_length=32", "fraction_train=0.75", "num_rounds=4"]
TIMING = ("wall_s", "round_s", "eval_s", "unix", "train_s")


def strip(rows):
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k not in TIMING}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return [clean(r) for r in rows]


def rows_of(d: Path):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


def same_adapter(a: Path, b: Path, tol=0.0):
    ta, tb = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=0, atol=tol) if tol else torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("strategy, extra", [("fedit", []), ("flora", ["client_ranks=[2,4]"]),
                                             ("lora_fair", [])])
def test_resume_after_round_k_matches_uninterrupted(tmp_path, strategy, extra):
    cfg = config.load(FAST + [f"strategy={strategy}"] + extra)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_server(InProcessGrid(4), cfg, full, echo=lambda *_: None)
    with pytest.raises(Killed):
        run_server(KillingGrid(4, kill_round=3), cfg, cut, echo=lambda *_: None)  # dies during round 3
    assert [r["round"] for r in rows_of(cut)] == [0, 1, 2]
    # resume with fresh clients (their local state is gone, as after a restart)
    run_server(InProcessGrid(4), cfg, cut, echo=lambda *_: None, resume=True)
    a, b = strip(rows_of(cut)), strip(rows_of(full))
    if strategy == "flora":  # restarted clients first catch up on every merge: more is really sent
        for ra, rb in zip(a, b):
            assert ra.pop("bytes_down") >= rb.pop("bytes_down")
    assert a == b
    same_adapter(cut, full)


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path):
    cfg = config.load(FAST + ["strategy=fedit"])
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_server(InProcessGrid(4), cfg, full, echo=lambda *_: None)
    with pytest.raises(Killed):
        run_server(KillingGrid(4, kill_round=4), cfg, cut, echo=lambda *_: None)
    ck = cut / checkpoint.NAME
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])  # truncated
    said = []
    run_server(InProcessGrid(4), cfg, cut, echo=said.append, resume=True)
    assert any("unusable" in s and "checksum" in s for s in said)
    assert any("resumed" in s and "after round 2" in s for s in said)
    assert strip(rows_of(cut)) == strip(rows_of(full))
    same_adapter(cut, full)


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / checkpoint.NAME).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
        checkpoint.load(tmp_path, warn=lambda *_: None)


def test_sigkill_of_a_ray_simulation_then_resume(tmp_path):
    args = ["model=tiny_llama", "num_clients=3", "local_steps=2", "train.batch_size=4", "eval.max_examples=16",
            "train.max_length=32", "num_rounds=3", "strategy=fedit"]
    env = tagged_env()
    full = tmp_path / "full"
    p = subprocess.run(fedlora_cmd("run", *args, f"out_dir={full}"), cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    assert not tagged_pids(), "a finished run left processes behind"
    assert p.returncode == 0, p.stderr[-2000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(fedlora_cmd("run", *args, f"out_dir={cut}"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        t0 = time.time()
        while time.time() - t0 < 300:
            if (cut / "checkpoint.pt").exists() and len(rows_of(cut)) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never checkpointed round 1")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a crash would
        proc.wait()
        time.sleep(1)
        for pid in tagged_pids():  # Ray helpers outside the group: stop them by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    done = [r["round"] for r in rows_of(cut)]
    assert done[0] == 0 and done[-1] >= 1
    p = subprocess.run(fedlora_cmd("run", f"resume={cut}"), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming" in p.stdout
    a, b = strip(rows_of(cut)), strip(rows_of(full))
    assert [r["round"] for r in a] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        for k, v in rb.items():
            if isinstance(v, float):
                assert abs(ra[k] - v) <= 1e-6 * max(1.0, abs(v)), (k, ra[k], v)
    same_adapter(cut, full, tol=1e-6)
    assert not tagged_pids()
