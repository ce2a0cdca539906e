"""The plan: a (rank, batch, bits) per client that fits its memory and minimises the round time, as a MILP
solved with scipy's HiGHS, plus a brute-force solver of the same problem for tests (docs/fedpipe.md, "Plan").

FedPipe (Fang et al., "Automated federated pipeline for parameter-efficient fine-tuning of large language
models", 2024) plans against round time; its exact objective is not published. The progress model here: every
client takes the same number of optimizer steps per round (:class:`~fedlora.fedpipe.timing.TimeModel`), so no
client falls behind in optimisation; among the plans of least round time, the tie-break spends each client's
slack on a larger batch first (more examples per step: less gradient noise at the same steps), then a
higher-precision base, then a larger rank, or with ``Grids.small_ranks_first`` (``strategy.rank_preference=smallest``,
the config's default) the smallest, so clients with slack keep the bottleneck's rank and zero-padding averages equal
ranks. With ``examples_per_round`` set (equal examples, the plan before
issue 21) the batch does not enter the tie-break and each client takes its fastest batch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .memory import ActivationCalibration, ModelSpec, predict_memory
from .profiles import GiB, load_profile
from .timing import TimeModel, bytes_per_s, compute_time, transfer_time, upload_bytes


class InfeasibleBudgetError(ValueError):
    """A client cannot train even the smallest configuration within its memory budget."""


@dataclass
class Grids:
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    bits: tuple[int, ...] = (16, 8, 4)
    small_ranks_first: bool = False  # the rank tie-break: the smallest rank (True) or the largest (False)

    def options(self) -> list[tuple[int, int, int]]:
        return [(r, b, q) for r in sorted(self.ranks) for b in sorted(self.batches) for q in sorted(self.bits)]

    def utility(self, rank: int, bits: int, batch: int | None = None) -> float:
        """Tie-break value in [0, 1), distinct for distinct options. Without ``batch`` (equal examples): rank
        first, then bits. With it (equal steps): batch first, then bits, then rank. Ranks count up, or down with
        ``small_ranks_first``."""
        rs, qs = sorted(set(self.ranks), reverse=self.small_ranks_first), sorted(set(self.bits))
        if batch is None:
            return (rs.index(rank) + qs.index(bits) / len(qs)) / len(rs)
        bs = sorted(set(self.batches))
        return (bs.index(batch) + (qs.index(bits) + rs.index(rank) / len(rs)) / len(qs)) / len(bs)


@dataclass
class ClientPlan:
    client_id: int | str
    profile: str
    rank: int
    batch: int
    bits: int
    memory_bytes: int
    budget_bytes: int
    compute_s: float
    transfer_s: float
    time_s: float
    steps: int     # optimizer steps per round
    examples: int  # examples per round (steps x batch)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    clients: list[ClientPlan]
    round_time_s: float
    objective: float
    solver: str
    model: str
    seq_len: int
    equal: str                       # what every client does equally per round: "steps" or "examples"
    steps_per_round: int | None      # equal steps: the steps (else None)
    examples_per_round: int | None   # equal examples: the examples (else None)
    download: str
    mem_fraction: float
    tie_break: float
    status: str = "optimal"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clients"] = [c.to_dict() for c in self.clients]
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    def table(self) -> str:
        return plan_to_table(self)

    def assignment(self) -> list[tuple[int, int, int]]:
        return [(c.rank, c.batch, c.bits) for c in self.clients]


def plan_to_table(p: Plan) -> str:
    """Plain-text table of a plan."""
    head = ("client", "profile", "rank", "batch", "bits", "steps", "examples", "memory GiB", "budget GiB",
            "compute s", "comm s", "time s")
    rows = [(str(c.client_id), c.profile, str(c.rank), str(c.batch), str(c.bits), str(c.steps), str(c.examples),
             f"{c.memory_bytes / GiB:.3f}", f"{c.budget_bytes / GiB:.3f}", f"{c.compute_s:.3f}",
             f"{c.transfer_s:.3f}", f"{c.time_s:.3f}") for c in p.clients]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w if i < 2 else "{:>%d}" % w for i, w in enumerate(widths))
    per = (f"{p.steps_per_round} optimizer steps per client per round (examples = steps x batch)"
           if p.equal == "steps" else f"{p.examples_per_round} examples per client per round (steps = ceil(E / batch))")
    lines = [f"FedPipe plan for {p.model}: round time {p.round_time_s:.3f} s ({p.solver}, {p.status}); "
             f"{per}, {p.seq_len} tokens per example, download={p.download}",
             fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


@dataclass
class _Problem:
    profiles: list[dict]
    options: list[tuple[int, int, int]]
    mem: np.ndarray          # K x O bytes
    budget: np.ndarray       # K bytes (already × mem_fraction)
    comp: np.ndarray         # K x O seconds
    comm: np.ndarray         # K x O seconds (upload + own download; download part 0 when stacked)
    down_per_rank: np.ndarray  # K seconds per unit of Σ rank (stacked only; else 0)
    up_bytes: np.ndarray     # O
    util: np.ndarray         # O
    server_Bps: float | None
    eps: float
    t_lb: float
    tm: TimeModel


def _client_label(p: Mapping, k: int):
    return p.get("client_id", k)


def _prepare(profiles, spec, grids, seq_len, calib, tm, mem_fraction, tie_break, server_mbps, memory_kw) -> _Problem:
    grids = grids or Grids()
    tm = tm or TimeModel()
    if tm.download not in ("own", "stacked"):
        raise ValueError(f"download must be 'own' or 'stacked', got {tm.download!r}")
    profiles = [load_profile(p) for p in profiles]
    if not profiles:
        raise ValueError("no clients")
    opts = grids.options()
    K, O = len(profiles), len(opts)
    budget = np.array([math.floor(mem_fraction * float(p["memory_gb"]) * GiB) for p in profiles], float)
    mem_o = np.array([predict_memory(spec, r, b, q, seq_len, calib, **memory_kw) for r, b, q in opts], float)
    mem = np.tile(mem_o, (K, 1))

    # Infeasible budgets: not even 4-bit, rank 1, batch 1 fits.
    floor = predict_memory(spec, 1, 1, 4, seq_len, calib, **memory_kw)
    short = [(k, p) for k, p in enumerate(profiles) if floor > budget[k]]
    if short:
        lines = [f"client {_client_label(p, k)} ({p['name']}): needs {floor:,} bytes ({floor / GiB:.2f} GiB) at "
                 f"4-bit, rank 1, batch 1 x {seq_len} tokens, but {mem_fraction:.0%} of its {p['memory_gb']} GiB "
                 f"is {int(budget[k]):,} bytes: short by {int(floor - budget[k]):,} bytes"
                 for k, p in short]
        raise InfeasibleBudgetError(f"{spec.name} cannot be trained on {len(short)} client(s):\n" + "\n".join(lines))
    no_opt = [(k, p) for k, p in enumerate(profiles) if not (mem[k] <= budget[k]).any()]
    if no_opt:
        smallest = int(mem_o.min())
        lines = [f"client {_client_label(p, k)} ({p['name']}): no (rank, batch, bits) of the grid fits "
                 f"{int(budget[k]):,} bytes; the smallest grid option needs {smallest:,} bytes (short by "
                 f"{int(smallest - budget[k]):,}); add smaller ranks / batches / 4-bit to the grid"
                 for k, p in no_opt]
        raise InfeasibleBudgetError("\n".join(lines))

    comp = np.array([[compute_time(spec, r, b, q, p, seq_len, tm) for r, b, q in opts] for p in profiles])
    stacked = tm.download == "stacked"
    comm = np.array([[transfer_time(spec, r, p, tm, down_rank=None) if not stacked else
                      upload_bytes(spec, r, tm) / bytes_per_s(p["uplink_mbps"])
                      + spec.extra_trainable * tm.payload_bytes / bytes_per_s(p["downlink_mbps"])
                      for r, b, q in opts] for p in profiles])
    down_per_rank = np.array([spec.adapted_width * tm.payload_bytes / bytes_per_s(p["downlink_mbps"]) if stacked
                              else 0.0 for p in profiles])
    up_b = np.array([upload_bytes(spec, r, tm) for r, b, q in opts])
    steps = tm.equal == "steps"  # the batch enters the tie-break only at equal steps
    util = np.array([grids.utility(r, q, b if steps else None) for r, b, q in opts])
    feas = mem <= budget[:, None]
    own = comp + comm
    t_lb = max(float(own[k][feas[k]].min()) for k in range(K))
    return _Problem(profiles, opts, mem, budget, comp, comm, down_per_rank, up_b, util,
                    bytes_per_s(server_mbps) if server_mbps else None, tie_break * t_lb / K, t_lb, tm)


def _round_time(pb: _Problem, choice: Sequence[int]) -> tuple[float, np.ndarray]:
    K = len(pb.profiles)
    sum_r = sum(pb.options[o][0] for o in choice)
    t = np.array([pb.comp[k, choice[k]] + pb.comm[k, choice[k]] + pb.down_per_rank[k] * sum_r for k in range(K)])
    T = float(t.max())
    if pb.server_Bps:
        T = max(T, float(sum(pb.up_bytes[o] for o in choice)) / pb.server_Bps)
    return T, t


def _objective(pb: _Problem, choice: Sequence[int]) -> float:
    T, _ = _round_time(pb, choice)
    return T - pb.eps * float(sum(pb.util[o] for o in choice))


def _polish(pb: _Problem, choice: list[int]) -> list[int]:
    """Equal examples: keep each client's (rank, bits); take its fastest batch size that fits (the batch is not in
    the tie-break there, so this never worsens the objective). Equal steps: the choice as it is."""
    if pb.tm.equal == "steps":
        return list(choice)
    out = []
    for k, o in enumerate(choice):
        r, _, q = pb.options[o]
        cands = [j for j, (r2, _b2, q2) in enumerate(pb.options)
                 if r2 == r and q2 == q and pb.mem[k, j] <= pb.budget[k]]
        out.append(min(cands, key=lambda j: (pb.comp[k, j] + pb.comm[k, j], -pb.options[j][1])))
    return out


def _finish(pb: _Problem, choice: list[int], solver: str, spec: ModelSpec, seq_len: int, mem_fraction: float,
            tie_break: float, status: str = "optimal", notes=()) -> Plan:
    choice = _polish(pb, choice)
    T, t = _round_time(pb, choice)
    sum_r = sum(pb.options[o][0] for o in choice)
    clients = []
    for k, o in enumerate(choice):
        r, b, q = pb.options[o]
        p = pb.profiles[k]
        clients.append(ClientPlan(
            client_id=_client_label(p, k), profile=str(p["name"]), rank=r, batch=b, bits=q,
            memory_bytes=int(pb.mem[k, o]), budget_bytes=int(pb.budget[k]), compute_s=float(pb.comp[k, o]),
            transfer_s=float(pb.comm[k, o] + pb.down_per_rank[k] * sum_r), time_s=float(t[k]),
            steps=pb.tm.steps(b), examples=pb.tm.examples(b)))
    tm = pb.tm
    return Plan(clients, T, _objective(pb, choice), solver, spec.name, seq_len, tm.equal,
                tm.steps_per_round if tm.equal == "steps" else None, tm.examples_per_round, tm.download,
                mem_fraction, tie_break, status, list(notes))


def plan(clients_profiles: Sequence[Mapping | str], model_spec: ModelSpec, grids: Grids | None = None, *,
         seq_len: int = 128, calib: ActivationCalibration | None = None, time_model: TimeModel | None = None,
         mem_fraction: float = 0.9, tie_break: float = 1e-3, server_mbps: float | None = None,
         time_limit: float = 60.0, memory_kw: Mapping | None = None) -> Plan:
    """Per-client (rank, batch, bits) minimising the round time under memory budgets, solved with
    ``scipy.optimize.milp`` (docs/fedpipe.md, "Plan"). Binary x[k, o] per client k and grid option o, continuous T:

        minimise   T - eps * sum_k sum_o u(o) x[k, o]
        s.t.       sum_o x[k, o] = 1,   sum_o M(o) x[k, o] <= budget_k,
                   sum_o (steps(b_o) t_step_k(o) + comm_k(o)) x[k, o] (+ stacked downloads) <= T   for every k,

    steps(b) = the time model's steps per round (equal for every client by default), u the tie-break of
    :meth:`Grids.utility` (at equal steps: batch, then bits, then rank), eps = tie_break * T_lb / K so that the
    tie-break never costs more than ``tie_break`` x a lower bound of T. Raises :class:`InfeasibleBudgetError` first
    if a client cannot hold the 4-bit base at rank 1, batch 1 (or no grid option fits)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    pb = _prepare(clients_profiles, model_spec, grids, seq_len, calib, time_model, mem_fraction, tie_break,
                  server_mbps, dict(memory_kw or {}))
    K, O = len(pb.profiles), len(pb.options)
    n = K * O + 1  # x[k, o] then T
    iT = K * O
    s = 1.0 / pb.t_lb  # times in units of the lower bound
    c = np.zeros(n)
    c[iT] = 1.0
    for k in range(K):
        c[k * O:(k + 1) * O] = -pb.eps * s * pb.util
    c *= 1e3 * K  # same optimum; keeps the tie-break differences (~tie_break/K) far above HiGHS' absolute gap
    rows = 3 * K + (1 if pb.server_Bps else 0)
    ri, ci, vals = [], [], []

    def put(row: int, cols, values) -> None:
        cols = np.asarray(cols)
        ri.extend([row] * len(cols))
        ci.extend(cols.tolist())
        vals.extend(np.broadcast_to(values, cols.shape).tolist())

    lo, hi = np.full(rows, -np.inf), np.zeros(rows)
    r_o = np.array([o[0] for o in pb.options], float)
    for k in range(K):
        cols = np.arange(k * O, (k + 1) * O)
        put(k, cols, 1.0)                                   # one option per client
        lo[k] = hi[k] = 1.0
        put(K + k, cols, pb.mem[k] / pb.budget[k])          # memory <= budget (scaled to 1)
        hi[K + k] = 1.0
        row = 2 * K + k                                     # own time (+ stacked download) <= T
        coef = np.zeros((K, O))
        coef[k] += (pb.comp[k] + pb.comm[k]) * s
        if pb.down_per_rank[k] > 0:
            coef += r_o[None, :] * pb.down_per_rank[k] * s
        nz = np.flatnonzero(coef.ravel())
        put(row, nz, coef.ravel()[nz])
        put(row, [iT], -1.0)
    if pb.server_Bps:                                       # shared server link: Σ uploads / rate <= T
        put(3 * K, np.arange(K * O), np.tile(pb.up_bytes / pb.server_Bps * s, K))
        put(3 * K, [iT], -1.0)
    A = coo_matrix((vals, (ri, ci)), shape=(rows, n)).tocsr()
    integrality = np.ones(n)
    integrality[iT] = 0
    ub = np.ones(n)
    ub[iT] = np.inf
    feas = pb.mem <= pb.budget[:, None]
    ub[:iT] = feas.ravel().astype(float)  # memory-infeasible options fixed at 0 (the rows say the same)
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(0, ub),
               options={"mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True})
    if res.x is None:
        raise RuntimeError(f"MILP failed: {res.message}")
    x = res.x[:iT].reshape(K, O)
    choice = [int(np.argmax(x[k])) for k in range(K)]
    status = "optimal" if res.status == 0 else f"status {res.status}: {res.message}"
    return _finish(pb, choice, "scipy.milp/HiGHS", model_spec, seq_len, mem_fraction, tie_break, status)


def brute_force_plan(clients_profiles: Sequence[Mapping | str], model_spec: ModelSpec, grids: Grids | None = None, *,
                     seq_len: int = 128, calib: ActivationCalibration | None = None,
                     time_model: TimeModel | None = None, mem_fraction: float = 0.9, tie_break: float = 1e-3,
                     server_mbps: float | None = None, memory_kw: Mapping | None = None,
                     max_combinations: int = 2_000_000) -> Plan:
    """Same problem as :func:`plan`, by enumerating every combination of memory-feasible options."""
    pb = _prepare(clients_profiles, model_spec, grids, seq_len, calib, time_model, mem_fraction, tie_break,
                  server_mbps, dict(memory_kw or {}))
    K = len(pb.profiles)
    feas = [[o for o in range(len(pb.options)) if pb.mem[k, o] <= pb.budget[k]] for k in range(K)]
    if math.prod(len(f) for f in feas) > max_combinations:
        raise ValueError("too many combinations for brute force")
    best, best_obj = None, math.inf
    for choice in itertools.product(*feas):
        obj = _objective(pb, choice)
        if obj < best_obj:
            best, best_obj = list(choice), obj
    return _finish(pb, best, "brute force", model_spec, seq_len, mem_fraction, tie_break)


def brute_force_optima(clients_profiles, model_spec, grids=None, *, rel_tol: float = 1e-9, **kw) -> tuple[float, int]:
    """(best objective, number of combinations within ``rel_tol`` of it) - lets tests know if the optimum is
    unique. Takes :func:`brute_force_plan`'s keywords."""
    pb = _prepare(clients_profiles, model_spec, grids, kw.get("seq_len", 128), kw.get("calib"), kw.get("time_model"),
                  kw.get("mem_fraction", 0.9), kw.get("tie_break", 1e-3), kw.get("server_mbps"),
                  dict(kw.get("memory_kw") or {}))
    K = len(pb.profiles)
    feas = [[o for o in range(len(pb.options)) if pb.mem[k, o] <= pb.budget[k]] for k in range(K)]
    # compare on the polished choices (equal examples: the batch is not in the tie-break; equal steps: as chosen)
    objs = [_objective(pb, _polish(pb, list(ch))) for ch in itertools.product(*feas)]
    best = min(objs)
    uniq = {tuple(_polish(pb, list(ch))) for ch, ob in zip(itertools.product(*feas), objs)
            if ob <= best + rel_tol * abs(best)}
    return best, len(uniq)
