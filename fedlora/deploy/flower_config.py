"""The Flower side of a deployment: its executables and environment, SuperLink addresses, connections in
``$FLWR_HOME/config.toml`` (what `flwr run . NAME` reads), and `flwr supernode register` (its JSON output)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fedlora.deploy import DeployError
from fedlora.deploy.certs import write_file

DEFAULT_PORT = 9093  # the SuperLink's one HTTP port (all its APIs, Flower 1.42)


def flwr_home() -> Path:
    """``$FLWR_HOME`` (default ``~/.flwr``): where the `flwr` CLI keeps its connections."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def flwr_bin(name: str) -> str:
    """A Flower executable: beside this interpreter (the venv / image), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found: install flwr 1.42 in this environment (pip install 'flwr==1.42.*').")
    return found


def flwr_env() -> dict:
    """Environment for Flower processes: the venv's bin first on PATH (the SuperLink/SuperNode start
    `flower-superexec` / `flwr-serverapp` / `flwr-clientapp` by name), and never `uv sync` at run time."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def check_address(address: str, flag: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "://" in address:
        raise DeployError(f"{flag} {address!r}: expected HOST:PORT, e.g. 192.168.1.10:{DEFAULT_PORT}.")


def last_json(text: str) -> dict:
    """The JSON object in a `flwr ... --format json` output (the last `{...}` block); {} if none."""
    start = text.rfind("\n{")
    start = start + 1 if start >= 0 else text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


# ----------------------------------------------------------------------------------------------
# `flwr` CLI connection ($FLWR_HOME/config.toml)
# ----------------------------------------------------------------------------------------------
def write_connection(name: str, address: str, ca: Path | None = None, insecure: bool = False,
                     default: bool = False) -> Path:
    """Add/replace ``[superlink.NAME]`` (address + root-certificates, or insecure = true) in
    ``$FLWR_HOME/config.toml``, keeping the other entries."""
    import tomllib

    import tomli_w

    if not name.replace("-", "").replace("_", "").isalnum():
        raise DeployError(f"connection name {name!r}: use letters, digits, '-' and '_'.")
    check_address(address, "--superlink")
    if insecure == (ca is not None):
        raise DeployError("give either --ca FILE (TLS, the default) or --insecure.")
    path = flwr_home() / "config.toml"
    if path.exists():
        doc = tomllib.loads(path.read_text())
    else:
        try:
            from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

            doc = tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)
        except Exception:  # noqa: BLE001 - any Flower layout change: start empty
            doc = {}
    entry: dict = {"address": address}
    if insecure:
        entry["insecure"] = True
    else:
        ca = Path(ca).expanduser().resolve()
        if not ca.is_file():
            raise DeployError(f"--ca {ca} does not exist: it is the ca.crt written by `fedlora deploy certs`.")
        entry["root-certificates"] = str(ca)  # Flower requires an absolute path here
    doc.setdefault("superlink", {})[name] = entry
    if default:
        doc["superlink"]["default"] = name
    write_file(path, tomli_w.dumps(doc).encode())
    return path


# ----------------------------------------------------------------------------------------------
# Registering SuperNode public keys on a running SuperLink
# ----------------------------------------------------------------------------------------------
def public_keys(paths: list[str]) -> list[Path]:
    """The ``*.pub`` files among ``paths`` (files, or directories holding them)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.glob("*.pub"))
        elif p.is_file():
            out.append(p)
        else:
            raise DeployError(f"{p} is neither a public key file nor a directory of *.pub files.")
    if not out:
        raise DeployError(f"no *.pub files in {', '.join(paths)}.")
    return out


def register(pubkeys: list[Path], connection: str, timeout: float = 60,
             skip_registered: bool = False) -> dict[str, int | None]:
    """`flwr supernode register KEY CONNECTION` for each key; {key path: node id}. Raises on refusal;
    with ``skip_registered`` a key the SuperLink already knows is kept (node id None) instead."""
    ids: dict[str, int | None] = {}
    for pub in pubkeys:
        cmd = [flwr_bin("flwr"), "supernode", "register", str(pub), connection, "--format", "json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=flwr_env())
        reply = last_json(p.stdout)
        if p.returncode == 0 and reply.get("success"):
            ids[str(pub)] = int(reply["node-id"])
            continue
        why = reply.get("error-message") or (p.stderr or p.stdout).strip()[-500:]
        if skip_registered and "already in use" in (why + p.stdout + p.stderr):
            ids[str(pub)] = None
            continue
        raise RuntimeError(f"registering {pub} on '{connection}' failed: {why}")
    return ids
