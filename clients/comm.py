"""The node's side of ``comm.*`` (:mod:`fedlora.codecs`): it decodes the server's payload with ``comm.down`` and
encodes its reply with ``comm.up``, with error feedback for a lossy uplink. The residual (what the codec dropped
from this node's last reply) is node state in ``context.state``, one message's size at most, tied to the run config's
digest: a new run, or a node restarted, starts from no residual.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedlora import codecs
from fedlora.messages import DIGEST_KEY

RESIDUAL, RESIDUAL_OF = "comm-residual", "comm-residual-run"


def payload(msg: Message, cfg) -> dict[str, np.ndarray]:
    """The message's arrays as float tensors (``comm.down`` decoded)."""
    return codecs.decode(codecs.of_config(cfg, "down"), {k: a.numpy() for k, a in msg.content["arrays"].items()})


def reply(out: dict[str, np.ndarray], cfg, context: Context, conf) -> tuple[ArrayRecord, dict]:
    """``out`` as ``comm.up`` sends it, and the metrics that go with it (``codec_error``: the relative error of what
    is sent, error feedback included, when the codec is lossy)."""
    codec = codecs.of_config(cfg, "up")
    if not codec.lossy:
        return ArrayRecord({k: Array(v) for k, v in out.items()}), {}
    digest = str(conf.get(DIGEST_KEY, ""))
    same_run = RESIDUAL_OF in context.state and str(context.state[RESIDUAL_OF].get("digest")) == digest
    held = {k: a.numpy() for k, a in context.state[RESIDUAL].items()} if same_run and RESIDUAL in context.state else {}
    enc, residual, err = codecs.encode_with_feedback(codec, out, held)
    context.state[RESIDUAL] = ArrayRecord({k: Array(v) for k, v in {**held, **residual}.items()})
    context.state[RESIDUAL_OF] = ConfigRecord({"digest": digest})
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in enc.items()}), {"codec_error": float(err)}
