"""What a measured number depends on beyond its settings, recorded beside it.

The same seeded world build gave different base models on two machines (an AMD EPYC and an
Intel Xeon with AVX-512: MKL and torch's vectorised kernels round differently, and 1,600
pre-training steps grow that into other categories and benchmark scores), so a number is only
reproducible with the library versions, the CPU's instruction set and the checksum of the world
it was measured on. `environment()` collects them for every report and world build.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["LIBRARIES", "cpu_model", "environment", "world_checksum"]

LIBRARIES = ("torch", "transformers", "tokenizers", "lightning", "safetensors", "numpy",
             "triton", "peft", "lm_eval")
# environment variables that change how torch and MKL compute on a CPU
_NUMERIC_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                      "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# what a build records about itself (times, the machine): not part of what the world is
_BUILD_RECORD = "build_info.json"


def world_checksum(folder: str | os.PathLike | None) -> str | None:
    """A digest of what a built world is: every file's SHA-256 from its `checksums.json`, but
    the build's own record (its timings and machine). Two builds share it when their weights,
    facts, tokenizer and benchmarks are bit-identical. None when `folder` holds no world."""
    if folder is None:
        return None
    try:
        sums = json.loads((Path(folder) / "checksums.json").read_text())
    except (OSError, ValueError):
        return None
    content = sorted((name, digest) for name, digest in sums.items() if name != _BUILD_RECORD)
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def environment(world: str | os.PathLike | None = None) -> dict[str, Any]:
    """Library versions, Python, the CPU and how torch computes on it, the thread count, the
    numeric environment variables set, and (given a world folder) the world's checksum."""
    import torch

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "libraries": versions,
        "cpu": cpu_model(),
        "cpu_capability": capability,
        "mkl": torch.backends.mkl.is_available(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "variables": {k: os.environ[k] for k in _NUMERIC_VARIABLES if k in os.environ},
    }
    if world is not None:
        info["world"] = {"path": str(world), "checksum": world_checksum(world)}
    return info
