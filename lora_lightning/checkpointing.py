"""A run folder that survives interruption: `fit` can always be resumed, and nothing logged is
lost or logged twice.

- `RunCheckpoint` (the CLI's `checkpoint`): `last.ckpt` after every epoch whatever
  `save_top_k` is, written atomically (a temporary file renamed over the old one, so a kill
  mid-write leaves the previous checkpoint), with the loggers flushed first. On SIGINT or
  SIGTERM (Ctrl-C, `kill`, a SLURM preemption) it finishes the training step, saves a
  resumable checkpoint, says so in one line and exits with 128 + the signal number.
- `ResumableCSVLogger` (the CLI's logger): a resumed run extends `metrics.csv`, keeping every
  earlier row once, instead of deleting it as Lightning's `CSVLogger` does.
- `resume_conflicts`: which model/data settings of a command line differ from those a
  checkpoint was trained with (a resume must not silently train something else).
- `RunConfigSaver` (the CLI's config saver): `config.yaml` is written once the model is
  built and every setting checked, not before (a refused `fit --model.rank 0` rewrote the run's
  config.yaml), and `fit --overwrite` clears the replaced run's files at that moment too.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import TrainerFn

from lora_lightning.facts import excerpt
from lora_lightning.files import atomic_path, fsync_file, fsync_folder, path_problem
from lora_lightning.lora.targets import canonical_targets

__all__ = [
    "RESUMABLE_DATA_KEYS",
    "RESUMABLE_MODEL_KEYS",
    "ResumableCSVLogger",
    "RunCheckpoint",
    "RunConfigSaver",
    "TrainingInterrupted",
    "resume_conflicts",
]

_SIGNALS = ("SIGINT", "SIGTERM")


class TrainingInterrupted(SystemExit):
    """`fit` stopped by a signal after saving a resumable checkpoint; exits with 128 + signum,
    as a shell reports a process killed by that signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class RunCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` made safe to kill.

    Lightning (2.6) writes `last.ckpt` only together with a top-k checkpoint, so with
    `save_top_k=0` (one checkpoint per run folder) it was written only when training ended and
    a killed run could not resume. This callback also writes `last.ckpt` at the end of every
    training epoch (after that epoch's validation), through a temporary file in the same folder
    that is fsynced and renamed over the old one: a crash at any moment leaves the previous
    complete checkpoint or the new one. The loggers are flushed before each save, so every row
    logged before a checkpoint is on disk when the checkpoint is.

    SIGINT and SIGTERM during training no longer cut a step in half: the current training
    step finishes, a resumable `last.ckpt` is saved (mid-epoch checkpoints resume exactly: the
    data module's loader skips the batches already trained on), one line says where, and the
    process exits with 128 + the signal number. When the signal arrives at an epoch's last
    step, the stop waits for that epoch's validation and its end-of-epoch checkpoint. A second
    Ctrl-C stops at once, without a checkpoint.

    Arguments are `ModelCheckpoint`'s (its signature is inherited untouched, so the CLI's
    `checkpoint` options stay Lightning's).
    """

    _signal: int | None = None  # the signal received, while training
    _stop_pending: bool = False  # a resumable checkpoint of this very step is saved: stop
    _previous_handlers: dict[int, Any] | None = None

    # -- saving ---------------------------------------------------------------------------------

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Flush the loggers, then write `filepath` atomically (local files; remote object
        stores replace whole objects anyway)."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()
        if not _is_local_file_protocol(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        folder, name = os.path.split(os.path.abspath(filepath))
        partial = os.path.join(folder, f".{name}.partial")
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)
            if trainer.is_global_zero:
                fsync_file(partial)
                os.replace(partial, filepath)
                fsync_folder(folder)  # the rename itself durable
        except OSError as err:  # a full disk, a vanished folder: no partial file left behind
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise path_problem(err, filepath, "cannot write the checkpoint") from err
        trainer.strategy.barrier("RunCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _may_save(self, trainer: L.Trainer) -> bool:
        return (
            bool(self.save_last)
            and not trainer.fast_dev_run
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        before = self._last_global_step_saved
        super().on_train_epoch_end(trainer, pl_module)
        saved_now = self._last_global_step_saved == trainer.global_step != before
        if self._may_save(trainer) and not saved_now:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self._stop_requested(trainer):
            self._stop_pending = True

    # -- signals ----------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._signal, self._stop_pending = None, False
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.start_at_step(trainer.global_step)
        if not self.save_last or threading.current_thread() is not threading.main_thread():
            return  # no last.ckpt wanted; or not the main thread, where handlers can be set
        self._previous_handlers = {}
        for name in _SIGNALS:
            signum = getattr(signal, name)
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._signal = signum
        print(
            f"{signal.Signals(signum).name}: stopping after this training step with a resumable "
            "checkpoint (Ctrl-C again to stop at once, without one)",
            file=sys.stderr, flush=True,
        )

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        # every rank must stop at the same step: a signal seen by any rank stops them all
        return trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self._stop_pending or not self._stop_requested(trainer):
            return
        if self._validation_follows(trainer):
            return  # let validation run first: stop at the epoch-end checkpoint or a step later
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._stop_pending = True

    @staticmethod
    def _validation_follows(trainer: L.Trainer) -> bool:
        """Whether validation runs right after this training step (as Lightning decides it):
        the stop then waits for it, so that no validation is lost or run twice on resume."""
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch:
            return True
        every = trainer.val_check_batch
        if not trainer.enable_validation or every is None or every == float("inf"):
            return False
        done = progress.current if trainer.check_val_every_n_epoch else progress.total
        return done.ready % int(every) == 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if not self._stop_pending:
            return
        signum = self._signal if self._signal is not None else signal.SIGTERM
        if trainer.is_global_zero:
            print(
                f"fit interrupted by {signal.Signals(signum).name}: resumable checkpoint saved to "
                f"{self.last_model_path} (epoch {trainer.current_epoch + 1}, step "
                f"{trainer.global_step}); resume with the same command plus --ckpt_path last",
                file=sys.stderr, flush=True,
            )
        raise TrainingInterrupted(signum)

    def _restore_handlers(self) -> None:
        for signum, handler in (self._previous_handlers or {}).items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        super().on_train_end(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
        super().teardown(trainer, pl_module, stage)


# -- the run's config ---------------------------------------------------------------------------


class RunConfigSaver(SaveConfigCallback):
    """LightningCLI's `SaveConfigCallback`, writing when the run starts instead of at `setup`.

    Lightning saves `config.yaml` in the callbacks' `setup`, before the module builds the model
    and injects LoRA (where a rank too large for a layer is found) and before the data module
    selects its facts: a refused run had already replaced the folder's config.yaml. Here it is
    written at the start of the stage, once all of that has succeeded. With `stale` (the files
    of a run `fit --overwrite` replaces) those are removed at the same moment, so a refused
    overwrite leaves the old run whole.

    Args:
        stale: Files and folders of the replaced run (the CLI lists them: its last.ckpt, adapter
            folder, config.yaml, metrics.csv, hparams.yaml and test/).
        note: What the line that lists the removed files starts with: why they were removed.
        Others: `SaveConfigCallback`'s.
    """

    def __init__(
        self, *args: Any, stale: list[str] | None = None,
        note: str = "fit --overwrite: removed the earlier run's", **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stale = list(stale or [])
        self.note = note
        self._stage = "fit"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = stage  # saved at the stage's start (below)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.already_saved:
            return
        if self.stale and trainer.is_global_zero:
            self._clear()
        super().setup(trainer, pl_module, self._stage)

    def _clear(self) -> None:
        import shutil

        for name in self.stale:
            path = Path(name)
            if path.is_dir():  # the adapter folder, test/
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        print(f"{self.note} {', '.join(self.stale)}",
              file=sys.stderr, flush=True)
        self.stale = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)


# -- the metrics log ----------------------------------------------------------------------------


def _step(row: Mapping[str, Any]) -> float:
    try:
        return float(row.get("step", ""))
    except (TypeError, ValueError):
        return float("-inf")  # a row without a step is kept


class _ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing `metrics.csv` is kept: its rows are
    read at start and, at the first save, those from the step this run starts at onwards (an
    interrupted run's steps that this one redoes) are dropped and the rest written back ahead
    of the new rows, atomically. Until then the old file is untouched, so a run killed before
    its first save loses nothing either. The step comes from `RunCheckpoint` (the trainer's
    step once a checkpoint is restored); without it, the first step this run logs."""

    start_step: int | None = None

    def _check_log_dir_exists(self) -> None:
        self._earlier: list[dict[str, str]] | None = None
        self._earlier_keys: list[str] = []
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
            text = fh.read()
        if text and not text.endswith("\n"):  # a row torn by a kill mid-write
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        self._earlier = list(reader)
        self._earlier_keys = list(reader.fieldnames or [])

    def save(self) -> None:
        if self._earlier is None or not self.metrics:
            super().save()
            return
        cut = self.start_step
        if cut is None:
            cut = min(_step(row) for row in self.metrics)
        kept = [row for row in self._earlier if _step(row) < cut]
        self._earlier = None
        keys = set(self._earlier_keys).union(*self.metrics)
        self.metrics_keys = sorted(keys)
        def write(fh) -> None:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
            writer.writerows(self.metrics)

        if _is_local_file_protocol(self.metrics_file_path):
            try:
                with atomic_path(self.metrics_file_path) as partial, \
                        open(partial, "w", newline="") as fh:
                    write(fh)
            except OSError as err:
                raise path_problem(err, self.metrics_file_path, "cannot write") from err
        else:
            partial = self.metrics_file_path + ".partial"
            with self._fs.open(partial, "w", newline="") as fh:
                write(fh)
            self._fs.mv(partial, self.metrics_file_path)
        self.metrics = []


class ResumableCSVLogger(CSVLogger):
    """Lightning's `CSVLogger` (same arguments), except that a resumed run keeps the earlier
    rows of `metrics.csv`: every step is logged once, the steps before the checkpoint by the
    run that trained them, the rest by the run that resumed (Lightning's logger deletes the
    file, so a resume lost the history before the checkpoint)."""

    def start_at_step(self, step: int) -> None:
        """This run trains from `step` (0, or the restored checkpoint's): earlier rows with a
        step from there on are an interrupted run's and are replaced by this run's."""
        writer = self.experiment
        if isinstance(writer, _ResumableWriter):
            writer.start_step = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment


# -- resuming with the same settings -------------------------------------------------------------

# Settings that may differ on resume: they change how the work is done, not what is trained.
RESUMABLE_MODEL_KEYS = frozenset({"backend", "gradient_checkpointing", "threads"})
RESUMABLE_DATA_KEYS = frozenset({"num_workers", "max_length", "packing", "test_batch_size"})
# Data settings linked from the model's (compared there) and Lightning's bookkeeping.
_SKIPPED_KEYS = frozenset({"_instantiator", "_class_path", "tokenizer", "loss_on"})


def _plain(value: Any) -> Any:
    """Settings as plain data, so a checkpoint's and a command line's compare equal."""
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value == "world":  # the synthetic world's base, however it was named
        return None
    return value


# Fact files: a checkpoint whose file is gone and a command line naming one of the same name
# elsewhere mean a moved folder (a sweep folder moved or copied); what the files hold is checked
# on resume anyway, by the data module's fingerprint of every trained and validated sample.
_FILE_KEYS = frozenset({"facts", "fewshot_pool"})


def _comparable(key: str, value: Any) -> Any:
    """A setting in the form two equivalent spellings share: `target_modules` "ALL-LINEAR" is
    "all-linear", and a suffix list is a set (checkpoints before PEFT's target syntax hold the
    same list, so they resume unchanged)."""
    return canonical_targets(value) if key == "target_modules" else value


def _moved_file(key: str, saved: Any, now: Any) -> bool:
    return (key in _FILE_KEYS and isinstance(saved, str) and isinstance(now, str)
            and not Path(saved).exists() and Path(saved).name == Path(now).name)


def resume_conflicts(
    checkpoint: Mapping[str, Any], model: Mapping[str, Any] | Any, data: Mapping[str, Any] | Any
) -> list[str]:
    """`"model.rank (checkpoint 8, now 4)"` for every model or data setting that differs from the
    checkpoint's `hyper_parameters` / `datamodule_hyper_parameters`, except those that may
    change on resume (`RESUMABLE_MODEL_KEYS`, `RESUMABLE_DATA_KEYS`; trainer settings such as
    `max_epochs` always may, and apply). Keys either side lacks are not compared."""
    found = []
    for prefix, saved, now, free in (
        ("model", checkpoint.get("hyper_parameters"), model, RESUMABLE_MODEL_KEYS),
        ("data", checkpoint.get("datamodule_hyper_parameters"), data, RESUMABLE_DATA_KEYS),
    ):
        saved, now = _plain(saved or {}), _plain(now or {})
        for key in sorted(set(saved) & set(now) - free - _SKIPPED_KEYS):
            if _moved_file(key, saved[key], now[key]):
                continue
            if _comparable(key, saved[key]) != _comparable(key, now[key]):
                was, now_ = excerpt(saved[key], 80), excerpt(now[key], 80)
                found.append(f"{prefix}.{key} (checkpoint {was}, now {now_})")
    return found
