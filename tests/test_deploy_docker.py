"""The Docker files, checked without a Docker engine: each Dockerfile has the instructions a deployment needs
(pinned base from a build argument, dependencies baked in, no run-time installs, non-root user, exec-form
`fedlora deploy ...` entry point whose default arguments parse and are secure), secrets never enter a build
context, and the compose rehearsal is consistent (its commands parse with `fedlora deploy`'s own parser: TLS,
registered keys, one partition per node). `docker compose config` runs where the compose plugin exists."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from fedlora.deploy.cli import build_parser
from fedlora.deploy.commands import profiles

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
    assert "./secrets/certs:/certs:ro" in link["volumes"]
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
