"""Same run, same numbers: every strategy (and both DP modes) on tiny_llama through the real ServerApp loop and
ClientApp functions (in-process grid), compared with metrics recorded before the architecture step (issue 15).

Two checks per case:
- a second run in the same process gives a metrics file that is bit-identical apart from timings;
- the metrics equal the recorded ones (``tests/data/determinism.json``): integers, strings, lists (bytes up and
  down, sampled and rejected clients, statuses) exactly; floats at rtol 1e-4, because the recording was made on
  one CPU and float32 sums in another order (another BLAS kernel) differ in the last bits, while a change of
  behaviour (aggregation, sampling, seeding, a different payload) moves losses by far more than 1e-4.

Regenerate the recording only for an intended change of behaviour: ``python tests/test_determinism.py``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "determinism.json"
TIMING = {"wall_s", "round_s", "eval_s", "unix", "train_s"}

FAST = ["model=tiny_llama", "num_clients=4", "local_steps=2", "train.batch_size=4", "eval.max_examples=16",
        "train.max_length=32", "num_rounds=2", "data.max_train_examples=240"]
HET = ["client_ranks=[2,4,3,5]"]
FEDPIPE = ["strategy=fedpipe", "strategy.plan_model=llama-7b", "strategy.seq_len=512",
           "strategy.examples_per_round=4", "strategy.importance.warmup_steps=1", "strategy.importance.budget=0.5",
           "strategy.profiles=[jetson_orin_nano_8gb,rtx3060_12gb,a100_80gb,a100_80gb]"]
CASES = {
    "fedit": ["strategy=fedit"],
    "flora": ["strategy=flora", "fraction_train=0.5", "num_rounds=3"] + HET,
    "ffa_lora": ["strategy=ffa_lora"],
    "lora_fair": ["strategy=lora_fair"],
    "flexlora": ["strategy=flexlora"] + HET,
    "hetlora": ["strategy=hetlora"] + HET,
    "fedpipe_stacking": FEDPIPE + ["strategy.aggregation=stacking"],
    # mixed ranks zero-padded: the plan's tie-break gives clients with slack the largest rank (the default before
    # 2026-12-04), so the ranks differ
    "fedpipe_zero_pad": FEDPIPE + ["strategy.aggregation=zero_pad", "strategy.rank_preference=largest"],
    "fedpipe_steps_largest": [o for o in FEDPIPE if "examples_per_round" not in o] + [
        "strategy.aggregation=zero_pad", "strategy.rank_preference=largest"],
    # the default plan (equal optimizer steps per round, issue 21; every client keeps the smallest rank, 2026-12-04)
    "fedpipe_steps": [o for o in FEDPIPE if "examples_per_round" not in o] + ["strategy.aggregation=zero_pad"],
    "fedit_dp_sgd": ["strategy=fedit", "privacy=dp_sgd", "privacy.reproducible=true", "privacy.target_epsilon=null",
                     "privacy.noise_multiplier=1.0"],
    "ffa_lora_client_dp": ["strategy=ffa_lora", "privacy=client_level", "privacy.reproducible=true",
                           "privacy.target_epsilon=2.0", "privacy.clipping_norm=0.5"],
}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def run_case(name: str, out: Path) -> list[dict]:
    """The metrics rows of one case (timings removed)."""
    from harness import InProcessGrid

    from fedlora import config
    from fedlora.strategies.server_app import run_server

    cfg = config.load(FAST + CASES[name])
    run_server(InProcessGrid(cfg.num_clients), cfg, out, echo=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return _strip(rows)


def _close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-7), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want and type(got) is type(want), f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_run_same_numbers(name, tmp_path):
    first = run_case(name, tmp_path / "a")
    assert run_case(name, tmp_path / "b") == first  # bit-identical apart from timings
    _close(first, json.loads(GOLDEN.read_text())[name], name)


if __name__ == "__main__":  # record the reference metrics (only for an intended change of behaviour)
    import tempfile

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import conftest  # noqa: F401  (HF offline, quiet tokenizers)

    golden = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in sorted(CASES):
            print("recording", case, flush=True)
            golden[case] = run_case(case, Path(tmp) / case)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
