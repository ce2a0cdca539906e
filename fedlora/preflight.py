"""One pre-flight for every entry point (``fedlora run``, ``fedlora compare``, ``resume=``, ``flwr run .``):
compose the config, check it, its data, the model it adapts and the strategy's own requirements, and choose the run
directory, before anything starts. Every refusal is a :class:`~fedlora.config.ConfigError` in one sentence that
names the key and the fix (exit 2).

What is checked, in order (:func:`check`):

- the config's own rules (:func:`fedlora.config.validate`: types and ranges of every documented key, the
  ``label_skew`` proportions, ``client_ranks``, privacy settings) and the strategy's (``check_config``);
- the data against the model (:func:`check_labels`: instruction data needs a causal LM, every label
  is a class the model holds), the partitioner against the data (:func:`check_partitioner`), the validation split
  and the clients' partitions (:func:`fedlora.data.check_partitions`);
- the privacy settings against the partitions (:func:`check_privacy_data`: DP ``target_delta`` below 1/n);
- the model (:func:`check_model`: ``model.lora.target_modules`` and ``modules_to_save`` match modules of the model,
  built on the meta device: no weights are loaded; label words are distinct tokens).

A resume (``resume=RUN_DIR``) keeps the run's saved config: only the keys of :data:`RESUME_ALLOWED` may change
(:func:`check_resume_changes`), and the privacy rules of :func:`check_resume` apply on top.
"""

from __future__ import annotations

import functools
from fnmatch import fnmatch
from pathlib import Path

from omegaconf import OmegaConf

from . import batching, config, data
from .rundir import check_fresh, claim_run_dir, default_run_dir

#: What ``resume=RUN_DIR key=value ...`` may change of the saved config: how many rounds (``num_rounds``; under
#: client-level DP only as many as the budget pays for) and how the remaining rounds are run, never what they
#: compute: ``round_timeout``, ``eval.batch_size`` (the same figures, batched differently), ``audit`` (write the
#: audit files from now on), ``kernels`` (the same maths by other kernels; DP-SGD still needs peft), the simulation's
#: resources and node settings (``simulation.*``, what a restarted SuperNode may change in deployment too) and
#: fault-injection rehearsals (``debug.*``). Anything else (strategy, model, data, partitioner, clients, ranks, seed,
#: training and ``train.prox_mu``, the server optimizer ``server.*`` (its moments are checkpointed for the run's own
#: settings), evaluation caps, privacy...) would make the resumed rounds a different experiment: start a new run.
RESUME_ALLOWED = ("num_rounds", "round_timeout", "min_aggregated_share", "eval.batch_size", "audit", "diagnostics",
                  "kernels", "simulation.*", "debug.*")


def check_setting(cfg) -> None:
    """The part of :func:`check` that does not depend on the strategy: the config's own rules, the data (loaded
    and split into the clients' partitions) against the model and the privacy settings, and the model's LoRA
    targets. ``fedlora compare`` refuses a whole comparison on these."""
    config.validate(cfg)
    _check_against_machine_data_model(cfg)


def _check_against_machine_data_model(cfg) -> None:
    """:func:`check_setting` after the config's own rules: the simulation's resources, then the data, partitions,
    privacy and model checks, in that order."""
    from fedlora.simulation import check_simulation

    check_simulation(cfg)
    check_labels(cfg)
    check_partitioner(cfg)
    sizes = data.check_partitions(cfg)
    check_privacy_data(cfg, sizes)
    check_model(cfg)


def check(cfg) -> None:
    """Everything that can be checked about a composed config without starting anything: the config's rules, the
    strategy's own requirements (e.g. a single-rank method refuses mixed client ranks), then the rest of
    :func:`check_setting`."""
    from fedlora import strategies

    config.validate(cfg)
    strategies.get(cfg.strategy.name).check_config(cfg)
    check_compile(cfg)
    _check_against_machine_data_model(cfg)


def check_compile(cfg) -> None:
    """``server.compile=true`` needs a C++ compiler (torch.compile on the CPU) and a strategy that sums replies as
    sent (what it compiles: their sum and the int8 quantiser of their downlink)."""
    from fedlora import compiled, strategies

    if not compiled.enabled(cfg):
        return
    if not strategies.get(cfg.strategy.name).sums_replies:
        able = [n for n, s in strategies.STRATEGIES.items() if s.sums_replies]
        raise config.ConfigError(f"server.compile=true applies to the strategies that sum replies as sent "
                                 f"({' and '.join(able)}), not to strategy={cfg.strategy.name}: set it to false.")
    if (why := compiled.missing_compiler()) is not None:
        raise config.ConfigError(why)


def compile_note(cfg) -> str | None:
    """A sentence for the run's log when ``server.compile=true`` has nothing to compile (it compiles the sum of
    fp16, bf16 and int8 replies and an int8 downlink's quantiser), else None."""
    from . import codecs, compiled

    if not compiled.enabled(cfg):
        return None
    up, down = codecs.of_config(cfg, "up").name, codecs.of_config(cfg, "down").name
    if up in compiled.CODECS or down == "int8":
        return None
    return (f"server.compile=true compiles nothing with comm.up={up} and comm.down={down}: it compiles the sum of "
            f"fp16, bf16 and int8 replies and an int8 downlink's quantiser; set comm.up=bf16 (or fp16, int8) or "
            f"server.compile=false.")


def num_classes(cfg) -> int | None:
    """Classes the model can tell apart: ``model.num_labels`` (seq-cls head), the number of ``data.label_words``
    (a causal LM scores one word per class; 0 when there are none); None for instruction data."""
    if cfg.data.get("kind", "classification") == "instruction":
        return None
    if cfg.model.task == "seq-cls":
        return int(cfg.model.num_labels)
    return len(cfg.data.get("label_words") or [])


def check_labels(cfg) -> None:
    """The data suits the model: instruction data needs a causal LM, classification data on a causal LM needs
    ``data.label_words``, and every label of the training and test splits is a class the model holds (unlabelled
    test rows were already dropped by :func:`fedlora.data.load`, unlabelled training rows refused). One sentence each."""
    kind, task = cfg.data.get("kind", "classification"), cfg.model.task
    if kind == "instruction":
        if task != "causal-lm":
            raise config.ConfigError(f"data={cfg.data.name} is instruction data (prompt and response), which only a causal LM "
                              f"can learn, but model={cfg.model.name} has model.task={task}: use a causal LM, e.g. "
                              "model=tiny_llama.")
        return
    words = cfg.data.get("label_words")
    if task == "causal-lm" and not words:
        raise config.ConfigError(f"model={cfg.model.name} is a causal LM, so classification data needs one label word per "
                          "class: set data.label_words, e.g. data.label_words=[negative,positive].")
    k = num_classes(cfg)
    train, test = data.load(cfg.data)
    for name, ds in (("training", train), ("test", test)):
        top = int(max(ds["label"])) if len(ds) else -1
        if top < k:
            continue
        if task == "seq-cls":
            raise config.ConfigError(f"the {name} split of data={cfg.data.name} has label {top} but model.num_labels={k} "
                              f"(labels 0..{k - 1}): set model.num_labels={top + 1} or fix the labels.")
        raise config.ConfigError(f"the {name} split of data={cfg.data.name} has label {top} but data.label_words="
                          f"[{','.join(map(str, words))}] has a word for labels 0..{k - 1} only: give one label word "
                          f"per class (labels 0..{top}).")


def check_partitioner(cfg) -> None:
    """The partitioner against the data: a partitioner that deals by label needs labelled data, and ``label_skew``
    one share per class in every row of ``partitioner.proportions`` (a missing class used to be a bare KeyError)."""
    if cfg.partitioner.name != "iid" and cfg.data.get("kind", "classification") == "instruction":
        raise config.ConfigError(f"partitioner={cfg.partitioner.name} deals the data by label, but data={cfg.data.name} "
                                 "has no labels (instruction data): use partitioner=iid.")
    if cfg.partitioner.name == "label_skew":
        classes = int(max(data.load(cfg.data)[0]["label"])) + 1
        cols = {len(row) for row in cfg.partitioner.proportions}
        if cols != {classes}:
            raise config.ConfigError(
                f"partitioner.proportions gives {' or '.join(map(str, sorted(cols)))} shares per client but "
                f"data={cfg.data.name} has {classes} classes (labels 0..{classes - 1}): give each client one share "
                "per class.")


def check_privacy_data(cfg, sizes: list[int]) -> None:
    """DP's ``target_delta`` against the data: DP-SGD protects one example of a client's partition, so delta must be
    below 1/n for the smallest partition (the clients check it again on their own data); client-level DP protects a
    whole client, so delta must be below 1/num_clients. Otherwise the guarantee allows releasing a whole record."""
    from fedlora import privacy

    mode = privacy.mode_of(cfg)
    if mode not in ("dp_sgd", "client_dp"):
        return
    delta = float(cfg.privacy.target_delta)
    if mode == "dp_sgd":
        n = min(sizes)
        if delta >= 1.0 / n:
            raise config.ConfigError(
                f"privacy.target_delta={delta:g} is not below 1/n = {1.0 / n:.3g} for client {sizes.index(n)}'s n={n} "
                f"examples (the smallest partition), which makes the DP-SGD guarantee meaningless: choose "
                f"privacy.target_delta < {1.0 / n:.3g}.")
    elif delta >= 1.0 / int(cfg.num_clients):
        raise config.ConfigError(
            f"privacy.target_delta={delta:g} is not below 1/num_clients = {1.0 / int(cfg.num_clients):.3g}, which "
            "makes the client-level guarantee meaningless (it protects whole clients): choose a smaller "
            "privacy.target_delta.")


def check_model(cfg) -> None:
    """The model's LoRA settings against the model itself, built from its config on the meta device (no weights
    are read; tiny_llama from its yaml, the others from their ``config.json``): ``model.lora.target_modules`` must
    match a module PEFT can adapt, every ``modules_to_save`` name a module, and a causal LM's label words must start
    with distinct tokens. Cached per model config."""
    words = cfg.data.get("label_words") if cfg.data.get("kind", "classification") != "instruction" else None
    _check_model(OmegaConf.to_yaml(cfg.model, resolve=True), tuple(words) if words else None)


def _meta_model(mc):
    """(model on the meta device, tokenizer or None) for the model config ``mc`` (tokenizer only for causal LMs)."""
    import torch

    from . import models

    if mc.name == "tiny_llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(vocab_size=int(mc.vocab_size), hidden_size=int(mc.hidden_size),
                           intermediate_size=int(mc.intermediate_size), num_hidden_layers=int(mc.num_hidden_layers),
                           num_attention_heads=int(mc.num_attention_heads), max_position_embeddings=512)
        with torch.device("meta"):
            return LlamaForCausalLM(conf), models.ByteTokenizer()
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    source, extra = models.source_of(mc)
    gguf = {k: v for k, v in extra.items() if k == "gguf_file"}  # model=smollm2: the packaged GGUF file
    try:
        if mc.task == "seq-cls":
            conf = AutoConfig.from_pretrained(source, num_labels=int(mc.num_labels), **gguf)
            with torch.device("meta"):
                return AutoModelForSequenceClassification.from_config(conf), None
        conf = AutoConfig.from_pretrained(source, **gguf)
        tok = AutoTokenizer.from_pretrained(source, **gguf)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(conf), tok
    except (OSError, ValueError) as e:
        first = config.first_line(e)
        raise config.ConfigError(f"model.source={source} could not be loaded ({first}): give a local path or a "
                                 "reachable hub id.") from None


@functools.lru_cache(maxsize=8)
def _check_model(model_yaml: str, label_words: tuple | None) -> None:
    import torch
    from peft import get_peft_model

    from . import models

    mc = OmegaConf.create(model_yaml)
    base, tok = _meta_model(mc)
    names = [n for n, _ in base.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
    for t in list(mc.lora.get("modules_to_save") or []):
        if not any(n == t or n.endswith("." + t) for n in names):
            raise config.ConfigError(f"model.lora.modules_to_save names {t}, which is no module of model={mc.name}: "
                                     "fix the name (e.g. classifier for a classification head) or leave it out.")
    targets = mc.lora.target_modules
    shown = targets if isinstance(targets, str) else f"[{','.join(map(str, targets))}]"
    try:
        get_peft_model(base, models.lora_config(mc))
    except ValueError as e:  # PEFT's NoMatchingPeftModuleError, or a module type LoRA cannot adapt
        first = str(e).strip().split(". ")[0].splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        nothing = "not found" in first or "no modules were targeted" in first.lower()
        why = "matches no module" if nothing else f"cannot be adapted ({first})"
        raise config.ConfigError(
            f"model.lora.target_modules={shown} {why} in model={mc.name}: name some of its linear layers "
            f"({', '.join(linear[:10])}), a regular expression over full module names, or all-linear.") from None
    if label_words and mc.task == "causal-lm":
        batching.Collator(tok, "causal-lm", 8, list(label_words))  # DataError: label words that share a first token


def refuse_group_overrides(overrides: list[str]) -> None:
    """A resume merges plain keys into the saved config; a config group (``privacy=none``, ``strategy=flora``) would
    replace a whole section by a string, so it is refused in one sentence."""
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if "=" in ov and "." not in key and (config.CONF_DIR / key).is_dir():
            raise config.ConfigError(f"resume cannot switch the config group {key} ({ov}): a resumed run keeps its "
                                     "saved config, so override single keys (e.g. num_rounds=N) or start a new run.")


def resume_allows(key: str) -> bool:
    """Whether a resume may change ``key`` (a dotted key of the config): :data:`RESUME_ALLOWED`."""
    return any(fnmatch(key, pattern) for pattern in RESUME_ALLOWED)


_ABSENT = object()


def check_resume_changes(saved, cfg, *, privacy: bool) -> None:
    """Refuse, naming the key, a change of the saved config outside :data:`RESUME_ALLOWED`: the ``privacy.*`` keys
    (``privacy=True``) or every other key (``privacy=False``). Values given again unchanged are fine."""
    before, after = config.flat(saved), config.flat(cfg)
    for key in sorted(set(before) | set(after)):
        was, now = before.get(key, _ABSENT), after.get(key, _ABSENT)
        same = was == now and isinstance(was, bool) == isinstance(now, bool)
        if same or resume_allows(key) or key.startswith("privacy.") != privacy:
            continue
        show = lambda v: "unset" if v is _ABSENT else "null" if v is None else v  # noqa: E731
        raise config.ConfigError(
            f"resume cannot change {key} (from {show(was)} to {show(now)}): a resumed run keeps its saved config "
            f"except {', '.join(RESUME_ALLOWED)}, so start a new run to change it.")


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
    ``resume=<run dir>`` continues that run with its saved config; only the keys of :data:`RESUME_ALLOWED` may be
    overridden (``num_rounds=N`` may extend it)."""
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
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
            except Exception as e:  # OmegaConf's own grammar errors
                first = config.first_line(e)
                raise config.ConfigError(f"invalid override: {first}") from None
        config.check_types(cfg, saved)
        check_resume_changes(saved, cfg, privacy=False)
        check_resume(saved, cfg)  # the privacy rules' own sentences first, then any other privacy change
        check_resume_changes(saved, cfg, privacy=True)
        check(cfg)
        _check_checkpoint(rdir)
        claim_run_dir(rdir)  # a second resume of the same run, started meanwhile, is refused here
        return cfg, rdir, True
    cfg = config.load(overrides)
    check(cfg)
    rdir = Path(run_dir or cfg.out_dir or default_run_dir(cfg)).resolve()
    check_fresh(rdir)
    return cfg, rdir, False
