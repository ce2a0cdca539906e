"""FLoRA's downlink (issue 18): each round's stacked update re-factorised at its numerical rank (or within
``strategy.downlink_tolerance``) by QR of the stacked factors and an SVD of the small core, never an m×n matrix
(:func:`fedlora.lowrank.refactor_product`, :func:`fedlora.merges.compact`); the merge log holds exactly what is sent,
optionally through a lossy ``comm.down``, so server and clients keep the same base, catch-up included."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedlora import codecs, config, lowrank, merges
from fedlora.adapters import AdapterState, LoraFactors, array_bytes
from fedlora.codecs import Codec
from fedlora.strategies.rank_rules import Stacking


def _rel(X: torch.Tensor, Y: torch.Tensor) -> float:
    return float((X.double() - Y.double()).norm() / Y.double().norm())


# ------------------------------------------------------------------------------------------------ the maths
@pytest.mark.parametrize("m, n, R", [(384, 384, 80), (384, 1536, 80), (1536, 384, 80), (50, 30, 80), (7, 300, 3)])
def test_refactor_equals_the_stacked_product(m, n, R):
    """Random stacked factors (full rank min(R, m, n)): B'A' = B A within 1e-6 relative (float64: ~1e-15), the
    kept rank is min(R, m, n), A' has orthonormal rows and the singular values sit on B'."""
    g = torch.Generator().manual_seed(m + n + R)
    B, A = torch.randn(m, R, generator=g), torch.randn(R, n, generator=g)
    B2, A2, k = lowrank.refactor_product(B, A)
    assert k == min(R, m, n) and B2.shape == (m, k) and A2.shape == (k, n) and B2.dtype == torch.float64
    assert _rel(B2 @ A2, B.double() @ A.double()) <= 1e-6
    assert torch.allclose(A2 @ A2.T, torch.eye(k, dtype=torch.float64), atol=1e-10)
    S = torch.linalg.svdvals(B.double() @ A.double())[:k]
    assert torch.allclose(B2.norm(dim=0), S, rtol=1e-9)


def test_refactor_recovers_the_rank_of_rank_deficient_stacks():
    """10 clients of rank 8 sharing one A (FFA-like): the stack has 80 columns but rank 8; clients whose B's share a
    5-dimensional column space: rank 5; a zero update keeps one zero column. Products exact. (float64 stacks: a
    float32 one is rank-deficient only to float32 rounding, ~1e-7, which the 1e-10 numerical rank keeps.)"""
    g = torch.Generator().manual_seed(1)
    m, n = 384, 384
    f64 = dict(generator=g, dtype=torch.float64)
    A = torch.randn(8, n, **f64)
    Bs = torch.cat([torch.randn(m, 8, **f64) for _ in range(10)], 1)
    U = torch.randn(m, 5, **f64)
    Bs2 = torch.cat([U @ torch.randn(5, 8, **f64) for _ in range(10)], 1)
    As2 = torch.randn(80, n, **f64)
    As = torch.cat([A * (0.1 * (k + 1)) for k in range(10)], 0)
    B2, A2, k = lowrank.refactor_product(Bs, As)
    assert k == 8 and _rel(B2 @ A2, Bs.double() @ As.double()) <= 1e-9
    B2, A2, k = lowrank.refactor_product(Bs2, As2)
    assert k == 5 and _rel(B2 @ A2, Bs2 @ As2) <= 1e-9
    Bs, As = Bs.float(), As.float()  # float32: the same stack is rank 8 only to float32 rounding
    assert lowrank.refactor_product(Bs, As)[2] > 8
    B2, A2, k = lowrank.refactor_product(Bs, As, tol=1e-6)
    assert k == 8 and _rel(B2 @ A2, Bs.double() @ As.double()) <= 1e-6
    B2, A2, k = lowrank.refactor_product(torch.zeros(m, 16), torch.randn(16, n, generator=g))
    assert k == 1 and not B2.any()


def test_refactor_tolerance_keeps_the_smallest_rank_within_the_tail():
    """A product with a known decaying spectrum: for each tol the discarded tail ||B'A' − BA||_F <= tol ||BA||_F and
    one rank fewer would break it (the SVD's tolerance_rank of the dense product: the same k)."""
    g = torch.Generator().manual_seed(2)
    m, n, R = 300, 200, 60
    U, _ = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, R, generator=g, dtype=torch.float64))
    S = 0.8 ** torch.arange(R, dtype=torch.float64)
    W = torch.randn(R, R, generator=g, dtype=torch.float64)  # mix the factors: B A = U S V^T still
    B, A = (U * S) @ W, torch.linalg.solve(W, V.T)
    X = B @ A
    for tol in (1e-1, 1e-2, 1e-3, 1e-4):
        B2, A2, k = lowrank.refactor_product(B, A, tol=tol)
        assert k == lowrank.tolerance_rank(torch.linalg.svdvals(X), tol) < R
        assert float((B2 @ A2 - X).norm()) <= tol * float(X.norm()) * (1 + 1e-9)
        assert float(S[k - 1:].norm()) > tol * float(S.norm())  # k - 1 would not do


class _Shapes(torch.overrides.TorchFunctionMode):
    """Records the largest number of elements of any tensor a torch call returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_refactor_never_forms_the_m_by_n_product():
    """Every tensor refactor_product and factored_norm create is O(R (m + n)): none has m n elements (checked on
    2000 x 3000 at R = 16), and a 20000 x 20000 module at R = 16 (3.2 GB dense) takes seconds."""
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(2000, 16, generator=g), torch.randn(16, 3000, generator=g)
    with _Shapes() as seen:
        lowrank.refactor_product(B, A)
        lowrank.factored_norm(B, A)
    assert 0 < seen.largest <= 16 * 3000
    B, A = torch.randn(20000, 16, generator=g), torch.randn(16, 20000, generator=g)
    t0 = time.perf_counter()
    B2, A2, k = lowrank.refactor_product(B, A)
    assert k == 16 and time.perf_counter() - t0 < 30
    assert abs(lowrank.factored_norm(B2, A2) / lowrank.factored_norm(B, A) - 1) < 1e-10


def test_factored_norm_is_the_frobenius_norm_of_the_product():
    g = torch.Generator().manual_seed(4)
    B, A = torch.randn(40, 12, generator=g), torch.randn(12, 70, generator=g)
    assert lowrank.factored_norm(B, A) == pytest.approx(float((B.double() @ A.double()).norm()), rel=1e-12)


def test_compact_of_a_flora_stack_equals_the_stacked_product():
    """10 clients of rank 8 stacked by FLoRA (MiniLM-shaped 384 x 384 and 384 x 1536 modules, mixed scales): the
    logged entry (float32 factors, scale 1) equals the stacked product within 1e-6 relative, keeps rank 80 (fresh
    random A's: the stack is full rank) and reports that error and rank."""
    from fedlora import algebra

    g = torch.Generator().manual_seed(8)
    shapes = {"q": (384, 384), "ffn": (384, 1536)}
    states = [AdapterState({k: LoraFactors(torch.randn(8, n, generator=g) / n ** 0.5,
                                           torch.randn(m, 8, generator=g) * 0.01, 2.0 + c) for k, (m, n) in
                            shapes.items()}) for c in range(10)]
    stacked = algebra.flora_stack(states, [1.0 + c for c in range(10)]).lora
    entry, info = merges.compact(stacked, 0.0)
    for name, f in stacked.items():
        e = entry[name]
        assert e.scale == 1.0 and e.A.dtype == e.B.dtype == torch.float32 and e.rank == info[name][0] == 80
        assert _rel(e.delta(), f.delta()) <= 1e-6 and info[name][1] / info[name][2] <= 1e-6
        assert set(merges.wire(e)) == {"A", "B"}


# ------------------------------------------------------------------------------------------------ the merge log
SHAPES = {"layers.0.q": (48, 32), "layers.0.v": (24, 40), "layers.1.q": (48, 32)}


def _client(g, r, scale=2.0, common=None, noise=1.0):
    """A client's trained factors; ``common``: per module a shared column space its B mostly lies in."""
    lora = {}
    for name, (m, n) in SHAPES.items():
        B = torch.randn(m, r, generator=g) * noise
        if common is not None:
            B = B + common[name] @ torch.randn(common[name].shape[1], r, generator=g)
        lora[name] = LoraFactors(torch.randn(r, n, generator=g) / n ** 0.5, B * 0.1, scale)
    return AdapterState(lora)


def _update(pid, version):
    return SimpleNamespace(node=SimpleNamespace(partition_id=pid), metrics={"base-version": version})


def _wire(codec, arrays):
    """What a client decodes of a payload: the server's comm.down encoding (base.encode_payload) and the node's
    decoding (clients/comm.payload)."""
    return codecs.decode(codec, codecs.encode(codec, arrays)) if codec.lossy else arrays


def _federate(rule, rounds, ranks, codec=Codec(), sample=None, common=None, noise=1.0, seed=0):
    """Rounds of Stacking with partial participation: the sampled clients catch up from the payload (through the
    codec), check they hold the server's base, train (random factors) and reply. Returns the clients' bases,
    versions and the payload bytes sent."""
    g = torch.Generator().manual_seed(seed)
    bases = {pid: ({}, 0) for pid in range(len(ranks))}
    sent = 0
    for rnd in range(rounds):
        chosen = sample(rnd) if sample else list(bases)
        states, updates = [], []
        for pid in chosen:
            arrays = rule.payload(AdapterState({}), SimpleNamespace(partition_id=pid, base_version=0))
            sent += array_bytes(codecs.encode(codec, arrays))
            delta, version = merges.apply(*bases[pid], _wire(codec, arrays))
            bases[pid] = (delta, version)
            assert version == rule.log.version
            assert merges.base_digest(delta) == pytest.approx(rule.digests[version], rel=1e-12, abs=1e-12)
            states.append(_client(g, ranks[pid], common=common, noise=noise))
            updates.append(_update(pid, version))
        rule.aggregate(AdapterState({}), states, [1.0 + pid for pid in chosen], updates)
    return bases, sent


@pytest.mark.parametrize("tol, codec", [(0.0, "fp32"), (0.05, "fp32"), (0.0, "int8"), (0.0, "nf4"), (0.0, "bf16")])
def test_partial_participation_and_catch_up_keep_every_base_on_the_servers(tol, codec):
    """Six rounds, two of four clients each, then every client catches up from its own version v < V to V: each
    ends on exactly the server's base (the log's total, bit for bit: both add received(decode(encode(sent))) in
    version order, or the node takes the merged base; to rounding after a factored sum) and digest; the total is
    the sum of the logged entries as sent."""
    c = Codec(codec)
    rule = Stacking(downlink_tolerance=tol, codec=c)
    sample = lambda rnd: [rnd % 4, (rnd * 3 + 1) % 4] if rnd % 4 != (rnd * 3 + 1) % 4 else [rnd % 4, (rnd + 2) % 4]
    bases, _ = _federate(rule, 6, [2, 4, 3, 5], codec=c, sample=sample)
    V = rule.log.version
    assert V == 6 and any(v < V - 1 for _, v in bases.values())  # some client missed more than one merge
    for pid, (delta, v) in bases.items():
        payload = rule.payload(AdapterState({}), SimpleNamespace(partition_id=pid, base_version=0))
        got = merges.steps(payload)
        assert {u for s in got for u in range(s.first, s.last + 1)} == set(range(v + 1, V + 1))
        summed = {s.name for s in got if s.first < s.last and not s.replace}  # a factored sum: exact to rounding
        delta, v = merges.apply(delta, v, _wire(c, payload))
        assert v == V and set(delta) == set(rule.log.total)
        for name in delta:
            if name in summed:
                assert _rel(delta[name], rule.log.total[name]) <= 1e-12, (pid, name)
            else:
                assert torch.equal(delta[name], rule.log.total[name]), (pid, name)
        assert rule.digests[-1] == merges.base_digest(rule.base_delta())
        assert merges.base_digest(delta) == (pytest.approx(rule.digests[-1], rel=1e-12) if summed else rule.digests[-1])
    if not c.lossy:  # the total is the sum of the entries as logged (= as sent)
        for name, total in rule.log.total.items():
            assert _rel(sum(e[name].delta() for e in rule.log.entries), total) <= 1e-6


def test_coded_merges_are_the_only_merges_a_codec_touches():
    """Under a lossy comm.down the log marks its merge keys coded (the codec encodes them; the server merged their
    decode(encode(x)), not x); without a tolerance (FedEx-LoRA, FedPipe) merges stay plain fp32 keys."""
    assert codecs.applies_to("merge.3.layers.0.q.coded_A") and codecs.applies_to("merge.3.layers.0.q.coded_dense")
    assert not codecs.applies_to("merge.3.layers.0.q.A") and not codecs.applies_to("merge.3.layers.0.q.dense")
    g = torch.Generator().manual_seed(5)
    coded, plain = Stacking(downlink_tolerance=0.0, codec=Codec("int8")), Stacking()
    for rule in (coded, plain):
        rule.aggregate(AdapterState({}), [_client(g, 3), _client(g, 4)], [1.0, 2.0], [])
    node = SimpleNamespace(partition_id=0, base_version=0)
    keys = set(coded.payload(AdapterState({}), node))
    assert keys and all(k.rsplit(".", 1)[1] in ("coded_A", "coded_B", "coded_dense") for k in keys)
    assert all(k.rsplit(".", 1)[1] in ("A", "B", "dense") for k in plain.payload(AdapterState({}), node))
    name = "layers.0.q"
    exact = coded.log.entries[0][name].delta()
    assert 0 < _rel(coded.log.total[name], exact) < 0.05  # int8's loss is merged, on every side alike


def test_tolerance_zero_merges_the_same_base_as_the_stacked_factors():
    """downlink_tolerance=0 against the log of plain stacked factors (before issue 18): the same clients over four
    rounds give the same merged base within 1e-6 relative and never more bytes; when the stack is rank-deficient
    (clients' B's in a shared 2-dimensional column space) it sends far fewer."""
    for common, noise in ((None, 1.0), ({name: torch.ones(m, 2) for name, (m, n) in SHAPES.items()}, 0.0)):
        new, old = Stacking(downlink_tolerance=0.0), Stacking()
        _, sent_new = _federate(new, 4, [2, 3, 4, 5], common=common, noise=noise, seed=6)
        _, sent_old = _federate(old, 4, [2, 3, 4, 5], common=common, noise=noise, seed=6)
        for name, total in old.log.total.items():
            assert _rel(new.log.total[name], total) <= 1e-6
        assert sent_new <= sent_old if common is None else sent_new < sent_old / 3


def test_a_positive_tolerance_sends_fewer_bytes_within_its_error():
    """Clients whose updates share a 2-dimensional column space plus small noise (a decaying spectrum, as trained
    updates have): tolerance 0.05 keeps a lower rank than 0 (downlink_rank), sends fewer bytes, and each round's
    merge as sent is within the tolerance of the stacked update (downlink_error)."""
    g = torch.Generator().manual_seed(7)
    common = {name: torch.randn(m, 2, generator=g) for name, (m, n) in SHAPES.items()}
    out = {}
    for tol in (0.0, 0.05):
        rule = Stacking(downlink_tolerance=tol)
        sent, ranks, errs = 0, [], []
        for rnd in range(3):
            gg = torch.Generator().manual_seed(100 + rnd)
            states = [_client(gg, 4, common=common, noise=0.02) for _ in range(4)]
            rule.aggregate(AdapterState({}), states, [1.0, 2.0, 3.0, 4.0], [])
            info = rule.round_metrics([])
            ranks.append(info["downlink_rank"])
            errs.append(info["downlink_error"])
            sent += array_bytes(rule.log.payload(rnd))
        out[tol] = (sent, ranks, errs)
    (s0, r0, e0), (s1, r1, e1) = out[0.0], out[0.05]
    assert s1 < s0 / 2 and all(a < b for a, b in zip(r1, r0))
    assert max(e0) <= 1e-6 and 0 < max(e1) <= 0.05 * (1 + 1e-6)


# ------------------------------------------------------------------------------------------------ capped catch-up
def _late_joiners(rnd):
    """Clients 0 and 1 train every round; from round 7 on one more joins each round, having missed rnd merges."""
    return [0, 1] if rnd < 6 else [0, 1, rnd - 4]


def _one_version(arrays, v):
    return {k: a for k, a in arrays.items() if k.startswith(f"{merges.PREFIX}{v}.")}


def _catch_up_bytes(rule, since, codec, combine=True):
    coded = codec.lossy
    arrays = rule.log.payload(since, coded=coded, codec=codec if coded else None, combine=combine)
    return arrays, array_bytes(codecs.encode(codec, arrays))


@pytest.mark.parametrize("tol, codec", [(0.0, "fp32"), (0.05, "fp32"), (0.0, "int8"), (0.0, "bf16")])
def test_a_late_client_gets_at_most_one_combined_update_per_module(tol, codec):
    """Ten rounds in which clients 2..5 join late (after 6..9 merges): every client ends each catch-up on the server's
    base (digest within 1e-12, checked in _federate), the run sends fewer bytes than one merge at a time (same
    merges, same totals), and from every version v < V the catch-up is no larger than the missed merges one by one
    nor than one float64 m×n per module; it brings a client that merged 1..v one by one to the server's base."""
    c = Codec(codec)
    ranks = [8] * 6
    new, old = Stacking(downlink_tolerance=tol, codec=c), Stacking(downlink_tolerance=tol, codec=c, catch_up=False)
    _, sent_new = _federate(new, 10, ranks, codec=c, sample=_late_joiners, seed=9)
    _, sent_old = _federate(old, 10, ranks, codec=c, sample=_late_joiners, seed=9)
    for name, total in old.log.total.items():
        assert torch.equal(new.log.total[name], total)
    assert sent_new < sent_old
    V, cap = new.log.version, sum(8 * m * n for m, n in SHAPES.values())
    held, combined = {}, 0
    for since in range(V):
        arrays, b_new = _catch_up_bytes(new, since, c)
        old_arrays, b_old = _catch_up_bytes(old, since, c, combine=False)
        assert b_new <= b_old and b_new <= cap, since
        combined += any("-" in k.split(".")[1] for k in arrays)
        delta, v = merges.apply(dict(held), since, _wire(c, arrays))
        assert v == V and set(delta) == set(new.log.total)
        assert merges.base_digest(delta) == pytest.approx(new.digests[-1], rel=1e-12, abs=1e-12), since
        for name, total in new.log.total.items():
            assert _rel(delta[name], total) <= 1e-12, (since, name)
        held, v = merges.apply(held, since, _wire(c, _one_version(old_arrays, since + 1)))
        assert v == since + 1
    assert combined >= 1
    _, b0 = _catch_up_bytes(new, 0, c)
    _, b0_old = _catch_up_bytes(old, 0, c, combine=False)
    assert b0 < b0_old if codec != "int8" else b0 <= b0_old  # int8 merges cost ~1 byte a number: ~8 merges to win


@pytest.mark.parametrize("codec", ["fp32", "bf16"])
def test_a_rank_deficient_catch_up_travels_as_the_factored_sum(codec):
    """Clients whose B's share one column (every merge rank 1, and so is their sum): a client that missed eight
    merges gets per module the float64 rank-1 factors of their sum (what clients decode of each, bf16 included),
    smaller than the merges one by one and than the merged base, and lands on the server's base to rounding."""
    c = Codec(codec)
    common = {name: torch.ones(m, 2) for name, (m, n) in SHAPES.items()}
    rule = Stacking(downlink_tolerance=0.0, codec=c)
    _federate(rule, 8, [3, 4, 5], codec=c, sample=lambda rnd: [0, 1], common=common, noise=0.0, seed=11)
    arrays, b = _catch_up_bytes(rule, 0, c)
    _, b_old = _catch_up_bytes(rule, 0, c, combine=False)
    assert b < b_old and b < sum(8 * m * n for m, n in SHAPES.values())
    for name, (m, n) in SHAPES.items():
        A, B = arrays[f"merge.1-8.{name}.A"], arrays[f"merge.1-8.{name}.B"]
        assert A.shape == (1, n) and B.shape == (m, 1) and A.dtype == B.dtype == np.float64
    assert all(k.startswith("merge.1-8.") for k in arrays)
    assert not any(codecs.applies_to(k) for k in arrays)  # combined catch-ups pass a lossy codec uncoded
    delta, v = merges.apply({}, 0, _wire(c, arrays))
    assert v == 8 and merges.base_digest(delta) == pytest.approx(rule.digests[-1], rel=1e-12)
    for name, total in rule.log.total.items():
        assert _rel(delta[name], total) <= 1e-12


def test_the_catch_up_is_built_once_per_version_and_round(monkeypatch):
    """Nodes of a round at the same version share one payload's arrays (built once: nothing is re-factorised again,
    the arrays are the same objects); the merged base is the same array for every version held; no payload
    recomputes a merge's wire form (its dense product included: q goes dense); a new merge starts afresh, and the
    merged base sent before it still holds the old total."""
    g = torch.Generator().manual_seed(12)
    rule = Stacking(downlink_tolerance=0.0)
    for _ in range(5):
        rule.aggregate(AdapterState({}), [_client(g, 16), _client(g, 16)], [1.0, 2.0], [])
    log = rule.log
    q = "layers.0.q"
    assert set(log.sent(1)[q]) == {"dense"} and log.sent(1) is log.sent(1)
    calls = []
    wire = merges.wire
    monkeypatch.setattr(merges, "wire", lambda f: calls.append(f) or wire(f))
    refactors = []
    refactor = lowrank.refactor_product
    monkeypatch.setattr(lowrank, "refactor_product", lambda *a, **k: refactors.append(1) or refactor(*a, **k))
    first = log.payload(0)
    built = len(refactors)
    again = log.payload(0)
    assert again is not first and again.keys() == first.keys() and all(again[k] is first[k] for k in first)
    assert len(refactors) == built and any(k.endswith(f".{merges.BASE}") for k in first)  # a base, built once
    node = SimpleNamespace(partition_id=7, base_version=1)
    from_one = rule.payload(AdapterState({}), node)
    assert from_one[f"merge.2-5.{q}.base"] is first[f"merge.1-5.{q}.base"]
    assert log.payload(4)[f"merge.5.{q}.dense"] is log.sent(5)[q]["dense"]
    assert not calls
    base5 = torch.from_numpy(first[f"merge.1-5.{q}.base"].copy())
    assert torch.equal(base5, log.total[q])
    rule.aggregate(AdapterState({}), [_client(g, 16), _client(g, 16)], [1.0, 2.0], [])
    assert len(calls) == len(SHAPES)  # the new merge's wire form, once per module, on append
    after = log.payload(0)
    assert torch.equal(torch.from_numpy(after[f"merge.1-6.{q}.base"]), log.total[q])
    assert torch.equal(torch.from_numpy(first[f"merge.1-5.{q}.base"]), base5)
    with pytest.raises(ValueError):  # the merged base is the server's total: read-only
        first[f"merge.1-5.{q}.base"][0, 0] = 1.0


def test_a_combined_catch_up_still_refuses_a_gap():
    """A factored sum of merges a..b is taken only at version a - 1 (before: a gap; inside: the node holds part of
    it); a merged base also from inside a..b, never across a gap; a payload mixing merges one by one (the q's) and
    a merged base (layers.0.v: smaller, so cheaper as a base after fewer merges) lands exactly on the server's base;
    a one-by-one payload with a merge missing is refused as before; parse_payload reads only one-version merges."""
    common = {name: torch.ones(m, 2) for name, (m, n) in SHAPES.items()}
    summed = Stacking(downlink_tolerance=0.0)
    _federate(summed, 6, [3, 4], sample=lambda rnd: [0, 1], common=common, noise=0.0, seed=13)
    g = torch.Generator().manual_seed(14)
    based = Stacking(downlink_tolerance=0.0)
    for _ in range(6):
        based.aggregate(AdapterState({}), [_client(g, 8), _client(g, 8)], [1.0, 2.0], [])

    def held(rule, v):  # a node that merged 1..v one by one
        return merges.apply({}, 0, {k: a for k, a in rule.log.payload(0, combine=False).items()
                                    if int(k.split(".")[1]) <= v})[0]

    for rule, kinds in ((summed, {"A", "B"}), (based, {"base"})):
        arrays = rule.log.payload(2)
        assert {k.rsplit(".", 1)[1] for k in arrays} == kinds and all(k.startswith("merge.3-6.") for k in arrays)
        with pytest.raises(merges.OutOfSync, match="merge version 3 arrived while the client is at version 1"):
            merges.apply(held(rule, 1), 1, arrays)
        delta, v = merges.apply(held(rule, 2), 2, arrays)
        assert v == 6 and all(_rel(delta[n], t) <= 1e-12 for n, t in rule.log.total.items())
        assert merges.apply(dict(delta), 6, arrays) == (delta, 6)  # already there
        if kinds == {"base"}:
            delta, v = merges.apply(held(rule, 4), 4, arrays)
            assert v == 6 and all(torch.equal(delta[n], t) for n, t in rule.log.total.items())
        else:
            with pytest.raises(merges.OutOfSync, match="holds part of them"):
                merges.apply(held(rule, 4), 4, arrays)
        with pytest.raises(ValueError, match="combined catch-up"):
            merges.parse_payload(arrays)
    mixing = Stacking(downlink_tolerance=0.0)  # rank-8 merges: 4 of them cost less than q's base, more than v's
    for _ in range(6):
        mixing.aggregate(AdapterState({}), [_client(g, 4), _client(g, 4)], [1.0, 2.0], [])
    mixed = mixing.log.payload(2)
    assert set(mixed) == {f"merge.{v}.layers.{i}.q.{k}" for v in (3, 4, 5, 6) for i in (0, 1) for k in "AB"} | \
        {"merge.3-6.layers.0.v.base"}
    delta, v = merges.apply(held(mixing, 2), 2, mixed)
    assert v == 6 and all(torch.equal(delta[n], t) for n, t in mixing.log.total.items())
    with pytest.raises(merges.OutOfSync):
        merges.apply(held(mixing, 1), 1, mixed)
    plain = based.log.payload(2, combine=False)
    with pytest.raises(merges.OutOfSync, match="a merge is missing"):
        merges.apply(held(based, 2), 2, {k: a for k, a in plain.items() if not k.startswith("merge.4.")})


# ------------------------------------------------------------------------------------------------ config and runs
def test_downlink_tolerance_is_configured_and_checked():
    from fedlora.strategies.flora import FLoRA

    cfg = config.load(["strategy=flora", "model=tiny_llama"])
    assert cfg.strategy.downlink_tolerance == 0.0
    FLoRA.check_config(cfg)
    FLoRA.check_config(config.load(["strategy=flora", "model=tiny_llama", "strategy.downlink_tolerance=1e-3"]))
    for bad in ("-1e-3", "1.0", "2"):
        with pytest.raises(config.ConfigError, match=r"^strategy\.downlink_tolerance=\S+ must be a number in \[0, 1\) "
                                                     r"\(the relative Frobenius error allowed in each round's merge"):
            FLoRA.check_config(config.load(["strategy=flora", "model=tiny_llama",
                                            f"strategy.downlink_tolerance={bad}"]))
    for bad in ("true", "abc"):  # the config's own type check, or the strategy's
        with pytest.raises(config.ConfigError, match=r"^strategy\.downlink_tolerance="):
            FLoRA.check_config(config.load(["strategy=flora", "model=tiny_llama",
                                            f"strategy.downlink_tolerance={bad}"]))


TINY = ["model=tiny_llama", "strategy=flora", "num_clients=3", "client_ranks=[2,4,3]", "num_rounds=2", "local_steps=1",
        "train.batch_size=4", "eval.max_examples=8", "train.max_length=32", "min_train_nodes=3"]


@pytest.mark.parametrize("extra", [[], ["comm.down=int8", "strategy.downlink_tolerance=1e-2"]])
def test_a_flora_run_reports_the_downlink_rank_and_stays_in_sync(tmp_path, extra):
    """2 rounds of tiny_llama FLoRA (3 clients, ranks 2, 4, 3): round metrics carry downlink_rank (≤ Σ r_k = 9) and
    downlink_error (rounding at tolerance 0, within the tolerance otherwise), downlink_ratio as before, and the
    clients' bases match the server's in round 2, also with int8 merges."""
    from harness import InProcessGrid

    from fedlora.strategies.server_app import run_server

    run_server(InProcessGrid(3), config.load(TINY + extra), tmp_path / "run", echo=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows[1:]:
        assert r["num_clients"] == 3 and not r["rejected"]
        assert 1 <= r["downlink_rank"] <= 9
        assert r["downlink_error"] <= (1e-6 if not extra else 1e-2 * (1 + 1e-6))
    assert rows[1]["downlink_ratio"] == 0.0 and rows[2]["downlink_ratio"] > 0
    assert rows[2]["base_sync_error"] <= 1e-9
    if extra:
        assert rows[2]["codec_down_error"] > 0


def test_a_partial_flora_run_sends_capped_catch_ups_and_stays_in_sync(tmp_path, monkeypatch):
    """tiny_llama FLoRA, 6 clients of rank 16, 2 a round (fraction_train 0.34; seed 6 samples two clients in round 4
    that missed 3 merges each), with the capped catch-up and without it (Stacking.CATCH_UP): the same clients, the
    same losses (both land every node bit for bit on the server's base: base_sync_error 0 <= 1e-9), and round 4
    sends each of them its 4 modules' merged bases (float64 64×64) instead of 3 dense merges a module: fewer bytes
    down. (At 3 rounds no node can have missed more than 2 merges, which never cost more than a float64 base.)"""
    from harness import InProcessGrid

    from fedlora.strategies.server_app import run_server

    args = ["model=tiny_llama", "strategy=flora", "num_clients=6", "fraction_train=0.34",
            "client_ranks=[16,16,16,16,16,16]", "num_rounds=4", "local_steps=1", "train.batch_size=4",
            "eval.max_examples=8", "train.max_length=32", "min_train_nodes=2", "seed=6"]
    rows = {}
    for catch_up in (True, False):
        monkeypatch.setattr(Stacking, "CATCH_UP", catch_up)
        run_server(InProcessGrid(6), config.load(args), tmp_path / str(catch_up), echo=lambda *_: None)
        rows[catch_up] = [json.loads(x) for x in (tmp_path / str(catch_up) / "metrics.jsonl").read_text().splitlines()]
    new, old = rows[True], rows[False]
    assert len(new) == len(old) == 5
    for a, b in zip(new[1:], old[1:]):
        assert a["sampled"] == b["sampled"] and len(a["sampled"]) == 2 and not a["rejected"]
        assert a["base_sync_error"] <= 1e-9 and b["base_sync_error"] <= 1e-9
        assert a["bytes_down"] <= b["bytes_down"]
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-9)
    assert new[4]["bytes_down"] < old[4]["bytes_down"]
    assert new[4]["bytes_down"] <= 2 * (4 * 8 * 64 * 64 + 1024)  # two nodes: one float64 base per module
    assert sum(r["bytes_down"] for r in new) < sum(r["bytes_down"] for r in old)
