"""``fedlora deploy``: a real federation on real machines (Flower 1.42 deployment engine).

  certs.py          the federation's CA, the SuperLink certificate, SuperNode key pairs (node authentication)
  flower_config.py  Flower's executables and environment, ``$FLWR_HOME/config.toml`` connections, key registration
  commands.py       the ``flower-superlink`` / ``flower-supernode`` command lines, and launching them
  cli.py            the ``fedlora deploy`` argument parser and ``main``

The walkthrough is docker/README.md; docs/deploy.md maps the code. The loopback test harness is tests/federation.py.
"""

from fedlora.config import ConfigError


class DeployError(ConfigError):
    """Bad input to ``fedlora deploy`` (exit 2, one sentence)."""


from fedlora.deploy.cli import main  # noqa: E402 - the submodules import DeployError from here

__all__ = ["DeployError", "main"]
