"""Fuzz the server's aggregation path: ≥1,000 corrupted replies per strategy, each sent with three valid
ones. Every corrupted reply must be rejected with a reason, and the new global state must equal what the
valid replies alone produce (so nothing of the corrupted reply leaks into the global adapter). The same for
what nodes say about themselves (``test_trust_9_*``): malformed train metrics, handshakes and FedPipe hardware
profiles, and two nodes claiming one partition, leave out only that node, with its reason."""

import copy
import json
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from harness import InProcessGrid  # noqa: F401  (sets Flower's task identity)

from fedlora import strategies
from fedlora import adapters, config
from fedlora.adapters import AdapterState, LoraFactors
from fedlora.strategies.base import NodeInfo

N_CASES = 1000
SHAPES = {"layers.0.q": (12, 10), "layers.0.v": (12, 10)}


def make_strategy(name, ranks, overrides=()):
    cfg = config.load([f"strategy={name}", "num_clients=4", f"client_ranks={list(ranks)}".replace(" ", ""),
                       "strategy.solver=closed_form" if name == "lora_fair" else "seed=0", *overrides])
    g = torch.Generator().manual_seed(0)
    r = int(cfg.model.lora.r)
    init = AdapterState({m: LoraFactors(torch.randn(r, n, generator=g), torch.zeros(o, r), 2.0)
                         for m, (o, n) in SHAPES.items()},
                        {"head.weight": torch.randn(2, 12, generator=g)})
    s = strategies.get(name)(cfg, init, SHAPES)
    s.nodes = {100 + i: NodeInfo(100 + i, i, 50 + i, ranks[i], 2.0 * ranks[i]) for i in range(4)}
    return s


def valid_reply(s, node, rng):
    arrays = {k: rng.standard_normal(shape).astype(np.float32) * 0.1 for k, shape in s.expected(node).items()}
    metrics = {"num-examples": node.num_examples, "train_loss": 0.5, "partition-id": node.partition_id}
    if s.name == "ffa_lora":
        metrics["a-fingerprint"] = s.a_fingerprint
    return arrays, metrics


def message(node, arrays, metrics, drop=None):
    req = Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.TRAIN, dst_node_id=node.node_id)
    content = {}
    metrics = dict(metrics)
    if "status" in metrics:
        content["status"] = ConfigRecord({"status": metrics.pop("status")})
    if drop != "arrays":
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    if drop != "metrics":
        content["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(content), reply_to=req)


def corrupt(kind, arrays, metrics, rng):
    a = {k: v.copy() for k, v in arrays.items()}
    m = dict(metrics)
    keys = sorted(a)
    k = keys[rng.integers(len(keys))]
    drop = None
    if kind == "missing_key":
        a.pop(k)
    elif kind == "extra_key":
        a[rng.choice(["bogus.lora_A", "layers.9.q.lora_B", "extra.new"])] = np.zeros((3, 3), np.float32)
    elif kind == "wrong_shape":
        a[k] = np.zeros(tuple(d + int(rng.integers(1, 3)) for d in a[k].shape), np.float32)
    elif kind == "transposed":
        a[k] = np.ascontiguousarray(a[k].T) if a[k].ndim == 2 and a[k].shape[0] != a[k].shape[1] else a[k][:1]
    elif kind == "wrong_rank":
        mod = rng.choice([x[: -len(".lora_B")] for x in keys if x.endswith(".lora_B")]
                         or [x[: -len(".lora_A")] for x in keys if x.endswith(".lora_A")])  # A-only replies
        r = int(rng.integers(1, 12))
        if f"{mod}.lora_A" in a and a[f"{mod}.lora_A"].shape[0] == r:
            r += 1
        if f"{mod}.lora_B" in a and a[f"{mod}.lora_B"].shape[1] == r:
            r += 1
        if f"{mod}.lora_A" in a:
            a[f"{mod}.lora_A"] = np.zeros((r, a[f"{mod}.lora_A"].shape[1]), np.float32)
        if f"{mod}.lora_B" in a:
            a[f"{mod}.lora_B"] = np.zeros((a[f"{mod}.lora_B"].shape[0], r), np.float32)
    elif kind == "dtype":
        a[k] = a[k].astype(rng.choice([np.float64, np.float16, np.int32, np.int64, np.uint8]))
    elif kind == "nan":
        a[k].flat[rng.integers(a[k].size)] = np.nan
    elif kind == "inf":
        a[k].flat[rng.integers(a[k].size)] = rng.choice([np.inf, -np.inf])
    elif kind == "examples":
        m["num-examples"] = rng.choice([0, -1, -1000, 10**9, 2.5, float("nan"), float("inf")]).item()
    elif kind == "no_examples":
        m.pop("num-examples")
    elif kind == "huge_norm":
        a = {x: v * np.float32(10 ** rng.uniform(3, 8)) for x, v in a.items()}
    elif kind == "flat":
        a[k] = a[k].reshape(-1)
    elif kind == "status":
        m["status"] = "budget-exhausted"
    elif kind in ("no_arrays", "no_metrics"):
        drop = kind[3:]
    elif kind == "fingerprint":
        m["a-fingerprint"] = int(m.get("a-fingerprint", 7)) + 1
    return a, m, drop


KINDS = ["missing_key", "extra_key", "wrong_shape", "transposed", "wrong_rank", "dtype", "nan", "inf", "examples",
         "no_examples", "huge_norm", "flat", "status", "no_arrays", "no_metrics"]


def snapshot(s):
    st = s.eval_adapter()
    return {**{f"{n}.A": f.A.clone() for n, f in st.lora.items()},
            **{f"{n}.B": f.B.clone() for n, f in st.lora.items()},
            **{f"x.{n}": t.clone() for n, t in st.extra.items()}}


@pytest.mark.parametrize("name, ranks", [
    ("fedit", [4, 4, 4, 4]), ("flora", [2, 3, 4, 5]), ("ffa_lora", [4, 4, 4, 4]), ("lora_fair", [4, 4, 4, 4]),
    ("flexlora", [2, 3, 4, 5]), ("hetlora", [2, 3, 4, 5]),
    ("fedex_lora", [4, 4, 4, 4]), ("rolora", [4, 4, 4, 4]), ("fedsvd", [4, 4, 4, 4]), ("fedsa_lora", [4, 4, 4, 4]),
])
def test_corrupted_replies_are_rejected_and_change_nothing(name, ranks):
    rng = np.random.default_rng(hash(name) % 2**32)
    base = make_strategy(name, ranks)
    nodes = sorted(base.nodes.values(), key=lambda n: n.partition_id)
    kinds = KINDS + (["fingerprint"] if name == "ffa_lora" else [])
    # one round of valid updates first, so the global state is non-trivial
    base.aggregate_train(1, [message(n, *valid_reply(base, n, rng)) for n in nodes])
    valid = {n.partition_id: valid_reply(base, n, rng) for n in nodes[1:]}
    ref = copy.deepcopy(base)
    ref.aggregate_train(2, [message(n, *valid[n.partition_id]) for n in nodes[1:]])
    expected = snapshot(ref)
    before = snapshot(base)
    seen = set()
    for case in range(N_CASES):
        kind = kinds[case % len(kinds)]
        s = copy.deepcopy(base)
        arrays, metrics = valid_reply(s, nodes[0], rng)
        bad_arrays, bad_metrics, drop = corrupt(kind, arrays, metrics, rng)
        bad = message(nodes[0], bad_arrays, bad_metrics, drop=drop)
        replies = [bad] + [message(n, *valid[n.partition_id]) for n in nodes[1:]]
        random.Random(case).shuffle(replies)
        rej = s.aggregate_round(2, replies).rejected
        assert len(rej) == 1 and rej[0]["node"] == 0 and rej[0]["reason"], (kind, rej)
        seen.add(rej[0]["reason"].split(":")[0][:20])
        got = snapshot(s)
        for key, t in expected.items():
            assert torch.equal(got[key], t), (name, kind, key)
        # and the same corrupted reply alone (too few valid updates): round skipped, state unchanged
        if case % 50 == 0:
            s2 = copy.deepcopy(base)
            res = s2.aggregate_round(2, [bad])
            # (a huge norm is only judged against the round's median, so alone it is not "rejected")
            assert res.skipped and len(res.rejected) == (0 if kind == "huge_norm" else 1)
            assert all(torch.equal(snapshot(s2)[k], v) for k, v in before.items())
    assert len(seen) >= 6  # the reasons say what was wrong, not one catch-all


# ----------------------------------------------------------------------------------------------
# Trust (issue 16, item 9): metrics of train replies, handshakes, FedPipe profiles
# ----------------------------------------------------------------------------------------------
def metric_message(node, arrays, metrics, as_config=False):
    """A train reply whose metrics record is a ConfigRecord when ``as_config`` (the only way to send a string
    or a bool: a MetricRecord refuses them, but nothing makes a node use one)."""
    msg = message(node, arrays, metrics, drop="metrics" if as_config else None)
    if as_config:
        msg.content["metrics"] = ConfigRecord(dict(metrics))
    return msg


def _pop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def _set(key, value):
    return lambda m: {**m, key: value}


# (what, change of the metrics, whether the record must be a ConfigRecord to carry it)
METRIC_CASES = [
    ("no train_loss", _pop("train_loss"), False), ("no partition-id", _pop("partition-id"), False),
    ("no num-examples", _pop("num-examples"), False),
    ("train_loss string", _set("train_loss", "0.5"), True), ("train_loss bool", _set("train_loss", True), True),
    ("train_loss NaN", _set("train_loss", float("nan")), False),
    ("train_loss inf", _set("train_loss", float("inf")), False),
    ("train_loss negative", _set("train_loss", -0.5), False),
    ("train_loss list", _set("train_loss", [0.5, 0.5]), False),
    ("partition-id string", _set("partition-id", "0"), True), ("partition-id bool", _set("partition-id", False), True),
    ("partition-id NaN", _set("partition-id", float("nan")), False),
    ("partition-id negative", _set("partition-id", -1), False),
    ("partition-id fraction", _set("partition-id", 0.5), False),
    ("partition-id of another node", _set("partition-id", 2), False),
    ("num-examples string", _set("num-examples", "50"), True),
    ("num-examples bool", _set("num-examples", True), True),
    ("num-examples NaN", _set("num-examples", float("nan")), False),
    ("num-examples negative", _set("num-examples", -50), False),
    ("num-examples list", _set("num-examples", [50]), False),
    ("base-version negative", _set("base-version", -1), False),
    ("base-version string", _set("base-version", "x"), True),
    ("base-digest NaN", _set("base-digest", float("nan")), False),
    ("a-fingerprint string", _set("a-fingerprint", "x"), True),
]


def train_loss_of(s, replies):
    return s.aggregate_round(2, replies).metrics.get("train_loss")


@pytest.mark.parametrize("name, ranks", [("fedit", [4, 4, 4, 4]), ("flora", [2, 3, 4, 5]),
                                         ("ffa_lora", [4, 4, 4, 4])])
def test_trust_9_missing_metrics_reject_only_that_node(name, ranks):
    """A train reply missing ``train_loss``, ``partition-id`` or ``num-examples``, or carrying a string, bool,
    NaN, negative or list there (or a malformed optional key), is rejected with its reason; the round goes on
    with the other replies exactly as without it: the same global adapter and the same train_loss."""
    rng = np.random.default_rng(16)
    base = make_strategy(name, ranks)
    nodes = sorted(base.nodes.values(), key=lambda n: n.partition_id)
    base.aggregate_train(1, [message(n, *valid_reply(base, n, rng)) for n in nodes])
    valid = {n.partition_id: valid_reply(base, n, rng) for n in nodes[1:]}
    ref = copy.deepcopy(base)
    ref_loss = train_loss_of(ref, [message(n, *valid[n.partition_id]) for n in nodes[1:]])
    expected = snapshot(ref)
    reasons = set()
    for what, change, as_config in METRIC_CASES:
        s = copy.deepcopy(base)
        arrays, metrics = valid_reply(s, nodes[0], rng)
        bad = metric_message(nodes[0], arrays, change(metrics), as_config)
        res = s.aggregate_round(2, [bad] + [message(n, *valid[n.partition_id]) for n in nodes[1:]])
        assert [r["node"] for r in res.rejected] == [0] and res.skipped is None, (what, res.rejected)
        reasons.add(res.rejected[0]["reason"])
        assert res.metrics["train_loss"] == ref_loss and res.metrics["num_clients"] == 3, what
        got = snapshot(s)
        assert all(torch.equal(got[k], t) for k, t in expected.items()), what
    assert any("no train_loss" in r for r in reasons) and any("holds partition 0" in r for r in reasons)
    assert len(reasons) >= 12  # each says what is wrong


def test_trust_9_nan_train_loss_only_when_no_example_was_drawn():
    """NaN is the honest train_loss of a DP-SGD client whose every Poisson draw was empty (noise-only steps):
    that update is accepted and left out of the round's mean loss; NaN with examples drawn is rejected."""
    rng = np.random.default_rng(9)
    s = make_strategy("fedit", [4, 4, 4, 4])
    nodes = sorted(s.nodes.values(), key=lambda n: n.partition_id)
    replies = [message(n, *valid_reply(s, n, rng)) for n in nodes]
    noise_only = dict(replies[0].content["metrics"], train_loss=float("nan"), steps=2, empty_batches=2)
    ok = message(nodes[0], {k: a.numpy() for k, a in replies[0].content["arrays"].items()}, noise_only)
    res = copy.deepcopy(s).aggregate_round(1, [ok] + replies[1:])
    assert res.rejected == [] and res.metrics["num_clients"] == 4 and res.metrics["train_loss"] == 0.5
    drawn = message(nodes[0], {k: a.numpy() for k, a in replies[0].content["arrays"].items()},
                    dict(noise_only, empty_batches=1))
    res = copy.deepcopy(s).aggregate_round(1, [drawn] + replies[1:])
    assert [r["node"] for r in res.rejected] == [0] and "train_loss" in res.rejected[0]["reason"]


class HandshakeGrid:
    """Answers the handshake itself, without ClientApps: the node of partition ``i`` sends ``answers[i]``
    (a metrics record, or None for none) and its ``profiles[i]`` (FedPipe)."""

    def __init__(self, answers, profiles=None):
        self.answers, self.profiles = answers, profiles or [""] * len(answers)
        self.ids = [1000 + 7 * (len(answers) - i) for i in range(len(answers))]  # not in partition order

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for msg in messages:
            i = self.ids.index(msg.metadata.dst_node_id)
            content = {"config": ConfigRecord({"device": "cpu", "profile": self.profiles[i]})}
            if self.answers[i] is not None:
                content["metrics"] = self.answers[i]
            out.append(Message(RecordDict(content), reply_to=msg))
        return out


def handshake(pid, n=50, **more):
    return MetricRecord({"partition-id": pid, "num-examples": n, "device-memory": 0, "base-version": 0, **more})


@pytest.fixture
def logged(monkeypatch):
    """The server's log lines (Flower's ``log``) as formatted strings."""
    from fedlora.strategies import fedpipe as fedpipe_module
    from fedlora.strategies import server_app

    lines = []

    def log(level, fmt, *args):
        lines.append(fmt % args)

    monkeypatch.setattr(server_app, "log", log)
    monkeypatch.setattr(fedpipe_module, "log", log)
    return lines


BAD_HANDSHAKES = [
    ("no metrics", None), ("no partition-id", MetricRecord({"num-examples": 50})),
    ("no num-examples", MetricRecord({"partition-id": 3})),
    ("partition-id string", ConfigRecord({"partition-id": "3", "num-examples": 50})),
    ("partition-id bool", ConfigRecord({"partition-id": True, "num-examples": 50})),
    ("partition-id NaN", handshake(float("nan"))), ("partition-id negative", handshake(-3)),
    ("partition-id fraction", handshake(3.5)), ("partition-id list", handshake([3])),
    ("num-examples string", ConfigRecord({"partition-id": 3, "num-examples": "50"})),
    ("num-examples bool", ConfigRecord({"partition-id": 3, "num-examples": True})),
    ("num-examples NaN", handshake(3, float("nan"))), ("num-examples zero", handshake(3, 0)),
    ("num-examples negative", handshake(3, -50)), ("base-version negative", handshake(3, **{"base-version": -1})),
    ("device-memory string", ConfigRecord({"partition-id": 3, "num-examples": 50, "device-memory": "lots"})),
]


@pytest.mark.parametrize("what, bad", BAD_HANDSHAKES, ids=[w for w, _ in BAD_HANDSHAKES])
def test_trust_9_malformed_handshake_leaves_only_that_node_out(what, bad, logged):
    """A handshake with missing or malformed metrics: that node is left out with its reason logged, the others
    are taken as they answered (and too few left is a clear error, not a KeyError)."""
    from fedlora.strategies.server_app import discover

    s = make_strategy("fedit", [4, 4, 4, 4])
    grid = HandshakeGrid([handshake(0), handshake(1), handshake(2), bad])
    nodes = discover(grid, s, s.cfg, timeout=5)
    assert sorted((n.node_id, n.partition_id, n.num_examples) for n in nodes.values()) == \
        sorted((grid.ids[i], i, 50) for i in range(3))
    assert len(logged) == 1 and logged[0].startswith(f"node {grid.ids[3]} is left out of the run: ")
    cfg = config.load(["strategy=fedit", "num_clients=4", "min_train_nodes=4"])
    with pytest.raises(RuntimeError, match="only 3 clients answered the handshake"):
        discover(grid, s, cfg, timeout=5)


def test_trust_9_duplicate_partition_id_is_refused(logged):
    """Two nodes claiming one partition: the second to answer is refused at the handshake (one sentence naming
    both node ids), so they never share a DP accountant, FLoRA version or audit file."""
    from fedlora.strategies.server_app import discover

    s = make_strategy("fedit", [4, 4, 4, 4])
    grid = HandshakeGrid([handshake(0), handshake(1), handshake(2), handshake(1)])
    nodes = discover(grid, s, s.cfg, timeout=5)
    # the node of "partition 3" answers first (node ids are handed out in reverse), so it keeps partition 1
    assert {n.node_id: n.partition_id for n in nodes.values()} == {grid.ids[0]: 0, grid.ids[3]: 1, grid.ids[2]: 2}
    assert logged == [f"node {grid.ids[1]} is left out of the run: it claims partition 1, which node "
                      f"{grid.ids[3]} holds."]


def test_trust_9_duplicate_partition_run_goes_on_without_it(tmp_path, logged):
    """Through the real ServerApp loop and ClientApps: a third node configured with partition 0 is refused at the
    handshake; the run completes with the two others, and the refused node never gets a train message."""
    from harness import InProcessGrid

    from fedlora.strategies.server_app import run_server

    cfg = config.load(["model=tiny_llama", "num_clients=3", "num_rounds=1", "local_steps=1", "train.batch_size=4",
                       "eval.max_examples=16", "train.max_length=32"])
    grid = InProcessGrid(3)
    dup = next(nid for nid in grid.contexts if grid.partition_of(nid) == 2)
    first = next(nid for nid in grid.contexts if grid.partition_of(nid) == 0)
    grid.contexts[dup].node_config["partition-id"] = 0
    holder, second = sorted((dup, first))  # the grid answers in node-id order: the larger id comes second
    summary = run_server(grid, cfg, tmp_path / "run", echo=lambda *_: None)
    assert summary["status"] == "completed"
    nodes = json.loads((tmp_path / "run" / "nodes.json").read_text())
    assert sorted((n["node_id"], n["partition_id"]) for n in nodes) == sorted(
        (nid, grid.partition_of(nid)) for nid in grid.contexts if nid != second)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["num_clients"] == 2 and rows[-1]["rejected"] == []
    assert second not in {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MessageType.TRAIN}
    assert f"node {second} is left out of the run: it claims partition 0, which node {holder} holds." in logged


def fedpipe_strategy():
    """A FedPipe strategy on the toy shapes, planned for a modelled Llama-7B (analytic memory model: no dry run)
    with every module adapted (no warm-up), so that :meth:`prepare_run` needs no grid."""
    cfg = config.load(["model=tiny_llama", "strategy=fedpipe", "num_clients=4", "strategy.plan_model=llama-7b",
                       "strategy.seq_len=512", "strategy.examples_per_round=4", "strategy.importance.budget=1.0",
                       "strategy.profiles=[a100_80gb]"])
    base = make_strategy("fedit", [4, 4, 4, 4])
    s = strategies.get("fedpipe")(cfg, base.state, SHAPES)
    s.nodes = copy.deepcopy(base.nodes)
    return s


def bad_json_profiles():
    from fedlora.fedpipe import profiles

    cpu = profiles.load_profile("cpu")
    return {"incomplete": json.dumps({"name": "x", "memory_gb": 8}), "not JSON": '{"name": "x", ',
            "NaN memory": json.dumps(dict(cpu, memory_gb=float("nan"))),
            "negative bandwidth": json.dumps(dict(cpu, mem_bandwidth_gbs=-20)),
            "string compute": json.dumps(dict(cpu, bf16_tflops="0.1")),
            "bool uplink": json.dumps(dict(cpu, uplink_mbps=True)),
            "unknown device": json.dumps(dict(cpu, device="tpu")),
            "numeric name": json.dumps(dict(cpu, name=3)), "mfu above 1": json.dumps(dict(cpu, mfu=2.0)),
            "fractional cores": json.dumps(dict(cpu, cores=1.5)), "zero memory": json.dumps(dict(cpu, memory_gb=0))}


def test_trust_9_profile_name_cannot_escape_conf(tmp_path, logged):
    """A node's profile is a name of conf/client or a complete JSON profile of finite positive numbers. A path
    (even to a valid profile file elsewhere), a mix, an unknown name or a bad JSON profile drops only that node,
    with its reason logged; the plan is made for the others."""
    import os

    import yaml

    from fedlora.fedpipe import profiles

    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(dict(profiles.load_profile("a100_80gb"), name="evil")))
    escape = os.path.relpath(tmp_path / "evil", profiles.CONF_CLIENT_DIR)
    names = [escape, "../client/cpu", "../config", "/etc/passwd", "mixed", "gpu9000", "cpu.yaml", "[1, 2]"]
    for name in names:
        with pytest.raises(ValueError, match="is not one of"):
            profiles.node_profile(name)
    with pytest.raises(KeyError, match="unknown client profile"):
        profiles.load_profile(escape)
    for what, text in bad_json_profiles().items():
        with pytest.raises(ValueError, match="JSON"):
            profiles.node_profile(text)
    detected = dict(profiles.load_profile("cpu"), name="detected:cpu2", estimated=True, matched=None)
    assert profiles.node_profile(json.dumps(detected)) == detected
    assert profiles.node_profile("default") == profiles.load_profile("cpu")

    s = fedpipe_strategy()
    by_pid = {n.partition_id: n for n in s.nodes.values()}
    reported = {0: "a100_80gb", 1: escape, 2: json.dumps(detected), 3: bad_json_profiles()["NaN memory"]}
    for pid, text in reported.items():
        by_pid[pid].extra["profile"] = text
    s.prepare_run(None, tmp_path / "run", echo=lambda *_: None)
    assert sorted(n.partition_id for n in s.nodes.values()) == [0, 2]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    planned = [(c["client_id"], c["profile"]) for c in plan["plan"]["clients"]]
    assert planned == [(0, "a100_80gb"), (2, "detected:cpu2")]
    assert len(logged) == 2
    assert logged[0].startswith(f"node {by_pid[1].node_id} (partition 1) is left out of the run: its profile ")
    assert logged[1].startswith(f"node {by_pid[3].node_id} (partition 3) is left out of the run: its JSON profile ")
    assert "memory_gb=nan is not a finite positive number" in logged[1]

    s = fedpipe_strategy()  # too few usable profiles left: a clear error before training
    for node in s.nodes.values():
        node.extra["profile"] = "../config" if node.partition_id else "cpu"
    with pytest.raises(RuntimeError, match="only 1 clients reported a usable hardware profile"):
        s.prepare_run(None, tmp_path / "run2", echo=lambda *_: None)
