"""Issue 20 item 7: FLoRA's exported adapter keeps the smallest rank whose discarded tail is within a relative
Frobenius tolerance of the merged update (``strategy.export_tolerance``, default 1e-6), records it, and writes the
merged base weights of the modules whose dense update is no larger than its factors. Pure functions and one tiny
PEFT model; no Flower run."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora import config, lowrank
from fedlora.adapters import MERGED_WEIGHTS, AdapterState, ExportedAdapter, LoraFactors
from fedlora.strategies.rank_rules import EXPORT_TOLERANCE, Stacking


def _orth(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def _with_singular_values(m: int, n: int, s: list[float], seed: int = 0) -> torch.Tensor:
    """An m x n float64 matrix whose singular values are exactly ``s`` (descending; zeros beyond)."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    return _orth(m, k, g) @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ _orth(n, k, g).T


def _rel_err(f: LoraFactors, d: torch.Tensor) -> float:
    return float(torch.linalg.norm(f.delta() - d.double()) / torch.linalg.norm(d.double()))


def _brute_rank(s: list[float], tol: float) -> int:
    total = sum(x * x for x in s)
    return next(k for k in range(len(s) + 1) if sum(x * x for x in s[k:]) <= tol * tol * total)


@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-4, 1e-6])
def test_robust_7_exported_factors_reproduce_the_update_within_tol(tol):
    g = torch.Generator().manual_seed(1)
    # decaying spectrum: every tolerance cuts somewhere inside it
    d = (torch.randn(48, 40, generator=g, dtype=torch.float64)
         * torch.logspace(0, -9, 40, dtype=torch.float64)) @ _orth(40, 40, g)
    f, k = lowrank.tolerance_factors(d, tol)
    assert f.rank == k and f.A.dtype == torch.float32 and f.B.dtype == torch.float32 and f.scale == 1.0
    assert _rel_err(f, d) <= tol
    assert 1 <= k < 40


def test_robust_7_rank_is_minimal_for_known_singular_values():
    """Against a matrix with known singular values: the rank is the brute-force smallest k, and the best
    approximation of rank k - 1 (Eckart-Young: the truncated SVD) misses the tolerance."""
    s = [10.0, 8.0, 6.0, 4.0, 2.0, 1e-3, 1e-5, 1e-7, 1e-9]
    d = _with_singular_values(30, 20, s)
    for tol in (1e-1, 1e-3, 1e-4, 1e-6, 1e-8, 1e-12):
        k_expected = _brute_rank(s, tol)
        f, k = lowrank.tolerance_factors(d, tol)
        assert k == max(1, k_expected), (tol, k, k_expected)
        assert lowrank.tolerance_rank(torch.linalg.svdvals(d), tol) == k_expected
        if k > 1:
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            shorter = (U[:, :k - 1] * S[:k - 1]) @ Vh[:k - 1]
            assert float(torch.linalg.norm(shorter - d) / torch.linalg.norm(d)) > tol


def test_robust_7_low_rank_plus_noise_keeps_the_signal_rank_not_min_mn():
    """Four merges of rank 4 plus float32-level noise (what float32 client updates add): the old 1e-10 rule keeps
    min(m, n) singular values, the tolerance keeps the 16 that carry the update."""
    g = torch.Generator().manual_seed(2)
    m, n = 64, 48
    signal = sum(torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g,
                                                                                    dtype=torch.float64)
                 for _ in range(4))
    noise = torch.randn(m, n, generator=g, dtype=torch.float64)
    d = signal + noise * (1e-8 * float(torch.linalg.norm(signal)) / float(torch.linalg.norm(noise)))
    S = torch.linalg.svdvals(d)
    assert lowrank.numerical_rank(S) == min(m, n)  # what the export kept before
    f, k = lowrank.tolerance_factors(d, 1e-6)
    assert k == 16 and _rel_err(f, d) <= 1e-6
    # a tolerance below the noise keeps (part of) it: the rank is the tolerance's, not a fixed one
    assert lowrank.tolerance_rank(S, 1e-10) > 16


def test_robust_7_tolerance_rank_edge_cases():
    assert lowrank.tolerance_rank(torch.zeros(5, dtype=torch.float64), 1e-6) == 0
    assert lowrank.tolerance_rank(torch.tensor([], dtype=torch.float64), 1e-6) == 0
    assert lowrank.tolerance_rank(torch.tensor([3.0, 4.0, 0.0]), 0.0) == 2  # tol 0: every non-zero value
    # a tail exactly at the tolerance is kept out (<=): S = [4, 3], ||S|| = 5, tail 3 = 0.6 * 5
    assert lowrank.tolerance_rank(torch.tensor([4.0, 3.0], dtype=torch.float64), 0.6) == 1
    assert lowrank.tolerance_rank(torch.tensor([4.0, 3.0], dtype=torch.float64), 0.5999) == 2
    f, k = lowrank.tolerance_factors(torch.zeros(6, 5), 1e-6)  # a module that never changed: rank 1, zero
    assert k == 1 and float(f.delta().abs().max()) == 0.0


@pytest.mark.parametrize("m,n", [(8, 8), (10, 6), (1, 7), (64, 48)])
def test_robust_7_dense_fallback_exactly_when_factors_are_no_smaller(m, n):
    for k in range(1, min(m, n) + 1):
        assert lowrank.dense_is_smaller(k, m, n) == (k * (m + n) >= m * n)
    assert lowrank.dense_is_smaller(4, 8, 8) and not lowrank.dense_is_smaller(3, 8, 8)  # 64 >= 64; 48 < 64


def _stacking_with(totals: dict[str, torch.Tensor], tol: float) -> Stacking:
    rule = Stacking(export_tolerance=tol)
    for name, d in totals.items():  # one merge per module holding exactly d (B = U S, A = Vh)
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        rule.log.append({name: LoraFactors(Vh.float(), (U * S).float(), 1.0)})
    return rule


def test_robust_7_stacking_export_records_tol_ranks_and_merged_modules():
    totals = {
        "layers.0.q_proj": _with_singular_values(8, 8, [5.0, 4.0, 3.0, 2.0, 1.0]).float().double(),  # k=5: 80 >= 64
        "layers.0.v_proj": _with_singular_values(8, 8, [5.0, 4.0, 3.0]).float().double(),  # k=3: 48 < 64
        "layers.1.q_proj": _with_singular_values(64, 48, [9.0, 1.0]).float().double(),  # k=2: 224 < 3072
    }
    shapes = {name: tuple(d.shape) for name, d in totals.items()}
    initial = AdapterState({name: LoraFactors(torch.zeros(2, n), torch.zeros(m, 2), 1.0)
                            for name, (m, n) in shapes.items()})
    tol = 1e-6
    rule = _stacking_with(totals, tol)
    exported = rule.export(Stacking.served(initial), shapes)
    assert isinstance(exported, ExportedAdapter)
    ranks = exported.ranks()
    assert ranks == {"layers.0.q_proj": 5, "layers.0.v_proj": 3, "layers.1.q_proj": 2}
    for name, d in rule.log.total.items():
        assert _rel_err(exported.lora[name], d) <= tol
    expected_dense = sorted(n for n, (m, k_n) in shapes.items() if lowrank.dense_is_smaller(ranks[n], m, k_n))
    assert sorted(exported.merged) == expected_dense == ["layers.0.q_proj"]
    assert torch.equal(exported.merged["layers.0.q_proj"], rule.log.total["layers.0.q_proj"])
    assert float(exported.metadata["fedlora.export_tolerance"]) == tol
    assert json.loads(exported.metadata["fedlora.export_ranks"]) == ranks
    assert json.loads(exported.metadata["fedlora.export_merged_modules"]) == expected_dense
    summary = rule.export_summary()
    assert summary == {"export_tolerance": tol, "export_rank_max": 5, "export_rank_total": 10,
                       "export_merged_modules": ["layers.0.q_proj"], "export_merged_weights": MERGED_WEIGHTS}
    assert rule.export_rank() == 5  # the round metric agrees with what the export keeps
    # a looser tolerance: smaller ranks, and no module left that is cheaper dense
    loose = _stacking_with(totals, 0.5)
    ex = loose.export(Stacking.served(initial), shapes)
    assert max(ex.ranks().values()) < 5 and not ex.merged and loose.export_summary()["export_merged_weights"] is None


def test_robust_7_default_tolerance_is_configured_and_checked():
    cfg = config.load(["strategy=flora", "model=tiny_llama"])
    assert cfg.strategy.export_tolerance == EXPORT_TOLERANCE == 1e-6
    from fedlora.strategies.flora import FLoRA

    FLoRA.check_config(cfg)
    for bad in ("-1e-3", "1.5", "true"):
        with pytest.raises(config.ConfigError, match="export_tolerance"):
            FLoRA.check_config(config.load(["strategy=flora", "model=tiny_llama", f"strategy.export_tolerance={bad}"]))


def test_robust_7_saved_adapter_carries_the_metadata_and_merged_base_weights(tmp_path):
    """save_peft of an exported adapter on a tiny PEFT Llama: the safetensors header holds the tolerance and the
    ranks; merged_weights.safetensors holds W + dW for exactly the merged modules (base-model keys); PEFT loads the
    adapter back with the exported factors."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora import adapters

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)
    base = LlamaForCausalLM(conf)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    layers = adapters.lora_layers(model)
    shapes = {n: (lay.out_features, lay.in_features) for n, lay in layers.items()}
    q, v = sorted(n for n in layers if n.endswith("q_proj"))[0], sorted(n for n in layers if n.endswith("v_proj"))[0]
    totals = {q: _with_singular_values(*shapes[q], [1.0] * 8, seed=3),  # k=8: 8*32 >= 16*16 -> merged
              v: _with_singular_values(*shapes[v], [1.0, 0.5], seed=4)}  # k=2: not merged
    rule = _stacking_with(totals, 1e-6)
    exported = rule.export(Stacking.served(adapters.from_peft(model)), shapes)
    assert sorted(exported.merged) == [q]
    pristine = {n: lay.get_base_layer().weight.detach().clone() for n, lay in layers.items()}
    adapters.save_peft(model, exported, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert float(meta["fedlora.export_tolerance"]) == 1e-6
    assert json.loads(meta["fedlora.export_ranks"]) == {q: 8, v: 2}
    assert json.loads(meta["fedlora.export_merged_modules"]) == [q]
    with safe_open(str(tmp_path / "adapter" / MERGED_WEIGHTS), framework="pt") as fh:
        merged = {k: fh.get_tensor(k) for k in fh.keys()}
        mmeta = fh.metadata()
    assert list(merged) == [f"{q}.weight"] and f"{q}.weight" in LlamaForCausalLM(conf).state_dict()
    assert float(mmeta["fedlora.export_tolerance"]) == 1e-6
    want = (pristine[q].double() + rule.log.total[q]).float()
    assert torch.allclose(merged[f"{q}.weight"], want, rtol=0, atol=1e-6)
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM(conf), str(tmp_path / "adapter"))
    back = adapters.from_peft(reloaded)
    for name in (q, v):
        assert _rel_err(back.lora[name], rule.log.total[name]) <= 1e-6
