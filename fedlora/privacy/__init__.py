"""Differential privacy for fedlora clients; no Flower in here. What lives where (the design: docs/privacy.md):

- :mod:`.accounting`: one accountant per client as plain data (:class:`AccountantState`), epsilon, noise planning,
  the budget check, and which copy of an accountant a client continues from;
- :mod:`.opacus`: sample-level DP-SGD with Opacus for one client round (:func:`make_private`, :class:`DPSession`);
- :mod:`.checks`: :class:`DPConfig`, the run config's ``privacy`` group and the privacy settings that are
  refused (which strategy supports which mode is declared on the strategy classes);
- :mod:`.floor`: a node's own privacy floor (:class:`NodeFloor`) and which rounds it refuses.

Everything is re-exported here: ``from fedlora import privacy; privacy.X``.
"""

from .accounting import (
    ACCOUNTANT_CONFIG_KEY,
    ACCOUNTANT_RECORD,
    ACCOUNTANTS,
    AccountantState,
    check_reported,
    epsilon,
    plan_noise,
    restore_accountant,
    spent_more,
    would_exceed,
)
from .checks import (
    PRIVACY_MODES,
    DPConfig,
    check_client_level_resume,
    check_compatible,
    check_resume,
    client_level_noise,
    client_level_plan,
    dp_config,
    mode_of,
    planned_rounds,
    releases_epsilon,
    releases_within,
    validate_config,
)
from .floor import NodeFloor
from .floor import refusal as floor_refusal
from .opacus import (
    DPSession,
    batch_size_of,
    causal_lm_loss,
    fresh_generators,
    iterate_steps,
    make_private,
    noise_only_step,
    sample_rate,
)

__all__ = [
    "ACCOUNTANTS",
    "PRIVACY_MODES",
    "AccountantState",
    "batch_size_of",
    "DPConfig",
    "DPSession",
    "causal_lm_loss",
    "check_client_level_resume",
    "check_compatible",
    "check_resume",
    "client_level_noise",
    "client_level_plan",
    "dp_config",
    "epsilon",
    "fresh_generators",
    "iterate_steps",
    "make_private",
    "mode_of",
    "noise_only_step",
    "plan_noise",
    "planned_rounds",
    "releases_epsilon",
    "releases_within",
    "sample_rate",
    "validate_config",
    "would_exceed",
    "check_reported",
    "restore_accountant",
    "spent_more",
    "ACCOUNTANT_CONFIG_KEY",
    "ACCOUNTANT_RECORD",
    "NodeFloor",
    "floor_refusal",
]
