"""Starting and stopping a Flower simulation (Ray backend) in this process: what ``fedlora run`` and
``fedlora compare`` do for each run, and the benchmarks too.

:func:`simulate` runs one federation from a config that already went through the pre-flight
(:func:`fedlora.preflight.prepare` or :func:`fedlora.preflight.check`) and returns its summary. Ctrl-C or SIGTERM
during a run, a failed run and a finished one all end the same way: Ray is shut down and every process it
started is stopped. Ray's workers can outlive ``ray.shutdown`` by a minute, orphaned (Flower's simulation shuts
Ray down itself), so each run puts a fresh token in the environment (:data:`RUN_TOKEN`) that every process it
starts inherits; the token is only used to find those processes, and it is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import uuid
from pathlib import Path

from . import processes

RUN_TOKEN = "FEDLORA_RUN_TOKEN"
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL this long after


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


def quiet_libraries(verbose: bool) -> None:
    """Environment and logging for a quiet command line (Ray log de-duplication off, tokenizers' threads off,
    the :data:`THIRD_PARTY_NOISE` warnings off, Flower's INFO lines only with ``-v``). Call it before anything
    imports those libraries. fedlora's own warnings are never filtered: they go to stderr as usual (Ray's
    ClientApp actors do not inherit these filters, so nothing is filtered there either)."""
    import logging

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
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
def _run_token():
    """A fresh token in this process's environment for the duration of a run (Ray and its workers inherit it)."""
    previous = os.environ.get(RUN_TOKEN)
    os.environ[RUN_TOKEN] = uuid.uuid4().hex
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_TOKEN, None)
        else:
            os.environ[RUN_TOKEN] = previous


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


def backend_config(cfg, verbose: bool = False) -> dict:
    """Ray's resources for a run: ``simulation.num_cpus`` CPUs (all cores when unset), ``simulation.client_cpus``
    per ClientApp actor (an integer in Flower 1.42), no GPU."""
    num_cpus = cfg.simulation.num_cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": int(cfg.simulation.client_cpus), "num_gpus": 0.0},
            "init_args": {"num_cpus": int(num_cpus), "include_dashboard": False, "log_to_driver": verbose}}


def simulate(cfg, run_dir: Path, verbose: bool = False, resume: bool = False) -> dict:
    """Run one simulated federation in this process; returns the run summary (``summary.json``). Raises
    RuntimeError when the run stopped before writing its summary (partial results stay in ``run_dir``)."""
    from flwr.simulation import run_simulation

    if _QUIET:  # importing Flower's simulation put "once" for every DeprecationWarning in front: the first
        _ignore_noise()  # matching filter decides, so ours go back in front of it

    from fedlora.clients import client_app
    from fedlora.clients.node import simulated
    from fedlora.strategies import server_app

    run_dir = Path(run_dir)
    backend = backend_config(cfg, verbose)
    with _stop_on_signals(), _run_token():
        try:
            run_simulation(server_app=server_app.make_app(cfg, run_dir, resume),
                           client_app=client_app.make_app(simulated(cfg)),
                           num_supernodes=int(cfg.num_clients), backend_config=backend, verbose_logging=verbose)
        finally:
            shutdown()
    summary = run_dir / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"the run stopped before finishing (see the log above); partial results are in {run_dir}")
    return json.loads(summary.read_text())
