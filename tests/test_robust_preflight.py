"""Issue 20, items 1-3: one pre-flight for every entry point refuses bad input in one sentence that names the key
(item 1), a resume may change only a documented set of keys (item 2), and labels outside the model's classes never
reach the loss (item 3). Fast: the pre-flight functions are called directly (no Ray), on tiny_llama and small files
or the SST-2 files beside the checkout."""

import subprocess

import pytest
import torch
from conftest import ROOT, fedlora_cmd

from fedlora import batching, checkpoint, config, data, preflight, train
from fedlora.config import ConfigError

BASE = ["model=tiny_llama", "num_rounds=1", "num_clients=2"]


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and "Traceback" not in msg


@pytest.fixture
def files(tmp_path):
    """Small data files for the table: a malformed tsv, 3-class data, Alpaca data, a labelled folder."""
    (tmp_path / "bad.tsv").write_text("label\tsentence\n1\tok\n1\tok\textra\tcolumns\n")
    (tmp_path / "three.csv").write_text("text,label\n" + "\n".join(f"row {i},{i % 3}" for i in range(60)))
    (tmp_path / "alpaca.jsonl").write_text("\n".join(
        f'{{"instruction": "add {i} and 1", "input": "", "output": "{i + 1}"}}' for i in range(40)))
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "metrics.jsonl").write_text('{"round": 0}\n')
    return tmp_path


# (overrides, the key the sentence must name, a phrase of the sentence); {tmp} is the `files` folder
REFUSALS = [
    # the README's examples and the refusals that existed before
    (["strategy=nope"], "strategy", "unknown strategy 'nope'"),
    (["data.path=/nonexistent/sst2"], "data.path", "does not exist"),
    (["data.path={tmp}/bad.tsv"], "data.format", "could not be read as tsv"),
    (["strategy=fedit", "client_ranks=[4,8]"], "client_ranks", "needs one rank for every client"),
    (["num_clients=100000"], "num_clients", "more than the"),
    (["diagnostics=sometimes"], "diagnostics", "must be true or false"),
    (["out_dir={tmp}/held"], "resume=", "already holds a run"),
    (["model.lora.r=0"], "model.lora.r", "must be an integer >= 1"),
    (["fraction_train=1.5"], "fraction_train", "is outside (0, 1]"),
    (["num_rounds=0"], "num_rounds", "must be an integer >= 1"),
    (["min_train_nodes=20"], "min_train_nodes", "must be between 1 and num_clients"),
    (["model=hf"], "model.source", "model=hf needs model.source"),
    (["model=gpt9"], "model", "unknown model 'gpt9'"),
    (["strategy=flora", "privacy=client_level"], "client_dp", "client_dp works with"),
    (["strategy=lora_fair", "strategy.solver=bogus"], "strategy.solver", "is not a LoRA-FAIR solver"),
    # issue 20 item 1: each of these passed start-up before
    (["train.lr=abc"], "train.lr", "is not a number"),
    (["train.batch_size=abc"], "train.batch_size", "is not a number"),
    (["seed=abc"], "seed", "is not a number"),
    (["partitioner=dirichlet", "partitioner.alpha=abc"], "partitioner.alpha", "is not a number"),
    (["audit=yes"], "audit", "must be true or false"),
    (["eval.batch_size=0"], "eval.batch_size", "must be an integer >= 1"),
    (["eval.max_examples=-1"], "eval.max_examples", "must be an integer >= 1 (or null)"),
    (["round_timeout=0"], "round_timeout", "must be a number > 0"),
    (["train.max_length=0"], "train.max_length", "must be an integer >= 2"),
    (["simulation.num_cpus=0"], "simulation.num_cpus", "must be an integer >= 1"),
    (["local_steps=null", "local_epochs=null"], "local_epochs", "are both null"),
    (["strategy=lora_fair", "strategy.lam=-1"], "strategy.lam", "must be a number >= 0"),
    (["strategy=ffa_lora", "strategy.lr_multiplier=0"], "strategy.lr_multiplier", "must be a number > 0"),
    (["model.lora.target_modules=[nothere]"], "model.lora.target_modules", "matches no module"),
    (["model.lora.target_modules=[norm]"], "model.lora.target_modules", "cannot be adapted"),
    (["model.lora.modules_to_save=[bogus]"], "model.lora.modules_to_save", "no module of model=tiny_llama"),
    (["model.task=seq-cls"], "model.task", "tiny_llama is a causal LM"),
    (["partitioner=label_skew", "partitioner.proportions=[[0.3,0.3,0.4],[0.3,0.3,0.4]]"],
     "partitioner.proportions", "gives 3 shares per client but data=sst2 has 2 classes"),
    (["partitioner=label_skew", "partitioner.proportions=[[-0.5,1.5],[0.5,0.5]]"],
     "partitioner.proportions", "must hold numbers >= 0"),
    (["partitioner=label_skew", "partitioner.proportions=[[0.9,0.9],[0.5,0.5]]"],
     "partitioner.proportions", "sums to 1.8 > 1"),
    (["partitioner=label_skew", "partitioner.proportions=[[0,0],[0.5,0.5]]"], "partitioner.proportions", "all zeros"),
    (["partitioner=label_skew"], "num_clients", "3 rows of proportions but num_clients=2"),
    (["client_ranks=[4,4,4]"], "client_ranks", "has 3 ranks but num_clients=2"),
    (["client_ranks=[]"], "client_ranks", "non-empty list of integer ranks"),
    (["client_ranks=abc"], "client_ranks", "is not a rank, a list or profile"),
    (["client_ranks=profile"], "client_ranks", "which only strategy=fedpipe does"),
    (["strategy=fedpipe", "client_ranks=[4,8]"], "client_ranks", "would be ignored"),
    (["privacy=dp_sgd", "privacy.target_delta=0.5"], "privacy.target_delta", "is not below 1/n"),
    (["privacy=client_level", "privacy.target_delta=0.6"], "privacy.target_delta", "is not below 1/num_clients"),
    (["model=minilm", "data=local", "data.path={tmp}/three.csv"], "model.num_labels",
     "has label 2 but model.num_labels=2"),
    (["data=local", "data.path={tmp}/three.csv", "data.label_words=[neg,pos]"], "data.label_words",
     "has a word for labels 0..1 only"),
    (["data.label_words=null"], "data.label_words", "needs one label word per class"),
    (["data.label_words=[neg,negative]"], "data.label_words", "share their first token"),
    (["model=minilm", "data=alpaca", "data.path={tmp}/alpaca.jsonl"], "model.task", "is instruction data"),
    (["data=alpaca", "data.path={tmp}/alpaca.jsonl", "partitioner=dirichlet"], "partitioner", "use partitioner=iid"),
    (["eval.client_side=true"], "eval.client_side", "is no longer a setting"),
    (["+eval.client_side=true"], "eval.client_side", "is no longer a setting"),
    (["eval.bacth_size=8"], "eval.bacth_size", "is not a key of the config"),
]


@pytest.mark.parametrize("overrides, key, phrase", REFUSALS, ids=[" ".join(r[0]) for r in REFUSALS])
def test_robust_1_every_refusal_is_one_sentence_naming_the_key(files, overrides, key, phrase):
    """Every refusal of the pre-flight (the one ``fedlora run``, ``compare``, ``resume=`` and ``flwr run .`` call):
    a ConfigError, before anything starts, in one sentence that names the key and the fix."""
    overrides = [o.replace("{tmp}", str(files)) for o in overrides]
    with pytest.raises(ConfigError) as e:
        preflight.prepare(BASE + overrides, run_dir=None if any("out_dir" in o for o in overrides)
                          else files / "fresh")
    msg = str(e.value)
    assert phrase in msg and key in msg, msg
    assert one_sentence(msg), msg


def test_robust_1_fedpipe_takes_client_ranks_profile(tmp_path):
    """``client_ranks: profile`` (documented in conf/config.yaml) works with fedpipe, whose plan sets the ranks."""
    cfg, _, _ = preflight.prepare(BASE + ["strategy=fedpipe", "client_ranks=profile"], run_dir=tmp_path / "r")
    assert config.client_ranks(cfg) == [cfg.model.lora.r] * 2


def test_robust_1_cli_exits_2_before_anything_starts(tmp_path):
    """``fedlora run`` with a bad value exits 2 with the sentence: no run directory, no start banner, no traceback."""
    out = tmp_path / "run"
    p = subprocess.run(fedlora_cmd("run", *BASE, "train.lr=abc", f"out_dir={out}"), capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: train.lr=abc is not a number: give e.g. train.lr=0.005."], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "fedlora:" not in p.stdout and not out.exists()


# ----------------------------------------------------------------------------------------------
# item 2: resume= accepts only a documented set of overrides
# ----------------------------------------------------------------------------------------------
def saved_run(tmp_path, *extra):
    """A run directory with a saved config and a checkpoint (what the pre-flight of ``resume=`` reads)."""
    d = tmp_path / "saved"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(config.to_yaml(config.load(BASE + ["num_rounds=2", *extra])))
    checkpoint.save(d, {"round": 1})
    return d


@pytest.mark.parametrize("overrides, phrase", [
    (["strategy=flora"], "resume cannot switch the config group strategy"),
    (["strategy.name=flora"], "resume cannot change strategy.name (from fedit to flora)"),
    (["seed=1"], "resume cannot change seed (from 0 to 1)"),
    (["num_clients=3"], "resume cannot change num_clients (from 2 to 3)"),
    (["client_ranks=[4,8]"], "resume cannot change client_ranks"),
    (["train.lr=0.1"], "resume cannot change train.lr"),
    (["eval.max_examples=10"], "resume cannot change eval.max_examples (from null to 10)"),
    (["model.lora.r=4"], "resume cannot change model.lora.r"),
    (["privacy.mode=dp_sgd"], "cannot change the privacy mode from none to dp_sgd"),
    (["privacy.target_delta=0.001"], "resume cannot change privacy.target_delta (from unset to 0.001)"),
    (["+foo=1"], "resume cannot change +foo"),
    (["num_rounds=abc"], "num_rounds=abc is not a number"),
])
def test_robust_2_resume_refuses_what_is_not_allowed(tmp_path, overrides, phrase):
    d = saved_run(tmp_path)
    with pytest.raises(ConfigError) as e:
        preflight.prepare([f"resume={d}", *overrides])
    assert phrase in str(e.value) and one_sentence(str(e.value)), str(e.value)


def test_robust_2_resume_allows_rounds_and_run_time_knobs(tmp_path):
    d = saved_run(tmp_path)
    allowed = ["num_rounds=5", "round_timeout=30", "eval.batch_size=8", "audit=true", "kernels=torch",
               "simulation.num_cpus=1", "debug.sleep_s=0", "seed=0"]  # seed=0: the saved value, no change
    cfg, rdir, resume = preflight.prepare([f"resume={d}", *allowed])
    assert (rdir, resume) == (d.resolve(), True)
    assert (cfg.num_rounds, cfg.round_timeout, cfg.eval.batch_size, cfg.audit, cfg.kernels) == (5, 30, 8, True, "torch")
    assert all(preflight.resume_allows(k) for k in ("num_rounds", "round_timeout", "simulation.client_cpus"))
    assert not any(preflight.resume_allows(k) for k in ("seed", "strategy.name", "num_clients", "privacy.mode"))


# ----------------------------------------------------------------------------------------------
# item 3: labels out of range never reach the loss
# ----------------------------------------------------------------------------------------------
def _folder(tmp_path, test_labels):
    d = tmp_path / "reviews"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(f"good film {i}\t{i % 2}" for i in range(40)) + "\n")
    (d / "test.tsv").write_text("sentence\tlabel\n" + "\n".join(f"review {i}\t{lab}" for i, lab in
                                                                 enumerate(test_labels)) + "\n")
    return d


def _tiny_seq_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(conf).eval()


class _Tok:
    """A byte tokenizer with the call signature the seq-cls collator uses (padding, tensors)."""

    def __call__(self, texts, truncation=True, max_length=16, padding=True, return_tensors="pt"):
        ids = [[b + 3 for b in t.encode()][:max_length] for t in texts]
        width = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}


def test_robust_3_unlabelled_test_rows_are_dropped_with_a_count(tmp_path):
    """A test split partly unlabelled (-1): those rows are dropped, their count in a warning, and evaluation runs on
    the labelled rows, for a seq-cls model and for a causal LM scoring label words. The collator refuses a label
    outside the classes instead of guessing (a -1 used to become the last label word)."""
    d = _folder(tmp_path, [0, 1, -1, 1, -1, 0, -1, 1])
    with pytest.warns(UserWarning, match=r"dropped 3 unlabelled rows \(negative label\) of the 8 rows"):
        cfg = config.load(["model=tiny_llama", "data=local", f"data.path={d}", "data.text_column=sentence",
                           "data.label_words=[negative,positive]", "num_clients=2", "train.max_length=32"])
        _, test = data.load(cfg.data)
    assert list(test["label"]) == [0, 1, 1, 0, 1]
    preflight.check_setting(cfg)  # the rest passes: the labelled rows are classes the model holds

    # causal LM: accuracy over the 5 labelled rows, read off the label words' logits
    from fedlora import models

    bundle = models.build(cfg)
    coll = batching.Collator(bundle.tokenizer, bundle.task, 32, cfg.data.label_words)
    res = train.evaluate(bundle.model, test, coll, task=bundle.task, batch_size=4)
    assert 0.0 <= res["eval_accuracy"] <= 1.0 and res["eval_loss"] > 0
    with pytest.raises(data.DataError, match=r"label -1 is not a class id in \[0, 2\)"):
        coll([{"text": "unlabelled", "label": -1}])
    with pytest.raises(data.DataError, match=r"label 2 is not a class id in \[0, 2\)"):
        coll([{"text": "a third class", "label": 2}])

    # seq-cls: the same split evaluates; a -1 row is refused by the collator, never fed to cross-entropy
    seq = batching.Collator(_Tok(), "seq-cls", 16)
    res = train.evaluate(_tiny_seq_cls(), test, seq, task="seq-cls", batch_size=4)
    assert 0.0 <= res["eval_accuracy"] <= 1.0
    with pytest.raises(data.DataError, match="label -1 is not a class id"):
        seq([{"text": "unlabelled", "label": -1}])


def test_robust_3_unlabelled_training_rows_are_refused(tmp_path):
    d = _folder(tmp_path, [0, 1])
    (d / "train.tsv").write_text((d / "train.tsv").read_text() + "no label\t-1\n")
    with pytest.raises(data.DataError) as e:
        preflight.prepare(["model=tiny_llama", "data=local", f"data.path={d}", "data.text_column=sentence",
                           "data.label_words=[negative,positive]", "num_clients=2"], run_dir=tmp_path / "r")
    assert "1 of the 41 training rows have a negative label" in str(e.value) and one_sentence(str(e.value))


def test_robust_3_fully_unlabelled_test_split_is_replaced_with_a_note(tmp_path):
    d = _folder(tmp_path, [-1, -1, -1])
    cfg = config.load(["data=local", f"data.path={d}", "data.text_column=sentence"])
    with pytest.warns(UserWarning, match=r"test split of .* is unlabelled \(3 rows"):
        train_ds, test = data.load(cfg.data)
    assert len(test) == 4 and len(train_ds) == 36 and min(test["label"]) >= 0  # 10% of the 40 training rows
