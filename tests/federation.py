"""A whole secured federation on one machine (the compose file's rehearsal, without Docker), for
tests/test_deploy.py and bench/deploy.py: a SuperLink (TLS + node authentication) and SuperNodes on loopback,
started with the same `fedlora deploy ...` commands a real deployment uses, every process stopped by PID on exit
(through fedlora.processes). docs/deploy.md explains the watchdog in ``run`` and the stopping order.

    with LocalFederation(workdir, nodes=3, data=path) as fed:
        fed.start()                     # certs, keys, SuperLink, connection, registration, SuperNodes
        run_id, info, log = fed.run("strategy=ffa_lora model=tiny_llama ...")  # info: the `flwr ls` record
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from fedlora import processes
from fedlora.config import CONF_DIR
from fedlora.deploy.certs import CA_CERT, key_paths
from fedlora.deploy.flower_config import flwr_bin, flwr_env, last_json


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalFederation:
    def __init__(self, workdir: Path, nodes: int, data: str, profile: str = "cpu", partitions: bool = True,
                 app_dir: Path | None = None, connection: str = "rehearsal", env: dict | None = None):
        self.dir = Path(workdir).resolve()
        self.nodes, self.data, self.profile, self.partitions = int(nodes), str(data), profile, partitions
        self.app_dir = Path(app_dir or CONF_DIR.parent).resolve()
        self.connection = connection
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**flwr_env(), "FLWR_HOME": str(self.dir / "flwr_home"), **(env or {})}
        self.certs, self.keys = self.dir / "certs", self.dir / "keys"
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self.procs: list[subprocess.Popen] = []  # everything started, in order
        self.node_ids: dict[int, int] = {}
        self._seen: set[psutil.Process] = set()  # every process found below ours, even after it was re-parented

    # -- processes -------------------------------------------------------------------------------
    def fedlora(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "fedlora.cli", "deploy", *args], capture_output=True,
                           text=True, timeout=timeout, env=self.env, cwd=self.dir)
        if check and p.returncode != 0:
            raise RuntimeError(f"fedlora deploy {args[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
        return p

    def spawn(self, name: str, args: list[str], raw: bool = False, env: dict | None = None) -> subprocess.Popen:
        """`fedlora deploy ARGS` (or, ``raw``, the command ARGS) in the background, output in NAME.log.
        `fedlora deploy superlink/supernode` exec into the Flower process: the PID is Flower's. ``env``: more
        environment variables for this process (and what it starts)."""
        cmd = list(args) if raw else [sys.executable, "-m", "fedlora.cli", "deploy", *args]
        with open(self.dir / f"{name}.log", "wb") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                 cwd=self.dir)
        p.log_path = self.dir / f"{name}.log"
        self.procs.append(p)
        return p

    @staticmethod
    def log(p: subprocess.Popen) -> str:
        return Path(p.log_path).read_text(errors="replace")

    def wait_for(self, p: subprocess.Popen, text: str, timeout: float) -> str:
        t0 = time.time()
        while time.time() - t0 < timeout:
            self._remember()
            if (m := re.search(text, self.log(p))):
                return m.group(0)
            if p.poll() is not None:
                raise RuntimeError(f"{p.log_path.stem} exited ({p.returncode}) before {text!r}:\n"
                                   f"{self.log(p)[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"{p.log_path.stem}: no {text!r} within {timeout:.0f}s:\n{self.log(p)[-3000:]}")

    def _remember(self) -> None:
        self._seen.update(processes.descendants([p.pid for p in self.procs]))

    def leftovers(self) -> list[int]:
        """PIDs of everything this federation started that still runs (empty after ``stop``)."""
        return ([p.pid for p in self._seen if processes.alive(p)]
                + [p.pid for p in self.procs if p.poll() is None])

    # -- steps ------------------------------------------------------------------------------------
    def make_credentials(self, extra_keys: int = 1) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fedlora("certs", str(self.certs), "--hosts", "127.0.0.1,localhost")
        self.fedlora("keys", str(self.keys), "--nodes", str(self.nodes + extra_keys))

    def start_superlink(self, timeout: float = 120) -> None:
        self.superlink = self.spawn("superlink", ["superlink", "--certs", str(self.certs), "--host", "127.0.0.1",
                                                  "--port", str(self.port)])
        self.wait_for(self.superlink, r"Uvicorn running on https://", timeout)
        self.fedlora("connect", self.connection, "--superlink", self.address, "--ca", str(self.certs / CA_CERT))

    def register(self, indices: list[int]) -> None:
        p = self.fedlora("register", *[str(key_paths(self.keys, i)[1]) for i in indices],
                         "--connection", self.connection, timeout=60 * len(indices))
        for line, i in zip(p.stdout.strip().splitlines(), indices):
            self.node_ids[i] = int(line.rsplit(" ", 1)[1])

    def supernode_args(self, i: int, key: int | None = None, ca: bool = True, extra: tuple = ()) -> list[str]:
        args = ["supernode", "--superlink", self.address, "--data", self.data, "--profile", self.profile,
                "--port", str(free_port())]
        if self.partitions:
            args += ["--partition-id", str(i), "--num-partitions", str(self.nodes)]
        if key is not None:
            args += ["--key", str(key_paths(self.keys, key)[0])]
        if ca:
            args += ["--ca", str(self.certs / CA_CERT)]
        return args + list(extra)

    def start_supernodes(self, timeout: float = 180, extra: dict[int, tuple] | None = None,
                         env: dict[int, dict] | None = None) -> None:
        """Every SuperNode, with its registered key; ``extra``: more `fedlora deploy supernode` arguments per node
        index (e.g. a privacy floor); ``env``: more environment variables per node index."""
        for i in range(self.nodes):
            args = self.supernode_args(i, key=i + 1, extra=(extra or {}).get(i, ()))
            self.supernodes.append(self.spawn(f"supernode-{i + 1}", args, env=(env or {}).get(i)))
        for p in self.supernodes:
            self.wait_for(p, r"SuperNode ID: \d+", timeout)

    def start(self) -> None:
        self.make_credentials()
        self.start_superlink()
        self.register(list(range(1, self.nodes + 1)))
        self.start_supernodes()

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([flwr_bin("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=self.app_dir)

    def clientapps(self) -> int:
        """ClientApp processes alive below this federation's SuperNodes."""
        n = 0
        for proc in processes.descendants([p.pid for p in self.supernodes]):
            try:
                if any("flwr-clientapp" in arg for arg in proc.cmdline()) and processes.alive(proc):
                    n += 1
            except psutil.Error:
                pass
        return n

    def run(self, overrides: str, timeout: float = 1800, runaway_s: float = 60,
            cancel: threading.Event | None = None) -> tuple[int, dict, str]:
        """`flwr run APP CONNECTION --run-config hydra-overrides=... --stream`; returns (run id, the run's
        `flwr ls` record, the streamed log). The status is read from `flwr ls` (`flwr run` exits 0 even
        when the ServerApp failed). More than two ClientApps per SuperNode for ``runaway_s`` aborts the run
        (Flower relaunching ClientApps that missed their 30 s window: docs/deploy.md); so does ``cancel`` once set
        (a run in another thread, given up)."""
        rc = f"hydra-overrides={json.dumps(overrides)}"
        out = self.dir / "flwr-run.log"
        with open(out, "wb") as fh:
            p = subprocess.Popen([flwr_bin("flwr"), "run", str(self.app_dir), self.connection, "--run-config", rc,
                                  "--stream"], stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.app_dir)
        t0, crowded_since = time.time(), None
        try:
            while p.poll() is None:
                self._remember()
                n = self.clientapps()
                crowded_since = (crowded_since or time.time()) if n > 2 * self.nodes else None
                if crowded_since and time.time() - crowded_since > runaway_s:
                    raise RuntimeError(f"{n} ClientApp processes for {self.nodes} SuperNodes for {runaway_s:.0f}s: "
                                       "ClientApps miss Flower's 30 s start/heartbeat window (machine overloaded) "
                                       "and are relaunched; run stopped")
                if time.time() - t0 > timeout:
                    raise RuntimeError(f"flwr run did not finish within {timeout:.0f}s")
                if cancel is not None and cancel.is_set():
                    raise RuntimeError("flwr run cancelled")
                time.sleep(2)
        finally:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        log = out.read_text(errors="replace")
        self._remember()
        m = re.search(r"Successfully started run (\d+)", log)
        if not m:
            raise RuntimeError(f"flwr run did not start a run ({p.returncode}):\n{log[-3000:]}")
        run_id = int(m.group(1))
        for _ in range(30):  # the stream ends with the run; give the status a moment to settle
            ls = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
            info = (last_json(ls.stdout).get("runs") or [{}])[0]
            if str(info.get("status", "")).startswith("finished"):
                break
            time.sleep(2)
        return run_id, info, log

    def stop(self, grace: float = 20.0) -> None:
        """SuperNodes (and whatever else was spawned) first, then the SuperLink: SIGTERM, SIGKILL after
        ``grace``; then every process found below them, by PID."""
        self._remember()
        for group in ([p for p in self.procs if p is not self.superlink], [self.superlink] if self.superlink else []):
            running = [p for p in group if p.poll() is None]
            for p in running:
                p.terminate()
            for p in running:
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        processes.stop(list(self._seen), grace)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
