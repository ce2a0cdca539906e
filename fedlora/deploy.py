"""``fedlora deploy``: run a real federation on real machines (Flower 1.42 deployment engine).

Secure by default: the SuperLink speaks TLS and only accepts SuperNodes whose public keys were
registered; ``--insecure`` exists for debugging and prints a warning.

  fedlora deploy certs DIR [--hosts 127.0.0.1,localhost,server.example.org]
      A self-signed CA and a SuperLink certificate whose SANs are the given hosts (IP and DNS entries).
      Writes   DIR/ca.crt      CA certificate: give it to every SuperNode and to the `flwr` CLI
               DIR/ca.key      CA private key: keep it offline, only needed to issue new certificates
               DIR/server.pem  SuperLink certificate (signed by the CA)
               DIR/server.key  SuperLink private key (stays on the server)
  fedlora deploy keys DIR --nodes N [--connection NAME]
      N SuperNode key pairs for node authentication (ECDSA P-384, OpenSSH format, what Flower accepts):
               DIR/supernode-<i>.key  private key: copy it to node i only (`flower-supernode
                                      --auth-supernode-private-key`)
               DIR/supernode-<i>.pub  public key: register it on the SuperLink (`flwr supernode register`)
      With --connection the public keys are registered right away against that running SuperLink.
  fedlora deploy register PUBKEY... --connection NAME [--skip-registered]
      Register public keys (files or directories of *.pub) with `flwr supernode register PUBKEY NAME`.
  fedlora deploy connect NAME --superlink HOST:PORT (--ca FILE | --insecure) [--default]
      Write a `[superlink.NAME]` entry into $FLWR_HOME/config.toml so `flwr run . NAME` submits runs.
  fedlora deploy superlink [--certs DIR] [--host 0.0.0.0] [--port 9093] [--insecure] [--no-node-auth]
      Start `flower-superlink` with TLS (DIR/ca.crt, server.pem, server.key) and node authentication.
  fedlora deploy supernode --superlink HOST:PORT --data PATH --profile NAME [--partition-id I
                           --num-partitions N] [--key FILE] [--ca FILE] [--port P] [--insecure]
      Start `flower-supernode`; its node config carries data-path, profile (and partition-id,
      num-partitions) to the ClientApp.

`superlink` and `supernode` replace this process with the Flower one (signals reach it directly; in a
container it is PID 1); `--dry-run` prints the command instead. Bad input exits 2 with one sentence.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from fedlora.config import CONF_DIR, ConfigError

DEFAULT_PORT = 9093
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
KEY_PREFIX = "supernode"
LOCAL_HOSTS = ("127.0.0.1", "localhost")
INSECURE_WARNING = ("WARNING: --insecure: traffic is NOT encrypted and {what}. Use it only on a trusted "
                    "network for debugging; the default (TLS + registered node keys) is what deployments need.")


class DeployError(ConfigError):
    """Bad input to ``fedlora deploy`` (exit 2, one sentence)."""


# ----------------------------------------------------------------------------------------------
# Certificates (TLS)
# ----------------------------------------------------------------------------------------------
def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode: start fresh
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise DeployError(f"{', '.join(existing)} already exist: pass --force to replace them "
                          "(running SuperLinks/SuperNodes keep the old ones until restarted).")


def parse_hosts(text: str) -> tuple[list[ipaddress._BaseAddress], list[str]]:
    """``"127.0.0.1,localhost,10.0.0.5,server.lan"`` -> (IP addresses, DNS names). 127.0.0.1 is always
    included: a SuperLink bound to 0.0.0.0 reaches its own ServerApp runtime API on 127.0.0.1 over TLS."""
    ips, names = [], []
    for h in [h.strip() for h in text.split(",") if h.strip()] + ["127.0.0.1"]:
        try:
            ip = ipaddress.ip_address(h.strip("[]"))
            if ip not in ips:
                ips.append(ip)
        except ValueError:
            if not all(part and len(part) <= 63 and part.replace("-", "").replace("*", "").isalnum()
                       for part in h.split(".")):
                raise DeployError(f"--hosts entry {h!r} is neither an IP address nor a DNS name.") from None
            if h.lower() not in names:
                names.append(h.lower())
    return ips, names


def make_certs(out: Path, hosts: str = ",".join(LOCAL_HOSTS), days: int = 365, force: bool = False) -> dict:
    """A self-signed CA (ECDSA P-384) and a SuperLink certificate for ``hosts`` signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    files = {k: out / v for k, v in (("ca", CA_CERT), ("ca_key", CA_KEY), ("cert", SERVER_CERT), ("key", SERVER_KEY))}
    _refuse_overwrite(list(files.values()), force)
    ips, names = parse_hosts(hosts)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=int(days))

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedlora federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    cn = names[0] if names else str(ips[0])
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ip) for ip in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    pkcs8 = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                 encryption_algorithm=serialization.NoEncryption())
    _write(files["ca"], ca.public_bytes(pem))
    _write(files["ca_key"], ca_key.private_bytes(**pkcs8), private=True)
    _write(files["cert"], cert.public_bytes(pem))
    _write(files["key"], key.private_bytes(**pkcs8), private=True)
    return {"files": {k: str(v) for k, v in files.items()}, "ips": [str(i) for i in ips], "dns": names,
            "not_after": until.isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------------------------
# SuperNode keys (node authentication)
# ----------------------------------------------------------------------------------------------
def key_paths(out: Path, i: int) -> tuple[Path, Path]:
    return Path(out) / f"{KEY_PREFIX}-{i}.key", Path(out) / f"{KEY_PREFIX}-{i}.pub"


def make_keys(out: Path, nodes: int, force: bool = False, start: int = 1) -> list[tuple[Path, Path]]:
    """``nodes`` ECDSA P-384 key pairs in OpenSSH format: the private key is what `flower-supernode
    --auth-supernode-private-key` loads, the ``.pub`` line what `flwr supernode register` accepts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if nodes < 1:
        raise DeployError("--nodes must be at least 1.")
    pairs = [key_paths(out, i) for i in range(start, start + nodes)]
    _refuse_overwrite([p for pair in pairs for p in pair], force)
    for (priv_path, pub_path), i in zip(pairs, range(start, start + nodes)):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(priv_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()), private=True)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(pub_path, pub + f" fedlora-{KEY_PREFIX}-{i}\n".encode())
    return pairs


def check_private_key(path: Path) -> None:
    """Fail early, in one sentence, on a key Flower would refuse."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if not Path(path).is_file():
        raise DeployError(f"--key {path} does not exist: create keys with `fedlora deploy keys DIR --nodes N`.")
    try:
        key = load_ssh_private_key(Path(path).read_bytes(), None)
    except Exception:
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"--key {path} is not an unencrypted OpenSSH EC private key "
                          "(use `fedlora deploy keys` or `ssh-keygen -t ecdsa -b 384 -N ''`).")


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


def public_keys(paths: list[str]) -> list[Path]:
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
        reply = _last_json(p.stdout)
        if p.returncode == 0 and reply.get("success"):
            ids[str(pub)] = int(reply["node-id"])
            continue
        why = reply.get("error-message") or (p.stderr or p.stdout).strip()[-500:]
        if skip_registered and "already in use" in (why + p.stdout + p.stderr):
            ids[str(pub)] = None
            continue
        raise RuntimeError(f"registering {pub} on '{connection}' failed: {why}")
    return ids


def _print_registered(ids: dict[str, int | None]) -> None:
    for pub, nid in ids.items():
        print(f"registered {pub} as node {nid}" if nid is not None else f"already registered: {pub}")


def _last_json(text: str) -> dict:
    """The JSON object in a `flwr ... --format json` output (the last `{...}` block)."""
    start = text.rfind("\n{")
    start = start + 1 if start >= 0 else text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


# ----------------------------------------------------------------------------------------------
# `flwr` CLI connection ($FLWR_HOME/config.toml)
# ----------------------------------------------------------------------------------------------
def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


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
    _write(path, tomli_w.dumps(doc).encode())
    return path


def check_address(address: str, flag: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "://" in address:
        raise DeployError(f"{flag} {address!r}: expected HOST:PORT, e.g. 192.168.1.10:{DEFAULT_PORT}.")


# ----------------------------------------------------------------------------------------------
# SuperLink / SuperNode command lines
# ----------------------------------------------------------------------------------------------
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
        certs = Path(certs).expanduser().resolve()
        missing = [n for n in (CA_CERT, SERVER_CERT, SERVER_KEY) if not (certs / n).is_file()]
        if missing:
            raise DeployError(f"{certs} lacks {', '.join(missing)}: create it with `fedlora deploy certs {certs}`.")
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
    return sorted(p.stem for p in (CONF_DIR / "client").glob("*.yaml") if p.stem not in ("default", "mixed"))


def _toml_str(value: str) -> str:
    """A TOML string Flower's ``--node-config`` parser keeps whole (its values cannot hold both quotes)."""
    if "\n" in value or ('"' in value and "'" in value):
        raise DeployError(f"{value!r} contains both kinds of quotes (or a newline): rename the file.")
    return json.dumps(value) if '"' not in value else f"'{value}'"  # basic string, else literal string


def node_config(data: str, profile: str, partition_id: int | None = None, num_partitions: int | None = None) -> str:
    """The ``--node-config`` string the ClientApp reads (``context.node_config``)."""
    parts = []
    if partition_id is not None:
        parts += [f"partition-id={int(partition_id)}", f"num-partitions={int(num_partitions)}"]
    parts += [f"data-path={_toml_str(data)}", f"profile={_toml_str(profile)}"]
    return " ".join(parts)


def supernode_command(superlink: str, data: str, profile: str, partition_id: int | None = None,
                      num_partitions: int | None = None, key: Path | None = None, ca: Path | None = None,
                      insecure: bool = False, port: int = 9094, max_retries: int | None = None,
                      max_wait_time: float | None = None, check_data: bool = True) -> list[str]:
    check_address(superlink, "--superlink")
    if profile not in profiles():
        raise DeployError(f"unknown --profile {profile!r}: choose one of {', '.join(profiles())} (conf/client/).")
    if (partition_id is None) != (num_partitions is None):
        raise DeployError("--partition-id and --num-partitions go together (or neither: the node uses all of --data).")
    if partition_id is not None and not 0 <= partition_id < num_partitions:
        raise DeployError(f"--partition-id {partition_id} must be in [0, {num_partitions}).")
    data_path = Path(data).expanduser()
    if check_data and not data_path.exists():
        raise DeployError(f"--data {data} does not exist on this machine: point it at the node's own data "
                          "(a file or a folder with train.tsv/csv/json/jsonl/parquet).")
    data = str(data_path.resolve()) if data_path.exists() else data
    cmd = [flwr_bin("flower-supernode"), "--superlink", superlink, "--port", str(int(port)),
           "--node-config", node_config(data, profile, partition_id, num_partitions)]
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


# ----------------------------------------------------------------------------------------------
# A whole secured federation on one machine (the compose file's rehearsal, without Docker)
# ----------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, start time)} from /proc (empty where there is none)."""
    table = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(d)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pids: list[int]) -> list[tuple[int, int]]:
    """(pid, start time) of every process below ``pids`` (Flower's SuperExec, ServerApp, ClientApps)."""
    table = _proc_table()
    out, todo = [], list(pids)
    while todo:
        parent = todo.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent:
                out.append((pid, start))
                todo.append(pid)
    return out


def _alive(pid: int, start: int | None = None) -> bool:
    """Running (not a zombie) and, given ``start``, the same process (not a reused PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if os.path.isdir("/proc"):
            return False
        try:  # no /proc: signal 0 only tells whether the PID exists
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0] not in ("Z", "X") and (start is None or int(fields[19]) == start)


def stop_pids(groups: list[list[subprocess.Popen]], others: list[tuple[int, int]], grace: float = 20.0) -> None:
    """Stop each group of Popen in turn (SIGTERM to the whole group, wait, SIGKILL after ``grace``), e.g.
    the SuperNodes, then the SuperLink; then ``others`` (pid, start time: the processes they started) by PID."""
    import signal
    import time

    for group in groups:
        running = [p for p in group if p.poll() is None]
        for p in running:
            p.send_signal(signal.SIGTERM)
        for p in running:
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    # Flower's SuperExecs only notice a dead parent after their reconnect back-off (tens of seconds):
    # SIGTERM them (and any ClientApp/ServerApp still there) now, SIGKILL what is left after ``grace``.
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        left = [(pid, st) for pid, st in others if _alive(pid, st)]
        for pid, _ in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while any(_alive(pid, st) for pid, st in left) and time.time() < deadline:
            time.sleep(0.25)


class LocalFederation:
    """A SuperLink (TLS + node authentication) and SuperNodes on loopback, started with the same
    `fedlora deploy ...` commands a real deployment uses, every process stopped by PID on exit.

        with LocalFederation(workdir, nodes=3, data=path) as fed:
            fed.start()                     # certs, keys, SuperLink, connection, registration, SuperNodes
            run_id, info, log = fed.run("strategy=ffa_lora model=tiny_llama ...")  # info: `flwr ls` record
    """

    def __init__(self, workdir: Path, nodes: int, data: str, profile: str = "cpu", partitions: bool = True,
                 app_dir: Path | None = None, connection: str = "rehearsal", env: dict | None = None):
        self.dir = Path(workdir).resolve()
        self.nodes, self.data, self.profile, self.partitions = int(nodes), str(data), profile, partitions
        self.app_dir = Path(app_dir or CONF_DIR.parent).resolve()
        self.connection = connection
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**flwr_env(), "FLWR_HOME": str(self.dir / "flwr_home"), **(env or {})}
        self.certs, self.keys = self.dir / "certs", self.dir / "keys"
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self.procs: list[subprocess.Popen] = []  # everything started, in order
        self.node_ids: dict[int, int] = {}
        self._seen: set[tuple[int, int]] = set()

    # -- processes -------------------------------------------------------------------------------
    def fedlora(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "fedlora.cli", "deploy", *args], capture_output=True,
                           text=True, timeout=timeout, env=self.env, cwd=self.dir)
        if check and p.returncode != 0:
            raise RuntimeError(f"fedlora deploy {args[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
        return p

    def spawn(self, name: str, args: list[str], raw: bool = False) -> subprocess.Popen:
        """`fedlora deploy ARGS` (or, ``raw``, the command ARGS) in the background, output in NAME.log.
        `fedlora deploy superlink/supernode` exec into the Flower process: the PID is Flower's."""
        cmd = list(args) if raw else [sys.executable, "-m", "fedlora.cli", "deploy", *args]
        with open(self.dir / f"{name}.log", "wb") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir)
        p.log_path = self.dir / f"{name}.log"
        self.procs.append(p)
        return p

    @staticmethod
    def log(p: subprocess.Popen) -> str:
        return Path(p.log_path).read_text(errors="replace")

    def wait_for(self, p: subprocess.Popen, text: str, timeout: float) -> str:
        import re
        import time

        t0 = time.time()
        while time.time() - t0 < timeout:
            self._remember()
            if (m := re.search(text, self.log(p))):
                return m.group(0)
            if p.poll() is not None:
                raise RuntimeError(f"{p.log_path.stem} exited ({p.returncode}) before {text!r}:\n{self.log(p)[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"{p.log_path.stem}: no {text!r} within {timeout:.0f}s:\n{self.log(p)[-3000:]}")

    def _remember(self) -> None:
        self._seen.update(descendants([p.pid for p in self.procs]))

    # -- steps ------------------------------------------------------------------------------------
    def make_credentials(self, extra_keys: int = 1) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fedlora("certs", str(self.certs), "--hosts", "127.0.0.1,localhost")
        self.fedlora("keys", str(self.keys), "--nodes", str(self.nodes + extra_keys))

    def start_superlink(self, timeout: float = 120) -> None:
        self.superlink = self.spawn("superlink", ["superlink", "--certs", str(self.certs), "--host", "127.0.0.1",
                                                  "--port", str(self.port)])
        self.wait_for(self.superlink, r"Uvicorn running on https://", timeout)
        self.fedlora("connect", self.connection, "--superlink", self.address, "--ca", str(self.certs / CA_CERT))

    def register(self, indices: list[int]) -> None:
        p = self.fedlora("register", *[str(key_paths(self.keys, i)[1]) for i in indices],
                         "--connection", self.connection, timeout=60 * len(indices))
        for line, i in zip(p.stdout.strip().splitlines(), indices):
            self.node_ids[i] = int(line.rsplit(" ", 1)[1])

    def supernode_args(self, i: int, key: int | None = None, ca: bool = True, extra: tuple = ()) -> list[str]:
        args = ["supernode", "--superlink", self.address, "--data", self.data, "--profile", self.profile,
                "--port", str(free_port())]
        if self.partitions:
            args += ["--partition-id", str(i), "--num-partitions", str(self.nodes)]
        if key is not None:
            args += ["--key", str(key_paths(self.keys, key)[0])]
        if ca:
            args += ["--ca", str(self.certs / CA_CERT)]
        return args + list(extra)

    def start_supernodes(self, timeout: float = 180) -> None:
        for i in range(self.nodes):
            self.supernodes.append(self.spawn(f"supernode-{i + 1}", self.supernode_args(i, key=i + 1)))
        for p in self.supernodes:
            self.wait_for(p, r"SuperNode ID: \d+", timeout)

    def start(self) -> None:
        self.make_credentials()
        self.start_superlink()
        self.register(list(range(1, self.nodes + 1)))
        self.start_supernodes()

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([flwr_bin("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=self.app_dir)

    def clientapps(self) -> int:
        """ClientApp processes alive below this federation's SuperNodes."""
        n = 0
        for pid, start in descendants([p.pid for p in self.supernodes]):
            try:
                if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid, start):
                    n += 1
            except OSError:
                pass
        return n

    def run(self, overrides: str, timeout: float = 1800, runaway_s: float = 60) -> tuple[int, dict, str]:
        """`flwr run APP CONNECTION --run-config hydra-overrides=... --stream`; returns (run id, the run's
        `flwr ls` record, the streamed log). The status is read from `flwr ls` (`flwr run` exits 0 even
        when the ServerApp failed).

        Watchdog: a ClientApp process that does not claim its task within 30 s of its start (Flower 1.42's
        fixed window; Python + flwr start-up on an overloaded machine) or then misses heartbeats loses the
        task, and the SuperNode starts another process for it while the first keeps running -- a spiral.
        More than two ClientApps per node for ``runaway_s`` aborts the run."""
        import re
        import time

        rc = f"hydra-overrides={json.dumps(overrides)}"
        out = self.dir / "flwr-run.log"
        with open(out, "wb") as fh:
            p = subprocess.Popen([flwr_bin("flwr"), "run", str(self.app_dir), self.connection, "--run-config", rc,
                                  "--stream"], stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.app_dir)
        t0, crowded_since = time.time(), None
        try:
            while p.poll() is None:
                self._remember()
                n = self.clientapps()
                crowded_since = (crowded_since or time.time()) if n > 2 * self.nodes else None
                if crowded_since and time.time() - crowded_since > runaway_s:
                    raise RuntimeError(f"{n} ClientApp processes for {self.nodes} SuperNodes for {runaway_s:.0f}s: "
                                       "ClientApps miss Flower's 30 s start/heartbeat window (machine overloaded) and are relaunched; "
                                       "run stopped")
                if time.time() - t0 > timeout:
                    raise RuntimeError(f"flwr run did not finish within {timeout:.0f}s")
                time.sleep(2)
        finally:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        log = out.read_text(errors="replace")
        self._remember()
        m = re.search(r"Successfully started run (\d+)", log)
        if not m:
            raise RuntimeError(f"flwr run did not start a run ({p.returncode}):\n{log[-3000:]}")
        run_id = int(m.group(1))
        for _ in range(30):  # the stream ends with the run; give the status a moment to settle
            ls = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
            info = (_last_json(ls.stdout).get("runs") or [{}])[0]
            if str(info.get("status", "")).startswith("finished"):
                break
            time.sleep(2)
        return run_id, info, log

    def stop(self) -> None:
        self._remember()
        stop_pids([[p for p in self.procs if p is not self.superlink], [self.superlink] if self.superlink else []],
                  sorted(self._seen))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ----------------------------------------------------------------------------------------------
# argparse
# ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # bad input: one sentence, exit 2 (like the rest of the CLI)
        raise DeployError(f"{self.prog}: {message}.")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedlora deploy", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    c = sub.add_parser("certs", help="self-signed CA + SuperLink TLS certificate")
    c.add_argument("dir", type=Path)
    c.add_argument("--hosts", default=",".join(LOCAL_HOSTS),
                   help="comma-separated IPs and DNS names SuperNodes use to reach the SuperLink (SANs)")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--force", action="store_true", help="replace existing files")

    k = sub.add_parser("keys", help="SuperNode key pairs for node authentication")
    k.add_argument("dir", type=Path)
    k.add_argument("--nodes", type=int, required=True)
    k.add_argument("--start", type=int, default=1, help="number of the first key (supernode-<start>.key)")
    k.add_argument("--connection", help="also register the public keys on this running SuperLink connection")
    k.add_argument("--force", action="store_true")

    r = sub.add_parser("register", help="register SuperNode public keys on a running SuperLink")
    r.add_argument("pubkeys", nargs="+", help="*.pub files or directories holding them")
    r.add_argument("--connection", required=True, help="connection name in $FLWR_HOME/config.toml")
    r.add_argument("--skip-registered", action="store_true", help="keys the SuperLink already knows are not an error")

    n = sub.add_parser("connect", help="a [superlink.NAME] entry for `flwr run . NAME`")
    n.add_argument("name")
    n.add_argument("--superlink", required=True, help="HOST:PORT")
    n.add_argument("--ca", type=Path, help="the federation's ca.crt")
    n.add_argument("--insecure", action="store_true")
    n.add_argument("--default", action="store_true", help="also make it the default connection")

    s = sub.add_parser("superlink", help="start the SuperLink (TLS + node authentication)")
    s.add_argument("--certs", type=Path, help="directory with ca.crt, server.pem, server.key")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--insecure", action="store_true")
    s.add_argument("--no-node-auth", action="store_true", help="accept any SuperNode (not recommended)")
    s.add_argument("--database", help="SQLite file for the SuperLink state (default: in memory)")
    s.add_argument("--log-file")
    s.add_argument("--dry-run", action="store_true")

    m = sub.add_parser("supernode", help="start a SuperNode with this machine's data")
    m.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    m.add_argument("--data", required=True, help="this node's data: a file or folder the loaders accept")
    m.add_argument("--profile", required=True, help=f"hardware profile (conf/client): {', '.join(profiles())}")
    m.add_argument("--partition-id", type=int)
    m.add_argument("--num-partitions", type=int)
    m.add_argument("--key", type=Path, help="this node's private key (supernode-<i>.key)")
    m.add_argument("--ca", type=Path, help="the federation's ca.crt")
    m.add_argument("--insecure", action="store_true")
    m.add_argument("--port", type=int, default=9094, help="local ClientApp runtime port (one per SuperNode on a host)")
    m.add_argument("--max-retries", type=int)
    m.add_argument("--max-wait-time", type=float)
    m.add_argument("--dry-run", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "certs":
        res = make_certs(args.dir, args.hosts, args.days, args.force)
        print(f"CA and SuperLink certificate for {', '.join(res['dns'] + res['ips'])} (valid until "
              f"{res['not_after']}) in {args.dir}:\n"
              f"  {CA_CERT}      give to every SuperNode (--ca) and to `fedlora deploy connect --ca`\n"
              f"  {SERVER_CERT}, {SERVER_KEY}  stay on the SuperLink (`fedlora deploy superlink --certs {args.dir}`)\n"
              f"  {CA_KEY}       keep offline (only to issue new certificates)")
        return 0
    if args.cmd == "keys":
        pairs = make_keys(args.dir, args.nodes, args.force, args.start)
        for priv, pub in pairs:
            print(f"  {priv}  -> node only (--key)   {pub.name} -> register on the SuperLink")
        if args.connection:
            _print_registered(register([pub for _, pub in pairs], args.connection))
        else:
            print(f"register them: fedlora deploy register {args.dir} --connection NAME "
                  f"(or: flwr supernode register {pairs[0][1]} NAME)")
        return 0
    if args.cmd == "register":
        _print_registered(register(public_keys(args.pubkeys), args.connection, skip_registered=args.skip_registered))
        return 0
    if args.cmd == "connect":
        path = write_connection(args.name, args.superlink, args.ca, args.insecure, args.default)
        if args.insecure:
            warn_insecure("the SuperLink's identity is not checked")
        print(f"[superlink.{args.name}] -> {args.superlink} written to {path}; submit runs with "
              f"`flwr run . {args.name} --stream`")
        return 0
    if args.cmd == "superlink":
        cmd = superlink_command(args.certs, args.host, args.port,
                                args.insecure, not args.no_node_auth, args.database, args.log_file)
        if args.insecure:
            warn_insecure("any SuperNode can join (node authentication needs TLS)")
        elif args.no_node_auth:
            print("WARNING: --no-node-auth: any SuperNode that trusts the CA can join.", file=sys.stderr)
        return launch(cmd, args.dry_run)
    if args.cmd == "supernode":
        cmd = supernode_command(args.superlink, args.data, args.profile, args.partition_id, args.num_partitions,
                                args.key, args.ca, args.insecure, args.port, args.max_retries, args.max_wait_time)
        if args.insecure:
            warn_insecure("the SuperLink's identity is not checked")
        elif args.key is None:
            print("note: no --key: a SuperLink with node authentication (the default) will refuse this node.",
                  file=sys.stderr)
        return launch(cmd, args.dry_run)
    raise DeployError(f"unknown deploy command {args.cmd!r}.")  # argparse already refuses this
