"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024): stacking. Each round every client trains a fresh LoRA of its own rank on the
current base; the server stacks the factors (:func:`fedlora.algebra.flora_stack`, exact: B_s A_s = Σ p_k s_k B_k A_k)
and merges the result into the base. The merges form a versioned log (:class:`fedlora.merges.MergeLog`):
a client that missed rounds first receives exactly the merges it lacks, so with partial participation
every client still trains on the server's base."""

import numpy as np
import torch

from fedlora import algebra, merges
from fedlora.adapters import AdapterState, LoraFactors, to_arrays

from .base import LoraStrategy


class FLoRA(LoraStrategy):
    name = "flora"
    supports_mixed_ranks = True
    # node_version is not checkpointed: after a restart the handshake tells what each client holds
    persistent = LoraStrategy.persistent + ("log", "digests")

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.log = merges.MergeLog()
        self.digests = [0.0]  # base digest after each version
        self.node_version: dict[int, int] = {}  # partition id -> merges it holds (as last reported)
        # the served adapter is empty (B = 0): everything learnt lives in the merged base
        self.state = AdapterState({n: LoraFactors(f.A, torch.zeros_like(f.B), f.scale) for n, f in initial.lora.items()},
                                  initial.extra)

    def payload(self, node, server_round):
        arrays = self.log.payload(since=self.node_version.get(node.partition_id, node.base_version))
        arrays.update(to_arrays(self.state, parts=("extra",)))  # fresh A (seeded per client and round), B = 0
        return arrays, {}

    def on_status(self, node, status, metrics):
        """A client that lost its merged base (e.g. its node restarted) says so; it catches up next round."""
        if status == "out-of-sync":
            self.node_version[node.partition_id] = int(metrics.get("base-version", 0))

    def aggregate(self, server_round, states, weights, nodes):
        for node, (_, _, m) in zip(nodes, self.last["accepted"]):
            self.node_version[node.partition_id] = int(m.get("base-version", 0))
        stacked = algebra.flora_stack(states, weights)
        self.log.append(stacked.lora)
        self.digests.append(merges.base_digest(self.log.total))
        self.state.extra = stacked.extra
        self.last_delta = stacked.lora

    def round_metrics(self):
        """How far each client's merged base is from the server's at the version it trained on."""
        errs = []
        for cm in self.last.get("client_metrics", []):
            v = int(cm.get("base-version", 0))
            if "base-digest" in cm and v < len(self.digests):
                ref = self.digests[v]
                errs.append(abs(cm["base-digest"] - ref) / max(1.0, abs(ref)))
        return {"base_version": self.log.version, "base_sync_error": max(errs) if errs else 0.0}

    def base_delta(self):
        return self.log.total

    def export_adapter(self):
        """Σ of all merges as one exact adapter: per module the SVD of the merged total at its numerical rank."""
        lora = {}
        for name, (m, n) in self.shapes.items():
            total = self.log.total.get(name)
            if total is None:
                lora[name] = self.state.lora[name]
                continue
            U, S, Vh = torch.linalg.svd(total, full_matrices=False)
            r = max(1, int((S > S[0] * 1e-10).sum())) if S[0] > 0 else 1
            lora[name] = LoraFactors(Vh[:r].float().contiguous(), (U[:, :r] * S[:r]).float().contiguous(), 1.0)
        return AdapterState(lora, self.state.extra)
