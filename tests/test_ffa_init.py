"""FFA-LoRA's ``strategy.a_init``: every initialisation of the frozen A is the same bits on the server and on every
client (it travels as ``fl.a_init`` with ``fl.a_seed``; the clients' A fingerprints are checked), orthogonal rows
are orthonormal at the stated scale, the default is bit for bit the A every strategy drew before the key existed,
an unknown name is refused in one sentence (pre-flight, client, drawing function), and aggregation stays exact
(cross-term error at float rounding) whatever the initialisation."""

import json
import zlib

import pytest
import torch
from harness import InProcessGrid

from fedlora import adapters, algebra, config, diagnostics, preflight, strategies
from fedlora.config import ConfigError
from fedlora.strategies.server_app import run_server

FAST = ["model=tiny_llama", "num_clients=2", "min_train_nodes=2", "num_rounds=1", "local_steps=1",
        "train.batch_size=4", "eval.max_examples=8", "train.max_length=24", "data.max_train_examples=64",
        "strategy=ffa_lora"]


def seeded_A_before(seed, name, r, in_features, a_rank=None):
    """``fedlora.adapters.seeded_A`` as it was before ``init`` existed (copied verbatim): the reference."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    bound = 1.0 / float(in_features) ** 0.5
    R = max(int(r), int(a_rank or 0))
    A = (torch.rand(R, in_features, generator=g) * 2 - 1) * bound
    return A if R == r else A[:r].clone()


@pytest.mark.parametrize("seed, name, r, n, a_rank", [(0, "layers.0.q", 8, 384, None), (7, "layers.3.v", 4, 64, 16),
                                                     (123, "pooler.dense", 16, 384, 4), (2, "x", 3, 17, None)])
def test_default_init_is_bit_identical_to_before(seed, name, r, n, a_rank):
    want = seeded_A_before(seed, name, r, n, a_rank)
    assert torch.equal(adapters.seeded_A(seed, name, r, n, a_rank=a_rank), want)
    assert torch.equal(adapters.seeded_A(seed, name, r, n, a_rank=a_rank, init="kaiming"), want)
    assert adapters.DEFAULT_A_INIT == "kaiming" and config.load(["strategy=ffa_lora"]).strategy.a_init == "kaiming"


@pytest.mark.parametrize("init", adapters.A_INITS)
def test_each_init_is_deterministic_nested_and_at_kaimings_scale(init):
    n = 384
    A = adapters.seeded_A(3, "layers.1.value", 8, n, init=init)
    assert A.dtype == torch.float32 and A.shape == (8, n)
    assert torch.equal(A, adapters.seeded_A(3, "layers.1.value", 8, n, init=init))  # same seed, module: same bits
    assert not torch.equal(A, adapters.seeded_A(4, "layers.1.value", 8, n, init=init))  # another seed
    assert not torch.equal(A, adapters.seeded_A(3, "layers.1.query", 8, n, init=init))  # another module
    # nested: a client of rank 4 told a_rank=8 holds the first 4 rows of the rank-8 matrix, bit for bit
    assert torch.equal(adapters.seeded_A(3, "layers.1.value", 4, n, a_rank=8, init=init), A[:4])
    # the same expected squared row norm as Kaiming-uniform's, 1/3 (orthogonal: exactly)
    assert float(A.double().pow(2).sum(1).mean()) == pytest.approx(1 / 3, rel=0.15)
    if init != "kaiming":
        assert not torch.equal(A, adapters.seeded_A(3, "layers.1.value", 8, n))


def test_gaussian_entries_have_kaimings_variance_and_are_not_uniform():
    n = 384
    A = torch.cat([adapters.seeded_A(s, "m", 16, n, init="gaussian") for s in range(8)]).double()
    assert float(A.mean()) == pytest.approx(0.0, abs=2e-3)
    assert float(A.var()) == pytest.approx(1 / (3 * n), rel=0.05)
    assert float(A.abs().max()) > 1.5 / n ** 0.5  # beyond the Kaiming-uniform bound 1/sqrt(n): not uniform


@pytest.mark.parametrize("r, n", [(8, 384), (16, 64), (5, 5)])
def test_orthogonal_rows_are_orthonormal_up_to_the_stated_scale(r, n):
    A = adapters.seeded_A(11, "layers.2.query", r, n, init="orthogonal").double()
    assert torch.allclose(3.0 * A @ A.T, torch.eye(r, dtype=torch.float64), atol=1e-6)  # A A^T = I / 3
    with pytest.raises(ValueError, match="needs the rank"):
        adapters.seeded_A(11, "layers.2.query", n + 1, n, init="orthogonal")


def test_unknown_a_init_is_refused_in_one_sentence():
    cfg = config.load(["strategy=ffa_lora", "strategy.a_init=svd", "model=tiny_llama"])
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg)
    assert str(e.value) == ("strategy.a_init=svd is not an initialisation of FFA-LoRA's frozen A: choose one of "
                            "kaiming, gaussian, orthogonal.")
    with pytest.raises(ValueError, match=r"^a_init='svd' is not an initialisation of A: choose one of kaiming, "):
        adapters.seeded_A(0, "m", 4, 16, init="svd")
    # a client refuses a message naming an initialisation it does not know, before touching its model or state
    import fedlora.clients.client_app as ca

    conf = {"fl.a_init": "svd", "fl.a_seed": 0, "fl.rank": 4, "fl.alpha": 8.0, "fl.freeze_a": True}
    with pytest.raises(ValueError) as e:
        ca.prepare(None, {}, conf, None)
    assert str(e.value).startswith("fl.a_init='svd' in the train message is not an initialisation of A this client "
                                   "knows (kaiming, gaussian, orthogonal)")


@pytest.mark.parametrize("init", adapters.A_INITS)
def test_server_and_client_draw_the_same_A_from_the_message(init):
    """The server's strategy and a client's ``prepare`` of the train message the strategy builds (``fl.a_seed``,
    ``fl.a_init``, B and the head, no A): the client's A is the server's, bit for bit, and so is its fingerprint."""
    from flwr.app import Context, RecordDict

    import fedlora.clients.client_app as ca
    from fedlora import models
    from fedlora.strategies.base import NodeInfo

    cfg = config.load(FAST + [f"strategy.a_init={init}"])
    bundle = models.build(cfg)  # its own model: the process-wide cache may hold one another test resized
    initial = adapters.from_peft(bundle.model)
    shapes = {n: (l.out_features, l.in_features) for n, l in adapters.lora_layers(bundle.model).items()}
    strat = strategies.get("ffa_lora")(cfg, initial, shapes)
    node = NodeInfo(node_id=1, partition_id=0, num_examples=10, rank=int(cfg.model.lora.r),
                    alpha=float(cfg.model.lora.alpha))
    arrays, extra = strat.payload(node, 1)
    conf = strat.node_config(node, 1, extra)
    assert conf["fl.a_init"] == init and conf["fl.freeze_a"] is True
    assert not any(k.endswith(".lora_A") for k in arrays)  # A never travels: the client draws it
    ca.prepare(bundle, arrays, conf, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    client = adapters.from_peft(bundle.model)
    for name, f in strat.state.lora.items():
        assert torch.equal(client.lora[name].A, f.A)
        assert torch.equal(f.A, adapters.seeded_A(int(cfg.seed), name, f.rank, f.A.shape[1], init=init))
    assert adapters.a_fingerprint(client) == strat.a_fingerprint


def test_a_round_with_a_non_default_init_is_accepted_and_exact(tmp_path):
    """Through the real ServerApp loop and ClientApp functions (two clients, one round, orthogonal A): no reply is
    rejected for its A fingerprint, A never moved, B did, and the round's cross-term error is float rounding."""
    cfg = config.load(FAST + ["strategy.a_init=orthogonal"])
    captured = {}
    cls = strategies.get("ffa_lora")

    class Spy(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["strategy"] = self

    strategies.STRATEGIES["ffa_lora"] = Spy
    try:
        run_server(InProcessGrid(cfg.num_clients), cfg, tmp_path / "run", echo=lambda *_: None)
    finally:
        strategies.STRATEGIES["ffa_lora"] = cls
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    strat = captured["strategy"]
    assert rows[1]["num_clients"] == 2 and rows[1]["rejected"] == [] and strat.a_init == "orthogonal"
    for name, f in strat.state.lora.items():
        assert torch.equal(f.A, adapters.seeded_A(int(cfg.seed), name, f.rank, f.A.shape[1], init="orthogonal"))
        assert float(f.B.abs().sum()) > 0
    assert rows[1]["cross_term_error"] < 1e-6


def test_ffa_average_is_exact_for_an_orthogonal_A():
    """The aggregation itself, in float32, with a shared orthogonal A and three clients' B: s·B̄·A equals
    Σ p_k s·B_k·A up to float rounding."""
    g = torch.Generator().manual_seed(0)
    A = adapters.seeded_A(5, "m", 8, 96, init="orthogonal")
    states = [adapters.AdapterState({"m": adapters.LoraFactors(A.clone(), torch.randn(48, 8, generator=g), 2.0)})
              for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    new = algebra.ffa_average(states, weights)
    assert torch.equal(new.lora["m"].A, A)
    assert diagnostics.cross_term_error(new, states, weights) < 1e-6
