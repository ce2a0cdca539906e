"""The two ways to aggregate clients of different ranks, as objects a strategy holds (FLoRA and FedPipe hold
:class:`Stacking`, HetLoRA and FedPipe hold :class:`ZeroPadding`). Each owns its state between rounds
(``persistent``) and answers the strategy's hooks: what a node starts from, how replies are combined, what
the server evaluates and exports. The maths is in :mod:`fedlora.algebra` and :mod:`fedlora.merges`."""

from __future__ import annotations

import torch

from fedlora import algebra, diagnostics, merges
from fedlora.adapters import AdapterState, LoraFactors, to_arrays


class Stacking:
    """FLoRA (Wang et al., NeurIPS 2024): each round every client trains a fresh LoRA of its own rank on the
    current base; the server stacks the factors (:func:`fedlora.algebra.flora_stack`, exact:
    B_s A_s = Σ p_k s_k B_k A_k) and merges the result into the base. The merges form a versioned log
    (:class:`fedlora.merges.MergeLog`): a client that missed rounds first receives exactly the merges it lacks,
    so with partial participation every client still trains on the server's base."""

    # node_version is not checkpointed: after a restart the handshake tells what each client holds
    persistent = ("log", "digests")

    def __init__(self):
        self.log = merges.MergeLog()
        self.digests = [0.0]  # base digest after each version
        self.node_version: dict[int, int] = {}  # partition id -> merges it holds (as last reported)

    @staticmethod
    def served(initial: AdapterState) -> AdapterState:
        """The adapter clients are served: B = 0 (everything learnt lives in the merged base)."""
        return AdapterState({n: LoraFactors(f.A, torch.zeros_like(f.B), f.scale) for n, f in initial.lora.items()},
                            initial.extra)

    def payload(self, state: AdapterState, node) -> dict:
        arrays = self.log.payload(since=self.node_version.get(node.partition_id, node.base_version))
        arrays.update(to_arrays(state, parts=("extra",)))  # fresh A (seeded per client and round), B = 0
        return arrays

    def on_status(self, node, status: str, metrics: dict) -> None:
        """A client that lost its merged base (e.g. its node restarted) says so; it catches up next round."""
        if status == "out-of-sync":
            self.node_version[node.partition_id] = int(metrics.get("base-version", 0))

    def aggregate(self, state: AdapterState, states, weights, updates) -> dict:
        """Merge the stacked update into the log; ``state``'s head becomes the round's; returns the delta."""
        for u in updates:
            self.node_version[u.node.partition_id] = int(u.metrics.get("base-version", 0))
        stacked = algebra.flora_stack(states, weights)
        self.log.append(stacked.lora)
        self.digests.append(merges.base_digest(self.log.total))
        state.extra = stacked.extra
        return stacked.lora

    def round_metrics(self, updates) -> dict:
        """How far each client's merged base is from the server's at the version it trained on, and the rank
        :meth:`export` would give the merged total (:meth:`export_rank`)."""
        errs = []
        for u in updates:
            v = int(u.metrics.get("base-version", 0))
            if "base-digest" in u.metrics and v < len(self.digests):
                ref = self.digests[v]
                errs.append(abs(u.metrics["base-digest"] - ref) / max(1.0, abs(ref)))
        return {"base_version": self.log.version, "base_sync_error": max(errs) if errs else 0.0,
                "export_rank": self.export_rank()}

    #: modules with more elements than this report the rank bound instead of an SVD of the merged total
    SVD_LIMIT = 4_194_304

    def export_rank(self) -> int:
        """The largest rank over modules of the exported adapter (:meth:`export`: numerical rank of each module's
        merged total). A module over :attr:`SVD_LIMIT` elements counts its bound min(sum of merged ranks, m, n)."""
        best = 0
        for name, total in self.log.total.items():
            m, n = total.shape
            if m * n <= self.SVD_LIMIT:
                best = max(best, algebra.numerical_rank(torch.linalg.svdvals(total)))
            else:
                best = max(best, min(m, n, sum(e[name].rank for e in self.log.entries if name in e)))
        return best

    def base_delta(self) -> dict[str, torch.Tensor]:
        return self.log.total

    def export(self, state: AdapterState, shapes: dict) -> AdapterState:
        """Σ of all merges as one exact adapter: per module the SVD of the merged total at its numerical rank."""
        lora = {}
        for name in shapes:
            total = self.log.total.get(name)
            if total is None:
                lora[name] = state.lora[name]
                continue
            U, S, Vh = torch.linalg.svd(total, full_matrices=False)
            r = max(1, algebra.numerical_rank(S))
            lora[name] = LoraFactors(Vh[:r].float().contiguous(), (U[:, :r] * S[:r]).float().contiguous(), 1.0)
        return AdapterState(lora, state.extra)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.persistent}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)


class ZeroPadding:
    """HetLoRA (Cho et al., EMNLP 2024): clients' factors zero-padded to the largest rank and averaged (optionally
    weighted by ‖B_k A_k‖), truncated to each client's rank on the way back (:func:`fedlora.algebra.hetlora` /
    :func:`fedlora.algebra.truncate`)."""

    persistent = ("global_state",)

    def __init__(self, norm_weighted: bool = False):
        self.norm_weighted = norm_weighted
        self.global_state: AdapterState | None = None

    def payload(self, state: AdapterState, node) -> dict:
        if self.global_state is None:  # first round: fresh LoRA of the client's rank
            return to_arrays(state, parts=("extra",))
        return to_arrays(algebra.truncate(self.global_state, node.rank, node.scale))

    def aggregate(self, state: AdapterState, states, weights, r_max: int) -> dict:
        new = algebra.hetlora(states, weights, r_max=r_max, norm_weighted=self.norm_weighted)
        delta = algebra.effective_update(new, self.global_state)
        self.global_state = new
        state.extra = new.extra
        self.round_diag = {"cross_term_error": diagnostics.cross_term_error(new, states, weights)}
        return delta

    def round_metrics(self, updates) -> dict:
        """``cross_term_error`` of the padded average just aggregated (:func:`fedlora.diagnostics.cross_term_error`:
        ‖B_g A_g − ΔW*‖ / ‖ΔW*‖ over modules), empty when the round was not aggregated."""
        return self.__dict__.pop("round_diag", {})

    def current(self, state: AdapterState) -> AdapterState:
        """The global adapter (before the first round: the initial one)."""
        return self.global_state if self.global_state is not None else state

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.persistent}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)
