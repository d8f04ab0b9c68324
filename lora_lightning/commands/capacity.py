"""`python -m lora_lightning capacity --config <capacity file>`: how many new facts a LoRA
adapter holds, per adapter variant (rank, target modules), and what it breaks by then."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from lora_lightning.sweep.capacity.search import load_capacity


def capacity_command(
    config_file: str,
    output: str | None = None,
    dry_run: bool = False,
    workers: int | None = None,
    launcher: Literal["local", "slurm"] | None = None,
    retries: int | None = None,
    aggregate: bool = True,
    extend: bool = False,
) -> dict[str, Any]:
    """Find n* per adapter variant: the most new facts it learns at reliability >= tau.

    n* is the largest number of Unknown facts a variant (and seed) learns with reliability at
    least the threshold tau (search.threshold, default 0.95).

    The capacity file is a sweep file (base config, world or categorize, overrides, launcher,
    workers, slurm) with `variants` (labels to settings), `mix` (default +0), `seeds` and
    `search` (threshold, n_start, n_max, growth, precision, confidence) instead of axes; see
    `lora_lightning.sweep.capacity.search` and configs/capacity/. n grows geometrically until
    a probe (a `fit` on n facts) falls below the threshold, then is bisected; `test` runs at
    both ends of each bracket. A rerun continues the searches from the probes on disk.

    Args:
        config_file: The capacity file (`--config` on the command line).
        output: The capacity folder (default: the file's `output:`, else
            `capacity/<file stem>`).
        dry_run: List the chains (variant x seed) and their next probes; run nothing.
        workers: Probes at once on this machine (default: the file's `workers:`, else 1).
        launcher: "local" or "slurm" (default: the file's `launcher:`, else local).
        retries: Times a failed probe is tried again (default: the file's, else 1).
        aggregate: Write capacity.csv, report.md and the plots at the end.
        extend: Let a capacity folder made from another capacity file take this one's
            chains too (add a seed or a variant to a finished run: its probes are reused,
            and refused, naming the keys, where their settings are not this file's).

    Returns:
        The chains, the rounds of probes run and the files written.
    """
    capacity = load_capacity(config_file, output=output)
    capacity = replace(capacity, sweep=capacity.sweep.with_run_settings(
        "capacity", workers, launcher, retries))
    from lora_lightning.sweep.capacity.runner import run_capacity

    return run_capacity(capacity, dry_run=dry_run, aggregate=aggregate, extend=extend)
