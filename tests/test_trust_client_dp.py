"""Client-level DP (``privacy=client_level``) that can be trusted across a resume and against a client that does
not clip (issue 16, items 1 and 3), through the real ServerApp loop and ClientApp functions (in-process grid,
tiny Llama):

- the accountant, the planned noise and the releases are checkpointed: a run stopped after round 1 and resumed
  reports round by round the epsilon of an uninterrupted run and stops at the same budget; a resume that changes
  what the spent epsilon was accounted with, or asks for rounds the budget cannot pay for, is one sentence (exit 2);
- with client-side clipping the server checks every update's norm against the clipping norm: an over-norm update
  is rejected with its reason and never reaches the released mean (the round is not released and costs nothing).
"""

import json
import math
import shutil
import subprocess
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, fedlora_cmd
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import compute_clip_model_update
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from harness import InProcessGrid, Killed, KillingGrid
from safetensors.torch import load_file

import fedlora.strategies.privacy as server_dp
from fedlora import adapters, checkpoint, config, preflight, strategies
from fedlora import privacy as P
from fedlora.strategies.server_app import run_server

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAST = ["model=tiny_llama", "num_clients=3", "local_steps=2", "train.batch_size=4", "eval.max_examples=8",
        "train.max_length=24", "data.max_train_examples=240", "privacy.reproducible=true"]
# noise planned for 3 releases, 5 rounds asked: the budget stops the run before round 4
CL = ["strategy=fedit", "privacy=client_level", "privacy.target_epsilon=2.0", "privacy.planned_rounds=3",
      "num_rounds=5"]


def quiet(*_):
    """An ``echo`` that prints nothing."""


def run(run_dir, overrides, grid=None, resume=False):
    """One federation in-process: ``(cfg, rows, summary, spy)``; ``spy.states`` holds the global arrays after
    every round (``spy.states[0]``: before round 1), ``spy.strategy`` the strategy."""
    cfg = config.load(FAST + list(overrides))
    spy = types.SimpleNamespace(states=[], strategy=None)
    cls = strategies.get(cfg.strategy.name)

    class Spy(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            spy.strategy = self
            spy.states.append(snapshot(self))

        def aggregate_round(self, *a, **k):
            res = super().aggregate_round(*a, **k)
            spy.states.append(snapshot(self))
            return res

    strategies.STRATEGIES[cfg.strategy.name] = Spy
    try:
        summary = run_server(grid or InProcessGrid(cfg.num_clients), cfg, run_dir, echo=quiet, resume=resume)
    finally:
        strategies.STRATEGIES[cfg.strategy.name] = cls
    return cfg, rows_of(run_dir), summary, spy


def snapshot(strategy) -> dict:
    """A copy of the strategy's global arrays."""
    return {k: np.array(v, copy=True) for k, v in adapters.to_arrays(strategy.state).items()}


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter_of(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and "Traceback" not in msg


# ----------------------------------------------------------------------------------------------
# item 1: resume keeps the accountant, the noise and the budget
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_and_resumed(tmp_path_factory):
    """The same client-level run uninterrupted, and killed during round 2 then resumed with fresh clients."""
    base = tmp_path_factory.mktemp("client_dp_resume")
    full = run(base / "full", CL)
    with pytest.raises(Killed):
        run(base / "cut", CL, grid=KillingGrid(3, kill_round=2))
    cut_rows = rows_of(base / "cut")
    resumed = run(base / "cut", CL, resume=True)
    return base, full, cut_rows, resumed


def test_trust_1_client_level_resume_keeps_epsilon(full_and_resumed):
    """Round by round the resumed run reports the uninterrupted run's epsilon (that of one accountant over all
    releases, recomputed here from Opacus' RDP), keeps its noise multiplier, stops at the same budget, and ends
    with the same adapter. Before the fix the resumed accountant restarted at 0 (round 2 reported one release)
    and the budget paid for three more releases."""
    base, (cfg, rows, summary, _), cut_rows, (_, rrows, rsummary, rspy) = full_and_resumed
    delta, target = float(cfg.privacy.target_delta), float(cfg.privacy.target_epsilon)
    sigma = P.client_level_noise(P.dp_config(cfg), 3)
    # the uninterrupted run: 3 releases, then the next one would exceed the target
    assert summary["status"] == "budget-exhausted" and "max_epsilon" in summary["stop_reason"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["releases"] for r in rows[1:]] == [1, 2, 3]
    for r in rows[1:]:
        assert r["noise_multiplier"] == sigma
        assert r["epsilon_max"] == pytest.approx(P.releases_epsilon(sigma, r["releases"], delta), rel=1e-12)
    assert rows[-1]["epsilon_max"] <= target < P.releases_epsilon(sigma, 4, delta)
    # the interrupted run checkpointed round 1 only; resumed, it continues the same accountant
    assert [r["round"] for r in cut_rows] == [0, 1]
    assert rsummary["status"] == "budget-exhausted" and rsummary["stop_reason"] == summary["stop_reason"]
    assert [r["round"] for r in rrows] == [0, 1, 2, 3]
    for key in ("epsilon_max", "epsilon", "releases", "noise_multiplier", "delta", "skipped", "rejected"):
        assert [r.get(key) for r in rrows] == [r.get(key) for r in rows], key
    assert rrows[2]["epsilon_max"] > P.releases_epsilon(sigma, 1, delta) * (1 + 1e-6)  # not restarted at 0
    assert rsummary["epsilon_max"] == summary["epsilon_max"]
    comp = rspy.strategy.privacy
    assert comp.accountant.num_releases == 3 and comp.flower.accountant is comp.accountant
    assert comp.flower.noise_multiplier == comp.noise_multiplier == sigma
    a, b = adapter_of(base / "full"), adapter_of(base / "cut")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def small_cfg(*extra):
    return config.load(FAST + CL + list(extra))


def stub_strategy(cfg):
    return types.SimpleNamespace(nodes={}, min_train_nodes=int(cfg.min_train_nodes), cfg=cfg)


def spent(cfg, releases: int) -> server_dp.ClientLevelDP:
    """A started client-level component whose accountant has composed ``releases`` releases."""
    comp = server_dp.ClientLevelDP(cfg)
    comp.start(stub_strategy(cfg))
    event = GaussianPrivacyEvent(noise_multiplier=comp.noise_multiplier, sample_size=3, population_size=3)
    for _ in range(releases):
        comp.accountant.compose(event)
    return comp


def test_trust_1_state_dict_round_trip_keeps_epsilon_and_noise():
    """The component's state is plain JSON and restores the epsilon into the accountant Flower's wrapper holds,
    whether it is loaded after start() (as the server does) or before; the checkpointed noise multiplier wins over
    the one a changed num_rounds would plan; a checkpoint without the accountant is refused."""
    cfg = small_cfg()
    delta = float(cfg.privacy.target_delta)
    src = spent(cfg, 2)
    sd = json.loads(json.dumps(src.state_dict()))  # JSON-able (the checkpoint is JSON)
    assert sd["accountant"]["accountant"]["history"] == [[src.noise_multiplier, 1.0, 2]]
    eps2 = P.releases_epsilon(src.noise_multiplier, 2, delta)
    after = server_dp.ClientLevelDP(cfg)
    after.start(stub_strategy(cfg))
    after.load_state_dict(sd)
    before = server_dp.ClientLevelDP(cfg)
    before.load_state_dict(sd)
    before.start(stub_strategy(cfg))
    for comp in (after, before):
        assert comp.flower.accountant is comp.accountant and comp.accountant.num_releases == 2
        assert comp.accountant.get_epsilon(delta) == pytest.approx(eps2, rel=1e-12) and eps2 > 0
        assert comp.flower.noise_multiplier == comp.noise_multiplier == src.noise_multiplier
        assert comp.state_dict() == sd
    # planned_rounds=null: the noise is planned for num_rounds; resuming with fewer rounds keeps the run's noise
    five = server_dp.ClientLevelDP(small_cfg("privacy.planned_rounds=null"))
    three = server_dp.ClientLevelDP(small_cfg("privacy.planned_rounds=null", "num_rounds=3"))
    assert three.noise_multiplier < five.noise_multiplier
    three.start(stub_strategy(three.cfg))
    three.load_state_dict(json.loads(json.dumps(five.state_dict())))
    assert three.flower.noise_multiplier == three.noise_multiplier == five.noise_multiplier
    assert three.state_dict()["plan"]["num_rounds"] == 5  # the most rounds agreed stays on record
    for bad in ({}, {"mode": "client_dp", "plan": sd["plan"], "accountant": None}):
        with pytest.raises(config.ConfigError, match="holds no client-level DP accountant") as e:
            server_dp.ClientLevelDP(cfg).load_state_dict(bad)
        assert one_sentence(str(e.value))
    with pytest.raises(config.ConfigError, match="client-level DP state is malformed") as e:
        server_dp.ClientLevelDP(cfg).load_state_dict({**sd, "plan": {"noise_multiplier": 1.0}})
    assert one_sentence(str(e.value))
    with pytest.raises(config.ConfigError, match="privacy mode client_dp but this run has none"):
        server_dp.NoPrivacy().load_state_dict(sd)


def saved_run(tmp_path, *extra):
    """A run directory holding a saved config and a placeholder checkpoint (what the pre-flight of ``resume=``
    reads; the server checks the checkpoint's own privacy state when it loads it)."""
    d = tmp_path / "saved"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(config.to_yaml(small_cfg(*extra)))
    checkpoint.save(d, {"round": 0})
    return d


@pytest.mark.parametrize("overrides, fragment", [
    (["num_rounds=6"], "resume with num_rounds=6 asks for more rounds than the privacy budget can pay for"),
    (["privacy.target_epsilon=4.0"], "cannot change privacy.target_epsilon from 2.0 to 4.0"),
    (["privacy.target_delta=0.0001"], "cannot change privacy.target_delta from 1e-05 to 0.0001"),
    (["privacy.planned_rounds=6"], "cannot change privacy.planned_rounds from 3 to 6"),
    (["privacy.target_epsilon=null", "privacy.noise_multiplier=2.0"], "cannot change privacy.target_epsilon"),
    (["privacy.mode=none"], "cannot change the privacy mode from client_dp to none"),
    (["privacy=none"], "resume cannot switch the config group privacy (privacy=none)"),
])
def test_trust_1_resume_refuses_a_budget_it_cannot_pay(tmp_path, overrides, fragment):
    """The pre-flight of ``resume=`` refuses, in one sentence, every change of what the epsilon already spent was
    accounted with, and more rounds than the run's noise can pay for within the target."""
    d = saved_run(tmp_path)
    with pytest.raises(config.ConfigError) as e:
        preflight.prepare([f"resume={d}", *overrides])
    assert fragment in str(e.value) and one_sentence(str(e.value))


def test_trust_1_resume_allows_what_the_budget_pays_for(tmp_path):
    """Fewer rounds are always allowed; more rounds only as long as that many releases at the run's noise stay
    within the target (noise planned for 10 releases: up to 10 rounds, and the sentence says so beyond)."""
    assert preflight.prepare([f"resume={saved_run(tmp_path)}", "num_rounds=4"])[0].num_rounds == 4
    d = saved_run(tmp_path, "privacy.planned_rounds=10", "num_rounds=3")
    cfg, rdir, resume = preflight.prepare([f"resume={d}", "num_rounds=10"])
    assert (cfg.num_rounds, rdir, resume) == (10, d.resolve(), True)
    with pytest.raises(config.ConfigError, match=r"\(at most 10 fit\), so resume with num_rounds<=10 "):
        preflight.prepare([f"resume={d}", "num_rounds=11"])
    sigma = P.client_level_noise(P.dp_config(cfg), 10)
    assert P.releases_epsilon(sigma, 10, 1e-5) <= 2.0 < P.releases_epsilon(sigma, 11, 1e-5)
    assert P.releases_within(sigma, 1e-5, 2.0, 50) == 10


def test_trust_1_server_refuses_at_load_and_cli_exits_2(tmp_path, full_and_resumed):
    """Against the checkpoint itself (a resume that skipped the pre-flight, or a config.yaml rewritten since): the
    server refuses before any round; ``fedlora run resume=... num_rounds=6`` exits 2 with the sentence."""
    base = full_and_resumed[0]
    d = tmp_path / "again"
    shutil.copytree(base / "cut", d)
    rows = rows_of(d)
    with pytest.raises(config.ConfigError, match="num_rounds=6 asks for more rounds") as e:
        run(d, CL + ["num_rounds=6"], resume=True)
    assert one_sentence(str(e.value)) and rows_of(d) == rows
    shutil.rmtree(d)
    shutil.copytree(base / "cut", d)
    p = subprocess.run(fedlora_cmd("run", f"resume={d}", "num_rounds=6"), capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "asks for more rounds than the privacy budget can pay for" in p.stderr
    assert "Traceback" not in p.stdout + p.stderr and rows_of(d) == rows


# ----------------------------------------------------------------------------------------------
# item 3: client-side clipping is checked
# ----------------------------------------------------------------------------------------------
def scale_update(rnd: int, factor: float):
    """A grid fault: in train round ``rnd`` the client's (already clipped) update is multiplied by ``factor``."""
    def fault(msg, ctx, fn):
        rep = fn(msg, ctx)
        if int(msg.content["config"]["server-round"]) == rnd:
            sent = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            got = {k: a.numpy() for k, a in rep.content["arrays"].items()}
            rep.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(
                (sent[k] + factor * (got[k] - sent[k])).astype(np.float32))) for k in got})
        return rep
    return fault


def test_trust_3_over_norm_client_update_is_rejected(tmp_path):
    """Client-side clipping at C; in round 1 partition 1 sends an update 1000 x its clipped one. The round's
    ``rejected`` names it with the reason, the round is not released (fewer valid updates than sampled clients:
    the global adapter is unchanged, nothing is spent); round 2, all honest, is released and accounted."""
    C = 0.05
    grid = InProcessGrid(3, faults={1: scale_update(1, 1000.0)})
    overrides = ["strategy=fedit", "privacy=client_level", "privacy.clipping=client", f"privacy.clipping_norm={C}",
                 "privacy.target_epsilon=2.0", "num_rounds=2"]
    cfg, rows, summary, spy = run(tmp_path / "run", overrides, grid=grid)
    r1, r2 = rows[1], rows[2]
    assert [x["node"] for x in r1["rejected"]] == [1]
    reason = r1["rejected"][0]["reason"]
    assert f"exceeds privacy.clipping_norm={C:g}" in reason and "privacy.clipping=client" in reason
    norm = float(reason.split("update norm ")[1].split()[0])
    assert 10 * C < norm <= 1000 * C * (1 + 1e-5)  # the honest update (norm <= C) multiplied by 1000
    assert r1["num_clients"] == 2 and "client-level DP releases only rounds with all 3" in r1["skipped"]
    assert r1["releases"] == 0 and r1["epsilon_max"] == 0.0
    assert all(np.array_equal(spy.states[1][k], spy.states[0][k]) for k in spy.states[0])  # nothing released
    assert r1["eval_loss"] == rows[0]["eval_loss"]
    sigma = spy.strategy.privacy.noise_multiplier
    assert not r2["rejected"] and r2["num_clients"] == 3 and not r2.get("skipped")
    assert r2["releases"] == 1
    assert r2["epsilon_max"] == pytest.approx(P.releases_epsilon(sigma, 1, float(cfg.privacy.target_delta)), rel=1e-12)
    assert any(not np.array_equal(spy.states[2][k], spy.states[1][k]) for k in spy.states[1])
    assert summary["status"] == "completed"


def reply(arrays):
    """A reply as ``check_reply`` reads it."""
    rec = ArrayRecord({k: Array(np.ascontiguousarray(v.astype(np.float32))) for k, v in arrays.items()})
    return types.SimpleNamespace(content={"arrays": rec})


def test_trust_3_the_check_measures_flowers_clipped_update():
    """``check_reply`` measures what ``fixedclipping_mod`` clips (reply minus the arrays sent, flat over all
    arrays): Flower's own clipping of updates far above C passes (float32 rounding included, even with a large
    adapter); an update at 1.001 C, or 1000 C, is rejected; server-side clipping does not check; a reply with
    other shapes is left to the strategy's checks."""
    C = 0.05
    cfg = small_cfg("privacy.clipping=client", f"privacy.clipping_norm={C}")
    comp = server_dp.ClientLevelDP(cfg)
    rng = np.random.default_rng(0)
    sent = {"m.lora_A": rng.normal(0, 3, (8, 64)), "m.lora_B": rng.normal(0, 3, (64, 8)),
            "extra.h": rng.normal(0, 3, 7)}
    sent = {k: v.astype(np.float32) for k, v in sent.items()}
    comp.current = ArrayRecord({k: Array(v) for k, v in sent.items()})
    node = types.SimpleNamespace(node_id=1, partition_id=0)
    for trial in range(20):
        upd = [rng.normal(0, 1, v.shape).astype(np.float32) * (10 ** (trial % 4)) for v in sent.values()]
        params = [s + u for s, u in zip(sent.values(), upd)]
        compute_clip_model_update(param1=params, param2=list(sent.values()), clipping_norm=C)  # Flower's clipping
        msg = reply(dict(zip(sent, params)))
        norm, limit = comp.update_norm(node, msg)
        assert norm == pytest.approx(C, rel=1e-5) and norm <= limit
        assert comp.check_reply(None, node, msg, {}) is None
    exact = [rng.normal(0, 1, v.shape) for v in sent.values()]
    scale = C / math.sqrt(sum(float(np.sum(u ** 2)) for u in exact))
    for factor, rejected in ((0.999, False), (1.001, True), (1000.0, True)):
        msg = reply({k: s.astype(np.float64) + factor * scale * u for (k, s), u in zip(sent.items(), exact)})
        reason = comp.check_reply(None, node, msg, {})
        assert (reason is not None) == rejected, factor
        if rejected:
            assert reason.startswith("update norm ") and one_sentence(reason + ".")
    msg = reply({k: s + 1.0 for k, s in sent.items()})  # far over C
    comp.clipping = "server"  # the server clips every update itself: nothing to check
    assert comp.check_reply(None, node, msg, {}) is None
    comp.clipping = "client"
    assert comp.check_reply(None, node, reply({"m.lora_A": sent["m.lora_A"][:4] + 1.0}), {}) is None
