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
