"""FedPipe end to end through the real ServerApp loop and ClientApp functions (in-process grid): plan.json
consistent with the memory model and budgets, the infeasible-budget error before training (and exit 2 from
the CLI), a mixed-profile federation with a 4-bit client aggregating mixed ranks (zero-pad and stacking, the
latter with exact merges into the quantised base), every client taking the same optimizer steps per round,
zero-padded clients starting from nested factors, and module selection restricting which modules change."""

import json

import numpy as np
import pytest
import torch
from harness import InProcessGrid

from fedlora import strategies
from fedlora import config, models, quant
from fedlora.fedpipe import memory, planning, profiles
from fedlora.strategies.server_app import run_server

FAST = ["model=tiny_llama", "num_clients=4", "local_steps=2", "train.batch_size=4", "eval.max_examples=32",
        "train.max_length=32", "strategy=fedpipe",
        # plan for a modelled Llama-7B (tiny_llama fits anything), 512-token examples, 2 steps (local_steps) per round
        "strategy.plan_model=llama-7b", "strategy.seq_len=512",
        "strategy.importance.warmup_steps=1", "strategy.importance.budget=0.5"]
PROFILES = "strategy.profiles=[jetson_orin_nano_8gb,rtx3060_12gb,a100_80gb,a100_80gb]"


def run(tmp_path, *overrides, grid=None, name="run"):
    cfg = config.load(FAST + list(overrides))
    grid = grid or InProcessGrid(cfg.num_clients)
    captured = {}

    class Spy(strategies.STRATEGIES["fedpipe"]):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["strategy"] = self

    orig = strategies.STRATEGIES["fedpipe"]
    strategies.STRATEGIES["fedpipe"] = Spy
    try:
        run_server(grid, cfg, tmp_path / name, echo=lambda *_: None)
    finally:
        strategies.STRATEGIES["fedpipe"] = orig
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return cfg, rows, captured["strategy"], grid


class Inspect:
    """Harness fault hook that only looks: after each client trained, record its reply keys and whether the
    LoRA B of every non-selected module is still exactly zero in the model it trained."""

    def __init__(self):
        self.seen = []

    def __call__(self, msg, ctx, fn):
        rep = fn(msg, ctx)
        conf = msg.content["config"]
        from fedlora.clients.client_app import run_config

        cfg = run_config(conf, ctx)  # the run config this node holds since the handshake
        bundle = models.cached(cfg, bits=int(conf["fl.bits"]))
        selected = set(str(conf["fl.modules"]).split(","))
        from fedlora import adapters

        zero = {n: bool((l.lora_B["default"].weight == 0).all()) for n, l in adapters.lora_layers(bundle.model).items()
                if n not in selected}
        self.seen.append({"pid": int(ctx.node_config["partition-id"]), "rank": int(conf["fl.rank"]),
                          "bits": int(conf["fl.bits"]), "batch": int(conf["fl.batch_size"]),
                          "steps": int(conf["fl.local_steps"]), "keys": sorted(rep.content["arrays"].keys()),
                          "selected": selected, "others_zero": zero, "bundle_bits": bundle.bits})
        return rep


def _check_plan(cfg, run_dir, strat):
    doc = json.loads((run_dir / "plan.json").read_text())
    assert doc["planned_for"].startswith("modelled llama-7b") and doc["trained_model"] == "tiny_llama"
    assert doc["memory_model"] == "analytic"
    spec, _ = planning.plan_spec(cfg)
    spec = spec.with_adapted(doc["plan_adapted_modules"])
    calib = memory.ActivationCalibration.from_dict(doc["calibration"])
    for c, prof in zip(doc["plan"]["clients"], doc["profiles"]):
        budget = int(np.floor(0.9 * prof["memory_gb"] * profiles.GiB))
        assert c["budget_bytes"] == budget
        assert c["memory_bytes"] <= c["budget_bytes"]
        assert c["memory_bytes"] == memory.predict_memory(spec, c["rank"], c["batch"], c["bits"], 512, calib)
        node = next(n for n in strat.nodes.values() if n.partition_id == c["client_id"])
        assert node.rank == c["rank"]
    # the module selection is the top half of the aggregated importance scores
    imp = doc["importance"]
    assert sorted(doc["selected_modules"]) == sorted(sorted(imp, key=lambda k: -imp[k])[:len(imp) // 2])
    return doc


class StartFactors:
    """Wraps ``fedlora.train.local_train``: the LoRA factors each client starts its round's training from."""

    def __init__(self, original):
        self.original, self.seen = original, {}

    def __call__(self, model, *a, **kw):
        from fedlora import adapters

        st = adapters.from_peft(model)
        pid = int(kw["seed"]) % 1000  # seed = cfg.seed * 1000 + partition id
        self.seen[(kw["round_idx"], pid)] = {n: (f.A.clone(), f.B.clone()) for n, f in st.lora.items()}
        return self.original(model, *a, **kw)


def test_zero_pad_mixed_profiles_plan_and_module_selection(tmp_path, monkeypatch):
    from fedlora import train

    insp, start = Inspect(), StartFactors(train.local_train)
    monkeypatch.setattr(train, "local_train", start)
    grid = InProcessGrid(4, faults={i: insp for i in range(4)})
    # rank_preference=largest: clients with slack take larger ranks, so zero-padding has mixed ranks to pad
    cfg, rows, strat, _ = run(tmp_path, PROFILES, "strategy.aggregation=zero_pad", "num_rounds=2",
                              "strategy.rank_preference=largest", grid=grid)
    doc = _check_plan(cfg, tmp_path / "run", strat)
    plan = {c["client_id"]: c for c in doc["plan"]["clients"]}
    assert plan[0]["profile"] == "jetson_orin_nano_8gb" and plan[0]["bits"] == 4  # 7B at 16/8-bit does not fit 8 GB
    # slack goes to a larger batch first (the RTX takes batch 2 on a 4-bit base rather than batch 1 on 8-bit), then bits
    assert plan[1]["batch"] > plan[0]["batch"] and (plan[2]["batch"], plan[2]["bits"]) == (16, 16)
    assert len({c["rank"] for c in plan.values()}) > 1  # mixed ranks
    # equal optimizer steps per round (local_steps = 2), examples = steps x batch; the A100s' slack buys batches
    assert doc["plan"]["equal"] == "steps" and doc["plan"]["steps_per_round"] == 2
    assert all(c["steps"] == 2 and c["examples"] == 2 * c["batch"] for c in plan.values())
    assert plan[2]["batch"] > plan[0]["batch"]
    # every client trained with its planned rank / batch / bits / steps, on a base of those bits
    assert len(insp.seen) == 8
    for s in insp.seen:
        c = plan[s["pid"]]
        assert (s["rank"], s["batch"], s["bits"], s["bundle_bits"]) == (c["rank"], c["batch"], c["bits"], c["bits"])
        assert s["steps"] == 2
        # module selection: only the selected modules' factors travel, the others stayed at B = 0
        assert {k.rsplit(".", 1)[0] for k in s["keys"]} == s["selected"] == set(doc["selected_modules"])
        assert s["others_zero"] and all(s["others_zero"].values())
    # mixed ranks aggregated by zero-padding: global rank = the largest planned rank, on the selected modules only
    g = strat.rule.global_state
    assert set(g.lora) == set(doc["selected_modules"])
    assert {f.rank for f in g.lora.values()} == {max(c["rank"] for c in plan.values())}
    ev = strat.eval_adapter()
    for name, f in ev.lora.items():
        nz = bool((f.B != 0).any())
        assert nz == (name in doc["selected_modules"]), name
    assert all(np.isfinite(r["eval_loss"]) for r in rows) and not any(r.get("rejected") for r in rows[1:])
    assert rows[1]["modelled_round_s"] == pytest.approx(doc["plan"]["round_time_s"])
    # nested start: in round 1 every client's A is the first r_k rows of ONE seeded A of the largest planned rank
    # (the server's initial global, B = 0); in round 2 the clients' A are again prefixes of one matrix (the global)
    R = max(c["rank"] for c in plan.values())
    first = strat.fresh_state(1)
    assert {f.rank for f in first.lora.values()} == {R}
    for rnd in (1, 2):
        big = next(pid for pid in range(4) if plan[pid]["rank"] == R)
        for name in doc["selected_modules"]:
            A_big = start.seen[(rnd, big)][name][0]
            if rnd == 1:
                assert torch.equal(A_big, first.lora[name].A)
            for pid in range(4):
                A, B = start.seen[(rnd, pid)][name]
                r = plan[pid]["rank"]
                assert A.shape[0] == r and torch.equal(A, A_big[:r]), (rnd, pid, name)
                assert (rnd > 1) or not B.any()
    assert any(plan[pid]["rank"] < R for pid in range(4))  # the prefixes are proper for some client


def test_equal_steps_and_equal_examples_config(tmp_path):
    """Steps per round: strategy.steps_per_round, else local_steps; strategy.examples_per_round restores the plan
    of equal examples (the plan before issue 21); both set, or a bad value: one sentence before anything starts."""
    base = FAST + [PROFILES]
    tm = planning.time_model(config.load(base))
    assert (tm.equal, tm.steps_per_round) == ("steps", 2)
    assert planning.time_model(config.load(base + ["strategy.steps_per_round=5"])).steps(16) == 5
    old = planning.time_model(config.load(base + ["strategy.examples_per_round=8"]))
    assert old.equal == "examples" and [old.steps(b) for b in (1, 4, 16)] == [8, 2, 1]
    for bad, msg in ((["strategy.steps_per_round=0"], r"strategy.steps_per_round=0 must be an integer >= 1"),
                     (["strategy.steps_per_round=3", "strategy.examples_per_round=8"], "set only one")):
        with pytest.raises(config.ConfigError, match=msg):
            strategies.get("fedpipe").check_config(config.load(base + bad))


def test_stacking_merges_exactly_into_a_4bit_base(tmp_path):
    cfg, rows, strat, _ = run(tmp_path, PROFILES, "strategy.aggregation=stacking", "num_rounds=2")
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    ranks = [c["rank"] for c in doc["plan"]["clients"]]
    assert strat.rule.log.version == 2
    assert {f.rank for f in strat.rule.log.entries[0].values()} == {sum(ranks)}  # stacked: Σ r_k
    assert set(strat.rule.log.total) == set(doc["selected_modules"])
    assert max(r["base_sync_error"] for r in rows[1:]) <= 1e-9
    # the 4-bit client (partition 0) trained round 2 on deq(quant(w0 + merge_1)): one rounding of the exact sum
    b4 = models.cached(cfg, bits=4)
    assert b4.bits == 4
    for name in doc["selected_modules"]:
        layer = quant.base_layer(b4.model, name)
        assert quant.layer_bits(layer) == 4
        entry = strat.rule.log.entries[0][name]
        want = entry.delta().float()
        got = quant.merged_delta(b4.model, name)
        # both: a float64 s·B·A (any order: within 2 gamma_R(u64) of each other) rounded once to float32
        from tolerances import assert_within, f32_tol

        mag = entry.scale * (entry.B.double().abs() @ entry.A.double().abs())
        assert_within(got, want, f32_tol(entry.rank, mag), name)
        master = getattr(layer, quant._MASTER_ATTR)  # noqa: SLF001
        ref = quant.quantize_dequantize(master.w0.float() + want, 4, dtype=master.w0.dtype)
        assert torch.equal(quant.dequantized_weight(layer), ref)


def test_infeasible_profile_is_a_clear_error_before_training(tmp_path):
    bad = FAST + [PROFILES, "strategy.mem_fraction=0.3"]  # 30% of 8 GB cannot hold a 4-bit 7B
    cfg = config.load(bad)
    with pytest.raises(config.ConfigError, match=r"FedPipe cannot train on every client: client 0 \(jetson_orin_nano_8gb\)"):
        strategies.get("fedpipe").check_config(cfg)
    grid = InProcessGrid(4)
    with pytest.raises(config.ConfigError):
        run_server(grid, cfg, tmp_path / "bad", echo=lambda *_: None)
    assert not grid.sent  # refused before the handshake, let alone training
    from fedlora import cli

    assert cli.main(["run", *bad, f"out_dir={tmp_path / 'cli'}"]) == 2
    assert not (tmp_path / "cli").exists()
