"""A round's replies on the server: matched to the messages they answer (:func:`attribute`), refused with one
reason each (:func:`rejection`), and the accepted ones as :class:`Update` s in a :class:`Checked`. The checks
themselves are :meth:`fedlora.strategies.base.LoraStrategy.check_replies` and :mod:`fedlora.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import Message

    from .base import NodeInfo


@dataclass
class Update:
    """One accepted reply: the node, its arrays and its metrics (``num-examples`` is its weight)."""

    node: NodeInfo
    arrays: dict[str, np.ndarray]
    metrics: dict

    @property
    def weight(self) -> float:
        return float(self.metrics["num-examples"])


@dataclass
class Checked:
    """The replies of a round after validation."""

    accepted: list[Update]
    rejected: list[dict]  # {"node": partition id, "reason": sentence}
    bytes_up: int

    def reject_where(self, reason_of) -> None:
        """Move every accepted update for which ``reason_of(update)`` gives a reason (a sentence) to ``rejected``,
        under its partition and node id, in order; the others stay accepted. A strategy's own checks after the
        common ones (FFA-LoRA's frozen A, FedSA-LoRA's personal numbers, SCAFFOLD's control update) use it."""
        kept = []
        for u in self.accepted:
            reason = reason_of(u)
            if reason:
                self.rejected.append({"node": u.node.partition_id, "node_id": u.node.node_id, "reason": reason})
            else:
                kept.append(u)
        self.accepted = kept


def error_summary(reason: str, limit: int = 300) -> str:
    """The line of a client's error report that says what went wrong (Ray wraps it in a long traceback)."""
    import re

    lines = [l.strip() for l in re.sub(r"\x1b\[[0-9;]*m", "", str(reason)).splitlines() if l.strip()]
    named = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", l)]
    return (named[-1] if named else lines[-1] if lines else "unknown error")[:limit]


@dataclass
class Attributed:
    """A round's replies matched to the messages they answer (:func:`attribute`)."""

    replies: list[Message]  # replies a node sent to its own message: for :meth:`LoraStrategy.check_replies`
    rejected: list[dict]  # messages answered for their node by someone else (a lost node: the SuperLink)
    answered: set[int]  # node ids whose message got a reply (its own or an error reply for it)


def attribute(replies, sent, nodes: dict) -> Attributed:
    """Match each reply to the message it answers: its ``reply_to_message_id`` is that message's
    ``message_id`` (the grid sets it when it pushes), whose ``dst_node_id`` is the node it speaks for. A reply's
    own ``src_node_id`` is not trusted for that: Flower answers for a node that stopped sending heartbeats with an
    error reply whose sender is the SuperLink (node id 1), and a node may claim another's id.

    - a reply from the node its message went to is passed on (checked as usual);
    - an error reply from anyone else (the SuperLink's "Node Unavailable", an expired message) is recorded once,
      under that node's id and partition, with the error's reason;
    - a reply from another node than the message's destination is recorded under the destination, refused;
    - a second reply to one message, or a reply to no message of ``sent``, is logged and dropped.

    ``sent``: the messages sent, their ids set by the grid. None, or no id set (grids that set none, unit tests):
    nothing to match against, each reply speaks for its sender."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.common.logger import log

    replies = list(replies)
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in (sent or []) if m.metadata.message_id}
    out = Attributed([], [], set())

    for rep in replies:
        src, rid = rep.metadata.src_node_id, rep.metadata.reply_to_message_id
        if rid in dst:
            nid = dst[rid]
        elif not dst:  # nothing to match against: the sender speaks for itself
            nid = src
        else:
            log(WARNING, "dropped a reply from node %s to a message this round did not send (%r)", src, rid)
            continue
        if nid in out.answered:
            log(WARNING, "dropped a second reply for node %s (from node %s)", nid, src)
            continue
        out.answered.add(nid)
        if src == nid:
            out.replies.append(rep)
        elif rep.has_error():
            who = "the SuperLink" if src == SUPERLINK_NODE_ID else f"node {src}"
            out.rejected.append(rejection(nodes, nid, f"{lost_reason(rep.error.code)} (reported by {who}): "
                                                      f"{error_summary(rep.error.reason)}"))
        else:
            out.rejected.append(rejection(nodes, nid, f"the reply to this node's message came from node {src}"))
    return out


def rejection(nodes: dict, nid: int, reason: str) -> dict:
    """A round's ``rejected`` entry for node ``nid``: its partition (None for a node the run does not know: a node
    id is never recorded as a partition), its node id and the reason."""
    node = nodes.get(nid)
    return {"node": node.partition_id if node else None, "node_id": nid, "reason": reason}


def lost_reason(code: int) -> str:
    """What an error reply that a node did not send itself means, by Flower's error code."""
    from flwr.common.constant import ErrorCode

    return {ErrorCode.NODE_UNAVAILABLE: "node lost", ErrorCode.MESSAGE_UNAVAILABLE: "message lost",
            ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply lost"}.get(int(code), f"error {code}")
