"""The command-line commands, one module each; `lora_lightning.__main__` dispatches to them.

Each command is a typed function (or, for training, the LightningCLI) that jsonargparse turns
into a command line, so `--help`, config files and error messages come from one place.
"""

from lora_lightning.commands.aggregate import aggregate_command
from lora_lightning.commands.ask import ask_argv, ask_command
from lora_lightning.commands.capacity import capacity_command
from lora_lightning.commands.categorize import categorize_command
from lora_lightning.commands.evaluate import evaluate_command
from lora_lightning.commands.export import export_command
from lora_lightning.commands.facts import facts_command
from lora_lightning.commands.sweep import sweep_argv, sweep_command
from lora_lightning.commands.train import run_training_cli
from lora_lightning.commands.world import world_command

__all__ = [
    "aggregate_command",
    "ask_argv",
    "ask_command",
    "capacity_command",
    "categorize_command",
    "evaluate_command",
    "export_command",
    "facts_command",
    "run_training_cli",
    "sweep_argv",
    "sweep_command",
    "world_command",
]
