"""Opacus glue for one client round of DP-SGD on a (PEFT) model: :func:`make_private` attaches it with the
client's accountant restored, :class:`DPSession` gives its state back; Poisson-batch helpers, the per-example
causal-LM loss and the round's random generators. Conventions (flat clipping, expected batch size, hooks
without wrapping, empty batches): ``docs/privacy.md``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from .accounting import AccountantState, _as_state, epsilon
from .checks import DPConfig

@dataclass
class DPSession:
    """One round's DP-SGD machinery on one client: the engine (with the restored accountant) and hooks."""

    engine: object  # opacus.PrivacyEngine
    hooks: object  # opacus GradSampleHooks attached to the (unwrapped) model
    cfg: DPConfig
    noise_multiplier: float
    sample_rate: float
    trainable: list[str]

    def state(self) -> AccountantState:
        """The accountant's history for the whole run so far (store it; restore it next round)."""
        acc = self.engine.accountant
        return AccountantState(acc.mechanism(), tuple(tuple(h) for h in acc.history))

    def epsilon(self, delta: float | None = None) -> float:
        return epsilon(self.state(), self.cfg.target_delta if delta is None else delta)

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample attributes from the model (idempotent)."""
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None


def make_private(model, optimizer, data_loader, cfg: DPConfig, noise_multiplier: float, accountant_state=None,
                 *, noise_generator: torch.Generator | None = None):
    """Attach DP-SGD to a (PEFT) model for one round, with the client's accountant restored.

    Returns ``(model, dp_optimizer, dp_loader, session)``: ``model`` is the same object (hooks attached, put
    in train mode), ``dp_optimizer`` clips per example, adds noise and steps the accountant,
    ``dp_loader`` draws Poisson batches (``cfg.poisson``), ``session`` gives the accountant state and
    epsilon and must be ``close()``d before the model is attached again.
    ``accountant_state``: :class:`AccountantState`, its JSON string/dict, or None on the first round.
    ``noise_generator``: the source of the Gaussian noise (default: torch's global generator). The Poisson
    sampler uses ``data_loader.generator`` (default: the global one). Both must be unpredictable in a real
    deployment: a fresh process starts torch's global generator from a fixed seed, see
    :func:`fresh_generators`.
    """
    from opacus import PrivacyEngine

    state = _as_state(accountant_state, cfg.accountant)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}.")
    if hasattr(model, "autograd_grad_sample_hooks"):
        raise ValueError("the model still has Opacus hooks from an earlier round; close() that DPSession first.")
    n = len(data_loader.dataset)
    if cfg.target_delta >= 1.0 / n:
        raise ValueError(
            f"target_delta={cfg.target_delta:g} is not below 1/n = {1.0 / n:.3g} for this client's {n} examples, "
            "which makes the guarantee meaningless; choose target_delta < 1/n."
        )
    if not cfg.train_head:
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in name:
                p.requires_grad_(False)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters, so there is nothing to train with DP-SGD.")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if missing:
        raise ValueError(
            f"trainable parameter {missing[0]} is not in the optimizer (nor are {len(missing) - 1} others), so its "
            "per-sample gradients would never be cleared; freeze it or give it to the optimizer."
        )
    model.train()

    with warnings.catch_warnings():
        # "Secure RNG turned off": secure_mode needs torchcsprng, which fedlora does not ship (open item).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        if not cfg.poisson:
            warnings.warn(
                "DP-SGD without Poisson sampling: the reported epsilon assumes Poisson sampling and is "
                "only an approximation.",
                stacklevel=2,
            )
        engine = PrivacyEngine(accountant=cfg.accountant)
        engine.accountant.history = [tuple(h) for h in state.history]
        hooks, dp_opt, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=cfg.poisson,
            loss_reduction="mean",
            noise_generator=noise_generator,
            wrap_model=False,
        )
    session = DPSession(engine, hooks, cfg, float(noise_multiplier), 1.0 / len(data_loader), trainable)
    return model, dp_opt, dp_loader, session


def noise_only_step(optimizer) -> None:
    """Step a DP optimizer on an empty Poisson batch: zero clipped sum plus noise, and one accounted step.

    Skipping the step instead would make the released model depend on whether the batch was empty
    without the accountant knowing; Hugging Face models cannot run a 0-row batch.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad()


def iterate_steps(data_loader, steps: int) -> Iterator:
    """Yield exactly ``steps`` batches, starting a fresh pass (fresh Poisson draws) whenever one ends.

    (``itertools.cycle`` would replay the first pass's batches, which the accountant does not model.)
    """
    done = 0
    while done < steps:
        progressed = False
        for batch in data_loader:
            progressed = True
            yield batch
            done += 1
            if done >= steps:
                return
        if not progressed:
            raise ValueError("the data loader yielded no batches.")


def batch_size_of(batch) -> int:
    """Rows in a batch (tensor, tuple/list of tensors or dict of tensors); 0 for an empty Poisson batch."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values()))) if batch else 0
    if isinstance(batch, (list, tuple)):  # Opacus yields [] when the very first Poisson batch is empty
        return batch_size_of(batch[0]) if len(batch) else 0
    raise TypeError(f"cannot tell the batch size of a {type(batch)}.")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token loss that is a mean over examples of each example's own mean token loss.

    ``logits`` [B, T, V], ``labels`` [B, T] (unshifted, as Hugging Face takes them). Unlike HF's loss
    (mean over all tokens of the batch) an example's gradient does not depend on other examples, which is
    what per-example clipping assumes. Examples without any target token contribute 0.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != ignore_index).to(tok.dtype)
    per_example = (tok * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return per_example.mean()


def sample_rate(data_loader) -> float:
    """Poisson sampling rate of a client's loader as Opacus defines it: ``1 / len(data_loader)``."""
    n = len(data_loader)
    if n < 1:
        raise ValueError("the data loader has no batches, so there is no sampling rate.")
    return 1.0 / n


def fresh_generators(seed=None, device=None) -> tuple[torch.Generator, torch.Generator]:
    """``(sampling, noise)`` generators for one DP-SGD round.

    ``seed=None`` seeds both from the operating system: what a deployment needs, since every fresh client
    process starts torch's global generator from the same fixed seed, and noise that anyone can regenerate
    protects nothing. A ``seed`` (int or tuple of ints, e.g. ``(run_seed, partition, round)``) makes runs
    reproducible: for tests and experiments only (anyone who knows the seed can subtract the noise).
    The sampling generator lives on the CPU (Opacus' Poisson sampler draws there); the noise generator on
    ``device`` (where the gradients are).
    """
    import numpy as np

    entropy = None if seed is None else [int(x) for x in (seed if isinstance(seed, (tuple, list)) else (seed,))]
    s_sample, s_noise = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return (torch.Generator().manual_seed(int(s_sample) >> 1),
            torch.Generator(device=dev).manual_seed(int(s_noise) >> 1))
