"""RoLoRA and FedSVD: the pure aggregation rules against float64 references, whole runs through the real ServerApp
loop and ClientApp (audit files recomputed from the clients' tensors, the frozen factor checked on the client after
training, with and without DP-SGD), the client's train-factor switch, the server's reply checks and the config
checks."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from harness import InProcessGrid
from safetensors import safe_open
from safetensors.torch import load_file

from fedlora import adapters, algebra, config, lowrank, strategies
from fedlora.adapters import AdapterState, LoraFactors
from fedlora.config import ConfigError
from fedlora.strategies.base import NodeInfo


def _rel(x, ref):
    return float((x.double() - ref.double()).norm() / max(float(ref.double().norm()), 1e-300))


def _states(trained, m=12, n=10, r=4, k=3, seed=0):
    """k clients sharing the frozen factor, each with its own trained factor (float64), and a head."""
    g = torch.Generator().manual_seed(seed)
    A0, B0 = torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64)
    out = []
    for _ in range(k):
        A = torch.randn(r, n, generator=g, dtype=torch.float64) if trained == "A" else A0
        B = torch.randn(m, r, generator=g, dtype=torch.float64) if trained == "B" else B0
        out.append(AdapterState({"x": LoraFactors(A, B, 2.0), "y": LoraFactors(A.clone(), B.clone(), 2.0)},
                                {"head": torch.randn(2, m, generator=g, dtype=torch.float64)}))
    return out


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trained", ["B", "A"])
def test_rolora_average_is_exact(trained):
    states, w = _states(trained), [3.0, 1.0, 2.0]
    p = [x / sum(w) for x in w]
    new = algebra.rolora(states, w, trained)
    for name in ("x", "y"):
        ideal = sum(pk * st.lora[name].delta() for pk, st in zip(p, states))  # sum_k p_k s B_k A_k
        assert _rel(new.lora[name].delta(), ideal) < 1e-6
        frozen = "A" if trained == "B" else "B"
        assert torch.equal(getattr(new.lora[name], frozen), getattr(states[0].lora[name], frozen))
    assert _rel(new.extra["head"], sum(pk * st.extra["head"] for pk, st in zip(p, states))) < 1e-12
    for name, W in algebra.ideal_update(states, w).items():
        assert _rel(new.lora[name].delta(), W) < 1e-6


def test_rolora_refuses_clients_whose_frozen_factor_differs():
    states = _states("B")
    states[1].lora["x"].A = states[1].lora["x"].A + 1e-3
    with pytest.raises(ValueError, match="RoLoRA needs the same frozen A on every client.*'x'"):
        algebra.rolora(states, [1, 1, 1], "B")
    with pytest.raises(ValueError, match="RoLoRA needs the same frozen B"):
        algebra.rolora(_states("B"), [1, 1, 1], "A")  # B differs between clients: it cannot be the frozen one


@pytest.mark.parametrize("m, n, r", [(12, 10, 4), (7, 30, 5), (40, 9, 9)])
def test_fedsvd_keeps_the_exact_aggregate_with_orthonormal_A(m, n, r):
    states, w = _states("B", m=m, n=n, r=r), [1.0, 2.0, 5.0]
    new = lowrank.fedsvd(states, w)
    ideal = algebra.ideal_update(states, w)
    for name, f in new.lora.items():
        assert f.A.shape == (r, n) and f.B.shape == (m, r) and f.scale == 2.0
        assert _rel(f.delta(), ideal[name]) < 1e-6  # s B_new A_new = s B_bar A = sum_k p_k s B_k A
        assert float((f.A @ f.A.T - torch.eye(r, dtype=f.A.dtype)).abs().max()) < 1e-6
        # B_new = U S: its columns are orthogonal, with the singular values of B_bar A as norms, in order
        S = torch.linalg.svdvals(ideal[name] / f.scale)
        assert torch.allclose(f.B.norm(dim=0), S[:r], rtol=1e-6, atol=1e-9)


def test_fedsvd_stays_orthonormal_when_the_aggregate_is_rank_deficient():
    states = _states("B", r=4)
    for st in states:  # no client moved B's last two columns: B_bar A has rank 2 < r
        st.lora["x"].B = st.lora["x"].B.clone()
        st.lora["x"].B[:, 2:] = 0
    f = lowrank.fedsvd(states, [1, 1, 1]).lora["x"]
    assert float((f.A @ f.A.T - torch.eye(4, dtype=f.A.dtype)).abs().max()) < 1e-6
    assert _rel(f.delta(), algebra.ideal_update(states, [1, 1, 1])["x"]) < 1e-6
    # A' stays in A's row space: projecting it onto that space changes nothing
    A = states[0].lora["x"].A
    P = A.T @ torch.linalg.solve(A @ A.T, A)
    assert float((f.A @ P - f.A).abs().max()) < 1e-9


# ----------------------------------------------------------------------------------------------
# whole runs
# ----------------------------------------------------------------------------------------------
FAST = ["model=tiny_llama", "num_clients=3", "local_steps=1", "train.batch_size=4", "eval.max_examples=8",
        "train.max_length=32", "num_rounds=2"]


def _run(tmp_path, monkeypatch, *overrides):
    """A run through the real ServerApp loop; per train message: the round, the factor it trains, the arrays sent,
    the client's whole adapter right after training (read from its model), and the reply's arrays."""
    import json

    from fedlora.strategies.server_app import run_server

    cfg = config.load(FAST + list(overrides))
    seen, orig = [], adapters.from_peft

    def from_peft(model, *a, **k):  # the client reads its trained adapter out of its model exactly once
        st = orig(model, *a, **k)
        if seen and "after" not in seen[-1]:
            seen[-1]["after"] = st
        return st

    def spy(msg, ctx, fn):
        conf = msg.content["config"]
        seen.append({"round": int(conf["server-round"]), "factor": conf["fl.train_factor"],
                     "freeze_a": bool(conf["fl.freeze_a"]),
                     "sent": {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}})
        rep = fn(msg, ctx)
        seen[-1]["reply"] = {k: a.numpy() for k, a in rep.content["arrays"].items()}
        return rep

    monkeypatch.setattr(adapters, "from_peft", from_peft)
    grid = InProcessGrid(cfg.num_clients, faults={i: spy for i in range(cfg.num_clients)})
    run_server(grid, cfg, tmp_path / "run", echo=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return rows, seen


def _check_frozen_on_client(seen, strategy):
    for s in seen:
        trained = "B" if strategy == "fedsvd" or s["round"] % 2 == 1 else "A"
        frozen = {"A": "lora_A", "B": "lora_B"}["B" if trained == "A" else "A"]
        assert s["factor"] == trained and s["freeze_a"] == (trained == "B")
        after = adapters.to_arrays(s["after"])
        moved = 0
        for k, v in after.items():
            if k.endswith(frozen):
                assert np.array_equal(v, s["sent"][k]), (s["round"], k)  # the frozen factor came back bit-identical
            elif not k.startswith("extra."):
                moved += not np.array_equal(v, s["sent"][k])
        assert moved > 0  # and the trained one did train
        # the reply carries exactly the trained factor and the head
        assert set(s["reply"]) == {k for k in after if not k.endswith(frozen)}


@pytest.mark.parametrize("strategy", ["rolora", "fedsvd"])
def test_run_audit_is_exact_and_the_frozen_factor_stays_frozen(tmp_path, monkeypatch, strategy):
    rows, seen = _run(tmp_path, monkeypatch, f"strategy={strategy}", "audit=true")
    assert [r["num_clients"] for r in rows[1:]] == [3, 3] and not any(r["rejected"] for r in rows[1:])
    assert all(r["cross_term_error"] < 1e-6 for r in rows[1:])  # float rounding only
    if strategy == "rolora":
        assert [r["trained_factor"] for r in rows[1:]] == ["B", "A"]
    _check_frozen_on_client(seen, strategy)
    for rnd in (1, 2):
        d = tmp_path / "run" / "audit" / f"round_{rnd:04d}"
        files = sorted(d.glob("client_*.safetensors"))
        states = [adapters.load_file(f) for f in files]
        with_n = []
        for f in files:
            with safe_open(str(f), "pt") as fh:
                with_n.append(float(fh.metadata()["num_examples"]))
        p = [x / sum(with_n) for x in with_n]
        sent = next(s["sent"] for s in seen if s["round"] == rnd)  # every client started from the same arrays
        written = load_file(str(d / "delta.safetensors"))
        assert set(written) == set(states[0].lora) and len(states) == 3
        for m, dW in written.items():
            s0 = states[0].lora[m].scale
            start = s0 * torch.from_numpy(sent[f"{m}.lora_B"]).double() @ torch.from_numpy(sent[f"{m}.lora_A"]).double()
            ideal = sum(pk * st.lora[m].B.double() @ st.lora[m].A.double() * st.lora[m].scale
                        for pk, st in zip(p, states))
            assert _rel(dW, ideal - start) < 1e-6, (strategy, rnd, m)
    if strategy == "fedsvd":  # round 2 starts from the re-factorised aggregate: orthonormal A, the same product
        r2 = next(s["sent"] for s in seen if s["round"] == 2)
        for k, A in r2.items():
            if k.endswith("lora_A"):
                A = torch.from_numpy(A).double()
                assert float((A @ A.T - torch.eye(A.shape[0], dtype=A.dtype)).abs().max()) < 1e-5


def test_dp_sgd_trains_and_noises_only_the_trained_factor(tmp_path, monkeypatch):
    """RoLoRA under DP-SGD (round 1 trains B, as FedSVD and FFA-LoRA do; round 2 trains A): Opacus sees only the
    trained factor and the head, and the frozen factor is bit-identical on the client after training."""
    from fedlora import privacy as P

    trainable, orig = [], P.make_private

    def spy(model, *a, **k):
        out = orig(model, *a, **k)
        trainable.append(list(out[3].trainable))
        return out

    monkeypatch.setattr(P, "make_private", spy)
    rows, seen = _run(tmp_path, monkeypatch, "strategy=rolora", "privacy=dp_sgd", "privacy.target_epsilon=null",
                      "privacy.noise_multiplier=1.0", "privacy.reproducible=true", "num_clients=2")
    assert [r["num_clients"] for r in rows[1:]] == [2, 2]
    _check_frozen_on_client(seen, "rolora")
    assert len(trainable) == 4
    for names, s in zip(trainable, seen):
        lora = [n for n in names if ".lora_" in n]
        want = ".lora_B." if s["factor"] == "B" else ".lora_A."
        assert lora and all(want in n for n in lora)  # the other factor is neither clipped nor noised


# ----------------------------------------------------------------------------------------------
# the train-factor switch, reply checks, config checks
# ----------------------------------------------------------------------------------------------
def test_node_refuses_an_unknown_or_contradictory_train_factor():
    import fedlora.clients.client_app as ca

    assert ca.train_factor(ConfigRecord({"fl.freeze_a": False})) == "both"  # every other strategy: unchanged
    assert ca.train_factor(ConfigRecord({"fl.freeze_a": True})) == "B"  # FFA-LoRA
    assert ca.train_factor(ConfigRecord({"fl.freeze_a": False, "fl.train_factor": "A"})) == "A"
    bad = ConfigRecord({"fl.freeze_a": False, "fl.train_factor": "C"})
    with pytest.raises(ValueError) as e:
        ca.prepare(None, {}, bad, None)  # refused before the node touches its model
    assert str(e.value) == ("fl.train_factor='C' in the train message is not a choice of factors this client knows "
                            "(both, A, B): update the client's fedlora to the server's.")
    with pytest.raises(ValueError, match=r"^fl.train_factor='A' contradicts fl.freeze_a=True"):
        ca.train_factor(ConfigRecord({"fl.freeze_a": True, "fl.train_factor": "A"}))


SHAPES = {"layers.0.q": (12, 10), "layers.0.v": (12, 10)}


def _strategy(name, *overrides):
    cfg = config.load([f"strategy={name}", "num_clients=3", "seed=0", *overrides])
    r = int(cfg.model.lora.r)
    init = AdapterState({m: LoraFactors(torch.zeros(r, n), torch.zeros(o, r), 2.0) for m, (o, n) in SHAPES.items()},
                        {"head.weight": torch.zeros(2, 12)})
    s = strategies.get(name)(cfg, init, SHAPES)
    s.nodes = {100 + i: NodeInfo(100 + i, i, 50 + i, r, 2.0 * r) for i in range(3)}
    return s


def _reply(s, node, rng, add=(), drop=()):
    arrays = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in s.expected(node).items()}
    for k in add:
        r = node.rank
        arrays[k] = rng.standard_normal((r, 10) if k.endswith("lora_A") else (12, r)).astype(np.float32)
    for k in drop:
        arrays.pop(k)
    req = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.TRAIN, dst_node_id=node.node_id)
    metrics = {"num-examples": node.num_examples, "train_loss": 0.5, "partition-id": node.partition_id}
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord(metrics)}), reply_to=req)


@pytest.mark.parametrize("name, rnd, frozen, trained", [
    ("rolora", 1, "lora_A", "lora_B"), ("rolora", 2, "lora_B", "lora_A"), ("fedsvd", 1, "lora_A", "lora_B"),
])
def test_reply_with_the_frozen_factor_or_without_the_trained_one_is_malformed(name, rnd, frozen, trained):
    rng = np.random.default_rng(rnd)
    s = _strategy(name)
    if name == "rolora":
        s.start_round(rnd)
    nodes = sorted(s.nodes.values(), key=lambda n: n.partition_id)
    assert set(s.expected(nodes[0])) == {f"{m}.{trained}" for m in SHAPES} | {"extra.head.weight"}
    for bad, fragment in [(_reply(s, nodes[0], rng, add=[f"layers.0.q.{frozen}"]), "unexpected key"),
                          (_reply(s, nodes[0], rng, drop=[f"layers.0.q.{trained}"]), "missing key")]:
        res = s.aggregate_round(rnd, [bad] + [_reply(s, n, rng) for n in nodes[1:]])
        assert res.metrics["num_clients"] == 2 and len(res.rejected) == 1
        assert res.rejected[0]["node"] == 0 and fragment in res.rejected[0]["reason"]


def test_config_and_preflight_accept_them_and_refuse_what_they_cannot_do(tmp_path):
    from fedlora import compare, preflight

    # fedlora compare strategies=[fedit,rolora,fedsvd] model=tiny_llama num_clients=2: all pass the pre-flight
    plan = compare._plan(["model=tiny_llama", "num_clients=2", "num_rounds=1"], ["fedit", "rolora", "fedsvd"], [0],
                         tmp_path / "cmp", False)
    assert [(p[1], p[4]) for p in plan] == [("fedit", None), ("rolora", None), ("fedsvd", None)]
    for name in ("rolora", "fedsvd"):
        cls, base = strategies.get(name), ["model=tiny_llama", f"strategy={name}", "num_clients=2"]
        cls.check_config(config.load(base + ["privacy=dp_sgd"]))
        cls.check_config(config.load(base + ["privacy=client_level"]))  # server-side clipping: post-processing
        with pytest.raises(ConfigError, match=rf"^strategy {name} needs one rank .*use flora, flexlora or hetlora"):
            preflight.check(config.load(base + ["client_ranks=[4,8]"]))
        with pytest.raises(ConfigError, match=rf"^strategy {name} sends clients both factors .*clipping=server\.$"):
            cls.check_config(config.load(base + ["privacy=client_level", "privacy.clipping=client"]))
        with pytest.raises(ConfigError, match=r"^strategy.a_init=svd is not"):
            cls.check_config(config.load(base + ["strategy.a_init=svd"]))


def test_fedsvd_refactorises_the_client_level_dp_release(monkeypatch):
    """Under client-level DP the privacy component releases the noised mean of B with the public A; FedSVD
    re-factorises that release (post-processing): same product, orthonormal A, the served arrays are the new ones."""
    s = _strategy("fedsvd", "privacy=client_level", "privacy.clipping_norm=0.05", "privacy.target_epsilon=5.0",
                  "privacy.reproducible=true")
    s.privacy.start(s)
    released, orig = [], lowrank.orthonormal_refactor
    monkeypatch.setattr(lowrank, "orthonormal_refactor", lambda st: released.append(st) or orig(st))
    s.configure_round(1, None)
    rng = np.random.default_rng(0)
    res = s.aggregate_round(1, [_reply(s, n, rng) for n in sorted(s.nodes.values(), key=lambda n: n.partition_id)])
    assert res.skipped is None and not res.rejected and len(released) == 1
    for name, f in s.state.lora.items():
        assert _rel(f.delta(), released[0].lora[name].delta()) < 1e-6
        assert float((f.A.double() @ f.A.double().T - torch.eye(f.rank, dtype=torch.float64)).abs().max()) < 1e-5
        assert np.array_equal(res.arrays[f"{name}.lora_A"].numpy(), f.A.numpy())
