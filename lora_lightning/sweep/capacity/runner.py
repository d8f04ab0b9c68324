"""Running a capacity search: rounds of probes on the sweep's launchers, then the full `test`
at each chain's bracket, then the tables (`report`).

Each round takes the next probe of every unfinished chain (variant x seed) and runs them
together, `workers` at once locally or as one SLURM job array; a chain's probes depend on each
other, the chains do not. What a round decides is read back from the probe folders, so a rerun
after a kill continues every search from the probes on disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

from lora_lightning.sweep.capacity.search import (
    NO_PROBE,
    PROBE_KEY,
    Capacity,
    epochs_for,
    probe_cell,
    remap_error,
    search_state,
    tested,
    write_state,
)
from lora_lightning.sweep.cellconfig import FitConfigParser
from lora_lightning.sweep.folder import cell_dir, check_cell, claim_folder, write_cell
from lora_lightning.sweep.progress import SweepProgress, duration
from lora_lightning.sweep.runner import (
    cell_settings,
    check_configs,
    launch,
    training_size,
    worker_slots,
)
from lora_lightning.sweep.shared import CATEGORIZED, shared_settings, world_settings
from lora_lightning.sweep.spec import N_KEY, Cell, Sweep, SweepFileError

__all__ = ["describe_capacity", "replace_overrides", "run_capacity"]

# (cell name, cell folder, training size) of a prepared probe
Job = tuple[str, Path, int]


def describe_capacity(capacity: Capacity, shared: dict[str, Any]) -> str:
    """The dry run's listing: the search, what every probe shares, each chain's settings and
    where its search stands (its next probe: the first, on a new folder)."""
    sweep, rule = capacity.sweep, capacity.rule
    chains = capacity.chains()
    lines = [
        f"capacity file {sweep.path}: {len(chains)} chains ("
        + " x ".join(f"{axis.name} {len(axis.labels)}" for axis in sweep.axes)
        + f"); launcher {sweep.launcher}"
        + (f", {sweep.workers} worker{'s' * (sweep.workers > 1)}"
           if sweep.launcher == "local" else ""),
        f"folder: {sweep.output}",
        f"base config: {sweep.base or '(the embedded default)'}",
        f"search: n* = the largest n with reliability ({capacity.probe} probe) >= "
        f"{rule.threshold:g}; n from "
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
    # n_max is lowered to the Unknown facts there are where they could be counted
    uncounted = " (or fewer: the Unknown facts there are)" if rule.n_max is None else ""
    for i, chain in enumerate(chains, 1):
        state = search_state(capacity, chain)
        shown = " ".join(f"{k}={v}" for k, v in chain.settings.items())
        done = ", ".join(f"n={n}: {r:.2f}" for n, r in sorted(state.results.items()))
        where = (f"failed: {state.error}" if state.error else
                 f"next probe n={state.next_n}{uncounted}" if state.next_n is not None else
                 f"done: n* in [{state.n_lo}, {state.n_hi}]")
        lines.append(f"{i:4d}  {chain.name:<{width}}  {shown}  [{where}"
                     + (f"; probed {done}" if done else "") + "]")
    return "\n".join(lines)


@dataclass(frozen=True)
class Prober:
    """What every probe of a capacity run shares, and how one is prepared: its config is the
    base config with the sweep's settings, the chain's and n (`cell_settings`), trained long
    enough for `min_steps`."""

    capacity: Capacity  # its n_max no larger than the Unknown facts there are
    parser: FitConfigParser
    shared: dict[str, Any]  # the world's or the categorised facts' settings
    base_logger: Any  # the base config's loggers, before any probe's are set

    @property
    def sweep(self) -> Sweep:
        return self.capacity.sweep

    def config(self, cell: Cell) -> tuple[Path, Any]:
        """The probe's folder and parsed config; a sweep-file error naming the probe when its
        settings do not parse or turn off the reliability it is read by."""
        folder = cell_dir(self.sweep, cell)
        settings = cell_settings(self.sweep, cell, self.shared, self.base_logger)
        base = self.sweep.base
        try:
            config = self.parser.parse(base, settings)
            if config.knowledge_eval.every_n_epochs is None:  # set so by the base config
                raise ValueError(f"{PROBE_KEY}: {NO_PROBE}")
            epochs = epochs_for(config, self.capacity.steps_floor(cell))
            if epochs is not None:
                settings["trainer.max_epochs"] = epochs
                config = self.parser.parse(base, settings)
            self.parser.check(config, model_path=False)  # checked by `check_configs`
        except ValueError as exc:
            raise self.sweep.error(f"variants (probe {cell.name})", str(exc)) from exc
        return folder, config

    def prepare(self, cell: Cell, stages: list[str]) -> Job:
        """Write the probe's folder (its config and the stages it runs) for a launcher."""
        folder, config = self.config(cell)
        write_cell(self.sweep, cell, folder, self.parser.dump(config), stages=stages)
        return cell.name, folder, training_size(config)

    def check_on_disk(self) -> None:
        """Refuse a probe on disk that is not the probe this file asks for (a search setting
        that changes training, such as min_steps, or a variant whose settings changed since),
        naming the keys, instead of reading it as this file's answer."""
        for chain in self.capacity.chains():
            for n in search_state(self.capacity, chain).probes:
                cell = probe_cell(chain, n)
                folder, config = self.config(cell)
                check_cell(self.sweep, cell, folder, self.parser.dump(config))


def run_capacity(capacity: Capacity, dry_run: bool = False, aggregate: bool = True,
                 extend: bool = False) -> dict[str, Any]:
    """Search every chain to its bracket, test both ends, write the tables. `extend` lets a
    folder made from another capacity file (e.g. with fewer seeds or variants) take this
    one's chains; a probe already there is reused only if its settings are this file's."""
    sweep = capacity.sweep
    parser = FitConfigParser()
    # every setting is checked before the folder is made (a dry run's world only named)
    placeholders = world_settings(sweep.world, dry_run=True) if sweep.world else {}
    first = replace_overrides(sweep, {N_KEY: capacity.rule.n_start})
    config = _checked(capacity, first, parser, placeholders)
    slots = worker_slots(sweep)
    if dry_run:
        # n grows no further than the Unknown facts there are, where they can be counted now
        print(describe_capacity(_capped(capacity, _facts_now(sweep, config)), placeholders),
              flush=True)
        return {"chains": [c.name for c in capacity.chains()], "dry_run": True}

    start = time.monotonic()
    claim_folder(sweep, extend=extend)
    shared = shared_settings(sweep, config)
    base_config = _checked(capacity, first, parser, shared)
    prober = Prober(_capped(capacity, base_config.data.facts), parser, shared,
                    base_config.trainer.logger)
    prober.check_on_disk()
    rounds = _search(prober, slots)
    _test_brackets(prober, slots)
    capacity = prober.capacity
    write_state(capacity)
    chains = capacity.chains()
    failed = {c.name: search_state(capacity, c).error for c in chains}
    summary: dict[str, Any] = {"chains": len(chains), "rounds": rounds,
                               "failed": {k: v for k, v in failed.items() if v},
                               "folder": str(sweep.output)}
    for name, error in summary["failed"].items():
        print(f"  stopped: {name}: {error}", flush=True)
    print(f"capacity: searched {len(chains)} chains in {duration(time.monotonic() - start)}",
          flush=True)
    if aggregate:
        from lora_lightning.sweep.capacity.report import write_capacity_report

        written = write_capacity_report(capacity, base_config.data.facts)
        summary["written"] = {k: str(v) for k, v in written.items()}
        print(f"capacity: tables in {written['csv']} and {written['report']}", flush=True)
    return summary


def _checked(capacity: Capacity, first: Sweep, parser: FitConfigParser,
             shared: dict[str, Any]) -> Any:
    """`check_configs` of the search's first probe, its errors named by the capacity file's
    own keys (`variants.r4`, not the `axes.variant.r4` it is run as)."""
    try:
        return check_configs(first, parser, shared)
    except SweepFileError as err:
        raise remap_error(err, capacity.sweep.path) from err


def _facts_now(sweep: Sweep, config: Any) -> str | None:
    """The categorised fact file a dry run can count Unknown facts in: the base config's, or
    the one `categorize` wrote into the folder already; None for a world not built yet or
    facts not categorised yet."""
    if sweep.world:
        return None
    if sweep.categorize is not None:
        done = sweep.output / CATEGORIZED
        return str(done) if done.is_file() else None
    return config.data.facts


def _capped(capacity: Capacity, facts: str | None) -> Capacity:
    """The capacity with its n_max lowered to the Unknown facts the fact file has."""
    available = _unknown_facts(facts)
    if available is None or (capacity.rule.n_max is not None
                             and capacity.rule.n_max <= available):
        return capacity
    return dc_replace(capacity, rule=dc_replace(capacity.rule, n_max=available))


def _search(prober: Prober, slots: list[Any]) -> int:
    """Rounds of probes, each the next probe of every chain still searching, until every
    search is over or a round finishes none; the rounds run."""
    capacity = prober.capacity
    rounds = 0
    while True:
        jobs, notes = [], []
        for chain in capacity.chains():
            state = search_state(capacity, chain)
            if state.next_n is None:
                continue
            jobs.append(prober.prepare(probe_cell(chain, state.next_n), ["fit"]))
            hi = "-" if state.n_hi is None else state.n_hi
            notes.append(f"{chain.name} n={state.next_n} (bracket [{state.n_lo}, {hi}])")
        write_state(capacity)
        if not jobs:
            return rounds
        rounds += 1
        results = _run_jobs(capacity.sweep, jobs, slots, f"capacity round {rounds}: probing "
                            + "; ".join(notes))
        if not any(r.get("state") in ("done", "failed") for r in results.values()):
            # every probe busy (another process runs it) or interrupted: asking again at once
            # would spin; a rerun picks the searches up where they are
            states = sorted({str(r.get("state")) for r in results.values()})
            print(f"capacity: no probe of round {rounds} finished ({', '.join(states)}); "
                  "run the command again to continue", flush=True)
            return rounds


def _test_brackets(prober: Prober, slots: list[Any]) -> None:
    """The full `test` at n_lo and n_hi of every chain whose search is over (a chain still
    searching goes on in a rerun; one stopped by a failed probe is left as it is)."""
    capacity = prober.capacity
    if not capacity.test_ends:
        return
    jobs = []
    for chain in capacity.chains():
        state = search_state(capacity, chain)
        if not state.over:
            continue
        for n in state.ends():
            cell = probe_cell(chain, n)
            if not tested(cell_dir(capacity.sweep, cell)):
                jobs.append(prober.prepare(cell, ["fit", "test"]))
    if jobs:
        _run_jobs(capacity.sweep, jobs, slots, f"capacity: the full test at n_lo and n_hi "
                  f"({len(jobs)} runs)")


def _run_jobs(sweep: Sweep, jobs: list[Job], slots: list[Any],
              what: str) -> dict[str, dict[str, Any]]:
    """Run prepared probes on the sweep's launcher, longest first."""
    pending = [(name, folder) for name, folder, _ in sorted(jobs, key=lambda job: -job[2])]
    progress = SweepProgress(len(pending), 0, min(sweep.parallel, len(pending) or 1))
    progress.show(what)
    return launch(sweep, pending, slots, progress)


def _unknown_facts(facts: str | None) -> int | None:
    """How many Unknown facts the fact file has: the search's n cannot grow past them."""
    if not facts:
        return None
    from lora_lightning.facts import load_facts

    try:
        return sum(f.category == "Unknown" for f in load_facts(facts))
    except (OSError, ValueError):
        return None  # the probe's own fit says what is wrong with the file


def replace_overrides(sweep: Sweep, extra: dict[str, Any]) -> Sweep:
    """The sweep with `extra` added to its overrides (a probe's n for checking configs)."""
    return dc_replace(sweep, overrides={**sweep.overrides, **extra})
