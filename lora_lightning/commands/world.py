"""`python -m lora_lightning world`: build a synthetic world (or find it cached) and show it."""

from __future__ import annotations

import json
from typing import Any, Literal

from lora_lightning.world import WorldConfig, ensure_world

_SHOWN = (
    ("n_facts", "facts (all)"),
    ("n_tested", "facts categorised (the fact file)"),
    ("n_known", "facts pre-trained"),
    ("n_two_hop", "2-hop questions (portability)"),
    ("n_parameters", "base model parameters"),
    ("frequent_known_accuracy", "base accuracy, frequently trained facts"),
    ("known_accuracy", "base accuracy, all trained facts"),
    ("unseen_accuracy", "base accuracy, never-seen facts"),
    ("refusal_rate", "refusal rate of the probes"),
    ("unique_answers", "unique answers of the probes"),
    ("world_mc", "world-MC accuracy (5-shot, chance 0.25)"),
    ("world_truthful_mc1", "world-truthful MC1"),
    ("world_truthful_mc2", "world-truthful MC2"),
    ("pretrain_seconds", "build: pre-training seconds"),
    ("total_seconds", "build: total seconds"),
)


def world_command(
    scale: Literal["small", "bench"] = "small",
    home: str | None = None,
    json_output: bool = False,
) -> dict[str, Any]:
    """Build the synthetic world of a scale, or find it in the cache, and show what it holds.

    Args:
        scale: "small" (the default run's world, about a minute to build) or "bench" (the
            paper's grid and in-world harm benchmarks; docs/world.md).
        home: cache folder (default `$LORA_LIGHTNING_HOME`, else `~/.cache/lora_lightning`).
        json_output: print the build information as JSON instead of a table.

    Returns:
        The world's build information (sizes, categories, base accuracy, refusal rate and, at
        bench scale, in-world benchmark scores).
    """
    world = ensure_world(WorldConfig.scale(scale), home=home)
    info = {"scale": scale, "root": str(world.root), **world.info}
    if json_output:
        print(json.dumps(info, indent=1))
        return info
    print(f"{scale} world at {world.root}")
    for key, label in _SHOWN:
        if key in info:
            value = info[key]
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"  {label + ':':46s} {shown}")
    categories = ", ".join(f"{k} {v}" for k, v in sorted(info.get("categories", {}).items()))
    print(f"  {'categories:':46s} {categories}")
    return info
