"""Issue 20 item 10: the README's ``flwr run .`` lines, run as a new user would (same shell lines, in the checkout),
train tiny_llama for 2 rounds on 3 simulated nodes and finish with ``finished:completed``; the SuperLink that
``flwr run`` leaves running in the background (and its SuperExec, Ray) is stopped by PID afterwards.

Isolation from whatever else runs on the machine: a temporary ``FLWR_HOME`` and two free ports for the local
SuperLink (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``: with the default port an
already running local SuperLink, someone else's, would be reused), and an environment tag that every process the
command starts inherits (so they are found even once re-parented)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, TEST_TAG

from fedlora import processes

#: The README's block, verbatim (README "flwr run"): the venv's bin on PATH (flwr starts `flower-superlink` by
#: name), no runtime dependency installation (the app runs in this environment), the run streamed to the end.
README_RUN = """\
source .venv/bin/activate
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
flwr run . --run-config 'hydra-overrides="model=tiny_llama num_rounds=2 num_clients=3"' --federation-config "num-supernodes=3" --stream
flwr ls
"""
#: How the README stops the local SuperLink (its SuperExec exits with it).
README_STOP = 'kill $(pgrep -f "flower-superlink --insecure --simulation")'
TIMEOUT_S = 1200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_dirs() -> set[Path]:
    runs = ROOT / "runs"
    return {p for p in runs.iterdir() if p.is_dir()} if runs.is_dir() else set()


def _ours(d: Path, t0: float) -> bool:
    """A run directory this test's command wrote: new, after t0, with the README's config."""
    try:
        cfg = (d / "config.yaml").read_text()
        return d.stat().st_mtime >= t0 and "name: tiny_llama" in cfg and "num_clients: 3" in cfg \
            and "num_rounds: 2" in cfg
    except OSError:
        return False


def test_robust_10_flwr_run_as_in_readme(tmp_path):
    if not (ROOT / ".venv" / "bin" / "flower-superlink").exists():
        pytest.skip("no .venv/bin/flower-superlink: the README's lines need `make install`'s environment")
    tag = f"{TEST_TAG}-flwr-run"
    port, control = _free_port(), _free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home"), "FEDLORA_TEST_TAG": tag,
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port), "FLWR_LOCAL_CONTROL_API_PORT": str(control)}
    for key in ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "VIRTUAL_ENV"):  # the README sets what it needs
        env.pop(key, None)
    before, t0 = _run_dirs(), time.time()
    log = tmp_path / "flwr-run.log"
    try:
        with open(log, "wb") as fh:
            p = subprocess.run(["bash", "-c", "set -e\n" + README_RUN], cwd=ROOT, env=env, stdout=fh,
                               stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
        out = log.read_text(errors="replace")
        if "Failed to start local SuperLink" in out or "Unable to launch `flower-superlink`" in out:
            pytest.skip(f"flwr could not start its local SuperLink in this sandbox: {out[-1500:]}")
        assert p.returncode == 0, out[-4000:]
        run_id = out.split("Successfully started run ", 1)[1].split()[0]
        assert "[round   2/2]" in out, out[-4000:]
        # flwr run exits 0 whatever happens to the run: the status is flwr ls's
        ls = subprocess.run([str(ROOT / ".venv" / "bin" / "flwr"), "ls", "--run-id", run_id, "--format", "json"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        info = json.loads(ls.stdout[ls.stdout.index("{"):])["runs"][0]
        assert info["status"] == "finished:completed", info
        # the app ran from this environment's fedlora, not Flower's copy (which holds no code)
        apps = list((tmp_path / "flwr_home" / "apps").iterdir())
        assert len(apps) == 1 and not list(apps[0].rglob("*.py")), [str(a) for a in apps[0].rglob("*")]
        new = [d for d in _run_dirs() - before if _ours(d, t0)]
        assert len(new) == 1, new
        summary = json.loads((new[0] / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds"] == 2 and summary["num_clients"] == 3, summary
        assert (new[0] / "adapter" / "adapter_config.json").is_file()
        shutil.rmtree(new[0])
    finally:
        started = processes.with_env("FEDLORA_TEST_TAG", tag)
        links = [q for q in started if _cmd(q).find("flower-superlink") >= 0 and f"--port {port}" in _cmd(q)]
        processes.stop(links, grace=20)  # what README_STOP does, by PID: the SuperExec follows its parent
        time.sleep(2)
        processes.stop(processes.with_env("FEDLORA_TEST_TAG", tag), grace=10)
    left = [q for q in processes.with_env("FEDLORA_TEST_TAG", tag) if processes.alive(q)]
    assert not left, [_cmd(q) for q in left]
    assert links, "flwr run left no SuperLink running: the README's stop line would have nothing to stop"


def _cmd(proc) -> str:
    try:
        return " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone meanwhile
        return ""


def test_robust_10_readme_shows_the_tested_lines():
    """The lines the test above runs are the README's (so the README's instructions are the tested ones)."""
    readme = (ROOT / "README.md").read_text()
    for line in [*README_RUN.splitlines(), README_STOP]:
        assert line in readme, f"README.md lacks the tested line: {line}"


def test_robust_10_sst2_default_comes_from_the_installed_package_or_the_setting(tmp_path, monkeypatch):
    """The default SST-2 folder is found from where fedlora is installed (this checkout), whatever the working
    directory (a SuperLink's, Flower's app copy); FEDLORA_SST2 names another folder, and a wrong one is refused."""
    from fedlora import data

    monkeypatch.delenv(data.SST2_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    if data.SHARED_SST2.is_dir():
        assert data.default_sst2() == str(data.SHARED_SST2) == str(ROOT.parent / "shared" / "data" / "sst2")
    else:
        assert data.default_sst2() == data.SST2_HUB
    (tmp_path / "sst2").mkdir()
    monkeypatch.setenv(data.SST2_ENV, str(tmp_path / "sst2"))
    assert data.default_sst2() == str((tmp_path / "sst2").resolve())
    monkeypatch.setenv(data.SST2_ENV, str(tmp_path / "missing"))
    with pytest.raises(data.DataError, match="FEDLORA_SST2"):
        data.default_sst2()
