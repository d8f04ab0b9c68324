"""`python -m lora_lightning sweep --config <sweep file>`: the packing experiment's grid, every
cell `fit` then `test`, locally or on SLURM, then `aggregate`."""

from __future__ import annotations

from typing import Any, Literal

from lora_lightning.sweep import load_sweep

_FLAGS = ("--dry_run", "--extend", "--aggregate")


def sweep_argv(argv: list[str]) -> list[str]:
    """The command line as jsonargparse takes it: `--config FILE` names the sweep file (to
    jsonargparse, `--config` would be a file of this function's own arguments), and a bare
    `--dry_run` or `--extend` means true."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            arg = arg.replace("--config", "--config_file", 1)
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in _FLAGS and (following is None or following.startswith("--")):
            out.append("true")
    return out


def sweep_command(
    config_file: str,
    output: str | None = None,
    dry_run: bool = False,
    extend: bool = False,
    workers: int | None = None,
    launcher: Literal["local", "slurm"] | None = None,
    retries: int | None = None,
    aggregate: bool = True,
) -> dict[str, Any]:
    """Run every unfinished cell of a sweep file (`fit`, then `test`); then aggregate.

    Finished cells are skipped, interrupted ones resume from their last.ckpt, failed ones are
    retried.

    The sweep file is a base fit config plus axes whose product is the grid (see
    `lora_lightning.sweep.spec` and configs/sweeps/). Each cell runs in its own folder,
    `<output>/cells/<axis=value>__...`; the sweep folder records the sweep file it was made
    from and refuses another one unless `extend`.

    Args:
        config_file: The sweep file (`--config` on the command line).
        output: The sweep folder (default: the file's `output:`, else `sweeps/<file stem>`).
        dry_run: List the cells and check their settings; run nothing, build nothing.
        extend: Let a sweep folder made from another sweep file take this one's cells too.
        workers: Cells at once on this machine (default: the file's `workers:`, else 1),
            each on its own GPU or its own share of the CPU cores.
        launcher: "local" or "slurm" (default: the file's `launcher:`, else local).
        retries: Times a failed cell is tried again (default: the file's, else 1).
        aggregate: Write summary.csv, report.md and the plots at the end.

    Returns:
        Counts of the cells, the failed ones with their errors, and the files written.
    """
    sweep = load_sweep(config_file, output=output).with_run_settings(
        "sweep", workers, launcher, retries)
    from lora_lightning.sweep.runner import run_sweep

    return run_sweep(sweep, dry_run=dry_run, extend=extend, aggregate=aggregate)
