"""Aggregation exactness and each method's own diagnostics (issue 17 items 4-6).

- Nested start of heterogeneous ranks: clients that draw a fresh A share ONE seeded matrix of the run's largest
  rank and take its first r_k rows (through the real server messages and the client's ``prepare``).
- ``cross_term_error`` = ‖s·B A − ΔW*‖ / ‖ΔW*‖ (root-sums-of-squares over modules): zero up to float rounding
  for FFA-LoRA and for FedIT with one client, equal to a direct computation for FedIT with two clients; bounds
  derived as in tests/tolerances.py (float32 averages: gamma_n(u32) times the sum of |terms|).
- LoRA-FAIR's paper solver (SGD from ΔB = 0) corrects and raises the cosine to ΔW*; its diagnostics are in the
  round's metrics.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import Context, RecordDict
from harness import InProcessGrid
from safetensors import safe_open
from tolerances import U32, U64, gamma

from fedlora import adapters, algebra, config, diagnostics, models, strategies
from fedlora.adapters import AdapterState, LoraFactors
from fedlora.strategies.base import NodeInfo
from fedlora.strategies.server_app import run_server

FAST = ["model=tiny_llama", "local_steps=2", "train.batch_size=4", "eval.max_examples=16", "train.max_length=32",
        "num_rounds=1", "data.max_train_examples=120"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def rand_state(g, shapes, r, scale=2.0, A=None, b_scale=0.1, dtype=torch.float64) -> AdapterState:
    """Random factors (float32 draws, in ``dtype``); ``A``: reuse these A's (FFA-LoRA)."""
    lora = {}
    for name, (m, n) in shapes.items():
        a = A.lora[name].A if A is not None else (torch.randn(r, n, generator=g) / n ** 0.5).to(dtype)
        lora[name] = LoraFactors(a, (torch.randn(m, r, generator=g) * b_scale).to(dtype), scale)
    return AdapterState(lora)


def direct_error(served: AdapterState, states, weights) -> float:
    """‖s B A − Σ p_k s_k B_k A_k‖ / ‖Σ p_k s_k B_k A_k‖ over modules, written out densely in float64."""
    p = [w / sum(weights) for w in weights]
    num = den = 0.0
    for name, f in served.lora.items():
        W = sum(pk * st.lora[name].scale * (st.lora[name].B.double() @ st.lora[name].A.double())
                for pk, st in zip(p, states))
        num += float(((f.scale * (f.B.double() @ f.A.double())) - W).square().sum())
        den += float(W.square().sum())
    return math.sqrt(num / den)


def direct_cosine(served: AdapterState, states, weights) -> float:
    """cos(vec(s B A), vec(ΔW*)) over modules, written out densely in float64."""
    p = [w / sum(weights) for w in weights]
    dot = np = nw = 0.0
    for name, f in served.lora.items():
        W = sum(pk * st.lora[name].scale * (st.lora[name].B.double() @ st.lora[name].A.double())
                for pk, st in zip(p, states))
        P = f.scale * (f.B.double() @ f.A.double())
        dot, np, nw = dot + float((P * W).sum()), np + float(P.square().sum()), nw + float(W.square().sum())
    return dot / math.sqrt(np * nw)


def f32_average_bound(states, weights, served: AdapterState, shared_A: bool = False) -> float:
    """Bound on ‖s B̄_32 Ā_32 − s B̄ Ā‖ / ‖ΔW*‖ summed over modules, B̄_32/Ā_32 the float32 averages of
    :func:`fedlora.algebra.fedit` (``shared_A``: A is the clients' one tensor, exact). Each element of an average
    sum_k p_k X_k takes at most 2K + 1 roundings (the weight to float32, each product, each sum): error
    <= gamma_{2K+1}(u32) (sum_k p_k |X_k|) =: γ M. Then ‖δB Ā + B̄ δA + δB δA‖_F <= γ(‖M_B‖‖Ā‖ + ‖B̄‖‖M_A‖ +
    γ‖M_B‖‖M_A‖) (‖XY‖_F <= ‖X‖_F ‖Y‖_F), plus the float64 products' own gamma_{r+K}(u64) (sum of |terms|)."""
    p = [w / sum(weights) for w in weights]
    K, g32 = len(states), gamma(2 * len(states) + 1, U32)
    num = den = 0.0
    for name, f in served.lora.items():
        MB = sum(pk * st.lora[name].B.double().abs() for pk, st in zip(p, states))
        MA = sum(pk * st.lora[name].A.double().abs() for pk, st in zip(p, states))
        nA, nB = float(f.A.double().norm()), float(f.B.double().norm())
        dA = 0.0 if shared_A else g32 * float(MA.norm())
        dB = g32 * float(MB.norm())
        terms = sum(pk * abs(st.lora[name].scale) * float((st.lora[name].B.double().abs()
                                                             @ st.lora[name].A.double().abs()).norm())
                    for pk, st in zip(p, states))
        r = max(st.lora[name].rank for st in states)
        num += (abs(f.scale) * (dB * nA + nB * dA + dB * dA) + 2 * gamma(r + K + 2, U64) * terms) ** 2
        W = sum(pk * st.lora[name].scale * (st.lora[name].B.double() @ st.lora[name].A.double())
                for pk, st in zip(p, states))
        den += float(W.square().sum())
    return math.sqrt(num / den)


def run(tmp_path, overrides, name="run"):
    """Metrics rows of one in-process federation, and its audit folder."""
    cfg = config.load(FAST + list(overrides))
    run_server(InProcessGrid(cfg.num_clients), cfg, tmp_path / name, echo=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return rows, tmp_path / name / "audit"


def audited_states(audit_dir, rnd: int = 1) -> tuple[list[AdapterState], list[float]]:
    """The accepted client states of a round, as the audit wrote them, and their example counts."""
    states, weights = [], []
    for path in sorted((audit_dir / f"round_{rnd:04d}").glob("client_*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            weights.append(float(fh.metadata()["num_examples"]))
        states.append(adapters.load_file(path))
    return states, weights


# ----------------------------------------------------------------------------------------------
# item 6: nested start of heterogeneous ranks
# ----------------------------------------------------------------------------------------------
def test_seeded_A_is_nested():
    """A rank-4 A drawn at rank 16 is the first 4 rows of the rank-16 A; at a_rank <= r it is today's A."""
    for n in (10, 64, 384):
        big = adapters.seeded_A(7, "layers.0.q", 16, n)
        assert torch.equal(adapters.seeded_A(7, "layers.0.q", 4, n, a_rank=16), big[:4])
        assert torch.equal(adapters.seeded_A(7, "layers.0.q", 16, n, a_rank=16), big)
        assert torch.equal(adapters.seeded_A(7, "layers.0.q", 4, n, a_rank=4),
                           adapters.seeded_A(7, "layers.0.q", 4, n))
        assert not torch.equal(adapters.seeded_A(8, "layers.0.q", 4, n, a_rank=16), big[:4])


def client_start(cfg, ranks, nested: bool | None = None) -> tuple[object, dict[int, AdapterState]]:
    """The strategy, and the adapter each client's ``prepare`` sets up for round 1 from the server's real
    messages (tiny_llama; partition i has rank ranks[i])."""
    import fedlora.clients.client_app as ca

    bundle = models.cached(cfg, bits=16)
    shapes = {n: (l.out_features, l.in_features) for n, l in adapters.lora_layers(bundle.model).items()}
    s = strategies.get(cfg.strategy.name)(cfg, adapters.from_peft(bundle.model), shapes)
    s.nodes = {10 + i: NodeInfo(10 + i, i, 50, r, 2.0 * r) for i, r in enumerate(ranks)}
    s.prepare_run(None, None)
    out = {}
    for msg in s.build_messages(1).messages:
        node = s.nodes[msg.metadata.dst_node_id]
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        ctx = Context(run_id=1, node_id=node.node_id, node_config={}, state=RecordDict(), run_config={})
        ca.prepare(bundle, arrays, msg.content["config"], ctx)
        out[node.partition_id] = adapters.from_peft(bundle.model)
    return s, out


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_mixed_ranks_start_from_prefixes_of_one_A(name):
    """HetLoRA/FlexLoRA: the rank-4 client's A is the first 4 rows of the rank-16 client's A (same module and
    round), which is the server's initial global A; with ``strategy.nested_init=false`` they are unrelated."""
    cfg = config.load(["model=tiny_llama", f"strategy={name}", "num_clients=3", "client_ranks=[4,16,8]"])
    s, start = client_start(cfg, [4, 16, 8])
    assert s.nested_init
    for mod, f16 in start[1].lora.items():
        assert f16.rank == 16 and start[0].lora[mod].rank == 4
        assert torch.equal(start[0].lora[mod].A, f16.A[:4]) and torch.equal(start[2].lora[mod].A, f16.A[:8])
        assert torch.equal(s.state.lora[mod].A, f16.A) and not s.state.lora[mod].B.any()
    cfg = config.load(["model=tiny_llama", f"strategy={name}", "num_clients=3", "client_ranks=[4,16,8]",
                       "strategy.nested_init=false"])
    s, start = client_start(cfg, [4, 16, 8])
    assert not s.nested_init
    for mod, f16 in start[1].lora.items():
        assert not torch.equal(start[0].lora[mod].A, f16.A[:4])


def test_flora_and_single_rank_keep_todays_A():
    """Strategies that do not nest draw exactly what they drew before: FLoRA's client i takes
    seeded_A(seed·100003 + round·1009 + i, module, r_i) (its own seed and rank)."""
    cfg = config.load(["model=tiny_llama", "strategy=flora", "num_clients=2", "client_ranks=[4,16]"])
    s, start = client_start(cfg, [4, 16])
    for pid, st in start.items():
        for mod, f in st.lora.items():
            want = adapters.seeded_A(int(cfg.seed) * 100_003 + 1009 + pid, mod, f.rank, f.A.shape[1])
            assert torch.equal(f.A, want)


# ----------------------------------------------------------------------------------------------
# item 4/5: cross-term error (pure maths)
# ----------------------------------------------------------------------------------------------
SHAPES = {"l0.q": (24, 20), "l0.v": (18, 20)}


def test_cross_term_error_is_rounding_for_ffa_and_one_client():
    """FFA-LoRA (A shared and frozen) and FedIT with one client serve exactly ΔW*: the error is within the
    float32 averaging bound (zero for one client up to float64 products)."""
    g = torch.Generator().manual_seed(0)
    first = rand_state(g, SHAPES, 4, dtype=torch.float32)
    states = [first] + [rand_state(g, SHAPES, 4, A=first, dtype=torch.float32) for _ in range(2)]
    weights = [10.0, 30.0, 7.0]
    ffa = algebra.ffa_average(states, weights)
    err = diagnostics.cross_term_error(ffa, states, weights)
    assert err <= f32_average_bound(states, weights, ffa, shared_A=True), err
    one = algebra.fedit(states[1:2], [5.0])
    err1 = diagnostics.cross_term_error(one, states[1:2], [5.0])
    assert err1 <= f32_average_bound(states[1:2], [5.0], one), err1
    for st, w in ((ffa, weights), (one, [5.0])):  # the Gram path (no m x n matrix) agrees, to its own floor
        sts = states if st is ffa else states[1:2]
        assert diagnostics.cross_term_error(st, sts, w, dense_limit=0) <= 1e-6


def test_cross_term_error_matches_direct_fedit_two_clients():
    """FedIT with two clients: the dense and Gram paths equal the error written out directly (float64 inputs:
    both are the same maths in another order, so they agree to float64 rounding amplified by cancellation)."""
    g = torch.Generator().manual_seed(1)
    states = [rand_state(g, SHAPES, 4), rand_state(g, SHAPES, 4)]
    weights = [3.0, 5.0]
    served = algebra.fedit(states, weights)
    want = direct_error(served, states, weights)
    assert 0.05 < want < 2.0  # unrelated clients: a real cross-term error
    assert diagnostics.cross_term_error(served, states, weights) == pytest.approx(want, rel=1e-12)
    assert diagnostics.cross_term_error(served, states, weights, dense_limit=0) == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# item 5: LoRA-FAIR's paper solver
# ----------------------------------------------------------------------------------------------
def test_fair_paper_solver_corrects_and_raises_the_cosine():
    """On two unrelated clients, SGD from ΔB = 0 (the default solver) corrects every module and lowers
    1 − cos(s(B̄+ΔB)Ā, ΔW*); its iterates are those of SGD on the full m×r ΔB by autograd."""
    g = torch.Generator().manual_seed(2)
    states = [rand_state(g, SHAPES, 4), rand_state(g, SHAPES, 4)]
    weights = [1.0, 3.0]
    out = algebra.lora_fair(states, weights)
    rep = diagnostics.lora_fair_report(states, weights, out)
    assert rep["corrected_share"] == 1.0 and rep["db_ratio"] > 1e-3
    assert 1 - rep["cos_after"] < 1 - rep["cos_before"] - 1e-3, rep
    for key, st in (("cos_before", algebra.fedit(states, weights)), ("cos_after", out)):  # Gram form = dense
        assert rep[key] == pytest.approx(direct_cosine(st, states, weights), rel=1e-12)
    # the r x r iterates are SGD's on the m x r matrix: 300 steps of a map with Lipschitz constant about
    # 1 + lr·L (L ~ 1/‖B̄‖², lr 1e-2) amplify float64 rounding (~1e-16) by far less than 1e7
    dense = algebra.lora_fair_dense(states, weights, solver="sgd", steps=300)
    low = algebra.lora_fair(states, weights, solver="sgd", steps=300)
    for name in SHAPES:
        B = low.lora[name].B
        assert torch.allclose(B, dense.lora[name].B, rtol=0, atol=1e-9 * float(B.abs().max()))


def test_fair_exact_minimiser_is_zero_where_sgd_still_moves():
    """With large B's the cosine's gradient at ΔB = 0 is below λ: the exact minimiser (``cosine``) is ΔB = 0
    (LoRA-FAIR = FedIT), while the paper's SGD takes its steps anyway."""
    g = torch.Generator().manual_seed(3)
    states = [rand_state(g, SHAPES, 4, b_scale=100.0), rand_state(g, SHAPES, 4, b_scale=100.0)]
    exact = diagnostics.lora_fair_report(states, [1.0, 1.0], algebra.lora_fair(states, [1.0, 1.0], solver="cosine"))
    sgd = diagnostics.lora_fair_report(states, [1.0, 1.0], algebra.lora_fair(states, [1.0, 1.0], solver="sgd"))
    assert exact["corrected_share"] == 0.0 and exact["db_ratio"] == 0.0
    assert sgd["corrected_share"] == 1.0 and sgd["db_ratio"] > 0


# ----------------------------------------------------------------------------------------------
# in the round's metrics (real ServerApp loop and ClientApp functions, tiny_llama, 1 round)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,clients", [("fedit", 2), ("fedit", 1), ("ffa_lora", 2)])
def test_round_metrics_cross_term_error(tmp_path, name, clients):
    """The server's cross_term_error equals the error computed directly from the audited client updates, within
    the float32 averaging bound; FFA-LoRA and FedIT with one client are exact up to that bound."""
    rows, audit = run(tmp_path, [f"strategy={name}", f"num_clients={clients}", f"min_train_nodes={clients}",
                                 "audit=true"])
    got = rows[-1]["cross_term_error"]
    states, weights = audited_states(audit)
    assert len(states) == clients
    p = algebra.normalize(weights)
    exact = algebra.ffa_average(states, p) if name == "ffa_lora" else algebra.fedit([s.map(torch.Tensor.double)
                                                                                      for s in states], p)
    bound = f32_average_bound(states, weights, exact, shared_A=name == "ffa_lora")
    want = 0.0 if name == "ffa_lora" or clients == 1 else direct_error(exact, states, weights)
    assert abs(got - want) <= bound, (got, want, bound)
    if clients == 2 and name == "fedit":
        assert got > 10 * bound  # two clients that trained on different data: a measurable cross term


def test_round_metrics_lora_fair_diagnostics(tmp_path):
    """LoRA-FAIR's round metrics: which solver ran (the paper's SGD by default), ‖ΔB‖/‖B̄‖, the cosine before and
    after the correction (not lower after), the share of corrected modules and the served cross-term error."""
    rows, _ = run(tmp_path, ["strategy=lora_fair", "num_clients=2"])
    m = rows[-1]
    assert m["fair_solver"] == "sgd"
    assert m["fair_corrected_share"] == 1.0 and m["fair_db_ratio"] > 0
    assert 0 < m["fair_cos_before"] <= m["fair_cos_after"] <= 1
    assert 0 <= m["cross_term_error"] < 1


@pytest.mark.parametrize("name", ["hetlora", "flexlora", "flora"])
def test_round_metrics_of_mixed_rank_methods(tmp_path, name):
    """HetLoRA: cross_term_error of the padded average; FlexLoRA: its exact global (rounding only) and the
    truncation error per client rank (0 < err(2) and err(4) <= err(2)); FLoRA: the exported rank and the downlink
    ratio (0 in round 1: nothing merged yet; then the stacked rank-6 merge against FedIT's own ranks)."""
    rows, _ = run(tmp_path, [f"strategy={name}", "num_clients=2", "client_ranks=[2,4]", "num_rounds=2"])
    for m in rows[1:]:
        if name == "hetlora":
            assert 0 < m["cross_term_error"] < 2
        elif name == "flexlora":
            assert m["cross_term_error"] < 1e-5
            t = m["truncation_error"]
            assert set(t) == {"2", "4"} and 0 < t["2"] < 1 and t["4"] <= t["2"]
        else:
            assert 1 <= m["export_rank"] <= 6 * m["round"]
    if name == "flora":
        assert rows[1]["downlink_ratio"] == 0.0 and rows[2]["downlink_ratio"] > 0
