"""The sweep folder: which sweep file made it, its cells, and nothing mixed in by accident.

`<output>/sweep.json` records the sweep file (path and fingerprint) the folder was made from
and `<output>/sweep.yaml` keeps a copy of it. Running a different sweep file on the folder is
refused, since its cells would silently mix with the others in every table, unless it is asked
for with `--extend` (then the new file is recorded beside the first). A cell folder that exists
already must hold the same config the sweep would write now.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from lora_lightning.files import atomic_write_text
from lora_lightning.sweep.cell import CELL_CONFIG, CELL_INFO
from lora_lightning.sweep.spec import Cell, Sweep

__all__ = [
    "CELLS_DIR", "RECORD", "cell_dir", "cell_dirs", "check_cell", "claim_folder", "read_record",
    "write_cell",
]

RECORD = "sweep.json"
CELLS_DIR = "cells"
_MEASURED = ("base", "world", "overrides", "axes", "categorize")
# Keys of a cell's config that say how often its checkpoints are kept, not what it trains or
# measures: older sweeps set them (a second copy of last.ckpt each epoch); a cell made so is
# the same run, and its config is written anew.
_BOOKKEEPING = ("checkpoint.save_top_k", "checkpoint.every_n_epochs")


def cell_dir(sweep: Sweep, cell: Cell) -> Path:
    """Where a cell runs: `<output>/cells/<cell name>` (a capacity probe is a cell too)."""
    return sweep.output / CELLS_DIR / cell.name


def read_record(sweep_dir: Path) -> dict[str, Any]:
    """The folder's `sweep.json`, or a one-line error naming it when it cannot be read."""
    path = Path(sweep_dir) / RECORD
    try:
        record = json.loads(path.read_text())
        record["sweeps"][0]["fingerprint"]  # noqa: B018 (what every record has)
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); restore it from "
                         "sweep.yaml's sweep, or choose another --output") from err
    return record


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in _MEASURED if old.get(k) != new.get(k)] or ["the base config's content"]


def claim_folder(sweep: Sweep, extend: bool = False) -> dict[str, Any]:
    """Make or reopen the sweep folder for `sweep`; refuse one made by another sweep file."""
    out = sweep.output
    record_path = out / RECORD
    fingerprint = sweep.fingerprint()
    entry = {"file": str(sweep.path), "fingerprint": fingerprint, "raw": sweep.raw,
             "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if record_path.is_file():
        record = read_record(out)
        known = [s["fingerprint"] for s in record["sweeps"]]
        if fingerprint in known:
            return record
        if not extend:
            first = record["sweeps"][0]
            raise sweep.error(
                "output", f"the sweep folder {out} was made from sweep file {first['file']}, "
                f"a different sweep ({', '.join(_differences(first['raw'], sweep.raw))} "
                "differ); choose another --output, or pass --extend true to add this sweep's "
                "cells to that folder"
            )
        shutil.copyfile(sweep.path, out / f"sweep.{len(known)}.yaml")
        record["sweeps"].append({**entry, "extends": True})
    else:
        if (out / CELLS_DIR).is_dir() and any((out / CELLS_DIR).iterdir()) and not extend:
            raise sweep.error("output", f"{out} holds cells but no {RECORD}: not made by a "
                              "sweep (pass --extend true to use it anyway)")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sweep.path, out / "sweep.yaml")
        record = {"sweeps": [entry]}
    atomic_write_text(record_path, json.dumps(record, indent=1, default=str))
    return record


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _rebased(config: dict[str, Any], sweep_dir: Path) -> dict[str, Any]:
    """A cell's config with the paths inside the sweep folder it was written in (found from
    `report.before_scores`, which every cell has there) moved to `sweep_dir`: a sweep folder
    that was moved or copied holds the same cells, at new paths."""
    scores = (config.get("report") or {}).get("before_scores")
    if not isinstance(scores, str):
        return config
    old, new = str(Path(scores).parent), str(sweep_dir)

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
            return new + value[len(old):]
        return value

    return move(config) if old != new else config


def check_cell(sweep: Sweep, cell: Cell, cell_dir: Path, config_yaml: str) -> bool:
    """Refuse a cell folder that holds a run with other settings than `config_yaml` (one line
    naming the keys that differ). True when nothing is held yet, or the same run is held in a
    sweep folder moved or copied elsewhere (or with other checkpoint bookkeeping): its config
    is then to be written anew."""
    path = cell_dir / CELL_CONFIG
    text = path.read_text() if path.is_file() else None
    try:
        held = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        held = None  # damaged: written again
    if not isinstance(held, dict):
        return True
    if text == config_yaml:
        return False
    old, new = _flat(_rebased(held, sweep.output)), _flat(yaml.safe_load(config_yaml))
    diff = sorted(k for k in old.keys() | new.keys()
                  if old.get(k) != new.get(k) and k not in _BOOKKEEPING)
    if diff:
        raise sweep.error(
            f"axes (cell {cell.name})", f"{cell_dir} holds a run with other settings "
            f"({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}); move it away or "
            "choose another --output"
        )
    return True


def write_cell(
    sweep: Sweep, cell: Cell, cell_dir: Path, config_yaml: str,
    stages: list[str] | None = None,
) -> None:
    """Write the cell's config and description, or check that those already there agree (in a
    moved sweep folder, up to the folder's own paths, which are then written anew). `stages`
    (e.g. `["fit"]`: a `capacity` probe) is recorded in `cell.json` for `run_cell`, and may
    grow later (the probe's full `test`)."""
    rewrite = check_cell(sweep, cell, cell_dir, config_yaml)
    cell_dir.mkdir(parents=True, exist_ok=True)
    if rewrite:
        atomic_write_text(cell_dir / CELL_CONFIG, config_yaml)
    info = {"name": cell.name, "labels": cell.labels, "axes": cell.axes,
            "sweep_file": str(sweep.path), "sweep_fingerprint": sweep.fingerprint()}
    if stages is not None:
        info["stages"] = list(stages)
    try:
        held_info = json.loads((cell_dir / CELL_INFO).read_text())
        held_info["name"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged
        atomic_write_text(cell_dir / CELL_INFO, json.dumps(info, indent=1, default=str))
        return
    if stages is not None and held_info.get("stages") != list(stages):
        held_info["stages"] = list(stages)
        atomic_write_text(cell_dir / CELL_INFO, json.dumps(held_info, indent=1, default=str))


def cell_dirs(sweep_dir: Path) -> list[Path]:
    """Every cell folder of a sweep folder (of every sweep file that extended it)."""
    root = Path(sweep_dir) / CELLS_DIR
    return sorted(p for p in root.iterdir() if (p / CELL_INFO).is_file()) if root.is_dir() else []
