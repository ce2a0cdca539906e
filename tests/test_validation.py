"""The validation split (issue 17, item 2) and the centralised bound (item 3), on a small local CSV whose rows are
told apart by their text: the split never reaches a client, follows its size rule and its seed; the server
reports validation figures and picks its "best" round by them; the centralised trainer keeps one optimizer for the
whole budget, trains on the pooled client rows only, picks its lr by validation accuracy and writes a run
directory that the comparison reads."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora import centralised, config, data, report

ROWS = 400  # test_fraction 0.1 holds out 40: 360 training rows, of which 18 (5%) are validation by default
TINY = ["model=tiny_llama", "train.max_length=32", "train.batch_size=4", "local_steps=1", "eval.max_examples=16",
        "data.label_words=[negative,positive]"]


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.csv"
    lines = [f"row {i} {'good' if i % 3 else 'bad'},{int(i % 3 > 0)}" for i in range(ROWS)]
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    return path


def load(csv_path, *extra):
    return config.load(["data=local", f"data.path={csv_path}", *extra])


def row_ids(ds) -> set[int]:
    """The original row number of every example (written into its text)."""
    return {int(t.split()[1]) for t in ds["text"]}


@pytest.mark.parametrize("partitioner", [["partitioner=iid"], ["partitioner=dirichlet", "partitioner.alpha=0.5"]])
def test_validation_never_reaches_a_client(csv_path, partitioner):
    cfg = load(csv_path, "num_clients=3", *partitioner)
    train, _ = data.load(cfg.data)
    rows, val, _ = data.split(cfg)
    val_idx = data.validation_indices(cfg)
    assert row_ids(val) == row_ids(train.select(val_idx.tolist()))  # the indices name the validation rows
    parts = [row_ids(data.partition(cfg, i)) for i in range(3)]
    assert all(p.isdisjoint(row_ids(val)) for p in parts)
    assert set().union(*parts) <= row_ids(rows) and row_ids(rows).isdisjoint(row_ids(val))
    assert row_ids(rows) | row_ids(val) == row_ids(train)
    if partitioner[0] == "partitioner=iid":
        assert sum(data.check_partitions(cfg)) == len(train) - len(val) == len(rows)


def test_validation_size_rule(csv_path):
    count = data.validation_count
    assert count(None, 360) == 18 and count(None, 67349) == 2000  # min(5%, 2,000)
    assert count(0.1, 360) == 36 and count(50, 360) == 50 and count(0, 360) == 0
    for bad in (-1, 1.5, 360, True, "many"):
        with pytest.raises(data.DataError, match="validation_size"):
            count(bad, 360)
    assert len(data.validation(load(csv_path))) == 18
    assert len(data.validation(load(csv_path, "data.validation_size=0.25"))) == 90
    assert len(data.validation(load(csv_path, "data.validation_size=7"))) == 7
    off = load(csv_path, "data.validation_size=0", "num_clients=2")
    assert len(data.validation(off)) == 0 and sum(data.check_partitions(off)) == 360


def test_validation_split_is_seeded(csv_path):
    a = data.validation_indices(load(csv_path, "seed=0")).tolist()
    data._indices_cached.cache_clear()
    data._split_cached.cache_clear()
    assert data.validation_indices(load(csv_path, "seed=0")).tolist() == a  # recomputed: the same rows
    assert data.validation_indices(load(csv_path, "seed=1")).tolist() != a


def test_best_round_is_chosen_on_validation_earliest_on_ties():
    rows = [{"round": r, "val_accuracy": v, "eval_accuracy": t}
            for r, v, t in ((0, 0.5, 0.50), (1, 0.7, 0.60), (2, 0.7, 0.90), (3, 0.6, 0.95))]
    assert report.best_by_validation(rows) == {"best_val_accuracy": 0.7, "best_round": 1, "test_at_best_val": 0.60}
    by_loss = [{"round": 0, "val_loss": 2.0}, {"round": 1, "val_loss": 1.0}]  # instruction data: no accuracy
    assert report.best_by_validation(by_loss)["best_round"] == 1
    assert report.best_by_validation([{"round": 0, "eval_accuracy": 0.5}])["best_round"] is None


def test_server_reports_validation_and_the_best_round(csv_path, tmp_path):
    from harness import InProcessGrid

    from fedlora.clients.node import SIMULATION
    from fedlora.strategies.server_app import run_server

    cfg = load(csv_path, *TINY, "num_clients=2", "num_rounds=1")
    grid = InProcessGrid(2, node_config={**SIMULATION, "data-path": str(csv_path)})  # as a simulation's nodes
    summary = run_server(grid, cfg, tmp_path / "run", echo=lambda *_: None)
    rows = report.read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert {"eval_loss", "eval_accuracy", "val_loss", "val_accuracy", "val_perplexity"} <= set(r)
    best = summary["best_round"]
    assert summary["best_val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert summary["test_at_best_val"] == rows[best]["eval_accuracy"]
    assert summary["final_eval_accuracy"] == rows[-1]["eval_accuracy"] and "best_eval_accuracy" in summary
    nodes = json.loads((tmp_path / "run" / "nodes.json").read_text())
    assert sum(n["num_examples"] for n in nodes) == len(data.split(cfg)[0]) == 360 - 18  # clients: no validation


class CountingAdamW(torch.optim.AdamW):
    """AdamW that remembers every instance made."""
    made: list = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        CountingAdamW.made.append(self)


def test_centralised_one_optimizer_pooled_rows_and_files(csv_path, tmp_path, monkeypatch):
    from fedlora import train

    cfg = load(csv_path, *TINY, "num_clients=3", "num_rounds=2", "fraction_train=0.5", "min_train_nodes=2")
    plan = centralised.budget(cfg, 342)
    assert plan["clients_per_round"] == 2 and plan["total_steps"] == 2 * 2 * 1 and plan["examples"] == 16
    CountingAdamW.made = []
    monkeypatch.setattr(torch.optim, "AdamW", CountingAdamW)
    seen, real = [], train.local_train
    monkeypatch.setattr(train, "local_train", lambda model, ds, *a, **k: seen.append((ds, k["batches"])) or
                        real(model, ds, *a, **k))
    summary = centralised.run(cfg, tmp_path / "c", echo=lambda *_: None, lr_grid=[1e-3, 3e-3])
    # one optimizer per lr for the whole budget, never restarted: its step count is the total
    assert len(CountingAdamW.made) == 2
    for opt in CountingAdamW.made:
        assert {int(s["step"]) for s in opt.state.values()} == {plan["total_steps"]}
    # trained on the pooled client rows only
    rows_, val, _ = data.split(cfg)
    pooled = seen[0][0]
    assert len(seen) == 2 * 2 and all(ds is pooled for ds, _ in seen) and len(pooled) == len(rows_)
    assert row_ids(pooled) == row_ids(rows_) == set().union(*(row_ids(data.partition(cfg, i)) for i in range(3)))
    used = {int(j) for _, batches in seen for b in batches for j in b}
    assert row_ids(pooled.select(sorted(used))).isdisjoint(row_ids(val))
    # the run directory: what a federated run writes, read by the comparison
    rows = report.read_metrics(tmp_path / "c")
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["lr"] == summary["lr"] for r in rows)
    assert all(r["bytes_up"] == r["bytes_down"] == 0 and "val_accuracy" in r for r in rows)
    assert summary["strategy"] == "centralised" and set(summary["lr_val_accuracy"]) == {"0.001", "0.003"}
    assert summary["test_at_best_val"] == rows[summary["best_round"]]["eval_accuracy"]
    row = report.summarise("centralised", tmp_path / "c", 0.5)
    assert row["final_accuracy"] == rows[-1]["eval_accuracy"] and row["bytes_up"] == 0
    assert config.from_yaml((tmp_path / "c" / "config.yaml").read_text()).train.lr == summary["lr"]
    assert len((tmp_path / "c" / "lr_search.jsonl").read_text().splitlines()) == 2 * 3


def test_centralised_picks_the_lr_by_validation_accuracy(csv_path, tmp_path, monkeypatch):
    final = {3e-4: 0.8, 1e-3: 0.8, 3e-3: 0.7}  # the default grid; a tie: the smaller lr wins

    def fake(cfg, lr, splits, plan, initial=None, echo=print):
        return [centralised._row(r, lr, plan, {"eval_accuracy": 0.1 * r + lr, "val_accuracy": final[lr] * r / 2,
                                               "train_loss": 1.0}, 0.0) for r in range(3)]

    monkeypatch.setattr(centralised, "train_at", fake)
    cfg = load(csv_path, *TINY, "num_rounds=2")
    summary = centralised.run(cfg, tmp_path / "c", echo=lambda *_: None)  # the default grid, from the config
    assert summary["lr"] == 3e-4 and summary["lr_selected_by"] == "val_accuracy"
    assert summary["lr_val_accuracy"] == {f"{lr:g}": v for lr, v in final.items()}
    assert {r["lr"] for r in report.read_metrics(tmp_path / "c")} == {3e-4}
    assert centralised.pick_lr({1e-3: {"val_loss": 0.5}, 1e-4: {"val_loss": 0.7}}) == (1e-3, "val_loss")
    assert centralised.pick_lr({1e-3: {"train_loss": 0.5}, 1e-4: {"train_loss": 0.5}}) == (1e-4, "train_loss")
