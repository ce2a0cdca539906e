"""Config composition/validation and data loading/partitioning: fast, no Flower run."""

import json
import subprocess

import pytest
from conftest import ROOT, SST2, fedlora_cmd

from fedlora import batching, config, data
from fedlora.config import ConfigError


def test_compose_defaults_and_overrides():
    cfg = config.load(["model=tiny_llama", "num_rounds=3", "partitioner=dirichlet", "partitioner.alpha=0.3"])
    assert cfg.model.name == "tiny_llama" and cfg.num_rounds == 3
    assert cfg.partitioner.name == "dirichlet" and cfg.partitioner.alpha == 0.3
    assert cfg.strategy.name == "fedit"


@pytest.mark.parametrize("overrides, fragment", [
    (["strategy=nope"], "unknown strategy 'nope'"),
    (["model=gpt9"], "unknown model 'gpt9'"),
    (["model.lora.r=0"], "model.lora.r=0 must be an integer >= 1"),
    (["fraction_train=1.5"], "fraction_train=1.5 is outside (0, 1]"),
    (["fraction_train=0"], "fraction_train=0 is outside (0, 1]"),
    (["num_rounds=0"], "num_rounds must be an integer >= 1"),
    (["min_train_nodes=20", "num_clients=4"], "min_train_nodes=20"),
    (["client_ranks=[4,0]", "num_clients=2"], "client rank 0"),
    (["model.lora.rank_scaling=sqrt"], "model.lora.rank_scaling=sqrt is not a rule"),
    (["model=hf"], "model=hf needs model.source"),
])
def test_invalid_config_is_one_sentence(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        config.load(overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_client_ranks_forms():
    assert config.client_ranks(config.load(["num_clients=3"])) == [8, 8, 8]
    assert config.client_ranks(config.load(["num_clients=4", "client_ranks=[4,8]"])) == [4, 8, 4, 8]


@pytest.mark.parametrize("how, scale32", [("constant", 2.0), ("rslora", 1.0), ("standard", 0.5)])
def test_rank_scaling_gives_other_ranks_their_scale(how, scale32):
    """``model.lora.rank_scaling`` (r = 8, alpha = 16: s = 2): a rank-32 client's scale alpha_k / r_k is s (constant),
    s sqrt(8/32) (rslora) or alpha / 32 (standard); the model's own rank keeps s under every rule; one rank for all
    (``client_ranks=32``) re-anchors the model at that rank with the same rule, which then gives every rank the
    same alpha as before; the mixed-rank handshake gives each node its rank's alpha."""
    from test_fuzz import HandshakeGrid, handshake, make_strategy

    from fedlora.strategies.server_app import discover

    cfg = config.load(["model=minilm", f"model.lora.rank_scaling={how}"])
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (8, 16)
    assert config.rank_alpha(cfg, 8) == 16 and config.rank_alpha(cfg, 32) / 32 == pytest.approx(scale32)
    one = config.load(["model=minilm", f"model.lora.rank_scaling={how}", "client_ranks=32"])
    assert one.model.lora.r == 32 and one.model.lora.alpha / 32 == pytest.approx(scale32)
    for r in (2, 4, 8, 16, 64):
        assert config.rank_alpha(one, r) == pytest.approx(config.rank_alpha(cfg, r))
    s = make_strategy("hetlora", [4, 8, 32, 8])
    s.cfg.model.lora.rank_scaling = how
    nodes = discover(HandshakeGrid([handshake(i) for i in range(4)]), s, s.cfg, timeout=5)
    scales = {n.rank: n.scale for n in nodes.values()}
    assert scales[8] == 2.0 and scales[32] == pytest.approx(scale32)
    assert scales[4] == pytest.approx({"constant": 2.0, "rslora": 2.0 * 2 ** 0.5, "standard": 4.0}[how])


def test_sst2_local_folder_and_partitions_are_seeded():
    cfg = config.load(["num_clients=5", "partitioner=dirichlet", "partitioner.alpha=0.5", f"data.path={SST2}"])
    train, test = data.load(cfg.data)
    assert len(train) == 67349 and len(test) == 872
    assert set(train.column_names) == {"text", "label"}
    sizes = data.check_partitions(cfg)
    assert sum(sizes) == len(train) - len(data.validation(cfg)) == 67349 - 2000  # the validation split stays out
    a = data.partition(cfg, 2)["text"][:5]
    data._partitions_cached.cache_clear()
    assert data.partition(cfg, 2)["text"][:5] == a  # same seed, same partition
    cfg2 = config.load(["num_clients=5", "partitioner=dirichlet", "partitioner.alpha=0.5", "seed=1", f"data.path={SST2}"])
    assert len(data.partition(cfg2, 2)) != len(data.partition(cfg, 2))


def test_drift_preset_composes_as_documented():
    cfg = config.load(["preset=drift"])
    assert (cfg.partitioner.name, cfg.partitioner.alpha, cfg.local_steps) == ("dirichlet", 0.1, 50)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.round_timeout) == (16, 32, 3600)
    assert config.load(["preset=drift", "round_timeout=900"]).round_timeout == 900  # the command line wins
    assert config.load(["preset=drift", "partitioner=iid"]).partitioner.name == "iid"


def test_dirichlet_redraws_where_flwr_gives_up():
    """Dirichlet(0.1) over SST-2's 2 labels and 10 clients: flwr-datasets' 11 draws all leave some client under
    min_partition_size for seed 1 (the drift preset failed there); fedlora starts again from derived seeds, so every
    client gets >= min_partition_size rows, deterministically, and a seed that fits at once keeps flwr's partitions."""
    from flwr_datasets.partitioner import DirichletPartitioner

    base = ["preset=drift", f"data.path={SST2}"]
    cfg = config.load(base + ["seed=1"])
    train = data.split(cfg)[0]
    plain = DirichletPartitioner(num_partitions=10, partition_by="label", alpha=0.1, min_partition_size=10,
                                 self_balancing=False, seed=1)
    plain.dataset = train
    with pytest.raises(ValueError, match="max number of attempts"):
        plain.load_partition(0)
    sizes = data.check_partitions(cfg)
    assert min(sizes) >= 10 and sum(sizes) == len(train)
    first = data.partition(cfg, 3)["text"][:5]
    data._partitions_cached.cache_clear()
    assert data.partition(cfg, 3)["text"][:5] == first  # deterministic per seed
    with pytest.raises(ConfigError, match="partitioner.redraws=-1 must be an integer >= 0"):
        config.load(base + ["partitioner.redraws=-1"])
    with pytest.raises(ConfigError) as e:
        data.check_partitions(config.load(base + ["seed=1", "partitioner.redraws=0"]))
    assert "raise partitioner.alpha, lower partitioner.min_partition_size or use fewer clients" in str(e.value)
    cfg0 = config.load(base + ["seed=0"])  # fits at flwr's first partitioner: its partitions, unchanged
    plain0 = DirichletPartitioner(num_partitions=10, partition_by="label", alpha=0.1, min_partition_size=10,
                                  self_balancing=False, seed=0)
    plain0.dataset = data.split(cfg0)[0]
    assert data.partition(cfg0, 7)["text"] == plain0.load_partition(7)["text"]


def test_label_skew_and_pathological(tmp_path):
    cfg = config.load(["num_clients=3", "partitioner=pathological", "partitioner.classes_per_client=1"])
    labels = [set(data.partition(cfg, i)["label"]) for i in range(3)]
    assert all(len(s) == 1 for s in labels)
    part = data.LabelSkewPartitioner([[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]], seed=0)
    part.dataset = data.load(cfg.data)[0]
    p0 = part.load_partition(0)["label"]
    assert abs(sum(p0) / len(p0) - 0.9) < 0.01


def test_local_csv_jsonl_and_alpaca(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\n" + "\n".join(f"\"text, number {i}\",{i % 3}" for i in range(50)))
    cfg = config.load(["data=local", f"data.path={csv}", "data.text_column=review", "data.label_column=stars"])
    train, test = data.load(cfg.data)
    assert len(train) + len(test) == 50 and set(train["label"]) <= {0, 1, 2}
    jl = tmp_path / "alpaca.jsonl"
    jl.write_text("\n".join(json.dumps({"instruction": f"Add {i} and 1", "input": "", "output": str(i + 1)}) for i in range(40)))
    cfg = config.load(["data=alpaca", f"data.path={jl}", "model=tiny_llama"])
    train, test = data.load(cfg.data)
    assert train[0]["prompt"].startswith("### Instruction:") and train[0]["response"]


def test_bad_data_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\tsentence\n1\tfine\nnot-a-label\toops\n")
    with pytest.raises(data.DataError, match="is not an integer class id"):
        data.load(config.load(["data=local", f"data.path={bad}", "data.text_column=sentence"]).data)
    cols = tmp_path / "cols.csv"
    cols.write_text("a,b\n1,2\n")
    with pytest.raises(data.DataError, match="has no column 'text'"):
        data.load(config.load(["data=local", f"data.path={cols}"]).data)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(config.load([f"data.path={tmp_path / 'missing'}"]).data)


def _cli(*args):
    return subprocess.run(fedlora_cmd("run", *args), capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args, fragment", [
    (["strategy=nope"], "unknown strategy"),
    (["data.path=/nonexistent/sst2"], "does not exist"),
    (["num_clients=100000", "model=tiny_llama"], "more than the"),
])
def test_cli_bad_input_exits_2_with_one_line(args, fragment):
    p = _cli(*args)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_cli_malformed_data_file(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("label\tsentence\n1\tok\n1\tok\textra\tcolumns\n")
    p = _cli(f"data.path={bad}", "model=tiny_llama")
    assert p.returncode == 2 and "could not be read" in p.stderr and "Traceback" not in p.stderr


def test_cli_refuses_to_write_into_an_earlier_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    p = _cli(f"out_dir={tmp_path}", "model=tiny_llama")
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and "resume=" in lines[0], p.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 0}\n'  # nothing already written is lost


def test_local_training_is_reproducible_whatever_ran_before():
    """Dropout is seeded per (client, round): a simulation worker's history must not change a client's update."""
    import torch

    from fedlora import adapters, models, train

    cfg = config.load(["model=tiny_llama", "model.lora.dropout=0.5", "train.max_length=16"])
    bundle = models.build(cfg)
    tr, _ = data.load(cfg.data)
    ds = tr.select(range(64))
    coll = batching.Collator(bundle.tokenizer, bundle.task, 16, cfg.data.get("label_words"))
    start = adapters.from_peft(bundle.model)

    def one(noise_draws: int):
        adapters.load_into_peft(bundle.model, start)
        torch.rand(noise_draws)  # another client's work in the same process moves the global RNG
        train.local_train(bundle.model, ds, coll, steps=3, batch_size=4, lr=1e-2, step_offset=0, total_steps=3,
                          seed=5, round_idx=2, task=bundle.task)
        return adapters.from_peft(bundle.model)

    a, b = one(1), one(1000)
    for k, fa in a.lora.items():
        assert torch.equal(fa.B, b.lora[k].B) and torch.equal(fa.A, b.lora[k].A)
    assert any(not torch.equal(f.B, start.lora[k].B) for k, f in a.lora.items())  # it did train
