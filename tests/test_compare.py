"""``fedlora compare`` over seeds (issue 17 item 1): the verdict rule on constructed differences, the aggregation
(mean ± sample sd) and tables from constructed run directories, identical partitions and initial adapters across
strategies for a seed, and one tiny end-to-end comparison (two seeds, two strategies, a stand-in centralised run)
on the in-process grid instead of Ray."""

from __future__ import annotations

import csv
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from fedlora import adapters, compare as cmp, config, data, models, provenance, report
from fedlora.config import ConfigError
from fedlora.verdicts import verdict

FAST = ["model=tiny_llama", "num_clients=2", "num_rounds=1", "local_steps=1", "train.batch_size=4",
        "eval.max_examples=8", "data.max_train_examples=120", "train.max_length=32"]


# ---------------------------------------------------------------- the verdict rule
@pytest.mark.parametrize("diffs, word, how", [
    ([0.01, 0.02, 0.03], "better", "all 3 seeds > 0"),
    ([-0.01, -0.02, -0.005], "worse", "all 3 seeds < 0"),
    ([0.02, -0.01, 0.01], "within seed noise", "range crosses 0"),  # a mean of +0.007 inside the seed range
    ([0.0, 0.01, 0.02], "within seed noise", "range touches 0"),
    ([0.8 - 0.8, 0.03], "within seed noise", "range touches 0"),
    ([0.05], "no verdict", "one seed"),
])
def test_verdict_by_range(diffs, word, how):
    assert verdict(diffs) == (word, how)


def test_verdict_uses_the_paired_t_test_from_five_seeds():
    word, how = verdict([0.02, 0.03, 0.025, 0.01, 0.04])
    assert word == "better" and how.startswith("paired t-test, p=")
    assert float(how.split("p=")[1]) < 0.05
    # every seed above 0, yet too spread for 5%: the test, not the range, decides
    word, how = verdict([0.001, 0.2, 0.001, 0.001, 0.3])
    assert word == "within seed noise" and how.startswith("paired t-test, p=")
    assert verdict([-0.02, -0.03, -0.025, -0.01, -0.04])[0] == "worse"


def test_verdict_constant_difference_with_five_seeds():
    assert verdict([0.01] * 5) == ("better", "the same difference in all 5 seeds")
    assert verdict([-0.01] * 6) == ("worse", "the same difference in all 6 seeds")
    assert verdict([0.0] * 5) == ("within seed noise", "identical in every seed")


# ---------------------------------------------------------------- aggregation and tables (constructed runs)
def fake_run(d: Path, accs: list[float], best_val: float | None = None, up: int = 1000, wall: float = 10.0) -> Path:
    """A run directory as a finished run leaves it: round 0 then one row per round, and its summary."""
    d.mkdir(parents=True)
    rows = [{"round": i, "eval_accuracy": a, "bytes_up": up if i else 0, "bytes_down": 2 * up if i else 0}
            for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summ = {"final_eval_accuracy": accs[-1], "best_eval_accuracy": max(accs), "bytes_up": up * (len(accs) - 1),
            "bytes_down": 2 * up * (len(accs) - 1), "wall_s": wall}
    if best_val is not None:
        summ["test_at_best_val"], summ["best_val_accuracy"] = best_val, best_val + 0.01
    (d / "summary.json").write_text(json.dumps(summ))
    return d


FINALS = {"fedit": [0.80, 0.82, 0.84], "flora": [0.85, 0.86, 0.90], "ffa_lora": [0.79, 0.83, 0.84],
          "centralised": [0.90, 0.90, 0.90]}


def constructed(tmp_path, seeds=(0, 1, 2), best_val=True) -> list[dict]:
    """One row per (seed, strategy) of runs written by hand, the way :func:`fedlora.compare.compare` returns."""
    rows = []
    for i, seed in enumerate(seeds):
        for name, finals in FINALS.items():
            rel = f"seed_{seed}/{name}" if len(seeds) > 1 else name
            f = finals[i]
            fake_run(tmp_path / rel, [0.5, f - 0.1, f], best_val=f - 0.005 if best_val else None, wall=10.0 + i)
            rows.append(report.summarise(name, tmp_path / rel, 0.83) | {"seed": seed, "run_dir": rel})
    return rows


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_aggregate_mean_and_sample_sd(tmp_path):
    assert report.mean_sd([0.80, 0.82, 0.84]) == pytest.approx((0.82, 0.02))  # n-1: sqrt(0.0008 / 2)
    assert report.mean_sd([0.7]) == (0.7, None) and report.mean_sd([None]) == (None, None)
    rows = {r["strategy"]: r for r in report.aggregate(constructed(tmp_path), "fedit")}
    fedit, flora, ffa, cen = rows["fedit"], rows["flora"], rows["ffa_lora"], rows["centralised"]
    assert fedit["seeds"] == 3 and fedit["final_accuracy"] == pytest.approx(0.82)
    assert fedit["final_accuracy_sd"] == pytest.approx(0.02)
    assert fedit["best_accuracy"] == pytest.approx(0.815) and fedit["best_from"] == "test_at_best_val"
    assert fedit["wall_s"] == pytest.approx(11.0) and fedit["wall_s_sd"] == pytest.approx(1.0)
    assert fedit["bytes_up"] == 2000 and fedit["bytes_up_sd"] == 0
    assert fedit["reached_target"] == "1/3" and fedit["rounds_to_target"] == 2  # only seed 2 reaches 0.83
    assert fedit["verdict"] == "baseline" and fedit["diff_to_centralised"] == pytest.approx(-0.08)
    assert (flora["diff_final"], flora["diff_min"], flora["diff_max"]) == pytest.approx((0.05, 0.04, 0.06))
    assert (flora["verdict"], flora["verdict_how"]) == ("better", "all 3 seeds > 0")
    assert (ffa["verdict"], ffa["verdict_how"]) == ("within seed noise", "range crosses 0")  # diffs -0.01, 0.01, 0
    assert "ceiling" in cen["note"] and cen["verdict"] is None and cen["diff_final"] is None


def test_tables_and_plots_from_run_directories(tmp_path):
    seed_rows = constructed(tmp_path)
    table = report.write_comparison(tmp_path, seed_rows, 0.83, "tiny setting.", "fedit")
    md = (tmp_path / "comparison.md").read_text()
    assert table in md and "Mean ± sample standard deviation over 3 seeds" in md
    head = table.splitlines()[0]
    for col in ("final test acc", "test acc at best val round", "Δ final vs fedit (min..max)", "verdict",
                "Δ final vs centralised"):
        assert col in head
    line = {r.split("|")[1].strip(): r for r in table.splitlines()[2:]}
    assert "0.8200 ± 0.0200" in line["fedit"] and "1/3 seeds" in line["fedit"]
    assert "+0.0500 (+0.0400..+0.0600)" in line["flora"] and "better (all 3 seeds > 0)" in line["flora"]
    assert "ceiling" in line["centralised"]
    summary = {r["strategy"]: r for r in read_csv(tmp_path / "comparison.csv")}
    assert list(summary) == ["fedit", "flora", "ffa_lora", "centralised"]
    assert float(summary["fedit"]["final_accuracy_sd"]) == pytest.approx(0.02)
    assert summary["ffa_lora"]["verdict"] == "within seed noise"
    per_seed = read_csv(tmp_path / "comparison_seeds.csv")
    assert len(per_seed) == 12 and per_seed[0]["seed"] == "0" and per_seed[0]["run_dir"] == "seed_0/fedit"
    xs, ys, sds = report.band([tmp_path / f"seed_{s}/fedit" for s in range(3)], "round")
    assert xs == [0, 1, 2] and ys[2] == pytest.approx(0.82) and sds[2] == pytest.approx(0.02)
    assert (tmp_path / "accuracy_vs_round.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 0
    rounds = {(r["strategy"], r["round"]): r for r in read_csv(tmp_path / "comparison_rounds.csv")}
    assert len(rounds) == 12 and rounds[("fedit", "2")]["seeds"] == "3"
    assert float(rounds[("fedit", "2")]["eval_accuracy"]) == pytest.approx(0.82)
    assert float(rounds[("fedit", "2")]["eval_accuracy_sd"]) == pytest.approx(0.02)
    assert rounds[("fedit", "2")]["cross_term_error"] == ""  # no run reported one
    assert not (tmp_path / "cross_term_error_vs_round.png").exists()


def test_cross_term_error_per_round_next_to_accuracy(tmp_path):
    """Runs that report a cross-term error: its per-round mean and sd over seeds beside the accuracy, a plot; a round
    that some seed's run did not report stays empty rather than averaging the others."""
    errs = {0: [None, 0.6, 0.2], 1: [None, 0.4, None], 2: [None, 0.5, 0.3]}
    dirs = []
    for s, e in errs.items():
        d = fake_run(tmp_path / f"seed_{s}/fedit", [0.5, 0.7, 0.8 + s / 100])
        rows = report.read_metrics(d)
        for r, v in zip(rows, e):
            if v is not None:
                r["cross_term_error"] = v
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(d)
    rows = {r["round"]: r for r in report.round_rows({"fedit": dirs})}
    assert rows[1]["cross_term_error"] == pytest.approx(0.5) and rows[1]["cross_term_error_sd"] == pytest.approx(0.1)
    assert rows[2]["cross_term_error"] is None and rows[0]["cross_term_error"] is None
    assert rows[2]["eval_accuracy"] == pytest.approx(0.81) and rows[2]["seeds"] == 3
    report.plots(tmp_path, {"fedit": dirs})
    assert (tmp_path / "cross_term_error_vs_round.png").stat().st_size > 0


def test_one_seed_keeps_plain_values(tmp_path):
    seed_rows = constructed(tmp_path, seeds=(0,), best_val=False)
    table = report.write_comparison(tmp_path, seed_rows, 0.83, "tiny setting.", "fedit")
    assert "±" not in table and "verdict" not in table.splitlines()[0]
    assert "best test acc" in table and "| 0.8000 |" in table and "Δ final vs fedit |" in table
    assert report.aggregate(seed_rows, "fedit")[1]["final_accuracy_sd"] is None


def test_not_run_rows_and_options():
    rows = [report.not_run_row("lora_fair", "it needs one rank") | {"seed": s} for s in (0, 1)]
    (row,) = report.aggregate(rows, "fedit")
    assert row["seeds"] == 0 and row["note"] == "not run: it needs one rank" and row["final_accuracy"] is None
    assert cmp.parse_seeds("[0,1,2]", 7) == [0, 1, 2] and cmp.parse_seeds("3", 7) == [0, 1, 2]
    assert cmp.parse_seeds(None, 7) == [7] and cmp.parse_seeds([4, 5], 0) == [4, 5]
    for bad in ("[0,0]", "x", "0"):
        with pytest.raises(ConfigError, match="seeds="):
            cmp.parse_seeds(bad, 0)
    assert cmp.pick_baseline(None, ["flora", "hetlora"], "fedit") == "flora"
    assert cmp.pick_baseline("hetlora", ["flora", "hetlora"], "fedit") == "hetlora"
    with pytest.raises(ConfigError, match="baseline=fedsgd is not among the compared strategies"):
        cmp.pick_baseline("fedsgd", ["fedit", "flora"], "fedit")
    with pytest.raises(ConfigError, match="ceiling"):
        cmp.pick_baseline("centralised", ["fedit", "centralised"], "fedit")
    assert cmp.run_dir_of(Path("/o"), 1, "fedit", True) == Path("/o/seed_1/fedit")
    assert cmp.run_dir_of(Path("/o"), 1, "fedit", False) == Path("/o/fedit")


# ---------------------------------------------------------------- acceptance: same seed, same start
def _start(name: str, seed: int, tmp_path: Path):
    cfg = cmp.run_config(FAST, name, seed, tmp_path / f"seed_{seed}" / name)
    parts = [data.partition(cfg, pid) for pid in range(int(cfg.num_clients))]
    parts = [p.to_dict() for p in parts]  # the rows (text, label) in order: the same rows, the same order
    initial = adapters.from_peft(models.build(cfg).model)
    return parts, initial


def _same_adapter(a, b) -> bool:
    return a.lora.keys() == b.lora.keys() and all(
        torch.equal(a.lora[k].A, b.lora[k].A) and torch.equal(a.lora[k].B, b.lora[k].B) for k in a.lora)


def test_identical_partitions_and_initial_weights_across_strategies_for_a_seed(tmp_path):
    """As compare composes them: fedit and flora with seed 0 share every partition and the server's initial
    adapter; seed 1 gives other partitions and another initial A."""
    parts_fedit, init_fedit = _start("fedit", 0, tmp_path)
    parts_flora, init_flora = _start("flora", 0, tmp_path)
    assert parts_fedit == parts_flora and all(p["text"] for p in parts_fedit)
    assert _same_adapter(init_fedit, init_flora)
    parts_other, init_other = _start("fedit", 1, tmp_path)
    assert parts_other != parts_fedit
    assert not _same_adapter(init_fedit, init_other)


# ---------------------------------------------------------------- end to end (in-process grid, not Ray)
def _in_process_simulate(cfg, run_dir, verbose=False, resume=False):
    """:func:`fedlora.simulation.simulate` without Ray: the real ServerApp loop and ClientApp functions."""
    from harness import InProcessGrid

    from fedlora.strategies.server_app import run_server

    return run_server(InProcessGrid(int(cfg.num_clients)), cfg, Path(run_dir), echo=lambda *a, **k: None)


GRIDS = []  # the lr_grid each call of the stand-in centralised run was given


def _fake_centralised(cfg, run_dir, echo=print, lr_grid=None) -> dict:
    """Stands in for fedlora.centralised.run: a run directory in the federated format; it "chooses" 3e-3 from the
    grid (or the one lr it is given)."""
    GRIDS.append(lr_grid)
    fake_run(Path(run_dir), [0.5, 0.9 + 0.01 * int(cfg.seed)])
    chosen = config.from_yaml(config.to_yaml(cfg))
    chosen.train.lr = (lr_grid or [3e-3])[0]  # as the real one: its config holds the lr it chose
    (Path(run_dir) / "config.yaml").write_text(config.to_yaml(chosen))
    summary = {**json.loads((Path(run_dir) / "summary.json").read_text()), "lr": (lr_grid or [3e-3])[0]}
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary))
    return summary


def test_pairs_across_machines_are_flagged(tmp_path):
    """A run's summary records what computes its floats (fedlora.provenance); a paired difference between runs
    of one seed made on different machines is kept, and its row says in which seeds the machines differ."""
    env = provenance.environment()
    assert env["torch"] == torch.__version__ and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    here = provenance.fingerprint(env)
    assert here.startswith(f"torch {torch.__version__}, ") and provenance.fingerprint(None) == ""
    other = provenance.fingerprint(env | {"cpu_capability": "AVX2" if env["cpu_capability"] != "AVX2" else "AVX512"})
    assert other != here
    seed_rows = constructed(tmp_path)
    for r in seed_rows:  # seed 1's flora ran elsewhere; ffa_lora's seed 2 is an old run that recorded nothing
        r["environment"] = "" if (r["strategy"], r["seed"]) == ("ffa_lora", 2) else (
            other if (r["strategy"], r["seed"]) == ("flora", 1) else here)
    rows = {r["strategy"]: r for r in report.aggregate(seed_rows, "fedit")}
    assert rows["flora"]["note"] == ("paired with fedit across machines in seed 1 (comparison_seeds.csv: "
                                     "environment)")
    assert rows["flora"]["verdict"] == "better"  # the difference stands; the note says what it also holds
    assert rows["ffa_lora"]["note"] == "" and rows["fedit"]["note"] == ""  # unknown is not "different"
    # a run directory's summary carries the environment, and the comparison row its fingerprint
    rec = report.Recorder(tmp_path / "run", "seed: 0\n", 1, echo=lambda *a: None)
    rec.log_round({"round": 1, "eval_accuracy": 0.7, "bytes_up": 1, "bytes_down": 1})
    assert rec.summary({})["environment"] == env
    row = report.summarise("fedit", tmp_path / "run", 0.8)
    assert row["environment"] == here
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["environment"]["cpu"] == env["cpu"]


def test_compare_two_seeds_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(cmp, "simulate", _in_process_simulate)
    monkeypatch.setitem(sys.modules, "fedlora.centralised", types.SimpleNamespace(run=_fake_centralised))
    out = tmp_path / "cmp"
    GRIDS.clear()
    rows = cmp.compare(FAST, ["fedit", "ffa_lora"], 0.8, out, echo=lambda *a, **k: None, seeds=[0, 1])
    assert GRIDS == [None, [3e-3]]  # the lr grid is searched on the first seed; the next seed reuses its choice
    assert [(r["seed"], r["strategy"]) for r in rows] == [
        (0, "fedit"), (0, "ffa_lora"), (0, "centralised"), (1, "fedit"), (1, "ffa_lora"), (1, "centralised")]
    for r in rows:
        assert (out / r["run_dir"] / "summary.json").exists() and r["run_dir"].startswith(f"seed_{r['seed']}/")
        assert r["final_accuracy"] is not None
    cfgs = {r["run_dir"]: config.from_yaml((out / r["run_dir"] / "config.yaml").read_text())
            for r in rows if r["strategy"] != "centralised"}
    assert {(c.strategy.name, int(c.seed)) for c in cfgs.values()} == {(s, k) for s in ("fedit", "ffa_lora")
                                                                      for k in (0, 1)}
    table = report.write_comparison(out, rows, 0.8, cmp.describe(config.load(FAST), [0, 1]), "fedit")
    assert "seeds 0, 1" in (out / "comparison.md").read_text() and "ffa_lora" in table
    assert [r["strategy"] for r in read_csv(out / "comparison.csv")] == ["fedit", "ffa_lora", "centralised"]
    with pytest.raises(ConfigError, match="already holds a run"):  # refused before anything starts
        cmp.compare(FAST, ["fedit"], 0.8, out, echo=lambda *a, **k: None, seeds=[0, 1])


def test_compare_reuse_runs_only_what_a_comparison_lacks(tmp_path, monkeypatch):
    """compare.reuse: an interrupted comparison (a run directory missing) is finished by running that run alone;
    finished runs of the same setting are tabulated as they are, also with other simulation resources; a directory
    holding another setting, or a run that did not complete, is refused in one sentence before anything starts."""
    calls = []

    def counting_simulate(cfg, run_dir, verbose=False, resume=False):
        calls.append((cfg.strategy.name, int(cfg.seed)))
        return _in_process_simulate(cfg, run_dir)

    monkeypatch.setattr(cmp, "simulate", counting_simulate)
    monkeypatch.setitem(sys.modules, "fedlora.centralised", types.SimpleNamespace(run=_fake_centralised))
    out, quiet = tmp_path / "cmp", (lambda *a, **k: None)
    GRIDS.clear()
    first = cmp.compare(FAST, ["fedit", "ffa_lora"], 0.8, out, echo=quiet, seeds=[0, 1])
    shutil.rmtree(out / "seed_1" / "ffa_lora")  # interrupted during that run
    calls.clear(), GRIDS.clear()
    again = cmp.compare(FAST, ["fedit", "ffa_lora"], 0.8, out, echo=quiet, seeds=[0, 1], reuse=True)
    assert calls == [("ffa_lora", 1)] and GRIDS == []
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in first]
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in again][:4] == strip[:4]  # reused as they were
    assert again[4]["final_accuracy"] == first[4]["final_accuracy"]  # the same run again, seeded: same result
    calls.clear()  # where a run ran (Ray's CPUs, a cluster) is not its setting: all reused, nothing runs
    moved = cmp.compare(FAST + ["simulation.num_cpus=1"], ["fedit", "ffa_lora"], 0.8,
                        out, echo=quiet, seeds=[0, 1], reuse=True)
    assert calls == [] and [r["final_accuracy"] for r in moved] == [r["final_accuracy"] for r in again]
    with pytest.raises(ConfigError, match=r"compare.reuse: .*seed_0/fedit holds a run of another setting "
                                          r"\(train.lr=.* there, 0.001 planned"):
        cmp.compare(FAST + ["train.lr=1e-3"], ["fedit"], 0.8, out, echo=quiet, seeds=[0, 1], reuse=True)
    summary = out / "seed_0" / "fedit" / "summary.json"
    summary.write_text(json.dumps(json.loads(summary.read_text()) | {"status": "stopped"}))
    with pytest.raises(ConfigError, match=r"holds a run that did not complete \(status stopped\)"):
        cmp.compare(FAST, ["fedit"], 0.8, out, echo=quiet, seeds=[0, 1], reuse=True)
    assert calls == []  # nothing ran for the refused comparisons


# ---------------------------------------------------------------- each strategy its own hyper-parameters
def test_own_overrides_are_parsed_checked_and_applied_to_one_strategy_alone(tmp_path):
    """``NAME:KEY=VALUE`` sets a hyper-parameter of one compared strategy (its tuned alpha, lr, A init) and leaves
    the others' configs, and everything the strategies share, as they were; a key every strategy must share, a
    strategy not compared, or a key the config lacks is refused in one sentence naming the override."""
    argv = FAST + ["ffa_lora:model.lora.alpha=128", "ffa_lora:strategy.a_init=orthogonal", "fedit:train.lr=1e-3",
                   "data.path=/x:y"]
    own = cmp.pop_own_overrides(argv)
    assert own == {"ffa_lora": ["model.lora.alpha=128", "strategy.a_init=orthogonal"], "fedit": ["train.lr=1e-3"]}
    assert argv == FAST + ["data.path=/x:y"]  # a value holding ':' is a plain override, left in place
    assert cmp.describe_own(own) == ("Per-strategy settings: ffa_lora: model.lora.alpha=128, "
                                     "strategy.a_init=orthogonal; fedit: train.lr=1e-3.")
    ffa = cmp.run_config(FAST, "ffa_lora", 0, tmp_path / "ffa", own["ffa_lora"])
    fedit = cmp.run_config(FAST, "fedit", 0, tmp_path / "fedit", own["fedit"])
    plain = cmp.run_config(FAST, "fedit", 0, tmp_path / "plain")
    assert ffa.model.lora.alpha == 128 and ffa.strategy.a_init == "orthogonal" and ffa.train.lr == plain.train.lr
    assert fedit.train.lr == 1e-3 and fedit.model.lora.alpha == plain.model.lora.alpha
    shared = {k: v for k, v in config.flat(plain).items()
              if not k.startswith(("strategy.", "out_dir", "train.lr", "model.lora.alpha"))}
    assert {k: config.flat(ffa)[k] for k in shared} == shared  # everything else the same
    for bad, says in [("ffa_lora:num_rounds=5", "num_rounds is not one strategy's own hyper-parameter"),
                      ("ffa_lora:model.lora.r=16", "model.lora.r is not one strategy's own"),
                      ("flora:strategy=fedit", "strategy is not one strategy's own")]:
        with pytest.raises(ConfigError, match=says):
            cmp.pop_own_overrides([bad])
    quiet = lambda *a, **k: None  # noqa: E731
    with pytest.raises(ConfigError, match=r"flora:train.lr=1e-3 names flora, which is not compared here"):
        cmp.compare(FAST, ["fedit", "ffa_lora"], 0.8, tmp_path / "o1", echo=quiet, own={"flora": ["train.lr=1e-3"]})
    with pytest.raises(ConfigError, match=r"^ffa_lora:strategy.no_such_key=1: "):
        cmp.compare(FAST, ["fedit", "ffa_lora"], 0.8, tmp_path / "o2", echo=quiet,
                    own={"ffa_lora": ["strategy.no_such_key=1"]})
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # refused before anything started


def test_variants_run_their_strategy_with_settings_of_their_own(tmp_path):
    """``STRATEGY@TAG`` is a variant: the same strategy, run with its own settings (FedProx, SCAFFOLD, a server
    optimizer: how drift controls are compared against plain averaging), in its own directory and row; the plain
    strategy keeps the shared settings. A variant without settings, of an unknown strategy, or listed twice is
    refused in one sentence before anything starts."""
    argv = FAST + ["fedit@prox:train.prox_mu=0.01", "fedit@adam:server.optimizer=adam", "fedit@adam:server.lr=0.05",
                   "fedit@scaffold:train.scaffold=true"]
    own = cmp.pop_own_overrides(argv)
    assert argv == FAST and set(own) == {"fedit@prox", "fedit@adam", "fedit@scaffold"}
    names = ["fedit", "fedit@prox", "fedit@adam", "fedit@scaffold"]
    cmp.check_names(names, own)
    plan = cmp._plan(FAST, names, [0], tmp_path / "out", False, own=own)
    assert [(n, d.name, refusal) for _, n, d, _, refusal, _ in plan] == [(n, n, None) for n in names]
    cfgs = {n: cfg for _, n, _, cfg, _, _ in plan}
    assert {c.strategy.name for c in cfgs.values()} == {"fedit"}
    assert (cfgs["fedit"].train.prox_mu, cfgs["fedit"].server.optimizer, cfgs["fedit"].train.scaffold) == (0.0, "avg",
                                                                                                            False)
    assert cfgs["fedit@prox"].train.prox_mu == 0.01 and cfgs["fedit@prox"].server.optimizer == "avg"
    assert (cfgs["fedit@adam"].server.optimizer, cfgs["fedit@adam"].server.lr) == ("adam", 0.05)
    assert cfgs["fedit@scaffold"].train.scaffold is True and cfgs["fedit@scaffold"].train.prox_mu == 0.0
    shared = lambda c: {k: v for k, v in config.flat(c).items()  # noqa: E731
                        if not k.startswith(("out_dir", "train.prox_mu", "train.scaffold", "server."))}
    assert all(shared(c) == shared(cfgs["fedit"]) for c in cfgs.values())
    for bad, own_, says in [(["fedit", "fedit@x"], {}, "fedit@x in strategies=.* is a variant of fedit with no "
                                                       "settings of its own"),
                            (["fedit", "nope@x"], {"nope@x": ["train.lr=1"]}, "unknown strategy 'nope@x'"),
                            (["fedit", "fedit@a b"], {}, "unknown strategy 'fedit@a b'"),
                            (["fedit", "fedit"], {}, "names a strategy twice")]:
        with pytest.raises(ConfigError, match=says):
            cmp.compare(FAST, bad, 0.8, tmp_path / "o", echo=lambda *a, **k: None, own=own_)
    assert not (tmp_path / "o").exists()
    # a variant its strategy refuses (no server optimizer on FLoRA's stack) is a "not run" row, as a refused strategy
    plan = cmp._plan(FAST, ["flora", "flora@adam"], [0], tmp_path / "o3", False, own={"flora@adam": [
        "server.optimizer=adam"]})
    assert plan[0][4] is None and "server.optimizer" in str(plan[1][4]) and plan[1][3] is None
