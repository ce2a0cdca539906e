"""Aggregation maths of fedlora.algebra on random adapters (no Flower, no model; small shapes).

Inputs are float64 (fp32 draws, upcast): fp32 factors would put order-dependent roundings (averages, FMA or not,
Gram sums, solves) into every comparison, beyond what a tolerance can bound for any order (tests/tolerances.py).
"""

from __future__ import annotations

import pytest
import torch

from fedlora import algebra as alg
from fedlora import lowrank
from fedlora.adapters import AdapterState, LoraFactors

SHAPES = {"l0.q": (48, 40), "l0.v": (36, 40), "l1.q": (48, 40)}  # name: (out m, in n)


def rand_state(seed: int, rank: int | dict, alpha: float, shapes=SHAPES, head=True, A_from=None) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    st = AdapterState()
    for name, (m, n) in shapes.items():
        r = rank if isinstance(rank, int) else rank[name]
        A = A_from.lora[name].A.clone() if A_from is not None else torch.randn(r, n, generator=g) / n**0.5
        B = torch.randn(m, r, generator=g) * 0.1
        st.lora[name] = LoraFactors(A.double(), B.double(), alpha / r)
    if head:
        st.extra["classifier.weight"] = torch.randn(3, 40, generator=g).double()
    return st


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def max_rel(upd: dict, ideal: dict) -> float:
    return max(rel(upd[n] if isinstance(upd[n], torch.Tensor) else upd[n].delta(), ideal[n]) for n in ideal)


MIXED = [(2, 4.0), (8, 16.0), (64, 16.0), (5, 10.0), (16, 32.0)]  # (rank, alpha): scales 2, 2, .25, 2, 2
N_EX = [10, 200, 35, 80, 1]


@pytest.fixture(scope="module")
def mixed():
    return [rand_state(i, r, a) for i, (r, a) in enumerate(MIXED)]


@pytest.fixture(scope="module")
def equal_rank():
    return [rand_state(10 + i, 8, 16.0) for i in range(4)], [5, 50, 20, 100]


def test_normalize():
    assert alg.normalize([1, 3]) == [0.25, 0.75]
    assert alg.normalize(alg.normalize([2, 7, 1])) == pytest.approx(alg.normalize([2, 7, 1]), abs=1e-15)
    for bad in ([], [0, 0], [1, -1], [float("nan")]):
        with pytest.raises(ValueError):
            alg.normalize(bad)


def test_flora_is_exact_for_mixed_ranks_and_alphas(mixed):
    out = alg.flora_stack(mixed, N_EX)
    ideal = alg.ideal_update(mixed, N_EX)
    assert max_rel(alg.effective_update(out), ideal) <= 1e-6
    f = out.lora["l0.q"]
    assert f.rank == sum(r for r, _ in MIXED) and f.scale == 1.0
    p = alg.normalize(N_EX)
    assert torch.allclose(out.extra["classifier.weight"],
                          sum(pk * s.extra["classifier.weight"] for pk, s in zip(p, mixed)), atol=1e-6)


def test_dense_or_stacked_bytes():
    st = AdapterState({"small_r": LoraFactors(torch.zeros(4, 40), torch.zeros(48, 4), 1.0),
                       "big_r": LoraFactors(torch.zeros(30, 40), torch.zeros(48, 30), 1.0)})
    got = alg.dense_or_stacked_bytes(st)
    assert got["small_r"] == ("stacked", 4 * 88 * 4)
    assert got["big_r"] == ("dense", 48 * 40 * 4)


def test_ffa_is_exact_and_checks_A():
    first = rand_state(0, 8, 16.0)
    states = [first] + [rand_state(i, 8, 16.0, A_from=first) for i in range(1, 5)]  # equal A, other objects
    n = [3, 1, 4, 1, 5]
    out = alg.ffa_average(states, n)
    assert max_rel(alg.effective_update(out), alg.ideal_update(states, n)) <= 1e-6
    assert torch.equal(out.lora["l0.v"].A, first.lora["l0.v"].A)
    bad = [s.clone() for s in states]
    bad[2].lora["l0.v"].A[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"l0\.v.*client 2"):
        alg.ffa_average(bad, n)


def test_fedit_has_cross_terms_unless_clients_agree(equal_rank):
    states, n = equal_rank
    out = alg.fedit(states, n)
    err = max_rel(alg.effective_update(out), alg.ideal_update(states, n))
    assert err > 0.1  # heterogeneous clients: sum_{k!=l} p_k p_l B_k A_l does not vanish
    p = alg.normalize(n)
    f = out.lora["l1.q"]
    assert torch.allclose(f.A, sum(pk * s.lora["l1.q"].A for pk, s in zip(p, states)), atol=1e-6)
    same = [states[0].clone() for _ in range(3)]
    assert max_rel(alg.effective_update(alg.fedit(same, [1, 2, 3])), alg.ideal_update(same, [1, 2, 3])) <= 1e-6


def test_mismatched_ranks_and_scales_raise(mixed, equal_rank):
    with pytest.raises(ValueError, match="equal ranks.*l0.q.*rank 2 on client 0 and 8 on client 1"):
        alg.fedit(mixed[:2], [1, 1])
    with pytest.raises(ValueError, match="equal ranks"):
        alg.lora_fair(mixed[:2], [1, 1], solver="closed_form")
    with pytest.raises(ValueError, match="equal scales"):
        alg.fedit([rand_state(0, 8, 16.0), rand_state(1, 8, 8.0)], [1, 1])
    with pytest.raises(ValueError, match="same frozen A.*'l0.q'"):
        alg.ffa_average(mixed[:2], [1, 1])
    with pytest.raises(ValueError, match="3 states but 2 weights"):
        alg.fedit(equal_rank[0][:3], [1, 1])
    other = rand_state(0, 8, 16.0, shapes={"l0.q": (48, 40)})
    with pytest.raises(ValueError, match="different LoRA modules"):
        alg.fedit([equal_rank[0][0], other], [1, 1])


def _cos(X: torch.Tensor, W: torch.Tensor) -> float:
    return float((X.reshape(-1) @ W.reshape(-1)) / (X.norm() * W.norm()))


def _product_error(out: AdapterState, ideal: dict) -> float:
    return sum(float(torch.linalg.norm(ideal[n] - f.delta()) ** 2) for n, f in out.lora.items()) ** 0.5


@pytest.mark.parametrize("solver", ["closed_form", "cosine"])
def test_lora_fair_reduces_aggregation_error(equal_rank, solver):
    states, n = equal_rank
    ideal = alg.ideal_update(states, n)
    e_fedit = _product_error(alg.fedit(states, n), ideal)
    out = alg.lora_fair(states, n, lam=0.01, solver=solver)
    e_fair = _product_error(out, ideal)
    # cosine fixes the direction only (FedIT's product is also too short), the squared-error form both
    assert e_fair < (0.9 if solver == "closed_form" else 0.97) * e_fedit, (solver, e_fair, e_fedit)
    for name, W in ideal.items():  # best reachable cosine: that of the projection W P onto row(A_bar)
        A = out.lora[name].A.double()
        best = float(torch.linalg.norm(W @ A.T @ torch.linalg.solve(A @ A.T, A)) / torch.linalg.norm(W))
        assert _cos(out.lora[name].delta(), W) > _cos(alg.fedit(states, n).lora[name].delta(), W)
        assert _cos(out.lora[name].delta(), W) > best - 1e-3
    fed = alg.fedit(states, n)
    for name, f in out.lora.items():  # only B is corrected; A, scale and head are FedIT's
        assert torch.equal(f.A, fed.lora[name].A) and f.scale == fed.lora[name].scale
    assert torch.equal(out.extra["classifier.weight"], fed.extra["classifier.weight"])


def test_lora_fair_closed_form_matches_dense_solve(equal_rank):
    states, n = equal_rank
    fed = alg.fedit(states, n)
    low = alg.lora_fair(states, n, lam=0.01, solver="closed_form")
    dense = alg.lora_fair_dense(states, n, lam=0.01, solver="closed_form")
    for name in low.lora:
        dB_low = low.lora[name].B - fed.lora[name].B
        dB_dense = dense.lora[name].B - fed.lora[name].B
        assert rel(dB_low, dB_dense) <= 1e-5
    # lam -> 0 with r <= n: the corrected product is the least-squares projection of dW* onto row(A_bar)
    exact = alg.lora_fair(states, n, lam=0.0, solver="closed_form")
    for name, W in alg.ideal_update(states, n).items():
        A = exact.lora[name].A.double()
        P = A.T @ torch.linalg.solve(A @ A.T, A)
        assert rel(exact.lora[name].delta(), W @ P) <= 1e-5


def test_lora_fair_gram_identities(mixed):
    """<X A_bar, dW*> = <X, G>, ||X A_bar||^2 = <X^T X, A_bar A_bar^T>, ||dW*||^2 from stacked Grams."""
    p = alg.normalize(N_EX)
    name = "l0.v"
    fs = [LoraFactors(s.lora[name].A.double(), s.lora[name].B.double(), s.lora[name].scale) for s in mixed]
    W = alg.ideal_update(mixed, p)[name]
    gen = torch.Generator().manual_seed(3)
    Abar, X = torch.randn(8, 40, generator=gen, dtype=torch.float64), torch.randn(36, 8, generator=gen, dtype=torch.float64)
    G = alg._projected_ideal(fs, p, Abar)
    assert float((X * G).sum()) == pytest.approx(float(((X @ Abar) * W).sum()), rel=1e-12)
    assert float(((X.T @ X) * (Abar @ Abar.T)).sum()) == pytest.approx(float((X @ Abar).pow(2).sum()), rel=1e-12)
    assert alg._ideal_sq_norm(fs, p) == pytest.approx(float(W.pow(2).sum()), rel=1e-12)


def test_lora_fair_cosine_solver_matches_dense_autograd(equal_rank):
    states, n = equal_rank
    fed = alg.fedit(states, n)
    low = alg.lora_fair(states, n, lam=0.01, solver="cosine")  # L-BFGS in span[G, B_bar] (2r x r unknowns)
    dense = alg.lora_fair_dense(states, n, lam=0.01, solver="cosine")  # L-BFGS on the full m x r dB
    ideal = alg.ideal_update(states, n)
    for name in low.lora:
        dB_low = low.lora[name].B - fed.lora[name].B
        dB_dense = dense.lora[name].B - fed.lora[name].B
        assert float(dB_low.norm()) > 0.05 * float(fed.lora[name].B.norm())  # a real correction happened
        assert rel(dB_low, dB_dense) <= 1e-5
        assert _cos(low.lora[name].delta(), ideal[name]) > _cos(fed.lora[name].delta(), ideal[name])


def test_flexlora_exact_when_rank_suffices(mixed):
    states = mixed[:3]  # ranks 2 + 8 + 64 = 74 > min(m, n): W_g has full rank min(m, n)
    n = N_EX[:3]
    ideal = alg.ideal_update(states, n)
    rmax = max(min(W.shape) for W in ideal.values())
    outs = lowrank.flexlora(states, n, ranks=[rmax, rmax], scales=[2.0, 0.25])
    for out, s in zip(outs, [2.0, 0.25]):
        assert all(f.rank == rmax and f.scale == s for f in out.lora.values())
        assert max_rel({k: f.delta() for k, f in out.lora.items()}, ideal) <= 1e-6
    glob = lowrank.flexlora_global(states, n)
    assert max_rel({k: f.delta() for k, f in glob.lora.items()}, ideal) <= 1e-6


def test_flexlora_best_rank_r_approximation(mixed):
    n = N_EX
    ideal = alg.ideal_update(mixed, n)
    low, dense = lowrank.svd_of_sum(mixed, n), lowrank.svd_of_sum(mixed, n, dense=True)
    for name, W in ideal.items():
        k = min(W.shape)
        assert torch.allclose(low[name][1][:k], dense[name][1][:k], rtol=1e-9, atol=1e-12)
    for r in (1, 4, 16):
        (out,) = lowrank.flexlora(mixed, n, ranks=[r], scales=[0.5])
        (ref,) = lowrank.flexlora(mixed, n, ranks=[r], scales=[0.5], dense=True)
        for name, W in ideal.items():
            U, S, Vh = torch.linalg.svd(W)
            best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            got = out.lora[name].delta()
            assert rel(got, best) <= 1e-6 and rel(ref.lora[name].delta(), best) <= 1e-6
            assert float(torch.linalg.norm(W - got)) == pytest.approx(float(S[r:].norm()), rel=1e-6)


def test_flexlora_pads_rank_beyond_available_directions():
    states = [rand_state(0, 2, 4.0), rand_state(1, 2, 4.0)]  # W_g has rank <= 4
    (out,) = lowrank.flexlora(states, [1, 1], ranks=[8], scales=[1.0])
    for name, W in alg.ideal_update(states, [1, 1]).items():
        f = out.lora[name]
        assert f.rank == 8 and rel(f.delta(), W) <= 1e-6
        assert torch.count_nonzero(f.B[:, 4:]) == 0  # extra ranks start like a fresh LoRA: B = 0, A orthonormal
        assert torch.allclose(f.A.double() @ f.A.double().T, torch.eye(8, dtype=torch.float64), atol=1e-6)


def test_hetlora_pad_average_truncate(mixed):
    n = N_EX
    p = alg.normalize(n)
    glob = lowrank.hetlora(mixed, n)
    f = glob.lora["l0.v"]
    assert f.rank == 64 and f.scale == 1.0
    exp_A = torch.zeros(64, 40, dtype=torch.float64)
    exp_B = torch.zeros(36, 64, dtype=torch.float64)
    for pk, st in zip(p, mixed):
        g = st.lora["l0.v"]
        exp_A[: g.rank] += pk * g.A
        exp_B[:, : g.rank] += pk * g.scale * g.B
    assert torch.allclose(f.A, exp_A, atol=1e-6) and torch.allclose(f.B, exp_B, atol=1e-6)
    # round trip: one client aggregated alone and truncated back to its own rank and scale is unchanged
    for st, (r, a) in zip(mixed, MIXED):
        back = lowrank.truncate(lowrank.hetlora([st], [7], ranks=[r for r, _ in MIXED]), r, a / r)
        for name, g in st.lora.items():
            assert back.lora[name].rank == r and back.lora[name].scale == g.scale
            assert torch.allclose(back.lora[name].A, g.A) and torch.allclose(back.lora[name].B, g.B, atol=1e-6)
    with pytest.raises(ValueError, match="larger rank"):
        lowrank.truncate(glob, 65, 1.0)
    assert lowrank.hetlora(mixed[:2], n[:2], ranks=32).lora["l0.v"].rank == 32
    assert lowrank.hetlora(mixed[:2], n[:2], r_max=24).lora["l0.v"].rank == 24


def test_hetlora_norm_weighted(mixed):
    n = N_EX
    glob = lowrank.hetlora(mixed, n, norm_weighted=True)
    name = "l1.q"
    p = alg.normalize(n)
    norms = [float(torch.linalg.norm(s.lora[name].delta())) for s in mixed]
    w = alg.normalize([pk * nk for pk, nk in zip(p, norms)])
    exp_A = torch.zeros(64, 40, dtype=torch.float64)
    for wk, st in zip(w, mixed):
        exp_A[: st.lora[name].rank] += wk * st.lora[name].A
    assert torch.allclose(glob.lora[name].A, exp_A, atol=1e-6)


def test_effective_update_difference(equal_rank):
    states, n = equal_rank
    old, new = alg.fedit(states[:2], [1, 1]), alg.fedit(states, n)
    d = alg.effective_update(new, old)
    dense = alg.effective_update(new, old, dense=True)
    for name in new.lora:
        want = new.lora[name].delta() - old.lora[name].delta()
        assert rel(d[name].delta(), want) <= 1e-6 and rel(dense[name], want) <= 1e-12
        assert d[name].rank == 16 and d[name].scale == 1.0


def test_weighted_sums_in_groups_are_the_sums_of_each_column_whatever_the_grouping(monkeypatch):
    """algebra._wsums adds each client's tensors of a group of outputs in one multi-tensor call: every column's sum
    is sum_k p_k t_k of its float32 (or wider) values, within float32 rounding (tolerances.py), for columns of
    float32, float64, fp16/bf16 as sent, int8 blocks and top-k entries as sent (each mixed with float32 in one
    column too); its dtype is
    float32 or wider, its shape the column's; and which columns share a group changes no bit of any sum."""
    from tolerances import U64, assert_within, f32_tol

    from fedlora import codecs

    g = torch.Generator().manual_seed(7)
    K, shapes = 5, [(3, 7), (64, 5), (130,), (1,), (40, 33), (2, 2)]
    int8, topk = codecs.Codec("int8"), codecs.Codec("topk", topk_fraction=0.3)
    columns, wide = [], []
    for j, shape in enumerate(shapes * 2 + shapes[:4]):
        ts = [torch.randn(shape, generator=g) for _ in range(K)]
        kind = ["fp32", "fp64", "fp16", "bf16", "int8", "mixed", "topk", "mixed_topk"][j % 8]
        if kind == "fp64":
            ts = [t.double() for t in ts]
        elif kind in ("fp16", "bf16"):
            ts = [t.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[kind])) for t in ts]
        elif kind in ("int8", "mixed"):
            coded = [codecs.decode(int8, codecs.encode(int8, {"m.lora_A": t.numpy()}), wide=False)["m.lora_A"]
                     for t in ts]
            ts = coded if kind == "int8" else [c if k % 2 else t for k, (c, t) in enumerate(zip(coded, ts))]
        elif kind in ("topk", "mixed_topk"):
            coded = [codecs.decode(topk, codecs.encode(topk, {"m.lora_A": t.numpy()}), wide=False)["m.lora_A"]
                     for t in ts]
            assert all(isinstance(c, codecs.TopkEntries) for c in coded)
            ts = coded if kind == "topk" else [c if k % 2 else t for k, (c, t) in enumerate(zip(coded, ts))]
        columns.append(ts)
        wide.append([t.float().double() if codecs.as_sent(t) else t.double() for t in ts])
    p = alg.normalize([3, 1, 4, 1, 5])
    sums = alg._wsums(columns, p)
    for col, w, got in zip(columns, wide, sums):
        want = sum(pk * t for pk, t in zip(p, w))
        assert got.shape == col[0].shape
        assert got.dtype == (torch.float64 if col[0].dtype == torch.float64 else torch.float32)
        # a term: its weight to float32, its product, K additions (K + 2); int8: code x scale x weight / 127 (3K)
        n = 3 * K if any(isinstance(t, codecs.Int8Blocks) for t in col) else K + 2
        bound = f32_tol(n, sum(pk * t.abs() for pk, t in zip(p, w)), sides=1)
        if col[0].dtype == torch.float64:
            bound = 2 * K * U64 * sum(pk * t.abs() for pk, t in zip(p, w))
        assert_within(got, want, bound, str(col[0].dtype))
    for group_bytes in (0, 600, 1 << 30):  # one column a group, a few, all in one
        monkeypatch.setattr(alg, "GROUP_BYTES", group_bytes)
        assert all(torch.equal(a, b) for a, b in zip(alg._wsums(columns, p), sums)), group_bytes
