"""`python -m lora_lightning fit|validate|test`: a LightningCLI over
`LoRAKnowledgeModule` and `KnowledgeDataModule` whose defaults are the embedded default run
(`DEFAULT_RUN`; configs/default.yaml is the same thing written out by `--print_config`).

It lives below `commands/` because the sweep and capacity machinery parse cell configs with
its parser (`sweep.cellconfig`); `commands.train` is the command's name for it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningCLI

from lora_lightning.callbacks import (
    Convergence,
    KnowledgeEvalCallback,
    LineProgressBar,
    SaveAdapter,
    TokenThroughputMonitor,
)
from lora_lightning.checkpointing import (
    RESUMABLE_DATA_KEYS,
    RESUMABLE_MODEL_KEYS,
    ResumableCSVLogger,
    RunCheckpoint,
    RunConfigSaver,
    resume_conflicts,
)
from lora_lightning.data import KnowledgeDataModule
from lora_lightning.files import FolderLock, check_output_dir, is_rank_zero
from lora_lightning.knowledge_report import KnowledgeReport
from lora_lightning.models import WORLD_MODEL, check_model_path
from lora_lightning.module import LoRAKnowledgeModule, read_checkpoint

RUN_DIR = "runs/default"
PROG = "python -m lora_lightning"  # how --help and errors name the command
# Lightning's subcommands that this CLI offers. `predict` is not one: answers for a fact file
# are `ask --questions FILE --adapter DIR --output answers.jsonl`, which asks as the probe does.
SUBCOMMANDS = ("fit", "validate", "test")
# what marks a run folder as holding a run (relative to it; the checkpoint is looked up where
# `checkpoint.dirpath` puts it, the adapter where `save_adapter.dirpath` does)
RUN_FILES = ("config.yaml", "metrics.csv", "hparams.yaml", "test")

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 60,
    "accelerator": "auto",
    "devices": 1,
    "log_every_n_steps": 5,
    "num_sanity_val_steps": 0,
    # One fixed folder per run, so `fit --ckpt_path last` finds the run's last.ckpt; a resumed
    # run extends its metrics.csv instead of starting it over.
    "logger": lazy_instance(ResumableCSVLogger, save_dir=RUN_DIR, name="", version=""),
}
# The embedded default run's own choices over the module's defaults, which are the paper's and
# teach the world's tiny base nothing in 10 epochs (docs/world.md#the-embedded-default-run).
DEFAULT_RUN: dict[str, Any] = {
    "model.rank": 32,
    "model.alpha": 32.0,
    "model.lr": 2e-3,
    "model.target_modules": "all-linear",
    "data.batch_size": 8,
    "knowledge_eval.every_n_epochs": 5,
}
# Loggers whose `version` is a folder of their own: "" means none, the run folder itself.
FOLDER_LOGGERS = ("ResumableCSVLogger", "CSVLogger", "TensorBoardLogger")


def _logger_entries(logger: Any) -> list[Any]:
    """The configured logger(s) as a list ([] for True/False/None)."""
    if logger is None or isinstance(logger, bool):
        return []
    return list(logger) if isinstance(logger, (list, tuple)) else [logger]


def _kind(entry: Any) -> str:
    """A configured logger's class name ("TensorBoardLogger"), "" when it is no class."""
    return str(getattr(entry, "class_path", "") or "").rsplit(".", 1)[-1]


def run_folder(trainer_config: Any) -> Path | None:
    """The run folder a `trainer` config means: where config.yaml, checkpoints/, adapter/,
    report/ and metrics.csv go, and where `--ckpt_path last` looks.

    It is the save_dir (and name) of the configured `ResumableCSVLogger` with a fixed version
    (the default logger: `runs/default`, moved by `--trainer.default_root_dir`, see
    `moved_run_logger`); when `--trainer.logger` configures other loggers only, `KnowledgeCLI`
    adds a ResumableCSVLogger for the run folder in front of them, in
    `--trainer.default_root_dir` (default `runs/default`). None: no logging at all
    (`--trainer.logger false`), or a version left to Lightning's counter.
    """
    logger = getattr(trainer_config, "logger", None)
    if logger is False:
        return None
    root = getattr(trainer_config, "default_root_dir", None)
    for entry in _logger_entries(logger):
        if _kind(entry) == "ResumableCSVLogger":
            init = entry.init_args
            if getattr(init, "version", None) != "":
                return None
            if root and _is_default_run_logger(init):
                return Path(root)
            return Path(init.save_dir) / (getattr(init, "name", None) or "")
    return Path(root or RUN_DIR)


def _is_default_run_logger(init: Any) -> bool:
    """Whether a ResumableCSVLogger's settings are the default run folder's (`runs/default`)."""
    return (str(getattr(init, "save_dir", "")) == RUN_DIR
            and (getattr(init, "name", None) or "") == "")


def moved_run_logger(trainer_config: Any) -> None:
    """`--trainer.default_root_dir DIR` moves the run folder to DIR, as Lightning users expect.

    Lightning itself ignores `default_root_dir` once a logger has a folder of its own, and the
    run folder's logger (the default `ResumableCSVLogger` in `runs/default`) has one: the run
    went to `runs/default` while its config.yaml recorded DIR. So the default logger is moved
    to DIR here. A logger whose folder was set (`--trainer.logger.save_dir`, a sweep's cell)
    keeps it, and `default_root_dir` is set to that folder, saying so, so that config.yaml
    names the folder the run is in (a sweep whose base config is such a run's config.yaml
    must still put each cell in its own folder)."""
    root = getattr(trainer_config, "default_root_dir", None)
    if not root:
        return
    for entry in _logger_entries(getattr(trainer_config, "logger", None)):
        if _kind(entry) != "ResumableCSVLogger" or getattr(entry.init_args, "version", None) != "":
            continue
        init = entry.init_args
        folder = Path(init.save_dir) / (getattr(init, "name", None) or "")
        if _is_default_run_logger(init):
            init.save_dir = str(root)
        elif folder != Path(root):
            print(f"note: the run folder is {folder} (--trainer.logger.save_dir), not "
                  f"--trainer.default_root_dir {root}; recorded as both", file=sys.stderr)
            trainer_config.default_root_dir = str(folder)
        return


def check_settings(cfg: Any) -> None:
    """The settings that can be checked without loading anything, checked before anything
    is: a rank below 1 was found only once the data and the model were loaded (with
    `--overwrite`, where the run-folder check did not stop the fit first)."""
    rank = cfg.get("model.rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--model.rank must be an integer >= 1, got {rank!r}")


class KnowledgeCLI(LightningCLI):
    """LightningCLI with the module's base model and loss choice shared with the data."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands less `predict` (see `SUBCOMMANDS`)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items()
                if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.loss_on", "data.loss_on")
        # Always-present callbacks, each configurable under its own top-level key.
        # RunCheckpoint: last.ckpt after every epoch and on SIGINT/SIGTERM, written atomically.
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        # One last.ckpt per run folder (no last-v1.ckpt), so `--ckpt_path last` is this run's.
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(TokenThroughputMonitor, "throughput")
        # before knowledge_eval: it probes after the epoch where convergence stops training
        parser.add_lightning_class_args(Convergence, "convergence")
        parser.add_lightning_class_args(KnowledgeEvalCallback, "knowledge_eval")
        parser.add_lightning_class_args(SaveAdapter, "save_adapter")
        parser.add_lightning_class_args(KnowledgeReport, "report")
        parser.set_defaults(DEFAULT_RUN)

    def _parse_ckpt_path(self) -> None:
        """Lightning's LightningCLI copies a checkpoint's model hyper-parameters over the
        command line's here, silently (`--model.rank 4` resumed an r=8 run as r=8). We do not:
        `before_instantiate_classes` refuses a resume whose settings differ instead."""

    def __init__(self, *args: Any, overwrite: bool = False, **kwargs: Any) -> None:
        """LightningCLI's arguments, plus `overwrite` (`fit --overwrite`: replace the run the
        folder holds). The subcommand runs inside this constructor, so the run folder is held
        from the moment the settings are checked until the command ends, however it ends."""
        self.overwrite = overwrite
        self._lock: FolderLock | None = None
        try:
            super().__init__(*args, **kwargs)
        finally:
            self.release()

    def before_instantiate_classes(self) -> None:
        """Every setting and output path is checked here, before any model work or folder is
        made; then the run folder is claimed for this process (one writer per run folder)."""
        cfg = self.config.get(str(self.subcommand), self.config)  # run=False: no subcommand
        check_settings(cfg)
        model_name = cfg.get("model.model_name_or_path")
        if model_name not in (None, WORLD_MODEL):  # one line now, not a traceback later
            check_model_path(model_name)
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            # Lightning would look in *this* run's folder and only warn when it finds nothing.
            cfg.ckpt_path = ckpt = str(self._last_checkpoint(cfg))
        if ckpt not in (None, "best", "hpc"):
            self._check_resume(ckpt, cfg)
        moved_run_logger(cfg.trainer)
        run = run_folder(cfg.trainer)  # before `test` etc. get a logger version of their own
        for entry in _logger_entries(cfg.trainer.logger):
            init = getattr(entry, "init_args", None)
            if init is None:
                continue
            if _kind(entry) in FOLDER_LOGGERS:
                if self.subcommand not in (None, "fit") and getattr(init, "version", None) == "":
                    init.version = self.subcommand  # beside the fit run, not over its log
            else:
                # "" is the folder loggers' "no subfolder", which jsonargparse carries over
                # from the default logger to one chosen with `--trainer.logger WandbLogger`;
                # there it would be an empty run name and id: let the logger choose them.
                for key in ("name", "version"):
                    if getattr(init, key, None) == "":
                        setattr(init, key, None)
        outputs = self._outputs(cfg, run)
        for what, path in outputs.items():
            check_output_dir(path, what)
        # other DDP ranks start once rank 0 has checked (and may have begun to write)
        first = is_rank_zero()
        stale = self._existing_run(outputs, run) if self.subcommand == "fit" and first else []
        note = "fit --overwrite: removed the earlier run's"
        if stale and ckpt is None and not self.overwrite:
            if holds_a_run(stale):
                resume = ("resume it with --ckpt_path last, "
                          if any(Path(p).name == "last.ckpt" for p in stale) else "")
                raise FileExistsError(
                    f"fit: {run} already holds a run ({', '.join(stale)}); {resume}write the "
                    "new run elsewhere (--trainer.default_root_dir DIR), or pass --overwrite to "
                    "replace it"
                )
            # a fit stopped before its first checkpoint (killed, a full disk): nothing to
            # resume, so nothing to protect; its files go when this run starts
            note = (f"fit: {run} held a fit stopped before its first checkpoint, nothing to "
                    "resume; starting afresh, removed its")
        fresh = ckpt is None and (self.overwrite or not holds_a_run(stale))
        self.save_config_kwargs = {**self.save_config_kwargs,
                                   "stale": stale if fresh else [], "note": note}
        if run is not None and self.subcommand is not None and first:
            self._lock = FolderLock(run).acquire()

    @staticmethod
    def _outputs(cfg, run: Path | None) -> dict[str, Path]:
        """The folders this command writes into, by the setting that names them."""
        outputs: dict[str, Path] = {}
        if run is not None:
            outputs["run folder"] = run
        checkpoints = cfg.checkpoint.dirpath or (run / "checkpoints" if run else None)
        adapter = cfg.save_adapter.dirpath or (run / "adapter" if run else None)
        report = cfg.report.report_dir
        for what, path in (("checkpoint.dirpath", checkpoints), ("save_adapter.dirpath", adapter),
                           ("report.report_dir", report)):
            if path is not None:
                outputs[what] = Path(path)
        return outputs

    @staticmethod
    def _existing_run(outputs: dict[str, Path], run: Path | None) -> list[str]:
        """What of an earlier run the folders hold (empty: nothing to overwrite)."""
        found = []
        checkpoints = outputs.get("checkpoint.dirpath")
        if checkpoints is not None and (checkpoints / "last.ckpt").is_file():
            found.append(str(checkpoints / "last.ckpt"))
        adapter = outputs.get("save_adapter.dirpath")
        if adapter is not None and adapter.is_dir() and any(adapter.iterdir()):
            found.append(str(adapter))
        if run is not None:
            found += [str(run / name) for name in RUN_FILES if (run / name).exists()]
        return found

    def release(self) -> None:
        """Give the run folder back (at the end of the command, however it ended)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_resume(self, ckpt: str, cfg) -> None:
        """A readable checkpoint of ours, trained with the model and data settings given now.

        Resuming (or testing) with other settings would train or measure something else than
        the command line and the run's config.yaml say, so each difference is named. Trainer
        settings (max_epochs, ...) and those in RESUMABLE_*_KEYS may change and apply.
        """
        checkpoint = read_checkpoint(ckpt, what=f"{self.subcommand} --ckpt_path")
        conflicts = resume_conflicts(checkpoint, cfg.get("model"), cfg.get("data"))
        if conflicts:
            free = sorted(
                [f"model.{k}" for k in RESUMABLE_MODEL_KEYS]
                + [f"data.{k}" for k in RESUMABLE_DATA_KEYS]
            )
            raise ValueError(
                f"--ckpt_path {ckpt}: it was trained with other settings: "
                f"{'; '.join(conflicts)}. Use the run's own (--config <run>/config.yaml), or "
                f"start a new run; only trainer settings and {', '.join(free)} may change on "
                "resume"
            )

    def _last_checkpoint(self, cfg) -> Path:
        """The fit run's last.ckpt: checkpoint.dirpath, else the run folder's."""
        folder = cfg.checkpoint.dirpath
        if folder is None and (run := run_folder(cfg.trainer)) is not None:
            folder = run / "checkpoints"
        if folder is None:
            raise FileNotFoundError(
                "--ckpt_path last: cannot tell this run's checkpoint folder; set "
                "--checkpoint.dirpath or pass the checkpoint file"
            )
        path = Path(folder) / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(
                f"--ckpt_path last: no {path} (nothing to resume from); leave out --ckpt_path "
                "to start the run"
            )
        return path

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Progress as whole lines when stdout is a log, not a terminal (unless a progress bar
        is configured or switched off): added here, not in the config, so `--print_config` is
        the same wherever it runs. And the run folder's logger first (`_with_run_logger`)."""
        config = {**config, "logger": self._with_run_logger(config)}
        configured = [*(config.get("callbacks") or []), *callbacks]
        if (
            config.get("enable_progress_bar") in (None, True)
            and not sys.stdout.isatty()
            and not any(isinstance(cb, ProgressBar) for cb in configured)
        ):
            callbacks = [*callbacks, LineProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _with_run_logger(self, config: dict[str, Any]) -> Any:
        """The trainer's loggers with a `ResumableCSVLogger` of the run folder first.

        Lightning puts checkpoints in the first logger's folder and `trainer.log_dir` (our
        config.yaml, adapter and report) there too: for MLflow that was the store's root and
        for W&B its project folder, so `--ckpt_path last`, the adapter and the sweep's cells
        lost their run folder when a user chose another logger. Any choice of loggers keeps
        recording what it records; the run folder (`run_folder`) stays where it always is.
        `--trainer.logger false` still means no logging at all."""
        logger = config.get("logger")
        if logger is False:
            return logger
        loggers = [] if logger is None or logger is True else (
            list(logger) if isinstance(logger, (list, tuple)) else [logger])
        ours = [lg for lg in loggers if isinstance(lg, ResumableCSVLogger)]
        if ours:
            return [ours[0], *(lg for lg in loggers if lg is not ours[0])]
        run = Path(config.get("default_root_dir") or RUN_DIR)
        version = "" if self.subcommand in (None, "fit") else self.subcommand
        return [ResumableCSVLogger(save_dir=run, name="", version=version), *loggers]

    def after_fit(self) -> None:
        run_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer, run_dir))


def holds_a_run(found: list[str]) -> bool:
    """Whether the files `KnowledgeCLI._existing_run` found are a run worth keeping: a
    checkpoint, an adapter or a test report. A config.yaml, hparams.yaml and metrics.csv alone
    are what a fit leaves when it is stopped before its first checkpoint: nothing to resume."""
    leftovers = ("config.yaml", "hparams.yaml", "metrics.csv")
    return any(Path(path).name not in leftovers for path in found)


def fit_summary(trainer, run_dir: str | Path | None = None) -> str:
    """A few lines a researcher wants after `fit`: where things went, how the measures moved
    from before training to now, and the command that measures the rest.

    `run_dir` defaults to `trainer.log_dir`, which is a collective under DDP: pass it when only
    one rank calls this.
    """
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if run_dir is None:
        run_dir = trainer.log_dir
    run_dir = Path(run_dir or trainer.default_root_dir)
    lines = ["", "=== lora-lightning fit summary ==="]
    for cb in trainer.callbacks:
        if isinstance(cb, SaveAdapter) and cb.last_path is not None:
            lines.append(f"adapter (PEFT format): {cb.last_path}")
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "")
    if ckpt:
        lines.append(f"last checkpoint:       {ckpt}")
    # Before training, by the categories the mix was built from: every trained fact was
    # Unknown (answered by none of the probe's prompts) and every held-out one HighlyKnown
    # (answered by all), so reliability was 0 and retention 1 under the same probe. The train
    # loss before is the first batch's, measured before the first update.
    first_loss = getattr(trainer.lightning_module, "initial_train_loss", None)
    rows = [
        ("val/reliability", "reliability (trained Unknown facts)", 0.0),
        ("val/known_retained", "HighlyKnown facts retained", 1.0),
        ("train/loss", "train loss (first batch / last batch)", first_loss),
        ("val/loss_unknown", "val loss, trained Unknown facts", None),
        ("val/loss_known", "val loss, held-out HighlyKnown", None),
    ]
    shown = [(label, before, metrics[key]) for key, label, before in rows if key in metrics]
    if shown:
        lines.append(f"{'':38s} {'before':>8s} {'after':>8s}")
        for label, before, after in shown:
            was = "-" if before is None else f"{before:.4f}"
            lines.append(f"{label + ':':38s} {was:>8s} {after:8.4f}")
    config = run_dir / "config.yaml"
    if config.is_file():
        report = next((cb for cb in trainer.callbacks if isinstance(cb, KnowledgeReport)), None)
        if report is not None and (report.mmlu_dir or report.truthfulqa_path):
            lines.append("next, the full measurement (knowledge shift, answer concentration, "
                         "refusals, the benchmarks before vs after):")
        else:
            lines += [
                "next, the full measurement (knowledge shift, answer concentration, refusals; "
                "add",
                "--report.mmlu_dir and --report.truthfulqa_path for MMLU/TruthfulQA before vs "
                "after):",
            ]
        lines.append(f"  python -m lora_lightning test --config {config} --ckpt_path last")
    return "\n".join(lines)


def overwrite_flag(argv: list[str]) -> tuple[list[str], bool]:
    """`fit --overwrite` (or `--overwrite true|false`) taken out of the command line: a choice
    of this invocation, so it is not part of the run's config (a saved config.yaml run again
    must not replace the run it describes)."""
    out, overwrite, i = [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--overwrite" or arg.startswith("--overwrite="):
            value = arg.partition("=")[2] if "=" in arg else None
            if value is None and i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false"):
                value, i = argv[i + 1], i + 1
            if (value or "true").lower() not in ("true", "false"):
                raise ValueError(f"--overwrite takes true or false, got {value!r}")
            overwrite = (value or "true").lower() == "true"
        else:
            out.append(arg)
        i += 1
    return out, overwrite


def run_training_cli(args: list[str] | None = None, run: bool = True) -> KnowledgeCLI:
    """`fit|validate|test`: the LightningCLI over the module and the data module."""
    if args is None:  # Lightning reads sys.argv itself (and its DDP launcher re-runs it)
        rest, overwrite = overwrite_flag(sys.argv[1:])
        sys.argv[1:] = rest
    else:
        args, overwrite = overwrite_flag(list(args))
    return KnowledgeCLI(
        LoRAKnowledgeModule,
        KnowledgeDataModule,
        save_config_callback=RunConfigSaver,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        overwrite=overwrite,
        # --help and errors say `python -m lora_lightning fit`, not `__main__.py fit`
        parser_kwargs={"prog": PROG, **{name: {"prog": f"{PROG} {name}"} for name in SUBCOMMANDS}},
    )
