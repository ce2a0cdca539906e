"""Server side of differential privacy (the client side and the maths: :mod:`fedlora.privacy`).

Sample-level DP-SGD (``privacy=dp_sgd``)
----------------------------------------
Clients do the work (``clients/client_app.py``: one accountant per client for the whole run, noise planned
once, budget checked before each round). The server only keeps the books: every round's metrics carry
every client's epsilon so far (``epsilon: {partition: eps}``, 0 for a client that has not trained yet,
``epsilon_max``), a client that replies ``budget-exhausted`` is logged among the round's rejections and is
no longer sampled, and the run stops cleanly (summary ``status: budget-exhausted``) as soon as fewer than
``min_train_nodes`` clients can still train. It also keeps a copy of every client's accountant (sent back in
each reply, checked, stored per partition in the strategy's checkpointed state) and sends it down in the train
config, so a restarted node or a resumed server continues the client's accounting instead of restarting it
from zero; a client uses the server's copy only when it has none of its own or the copy has spent more (see
:mod:`fedlora.privacy`, "Where a client's accountant lives").

Client-level DP (``privacy=client_level``, mode ``client_dp``)
-------------------------------------------------------------
Central DP with a trusted server, through Flower 1.42's own wrappers
(``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`` or, with ``privacy.clipping=client``,
``DifferentialPrivacyClientSideFixedClipping`` plus Flower's ``fixedclipping_mod`` on the clients): each
client's round update (every array it sends, flat) is clipped to ``clipping_norm``, the k updates are
averaged with equal weights and ``N(0, (sigma * clipping_norm / k)^2)`` is added to the mean; one round is
one Gaussian release, composed by the wrapper's accountant without sampling amplification.

Flower's conditions for its accounted mode, and how fedlora meets them:

- fixed clipping (the adaptive wrappers have no accountant: ``client_dp_adaptive`` is refused at config time);
- a fixed number k of sampled clients per round (``max(int(N * fraction_train), min_train_nodes)``); a round
  in which fewer than k valid updates arrive is not released (the wrapper's strict check) and costs nothing;
- ``sampling_method=no-amplification`` (add-or-remove-one neighbours): the epsilon is an upper bound when
  ``fraction_train < 1``;
- equal client weights, checked on every reply: fedlora replaces each accepted reply's metrics by
  ``{"dp-weight": 1}`` for the wrapper (``privacy.weighting=num_examples`` is refused at config time);
- the wrapped strategy must be a ``FedAvg`` whose ``aggregate_train`` is ``FedAvg.aggregate_train`` itself.
  fedlora's strategies override it, so the wrapper gets :class:`_FedAvgView`: Flower's FedAvg with fedlora's
  ``configure_train`` (per-node messages) and Flower's unmodified aggregation. For fedit (A, B, head averaged
  element-wise) and ffa_lora (B and head; A frozen, never sent) that mean is exactly the fedlora aggregate,
  and the noised mean becomes the new global adapter. Other strategies are refused (see fedlora.privacy).

Accountant: Flower's ``RdpAccountant`` wraps Google's ``dp-accounting`` (the ``flwr[dp]`` extra), which is
not installed here. The wrapper only needs an object with Flower's ``PrivacyAccountant`` protocol, so
:class:`OpacusRdpAccountant` implements it with Opacus' RDP analysis of the same event (Gaussian mechanism,
sampling rate 1, one step per release); it is the accountant fedlora plans the noise with, so a run planned
for R releases spends at most ``target_epsilon`` in exactly R. Flower's budget check
(``PrivacyBudgetExhausted`` before a release that would exceed ``max_epsilon = target_epsilon``) stops the
run cleanly with status ``budget-exhausted``.

What the guarantee does not cover: client metrics (train loss, example counts) travel un-noised, as in
Flower ("training and evaluation metrics are not included"). fedlora's norm-outlier rejection is switched
off under client_dp (it would decide on un-noised updates which rounds get released); clipping bounds
every update instead. Audit files (``audit=true``) hold the clients' individual clipped updates: they are
the trusted server's private data.
Flower adds its noise with NumPy's global generator, which the server seeds from the run seed at start:
before each release fedlora reseeds it from the OS (``privacy.reproducible=true``: from the run seed and
round, for tests and experiments only).
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import NeighboringRelation, PrivacyConfig, PrivacySpent, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from fedlora import algebra, privacy
from fedlora.adapters import to_arrays

from .base import to_record

WEIGHT_KEY = "dp-weight"


# ----------------------------------------------------------------------------------------------
# helpers for the server loop (every privacy mode)
# ----------------------------------------------------------------------------------------------
def wrap(strategy, cfg):
    """The strategy the server loop drives: ``strategy`` itself, or its client-level DP wrapper."""
    return ClientLevelDP(strategy, cfg) if privacy.mode_of(cfg) == "client_dp" else strategy


def stop_reason(strategy, cfg) -> str | None:
    """Why the run cannot go on before the next round (DP-SGD: too few clients with budget left), or None."""
    if privacy.mode_of(cfg) != "dp_sgd":
        return None
    able = [n for n in strategy.nodes.values() if n.partition_id not in strategy.exhausted]
    if len(able) < strategy.min_train_nodes:
        return (f"only {len(able)} clients can still train within privacy.target_epsilon "
                f"(< min_train_nodes={strategy.min_train_nodes})")
    return None


def round_metrics(strategy, cfg) -> dict:
    """Privacy numbers for a round's metrics line: every client's epsilon so far and the maximum."""
    mode = privacy.mode_of(cfg)
    if mode == "dp_sgd":
        pids = sorted(n.partition_id for n in strategy.nodes.values())
        eps = {str(p): float(strategy.epsilon.get(p, 0.0)) for p in pids}
        return {"epsilon": eps, "epsilon_max": max(eps.values(), default=0.0),
                "delta": float(cfg.privacy.target_delta), "budget_exhausted": sorted(strategy.exhausted)}
    if mode == "client_dp":
        return strategy.privacy_metrics()
    return {}


def summary(strategy, cfg) -> dict:
    mode = privacy.mode_of(cfg)
    if mode == "none":
        return {}
    m = round_metrics(strategy, cfg)
    return {"privacy": mode, "epsilon_max": m["epsilon_max"], "delta": m["delta"], "epsilon": m["epsilon"]}


# ----------------------------------------------------------------------------------------------
# client-level DP
# ----------------------------------------------------------------------------------------------
class OpacusRdpAccountant:
    """Flower's ``PrivacyAccountant`` protocol for the no-amplification Gaussian releases of the fixed-clipping
    wrappers, computed with Opacus' RDP accountant (a :class:`fedlora.privacy.AccountantState` whose entries
    are ``(noise_multiplier, 1.0, releases)``). Stands in for ``flwr.serverapp.RdpAccountant``, which needs the
    ``dp-accounting`` package."""

    method = "rdp (opacus)"

    def __init__(self, config: PrivacyConfig):
        if config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
            raise ValueError("OpacusRdpAccountant accounts no-amplification releases only.")
        self._config = config
        self._state = privacy.AccountantState("rdp")

    @property
    def config(self) -> PrivacyConfig:
        return self._config

    @property
    def num_releases(self) -> int:
        return self._state.steps

    def _after(self, event, count: int) -> privacy.AccountantState:
        if not (event.noise_multiplier > 0 and int(count) == count and count >= 1):
            raise ValueError("a release needs a positive noise multiplier and a positive integer count.")
        return self._state.extended(float(event.noise_multiplier), 1.0, int(count))

    def compose(self, event, count: int = 1) -> None:
        self._state = self._after(event, count)

    def get_epsilon(self, delta: float) -> float:
        return privacy.epsilon(self._state, delta)

    def get_delta(self, epsilon: float) -> float:
        """Smallest delta over the RDP orders by the standard conversion delta = exp((a-1)(rdp_a - eps))."""
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import compute_rdp

        if not self._state.history:
            return 0.0
        orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
        rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in self._state.history)
        return float(min(1.0, np.min(np.exp((orders - 1.0) * (np.asarray(rdp) - epsilon)))))

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        d = self._config.target_delta if delta is None else float(delta)
        order = None
        if self._state.history:
            _, order = self._state._accountant().get_privacy_spent(delta=d)
        return PrivacySpent(epsilon=self.get_epsilon(d), delta=d, num_releases=self.num_releases,
                            accounting_method=self.method, optimal_order=None if order is None else float(order))

    def would_exceed(self, event, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            raise ValueError("max_epsilon must be supplied either in PrivacyConfig or to would_exceed().")
        return privacy.epsilon(self._after(event, count), self._config.target_delta) > limit

    def state_dict(self) -> dict[str, object]:
        return {"backend": self.method, "accountant": self._state.to_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state.get("backend") != self.method:
            raise ValueError("Accountant state was produced by a different backend.")
        self._state = privacy.AccountantState.from_dict(state["accountant"])


class _FedAvgView(FedAvg):
    """A fedlora strategy as Flower's DP wrappers need to see it: a ``FedAvg`` with Flower's own
    ``aggregate_train`` (element-wise mean of the replies' arrays, weighted by ``dp-weight`` = 1) whose
    ``configure_train`` is the fedlora strategy's (one Message per node), plus what the wrapper put into
    ``config`` (client-side clipping: the clipping norm)."""

    def __init__(self, inner):
        super().__init__(fraction_train=float(inner.cfg.fraction_train), fraction_evaluate=0.0,
                         min_train_nodes=int(inner.min_train_nodes), min_available_nodes=int(inner.cfg.num_clients),
                         weighted_by_key=WEIGHT_KEY)
        self.inner = inner

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(self.inner.configure_train(server_round, None, None, grid))
        for m in messages:
            for k, v in (config or {}).items():
                m.content["config"][k] = v
        return messages


class ClientLevelDP:
    """Client-level DP around a fedlora strategy (fedit, ffa_lora) with Flower's fixed-clipping wrapper and
    an accountant. The server loop drives it like the strategy itself; everything else is the strategy's."""

    def __init__(self, inner, cfg):
        self.inner = inner
        inner.norm_factor = 0.0  # outlier rejection would read un-noised updates; clipping bounds them instead
        self.dp_cfg = privacy.dp_config(cfg)
        self.releases = privacy.planned_rounds(cfg)
        self.noise_multiplier = privacy.client_level_noise(self.dp_cfg, self.releases)
        n = len(inner.nodes) or int(cfg.num_clients)
        self.num_sampled = min(n, max(int(n * float(cfg.fraction_train)), int(inner.min_train_nodes)))
        self.accountant = OpacusRdpAccountant(PrivacyConfig(
            target_delta=self.dp_cfg.target_delta, population_size=n,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=self.dp_cfg.target_epsilon))
        self.clipping = str(cfg.privacy.get("clipping", "server"))
        wrapper = (DifferentialPrivacyServerSideFixedClipping if self.clipping == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        self.view = _FedAvgView(inner)
        self.flower = wrapper(self.view, noise_multiplier=self.noise_multiplier,
                              clipping_norm=self.dp_cfg.max_grad_norm, num_sampled_clients=self.num_sampled,
                              accountant=self.accountant)
        self.seed = int(cfg.seed) if cfg.privacy.get("reproducible") else None
        self.current = ArrayRecord()

    def __getattr__(self, name):  # only for attributes not found on the wrapper itself
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def configure_train(self, server_round, arrays=None, config=None, grid=None):
        """Raises Flower's ``PrivacyBudgetExhausted`` when the next release would exceed the budget."""
        self.current = to_record(to_arrays(self.inner.state, parts=self.inner.client_sends))
        return list(self.flower.configure_train(server_round, self.current, ConfigRecord(), grid))

    def aggregate_train(self, server_round, replies):
        inner = self.inner
        replies = list(replies)
        by_node = {m.metadata.src_node_id: m for m in replies if not m.has_error()}
        accepted = inner.check_replies(replies)
        inner.last["num_clients"] = len(accepted)
        inner.last_delta = None
        if accepted:
            w = np.array([float(m["num-examples"]) for _, _, m in accepted])
            inner.last["train_loss"] = float(np.average([m["train_loss"] for _, _, m in accepted], weights=w))
            inner.last["client_metrics"] = [
                {"node": n.partition_id, **{k: v for k, v in m.items() if isinstance(v, (int, float))}}
                for n, _, m in accepted]
        keys = list(self.current.keys())
        msgs = []
        for node, arrays, _ in accepted:  # what Flower's FedAvg sees: the same keys in the same order, weight 1
            msg = by_node[node.node_id]
            msg.content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(arrays[k])) for k in keys}),
                                      "metrics": MetricRecord({WEIGHT_KEY: 1.0})})
            msgs.append(msg)
        ss = np.random.SeedSequence(None if self.seed is None else [self.seed, server_round])
        np.random.seed(ss.generate_state(4))  # Flower draws its noise from NumPy's global generator
        # With fewer valid updates than sampled clients the wrapper (strict, accounted mode) releases nothing
        # and spends nothing: the noise is calibrated for num_sampled updates.
        record, _ = self.flower.aggregate_train(server_round, msgs)
        if record is None:
            inner.last["skipped"] = (f"{len(msgs)} valid updates: client-level DP releases only rounds with all "
                                     f"{self.num_sampled} sampled clients")
            log(WARNING, "round %d skipped: %s", server_round, inner.last["skipped"])
            return None, None
        nodes = [n for n, _, _ in accepted]
        new = inner.to_state(nodes[0], {k: a.numpy() for k, a in record.items()})
        inner.last["client_states"] = [(n, inner.to_state(n, {k: a.numpy() for k, a in by_node[n.node_id].content["arrays"].items()}), 1.0)
                                       for n in nodes]
        inner.last["accepted"] = accepted
        inner.last_delta = algebra.effective_update(new, inner.state)
        inner.state = new
        log(INFO, "round %d: client-level DP release %d, epsilon %.4f", server_round, self.accountant.num_releases,
            self.accountant.get_epsilon(self.dp_cfg.target_delta))
        return record, MetricRecord({"train_loss": inner.last["train_loss"]})

    def privacy_metrics(self) -> dict:
        eps = self.accountant.get_epsilon(self.dp_cfg.target_delta)
        pids = sorted(n.partition_id for n in self.inner.nodes.values())
        return {"epsilon": {str(p): eps for p in pids}, "epsilon_max": eps, "delta": self.dp_cfg.target_delta,
                "noise_multiplier": self.noise_multiplier, "clipping_norm": self.dp_cfg.max_grad_norm,
                "releases": self.accountant.num_releases}
