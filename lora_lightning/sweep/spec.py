"""A sweep file: a base `fit` config, settings shared by every cell, and axes whose product is
the grid of cells (docs: README, "Sweeps").

```yaml
base: ../paper/llama31_8b.yaml       # any fit config, relative to this file; null = the default
world: bench                          # optional: run on a synthetic world (small | bench)
overrides: {trainer.max_epochs: 10}   # config keys set in every cell
axes:                                 # the grid: the product of the axes, in this order
  n: {key: data.n_unknown, values: [10, 100, 1000]}        # each value sets one key
  mix:                                                     # each labelled value sets several
    "+0": {data.extra_kind: none, data.extra_per_unknown: 0}
    "+1HK": {data.extra_kind: highly_known, data.extra_per_unknown: 1}
  seed: {keys: [seed_everything, data.seed], values: [42, 1337]}   # one value, several keys
```

An axis may also be written `data.n_unknown: [10, 100]` (its name is then the key). Every error
names the sweep file and the key, because a grid of 90 fits should fail before the first one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "N_KEY", "SEED_KEYS", "SWEEP_CONTROLLED_KEYS", "Axis", "Cell", "Sweep", "SweepFileError",
    "axis_labels", "load_sweep", "read_yaml_file", "sweep_from_raw",
]

TOP_LEVEL_KEYS = (
    "base", "world", "output", "overrides", "axes", "launcher", "workers", "retries", "slurm",
    "categorize", "paper_values",
)
SLURM_KEYS = (
    "partition", "account", "qos", "constraint", "timeout_min", "gpus_per_node",
    "cpus_per_task", "mem_gb", "max_running", "cluster", "setup", "additional_parameters",
)
LAUNCHERS = ("local", "slurm")
WORLD_SCALES = ("small", "bench")
# Keys the sweep sets itself for every cell: each cell's run folder, checkpoints, adapter,
# report and the shared "before" scores; `data.tokenizer` follows `model.model_name_or_path`.
SWEEP_CONTROLLED_KEYS = (
    "trainer.logger", "trainer.default_root_dir", "checkpoint.dirpath", "save_adapter.dirpath",
    "report.report_dir", "report.before_scores", "ckpt_path", "data.tokenizer",
)
# The config key of n, the Unknown facts a cell trains on (the tables' rows, the capacity
# search's variable), and the keys of a seed (what the tables average over).
N_KEY = "data.n_unknown"
SEED_KEYS = ("seed_everything", "data.seed")
# Keys that `world:` or `categorize:` set for every cell.
WORLD_KEYS = ("model.model_name_or_path", "data.facts", "data.fewshot_pool")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class SweepFileError(ValueError):
    """Bad input in a sweep file: the message names the file and the key."""

    def __init__(self, path: Path | str, key: str, problem: str) -> None:
        super().__init__(f"sweep file {path}: {key}: {problem}")
        self.path, self.key = Path(path), key


@dataclass(frozen=True)
class Axis:
    """One axis of the grid: its values' labels and the config keys each value sets."""

    name: str
    labels: tuple[str, ...]
    settings: tuple[dict[str, Any], ...]

    @property
    def keys(self) -> list[str]:
        """Every config key some value of this axis sets (in first-seen order)."""
        return list(dict.fromkeys(k for s in self.settings for k in s))


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its folder name, each axis' label and the keys it sets."""

    name: str
    labels: dict[str, str]
    settings: dict[str, Any]
    axes: dict[str, dict[str, Any]] = field(default_factory=dict)  # axis -> the keys it sets


@dataclass
class Sweep:
    """A parsed and checked sweep file (config keys are checked against the fit parser later,
    by `cellconfig`, because that needs Lightning)."""

    path: Path
    raw: dict[str, Any]
    base: Path | None
    world: str | None
    output: Path
    overrides: dict[str, Any]
    axes: list[Axis]
    launcher: str = "local"
    workers: int = 1
    retries: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)
    categorize: dict[str, Any] | None = None
    paper_values: bool = False

    def with_run_settings(self, command: str, workers: int | None = None,
                          launcher: str | None = None, retries: int | None = None) -> Sweep:
        """The sweep with the command line's workers, launcher and retries (None: the file's)."""
        changes: dict[str, Any] = {}
        if workers is not None:
            if workers < 1:
                raise ValueError(f"{command} --workers must be >= 1, got {workers}")
            changes["workers"] = workers
        if launcher is not None:
            changes["launcher"] = launcher
        if retries is not None:
            changes["retries"] = max(0, retries)
        return replace(self, **changes)

    @property
    def parallel(self) -> int:
        """Cells that run at once: the local workers, or SLURM's `max_running` (default 16)."""
        return self.workers if self.launcher == "local" else self.slurm.get("max_running", 16)

    def error(self, key: str, problem: str) -> SweepFileError:
        return SweepFileError(self.path, key, problem)

    def cells(self) -> list[Cell]:
        """The product of the axes, in axis order (the last axis varies fastest)."""
        cells = []
        for picks in itertools.product(*(range(len(a.labels)) for a in self.axes)):
            labels = {a.name: a.labels[i] for a, i in zip(self.axes, picks, strict=True)}
            axes = {a.name: dict(a.settings[i]) for a, i in zip(self.axes, picks, strict=True)}
            settings = {k: v for s in axes.values() for k, v in s.items()}
            name = "__".join(f"{_safe(a)}={_safe(label)}" for a, label in labels.items())
            cells.append(Cell(name=name, labels=labels, settings=settings, axes=axes))
        return cells

    def fingerprint(self) -> str:
        """What makes two sweep files the same sweep: what their cells run (world, overrides,
        axes, categorize, as parsed: not comments or layout) and the text of the base config."""
        base_text = self.base.read_text() if self.base is not None and self.base.is_file() else ""
        # How it runs (launcher, workers, retries, slurm, output) is not what it measures.
        measured = {k: self.raw.get(k) for k in ("world", "overrides", "axes", "categorize")}
        blob = json.dumps({**measured, "base": base_text}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _safe(text: str) -> str:
    return _SAFE.sub("-", str(text)).strip("-") or "_"


def _label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) >= 1 else str(value)
    return str(value)


def _check_key(path: Path, where: str, key: Any) -> str:
    if not isinstance(key, str) or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise SweepFileError(path, where, f"{key!r} is not a config key (e.g. data.n_unknown)")
    controlled = [c for c in SWEEP_CONTROLLED_KEYS if key == c or key.startswith(c + ".")]
    if controlled:
        raise SweepFileError(
            path, where, f"{key!r} is set by the sweep for each cell (its own run folder, "
            "checkpoints, adapter and report; data.tokenizer follows model.model_name_or_path)"
        )
    return key


def _parse_axis(path: Path, name: Any, spec: Any) -> Axis:
    where = f"axes.{name}"
    if not isinstance(name, str) or not name:
        raise SweepFileError(path, where, "an axis needs a name")
    if isinstance(spec, list):  # `data.n_unknown: [10, 100]`
        if "." not in name and name != "seed_everything":
            raise SweepFileError(
                path, where, "a list of values needs the axis to be named by its config key "
                f"(e.g. data.{name}), or write {{key: <config key>, values: [...]}}"
            )
        spec = {"key": name, "values": spec}
    if not isinstance(spec, dict):
        raise SweepFileError(
            path, where, "an axis is a list of values, {key|keys: ..., values: [...]}, or a "
            f"mapping of labels to settings; got {type(spec).__name__}"
        )
    if "values" in spec:
        unknown = set(spec) - {"key", "keys", "values"}
        if unknown:
            raise SweepFileError(path, f"{where}.{sorted(unknown)[0]}", "unknown axis field "
                                 "(an axis with `values` takes `key` or `keys`)")
        keys = spec.get("keys", [spec["key"]] if "key" in spec else None)
        if not keys or not isinstance(keys, list) or ("key" in spec and "keys" in spec):
            raise SweepFileError(path, where, "give the config key(s) its values set: "
                                 "`key: data.n_unknown` or `keys: [seed_everything, data.seed]`")
        keys = [_check_key(path, f"{where}.keys", k) for k in keys]
        values = spec["values"]
        if not isinstance(values, list):
            raise SweepFileError(path, f"{where}.values", "must be a list")
        if not values:
            raise SweepFileError(path, f"{where}.values", "the axis is empty (give it values)")
        labels = tuple(_label(v) for v in values)
        settings = tuple({k: v for k in keys} for v in values)
    else:
        if not spec:
            raise SweepFileError(path, where, "the axis is empty (give it values)")
        labels, rows = [], []
        for label, setting in spec.items():
            if not isinstance(setting, dict) or not setting:
                raise SweepFileError(path, f"{where}.{label}", "a labelled value is a mapping "
                                     "of config keys to values, e.g. {data.extra_kind: none}")
            labels.append(str(label))
            rows.append({_check_key(path, f"{where}.{label}", k): v for k, v in setting.items()})
        labels, settings = tuple(labels), tuple(rows)
    safe = [_safe(label) for label in labels]
    if len(set(safe)) != len(safe):
        raise SweepFileError(path, where, f"two values have the same folder label: {labels}")
    return Axis(name=name, labels=labels, settings=settings)


def axis_labels(path: str | Path, raw_axes: Any) -> dict[str, tuple[str, ...]]:
    """Each axis' labels in the order the sweep file gives them (a report's columns follow
    the file: +0, +1HK, +10HK as written, not as sorted); axes that do not parse are left out."""
    labels = {}
    for name, spec in (raw_axes.items() if isinstance(raw_axes, dict) else ()):
        try:
            labels[name] = _parse_axis(Path(path), name, spec).labels
        except SweepFileError:
            continue
    return labels


def load_sweep(
    path: str | Path, output: str | Path | None = None, cwd: Path | None = None
) -> Sweep:
    """Read and check a sweep file (no Lightning, no world: cheap enough for `--dry_run`).

    `base` is relative to the sweep file; `output` (default `sweeps/<file stem>`) to `cwd`.
    """
    path = Path(path)
    return sweep_from_raw(path, read_yaml_file(path, "sweep file"), output, cwd)


def read_yaml_file(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from `path`, or one line naming the file and what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepFileError(path, "(file)", f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SweepFileError(path, "(file)", f"a {what} is a mapping of settings")
    return raw


def sweep_from_raw(
    path: Path, raw: dict[str, Any], output: str | Path | None = None, cwd: Path | None = None
) -> Sweep:
    """`load_sweep` of a file already read (`capacity` builds its sweep so)."""
    cwd = Path.cwd() if cwd is None else cwd
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise SweepFileError(path, str(key),
                                 f"unknown key (known: {', '.join(TOP_LEVEL_KEYS)})")
    if "axes" not in raw or not isinstance(raw["axes"], dict) or not raw["axes"]:
        raise SweepFileError(path, "axes", "needs at least one axis (a mapping of name to values)")
    axes = [_parse_axis(path, name, spec) for name, spec in raw["axes"].items()]
    seen: dict[str, str] = {}
    for axis in axes:
        for key in axis.keys:
            if key in seen:
                raise SweepFileError(path, f"axes.{axis.name}",
                                     f"{key!r} is also set by axis {seen[key]!r}")
            seen[key] = axis.name

    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepFileError(path, "overrides", "must be a mapping of config keys to values")
    for key in overrides:
        _check_key(path, f"overrides.{key}", key)
        if key in seen:
            raise SweepFileError(path, f"overrides.{key}", f"also set by axis {seen[key]!r}")

    base = raw.get("base")
    if base is not None:
        if not isinstance(base, str):
            raise SweepFileError(path, "base", "must be the path of a fit config (or null)")
        base = (path.parent / base).resolve()
        if not base.is_file():
            raise SweepFileError(path, "base", f"no config file at {base}")

    world = raw.get("world")
    if world is not None and world not in WORLD_SCALES:
        raise SweepFileError(path, "world", f"must be one of {WORLD_SCALES} or null, got {world!r}")
    categorize = raw.get("categorize")
    if categorize is not None and not isinstance(categorize, dict):
        raise SweepFileError(path, "categorize", "must be a mapping of `categorize` arguments")
    if world is not None and categorize is not None:
        raise SweepFileError(path, "categorize", "a world's facts are categorised already; "
                             "drop `categorize` or `world`")
    if world is not None or categorize is not None:
        for key in WORLD_KEYS if world is not None else WORLD_KEYS[1:]:
            if key in overrides or key in seen:
                source = "world" if world is not None else "categorize"
                raise SweepFileError(path, f"overrides.{key}" if key in overrides else
                                     f"axes.{seen[key]}", f"set by `{source}` for every cell")
    if categorize is not None and "model.model_name_or_path" in seen:
        raise SweepFileError(path, f"axes.{seen['model.model_name_or_path']}",
                             "`categorize` runs once for one base model; an axis cannot vary it")

    launcher = raw.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise SweepFileError(path, "launcher", f"must be one of {LAUNCHERS}, got {launcher!r}")
    for key, low in (("workers", 1), ("retries", 0)):
        value = raw.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SweepFileError(path, key, f"must be an integer >= {low}, got {value!r}")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise SweepFileError(path, "slurm", "must be a mapping")
    for key in slurm:
        if key not in SLURM_KEYS:
            raise SweepFileError(path, f"slurm.{key}",
                                 f"unknown key (known: {', '.join(SLURM_KEYS)})")
    paper_values = raw.get("paper_values", False)
    if not isinstance(paper_values, bool):
        raise SweepFileError(path, "paper_values", "must be true or false")

    out = Path(output) if output is not None else Path(raw.get("output") or f"sweeps/{path.stem}")
    return Sweep(
        path=path.resolve(), raw=raw, base=base, world=world,
        output=(out if out.is_absolute() else cwd / out).resolve(), overrides=dict(overrides),
        axes=axes, launcher=launcher, workers=raw.get("workers", 1),
        retries=raw.get("retries", 1), slurm=dict(slurm), categorize=categorize,
        paper_values=paper_values,
    )
