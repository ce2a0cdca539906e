"""Server-side optimisers (``server.optimizer``, :mod:`fedlora.server_opt`): the update rules against steps computed by
hand (numpy, float64), ``avg`` the identity on the aggregate, a tiny run whose served adapter after each round is
recomputed from the audit files, ``avg`` bit-identical to a config without the section, an exact resume (moments
checkpointed), and the refusals (one sentence naming the fix, before anything starts)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from harness import InProcessGrid, Killed, KillingGrid
from test_resume import rows_of, same_adapter, strip

from fedlora import adapters, algebra, checkpoint, config, server_opt
from fedlora.adapters import AdapterState, LoraFactors
from fedlora.server_opt import ServerOptConfig, ServerOptimizer
from fedlora.strategies.server_app import run_server

TINY = ["model=tiny_llama", "num_clients=3", "num_rounds=2", "local_steps=1", "train.batch_size=4",
        "eval.max_examples=8", "train.max_length=32"]


# ------------------------------------------------------------------------------------------------ pure maths
def reference(name, deltas, eta, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """The served value's changes over successive rounds t = 1, 2, ... (x_t − x_{t−1}) by the papers' formulas as
    Flower 1.42 writes them, spelled out element by element in numpy float64."""
    out, m, v = [], np.zeros_like(deltas[0]), np.zeros_like(deltas[0])
    for t, d in enumerate(deltas, start=1):
        if name == "avgm":  # Flower's FedAvgM: momentum_vector = pg first, then momentum * mv + pg (pg = -d)
            v = d if t == 1 else momentum * v + d
            out.append(eta * v)
            continue
        m = (b1 * m + (1 - b1) * d) if name != "adagrad" else d
        if name == "adam":
            v = b2 * v + (1 - b2) * d * d
            out.append(eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) * m / (np.sqrt(v) + tau))
        elif name == "yogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
            out.append(eta * m / (np.sqrt(v) + tau))
        else:
            v = v + d * d
            out.append(eta * m / (np.sqrt(v) + tau))
    return out


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi", "adagrad"])
def test_step_matches_hand_computed_three_rounds(name):
    g = np.random.default_rng(3)
    deltas = [g.normal(0, s, (4, 5)) for s in (1e-2, 3e-3, 2e-2)]
    deltas[1][0, 0] = 0.0  # a coordinate that does not move this round
    cfg = ServerOptConfig(optimizer=name, lr=0.05 if name != "avgm" else 0.7, momentum=0.8, beta1=0.85, beta2=0.95,
                          tau=2e-3)
    want = reference(name, deltas, cfg.eta, momentum=0.8, b1=0.85, b2=0.95, tau=2e-3)
    state = {}
    for t, (d, w) in enumerate(zip(deltas, want), start=1):
        before = {k: v.clone() for k, v in state.items()}
        upd, state = server_opt.step(state, torch.from_numpy(d), cfg, t)
        assert upd.dtype == torch.float64
        np.testing.assert_allclose(upd.numpy(), w, rtol=1e-12, atol=1e-15)
        assert all(torch.equal(before[k], v) for k, v in before.items())  # pure: the old state is not modified


def test_defaults_are_flowers():
    cfg = server_opt.config_of(config.load(["server.optimizer=adam"]))
    assert (cfg.eta, cfg.beta1, cfg.beta2, cfg.tau) == (0.1, 0.9, 0.99, 1e-3)  # flwr FedAdam's eta, beta_1, beta_2, tau
    assert server_opt.config_of(config.load(["server.optimizer=yogi"])).eta == 0.01  # FedYogi's eta
    assert server_opt.config_of(config.load(["server.optimizer=adagrad"])).eta == 0.1
    assert server_opt.config_of(config.load(["server.optimizer=avgm", "server.lr=0.5"])).eta == 0.5
    assert server_opt.config_of(config.load([])) == ServerOptConfig()  # avg
    assert server_opt.config_of({}) == ServerOptConfig()  # a config saved before the section existed


def state(seed, head=True):
    g = torch.Generator().manual_seed(seed)
    lora = {m: LoraFactors(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), 2.0) for m in ("q", "v")}
    return AdapterState(lora, {"head.weight": torch.randn(3, 6, generator=g)} if head else {})


def test_avg_is_the_identity_on_the_aggregate():
    old, new = state(0), state(1)
    opt = ServerOptimizer(ServerOptConfig("avg", lr=0.3))
    assert opt.apply(old, new, ("lora_A", "lora_B", "extra"), 1) is new
    d = torch.randn(3, 3)
    upd, st = server_opt.step({}, d, ServerOptConfig("avg"), 1)
    assert upd is d and st == {}
    assert opt.state_dict()["moments"] == {}


def test_apply_steps_only_what_was_averaged_and_keeps_each_tensors_moments():
    """RoLoRA-style alternation: a B round moves B and the head only; A keeps the moments of its last own round."""
    cfg = ServerOptConfig("adam", lr=0.1)
    opt = ServerOptimizer(cfg)
    s0 = state(0)
    agg1 = AdapterState({n: LoraFactors(f.A, f.B + 0.01, f.scale) for n, f in s0.lora.items()},
                        {k: v - 0.02 for k, v in s0.extra.items()})
    s1 = opt.apply(s0, agg1, ("lora_B", "extra"), 1)
    for n, f in s1.lora.items():
        assert f.A is agg1.lora[n].A  # not averaged this round: untouched
        want = reference("adam", [np.full((6, 2), 0.01)], 0.1)[0] + s0.lora[n].B.double().numpy()
        np.testing.assert_allclose(f.B.double().numpy(), want, rtol=1e-6)
        assert f.B.dtype == torch.float32 and f.scale == 2.0
    assert set(opt.moments) == {"q.lora_B", "v.lora_B", "extra.head.weight"}
    b_moments = {k: dict(v) for k, v in opt.moments.items()}
    agg2 = AdapterState({n: LoraFactors(f.A - 0.03, f.B, f.scale) for n, f in s1.lora.items()}, dict(s1.extra))
    s2 = opt.apply(s1, agg2, ("lora_A", "extra"), 2)
    for n, f in s2.lora.items():
        assert f.B is agg2.lora[n].B
    assert all(torch.equal(opt.moments[k]["m"], b_moments[k]["m"]) for k in ("q.lora_B", "v.lora_B"))
    with pytest.raises(ValueError, match="same tensors"):
        opt.apply(s0, state(1, head=False), ("lora_B", "extra"), 3)


def test_checkpoint_round_trip_and_refusal_of_another_optimizer(tmp_path):
    opt = ServerOptimizer(ServerOptConfig("yogi"))
    opt.apply(state(0), state(1), ("lora_A", "lora_B", "extra"), 1)
    checkpoint.save(tmp_path, {"round": 1, "strategy": {"server_opt": opt.state_dict()}})
    back = ServerOptimizer(ServerOptConfig("yogi"))
    back.load_state_dict(checkpoint.load(tmp_path)["strategy"]["server_opt"])
    assert back.steps == 1 and set(back.moments) == set(opt.moments)
    assert all(torch.equal(back.moments[k][x], opt.moments[k][x]) for k in opt.moments for x in ("m", "v"))
    with pytest.raises(config.ConfigError, match="server.optimizer=yogi but this run has server.optimizer=adam"):
        ServerOptimizer(ServerOptConfig("adam")).load_state_dict(opt.state_dict())


def test_fedexp_step_size_is_the_papers():
    """Equal weights: Σ_i‖Δ_i‖² / (2M(‖Δ̄‖² + ε)) (FedExP, Algorithm 1), never below 1; example weights count a client
    as that many equal ones; clients that agree get the plain average (η 1)."""
    g = np.random.default_rng(5)
    deltas = [g.normal(0, 0.1, 40) for _ in range(4)]
    mean = np.mean(deltas, axis=0)
    want = sum(d @ d for d in deltas) / (2 * 4 * (mean @ mean + 1e-3))
    assert want > 1.5
    got = server_opt.fedexp_lr([d @ d for d in deltas], [7.0] * 4, mean @ mean, 1e-3)
    assert got == pytest.approx(want, rel=1e-12)
    dup = deltas + [deltas[0]]  # client 0 twice ≡ client 0 with weight 2
    mean2 = np.mean(dup, axis=0)
    assert server_opt.fedexp_lr([d @ d for d in deltas], [2, 1, 1, 1], mean2 @ mean2, 1e-3) == pytest.approx(
        sum(d @ d for d in dup) / (2 * 5 * (mean2 @ mean2 + 1e-3)), rel=1e-12)
    same = deltas[0] @ deltas[0]
    assert server_opt.fedexp_lr([same] * 3, [1, 2, 3], same, 0.0) == 1.0  # ratio 1/2: the average itself
    with pytest.raises(ValueError, match="at least one client"):
        server_opt.fedexp_lr([], [], 0.0, 1e-3)


def test_fedexp_apply_extrapolates_the_average_by_its_step_size():
    old = state(0)
    g = torch.Generator().manual_seed(9)
    noisy = lambda t: t + 0.05 * torch.randn(t.shape, generator=g)  # noqa: E731
    clients = [AdapterState({n: LoraFactors(noisy(f.A), noisy(f.B), f.scale) for n, f in old.lora.items()},
                            {k: noisy(v) for k, v in old.extra.items()}) for _ in range(3)]
    weights = [10.0, 20.0, 30.0]
    new = algebra.fedit(clients, weights)
    parts = ("lora_A", "lora_B", "extra")
    opt = ServerOptimizer(ServerOptConfig("fedexp"))
    assert opt.round_metrics() == {}
    served = opt.apply(old, new, parts, 1, list(zip(clients, weights)))
    x = {k: v.double().numpy() for k, v in server_opt.keys_of(old, parts).items()}
    flat = lambda s: np.concatenate([server_opt.keys_of(s, parts)[k].double().numpy().ravel() - x[k].ravel()  # noqa
                                     for k in x])
    dbar = flat(new)
    eta = max(1.0, sum(w / 60 * (flat(c) @ flat(c)) for c, w in zip(clients, weights)) / (2 * (dbar @ dbar + 1e-3)))
    assert eta > 1.2 and opt.round_metrics() == {"server_lr": pytest.approx(eta, rel=1e-9)}
    np.testing.assert_allclose(flat(served), eta * dbar, rtol=1e-5, atol=1e-7)
    assert opt.state_dict()["moments"] == {}
    with pytest.raises(ValueError, match="needs the round's client updates"):
        opt.apply(old, new, parts, 2)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("strategy", ["flora", "fedex_lora", "lora_fair", "flexlora", "hetlora", "fedsvd"])
def test_unsupported_strategy_is_refused_before_anything_starts(strategy, monkeypatch):
    from fedlora import preflight, strategies

    cfg = config.load(TINY + [f"strategy={strategy}", "server.optimizer=adam"])
    monkeypatch.setattr(preflight, "_check_against_machine_data_model", lambda cfg: pytest.fail("got past the refusal"))
    with pytest.raises(config.ConfigError) as e:
        preflight.check(cfg)  # the strategy's check comes before the data, the model or any run
    msg = str(e.value)
    assert msg.startswith(f"server.optimizer=adam is not defined for strategy {strategy}: ")
    assert msg.endswith("use server.optimizer=avg or strategy fedit, ffa_lora or rolora.")
    assert not re.search(r"\.\s+[A-Z]", msg)  # one sentence
    strategies.get(strategy).check_config(config.load(TINY + [f"strategy={strategy}"]))  # avg: as before


@pytest.mark.parametrize("override, says", [
    ("server.optimizer=sgd", "choose one of avg, avgm, adam, yogi, adagrad"),
    ("server.lr=0", "must be a number > 0"),
    ("server.lr=abc", "must be a number > 0"),
    ("server.momentum=1.0", "in [0, 1)"),
    ("server.beta1=-0.5", "in [0, 1)"),
    ("server.beta2=true", "is not a number"),
    ("server.tau=0", "must be a number > 0"),
    ("server.eps=0", "must be a number > 0"),
    ("server.lr=0.5 server.optimizer=fedexp", "is not used by server.optimizer=fedexp"),
    ("server.optimizer=fedexp privacy=client_level", "cannot run with privacy=client_level"),
])
def test_bad_server_values_are_one_sentence(override, says):
    with pytest.raises(config.ConfigError) as e:
        config.load(override.split())
    assert says in str(e.value) and str(e.value).startswith(override.split()[0].split("=")[0])


def test_supported_strategies_and_client_level_dp_pass_the_check():
    from fedlora import strategies

    for s in ("fedit", "ffa_lora", "rolora"):
        strategies.get(s).check_config(config.load(TINY + [f"strategy={s}", "server.optimizer=yogi"]))
    # client-level DP: the optimizer post-processes the noised release
    strategies.get("fedit").check_config(config.load(TINY + ["privacy=client_level", "server.optimizer=adam"]))


def test_resume_cannot_change_the_server_optimizer():
    from fedlora import preflight

    saved = config.load(TINY + ["server.optimizer=adam"])
    with pytest.raises(config.ConfigError, match="resume cannot change server.optimizer"):
        preflight.check_resume_changes(saved, config.load(TINY + ["server.optimizer=yogi"]), privacy=False)


# ------------------------------------------------------------------------------------------------ runs
def run(tmp_path, name, overrides, drop=(), grid=None, resume=False):
    cfg = config.load(TINY + overrides)
    for key in drop:  # e.g. a config saved before the key existed
        parent, _, leaf = key.rpartition(".")
        del (cfg[parent] if parent else cfg)[leaf]
    run_server(grid or InProcessGrid(3), cfg, tmp_path / name, echo=lambda *_: None, resume=resume)
    return tmp_path / name


def spy_initial(monkeypatch) -> dict:
    """Swap fedit for a subclass that records the adapter the run starts from (``["initial"]``); ``["cls"]``: fedit."""
    from fedlora import strategies

    started = {"cls": strategies.STRATEGIES["fedit"]}

    class Spy(started["cls"]):
        def __init__(self, cfg, initial, shapes):
            super().__init__(cfg, initial, shapes)
            started["initial"] = self.state

    monkeypatch.setitem(strategies.STRATEGIES, "fedit", Spy)
    return started


def audited(d, r) -> tuple[list[AdapterState], list[float]]:
    """Round ``r``'s audited client adapters of run ``d`` and their example counts, in partition order."""
    from safetensors import safe_open

    states, weights = [], []
    for f in sorted((d / "audit" / f"round_{r:04d}").glob("client_*.safetensors")):
        states.append(adapters.load_file(f))
        with safe_open(str(f), framework="pt") as fh:
            weights.append(float(fh.metadata()["num_examples"]))
    return states, weights


def test_avg_is_bit_identical_to_a_config_without_the_section(tmp_path):
    """Neither ``server`` nor ``train.prox_mu`` (as before they existed) vs the defaults (avg, prox_mu 0)."""
    before = run(tmp_path, "before", [], drop=("server", "train.prox_mu"))
    now = run(tmp_path, "now", ["server.optimizer=avg", "train.prox_mu=0"])
    same_adapter(before, now)
    assert strip(rows_of(before)) == strip(rows_of(now))


def test_adam_run_is_hand_computable_and_resumes_exactly(tmp_path, monkeypatch):
    """fedit with server.optimizer=adam: after each round the served adapter (checkpointed) is x + adam_step(Δ), Δ =
    the example-weighted average of the audited client adapters minus x, with m and v carried over from round 1.
    Killed in round 2 and resumed with fresh clients, the run ends with the same adapter, metrics and moments (the
    moments come back from the checkpoint)."""
    from fedlora import strategies

    started = spy_initial(monkeypatch)
    over = ["server.optimizer=adam", "server.lr=0.01", "audit=true"]
    d = run(tmp_path, "adam", over)
    rounds = {1: checkpoint.read(d / checkpoint.PREV), 2: checkpoint.read(d / checkpoint.NAME)}
    assert [rounds[r]["round"] for r in (1, 2)] == [1, 2]
    parts = ("lora_A", "lora_B", "extra")
    old, m, v = started["initial"], {}, {}
    for r in (1, 2):
        states, weights = audited(d, r)
        assert len(states) == 3
        agg = server_opt.keys_of(algebra.fedit(states, weights), parts)
        got = server_opt.keys_of(rounds[r]["strategy"]["state"], parts)
        x_old = server_opt.keys_of(old, parts)
        assert set(got) == set(agg) == set(x_old) and len(got) > 1
        for k, x in x_old.items():
            x = x.double().numpy()
            dlt = agg[k].double().numpy() - x
            m[k] = 0.9 * m.get(k, 0.0) + 0.1 * dlt
            v[k] = 0.99 * v.get(k, 0.0) + 0.01 * dlt * dlt
            eta = 0.01 * np.sqrt(1 - 0.99 ** (r + 1)) / (1 - 0.9 ** (r + 1))
            want = x + eta * m[k] / (np.sqrt(v[k]) + 1e-3)
            np.testing.assert_allclose(got[k].double().numpy(), want, rtol=1e-5, atol=1e-7, err_msg=f"round {r} {k}")
            if k.endswith("lora_B"):  # the step differs from plain averaging
                assert not np.allclose(got[k].numpy(), agg[k].numpy(), rtol=0, atol=1e-6)
        old = rounds[r]["strategy"]["state"]
    assert [r["round"] for r in rows_of(d)] == [0, 1, 2] and rounds[2]["strategy"]["server_opt"]["steps"] == 2
    # resume after round 1 (audit may be switched on or off on resume; it is kept on here)
    with pytest.raises(Killed):
        run(tmp_path, "cut", over, grid=KillingGrid(3, kill_round=2))
    assert [r["round"] for r in rows_of(tmp_path / "cut")] == [0, 1]
    monkeypatch.setitem(strategies.STRATEGIES, "fedit", started["cls"])
    cut = run(tmp_path, "cut", over, resume=True)
    same_adapter(cut, d)
    assert strip(rows_of(cut)) == strip(rows_of(d))
    a, b = (checkpoint.read(p / checkpoint.NAME)["strategy"]["server_opt"] for p in (cut, d))
    assert a["steps"] == b["steps"] == 2 and set(a["moments"]) == set(b["moments"])
    assert all(torch.equal(a["moments"][k][x], b["moments"][k][x]) for k in a["moments"] for x in ("m", "v"))



def test_fedexp_run_serves_the_extrapolated_average_and_logs_its_step(tmp_path, monkeypatch):
    """fedit with server.optimizer=fedexp: each round the step size is computed from the audited client adapters
    (their squared update norms and example weights, and the squared norm of their weighted average's change), the
    served adapter is x + η·Δ and the metrics line carries η as ``server_lr``. The tiny run's clients agree (spread
    ratio 0.55-0.7, so η would be 1): a spy adds 0.5 to the computed η so that the run's extrapolation is checked."""
    started, calls, real = spy_initial(monkeypatch), [], server_opt.fedexp_lr

    def spy_lr(client_sq, weights, mean_sq, eps):
        calls.append((client_sq, weights, mean_sq, eps))
        return real(client_sq, weights, mean_sq, eps) + 0.5

    monkeypatch.setattr(server_opt, "fedexp_lr", spy_lr)
    d = run(tmp_path, "fedexp", ["server.optimizer=fedexp", "audit=true", "local_steps=2"])
    rounds = {1: checkpoint.read(d / checkpoint.PREV), 2: checkpoint.read(d / checkpoint.NAME)}
    parts, old = ("lora_A", "lora_B", "extra"), started["initial"]
    logged = {r["round"]: r.get("server_lr") for r in rows_of(d)}
    assert len(calls) == 2 and logged[0] is None
    for r in (1, 2):
        states, weights = audited(d, r)
        x = {k: v.double().numpy() for k, v in server_opt.keys_of(old, parts).items()}
        flat = lambda s: np.concatenate([server_opt.keys_of(s, parts)[k].double().numpy().ravel() - x[k].ravel()  # noqa
                                         for k in x])
        dbar = flat(algebra.fedit(states, weights))
        client_sq, w, mean_sq, eps = calls[r - 1]
        np.testing.assert_allclose(client_sq, [flat(s) @ flat(s) for s in states], rtol=1e-9)
        assert list(w) == weights and mean_sq == pytest.approx(dbar @ dbar, rel=1e-5) and eps == 1e-3
        eta = real(client_sq, w, mean_sq, eps) + 0.5
        assert logged[r] == pytest.approx(eta, rel=1e-12)
        np.testing.assert_allclose(flat(rounds[r]["strategy"]["state"]), eta * dbar, rtol=1e-5, atol=1e-7)
        old = rounds[r]["strategy"]["state"]
