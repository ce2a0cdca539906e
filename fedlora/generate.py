"""``fedlora generate RUN_DIR "prompt"``: the greedy answer of a finished run's model, so a user sees what
federated tuning changed. The base model is the one the run's saved ``config.yaml`` names, the adapter
``RUN_DIR/adapter`` loaded with plain PEFT (``PeftModel.from_pretrained``; an exported adapter's merged base weights,
:data:`fedlora.adapters.MERGED_WEIGHTS`, first), the prompt wrapped in the model's chat template where it has one."""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError

HELP = """usage: fedlora generate RUN_DIR "prompt" [--max-new-tokens N] [--base-only]

Answer a prompt with a run's model (greedy decoding): the base model its config.yaml names with the federated
adapter RUN_DIR/adapter. The prompt is a user message of the model's chat template (model=smollm2), or plain text.

  --max-new-tokens N  the most tokens to generate (default 64)
  --base-only         answer with the base model alone (no adapter), to compare

example: fedlora generate runs/2025-01-01-fedit "Review: a gorgeous, witty film.\\n\\nIs the sentiment positive or negative?"
"""


def parse(argv: list[str]) -> tuple[Path, str, int, bool]:
    args, max_new, base_only, i = [], 64, False, 0
    while i < len(argv):
        a = argv[i]
        if a == "--base-only":
            base_only = True
        elif a == "--max-new-tokens" or a.startswith("--max-new-tokens="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in a else 1
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--max-new-tokens needs a whole number >= 1, got {value!r}.")
            max_new = int(value)
        elif a.startswith("--"):
            raise ConfigError(f"unknown option {a}: use --max-new-tokens N or --base-only.")
        else:
            args.append(a)
        i += 1
    if len(args) != 2:
        raise ConfigError('fedlora generate needs a run directory and a prompt: fedlora generate RUN_DIR "prompt".')
    return Path(args[0]), args[1], max_new, base_only


def load(run_dir: Path, base_only: bool = False):
    """(model, tokenizer) of a run: its base model with its adapter (or without, ``base_only``), in eval mode."""
    import torch

    from . import adapters, config, models

    cfg_path, adapter = run_dir / "config.yaml", run_dir / "adapter"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} holds no run (no config.yaml): give the directory of a run (runs/<name>).")
    if not base_only and not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} has no saved adapter ({adapter}/adapter_config.json): the run did not finish "
                          "(answer with --base-only, or resume it).")
    cfg = config.from_yaml(cfg_path.read_text())
    base, tok = models.build_base(cfg.model, int(cfg.seed))
    if base_only:
        return base.eval(), tok
    from peft import PeftModel
    from safetensors.torch import load_file

    merged = adapter / adapters.MERGED_WEIGHTS
    if merged.is_file():  # an exported adapter whose base modules were merged into (FLoRA): their W + dW
        base.load_state_dict(load_file(str(merged)), strict=False)
    model = PeftModel.from_pretrained(base, str(adapter))
    return model.eval(), tok


def answer(model, tok, prompt: str, max_new_tokens: int = 64) -> str:
    """The greedy answer to ``prompt`` (chat template applied where the tokenizer has one), without the prompt."""
    import torch

    from .prompts import chat_ids

    ids = torch.tensor([chat_ids(tok, prompt)])
    eos = getattr(tok, "eos_token_id", None)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                             do_sample=False, eos_token_id=eos, pad_token_id=getattr(tok, "pad_token_id", eos))
    new = out[0, ids.shape[1]:].tolist()
    try:
        return tok.decode(new, skip_special_tokens=True).strip()
    except TypeError:  # fedlora's byte tokenizer (tiny_llama) has no such option: it drops special ids itself
        return tok.decode(new).strip()


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    run_dir, prompt, max_new, base_only = parse(argv)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a run directory: give the directory of a finished run (runs/<name>).")
    model, tok = load(run_dir, base_only)
    print(answer(model, tok, prompt, max_new))
    return 0
