"""Differential privacy for fedlora clients: sample-level DP-SGD (Opacus), its accounting across rounds,
and the rules for which strategy/privacy combinations make sense. No Flower in here.

What a client does each round (the client process may be fresh every round)
--------------------------------------------------------------------------
::

    cfg = DPConfig(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)      # once, from the config
    check_compatible(strategy_name, "dp_sgd", weighting=...)                       # once, at config time

    q = sample_rate(train_loader)                     # Opacus' definition: 1 / len(loader)
    sigma = plan_noise(cfg, q, total_steps=num_rounds * local_steps)   # same value every round
    state = AccountantState.from_json(saved) if saved else AccountantState(cfg.accountant)
    if would_exceed(state, cfg, sigma, q, local_steps):
        ...reply without training (report epsilon(state, cfg.target_delta))
    model, optimizer, loader, session = make_private(model, optimizer, train_loader, cfg, sigma, state)
    for batch in iterate_steps(loader, local_steps):  # fresh Poisson draws, never itertools.cycle
        if batch is empty: noise_only_step(optimizer); continue
        loss = ...  (a per-example loss averaged over the batch, e.g. causal_lm_loss for an LM)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    state = session.state(); eps = session.epsilon()
    session.close()                                   # removes Opacus' hooks; the PEFT model is unchanged
    saved = state.to_json()                           # e.g. into context.state as a ConfigRecord string

One accountant per client for the whole run: the accountant's history ``[(noise, sample_rate, steps)]`` is
plain data; it is restored into every round's fresh ``PrivacyEngine``, so epsilon is always the epsilon of
the whole run so far (creating an engine per round without restoring it reports one round's epsilon as if
it were the run's, which is the pitfall in public FFA-LoRA code). With ``target_epsilon`` the noise is
computed ONCE for the planned run (rounds x local steps at the client's sampling rate) and stays constant,
so a client that takes part in every round ends at <= target_epsilon; the budget check refuses a round
that would cross it (clients that sit out rounds simply spend less).

Conventions (checked by tests/test_privacy.py against a per-example loop)
------------------------------------------------------------------------
- Flat clipping: each example's gradient over ALL trainable parameters (LoRA factors and head together)
  is scaled by ``min(1, C / (||g_i|| + 1e-6))``; the clipped gradients are summed, noise
  ``N(0, (sigma*C)^2)`` is added, and the sum is divided by Opacus' *expected* batch size
  ``int(n / len(loader))`` (not the drawn Poisson batch size).
- Per-example gradients are those of a per-example loss, so the batch loss must be the mean over examples
  of a loss that depends on that example alone. Hugging Face's causal-LM loss averages over all tokens of
  the batch, which makes one example's gradient depend on the other examples' token counts (it breaks the
  sensitivity bound once there is padding): use :func:`causal_lm_loss`. Sequence classification's
  cross-entropy is already a per-example mean.
- Opacus hooks are attached without wrapping (``wrap_model=False``): the PEFT model keeps its type and
  names, so ``adapters.from_peft`` works on it unchanged. Only parameters with ``requires_grad`` get
  per-sample gradients: for FFA-LoRA freeze ``lora_A`` before calling :func:`make_private`. Frozen layers
  (embeddings, RMSNorm, base linears) need no grad sampler; LoRA factors and a ``modules_to_save``
  classifier are ``nn.Linear`` and use Opacus' own sampler. ``model.train()`` is called for you
  (``from_pretrained`` leaves submodules in eval mode and Opacus only records activations in train mode).
- A Poisson batch can be empty (probability (1-q)^n); Hugging Face models fail on a 0-row batch, and
  skipping the step would break the accounting: call :func:`noise_only_step` instead.

Which combinations are refused (:func:`check_compatible`), and why
------------------------------------------------------------------
Privacy modes: ``none``; ``dp_sgd`` (sample-level DP-SGD on every client, this module);
``client_dp`` (client-level DP: Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping`` with its
accountant); ``client_dp_adaptive`` (named only to refuse it).

- ``dp_sgd`` works with every strategy: what a client sends is computed from DP-SGD-trained factors and
  data-independent randomness (A's seed, FLoRA's fresh init), and everything the server does with it
  (averaging, stacking, LoRA-FAIR's correction, SVD, padding, norm weights) is post-processing.
  FLoRA re-initialises its LoRA each round, so A and B are both trained under DP and the same accountant
  keeps composing across rounds. FedIT / LoRA-FAIR / FLoRA train A and B: the product B*A carries
  noise x noise terms (a utility cost, not a privacy one); FFA-LoRA is the natural pairing.
  Refused: ``fedpipe`` when its importance scores are computed on private data (``fedpipe_importance=
  "private"``): those gradient statistics would leave the client outside DP-SGD's accounting.
  Caveat (documented, not refused): the example count n_k a client reports for weighting is treated as
  public (e.g. known partition sizes); under add/remove adjacency an exact count is not covered.
- ``client_dp`` needs equal client weights (Flower's accounted wrappers check it at aggregation) and a
  strategy whose aggregate is an element-wise mean of same-shaped arrays that the Gaussian noise is added
  to: allowed for ``fedit`` and ``ffa_lora`` (Flower's accounted mode also requires the wrapped strategy to
  use ``FedAvg.aggregate_train`` unchanged: ``strategies/dp.py`` hands the wrapper a FedAvg view of them).
  Refused: ``flora`` (stacks each client's individual factors, so no noised sum is released),
  ``lora_fair`` and ``flexlora`` (their server step reads each client's un-noised factors), ``hetlora`` and
  ``fedpipe`` (clients have different ranks, so there is no common update to clip and noise).
- ``client_dp_adaptive``: refused, Flower 1.42 has no accountant for adaptive clipping, so no epsilon
  could be reported.

How the framework uses this module
----------------------------------
Config (``conf/privacy/``): ``privacy=none``; ``privacy=dp_sgd`` (mode ``dp_sgd``); ``privacy=client_level``
(mode ``client_dp``). :func:`validate_config` runs inside ``fedlora.config.validate``: every refusal above,
and bad DP settings, are one-sentence ConfigErrors (the CLI exits 2) before anything starts.

``dp_sgd`` — client (``clients/client_app.py:dp_sgd_round``), every round:

- the node's accountant is restored (:func:`restore_accountant`, rule below) from ``context.state["dp-sgd"]``
  (a ConfigRecord holding :meth:`AccountantState.to_json`) or from the server's copy in the train config
  (``dp.accountant``), and saved back after training: one accountant per client for the run; every reply
  (trained or budget-exhausted) carries it back in a ConfigRecord ``dp-sgd`` = ``{"accountant": <JSON>}``;
- sigma = :func:`plan_noise` for ``planned_rounds`` (default ``num_rounds``) x local steps at the node's
  rate ``1/ceil(n/batch)``. That is the worst case of a node sampled in every round: with
  ``fraction_train < 1`` a node trains fewer rounds than planned and ends below ``target_epsilon`` (planning
  for fewer rounds gives less noise, and the budget check stops nodes that are sampled more often);
- budget check first (:func:`would_exceed`): a node whose next round would exceed ``target_epsilon`` replies
  without training: no arrays, ``epsilon`` in its metrics, ConfigRecord ``status`` =
  ``{"status": "budget-exhausted", "reason": ...}``;
- training is ``fedlora.train.local_train_dp``: Poisson loader from :func:`make_private`,
  :func:`iterate_steps`, :func:`noise_only_step` on empty draws, per-example losses (:func:`causal_lm_loss`
  for LMs), no gradient clipping besides DP-SGD's own; sampling and noise generators from the OS
  (:func:`fresh_generators`; ``privacy.reproducible=true`` derives them from the run seed, for tests and
  experiments only). FFA-LoRA: ``lora_A`` is frozen before :func:`make_private`, so only B (and the head,
  ``train_head``) get per-example gradients, clipping and noise.

``dp_sgd`` — server (``strategies/dp.py``, ``strategies/base.py``): every round's metrics carry
``epsilon: {partition: epsilon so far}`` for every client (0 before its first round), ``epsilon_max`` and
``delta``; a budget-exhausted reply is logged among the round's rejections and that client is no longer
sampled; when fewer than ``min_train_nodes`` clients can still train the run stops cleanly (summary
``status: budget-exhausted``, ``stop_reason``); the summary carries ``epsilon_max`` and every client's epsilon.
The server also keeps the latest accountant of every client (by partition id, the identity in
``nodes.json``) in the strategy's persistent state, so it is in every per-round checkpoint and comes back with
``resume=``; it sends that copy down in each train config (``dp.accountant``). A reply whose ``dp-sgd``
record is missing, not a valid accountant of the run's mechanism, disagrees with the reported ``epsilon``, or
has spent less than the server's copy (:func:`check_reported`) is rejected with that reason.

Where a client's accountant lives, and whom the client trusts
-------------------------------------------------------------
Two copies: the node's own ``context.state`` (lost when the node process restarts) and the server's copy
(lost only with the server's checkpoints). :func:`restore_accountant` picks, every round:

- local copy present: the local one, unless the server's copy has spent MORE (larger epsilon at the run's
  delta; equal epsilon: more steps), in which case the server's. A client therefore never spends its budget
  twice because a server sent an empty, short, stale or garbled copy (a garbled copy is ignored);
- no local copy (fresh or restarted node): the server's copy, logged as such; neither: a new accountant (the
  first round); no local copy and a garbled server copy: the client refuses to train.

Trust assumption: with local state, a malicious or buggy server can only make a client OVER-count (stop
early, report a larger epsilon), never under-count. A client without local state has to trust the server's
copy (or a file it persisted itself): a server that withholds the copy of a restarted node makes that node
start from zero. The server cannot tell a restarted client from an honest new one either; it can only refuse
replies whose accountant went backwards relative to its own copy.

``client_dp``: Flower 1.42's ``DifferentialPrivacyServerSideFixedClipping`` (``privacy.clipping=server``) or
``DifferentialPrivacyClientSideFixedClipping`` + ``fixedclipping_mod`` (``client``) with an accountant, for
fedit and ffa_lora. Flower's conditions: fixed clipping, equal client weights, a fixed number of sampled
clients per round, no-amplification accounting, and a ``FedAvg`` with its own ``aggregate_train``. Flower's
``RdpAccountant`` needs the ``flwr[dp]`` extra (``dp-accounting``), absent here, so the wrapper gets an
accountant with Flower's ``PrivacyAccountant`` protocol computed with Opacus' RDP (the same event: Gaussian,
sampling rate 1, one step per round). Details and what the guarantee leaves out: ``strategies/dp.py``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = [
    "ACCOUNTANTS",
    "PRIVACY_MODES",
    "STRATEGIES",
    "AccountantState",
    "batch_size_of",
    "DPConfig",
    "DPSession",
    "causal_lm_loss",
    "check_compatible",
    "client_level_noise",
    "dp_config",
    "epsilon",
    "fresh_generators",
    "iterate_steps",
    "make_private",
    "mode_of",
    "noise_only_step",
    "plan_noise",
    "planned_rounds",
    "sample_rate",
    "validate_config",
    "would_exceed",
    "check_reported",
    "restore_accountant",
    "spent_more",
    "ACCOUNTANT_CONFIG_KEY",
    "ACCOUNTANT_RECORD",
]

ACCOUNTANTS = ("rdp", "prv", "gdp")
STRATEGIES = ("fedit", "flora", "ffa_lora", "lora_fair", "fedpipe", "hetlora", "flexlora")
PRIVACY_MODES = ("none", "dp_sgd", "client_dp", "client_dp_adaptive")
_CLIENT_DP_STRATEGIES = ("fedit", "ffa_lora")
_STATE_VERSION = 1
#: train-config key (server -> client) holding the server's copy of the client's accountant (JSON)
ACCOUNTANT_CONFIG_KEY = "dp.accountant"
#: name of the reply's ConfigRecord (client -> server) holding ``{"accountant": JSON}``; also the key in
#: the node's ``context.state``
ACCOUNTANT_RECORD = "dp-sgd"


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD settings of one run (identical on every client).

    Give exactly one of ``noise_multiplier`` (fixed sigma; no budget check) or ``target_epsilon`` (sigma is
    planned once for the whole run by :func:`plan_noise`; rounds that would exceed it are refused).
    ``train_head=False`` freezes every trainable non-LoRA parameter (e.g. a ``modules_to_save`` classifier)
    in :func:`make_private`.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    poisson: bool = True
    train_head: bool = True

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "DPConfig needs exactly one of noise_multiplier (fixed noise) or target_epsilon "
                "(noise planned for the run), got "
                f"noise_multiplier={self.noise_multiplier} and target_epsilon={self.target_epsilon}."
            )
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}.")
        if self.target_epsilon is not None and not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon}.")
        if not (0.0 < self.target_delta < 1.0):
            raise ValueError(f"target_delta must lie strictly between 0 and 1, got {self.target_delta}.")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm (the per-example clipping norm) must be > 0, got {self.max_grad_norm}.")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}.")


def check_compatible(
    strategy_name: str,
    privacy_mode: str,
    *,
    weighting: str = "num_examples",
    fedpipe_importance: str = "private",
) -> None:
    """Refuse strategy/privacy combinations that make no sense, with one sentence (see module docstring).

    ``weighting``: how the server weights clients, ``"num_examples"`` or ``"uniform"``.
    ``fedpipe_importance``: where FedPipe's importance scores come from: ``"private"`` (client data),
    ``"public"`` (data the server may see) or ``"none"`` (fixed choice of matrices).
    """
    if strategy_name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy_name!r}; expected one of {', '.join(STRATEGIES)}.")
    if privacy_mode not in PRIVACY_MODES:
        raise ValueError(f"Unknown privacy mode {privacy_mode!r}; expected one of {', '.join(PRIVACY_MODES)}.")
    if weighting not in ("num_examples", "uniform"):
        raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}.")
    if fedpipe_importance not in ("private", "public", "none"):
        raise ValueError(f"fedpipe_importance must be 'private', 'public' or 'none', got {fedpipe_importance!r}.")

    if privacy_mode == "none":
        return
    if privacy_mode == "dp_sgd":
        if strategy_name == "fedpipe" and fedpipe_importance == "private":
            raise ValueError(
                "fedpipe with dp_sgd is refused while its importance scores come from gradients on private "
                "client data, which would leave the client outside DP-SGD's accounting; compute them on "
                "public data (fedpipe_importance='public') or fix the adapted matrices ('none')."
            )
        return
    if privacy_mode == "client_dp_adaptive":
        raise ValueError(
            "client_dp_adaptive is refused because Flower 1.42 has no privacy accountant for adaptive "
            "clipping, so no epsilon could be reported; use client_dp (fixed clipping) instead."
        )
    # client_dp
    reasons = {
        "flora": "flora stacks each client's individual factors instead of averaging them, so there is no "
        "noised sum for client-level DP to release",
        "lora_fair": "lora_fair's server-side correction reads every client's un-noised factors, which "
        "client-level DP does not cover",
        "flexlora": "flexlora forms and decomposes sum_k p_k B_k A_k from every client's un-noised factors, "
        "which client-level DP does not cover",
        "hetlora": "hetlora clients have different ranks (and may be weighted by their update norms), so "
        "there is no common update to clip and noise",
        "fedpipe": "fedpipe clients have different ranks, so there is no common update to clip and noise",
    }
    if strategy_name in reasons:
        raise ValueError(
            f"{reasons[strategy_name]}; client_dp works with {' or '.join(_CLIENT_DP_STRATEGIES)} only."
        )
    if weighting != "uniform":
        raise ValueError(
            "client_dp needs equal client weights (weighting='uniform'): weighting by example counts lets "
            "one client's clipped update count for more than the sensitivity the noise is calibrated for."
        )


# ----------------------------------------------------------------------------------------------
# Accountant state: plain data that survives a fresh client process
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AccountantState:
    """History of one client's privacy accountant: ``((noise_multiplier, sample_rate, steps), ...)``.

    This is exactly Opacus' accountant ``history`` (consecutive steps with equal noise and sampling rate
    are merged into one entry), so restoring it reproduces the accountant bit for bit.
    """

    mechanism: str = "rdp"
    history: tuple[tuple[float, float, int], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.mechanism not in ACCOUNTANTS:
            raise ValueError(f"accountant mechanism must be one of {', '.join(ACCOUNTANTS)}, got {self.mechanism!r}.")
        clean = []
        for entry in self.history:
            if len(entry) != 3:
                raise ValueError(f"accountant history entries are (noise, sample_rate, steps), got {entry!r}.")
            sigma, q, steps = float(entry[0]), float(entry[1]), entry[2]
            if not (sigma >= 0 and 0 < q <= 1 and int(steps) == steps and steps > 0):
                raise ValueError(f"invalid accountant history entry {entry!r}.")
            clean.append((sigma, q, int(steps)))
        if self.mechanism == "gdp" and len(clean) > 1:
            raise ValueError(
                "the gdp accountant only supports one constant noise multiplier and sampling rate per run; "
                "use rdp or prv when they change."
            )
        object.__setattr__(self, "history", tuple(clean))

    @property
    def steps(self) -> int:
        """Number of DP-SGD steps accounted so far."""
        return sum(s for _, _, s in self.history)

    def to_dict(self) -> dict:
        return {"version": _STATE_VERSION, "mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    @classmethod
    def from_dict(cls, d: dict) -> AccountantState:
        if not isinstance(d, dict) or "mechanism" not in d or "history" not in d:
            raise ValueError("accountant state must be a dict with 'mechanism' and 'history'.")
        if d.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"accountant state version {d.get('version')} is not supported (expected {_STATE_VERSION}).")
        return cls(d["mechanism"], tuple(tuple(h) for h in d["history"]))

    def to_json(self) -> str:
        """A JSON string (floats round-trip exactly), e.g. for a Flower ConfigRecord in ``context.state``."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> AccountantState:
        return cls.from_dict(json.loads(s))

    def extended(self, noise_multiplier: float, sample_rate: float, steps: int) -> AccountantState:
        """This history plus ``steps`` more steps, merged as the Opacus accountant merges them."""
        hist = list(self.history)
        if steps > 0:
            if hist and hist[-1][0] == noise_multiplier and hist[-1][1] == sample_rate:
                hist[-1] = (hist[-1][0], hist[-1][1], hist[-1][2] + steps)
            else:
                hist.append((float(noise_multiplier), float(sample_rate), int(steps)))
        return AccountantState(self.mechanism, tuple(hist))

    def _accountant(self):
        from opacus.accountants import create_accountant

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GDP's "experimental" warning; DPConfig users chose it knowingly
            acc = create_accountant(mechanism=self.mechanism)
        acc.history = [tuple(h) for h in self.history]
        return acc


def _as_state(state: AccountantState | str | dict | None, mechanism: str) -> AccountantState:
    if state is None:
        return AccountantState(mechanism)
    if isinstance(state, str):
        state = AccountantState.from_json(state)
    elif isinstance(state, dict):
        state = AccountantState.from_dict(state)
    if not isinstance(state, AccountantState):
        raise TypeError(f"accountant state must be an AccountantState, JSON string, dict or None, got {type(state)}.")
    if state.mechanism != mechanism:
        raise ValueError(
            f"the accountant state was recorded with {state.mechanism!r} but the config asks for {mechanism!r}; "
            "keep one accountant for the whole run."
        )
    return state


def spent_more(a: AccountantState, b: AccountantState, delta: float) -> bool:
    """Has ``a`` spent strictly more privacy than ``b``? Larger epsilon at ``delta``; on equal epsilon (e.g.
    both 0 or both inf), more steps. Identical histories: False."""
    if a.history == b.history:
        return False
    ea, eb = epsilon(a, delta), epsilon(b, delta)
    if ea != eb:
        return ea > eb
    return a.steps > b.steps


def restore_accountant(local, server_copy, mechanism: str, delta: float) -> tuple[AccountantState, str, str]:
    """``(state, source, problem)``: the accountant a client continues from, where it came from (``"local"``,
    ``"server"`` or ``"new"``), and why the server's copy was ignored (``""`` when it was not).

    ``local``: the node's own state (AccountantState, JSON string, dict or None/"" when the node has none);
    ``server_copy``: the copy the server sent (JSON string, or None/"" when it sent none). Rule (see the module
    docstring): the local copy unless the server's has spent more (:func:`spent_more`); without a local copy,
    the server's; without either, a new accountant. A server copy that does not parse, or was recorded with
    another mechanism, is ignored when a local copy exists and is a ``ValueError`` otherwise (training from
    zero would under-count). A local copy that does not parse is always a ``ValueError``.
    """
    local_s = _as_state(local, mechanism) if local not in (None, "") else None
    try:
        server_s = _as_state(server_copy, mechanism) if server_copy not in (None, "") else None
    except (ValueError, TypeError) as e:
        if local_s is None:
            raise ValueError(
                f"the server's copy of this client's accountant is unusable ({e}) and the node has no local "
                "accountant, so it cannot know what it has spent; refusing to train rather than restart epsilon from zero."
            ) from None
        return local_s, "local", f"the server's copy is unusable ({str(e).rstrip('.')})"
    if local_s is None:
        return (server_s, "server", "") if server_s is not None else (AccountantState(mechanism), "new", "")
    if server_s is not None and spent_more(server_s, local_s, delta):
        return server_s, "server", ""
    return local_s, "local", ""


def check_reported(accountant_json, mechanism: str, delta: float, reported_epsilon,
                   stored: AccountantState | str | None = None) -> AccountantState:
    """Server-side check of the accountant a DP-SGD client sent back: it parses, uses the run's ``mechanism``,
    gives exactly the ``reported_epsilon`` of the reply's metrics (relative 1e-9), and has not spent less
    than the server's ``stored`` copy. Returns the parsed state; ``ValueError`` with one sentence otherwise."""
    if not isinstance(accountant_json, str) or not accountant_json:
        raise ValueError("the accountant must be a non-empty JSON string.")
    try:
        state = _as_state(accountant_json, mechanism)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the accountant does not parse ({str(e).rstrip('.')}).") from None
    if not isinstance(reported_epsilon, (int, float)) or isinstance(reported_epsilon, bool):
        raise ValueError("the reply's metrics carry no numeric epsilon to go with the accountant.")
    eps = epsilon(state, delta)
    rep = float(reported_epsilon)
    if not (eps == rep or (math.isfinite(eps) and math.isfinite(rep) and abs(eps - rep) <= 1e-9 * max(abs(eps), 1e-12))):
        raise ValueError(f"the accountant gives epsilon={eps:.6g} but the reply reports epsilon={rep:.6g}.")
    if stored not in (None, ""):
        prev = _as_state(stored, mechanism)
        if spent_more(prev, state, delta):
            raise ValueError(
                f"the accountant went backwards: {state.steps} steps (epsilon {eps:.6g}) against the server's copy of "
                f"{prev.steps} steps (epsilon {epsilon(prev, delta):.6g}); the client did not continue its accountant."
            )
    return state


def epsilon(accountant_state: AccountantState | str | dict, delta: float) -> float:
    """Epsilon spent so far (for this delta); 0.0 before the first step, inf if any step had no noise."""
    state = accountant_state
    if not isinstance(state, AccountantState):
        state = AccountantState.from_json(state) if isinstance(state, str) else AccountantState.from_dict(state)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must lie strictly between 0 and 1, got {delta}.")
    if state.steps == 0:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in state.history):
        return math.inf
    return float(state._accountant().get_epsilon(delta=delta))


def sample_rate(data_loader) -> float:
    """Poisson sampling rate of a client's loader as Opacus defines it: ``1 / len(data_loader)``."""
    n = len(data_loader)
    if n < 1:
        raise ValueError("the data loader has no batches, so there is no sampling rate.")
    return 1.0 / n


def plan_noise(cfg: DPConfig, sample_rate: float, total_steps: int) -> float:
    """Noise multiplier of the run: ``cfg.noise_multiplier``, or the one that spends exactly (at most)
    ``cfg.target_epsilon`` over ``total_steps`` (= rounds x local steps) at this sampling rate.

    Deterministic: every round of a client may call it again and gets the same sigma.
    """
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}.")
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps (rounds x local steps) must be a positive integer, got {total_steps}.")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon,
                    target_delta=cfg.target_delta,
                    sample_rate=sample_rate,
                    steps=int(total_steps),
                    accountant=cfg.accountant,
                )
            )
    except ValueError as e:
        raise ValueError(
            f"target_epsilon={cfg.target_epsilon} cannot be met for {total_steps} steps at sampling rate "
            f"{sample_rate:.4g} even with a noise multiplier of 1e6 ({e}); raise the budget or train fewer steps."
        ) from e


def would_exceed(
    accountant_state: AccountantState | str | dict | None,
    cfg: DPConfig,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
) -> bool:
    """Budget check before a round: would ``steps`` more steps push epsilon above ``cfg.target_epsilon``?

    Always False without a target epsilon (``cfg.noise_multiplier`` runs have no budget).
    """
    if cfg.target_epsilon is None:
        return False
    state = _as_state(accountant_state, cfg.accountant)
    after = state.extended(noise_multiplier, sample_rate, int(steps))
    return epsilon(after, cfg.target_delta) > cfg.target_epsilon


# ----------------------------------------------------------------------------------------------
# Opacus
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Randomness, and the run config's ``privacy`` group (plain mappings: DictConfig or dict)
# ----------------------------------------------------------------------------------------------
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


def mode_of(cfg) -> str:
    """The run's privacy mode (``none`` when the config has no ``privacy`` group)."""
    priv = cfg.get("privacy") if hasattr(cfg, "get") else None
    return str(priv.get("mode", "none")) if priv else "none"


def planned_rounds(cfg) -> int:
    """Rounds the noise is planned for: ``privacy.planned_rounds``, default ``num_rounds`` (the worst case:
    a client sampled in every round)."""
    r = cfg.privacy.get("planned_rounds")
    return int(r) if r not in (None, "null") else int(cfg.num_rounds)


def dp_config(cfg) -> DPConfig:
    """The :class:`DPConfig` of a run. ``dp_sgd``: per-example clipping at ``privacy.max_grad_norm``.
    ``client_dp``: the same object describes the client-level Gaussian mechanism: ``max_grad_norm`` is the
    clipping norm of a client's whole update (``privacy.clipping_norm``), the accountant is RDP."""
    priv = cfg.privacy
    mode = str(priv.get("mode"))

    def _opt(key):
        v = priv.get(key)
        return None if v in (None, "null") else float(v)

    if mode == "dp_sgd":
        return DPConfig(noise_multiplier=_opt("noise_multiplier"), target_epsilon=_opt("target_epsilon"),
                        target_delta=float(priv.get("target_delta", 1e-5)),
                        max_grad_norm=float(priv.get("max_grad_norm", 1.0)),
                        accountant=str(priv.get("accountant", "rdp")), poisson=bool(priv.get("poisson", True)),
                        train_head=bool(priv.get("train_head", True)))
    if mode == "client_dp":
        return DPConfig(noise_multiplier=_opt("noise_multiplier"), target_epsilon=_opt("target_epsilon"),
                        target_delta=float(priv.get("target_delta", 1e-5)),
                        max_grad_norm=float(priv.get("clipping_norm", 1.0)), accountant="rdp")
    raise ValueError(f"privacy mode {mode!r} has no DP configuration.")


def client_level_noise(cfg: DPConfig, releases: int) -> float:
    """Noise multiplier of client-level DP (Flower's fixed-clipping wrappers): ``cfg.noise_multiplier``, or the
    one that spends ``cfg.target_epsilon`` over ``releases`` Gaussian releases without sampling amplification
    (Flower's accounted mode; each round's noised mean is one release)."""
    return plan_noise(cfg, 1.0, releases)


def validate_config(cfg) -> None:
    """Config-time checks of the ``privacy`` group against the rest of the run config; ``ValueError`` with
    one sentence (``fedlora.config.validate`` turns it into a ConfigError, exit 2)."""
    mode = mode_of(cfg)
    if mode not in PRIVACY_MODES:
        raise ValueError(f"privacy.mode={mode!r} is unknown: choose one of {', '.join(PRIVACY_MODES)}.")
    if mode == "none":
        return
    priv = cfg.privacy
    weighting = str(priv.get("weighting", "uniform" if mode.startswith("client_dp") else "num_examples"))
    check_compatible(str(cfg.strategy.name), mode, weighting=weighting,
                     fedpipe_importance=str(cfg.strategy.get("importance", "private")))
    r = priv.get("planned_rounds")
    if r not in (None, "null") and not (isinstance(r, int) and r >= 1):
        raise ValueError(f"privacy.planned_rounds={r} must be an integer >= 1 (or null for num_rounds).")
    given = [k for k in ("noise_multiplier", "target_epsilon") if priv.get(k) not in (None, "null")]
    if len(given) != 1:
        raise ValueError(
            f"privacy={mode} needs exactly one of privacy.target_epsilon (noise planned for the run) or "
            "privacy.noise_multiplier (fixed noise), "
            + ("got neither: set one of them." if not given else "got both: set one of them to null.")
        )
    try:
        dp = dp_config(cfg)
    except ValueError as e:
        raise ValueError(f"privacy: {str(e).rstrip('.')}; set it in conf/privacy/{'dp_sgd' if mode == 'dp_sgd' else 'client_level'}.yaml or as privacy.<key>=...") from None
    if mode == "dp_sgd":
        if str(priv.get("optimizer", "adamw")) not in ("adamw", "sgd"):
            raise ValueError(f"privacy.optimizer={priv.get('optimizer')!r} must be adamw or sgd.")
        if str(cfg.get("kernels", "peft")) != "peft":
            raise ValueError(
                f"dp_sgd needs kernels=peft: the fused LoRA kernels (kernels={cfg.kernels}) bypass the nn.Linear "
                "forward that Opacus hooks to compute per-example gradients."
            )
        return
    # client_dp: Flower's fixed-clipping wrappers with accounting
    if str(priv.get("clipping", "server")) not in ("server", "client"):
        raise ValueError(f"privacy.clipping={priv.get('clipping')!r} must be server or client (which side clips each update).")
    if dp.noise_multiplier is not None and dp.noise_multiplier <= 0:
        raise ValueError("client_dp needs privacy.noise_multiplier > 0 (Flower's accountant refuses noise-free releases).")
    if float(cfg.fraction_train) < 1.0:
        warnings.warn(
            "client_dp with fraction_train < 1: Flower's accountant takes no amplification from sampling, "
            "so the reported epsilon is an upper bound.",
            stacklevel=2,
        )
