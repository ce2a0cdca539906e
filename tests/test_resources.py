"""FedPipe planning core: profiles, memory model vs measured peak, MILP vs brute force, equal optimizer steps per
round (and the time model charging larger batches), importance, quantised LoRA training and exact merges. CPU only,
tiny Llama (~1 min in all on 2 shared cores)."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*kernels.*")

from fedlora import config, quant  # noqa: E402
from fedlora.config import ConfigError  # noqa: E402
from fedlora.fedpipe import importance, measure, memory, plan, planning, profiles, timing  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
SEQ = 32


def tiny_llama(dtype=torch.bfloat16, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4)
    return LlamaForCausalLM(cfg).to(dtype)


# ----------------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------------
def test_profiles_have_required_keys_and_default_is_cpu():
    names = profiles.list_profiles()
    expected = {"jetson_orin_nano_8gb", "jetson_orin_nx_16gb", "jetson_agx_orin_64gb", "rtx3060_12gb",
                "rtx4090_24gb", "t4_16gb", "l4_24gb", "a100_80gb", "cpu"}
    assert expected <= set(names)
    for n in names:
        p = profiles.load_profile(n)
        assert p["name"] == n
        assert all(float(p[k]) > 0 for k in ("memory_gb", "bf16_tflops", "mem_bandwidth_gbs", "uplink_mbps",
                                               "downlink_mbps"))
        assert p["device"] in ("cpu", "cuda")
        text = (profiles.CONF_CLIENT_DIR / f"{n}.yaml").read_text()
        assert text.lstrip().startswith("#"), f"{n}.yaml must cite its source in a comment"
    assert profiles.load_profile("default") == profiles.load_profile("cpu")


def test_hydra_composes_client_group(tmp_path):
    import shutil

    from hydra import compose, initialize_config_dir

    shutil.copytree(profiles.CONF_CLIENT_DIR, tmp_path / "client")
    (tmp_path / "config.yaml").write_text("defaults:\n  - client: default\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        assert dict(compose("config").client) == profiles.load_profile("cpu")
        assert dict(compose("config", overrides=["client=mixed"]).client.mix)["a100_80gb"] == 0.2


def test_assign_profiles_mix_and_list():
    a = profiles.assign_profiles(10, "mixed", seed=3)
    counts = {n: sum(p["name"] == n for p in a) for n in ("jetson_orin_nano_8gb", "rtx3060_12gb", "a100_80gb")}
    assert counts == {"jetson_orin_nano_8gb": 4, "rtx3060_12gb": 4, "a100_80gb": 2}
    assert [p["client_id"] for p in a] == list(range(10))
    assert [p["name"] for p in a] == [p["name"] for p in profiles.assign_profiles(10, "mixed", seed=3)]
    b = profiles.assign_profiles(7, {"cpu": 1, "l4_24gb": 1}, seed=0)
    assert sorted(p["name"] for p in b).count("cpu") in (3, 4) and len(b) == 7
    c = profiles.assign_profiles(5, ["cpu", "t4_16gb"])
    assert [p["name"] for p in c] == ["cpu", "t4_16gb", "cpu", "t4_16gb", "cpu"]


def test_detect_profile_cpu():
    p = profiles.detect_profile()
    assert set(profiles.PROFILE_KEYS) <= set(p)
    assert p["memory_gb"] > 0
    if not torch.cuda.is_available():
        assert p["device"] == "cpu"


# ----------------------------------------------------------------------------------------------
# Memory model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated():
    spec = memory.ModelSpec.from_model(tiny_llama(), TARGETS, name="tiny-llama")
    calib = measure.calibrate_activations(tiny_llama, spec, SEQ, targets=TARGETS, bits=(16, 8, 4), rank=8,
                                          batches=(1, 4))
    return spec, calib


def test_weight_bytes_formula_matches_bitsandbytes_storage():
    model = tiny_llama()
    spec = memory.ModelSpec.from_model(model, TARGETS)
    lin = {li.name: li for li in spec.linears}
    for bits in (8, 4):
        m = quant.quantize_model(tiny_llama(), bits, keep_master=False)
        for name in spec.quantizable:
            layer = m.get_submodule(name)
            measured = measure.static_bytes(layer)["model"] - (2 * layer.bias.numel() if layer.bias is not None else 0)
            assert measured == memory.linear_weight_bytes(lin[name], bits), (bits, name)


@pytest.mark.parametrize("rank,batch,bits", [(4, 2, 16), (16, 8, 8), (32, 6, 4)])
def test_memory_prediction_within_15_percent(calibrated, rank, batch, bits):
    spec, calib = calibrated
    meas = measure.measure_peak(tiny_llama, rank, batch, bits, SEQ, targets=TARGETS)
    pred = memory.predict_memory(spec, rank, batch, bits, SEQ, calib)
    assert abs(pred - meas.total) / meas.total < 0.15, (pred, meas)
    # the static part (weights, quantisation constants, LoRA + Adam state) is counted, not fitted
    parts = memory.memory_breakdown(spec, rank, batch, bits, SEQ, calib)
    static_pred = parts["base_linears"] + parts["other"] + 12 * spec.lora_params(rank)
    assert abs(static_pred - meas.static) / meas.static < 0.01


def test_analytic_activation_line_is_in_the_right_range(calibrated):
    spec, calib = calibrated
    an = memory.analytic_activations(spec, SEQ)
    assert 0.7 < an.b[16] / calib.b[16] < 1.3


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------
def _toy_spec():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8)
    return memory.ModelSpec.from_config(cfg, TARGETS, name="toy-llama")


def _random_profiles(rng, spec, calib, grids, k):
    mems = [memory.predict_memory(spec, r, b, q, 128, calib) for r, b, q in grids.options()]
    lo, hi = min(mems) / 0.9 / profiles.GiB, max(mems) / 0.9 / profiles.GiB
    return [dict(name=f"dev{i}", client_id=i, memory_gb=rng.uniform(lo * 1.01, hi * 1.1),
                 bf16_tflops=rng.uniform(1, 100), mem_bandwidth_gbs=rng.uniform(30, 1000),
                 uplink_mbps=rng.uniform(1, 200), downlink_mbps=rng.uniform(5, 500), device="cuda")
            for i in range(k)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["own", "stacked", "server", "examples"])
def test_milp_equals_brute_force(seed, mode):
    """Equal steps per round (own / stacked downloads / a shared server link) and equal examples (the plan before
    issue 21): the MILP's optimum is the brute force's."""
    spec = _toy_spec()
    calib = memory.analytic_activations(spec, 128)
    grids = plan.Grids(ranks=(2, 4, 8), batches=(1, 2, 4), bits=(16, 8, 4))
    rng = random.Random(seed * 7 + len(mode))
    profs = _random_profiles(rng, spec, calib, grids, 3)
    tm = timing.TimeModel(steps_per_round=4, examples_per_round=16 if mode == "examples" else None,
                          download="stacked" if mode == "stacked" else "own")
    kw = dict(seq_len=128, calib=calib, time_model=tm, server_mbps=rng.uniform(5, 50) if mode == "server" else None)
    milp_plan = plan.plan(profs, spec, grids, **kw)
    bf = plan.brute_force_plan(profs, spec, grids, **kw)
    assert milp_plan.status == "optimal"
    assert math.isclose(milp_plan.objective, bf.objective, rel_tol=1e-9)
    assert math.isclose(milp_plan.round_time_s, bf.round_time_s, rel_tol=1e-9)
    best, n_opt = plan.brute_force_optima(profs, spec, grids, **kw)
    assert math.isclose(best, bf.objective, rel_tol=1e-12)
    if n_opt == 1:
        assert milp_plan.assignment() == bf.assignment()
    for c in milp_plan.clients:
        assert c.memory_bytes <= c.budget_bytes
        assert c.steps == tm.steps(c.batch) and c.examples == c.steps * c.batch


PROFILE_MIX = ["jetson_orin_nano_8gb", "rtx3060_12gb", "a100_80gb"]


def _t_step(spec, c, prof, seq):
    """Seconds of one optimizer step of client plan ``c`` (the time model at one step per round)."""
    return timing.compute_time(spec, c.rank, c.batch, c.bits, prof, seq, timing.TimeModel(steps_per_round=1))


def test_equal_steps_plan_every_client_takes_the_same_steps_and_is_charged_its_batch():
    """Default plan: every client S optimizer steps, examples = S x batch, compute = S x t_step(its batch); the
    clients with slack spend it on a larger batch (more examples at the same steps) within the round time."""
    spec = _toy_spec()
    calib = memory.analytic_activations(spec, 128)
    S = 8
    tm = timing.TimeModel(steps_per_round=S)
    p = plan.plan(PROFILE_MIX, spec, plan.Grids(), seq_len=128, calib=calib, time_model=tm)
    assert p.equal == "steps" and p.steps_per_round == S and p.examples_per_round is None
    for c, name in zip(p.clients, PROFILE_MIX):
        prof = profiles.load_profile(name)
        assert c.steps == S and c.examples == S * c.batch
        assert c.compute_s == pytest.approx(S * _t_step(spec, c, prof, 128), rel=1e-12)
        assert c.time_s == pytest.approx(c.compute_s + c.transfer_s, rel=1e-12) and c.time_s <= p.round_time_s
    slow, mid, fast = p.clients
    assert slow.time_s == pytest.approx(p.round_time_s)
    assert fast.batch == max(plan.Grids().batches) and fast.examples > slow.examples
    # the batch the fast client took is charged: at batch 1 its round would be shorter
    one = timing.compute_time(spec, fast.rank, 1, fast.bits, profiles.load_profile("a100_80gb"), 128, tm)
    assert one < fast.compute_s
    table = p.table()
    assert "steps" in table and "examples" in table and f"{S} optimizer steps per client per round" in table


def test_uniform_plan_takes_equal_steps_too_and_fedpipe_is_no_slower():
    """The uniform baseline under the same time model: one (rank, batch, bits), the same S steps for all, examples
    S x batch; the MILP's round is no longer than the uniform one (beyond the bounded tie-break)."""
    from fedlora import config
    from fedlora.fedpipe import planning

    S = 6
    ov = ["model=tiny_llama", "strategy=fedpipe", "num_clients=3", "strategy.plan_model=llama-7b",
          "strategy.seq_len=512", f"strategy.steps_per_round={S}", f"strategy.profiles=[{','.join(PROFILE_MIX)}]"]
    cfg, ucfg = config.load(ov), config.load(ov + ["strategy.uniform=true"])
    spec = planning.plan_spec(cfg)[0]
    calib = memory.analytic_activations(spec, 512)
    profs = planning.config_profiles(cfg)
    fp, un = planning.make_plan(cfg, profs, spec, calib), planning.make_plan(ucfg, profs, spec, calib)
    assert len(set(un.assignment())) == 1
    for p in (fp, un):
        for c, prof in zip(p.clients, profs):
            assert c.steps == S and c.examples == S * c.batch
            assert c.compute_s == pytest.approx(S * _t_step(spec, c, prof, 512), rel=1e-12)
    t_lb = max(min(timing.compute_time(spec, r, b, q, pr, 512, timing.TimeModel(steps_per_round=S))
                   for r, b, q in plan.Grids().options()) for pr in profs)
    assert fp.round_time_s <= un.round_time_s + fp.tie_break * t_lb
    assert sum(c.examples for c in fp.clients) > sum(c.examples for c in un.clients)


def test_equal_examples_mode_is_the_plan_before_issue_21():
    """``examples_per_round=E``: every client E examples in ceil(E / batch) steps, charged for those steps."""
    spec = _toy_spec()
    calib = memory.analytic_activations(spec, 128)
    E = 24
    tm = timing.TimeModel(examples_per_round=E)
    p = plan.plan(PROFILE_MIX, spec, plan.Grids(), seq_len=128, calib=calib, time_model=tm)
    assert p.equal == "examples" and p.examples_per_round == E and p.steps_per_round is None
    for c, name in zip(p.clients, PROFILE_MIX):
        assert c.steps == math.ceil(E / c.batch) and c.examples == c.steps * c.batch
        assert c.compute_s == pytest.approx(c.steps * _t_step(spec, c, profiles.load_profile(name), 128), rel=1e-12)


def test_utility_orders_batch_then_bits_then_rank_at_equal_steps():
    g = plan.Grids()
    opts = g.options()
    u = {o: g.utility(o[0], o[2], o[1]) for o in opts}
    assert len(set(u.values())) == len(opts) and all(0 <= v < 1 for v in u.values())
    key = {o: (g.batches.index(o[1]), sorted(g.bits).index(o[2]), g.ranks.index(o[0])) for o in opts}
    assert sorted(opts, key=u.get) == sorted(opts, key=key.get)  # lexicographic: batch, bits, rank
    old = {o: g.utility(o[0], o[2]) for o in opts}  # equal examples: rank, then bits (batch not in it)
    assert old[(32, 1, 4)] > old[(16, 16, 16)] and old[(8, 1, 16)] > old[(8, 16, 8)]


def test_plan_prefers_larger_rank_for_clients_with_slack():
    spec = _toy_spec()
    calib = memory.analytic_activations(spec, 128)
    p = plan.plan(["jetson_orin_nano_8gb", "a100_80gb"], spec, plan.Grids(), seq_len=128, calib=calib)
    slow, fast = p.clients
    assert slow.time_s == pytest.approx(p.round_time_s)
    assert fast.rank == max(plan.Grids().ranks) and fast.bits == 16
    assert fast.time_s < p.round_time_s
    d = json.loads(p.to_json())
    assert d["clients"][1]["profile"] == "a100_80gb"
    table = plan.plan_to_table(p)
    assert "jetson_orin_nano_8gb" in table and "round time" in table


def test_rank_preference_smallest_keeps_the_bottlenecks_rank_at_the_same_round_time():
    """``strategy.rank_preference=smallest``: the client with slack takes the grid's smallest rank instead of its
    largest, and nothing else moves: same round time, batch and bits; the MILP agrees with brute force."""
    spec = _toy_spec()
    calib = memory.analytic_activations(spec, 128)
    small = plan.Grids(small_ranks_first=True)
    g = small.options()
    u = {o: small.utility(o[0], o[2], o[1]) for o in g}
    assert sorted(g, key=u.get) == sorted(g, key=lambda o: (o[1], o[2], -o[0]))  # batch, bits, then smaller rank
    big = plan.plan(["jetson_orin_nano_8gb", "a100_80gb"], spec, plan.Grids(), seq_len=128, calib=calib)
    p = plan.plan(["jetson_orin_nano_8gb", "a100_80gb"], spec, small, seq_len=128, calib=calib)
    assert p.round_time_s == pytest.approx(big.round_time_s)
    assert [c.rank for c in p.clients] == [min(small.ranks)] * 2 and big.clients[1].rank == max(small.ranks)
    assert (p.clients[1].batch, p.clients[1].bits) == (big.clients[1].batch, big.clients[1].bits)
    brute = plan.brute_force_plan(["jetson_orin_nano_8gb", "a100_80gb"], spec, small, seq_len=128, calib=calib)
    assert [(c.rank, c.batch, c.bits) for c in brute.clients] == [(c.rank, c.batch, c.bits) for c in p.clients]
    with pytest.raises(ConfigError, match="strategy.rank_preference=most is not a rank tie-break"):
        planning.grids(config.load(["strategy=fedpipe", "strategy.rank_preference=most"]))


def test_infeasible_budget_raises_before_training_with_shortfall():
    spec = _toy_spec()
    calib = memory.analytic_activations(spec, 128)
    need = memory.predict_memory(spec, 1, 1, 4, 128, calib)
    tiny = dict(profiles.load_profile("cpu"), name="pico", client_id="c7", memory_gb=need / profiles.GiB / 2)
    with pytest.raises(plan.InfeasibleBudgetError) as err:
        plan.plan(["a100_80gb", tiny], spec, seq_len=128, calib=calib)
    msg = str(err.value)
    short = need - math.floor(0.9 * tiny["memory_gb"] * profiles.GiB)
    assert "client c7 (pico)" in msg and f"short by {short:,} bytes" in msg and "a100" not in msg


def test_time_model_small_batches_and_dequant_cost_more():
    spec = _toy_spec()
    prof = profiles.load_profile("jetson_orin_nano_8gb")
    E = timing.TimeModel(examples_per_round=256)  # equal examples: a small batch means more steps
    t = {(b, q): timing.compute_time(spec, 8, b, q, prof, 128, E) for b in (1, 16) for q in (16, 4)}
    assert t[(1, 16)] > t[(16, 16)] and t[(1, 4)] > t[(16, 4)]
    assert t[(1, 4)] > t[(1, 16)]  # dequantisation traffic per step
    S = timing.TimeModel(steps_per_round=16)  # equal steps (default): the larger batch is charged its compute
    s = {(b, q): timing.compute_time(spec, 8, b, q, prof, 128, S) for b in (1, 16) for q in (16, 4)}
    assert s[(16, 16)] > s[(1, 16)] and s[(16, 4)] > s[(1, 4)] and s[(1, 4)] > s[(1, 16)]
    one = timing.TimeModel(steps_per_round=1)
    assert s[(1, 16)] == pytest.approx(16 * timing.compute_time(spec, 8, 1, 16, prof, 128, one), rel=1e-12)
    assert s[(16, 4)] == pytest.approx(t[(16, 4)], rel=1e-12)  # 256 examples at batch 16 are 16 steps
    assert timing.transfer_time(spec, 16, prof) == pytest.approx(2 * timing.transfer_time(spec, 8, prof))


# ----------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------
def test_importance_matches_autograd_and_ema():
    model = tiny_llama(torch.float32)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(0, 1000, (2, 16), generator=g)), "labels": ids} for _ in range(3)]
    beta = 0.8
    scores = importance.importance_scores(model, batches, steps=3, beta=beta)
    assert len(scores) == 14 and all(v > 0 for v in scores.values())
    # reference: autograd weight gradients, |W * dL/dW| summed, EMA by hand
    ref = {}
    model.eval()
    for t, b in enumerate(batches):
        model.zero_grad()
        model(**b).loss.backward()
        for n in scores:
            w = model.get_submodule(n).weight
            s = float((w.detach() * w.grad).abs().sum())
            ref[n] = s if t == 0 else beta * ref[n] + (1 - beta) * s
    for n in scores:
        assert scores[n] == pytest.approx(ref[n], rel=1e-4)


def test_importance_on_quantised_base_and_selection():
    model = quant.quantize_model(tiny_llama(), 4, keep_master=False)
    quant.prepare_for_lora(model)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    scores = importance.importance_scores(model, [{"input_ids": ids, "labels": ids}], steps=2)
    assert len(scores) == 14 and all(v > 0 for v in scores.values())
    agg = importance.aggregate_importance([{"a": 1.0, "b": 3.0}, {"a": 10.0, "c": 10.0}], weights=[1, 3])
    assert agg == pytest.approx({"a": 0.25 * 0.25 + 0.75 * 0.5, "b": 0.25 * 0.75, "c": 0.75 * 0.5})
    top = importance.select_modules(agg, 2)
    assert top == ["a", "c"]
    assert importance.select_modules(agg, 0.34) == ["a", "c"]
    assert importance.select_modules(agg, 5, sizes={"a": 3, "b": 2, "c": 3}) == ["a", "b"]
    spec = memory.ModelSpec.from_model(tiny_llama(), TARGETS).with_adapted(importance.select_modules(scores, 3))
    assert len(spec.adapted) == 3


# ----------------------------------------------------------------------------------------------
# Quantised bases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_base_trains_with_lora(bits):
    import bitsandbytes as bnb

    model = quant.quantize_model(tiny_llama(), bits)
    cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].mlp.down_proj, cls)
    assert type(model.lm_head) is torch.nn.Linear  # head stays 16-bit
    quant.prepare_for_lora(model)
    peft_model = measure.build_lora(model, 4, TARGETS, alpha=8)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = measure.synthetic_batch(peft_model, 4, 16, seed=0)
    losses = []
    for _ in range(6):
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_is_exact_and_error_does_not_grow(bits):
    torch.manual_seed(0)
    model = quant.quantize_model(tiny_llama(), bits)
    naive = quant.quantize_model(tiny_llama(), bits, keep_master=False)
    quant.prepare_for_lora(model)
    model = measure.build_lora(model, 4, TARGETS)  # merges go into the base under PEFT's wrapper
    name = "model.layers.0.self_attn.q_proj"
    w0 = tiny_llama().get_submodule(name).weight.detach().float()
    total = torch.zeros_like(w0)
    err_exact, err_naive = [], []
    for _ in range(10):
        delta = 0.004 * torch.randn(64, 4) @ torch.randn(4, 64) / 2
        total += delta
        w = quant.merge_update(model, name, delta)
        wn = quant.naive_merge_update(naive, name, delta)
        ref = quant.quantize_dequantize(w0 + total, bits)
        assert torch.equal(w, ref)  # deq(quant(W0 + Σ deltas)), not a chain
        assert torch.equal(quant.effective_weight(model, name), ref)
        target = w0 + total
        err_exact.append(float((w - target).norm() / target.norm()))  # relative: the matrix grows with Σ deltas
        err_naive.append(float((wn - target).norm() / target.norm()))
    assert max(err_exact) <= 1.15 * err_exact[0]
    assert err_naive[-1] > 2 * err_naive[0] and err_naive[-1] > 1.5 * err_exact[-1]
    assert torch.equal(quant.merged_delta(model, name), total)  # the same float32 adds, in the same order
    # LoRA still trains on the merged base
    batch = measure.synthetic_batch(model, 2, 16)
    model(**batch).loss.backward()


@pytest.mark.parametrize("bits,dtype", [(4, torch.bfloat16), (8, torch.float16)])
def test_merge_without_master_is_exact_wrt_dequantised_start(bits, dtype):
    model = quant.quantize_model(tiny_llama(), bits, keep_master=False)
    name = "model.layers.1.mlp.up_proj"
    start = quant.effective_weight(model, name)
    total = torch.zeros_like(start)
    for _ in range(3):
        delta = 0.01 * torch.randn(*start.shape)
        total += delta
        w = quant.merge_update(model, name, delta)
        assert torch.equal(w, quant.quantize_dequantize(start.to(dtype).float() + total, bits, dtype=dtype))


def test_spec_and_calibration_round_trip_json():
    spec = memory.ModelSpec.from_model(tiny_llama(), TARGETS, name="t")
    assert memory.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    cal = memory.analytic_activations(spec, 16)
    back = memory.ActivationCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert memory.predict_memory(spec, 8, 2, 4, 16, back) == memory.predict_memory(spec, 8, 2, 4, 16, cal)


def test_targets_match_like_peft_target_modules():
    """A target list matches as PEFT's ``target_modules`` does: the full path or a dotted suffix."""
    t = ["query", "pooler.dense"]
    assert quant.is_target("bert.encoder.layer.0.attention.self.query", t)
    assert quant.is_target("bert.pooler.dense", t)
    assert not quant.is_target("bert.encoder.layer.0.output.dense", t)  # "dense" alone is not a target
    assert not quant.is_target("bert.encoder.layer.0.attention.self.query_proj", t)  # whole components only
    assert quant.is_target("bert.pooler.dense", ["bert.pooler.dense"])
    assert not quant.is_target("classifier", ["classifier"])  # the head is never a LoRA/quantisation target


def test_importance_scores_cover_every_lora_target_of_minilm():
    """FedPipe's warm-up scores every module PEFT adapts (MiniLM's defaults include the pooler)."""
    from peft import PeftModel  # noqa: F401

    from fedlora import adapters, batching, config, data, models, train

    cfg = config.load(["model=minilm", "strategy=fedpipe", "num_clients=2"])
    b = models.build(cfg)
    tr, _ = data.load(cfg.data)
    col = batching.Collator(b.tokenizer, b.task, 32, None)
    scores = importance.importance_scores(b.model, [col([tr[i] for i in range(4)])], 1,
                                 targets=list(cfg.model.lora.target_modules),
                                 loss_fn=lambda m, batch: train.model_loss(m, batch, b.task))
    lora = {n.removeprefix("base_model.model.") for n in adapters.lora_layers(b.model)}
    assert set(scores) == lora and "bert.pooler.dense" in scores
