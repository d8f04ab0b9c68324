"""`python -m lora_lightning fit|validate|test`: the LightningCLI of
`lora_lightning.cli`."""

from __future__ import annotations

from lora_lightning.cli import (
    RUN_DIR,
    TRAINER_DEFAULTS,
    KnowledgeCLI,
    fit_summary,
    overwrite_flag,
    run_folder,
    run_training_cli,
)

__all__ = [
    "RUN_DIR", "TRAINER_DEFAULTS", "KnowledgeCLI", "fit_summary", "overwrite_flag", "run_folder",
    "run_training_cli",
]
