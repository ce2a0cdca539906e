"""The two ways to aggregate clients of different ranks, as objects a strategy holds (FLoRA and FedPipe hold
:class:`Stacking`, HetLoRA and FedPipe hold :class:`ZeroPadding`). Each owns its state between rounds
(``persistent``) and answers the strategy's hooks: what a node starts from, how replies are combined, what
the server evaluates and exports. The maths is in :mod:`fedlora.algebra` and :mod:`fedlora.merges`."""

from __future__ import annotations

import json

import torch

from fedlora import algebra, lowrank, merges
from fedlora.adapters import MERGED_WEIGHTS, AdapterState, ExportedAdapter, LoraFactors, to_arrays

#: default relative Frobenius tolerance of the exported merged total (``strategy.export_tolerance``)
EXPORT_TOLERANCE = 1e-6


class Stacking:
    """FLoRA (Wang et al., NeurIPS 2024): each round every client trains a fresh LoRA of its own rank on the
    current base; the server stacks the factors (:func:`fedlora.algebra.flora_stack`, exact:
    B_s A_s = Σ p_k s_k B_k A_k) and merges the result into the base. The merges form a versioned log
    (:class:`fedlora.merges.MergeLog`): a client that missed rounds first receives what it lacks (the missed merges,
    or per module one combined catch-up when that is smaller), so with partial participation every client still
    trains on the server's base.

    ``downlink_tolerance`` (FLoRA's ``strategy.downlink_tolerance``; None: log the stacked factors as they are, as
    FedPipe and FedEx-LoRA do): each round's stacked update is re-factorised once before it is logged
    (:func:`fedlora.merges.compact`: its numerical rank at 0, else the smallest rank within that relative Frobenius
    error), and the log holds exactly that, so the server's base, export and digest are what clients merge.
    ``codec``: a lossy ``comm.down`` the merges also go through (the log adds decode(encode(x)) of what it sends).

    ``catch_up`` (default :attr:`CATCH_UP`): a node that missed merges gets, per module, the cheapest of the merges one
    by one, the module's merged base and the factored sum of the missed merges (:meth:`fedlora.merges.MergeLog.
    payload`: issue 18's cap, at most one float64 m×n per module however many rounds it sat out); False: one by one."""

    # node_version is not checkpointed: after a restart the handshake tells what each client holds
    persistent = ("log", "digests")
    #: default of ``catch_up`` (a switch for comparisons: False sends the catch-up one merge at a time)
    CATCH_UP = True

    def __init__(self, export_tolerance: float = EXPORT_TOLERANCE, downlink_tolerance: float | None = None,
                 codec=None, catch_up: bool | None = None):
        self.log = merges.MergeLog()
        self.digests = [0.0]  # base digest after each version
        self.node_version: dict[int, int] = {}  # partition id -> merges it holds (as last reported)
        self.export_tolerance = float(export_tolerance)
        self.downlink_tolerance = None if downlink_tolerance is None else float(downlink_tolerance)
        self.codec = codec if codec is not None and codec.lossy else None
        self.export_info: dict = {}  # what the last export kept (export_summary)
        self.round_info: dict = {}  # downlink_rank / downlink_error of the merge just logged
        self.catch_up = self.CATCH_UP if catch_up is None else bool(catch_up)

    @staticmethod
    def served(initial: AdapterState) -> AdapterState:
        """The adapter clients are served: B = 0 (everything learnt lives in the merged base)."""
        return AdapterState({n: LoraFactors(f.A, torch.zeros_like(f.B), f.scale) for n, f in initial.lora.items()},
                            initial.extra)

    def payload(self, state: AdapterState, node, parts: tuple[str, ...] = ("extra",)) -> dict:
        """The merges ``node`` lacks (per module one combined catch-up when that is smaller, see ``catch_up``), plus
        ``parts`` of ``state`` (FLoRA: the head only; its clients draw a fresh A, seeded per client and round, with
        B = 0; FedEx-LoRA: the whole global adapter). The log caches the merge arrays per version held until the next
        merge, so the nodes of a round at the same version share them."""
        arrays = self.log.payload(since=self.node_version.get(node.partition_id, node.base_version),
                                  coded=self.codec is not None, codec=self.codec, combine=self.catch_up)
        arrays.update(to_arrays(state, parts=parts))
        return arrays

    def on_status(self, node, status: str, metrics: dict) -> None:
        """A client that lost its merged base (e.g. its node restarted) says so; it catches up next round."""
        if status == "out-of-sync":
            self.node_version[node.partition_id] = int(metrics.get("base-version", 0))

    def aggregate(self, state: AdapterState, states, weights, updates) -> dict:
        """Merge the stacked update into the log; ``state``'s head becomes the round's; returns the merged update
        (the logged entry: the stacked factors, or their re-factorisation with a ``downlink_tolerance``)."""
        stacked = algebra.flora_stack(states, weights)
        merged = self.merge(stacked.lora, updates)
        state.extra = stacked.extra
        return merged

    def merge(self, update: dict[str, LoraFactors], updates) -> dict[str, LoraFactors]:
        """Append ``update`` to the log as the next version (what the replying clients held is noted first); with a
        ``downlink_tolerance`` it is re-factorised first (:func:`fedlora.merges.compact`). Returns what was logged."""
        for u in updates:
            self.node_version[u.node.partition_id] = int(u.metrics.get("base-version", 0))
        if self.downlink_tolerance is not None:
            update, info = merges.compact(update, self.downlink_tolerance)
            norm = sum(x[2] ** 2 for x in info.values()) ** 0.5
            self.round_info = {"downlink_rank": sum(x[0] for x in info.values()) / max(1, len(info)),
                               "downlink_error": sum(x[1] ** 2 for x in info.values()) ** 0.5 / norm if norm else 0.0}
        self.log.append(update, self.codec)
        self.digests.append(merges.base_digest(self.log.total))
        return self.log.entries[-1]

    def round_metrics(self, updates) -> dict:
        """How far each client's merged base is from the server's at the version it trained on, the rank
        :meth:`export` would give the merged total (:meth:`export_rank`) and, with a ``downlink_tolerance``, the
        round's merge as sent: ``downlink_rank`` (its rank, mean over modules) and ``downlink_error``
        (||B'A' − B_s A_s|| / ||B_s A_s|| over all modules, float32 factors before any codec: the codec's own is
        ``codec_down_error``)."""
        info, self.round_info = self.round_info, {}
        return {**self.sync_metrics(updates), "export_rank": self.export_rank(), **info}

    def sync_metrics(self, updates) -> dict:
        """``base_version`` and ``base_sync_error``: the largest relative gap between a client's base digest and
        the server's at the version it trained on."""
        errs = []
        for u in updates:
            v = int(u.metrics.get("base-version", 0))
            if "base-digest" in u.metrics and v < len(self.digests):
                ref = self.digests[v]
                errs.append(abs(u.metrics["base-digest"] - ref) / max(1.0, abs(ref)))
        return {"base_version": self.log.version, "base_sync_error": max(errs) if errs else 0.0}

    #: modules with more elements than this report the rank bound instead of an SVD of the merged total
    SVD_LIMIT = 4_194_304

    def export_rank(self) -> int:
        """The largest rank over modules of the exported adapter (:meth:`export`: the rank each module's merged total
        keeps at :attr:`export_tolerance`). A module over :attr:`SVD_LIMIT` elements counts its bound
        min(sum of merged ranks, m, n)."""
        best = 0
        for name, total in self.log.total.items():
            m, n = total.shape
            if m * n <= self.SVD_LIMIT:
                best = max(best, lowrank.tolerance_rank(torch.linalg.svdvals(total), self.export_tolerance))
            else:
                best = max(best, min(m, n, sum(e[name].rank for e in self.log.entries if name in e)))
        return best

    def base_delta(self) -> dict[str, torch.Tensor]:
        return self.log.total

    def export(self, state: AdapterState, shapes: dict, totals: dict[str, torch.Tensor] | None = None
               ) -> ExportedAdapter:
        """Σ of all merges as one adapter: per module the merged total dW's SVD cut at the smallest rank k whose
        discarded tail has ||tail||_F <= tol ||dW||_F (tol = :attr:`export_tolerance`;
        :func:`fedlora.lowrank.tolerance_factors`), not every singular value a float64 SVD resolves (which grows
        to min(m, n) as rounds add up). A module whose factors are no smaller than dW (k(m+n) >= m n) also goes
        into ``merged``: the saved adapter folder then holds W + dW for it (``merged_weights.safetensors``).
        tol, the ranks and the merged modules are in the adapter's metadata and :attr:`export_info`. ``totals``
        (default: the log's merged total) replaces dW per module (FedEx-LoRA: merged residuals + the served product)."""
        totals = self.log.total if totals is None else totals
        lora, merged, ranks = {}, {}, {}
        for name in shapes:
            total = totals.get(name)
            if total is None:
                lora[name] = state.lora[name]
                continue
            lora[name], ranks[name] = lowrank.tolerance_factors(total, self.export_tolerance)
            if lowrank.dense_is_smaller(ranks[name], *total.shape):
                merged[name] = total
        self.export_info = {"export_tolerance": self.export_tolerance,
                            "export_rank_max": max(ranks.values(), default=0),
                            "export_rank_total": sum(ranks.values()),
                            "export_merged_modules": sorted(merged),
                            "export_merged_weights": MERGED_WEIGHTS if merged else None}
        meta = {"fedlora.export_tolerance": repr(self.export_tolerance), "fedlora.export_ranks": json.dumps(ranks),
                "fedlora.export_merged_modules": json.dumps(sorted(merged))}
        return ExportedAdapter(lora, state.extra, metadata=meta, merged=merged)

    def export_summary(self) -> dict:
        """For ``summary.json``: the tolerance, the largest and summed ranks the last :meth:`export` kept, and the
        modules written as merged weights (with the file's name in the adapter folder); {} before any export."""
        return dict(self.export_info)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.persistent}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)


class ZeroPadding:
    """HetLoRA (Cho et al., EMNLP 2024): clients' factors zero-padded to the largest rank and averaged (optionally
    weighted by ‖B_k A_k‖), truncated to each client's rank on the way back (:func:`fedlora.lowrank.hetlora` /
    :func:`fedlora.lowrank.truncate`)."""

    persistent = ("global_state",)

    def __init__(self, cross_term, norm_weighted: bool = False):
        self.cross_term = cross_term  # the strategy's :meth:`~LoraStrategy.cross_term` (its ``diagnostics`` setting)
        self.norm_weighted = norm_weighted
        self.global_state: AdapterState | None = None

    def payload(self, state: AdapterState, node) -> dict:
        if self.global_state is None:  # first round: fresh LoRA of the client's rank
            return to_arrays(state, parts=("extra",))
        return to_arrays(lowrank.truncate(self.global_state, node.rank, node.scale))

    def aggregate(self, state: AdapterState, states, weights, r_max: int) -> dict:
        new = lowrank.hetlora(states, weights, r_max=r_max, norm_weighted=self.norm_weighted)
        delta = algebra.effective_update(new, self.global_state)
        self.global_state = new
        state.extra = new.extra
        self.round_diag = self.cross_term(new, states, weights)
        return delta

    def round_metrics(self, updates) -> dict:
        """``cross_term_error`` of the padded average just aggregated (:func:`fedlora.diagnostics.cross_term_error`:
        ‖B_g A_g − ΔW*‖ / ‖ΔW*‖ over modules), empty when the round was not aggregated or with
        ``diagnostics=false``."""
        return self.__dict__.pop("round_diag", {})

    def current(self, state: AdapterState) -> AdapterState:
        """The global adapter (before the first round: the initial one)."""
        return self.global_state if self.global_state is not None else state

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.persistent}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)
