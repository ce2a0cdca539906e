"""Hardware profiles: ``conf/client`` profiles, loading, detection of this machine, assignment to clients.

A profile is a mapping with the keys of :data:`PROFILE_KEYS` (units in docs/fedpipe.md, "Hardware profiles").
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from pathlib import Path

import torch

from fedlora.config import CONF_DIR

GiB = 2**30
PROFILE_KEYS = ("name", "memory_gb", "bf16_tflops", "mem_bandwidth_gbs", "uplink_mbps", "downlink_mbps", "device")
#: the keys of :data:`PROFILE_KEYS` that are finite positive numbers, and the devices a profile may name
POSITIVE_KEYS = ("memory_gb", "bf16_tflops", "mem_bandwidth_gbs", "uplink_mbps", "downlink_mbps")
DEVICES = ("cpu", "cuda")
CONF_CLIENT_DIR = CONF_DIR / "client"


def known_profiles() -> list[str]:
    """Every name :func:`load_profile` accepts: the files of ``conf/client`` (``mixed`` is a mix, not a profile)."""
    return sorted(p.stem for p in CONF_CLIENT_DIR.glob("*.yaml"))


def _positive(value) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


def check_profile(prof: Mapping) -> str | None:
    """``None`` when ``prof`` is a usable hardware profile: every key of :data:`PROFILE_KEYS`, a non-empty
    ``name``, a ``device`` of :data:`DEVICES`, finite positive numbers (and ``mfu`` in (0, 1], ``cores`` a
    positive integer when given); else one sentence saying what is wrong."""
    missing = [k for k in PROFILE_KEYS if k not in prof]
    if missing:
        return f"profile {prof.get('name')!r} lacks {missing}"
    name = prof["name"]
    if not isinstance(name, str) or not name:
        return f"profile name {name!r} is not a non-empty string"
    if prof["device"] not in DEVICES:
        return f"profile {name!r}: device {prof['device']!r} is not one of {list(DEVICES)}"
    bad = [k for k in POSITIVE_KEYS if not _positive(prof[k])]
    if bad:
        return f"profile {name!r}: {bad[0]}={prof[bad[0]]!r} is not a finite positive number"
    if "mfu" in prof and not (_positive(prof["mfu"]) and prof["mfu"] <= 1):
        return f"profile {name!r}: mfu={prof['mfu']!r} is not in (0, 1]"
    if "cores" in prof and not (_positive(prof["cores"]) and int(prof["cores"]) == prof["cores"]):
        return f"profile {name!r}: cores={prof['cores']!r} is not a positive integer"
    return None


def load_profile(profile: str | Mapping) -> dict:
    """A profile dict from a name in ``conf/client`` (``"rtx3060_12gb"``; no other file is ever read) or a
    mapping, checked by :func:`check_profile` (``KeyError``: unknown name; ``ValueError``: a bad profile)."""
    if isinstance(profile, str):
        known = known_profiles()
        if profile not in known:
            raise KeyError(f"unknown client profile {profile!r}; known: {known}")
        import yaml

        data = yaml.safe_load((CONF_CLIENT_DIR / f"{profile}.yaml").read_text())
        if "defaults" in data:  # default.yaml points at another profile
            for entry in data["defaults"]:
                if isinstance(entry, str) and entry != "_self_":
                    base = load_profile(entry.split("@")[0].split("/")[-1])
                    base.update({k: v for k, v in data.items() if k != "defaults"})
                    data = base
        profile = data
    prof = dict(profile)
    if "mix" in prof:
        return prof
    reason = check_profile(prof)
    if reason:
        raise ValueError(reason)
    return prof


def node_profile(reported: str) -> dict:
    """The profile a node reported at the handshake: a name of :func:`list_profiles` (or ``default``), or a JSON
    profile (``profile=detect``). ``ValueError``, one sentence, for anything else."""
    if reported.lstrip().startswith("{"):
        import json

        try:
            prof = json.loads(reported)
        except ValueError:
            raise ValueError("its JSON profile does not parse") from None
        if not isinstance(prof, dict):
            raise ValueError("its JSON profile is not an object")
        reason = check_profile(prof)
        if reason:
            raise ValueError(f"its JSON {reason}")
        return prof
    names = [*list_profiles(), "default"]
    if reported not in names:
        raise ValueError(f"its profile {reported[:80]!r} is not one of {sorted(names)}")
    return load_profile(reported)


def list_profiles() -> list[str]:
    return sorted(p.stem for p in CONF_CLIENT_DIR.glob("*.yaml") if p.stem not in ("default", "mixed"))


# Which public profile a detected CUDA device name most likely is (for its compute / bandwidth figures).
_DEVICE_MATCH = (
    ("A100", "a100_80gb"), ("4090", "rtx4090_24gb"), ("3060", "rtx3060_12gb"), ("L4", "l4_24gb"),
    ("T4", "t4_16gb"), ("AGX Orin", "jetson_agx_orin_64gb"), ("Orin NX", "jetson_orin_nx_16gb"),
    ("Orin Nano", "jetson_orin_nano_8gb"), ("Orin", "jetson_orin_nano_8gb"),
)


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def detect_profile() -> dict:
    """Profile of this machine. CUDA: free device memory (``torch.cuda.mem_get_info``) and the device name;
    compute / bandwidth figures come from the matching ``conf/client`` profile when the name matches one,
    else conservative guesses (``estimated: True``). CPU: ``MemAvailable`` RAM and the usable cores, with the
    ``cpu`` profile's per-core figures scaled by the core count. Link speeds cannot be measured offline: they
    are the matched (or ``cpu``) profile's."""
    cpu = load_profile("cpu")
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        dev_name = torch.cuda.get_device_name(0)
        match = next((p for key, p in _DEVICE_MATCH if key.lower() in dev_name.lower()), None)
        base = load_profile(match) if match else dict(cpu, bf16_tflops=10.0, mem_bandwidth_gbs=300.0)
        prof = dict(base, name=f"detected:{dev_name}", memory_gb=free / GiB, device="cuda",
                    estimated=match is None, matched=match)
        return prof
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    scale = cores / float(cpu.get("cores", 2))
    return dict(cpu, name=f"detected:cpu{cores}", memory_gb=_cpu_available_bytes() / GiB,
                bf16_tflops=cpu["bf16_tflops"] * scale, cores=cores, device="cpu", estimated=True)


def assign_profiles(num_clients: int, list_or_mix, seed: int = 0) -> list[dict]:
    """Profiles for ``num_clients`` clients.

    ``list_or_mix``: a list of profile names / mappings (cycled if shorter than ``num_clients``), a mix
    mapping ``{profile: fraction}`` (or a mapping with a ``mix`` key, or ``"mixed"`` for
    ``conf/client/mixed.yaml``), or a single profile name. A mix is apportioned by largest remainders (counts
    sum to ``num_clients``, ties by name) and the order shuffled with ``seed``. Each returned dict is a copy
    with ``client_id`` (0..num_clients-1) added.
    """
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    spec = list_or_mix
    if isinstance(spec, str):
        spec = load_profile(spec)
        if "mix" not in spec:
            spec = [spec]
    if isinstance(spec, Mapping) and "mix" in spec:
        spec = spec["mix"]
    if isinstance(spec, Mapping):
        fracs = {str(k): float(v) for k, v in spec.items()}
        if any(v < 0 for v in fracs.values()) or sum(fracs.values()) <= 0:
            raise ValueError(f"bad mix {fracs}")
        total = sum(fracs.values())
        exact = {k: num_clients * v / total for k, v in fracs.items()}
        counts = {k: int(math.floor(v)) for k, v in exact.items()}
        left = num_clients - sum(counts.values())
        for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), k))[:left]:
            counts[k] += 1
        names = [k for k in sorted(counts) for _ in range(counts[k])]
        random.Random(seed).shuffle(names)
        profiles = [load_profile(n) for n in names]
    else:
        items = list(spec)
        if not items:
            raise ValueError("empty profile list")
        profiles = [load_profile(items[i % len(items)]) for i in range(num_clients)]
    return [dict(p, client_id=i) for i, p in enumerate(profiles)]
