"""Warnings on the command line (issue 16, item 4): ``quiet_libraries`` filters only the named third-party
noise (:data:`fedlora.simulation.THIRD_PARTY_NOISE`), so fedlora's own privacy warnings (a reported epsilon
that is only an upper bound or an approximation) reach the user, with and without ``-v``."""

import logging
import os
import subprocess
import sys
import warnings

from conftest import ROOT

from fedlora import config
from fedlora.simulation import THIRD_PARTY_NOISE, quiet_libraries

UPPER_BOUND = "the reported epsilon is an upper bound"
# the two third-party warnings a normal run printed before they were filtered, as Python would raise them
TORCH_JIT = ("`torch.jit.script_method` is deprecated.", DeprecationWarning, "torch/jit/_script.py", 365,
             "torch.jit._script")
TRANSFORMERS = ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                "transformers/modeling_utils.py", 3312, "transformers.modeling_utils")


def third_party(message, category, filename, lineno, module):
    """Raise a warning as if from ``module`` (the filters match the module name)."""
    warnings.warn_explicit(message, category, filename, lineno, module=module, registry={})


def test_trust_4_privacy_warnings_reach_the_user():
    """After ``quiet_libraries(verbose=False)`` the filters it installed let the warning of the real pre-flight
    path through (client-level DP with fraction_train < 1) and drop exactly the named third-party ones."""
    shown = []
    flwr_level, env = logging.getLogger("flwr").level, dict(os.environ)
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning afterwards
            warnings.resetwarnings()  # a fresh process's list, without pytest's own filters
            quiet_libraries(verbose=False)
            warnings.showwarning = lambda message, category, *a, **k: shown.append((category, str(message)))
            config.load(["privacy=client_level", "fraction_train=0.5", "num_clients=4"])
            assert any(c is UserWarning and UPPER_BOUND in m for c, m in shown), shown
            before = len(shown)
            third_party(*TORCH_JIT)
            third_party(*TRANSFORMERS)
            assert len(shown) == before, shown[before:]  # the named noise is filtered...
            third_party("`foo` is deprecated.", FutureWarning, "somelib/core.py", 1, "somelib.core")
            third_party("`script_method` again", FutureWarning, "torch/jit/_script.py", 365, "torch.jit._script")
            assert [m for _, m in shown[before:]] == ["`foo` is deprecated.", "`script_method` again"]  # ...only it
    finally:
        logging.getLogger("flwr").setLevel(flwr_level)
        os.environ.clear()
        os.environ.update(env)
    assert {(c, m) for c, m in THIRD_PARTY_NOISE} == {(DeprecationWarning, r"torch\.jit\._script"),
                                                      (FutureWarning, r"transformers\.modeling_utils")}


SCRIPT = """
import sys, warnings
from fedlora import cli, config, simulation
rc = cli.main(["run", "privacy=client_level", "fraction_train=0.5", "num_clients=4", "out_dir=" + sys.argv[1]])
import flwr.simulation  # Flower's simulation adds its own DeprecationWarning filter when imported

def fake_run_simulation(**kwargs):  # the noise as a run raises it, once simulate() has imported Flower
{noise}

flwr.simulation.run_simulation = fake_run_simulation
try:
    simulation.simulate(config.load(["model=tiny_llama"]), sys.argv[1] + "-sim")
except RuntimeError:  # no summary: the fake ran nothing
    pass
sys.exit(rc)
"""


def test_trust_4_cli_prints_privacy_warnings_not_library_noise(tmp_path):
    """The CLI path in a fresh process: ``fedlora run`` (here refused after the pre-flight, because out_dir holds
    a run) prints the upper-bound warning on stderr; the named third-party warnings stay silent in a simulation,
    although importing Flower's simulation module put its own filter in front of fedlora's."""
    taken = tmp_path / "run"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text("{}\n")
    noise = "\n".join(f"    warnings.warn_explicit({m!r}, {c.__name__}, {f!r}, {n}, module={mod!r})"
                      for m, c, f, n, mod in (TORCH_JIT, TRANSFORMERS))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(noise=noise), str(taken)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert UPPER_BOUND in p.stderr and "UserWarning" in p.stderr, p.stderr[-2000:]
    assert "already holds a run" in p.stderr
    assert "script_method" not in p.stderr and "is_gradient_checkpointing" not in p.stderr, p.stderr[-2000:]


def test_trust_4_privacy_warnings_reach_the_runs_log_and_summary(tmp_path, caplog):
    """The server repeats fedlora's config warnings in the run's log (Flower's logger: ``flwr log`` in deployment)
    and in summary.json, whatever the process's warning filters say."""
    from harness import InProcessGrid

    from fedlora.strategies.server_app import run_server

    cfg = config.load(["model=tiny_llama", "privacy=client_level", "fraction_train=0.5", "num_clients=4",
                       "num_rounds=1", "local_steps=1", "train.batch_size=4", "eval.max_examples=8",
                       "train.max_length=24", "data.max_train_examples=240"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # even a process that silenced every warning
        with caplog.at_level(logging.WARNING, logger="flwr"):
            summary = run_server(InProcessGrid(4), cfg, tmp_path / "run", echo=lambda *_: None)
    assert any(UPPER_BOUND in w for w in summary["warnings"]), summary["warnings"]
    assert any(UPPER_BOUND in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    import json

    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"] == summary["warnings"]
