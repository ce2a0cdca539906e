"""Strategies end to end through the real ServerApp loop and ClientApp functions (in-process grid):
FLoRA base sync under partial participation, FFA-LoRA's half traffic, audit recomputation for every
strategy (independently of the strategy code), and rejection of malformed replies."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from harness import InProcessGrid
from safetensors import safe_open
from safetensors.torch import load_file

from fedlora import strategies
from fedlora import adapters, config
from fedlora.strategies.server_app import run_server

FAST = ["model=tiny_llama", "num_clients=4", "local_steps=1", "train.batch_size=4", "eval.max_examples=16",
        "train.max_length=32"]


def run(tmp_path, *overrides, grid=None, name="run"):
    cfg = config.load(FAST + list(overrides))
    grid = grid or InProcessGrid(cfg.num_clients)
    captured = {}
    cls = strategies.get(cfg.strategy.name)

    class Spy(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["strategy"] = self

    orig = strategies.STRATEGIES[cfg.strategy.name]
    strategies.STRATEGIES[cfg.strategy.name] = Spy
    try:
        run_server(grid, cfg, tmp_path / name, echo=lambda *_: None)
    finally:
        strategies.STRATEGIES[cfg.strategy.name] = orig
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return rows, captured["strategy"], grid


def test_flora_partial_participation_keeps_every_client_in_sync(tmp_path):
    """fraction_train=0.5 over 6 rounds: every client, once caught up, trains on exactly the server's base."""
    import fedlora.clients.client_app as ca

    seen = []  # (partition, version, delta) right after each client caught up
    orig_train = ca.train_fn

    class Grid(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            out = super().send_and_receive(messages, timeout)
            for m in messages:
                ctx = self.contexts[m.metadata.dst_node_id]
                delta, v = ca.node_base_delta(ctx)
                seen.append((self.partition_of(m.metadata.dst_node_id), v, {k: t.clone() for k, t in delta.items()}))
            return out

    rows, strat, grid = run(tmp_path, "strategy=flora", "fraction_train=0.5", "num_rounds=6", "client_ranks=[2,4,3,5]",
                            grid=Grid(4))
    assert strat.rule.log.version == 6
    assert all(len(r["sampled"]) == 2 for r in rows[1:])
    assert len({p for r in rows[1:] for p in r["sampled"]}) == 4  # everyone took part at some point
    caught_up_late = 0
    for pid, v, delta in seen:
        # the server's base at version v = the sum of its first v merges
        ref = {}
        for e in strat.rule.log.entries[:v]:
            for name, f in e.items():
                ref[name] = ref.get(name, 0) + f.delta()
        assert set(delta) == set(ref)
        for name in ref:
            err = (delta[name] - ref[name]).norm() / max(1e-12, ref[name].norm())
            assert err <= 1e-6, (pid, v, name, float(err))
        caught_up_late += v >= 2
    assert caught_up_late > 0
    assert max(r["base_sync_error"] for r in rows[1:]) <= 1e-9
    # what clients catch up on is really sent: some rounds carry more than one merge
    assert any(len({k.split(".")[1] for k in m.content["arrays"] if k.startswith("merge.")}) > 1 for m in grid.sent
               if m.metadata.message_type == "train")


def test_ffa_lora_sends_exactly_half_of_fedit(tmp_path):
    fedit, _, _ = run(tmp_path, "strategy=fedit", "num_rounds=2", name="fedit")
    ffa, strat, _ = run(tmp_path, "strategy=ffa_lora", "num_rounds=2", name="ffa")
    for a, b in zip(fedit[1:], ffa[1:]):
        assert b["bytes_up"] * 2 == a["bytes_up"] and b["bytes_down"] * 2 == a["bytes_down"]
        assert not b["rejected"]


def _n_examples(path: Path) -> float:
    with safe_open(str(path), "pt") as fh:
        return float(fh.metadata()["num_examples"])


def _served(strategy: str, states, p, lam=0.01):
    """The global product each method serves, recomputed from client tensors alone (float64)."""
    out = {}
    for m in states[0].lora:
        fs = [s.lora[m] for s in states]
        A = [f.A.double() for f in fs]
        B = [f.B.double() for f in fs]
        s = [f.scale for f in fs]
        if strategy in ("fedit", "lora_fair"):
            Ab = sum(w * a for w, a in zip(p, A))
            Bb = sum(w * b for w, b in zip(p, B))
            if strategy == "lora_fair":  # closed form, dense: ΔB = (ΔW*/s − B̄Ā)Āᵀ(ĀĀᵀ+λI)⁻¹
                W = sum(w * b @ a for w, a, b in zip(p, A, B))
                Bb = Bb + (W - Bb @ Ab) @ Ab.T @ torch.linalg.inv(Ab @ Ab.T + lam * torch.eye(Ab.shape[0], dtype=Ab.dtype))
            out[m] = s[0] * Bb @ Ab
        elif strategy == "ffa_lora":
            out[m] = s[0] * sum(w * b for w, b in zip(p, B)) @ A[0]
        else:  # flora, flexlora (W_g), hetlora (padded average, scales folded into B)
            if strategy == "hetlora":
                R = max(a.shape[0] for a in A)
                Ag = sum(w * torch.nn.functional.pad(a, (0, 0, 0, R - a.shape[0])) for w, a in zip(p, A))
                Bg = sum(w * sk * torch.nn.functional.pad(b, (0, R - b.shape[1])) for w, b, sk in zip(p, B, s))
                out[m] = Bg @ Ag
            else:
                out[m] = sum(w * sk * b @ a for w, sk, a, b in zip(p, s, A, B))
    return out


@pytest.mark.parametrize("strategy, extra", [
    ("fedit", []), ("flora", ["client_ranks=[2,4]"]), ("ffa_lora", []),
    ("lora_fair", ["strategy.solver=closed_form"]), ("flexlora", ["client_ranks=[2,4]"]), ("hetlora", ["client_ranks=[2,4]"]),
])
def test_audit_files_reproduce_the_global_update(tmp_path, strategy, extra):
    rows, strat, _ = run(tmp_path, f"strategy={strategy}", "num_rounds=2", "audit=true", *extra)
    prev = None
    for rnd in (1, 2):
        d = tmp_path / "run" / "audit" / f"round_{rnd:04d}"
        files = sorted(d.glob("client_*.safetensors"))
        states = [adapters.load_file(f) for f in files]
        n = [_n_examples(f) for f in files]
        p = [x / sum(n) for x in n]
        served = _served(strategy, states, p)
        expected = served if (strategy == "flora" or prev is None) else {m: served[m] - prev[m] for m in served}
        written = load_file(str(d / "delta.safetensors"))
        assert set(written) == set(expected)
        for m, dW in written.items():
            ref = expected[m]
            err = float((dW.double() - ref).norm() / max(ref.norm(), 1e-12))
            assert err < 1e-5, (strategy, rnd, m, err)
        prev = served


def _corrupt(kind):
    def fault(msg, ctx, fn):
        rep = fn(msg, ctx)
        arrays = {k: a.numpy() for k, a in rep.content["arrays"].items()}
        k0 = sorted(arrays)[0]
        if kind == "missing":
            arrays.pop(k0)
        elif kind == "extra":
            arrays["bogus.lora_A"] = np.zeros((2, 2), np.float32)
        elif kind == "rank":
            arrays = {k: (np.zeros((a.shape[0] + 1, a.shape[1]), np.float32) if k.endswith("lora_A") else
                          np.zeros((a.shape[0], a.shape[1] + 1), np.float32) if k.endswith("lora_B") else a)
                      for k, a in arrays.items()}
        elif kind == "nan":
            arrays[k0] = arrays[k0].copy()
            arrays[k0][0, 0] = np.nan
        rep.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return rep

    return fault


@pytest.mark.parametrize("kind, fragment", [("missing", "missing key"), ("extra", "unexpected key"),
                                            ("rank", "shape"), ("nan", "NaN")])
def test_malformed_reply_is_rejected_and_round_goes_on(tmp_path, kind, fragment):
    grid = InProcessGrid(4, faults={1: _corrupt(kind)})
    rows, strat, _ = run(tmp_path, "strategy=fedit", "num_rounds=1", grid=grid)
    r = rows[1]
    assert r["num_clients"] == 3
    assert len(r["rejected"]) == 1 and r["rejected"][0]["node"] == 1 and fragment in r["rejected"][0]["reason"]


def test_single_rank_methods_refuse_mixed_ranks():
    for s in ("fedit", "ffa_lora", "lora_fair"):
        with pytest.raises(config.ConfigError, match="needs one rank for every client"):
            strategies.get(s).check_config(config.load([f"strategy={s}", "client_ranks=[4,8]"]))


def test_one_registry_whose_capabilities_are_class_attributes():
    assert set(strategies.STRATEGIES) == set(config.group_options("strategy"))
    for name, cls in strategies.STRATEGIES.items():
        assert cls.name == name and "none" in cls.privacy_modes
        assert "client_dp" in cls.privacy_modes or cls.client_dp_refusal  # a refusal says why
    assert {n for n, c in strategies.STRATEGIES.items() if c.supports_mixed_ranks} == {
        "flora", "flexlora", "hetlora", "fedpipe"}


def test_run_config_travels_once_and_again_only_to_a_restarted_node(tmp_path):
    """The handshake carries the run config; train messages name its digest. Partition 1's node loses its state
    before round 2 (a restart): it says so, gets the same message again with the config, and trains that round."""
    from flwr.app import MessageType

    import fedlora.clients.client_app as ca
    from fedlora.messages import CONFIG_KEY, DIGEST_KEY

    wiped = []

    class Grid(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            for m in messages:
                if (m.metadata.message_type == MessageType.TRAIN and m.content["config"]["server-round"] == 2
                        and self.partition_of(m.metadata.dst_node_id) == 1 and not wiped):
                    ctx = self.contexts[m.metadata.dst_node_id]
                    for k in list(ctx.state.keys()):
                        del ctx.state[k]
                    wiped.append(True)
            return super().send_and_receive(messages, timeout)

    rows, strat, grid = run(tmp_path, "strategy=fedit", "num_rounds=2", grid=Grid(4))
    assert wiped and all(r["num_clients"] == 4 and not r["rejected"] for r in rows[1:])
    queries = [m for m in grid.sent if m.metadata.message_type == MessageType.QUERY]
    assert len(queries) == 4 and all(CONFIG_KEY in m.content["config"] for m in queries)
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert all(m.content["config"][DIGEST_KEY] == strat.config_digest for m in train)
    with_config = [(m.content["config"]["server-round"], grid.partition_of(m.metadata.dst_node_id))
                   for m in train if CONFIG_KEY in m.content["config"]]
    assert with_config == [(2, 1)]
    with pytest.raises(Exception, match="read-only"):  # a node never edits the run config
        ca._parse(strat.cfg_yaml).num_clients = 99


@pytest.mark.parametrize("name, ranks", [("fedit", [4, 4, 4, 4]), ("ffa_lora", [4, 4, 4, 4]),
                                         ("flora", [2, 3, 4, 5]), ("flexlora", [2, 3, 4, 5]),
                                         ("lora_fair", [4, 4, 4, 4]), ("fedex_lora", [4, 4, 4, 4]),
                                         ("hetlora", [2, 3, 4, 5])])
def test_diagnostics_false_skips_the_cross_term_error_and_changes_nothing_else(name, ranks):
    """``diagnostics=false``: a round's metrics lack ``cross_term_error`` (whose exact value costs the square of the
    clients per round), and the round is otherwise the same: its other metrics and the served adapter bit for bit."""
    from test_fuzz import make_strategy, message, snapshot, valid_reply

    rng = np.random.default_rng(3)
    on, off = make_strategy(name, ranks), make_strategy(name, ranks, ["diagnostics=false"])
    replies = [message(n, *valid_reply(on, n, rng)) for n in sorted(on.nodes.values(), key=lambda n: n.partition_id)]
    a, b = on.aggregate_round(1, replies), off.aggregate_round(1, replies)
    reports = name != "flora"  # FLoRA's stacking is exact: it reports no cross-term error
    assert ("cross_term_error" in a.metrics) == reports and "cross_term_error" not in b.metrics
    assert {k: v for k, v in a.metrics.items() if k != "cross_term_error"} == b.metrics
    assert all(torch.equal(x, snapshot(off)[k]) for k, x in snapshot(on).items())


def test_diagnostics_is_a_server_setting_that_defaults_to_true():
    from fedlora import config
    from test_fuzz import make_strategy

    assert make_strategy("fedit", [4, 4, 4, 4]).diagnostics is True
    cfg = config.load(["diagnostics=false"])
    assert cfg.diagnostics is False and "diagnostics" not in config.for_clients(cfg)


def test_the_run_log_says_when_the_cross_term_error_will_be_costly():
    """diagnostics_note: one sentence naming the clients, the multiply-adds and the fix when a round's
    cross_term_error will take at least DIAGNOSTICS_NOTE_MACS (here 100 clients of rank 16 on 64 Llama-7B-shaped
    modules: (1616^2 + 1600^2)(m + n) a module, the Gram path; the dense path below DENSE_LIMIT), else None: small
    modules, diagnostics=false, or a strategy that reports no cross-term error (FLoRA)."""
    from test_fuzz import make_strategy

    from fedlora import diagnostics

    llama = {f"layers.{i}.q_proj": (4096, 4096) for i in range(64)}
    assert diagnostics.cross_term_cost(llama, [16] * 100, 16) == 64 * (1616**2 + 1600**2) * 8192
    assert diagnostics.cross_term_cost({"q": (64, 64)}, [4, 8], 8) == 20 * 64 * 64
    many = ["num_clients=100", "client_ranks=16"]
    s = make_strategy("fedit", [4, 4, 4, 4], many)
    assert s.diagnostics_note(100) is None  # the test's small modules
    s.shapes = llama
    note = s.diagnostics_note(100)
    assert note.startswith("diagnostics=true: each round's cross_term_error reads every pair of the 100 clients' "
                           "factors, about 2.7e+12 multiply-adds") and note.endswith("set diagnostics=false to skip it.")
    assert s.diagnostics_note(2) is None  # 2 clients: cheap
    for name, extra in (("fedit", ["diagnostics=false"]), ("flora", [])):
        other = make_strategy(name, [4, 4, 4, 4], many + extra)
        other.shapes = llama
        assert other.diagnostics_note(100) is None, name
