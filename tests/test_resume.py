"""Checkpoint/resume: a run stopped after round k of N and resumed ends with the same adapter and metrics
as an uninterrupted run with the same seed; a corrupted checkpoint falls back to the previous good one;
a real SIGKILL of a Ray simulation loses at most the round in progress; and reading a checkpoint runs no code
(issue 16 item 7: safetensors + JSON, crafted files refused, only corruption falls back)."""

import hashlib
import json
import math
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TEST_TAG, fedlora_cmd, tagged_env, tagged_pids
from harness import InProcessGrid, Killed, KillingGrid
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save
from test_determinism import CASES
from test_determinism import FAST as DET_FAST

from fedlora import checkpoint, config, processes
from fedlora.adapters import AdapterState, LoraFactors
from fedlora.merges import MergeLog
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
            assert ra.pop("downlink_ratio", 0) >= rb.pop("downlink_ratio", 0)
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
    # The uninterrupted reference run and the run that gets killed are independent: they run at the same time
    # (most of each is start-up: Python, Ray, the ClientApp actors). The reference has its own tag, so that what it
    # leaves behind is told apart from the other run's processes (and is not killed with them).
    full_tag = f"{TEST_TAG}-full"
    full = tmp_path / "full"
    with open(tmp_path / "full.out", "wb") as out, open(tmp_path / "full.err", "wb") as err:
        full_proc = subprocess.Popen(fedlora_cmd("run", *args, f"out_dir={full}"), cwd=ROOT, stdout=out, stderr=err,
                                     env={**env, "FEDLORA_TEST_TAG": full_tag})
    try:
        cut = tmp_path / "cut"
        proc = subprocess.Popen(fedlora_cmd("run", *args, f"out_dir={cut}"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            t0 = time.time()
            while time.time() - t0 < 300:
                if (cut / checkpoint.NAME).exists() and len(rows_of(cut)) >= 2:
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
        full_proc.wait(timeout=600)
    finally:
        if full_proc.poll() is None:  # the test failed before the reference finished
            full_proc.kill()
            full_proc.wait()
            processes.stop(processes.with_env("FEDLORA_TEST_TAG", full_tag), grace=3)
    assert not processes.with_env("FEDLORA_TEST_TAG", full_tag), "a finished run left processes behind"
    assert full_proc.returncode == 0, (tmp_path / "full.err").read_text(errors="replace")[-2000:]
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


# ------------------------------------------------------------------------------------------------ issue 16 item 7
def assert_same(got, want, where="payload"):
    """Equal values of the same types (dtypes included) all the way down."""
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want.cpu()), where
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=want.dtype.kind in "fc"), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, random.Random):
        assert got.getstate() == want.getstate(), where
    elif type(want) in (AdapterState, LoraFactors, MergeLog):  # transient attributes (caches) are not saved
        kept = lambda obj: {k: v for k, v in vars(obj).items() if k not in getattr(obj, "TRANSIENT", ())}  # noqa: E731
        assert_same(kept(got), kept(want), f"{where}.{type(want).__name__}")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want, where


def every_kind():
    """A payload with every kind of value the strategies keep between rounds."""
    extra = {"head.weight": torch.randn(3, 4)}
    log = MergeLog()
    log.append({"q": LoraFactors(torch.randn(2, 5), torch.randn(6, 2), 0.5)})
    log.payload(0)  # fills the log's transient cache, which a checkpoint leaves out
    state = AdapterState({"q": LoraFactors(torch.randn(2, 5), torch.randn(6, 2), 2.0)}, extra)
    rng = random.Random(7)
    rng.gauss(0, 1)  # a cached Gaussian is part of its state
    return {"round": 3, "rows": [{"round": 0, "eval_loss": float("nan"), "sampled": [1, 2], "rejected": []}],
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "strategy": {"state": state, "global_state": AdapterState(dict(state.lora), extra), "rng": rng,
                         "rule": {"log": log, "digests": [0.0, 1.25]}, "per_client": {(2, 0.5): state, (4, 1.0): None},
                         "assignment": {0: {"rank": 2, "profile": "a100"}}, "exhausted": {1, 3}, "ids": frozenset("ab"),
                         "dtypes": [torch.arange(4, dtype=torch.int64), torch.ones(2, dtype=torch.bfloat16),
                                    torch.zeros(2, dtype=torch.float64), torch.tensor([True, False]),
                                    torch.tensor(1.5, dtype=torch.float16), torch.empty(0, 3)],
                         "numpy": [np.arange(3, dtype=np.uint32), np.float64(0.1), np.int64(-2), np.bool_(True),
                                   np.zeros((2, 0), dtype=np.complex128), np.float32(np.inf)],
                         "odd": {"$": "not a tag", "": b"\x00\xff", "t": ((1, "a"), ()), "big": 2**80, "neg0": -0.0}}}


def test_trust_7_codec_round_trips_every_kind_exactly(tmp_path):
    payload = every_kind()
    checkpoint.save(tmp_path, payload)
    got = checkpoint.load(tmp_path)
    assert_same(got, payload)
    # what was shared stays shared (the strategies rely on it, e.g. an adapter's head shared with the global one)
    s = got["strategy"]
    assert s["global_state"].extra is s["state"].extra and s["per_client"][(2, 0.5)] is s["state"]
    assert s["rule"]["log"].total["q"].dtype == torch.float64
    assert payload["strategy"]["rule"]["log"].memo is not None and s["rule"]["log"].memo is None
    assert s["rule"]["log"].payload(0).keys() == payload["strategy"]["rule"]["log"].payload(0).keys()
    with pytest.raises(TypeError, match="cannot checkpoint a builtins.object"):
        checkpoint.save(tmp_path, {"x": object()})  # no silent pickling: the writer refuses what it cannot hold
    assert_same(checkpoint.load(tmp_path), payload)  # and the refused save left the checkpoint as it was
    assert s["rng"].random() == payload["strategy"]["rng"].random()


def test_trust_7_only_declared_attributes_are_checkpointed(tmp_path):
    """A class of CLASSES saves its listed attributes and leaves its TRANSIENT ones (caches) out; any other
    attribute is refused, so no state is silently lost on resume."""
    log = MergeLog()
    log.stray = {}
    with pytest.raises(TypeError, match=r"cannot checkpoint a MergeLog with attributes \['entries', 'memo', 'stray'"):
        checkpoint.save(tmp_path, {"log": log})
    del log.stray
    checkpoint.save(tmp_path, {"log": log})
    assert vars(checkpoint.load(tmp_path)["log"]) == {"entries": [], "total": {}, "memo": None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trust_7_every_strategy_state_reads_back_exactly(tmp_path, monkeypatch, case):
    """Every strategy and privacy mode (those of test_determinism): the file equals what the server saved."""
    saved, real_save = [], checkpoint.save

    def save_and_check(run_dir, payload):
        path = real_save(run_dir, payload)
        assert_same(checkpoint.read(path), payload)
        saved.append(payload["round"])
        return path

    monkeypatch.setattr(checkpoint, "save", save_and_check)
    cfg = config.load(DET_FAST + CASES[case] + ["num_rounds=1"])
    run_server(InProcessGrid(cfg.num_clients), cfg, tmp_path, echo=lambda *_: None)
    assert saved == [1]


class Marker:
    """Unpickling it would create ``path`` (as a crafted checkpoint could run any command)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def crafted(doc) -> bytes:
    """A file of the current format, header and checksum right, holding the JSON ``doc``."""
    body = json.dumps(doc).encode()
    tensors = safetensors_save({})
    head = b"%s %d %d\n" % (hashlib.sha256(body + tensors).hexdigest().encode(), len(body), len(tensors))
    return checkpoint.MAGIC + head + body + tensors


def test_trust_7_crafted_checkpoint_runs_nothing(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Marker(control)))
    assert control.exists()  # the payload is live: unpickling it runs the command
    marker = tmp_path / "ran"
    body = pickle.dumps({"round": 1, "x": Marker(marker)})
    old = checkpoint.OLD_MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body  # passes the old checksum
    cases = {"pickle": (checkpoint.NAME, body, "not a fedlora checkpoint"),
             "old format": (checkpoint.NAME, old, "older fedlora"),
             "old run dir": (checkpoint.OLD_NAMES[0], old, "older fedlora as a pickle and cannot be resumed safely"),
             "foreign type": (checkpoint.NAME, crafted({"x": {"$": "posix.system", "args": [f"touch {marker}"]}}),
                              "unknown type tag 'posix.system'"),
             "class attrs": (checkpoint.NAME, crafted({"$": "LoraFactors", "attrs": {"delta": 1}}),
                             "malformed 'LoraFactors' entry")}
    for what, (name, blob, why) in cases.items():
        run_dir = tmp_path / what.replace(" ", "_")
        run_dir.mkdir()
        (run_dir / name).write_bytes(blob)
        with pytest.raises(checkpoint.CheckpointError, match="start a new run") as e:
            checkpoint.load(run_dir, warn=lambda *_: None)
        assert why in str(e.value) and name in str(e.value), what
        if name == checkpoint.NAME:  # beside a good previous checkpoint the crafted newest is skipped, with a warning
            checkpoint.save(run_dir, {"round": 1})
            os.replace(run_dir / checkpoint.NAME, run_dir / checkpoint.PREV)
            (run_dir / checkpoint.NAME).write_bytes(blob)
            said = []
            assert checkpoint.load(run_dir, warn=said.append) == {"round": 1}
            assert len(said) == 1 and why in said[0], what
    assert not marker.exists()


def test_trust_7_fallback_keeps_the_good_copy(tmp_path):
    checkpoint.save(tmp_path, {"round": 1, "w": torch.ones(2)})
    checkpoint.save(tmp_path, {"round": 2, "w": torch.ones(2)})
    newest = tmp_path / checkpoint.NAME
    newest.write_bytes(newest.read_bytes()[:-5])  # truncated
    said = []
    assert checkpoint.load(tmp_path, warn=said.append)["round"] == 1 and "checksum" in said[0]
    checkpoint.save(tmp_path, {"round": 2, "w": torch.zeros(2)})  # the resumed run redoes round 2
    assert checkpoint.read(tmp_path / checkpoint.PREV)["round"] == 1  # the good copy survived the save
    newest.write_bytes(b"garbage")  # and is still there to fall back to
    assert checkpoint.load(tmp_path, warn=lambda *_: None)["round"] == 1
    checkpoint.save(tmp_path, {"round": 2})
    checkpoint.save(tmp_path, {"round": 3})  # an intact newest does become the previous
    assert [checkpoint.read(tmp_path / n)["round"] for n in (checkpoint.NAME, checkpoint.PREV)] == [3, 2]


@pytest.mark.parametrize("bug", [TypeError("a bug"), KeyError("a bug")])
def test_trust_7_programming_error_is_not_corruption(tmp_path, monkeypatch, bug):
    checkpoint.save(tmp_path, {"round": 1})
    checkpoint.save(tmp_path, {"round": 2})

    def broken(tree, tensors):
        raise bug

    monkeypatch.setattr(checkpoint, "_decode", broken)
    said = []
    with pytest.raises(type(bug), match="a bug"):
        checkpoint.load(tmp_path, warn=said.append)
    assert said == []  # no "unusable, trying the previous checkpoint": the bug surfaces
