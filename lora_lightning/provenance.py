"""What a measured number depends on beyond its settings, recorded beside it.

The same seeded world build gave different base models on two machines (an AMD EPYC and an
Intel Xeon with AVX-512: MKL and torch's vectorised kernels round differently, and 1,600
pre-training steps grow that into other categories and benchmark scores), so a number is only
reproducible with the library versions, the CPU's instruction set and the checksum of the world
it was measured on. `environment()` collects them for every report and world build;
`PROVENANCE_FILE` gathers them over a results folder's cells, beside its tables (written by
`lora_lightning.sweep.aggregate.write_provenance`, checked by `provenance_problems`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["LIBRARIES", "PROVENANCE_FILE", "PROVENANCE_KEYS", "THREAD_KINDS", "cpu_model",
           "environment", "provenance_problems", "world_checksum"]

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

    versions: dict[str, str | None] = {}
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


PROVENANCE_FILE = "provenance.json"

# Every key a provenance file has, and the shape of its value where it is known. A value that
# is not known is null, and the "missing" list names it ("key: why", or "key.part: why" for a
# part of a mapping): never a guess. Lists hold the distinct values found over the cells.
PROVENANCE_KEYS: dict[str, str] = {
    "source": "text",  # "cells", or "reconstructed from the published text: <files>"
    "cells": "count",  # cells whose files were read (null: reconstructed)
    "commands": "texts",  # the command lines that made the folder
    "command_files": "files",  # [{"path", "sha256"}]: the sweep or capacity file(s)
    "libraries": "versions",  # {library: [versions]}
    "python": "texts",
    "cpu": "texts",
    "cpu_capability": "texts",  # how torch computes on the CPU (e.g. AVX512)
    "threads": "thread counts",  # {"torch", "launcher", "config", "categorize": [counts]}
    "numeric_variables": "texts",  # "NAME=value" of the variables that change CPU numerics
    "world_checksum": "texts",
    "facts": "texts",  # the fact file(s) the cells trained and tested on
    "facts_sha256": "texts",
    "model": "texts",
    "model_checksum": "texts",  # SHA-256 of the base's weights as loaded
    "aggregated_on": "environment",  # `environment()` of the process that wrote the tables
    "missing": "texts",
    "notes": "texts",
}
THREAD_KINDS = ("torch", "launcher", "config", "categorize")


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _counts(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _shape_ok(shape: str, value: Any) -> bool:
    if shape == "text":
        return isinstance(value, str) and bool(value)
    if shape == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if shape == "texts":
        return _texts(value)
    if shape == "files":
        return isinstance(value, list) and all(
            isinstance(f, dict) and isinstance(f.get("path"), str)
            and (f.get("sha256") is None or isinstance(f["sha256"], str)) for f in value)
    if shape == "versions":
        return isinstance(value, dict) and all(v is None or _texts(v) for v in value.values())
    if shape == "thread counts":
        return isinstance(value, dict) and set(value) == set(THREAD_KINDS) and all(
            v is None or _counts(v) for v in value.values())
    return isinstance(value, dict)  # "environment": `environment()`'s own shape


def provenance_problems(record: Any) -> list[str]:
    """What makes `record` not a provenance file: a key absent or of another shape, or a null
    (top-level, or a library's version or a thread count) that "missing" does not name.
    Empty for a good one."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems = [f"{key}: absent" for key in PROVENANCE_KEYS if key not in record]
    problems += [f"{key}: not a key of a provenance file" for key in record
                 if key not in PROVENANCE_KEYS]
    missing = record.get("missing")
    if not _texts(missing):
        return [*problems, "missing: must be a list of texts (empty when nothing is missing)"]
    named = {m.split(":", 1)[0].strip() for m in missing or []}
    for key, shape in PROVENANCE_KEYS.items():
        value = record.get(key)
        if key not in record:
            continue
        if value is None:
            if key not in named:
                problems.append(f"{key}: null, and \"missing\" does not say why")
        elif not _shape_ok(shape, value):
            problems.append(f"{key}: {value!r} is not {shape}")
        elif shape in ("versions", "thread counts"):
            problems += [f"{key}.{part}: null, and \"missing\" does not say why"
                         for part, v in value.items()
                         if v is None and f"{key}.{part}" not in named and key not in named]
    return problems
