"""Privacy accounting of sample-level DP-SGD, as plain data: one accountant per client for the whole run.

:class:`AccountantState` is Opacus' accountant history; it survives fresh client processes (JSON), is restored
into every round's engine, and decides budgets (:func:`plan_noise`, :func:`would_exceed`) and which copy a client
trusts (:func:`restore_accountant`, :func:`check_reported`). Why, and the rules: ``docs/privacy.md``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checks import DPConfig

ACCOUNTANTS = ("rdp", "prv", "gdp")
_STATE_VERSION = 1
#: train-config key (server -> client) holding the server's copy of the client's accountant (JSON)
ACCOUNTANT_CONFIG_KEY = "dp.accountant"
#: name of the reply's ConfigRecord (client -> server) holding ``{"accountant": JSON}``; also the key in
#: the node's ``context.state``
ACCOUNTANT_RECORD = "dp-sgd"


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
            raise ValueError(f"accountant state version {d.get('version')} is not supported "
                             f"(expected {_STATE_VERSION}).")
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
    ``server_copy``: the copy the server sent (JSON string, or None/"" when it sent none). Rule (see
    docs/privacy.md): the local copy unless the server's has spent more (:func:`spent_more`); without a local copy,
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
                "accountant, so it cannot know what it has spent; refusing to train rather than restart epsilon "
                "from zero."
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
    if not (eps == rep or (math.isfinite(eps) and math.isfinite(rep)
                           and abs(eps - rep) <= 1e-9 * max(abs(eps), 1e-12))):
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
