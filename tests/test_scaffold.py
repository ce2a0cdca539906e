"""SCAFFOLD (``train.scaffold``, :mod:`fedlora.scaffold`, ``strategies/scaffold.py``, ``clients/scaffold.py``): the
control updates against hand-computed values; the correction step (none when c = c_i; exactly −lr·(c − c_i) after the
step, after clipping, and after DP-SGD's clipping and noise); off is bit-identical to a config without the key; a tiny
fedit run whose c_i⁺, Δc_i and c are recomputed from the messages; resume continues the same c; refusals."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from harness import InProcessGrid, Killed, KillingGrid
from test_resume import rows_of, same_adapter, strip
from test_train_loops import BATCH, collate, rows, tiny_bert, trained

from fedlora import adapters, checkpoint, config, scaffold, strategies, train
from fedlora import privacy as P
from fedlora.strategies.server_app import run_server

T = torch.tensor


# ------------------------------------------------------------------ pure maths
def test_client_and_server_control_against_hand_computed_values():
    c, c_i = {"w": T([1.0, -2.0])}, {"w": T([0.5, 0.5])}
    x, y = {"w": T([3.0, 3.0])}, {"w": T([2.0, 4.0])}
    new, delta = scaffold.client_control(c, c_i, x, y, steps=4, lr=0.25)  # K·η = 1
    # c_i − c + (x − y)/1 = [0.5 − 1 + 1, 0.5 + 2 − 1] = [0.5, 1.5]; Δ = [0, 1]
    assert torch.equal(new["w"], T([0.5, 1.5])) and torch.equal(delta["w"], T([0.0, 1.0]))
    new, delta = scaffold.client_control({}, {}, x, y, steps=2, lr=0.5)  # round 1: c = c_i = 0
    assert torch.equal(new["w"], T([1.0, -1.0])) and torch.equal(delta["w"], new["w"])
    assert new["w"].dtype == torch.float32
    # c + (|S|/N)·mean Δ = c + Σ Δ / N: two of N = 4 clients
    got = scaffold.server_control({"w": T([1.0, 1.0])}, [{"w": T([2.0, 0.0])}, {"w": T([2.0, 4.0])}], 4)
    assert torch.equal(got["w"], T([2.0, 2.0]))
    got = scaffold.server_control({}, [{"v": T([3.0])}], 3)  # a key first seen starts at 0; none kept as is
    assert torch.equal(got["v"], T([1.0]))
    assert scaffold.server_control({"w": T([5.0])}, [], 3) == {"w": T([5.0])}
    # K·η = the sum of the round's scheduled lrs: cosine over 4 steps, round 2 of 2 (steps 2, 3)
    want = sum(0.1 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in (2, 3))
    assert abs(scaffold.lr_sum(2, 2, 4, 0.1, "cosine") - want) < 1e-15
    assert scaffold.lr_sum(0, 3, 9, 0.1, "constant") == pytest.approx(0.3, abs=1e-15)
    with pytest.raises(ValueError):
        scaffold.client_control({}, {}, x, y, steps=0, lr=0.1)


# ------------------------------------------------------------------ the correction step
def _keys(model):
    return adapters.to_arrays(adapters.from_peft(model))


def _local(control_of=None, steps=1):
    """One SGD round on a tiny BERT: the trainable tensors (by flat key) after it; ``control_of(model, params)``
    gives the corrections."""
    model = tiny_bert()
    params = scaffold.params_of(model, _keys(model))
    sgd = lambda ps, lr, wd: torch.optim.SGD(ps, lr=lr)  # noqa: E731
    train.local_train(model, rows(), collate, steps=steps, batch_size=BATCH, lr=0.05, step_offset=0,
                      total_steps=steps, scheduler="constant", max_grad_norm=1.0, seed=1, round_idx=1, task="seq-cls",
                      optimizer_fn=sgd, control=control_of(model, params) if control_of else None)
    return {k: p.detach().clone() for k, p in params.items()}


def _diff(model, scale=1.0):
    """c and c_i over every trainable tensor (LoRA A, B and the head), with c − c_i = scale·(fixed random)."""
    g, h = torch.Generator().manual_seed(5), torch.Generator().manual_seed(7)
    c = {k: torch.randn(v.shape, generator=g) for k, v in _keys(model).items()}
    return c, {k: v - scale * torch.randn(v.shape, generator=h) for k, v in c.items()}


def test_equal_controls_give_no_correction_and_the_step_is_exact():
    """c = c_i (every client in round 1): no correction, bit for bit; c ≠ c_i with SGD: the step after clipping is
    exactly w − lr·(clipped g) − lr·(c − c_i), i.e. the paper's g + (c − c_i) for the data gradient as clipped."""
    model = tiny_bert()
    c, c_i = _diff(model)
    params = scaffold.params_of(model, c)
    assert any(k.startswith("extra.") for k in params) and len(params) == len(c) > 2  # the head is covered
    assert scaffold.corrections(params, c, {k: v.clone() for k, v in c.items()}) == []
    plain = _local(lambda m, ps: scaffold.corrections(ps, c, dict(c)))  # [] is "off": local_train's own path
    corrected = _local(lambda m, ps: scaffold.corrections(ps, c, c_i))
    for k in plain:
        torch.testing.assert_close(corrected[k], plain[k] - 0.05 * (c[k] - c_i[k]), rtol=1e-5, atol=1e-6, msg=k)
    for p in params.values():  # frozen parameters get no correction
        p.requires_grad_(False)
    assert scaffold.corrections(params, c, {k: 0 * v for k, v in c.items()}) == []


def test_dp_sgd_applies_the_correction_after_clipping_and_noise():
    """One seeded DP-SGD step (SGD): the corrected run ends exactly lr·(c − c_i) from the plain one, whose clipped and
    noised step is the same: the correction went through neither the per-example clipping nor the noise."""

    def dp(with_control):
        model = tiny_bert()
        c, c_i = _diff(model, scale=0.3)
        ps = scaffold.params_of(model, c)
        control = scaffold.corrections(ps, c, c_i) if with_control else None
        train.local_train_dp(model, rows(), collate, dp_cfg=P.DPConfig(noise_multiplier=0.7, max_grad_norm=0.5),
                             noise_multiplier=0.7, accountant_state=None, steps=1, batch_size=BATCH, lr=0.05,
                             step_offset=0, total_steps=1, scheduler="constant", task="seq-cls", rng_seed=(4, 2),
                             optimizer="sgd", momentum=0.0, control=control)
        return {k: p.detach().clone() for k, p in ps.items()}, {k: c[k] - c_i[k] for k in c}

    plain, d = dp(False)
    corrected, _ = dp(True)
    for k in plain:
        torch.testing.assert_close(corrected[k], plain[k] - 0.05 * d[k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------ runs
FAST = ["model=tiny_llama", "num_clients=3", "local_steps=1", "train.batch_size=4", "eval.max_examples=8",
        "train.max_length=32", "num_rounds=2"]


class Recording(InProcessGrid):
    """Keeps every train round's (messages, replies) and, per node, c_i after each round."""

    def __init__(self, n, contexts=None):
        super().__init__(n)
        if contexts is not None:
            self.contexts = contexts
        self.rounds, self.held = [], []

    def send_and_receive(self, messages, timeout=None):
        out = super().send_and_receive(messages, timeout)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.rounds.append((list(messages), list(out)))
            self.held.append({self.partition_of(n): {k: a.numpy().copy() for k, a in
                                                       ctx.state[scaffold.NODE_STATE].items()}
                              for n, ctx in self.contexts.items() if scaffold.NODE_STATE in ctx.state})
        return out


def _run(tmp_path, name, extra=(), grid=None, resume=False, drop=None):
    cfg = config.load(FAST + list(extra))
    if drop:
        del cfg.train[drop]
    grid = grid or Recording(3)
    run_server(grid, cfg, tmp_path / name, echo=lambda *_: None, resume=resume)
    return tmp_path / name, grid


@pytest.fixture(scope="module")
def scaffold_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaffold")
    seen = []
    real = train.local_train

    def spy(*a, **k):
        seen.append(len(k.get("control") or []))
        return real(*a, **k)

    train.local_train = spy
    try:
        d, grid = _run(tmp, "full", ["train.scaffold=true"])
    finally:
        train.local_train = real
    return tmp, d, grid, seen


def _arrays(record):
    return {k: a.numpy().astype(np.float64) for k, a in record.items()}


def test_run_control_variates_recomputed_from_the_messages(scaffold_run):
    """Round r: each reply's Δc_i = c_i⁺ − c_i with c_i⁺ = c_i − c + (x − y)/Σlr (x: the arrays sent, y: the arrays
    returned, Σlr: the round's cosine lrs), the node keeps c_i⁺, and the server's c (sent in round r + 1; at the end
    in its checkpoint) is c + Σ Δc_i / 3. Round 1 trains uncorrected (c = c_i = 0), round 2 corrected."""
    _, d, grid, seen = scaffold_run
    assert seen[:3] == [0, 0, 0] and all(n > 0 for n in seen[3:]) and len(seen) == 6
    cfg = config.load(FAST)
    lr = float(cfg.train.lr)
    lr_sums = {1: lr, 2: lr * 0.5 * (1 + math.cos(math.pi / 2))}  # cosine over 2 steps, 1 step a round
    c = None
    c_i = {p: {} for p in range(3)}
    for r, (msgs, replies) in enumerate(grid.rounds, start=1):
        sent_c = [_arrays(m.content[scaffold.RECORD]) for m in msgs]
        if c is None:
            c = {k: np.zeros_like(v) for k, v in sent_c[0].items()}
            assert set(c) == set(_arrays(msgs[0].content["arrays"]))  # fedit: A and B of every module
        for got in sent_c:  # the server's c after the previous round (0 in round 1)
            assert set(got) == set(c)
            for k in c:
                np.testing.assert_allclose(got[k], c[k], rtol=1e-6, atol=1e-7, err_msg=f"round {r} c {k}")
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        deltas = []
        for rep in replies:
            pid = grid.partition_of(rep.metadata.src_node_id)
            x = _arrays(by_node[rep.metadata.src_node_id].content["arrays"])
            y = _arrays(rep.content["arrays"])
            new = {k: c_i[pid].get(k, 0.0) - c[k] + (x[k] - y[k]) / lr_sums[r] for k in c}
            delta = {k: new[k] - c_i[pid].get(k, 0.0) for k in c}
            got = _arrays(rep.content[scaffold.RECORD])
            for k in c:
                scale = max(1.0, float(np.abs(new[k]).max()))
                np.testing.assert_allclose(got[k], delta[k], rtol=0, atol=2e-5 * scale, err_msg=f"round {r} Δc {k}")
                np.testing.assert_allclose(grid.held[r - 1][pid][k], new[k], rtol=0, atol=2e-5 * scale)
            c_i[pid] = new
            deltas.append(got)
        assert len(deltas) == 3
        c = {k: c[k] + sum(dl[k] for dl in deltas) / 3 for k in c}
    final = checkpoint.read(d / checkpoint.NAME)["strategy"]["scaffold"]
    assert final["active"] and set(final["c"]) == set(c)
    for k in c:
        np.testing.assert_allclose(final["c"][k].double().numpy(), c[k], rtol=1e-6, atol=1e-7)
    # the traffic: c down and Δc_i up double the averaged tensors' bytes
    from fedlora.strategies.base import record_bytes

    for row, (msgs, replies) in zip(rows_of(d)[1:], grid.rounds):
        for part, key in ((replies, "bytes_up"), (msgs, "bytes_down")):
            plain = [record_bytes(m.content["arrays"]) for m in part]
            assert [record_bytes(m.content[scaffold.RECORD]) for m in part] == plain  # same keys and shapes
            assert row[key] == 2 * sum(plain)


def test_off_is_bit_identical_to_a_config_without_the_key(tmp_path):
    before, _ = _run(tmp_path, "before", ["num_rounds=1", "num_clients=2"], drop="scaffold", grid=Recording(2))
    now, grid = _run(tmp_path, "now", ["num_rounds=1", "num_clients=2", "train.scaffold=false"], grid=Recording(2))
    same_adapter(before, now)
    assert strip(rows_of(before)) == strip(rows_of(now))
    msgs, replies = grid.rounds[0]
    assert all(scaffold.RECORD not in m.content for m in msgs + replies)
    assert not grid.held[0]  # no node keeps a c_i


def test_resume_after_round_one_continues_the_same_c(tmp_path, scaffold_run):
    """Killed in round 2 and resumed: the round-2 messages carry the checkpointed c; with the nodes' c_i kept (same
    node contexts) the run ends exactly as the uninterrupted one."""
    _, full, full_grid, _ = scaffold_run
    killer = KillingGrid(3, kill_round=2)
    with pytest.raises(Killed):
        _run(tmp_path, "cut", ["train.scaffold=true"], grid=killer)
    c1 = checkpoint.read(tmp_path / "cut" / checkpoint.NAME)["strategy"]["scaffold"]["c"]
    assert c1 and any(bool(v.any()) for v in c1.values())
    again = Recording(3, contexts=killer.contexts)
    cut, _ = _run(tmp_path, "cut", ["train.scaffold=true"], grid=again, resume=True)
    for m in again.rounds[0][0]:
        got = {k: torch.from_numpy(a.numpy()) for k, a in m.content[scaffold.RECORD].items()}
        assert set(got) == set(c1) and all(torch.equal(got[k], c1[k]) for k in c1)
    same_adapter(cut, full)
    assert strip(rows_of(cut)) == strip(rows_of(full))
    a, b = (checkpoint.read(p / checkpoint.NAME)["strategy"]["scaffold"]["c"] for p in (cut, full))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ refusals
def _one_sentence(text: str) -> bool:
    return not re.search(r"\.\s+[A-Z]", text)


@pytest.mark.parametrize("strategy", ["flora", "fedex_lora", "lora_fair", "flexlora", "hetlora", "fedsvd", "fedpipe",
                                      "fedsa_lora"])
def test_unsupported_strategy_is_refused_in_one_sentence(strategy):
    cfg = config.load(["train.scaffold=true", f"strategy={strategy}"])
    with pytest.raises(config.ConfigError) as e:
        strategies.get(strategy).check_config(cfg)
    text = str(e.value)
    assert "train.scaffold=true is not defined for strategy" in text and "fedit, ffa_lora or rolora" in text
    assert _one_sentence(text)


def test_supported_strategies_pass_and_client_level_dp_and_client_key_are_refused():
    for s in ("fedit", "ffa_lora", "rolora"):
        strategies.get(s).check_config(config.load(["train.scaffold=true", f"strategy={s}"]))
    cfg = config.load(["train.scaffold=true", "privacy=client_level"])
    with pytest.raises(config.ConfigError) as e:
        strategies.get("fedit").check_config(cfg)
    assert "privacy=client_level" in str(e.value) and _one_sentence(str(e.value))
    with pytest.raises(config.ConfigError) as e:
        config.load(["client.scaffold=true"])
    assert "train.scaffold" in str(e.value) and _one_sentence(str(e.value))
    with pytest.raises(config.ConfigError) as e:
        config.load(["train.scaffold=3"])
    assert "train.scaffold" in str(e.value)
