"""The server side of privacy: one component a strategy holds (composition, not a wrapper around it).

- :class:`NoPrivacy` (``privacy=none``): the strategy's own round, unchanged.
- :class:`DPSGD` (``privacy=dp_sgd``): clients do DP-SGD; the server keeps the books (each client's epsilon, a
  checked copy of its accountant, who is out of budget) and stops the run when too few can still train.
- :class:`ClientLevelDP` (``privacy=client_level``): Flower's fixed-clipping wrappers clip and noise the mean of
  the sampled updates, accounted by :class:`OpacusRdpAccountant`.
How each works and what it guarantees: ``docs/privacy.md``. The maths and the client side: :mod:`fedlora.privacy`.
"""

from __future__ import annotations

import json
import math
from logging import INFO

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
from fedlora.config import ConfigError
from fedlora.privacy import mode_of

WEIGHT_KEY = "dp-weight"


def for_config(cfg):
    """The privacy component of a run."""
    mode = mode_of(cfg)
    if mode == "dp_sgd":
        return DPSGD(cfg)
    if mode == "client_dp":
        return ClientLevelDP(cfg)
    return NoPrivacy()


class NoPrivacy:
    """The interface the server loop and the strategy use; every step is the strategy's own."""

    mode = "none"
    #: whether the strategy may reject updates by their norm relative to the round's median
    outlier_check = True

    def start(self, strategy) -> None:
        """Called once the nodes are known, before the first round."""

    def configure(self, strategy, server_round: int, grid):
        return strategy.build_messages(server_round)

    def node_config(self, node) -> dict:
        """Extra ``config`` entries of a node's train message."""
        return {}

    def can_train(self, node) -> bool:
        return True

    def check_reply(self, strategy, node, msg, metrics: dict) -> str | None:
        """Why a reply is invalid for privacy reasons (None: it is not); may record what the reply reports."""
        return None

    def release(self, strategy, server_round: int, accepted: list, replies: list):
        """``(arrays, client_states, delta, skipped)`` of the round (see ``LoraStrategy.release``)."""
        return strategy.release(server_round, accepted)

    def stop_reason(self, strategy) -> str | None:
        """Why the run cannot go on before the next round, or None."""
        return None

    def round_metrics(self, strategy) -> dict:
        return {}

    def summary(self, strategy) -> dict:
        """The run summary's privacy entries: the mode and the epsilon spent (none without privacy)."""
        if self.mode == "none":
            return {}
        m = self.round_metrics(strategy)
        return {"privacy": self.mode, "epsilon_max": m["epsilon_max"], "delta": m["delta"], "epsilon": m["epsilon"]}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        """Restore what :meth:`state_dict` gave; a checkpoint of another privacy mode is refused (one sentence)."""
        was = sd.get("mode", "none" if not sd else "dp_sgd")
        if was != self.mode:
            raise ConfigError(f"the checkpoint was written under privacy mode {was} but this run has {self.mode}: "
                              "resume with the run's own privacy settings or start a new run.")
        for k, v in sd.items():
            setattr(self, k, v)


class DPSGD(NoPrivacy):
    """Sample-level DP-SGD on clients: the server's books. A client sends its accountant with every trained or
    budget-exhausted reply (ConfigRecord ``dp-sgd``); the server checks it (:func:`fedlora.privacy.check_reported`),
    keeps the latest copy per partition (checkpointed) and sends it back down, so a restarted node or a resumed
    server continues the client's accounting instead of restarting it from zero."""

    mode = "dp_sgd"

    def __init__(self, cfg):
        self.dp = privacy.dp_config(cfg)
        self.delta = float(cfg.privacy.target_delta)
        self.epsilon: dict[int, float] = {}  # partition -> epsilon so far, as the client reports it
        self.exhausted: set[int] = set()  # partitions whose budget is spent (no longer sampled)
        self.accountants: dict[int, str] = {}  # partition -> latest accountant (JSON) the client sent

    def node_config(self, node) -> dict:
        if node.partition_id in self.accountants:  # the client restores it if it lost its own
            return {privacy.ACCOUNTANT_CONFIG_KEY: self.accountants[node.partition_id]}
        return {}

    def can_train(self, node) -> bool:
        return node.partition_id not in self.exhausted

    def check_reply(self, strategy, node, msg, metrics):
        """A trained or budget-exhausted reply must carry ConfigRecord ``dp-sgd`` = {"accountant": JSON} that
        :func:`fedlora.privacy.check_reported` accepts (parses, the run's mechanism, the reported epsilon, not
        less than the server's copy). Other statuses (e.g. FLoRA's out-of-sync) may omit it."""
        content = msg.content
        status = str(content["status"].get("status", "ok")) if "status" in content else "ok"
        rec = content[privacy.ACCOUNTANT_RECORD] if privacy.ACCOUNTANT_RECORD in content else None
        accountant = None
        if rec is None:
            if status in ("ok", "budget-exhausted"):
                return (f"invalid DP-SGD reply: no '{privacy.ACCOUNTANT_RECORD}' ConfigRecord with the client's "
                        "accountant")
        else:
            try:
                if not isinstance(rec, ConfigRecord):
                    raise ValueError(f"'{privacy.ACCOUNTANT_RECORD}' must be a ConfigRecord, "
                                     f"got a {type(rec).__name__}.")
                if set(rec.keys()) != {"accountant"}:
                    raise ValueError(f"the record must hold exactly the key 'accountant', got {sorted(rec.keys())}.")
                state = privacy.check_reported(rec["accountant"], self.dp.accountant, self.dp.target_delta,
                                               metrics.get("epsilon"), stored=self.accountants.get(node.partition_id))
            except (ValueError, TypeError) as e:
                return f"invalid DP-SGD accountant record: {str(e).rstrip('.')}"[:300]
            accountant = state.to_json()
        # the books: the epsilon it reports (kept while it sits rounds out), its accountant, whether it is spent
        if isinstance(metrics.get("epsilon"), (int, float)):
            self.epsilon[node.partition_id] = float(metrics["epsilon"])
        if accountant is not None:
            self.accountants[node.partition_id] = accountant
        if status == "budget-exhausted":
            self.exhausted.add(node.partition_id)
        return None

    def stop_reason(self, strategy):
        able = [n for n in strategy.nodes.values() if n.partition_id not in self.exhausted]
        if len(able) < strategy.min_train_nodes:
            return (f"only {len(able)} clients can still train within privacy.target_epsilon "
                    f"(< min_train_nodes={strategy.min_train_nodes})")
        return None

    def round_metrics(self, strategy):
        """Every client's epsilon so far (0 before it trains) and the maximum."""
        pids = sorted(n.partition_id for n in strategy.nodes.values())
        eps = {str(p): float(self.epsilon.get(p, 0.0)) for p in pids}
        return {"epsilon": eps, "epsilon_max": max(eps.values(), default=0.0), "delta": self.delta,
                "budget_exhausted": sorted(self.exhausted)}

    def state_dict(self):
        return {"epsilon": self.epsilon, "exhausted": self.exhausted, "accountants": self.accountants}


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
    ``configure_train`` builds the fedlora strategy's messages (one per node), plus what the wrapper put into
    ``config`` (client-side clipping: the clipping norm). The last round's plan is kept in ``plan``."""

    def __init__(self, inner):
        super().__init__(fraction_train=float(inner.cfg.fraction_train), fraction_evaluate=0.0,
                         min_train_nodes=int(inner.min_train_nodes), min_available_nodes=int(inner.cfg.num_clients),
                         weighted_by_key=WEIGHT_KEY)
        self.inner = inner
        self.plan = None

    def configure_train(self, server_round, arrays, config, grid):
        self.plan = self.inner.build_messages(server_round)
        for m in self.plan.messages:
            for k, v in (config or {}).items():
                m.content["config"][k] = v
        return self.plan.messages


class ClientLevelDP(NoPrivacy):
    """Client-level DP with Flower's fixed-clipping wrapper and an accountant, for strategies whose aggregate is
    the element-wise mean of same-shaped updates (fedit, ffa_lora). Each accepted update is given weight 1;
    a round with fewer valid updates than sampled clients is not released (the wrapper's strict mode). With
    client-side clipping a reply whose update exceeds the clipping norm is rejected (:meth:`check_reply`).
    The checkpoint holds the accountant and the plan (noise multiplier, budget, rounds): a resumed run continues
    both (:meth:`load_state_dict`)."""

    mode = "client_dp"
    outlier_check = False  # it would decide on un-noised updates which rounds get released; clipping bounds them
    #: relative slack of the client-side clipping check (float32 rounding of Flower's clipping: see check_reply)
    norm_rtol = 1e-6

    def __init__(self, cfg):
        self.cfg = cfg
        self.dp_cfg = privacy.dp_config(cfg)
        self.plan = privacy.client_level_plan(cfg)  # settings, noise multiplier, num_rounds (checkpointed)
        self.noise_multiplier = float(self.plan["noise_multiplier"])
        self.clipping = str(cfg.privacy.get("clipping", "server"))
        self.seed = int(cfg.seed) if cfg.privacy.get("reproducible") else None
        self.current = ArrayRecord()
        self.flower = self.view = self.accountant = None
        self.restored = None  # the checkpointed accountant, when loaded before start()
        self.num_sampled = 0

    def start(self, strategy) -> None:
        """Build the accountant and Flower's wrapper with the run's noise multiplier (the checkpointed one when
        :meth:`load_state_dict` came first; it may also come after)."""
        n = len(strategy.nodes) or int(self.cfg.num_clients)
        self.num_sampled = min(n, max(int(n * float(self.cfg.fraction_train)), int(strategy.min_train_nodes)))
        self.accountant = OpacusRdpAccountant(PrivacyConfig(
            target_delta=self.dp_cfg.target_delta, population_size=n,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=self.dp_cfg.target_epsilon))
        if self.restored is not None:
            self.accountant.load_state_dict(self.restored)
        wrapper = (DifferentialPrivacyServerSideFixedClipping if self.clipping == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        self.view = _FedAvgView(strategy)
        self.flower = wrapper(self.view, noise_multiplier=self.noise_multiplier,
                              clipping_norm=self.dp_cfg.max_grad_norm, num_sampled_clients=self.num_sampled,
                              accountant=self.accountant)

    def check_reply(self, strategy, node, msg, metrics):
        """Client-side clipping: the update (the reply's arrays minus the arrays sent, flat over all arrays, as
        Flower's ``fixedclipping_mod`` computes it) must have norm <= the clipping norm, else the reply is
        rejected. Replies whose arrays do not match what was sent are left to the strategy's own checks."""
        if self.clipping != "client":
            return None
        norm, limit = self.update_norm(node, msg)
        if norm is None or norm <= limit:
            return None
        return (f"update norm {norm:.6g} exceeds privacy.clipping_norm={self.dp_cfg.max_grad_norm:g}: with "
                "privacy.clipping=client every client must clip its round update before sending it")

    def sent_to(self, node) -> dict[str, np.ndarray]:
        """The arrays the server sent to ``node`` this round (its message in the round's plan, else ``current``)."""
        plan = self.view.plan if self.view is not None else None
        for m in (plan.messages if plan is not None else []):
            if m.metadata.dst_node_id == node.node_id:
                return {k: a.numpy() for k, a in m.content["arrays"].items()}
        return {k: a.numpy() for k, a in self.current.items()}

    def update_norm(self, node, msg) -> tuple[float | None, float]:
        """``(norm, limit)``: the L2 norm (float64) of the reply's update over all arrays, and the most an honest
        client-side clipping can give: ``C (1 + norm_rtol) + eps32 (||sent|| + 2 C)``. The client adds its clipped
        update to the sent arrays in float32, which moves each element by at most one float32 ulp of the sum
        (whose norm is <= ||sent|| + ||update||); ``norm_rtol`` covers Flower's float32 norm and scaling. Norm
        None: no arrays, other keys or shapes than were sent, or non-finite values (the strategy rejects those)."""
        C = float(self.dp_cfg.max_grad_norm)
        try:
            got = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        except Exception:  # malformed record: the strategy's checks say so
            return None, C
        sent = self.sent_to(node)
        if not got or set(got) != set(sent) or any(got[k].shape != sent[k].shape for k in sent):
            return None, C
        sq = sum(float(np.sum((got[k].astype(np.float64) - sent[k].astype(np.float64)) ** 2)) for k in sent)
        if not np.isfinite(sq):
            return None, C
        sent_norm = math.sqrt(sum(float(np.sum(sent[k].astype(np.float64) ** 2)) for k in sent))
        eps = float(np.finfo(np.float32).eps)
        return math.sqrt(sq), C * (1.0 + self.norm_rtol) + eps * (sent_norm + 2.0 * C)

    def configure(self, strategy, server_round, grid):
        """Raises Flower's ``PrivacyBudgetExhausted`` when the next release would exceed the budget."""
        self.current = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                    for k, v in to_arrays(strategy.state, parts=strategy.client_sends).items()})
        self.flower.configure_train(server_round, self.current, ConfigRecord(), grid)
        return self.view.plan

    def release(self, strategy, server_round, accepted, replies):
        by_node = {m.metadata.src_node_id: m for m in replies if not m.has_error()}
        keys = list(self.current.keys())
        msgs = []
        for u in accepted:  # what Flower's FedAvg sees: the same keys in the same order, weight 1
            msg = by_node[u.node.node_id]
            arrays = ArrayRecord({k: Array(np.ascontiguousarray(u.arrays[k])) for k in keys})
            msg.content = RecordDict({"arrays": arrays, "metrics": MetricRecord({WEIGHT_KEY: 1.0})})
            msgs.append(msg)
        ss = np.random.SeedSequence(None if self.seed is None else [self.seed, server_round])
        np.random.seed(ss.generate_state(4))  # Flower draws its noise from NumPy's global generator
        # With fewer valid updates than sampled clients the wrapper (strict, accounted mode) releases nothing
        # and spends nothing: the noise is calibrated for num_sampled updates.
        record, _ = self.flower.aggregate_train(server_round, msgs)
        if record is None:
            return None, [], None, (f"{len(msgs)} valid updates: client-level DP releases only rounds with all "
                                    f"{self.num_sampled} sampled clients")
        nodes = [u.node for u in accepted]
        new = strategy.to_state(nodes[0], {k: a.numpy() for k, a in record.items()})
        client_states = [(n, strategy.to_state(n, {k: a.numpy() for k, a in
                                                    by_node[n.node_id].content["arrays"].items()}), 1.0)
                         for n in nodes]
        delta = algebra.effective_update(new, strategy.state)
        strategy.state = new
        log(INFO, "round %d: client-level DP release %d, epsilon %.4f", server_round, self.accountant.num_releases,
            self.accountant.get_epsilon(self.dp_cfg.target_delta))
        return record, client_states, delta, None

    def round_metrics(self, strategy):
        eps = self.accountant.get_epsilon(self.dp_cfg.target_delta)
        pids = sorted(n.partition_id for n in strategy.nodes.values())
        return {"epsilon": {str(p): eps for p in pids}, "epsilon_max": eps, "delta": self.dp_cfg.target_delta,
                "noise_multiplier": self.noise_multiplier, "clipping_norm": self.dp_cfg.max_grad_norm,
                "releases": self.accountant.num_releases}

    def state_dict(self) -> dict:
        """Plain JSON-able values: the mode, the plan (:func:`fedlora.privacy.client_level_plan`: settings, noise
        multiplier, num_rounds) and the accountant (its releases so far)."""
        if self.accountant is not None:
            acc = self.accountant.state_dict()
        else:  # not started yet: what was loaded, else no release so far
            acc = self.restored or {"backend": OpacusRdpAccountant.method,
                                    "accountant": privacy.AccountantState("rdp").to_dict()}
        return {"mode": self.mode, "plan": {**self.plan, "settings": dict(self.plan["settings"])},
                "accountant": json.loads(json.dumps(acc))}

    def load_state_dict(self, sd: dict) -> None:
        """Continue a checkpointed run: its accountant (epsilon and releases so far) and its noise multiplier,
        into the accountant and wrapper :meth:`start` built (or for :meth:`start` to use). A ConfigError (one
        sentence) when the checkpoint has no client-level accountant or the run's config changes what the epsilon
        already spent was accounted with (:func:`fedlora.privacy.check_client_level_resume`)."""
        if not isinstance(sd, dict) or sd.get("mode") != self.mode or not sd.get("plan") or not sd.get("accountant"):
            raise ConfigError("the checkpoint holds no client-level DP accountant (written without "
                              "privacy=client_level or by an older fedlora), so the epsilon already spent is "
                              "unknown: start a new run.")
        try:
            privacy.check_client_level_resume(sd["plan"], self.cfg)
            if sd["accountant"].get("backend") != OpacusRdpAccountant.method:
                raise ValueError(f"the checkpoint's accountant is {sd['accountant'].get('backend')!r}, not "
                                 f"{OpacusRdpAccountant.method!r}: start a new run.")
            state = privacy.AccountantState.from_dict(sd["accountant"]["accountant"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"the checkpoint's client-level DP state is malformed ({type(e).__name__}: {e}): "
                              "start a new run.") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.plan = {**sd["plan"], "settings": dict(sd["plan"]["settings"]),
                     "num_rounds": max(int(sd["plan"]["num_rounds"]), int(self.cfg.num_rounds))}
        self.noise_multiplier = float(sd["plan"]["noise_multiplier"])
        self.restored = {"backend": OpacusRdpAccountant.method, "accountant": state.to_dict()}
        if self.accountant is not None:
            self.accountant.load_state_dict(self.restored)
        if self.flower is not None:  # the wrapper noises and accounts with its own copy of the multiplier
            self.flower.noise_multiplier = self.noise_multiplier
