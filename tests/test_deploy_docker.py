"""The Docker files, checked without a Docker engine: each Dockerfile has the instructions a deployment needs
(pinned base from a build argument, dependencies baked in, no run-time installs, non-root user, exec-form
`fedlora deploy ...` entry point whose default arguments parse and are secure), secrets never enter a build
context, and the compose rehearsal is consistent (its commands parse with `fedlora deploy`'s own parser: TLS,
registered keys, one partition per node). `docker compose config` runs where the compose plugin exists.
The trust checks (issue 16, item 8) write the secrets layout for real with `fedlora deploy certs`/`keys` and
resolve every compose service's mounts against it: a private key reaches only the service that owns it."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from fedlora.deploy import DeployError
from fedlora.deploy.certs import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, make_certs, make_keys
from fedlora.deploy.cli import build_parser, main
from fedlora.deploy.commands import profiles, superlink_command

DOCKER = ROOT / "docker"
IMAGES = {"Dockerfile.superlink": "superlink", "Dockerfile.supernode-cuda": "supernode",
          "Dockerfile.supernode-jetson": "supernode"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def expand(value: str) -> str:
    """Compose-style ${VAR:-default} with the defaults (no environment)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile(name):
    path = DOCKER / name
    ins = instructions(path)
    kinds = [k for k, _ in ins]
    assert kinds[0] in ("ARG", "FROM") and "FROM" in kinds
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in ins if k == "ARG" and "=" in a}
    (base,) = [a for k, a in ins if k == "FROM"]
    ref = re.search(r"\$\{(\w+)\}", base)
    image = args[ref.group(1)] if ref else base.split()[-1]
    assert ":" in image and not image.endswith(":latest"), f"{name}: pin the base image ({image})"
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in env
    runs = [a for k, a in ins if k == "RUN"]
    assert any("pip install" in r and "-e ." in r for r in runs), "the project is installed at build time"
    for r in runs:
        for cmd in re.findall(r"pip install[^&]*", r):
            assert "--no-cache-dir" in cmd, cmd
    # non-root, after the last RUN
    user = [i for i, (k, _) in enumerate(ins) if k == "USER"]
    last_run = max(i for i, (k, _) in enumerate(ins) if k == "RUN")
    assert user and ins[user[-1]][1] not in ("root", "0") and user[-1] > last_run
    # exec-form entry point: the Flower process gets the signals (`fedlora deploy` execs into it)
    (entry,) = [json.loads(a) for k, a in ins if k == "ENTRYPOINT"]
    assert entry == ["fedlora", "deploy", IMAGES[name]]
    (cmd,) = [json.loads(a) for k, a in ins if k == "CMD"]
    assert isinstance(cmd, list)
    for k, a in ins:  # nothing installs or fetches when the container starts
        if k in ("ENTRYPOINT", "CMD"):
            assert not re.search(r"pip|uv |apt|curl|wget", a), a
    ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
    for pattern in ("docker/secrets", "**/.venv", "**/*.key"):
        assert pattern in ignore, f"{name}.dockerignore must exclude {pattern}"
    for k, a in ins:
        if k in ("COPY", "ADD"):
            assert "secrets" not in a and not a.startswith("http"), a

    if name == "Dockerfile.superlink":
        parsed = build_parser().parse_args(entry[2:] + cmd)
        assert str(parsed.certs) == "/certs" and not parsed.insecure and not parsed.no_node_auth
        assert parsed.database and parsed.host == "0.0.0.0"
        assert "HEALTHCHECK" in kinds and any(k == "EXPOSE" and "9093" in a for k, a in ins)
        assert any("torch.version.cuda is None" in r for r in runs)  # CPU build only on the server
    if name == "Dockerfile.supernode-cuda":
        assert image.startswith("nvidia/cuda:") and "runtime" in image
        assert any("download.pytorch.org/whl/cu" in v for v in args.values())
        assert any("torch.version.cuda" in r for r in runs)
    if name == "Dockerfile.supernode-jetson":
        assert "--platform=linux/arm64" in base and "l4t" in image
        assert not any("index-url" in r for r in runs), "keep the base image's Jetson torch"
        assert any("torch-pin" in r and "torch.version.cuda" in r for r in runs)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_rehearsal_is_secure_and_consistent():
    doc = compose()
    services = doc["services"]
    assert {"superlink", "register"} <= set(services)
    nodes = sorted(s for s in services if s.startswith("supernode-"))
    assert len(nodes) >= 2
    parser = build_parser()

    link = services["superlink"]
    assert (ROOT / link["build"]["dockerfile"]).exists() and link["build"]["context"] == ".."
    parsed = parser.parse_args(["superlink", *link["command"]])
    assert not parsed.insecure and not parsed.no_node_auth and str(parsed.certs) == "/certs"
    assert not any(v.split(":")[0] == "./secrets/certs" for v in link["volumes"]), "the folder mount is gone"
    for name in ("ca.crt", "server.pem", "server.key"):  # one read-only file each, nothing else of secrets/
        assert f"./secrets/certs/{name}:/certs/{name}:ro" in link["volumes"]
    assert all(p.startswith("127.0.0.1:") for p in link["ports"]), "publish the rehearsal SuperLink on loopback only"
    assert "healthcheck" in link

    reg = services["register"]
    assert reg["depends_on"]["superlink"]["condition"] == "service_healthy"
    script = " ".join(reg["command"])
    assert "fedlora deploy connect" in script and "fedlora deploy register" in script and "--skip-registered" in script

    keys, parts = set(), set()
    for name in nodes:
        svc = services[name]
        assert svc["depends_on"]["register"]["condition"] == "service_completed_successfully"
        assert (ROOT / svc["build"]["dockerfile"]).exists()
        args = parser.parse_args(["supernode", *map(expand, svc["command"])])
        assert not args.insecure and str(args.ca) == "/certs/ca.crt" and str(args.key) == "/keys/supernode.key"
        assert args.superlink == "superlink:9093" and args.num_partitions == len(nodes)
        assert args.profile in profiles()
        parts.add(args.partition_id)
        mounts = {v.split(":")[1]: v for v in map(expand, svc["volumes"])}
        assert mounts["/keys/supernode.key"].endswith(":ro") and mounts["/certs/ca.crt"].endswith(":ro")
        keys.add(mounts["/keys/supernode.key"].split(":")[0])
    assert parts == set(range(len(nodes))), "one partition per node"
    assert len(keys) == len(nodes), "every node has its own key"
    assert keys == {f"./secrets/keys/supernode-{i}.key" for i in range(1, len(nodes) + 1)}

    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    assert set(gpu["services"]) == set(nodes)
    for svc in gpu["services"].values():
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def _compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="the docker compose plugin is not installed")
def test_docker_compose_config(tmp_path):
    env = {"PATH": __import__("os").environ["PATH"], "FEDLORA_DATA": str(tmp_path)}
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        p = subprocess.run(["docker", "compose", *sum((["-f", str(DOCKER / f)] for f in files), []), "config", "-q"],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------------------------------------
# Issue 16, item 8: the CA private key, and every other private key, reaches only its owner
# ------------------------------------------------------------------------------------------------
SECRETS = DOCKER / "secrets"  # what the compose files call ./secrets (the README's `fedlora deploy` targets)


def compose_files() -> list[Path]:
    """Every compose file under docker/ (any YAML with a ``services`` mapping): base and override files."""
    files = [p for p in sorted(DOCKER.rglob("*.y*ml")) if isinstance((yaml.safe_load(p.read_text()) or {})
                                                                      .get("services"), dict)]
    assert DOCKER / "compose.yaml" in files and DOCKER / "compose.gpu.yaml" in files
    return files


def mount_sources(doc: dict, svc: dict) -> list[tuple[str, str]]:
    """(host path as written, container path) of every bind mount a service gets: short and long ``volumes``
    entries, and the files behind its ``secrets``/``configs``. Named and anonymous volumes are not host paths."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            parts = expand(v).split(":")
            if len(parts) < 2:
                continue  # anonymous volume
            src, dst = parts[0], parts[1]
        else:
            if v.get("type", "volume") != "bind":
                continue
            src, dst = expand(str(v["source"])), str(v["target"])
        if src.startswith((".", "/", "~")):
            out.append((src, dst))
    for kind in ("secrets", "configs"):
        for ref in svc.get(kind) or []:
            name = ref if isinstance(ref, str) else ref["source"]
            file = ((doc.get(kind) or {}).get(name) or {}).get("file")
            if file:
                target = ref.get("target", name) if isinstance(ref, dict) else name
                out.append((expand(file), target if target.startswith("/") else f"/run/{kind}/{target}"))
    return out


def services_of(files: list[Path]) -> dict[str, list[tuple[str, str]]]:
    """Each service's bind mounts over all the given compose files (a service in an override file gets
    those mounts as well: the union is what it can see when the files are combined)."""
    docs = [yaml.safe_load(f.read_text()) for f in files]
    top = {k: {n: v for d in docs for n, v in (d.get(k) or {}).items()} for k in ("secrets", "configs")}
    out: dict[str, list[tuple[str, str]]] = {}
    for d in docs:
        for name, svc in d["services"].items():
            svc = svc or {}
            assert "volumes_from" not in svc, f"{name}: volumes_from hides which files it sees"
            out.setdefault(name, []).extend(mount_sources(top, svc))
    return out


def in_layout(src: str, root: Path) -> Path | None:
    """A host path of a compose file (relative to docker/) mapped onto the layout written under ``root``
    (standing in for docker/secrets); None when it holds none of the secrets."""
    host = Path(os.path.normpath(DOCKER / Path(src).expanduser()))
    if host == SECRETS or SECRETS in host.parents:
        return root / host.relative_to(SECRETS)
    if host in SECRETS.parents:
        return root  # a folder above docker/secrets mounts all of it
    return None


def visible(services: dict[str, list[tuple[str, str]]], root: Path) -> dict[str, dict[str, Path]]:
    """Per service: container path -> layout file, for every file of the layout the service can read."""
    out = {}
    for name, mounts in services.items():
        seen = {}
        for src, dst in mounts:
            path = in_layout(src, root)
            if path is None:
                continue
            assert path.exists(), f"{name} mounts {src}, which `fedlora deploy certs`/`keys` do not write"
            if path.is_dir():
                seen.update({f"{dst}/{f.relative_to(path)}": f for f in path.rglob("*") if f.is_file()})
            else:
                seen[dst] = path
        out[name] = seen
    return out


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """docker/secrets as docker/README.md has it written: (root, {private key file: owning service or None})."""
    nodes = sorted(n for n in services_of(compose_files()) if n.startswith("supernode-"))
    root = tmp_path_factory.mktemp("layout") / "secrets"
    certs = make_certs(root / "certs", "superlink,localhost,127.0.0.1")
    pairs = make_keys(root / "keys", len(nodes))
    owners = {Path(certs["files"]["ca_key"]): None, Path(certs["files"]["key"]): "superlink"}
    owners.update({priv: f"supernode-{i}" for i, (priv, _) in enumerate(pairs, start=1)})
    assert set(owners.values()) - {None} == {"superlink", *nodes}
    return root, owners


def leaks(services: dict[str, list[tuple[str, str]]], root: Path, owners: dict) -> set[tuple[str, str]]:
    """(service, private key file relative to the layout) for every private key a service sees but does not own."""
    return {(name, str(f.relative_to(root))) for name, seen in visible(services, root).items()
            for f in seen.values() if f in owners and owners[f] != name}


def test_trust_8_the_layout_names_every_private_key(layout):
    """The ownership table covers every private key `fedlora deploy certs`/`keys` write (by content, not only
    by name), and the CA key is outside the certs folder, in a folder of its own."""
    root, owners = layout
    written = {f for f in root.rglob("*") if f.is_file()}
    private = {f for f in written if b"PRIVATE KEY" in f.read_bytes()}
    assert private == set(owners) == {f for f in written if f.suffix == ".key"}
    assert {f.name for f in (root / "certs").iterdir()} == {CA_CERT, SERVER_CERT, SERVER_KEY}
    (ca_key,) = [f for f, owner in owners.items() if owner is None]
    assert ca_key.name == CA_KEY and ca_key.parent == root / "certs-ca"
    assert all(f.stat().st_mode & 0o077 == 0 for f in private) and ca_key.parent.stat().st_mode & 0o077 == 0


def test_trust_8_private_keys_reach_only_their_owner(layout):
    """No service of any compose file under docker/ sees a private key it does not own: nobody sees ca.key,
    only the SuperLink sees server.key, only supernode-<i> sees supernode-<i>.key (files or folders)."""
    root, owners = layout
    services = services_of(compose_files())
    assert leaks(services, root, owners) == set()
    seen = visible(services, root)
    for f, owner in owners.items():
        assert {n for n, files in seen.items() if f in files.values()} == ({owner} if owner else set()), f


def test_trust_8_the_check_catches_folder_mounts(layout):
    """The check above is not vacuous: the old folder mounts, a mount of the whole secrets tree or of the
    repository, a long-syntax bind mount and a compose secret are all reported."""
    root, owners = layout
    old = {"superlink": [("./secrets/certs", "/certs")], "register": [("./secrets/keys", "/keys")],
           "supernode-1": [("./secrets/keys/supernode-2.key", "/keys/supernode.key")],
           "supernode-2": [("..", "/src")], "supernode-3": [("./secrets", "/s")]}
    found = leaks(old, root, owners)
    keys = {f"keys/supernode-{i}.key" for i in (1, 2, 3)}
    assert {n for n, _ in found} == set(old) - {"superlink"}  # the SuperLink's own server.key is fine ...
    assert {k for n, k in found if n == "register"} == keys
    assert {k for n, k in found if n == "supernode-1"} == {"keys/supernode-2.key"}
    everything = {"certs/server.key", "certs-ca/ca.key"} | keys
    assert {k for n, k in found if n == "supernode-2"} == everything - {"keys/supernode-2.key"}
    assert {k for n, k in found if n == "supernode-3"} == everything - {"keys/supernode-3.key"}
    # ... but not a CA key left inside its mounted certs folder (the old layout)
    stray = root / "certs" / CA_KEY
    stray.write_bytes((root / "certs-ca" / CA_KEY).read_bytes())
    try:
        assert ("superlink", "certs/ca.key") in leaks(old, root, {**owners, stray: None})
    finally:
        stray.unlink()
    doc = {"secrets": {"ca": {"file": "./secrets/certs-ca/ca.key"}}}
    svc = {"volumes": [{"type": "bind", "source": "./secrets/keys", "target": "/k"}, "runs:/runs", "/anon"],
           "secrets": ["ca"]}
    assert leaks({"x": mount_sources(doc, svc)}, root, owners) == {("x", "certs-ca/ca.key")} | {("x", k) for k in keys}


def test_trust_8_each_service_sees_exactly_the_files_it_needs(layout):
    """SuperLink: ca.crt, server.pem, server.key, at the paths its --certs folder names; register: ca.crt and
    the public keys under the folder it registers; supernode-<i>: ca.crt and its own key at --key. All read-only."""
    root, _ = layout
    files = compose_files()
    seen = visible(services_of(files), root)
    doc = compose()
    parser = build_parser()
    certs, keys = root / "certs", root / "keys"
    nodes = sorted(n for n in doc["services"] if n.startswith("supernode-"))

    link = parser.parse_args(["superlink", *doc["services"]["superlink"]["command"]])
    assert seen["superlink"] == {f"{link.certs}/{n}": certs / n for n in (CA_CERT, SERVER_CERT, SERVER_KEY)}

    script = " ".join(doc["services"]["register"]["command"])
    ca = re.search(r"--ca (\S+)", script).group(1)
    folder = re.search(r"fedlora deploy register (\S+)", script).group(1)
    pubs = {f"{folder}/supernode-{i}.pub": keys / f"supernode-{i}.pub" for i in range(1, len(nodes) + 1)}
    assert seen["register"] == {ca: certs / CA_CERT, **pubs}

    for name in nodes:
        args = parser.parse_args(["supernode", *map(expand, doc["services"][name]["command"])])
        assert seen[name] == {str(args.ca): certs / CA_CERT, str(args.key): keys / f"{name}.key"}
    for f in files:  # every mount of a secret is read-only
        for name, svc in yaml.safe_load(f.read_text())["services"].items():
            for v in (svc or {}).get("volumes") or []:
                if isinstance(v, str) and in_layout(expand(v).split(":")[0], root) is not None:
                    assert expand(v).endswith(":ro"), f"{f.name}: {name}: {v}"


def test_trust_8_certs_writes_the_ca_key_outside_the_certs_folder(tmp_path, capsys):
    """`fedlora deploy certs DIR` leaves exactly the SuperLink's three files in DIR, writes ca.key (0600, the key
    that signed ca.crt) into DIR-ca/ (0700) or --ca-key-dir, says to keep it offline, and refuses a CA key
    folder inside DIR."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    d = tmp_path / "fed" / "certs"
    assert main(["certs", str(d), "--hosts", "localhost"]) == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(d)) == sorted([CA_CERT, SERVER_CERT, SERVER_KEY])
    ca_key = tmp_path / "fed" / "certs-ca" / CA_KEY
    assert ca_key.stat().st_mode & 0o077 == 0 and ca_key.parent.stat().st_mode & 0o077 == 0
    ca = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
    assert load_pem_private_key(ca_key.read_bytes(), None).public_key() == ca.public_key()
    assert str(ca_key) in out and "OFFLINE" in out and f"OUTSIDE {d}" in out

    other = tmp_path / "offline"
    assert main(["certs", str(tmp_path / "b"), "--ca-key-dir", str(other)]) == 0
    assert sorted(os.listdir(other)) == [CA_KEY] and CA_KEY not in os.listdir(tmp_path / "b")
    assert not (tmp_path / "b-ca").exists()
    c = tmp_path / "c"
    for inside in (c, c / "ca", c / "sub" / ".."):
        with pytest.raises(DeployError, match="inside"):
            main(["certs", str(c), "--ca-key-dir", str(inside)])
    assert not c.exists()  # refused before writing anything
    with pytest.raises(DeployError, match="--force"):  # the CA key is one of the files never silently replaced
        main(["certs", str(tmp_path / "d"), "--ca-key-dir", str(other)])


def test_trust_8_superlink_needs_no_ca_key_and_warns_about_one(tmp_path, capsys):
    """The SuperLink starts from the three files alone (the compose mounts); a ca.key left in its certs folder
    (the old layout) draws a warning from `certs --force` and `superlink`."""
    made = tmp_path / "certs"
    make_certs(made)
    view = tmp_path / "container-certs"  # what the SuperLink container's /certs holds
    view.mkdir()
    for n in (CA_CERT, SERVER_CERT, SERVER_KEY):
        (view / n).write_bytes((made / n).read_bytes())
    cmd = superlink_command(view)
    for flag, n in (("--ssl-ca-certfile", CA_CERT), ("--ssl-certfile", SERVER_CERT), ("--ssl-keyfile", SERVER_KEY)):
        assert cmd[cmd.index(flag) + 1] == str(view.resolve() / n)
    assert main(["superlink", "--certs", str(view), "--dry-run"]) == 0
    assert "WARNING" not in capsys.readouterr().err

    (made / CA_KEY).write_bytes((tmp_path / "certs-ca" / CA_KEY).read_bytes())  # the old layout
    assert main(["superlink", "--certs", str(made), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and str(made / CA_KEY) in err and "offline" in err
    assert main(["certs", str(made), "--force"]) == 0
    assert str(made / CA_KEY) in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_robust_9_images_install_exactly_the_declared_dependencies(name, tmp_path):
    """Each image's build reads its requirements from pyproject.toml: that snippet, run here, prints exactly
    [project].dependencies (a hand-written parse cut `flwr[simulation]` at its bracket), and the image refuses a
    base whose Python is older than the project's requires-python."""
    import sys
    import tomllib

    text = (DOCKER / name).read_text()
    (snippet,) = re.findall(r'python3? -c "(import tomllib[^"]*)"', text)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, check=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert out.stdout.split() == project["dependencies"]
    assert project["requires-python"] == ">=3.11"
    assert re.search(r"python3?:3\.1[1-9]|ubuntu24\.04|version_info >= \(3, 11\)", text), \
        f"{name}: its base must have Python >= 3.11, or the build must check it"
