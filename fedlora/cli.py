"""``fedlora``: the command line.

  fedlora run [hydra overrides]          a simulated federation (Flower simulation, Ray backend)
  fedlora compare strategies=[a,b] [...]  several strategies on identical data, seeds and budget
  fedlora deploy ...                     certificates, keys, SuperLink/SuperNode (see `fedlora deploy -h`)

Bad input exits 2 with one sentence; a failed run exits 1; Ctrl-C stops every process started (130).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = __doc__


def _quiet_libraries(verbose: bool) -> None:
    import logging
    import warnings

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


def _shutdown_ray() -> None:
    """Stop Ray, then every process it left behind. Ray's workers can outlive ``ray.shutdown`` by a minute,
    orphaned (Flower's simulation shuts Ray down itself), so they are found by a token that every process
    started by this run inherits (``FEDLORA_RUN_TOKEN``): SIGTERM, and SIGKILL 3 s later."""
    import psutil

    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass
    token = os.environ.get("FEDLORA_RUN_TOKEN")
    if not token:
        return
    me = os.getpid()
    left = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            if p.environ().get("FEDLORA_RUN_TOKEN") == token:
                left.append(p)
        except psutil.Error:
            pass
    for p in left:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _install_stop_handlers() -> None:
    """Ctrl-C / SIGTERM: stop Ray (its raylet, GCS and actors) and exit; metrics already written stay."""
    import signal

    def stop(signum, frame):
        print("\ninterrupted: stopping the simulation and every process it started...", file=sys.stderr, flush=True)
        _shutdown_ray()
        os._exit(130 if signum == signal.SIGINT else 143)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def simulate(cfg, run_dir: Path, verbose: bool = False, resume: bool = False) -> dict:
    """Run one simulated federation in this process; returns the run summary. Raises on failure."""
    import json

    from flwr.simulation import run_simulation

    from fedlora.clients import client_app
    from fedlora.strategies import server_app
    num_cpus = cfg.simulation.num_cpus or os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": int(cfg.simulation.client_cpus), "num_gpus": 0.0},
               "init_args": {"num_cpus": int(num_cpus), "include_dashboard": False, "log_to_driver": verbose}}
    _install_stop_handlers()
    import uuid

    os.environ["FEDLORA_RUN_TOKEN"] = uuid.uuid4().hex  # inherited by Ray and its workers: see _shutdown_ray
    try:
        run_simulation(server_app=server_app.make_app(cfg, run_dir, resume), client_app=client_app.app,
                       num_supernodes=int(cfg.num_clients), backend_config=backend, verbose_logging=verbose)
    finally:
        _shutdown_ray()
    summary = run_dir / "summary.json"
    if not summary.exists():
        raise RuntimeError(f"the run stopped before finishing (see the log above); partial results are in {run_dir}")
    return json.loads(summary.read_text())


def cmd_run(argv: list[str]) -> int:
    verbose = "-v" in argv
    overrides = [a for a in argv if a != "-v"]
    _quiet_libraries(verbose)
    from fedlora.preflight import prepare

    cfg, run_dir, resume = prepare(overrides)
    print(f"fedlora: {'resuming ' if resume else ''}{cfg.strategy.name} on {cfg.model.name}/{cfg.data.name}, {cfg.num_clients} clients, "
          f"{cfg.num_rounds} rounds -> {run_dir}", flush=True)
    summary = simulate(cfg, run_dir, verbose, resume=resume)
    acc = summary.get("final_eval_accuracy")
    print(f"done: final eval_loss {summary['final_eval_loss']:.4f}"
          + (f", eval_accuracy {acc:.4f}" if acc is not None else "") + f"; adapter in {summary['adapter']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    from fedlora.config import ConfigError

    try:
        if cmd == "run":
            return cmd_run(rest)
        if cmd == "compare":
            from fedlora.compare import cmd_compare

            return cmd_compare(rest)
        if cmd == "deploy":
            from fedlora.deploy import main as deploy_main

            return deploy_main(rest)
        print(f"error: unknown command {cmd!r}; use run, compare or deploy.", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _shutdown_ray()
        print("interrupted: stopped all processes; results so far are kept.", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
