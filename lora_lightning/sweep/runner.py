"""A sweep from file to report: check every setting, prepare each cell's config, run the
cells that are not finished (local workers or SLURM), record their states, aggregate.

The steps a capacity search shares with a sweep (`sweep.capacity.runner`) are public here:
`check_configs`, `cell_settings`, `training_size`, `worker_slots` and `launch`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lora_lightning.files import atomic_write_text
from lora_lightning.mix import mix_size
from lora_lightning.sweep.cell import (
    DamagedReport,
    is_done,
    read_report,
    read_status,
    repair_status,
)
from lora_lightning.sweep.cellconfig import FitConfigParser, cell_loggers, has_run_logger
from lora_lightning.sweep.folder import cell_dir, claim_folder, write_cell
from lora_lightning.sweep.progress import SweepProgress, duration
from lora_lightning.sweep.shared import shared_settings, world_settings
from lora_lightning.sweep.spec import Cell, Sweep

__all__ = [
    "BEFORE_SCORES", "CELLS_INDEX", "cell_configs", "cell_settings", "check_configs", "describe",
    "launch", "own_settings", "run_sweep", "training_size", "worker_slots",
]

BEFORE_SCORES = "before_scores.json"
CELLS_INDEX = "cells.json"


def own_settings(sweep: Sweep, cell: Cell, folder: Path, logger: Any) -> dict[str, Any]:
    """The keys the sweep sets for each cell: its run folder (where `--ckpt_path last` looks),
    checkpoints, adapter, report, the base scores every cell shares, and the base config's
    loggers told the sweep's and the cell's names (`cell_loggers`)."""
    own = {
        "trainer.logger": cell_loggers(logger, sweep.output.name, cell.name, cell.labels,
                                       folder),
        "checkpoint.dirpath": str(folder / "checkpoints"),
        "save_adapter.dirpath": str(folder / "adapter"),
        "report.report_dir": str(folder / "test" / "report"),
        "report.before_scores": str(sweep.output / BEFORE_SCORES),
    }
    if not has_run_logger(logger):  # the run folder's logger is added in default_root_dir
        own["trainer.default_root_dir"] = str(folder)
    return own


def cell_settings(sweep: Sweep, cell: Cell, shared: dict[str, Any],
                  logger: Any) -> dict[str, Any]:
    """Every key a cell's config sets on the base config, later ones winning: the sweep's
    overrides, what is `shared`, the cell's own axis values, and the keys the sweep controls
    (`own_settings`, with `logger` the base config's loggers). A cell resumes from the
    last.ckpt `fit` writes after every epoch (`RunCheckpoint`), its one checkpoint."""
    return {**sweep.overrides, **shared, **cell.settings,
            **own_settings(sweep, cell, cell_dir(sweep, cell), logger)}


def check_configs(sweep: Sweep, parser: FitConfigParser, shared: dict[str, Any]) -> Any:
    """Parse the base, then the overrides, then every axis value on top of them, and check
    each as `fit` would before loading anything (`FitConfigParser.check`), so an error names
    the part of the sweep file that caused it; return the parsed overrides config.

    The model path is checked unless the sweep runs on a world (built on first use, and only
    named by a dry run), as is `categorize.model` where the file sets one.
    """
    model_path = not sweep.world
    try:
        config = parser.parse(sweep.base, {})
    except ValueError as exc:
        raise sweep.error("base", f"{sweep.base} is not a valid fit config: {exc}") from exc
    common = {**sweep.overrides, **shared}
    try:
        config = parser.parse(sweep.base, common)
        parser.check(config, model_path)
    except ValueError as exc:
        raise sweep.error(_culprit(sweep, parser, shared, str(exc)), str(exc)) from exc
    for axis in sweep.axes:
        for label, setting in zip(axis.labels, axis.settings, strict=True):
            try:
                parser.check(parser.parse(sweep.base, {**common, **setting}), model_path)
            except ValueError as exc:
                raise sweep.error(f"axes.{axis.name}.{label}", str(exc)) from exc
    model = (sweep.categorize or {}).get("model")
    if isinstance(model, str):
        from lora_lightning.models import check_model_path

        try:
            check_model_path(model, "categorize.model")
        except OSError as exc:
            raise sweep.error("categorize.model", str(exc)) from exc
    return config


def _culprit(sweep: Sweep, parser: FitConfigParser, shared: dict[str, Any], error: str) -> str:
    """The part of the sweep file a refusal of its base config with its overrides comes from:
    `base` when the base alone is refused so too, else `overrides`."""
    if not sweep.overrides:
        return "base"
    try:
        parser.check(parser.parse(sweep.base, shared), not sweep.world)
    except ValueError as exc:
        return "base" if str(exc) == error else "overrides"
    return "overrides"


def cell_configs(sweep: Sweep, parser: FitConfigParser, cells: list[Cell],
                 shared: dict[str, Any], logger: Any) -> list[Any]:
    """Each cell's parsed config (`cell_settings`), checked as `fit` would before loading
    anything: a value may be refused only beside another axis' value (data.extra_kind none
    with data.extra_per_unknown 1), so every cell is checked before any is launched."""
    configs = []
    for cell in cells:
        try:
            config = parser.parse(sweep.base, cell_settings(sweep, cell, shared, logger))
            parser.check(config, model_path=False)  # checked per axis value already
        except ValueError as exc:
            raise sweep.error(f"axes (cell {cell.name})", str(exc)) from exc
        configs.append(config)
    return configs


def describe(sweep: Sweep, cells: list[Cell], shared: dict[str, Any]) -> str:
    """The dry run's listing: the grid, what every cell shares, and each cell's settings."""
    sizes = " x ".join(f"{a.name} {len(a.labels)}" for a in sweep.axes)
    lines = [
        f"sweep file {sweep.path}: {len(cells)} cells ({sizes}); launcher {sweep.launcher}"
        + (f", {sweep.workers} worker{'s' * (sweep.workers > 1)}"
           if sweep.launcher == "local" else ""),
        f"sweep folder: {sweep.output}",
        f"base config: {sweep.base or '(the embedded default)'}",
    ]
    common = {**sweep.overrides, **shared}
    if sweep.world:
        lines.append(f"world: {sweep.world} (unpacked or built on first use, not by a dry run)")
    if sweep.categorize is not None:
        lines.append("categorize: once, into the sweep folder, before the first cell")
    if common:
        lines.append("every cell: " + " ".join(f"{k}={v}" for k, v in common.items()))
    width = max(len(c.name) for c in cells)
    for i, cell in enumerate(cells, 1):
        shown = " ".join(f"{k}={v}" for k, v in cell.settings.items())
        state = ""
        if is_done(cell_dir(sweep, cell)):
            state = "  [done]"
        elif read_status(cell_dir(sweep, cell)).get("state"):
            state = f"  [{read_status(cell_dir(sweep, cell))['state']}]"
        lines.append(f"{i:4d}  {cell.name:<{width}}  {shown}{state}")
    return "\n".join(lines)


def training_size(config: Any) -> int:
    """Training examples x epochs of a cell's fit config (0 where the config does not say):
    what orders the cells, longest first."""
    data, trainer = getattr(config, "data", None), getattr(config, "trainer", None)
    size = mix_size(getattr(data, "n_unknown", None), getattr(data, "extra_per_unknown", None),
                    getattr(data, "extra_kind", None))
    epochs = getattr(trainer, "max_epochs", None) or 1
    return int(size * max(1, epochs))


def _write_index(sweep: Sweep, cells: list[Cell]) -> list[dict[str, Any]]:
    index = []
    for cell in cells:
        status = read_status(cell_dir(sweep, cell))
        # a cell is done when its report is whole, whatever its status.json says (torn, or
        # "done" beside a report found damaged since)
        state = status.get("state", "pending")
        if is_done(cell_dir(sweep, cell)):
            state = "done"
        elif state == "done":
            state = "pending"
        index.append({
            "cell": cell.name, "labels": cell.labels, "state": state,
            "attempts": status.get("attempts", 0), "error": status.get("error"),
        })
    atomic_write_text(sweep.output / CELLS_INDEX, json.dumps(index, indent=1))
    return index


def run_sweep(
    sweep: Sweep,
    dry_run: bool = False,
    extend: bool = False,
    aggregate: bool = True,
) -> dict[str, Any]:
    """Run every unfinished cell of `sweep` and aggregate; see `commands.sweep`."""
    cells = sweep.cells()
    parser = FitConfigParser()
    if dry_run:
        shared = world_settings(sweep.world, dry_run=True) if sweep.world else {}
        config = check_configs(sweep, parser, shared)
        cell_configs(sweep, parser, cells, shared, config.trainer.logger)
        worker_slots(sweep)
        print(describe(sweep, cells, shared), flush=True)
        return {"cells": [c.name for c in cells], "dry_run": True}

    start = time.monotonic()
    # Every setting is checked before the folder is made or anything is built, so a typo
    # leaves nothing behind; then again with the world's or the categorised facts' real paths.
    placeholders = world_settings(sweep.world, dry_run=True) if sweep.world else {}
    config = check_configs(sweep, parser, placeholders)
    base_logger = config.trainer.logger  # the base config's, before any cell's are set
    configs = cell_configs(sweep, parser, cells, placeholders, base_logger)
    slots = worker_slots(sweep)
    claim_folder(sweep, extend=extend)
    shared = shared_settings(sweep, config)
    if shared != placeholders:  # the real paths of what was only named so far
        check_configs(sweep, parser, shared)
        configs = cell_configs(sweep, parser, cells, shared, base_logger)

    jobs = []
    for cell, config in zip(cells, configs, strict=True):
        folder = cell_dir(sweep, cell)
        write_cell(sweep, cell, folder, parser.dump(config))
        jobs.append((cell.name, folder, training_size(config)))
        note = repair_status(folder)
        if note:
            print(f"sweep: {cell.name}: {note}", flush=True)

    # Longest first: a long cell started last keeps one worker busy while the others idle (the
    # bench-world grid lost 9 of its 54 minutes so, its n = 1000 cells coming last).
    pending = [(n, d) for n, d, _ in sorted(jobs, key=lambda job: -job[2])
               if not is_done(d)]
    for name, folder in pending:
        try:
            read_report(folder)
        except DamagedReport as damaged:  # `run_cell` sets it aside
            print(f"sweep: {name}: {damaged}; set aside, its test runs again", flush=True)
    progress = SweepProgress(len(jobs), len(jobs) - len(pending),
                             min(sweep.parallel, len(pending) or 1))
    progress.show(f"{len(pending)} to run ({sweep.launcher} launcher) in {sweep.output}")
    results: dict[str, dict[str, Any]] = {}
    if pending and sweep.launcher == "slurm":
        results = launch(sweep, pending, slots, progress)
    elif pending:
        if len(slots) > 1:
            print("sweep: " + "; ".join(s.describe() for s in slots), flush=True)
        try:
            results = launch(sweep, pending, slots, progress)
        except KeyboardInterrupt:
            _write_index(sweep, cells)  # the stopped cells recorded as interrupted
            raise
    index = _write_index(sweep, cells)
    failed = {c["cell"]: c["error"] for c in index if c["state"] == "failed"}
    done = sum(c["state"] == "done" for c in index)
    print(f"sweep: {done}/{len(cells)} cells done, {len(failed)} failed, "
          f"{len(results)} run now, in {duration(time.monotonic() - start)}", flush=True)
    for name, error in failed.items():
        print(f"  failed: {name}: {error}", flush=True)
    summary: dict[str, Any] = {"cells": len(cells), "done": done, "failed": failed,
                               "ran": sorted(results), "folder": str(sweep.output)}
    if aggregate and done:
        from lora_lightning.sweep.aggregate import aggregate_sweep

        written = aggregate_sweep(sweep.output)
        summary["aggregate"] = {k: str(v) for k, v in written.items()}
        print(f"sweep: tables in {written['summary']} and {written['report']}", flush=True)
    return summary


def worker_slots(sweep: Sweep) -> list[Any]:
    """The local workers' shares (checked before any folder is made: `--workers 3` on two
    cores is refused in the first second). Shares follow `workers`, not how many cells are
    left, so a cell gets the same cores and thread count (and so the same numbers) whether it
    runs first or alone on a rerun. None for SLURM."""
    if sweep.launcher != "local":
        return []
    from lora_lightning.sweep.local import local_slots

    return local_slots(sweep.workers)


def launch(sweep: Sweep, pending: list[tuple[str, Path]], slots: list[Any],
           progress: SweepProgress) -> dict[str, dict[str, Any]]:
    """Run the `pending` cells (name, folder) on the sweep's launcher, as one SLURM job array
    or on the local workers' `slots`, each retried `sweep.retries` times; their final
    statuses by name."""
    if sweep.launcher == "slurm":
        from lora_lightning.sweep.slurm import run_slurm

        return run_slurm(sweep, pending, Path.cwd(), sweep.retries, progress)
    from lora_lightning.sweep.local import run_local

    return run_local(pending, slots, Path.cwd(), sweep.retries, progress)
