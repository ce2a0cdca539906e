"""FedPipe (Fang et al., 2024), the general documented version (no public code; the paper's exact formulas are
not published). Before training the server assigns hardware profiles, checks feasibility, plans (rank, batch,
bits) per client with the MILP of :mod:`fedlora.fedpipe.plan`, selects modules by importance from a warm-up
QUERY, and writes ``plan.json``. Every client takes the plan's optimizer steps per round (by default the same
number for all, ``strategy.steps_per_round``; its examples are steps x its batch). Mixed ranks are aggregated by
stacking (FLoRA's rule) or zero-padding (HetLoRA's, from a nested start: round 1's clients hold the first r_k
rows of one seeded A of the largest planned rank), held as a :mod:`~fedlora.strategies.rank_rules` object. The
whole design: ``docs/fedpipe.md``.
"""

from __future__ import annotations

import json
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedlora.adapters import AdapterState, LoraFactors
from fedlora import config
from fedlora.config import ConfigError
from fedlora.privacy import mode_of
from fedlora.fedpipe import planning
from fedlora.fedpipe.importance import aggregate_importance, select_modules
from fedlora.fedpipe.memory import ActivationCalibration, analytic_activations, rank_activation_coef
from fedlora.fedpipe.plan import InfeasibleBudgetError, Plan
from fedlora.fedpipe.profiles import node_profile

from fedlora.messages import CONFIG_KEY
from fedlora.validate import check_count, is_number

from .base import LoraStrategy
from .rank_rules import Stacking, ZeroPadding

IMPORTANCE_PREFIX = "importance."


# ----------------------------------------------------------------------------------------------
# The strategy
# ----------------------------------------------------------------------------------------------
class FedPipe(LoraStrategy):
    name = "fedpipe"
    supports_mixed_ranks = True
    client_dp_refusal = "fedpipe clients have different ranks, so there is no common update to clip and noise"
    persistent = LoraStrategy.persistent + ("selected", "assignment")
    components = LoraStrategy.components + ("rule",)
    server_optimizer_refusal = ("fedpipe aggregates mixed ranks by stacking or zero-padding, as flora or hetlora, "
                                "whose aggregate is no average of what the clients started from")

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.mode = planning.aggregation(cfg)
        if self.mode == "stacking":  # FLoRA's rule: a versioned merge log, served adapter at B = 0
            self.rule = Stacking()
            self.state = Stacking.served(initial)
        else:  # HetLoRA's rule, with its nested start (``strategy.nested_init``)
            self.rule = ZeroPadding(self.cross_term, norm_weighted=bool(cfg.strategy.get("norm_weighted", False)))
        self.shares_fresh_A = self.mode != "stacking"
        self.reports_cross_term = self.mode != "stacking"  # (zero padding reports it; stacking is exact)
        self.selected: list[str] = sorted(shapes)
        self.assignment: dict[int, dict] = {}  # partition id -> {rank, batch, bits, steps, profile} of the plan
        self.plan: Plan | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.get("client_ranks") not in (None, "null", "profile"):
            raise ConfigError(f"fedpipe plans every client's rank from its hardware profile, so client_ranks="
                              f"{cfg.client_ranks} would be ignored: leave client_ranks=null (or profile) and give "
                              "the ranks it may choose in strategy.grids.ranks.")
        planning.aggregation(cfg), planning.memory_method(cfg), planning.grids(cfg)
        planning.examples_per_round(cfg), planning.steps_per_round(cfg)
        imp = planning.strategy_opt(cfg, "importance")
        b = imp.get("budget", 1.0) if imp else 1.0
        if not ((isinstance(b, float) and 0 < b <= 1) or (isinstance(b, int) and b >= 1)):
            raise ConfigError(f"strategy.importance.budget={b} must be a fraction in (0, 1] or a module count >= 1.")
        if mode_of(cfg) == "dp_sgd" and not (isinstance(b, float) and b == 1.0):  # a warm-up on private data
            raise ConfigError(
                "fedpipe with dp_sgd is refused while its importance scores come from gradients on private client "
                "data, which would leave the client outside DP-SGD's accounting; set strategy.importance.budget=1.0 "
                "(LoRA on every target, no warm-up) to train it under DP-SGD.")
        planning.check_feasible(cfg)

    # ------------------------------------------------------------------ before training
    def node_profiles(self) -> list[dict]:
        """One profile per node (partition order): the node's own if it reported one (a ``conf/client`` name or
        a JSON profile, :func:`~fedlora.fedpipe.profiles.node_profile`), else the config's. A node whose profile
        is unusable is dropped from the run, its reason logged; fewer than ``min_train_nodes`` left: an error."""
        conf = planning.config_profiles(self.cfg)
        out = []
        for node in sorted(self.nodes.values(), key=lambda n: n.partition_id):
            rep = str(node.extra.get("profile") or "")
            try:
                prof = node_profile(rep) if rep else dict(conf[node.partition_id % len(conf)])
            except ValueError as e:
                log(WARNING, "node %s (partition %d) is left out of the run: %s.", node.node_id,
                    node.partition_id, e)
                del self.nodes[node.node_id]
                continue
            out.append(dict(prof, client_id=node.partition_id))
        if len(self.nodes) < self.min_train_nodes:
            raise RuntimeError(f"only {len(self.nodes)} clients reported a usable hardware profile "
                               f"(< min_train_nodes={self.min_train_nodes}).")
        return out

    def prepare_run(self, grid, run_dir: Path, echo=print, resume: bool = False) -> None:
        """The plan (:meth:`plan_run`); then, zero-padding with a nested start, the initial global adapter is the
        shared seeded A at the largest planned rank, B = 0 (as HetLoRA's)."""
        self.plan_run(grid, run_dir, echo, resume)
        if self.nested_init:
            self.state = self.fresh_state(1)

    def plan_run(self, grid, run_dir: Path, echo=print, resume: bool = False) -> None:
        """Profiles, feasibility, warm-up, module selection, plan, plan.json (see the module docstring)."""
        path = Path(run_dir) / "plan.json"
        if resume and path.exists():
            saved = json.loads(path.read_text())
            self.selected = list(saved["selected_modules"])
            self._assign(saved["plan"]["clients"])
            return
        profiles = self.node_profiles()
        spec, what = planning.plan_spec(self.cfg)
        planning.check_feasible(self.cfg, profiles, spec)
        method = planning.memory_method(self.cfg)
        calib = planning.calibration(self.cfg, spec)
        try:
            first = planning.make_plan(self.cfg, profiles, spec, calib)
        except InfeasibleBudgetError as e:
            raise ConfigError(planning.infeasible_sentence(e)) from None
        self._assign([c.to_dict() for c in first.clients])
        imp = planning.strategy_opt(self.cfg, "importance", {}) or {}
        budget = imp.get("budget", 1.0)
        scores = {}
        if budget not in (None, 1.0) and not (isinstance(budget, int) and budget >= len(self.shapes)):
            scores = self.warmup(grid, int(imp.get("warmup_steps", 2)), float(imp.get("beta", 0.85)))
            self.selected = sorted(select_modules(scores, budget))
            if spec.name == str(self.cfg.model.name):
                spec = spec.with_adapted(self.selected)
            else:
                spec = spec.with_adapted(planning.modelled_selection(spec, len(self.selected) / len(self.shapes)))
            if method == "analytic":
                calib = analytic_activations(spec, planning.seq_len(self.cfg))
            else:
                calib = ActivationCalibration(calib.a, calib.b, calib.rank_ref,
                                                        rank_activation_coef(spec), calib.seq_len,
                                                        calib.method, calib.points)
        try:
            self.plan = planning.make_plan(self.cfg, profiles, spec, calib)
        except InfeasibleBudgetError as e:
            raise ConfigError(planning.infeasible_sentence(e)) from None
        self._assign([c.to_dict() for c in self.plan.clients])
        from fedlora.report import atomic_write

        doc = {"planned_for": what, "trained_model": str(self.cfg.model.name), "memory_model": method,
               "calibration": calib.to_dict(), "aggregation": self.mode, "profiles": profiles,
               "grids": vars(planning.grids(self.cfg)), "importance": scores, "selected_modules": self.selected,
               "candidate_modules": sorted(self.shapes), "plan_adapted_modules": list(spec.adapted),
               "plan": self.plan.to_dict(), "table": self.plan.table()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(doc, indent=2, default=list))
        echo(f"{self.plan.table()}\nplanned for {what} ({method} memory model); trains {self.cfg.model.name}; "
             f"LoRA on {len(self.selected)}/{len(self.shapes)} modules; plan in {path}")

    def _assign(self, clients: list[dict]) -> None:
        by_pid = {int(c["client_id"]): c for c in clients}
        for node in self.nodes.values():
            c = by_pid[node.partition_id]
            node.rank, node.alpha = int(c["rank"]), config.rank_alpha(self.cfg, int(c["rank"]))
            self.assignment[node.partition_id] = {"rank": int(c["rank"]), "batch": int(c["batch"]),
                                                  "bits": int(c["bits"]), "profile": str(c["profile"]),
                                                  "steps": int(c["steps"])}  # the plan's (equal by default)
            node.extra.update({"fedpipe-" + k: v for k, v in self.assignment[node.partition_id].items()})

    def warmup(self, grid, steps: int, beta: float) -> dict[str, float]:
        """QUERY every node for importance scores on its planned base; aggregate weighted by examples."""
        msgs = []
        for node in sorted(self.nodes.values(), key=lambda n: n.partition_id):
            a = self.assignment[node.partition_id]
            conf = ConfigRecord({CONFIG_KEY: self.cfg_yaml, "fl.importance-steps": steps,
                                 "fl.importance-beta": beta, "fl.bits": a["bits"], "fl.batch_size": a["batch"]})
            msgs.append(Message(RecordDict({"config": conf}), message_type=MessageType.QUERY, dst_node_id=node.node_id))
        scores, weights = [], []
        for rep in grid.send_and_receive(msgs, timeout=float(self.cfg.round_timeout)):
            if rep.has_error() or "metrics" not in rep.content:
                continue
            m = dict(rep.content["metrics"])
            sc = {k[len(IMPORTANCE_PREFIX):]: v for k, v in m.items() if k.startswith(IMPORTANCE_PREFIX)}
            if (sc and all(is_number(v) and v >= 0 for v in sc.values()) and set(sc) == set(self.shapes)
                    and check_count("num-examples", m.get("num-examples", 1), 1) is None):
                scores.append({k: float(v) for k, v in sc.items()})
                weights.append(float(m.get("num-examples", 1)))
        if not scores:
            raise RuntimeError("FedPipe warm-up: no client returned importance scores.")
        return aggregate_importance(scores, weights)

    # ------------------------------------------------------------------ rounds
    def node_config(self, node, server_round, extra):
        a = self.assignment[node.partition_id]
        extra = {**extra, "fl.batch_size": a["batch"], "fl.bits": a["bits"], "fl.local_steps": a["steps"],
                 "fl.modules": ",".join(self.selected)}
        return super().node_config(node, server_round, extra)

    def payload(self, node, server_round):
        return self.rule.payload(self.state, node), {}

    def on_status(self, node, status, metrics):
        if self.mode == "stacking":
            self.rule.on_status(node, status, metrics)

    def expected(self, node):
        sel = set(self.selected)
        return {k: v for k, v in super().expected(node).items() if k.startswith("extra.") or k.rsplit(".", 1)[0] in sel}

    def aggregate(self, server_round, states, weights, updates):
        if self.mode == "stacking":
            return self.rule.aggregate(self.state, states, weights, updates)
        return self.rule.aggregate(self.state, states, weights, r_max=max(n.rank for n in self.nodes.values()))

    def eval_adapter(self):
        if self.mode == "stacking":
            return self.state
        g = self.rule.current(self.state)
        R = max(f.rank for f in g.lora.values())
        lora = dict(g.lora)
        for name, (m, n) in self.shapes.items():  # non-selected modules: zero update at the global rank
            if name not in lora:
                lora[name] = LoraFactors(torch.zeros(R, n), torch.zeros(m, R), 1.0)
        return AdapterState(lora, g.extra)

    def export_adapter(self):
        return self.rule.export(self.state, self.shapes) if self.mode == "stacking" else self.eval_adapter()

    def base_delta(self):
        return self.rule.base_delta() if self.mode == "stacking" else {}

    def round_metrics(self, updates):
        out = self.rule.round_metrics(updates)
        if self.plan is not None:
            out["modelled_round_s"] = self.plan.round_time_s
        return out
