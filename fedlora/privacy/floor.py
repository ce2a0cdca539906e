"""A node's privacy floor: the weakest DP-SGD setting a node accepts, set by the node's operator (its node
config, never a message) and checked against what each round asks for. The server is the party DP protects the
data against, so a node trains only when the run's setting is at least as strong as its floor, and otherwise
refuses the round with one sentence that the server records. No Flower in here; the node side is
:mod:`fedlora.clients.node`.

Node-config keys (``--node-config "dp-required=true dp-max-epsilon=3 dp-max-delta=1e-5 dp-max-clip=1.0"``):

- ``dp-required``: train only under sample-level DP-SGD (``privacy=dp_sgd``); default true as soon as any
  ``dp-max-*`` key is given.
- ``dp-max-epsilon``, ``dp-max-delta``: the largest budget the run may plan for this node.
- ``dp-max-clip``: the largest per-example clipping norm.

Under a floor the epsilon must be an accounted upper bound: a fixed ``noise_multiplier`` without a target, no
Poisson sampling or the approximate GDP accountant are refused, and noise seeded from the run config is refused
unless the node itself allowed it (``dp-reproducible=true``, see :mod:`fedlora.clients.node`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .checks import DPConfig

KEYS = ("dp-required", "dp-max-epsilon", "dp-max-delta", "dp-max-clip")


def flag(value, key: str) -> bool:
    """A node-config boolean (``true``/``false``, ``1``/``0``, ``yes``/``no``, any case); ValueError in one
    sentence for anything else, so a misspelt value is never read as false."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"node config {key}={value!r} is not a boolean: use {key}=true or {key}=false.")


def _bound(value, key: str, upper: float = math.inf) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (0 < x < upper):
        limit = "1" if upper == 1 else "infinity"
        raise ValueError(f"node config {key}={value!r} must be a number between 0 and {limit}: fix the node config.")
    return x


@dataclass(frozen=True)
class NodeFloor:
    """The weakest DP-SGD setting a node accepts (None: no bound on that quantity)."""

    required: bool = True
    max_epsilon: float | None = None
    max_delta: float | None = None
    max_clip: float | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping) -> NodeFloor | None:
        """The floor a node config sets, or None when it sets none; ``ValueError`` (one sentence) on a bad value."""
        given = {k: node_config[k] for k in KEYS if k in node_config}
        if not given:
            return None
        bounds = dict(max_epsilon=_bound(given["dp-max-epsilon"], "dp-max-epsilon") if "dp-max-epsilon" in given
                      else None,
                      max_delta=_bound(given["dp-max-delta"], "dp-max-delta", 1.0) if "dp-max-delta" in given
                      else None,
                      max_clip=_bound(given["dp-max-clip"], "dp-max-clip") if "dp-max-clip" in given else None)
        required = flag(given.get("dp-required", True), "dp-required")
        if not required and any(v is not None for v in bounds.values()):
            raise ValueError("node config sets dp-max-* bounds with dp-required=false: a server could then turn DP "
                             "off; drop dp-required=false or the bounds.")
        return cls(required=required, **bounds) if required else None

    def describe(self) -> str:
        parts = ["dp-required=true"]
        for key, v in (("dp-max-epsilon", self.max_epsilon), ("dp-max-delta", self.max_delta),
                       ("dp-max-clip", self.max_clip)):
            if v is not None:
                parts.append(f"{key}={v:g}")
        return " ".join(parts)


def refusal(floor: NodeFloor | None, mode: str, dp: DPConfig | None, *, reproducible: bool,
            node_allows_reproducible: bool) -> str | None:
    """Why a node with ``floor`` refuses a round whose privacy is ``mode`` / ``dp`` (None: it trains).

    ``reproducible``: the run asks for noise and sampling seeded from the run config (``privacy.reproducible``);
    ``node_allows_reproducible``: the node's own opt-in to that.
    """
    if floor is None:
        return None
    own = f"this node's floor ({floor.describe()})"
    if mode != "dp_sgd":
        what = "no DP" if mode == "none" else f"privacy.mode={mode}, whose noise the server adds"
        return f"{own} requires sample-level DP-SGD on the node but the run asks for {what}: use privacy=dp_sgd."
    if dp.target_epsilon is None:
        return (f"{own} needs an accounted budget but the run fixes privacy.noise_multiplier="
                f"{dp.noise_multiplier:g} without privacy.target_epsilon, so epsilon is unbounded.")
    if floor.max_epsilon is not None and dp.target_epsilon > floor.max_epsilon:
        return f"{own} allows epsilon up to {floor.max_epsilon:g} but the run asks for {dp.target_epsilon:g}."
    if floor.max_delta is not None and dp.target_delta > floor.max_delta:
        return f"{own} allows delta up to {floor.max_delta:g} but the run asks for {dp.target_delta:g}."
    if floor.max_clip is not None and dp.max_grad_norm > floor.max_clip:
        return f"{own} allows a clipping norm up to {floor.max_clip:g} but the run asks for {dp.max_grad_norm:g}."
    if not dp.poisson or dp.accountant == "gdp":
        what = "no Poisson sampling" if not dp.poisson else "the approximate GDP accountant"
        return f"{own} needs epsilon as an upper bound but the run asks for {what}."
    if reproducible and not node_allows_reproducible:
        return (f"{own} draws DP noise from the operating system's randomness but the run asks for noise seeded "
                "from the run config (privacy.reproducible), which the server could regenerate; only the node "
                "can allow that (dp-reproducible=true).")
    return None
