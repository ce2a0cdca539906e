"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025; code
Pengxin-Guo/FedSA-LoRA on FederatedScope-LLM): both factors train on every client, but only A is uploaded and
averaged, Ā = Σ p_k A_k (:func:`fedlora.algebra.fedsa`); each client keeps its own B (A learns what is general, B
what is client-specific). As in the paper's code (``personalization.local_param: ['lora_B', 'classifier']``), a
classification head stays on the client too (``strategy.local_head``, default true; false: averaged as FedIT does).

Each train message carries Ā (and the server's head, which a client that holds its own ignores) and says what the
client keeps (``fl.personal``) and how much of its partition it holds out (``fl.holdout``). The client puts its own
B (and head) from ``context.state`` over the message (B = 0 in its first round, or after a restart: the run's
state dies with the node, and a resumed run is a new Flower run), trains A and B, keeps its new B and sends back
A only; a reply carrying B is rejected (unexpected key).

Personalised accuracy: after local training each client evaluates its own model (its trained A and B, its head) on
a seeded held-out slice of its partition that it never trains on (:func:`fedlora.data.holdout_indices`,
``strategy.holdout``, default 10%) and reports ``personal_accuracy``/``personal_loss``/``personal_examples``; the
round's metrics line has their example-weighted mean next to the global ``eval_accuracy``. The paper's code evaluates
Ā with the client's B after the server's aggregation (one evaluate message later); rounds here have no evaluate
message, so the figure is the client's model as it leaves local training.

The global model: the server never sees B during the run, so its adapter is (Ā, B = 0) and ``eval_accuracy`` is the
base model's until the last round (the paper's code never evaluates a global model either: its server model keeps
B at its initial zero). With ``strategy.final_b_upload`` (default true) the clients of the last round (round
``num_rounds``) also send B and the head, once: the global and exported adapter is then (Ā, B̄ = Σ p_k B_k, the
averaged head), whose update s·B̄·Ā = Σ p_k s·B_k·Ā is exactly the example-weighted mean of the personalised updates
on Ā. ``global_b`` in the metrics says which ("zero" or "mean"), and the exported adapter's metadata says the same.
"""

from __future__ import annotations

from fedlora import algebra
from fedlora.adapters import LORA_A, LORA_B, ExportedAdapter, from_arrays, to_arrays
from fedlora.config import ConfigError
from fedlora.privacy import mode_of
from fedlora.validate import check_count, is_number

from .base import LoraStrategy


def options(cfg) -> tuple[bool, bool, float]:
    """``(local_head, final_b_upload, holdout)`` of ``strategy``: defaults true, true, 0.1."""
    s = cfg.strategy
    return s.get("local_head", True), s.get("final_b_upload", True), s.get("holdout", 0.1)


def personal_reason(metrics: dict, max_examples: int) -> str | None:
    """Why a reply's personal metrics are malformed (None: absent or well-formed): ``personal_examples`` an integer
    in [0, partition size], ``personal_accuracy`` in [0, 1] and ``personal_loss`` >= 0, finite, only with examples."""
    n = metrics.get("personal_examples")
    if n is not None and (reason := check_count("personal_examples", n, 0)):
        return reason
    if n is not None and n > max_examples:
        return f"personal_examples {int(n)} exceeds the client's partition size {max_examples}"
    for key, top in (("personal_accuracy", 1.0), ("personal_loss", float("inf"))):
        if key in metrics:
            v = metrics[key]
            if not n:
                return f"{key} is reported without personal_examples"
            if not is_number(v) or not 0.0 <= v <= top:
                return f"{key} {v!r} is not a finite number in [0, {top:g}]"
    return None


class FedSALoRA(LoraStrategy):
    name = "fedsa_lora"
    reports_cross_term = False  # (B stays personal: no served product to compare with ΔW*)
    #: what clients send outside the final upload (``(LORA_A, "extra")`` when the head is shared)
    client_sends = (LORA_A,)
    # client-level DP clips and noises the mean of the uploaded A (B never leaves a client); the final B upload,
    # which would release B un-noised, is refused with it (check_config)
    privacy_modes = ("none", "dp_sgd", "client_dp")
    persistent = ("state", "rng", "global_b")

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        local_head, final_b, holdout = options(cfg)
        for key, v in (("local_head", local_head), ("final_b_upload", final_b)):
            if not isinstance(v, bool):
                raise ConfigError(f"strategy.{key}={v!r} must be true or false.")
        if not (is_number(holdout) and 0 <= holdout < 1):
            raise ConfigError(f"strategy.holdout={holdout!r} must be a fraction in [0, 1) of each client's partition "
                              "(0: no personalised evaluation).")
        if mode_of(cfg) == "client_dp" and final_b:
            raise ConfigError("strategy fedsa_lora's final B upload would release every client's B without "
                              "client-level noise: set strategy.final_b_upload=false with privacy=client_level.")
        if mode_of(cfg) == "client_dp" and not cfg.get("local_epochs") and int(cfg.local_steps) < 2:
            raise ConfigError("with local_steps=1 every client's first-round A update is exactly zero (B starts at "
                              "zero), which Flower's client-level clipping divides by: use local_steps >= 2 with "
                              "privacy=client_level.")
        if (mode_of(cfg) == "client_dp" and str(cfg.privacy.get("clipping", "server")) != "server" and local_head
                and list(cfg.model.lora.get("modules_to_save") or [])):
            raise ConfigError("strategy fedsa_lora sends clients the head but takes back only A when the head is "
                              "local, which client-side clipping cannot clip: use privacy.clipping=server or "
                              "strategy.local_head=false.")

    def __init__(self, cfg, initial, shapes):
        super().__init__(cfg, initial, shapes)
        self.local_head, self.final_b_upload, self.holdout = options(cfg)
        self.shared = (LORA_A,) if self.local_head else (LORA_A, "extra")
        self.personal = (LORA_B, "extra") if self.local_head else (LORA_B,)
        self.client_sends = self.shared
        self.final = False  # whether this round is the final upload (B and the head come back too)
        self.global_b = "zero"  # the global adapter's B: "zero" until a final upload, then "mean"

    def start_round(self, server_round: int) -> None:
        """Set what clients send back this round (before any message or privacy step): A (+ a shared head), and
        in round ``num_rounds`` with ``final_b_upload`` also B and the head."""
        self.final = bool(self.final_b_upload) and int(server_round) == int(self.cfg.num_rounds)
        self.client_sends = (LORA_A, LORA_B, "extra") if self.final else self.shared

    def payload(self, node, server_round):
        """Ā and the server's head (what a client starts a head it does not hold yet from), never B. Under
        client-side clipping this is exactly what comes back (check_config refuses a local head there)."""
        conf = {"fl.personal": ",".join(self.personal), "fl.holdout": float(self.holdout)}
        if self.cfg.eval.get("max_examples"):  # the server's evaluation cap also caps each personal evaluation
            conf["fl.eval_max_examples"] = int(self.cfg.eval.max_examples)
        return to_arrays(self.state, parts=(LORA_A, "extra")), conf

    def check_replies(self, replies):
        checked = super().check_replies(replies)
        checked.reject_where(lambda u: personal_reason(u.metrics, u.node.num_examples))
        return checked

    def to_state(self, node, arrays):
        """A reply completed with the server's B and head where it sent none (the server's, never the client's)."""
        full = dict(arrays)
        for n, f in self.state.lora.items():
            full.setdefault(f"{n}.{LORA_B}", f.B)
        for k, t in self.state.extra.items():
            full.setdefault(f"extra.{k}", t)
        return from_arrays(full, node.scale)

    def aggregate(self, server_round, states, weights, updates):
        personal = () if self.final else ("B", "extra") if self.local_head else ("B",)
        new = algebra.fedsa(states, weights, personal)
        delta = algebra.effective_update(new, self.state)
        self.state = new
        if self.final:
            self.global_b = "mean"
        return delta

    def round_metrics(self, updates):
        """The example-weighted means of the clients' personal metrics (over those that report them),
        ``personal_examples`` (their total) and ``global_b``."""
        out = {"global_b": self.global_b}
        for key in ("personal_accuracy", "personal_loss"):
            got = [(float(u.metrics[key]), int(u.metrics["personal_examples"])) for u in updates if key in u.metrics]
            if got and sum(n for _, n in got):
                out[key] = sum(v * n for v, n in got) / sum(n for _, n in got)
        if any("personal_examples" in u.metrics for u in updates):
            out["personal_examples"] = int(sum(int(u.metrics.get("personal_examples", 0)) for u in updates))
        return out

    def export_adapter(self):
        """The global adapter, its B documented in the metadata (``fedsa_lora.global_b``: zero or mean)."""
        note = ("mean of the final round's client B (example-weighted)" if self.global_b == "mean" else
                "zero (B never left the clients: this adapter is the base model)")
        return ExportedAdapter(self.state.lora, self.state.extra,
                               metadata={"fedsa_lora.global_b": self.global_b, "fedsa_lora.note": note})

    def export_summary(self):
        return {"global_b": self.global_b, "local_head": bool(self.local_head)}
