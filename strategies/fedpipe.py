"""FedPipe (Fang et al., 2024), the general documented version (no public code; the paper's exact formulas are
not published): before training the server

1. gives every client a hardware profile: in simulation from ``strategy.profiles`` (a list of ``conf/client``
   names, cycled) or ``strategy.mix`` ({profile: fraction}, :func:`fedlora.resources.assign_profiles`, seeded);
   in deployment a node that reports a ``profile`` in its node config (``--node-config "profile=rtx3060_12gb"``,
   or ``profile=detect`` for :func:`fedlora.resources.detect_profile`) uses that one instead;
2. checks that every client can hold the model at all (4-bit, rank 1, batch 1, no adapter): if not, a
   :class:`~fedlora.config.ConfigError` in one sentence before anything trains (the CLI exits 2);
3. plans a first (rank, batch, bits) per client with all LoRA targets (the MILP of :mod:`fedlora.resources`);
4. warm-up: one QUERY per client with its planned bits and batch; each client computes
   :func:`~fedlora.resources.importance_scores` (|W·∂L/∂W| per matrix, EMA over ``importance.warmup_steps``
   batches) on its own base (quantised as planned) and replies them as a MetricRecord; the server averages
   them (:func:`~fedlora.resources.aggregate_importance`, weighted by examples) and keeps the top
   ``importance.budget`` modules (:func:`~fedlora.resources.select_modules`; a fraction in (0, 1] or a count).
   The candidates are the model's LoRA ``target_modules`` (widen them to give FedPipe more choice);
5. plans again with only the selected modules adapted, writes ``plan.json`` into the run directory and prints
   the plan table once.

Each round a client gets ``fl.rank``, ``fl.batch_size``, ``fl.bits``, ``fl.local_steps`` (= ceil(E / b): every
client processes the same E = ``examples_per_round`` examples, as the time model assumes) and ``fl.modules``.
The client quantises its base to ``fl.bits`` (bitsandbytes NF4 / int8, :func:`fedlora.quant.quantize_model`),
keeps LoRA on the non-selected modules at B = 0 and frozen, and sends back only the selected modules' factors.

Aggregation of the mixed ranks (``strategy.aggregation``): ``stacking`` is FLoRA (this class *is* a
:class:`~strategies.flora.FLoRA`: same stacking and versioned merge log); a quantised client merges the log
into its base through :func:`fedlora.quant.merge_update`, i.e. from the fp32 master ``w0 + Σ merges`` (one
rounding of the exact sum, never a chain of requantisations). ``zero_pad`` is HetLoRA's padded average
(HetLoRA's methods are called on this object, not copied). The server evaluates the 16-bit global model.

Memory model (``strategy.memory_model``): ``dry_run`` calibrates the activation line on the server with two
short dry runs per bit width of the trained model (:func:`fedlora.resources.calibrate_activations`);
``analytic`` uses :func:`fedlora.resources.analytic_activations`; ``auto`` = dry_run for the trained model,
analytic for a ``plan_model``. ``plan_model`` (e.g. ``llama-7b``) plans for a *modelled* model of that shape
(built on the meta device, never trained) while the configured model trains with the planned (rank, batch,
bits): the tiny models of the tests and benchmarks fit any profile, so their own plans sit at the grid limits.
plan.json says which model was planned and which trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedlora import resources
from fedlora.adapters import AdapterState, LoraFactors
from fedlora.config import ConfigError

from .flora import FLoRA
from .hetlora import HetLoRA

# Shapes of modelled plan models (transformers LlamaConfig keywords), for ``strategy.plan_model``.
PLAN_MODELS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      vocab_size=32000),
}
IMPORTANCE_PREFIX = "importance."


# ----------------------------------------------------------------------------------------------
# Planning inputs from the config
# ----------------------------------------------------------------------------------------------
def _opt(cfg, key, default=None):
    v = cfg.strategy.get(key, default)
    return default if v in (None, "null") else v


def grids(cfg) -> resources.Grids:
    g = _opt(cfg, "grids", {}) or {}
    d = resources.Grids()
    return resources.Grids(tuple(int(x) for x in g.get("ranks", d.ranks)), tuple(int(x) for x in g.get("batches", d.batches)),
                           tuple(int(x) for x in g.get("bits", d.bits)))


def examples_per_round(cfg) -> int:
    return int(_opt(cfg, "examples_per_round") or int(cfg.local_steps or 1) * int(cfg.train.batch_size))


def seq_len(cfg) -> int:
    return int(_opt(cfg, "seq_len") or cfg.train.max_length)


def time_model(cfg) -> resources.TimeModel:
    return resources.TimeModel(examples_per_round=examples_per_round(cfg), mfu=float(_opt(cfg, "mfu", 0.4)),
                               download="stacked" if aggregation(cfg) == "stacking" else "own")


def aggregation(cfg) -> str:
    a = str(_opt(cfg, "aggregation", "stacking"))
    if a not in ("stacking", "zero_pad"):
        raise ConfigError(f"strategy.aggregation={a} must be stacking or zero_pad.")
    return a


def lora_targets(cfg) -> list[str]:
    t = cfg.model.lora.target_modules
    return [t] if isinstance(t, str) else [str(x) for x in t]


def trained_spec(cfg, base=None) -> resources.ModelSpec:
    """Spec of the model that trains (the base as :func:`fedlora.models.build_base` makes it)."""
    from fedlora import models

    if base is None:
        base, _ = models.build_base(cfg.model, int(cfg.seed))
    return resources.ModelSpec.from_model(base, lora_targets(cfg), name=str(cfg.model.name),
                                          modules_to_save=list(cfg.model.lora.get("modules_to_save") or []))


def plan_spec(cfg) -> tuple[resources.ModelSpec, str]:
    """(spec the plan is made for, what it is)."""
    pm = _opt(cfg, "plan_model")
    if pm is None:
        return trained_spec(cfg), f"trained model {cfg.model.name}"
    from transformers import LlamaConfig

    kw = PLAN_MODELS.get(str(pm)) if isinstance(pm, str) else dict(pm)
    if kw is None:
        raise ConfigError(f"strategy.plan_model={pm} is unknown: use one of {', '.join(PLAN_MODELS)} or a dict of LlamaConfig sizes.")
    name = str(pm) if isinstance(pm, str) else "llama-custom"
    spec = resources.ModelSpec.from_config(LlamaConfig(**kw), ["q_proj", "v_proj"], name=name)
    return spec, f"modelled {name} (LlamaForCausalLM shape, q_proj/v_proj targets, meta device; not trained)"


def memory_method(cfg) -> str:
    m = str(_opt(cfg, "memory_model", "auto"))
    if m not in ("auto", "dry_run", "analytic"):
        raise ConfigError(f"strategy.memory_model={m} must be auto, dry_run or analytic.")
    if m == "auto":
        return "analytic" if _opt(cfg, "plan_model") is not None else "dry_run"
    if m == "dry_run" and _opt(cfg, "plan_model") is not None:
        raise ConfigError("strategy.memory_model=dry_run cannot calibrate a modelled plan_model: use analytic.")
    return m


def calibration(cfg, spec: resources.ModelSpec) -> resources.ActivationCalibration:
    if memory_method(cfg) == "analytic":
        return resources.analytic_activations(spec, seq_len(cfg))
    from fedlora import models

    g = grids(cfg)
    return resources.calibrate_activations(
        lambda: models.build_base(cfg.model, int(cfg.seed))[0], spec, seq_len(cfg), targets=lora_targets(cfg),
        bits=sorted(set(g.bits)), rank=min(g.ranks), batches=(1, 2),
        modules_to_save=list(cfg.model.lora.get("modules_to_save") or []) or None)


def config_profiles(cfg) -> list[dict]:
    """Simulation: one profile per partition id, from ``strategy.profiles`` or ``strategy.mix``."""
    spec = _opt(cfg, "profiles") or _opt(cfg, "mix") or "mixed"
    if not isinstance(spec, str):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(spec, resolve=True)
    try:
        return resources.assign_profiles(int(cfg.num_clients), spec, seed=int(cfg.seed))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"strategy.profiles / strategy.mix: {str(e).strip(chr(34))}.") from None


def _plan(cfg, profiles, spec, calib, grid: resources.Grids | None = None) -> resources.Plan:
    if bool(_opt(cfg, "uniform", False)) and grid is None:
        return uniform_plan(cfg, profiles, spec, calib)
    return resources.plan(profiles, spec, grid or grids(cfg), seq_len=seq_len(cfg), calib=calib,
                          time_model=time_model(cfg), mem_fraction=float(_opt(cfg, "mem_fraction", 0.9)),
                          server_mbps=_opt(cfg, "server_mbps"))


def uniform_plan(cfg, profiles, spec, calib) -> resources.Plan:
    """Baseline (``strategy.uniform=true``): one (rank, batch, bits) for every client, the one of the grid that
    fits every client (i.e. the smallest) with the lowest modelled round time (ties: larger rank, more bits)."""
    g = grids(cfg)
    best, first_err = None, None
    for r, b, q in g.options():
        try:
            p = _plan(cfg, profiles, spec, calib, resources.Grids((r,), (b,), (q,)))
        except resources.InfeasibleBudgetError as e:
            first_err = first_err or e
            continue
        key = (round(p.round_time_s, 9), -r, -q)
        if best is None or key < best[0]:
            best = (key, p)
    if best is None:
        raise first_err
    p = best[1]
    p.solver, p.notes = "uniform (grid search)", p.notes + ["uniform baseline: one (rank, batch, bits) for all clients"]
    return p


def infeasible_sentence(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    body = "; ".join(lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines)
    return (f"FedPipe cannot train on every client: {body}; give these clients more memory, a smaller model, "
            f"or drop them from strategy.profiles / strategy.mix.")


def check_feasible(cfg, profiles=None, spec=None) -> None:
    """Every client must at least hold the base at 4-bit with rank 1, batch 1 and no adapter (the plan's own
    floor check on a spec with nothing adapted: a lower bound for any module selection)."""
    spec = spec or plan_spec(cfg)[0]
    profiles = profiles or config_profiles(cfg)
    bare = spec.with_adapted([])
    calib = resources.analytic_activations(bare, seq_len(cfg))
    try:
        _plan(cfg, profiles, bare, calib)
    except resources.InfeasibleBudgetError as e:
        raise ConfigError(infeasible_sentence(e)) from None


def modelled_selection(spec: resources.ModelSpec, fraction: float) -> list[str]:
    """For a modelled plan_model: the same fraction of its targets, evenly spread over depth."""
    n = len(spec.adapted)
    k = max(1, math.ceil(fraction * n))
    idx = sorted({int(round(i * (n - 1) / max(1, k - 1))) for i in range(k)}) if k > 1 else [0]
    return [spec.adapted[i] for i in idx]


# ----------------------------------------------------------------------------------------------
# The strategy
# ----------------------------------------------------------------------------------------------
class FedPipe(FLoRA):
    name = "fedpipe"
    supports_mixed_ranks = True
    persistent = FLoRA.persistent + ("global_state", "selected", "assignment")

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.mode = aggregation(cfg)
        self.global_state = None  # zero_pad (HetLoRA) global adapter
        if self.mode == "zero_pad":
            self.state = initial
        self.selected: list[str] = sorted(shapes)
        self.assignment: dict[int, dict] = {}  # partition id -> {rank, batch, bits, steps, profile}
        self.plan: resources.Plan | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        aggregation(cfg), memory_method(cfg), grids(cfg)
        b = _opt(cfg, "importance", {}).get("budget", 1.0) if _opt(cfg, "importance") else 1.0
        if not ((isinstance(b, float) and 0 < b <= 1) or (isinstance(b, int) and b >= 1)):
            raise ConfigError(f"strategy.importance.budget={b} must be a fraction in (0, 1] or a module count >= 1.")
        check_feasible(cfg)

    # ------------------------------------------------------------------ before training
    def node_profiles(self) -> list[dict]:
        """One profile per node (partition order): the node's own if it reported one, else the config's."""
        conf = config_profiles(self.cfg)
        out = []
        for node in sorted(self.nodes.values(), key=lambda n: n.partition_id):
            rep = node.extra.get("profile") or ""
            if rep.startswith("{"):
                prof = dict(json.loads(rep))
            elif rep:
                prof = resources.load_profile(rep)
            else:
                prof = dict(conf[node.partition_id % len(conf)])
            out.append(dict(prof, client_id=node.partition_id))
        return out

    def prepare_run(self, grid, run_dir: Path, echo=print, resume: bool = False) -> None:
        """Profiles, feasibility, warm-up, module selection, plan, plan.json (see the module docstring)."""
        path = Path(run_dir) / "plan.json"
        if resume and path.exists():
            saved = json.loads(path.read_text())
            self.selected = list(saved["selected_modules"])
            self._assign(saved["plan"]["clients"])
            return
        profiles = self.node_profiles()
        spec, what = plan_spec(self.cfg)
        check_feasible(self.cfg, profiles, spec)
        method = memory_method(self.cfg)
        calib = calibration(self.cfg, spec)
        try:
            first = _plan(self.cfg, profiles, spec, calib)
        except resources.InfeasibleBudgetError as e:
            raise ConfigError(infeasible_sentence(e)) from None
        self._assign([c.to_dict() for c in first.clients])
        imp = _opt(self.cfg, "importance", {}) or {}
        budget = imp.get("budget", 1.0)
        scores = {}
        if budget not in (None, 1.0) and not (isinstance(budget, int) and budget >= len(self.shapes)):
            scores = self.warmup(grid, int(imp.get("warmup_steps", 2)), float(imp.get("beta", 0.85)))
            self.selected = sorted(resources.select_modules(scores, budget))
            if spec.name == str(self.cfg.model.name):
                spec = spec.with_adapted(self.selected)
            else:
                spec = spec.with_adapted(modelled_selection(spec, len(self.selected) / len(self.shapes)))
            if method == "analytic":
                calib = resources.analytic_activations(spec, seq_len(self.cfg))
            else:
                calib = resources.ActivationCalibration(calib.a, calib.b, calib.rank_ref,
                                                        resources.rank_activation_coef(spec), calib.seq_len,
                                                        calib.method, calib.points)
        try:
            self.plan = _plan(self.cfg, profiles, spec, calib)
        except resources.InfeasibleBudgetError as e:
            raise ConfigError(infeasible_sentence(e)) from None
        self._assign([c.to_dict() for c in self.plan.clients])
        from fedlora.report import atomic_write

        doc = {"planned_for": what, "trained_model": str(self.cfg.model.name), "memory_model": method,
               "calibration": calib.to_dict(), "aggregation": self.mode, "profiles": profiles,
               "grids": vars(grids(self.cfg)), "importance": scores, "selected_modules": self.selected,
               "candidate_modules": sorted(self.shapes), "plan_adapted_modules": list(spec.adapted),
               "plan": self.plan.to_dict(), "table": self.plan.table()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(doc, indent=2, default=list))
        echo(f"{self.plan.table()}\nplanned for {what} ({method} memory model); trains {self.cfg.model.name}; "
             f"LoRA on {len(self.selected)}/{len(self.shapes)} modules; plan in {path}")

    def _assign(self, clients: list[dict]) -> None:
        scale = float(self.cfg.model.lora.alpha) / float(self.cfg.model.lora.r)
        by_pid = {int(c["client_id"]): c for c in clients}
        for node in self.nodes.values():
            c = by_pid[node.partition_id]
            node.rank, node.alpha = int(c["rank"]), scale * int(c["rank"])
            self.assignment[node.partition_id] = {"rank": int(c["rank"]), "batch": int(c["batch"]),
                                                  "bits": int(c["bits"]), "profile": str(c["profile"]),
                                                  "steps": math.ceil(examples_per_round(self.cfg) / int(c["batch"]))}
            node.extra.update({"fedpipe-" + k: v for k, v in self.assignment[node.partition_id].items()})

    def warmup(self, grid, steps: int, beta: float) -> dict[str, float]:
        """QUERY every node for importance scores on its planned base; aggregate weighted by examples."""
        msgs = []
        for node in sorted(self.nodes.values(), key=lambda n: n.partition_id):
            a = self.assignment[node.partition_id]
            conf = ConfigRecord({"fedlora-config": self.cfg_yaml, "fl.importance-steps": steps,
                                 "fl.importance-beta": beta, "fl.bits": a["bits"], "fl.batch_size": a["batch"]})
            msgs.append(Message(RecordDict({"config": conf}), message_type=MessageType.QUERY, dst_node_id=node.node_id))
        scores, weights = [], []
        for rep in grid.send_and_receive(msgs, timeout=float(self.cfg.round_timeout)):
            if rep.has_error():
                continue
            m = dict(rep.content["metrics"])
            sc = {k[len(IMPORTANCE_PREFIX):]: float(v) for k, v in m.items() if k.startswith(IMPORTANCE_PREFIX)}
            if sc and all(np.isfinite(v) and v >= 0 for v in sc.values()) and set(sc) == set(self.shapes):
                scores.append(sc)
                weights.append(float(m.get("num-examples", 1)))
        if not scores:
            raise RuntimeError("FedPipe warm-up: no client returned importance scores.")
        return resources.aggregate_importance(scores, weights)

    # ------------------------------------------------------------------ rounds
    def node_config(self, node, server_round, extra):
        a = self.assignment[node.partition_id]
        extra = {**extra, "fl.batch_size": a["batch"], "fl.bits": a["bits"], "fl.local_steps": a["steps"],
                 "fl.modules": ",".join(self.selected)}
        return super().node_config(node, server_round, extra)

    def payload(self, node, server_round):
        if self.mode == "stacking":
            return FLoRA.payload(self, node, server_round)
        return HetLoRA.payload(self, node, server_round)

    def expected(self, node):
        sel = set(self.selected)
        return {k: v for k, v in super().expected(node).items() if k.startswith("extra.") or k.rsplit(".", 1)[0] in sel}

    def aggregate(self, server_round, states, weights, nodes):
        if self.mode == "stacking":
            FLoRA.aggregate(self, server_round, states, weights, nodes)
        else:
            HetLoRA.aggregate(self, server_round, states, weights, nodes)

    def eval_adapter(self):
        if self.mode == "stacking":
            return self.state
        g = HetLoRA.eval_adapter(self)
        R = max(f.rank for f in g.lora.values())
        lora = dict(g.lora)
        for name, (m, n) in self.shapes.items():  # non-selected modules: zero update at the global rank
            if name not in lora:
                lora[name] = LoraFactors(torch.zeros(R, n), torch.zeros(m, R), 1.0)
        return AdapterState(lora, g.extra)

    def export_adapter(self):
        return FLoRA.export_adapter(self) if self.mode == "stacking" else self.eval_adapter()

    def base_delta(self):
        return self.log.total if self.mode == "stacking" else {}

    def round_metrics(self):
        out = FLoRA.round_metrics(self) if self.mode == "stacking" else {}
        if self.plan is not None:
            out["modelled_round_s"] = self.plan.round_time_s
        return out
