"""train.keep_optimizer_state: a node's AdamW continued from round to round (clients/local_optimizer.py)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, MessageType, RecordDict
from harness import InProcessGrid

from fedlora import config
from fedlora.clients import local_optimizer as lo


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _steps(opt, params, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def _params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def test_a_kept_adamw_continues_exactly_as_one_that_never_stopped():
    """Two steps, kept on the node, then two more from a new AdamW made from the node state: the parameters are those
    of one AdamW taking the four steps (same operations on the same values: equal, not close)."""
    kept, one = _params((3, 4), (4,)), _params((3, 4), (4,))
    ref = torch.optim.AdamW(one, lr=0.01, weight_decay=0.1)
    _steps(ref, one, 2, seed=1)
    _steps(ref, one, 2, seed=2)
    ctx = _context()
    first = lo.optimizer(kept, 0.01, 0.1, ctx, "run-a")
    assert not first.state  # nothing held yet: a fresh AdamW
    _steps(first, kept, 2, seed=1)
    lo.keep(first, ctx, "run-a")
    again = lo.optimizer(kept, 0.01, 0.1, ctx, "run-a")
    assert [float(again.state[p]["step"]) for p in kept] == [2.0, 2.0]
    _steps(again, kept, 2, seed=2)
    for p, q in zip(kept, one):
        assert torch.equal(p, q)


def test_moments_of_another_run_or_of_other_parameters_are_dropped():
    ctx = _context()
    ps = _params((3, 4))
    opt = lo.optimizer(ps, 0.01, 0.0, ctx, "run-a")
    _steps(opt, ps, 1, seed=0)
    lo.keep(opt, ctx, "run-a")
    assert not lo.optimizer(ps, 0.01, 0.0, ctx, "run-b").state  # another run
    assert not lo.optimizer(_params((3, 5)), 0.01, 0.0, ctx, "run-a").state  # another shape (a new rank)
    assert not lo.optimizer(ps + _params((2,)), 0.01, 0.0, ctx, "run-a").state  # another number of parameters
    assert lo.optimizer(ps, 0.01, 0.0, ctx, "run-a").state  # the same run and parameters: continued


def test_config_refuses_it_under_dp_sgd_and_a_non_boolean():
    with pytest.raises(config.ConfigError, match="not supported with privacy=dp_sgd"):
        config.load(["privacy=dp_sgd", "train.keep_optimizer_state=true"])
    with pytest.raises(config.ConfigError, match="must be true or false"):
        config.load(["train.keep_optimizer_state=3"])
    assert config.load([]).train.keep_optimizer_state is False  # off by default: a fresh AdamW every round


FAST = ["model=tiny_llama", "num_clients=3", "local_steps=2", "train.batch_size=4", "eval.max_examples=8",
        "train.max_length=32", "num_rounds=2"]


class Replies(InProcessGrid):
    def __init__(self, n):
        super().__init__(n)
        self.replies = []

    def send_and_receive(self, messages, timeout=None):
        out = super().send_and_receive(messages, timeout)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.replies.append(out)
        return out


def _run(tmp_path, name, extra=()):
    from fedlora.strategies.server_app import run_server

    grid = Replies(3)
    run_server(grid, config.load(FAST + list(extra)), tmp_path / name, echo=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return grid, rows


def test_a_run_keeps_each_nodes_adamw_on_the_node_and_sends_the_same_messages(tmp_path):
    """2 rounds of 2 local steps: with the option each node ends holding AdamW at step 4 (its moments never in a
    reply: the replies carry the same records and keys as without it), and round 2 trains differently; without
    it no node holds any."""
    off, off_rows = _run(tmp_path, "off")
    on, on_rows = _run(tmp_path, "on", ["train.keep_optimizer_state=true"])
    for ctx in off.contexts.values():
        assert lo.NODE_STATE not in ctx.state
    for ctx in on.contexts.values():
        held = {k: a.numpy() for k, a in ctx.state[lo.NODE_STATE].items()}
        assert {float(v[0]) for k, v in held.items() if k.endswith(".step")} == {4.0}
    for a, b in zip(off.replies, on.replies):
        assert [sorted(r.content.keys()) for r in a] == [sorted(r.content.keys()) for r in b]
        assert [sorted(r.content["arrays"].keys()) for r in a] == [sorted(r.content["arrays"].keys()) for r in b]
    off_loss, on_loss = ({r["round"]: r.get("train_loss") for r in rows} for rows in (off_rows, on_rows))
    assert off_loss[1] == on_loss[1]  # round 1: a fresh AdamW either way
    assert off_loss[2] != on_loss[2]  # round 2: continued moments
