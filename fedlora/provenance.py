"""Where a run's numbers were computed: the software versions and the CPU/GPU kernels that decide its float results.

Runs of one config and seed are bit-reproducible on one machine, but not across machines: torch picks CPU kernels
by instruction set (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512, ...), and a float-level difference
in one local step can grow over a run (measured on the drift preset, README "Reproducibility across machines").
So ``summary.json`` records :func:`environment`, ``fedlora compare`` shows its :func:`fingerprint` per run, and a
paired difference whose two runs carry different fingerprints is flagged (:func:`fedlora.report.mixed_machines`).
"""

from __future__ import annotations

import platform
from importlib import metadata

#: the packages whose versions can change a run's numbers
PACKAGES = ("torch", "flwr", "peft", "transformers", "opacus", "bitsandbytes")


def _version(pkg: str):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """The process's software and the kernels it computes with (JSON-ready): package versions, the CPU model and
    torch's CPU capability, and the CUDA device when there is one."""
    import torch

    return {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES},
            "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def fingerprint(env: dict | None) -> str:
    """What must match for two runs of one config and seed to be comparable bit for bit, in one short string
    ("" when unknown, as for runs written before summaries recorded it): the versions of the packages that compute
    the model (torch, transformers, peft), the CPU model and torch's CPU capability (BLAS libraries choose kernels by
    CPU vendor too), and the CUDA device."""
    if not env:
        return ""
    parts = [f"{p} {env.get(p)}" for p in ("torch", "transformers", "peft")]
    parts.append(f"{env.get('cpu')} ({env.get('cpu_capability')})")
    return ", ".join(parts + ([str(env["cuda_device"])] if env.get("cuda_device") else []))

