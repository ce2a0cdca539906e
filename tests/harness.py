"""An in-process Grid: the real ServerApp loop and the real ClientApp functions, without Ray or SuperLink.
Fast integration tests of strategies (no 10-17 s Ray start-up) with the exact messages Flower would carry."""

from __future__ import annotations

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedlora.clients.client_app as ca
from fedlora.clients.node import SIMULATION

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class InProcessGrid:
    """``node_config``: what every node's node config holds besides its partition (default: a simulation's,
    :data:`fedlora.clients.node.SIMULATION`); ``node_configs``: per partition id, added to it."""

    def __init__(self, num_nodes: int, faults: dict | None = None, node_config: dict | None = None,
                 node_configs: dict | None = None):
        base = dict(SIMULATION if node_config is None else node_config)
        # node ids deliberately not in partition order, as in Flower
        self.contexts = {
            1000 + 7 * (num_nodes - i): Context(run_id=1, node_id=1000 + 7 * (num_nodes - i),
                                               node_config={**base, **(node_configs or {}).get(i, {}),
                                                            "partition-id": i, "num-partitions": num_nodes},
                                               state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.faults = faults or {}  # partition id -> callable(msg) -> Message | None (None: no reply)
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def partition_of(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config["partition-id"])

    def send_and_receive(self, messages, timeout=None):
        out = []
        for msg in messages:
            self.sent.append(msg)
            ctx = self.contexts[msg.metadata.dst_node_id]
            fn = {MessageType.QUERY: ca.query, MessageType.TRAIN: ca.train_fn}[msg.metadata.message_type]
            fault = self.faults.get(self.partition_of(msg.metadata.dst_node_id))
            try:
                if fault is not None and msg.metadata.message_type == MessageType.TRAIN:
                    rep = fault(msg, ctx, fn)
                else:
                    rep = fn(msg, ctx)
            except Exception as e:  # as Flower does: the exception becomes an error reply
                rep = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            if rep is not None:
                rep.metadata.__dict__  # noqa: B018 (materialise)
                out.append(rep)
        return out


class Killed(Exception):
    """Raised by :class:`KillingGrid`: the server process "dies"."""


class KillingGrid(InProcessGrid):
    """Dies in the middle of train round ``kill_round`` (after sending, before any reply is used)."""

    def __init__(self, n, kill_round):
        super().__init__(n)
        self.kill_round, self.train_rounds = kill_round, 0

    def send_and_receive(self, messages, timeout=None):
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train_rounds += 1
            if self.train_rounds == self.kill_round:
                raise Killed()
        return super().send_and_receive(messages, timeout)


class FlowerGrid(InProcessGrid):
    """Message ids as Flower's grids set them (each pushed message gets an id; a reply's ``reply_to_message_id``
    names it), and lost nodes: from train round ``lost[partition]`` on, that partition's node is answered for by
    the SuperLink with Flower's own "Node Unavailable" error reply (sender: the SuperLink, node id 1), as a
    SuperNode that stopped sending heartbeats is."""

    def __init__(self, num_nodes: int, lost: dict | None = None, **kw):
        super().__init__(num_nodes, **kw)
        self.lost, self.train_rounds = dict(lost or {}), 0

    def send_and_receive(self, messages, timeout=None):
        import uuid

        from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train_rounds += 1
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        gone = {id(m) for m in messages if m.metadata.message_type == MessageType.TRAIN
                and self.train_rounds >= self.lost.get(self.partition_of(m.metadata.dst_node_id), float("inf"))}
        out = super().send_and_receive([m for m in messages if id(m) not in gone], timeout)
        return out + [create_message_error_unavailable_res_message(m.metadata, "node_unavail")
                      for m in messages if id(m) in gone]
