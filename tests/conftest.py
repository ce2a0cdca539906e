"""Shared fixtures: the SST-2 files beside the checkout, a temp FLWR_HOME, quiet libraries."""

import os
import sys
from pathlib import Path

import pytest

from fedlora import processes

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


TEST_TAG = f"fedlora-test-{os.getpid()}"


def tagged_env() -> dict:
    """Environment for a subprocess whose descendants we can find later (they inherit the tag)."""
    return {**os.environ, "FEDLORA_TEST_TAG": TEST_TAG}


def tagged_pids() -> set:
    """Processes started by this test session's subprocesses, whatever else runs on the machine."""
    return {p.pid for p in processes.with_env("FEDLORA_TEST_TAG", TEST_TAG)}
