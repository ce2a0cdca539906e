"""Starting and stopping a Flower simulation (Ray backend) in this process: what ``fedlora run`` and
``fedlora compare`` do for each run, and the benchmarks too.

:func:`simulate` runs one federation from a config that already went through the pre-flight
(:func:`fedlora.preflight.prepare` or :func:`fedlora.preflight.check`) and returns its summary. Ctrl-C or SIGTERM
during a run, a failed run and a finished one all end the same way: Ray is shut down and every process it
started is stopped. Ray's workers can outlive ``ray.shutdown`` by a minute, orphaned (Flower's simulation shuts
Ray down itself), so each run puts a fresh token in the environment (:data:`RUN_TOKEN`) that every process it
starts inherits; the token is only used to find those processes, and it is removed when the run ends.

Resources (:func:`backend_config`): ``simulation.client_cpus`` CPUs and ``simulation.client_gpus`` GPUs per
ClientApp actor (Flower's ``client-resources-num-cpus``/``-num-gpus``). Ray gives each actor that asked for GPUs
its own ``CUDA_VISIBLE_DEVICES``, so ``cuda`` (:func:`fedlora.models.device`) in an actor is the GPU it was given,
and an actor that asked for none sees no GPU (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``). ``simulation.ray_address``
joins a running Ray cluster (``ray start --head`` / ``ray start --address``) instead of starting one here; the
run then only disconnects from it at the end: the cluster, and every process of it, keeps running.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import threading
import uuid
from pathlib import Path

from . import processes

RUN_TOKEN = "FEDLORA_RUN_TOKEN"
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL this long after

#: Ray reads it in every worker: 1 (Ray 2.55's default) hides every GPU from an actor that asked for none
#: (``CUDA_VISIBLE_DEVICES=""``), so a client given no GPU never puts its model on one unaccounted. A local run
#: sets it to 1 for its own Ray; a joined cluster has what its ``ray start`` had.
ACCEL_OVERRIDE = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"
#: the FutureWarning Ray's driver prints at ``ray.init`` while :data:`ACCEL_OVERRIDE` is on (filtered by message)
RAY_ACCEL_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator"
RAY_MIN_SHARE = 1e-4  # Ray's smallest fraction of a resource
JOIN_TIMEOUT_S = 10.0  # a Ray head at simulation.ray_address must accept a connection within this
MAX_CLIENTS_PER_GPU = 99  # an automatic share is 1/k with k at most this (1/k then packs exactly k per GPU in Ray)


#: Third-party warnings a normal run prints that mean nothing to a fedlora user, as (category, module): the
#: ones ``fedlora run model=tiny_llama num_rounds=1 num_clients=2`` shows under Python's default filters. Every
#: other warning, fedlora's own first (e.g. that a reported epsilon is only an upper bound), reaches stderr.
THIRD_PARTY_NOISE = (
    (DeprecationWarning, r"torch\.jit\._script"),  # torch.jit.script_method, used by transformers' models
    (FutureWarning, r"transformers\.modeling_utils"),  # is_gradient_checkpointing, called by peft
)


_QUIET = False  # quiet_libraries() was called: simulate() puts the filters back in front after Flower's import


def _ignore_noise() -> None:
    import warnings

    for category, module in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", category=category, module=module)
    warnings.filterwarnings("ignore", message=RAY_ACCEL_TIP, category=FutureWarning)


def quiet_libraries(verbose: bool) -> None:
    """Environment and logging for a quiet command line (Ray log de-duplication off, tokenizers' threads off,
    the :data:`THIRD_PARTY_NOISE` warnings off, Flower's INFO lines only with ``-v``). Call it before anything
    imports those libraries. fedlora's own warnings are never filtered: they go to stderr as usual (Ray's
    ClientApp actors do not inherit these filters, so nothing is filtered there either)."""
    import logging

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    global _QUIET
    _QUIET = True
    _ignore_noise()
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


def shutdown() -> None:
    """Stop Ray, then every process the current run left behind (found by its token): SIGTERM, and SIGKILL
    :data:`STOP_GRACE_S` seconds later. Without a run in progress only Ray is shut down (if it is up)."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass
    token = os.environ.get(RUN_TOKEN)
    if token:
        processes.stop(processes.with_env(RUN_TOKEN, token), grace=STOP_GRACE_S)


@contextlib.contextmanager
def _env_set(name: str, value: str):
    """``name=value`` in this process's environment for the duration of a run (Ray and its workers inherit it),
    the previous value (or its absence) restored afterwards."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _run_token():
    """A fresh :data:`RUN_TOKEN` in the environment for the duration of a run."""
    return _env_set(RUN_TOKEN, uuid.uuid4().hex)


@contextlib.contextmanager
def _stop_on_signals():
    """Ctrl-C / SIGTERM during a run: stop Ray (its raylet, GCS and actors) and every process it started, then
    exit (130 / 143); metrics already written stay. The previous handlers come back after the run."""
    import signal

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def stop(signum, frame):
        print("\ninterrupted: stopping the simulation and every process it started...", file=sys.stderr, flush=True)
        shutdown()
        os._exit(130 if signum == signal.SIGINT else 143)

    saved = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------------------------
# Ray resources: CPUs and GPUs per ClientApp actor, a local Ray or a joined cluster
# ----------------------------------------------------------------------------------------------------------------
#: ``simulation.ray_address``: ``host:port`` of a Ray head's GCS (``[v6addr]:port`` too), or ``auto``
_ADDRESS = re.compile(r"^(?:auto|(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5}))$")


def _sim(cfg) -> dict:
    from omegaconf import OmegaConf

    sim = cfg.get("simulation") if hasattr(cfg, "get") else None
    if sim is None:
        return {}
    return OmegaConf.to_container(sim, resolve=True) if OmegaConf.is_config(sim) else dict(sim)


def ray_address(cfg) -> str | None:
    """``simulation.ray_address`` (None when unset or empty: this run starts its own Ray)."""
    a = _sim(cfg).get("ray_address")
    return None if a in (None, "", "null") else str(a).strip()


def local_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def local_node(cfg, cpus: int | None = None, gpus: int | None = None) -> tuple[int, int]:
    """``(CPUs, GPUs)`` the local Ray of a run gets: ``simulation.num_cpus`` (all cores when unset), the CUDA devices
    this process sees."""
    sim = _sim(cfg)
    return (int(sim.get("num_cpus") or cpus or os.cpu_count() or 1), local_gpus() if gpus is None else int(gpus))


def _units(share: float) -> int:
    return int(round(share / RAY_MIN_SHARE))  # Ray keeps resource amounts in units of 0.0001


def pool_sizes(nodes, client_cpus: int, client_gpus: float) -> tuple[int, int]:
    """``(planned, placeable)``: how many ClientApp actors Flower 1.42 creates on ``nodes`` (``[(CPUs, GPUs)]``;
    ``flwr.simulation.ray_transport.ray_actor.pool_size_from_resources``: per node, CPUs // client_cpus and
    int(GPUs / client_gpus)), and how many Ray can place: a share of a GPU (<= 1) must fit inside one GPU, so a
    GPU holds 1 // client_gpus of them, not GPUs / client_gpus. An actor Ray cannot place never serves a client."""
    planned = placeable = 0
    for cpus, gpus in nodes:
        by_cpu = int(cpus // client_cpus)
        if client_gpus > 0:
            flower = min(by_cpu, int(gpus / client_gpus)) if gpus else 0
            per_gpu = (int(gpus) * (10_000 // max(_units(client_gpus), 1)) if client_gpus <= 1
                       else int(gpus // client_gpus))
            planned, placeable = planned + flower, placeable + min(flower, per_gpu)
        else:
            planned, placeable = planned + by_cpu, placeable + by_cpu
    return planned, placeable


def auto_client_gpus(nodes, client_cpus: int, num_clients: int) -> float:
    """The default ``simulation.client_gpus``: 0.0 when no node has a GPU; else the clients that can run at once
    (``num_clients``, at most the CPU slots of the nodes with GPUs) spread evenly over all GPUs: one GPU each when
    there are enough, else 1/k of one (k clients per GPU, k = ceil(clients / GPUs), at most
    :data:`MAX_CLIENTS_PER_GPU`), rounded down to Ray's 0.0001 so that Ray packs exactly k on a GPU."""
    gpu_nodes = [(c, g) for c, g in nodes if g and g > 0]
    gpus = sum(g for _, g in gpu_nodes)
    slots = sum(int(c // client_cpus) for c, _ in gpu_nodes)
    clients = min(int(num_clients), slots)
    if gpus <= 0 or clients <= 0:
        return 0.0
    k = min(math.ceil(clients / gpus), MAX_CLIENTS_PER_GPU)
    return 1.0 if k <= 1 else math.floor(10_000 / k) / 10_000


def client_gpus(cfg, nodes=None) -> float:
    """``simulation.client_gpus`` as Ray gets it: the configured value, or :func:`auto_client_gpus` of ``nodes``
    (default: this machine, :func:`local_node`) when it is null."""
    g = _sim(cfg).get("client_gpus")
    if g is not None:
        return float(g)
    if nodes is None:
        if ray_address(cfg):
            raise ValueError("client_gpus=null with simulation.ray_address: pass the cluster's nodes")
        nodes = [local_node(cfg)]
    return auto_client_gpus(nodes, int(_sim(cfg).get("client_cpus") or 1), int(cfg.num_clients))


def backend_config(cfg, verbose: bool = False, nodes=None) -> dict:
    """Flower's ``backend_config`` for a run: per ClientApp actor ``simulation.client_cpus`` CPUs (an integer in
    Flower 1.42) and :func:`client_gpus` GPUs (``nodes``: the ``[(CPUs, GPUs)]`` of the cluster the run joins,
    for a null ``client_gpus``). ``init_args`` go to ``ray.init``: a local Ray (``address="local"``, so that neither
    ``RAY_ADDRESS`` nor a cluster ``ray start`` recorded on this machine is joined by accident) with
    ``simulation.num_cpus`` CPUs (all cores when unset), or ``address=simulation.ray_address`` and no CPU count
    (``ray.init`` refuses one for an existing cluster)."""
    sim = _sim(cfg)
    address = ray_address(cfg)
    init = {"include_dashboard": False, "log_to_driver": verbose}
    if address:
        init["address"] = address
    else:
        init.update(address="local", num_cpus=local_node(cfg)[0])
    return {"client_resources": {"num_cpus": int(sim.get("client_cpus") or 1), "num_gpus": client_gpus(cfg, nodes)},
            "init_args": init}


def check_simulation(cfg, gpus: int | None = None, cpus: int | None = None) -> None:
    """The ``simulation`` keys against each other and this machine (``gpus``/``cpus``: what it has, default: the
    CUDA devices this process sees and its cores), each refusal a :class:`~fedlora.config.ConfigError` in one
    sentence: ``client_gpus`` null, 0, a share of one GPU (<= 1, at least 0.0001) or whole GPUs; ``ray_address``
    ``host:port`` or ``auto``, without ``num_cpus``; and without ``ray_address``, ``client_cpus`` within the local
    CPUs and ``client_gpus`` > 0 only on a machine with CUDA, packing on its GPUs as Flower plans. A joined
    cluster's CPUs and GPUs are checked once connected (:func:`simulate`)."""
    from .config import ConfigError

    sim = _sim(cfg)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    address, raw_address = ray_address(cfg), sim.get("ray_address")
    if address is not None:
        m = _ADDRESS.match(address) if isinstance(raw_address, str) else None
        if not m or (m.group(1) is not None and not 1 <= int(m.group(1)) <= 65535):
            raise ConfigError(f"simulation.ray_address={raw_address} is not a Ray address: give the head's host:port "
                              "as `ray start --head` prints it (e.g. simulation.ray_address=10.0.0.1:6379), or auto.")
        if sim.get("num_cpus") is not None:
            raise ConfigError(f"simulation.num_cpus={sim.get('num_cpus')} cannot be combined with "
                              "simulation.ray_address: a Ray cluster has the CPUs its nodes were started with "
                              "(`ray start --num-cpus N`), so drop simulation.num_cpus.")
    g = sim.get("client_gpus")
    if g is not None:
        if not number(g) or g < 0:
            raise ConfigError(f"simulation.client_gpus={g} must be a number >= 0: a share of one GPU per client "
                              "(0.5: two clients on a GPU), whole GPUs (1), 0 for the CPU, or null to choose from "
                              "the GPUs found.")
        if g > 1 and g != int(g):
            raise ConfigError(f"simulation.client_gpus={g} is more than one GPU but not a whole number: Ray gives a "
                              "client a share of one GPU (<= 1) or whole GPUs, so use e.g. 1 or 2.")
        if 0 < g < RAY_MIN_SHARE:
            raise ConfigError(f"simulation.client_gpus={g} is below Ray's smallest share of a GPU (0.0001): use a "
                              "share such as 0.25, or 0 to train on the CPU.")
    if address is not None:
        return
    cc = sim.get("client_cpus")
    cores = local_node(cfg, cpus=cpus, gpus=0)[0]
    if number(cc) and cc > cores:
        raise ConfigError(f"simulation.client_cpus={cc} is more than the {cores} CPUs Ray gets on this machine, so "
                          "no client could start: lower simulation.client_cpus or raise simulation.num_cpus.")
    if g:
        have = local_gpus() if gpus is None else int(gpus)
        if have == 0:
            raise ConfigError(f"simulation.client_gpus={g} asks for GPUs but this machine has no CUDA device "
                              "(torch.cuda.is_available() is False): set simulation.client_gpus=0 (or null) to train "
                              "on the CPU, or join a Ray cluster that has GPUs with simulation.ray_address=host:port.")
        _check_pool([(cores, have)], int(cc) if number(cc) and cc >= 1 else 1, float(g), "this machine")


def _check_pool(nodes, client_cpus: int, client_gpus: float, where: str) -> None:
    """Refuse, in one sentence, a ``client_gpus`` with which no actor fits on ``nodes``, or with which Flower plans
    actors that Ray cannot place (a share that does not divide a GPU, on several GPUs)."""
    from .config import ConfigError

    planned, placeable = pool_sizes(nodes, client_cpus, client_gpus)
    gpus = sum(g for _, g in nodes)
    if planned == 0 and client_gpus > 0:
        raise ConfigError(f"simulation.client_gpus={client_gpus:g} fits no client on {where} ({gpus:g} GPUs, "
                          f"{client_cpus} CPUs per client): use at most the GPUs of one node, a share such as 0.5, "
                          "or 0 to train on the CPU.")
    if planned == 0:
        raise ConfigError(f"simulation.client_cpus={client_cpus} fits no client on {where} (at most "
                          f"{max((c for c, _ in nodes), default=0):g} CPUs on a node): lower simulation.client_cpus.")
    if placeable < planned:
        per_gpu = 10_000 // max(_units(client_gpus), 1)
        raise ConfigError(f"simulation.client_gpus={client_gpus:g} does not divide a GPU: Ray places {per_gpu} "
                          f"clients on each GPU but Flower plans {planned} on {where}'s {gpus:g} GPUs and the clients "
                          "sent to the others would never be served, so use 1/k of a GPU such as 0.5, 0.3333 or 0.25.")


def _join(address: str, verbose: bool) -> list[tuple[float, float]]:
    """Connect this process to the Ray cluster at ``address`` as Flower's ``RayBackend.init_ray`` would (it skips
    ``ray.init`` when Ray is up): the driver's ``sys.path`` as the workers' ``PYTHONPATH`` (the cluster's workers do
    not inherit this process's environment: every machine needs the checkout, the venv and the data at the same
    paths), plus ``HF_HUB_OFFLINE``/``TOKENIZERS_PARALLELISM`` when set here. Returns the ``(CPUs, GPUs)`` of the
    cluster's alive nodes."""
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    env = {"PYTHONPATH": pythonpath}
    env.update({k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM") if k in os.environ})
    from .config import ConfigError, first_line

    if address != "auto":  # ray.init retries an unreachable GCS for minutes: refuse at once instead
        import socket

        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_TIMEOUT_S).close()
        except OSError as e:
            raise ConfigError(f"cannot reach a Ray head at simulation.ray_address={address} ({e.strerror or e}): "
                              "start one there with `ray start --head --port PORT`, or fix the host:port.") from None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                 logging_level="DEBUG" if verbose else "WARNING", runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot join the Ray cluster at simulation.ray_address={address} "
                          f"({first_line(e)}): start its "
                          "head with `ray start --head --port PORT` and give that host:port.") from None
    return [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive") and n.get("Resources")]


def _accelerator_override(local: bool):
    """For a local Ray: :data:`ACCEL_OVERRIDE` = 1 while it runs (its workers inherit it), restored afterwards."""
    return _env_set(ACCEL_OVERRIDE, "1") if local else contextlib.nullcontext()


def simulate(cfg, run_dir: Path, verbose: bool = False, resume: bool = False) -> dict:
    """Run one simulated federation in this process; returns the run summary (``summary.json``). Raises
    RuntimeError when the run stopped before writing its summary (partial results stay in ``run_dir``)."""
    from flwr.simulation import run_simulation

    if _QUIET:  # importing Flower's simulation put "once" for every DeprecationWarning in front: the first
        _ignore_noise()  # matching filter decides, so ours go back in front of it

    from fedlora.clients import client_app
    from fedlora.clients.node import simulated
    from fedlora.strategies import server_app

    check_simulation(cfg)
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    before = _file_stamp(summary)  # a resumed run's earlier summary is not this run's
    address = ray_address(cfg)
    with _stop_on_signals(), _run_token(), _accelerator_override(local=address is None):
        try:
            nodes = None
            if address:  # joined here, so that a null client_gpus is chosen from the cluster's GPUs
                nodes = _join(address, verbose)
            backend = backend_config(cfg, verbose, nodes)
            if nodes is not None:
                res = backend["client_resources"]
                _check_pool(nodes, int(res["num_cpus"]), float(res["num_gpus"]), f"the Ray cluster at {address}")
            run_simulation(server_app=server_app.make_app(cfg, run_dir, resume),
                           client_app=client_app.make_app(simulated(cfg)),
                           num_supernodes=int(cfg.num_clients), backend_config=backend, verbose_logging=verbose)
        finally:
            shutdown()
    if _file_stamp(summary) in (None, before):
        raise RuntimeError(f"the run stopped before finishing (see the log above); partial results are in {run_dir}")
    return json.loads(summary.read_text())


def _file_stamp(path: Path):
    """(inode, mtime in ns) of ``path`` (None when absent): the summary is written by an atomic replace, so a
    summary written by this run has another stamp than one that was there before it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns
