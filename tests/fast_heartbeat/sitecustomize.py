"""Test-only: a SuperNode started with this folder first on PYTHONPATH declares Flower's shortest accepted heartbeat
interval (``HEARTBEAT_MIN_INTERVAL``, 10 s) to its SuperLink instead of the hard-coded 30 s, so that a SuperNode
killed mid-round is declared lost (``HEARTBEAT_PATIENCE`` x the interval after its last heartbeat) in ~20 s
instead of ~60 s. Flower 1.42 has no flag or environment variable for it: the interval is a module constant
(``flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL``) that the two modules below copy at import.

Only those two modules are changed, right after they load: ``flwr.supernode.fleet_http_connection`` (the interval
the SuperNode declares in ActivateNode / SendNodeHeartbeat) and ``flwr.supercore.heartbeat`` (how often a
HeartbeatSender sends: the SuperNode's node heartbeats, and a ClientApp's task heartbeats, which then only come
more often). The constant itself is left alone, so the SuperNode's window for a ClientApp to start
(``flwr.supercore.corestate``) keeps its 30 s. Used by tests/test_deploy.py (the killed-SuperNode scenario)."""

import importlib.abc
import sys

INTERVAL = 10.0  # flwr.common.constant.HEARTBEAT_MIN_INTERVAL: the SuperLink refuses anything shorter
TARGETS = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
MARKER = "fedlora-test: heartbeat interval"


class _ShortHeartbeat(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
                raise ImportError(f"{name} no longer has HEARTBEAT_DEFAULT_INTERVAL: update {__file__}")
            module.HEARTBEAT_DEFAULT_INTERVAL = INTERVAL
            print(f"{MARKER} {INTERVAL:g} s ({name})", file=sys.stderr, flush=True)

        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _ShortHeartbeat())
