"""The capacity file and its search rule: how many new facts a LoRA adapter holds, per variant.

A capacity file is a sweep file whose grid is `variants` x `seeds` (each pair a *chain*), plus
the search: for each chain, n\\* = the largest n whose reliability is at least the threshold
tau, found by probes, each a `fit` on n Unknown facts:

- grow n geometrically from `n_start` (x `growth`) until a probe falls below tau;
- then bisect (at the geometric middle) between the largest passing n below the smallest
  failing one and that failing n, until they are within `precision` of each other (relative).

`modes` (optional) crosses the variants with training modes, e.g. the paper's fixed epochs
and the convergence mode (`callbacks.Convergence`: each probe trains until its trained facts
stop improving, within `trainer.max_epochs`); each (variant, mode, seed) is a chain.
`search.test: false` skips the full `test` at the ends of the brackets (harm, benchmarks).

Reliability is read under the probe `search.probe` names: `fewshot` (the default, the paper's
SliCK probe: a fact counts when any of its few-shot prompts answers it) or `zeroshot` (each
trained fact asked once, in the prompt it was trained on). `fit` measures both after its last
epoch, so n\\* under the other probe can be read off the same probes (`other_bracket`), as a
bracket only where those probes happen to bracket it. A probe passes when its reliability k/n is
at least tau. That is a point estimate of a probability from n facts, so each probe also
carries its Wilson interval at `confidence`, and the answer is the bracket [n_lo, n_hi] the
search ends on, each end with its interval; an end whose interval holds tau is flagged as
decided within noise. Probes run only `fit` (which
measures reliability on the trained facts after its last epoch, batched); `test` runs once
the search is over, at n_lo and n_hi of every chain. Probes are sweep cells
(`<output>/cells/<variant>__<seed>__n=<n>`), so a rerun after a kill continues each search
where it stopped without repeating a probe, and a failed probe stops its chain, recorded.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_lightning.mix import mix_size
from lora_lightning.sweep.cell import cell_stages, is_done, read_status
from lora_lightning.sweep.folder import CELLS_DIR
from lora_lightning.sweep.spec import (
    N_KEY,
    SEED_KEYS,
    Cell,
    Sweep,
    SweepFileError,
    read_yaml_file,
    sweep_from_raw,
)

__all__ = [
    "NO_PROBE", "PROBES", "PROBE_KEY", "Capacity", "Probe", "SearchRule", "SearchState",
    "chain_probes", "dump_state", "epochs_for", "load_capacity", "other_bracket", "probe_cell",
    "read_reliabilities", "read_reliability", "remap_error", "search_state", "tested",
    "trained_epochs", "wilson_interval", "write_state",
]

OWN_KEYS = ("variants", "modes", "mix", "seeds", "search")
# A probe's reliability is the one `fit` measures after its last epoch.
PROBE_KEY = "knowledge_eval.every_n_epochs"
NO_PROBE = ("null turns off the probe after the last epoch, which gives each probe its "
            "reliability; use 0 (only after the last epoch)")
DEFAULT_MIX = {"data.extra_kind": "none", "data.extra_per_unknown": 0}
# the probes a search can follow, each by the metrics.csv column `fit` logs it under
# (`callbacks.KnowledgeEvalCallback`, after the last epoch)
PROBES = {"fewshot": "val/reliability", "zeroshot": "val/reliability_zeroshot"}
SEARCH_DEFAULTS: dict[str, Any] = {
    "threshold": 0.95, "n_start": 10, "n_max": None, "growth": 2.0, "precision": 0.1,
    "confidence": 0.95, "min_steps": None, "probe": "fewshot", "test": True,
}


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n: unlike k/n +- z*se it stays inside
    [0, 1] and is not empty at k = n, where reliability usually is."""
    if n <= 0:
        return 0.0, 1.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class SearchRule:
    """Where the search on n goes next, from the probes so far (n -> reliability)."""

    threshold: float = 0.95
    n_start: int = 10
    n_max: int | None = None
    growth: float = 2.0
    precision: float = 0.1

    def passes(self, reliability: float) -> bool:
        return reliability >= self.threshold

    def bracket(self, results: dict[int, float]) -> tuple[int, int | None]:
        """(n_lo, n_hi): the largest passing n below the smallest failing one (0 if none
        passes) and that failing n (None while every probe passes)."""
        fails = [n for n, r in results.items() if not self.passes(r)]
        n_hi = min(fails) if fails else None
        passes = [n for n, r in results.items() if self.passes(r) and (n_hi is None or n < n_hi)]
        return max(passes, default=0), n_hi

    def next_n(self, results: dict[int, float]) -> int | None:
        """The next probe's n, or None when the search is over."""
        if not results:
            return self.n_start if self.n_max is None else min(self.n_start, self.n_max)
        n_lo, n_hi = self.bracket(results)
        if n_hi is None:  # still growing
            if self.n_max is not None and n_lo >= self.n_max:
                return None
            grown = max(n_lo + 1, math.ceil(n_lo * self.growth))
            return grown if self.n_max is None else min(grown, self.n_max)
        if n_hi - n_lo <= 1 or (n_lo > 0 and n_hi <= n_lo * (1 + self.precision)):
            return None
        middle = round(math.sqrt(n_lo * n_hi)) if n_lo > 0 else n_hi // 2
        middle = min(max(middle, n_lo + 1), n_hi - 1)
        return None if middle in results else middle


@dataclass(frozen=True)
class Probe:
    """One finished (or failed) probe of a chain: its reliability under the search's probe,
    and under every probe its metrics.csv has (`PROBES`' names)."""

    n: int
    cell_dir: Path
    reliability: float | None
    error: str | None = None
    reliabilities: dict[str, float] = field(default_factory=dict)

    @property
    def learned(self) -> int:
        return round((self.reliability or 0.0) * self.n)


@dataclass
class Capacity:
    """A parsed capacity file: the sweep of its chains and the search rule."""

    sweep: Sweep
    rule: SearchRule
    confidence: float
    min_steps: int | None = None
    probe: str = "fewshot"  # the probe whose reliability the search reads (`PROBES`)
    test_ends: bool = True  # the full `test` (harm, benchmarks) at both ends of each bracket
    mode_min_steps: dict[str, int] = field(default_factory=dict)  # a mode's own step floor

    def steps_floor(self, chain: Cell) -> int | None:
        """The optimizer steps every probe of `chain` trains at least: its mode's `min_steps`,
        else the search's."""
        return self.mode_min_steps.get(str(chain.labels.get("mode")), self.min_steps)

    def chains(self) -> list[Cell]:
        return self.sweep.cells()


def remap_error(err: SweepFileError, path: Path) -> SweepFileError:
    """A sweep-file error about the axes we built, named by the capacity file's own keys."""
    text = str(err).split(": ", 1)[1]
    for built, own in (("axes.variant", "variants"), ("axes.mode", "modes"),
                       ("axes.seed", "seeds")):
        text = text.replace(built, own)
    key, _, problem = text.partition(": ")
    return SweepFileError(path, key, problem)


def _number(path: Path, key: str, value: Any, low: float, high: float | None = None,
            integer: bool = False) -> Any:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        kind = "an integer" if integer else "a number"
        raise SweepFileError(path, key, f"must be {kind} {span}, got {value!r}")
    return int(value) if integer else float(value)


def load_capacity(path: str | Path, output: str | Path | None = None,
                  cwd: Path | None = None) -> Capacity:
    """Read and check a capacity file (cheap: no Lightning, no model)."""
    path = Path(path)
    raw = read_yaml_file(path, "capacity file")
    if "axes" in raw:
        raise SweepFileError(path, "axes", "a capacity file has no axes: give `variants` (and "
                             "`seeds`); the search chooses n")
    own = {k: raw.pop(k) for k in OWN_KEYS if k in raw}
    variants = own.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise SweepFileError(path, "variants", "needs at least one adapter variant: a mapping "
                             "of labels to settings, e.g. r8: {model.rank: 8}")
    mix = own.get("mix", DEFAULT_MIX)
    if not isinstance(mix, dict):
        raise SweepFileError(path, "mix", "must be a mapping of config keys, e.g. "
                             "{data.extra_kind: none, data.extra_per_unknown: 0}")
    modes = own.get("modes")
    if modes is not None and (not isinstance(modes, dict) or not modes or not all(
            isinstance(m, dict) for m in modes.values())):
        raise SweepFileError(path, "modes", "must map training-mode labels to settings, e.g. "
                             "{epochs10: {convergence.patience: null}, converged: "
                             "{convergence.patience: 5, convergence.min_epochs: 10, "
                             "trainer.max_epochs: 60, min_steps: 600}}")
    # a mode's own step floor (`min_steps`, as search.min_steps for its chains alone): an
    # epoch budget starves small n of steps, a converging probe should not be
    mode_steps: dict[str, int] = {}
    if modes:
        modes = {label: dict(settings) for label, settings in modes.items()}
        for label, settings in modes.items():
            if "min_steps" in settings:
                mode_steps[label] = _number(path, f"modes.{label}.min_steps",
                                            settings.pop("min_steps"), 1, integer=True)
            if not settings:
                raise SweepFileError(path, f"modes.{label}", "sets nothing but min_steps: "
                                     "give it a config key too (e.g. convergence.patience)")
    seeds = own.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds:
        raise SweepFileError(path, "seeds", "must be a non-empty list of integers")
    overrides = dict(raw.get("overrides") or {})
    for where, keys in (("overrides", overrides), ("mix", mix),
                        *((f"variants.{label}", s) for label, s in variants.items()
                          if isinstance(s, dict)),
                        *((f"modes.{label}", s) for label, s in (modes or {}).items())):
        if N_KEY in keys:
            raise SweepFileError(path, f"{where}.{N_KEY}", "the search sets n; bound it with "
                                 "search.n_start and search.n_max")
        if where != "mix":
            clash = sorted(set(keys) & set(mix))
            if clash:
                raise SweepFileError(path, f"{where}.{clash[0]}", "also set by `mix`")
        if PROBE_KEY in keys and keys[PROBE_KEY] is None:
            raise SweepFileError(path, f"{where}.{PROBE_KEY}", NO_PROBE)
    for label, settings in (modes or {}).items():
        shared = sorted(set(settings) & {k for v in variants.values() if isinstance(v, dict)
                                         for k in v})
        if shared:
            raise SweepFileError(path, f"modes.{label}.{shared[0]}", "also set by a variant: "
                                 "a mode sets how long probes train, a variant the adapter")
    axes: dict[str, Any] = {"variant": variants}
    if modes:
        axes["mode"] = modes
    axes["seed"] = {"keys": list(SEED_KEYS), "values": seeds}
    sweep_raw = {**raw, "overrides": {**overrides, **mix}, "axes": axes}
    default_output = Path(raw.get("output") or f"capacity/{path.stem}")
    try:
        sweep = sweep_from_raw(path, sweep_raw, output if output is not None
                               else default_output, cwd)
    except SweepFileError as err:
        raise remap_error(err, path) from err
    search = own.get("search") or {}
    if not isinstance(search, dict):
        raise SweepFileError(path, "search", "must be a mapping (threshold, n_start, ...)")
    unknown = sorted(set(search) - set(SEARCH_DEFAULTS))
    if unknown:
        raise SweepFileError(path, f"search.{unknown[0]}",
                             f"unknown key (known: {', '.join(SEARCH_DEFAULTS)})")
    s = {**SEARCH_DEFAULTS, **search}
    n_max = s["n_max"]
    rule = SearchRule(
        threshold=_number(path, "search.threshold", s["threshold"], 0.0, 1.0),
        n_start=_number(path, "search.n_start", s["n_start"], 1, integer=True),
        n_max=None if n_max is None else _number(path, "search.n_max", n_max, 1, integer=True),
        growth=_number(path, "search.growth", s["growth"], 1.01),
        precision=_number(path, "search.precision", s["precision"], 0.0),
    )
    if rule.threshold <= 0:
        raise SweepFileError(path, "search.threshold", "must be above 0")
    confidence = _number(path, "search.confidence", s["confidence"], 0.5, 0.999)
    min_steps = (None if s["min_steps"] is None else
                 _number(path, "search.min_steps", s["min_steps"], 1, integer=True))
    if s["probe"] not in PROBES:
        raise SweepFileError(path, "search.probe", f"must be one of {', '.join(PROBES)} (the "
                             f"probe whose reliability the search reads), got {s['probe']!r}")
    if not isinstance(s["test"], bool):
        raise SweepFileError(path, "search.test", f"must be true or false (run the full `test` "
                             f"at both ends of every bracket), got {s['test']!r}")
    return Capacity(sweep=sweep, rule=rule, confidence=confidence, min_steps=min_steps,
                    probe=s["probe"], test_ends=s["test"], mode_min_steps=mode_steps)


def epochs_for(config: Any, min_steps: int | None) -> int | None:
    """The epochs a probe needs to train for at least `min_steps` optimizer steps (None when
    its own `trainer.max_epochs` gives as many): small n is not left under-trained, which a
    search would read as "full". Steps per epoch: the mix's samples over the batch size (and
    the devices of a DDP run)."""
    if not min_steps:
        return None
    data, trainer = config.data, config.trainer
    devices = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    size = mix_size(data.n_unknown, data.extra_per_unknown, data.extra_kind)
    per_epoch = max(1, math.ceil(size / (data.batch_size * devices)))
    need = math.ceil(min_steps / per_epoch)
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    return need if need > epochs else None


def probe_cell(chain: Cell, n: int) -> Cell:
    """The sweep cell of one probe: the chain's settings with n Unknown facts."""
    return Cell(name=f"{chain.name}__n={n}", labels={**chain.labels, "n": str(n)},
                settings={**chain.settings, N_KEY: n},
                axes={**chain.axes, "n": {N_KEY: n}})


def read_reliabilities(cell_dir: Path) -> dict[str, float]:
    """The reliability `fit` measured after its last epoch under each probe (`PROBES`: the
    last row of the run's metrics.csv that has the probe's column), the probes it has none
    for left out."""
    path = Path(cell_dir) / "metrics.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    out: dict[str, float] = {}
    for probe, column in PROBES.items():
        values = [v for v in (row.get(column) for row in rows) if v not in (None, "")]
        try:
            if values:
                out[probe] = float(values[-1])
        except ValueError:
            pass
    return out


def trained_epochs(cell_dir: Path) -> int | None:
    """The epochs a probe's `fit` trained (its metrics.csv's last epoch + 1): its fixed
    budget, or where `convergence` stopped it."""
    try:
        with open(Path(cell_dir) / "metrics.csv", newline="") as f:
            epochs = [int(float(e)) for e in (r.get("epoch") for r in csv.DictReader(f)) if e]
    except (OSError, ValueError):
        return None
    return max(epochs) + 1 if epochs else None


def read_reliability(cell_dir: Path, probe: str = "fewshot") -> float | None:
    """The reliability `fit` measured after its last epoch under `probe` (`PROBES`), None
    when it has none."""
    return read_reliabilities(cell_dir).get(probe)


def chain_probes(capacity: Capacity, chain: Cell) -> dict[int, Probe]:
    """The chain's probes on disk that finished or failed (n -> Probe)."""
    root = capacity.sweep.output / CELLS_DIR
    probes: dict[int, Probe] = {}
    prefix = f"{chain.name}__n="
    if not root.is_dir():
        return probes
    for cell_dir in root.iterdir():
        if not cell_dir.name.startswith(prefix) or not cell_dir.name[len(prefix):].isdigit():
            continue
        n = int(cell_dir.name[len(prefix):])
        status = read_status(cell_dir)
        if status.get("fit_done"):
            measured = read_reliabilities(cell_dir)
            reliability = measured.get(capacity.probe)
            if reliability is None:
                old = (" (a fit from before the zero-shot probe: run it again)"
                       if measured and capacity.probe == "zeroshot" else "")
                probes[n] = Probe(n, cell_dir, None, f"{cell_dir}/metrics.csv has no "
                                  f"{PROBES[capacity.probe]} (set knowledge_eval so fit "
                                  f"measures it){old}", measured)
            else:
                probes[n] = Probe(n, cell_dir, reliability, reliabilities=measured)
        elif status.get("state") == "failed":
            probes[n] = Probe(n, cell_dir, None, status.get("error") or "failed")
    return probes


@dataclass(frozen=True)
class SearchState:
    """Where a chain's search stands, as read from its probes on disk."""

    probes: dict[int, Probe]  # every finished or failed probe, by n
    results: dict[int, float]  # n -> reliability, of the probes that measured one
    n_lo: int  # the bracket (`SearchRule.bracket`)
    n_hi: int | None
    next_n: int | None  # the next probe's n; None when the search is over or stopped
    error: str | None  # the failed probe's error that stopped the search

    @property
    def over(self) -> bool:
        """Whether the search ended on its bracket (neither still going nor stopped)."""
        return self.next_n is None and self.error is None

    def ends(self) -> list[int]:
        """n_lo and n_hi where a probe measured them: where the full `test` runs."""
        return [n for n in (self.n_lo, self.n_hi)
                if n and n in self.probes and self.probes[n].error is None]


def search_state(capacity: Capacity, chain: Cell) -> SearchState:
    """Where a chain's search stands: its probes, the bracket, the next n (None when over)
    and the error that stopped it."""
    probes = chain_probes(capacity, chain)
    failed = [p for p in probes.values() if p.error]
    results = {n: p.reliability for n, p in probes.items() if p.reliability is not None}
    n_lo, n_hi = capacity.rule.bracket(results)
    return SearchState(
        probes=probes, results=results, n_lo=n_lo, n_hi=n_hi,
        next_n=None if failed else capacity.rule.next_n(results),
        error=failed[0].error if failed else None,
    )


def other_bracket(capacity: Capacity, state: SearchState, probe: str
                  ) -> tuple[int, int | None] | None:
    """(n_lo, n_hi) under `probe` from the probes the search ran (following its own probe):
    the largest n that passed under `probe` below the smallest that failed (n_hi None: every
    probe passed, so n* is at least n_lo). Only as tight as those probes happen to make it.
    None when no probe measured `probe`."""
    results = {n: p.reliabilities[probe] for n, p in state.probes.items()
               if probe in p.reliabilities}
    return capacity.rule.bracket(results) if results else None


def tested(cell_dir: Path) -> bool:
    """Whether a probe has had its full `test` (a whole report)."""
    return "test" in cell_stages(cell_dir) and is_done(cell_dir)


def dump_state(capacity: Capacity) -> list[dict[str, Any]]:
    """Every chain's search as plain data (`capacity.json`)."""
    out = []
    for chain in capacity.chains():
        state = search_state(capacity, chain)
        out.append({
            "chain": chain.name, "labels": chain.labels, "probe": capacity.probe,
            "n_lo": state.n_lo, "n_hi": state.n_hi, "next": state.next_n, "error": state.error,
            "probes": {str(n): p.reliability for n, p in sorted(state.probes.items())},
            "probes_by_probe": {str(n): p.reliabilities
                                for n, p in sorted(state.probes.items())},
        })
    return out


def write_state(capacity: Capacity) -> Path:
    """Write every chain's search to `<output>/capacity.json` (`dump_state`)."""
    from lora_lightning.files import atomic_write_text

    path = capacity.sweep.output / "capacity.json"
    atomic_write_text(path, json.dumps(dump_state(capacity), indent=1))
    return path
