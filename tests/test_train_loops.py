"""The local training loops (fedlora.train) on a tiny BERT: micro-batches (train.micro_batch_size, a batch split
into length-ordered, padding-trimmed pieces) give the same step as the whole batch, without DP (gradient
accumulation) and with DP-SGD (Opacus' physical batches: same clipped sum, noise and accounting); a seeded DP
round is reproducible, dropout included."""

from __future__ import annotations

import pytest
import torch

from fedlora import privacy as P
from fedlora import train

N, SEQ, BATCH = 32, 12, 8


def rows():
    """Right-padded classification rows of lengths 3..SEQ, as a text collator makes them."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(1, 200, (N, SEQ), generator=g)
    y = torch.randint(0, 2, (N,), generator=g)
    out = []
    for i in range(N):
        mask = (torch.arange(SEQ) < 3 + (7 * i) % (SEQ - 2)).long()
        out.append({"input_ids": x[i] * mask, "attention_mask": mask, "labels": y[i]})
    return out


def collate(items):
    return {k: torch.stack([it[k] for it in items]) if items else torch.zeros(0, SEQ, dtype=torch.long)
            for k in ("input_ids", "attention_mask", "labels")}


def tiny_bert(dropout: float = 0.0, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2)
    model = get_peft_model(BertForSequenceClassification(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=dropout,
                                      modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return model.to(dtype)


def trained(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "classifier" in k}


def test_micro_batches_sort_split_and_trim_padding():
    batch = collate(rows()[:10])
    pieces = train.micro_batches(batch, 4)
    assert [len(p["labels"]) for p in pieces] == [4, 4, 2]
    lengths = [p["attention_mask"].sum(1) for p in pieces]
    assert all(p["input_ids"].shape[1] == int(n.max()) for p, n in zip(pieces, lengths))  # no spare padding
    assert torch.equal(torch.cat(lengths), torch.sort(batch["attention_mask"].sum(1)).values)  # length order
    padded = [torch.nn.functional.pad(p["input_ids"], (0, SEQ - p["input_ids"].shape[1])) for p in pieces]
    assert sorted(map(tuple, torch.cat(padded).tolist())) == sorted(map(tuple, batch["input_ids"].tolist()))
    assert train.micro_batches(batch, None) == [batch] and train.micro_batches(batch, 10) == [batch]
    left = {k: v.flip(1) if v.dim() == 2 else v for k, v in batch.items()}  # left padding: columns kept
    assert all(p["input_ids"].shape[1] == SEQ for p in train.micro_batches(left, 4))


# The two micro-batch tests run in float64: a whole batch and its pieces sum in other orders. What float32 is left
# (fedlora.train's losses take fp32 logits; Opacus scales per piece) rounds element-wise in the same order on
# every CPU; its effect (~1e-7 of the weights) and the float64 differences (~1e-15) stay far below the tolerances.
F64 = torch.float64


def test_micro_batches_give_the_same_step_without_dp():
    out = []
    for micro in (None, 3):
        model = tiny_bert(dtype=F64)
        r = train.local_train(model, rows(), collate, steps=3, batch_size=BATCH, lr=1e-2, step_offset=0, total_steps=3,
                              seed=1, round_idx=1, micro_batch_size=micro)
        out.append((trained(model), r["train_loss"]))
    (w1, l1), (w2, l2) = out
    assert abs(l1 - l2) < 1e-5  # fp32 means of <= 8 losses (~0.7), any order: within 2 gamma_12 (~1e-6) of each other
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(v, trained(tiny_bert(dtype=F64))[k]) for k, v in w1.items())  # it did train


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_micro_batches_give_the_same_dp_step(optimizer):
    """Same clipped sum, same noise, same accounting as the whole Poisson batch."""
    out = []
    for micro in (None, 3):
        model = tiny_bert(dtype=F64)
        r = train.local_train_dp(model, rows(), collate, dp_cfg=P.DPConfig(noise_multiplier=0.7, target_delta=1e-3),
                                 noise_multiplier=0.7, accountant_state=None, steps=3, batch_size=BATCH, lr=0.05,
                                 step_offset=0, total_steps=3, rng_seed=(4, 0, 1), optimizer=optimizer,
                                 micro_batch_size=micro)
        out.append((trained(model), r))
    (w1, r1), (w2, r2) = out
    assert r1["accountant"] == r2["accountant"] and r1["epsilon"] == r2["epsilon"]
    assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-5
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(v, trained(tiny_bert(dtype=F64))[k]) for k, v in w1.items())


def test_reproducible_dp_round_seeds_dropout_too():
    """A seeded DP round (privacy.reproducible) gives the same adapter whatever the worker's RNG did before: its
    Poisson draws, noise and dropout all come from the seed; another seed gives another result."""
    model = tiny_bert(dropout=0.3)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def one(global_draws: int, seed):
        model.load_state_dict(start)
        torch.rand(global_draws)  # other clients' work in the same process moves the global RNG
        train.local_train_dp(model, rows(), collate, dp_cfg=P.DPConfig(noise_multiplier=0.5, target_delta=1e-3),
                             noise_multiplier=0.5, accountant_state=None, steps=3, batch_size=BATCH, lr=0.05,
                             step_offset=0, total_steps=3, rng_seed=seed, optimizer="sgd")
        return trained(model)

    a, b, c = one(1, (0, 1, 2)), one(1000, (0, 1, 2)), one(1, (0, 1, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_train_A_freezes_exactly_the_A_factors_and_a_B_only_step_keeps_A():
    """FFA-LoRA's switch (fedlora.adapters.train_A): every lora_A frozen, B and the head still train; undone by True."""
    from fedlora import adapters

    model = tiny_bert()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    adapters.train_A(model, False)
    frozen = {n for n, p in model.named_parameters() if before[n] and not p.requires_grad}
    assert frozen and frozen == {n for n in before if ".lora_A." in n}
    assert any(p.requires_grad for n, p in model.named_parameters() if ".lora_B." in n)
    A0 = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    train.local_train(model, rows(), collate, steps=2, batch_size=BATCH, lr=1e-2, step_offset=0, total_steps=2,
                      seed=0)
    for n, p in model.named_parameters():
        if n in A0:
            assert torch.equal(p, A0[n]), n
    adapters.train_A(model, True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_evaluation_in_length_order_gives_the_same_figures_with_less_padding():
    """evaluate() batches rows by text length: the same accuracy, and the same loss up to float rounding, with
    fewer padded tokens than dataset order. The model runs in float64, so a row's logits do not depend on its
    batch beyond float64 rounding; evaluate() casts them to float32 (a row's cross-entropy may move by a few
    u32 relative) and sums each batch's non-negative cross-entropies in float32 (gamma_16 relative, whatever
    the order). So the two means differ by at most 2 gamma_{16+4}(u32) relative, on any machine."""
    from tolerances import float64_model, gamma

    from fedlora import batching, config, data, models

    cfg = config.load(["model=minilm", "data.max_train_examples=200", "train.max_length=32"])  # pads per batch
    bundle = models.build(cfg)
    float64_model(bundle.model)
    _, validation, test = data.split(cfg)
    coll = batching.Collator(bundle.tokenizer, bundle.task, 32, cfg.data.get("label_words"))
    kw = dict(task=bundle.task, batch_size=16, max_examples=120)
    a = train.evaluate(bundle.model, test, coll, by_length=True, **kw)
    b = train.evaluate(bundle.model, test, coll, by_length=False, **kw)
    assert a["eval_accuracy"] == b["eval_accuracy"]
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=2 * gamma(16 + 4))
    rows = [test[i] for i in range(120)]

    def padded(order):
        return sum(int(coll([rows[i] for i in order[s:s + 16]])["input_ids"].numel()) for s in range(0, 120, 16))

    by_len = sorted(range(120), key=lambda i: sum(len(v) for v in rows[i].values() if isinstance(v, str)))
    assert padded(by_len) < padded(list(range(120)))
