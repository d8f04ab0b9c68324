"""A cell's settings as a complete `fit` config, checked by the `fit` command line's own parser.

Each cell runs `fit --config <cell>/cell.yaml`: the base config with the sweep's overrides, the
cell's axis values and its own folders, parsed and written out in full (as `fit --print_config`
would), so the cell's exact settings are on disk before it runs and a typo in a sweep file
fails at once, naming the key, instead of in the 37th cell.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["FitConfigParser", "cell_loggers", "cli_value", "has_run_logger"]

# The config sections whose classes `fit` builds (and so checks) before it loads anything.
CHECKED_SECTIONS = ("model", "data", "checkpoint", "throughput", "knowledge_eval",
                    "save_adapter", "report")


def cli_value(value: Any) -> str:
    """A value as the command line spells it: strings as they are (jsonargparse would keep
    JSON quotes in a string), everything else as JSON (numbers, true/false, null, lists)."""
    return value if isinstance(value, str) else json.dumps(value)


def _plain(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else value


def has_run_logger(logger: Any) -> bool:
    """Whether a parsed `trainer.logger` has a ResumableCSVLogger (whose folder is the run
    folder; without one, `fit` adds one in `trainer.default_root_dir`)."""
    entries = logger if isinstance(logger, list) else [logger]
    return any(str(getattr(e, "class_path", "")).endswith(".ResumableCSVLogger")
               for e in entries)


def cell_loggers(
    logger: Any, sweep_name: str, cell_name: str, labels: dict[str, str], cell_dir: Path
) -> Any:
    """The cell's `trainer.logger`: the base config's logger(s), each told which sweep and
    which cell it records, so that a sweep's runs are grouped wherever they are logged.

    - CSV loggers (the default) write into the cell's own folder, which is its run folder;
    - TensorBoard: `<save_dir>/<sweep>/<cell>` (name = the sweep, version = the cell), so one
      `tensorboard --logdir <save_dir>` shows the grid, `fit` and `test` of a cell together;
    - MLflow: run name = the cell, tags `sweep`, `cell` and one per axis (`n: "100"`);
    - W&B: name = the cell, group = the sweep, tags "axis=label".

    Tags the base config sets are kept; other loggers are left as they are. `logger` is the
    parsed config's value (a namespace, a list of them, or True/False/None); the result is
    plain data for the command line.
    """
    if logger is None or isinstance(logger, bool):
        return logger
    entries = logger if isinstance(logger, list) else [logger]
    out = []
    for entry in entries:
        entry = _plain(entry)
        if not isinstance(entry, dict) or "class_path" not in entry:
            out.append(entry)
            continue
        init = dict(_plain(entry.get("init_args")) or {})
        kind = str(entry["class_path"]).rsplit(".", 1)[-1]
        if kind in ("ResumableCSVLogger", "CSVLogger"):
            init.update(save_dir=str(cell_dir), name="", version="")
        elif kind == "TensorBoardLogger":
            init.update(name=sweep_name, version=cell_name)
        elif kind == "MLFlowLogger":
            init["run_name"] = cell_name
            init["tags"] = {**(init.get("tags") or {}), "sweep": sweep_name, "cell": cell_name,
                            **{axis: str(label) for axis, label in labels.items()}}
        elif kind == "WandbLogger":
            init.update(name=cell_name, group=sweep_name)
            axis_tags = [f"{axis}={label}" for axis, label in labels.items()]
            init["tags"] = list(dict.fromkeys([*(init.get("tags") or []), *axis_tags]))
        out.append({**entry, "init_args": init})
    return out if isinstance(logger, list) else out[0]


class _Parsed(Exception):  # noqa: N818  (a signal, not an error)
    def __init__(self, cli: Any) -> None:
        self.cli = cli


class FitConfigParser:
    """The parser of `python -m lora_lightning fit`, built once and used without running.

    `KnowledgeCLI` builds its parser in its constructor; a subclass stops right after parsing
    (before any model or data is built), which hands the parser over to be reused. Abbreviated
    keys are refused: `trainer.max_epoch` in a sweep file is a typo, not `max_epochs`.
    """

    def __init__(self) -> None:
        from lora_lightning.cli import TRAINER_DEFAULTS, KnowledgeCLI
        from lora_lightning.data import KnowledgeDataModule
        from lora_lightning.module import LoRAKnowledgeModule

        class _ParseOnly(KnowledgeCLI):
            def parse_arguments(self, parser: Any, args: Any) -> None:
                raise _Parsed(self)

        try:
            # the same classes and defaults as cli.run_training_cli
            _ParseOnly(
                LoRAKnowledgeModule, KnowledgeDataModule, trainer_defaults=TRAINER_DEFAULTS,
                seed_everything_default=42, args=["fit"],
                parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
            )
        except _Parsed as parsed:
            self._cli = parsed.cli
        else:  # pragma: no cover - KnowledgeCLI always parses
            raise RuntimeError("KnowledgeCLI did not parse its arguments")

    def parse(self, base: Path | None, settings: dict[str, Any]) -> Any:
        """The `fit` config of `base` (None = the embedded default) with `settings` (dotted
        config keys) set on top; a ValueError with jsonargparse's message when it is invalid."""
        args = ["fit"] + (["--config", str(base)] if base is not None else [])
        for key, value in settings.items():
            args += [f"--{key}", cli_value(value)]
        try:
            return self._cli.parser.parse_args(args).fit
        except (Exception, SystemExit) as exc:  # jsonargparse's ArgumentError, or an exit
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise ValueError(message) from exc

    def check(self, config: Any, model_path: bool = True) -> None:
        """Run on a parsed config the checks `fit` runs before it loads anything, so that a
        bad value fails before a sweep launches its cells rather than in each of them after
        its model has loaded: the model path (`model_path`: False where it is a placeholder
        for a world not built yet), `cli.check_settings` (the rank), then the constructors of
        the module, the data module and the callbacks, which check their arguments and load
        nothing (the base model is loaded in `configure_model`, the facts in `setup`). The
        trainer's loggers are not built: some reach out to a tracking server. A ValueError
        naming the setting when one is refused.
        """
        from lora_lightning.cli import check_settings
        from lora_lightning.models import WORLD_MODEL, check_model_path

        name = config.model.model_name_or_path
        if model_path and name not in (None, WORLD_MODEL):
            try:
                check_model_path(name)
            except OSError as exc:
                raise ValueError(str(exc)) from exc
        check_settings(config)  # what `fit` checks of its own before building anything
        try:
            self._instantiate(config, CHECKED_SECTIONS)
        except (ValueError, TypeError, KeyError):
            for section in CHECKED_SECTIONS:  # which one: its message may not say
                try:
                    self._instantiate(config, (section,))
                except (ValueError, TypeError, KeyError) as exc:
                    message = " ".join(str(exc).split()) or type(exc).__name__
                    if not message.startswith(f"{section}."):
                        message = f"{section}: {message}"
                    raise ValueError(message) from exc
            raise

    def _instantiate(self, config: Any, sections: tuple[str, ...]) -> None:
        """Build the classes of `sections` of a parsed config (the others with defaults)."""
        from jsonargparse import Namespace

        parser = self._cli._parser("fit")
        part = Namespace()
        for section in sections:
            part[section] = config[section].clone()
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        instantiate(part)  # jsonargparse < 4.49: instantiate_classes

    def dump(self, config: Any) -> str:
        """The config as YAML, None values included, as `fit` saves its own `config.yaml`."""
        parser = self._cli._parser("fit")
        try:
            return parser.dump(config, skip_unset=False)  # jsonargparse >= 4.49
        except (TypeError, ValueError):
            return parser.dump(config, skip_none=False)
