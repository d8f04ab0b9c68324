"""`python -m lora_lightning categorize`: SliCK categories of a fact file for a model.

The command is `lora_lightning.categorize.categorize_file`, so that the sweep and capacity
machinery (which checks a `categorize:` section against its arguments) needs nothing from the
command layer.
"""

from __future__ import annotations

from lora_lightning.categorize import categorize_file as categorize_command

__all__ = ["categorize_command"]
