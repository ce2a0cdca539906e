"""The time model: seconds of local compute and of adapter transfer per round (docs/fedpipe.md, "Time model").

What a client does per round: by default every client takes the same number of optimizer steps
(``steps_per_round``), so a client of batch b processes steps x b examples and is charged steps x t_step(b);
with ``examples_per_round`` set (the plan before issue 21), every client processes the same E examples in
ceil(E / b) steps instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .memory import ModelSpec, linear_weight_bytes


@dataclass
class TimeModel:
    """Constants of the time model (docs/fedpipe.md). ``examples_per_round`` None (default): equal optimizer steps
    per round (``steps_per_round``); a number E: equal examples per round, ceil(E / b) steps."""

    steps_per_round: int = 16
    examples_per_round: int | None = None
    mfu: float = 0.4
    base_flops_coef: float = 4.0
    lora_flops_coef: float = 6.0
    attn_flops_coef: float = 12.0
    weight_passes: int = 2
    dequant_bytes_per_weight: float = 4.0
    adam_bytes_per_param: float = 28.0
    payload_bytes: int = 4
    download: str = "own"          # "own" | "stacked"

    @property
    def equal(self) -> str:
        """What every client does equally per round: ``"steps"`` or ``"examples"``."""
        return "steps" if self.examples_per_round is None else "examples"

    def steps(self, batch: int) -> int:
        """Optimizer steps per round of a client of batch ``batch``."""
        if self.examples_per_round is None:
            return int(self.steps_per_round)
        return math.ceil(self.examples_per_round / batch)

    def examples(self, batch: int) -> int:
        """Examples per round of a client of batch ``batch`` (steps x batch)."""
        return self.steps(batch) * int(batch)


def compute_time(spec: ModelSpec, rank: int, batch: int, bits: int, profile: Mapping, seq_len: int,
                 tm: TimeModel | None = None) -> float:
    """Seconds of local training per round: ``tm.steps(batch)`` steps of ``batch`` examples each, t_step as in
    docs/fedpipe.md ('Time model'), so at equal steps a larger batch is charged its larger compute."""
    tm = tm or TimeModel()
    lin = spec._by_name()  # noqa: SLF001
    tokens = batch * seq_len
    flops = tokens * (tm.base_flops_coef * spec.linear_numel + tm.lora_flops_coef * spec.lora_params(rank)
                      + tm.attn_flops_coef * spec.num_layers * seq_len * spec.hidden_size)
    wbytes = sum(linear_weight_bytes(li, bits if li.name in spec.quantizable else 16, spec.double_quant)
                 for li in lin.values())
    deq = tm.dequant_bytes_per_weight * spec.quantized_numel if bits < 16 else 0.0
    mem = tm.weight_passes * (wbytes + deq) + tm.adam_bytes_per_param * spec.trainable_params(rank)
    mfu = float(profile.get("mfu", tm.mfu))
    t_step = flops / (mfu * float(profile["bf16_tflops"]) * 1e12) + mem / (float(profile["mem_bandwidth_gbs"]) * 1e9)
    return tm.steps(batch) * t_step


def bytes_per_s(mbps: float) -> float:
    return float(mbps) * 1e6 / 8.0


def upload_bytes(spec: ModelSpec, rank: int, tm: TimeModel | None = None) -> float:
    tm = tm or TimeModel()
    return (spec.lora_params(rank) + spec.extra_trainable) * tm.payload_bytes


def transfer_time(spec: ModelSpec, rank: int, profile: Mapping, tm: TimeModel | None = None,
                  down_rank: int | None = None) -> float:
    """Upload of the client's adapter + download of the global one (at ``down_rank``, default own rank)."""
    tm = tm or TimeModel()
    up = upload_bytes(spec, rank, tm) / bytes_per_s(profile["uplink_mbps"])
    dr = rank if down_rank is None else down_rank
    down = (spec.lora_params(dr) + spec.extra_trainable) * tm.payload_bytes / bytes_per_s(profile["downlink_mbps"])
    return up + down
