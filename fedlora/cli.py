"""``fedlora``: the command line. It parses argv and dispatches; the work is elsewhere (pre-flight:
:mod:`fedlora.preflight`, the simulation: :mod:`fedlora.simulation`, comparisons: :mod:`fedlora.compare`,
deployment: :mod:`fedlora.deploy`, answers: :mod:`fedlora.generate`). Bad input exits 2 with one sentence; a failed run exits 1; a run that finished
without training enough (no round aggregated, or fewer than ``min_aggregated_share``) exits 3 with the reason;
Ctrl-C stops every process started (130)."""

from __future__ import annotations

import sys
import textwrap

USAGE = """usage: fedlora COMMAND [...]

  fedlora run [hydra overrides]          a simulated federation (Flower simulation, Ray backend)
  fedlora compare strategies=[a,b] [...]  several strategies on identical data, seeds and budget
  fedlora deploy ...                     certificates, keys, SuperLink/SuperNode (see `fedlora deploy -h`)
  fedlora generate RUN_DIR "prompt"      a run's model answers a prompt (greedy; --base-only: without the adapter)

`fedlora run -h` and `fedlora compare -h` describe each command.
Bad input exits 2 with one sentence; a failed run exits 1; a run that finished without training enough
(status no-round-aggregated or degraded in summary.json) exits 3; Ctrl-C stops every process started (130).
"""
HELP_FLAGS = ("-h", "--help")
VERBOSE_FLAGS = ("-v", "--verbose")

RUN_HELP = """usage: fedlora run [-v] [key=value ...] [resume=RUN_DIR]

Run one simulated federation (Flower simulation, Ray backend) on this machine. The config is conf/config.yaml
composed with Hydra overrides; it is checked, with the data and the strategy's requirements, before anything
starts.

config groups (group=option):
{groups}
common keys: num_clients, num_rounds, local_steps, seed, client_ranks=[4,8,...], fraction_train,
  train.batch_size, train.lr, eval.max_examples, simulation.num_cpus, audit=true, kernels=...
  (any key of conf/config.yaml or of a group, e.g. model.lora.r=16)

  out_dir=DIR        the run directory (default: runs/<timestamp>-<strategy>, -2, -3... when taken); it must not
                     hold a run already, nor be in use by another run (.<name>.lock beside it)
  min_aggregated_share=0.5  the share of rounds that must aggregate (a round with fewer than min_train_nodes
                     valid updates is skipped); below it the run ends "degraded", with none "no-round-aggregated"
  resume=RUN_DIR     continue an interrupted run from its last checkpoint with its saved config
                     (num_rounds=N may extend it)
  -v, --verbose      Flower's and Ray's logs too

The run directory gets config.yaml, metrics.jsonl (one line per round), checkpoint.fedlora, summary.json and
adapter/ (a PEFT adapter); audit/ with audit=true. summary.json's status: completed or budget-exhausted
(exit 0), degraded or no-round-aggregated (exit 3, with status_reason: the rounds aggregated and the last
round's rejected clients).

example: fedlora run model=tiny_llama strategy=flora num_clients=4 num_rounds=3
"""


def run_help() -> str:
    from fedlora import config

    groups = ("strategy", "model", "data", "partitioner", "privacy", "client", "preset")
    lines = [textwrap.fill(", ".join(config.group_options(g)), width=110, initial_indent=f"  {g:<12} ",
                           subsequent_indent=" " * 15) for g in groups]
    return RUN_HELP.format(groups="\n".join(lines))


def cmd_run(argv: list[str]) -> int:
    """``fedlora run``: the pre-flight, the simulation, and what the user reads."""
    if any(a in HELP_FLAGS for a in argv):
        print(run_help())
        return 0
    verbose = any(a in VERBOSE_FLAGS for a in argv)
    overrides = [a for a in argv if a not in VERBOSE_FLAGS]
    from fedlora import simulation

    simulation.quiet_libraries(verbose)  # before the libraries are imported
    from fedlora import preflight

    cfg, run_dir, resume = preflight.prepare(overrides)
    print(f"fedlora: {'resuming ' if resume else ''}{cfg.strategy.name} on {cfg.model.name}/{cfg.data.name}, "
          f"{cfg.num_clients} clients, {cfg.num_rounds} rounds -> {run_dir}", flush=True)
    summary = simulation.simulate(cfg, run_dir, verbose, resume=resume)
    from fedlora.rundir import EXIT_UNDERTRAINED, FAILED_STATUSES

    if summary.get("status") in FAILED_STATUSES:
        print(f"error: the run ended {summary['status']}: {summary['status_reason']}; results in {run_dir}",
              file=sys.stderr)
        return EXIT_UNDERTRAINED
    acc = summary.get("final_eval_accuracy")
    print(f"done: final eval_loss {summary['final_eval_loss']:.4f}"
          + (f", eval_accuracy {acc:.4f}" if acc is not None else "") + f"; adapter in {summary['adapter']}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    from fedlora.compare import cmd_compare

    return cmd_compare(argv)


def cmd_deploy(argv: list[str]) -> int:
    from fedlora.deploy import main as deploy_main

    return deploy_main(argv)


def cmd_generate(argv: list[str]) -> int:
    from fedlora import simulation

    simulation.quiet_libraries(False)
    from fedlora.generate import main as generate_main

    return generate_main(argv)


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "deploy": cmd_deploy, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in (*HELP_FLAGS, "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; use run, compare, deploy or generate.", file=sys.stderr)
        return 2
    from fedlora.config import ConfigError

    try:
        return COMMANDS[cmd](rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from fedlora.simulation import shutdown

        shutdown()
        print("interrupted: stopped all processes; results so far are kept.", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
