"""A node's local AdamW kept from round to round (``train.keep_optimizer_state``): Flower glue only.

By default a node starts every round with a fresh AdamW, as FedIT's and OpenFedLLM's clients do, so each round's
first steps are Adam's bias-corrected ones (about lr per coordinate, whatever the gradient's size). With the option
on, the node keeps AdamW's moments and step count in ``context.state`` and continues them next round, from the new
global parameters the server sent. What is kept never leaves the node. It is dropped (a fresh AdamW) when the node
holds none, when it belongs to another run (another config digest), or when the trainable parameters no longer match
it in number or shape (a strategy that changes ranks or factors between rounds); a restarted node starts afresh.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

NODE_STATE, NODE_STATE_OF = "local-optimizer", "local-optimizer-run"  # the moments, and the run they belong to
MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, context: Context,
              digest: str) -> torch.optim.AdamW:
    """An AdamW over ``params``, continuing the one this node kept for this run when it matches them."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    held = _held(context, digest)
    if held is not None and _matches(held, params):
        sd = opt.state_dict()
        sd["state"] = {i: {"step": torch.tensor(float(held[f"{i}.step"][0])),
                           **{m: torch.from_numpy(held[f"{i}.{m}"].copy()) for m in MOMENTS}}
                       for i in range(len(params))}
        opt.load_state_dict(sd)
    return opt


def keep(opt: torch.optim.AdamW, context: Context, digest: str) -> None:
    """Keep ``opt``'s moments and step count on this node for the next round of the run ``digest`` names."""
    arrays = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p)
        if not st:  # a parameter no step reached: nothing to continue
            context.state.pop(NODE_STATE, None)
            return
        arrays[f"{i}.step"] = np.asarray([float(st["step"])], dtype=np.float64)
        arrays.update({f"{i}.{m}": np.ascontiguousarray(st[m].detach().float().cpu().numpy()) for m in MOMENTS})
    context.state[NODE_STATE] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    context.state[NODE_STATE_OF] = ConfigRecord({"digest": digest})


def _held(context: Context, digest: str) -> dict[str, np.ndarray] | None:
    if NODE_STATE not in context.state or NODE_STATE_OF not in context.state:
        return None
    if str(context.state[NODE_STATE_OF].get("digest")) != digest:
        return None
    return {k: a.numpy() for k, a in context.state[NODE_STATE].items()}


def _matches(held: dict[str, np.ndarray], params: list[torch.nn.Parameter]) -> bool:
    if len(held) != len(params) * (1 + len(MOMENTS)):
        return False
    return all(f"{i}.step" in held and all(held.get(f"{i}.{m}", np.empty(0)).shape == tuple(p.shape)
                                           for m in MOMENTS) for i, p in enumerate(params))
