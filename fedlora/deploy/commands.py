"""The `flower-superlink` / `flower-supernode` command lines (secure by default: TLS, node authentication),
the node config a SuperNode hands its ClientApps, and ``launch`` (exec into the Flower process)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from fedlora.config import CONF_DIR
from fedlora.deploy import DeployError
from fedlora.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY, check_private_key
from fedlora.deploy.flower_config import DEFAULT_PORT, check_address, flwr_bin, flwr_env

INSECURE_WARNING = ("WARNING: --insecure: traffic is NOT encrypted and {what}. Use it only on a trusted "
                    "network for debugging; the default (TLS + registered node keys) is what deployments need.")


def warn_insecure(what: str) -> None:
    print(INSECURE_WARNING.format(what=what), file=sys.stderr, flush=True)


def superlink_command(certs: Path | None, host: str = "0.0.0.0", port: int = DEFAULT_PORT, insecure: bool = False,
                      node_auth: bool = True, database: str | None = None, log_file: str | None = None) -> list[str]:
    cmd = [flwr_bin("flower-superlink"), "--host", host, "--port", str(int(port)),
           "--disable-runtime-dependency-installation"]
    if insecure:
        if certs is not None:
            raise DeployError("--insecure and --certs contradict each other: drop one.")
        cmd.append("--insecure")  # Flower refuses node authentication without TLS
    else:
        if certs is None:
            raise DeployError("--certs DIR is required (TLS is on by default; create it with `fedlora deploy "
                              "certs DIR --hosts ...`), or pass --insecure for a debugging run.")
        certs = Path(certs).expanduser().resolve()  # the SuperLink reads these three files and nothing else:
        missing = [n for n in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (certs / n).is_file()]
        if missing:
            raise DeployError(f"{certs} lacks {', '.join(missing)}: create it with `fedlora deploy certs {certs}`.")
        # no ca.key (kept offline), so DIR may be three single-file mounts (docker/compose.yaml)
        cmd += ["--ssl-ca-certfile", str(certs / CA_CERT), "--ssl-certfile", str(certs / SERVER_CERT),
                "--ssl-keyfile", str(certs / SERVER_KEY)]
        if node_auth:
            cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", str(database)]
    if log_file:
        cmd += ["--log-file", str(log_file)]
    return cmd


def profiles() -> list[str]:
    """The hardware profiles a SuperNode can declare (conf/client/*.yaml)."""
    return sorted(p.stem for p in (CONF_DIR / "client").glob("*.yaml") if p.stem not in ("default", "mixed"))


def _toml_str(value: str) -> str:
    """A TOML string Flower's ``--node-config`` parser keeps whole (its values cannot hold both quotes)."""
    if "\n" in value or ('"' in value and "'" in value):
        raise DeployError(f"{value!r} contains both kinds of quotes (or a newline): rename the file.")
    return json.dumps(value) if '"' not in value else f"'{value}'"  # basic string, else literal string


def node_config(data: str, profile: str, partition_id: int | None = None, num_partitions: int | None = None,
                policy: dict | None = None) -> str:
    """The ``--node-config`` string the ClientApp reads (``context.node_config``); ``policy``: what the node
    enforces on its own (privacy floor, opt-ins; :func:`node_policy`)."""
    parts = []
    if partition_id is not None:
        parts += [f"partition-id={int(partition_id)}", f"num-partitions={int(num_partitions)}"]
    parts += [f"data-path={_toml_str(data)}", f"profile={_toml_str(profile)}"]
    for k, v in (policy or {}).items():
        parts.append(f"{k}={str(v).lower() if isinstance(v, bool) else repr(float(v))}")
    return " ".join(parts)


def node_policy(dp_required: bool = False, dp_max_epsilon: float | None = None, dp_max_delta: float | None = None,
                dp_max_clip: float | None = None, dp_reproducible: bool = False,
                allow_faults: bool = False) -> dict:
    """The node-config entries of a node's own privacy floor and opt-ins (fedlora/clients/node.py), checked
    here so a bad value stops the launch with one sentence."""
    from fedlora.privacy import NodeFloor

    out = {}
    if dp_required or any(v is not None for v in (dp_max_epsilon, dp_max_delta, dp_max_clip)):
        out["dp-required"] = True
    for key, v in (("dp-max-epsilon", dp_max_epsilon), ("dp-max-delta", dp_max_delta), ("dp-max-clip", dp_max_clip)):
        if v is not None:
            out[key] = v
    try:
        NodeFloor.from_node_config(out)
    except ValueError as e:
        raise DeployError(str(e).replace("node config ", "--")) from None
    if dp_reproducible:
        out["dp-reproducible"] = True
    if allow_faults:
        out["allow-faults"] = True
    return out


def supernode_command(superlink: str, data: str, profile: str, partition_id: int | None = None,
                      num_partitions: int | None = None, key: Path | None = None, ca: Path | None = None,
                      insecure: bool = False, port: int = 9094, max_retries: int | None = None,
                      max_wait_time: float | None = None, check_data: bool = True,
                      policy: dict | None = None) -> list[str]:
    check_address(superlink, "--superlink")
    if profile not in profiles():
        raise DeployError(f"unknown --profile {profile!r}: choose one of {', '.join(profiles())} (conf/client/).")
    if (partition_id is None) != (num_partitions is None):
        raise DeployError("--partition-id and --num-partitions go together "
                          "(or neither: the node uses all of --data).")
    if partition_id is not None and not 0 <= partition_id < num_partitions:
        raise DeployError(f"--partition-id {partition_id} must be in [0, {num_partitions}).")
    data_path = Path(data).expanduser()
    if check_data and not data_path.exists():
        raise DeployError(f"--data {data} does not exist on this machine: point it at the node's own data "
                          "(a file or a folder with train.tsv/csv/json/jsonl/parquet).")
    data = str(data_path.resolve()) if data_path.exists() else data
    cmd = [flwr_bin("flower-supernode"), "--superlink", superlink, "--port", str(int(port)),
           "--node-config", node_config(data, profile, partition_id, num_partitions, policy)]
    if insecure:
        if ca is not None:
            raise DeployError("--insecure and --ca contradict each other: drop one.")
        cmd.append("--insecure")
    else:
        if ca is None:
            raise DeployError("--ca FILE is required (the federation's ca.crt; TLS is on by default), "
                              "or pass --insecure for a debugging run.")
        ca = Path(ca).expanduser().resolve()
        if not ca.is_file():
            raise DeployError(f"--ca {ca} does not exist: copy the ca.crt written by `fedlora deploy certs`.")
        cmd += ["--root-certificates", str(ca)]
    if key is not None:
        check_private_key(Path(key).expanduser())
        cmd += ["--auth-supernode-private-key", str(Path(key).expanduser().resolve())]
    if max_retries is not None:
        cmd += ["--max-retries", str(int(max_retries))]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(float(max_wait_time))]
    return cmd


def launch(cmd: list[str], dry_run: bool) -> int:
    """Print the command; unless ``dry_run``, replace this process with it (same PID: a supervisor's or
    Docker's SIGTERM reaches Flower, which stops its own children)."""
    if dry_run:
        print(shlex.join(cmd))
        return 0
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, flwr_env())
    return 1  # unreachable
