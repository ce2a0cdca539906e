"""A run directory's life, whichever entry point starts the run (``fedlora run``, ``fedlora compare``,
``resume=``, ``flwr run .``): its name (:func:`default_run_dir`), its claim by the one process that writes it
(:func:`claim_run_dir`, an OS lock beside it), the check that it holds no run yet (:func:`check_fresh`), and how
the run ended (:func:`run_status`: ``summary.json``'s ``status`` and ``fedlora run``'s exit code). No Flower here."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path


#: How a run ended (``summary.json`` ``status``) -> the exit code of ``fedlora run``. The share of rounds that must
#: aggregate is ``min_aggregated_share`` (conf/config.yaml); a skipped round (fewer valid updates than
#: ``min_train_nodes``, or a client-level DP round without every sampled client) leaves the model as it was.
EXIT_UNDERTRAINED = 3
STATUSES = {
    "completed": 0,  # every round ran; at least min_aggregated_share of them aggregated
    "budget-exhausted": 0,  # stopped early: the next round would exceed privacy.target_epsilon
    "degraded": EXIT_UNDERTRAINED,  # some rounds aggregated, fewer than min_aggregated_share of those that ran
    "no-round-aggregated": EXIT_UNDERTRAINED,  # rounds ran, none aggregated: the model is the untrained starting one
}
#: statuses whose model is not the trained model the config asked for: non-zero exit, left out of comparisons' means
FAILED_STATUSES = tuple(s for s, code in STATUSES.items() if code)
DEFAULT_MIN_AGGREGATED_SHARE = 0.5


def min_aggregated_share(cfg) -> float:
    """``min_aggregated_share`` of a config (a saved config without the key: the default), checked: a number in
    [0, 1], else a one-sentence :class:`~fedlora.config.ConfigError`."""
    from .config import ConfigError

    v = cfg.get("min_aggregated_share", DEFAULT_MIN_AGGREGATED_SHARE)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ConfigError(f"min_aggregated_share={v} must be a number in [0, 1] (the share of rounds that must "
                          "aggregate for the run to count as completed).")
    return float(v)


def run_status(rows: list[dict], min_share: float, stopped: str | None = None) -> dict:
    """How a run ended, from its metrics rows: ``status`` (:data:`STATUSES`), ``status_reason`` (None when it
    completed), ``rounds_aggregated`` and ``last_rejected`` (the ``rejected`` list of the last round that ran).
    ``stopped``: why the run stopped before its last round (the privacy budget), if it did."""
    done = [r for r in rows if r.get("round", 0) > 0]
    aggregated = [r for r in done if not r.get("skipped")]
    last = done[-1] if done else {}
    out = {"rounds_aggregated": len(aggregated), "last_rejected": list(last.get("rejected") or [])}
    if done and not aggregated:
        status = "no-round-aggregated"
    elif done and len(aggregated) < min_share * len(done):
        status = "degraded"
    else:
        return out | {"status": "budget-exhausted" if stopped else "completed", "status_reason": None}
    who = "; ".join(f"partition {x.get('node')} (node {x.get('node_id')}): {x.get('reason')}"
                    for x in out["last_rejected"]) or "none"
    what = f"skipped ({last['skipped']})" if last.get("skipped") else "aggregated"
    reason = (f"{len(aggregated)} of {len(done)} rounds aggregated (min_aggregated_share={min_share:g}); "
              f"last round {last['round']} {what}; its rejected clients: {who}")
    return out | {"status": status, "status_reason": reason}


def default_run_dir(cfg, root: str | Path = "runs", stamp: str | None = None) -> Path:
    """A new directory ``<root>/<timestamp>-<strategy>``, created here, exclusively: a run started in the same
    second as another (a seed sweep, two shells) gets ``-2``, ``-3``, ... instead of sharing its directory."""
    stamp = stamp or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(root).mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        d = Path(root) / (f"{stamp}-{cfg.strategy.name}" + (f"-{i}" if i > 1 else ""))
        try:
            d.mkdir()  # atomic: exactly one caller creates each name
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run directory name for {stamp}-{cfg.strategy.name} in {root}")


_HELD: dict[str, int] = {}  # resolved run dir -> fd of its lock file, held by this process


def lock_path(run_dir) -> Path:
    """The lock file of a run directory: ``.<name>.lock`` beside it (claiming a directory does not create it, so
    a claimed directory holds only what its run writes). Held, by an OS lock, by the process that writes the
    run; a process that dies releases it; removed when the run ends."""
    d = Path(run_dir).resolve()
    return d.parent / f".{d.name}.lock"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(fd: int, wait_s: float = 1.0) -> str:
    """Who holds a lock file: the line its holder writes right after taking the lock (waited for up to ``wait_s``:
    a claim that lost the race by microseconds can find the file still empty), else "another process"."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 300, 0).decode(errors="replace").strip()
        if text or time.monotonic() >= deadline:
            return text or "another process"
        time.sleep(0.02)


def claim_run_dir(run_dir) -> Path:
    """Claim ``run_dir`` for this process: an exclusive lock (``flock``) on :func:`lock_path`, released by the OS
    if the process dies, so a crashed run never blocks its ``resume=``. Another process holding it -> a
    one-sentence :class:`~fedlora.config.ConfigError` naming that process. Claiming a directory this process
    already holds is a no-op (the CLI and the ServerApp it runs both claim); threads of one process are not told
    apart. Held until :func:`release_run_dir` or the process ends. Returns the resolved directory."""
    import atexit
    import fcntl
    import socket

    from .config import ConfigError

    d, lock = Path(run_dir).resolve(), lock_path(run_dir)
    held = _HELD.get(str(d))
    if held is not None:
        if _same_file(held, lock):
            return d
        os.close(_HELD.pop(str(d)))  # the lock file was removed since: claim again
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"out_dir {d} is in use by another run ({holder}): choose another out_dir, or wait "
                              "for that run to end.") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # its holder removed the file between our open and our lock: take the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {_dt.datetime.now():%Y-%m-%d %H:%M:%S}\n"
              .encode(), 0)
    if not _HELD:
        atexit.register(_release_all)
    _HELD[str(d)] = fd
    return d


def release_run_dir(run_dir) -> None:
    """End this process's claim on ``run_dir`` (:func:`claim_run_dir`); its lock file is removed."""
    d = Path(run_dir).resolve()
    fd = _HELD.pop(str(d), None)
    if fd is None:
        return
    try:
        if _same_file(fd, lock_path(d)):
            os.unlink(lock_path(d))  # while still locked: a process waiting on the old file sees it go
    finally:
        os.close(fd)


def _release_all() -> None:
    for d in list(_HELD):
        release_run_dir(d)


#: files that mean a directory already holds a run (config.yaml is written before the first round)
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


def check_fresh(run_dir) -> None:
    """A new run never writes into another run's directory: ``run_dir`` is claimed for this process
    (:func:`claim_run_dir`: refused while another process writes it) and must not hold a run already
    (:data:`RUN_FILES`), else a one-sentence :class:`~fedlora.config.ConfigError`. Called before anything starts
    (pre-flight, ``fedlora compare``'s plan) and again by the ServerApp."""
    from .config import ConfigError

    d = claim_run_dir(run_dir)
    if any((d / name).exists() for name in RUN_FILES):
        release_run_dir(d)
        raise ConfigError(f"out_dir {run_dir} already holds a run: pass resume={run_dir} to continue it, "
                          f"or choose a new out_dir.")
