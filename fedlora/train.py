"""Local training and evaluation: plain loops, nothing federated in here."""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .models import autocast
from .scaffold import apply_correction


def lr_at(step: int, total: int, base_lr: float, scheduler: str, warmup: int = 0) -> float:
    """Learning rate at global step ``step`` of ``total`` (the whole run, so rounds continue one schedule)."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if scheduler == "linear":
        return base_lr * (1.0 - frac)
    if scheduler == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return base_lr


def batch_indices(n: int, batch_size: int, steps: int, seed: int, round_idx: int) -> list[np.ndarray]:
    """``steps`` mini-batches of example indices, drawn epoch-wise from a seeded permutation per round."""
    rng = np.random.default_rng([seed, round_idx])
    out, perm, pos = [], rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch_size > n and pos > 0:
            perm, pos = rng.permutation(n), 0
        out.append(perm[pos: pos + batch_size])
        pos += batch_size
    return out


@contextlib.contextmanager
def seeded_dropout(seed_words, device):
    """Dropout (torch's global RNG) seeded from ``seed_words`` inside the block, the caller's RNG state restored
    after it: a round's result then does not depend on which simulation worker ran which client before.
    ``seed_words=None``: the worker's own RNG, untouched."""
    if seed_words is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(int(np.random.default_rng([int(w) for w in seed_words]).integers(2**62)))
        yield


def micro_batches(batch: dict[str, torch.Tensor], size: int | None) -> list[dict[str, torch.Tensor]]:
    """Split one collated batch into micro-batches of at most ``size`` rows for the forward and backward passes
    (gradient accumulation; the step stays one per batch). Rows are ordered by length and each micro-batch drops
    the trailing padding columns none of its rows needs, so short texts do not pay for the longest one in the
    batch. Right padding only (a left-padded batch keeps its columns: trimming would shift positions).
    ``size=None``, or a batch no larger: the batch itself."""
    n = int(next(iter(batch.values())).shape[0]) if batch else 0
    if not size or n <= size:
        return [batch]
    mask = batch.get("attention_mask")
    order = torch.argsort(mask.sum(1), stable=True) if mask is not None else torch.arange(n)
    right_padded = mask is not None and bool(mask[:, 0].all())
    seq = mask.size(1) if mask is not None else None
    out = []
    for start in range(0, n, size):
        idx = order[start: start + size]
        piece = {k: v[idx] for k, v in batch.items()}
        if right_padded:
            width = int(piece["attention_mask"].sum(1).max())
            piece = {k: v[:, :width] if v.dim() >= 2 and v.size(1) == seq else v for k, v in piece.items()}
        out.append(piece)
    return out


def model_loss(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    out = model(**inputs)
    logits = out.logits.float()
    if task == "seq-cls":
        return F.cross_entropy(logits, batch["labels"])
    # causal LM: predict token t+1 from position t, ignore -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def prox_anchors(params, prox_mu: float) -> list[torch.Tensor] | None:
    """FedProx's w0: a copy of the trainable parameters where the round starts (None when ``prox_mu`` is 0: off)."""
    return [p.detach().clone() for p in params] if prox_mu else None


def prox_term(params, anchors, prox_mu: float) -> torch.Tensor:
    """FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020):
    (mu/2)·Σ‖w − w0‖² over ``params`` and their ``anchors`` w0; its gradient is mu·(w − w0) (:func:`add_prox_grad`)."""
    return 0.5 * prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


@torch.no_grad()
def add_prox_grad(params, anchors, prox_mu: float) -> None:
    """Add the gradient of :func:`prox_term`, mu·(w − w0), to every trainable parameter's gradient (frozen ones are
    skipped; a parameter without a gradient gets the term alone). The same as adding the term to the loss, without
    a graph, and usable after DP-SGD's noise (it reads no example)."""
    for p, a in zip(params, anchors):
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = prox_mu * (p.detach() - a)
        else:
            p.grad.add_(p.detach() - a, alpha=prox_mu)


def local_train(model, dataset, collator, *, steps: int, batch_size: int, lr: float, step_offset: int,
                total_steps: int, scheduler: str = "cosine", warmup: int = 0, weight_decay: float = 0.0,
                max_grad_norm: float | None = 1.0, seed: int = 0, round_idx: int = 0, task: str = "seq-cls",
                device=None, optimizer_fn=None, micro_batch_size: int | None = None, optimizer=None,
                batches=None, prox_mu: float = 0.0, control=None) -> dict[str, float]:
    """Train the model's trainable parameters for ``steps`` AdamW steps; returns mean loss and timing.

    The learning rate follows one schedule over the whole run: step ``step_offset + i`` of ``total_steps``.
    ``optimizer_fn(params, lr, wd)`` lets privacy wrap the optimizer (DP-SGD); default AdamW.
    ``micro_batch_size``: forward/backward each batch in length-ordered pieces (:func:`micro_batches`), one step.
    ``optimizer``: an optimizer to continue (its state kept across calls, as :mod:`fedlora.centralised` needs)
    instead of a new one; ``batches``: the index batches to take (default: :func:`batch_indices` for this round).
    Clients pass neither: a fresh optimizer and a fresh draw every round.
    ``prox_mu`` (``train.prox_mu``, FedProx): every step also follows (mu/2)·‖w − w0‖² over the trainable parameters,
    w0 = their values at the call (:func:`add_prox_grad`, before the gradient clipping, as if in the loss); the
    reported ``train_loss`` is the data loss alone. 0: off (nothing changes).
    ``control`` (``train.scaffold``, SCAFFOLD): ``[(parameter, c − c_i)]`` (:func:`fedlora.scaffold.corrections`);
    after every optimizer step w ← w − lr·(c − c_i) at that step's lr (:func:`fedlora.scaffold.apply_correction`,
    after the clipping). None or empty: off (nothing changes).
    """
    device = device or next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    make_opt = optimizer_fn or (lambda ps, lr_, wd: torch.optim.AdamW(ps, lr=lr_, weight_decay=wd))
    opt = optimizer if optimizer is not None else make_opt(params, lr, weight_decay)
    anchors = prox_anchors(params, prox_mu)
    if batches is None:
        batches = batch_indices(len(dataset), batch_size, steps, seed, round_idx)
    model.train()
    losses, t0 = [], time.perf_counter()
    with seeded_dropout((seed, round_idx, 7), device):  # per (client, round)
        for i, idx in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = lr_at(step_offset + i, total_steps, lr, scheduler, warmup)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for piece in micro_batches(collator([dataset[int(j)] for j in idx]), micro_batch_size):
                piece = {k: v.to(device) for k, v in piece.items()}
                with autocast(device):  # a token-level LM loss is then averaged per piece, not over all tokens
                    loss = model_loss(model, piece, task) * (len(piece["input_ids"]) / len(idx))
                loss.backward()
                total += float(loss.detach())
            if anchors is not None:
                add_prox_grad(params, anchors, prox_mu)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            if control:  # SCAFFOLD: after the step, at its lr (fedlora/scaffold.py says why)
                apply_correction(control, opt.param_groups[0]["lr"])
            losses.append(total)
    model.eval()
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "train_s": time.perf_counter() - t0,
            "steps": len(losses)}


def dp_loss(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The batch loss DP-SGD needs: a mean over examples of each example's own loss (per-example clipping
    assumes it). Classification's cross-entropy already is; a causal LM uses :func:`fedlora.privacy.causal_lm_loss`
    instead of Hugging Face's token-level mean."""
    from .privacy import causal_lm_loss

    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits.float()
    if task == "seq-cls":
        return F.cross_entropy(logits, batch["labels"])
    return causal_lm_loss(logits, batch["labels"])


def local_train_dp(model, dataset, collator, *, dp_cfg, noise_multiplier: float, accountant_state, steps: int,
                   batch_size: int, lr: float, step_offset: int, total_steps: int, scheduler: str = "cosine",
                   warmup: int = 0, weight_decay: float = 0.0, task: str = "seq-cls", device=None,
                   rng_seed=None, optimizer: str = "adamw", momentum: float = 0.9,
                   micro_batch_size: int | None = None, prox_mu: float = 0.0, control=None) -> dict:
    """DP-SGD version of :func:`local_train` (sample-level DP, see :mod:`fedlora.privacy`): ``steps`` AdamW steps
    on Poisson-sampled batches (expected size ``batch_size``, fresh draws every pass), each example's gradient
    over the trainable parameters clipped to ``dp_cfg.max_grad_norm`` and Gaussian noise
    (``noise_multiplier`` x that norm) added, the client's accountant restored from ``accountant_state`` and
    advanced. No further gradient clipping (it would only distort the noised gradient). Same learning-rate
    schedule as :func:`local_train`. Trainable parameters are those with ``requires_grad`` (FFA-LoRA: freeze
    lora_A before); ``dp_cfg.train_head=False`` freezes the head for this call only.
    ``rng_seed``: None draws Poisson sampling and noise from the OS (deployments) and dropout from the worker's
    RNG; a seed makes the round reproducible, dropout included (tests, experiments: anyone who knows it can
    regenerate the noise).
    ``optimizer``: ``adamw`` (as :func:`local_train`) or ``sgd`` (with ``momentum``). Adam divides every
    coordinate by its own noise-dominated second moment, so coordinates with little signal (LoRA B early on)
    take steps of about ``lr`` in a random direction; SGD keeps the noise at its DP scale.
    ``micro_batch_size``: forward/backward each Poisson batch in length-ordered pieces (:func:`micro_batches`,
    Opacus' physical batches); the step, its clipping, noise and accounting are those of the whole batch.
    ``prox_mu`` (FedProx): mu·(w − w0) is added to the gradient after Opacus' clipping and noise, just before each
    optimizer step (w0 = the parameters at the call). It reads no example: it is a deterministic function of the
    parameters, which are themselves the output of the DP steps so far, and of w0, which the client received from the
    server; so it is post-processing and the guarantee (each step's clipped, noised sum, accounted as before) holds.
    Inside the per-example gradients it would be clipped as if it were data, and Opacus would drop it anyway (it
    builds the gradient from per-example gradients of the layers' outputs). 0: off (nothing changes).
    ``control`` (SCAFFOLD, as in :func:`local_train`): w ← w − lr·(c − c_i) right after each real optimizer step
    (clipped, noised; empty draws included), through a post-step hook. It reads no example (c comes from the server,
    c_i from the node's earlier released steps): post-processing, the guarantee holds as for ``prox_mu``.
    Returns the loss/timing of :func:`local_train` plus ``epsilon`` (whole run so far, at ``dp_cfg.target_delta``),
    ``accountant`` (JSON to store for the next round), ``noise_multiplier``, ``sample_rate``, ``empty_batches``.
    """
    from . import privacy as P

    device = device or next(model.parameters()).device
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    gen_sample, gen_noise = P.fresh_generators(rng_seed, device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, generator=gen_sample)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be adamw or sgd, got {optimizer!r}.")
    anchors = prox_anchors(params, prox_mu)
    model, dp_opt, dp_loader, session = P.make_private(model, opt, loader, dp_cfg, noise_multiplier, accountant_state,
                                                       noise_generator=gen_noise)
    prox_hook = None
    if anchors is not None:  # runs inside dp_opt.step(), after clipping and noise, only when a real step is taken
        prox_hook = dp_opt.original_optimizer.register_step_pre_hook(
            lambda *_: add_prox_grad(params, anchors, prox_mu))
    control_hook = None
    if control:  # after the original optimizer's step: after clipping, noise and the update itself
        control_hook = dp_opt.original_optimizer.register_step_post_hook(
            lambda o, *_: apply_correction(control, o.param_groups[0]["lr"]))
    losses, empty, t0 = [], 0, time.perf_counter()
    seed_words = None if rng_seed is None else (*(rng_seed if isinstance(rng_seed, (tuple, list)) else (rng_seed,)), 7)
    try:
        with seeded_dropout(seed_words, device):  # reproducible runs: dropout too
            dp_opt.zero_grad(set_to_none=True)
            for i, batch in enumerate(P.iterate_steps(dp_loader, steps)):
                for g in dp_opt.param_groups:
                    g["lr"] = lr_at(step_offset + i, total_steps, lr, scheduler, warmup)
                if P.batch_size_of(batch) == 0:  # empty Poisson draw: noise only, still one accounted step
                    P.noise_only_step(dp_opt)
                    empty += 1
                    continue
                pieces = micro_batches(batch, micro_batch_size)
                total = 0.0
                for j, piece in enumerate(pieces):
                    piece = {k: v.to(device) for k, v in piece.items()}
                    with autocast(device):
                        loss = dp_loss(model, piece, task)
                    with warnings.catch_warnings():  # Opacus' hook on the first adapted layer: no input requires grad
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                    total += float(loss.detach()) * P.batch_size_of(piece)
                    if j < len(pieces) - 1:  # clip and accumulate this piece; no noise, no step, not accounted
                        dp_opt.signal_skip_step(do_skip=True)
                    dp_opt.step()
                    dp_opt.zero_grad(set_to_none=True)
                losses.append(total / P.batch_size_of(batch))
        state = session.state()
    finally:
        for hook in (prox_hook, control_hook):
            if hook is not None:
                hook.remove()
        session.close()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
        model.eval()
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "train_s": time.perf_counter() - t0,
            "steps": int(steps), "epsilon": P.epsilon(state, dp_cfg.target_delta), "accountant": state.to_json(),
            "noise_multiplier": float(noise_multiplier), "sample_rate": session.sample_rate, "empty_batches": empty}


@torch.no_grad()
def evaluate(model, dataset, collator, *, task: str, batch_size: int = 64, max_examples: int | None = None,
             device=None, by_length: bool = True) -> dict[str, float]:
    """Loss and accuracy (classification; for causal LMs on labelled data, by the label words' logits) or
    loss and perplexity (instruction data), over the first ``max_examples`` rows. The rows go in batches of
    similar text length (``by_length``; False: in dataset order), so each batch is padded only to what its own
    rows need where the collator pads per batch (classification; the causal-LM collator pads to max_length).
    Every figure is a sum over rows, so the order changes nothing but float rounding."""
    device = device or next(model.parameters()).device
    model.eval()
    n = len(dataset) if not max_examples else min(len(dataset), int(max_examples))
    rows_all = [dataset[i] for i in range(n)]
    order = list(range(n))
    if by_length:
        order.sort(key=lambda i: sum(len(v) for v in rows_all[i].values() if isinstance(v, str)))
    tot_loss, tot_tokens, correct, count = 0.0, 0, 0, 0
    for start in range(0, n, batch_size):
        rows = [rows_all[i] for i in order[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        with autocast(device):
            logits = model(**inputs).logits.float()
        if task == "seq-cls":
            tot_loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            tot_tokens += len(batch["labels"])
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
            continue
        labels = batch["labels"][:, 1:]
        lsum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                               reduction="sum")
        tot_loss += float(lsum)
        tot_tokens += int((labels != -100).sum())
        if "class_labels" in batch:
            pos = batch["answer_pos"]
            cand = logits[torch.arange(len(pos), device=device), pos][:, collator.label_token_ids]
            correct += int((cand.argmax(-1) == batch["class_labels"]).sum())
            count += len(pos)
    loss = tot_loss / max(1, tot_tokens)
    out = {"eval_loss": loss}
    if count:
        out["eval_accuracy"] = correct / count
    if task == "causal-lm":
        out["eval_perplexity"] = math.exp(min(loss, 50.0))
    return out


def evaluate_splits(model, test, validation, collator, *, task: str, batch_size: int = 64,
                    max_examples: int | None = None, device=None, by_length: bool = True) -> dict[str, float]:
    """:func:`evaluate` on the test split (``eval_loss``, ``eval_accuracy`` or ``eval_perplexity``: the figure
    reported, never used to choose anything) and on the validation split, its keys renamed ``val_loss``,
    ``val_accuracy``, ``val_perplexity`` (what tuning, early stopping and "best" use). An empty or missing
    validation split is skipped. Both are capped at ``max_examples``."""
    kw = dict(task=task, batch_size=batch_size, max_examples=max_examples, device=device, by_length=by_length)
    res = evaluate(model, test, collator, **kw)
    if validation is not None and len(validation):
        val = evaluate(model, validation, collator, **kw)
        res.update({"val_" + k[len("eval_"):]: v for k, v in val.items()})
    return res
