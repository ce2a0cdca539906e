"""Ray resources of a simulation (issue 20, item 8): GPUs per ClientApp actor are accounted
(``simulation.client_gpus``, as Flower's ``client-resources-num-gpus``, defaulting from the GPUs found), CPUs too
(``simulation.client_cpus``), and a run can join a running Ray cluster (``simulation.ray_address``) instead of
starting its own, leaving the cluster running. The GPU case itself (2 actors at 0.5 GPU on one device) is in
``bench/gpu_checks.sh``."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings

import pytest
from conftest import ROOT, fedlora_cmd, tagged_env, tagged_pids
from omegaconf import OmegaConf

from fedlora import processes, simulation
from fedlora.config import ConfigError


@functools.lru_cache(maxsize=1)
def _base():
    from fedlora import config

    return config.load(["model=tiny_llama"])


def cfg_with(**sim):
    """The default config (tiny_llama) with ``simulation.<key>`` values, without the rest of the validation."""
    cfg = copy.deepcopy(_base())
    for key, value in sim.items():
        if key in ("num_clients",):
            cfg[key] = value
        else:
            OmegaConf.update(cfg, f"simulation.{key}", value, force_add=True)
    return cfg


def test_robust_8_backend_config_carries_resources(monkeypatch):
    # a CPU-only machine, defaults: one CPU per actor, no GPU, a local Ray of every core, never a cluster by accident
    b = simulation.backend_config(cfg_with(), nodes=[(2, 0)])
    assert b == {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                 "init_args": {"include_dashboard": False, "log_to_driver": False, "address": "local",
                               "num_cpus": os.cpu_count()}}
    # explicit values reach Flower as they are
    b = simulation.backend_config(cfg_with(client_cpus=2, client_gpus=0.5, num_cpus=8), verbose=True)
    assert b["client_resources"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert b["init_args"] == {"include_dashboard": False, "log_to_driver": True, "address": "local", "num_cpus": 8}
    # the default from the hardware: the clients that can run at once, spread evenly over the GPUs (1/k each)
    assert simulation.client_gpus(cfg_with(num_clients=2), nodes=[(16, 1)]) == 0.5
    assert simulation.client_gpus(cfg_with(num_clients=10), nodes=[(16, 4)]) == 0.3333
    assert simulation.client_gpus(cfg_with(num_clients=10), nodes=[(4, 4)]) == 1.0  # 4 CPU slots, 4 GPUs
    assert simulation.client_gpus(cfg_with(num_clients=2), nodes=[(16, 4)]) == 1.0  # never more than one GPU
    assert simulation.client_gpus(cfg_with(num_clients=10), nodes=[(16, 0), (2, 0)]) == 0.0
    assert simulation.client_gpus(cfg_with(num_clients=10), nodes=[(16, 0), (8, 2)]) == 0.25  # 8 slots on 2 GPUs
    for n, nodes in ((10, [(16, 4)]), (3, [(16, 1)]), (40, [(64, 8)]), (7, [(8, 2), (8, 1)])):
        share = simulation.client_gpus(cfg_with(num_clients=n), nodes=nodes)
        planned, placeable = simulation.pool_sizes(nodes, 1, share)
        assert planned == placeable >= n, (n, nodes, share)  # Flower's plan fits in Ray, every client has an actor
    monkeypatch.setattr(simulation, "local_gpus", lambda: 0)
    assert simulation.backend_config(cfg_with())["client_resources"]["num_gpus"] == 0.0  # no CUDA: CPU actors
    # joining a cluster: its address, no CPU count (ray.init refuses one), GPUs from the cluster's nodes
    b = simulation.backend_config(cfg_with(ray_address="10.0.0.1:6379", num_clients=4), nodes=[(8, 2), (8, 0)])
    assert b == {"client_resources": {"num_cpus": 1, "num_gpus": 0.5},
                 "init_args": {"include_dashboard": False, "log_to_driver": False, "address": "10.0.0.1:6379"}}
    with pytest.raises(ValueError):  # null client_gpus with a cluster: the nodes are needed to choose it
        simulation.backend_config(cfg_with(ray_address="auto"))
    # an actor given no GPU sees none: the local Ray runs with the override on (it used to be forced off)
    monkeypatch.setenv(simulation.ACCEL_OVERRIDE, "0")
    with simulation._accelerator_override(local=True):
        assert os.environ[simulation.ACCEL_OVERRIDE] == "1"
    assert os.environ[simulation.ACCEL_OVERRIDE] == "0"
    monkeypatch.delenv(simulation.ACCEL_OVERRIDE)
    monkeypatch.setattr(simulation, "_QUIET", simulation._QUIET)
    env = dict(os.environ)
    try:
        with warnings.catch_warnings():
            simulation.quiet_libraries(verbose=True)
            assert simulation.ACCEL_OVERRIDE not in os.environ
    finally:
        os.environ.clear()
        os.environ.update(env)


REFUSALS = [
    (dict(client_gpus=-1), {}, "simulation.client_gpus=-1 must be a number >= 0"),
    (dict(client_gpus="half"), {}, "simulation.client_gpus=half must be a number >= 0"),
    (dict(client_gpus=1.5), {}, "is more than one GPU but not a whole number"),
    (dict(client_gpus=0.00001), {}, "below Ray's smallest share"),
    (dict(client_gpus=0.5), dict(gpus=0), "asks for GPUs but this machine has no CUDA device"),
    (dict(client_gpus=2), dict(gpus=1), "simulation.client_gpus=2 fits no client on this machine"),
    (dict(client_gpus=0.4, num_clients=10), dict(gpus=4, cpus=16), "does not divide a GPU"),
    (dict(client_cpus=4), dict(cpus=2), "simulation.client_cpus=4 is more than the 2 CPUs"),
    (dict(ray_address="headnode"), {}, "is not a Ray address"),
    (dict(ray_address="10.0.0.1:99999"), {}, "is not a Ray address"),
    (dict(ray_address=6379), {}, "is not a Ray address"),
    (dict(ray_address="10.0.0.1:6379", num_cpus=4), {}, "cannot be combined with simulation.ray_address"),
]


@pytest.mark.parametrize("sim,machine,fragment", REFUSALS, ids=[r[2][:30] for r in REFUSALS])
def test_robust_8_refuses_bad_simulation_settings(sim, machine, fragment):
    with pytest.raises(ConfigError) as e:
        simulation.check_simulation(cfg_with(**sim), **machine)
    msg = str(e.value)
    assert fragment in msg, msg
    assert "\n" not in msg and msg.endswith("."), msg  # one sentence with its fix


def test_robust_8_accepts_good_simulation_settings():
    ok = [(dict(), dict(gpus=0)), (dict(client_gpus=0), dict(gpus=0)), (dict(client_gpus=0.5), dict(gpus=1)),
          (dict(client_gpus=1, num_clients=10), dict(gpus=4, cpus=16)), (dict(client_gpus=0.3333), dict(gpus=4)),
          (dict(client_gpus=0.5, ray_address="10.0.0.1:6379"), dict(gpus=0)),  # the cluster's GPUs count there
          (dict(ray_address="auto"), {}), (dict(ray_address="[::1]:6379"), {}), (dict(ray_address="head-0:6379"), {}),
          (dict(client_cpus=8, ray_address="10.0.0.1:6379"), dict(cpus=2))]
    for sim, machine in ok:
        simulation.check_simulation(cfg_with(**sim), **machine)
    # a joined cluster is checked once connected: no GPU there, or a share Ray cannot pack as Flower plans
    with pytest.raises(ConfigError, match="fits no client on the Ray cluster"):
        simulation._check_pool([(2.0, 0.0)], 1, 0.5, "the Ray cluster at 10.0.0.1:6379")
    with pytest.raises(ConfigError, match="does not divide a GPU"):
        simulation._check_pool([(16.0, 2.0)], 1, 0.4, "the Ray cluster at 10.0.0.1:6379")
    with pytest.raises(ConfigError, match="client_cpus=4 fits no client"):
        simulation._check_pool([(2.0, 0.0)], 4, 0.0, "the Ray cluster at 10.0.0.1:6379")
    # an address where no head listens is refused at once (ray.init would retry it for minutes)
    with pytest.raises(ConfigError, match="cannot reach a Ray head at simulation.ray_address=127.0.0.1:"):
        simulation._join(f"127.0.0.1:{_free_port()}", verbose=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY = str(ROOT / ".venv" / "bin" / "ray") if (ROOT / ".venv" / "bin" / "ray").exists() else shutil.which("ray")
HEAD_TAG = "FEDLORA_TEST_RAY_HEAD"

JOBS = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
jobs = [{"id": j["JobID"], "entrypoint": j.get("Entrypoint", ""), "dead": j["IsDead"]} for j in state.jobs()]
actors = [{"job": a["JobID"], "cls": a.get("ActorClassName", "")} for a in state.actors().values()]
print(json.dumps({"cpus": ray.cluster_resources().get("CPU"), "jobs": jobs, "actors": actors}))
ray.shutdown()
"""


@pytest.fixture
def ray_head():
    """A Ray head on loopback, started the way a user would (``ray start --head``) on its own ports and temp dir
    (so that neither /tmp/ray's record of a current cluster nor any Ray already running here is touched); stopped
    afterwards by the PIDs it started (found by a tag in their environment), never with ``ray stop``."""
    if RAY is None:
        pytest.skip("the ray command line is not installed")
    tag, tmp, port = uuid.uuid4().hex, tempfile.mkdtemp(prefix="rh", dir="/tmp"), _free_port()  # short: socket paths
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
           "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp}",
           *(f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "ray-client-server-port", "metrics-export-port",
                                                      "runtime-env-agent-port"))]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {HEAD_TAG: tag}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        head = processes.with_env(HEAD_TAG, tag)
        if p.returncode != 0 or not head:
            pytest.skip(f"Ray cannot start a head here (rc {p.returncode}): {(p.stderr or p.stdout)[-400:]}")
        yield f"127.0.0.1:{port}", head, tag
    finally:
        processes.stop(processes.with_env(HEAD_TAG, tag), grace=5)
        shutil.rmtree(tmp, ignore_errors=True)


def test_robust_8_run_joins_existing_ray_head(ray_head, tmp_path):
    address, head, tag = ray_head
    names = {p.name() for p in head}
    assert {"gcs_server", "raylet"} <= names, names
    out = tmp_path / "run"
    t0 = time.time()
    p = subprocess.run(fedlora_cmd("run", "model=tiny_llama", "num_rounds=1", "num_clients=2", "local_steps=2",
                                   "eval.max_examples=50", f"simulation.ray_address={address}", f"out_dir={out}"),
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={k: v for k, v in tagged_env().items() if k != "RAY_ADDRESS"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (out / "summary.json").exists() and '"completed"' in (out / "summary.json").read_text()
    assert not tagged_pids(), "the run left processes of its own behind"
    # the head is still up: the same GCS and raylet processes, and a new driver still connects
    assert all(processes.alive(q) for q in head if q.name() in ("gcs_server", "raylet"))
    q = subprocess.run([sys.executable, "-c", JOBS, address], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert q.returncode == 0, q.stderr[-2000:]
    import json

    state = json.loads(q.stdout.strip().splitlines()[-1])
    assert state["cpus"] == 2.0
    # the run was a driver of this cluster (not a Ray of its own), its ClientApp actors ran there, and it ended
    run_jobs = [j for j in state["jobs"] if str(out) in j["entrypoint"]]
    assert len(run_jobs) == 1 and run_jobs[0]["dead"], state["jobs"]
    assert sum(a["job"] == run_jobs[0]["id"] and a["cls"].endswith("ClientAppActor") for a in state["actors"]) >= 1
    assert time.time() - t0 < 240
