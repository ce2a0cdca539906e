"""FedSA-LoRA: the maths (Ā is the weighted mean of the clients' A; B stays on the clients), what a reply may carry
(A only, B is refused; B and the head once, in the final upload), the personal metrics, the seeded held-out slice,
the config checks, and one tiny run through the real ServerApp loop and ClientApp functions in which every client's
B carries over exactly from round to round and differs between clients."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from harness import InProcessGrid, Killed, KillingGrid
from safetensors import safe_open

import fedlora.clients.client_app as ca
from fedlora import adapters, algebra, checkpoint, config, data, preflight, strategies
from fedlora.adapters import AdapterState, LoraFactors
from fedlora.strategies.base import NodeInfo
from fedlora.strategies.fedsa_lora import FedSALoRA

SHAPES = {"layers.0.q": (12, 10), "layers.0.v": (12, 10)}


def states_and_weights(k=3, r=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    states = [AdapterState({m: LoraFactors(torch.randn(r, n, generator=g, dtype=dtype),
                                           torch.randn(o, r, generator=g, dtype=dtype), 2.0)
                            for m, (o, n) in SHAPES.items()}, {"head.weight": torch.randn(2, 12, generator=g,
                                                                                          dtype=dtype)})
              for _ in range(k)]
    return states, [5.0, 17.0, 3.0][:k]


def test_fedsa_averages_A_and_keeps_the_personal_parts():
    states, w = states_and_weights()
    p = [x / sum(w) for x in w]
    new = algebra.fedsa(states, w, ("B", "extra"))
    for m in SHAPES:
        ref = sum(pk * st.lora[m].A for pk, st in zip(p, states))
        assert float((new.lora[m].A - ref).abs().max()) <= 1e-12
        assert new.lora[m].B is states[0].lora[m].B  # kept, never averaged
    assert new.extra["head.weight"] is states[0].extra["head.weight"]
    # the final upload: B and the head averaged too, so s·B̄·Ā is the mean of the personalised updates s·B_k·Ā
    fin = algebra.fedsa(states, w, ())
    for m in SHAPES:
        Ab = fin.lora[m].A
        mean_personal = sum(pk * 2.0 * st.lora[m].B @ Ab for pk, st in zip(p, states))
        assert float((2.0 * fin.lora[m].B @ Ab - mean_personal).abs().max()) <= 1e-12
    assert float((fin.extra["head.weight"] - sum(pk * st.extra["head.weight"]
                                                 for pk, st in zip(p, states))).abs().max()) <= 1e-12
    with pytest.raises(ValueError, match="FedSA-LoRA needs equal ranks"):
        algebra.fedsa([states[0], states_and_weights(r=2)[0][1]], [1, 1])


def make_strategy(*overrides):
    cfg = config.load(["strategy=fedsa_lora", "num_clients=3", "num_rounds=2", *overrides])
    g = torch.Generator().manual_seed(0)
    init = AdapterState({m: LoraFactors(torch.randn(4, n, generator=g), torch.zeros(o, 4), 2.0)
                         for m, (o, n) in SHAPES.items()}, {"head.weight": torch.randn(2, 12, generator=g)})
    cfg.model.lora.r = 4
    s = strategies.get("fedsa_lora")(cfg, init, SHAPES)
    s.nodes = {100 + i: NodeInfo(100 + i, i, 50 + i, 4, 8.0) for i in range(3)}
    return s


def reply(node, arrays, **metrics):
    req = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.TRAIN, dst_node_id=node.node_id)
    m = {"num-examples": node.num_examples, "train_loss": 0.5, "partition-id": node.partition_id, **metrics}
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                               "metrics": MetricRecord(m)}), reply_to=req)


def test_replies_carry_A_only_and_B_is_refused():
    s = make_strategy()
    nodes = sorted(s.nodes.values(), key=lambda n: n.partition_id)
    rng = np.random.default_rng(0)
    a_keys = {f"{m}.lora_A" for m in SHAPES}
    assert set(s.expected(nodes[0])) == a_keys  # the head stays local too (the paper's code)
    arrs = {n.partition_id: {k: rng.standard_normal((4, 10)).astype(np.float32) for k in a_keys} for n in nodes}
    with_b = {**arrs[0], **{f"{m}.lora_B": np.zeros((12, 4), np.float32) for m in SHAPES}}
    before = s.state.clone()
    res = s.aggregate_round(1, [reply(nodes[0], with_b, personal_accuracy=0.5, personal_examples=4)]
                            + [reply(n, arrs[n.partition_id], personal_accuracy=0.25 * n.partition_id,
                                     personal_loss=1.0, personal_examples=2 + n.partition_id) for n in nodes[1:]])
    assert [r["node"] for r in res.rejected] == [0] and "unexpected key" in res.rejected[0]["reason"]
    assert "lora_B" in res.rejected[0]["reason"]
    p = [n.num_examples / sum(x.num_examples for x in nodes[1:]) for n in nodes[1:]]
    for m in SHAPES:  # Ā of the accepted replies; B and the head exactly the server's
        ref = sum(pk * arrs[n.partition_id][f"{m}.lora_A"].astype(np.float64) for pk, n in zip(p, nodes[1:]))
        assert np.abs(s.state.lora[m].A.double().numpy() - ref).max() <= 1e-6
        assert torch.equal(s.state.lora[m].B, before.lora[m].B)
    assert torch.equal(s.state.extra["head.weight"], before.extra["head.weight"])
    # personal_accuracy: the mean over the clients' held-out examples
    assert math.isclose(res.metrics["personal_accuracy"], (0.25 * 3 + 0.5 * 4) / 7, rel_tol=1e-12)
    assert res.metrics["personal_examples"] == 7 and res.metrics["global_b"] == "zero"
    # malformed personal metrics are refused like any malformed reply
    for bad in ({"personal_accuracy": 1.5, "personal_examples": 3}, {"personal_accuracy": 0.5},
                {"personal_examples": -1}, {"personal_examples": 10**6}, {"personal_loss": float("nan"),
                                                                         "personal_examples": 2}):
        t = copy.deepcopy(s)
        got = t.aggregate_round(1, [reply(n, arrs[n.partition_id], **(bad if n.partition_id == 0 else {}))
                                    for n in nodes])
        assert [r["node"] for r in got.rejected] == [0], bad
    # the final round (num_rounds=2): B and the head come back once, and the global B is their weighted mean
    s.start_round(2)
    assert set(s.expected(nodes[0])) == a_keys | {f"{m}.lora_B" for m in SHAPES} | {"extra.head.weight"}
    s.start_round(1)
    assert set(s.expected(nodes[0])) == a_keys
    shared = make_strategy("strategy.local_head=false")
    assert set(shared.expected(nodes[0])) == a_keys | {"extra.head.weight"}


def test_holdout_is_seeded_disjoint_and_never_trained_on():
    rows, held = data.holdout_indices(1000, 0.1, seed=3, partition_id=2)
    assert len(held) == 100 and not set(rows) & set(held) and sorted([*rows, *held]) == list(range(1000))
    again = data.holdout_indices(1000, 0.1, seed=3, partition_id=2)
    assert np.array_equal(again[1], held) and np.array_equal(again[0], rows)
    assert not np.array_equal(data.holdout_indices(1000, 0.1, 4, 2)[1], held)
    assert not np.array_equal(data.holdout_indices(1000, 0.1, 3, 1)[1], held)
    assert len(data.holdout_indices(5, 0.1, 0, 0)[1]) == 1 and len(data.holdout_indices(1, 0.1, 0, 0)[1]) == 0
    assert len(data.holdout_indices(50, 0.0, 0, 0)[1]) == 0


def test_config_checks():
    cfg = config.load(["strategy=fedsa_lora", "model=tiny_llama", "num_clients=3"])
    preflight.check(cfg)  # what `fedlora run` and `fedlora compare` run first
    refusals = [(["client_ranks=[4,8]"], "needs one rank for every client"),
                (["privacy=client_level"], "final B upload"),
                (["privacy=client_level", "strategy.final_b_upload=false", "local_steps=1"], "local_steps >= 2"),
                (["strategy.holdout=1.0"], "strategy.holdout"), (["strategy.local_head=3"], "strategy.local_head")]
    for extra, phrase in refusals:
        with pytest.raises(config.ConfigError, match=phrase):
            FedSALoRA.check_config(config.load(["strategy=fedsa_lora", *extra]))
    FedSALoRA.check_config(config.load(["strategy=fedsa_lora", "privacy=client_level",
                                        "strategy.final_b_upload=false"]))
    FedSALoRA.check_config(config.load(["strategy=fedsa_lora", "privacy=dp_sgd"]))


FAST = ["model=tiny_llama", "local_steps=1", "train.batch_size=4", "eval.max_examples=8", "train.max_length=32"]


def spy(monkeypatch) -> dict:
    """Record, per (partition, round), the B a client starts from and ends with, its training and held-out rows
    (ids of the underlying table), its reply's metrics and array keys."""
    seen = {"start": {}, "end": {}, "train_ids": {}, "held_ids": {}, "metrics": {}, "reply_keys": {}}
    real_prepare, real_keep, real_holdout, real_train = ca.prepare, ca.keep_personal, ca.personal_holdout, ca.train_fn

    def ids(ds):
        return set(ds._indices.column(0).to_pylist())

    def prepare(bundle, arrays, conf, context):
        real_prepare(bundle, arrays, conf, context)
        key = (int(context.node_config["partition-id"]), int(conf["server-round"]))
        seen["start"][key] = {n: f.B.clone() for n, f in adapters.from_peft(bundle.model).lora.items()}

    def keep(state, conf, context, bundle, held, cfg):
        key = (int(context.node_config["partition-id"]), int(conf["server-round"]))
        seen["end"][key] = {n: f.B.clone() for n, f in state.lora.items()}
        return real_keep(state, conf, context, bundle, held, cfg)

    def holdout(ds, conf, cfg, node):
        rows, held = real_holdout(ds, conf, cfg, node)
        key = (node.partition_id, int(conf["server-round"]))
        seen["train_ids"][key], seen["held_ids"][key] = ids(rows), ids(held)
        return rows, held

    def train_fn(msg, context, node_defaults=None):
        rep = real_train(msg, context, node_defaults)
        key = (int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"]))
        seen["metrics"][key] = dict(rep.content["metrics"])
        seen["reply_keys"][key] = set(rep.content["arrays"].keys())
        return rep

    monkeypatch.setattr(ca, "prepare", prepare)
    monkeypatch.setattr(ca, "keep_personal", keep)
    monkeypatch.setattr(ca, "personal_holdout", holdout)
    monkeypatch.setattr(ca, "train_fn", train_fn)
    return seen


def test_tiny_run_keeps_each_client_B_and_reports_personal_accuracy(tmp_path, monkeypatch):
    seen = spy(monkeypatch)
    cfg = config.load(FAST + ["strategy=fedsa_lora", "num_clients=3", "num_rounds=2", "audit=true"])
    grid = InProcessGrid(3)
    from fedlora.strategies.server_app import run_server

    run_server(grid, cfg, tmp_path / "run", echo=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mods = sorted(seen["start"][(0, 1)])
    a_keys = {f"{m}.lora_A" for m in mods}
    for pid in range(3):
        assert all(not f.any() for f in seen["start"][(pid, 1)].values())  # B starts at zero (PEFT's init)
        for m in mods:  # round 2 starts from exactly the B the client ended round 1 with
            assert torch.equal(seen["start"][(pid, 2)][m], seen["end"][(pid, 1)][m])
        assert seen["reply_keys"][(pid, 1)] == a_keys  # B never travels ...
        assert seen["reply_keys"][(pid, 2)] == a_keys | {f"{m}.lora_B" for m in mods}  # ... but in the final upload
        # the held-out slice: the same both rounds, never in the training rows
        assert seen["held_ids"][(pid, 1)] == seen["held_ids"][(pid, 2)] and seen["held_ids"][(pid, 1)]
        assert not seen["held_ids"][(pid, 1)] & seen["train_ids"][(pid, 1)]
    ctx = {int(c.node_config["partition-id"]): c for c in grid.contexts.values()}
    for pid in range(3):  # what the node keeps is what it trained last
        kept = {k: a.numpy() for k, a in ctx[pid].state[ca.PERSONAL].items()}
        for m in mods:
            assert np.array_equal(kept[f"{m}.lora_B"], seen["end"][(pid, 2)][m].numpy())
    for m in mods:  # personal: the clients' B differ
        assert not torch.equal(seen["end"][(0, 1)][m], seen["end"][(1, 1)][m])
    for rnd in (1, 2):
        ms = [seen["metrics"][(pid, rnd)] for pid in range(3)]
        ref = sum(x["personal_accuracy"] * x["personal_examples"] for x in ms) / sum(x["personal_examples"] for x in ms)
        assert math.isclose(rows[rnd]["personal_accuracy"], ref, rel_tol=1e-12, abs_tol=1e-15)
        assert rows[rnd]["personal_examples"] == sum(x["personal_examples"] for x in ms) and not rows[rnd]["rejected"]
        # num-examples counts the training rows only (the held-out slice is not a weight)
        assert all(x["num-examples"] == len(seen["train_ids"][(p, rnd)]) for p, x in enumerate(ms))
    assert [r.get("global_b") for r in rows[1:]] == ["zero", "mean"]
    assert checkpoint.load(tmp_path / "run")["strategy"]["global_b"] == "mean"  # survives a server resume
    # the global adapter after the final upload: Ā and B̄ the example-weighted means of the clients' replies
    d = tmp_path / "run" / "audit" / "round_0002"
    files = sorted(d.glob("client_*.safetensors"))
    states = [adapters.load_file(f) for f in files]
    n = [float(safe_open(str(f), "pt").metadata()["num_examples"]) for f in files]
    p = [x / sum(n) for x in n]
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        assert fh.metadata()["fedsa_lora.global_b"] == "mean"
        exported = {k: fh.get_tensor(k) for k in fh.keys()}
    for m in mods:
        for factor, key in (("A", "lora_A"), ("B", "lora_B")):
            ref = sum(pk * getattr(st.lora[m], factor).double() for pk, st in zip(p, states))
            got = next(v for k, v in exported.items() if m in k and key in k)
            assert float((got.double() - ref).abs().max()) <= 1e-6, (m, factor)
        for pid, st in enumerate(states):  # the audit's client B is what the client trained (the final upload)
            assert torch.equal(st.lora[m].B, seen["end"][(pid, 2)][m])


def test_personal_B_survives_a_server_resume_only_on_nodes_that_keep_their_state(tmp_path, monkeypatch):
    """Killed in round 2, resumed: partitions 0 and 1 keep their node state (as nodes that outlive the server in
    one run would), partition 2 comes back fresh (a restarted node, or any node of a new Flower run): the first two
    start round 2 from their own round-1 B, the third from zero (the server never holds B, so it cannot restore it)."""
    seen = spy(monkeypatch)
    cfg = config.load(FAST + ["strategy=fedsa_lora", "num_clients=3", "num_rounds=2"])
    from fedlora.strategies.server_app import run_server

    dead = KillingGrid(3, kill_round=2)
    with pytest.raises(Killed):
        run_server(dead, cfg, tmp_path / "run", echo=lambda *_: None)
    back = InProcessGrid(3)
    for nid, ctx in dead.contexts.items():
        if int(ctx.node_config["partition-id"]) < 2:
            back.contexts[nid] = ctx
    run_server(back, cfg, tmp_path / "run", echo=lambda *_: None, resume=True)
    for m in seen["end"][(0, 1)]:
        for pid in (0, 1):
            assert torch.equal(seen["start"][(pid, 2)][m], seen["end"][(pid, 1)][m])
        assert not seen["start"][(2, 2)][m].any() and seen["end"][(2, 1)][m].any()
