"""Shared fixtures: the SST-2 files beside the checkout, a temp FLWR_HOME, quiet libraries, and runs started early
(:class:`EarlyRun`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora import processes

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.getbasetemp() / "flwr_home"))


def fedlora_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlora.cli", *args]


TEST_TAG = f"fedlora-test-{os.getpid()}"


def tagged_env() -> dict:
    """Environment for a subprocess whose descendants we can find later (they inherit the tag)."""
    return {**os.environ, "FEDLORA_TEST_TAG": TEST_TAG}


def tagged_pids() -> set:
    """Processes started by this test session's subprocesses, whatever else runs on the machine."""
    return {p.pid for p in processes.with_env("FEDLORA_TEST_TAG", TEST_TAG)}


class EarlyRun:
    """A slow `fedlora` command that mostly waits (e.g. a Ray simulation waiting out round_timeouts) and one test
    checks: declared at import by its test module, started in the background with the session's first test when that
    test is selected (fixture ``_early_runs``), so that its waiting overlaps the tests that run before it; the test
    then takes its outcome with :meth:`result`. Its processes carry their own tag (not :data:`TEST_TAG`: other tests'
    checks that nothing of theirs is left running do not see them) and are stopped at the end of the session."""

    def __init__(self, test: str, args):
        self.test, self.args = test, args  # args(out_dir) -> the `fedlora` arguments
        self.tag = f"{TEST_TAG}-early-{len(EARLY_RUNS)}"
        self.out = self.proc = None
        EARLY_RUNS.append(self)

    def start(self, workdir: Path, flwr_home: Path) -> None:
        self.out, self._logs = workdir / "run", (workdir / "stdout.log", workdir / "stderr.log")
        env = {**os.environ, "FEDLORA_TEST_TAG": self.tag, "FLWR_HOME": str(flwr_home)}
        with open(self._logs[0], "wb") as out, open(self._logs[1], "wb") as err:
            self.proc = subprocess.Popen(fedlora_cmd(*self.args(self.out)), cwd=ROOT, stdout=out, stderr=err, env=env)

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        """The command's exit status and output once it has finished (as ``subprocess.run`` gives them)."""
        assert self.proc is not None, f"{self.test} was not selected when the session started"
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                           *(p.read_text(errors="replace") for p in self._logs))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        processes.stop(processes.with_env("FEDLORA_TEST_TAG", self.tag), grace=3)


EARLY_RUNS: list[EarlyRun] = []


@pytest.fixture(scope="session", autouse=True)
def _early_runs(request, tmp_path_factory):
    selected = {item.name for item in request.session.items}
    started = [r for r in EARLY_RUNS if r.test in selected]
    for r in started:
        r.start(tmp_path_factory.mktemp("early"), tmp_path_factory.getbasetemp() / "flwr_home")
    yield
    for r in started:
        r.stop()
