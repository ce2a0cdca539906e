"""FedEx-LoRA (strategies/fedex_lora.py, fedlora.algebra.fedex): the residual makes FedIT's round exact, it is merged
through FLoRA's versioned log (in sync under partial participation), the exported adapter is the server's model, and
what the method cannot do is refused in one sentence."""

import math

import pytest
import torch
from harness import InProcessGrid
from safetensors.torch import load_file
from test_strategies import _n_examples, run

from fedlora import adapters, algebra, config, diagnostics, merges
from fedlora.adapters import AdapterState, LoraFactors
from fedlora.config import ConfigError
from fedlora.strategies.base import record_bytes, to_record


def _states(ranks, shapes, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return [AdapterState({name: LoraFactors(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), scale)
                          for name, (m, n) in shapes.items()}, {"head": torch.randn(3, generator=g)})
            for r in ranks]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("k", [3, 4])
def test_fedex_residual_makes_fedit_exact(k):
    shapes = {"a": (30, 20), "b": (12, 40)}
    states, w = _states([4] * k, shapes, seed=k), [1.0, 2.0, 5.0, 3.5][:k]
    avg, residual = algebra.fedex(states, w)
    fedit = algebra.fedit(states, w)  # the averages are FedIT's, bit for bit
    for name in shapes:
        assert torch.equal(avg.lora[name].A, fedit.lora[name].A) and torch.equal(avg.lora[name].B, fedit.lora[name].B)
    assert torch.equal(avg.extra["head"], fedit.extra["head"])
    ideal = algebra.ideal_update(states, w)  # float64 reference
    err_sq = ideal_sq = 0.0
    for name, (m, n) in shapes.items():
        R = residual[name]
        assert R.scale == 1.0 and R.rank == 4 * k + 4 and R.A.dtype == torch.float64
        # s·B̄Ā + R = ΔW* per module, and R is exactly FedIT's gap ΔW* − s·B̄Ā
        assert _rel(avg.lora[name].delta() + R.delta(), ideal[name]) <= 1e-12
        gap = ideal[name] - avg.lora[name].delta()
        assert _rel(R.delta(), gap) <= 1e-10
        # what the merge log stores and sends (float32 factors) is still exact to float32 rounding
        r32 = LoraFactors(R.A.float(), R.B.float(), 1.0)
        assert _rel(avg.lora[name].delta() + r32.delta(), ideal[name]) <= 1e-6
        err_sq += float(gap.square().sum())
        ideal_sq += float(ideal[name].square().sum())
    # the round's cross_term_error is the residual's relative size
    assert math.isclose(diagnostics.cross_term_error(avg, states, w), math.sqrt(err_sq / ideal_sq), rel_tol=1e-9)
    assert math.sqrt(err_sq / ideal_sq) > 0.1  # random factors: FedIT alone is far off
    with pytest.raises(ValueError, match="equal ranks"):
        algebra.fedex(_states([4, 8], shapes), [1, 1])


def test_fedex_run_audit_is_exact_and_export_is_the_servers_model(tmp_path):
    """fedlora run strategy=fedex_lora model=tiny_llama num_clients=3 num_rounds=2 audit=true: each round's
    delta.safetensors (base merge + change of the served product) is Σp_k s B_k A_k minus the product the clients
    started from, recomputed from the client files alone; the rounds add up to the server's model; the exported
    adapter loaded with plain PEFT on the pristine base gives the server's logits."""
    from peft import PeftModel

    from fedlora import models
    from fedlora.strategies.server_app import prepare_eval_model

    rows, strat, _ = run(tmp_path, "strategy=fedex_lora", "num_clients=3", "num_rounds=2", "audit=true",
                         "local_steps=2")
    start, total = None, {}
    for rnd in (1, 2):
        d = tmp_path / "run" / "audit" / f"round_{rnd:04d}"
        files = sorted(d.glob("client_*.safetensors"))
        assert len(files) == 3
        states, n = [adapters.load_file(f) for f in files], [_n_examples(f) for f in files]
        ideal = algebra.ideal_update(states, n)
        written = load_file(str(d / "delta.safetensors"))
        assert set(written) == set(ideal)
        for m, dW in written.items():
            want = ideal[m] - (start.lora[m].delta() if start is not None else 0.0)  # round 1: B = 0
            assert _rel(dW, want) <= 1e-6, (rnd, m, _rel(dW, want))
            total[m] = total.get(m, 0.0) + dW.double()
        start = algebra.fedit(states, n)  # the served float32 averages, computed as the server does
    # the rounds add up to what the server holds: merged residuals + the served product
    for m, t in total.items():
        assert _rel(t, strat.rule.log.total[m] + strat.state.lora[m].delta()) <= 1e-6
    assert strat.rule.log.version == 2
    r1, r2 = rows[1], rows[2]
    assert r1["residual_bytes"] == 0 and r1["downlink_ratio"] == 1.0  # nothing merged before round 1
    assert r2["residual_bytes"] > 0 and r2["downlink_ratio"] > 1.0 and r2["cross_term_error"] > 1e-6
    assert r2["base_version"] == 2 and r2["base_sync_error"] <= 1e-9 and not r2["rejected"]
    # uplink is FedIT's (the served adapter's arrays, from each client); downlink FedIT's + the residual bytes
    fedit_bytes = record_bytes(to_record(adapters.to_arrays(strat.state)))
    assert r1["bytes_up"] == r2["bytes_up"] == r1["bytes_down"] == 3 * fedit_bytes
    # round 2 sends each client round 1's residual, per module as stacked factors or dense, whichever is smaller
    # (raw tensor bytes); downlink_ratio is the payload over FedIT's
    entry = AdapterState(strat.rule.log.entries[0])
    residual = sum(b for _, b in algebra.dense_or_stacked_bytes(entry).values())
    fedit_raw = adapters.array_bytes(adapters.to_arrays(strat.state))
    assert r2["residual_bytes"] == 3 * residual and r2["residual_rank"] == 3 * 8 + 8
    assert r2["downlink_ratio"] == pytest.approx(1 + residual / fedit_raw, rel=1e-12)

    cfg = config.load(["model=tiny_llama", "strategy=fedex_lora", "num_clients=3"])
    server = models.build(cfg)
    prepare_eval_model(server, strat)
    base, _ = models.build_base(cfg.model, int(cfg.seed))
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    base.eval()
    with torch.no_grad():
        pristine = base(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    server.model.eval(), reloaded.eval()
    with torch.no_grad():
        want, got = server.model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    tol = 1e-5 * max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= tol
    assert float((pristine - want).abs().max()) > 100 * tol  # the learned update is visible in the logits


def test_fedex_partial_participation_merges_stay_in_sync(tmp_path):
    """fraction_train=0.5: a client that sat out receives every residual it missed before it trains, and then
    holds exactly the server's base at that version."""
    import fedlora.clients.client_app as ca

    seen = []  # (partition, version, base delta) right after each sampled client caught up

    class Grid(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            out = super().send_and_receive(messages, timeout)
            for m in messages:
                delta, v = ca.node_base_delta(self.contexts[m.metadata.dst_node_id])
                seen.append((self.partition_of(m.metadata.dst_node_id), v, {k: t.clone() for k, t in delta.items()}))
            return out

    rows, strat, grid = run(tmp_path, "strategy=fedex_lora", "num_clients=4", "fraction_train=0.5", "num_rounds=4",
                            "eval.max_examples=4", grid=Grid(4))
    assert strat.rule.log.version == 4 and all(len(r["sampled"]) == 2 for r in rows[1:])
    late = 0
    for pid, v, delta in seen:
        ref = {}
        for e in strat.rule.log.entries[:v]:
            for name, f in e.items():
                ref[name] = ref.get(name, 0) + f.delta()
        assert set(delta) == set(ref)
        for name in ref:
            assert _rel(delta[name], ref[name]) <= 1e-6, (pid, v, name)
        late += v >= 2
    assert late > 0
    # a client that sat out got more than one residual in one message, before training
    assert any(len({k.split(".")[1] for k in m.content["arrays"] if k.startswith(merges.PREFIX)}) > 1
               for m in grid.sent if m.metadata.message_type == "train")
    assert max(r["base_sync_error"] for r in rows[1:]) <= 1e-9


def test_fedex_out_of_sync_client_catches_up_from_the_log():
    """A node that lost its merged base (restart) answers out-of-sync; the next payload carries the whole log."""
    from fedlora.strategies.fedex_lora import FedExLoRA
    from fedlora.strategies.base import NodeInfo, Update

    cfg = config.load(["model=tiny_llama", "strategy=fedex_lora", "num_clients=2"])
    shapes = {"q": (6, 5)}
    initial = AdapterState({"q": LoraFactors(torch.randn(8, 5), torch.zeros(6, 8), 2.0)}, {})
    strat = FedExLoRA(cfg, initial, shapes)
    nodes = [NodeInfo(node_id=10 + i, partition_id=i, num_examples=5, rank=8, alpha=16.0) for i in range(2)]
    for rnd in (1, 2):
        states = _states([8, 8], shapes, seed=rnd)
        ups = [Update(nd, {}, {"num-examples": 5, "base-version": rnd - 1}) for nd in nodes]
        strat.aggregate(rnd, states, [5, 5], ups)
    arrays, _ = strat.payload(nodes[0], 3)
    assert {k.split(".")[1] for k in arrays if k.startswith(merges.PREFIX)} == {"2"}
    strat.on_status(nodes[0], "out-of-sync", {"base-version": 0})
    arrays, _ = strat.payload(nodes[0], 3)
    assert {k.split(".")[1] for k in arrays if k.startswith(merges.PREFIX)} == {"1", "2"}
    delta, v = merges.apply({}, 0, arrays)
    assert v == 2 and _rel(delta["q"], strat.rule.log.total["q"]) <= 1e-6
    assert {"q.lora_A", "q.lora_B"} <= set(arrays)  # the served adapter travels with the merges, as in FedIT
    with pytest.raises(merges.OutOfSync):
        merges.apply({}, 0, {k: a for k, a in arrays.items() if not k.startswith(f"{merges.PREFIX}1.")})


def test_fedex_refusals_and_compare_preflight(tmp_path):
    from fedlora import compare, preflight, strategies

    cls = strategies.get("fedex_lora")
    assert cls.privacy_modes == ("none", "dp_sgd") and not cls.supports_mixed_ranks
    base = ["model=tiny_llama", "strategy=fedex_lora", "num_clients=2"]
    with pytest.raises(ConfigError, match=r"^strategy fedex_lora needs one rank .*use flora, flexlora or hetlora"):
        preflight.check(config.load(base + ["client_ranks=[4,8]"]))
    with pytest.raises(ConfigError, match=r"^fedex_lora folds the residual .*; client_dp works with .*fedit"):
        preflight.check(config.load(base + ["privacy=client_level"]))
    with pytest.raises(ConfigError, match="export_tolerance"):
        cls.check_config(config.load(base + ["strategy.export_tolerance=2"]))
    cls.check_config(config.load(base + ["privacy=dp_sgd"]))
    # fedlora compare strategies=[fedit,fedex_lora] model=tiny_llama num_clients=2 num_rounds=1: both pass pre-flight
    shared = ["model=tiny_llama", "num_clients=2", "num_rounds=1"]
    plan = compare._plan(shared, ["fedit", "fedex_lora"], [0], tmp_path / "cmp", False)
    assert [(p[1], p[4]) for p in plan] == [("fedit", None), ("fedex_lora", None)]
    assert plan[1][3].strategy.name == "fedex_lora"
