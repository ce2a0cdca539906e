"""Differential privacy through the real ServerApp loop and ClientApp functions (in-process grid, tiny Llama):
DP-SGD clients stop at their budget and the run stops cleanly, every round's metrics carry every client's
epsilon, one accountant per client survives the rounds (through ``context.state``), and survives a node
restart and a server resume through the server's checkpointed copy (which can never lower a client's epsilon),
malformed accountant records are rejected, FFA-LoRA under DP-SGD trains only B; client-level DP through Flower's fixed-clipping wrappers releases exactly the mean of the
clipped updates plus the documented noise; bad combinations exit 2 with one sentence."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, fedlora_cmd
from harness import InProcessGrid, Killed, KillingGrid
from flwr.app import ConfigRecord
from opacus.accountants import RDPAccountant
from tolerances import assert_within, f32_tol, gamma

from fedlora import strategies
import fedlora.strategies.privacy as server_dp
from fedlora import adapters, config, data
from fedlora import privacy as P
from fedlora.strategies.server_app import run_server

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAST = ["model=tiny_llama", "num_clients=3", "local_steps=2", "train.batch_size=4", "eval.max_examples=8",
        "train.max_length=24", "data.max_train_examples=240"]


def run(tmp_path, *overrides, name="run", capture_wrapper=None, grid=None, resume=False):
    cfg = config.load(FAST + list(overrides) + ["privacy.reproducible=true"])
    grid = grid if grid is not None else InProcessGrid(cfg.num_clients)
    captured = {}
    cls = strategies.get(cfg.strategy.name)

    class Spy(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["strategy"] = self
            captured["wrapped"] = self.privacy  # the privacy component the strategy holds

        def aggregate_round(self, *a, **k):
            captured["result"] = super().aggregate_round(*a, **k)
            return captured["result"]

    orig_cls = strategies.STRATEGIES[cfg.strategy.name]
    strategies.STRATEGIES[cfg.strategy.name] = Spy
    try:
        summary = run_server(grid, cfg, tmp_path / name, echo=lambda *_: None, resume=resume)
    finally:
        strategies.STRATEGIES[cfg.strategy.name] = orig_cls
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return cfg, rows, summary, captured, grid


def sample_rate(cfg, pid) -> float:
    return 1.0 / math.ceil(len(data.partition(cfg, pid)) / int(cfg.train.batch_size))


def trained(rows, pid) -> int:
    """Rounds in which partition pid was sampled and its update accepted."""
    return sum(1 for r in rows[1:] if pid in r.get("sampled", []) and
               all(x["node"] != pid for x in r.get("rejected", [])))


# ----------------------------------------------------------------------------------------------
# sample-level DP-SGD
# ----------------------------------------------------------------------------------------------
def test_budget_stops_every_client_at_target_epsilon_and_the_run_cleanly(tmp_path):
    """Noise planned for 2 rounds, 12 rounds asked, 2 of 3 clients sampled per round: every client trains
    exactly 2 rounds, refuses the third with status budget-exhausted (logged, the others go on), ends at
    epsilon <= 1, and the run stops once no client can train."""
    cfg, rows, summary, cap, _ = run(tmp_path, "privacy=dp_sgd", "privacy.target_epsilon=1.0",
                                     "privacy.planned_rounds=2", "num_rounds=12", "fraction_train=0.67",
                                     "min_train_nodes=1")
    assert summary["status"] == "budget-exhausted"
    assert "can still train" in summary["stop_reason"]
    assert summary["epsilon_max"] <= 1.0 + 1e-9
    assert all(0.9 <= e <= 1.0 + 1e-9 for e in summary["epsilon"].values())  # the budget was used, not exceeded
    assert all(trained(rows, p) == 2 for p in range(3))
    refusals = [(r["round"], x["node"]) for r in rows[1:] for x in r.get("rejected", [])]
    assert sorted(p for _, p in refusals) == [0, 1, 2]  # each client refuses once, then is no longer sampled
    assert all("budget-exhausted" in x["reason"] for r in rows[1:] for x in r.get("rejected", []))
    # the round a client refused, another one trained
    assert any(r["num_clients"] >= 1 and r.get("rejected") for r in rows[1:])
    assert cap["strategy"].privacy.exhausted == {0, 1, 2}
    # metrics: every client's epsilon in every round, never decreasing, <= the target
    for p in map(str, range(3)):
        seq = [r["epsilon"][p] for r in rows[1:]]
        assert all(b >= a for a, b in zip(seq, seq[1:])) and seq[-1] <= 1.0 + 1e-9
    assert all(set(r["epsilon"]) == {"0", "1", "2"} for r in rows[1:])


def test_accountant_survives_rounds_through_client_state(tmp_path):
    """Fixed noise, 3 rounds x 2 steps: each round's reported epsilon is that of ONE accountant over all
    steps so far (checked against a plain Opacus RDPAccountant stepped step by step), strictly increasing,
    and the accountant lives in the node's context.state."""
    R, T, sigma = 3, 2, 1.0
    cfg, rows, summary, _, grid = run(tmp_path, "privacy=dp_sgd", "privacy.target_epsilon=null",
                                      f"privacy.noise_multiplier={sigma}", f"num_rounds={R}", f"local_steps={T}")
    assert summary["status"] == "completed"
    delta = float(cfg.privacy.target_delta)
    for pid in range(3):
        q = sample_rate(cfg, pid)
        for rnd in range(1, R + 1):
            acc = RDPAccountant()
            for _ in range(rnd * T):
                acc.step(noise_multiplier=sigma, sample_rate=q)
            assert rows[rnd]["epsilon"][str(pid)] == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
        seq = [r["epsilon"][str(pid)] for r in rows[1:]]
        assert all(b > a for a, b in zip(seq, seq[1:]))  # a per-round engine would report the same value R times
    for nid, ctx in grid.contexts.items():
        state = P.AccountantState.from_json(str(ctx.state["dp-sgd"]["accountant"]))
        pid = int(ctx.node_config["partition-id"])
        assert state.history == ((sigma, sample_rate(cfg, pid), R * T),)
        assert P.epsilon(state, delta) == pytest.approx(summary["epsilon"][str(pid)], rel=1e-12)
    assert summary["epsilon_max"] == max(summary["epsilon"].values())


# -- the server's copy of each client's accountant: node restart, server resume, never lowered ------------------
DP3 = ["privacy=dp_sgd", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", "num_rounds=3"]


def at_round(rnd, before=None, after=None):
    """A grid fault: in train round ``rnd`` call ``before(msg, ctx)`` before the client runs and
    ``after(reply)`` on its reply; other rounds pass through."""
    def fault(msg, ctx, fn):
        if int(msg.content["config"]["server-round"]) != rnd:
            return fn(msg, ctx)
        if before:
            before(msg, ctx)
        rep = fn(msg, ctx)
        if after:
            after(rep)
        return rep
    return fault


def wipe_state(msg, ctx):
    """A node restart: everything in context.state is gone."""
    for k in list(ctx.state.keys()):
        del ctx.state[k]


def one_round_epsilon(cfg, pid) -> float:
    return P.epsilon(P.AccountantState("rdp", ((1.0, sample_rate(cfg, pid), int(cfg.local_steps)),)),
                     float(cfg.privacy.target_delta))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """3 rounds of DP-SGD with fixed noise, every client every round, nothing goes wrong."""
    cfg, rows, summary, cap, grid = run(tmp_path_factory.mktemp("dp_full"), *DP3)
    assert summary["status"] == "completed" and all(r["num_clients"] == 3 and not r["rejected"] for r in rows[1:])
    return cfg, rows, summary, cap, grid


def test_server_keeps_every_clients_accountant_and_sends_it_down(uninterrupted):
    cfg, rows, summary, cap, grid = uninterrupted
    strat = cap["strategy"]
    for nid, ctx in grid.contexts.items():  # the server's copy is the client's own accountant
        pid = int(ctx.node_config["partition-id"])
        assert strat.privacy.accountants[pid] == str(ctx.state["dp-sgd"]["accountant"])
    assert set(strat.state_dict()["privacy"]) >= {"accountants", "epsilon", "exhausted"}
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    r1 = [m for m in sent if m.content["config"]["server-round"] == 1]
    later = [m for m in sent if m.content["config"]["server-round"] > 1]
    assert len(r1) == 3 and all(P.ACCOUNTANT_CONFIG_KEY not in m.content["config"] for m in r1)
    assert len(later) == 6 and all(P.ACCOUNTANT_CONFIG_KEY in m.content["config"] for m in later)


def test_node_restart_restores_the_accountant_from_the_server(tmp_path, uninterrupted, caplog):
    """Partition 0's node loses its context.state after round 2: it continues from the server's copy and ends
    at exactly the uninterrupted run's epsilon, strictly above what one round alone gives."""
    cfg, _, full, _, _ = uninterrupted
    grid = InProcessGrid(3, faults={0: at_round(3, before=wipe_state)})
    with caplog.at_level("INFO", logger="flwr"):
        _, rows, summary, _, _ = run(tmp_path, *DP3, grid=grid)
    assert summary["status"] == "completed" and all(not r["rejected"] for r in rows[1:])
    for p in map(str, range(3)):
        assert summary["epsilon"][p] == pytest.approx(full["epsilon"][p], rel=1e-9)
    assert summary["epsilon"]["0"] > one_round_epsilon(cfg, 0) * (1 + 1e-6)
    assert any("client 0" in r.getMessage() and "restored the server's copy" in r.getMessage() for r in caplog.records)
    ctx = next(c for c in grid.contexts.values() if int(c.node_config["partition-id"]) == 0)
    assert P.AccountantState.from_json(str(ctx.state["dp-sgd"]["accountant"])).steps == 3 * int(cfg.local_steps)


def test_server_resume_with_fresh_nodes_continues_every_accountant(tmp_path, uninterrupted):
    """The server stops during round 3 and resumes from the round-2 checkpoint with fresh nodes (no local
    state at all): every client ends at the uninterrupted run's epsilon, and every row matches."""
    cfg, full_rows, full, _, _ = uninterrupted
    with pytest.raises(Killed):
        run(tmp_path, *DP3, name="cut", grid=KillingGrid(3, kill_round=3))
    fresh = InProcessGrid(3)
    _, rows, summary, cap, _ = run(tmp_path, *DP3, name="cut", grid=fresh, resume=True)
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [0, 1, 2, 3]
    for p in map(str, range(3)):
        assert summary["epsilon"][p] == pytest.approx(full["epsilon"][p], rel=1e-9)
        assert summary["epsilon"][p] > one_round_epsilon(cfg, int(p)) * (1 + 1e-6)
        assert [r["epsilon"][p] for r in rows[1:]] == pytest.approx([r["epsilon"][p] for r in full_rows[1:]], rel=1e-9)
    sent = [m for m in fresh.sent if m.metadata.message_type == "train"]
    assert len(sent) == 3 and all(P.ACCOUNTANT_CONFIG_KEY in m.content["config"] for m in sent)


def test_a_short_empty_or_garbled_server_copy_never_lowers_a_clients_epsilon(tmp_path, uninterrupted):
    """In round 3 the server's copy is replaced by a one-round history (partition 0), an empty accountant
    (partition 1) and garbage (partition 2): every client keeps its longer local accountant."""
    cfg, _, full, _, _ = uninterrupted

    def send(copy):
        def before(msg, ctx):
            msg.content["config"][P.ACCOUNTANT_CONFIG_KEY] = copy
        return at_round(3, before=before)

    short = P.AccountantState("rdp", ((1.0, sample_rate(cfg, 0), int(cfg.local_steps)),)).to_json()
    grid = InProcessGrid(3, faults={0: send(short), 1: send(P.AccountantState("rdp").to_json()), 2: send("{not json")})
    _, rows, summary, _, _ = run(tmp_path, *DP3, grid=grid)
    assert summary["status"] == "completed" and all(not r["rejected"] for r in rows[1:])
    for p in map(str, range(3)):
        assert summary["epsilon"][p] == pytest.approx(full["epsilon"][p], rel=1e-9)


def test_restore_rule_takes_whichever_copy_has_spent_more():
    q, d = 0.05, 1e-5
    one, two = P.AccountantState("rdp", ((1.0, q, 2),)), P.AccountantState("rdp", ((1.0, q, 4),))
    noisier = P.AccountantState("rdp", ((5.0, q, 8),))  # more steps, far less epsilon than `two`
    assert P.restore_accountant(two.to_json(), one.to_json(), "rdp", d)[:2] == (two, "local")
    assert P.restore_accountant(one.to_json(), two.to_json(), "rdp", d)[:2] == (two, "server")
    assert P.restore_accountant(two.to_json(), noisier.to_json(), "rdp", d)[:2] == (two, "local")
    assert P.restore_accountant(two.to_json(), two.to_json(), "rdp", d)[:2] == (two, "local")
    assert P.restore_accountant(None, one.to_json(), "rdp", d)[:2] == (one, "server")
    assert P.restore_accountant(None, None, "rdp", d)[:2] == (P.AccountantState("rdp"), "new")
    state, source, problem = P.restore_accountant(one.to_json(), "[1, 2]", "rdp", d)
    assert (state, source) == (one, "local") and "unusable" in problem
    state, source, problem = P.restore_accountant(one.to_json(), P.AccountantState("prv").to_json(), "rdp", d)
    assert (state, source) == (one, "local") and "prv" in problem
    with pytest.raises(ValueError, match="refusing to train rather than restart epsilon from zero"):
        P.restore_accountant(None, "{garbage", "rdp", d)


def test_malformed_accountant_records_are_invalid_replies(tmp_path):
    """Round 1: partition 0's accountant is garbage, partition 1's record is missing; round 2: partition 0
    reports an epsilon its accountant does not give; round 3: partition 2 restarts AND the server's copy is
    withheld, so it starts from zero: its accountant went backwards. Each is rejected with its reason and the
    server's copy is never replaced by a rejected one."""
    def garble(rep):
        rep.content["dp-sgd"] = ConfigRecord({"accountant": "{not json"})

    def drop(rep):
        del rep.content["dp-sgd"]

    def lie(rep):
        rep.content["metrics"]["epsilon"] = float(rep.content["metrics"]["epsilon"]) * 0.5

    def restart_without_copy(msg, ctx):  # (the node then asks for the run config: the resent message comes here too)
        wipe_state(msg, ctx)
        if P.ACCOUNTANT_CONFIG_KEY in msg.content["config"]:
            del msg.content["config"][P.ACCOUNTANT_CONFIG_KEY]

    def partition0(msg, ctx, fn):
        rep = fn(msg, ctx)
        {1: garble, 2: lie}.get(int(msg.content["config"]["server-round"]), lambda _: None)(rep)
        return rep

    faults = {0: partition0, 1: at_round(1, after=drop), 2: at_round(3, before=restart_without_copy)}
    _, rows, summary, cap, _ = run(tmp_path, *DP3, "min_train_nodes=1", grid=InProcessGrid(3, faults=faults))
    rejected = {r["round"]: {x["node"]: x["reason"] for x in r["rejected"]} for r in rows[1:]}
    assert set(rejected[1]) == {0, 1} and set(rejected[2]) == {0} and set(rejected[3]) == {2}
    assert rejected[1][0].startswith("invalid DP-SGD accountant record: the accountant does not parse")
    assert rejected[1][1] == "invalid DP-SGD reply: no 'dp-sgd' ConfigRecord with the client's accountant"
    assert "but the reply reports epsilon" in rejected[2][0]
    assert "went backwards" in rejected[3][2]
    strat = cap["strategy"]
    assert P.AccountantState.from_json(strat.privacy.accountants[2]).steps == 2 * 2  # kept the round-2 copy
    assert summary["epsilon"]["2"] == pytest.approx(rows[2]["epsilon"]["2"], rel=1e-12)


def test_ffa_lora_under_dp_sgd_trains_and_noises_only_b(tmp_path, monkeypatch):
    seen = []
    orig = P.make_private

    def spy(model, *a, **k):
        out = orig(model, *a, **k)
        seen.append(list(out[3].trainable))
        return out

    monkeypatch.setattr(P, "make_private", spy)
    cfg, rows, summary, cap, _ = run(tmp_path, "strategy=ffa_lora", "privacy=dp_sgd", "privacy.target_epsilon=3.0",
                                     "num_rounds=2")
    assert summary["status"] == "completed" and all(r["num_clients"] == 3 and not r["rejected"] for r in rows[1:])
    assert len(seen) == 6 and all(names and all(".lora_B." in n for n in names) for names in seen)
    # A never moved: the global A is still the seeded one (clients' fingerprints were checked every round)
    strat = cap["strategy"]
    for name, f in strat.state.lora.items():
        assert torch.equal(f.A, adapters.seeded_A(strat.a_seed, name, f.rank, f.A.shape[1]))
        assert float(f.B.abs().sum()) > 0


# ----------------------------------------------------------------------------------------------
# client-level DP (Flower's wrappers)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, clipping", [("ffa_lora", "server"), ("fedit", "client")])
def test_client_level_release_is_mean_of_clipped_updates_plus_flowers_noise(tmp_path, strategy, clipping):
    C = 0.05
    cfg, rows, summary, cap, _ = run(tmp_path, f"strategy={strategy}", "privacy=client_level",
                                     f"privacy.clipping={clipping}", f"privacy.clipping_norm={C}",
                                     "privacy.target_epsilon=2.0", "num_rounds=2", "audit=false")
    w = cap["wrapped"]
    assert isinstance(w, server_dp.ClientLevelDP) and w.clipping == clipping
    assert summary["status"] == "completed" and summary["epsilon_max"] <= 2.0 + 1e-9
    # one accountant, two no-amplification releases
    acc = RDPAccountant()
    acc.history = [(w.noise_multiplier, 1.0, 2)]
    assert summary["epsilon_max"] == pytest.approx(acc.get_epsilon(float(cfg.privacy.target_delta)), rel=1e-9)
    assert [r["releases"] for r in rows[1:]] == [1, 2]
    # the last round: start point, clipped client arrays, released global arrays
    start = {k: a.numpy() for k, a in w.current.items()}
    inner = cap["strategy"]
    clients = [adapters.to_arrays(s, parts=inner.client_sends) for _, s, _ in cap["result"].client_states]
    assert len(clients) == 3
    # Flower clips in float32: one BLAS dot per array for the norm (any order: gamma_n, n its size), a float32
    # scale, start + update rounded once (<= u |c|); tests/tolerances.py
    n_max = max(a.size for a in start.values())
    for c in clients:
        norm = math.sqrt(sum(float(np.sum((c[k].astype(np.float64) - start[k]) ** 2)) for k in start))
        c_norm = math.sqrt(sum(float(np.sum(c[k].astype(np.float64) ** 2)) for k in start))
        assert norm <= C * (1 + gamma(n_max + 8)) + gamma(1) * c_norm
    ss = np.random.SeedSequence([int(cfg.seed), 2])
    np.random.seed(ss.generate_state(4))
    std = w.noise_multiplier * C / 3
    released = adapters.to_arrays(inner.state, parts=inner.client_sends)
    for k in start:  # Flower's add_gaussian_noise_inplace: one normal draw per array, in record order
        noise = np.random.normal(0, std, start[k].shape).astype(np.float32)
        expect = np.mean([c[k] for c in clients], axis=0) + noise
        # two float32 means of the same arrays (<= 3 roundings per client: weight, product, add) + the noise
        mag = np.mean([np.abs(c[k]).astype(np.float64) for c in clients], axis=0) + np.abs(noise)
        assert_within(released[k], expect, f32_tol(3 * len(clients) + 1, mag), k)


def test_client_level_budget_stops_the_run(tmp_path):
    _, rows, summary, _, _ = run(tmp_path, "strategy=fedit", "privacy=client_level", "privacy.target_epsilon=2.0",
                                 "privacy.planned_rounds=2", "num_rounds=4")
    assert summary["status"] == "budget-exhausted" and "max_epsilon" in summary["stop_reason"]
    assert len(rows) == 3 and summary["epsilon_max"] <= 2.0 + 1e-9


# ----------------------------------------------------------------------------------------------
# refused combinations
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, fragment", [
    (["privacy=client_level", "strategy=flora"], "flora stacks each client's individual factors"),
    (["privacy=client_level", "strategy=lora_fair"], "lora_fair's server-side correction"),
    (["privacy=client_level", "strategy=flexlora"], "flexlora forms and decomposes"),
    (["privacy=client_level", "strategy=hetlora"], "different ranks"),
    (["privacy=client_level", "privacy.weighting=num_examples"], "equal client weights"),
    (["privacy=client_level", "privacy.clipping=adaptive"], "must be server or client"),
    (["privacy=client_level", "privacy.target_epsilon=null", "privacy.noise_multiplier=0.0"], "noise_multiplier > 0"),
    (["privacy=dp_sgd", "kernels=torch"], "needs kernels=peft"),
    (["privacy=dp_sgd", "privacy.noise_multiplier=1.0"], "got both"),
    (["privacy=dp_sgd", "privacy.target_epsilon=null"], "got neither"),
    (["privacy=dp_sgd", "privacy.max_grad_norm=0"], "clipping norm"),
    (["privacy=dp_sgd", "privacy.accountant=moments"], "accountant must be one of"),
    (["privacy=dp_sgd", "privacy.planned_rounds=0"], "planned_rounds"),
    (["train.micro_batch_size=0"], "micro_batch_size"),
    (["privacy=dp_sgd", "privacy.target_delta=1.5"], "target_delta"),
    (["privacy=none", "privacy.mode=client_dp_adaptive"], "no privacy accountant for adaptive"),
    (["partitioner=label_skew"], "one row per client"),
])
def test_bad_combinations_are_one_sentence_config_errors(overrides, fragment):
    with pytest.raises(config.ConfigError) as e:  # the config's rules, then the strategy's (as the pre-flight)
        cfg = config.load(overrides)
        strategies.get(cfg.strategy.name).check_config(cfg)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and msg.endswith(".")


def test_cli_exits_2_with_the_sentence():
    p = subprocess.run(fedlora_cmd("run", "privacy=client_level", "strategy=flora"), capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 2
    out = (p.stdout + p.stderr).strip().splitlines()
    assert any("flora stacks each client's individual factors" in line for line in out)
    assert "Traceback" not in p.stdout + p.stderr
