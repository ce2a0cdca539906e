"""Shared fixtures: the SST-2 files beside the checkout, a temp FLWR_HOME, quiet libraries."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _flwr_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.getbasetemp() / "flwr_home"))


def fedlora_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlora.cli", *args]
