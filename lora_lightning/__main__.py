"""`python -m lora_lightning <command>`: a table from command name to the function that runs it.

`fit`, `validate` and `test` are Lightning's own subcommands (the LightningCLI of
`lora_lightning.cli`); every other command is a typed function that jsonargparse exposes.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

from lora_lightning.commands import (
    aggregate_command,
    ask_argv,
    ask_command,
    capacity_command,
    categorize_command,
    evaluate_command,
    export_command,
    facts_command,
    run_training_cli,
    sweep_argv,
    sweep_command,
    world_command,
)
from lora_lightning.files import PathProblem, path_problem
from lora_lightning.harness import HarnessUnavailable
from lora_lightning.sweep.cell import follow_parent

COMMANDS: dict[str, Callable[..., Any]] = {
    "aggregate": aggregate_command,
    "ask": ask_command,
    "capacity": capacity_command,
    "categorize": categorize_command,
    "evaluate": evaluate_command,
    "export": export_command,
    "facts": facts_command,
    "sweep": sweep_command,
    "world": world_command,
}
POSITIONAL = ("aggregate",)  # `aggregate SWEEP_DIR`
TRAINING_COMMANDS = ("fit", "validate", "test")


class _DropMessages(logging.Filter):
    """Drops log records whose message contains any of `needles`."""

    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(needle in message for needle in self.needles)


def _add_filter(logger_name: str, needle: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.needles == (needle,) for f in logger.filters):
        logger.addFilter(_DropMessages(needle))


def quiet_known_noise() -> None:
    """Silence what every run printed and no user needs to read.

    - Lightning's "Tip: ... try installing [litlogger]" advertisement;
    - Lightning's own use of torch's deprecated `LeafSpec` (a FutureWarning on every fit);
    - transformers' "Token indices sequence length is longer than the specified maximum" for
      benchmark prompts, which the evaluation cuts to the model's context on purpose;
    - transformers' "Loading weights" bar when stderr is a log file rather than a terminal.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        _add_filter(name, "litlogger")  # the loggers of Lightning's rank_zero_info
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
    )
    _add_filter(
        "transformers.tokenization_utils_base", "Token indices sequence length is longer than"
    )
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    """Run a command; bad input ends with one clear line instead of a traceback.

    Set LORA_LIGHTNING_DEBUG=1 to see the full traceback of such an error.
    """
    follow_parent()  # a sweep's cell: die with the sweep
    quiet_known_noise()
    try:
        _main(argv)
    except (ValueError, OSError, KeyError, HarnessUnavailable) as err:
        if os.environ.get("LORA_LIGHTNING_DEBUG"):
            raise
        if isinstance(err, OSError) and not isinstance(err, PathProblem) and err.strerror:
            err = path_problem(err)  # a full disk, a read-only folder: the path and what to do
        kind = type(err).__name__
        if isinstance(err, PathProblem):  # named by its cause: ENOSPC, EROFS, EBUSY, ...
            kind = errno.errorcode.get(err.errno or 0, "OSError")
        print(f"error: {kind}: {err}", file=sys.stderr)
        print("(set LORA_LIGHTNING_DEBUG=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # during training `fit` saves a checkpoint and says so itself
        if os.environ.get("LORA_LIGHTNING_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def _main(argv: list[str] | None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        from jsonargparse import auto_cli

        command = argv.pop(0)
        if command in ("sweep", "capacity"):  # `--config FILE` is the sweep/capacity file
            argv = sweep_argv(argv)
        elif command == "ask":  # `ask "Where was X born?"`: the bare words are the question
            argv = ask_argv(argv)
        result = auto_cli(
            COMMANDS[command], args=argv, as_positional=command in POSITIONAL,
            prog=f"python -m lora_lightning {command}",
        )
        if command in ("sweep", "capacity") and isinstance(result, dict) and result.get(
            "failed"
        ):
            # the other cells finished and are aggregated; a script or CI must still notice
            sys.exit(1)
        return
    if argv and argv[0] in ("-h", "--help"):
        print(
            "commands: " + ", ".join((*TRAINING_COMMANDS, *COMMANDS))
            + " (python -m lora_lightning <command> --help)\n"
        )
    run_training_cli(None if from_command_line else argv)


if __name__ == "__main__":
    main()
