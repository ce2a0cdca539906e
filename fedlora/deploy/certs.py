"""Certificates (TLS) and SuperNode key pairs (node authentication), and the file writer that keeps private
keys private. File names: ``ca.crt``/``server.pem``/``server.key`` in the certs folder, ``ca.key`` OUTSIDE it
(``<DIR>-ca/`` beside it by default: the certs folder is what gets copied or mounted onto the SuperLink, the CA
key is kept offline), ``supernode-<i>.key``/``.pub``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from fedlora.deploy import DeployError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
CA_KEY_DIR_SUFFIX = "-ca"  # default home of ca.key: DIR-ca/, a sibling of the certs folder DIR
KEY_PREFIX = "supernode"
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def write_file(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` atomically; ``private`` files are created 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode: start fresh
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise DeployError(f"{', '.join(existing)} already exist: pass --force to replace them "
                          "(running SuperLinks/SuperNodes keep the old ones until restarted).")


# ----------------------------------------------------------------------------------------------
# Certificates (TLS)
# ----------------------------------------------------------------------------------------------
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


def default_ca_key_dir(certs_dir: Path) -> Path:
    """Where ``fedlora deploy certs DIR`` puts ``ca.key`` unless told otherwise: ``DIR-ca/`` beside DIR (named
    after DIR, so two federations' certs folders in one parent never share, or overwrite, a CA key)."""
    d = Path(certs_dir).expanduser()
    if d.name in ("", ".", ".."):  # "." or "x/..": name the folder itself
        d = d.resolve()
    if d.parent == d:
        raise DeployError(f"{certs_dir} is a filesystem root: give the certificates a folder of their own.")
    return d.parent / f"{d.name}{CA_KEY_DIR_SUFFIX}"


def stray_ca_key(certs_dir: Path) -> Path | None:
    """A ``ca.key`` inside a certs folder (written there by an earlier fedlora, or copied there by hand):
    whatever mounts or copies that folder also hands out the CA's private key."""
    path = Path(certs_dir).expanduser() / CA_KEY
    return path if path.exists() else None


def make_certs(out: Path, hosts: str = ",".join(LOCAL_HOSTS), days: int = 365, force: bool = False,
               ca_key_dir: Path | None = None) -> dict:
    """A self-signed CA (ECDSA P-384) and a SuperLink certificate for ``hosts`` signed by it: ``ca.crt``,
    ``server.pem`` and ``server.key`` in ``out`` (exactly what the SuperLink needs), ``ca.key`` in
    ``ca_key_dir`` (default ``default_ca_key_dir(out)``), which must lie outside ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    ca_dir = Path(ca_key_dir).expanduser() if ca_key_dir is not None else default_ca_key_dir(out)
    out_abs, ca_abs = out.expanduser().resolve(), ca_dir.resolve()
    if ca_abs == out_abs or out_abs in ca_abs.parents:
        raise DeployError(f"--ca-key-dir {ca_dir} lies inside {out}: the CA key must stay out of the folder "
                          "that is copied or mounted onto the SuperLink.")
    files = {"ca": out / CA_CERT, "ca_key": ca_dir / CA_KEY, "cert": out / SERVER_CERT, "key": out / SERVER_KEY}
    refuse_overwrite(list(files.values()), force)
    ips, names = parse_hosts(hosts)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=int(days))

    def key_usage(**on: bool) -> x509.KeyUsage:
        flags = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                 "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{f: on.get(f, False) for f in flags})

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedlora federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
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
            .add_extension(key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    pkcs8 = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                 encryption_algorithm=serialization.NoEncryption())
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a folder of its own, for the owner only
    write_file(files["ca"], ca.public_bytes(pem))
    write_file(files["ca_key"], ca_key.private_bytes(**pkcs8), private=True)
    write_file(files["cert"], cert.public_bytes(pem))
    write_file(files["key"], key.private_bytes(**pkcs8), private=True)
    stray = stray_ca_key(out)
    return {"files": {k: str(v) for k, v in files.items()}, "ips": [str(i) for i in ips], "dns": names,
            "not_after": until.isoformat(timespec="seconds"), "stray_ca_key": str(stray) if stray else None}


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
    refuse_overwrite([p for pair in pairs for p in pair], force)
    for (priv_path, pub_path), i in zip(pairs, range(start, start + nodes)):
        key = ec.generate_private_key(ec.SECP384R1())
        write_file(priv_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()), private=True)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        write_file(pub_path, pub + f" fedlora-{KEY_PREFIX}-{i}\n".encode())
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
