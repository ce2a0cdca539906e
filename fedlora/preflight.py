"""One pre-flight for every entry point (``fedlora run``, ``fedlora compare``, ``resume=``, ``flwr run .``):
compose the config, check it, its data and the strategy's own requirements, and choose the run directory,
before anything starts. Every refusal is a :class:`~fedlora.config.ConfigError` in one sentence (exit 2)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from . import config, data
from .report import check_fresh, default_run_dir


def check_setting(cfg) -> None:
    """The part of :func:`check` that does not depend on the strategy: the config's own rules and the data
    (loaded and split into the clients' partitions). ``fedlora compare`` refuses a whole comparison on these."""
    config.validate(cfg)
    data.check_partitions(cfg)


def check(cfg) -> None:
    """Everything that can be checked about a composed config without starting anything: :func:`check_setting`
    and the strategy's own requirements (e.g. a single-rank method refuses mixed client ranks)."""
    from fedlora import strategies

    check_setting(cfg)
    strategies.get(cfg.strategy.name).check_config(cfg)


def refuse_group_overrides(overrides: list[str]) -> None:
    """A resume merges plain keys into the saved config; a config group (``privacy=none``, ``strategy=flora``) would
    replace a whole section by a string, so it is refused in one sentence."""
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if "=" in ov and "." not in key and (config.CONF_DIR / key).is_dir():
            raise config.ConfigError(f"resume cannot switch the config group {key} ({ov}): a resumed run keeps its "
                                     "saved config, so override single keys (e.g. num_rounds=N) or start a new run.")


def check_resume(saved, cfg) -> None:
    """The overrides a resume may not make, against the run's saved config: privacy settings that the epsilon
    already spent was accounted with (:func:`fedlora.privacy.check_resume`). The server checks them again against
    the checkpoint when it loads it."""
    from fedlora import privacy

    try:
        privacy.check_resume(saved, cfg)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None


def _check_checkpoint(rdir: Path) -> None:
    """A run directory is resumed only from a checkpoint that loads (an older pickle one is refused, see
    :mod:`fedlora.checkpoint`): refused here, before anything starts, rather than after the handshake."""
    from fedlora import checkpoint

    try:
        checkpoint.load(rdir, warn=lambda *_: None)
    except checkpoint.CheckpointError as e:
        raise config.ConfigError(str(e)) from None


def prepare(overrides: list[str], run_dir: str | Path | None = None):
    """``(cfg, run_dir, resume)`` for a run: composed and checked config, absolute run directory (``run_dir``,
    else ``out_dir``, else a fresh timestamped one; it must not hold a run already), and whether it resumes.
    ``resume=<run dir>`` continues that run with its saved config (``num_rounds=N`` may extend it)."""
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if resume:
        rdir = Path(resume).resolve()
        if not (rdir / "config.yaml").exists():
            raise config.ConfigError(f"resume={resume} is not a run directory (no config.yaml there).")
        cfg = config.from_yaml((rdir / "config.yaml").read_text())
        rest = [o for o in overrides if not o.startswith("resume=")]
        refuse_group_overrides(rest)
        saved = cfg
        if rest:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
        check(cfg)
        check_resume(saved, cfg)
        _check_checkpoint(rdir)
        return cfg, rdir, True
    cfg = config.load(overrides)
    check(cfg)
    rdir = Path(run_dir or cfg.out_dir or default_run_dir(cfg)).resolve()
    check_fresh(rdir)
    return cfg, rdir, False
