"""Running a capacity search: rounds of probes on the sweep's launchers, then the full `test`
at each chain's bracket, then the tables (`capacity_report`).

Each round takes the next probe of every unfinished chain (variant x seed) and runs them
together, `workers` at once locally or as one SLURM job array; a chain's probes depend on each
other, the chains do not. What a round decides is read back from the probe folders, so a rerun
after a kill continues every search from the probes on disk.
"""

from __future__ import annotations

import time
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

from lora_lightning.sweep.capacity import (
    N_KEY,
    NO_PROBE,
    PROBE_KEY,
    Capacity,
    epochs_for,
    probe_cell,
    search_state,
    tested,
    write_state,
)
from lora_lightning.sweep.cellconfig import FitConfigParser
from lora_lightning.sweep.folder import check_cell, claim_folder, write_cell
from lora_lightning.sweep.progress import SweepProgress, duration
from lora_lightning.sweep.runner import (
    CHECKPOINT_EVERY_EPOCH,
    _cell_dir,
    _launch_once,
    _local_slots,
    _model_of,
    _own_settings,
    check_configs,
    training_size,
)
from lora_lightning.sweep.shared import categorized_settings, world_settings

__all__ = ["describe_capacity", "run_capacity"]


def describe_capacity(capacity: Capacity, shared: dict[str, Any]) -> str:
    """The dry run's listing: the search, what every probe shares, each chain's settings and
    where its search stands (its next probe: the first, on a new folder)."""
    sweep, rule = capacity.sweep, capacity.rule
    chains = capacity.chains()
    lines = [
        f"capacity file {sweep.path}: {len(chains)} chains (variant {len(sweep.axes[0].labels)}"
        f" x seed {len(sweep.axes[1].labels)}); launcher {sweep.launcher}"
        + (f", {sweep.workers} worker{'s' * (sweep.workers > 1)}"
           if sweep.launcher == "local" else ""),
        f"folder: {sweep.output}",
        f"base config: {sweep.base or '(the embedded default)'}",
        f"search: n* = the largest n with reliability >= {rule.threshold:g}; n from "
        f"{rule.n_start} x{rule.growth:g} up to {rule.n_max or 'the Unknown facts available'}, "
        f"then bisection to {rule.precision:.0%}; Wilson intervals at {capacity.confidence:.0%}"
        + (f"; every probe trains >= {capacity.min_steps} steps" if capacity.min_steps else ""),
    ]
    common = {**sweep.overrides, **shared}
    if sweep.world:
        lines.append(f"world: {sweep.world} (unpacked or built on first use, not by a dry run)")
    if common:
        lines.append("every probe: " + " ".join(f"{k}={v}" for k, v in common.items()))
    width = max(len(c.name) for c in chains)
    for i, chain in enumerate(chains, 1):
        state = search_state(capacity, chain)
        shown = " ".join(f"{k}={v}" for k, v in chain.settings.items())
        done = ", ".join(f"n={n}: {r:.2f}" for n, r in sorted(state["results"].items()))
        where = (f"failed: {state['error']}" if state["error"] else
                 f"next probe n={state['next']}" if state["next"] is not None else
                 f"done: n* in [{state['n_lo']}, {state['n_hi']}]")
        lines.append(f"{i:4d}  {chain.name:<{width}}  {shown}  [{where}"
                     + (f"; probed {done}" if done else "") + "]")
    return "\n".join(lines)


def _run_jobs(capacity: Capacity, jobs: list[tuple[str, Path, int]], slots: list[Any],
              what: str) -> dict[str, dict[str, Any]]:
    sweep = capacity.sweep
    pending = [(name, d) for name, d, _ in sorted(jobs, key=lambda job: -job[2])]
    parallel = sweep.workers if sweep.launcher == "local" else sweep.slurm.get("max_running", 16)
    progress = SweepProgress(len(pending), 0, min(parallel, len(pending) or 1))
    progress.show(what)
    cwd = Path.cwd()
    if sweep.launcher == "slurm":
        from lora_lightning.sweep.slurm import run_slurm

        return run_slurm(sweep, pending, cwd, sweep.retries, progress)
    from lora_lightning.sweep.local import run_local

    return run_local(pending, slots, cwd, sweep.retries, progress)


def run_capacity(capacity: Capacity, dry_run: bool = False, aggregate: bool = True,
                 extend: bool = False) -> dict[str, Any]:
    """Search every chain to its bracket, test both ends, write the tables. `extend` lets a
    folder made from another capacity file (e.g. with fewer seeds or variants) take this
    one's chains; a probe already there is reused only if its settings are this file's."""
    sweep = capacity.sweep
    parser = FitConfigParser()
    placeholders = world_settings(sweep.world, dry_run=True) if sweep.world else {}
    first = {N_KEY: capacity.rule.n_start}
    check_configs(replace_overrides(sweep, first), parser, placeholders)
    slots = _local_slots(sweep)
    if dry_run:
        print(describe_capacity(capacity, placeholders), flush=True)
        return {"chains": [c.name for c in capacity.chains()], "dry_run": True}

    start = time.monotonic()
    claim_folder(sweep, extend=extend)
    shared: dict[str, Any] = {}
    if sweep.world:
        shared = world_settings(sweep.world)
    elif sweep.categorize is not None:
        config = parser.parse(sweep.base, {**sweep.overrides, **first})
        shared = categorized_settings(sweep, _model_of(config), _launch_once(sweep))
    base_config = check_configs(replace_overrides(sweep, first), parser, shared)
    base_logger = base_config.trainer.logger
    available = _unknown_facts(base_config.data.facts)
    if available is not None and (capacity.rule.n_max is None
                                  or capacity.rule.n_max > available):
        capacity = dc_replace(capacity, rule=dc_replace(capacity.rule, n_max=available))

    def probe_config(cell: Any) -> tuple[Path, Any]:
        cell_dir = _cell_dir(sweep, cell)
        settings = {**CHECKPOINT_EVERY_EPOCH, **sweep.overrides, **shared, **cell.settings,
                    **_own_settings(sweep, cell, cell_dir, base_logger)}
        try:
            config = parser.parse(sweep.base, settings)
            if config.knowledge_eval.every_n_epochs is None:  # set so by the base config
                raise ValueError(f"{PROBE_KEY}: {NO_PROBE}")
            epochs = epochs_for(config, capacity.min_steps)
            if epochs is not None:
                settings["trainer.max_epochs"] = epochs
                config = parser.parse(sweep.base, settings)
        except ValueError as exc:
            raise sweep.error(f"variants (probe {cell.name})", str(exc)) from exc
        return cell_dir, config

    def prepare(cell: Any, stages: list[str]) -> tuple[str, Path, int]:
        cell_dir, config = probe_config(cell)
        write_cell(sweep, cell, cell_dir, parser.dump(config), stages=stages)
        return cell.name, cell_dir, training_size(config)

    chains = capacity.chains()
    # A probe on disk counts only if it is the probe this file asks for: a search setting
    # that changes training (min_steps) or a variant whose settings changed since is refused
    # here, naming the keys, instead of being read as this file's answer.
    for chain in chains:
        for n in search_state(capacity, chain)["probes"]:
            cell = probe_cell(chain, n)
            cell_dir, config = probe_config(cell)
            check_cell(sweep, cell, cell_dir, parser.dump(config))
    rounds = 0
    while True:
        jobs, notes = [], []
        for chain in chains:
            state = search_state(capacity, chain)
            if state["next"] is None:
                continue
            jobs.append(prepare(probe_cell(chain, state["next"]), ["fit"]))
            hi = "-" if state["n_hi"] is None else state["n_hi"]
            notes.append(f"{chain.name} n={state['next']} (bracket [{state['n_lo']}, {hi}])")
        write_state(capacity)
        if not jobs:
            break
        rounds += 1
        results = _run_jobs(capacity, jobs, slots, f"capacity round {rounds}: probing "
                            + "; ".join(notes))
        if not any(r.get("state") in ("done", "failed") for r in results.values()):
            # every probe busy (another process runs it) or interrupted: asking again at once
            # would spin; a rerun picks the searches up where they are
            states = sorted({str(r.get("state")) for r in results.values()})
            print(f"capacity: no probe of round {rounds} finished ({', '.join(states)}); "
                  "run the command again to continue", flush=True)
            break

    jobs = []
    for chain in chains:
        state = search_state(capacity, chain)
        if state["next"] is not None or state["error"]:
            continue  # still searching (a rerun goes on), or stopped by a failed probe
        for n in (state["n_lo"], state["n_hi"]):
            if n and n in state["probes"] and state["probes"][n].error is None:
                cell = probe_cell(chain, n)
                if not tested(_cell_dir(sweep, cell)):
                    jobs.append(prepare(cell, ["fit", "test"]))
    if jobs:
        _run_jobs(capacity, jobs, slots, f"capacity: the full test at n_lo and n_hi "
                  f"({len(jobs)} runs)")
    write_state(capacity)
    failed = {c.name: search_state(capacity, c)["error"] for c in chains}
    summary: dict[str, Any] = {"chains": len(chains), "rounds": rounds,
                               "failed": {k: v for k, v in failed.items() if v},
                               "folder": str(sweep.output)}
    for name, error in summary["failed"].items():
        print(f"  stopped: {name}: {error}", flush=True)
    print(f"capacity: searched {len(chains)} chains in {duration(time.monotonic() - start)}",
          flush=True)
    if aggregate:
        from lora_lightning.sweep.capacity_report import write_capacity_report

        written = write_capacity_report(capacity, base_config.data.facts)
        summary["written"] = {k: str(v) for k, v in written.items()}
        print(f"capacity: tables in {written['csv']} and {written['report']}", flush=True)
    return summary


def _unknown_facts(facts: str | None) -> int | None:
    """How many Unknown facts the fact file has: the search's n cannot grow past them."""
    if not facts:
        return None
    from lora_lightning.facts import load_facts

    try:
        return sum(f.category == "Unknown" for f in load_facts(facts))
    except (OSError, ValueError):
        return None  # the probe's own fit says what is wrong with the file


def replace_overrides(sweep: Any, extra: dict[str, Any]) -> Any:
    """The sweep with `extra` added to its overrides (a probe's n for checking configs)."""
    return dc_replace(sweep, overrides={**sweep.overrides, **extra})
