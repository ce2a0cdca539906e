"""Issue 16, items 2, 5 and 6: what a node decides for itself, whatever the server's message says. A node's
privacy floor (node config) refuses every weaker DP setting with a reason the server records; DP noise is
seeded from the run config only when the node allows it; nodes receive only the keys they need, never a server
path, and a deployed node does not follow one; fault injection is obeyed only by nodes that allow it.
Runs go through the real ServerApp loop and ClientApp functions (in-process grid, tiny Llama)."""

import json

import pytest
from conftest import SST2
from harness import InProcessGrid
from omegaconf import OmegaConf

from fedlora import config, data
from fedlora.clients.node import MAX_FAULT_SLEEP_S, SIMULATION, NodeSettings, simulated
from fedlora.strategies.server_app import run_server

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAST = ["model=tiny_llama", "num_clients=3", "num_rounds=1", "local_steps=1", "train.batch_size=4",
        "eval.max_examples=8", "train.max_length=24", "data.max_train_examples=240"]
FLOOR = {"dp-required": True, "dp-max-epsilon": 3.0, "dp-max-delta": 1e-5, "dp-max-clip": 1.0}
DP_OK = ["privacy=dp_sgd", "privacy.target_epsilon=3", "privacy.target_delta=1e-5", "privacy.max_grad_norm=1.0"]


def run(tmp_path, overrides, grid):
    cfg = config.load(FAST + list(overrides))
    run_server(grid, cfg, tmp_path, echo=lambda *_: None)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# item 2: the node's own privacy floor
# ----------------------------------------------------------------------------------------------
WEAKER = {  # each way a server config could weaken the floor -> a fragment of the node's reason
    "mode none": (["privacy=none"], "requires sample-level DP-SGD"),
    "client-level DP": (["privacy=client_level"], "whose noise the server adds"),
    "larger target": (DP_OK + ["privacy.target_epsilon=8"], "allows epsilon up to 3"),
    "fixed noise": (DP_OK + ["privacy.target_epsilon=null", "privacy.noise_multiplier=0.01"], "epsilon is unbounded"),
    "delta raised": (DP_OK + ["privacy.target_delta=1e-3"], "allows delta up to 1e-05"),
    "larger clip": (DP_OK + ["privacy.max_grad_norm=5"], "clipping norm up to 1"),
    "reproducible on": (DP_OK + ["privacy.reproducible=true"], "dp-reproducible=true"),
    "approximate accountant": (DP_OK + ["privacy.accountant=gdp"], "upper bound"),
}


@pytest.mark.parametrize("case", list(WEAKER))
def test_trust_2_node_floor_refuses_every_weaker_setting(case):
    overrides, fragment = WEAKER[case]
    reason = NodeSettings.of(FLOOR).refusal(config.for_clients(config.load(overrides)))
    assert reason and fragment in reason and "this node's floor" in reason, reason


def test_trust_2_node_floor_accepts_what_is_at_least_as_strong():
    node = NodeSettings.of(FLOOR)
    for overrides in (DP_OK, DP_OK + ["privacy.target_epsilon=1", "privacy.max_grad_norm=0.5"]):
        assert node.refusal(config.for_clients(config.load(overrides))) is None
    # reproducible noise only with the node's own opt-in
    allowed = NodeSettings.of({**FLOOR, "dp-reproducible": True})
    assert allowed.refusal(config.for_clients(config.load(DP_OK + ["privacy.reproducible=true"]))) is None
    # no floor: the node trains whatever the privacy setting
    assert NodeSettings.of({}).refusal(config.for_clients(config.load(["privacy=none"]))) is None


def test_trust_2_a_bad_floor_is_one_sentence():
    with pytest.raises(ValueError, match="dp-max-epsilon=-1 must be a number between 0 and infinity"):
        NodeSettings.of({"dp-max-epsilon": -1})
    with pytest.raises(ValueError, match="dp-required=false"):
        NodeSettings.of({"dp-required": False, "dp-max-epsilon": 3})


def test_trust_2_noise_is_seeded_only_when_the_node_allows_it():
    cfg = config.for_clients(config.load(DP_OK + ["privacy.reproducible=true", "seed=7"]))
    assert NodeSettings.of({"partition-id": 2}).dp_seed(cfg, 4) is None  # the OS's randomness
    assert NodeSettings.of({"partition-id": 2, "dp-reproducible": True}).dp_seed(cfg, 4) == (7, 2, 4)
    secure = config.for_clients(config.load(DP_OK))
    assert NodeSettings.of({"dp-reproducible": True}).dp_seed(secure, 4) is None  # the run did not ask


@pytest.mark.parametrize("server", ["none", "weaker dp"])
def test_trust_2_floored_node_refuses_and_the_others_train(tmp_path, server):
    """Node 1 holds a floor; the server asks for no DP, or for DP-SGD with a larger epsilon than the floor allows.
    Node 1 refuses with its reason (in the round's `rejected`), the two others train, the run completes."""
    overrides = [] if server == "none" else DP_OK + ["privacy.target_epsilon=8", "privacy.reproducible=true"]
    rows = run(tmp_path, overrides, InProcessGrid(3, node_configs={1: FLOOR}))
    last = rows[-1]
    assert last["num_clients"] == 2 and last.get("skipped") is None
    assert [r["node"] for r in last["rejected"]] == [1]
    reason = last["rejected"][0]["reason"]
    assert reason.startswith("client status: refused") and "this node's floor" in reason
    assert ("requires sample-level DP-SGD" if server == "none" else "allows epsilon up to 3") in reason


# ----------------------------------------------------------------------------------------------
# item 5: nodes receive only what they need and never follow a server path
# ----------------------------------------------------------------------------------------------
def test_trust_5_nodes_receive_only_the_declared_keys(tmp_path):
    secret = tmp_path / "server-only"
    cfg = config.load([f"data.path={SST2}", f"out_dir={secret}", "audit=true"])
    sent = config.for_clients(cfg)
    assert set(sent.keys()) <= set(config.CLIENT_KEYS)
    assert "path" not in sent.data and set(sent.strategy.keys()) <= set(config.CLIENT_STRATEGY_KEYS)
    text = config.to_yaml(sent)
    assert str(SST2) not in text and str(secret) not in text
    for key in ("out_dir", "eval", "simulation", "compare", "audit", "round_timeout"):
        assert key not in sent


def _custom_tsv(path, rows: int):
    path.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(rows)))
    return path


def test_trust_5_deployed_node_does_not_follow_a_server_path(tmp_path):
    """A server that sends its whole config, a data path included, to a node without a data-path of its own:
    the node uses the data set's default location, resolved on the node (SST-2), not the server's file; a node
    with its own data-path uses that; a simulated node is given the run's path by the simulation."""
    server_file = _custom_tsv(tmp_path / "server.tsv", 10)
    cfg = config.load(FAST + ["num_clients=2", f"data.path={server_file}"])
    full = OmegaConf.to_yaml(cfg, resolve=True)
    assert str(server_file) in full  # the message really names the server path

    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    import fedlora.clients.client_app as ca
    from fedlora.messages import CONFIG_KEY

    def handshake(node_config, node_defaults=None):
        ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2, **node_config},
                      state=RecordDict(), run_config={})
        msg = Message(RecordDict({"config": ConfigRecord({CONFIG_KEY: full})}), message_type=MessageType.QUERY,
                      dst_node_id=5)
        return int(ca.query(msg, ctx, node_defaults).content["metrics"]["num-examples"])

    default = config.load(FAST + ["num_clients=2"])
    assert handshake({}) == len(data.partition(default, 0))  # SST-2 on this node, not the 10-row server file
    own = _custom_tsv(tmp_path / "node.tsv", 30)
    node_cfg = config.load(FAST + ["num_clients=2", f"data.path={own}"])
    assert handshake({"data-path": str(own)}) == len(data.partition(node_cfg, 0))  # its own file
    assert handshake({}, simulated(cfg)) == len(data.partition(cfg, 0))  # fedlora run: the run's file
    assert len({len(data.partition(c, 0)) for c in (default, node_cfg, cfg)}) == 3  # three different sizes


def test_trust_5_simulation_gives_its_nodes_the_run_path_and_opt_ins(tmp_path):
    f = _custom_tsv(tmp_path / "d.tsv", 4)
    cfg = config.load([f"data.path={f}", 'simulation.node_config="dp-max-epsilon=2"'])
    nc = simulated(cfg)
    assert nc["data-path"] == str(f.resolve()) and nc["dp-max-epsilon"] == 2
    assert all(nc[k] == v for k, v in SIMULATION.items())
    assert "data-path" not in simulated(config.load([]))  # the default data set: resolved on each node


# ----------------------------------------------------------------------------------------------
# item 6: fault injection only where the node allows it
# ----------------------------------------------------------------------------------------------
def test_trust_6_fault_injection_needs_the_nodes_opt_in():
    cfg = config.for_clients(config.load(["debug.raise_partitions=[0]", "debug.sleep_partitions=[1]",
                                          "debug.sleep_s=1e9"]))
    assert NodeSettings.of({"partition-id": 0}).faults(cfg) == (False, 0.0)
    assert NodeSettings.of({"partition-id": 1}).faults(cfg) == (False, 0.0)
    assert NodeSettings.of({"partition-id": 0, "allow-faults": True}).faults(cfg) == (True, 0.0)
    assert NodeSettings.of({"partition-id": 1, "allow-faults": True}).faults(cfg) == (False, MAX_FAULT_SLEEP_S)


@pytest.mark.parametrize("key", ["allow-faults", "dp-reproducible", "dp-required"])
def test_trust_6_a_misspelt_node_flag_is_refused_never_read_as_false(key):
    """Every node-config boolean goes through one parser: "ture" is an error naming the key, not false."""
    assert NodeSettings.of({key: "YES"}) == NodeSettings.of({key: True})
    with pytest.raises(ValueError, match=f"node config {key}='ture' is not a boolean: use {key}=true or {key}=false"):
        NodeSettings.of({key: "ture"})


@pytest.mark.parametrize("node_config", [{}, SIMULATION], ids=["deployed", "simulated"])
def test_trust_6_a_deployed_node_ignores_the_servers_fault_injection(tmp_path, node_config):
    rows = run(tmp_path, ["num_clients=2", "debug.raise_partitions=[1]"], InProcessGrid(2, node_config=node_config))
    rejected = rows[-1]["rejected"]
    if node_config:
        assert [r["node"] for r in rejected] == [1] and "injected failure" in rejected[0]["reason"]
    else:
        assert rejected == [] and rows[-1]["num_clients"] == 2
