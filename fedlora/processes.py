"""Finding and stopping the processes a run started (Ray's workers, Flower's SuperLink, SuperNodes, SuperExecs,
ClientApps), by PID, with psutil. The one place that walks the process table: the simulation, the deployment
harness of the tests and the benchmarks all stop what they started through these functions."""

from __future__ import annotations

import os

import psutil


def descendants(pids: list[int]) -> list[psutil.Process]:
    """Every living process below ``pids`` (children, grandchildren, ...)."""
    out = []
    for pid in pids:
        try:
            out.extend(psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return out


def with_env(name: str, value: str) -> list[psutil.Process]:
    """Processes (other than this one) whose environment holds ``name=value``: a token that every process
    started by a run inherits finds them even after their parent died and they were re-parented."""
    me, found = os.getpid(), []
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            if p.environ().get(name) == value:
                found.append(p)
        except psutil.Error:
            pass
    return found


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (psutil checks the PID was not reused by comparing start times)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(procs: list[psutil.Process], grace: float = 3.0) -> None:
    """SIGTERM each process, then SIGKILL whatever is still alive after ``grace`` seconds."""
    procs = [p for p in procs if alive(p)]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
