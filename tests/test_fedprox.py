"""FedProx (``train.prox_mu``, :func:`fedlora.train.local_train` and ``local_train_dp``): the proximal term's gradient
is mu·(w − w0); 0 changes nothing (bit for bit); mu > 0 keeps the local update closer to where the round started;
under DP-SGD the term is added after the clipping and noise (exactly mu·(w − w0) on the noised step); and the knob
reaches the client's loop from the run config."""

from __future__ import annotations

import re

import pytest
import torch
from test_train_loops import BATCH, collate, rows, tiny_bert, trained

from fedlora import config, train
from fedlora import privacy as P

COMMON = dict(steps=4, batch_size=BATCH, lr=5e-3, step_offset=0, total_steps=4, scheduler="constant",
              max_grad_norm=1.0, seed=1, round_idx=1, task="seq-cls")


def distance(a: dict, b: dict) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)) ** 0.5


def test_prox_term_gradient_is_mu_times_the_distance():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)]
    anchors = [p.detach() + 0.1 * torch.randn(p.shape, generator=g) for p in params]
    mu = 0.37
    loss = train.prox_term(params, anchors, mu)
    want = 0.5 * mu * sum(float(((p.detach().double() - a.double()) ** 2).sum()) for p, a in zip(params, anchors))
    assert abs(float(loss) - want) <= 1e-6 * want
    grads = torch.autograd.grad(loss, params)
    for p, a, gr in zip(params, anchors, grads):
        torch.testing.assert_close(gr, mu * (p.detach() - a), rtol=1e-6, atol=1e-7)
    # add_prox_grad adds the same gradient (to an existing one, or as the only one), and skips frozen parameters
    frozen = torch.zeros(2, requires_grad=False)
    params[0].grad = torch.ones(4, 3)
    train.add_prox_grad(params + [frozen], anchors + [torch.ones(2)], mu)
    torch.testing.assert_close(params[0].grad, 1 + mu * (params[0].detach() - anchors[0]))
    torch.testing.assert_close(params[1].grad, mu * (params[1].detach() - anchors[1]))
    assert frozen.grad is None
    assert train.prox_anchors(params, 0.0) is None


def local(prox_mu=None, **kw):
    model = tiny_bert()
    start = trained(model)
    args = {**COMMON, **kw}
    if prox_mu is not None:
        args["prox_mu"] = prox_mu
    train.local_train(model, rows(), collate, **args)
    return start, trained(model)


def test_prox_mu_zero_is_bit_identical_and_mu_keeps_the_update_closer():
    start, plain = local()
    _, zero = local(prox_mu=0.0)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    _, prox = local(prox_mu=5.0)
    assert start.keys() == prox.keys()
    d_plain, d_prox = distance(plain, start), distance(prox, start)
    assert 0 < d_prox < d_plain, (d_prox, d_plain)


def dp_round(prox_mu, steps):
    model = tiny_bert()
    start = trained(model)
    dp = P.DPConfig(noise_multiplier=0.7, max_grad_norm=0.5)
    train.local_train_dp(model, rows(), collate, dp_cfg=dp, noise_multiplier=0.7, accountant_state=None, steps=steps,
                         batch_size=BATCH, lr=0.05, step_offset=0, total_steps=steps, scheduler="constant",
                         task="seq-cls", rng_seed=(4, 2), optimizer="sgd", momentum=0.0, prox_mu=prox_mu)
    return start, trained(model)


def test_dp_sgd_adds_the_prox_gradient_after_clipping_and_noise():
    """Plain SGD, same seed: step 1 starts at w0 (no prox gradient), so both runs reach the same w1; step 2's clipped
    and noised gradient, taken at w1, is the same in both, and the prox run then moves by exactly
    −lr·mu·(w1 − w0) more. Had the term gone through Opacus' per-example clipping, it would be clipped and scaled."""
    mu, lr = 3.0, 0.05
    w0, w1 = dp_round(0.0, 1)
    _, w2 = dp_round(0.0, 2)
    _, w2_prox = dp_round(mu, 2)
    moved = [k for k in w0 if not torch.equal(w1[k], w0[k])]
    assert moved  # the trainable parameters (LoRA B and A, the head)
    for k in w0:
        torch.testing.assert_close(w2_prox[k], w2[k] - lr * mu * (w1[k] - w0[k]), rtol=1e-5, atol=1e-6)
    assert distance(w2_prox, w0) < distance(w2, w0)


def test_prox_mu_reaches_the_clients_loop_from_the_run_config(tmp_path, monkeypatch):
    from harness import InProcessGrid

    from fedlora.strategies.server_app import run_server

    seen = []
    real = train.local_train

    def spy(*a, **k):
        seen.append(k.get("prox_mu"))
        return real(*a, **k)

    monkeypatch.setattr(train, "local_train", spy)
    cfg = config.load(["model=tiny_llama", "num_clients=3", "num_rounds=1", "local_steps=1", "train.batch_size=4",
                       "eval.max_examples=8", "train.max_length=32", "train.prox_mu=0.01"])
    assert "prox_mu" in config.for_clients(cfg).train  # what the node receives in the handshake
    run_server(InProcessGrid(3), cfg, tmp_path / "run", echo=lambda *_: None)
    assert seen == [0.01] * 3


@pytest.mark.parametrize("override, says", [("train.prox_mu=-0.1", "train.prox_mu=-0.1 must be a number >= 0"),
                                            ("client.prox_mu=0.01", "train.prox_mu"),
                                            ("train.prox_mu=inf", "must be a number >= 0")])
def test_bad_prox_mu_is_one_sentence(override, says):
    with pytest.raises(config.ConfigError) as e:
        config.load([override])
    assert says in str(e.value) and not re.search(r"\.\s+[A-Z]", str(e.value))  # one sentence
