"""What a node decides for itself: its node config (``--node-config`` of a SuperNode, or the settings a simulation
gives its simulated nodes), never a message from the server. The server only proposes a run config; the node
keeps of it what :func:`fedlora.config.for_clients` lists and checks the rest against its own settings here.

Node-config keys (besides Flower's ``partition-id`` / ``num-partitions``):

- ``data-path``: this node's data; without it the node uses the default location of the run's data set
  (e.g. SST-2), resolved on the node. A path named by the server is never followed.
- ``dp-required``, ``dp-max-epsilon``, ``dp-max-delta``, ``dp-max-clip``: the node's privacy floor
  (:mod:`fedlora.privacy.floor`); a round that asks for less is refused with its reason.
- ``dp-reproducible``: allow DP noise and sampling seeded from the run config when the run asks for it
  (``privacy.reproducible``); otherwise they come from the operating system's randomness.
- ``allow-faults``: obey the run's fault injection (``debug.*``); a simulation's nodes allow it.
- ``profile``: the hardware profile the node reports (FedPipe).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedlora import privacy
from fedlora.privacy.floor import flag

#: node-config keys a simulation gives every simulated node (one party runs the server and all nodes)
SIMULATION = {"allow-faults": True, "dp-reproducible": True}
#: the longest sleep a node that allows fault injection accepts (``debug.sleep_s``)
MAX_FAULT_SLEEP_S = 3600.0


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int = 0
    num_partitions: int | None = None
    data_path: str | None = None
    floor: privacy.NodeFloor | None = None
    reproducible: bool = False
    allow_faults: bool = False

    @classmethod
    def of(cls, node_config: Mapping) -> NodeSettings:
        """The settings a node config gives; ``ValueError`` (one sentence) on a bad floor or flag."""
        n = node_config.get("num-partitions")
        return cls(partition_id=int(node_config.get("partition-id", 0)),
                   num_partitions=int(n) if n not in (None, "") else None,
                   data_path=str(node_config["data-path"]) if node_config.get("data-path") else None,
                   floor=privacy.NodeFloor.from_node_config(node_config),
                   reproducible=flag(node_config.get("dp-reproducible", False), "dp-reproducible"),
                   allow_faults=flag(node_config.get("allow-faults", False), "allow-faults"))

    def refusal(self, cfg) -> str | None:
        """Why this node refuses a round of the run ``cfg`` (None: it trains)."""
        mode = privacy.mode_of(cfg)
        dp = privacy.dp_config(cfg) if mode in ("dp_sgd", "client_dp") else None
        return privacy.floor_refusal(self.floor, mode, dp, reproducible=bool(cfg.privacy.get("reproducible")),
                                     node_allows_reproducible=self.reproducible)

    def dp_seed(self, cfg, rnd: int) -> tuple[int, int, int] | None:
        """The seed of a DP-SGD round's noise and sampling: (seed, partition, round) only when the run asks for
        reproducible noise and this node allows it; else None (the operating system's randomness)."""
        if cfg.privacy.get("reproducible") and self.reproducible:
            return int(cfg.seed), self.partition_id, int(rnd)
        return None

    def faults(self, cfg) -> tuple[bool, float]:
        """``(raise, sleep seconds)`` of this node's fault injection this round: none unless the node allows it."""
        dbg = cfg.get("debug") or {}
        if not self.allow_faults:
            return False, 0.0
        fail = self.partition_id in list(dbg.get("raise_partitions") or [])
        sleep = float(dbg.get("sleep_s", 0) or 0) if self.partition_id in list(dbg.get("sleep_partitions") or []) else 0
        return fail, min(max(sleep, 0.0), MAX_FAULT_SLEEP_S)


def simulated(cfg) -> dict:
    """The node config ``fedlora run`` gives each simulated node (one party runs the server and every node):
    :data:`SIMULATION`, the run's data path (made absolute: Ray's workers run elsewhere) and
    ``simulation.node_config`` (``--node-config`` syntax, e.g. ``"dp-required=true dp-max-epsilon=3"``: a floor
    for tests and rehearsals)."""
    from pathlib import Path

    from flwr.common.config import parse_config_args

    out = dict(SIMULATION)
    path = cfg.data.get("path")
    if path not in (None, "", "null"):
        p = Path(str(path)).expanduser()
        out["data-path"] = str(p.resolve()) if p.exists() else str(path)
    extra = str((cfg.get("simulation") or {}).get("node_config") or "").strip()
    if extra:
        out.update(parse_config_args([extra]))
    return out

